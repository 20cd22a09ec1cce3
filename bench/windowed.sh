#!/usr/bin/env bash
# Windowed (stateful) streaming benchmark: the fraud-detection query through
# Sluice and through Apache Spark Structured Streaming (PySpark, local mode),
# on this machine, on the same input files.
#
# What it measures:
#   - input: ROWS card transactions (default 1,000,000) from Sluice's seeded
#     `transactions` generator (USERS users, RATE rows per second of event
#     time, up to 2 s out of order), JSON-lines files of 50,000 rows;
#   - query: per user, sliding windows of 5 minutes every minute, count, sum
#     and average of amount, a 10-minute watermark, append mode,
#     HAVING count >= MIN_COUNT; FILES_PER_TRIGGER files a micro-batch
#     (maxFilesPerTrigger, default 1), trigger availableNow, Parquet output
#     with a checkpoint;
#   - Sluice: the wall time of `sluice run` (release build), its CPU time
#     (how many of the cores it kept busy) and its peak resident memory
#     (VmHWM); Spark: the streaming query's own time, and the process's wall
#     time with JVM start;
#   - the limit: the same aggregation as one batch query on DataFusion (the
#     engine under Sluice; its Python package) over the same files, the
#     faster of a naive window expansion and panes
#     (bench/datafusion_windowed.py), and
#     Sluice's fraction of its rate;
#   - correctness: both outputs are read with pyarrow and compared row for
#     row (sums and averages to 1e-9 relative: the engines add floating-point
#     numbers in different orders); the script exits 1 if they differ.
#
# With KEYS_ONLY=1 it runs Sluice alone and reports the keys in state and
# the peak RSS: e.g. 10M distinct keys (2,000,000 users each seen once, five
# windows per row, RATE high enough that no window closes):
#   KEYS_ONLY=1 ROWS=2000000 USERS=2000000 RATE=1000000 bench/windowed.sh
#
# Run: bench/windowed.sh        (ROWS=200000 for a quick look)
# Settings: ROWS (1000000), USERS (2000), RATE (100), MIN_COUNT (20),
# FILES_PER_TRIGGER (1), RUNS (1), BENCH_DIR, SLUICE_BENCH_TARGET (~/.cache/sluice/bench-target),
# SLUICE_BIN (use this binary instead of building), SPARK_MASTER (local[2]).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
ROWS=${ROWS:-1000000}
USERS=${USERS:-2000}
RATE=${RATE:-100}
RUNS=${RUNS:-1}
export MIN_COUNT=${MIN_COUNT:-20}
export FILES_PER_TRIGGER=${FILES_PER_TRIGGER:-1}
export SPARK_MASTER=${SPARK_MASTER:-local[2]}
KEYS_ONLY=${KEYS_ONLY:-}

source "$here/lib.sh"
if [ -z "$KEYS_ONLY" ]; then
  ensure_spark
  python3 -c 'import datafusion' 2>/dev/null || python3 -m pip install -q "datafusion==55.*"
fi
build_sluice
make_work_dir sluice-windowed
generate_transactions "$ROWS" "$USERS" "$RATE"

# Keep in step with bench/spark_windowed.py.
QUERY="SELECT window_start, window_end, user_id,
           count(*) AS n, sum(amount) AS total, avg(amount) AS avg_amount
    FROM hop(transactions, event_time, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
    GROUP BY window_start, window_end, user_id
    HAVING count(*) >= $MIN_COUNT"
cat >"$work/windowed.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-windowed}
spec:
  sources:
    - name: transactions
      files: {path: $work/input, maxFilesPerTrigger: $FILES_PER_TRIGGER}
      format: json
$TRANSACTIONS_SCHEMA
      watermark: {column: event_time, delay: 10m}
  query: |
    $QUERY
  sink: {files: {path: $work/sluice/out}, format: parquet}
  outputMode: append
  checkpoint: {location: $work/sluice/checkpoint}
  trigger: {availableNow: true}
YAML
"$sluice" validate "$work/windowed.yaml" >&2

results=$work/runs.jsonl
: >"$results"
for run in $(seq 1 "$RUNS"); do
  rm -rf "$work/sluice" "$work/state"
  say "sluice run $run/$RUNS"
  log=$work/sluice-$run.log
  t0=$(now)
  SLUICE_STATE_DIR="$work/state" "$sluice" run "$work/windowed.yaml" 2>"$log" &
  pid=$!
  peak=0
  ticks=0
  while kill -0 "$pid" 2>/dev/null; do
    hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
    # utime + stime (fields 14 and 15, after the command's parenthesis).
    t=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0)
    [ "${t:-0}" -gt "$ticks" ] && ticks=$t
    sleep 0.1
  done
  wait "$pid" || { tail -20 "$log" >&2; exit 1; }
  t1=$(now)
  secs=$(elapsed "$t0" "$t1")
  state_max=$(python3 - "$work/sluice/checkpoint" <<'PY'
import json, os, sys
d = os.path.join(sys.argv[1], "state", "aggregate")
print(max((json.load(open(os.path.join(d, f)))["rows"] for f in os.listdir(d) if f.endswith(".json")), default=0))
PY
)
  batches=$(grep -c 'Batch completed' "$log" || true)
  cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }')
  echo "   ${secs}s, ${cpu}s of CPU, $batches batches, peak RSS $((peak / 1024)) MiB, at most $state_max keys in state after a batch" >&2
  printf '{"engine": "sluice", "run": %d, "seconds": %s, "cpu_seconds": %s, "batches": %d, "peak_rss_kib": %d, "state_rows_max": %d}\n' \
    "$run" "$secs" "$cpu" "$batches" "$peak" "$state_max" >>"$results"
  [ -n "$KEYS_ONLY" ] && continue

  rm -rf "$work/spark"
  mkdir -p "$work/spark"
  say "spark run $run/$RUNS"
  log=$work/spark-$run.log
  t0=$(now)
  python3 "$here/spark_windowed.py" "$work/input" "$work/spark/out" "$work/spark/checkpoint" \
    "$work/spark/result.json" >"$log" 2>&1 || { tail -40 "$log" >&2; exit 1; }
  t1=$(now)
  python3 - "$work/spark/result.json" "$run" "$(elapsed "$t0" "$t1")" >>"$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r.update(engine="spark", run=int(sys.argv[2]), seconds=float(sys.argv[3]))
print(json.dumps(r))
PY
  say "datafusion (batch) run $run/$RUNS"
  python3 "$here/datafusion_windowed.py" "$work/input" "$MIN_COUNT" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); r.update(engine="datafusion", run=int(sys.argv[1])); print(json.dumps(r))' "$run" >>"$results"
done

python3 - "$results" "$work" "$ROWS" "$KEYS_ONLY" "$here/../e2e/lib" <<'PY'
import json, math, os, sys
import glob
sys.path.insert(0, sys.argv[5])
from results import committed_files
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
work, rows, keys_only = sys.argv[2], int(sys.argv[3]), sys.argv[4]
sl = [r for r in runs if r["engine"] == "sluice"]
best_sluice = min(sl, key=lambda r: r["seconds"])
files = os.environ.get("FILES_PER_TRIGGER", "1")
print(f"\nWindowed fraud query, {rows:,} input rows, {files} files a trigger, {os.cpu_count()} cores")
print(f"  Sluice: {best_sluice['seconds']:.2f} s ({rows / best_sluice['seconds']:,.0f} rows/s), "
      f"{best_sluice['cpu_seconds'] / best_sluice['seconds']:.2f} cores busy on average, "
      f"peak RSS {best_sluice['peak_rss_kib'] / 1024:,.0f} MiB, up to {best_sluice['state_rows_max']:,} keys in state")
if keys_only:
    sys.exit(0)
sp = [r for r in runs if r["engine"] == "spark"]
best_spark = min(sp, key=lambda r: r["query_seconds"])
print(f"  Spark {best_spark['spark_version']}: query {best_spark['query_seconds']:.2f} s "
      f"({rows / best_spark['query_seconds']:,.0f} rows/s), process {best_spark['seconds']:.2f} s, "
      f"{best_spark['batches']} batches, up to {best_spark['state_rows_max']:,} keys in state")
print(f"  Sluice is {best_spark['query_seconds'] / best_sluice['seconds']:.1f}x Spark's query time "
      f"({best_spark['seconds'] / best_sluice['seconds']:.1f}x its process time)")
df = min((r for r in runs if r["engine"] == "datafusion"), key=lambda r: r["seconds"])
print(f"  the limit, DataFusion as one batch query: {df['seconds']:.2f} s ({rows / df['seconds']:,.0f} rows/s, "
      f"{df['rows']:,} rows: every window; naive windows {df['naive_seconds']:.2f} s, panes {df['panes_seconds']:.2f} s); "
      f"Sluice runs at {df['seconds'] / best_sluice['seconds']:.0%} of it")
summary = {"rows": rows, "files_per_trigger": int(files), "sluice_seconds": best_sluice["seconds"],
           "sluice_cores_busy": best_sluice["cpu_seconds"] / best_sluice["seconds"],
           "spark_query_seconds": best_spark["query_seconds"], "datafusion_seconds": df["seconds"]}
json.dump(summary, open(os.path.join(work, "summary.json"), "w"))

import pyarrow.parquet as pq
def read(path, committed=None):
    files = committed if committed is not None else sorted(glob.glob(os.path.join(path, "*.parquet")))
    out = []
    for f in files:
        t = pq.read_table(f)
        for r in t.to_pylist():
            out.append(r)
    return out
s_rows = read(None, committed_files(os.path.join(work, "sluice", "out")))
p_rows = read(os.path.join(work, "spark", "out"))
key = lambda r: (r["window_start"], r["window_end"], r["user_id"])
def norm(rows):
    return {key(r): (int(r["n"]), float(r["total"]), float(r["avg_amount"])) for r in rows}
s, p = norm(s_rows), norm(p_rows)
dups = (len(s_rows) - len(s), len(p_rows) - len(p))
only_s, only_p = s.keys() - p.keys(), p.keys() - s.keys()
diff = [k for k in s.keys() & p.keys() if s[k][0] != p[k][0]
        or not math.isclose(s[k][1], p[k][1], rel_tol=1e-9) or not math.isclose(s[k][2], p[k][2], rel_tol=1e-9)]
print(f"  rows: Sluice {len(s_rows):,}, Spark {len(p_rows):,}; duplicates {dups}; only in Sluice {len(only_s)}, "
      f"only in Spark {len(only_p)}, different values {len(diff)}")
for k in sorted(only_s)[:5]: print("    only Sluice:", k, s[k])
for k in sorted(only_p)[:5]: print("    only Spark:", k, p[k])
for k in sorted(diff)[:5]: print("    differ:", k, s[k], p[k])
if dups != (0, 0) or only_s or only_p or diff:
    print("  RESULT: the outputs DIFFER")
    sys.exit(1)
print("  RESULT: identical, row for row")
PY
