#!/usr/bin/env bash
# End to end with a real Prometheus (Debian's package): it scrapes a running
# `sluice run` every second, and PromQL over its HTTP API returns the query's
# input rate and lag, the series a dashboard and the autoscaler use.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
command -v prometheus > /dev/null || { echo "prometheus: not installed: apt-get install prometheus" >&2; exit 1; }
# Built as `cargo test --workspace` builds it (the test suite's feature set:
# a lone `cargo build --bin sluice` unifies fewer features and would build
# DataFusion a second time).
cargo test --workspace --locked --quiet --no-run
sluice="$CARGO_TARGET_DIR/debug/sluice"

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
engine_port=$(free_port)
prom_port=$(free_port)
pids=()
trap 'stop_processes "${pids[@]}"; remove_dir "$work"' EXIT

sed -e "s#/tmp/sluice/rate-to-files#$work#" -e 's/processingTime: 2s/processingTime: 500ms/' \
  -e 's/rowsPerSecond: 10$/rowsPerSecond: 200/' examples/local/rate-to-files.yaml > "$work/query.yaml"
"$sluice" run "$work/query.yaml" --http-port "$engine_port" --http-address 127.0.0.1 2> "$work/engine.log" &
pids+=($!)

cat > "$work/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: sluice-engine
    metrics_path: /metrics
    static_configs: [{targets: ["127.0.0.1:$engine_port"]}]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)

# Asks Prometheus; prints the first sample's value, or nothing.
promql() {
  curl -fsS --get "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" 2>/dev/null \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true
}

rate=""
for _ in $(seq 1 60); do
  rate=$(promql 'sum(rate(sluice_input_rows_total{query="rate-to-files"}[5s]))')
  if [ -n "$rate" ] && python3 -c "import sys; sys.exit(0 if float('$rate') > 0 else 1)"; then break; fi
  rate=""
  sleep 1
done
[ -n "$rate" ] || { tail -5 "$work/engine.log" "$work/prometheus.log"; echo "FAIL: no input rate from Prometheus"; exit 1; }
lag=$(promql 'sum(sluice_source_records_behind_latest{query="rate-to-files"})')
[ -n "$lag" ] || { echo "FAIL: no lag series in Prometheus"; exit 1; }
batches=$(promql 'sluice_batches_total{query="rate-to-files"}')
echo "PromQL: input rate $rate rows/s, lag $lag records, $batches batches"

# Every panel of the Grafana dashboard, evaluated by this Prometheus: each
# engine query must be valid and return data, so the dashboard uses only
# metric names the engine exports; operator queries must be valid.
sleep 3
python3 - "$prom_port" charts/sluice/dashboards/sluice.json <<'PY'
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
failed = 0
for panel in json.load(open(path))["panels"]:
    for target in panel["targets"]:
        expr = target["expr"].replace("$query", "rate-to-files")
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.load(urllib.request.urlopen(url))
        if "sluice_operator_" in expr:
            # No operator runs here (it needs an API server): Prometheus
            # checks the query parses; the operator's test
            # (the_dashboards_operator_panels_use_metrics_the_operator_exports)
            # checks the metric names exist.
            ok = answer["status"] == "success"
            print(f"{'ok  ' if ok else 'FAIL'} {panel['title']} (syntax only): {expr}")
        else:
            ok = answer["status"] == "success" and answer["data"]["result"]
            print(f"{'ok  ' if ok else 'FAIL'} {panel['title']}: {expr}")
        failed += not ok
sys.exit(1 if failed else 0)
PY
echo "e2e prometheus: 1 passed, 0 failed"
