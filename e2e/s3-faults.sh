#!/usr/bin/env bash
# The windowed aggregation with its checkpoint on an S3 server that fails:
# e2e/s3proxy.py in front of moto answers 500 to some requests (before and
# after doing them), drops connections and answers slowly, and the test
# has it fail everything for 25 s mid-run. The sink must hold exactly an
# uninterrupted run's rows, and /status must say the query is restarting
# while the outage lasts (engine/tests/it/faults.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
source e2e/lib/s3.sh

work=$(mktemp -d)
trap 's3_stop; stop_processes "${proxy:-}"; remove_dir "$work"' EXIT
s3_start "$work"
proxy_port=$(free_port)
python3 e2e/s3proxy.py --listen "127.0.0.1:$proxy_port" --upstream "$AWS_ENDPOINT_URL" \
  --seed 11 --fail 0.04 --fail-after 0.04 --reset 0.03 --slow 0.02 --slow-seconds 2 \
  > "$work/proxy.log" 2>&1 &
proxy=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$proxy_port/__faults" > /dev/null 2>&1 && break
  sleep 0.1
done

AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port" \
SLUICE_TEST_S3_FAULTY_CHECKPOINT=s3://checkpoints/faults \
SLUICE_TEST_S3_FAULT_CONTROL="http://127.0.0.1:$proxy_port" \
  cargo test --locked --workspace --test it -- --ignored --exact --nocapture \
  faults::a_failing_object_store_loses_and_duplicates_nothing
echo "s3-faults: 1 passed, 0 failed"
