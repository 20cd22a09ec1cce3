#!/usr/bin/env bash
# The autoscaler on a ramp, on this machine (e2e/kafka/ramp.py): a real
# Kafka broker, replicas as `sluice run --replica i --replicas n` processes,
# a producer that ramps 300/s -> 3,000/s -> 300/s over ~10 minutes and then
# stops, and a driver that runs the operator's autoscaler step
# (`sluice-operator autoscale-step`) on the replicas' /progress every 10 s
# and rescales as it decides, down to zero and back on a last burst. Fails
# if the output does not hold every result once; prints the decisions as a
# table and what they got wrong (not a test of them: see the README,
# "Autoscaling"), and writes the timeline (CSV, and a PNG plot) to
# $REPORT_DIR (default ~/.cache/sluice/reports). About 12 minutes; not run
# by scripts/test.sh.
#
# Environment: RAMP_PEAK (records/s at the peak, default 3000).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
source e2e/kafka/lib.sh
kafka_e2e_prepare
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib \
  || echo "(matplotlib not installed: the timeline is written as CSV only)"

work=$(mktemp -d)
keep=0
trap 'pkill -KILL -f "$work/ramp" 2>/dev/null || true; kafka_kill "$work/broker" 2>/dev/null || true; [ "$keep" = 1 ] || remove_dir "$work"' EXIT
kafka_start "$work/broker"
python3 e2e/kafka/ramp.py --sluice "$CARGO_TARGET_DIR/debug/sluice" \
  --operator "$CARGO_TARGET_DIR/debug/sluice-operator" --bootstrap "$KAFKA_BOOTSTRAP" \
  --broker-dir "$work/broker" --work "$work" --peak "${RAMP_PEAK:-3000}" \
  --report-dir "${REPORT_DIR:-$HOME/.cache/sluice/reports}" "$@" || {
  # What a failure leaves is what explains it: checkpoints, logs, the
  # broker's data (start it again with kafka_start on that directory).
  keep=1
  echo "bench autoscale-ramp: FAILED; kept $work (checkpoints, replica logs, the broker's data)"
  exit 1
}
echo "bench autoscale-ramp: done"
