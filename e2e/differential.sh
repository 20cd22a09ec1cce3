#!/usr/bin/env bash
# Differential test against Apache Spark Structured Streaming: 20 generated
# streaming cases (fixed seed; every query kind in every output mode Spark
# accepts: stateless filter, window() alone, tumbling / sliding / session
# window aggregations, GROUP BY k, deduplication; watermarks, late rows,
# one file a micro-batch, availableNow) run through PySpark 4.3 (local[2],
# one SparkSession) and through `sluice run`, and their outputs compared
# batch by batch (bench/differential/). Fails on any difference that
# bench/differential/known_differences.json does not list.
#
# The cases stay in the work dir printed at the end (DIFFERENTIAL_DIR to
# choose it); bench/differential/run_case.sh CASE_DIR re-runs one.
# SLUICE_BIN: use this binary instead of the test suite's debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1 TZ=UTC SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
source bench/lib.sh
ensure_spark
if [ -n "${SLUICE_BIN:-}" ]; then
  sluice=$SLUICE_BIN
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
  # Built as `cargo test --workspace` builds it (the test suite's feature set).
  cargo test --workspace --locked --quiet --no-run
  sluice="$CARGO_TARGET_DIR/debug/sluice"
fi
work=${DIFFERENTIAL_DIR:-$(mktemp -d -t sluice-differential-e2e.XXXXXX)}
python3 bench/differential/suite.py --sluice "$sluice" --work "$work" --cases 20 --seed 20261121
