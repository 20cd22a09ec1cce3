#!/usr/bin/env bash
# End to end, as a user would check it: `sluice run` on a local example with
# --http-port, then curl on /progress, /status, /metrics, /healthz and /readyz while it
# runs; the exposition is checked by Prometheus' own promtool; SIGTERM stops
# the query at a batch boundary with exit status 0.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
# Built as `cargo test --workspace` builds it (the test suite's feature set:
# a lone `cargo build --bin sluice` unifies fewer features and would build
# DataFusion a second time).
cargo test --workspace --locked --quiet --no-run
sluice="$CARGO_TARGET_DIR/debug/sluice"

work=$(mktemp -d)
trap 'stop_processes "${pid:-}"; remove_dir "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s#/tmp/sluice/rate-to-files#$work#" -e 's/processingTime: 2s/processingTime: 500ms/' \
  examples/local/rate-to-files.yaml > "$work/query.yaml"

"$sluice" run "$work/query.yaml" --http-port "$port" --http-address 127.0.0.1 2> "$work/log" &
pid=$!

for _ in $(seq 1 120); do
  batches=$(curl -fsS "localhost:$port/progress" 2>/dev/null \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$batches" -ge 2 ] && break
  sleep 0.5
done
[ "$batches" -ge 2 ] || { cat "$work/log"; echo "FAIL: fewer than 2 progress reports"; exit 1; }

curl -fsS "localhost:$port/progress" | python3 -c '
import json, sys
reports = json.load(sys.stdin)
last = reports[-1]
required = ["id", "runId", "name", "timestamp", "batchId", "numInputRows", "inputRowsPerSecond",
            "processedRowsPerSecond", "durationMs", "sources", "sink"]
missing = [f for f in required if f not in last]
assert not missing, f"missing {missing} in {last}"
assert last["numInputRows"] > 0, last
batch, rows, rate = last["batchId"], last["numInputRows"], last["inputRowsPerSecond"]
print(f"progress: batch {batch}, {rows} rows, {rate:.1f} rows/s in")
'
curl -fsS "localhost:$port/metrics" > "$work/metrics.txt"
grep -q '^sluice_batches_total{query="rate-to-files"}' "$work/metrics.txt"
grep -q '^sluice_input_rows_total{query="rate-to-files",source="rate"}' "$work/metrics.txt"
promtool check metrics < "$work/metrics.txt"
curl -fsS "localhost:$port/status" | python3 -c '
import json, sys
status = json.load(sys.stdin)
assert set(status) == {"message", "isDataAvailable", "isTriggerActive"}, status
print("status:", status["message"])
'
curl -fsS "localhost:$port/healthz" > /dev/null
curl -fsS "localhost:$port/readyz" > /dev/null

kill -TERM "$pid"
wait "$pid"
grep -q 'stopped=Requested' "$work/log"
ls "$work/out"/part-*.jsonl "$work/out/_sluice_metadata/0" "$work/checkpoint/commits/0" > /dev/null

# Started again, it resumes after the last committed batch.
last=$(ls "$work/checkpoint/commits" | sort -n | tail -1)
"$sluice" run "$work/query.yaml" --max-batches 1 2> "$work/log2"
grep -Eq "Recovered from the checkpoint. location=$work/checkpoint epoch=[0-9]+ next_batch=$((last + 1))" "$work/log2" \
  || { cat "$work/log2"; echo "FAIL: did not resume after batch $last"; exit 1; }
echo "e2e local-http: 1 passed, 0 failed"
