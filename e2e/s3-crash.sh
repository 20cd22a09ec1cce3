#!/usr/bin/env bash
# The crash tests (a stateless query, and a windowed aggregation whose
# RocksDB state is checkpointed too) with the checkpoint on an S3-compatible
# server running as its own process: moto in server mode (PyPI), on a free loopback port, with a
# bucket made for the test. The engine reads the endpoint and credentials from
# the environment, as a pod would from a Secret.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
python3 -c 'import moto, boto3' 2>/dev/null || {
  echo "s3-crash: moto is not installed: pip install 'moto[server]'" >&2; exit 1; }

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m moto.server -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto=$!
trap 'kill "$moto" 2>/dev/null || true; rm -rf "$work"' EXIT

export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=sluice-test AWS_SECRET_ACCESS_KEY=sluice-test
for _ in $(seq 1 100); do
  curl -fsS "$AWS_ENDPOINT_URL" > /dev/null 2>&1 && break
  sleep 0.1
done
python3 - <<'PY'
import os, boto3
boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="checkpoints")
PY

SLUICE_TEST_S3_CHECKPOINT=s3://checkpoints/crash-test \
  cargo test --locked --workspace --test it -- --ignored --exact \
  crash::killed_at_any_step_the_sink_holds_every_row_once_with_an_s3_checkpoint \
  crash::killed_at_any_step_a_windowed_aggregation_writes_every_window_once_with_an_s3_checkpoint

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
echo "s3-crash: 2 passed, 0 failed"
