#!/usr/bin/env bash
# What Sluice's state costs at scale (bench/state.py): an aggregation keeping
# KEYS keys (default 10,000,000, ~1 GB of RocksDB state) with its checkpoint
# on an S3-compatible server (moto, e2e/lib/s3.sh; CHECKPOINT=local for a
# directory): time and peak RSS to build it, the state's size, the
# checkpoint cost per batch when 1% of the keys change, and the restart
# time after SIGKILL from a local copy (a pod on its volume) and from the
# checkpoint only. Figures are printed, nothing asserted.
#
# Run: bench/state.sh    Settings: KEYS, CHANGED_BATCHES (12), CHECKPOINT
# (s3 | local), SLUICE_BIN, SLUICE_BENCH_TARGET, BENCH_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export PYTHONDONTWRITEBYTECODE=1
source "$here/lib.sh"
source "$repo/e2e/lib/s3.sh"
build_sluice
make_work_dir sluice-state
rm -rf "$work/state" "$work/checkpoint"
if [ "${CHECKPOINT:-s3}" = local ]; then
  checkpoint="$work/checkpoint"
else
  python3 -c 'import moto, boto3' 2>/dev/null || python3 -m pip install -q 'moto[server]' boto3
  s3_start "$work"
  trap s3_stop EXIT
  checkpoint="s3://checkpoints/bench-state"
fi
python3 "$here/state.py" --sluice "$sluice" --work "$work" --checkpoint "$checkpoint" \
  --keys "${KEYS:-10000000}" --changed-batches "${CHANGED_BATCHES:-12}"
