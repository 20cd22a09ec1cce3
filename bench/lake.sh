#!/usr/bin/env bash
# Parquet-on-S3 sink throughput, Sluice next to Apache Spark, on the same data
# and the same S3-compatible server (moto, e2e/lib/s3.sh), in one run:
#
#   - input: ROWS card transactions (default 1,000,000; Sluice's seeded
#     generator) as JSON-lines files of 50,000 rows on the local disk;
#   - the query, each engine: every row, one file a micro-batch, availableNow,
#     written as Parquet (zstd) partitioned by device_type to its own prefix
#     of one bucket, exactly once (Sluice: its manifests; Spark: its
#     _spark_metadata log), the checkpoint on the local disk;
#   - Sluice: release build, `sluice run`, the process's wall time; Spark:
#     PySpark 4.3 with S3A (hadoop-aws from Maven Central, bench/s3a-pom.xml),
#     local[2], the query's own time after the JVM started;
#   - checks: each output holds every input row once (Sluice: the rows its
#     manifests list, and no other file; Spark: its own reader through
#     _spark_metadata);
#   - prints rows/s and MB/s of input for each, and Sluice over Spark.
#
# The server is moto, a Python process on the same 2 cores: it bounds both
# engines; the figures compare the engines' sinks on one server, not S3.
#
# Run: bench/lake.sh    (ROWS=200000 for a quick look)
# Settings: ROWS (1000000), BENCH_DIR, SLUICE_BENCH_TARGET, SLUICE_BIN,
# SPARK_MASTER (local[2]).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
ROWS=${ROWS:-1000000}
export SPARK_MASTER=${SPARK_MASTER:-local[2]} PYTHONDONTWRITEBYTECODE=1

source "$here/lib.sh"
source "$repo/e2e/lib/s3.sh"
ensure_spark
build_sluice
SPARK_S3A_JARS=$(spark_s3a_jars)
export SPARK_S3A_JARS
make_work_dir sluice-lake
generate_transactions "$ROWS" 2000 100
input_bytes=$(cat "$work"/input/part-*.jsonl | wc -c)

s3_start "$work/s3" bench
trap 's3_stop' EXIT

cat >"$work/lake.yaml" <<EOF
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-lake}
spec:
  sources:
    - name: transactions
      files: {path: $work/input, maxFilesPerTrigger: 1}
      format: json
$TRANSACTIONS_SCHEMA
  query: SELECT * FROM transactions
  sink:
    files: {path: "s3://bench/sluice", partitionBy: [device_type]}
    format: parquet
  checkpoint: {location: $work/sluice-checkpoint}
  trigger: {availableNow: true}
EOF
"$sluice" validate "$work/lake.yaml" >&2

say "sluice: $ROWS rows to s3://bench/sluice"
t0=$(now)
"$sluice" run "$work/lake.yaml" 2>"$work/sluice.log" || { tail -20 "$work/sluice.log" >&2; exit 1; }
t1=$(now)
sluice_secs=$(elapsed "$t0" "$t1")

say "spark: $ROWS rows to s3a://bench/spark"
t0=$(now)
python3 "$here/spark_lake.py" "$work/input" "s3a://bench/spark" "$work/spark-checkpoint" \
  "$work/spark.json" >"$work/spark.log" 2>&1 || { tail -40 "$work/spark.log" >&2; exit 1; }
t1=$(now)
spark_process_secs=$(elapsed "$t0" "$t1")

python3 "$here/lake_report.py" "$ROWS" "$input_bytes" "$sluice_secs" "$spark_process_secs" "$work/spark.json"
