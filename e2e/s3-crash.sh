#!/usr/bin/env bash
# The crash tests (a stateless query, and a windowed aggregation whose
# RocksDB state is checkpointed too) and the zombie test (two engines on one
# checkpoint, one paused while the other takes over) with the checkpoint on
# an S3-compatible server running as its own process (e2e/lib/s3.sh: moto).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
source e2e/lib/s3.sh

work=$(mktemp -d)
trap 's3_stop; remove_dir "$work"' EXIT
s3_start "$work"

SLUICE_TEST_S3_CHECKPOINT=s3://checkpoints/crash-test \
  cargo test --locked --workspace --test it -- --ignored --exact \
  crash::killed_at_any_step_the_sink_holds_every_row_once_with_an_s3_checkpoint \
  crash::killed_at_any_step_a_windowed_aggregation_writes_every_window_once_with_an_s3_checkpoint \
  zombie::two_runners_of_a_windowed_aggregation_write_every_window_once_with_an_s3_checkpoint

read -r objects state_objects < <(python3 - <<'PY'
import os, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="checkpoints", Prefix="crash-test/")
keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
print(len(keys), sum("/state/aggregate/" in k for k in keys))
PY
)
echo "objects written to s3://checkpoints/crash-test: $objects, of which RocksDB state (SST files, manifests): $state_objects"
[ "$objects" -gt 80 ] || { echo "FAIL: expected the checkpoints on S3"; exit 1; }
[ "$state_objects" -gt 0 ] || { echo "FAIL: expected the windowed query's state on S3"; exit 1; }
echo "s3-crash: 3 passed, 0 failed"
