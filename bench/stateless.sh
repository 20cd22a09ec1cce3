#!/usr/bin/env bash
# Stateless streaming benchmark: Sluice against Apache Spark Structured
# Streaming (PySpark, local mode), on this machine, on the same input files.
#
# What it measures: the throughput (input rows per second) of one stateless
# micro-batch query run to completion by each engine:
#   - input: ROWS card transactions (default 1,000,000) made by Sluice's seeded
#     `transactions` generator, written as JSON-lines files of 50,000 rows
#     (part-00000000.jsonl, ...);
#   - query: read the files with a declared schema, one file a micro-batch
#     (maxFilesPerTrigger 1), trigger availableNow, filter the risky
#     transactions and label them with a CASE (the query is below, in
#     QUERY, and in bench/spark_stateless.py), write Parquet with a checkpoint;
#   - Sluice: the wall time of the `sluice run` process (release build);
#   - Spark: the time of the streaming query itself (start() until
#     awaitTermination() returns) and, separately, the wall time of the
#     whole Python process, JVM start included (master local[2],
#     spark.sql.shuffle.partitions 2, session time zone UTC);
#   - correctness: both Parquet outputs are read with pyarrow and compared
#     row for row (bench/stateless_report.py); the script exits 1 if they differ.
# It prints the machine, the versions, a table of both engines' figures and
# the ratio "Sluice is X× Spark".
#
# Run it from anywhere (it builds Sluice, installs pyspark + pyarrow with pip
# if `import pyspark, pyarrow` fails, and needs Java 17+ for Spark):
#   bench/stateless.sh
#   ROWS=200000 RUNS=3 bench/stateless.sh        # fewer rows, best of 3 runs each
#   BENCH_DIR=/tmp/sluice-bench bench/stateless.sh   # keep the data and outputs there
# Settings: ROWS (1000000), RUNS (1), BENCH_DIR (a new mktemp -d),
# SLUICE_BENCH_TARGET (cargo target dir, default ~/.cache/sluice/bench-target),
# SLUICE_BIN (use this binary instead of building),
# PYSPARK_VERSION (4.3.0, installed only when pyspark is missing),
# SPARK_MASTER (local[2]), SPARK_SHUFFLE_PARTITIONS (2), SPARK_DRIVER_MEMORY (2g),
# SPARK_PARQUET_CODEC (zstd, what Sluice's sink writes).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
ROWS=${ROWS:-1000000}
RUNS=${RUNS:-1}
PYSPARK_VERSION=${PYSPARK_VERSION:-4.3.0}
export SPARK_MASTER=${SPARK_MASTER:-local[2]}
export SPARK_PARQUET_CODEC=${SPARK_PARQUET_CODEC:-zstd}

source "$here/lib.sh"
ensure_spark
build_sluice
make_work_dir sluice-bench

# --- Input: JSON-lines files from Sluice's seeded generator ----------------
# Event time: 1 ms a row, plus up to 2 s of disorder; one file per 50,000 rows.
generate_transactions "$ROWS" 100000 1000
input_files=$(find "$work/input" -maxdepth 1 -name 'part-*.jsonl' | wc -l)
input_rows=$ROWS
input_bytes=$(find "$work/input" -maxdepth 1 -name 'part-*.jsonl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
echo "   $input_rows rows in $input_files files, $input_bytes bytes (and $work/input/_sluice_metadata, which both engines skip)" >&2

# --- The workload ----------------------------------------------------------
# Keep in step with QUERY in bench/spark_stateless.py.
QUERY="SELECT transaction_id, user_id, merchant_id, device_type, event_time, amount,
           CASE WHEN amount >= 1000 THEN 'high'
                WHEN device_type = 'atm' AND amount >= 300 THEN 'atm-large'
                ELSE 'elevated'
           END AS risk
    FROM transactions
    WHERE amount >= 250 OR (device_type = 'atm' AND amount >= 100)"

cat >"$work/stateless.yaml" <<EOF
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-stateless}
spec:
  sources:
    - name: transactions
      files: {path: $work/input, maxFilesPerTrigger: 1}
      format: json
$TRANSACTIONS_SCHEMA
  query: |
    $QUERY
  sink:
    files: {path: $work/sluice/out}
    format: parquet
  checkpoint: {location: $work/sluice/checkpoint}
  trigger: {availableNow: true}
EOF
"$sluice" validate "$work/stateless.yaml" >&2

loadavg=$(cut -d' ' -f1-3 /proc/loadavg)
sluice_runs=$work/sluice-runs.jsonl
spark_runs=$work/spark-runs.jsonl
: >"$sluice_runs"
: >"$spark_runs"

for run in $(seq 1 "$RUNS"); do
  # Sluice: the wall time of the process.
  rm -rf "$work/sluice"
  say "sluice run $run/$RUNS"
  log=$work/sluice-run-$run.log
  t0=$(now)
  "$sluice" run "$work/stateless.yaml" 2>"$log" || { tail -20 "$log" >&2; exit 1; }
  t1=$(now)
  secs=$(elapsed "$t0" "$t1")
  rows_in=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'Batch completed' | grep -o ' input_rows=[0-9]*' |
    awk -F= '{ s += $2 } END { print s + 0 }')
  batches=$(grep -c 'Batch completed' "$log" || true)
  batch_ms=$(grep 'Batch completed' "$log" | grep -o 'duration_ms=[0-9]*' | cut -d= -f2 | paste -sd, -)
  echo "   ${secs}s, $rows_in input rows in $batches batches (log: $log)" >&2
  printf '{"run": %d, "seconds": %s, "input_rows": %d, "batches": %d, "batch_ms": [%s]}\n' \
    "$run" "$secs" "$rows_in" "$batches" "$batch_ms" >>"$sluice_runs"

  # Spark: the query's own time (measured inside) and the process's wall time.
  rm -rf "$work/spark"
  mkdir -p "$work/spark"
  say "spark run $run/$RUNS"
  log=$work/spark-run-$run.log
  t0=$(now)
  python3 "$here/spark_stateless.py" "$work/input" "$work/spark/out" "$work/spark/checkpoint" \
    "$work/spark/result.json" >"$log" 2>&1 || { tail -40 "$log" >&2; exit 1; }
  t1=$(now)
  secs=$(elapsed "$t0" "$t1")
  python3 - "$work/spark/result.json" "$run" "$secs" >>"$spark_runs" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r.update(run=int(sys.argv[2]), seconds=float(sys.argv[3]))
print(json.dumps(r))
PY
  python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print("   %.3fs process, %.3fs query, %d files read in %d batches (log: %s)" % (r["seconds"], r["query_seconds"], len(r["files_read"]), r["batches"], sys.argv[2]), file=sys.stderr)' \
    "$(tail -1 "$spark_runs")" "$log"
done

# --- Machine, versions, and the report -------------------------------------
commit=$(git -C "$repo" rev-parse HEAD)
if [ -n "$(git -C "$repo" status --porcelain -- . ':(exclude)bench')" ]; then
  commit="$commit + uncommitted changes"
fi
export R_ROWS=$input_rows R_RUNS=$RUNS R_INPUT_FILES=$input_files R_INPUT_DIR=$work/input R_INPUT_BYTES=$input_bytes \
  R_NPROC=$(nproc) \
  R_CPU="$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
  R_MEMORY="$(free -h | awk '/^Mem:/ { print $2 }')" \
  R_OS="$(uname -sr)" R_LOADAVG="$loadavg" \
  R_JAVA="$(java -version 2>&1 | head -1 | sed 's/.*version "\([^"]*\)".*/\1/')" \
  R_COMMIT="$commit" R_WORK=$work
python3 - "$sluice_runs" "$spark_runs" >"$work/results.json" <<'PY'
import json, os, sys
load = lambda p: [json.loads(line) for line in open(p) if line.strip()]
e = os.environ
spark = load(sys.argv[2])
print(json.dumps({
    "rows": int(e["R_ROWS"]), "runs": int(e["R_RUNS"]),
    "input_files": int(e["R_INPUT_FILES"]), "input_bytes": int(e["R_INPUT_BYTES"]),
    "nproc": e["R_NPROC"], "cpu": e["R_CPU"], "memory": e["R_MEMORY"], "os": e["R_OS"],
    "loadavg": e["R_LOADAVG"],
    "java": e["R_JAVA"], "sluice_commit": e["R_COMMIT"],
    "spark_version": spark[0]["spark_version"], "spark_codec": spark[0]["parquet_codec"],
    "spark_master": e["SPARK_MASTER"], "input_dir": e["R_INPUT_DIR"],
    "sluice_out": os.path.join(e["R_WORK"], "sluice", "out"),
    "spark_out": os.path.join(e["R_WORK"], "spark", "out"),
    "sluice": {"runs": load(sys.argv[1])}, "spark": {"runs": spark},
}, indent=2))
PY
python3 "$here/stateless_report.py" "$work/results.json"
