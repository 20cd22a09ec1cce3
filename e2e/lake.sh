#!/usr/bin/env bash
# Files on an object store and the Delta Lake sink, exactly once, against a
# real S3-compatible server (moto, e2e/lib/s3.sh). The checks are in
# e2e/lake/e2e.py: files arriving in a bucket while the query runs and is
# killed 10 times, its partitioned Parquet output in another bucket equal to
# an uninterrupted run's; the fraud query to a Delta table on S3 with 10
# kills, read by delta-rs (Python) and by Apache Spark with delta-spark,
# equal to the file sink's result, one commit per batch in DESCRIBE HISTORY.
# The Delta readers (a virtualenv with PySpark 4.2 + delta-spark, and its
# jars from Maven Central) are set up once under ~/.cache/sluice/delta-readers.
# LAKE_E2E_RECORDS sets the number of fraud transactions (default 400,000).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
export PYTHONDONTWRITEBYTECODE=1
# Built as `cargo test --workspace` builds it (the test suite's feature set).
cargo test --workspace --locked --quiet --no-run
source e2e/lib/s3.sh
source e2e/lake/lib.sh
delta_readers_setup

work=$(mktemp -d)
trap 's3_stop; remove_dir "$work"' EXIT
s3_start "$work"
python3 e2e/lake/e2e.py --sluice "$CARGO_TARGET_DIR/debug/sluice" --work "$work" \
  --delta-python "$(delta_venv)/bin/python" --delta-jars "$(delta_spark_jars)" \
  --records "${LAKE_E2E_RECORDS:-400000}"
echo "e2e lake: passed"
