#!/usr/bin/env bash
# Differential test, benchmark size: generated streaming cases through Apache
# Spark Structured Streaming (PySpark, local[2], one SparkSession for all
# cases) and through Sluice, compared batch by batch (bench/differential/:
# cases.py generates, spark_side.py and sluice_side.py run, compare.py
# compares; README.md there says more).
#
# Each case: a source `events` (k, v, ts) of 4-12 JSON-lines files, one a
# micro-batch (maxFilesPerTrigger 1, availableNow), a watermark of 0-20 s
# (or none where the query allows it), and one query kind in an output mode
# Spark accepts: a stateless filter, window() alone, tumbling, sliding and
# session window aggregations, GROUP BY k, deduplication.
#
# Run: bench/differential.sh                 (200 cases, seed 1)
# Settings: CASES (200), SEED (1), KINDS (e.g. tumble,session: only those),
# PROBE=1 (every kind x mode x watermark instead: which ones each engine
# refuses), BENCH_DIR (work dir; default a new temporary one), SLUICE_BIN
# (this binary; default the test suite's debug build, built if needed),
# SPARK_MASTER (local[2]).
# Exits 1 if a case differs and bench/differential/known_differences.json
# does not explain it. One case again: bench/differential/run_case.sh DIR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export PYTHONDONTWRITEBYTECODE=1 TZ=UTC SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
CASES=${CASES:-200}
SEED=${SEED:-1}

source "$here/lib.sh"
ensure_spark
if [ -n "${SLUICE_BIN:-}" ]; then
  sluice=$SLUICE_BIN
else
  # The test suite's debug build (`cargo test --workspace` unifies the
  # features the binary is built with; a lone `cargo build` would build
  # DataFusion a second time).
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
  (cd "$repo" && cargo test --workspace --locked --quiet --no-run)
  sluice=$CARGO_TARGET_DIR/debug/sluice
fi
make_work_dir sluice-differential

args=(--sluice "$sluice" --work "$work" --cases "$CASES" --seed "$SEED")
[ -n "${KINDS:-}" ] && args+=(--kinds "$KINDS")
[ -n "${PROBE:-}" ] && args+=(--probe)
exec python3 "$here/differential/suite.py" "${args[@]}"
