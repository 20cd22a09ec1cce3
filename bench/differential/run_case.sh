#!/usr/bin/env bash
# Re-runs ONE differential case through both engines and shows it batch by
# batch: its input files, Spark's watermark per batch, and each batch's rows
# with what only one engine wrote.
#
#   bench/differential/run_case.sh WORK_DIR/cases/0007-hop-complete-wm15000ms
#
# SKIP_SPARK=1 keeps Spark's earlier output (re-runs Sluice alone: seconds,
# no JVM); SLUICE_BIN names the binary (default: the test suite's debug build,
# $CARGO_TARGET_DIR/debug/sluice). The case's sluice.yaml is rewritten for
# the directory it is in, so a copied case runs where it is.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1 TZ=UTC SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -eq 1 ] && [ -f "$1/case.json" ] || { echo "usage: $0 CASE_DIR (a directory with case.json)" >&2; exit 2; }
dir=$(cd "$1" && pwd)
sluice=${SLUICE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}/debug/sluice}
[ -x "$sluice" ] || { echo "no sluice binary at $sluice (set SLUICE_BIN)" >&2; exit 2; }
if [ -z "${SKIP_SPARK:-}" ]; then
  python3 "$here/spark_side.py" "$dir" 2>"$dir/spark.log" || { tail -30 "$dir/spark.log" >&2; exit 1; }
  grep -E '^  spark \[' "$dir/spark.log" >&2
fi
python3 "$here/sluice_side.py" "$sluice" "$dir"
python3 "$here/compare.py" --detail "$dir"
