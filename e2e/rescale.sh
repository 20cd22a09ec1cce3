#!/usr/bin/env bash
# Scale-out and rescales exactly once against a real Apache Kafka 4 broker
# (e2e/kafka/lib.sh; cached under ~/.cache/sluice/kafka): a stateless
# Kafka -> Kafka query, then a windowed GROUP BY keyed by user (in two
# stages through its repartition topic), then the same over a topic keyed
# by user (`keyedBy`, in one stage), then a SELECT DISTINCT and session
# windows (two stages), rescaled 1 -> 3 -> 2 replicas
# while a producer writes, gracefully, with SIGKILLs, with zombies of the
# older generation, and (stateful) with one replica far behind the others
# at the last rescale; the output equals one replica's, each row once.
# `--kind stateless|windowed|keyed|distinct|sessions` and
# `--only graceful|killed|zombies|lagging` run a part. The checks are in
# e2e/kafka/rescale.py. RESCALE_E2E_RECORDS and RESCALE_E2E_RATE set
# the feed (default 60,000 records at 1,500 a second).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
source e2e/kafka/lib.sh
kafka_e2e_prepare

work=$(mktemp -d)
keep=0
trap 'pkill -KILL -f "$work/" 2>/dev/null || true; kafka_kill "$work/broker" 2>/dev/null || true; [ "$keep" = 1 ] || remove_dir "$work"' EXIT
kafka_start "$work/broker"
python3 e2e/kafka/rescale.py --sluice "$CARGO_TARGET_DIR/debug/sluice" --bootstrap "$KAFKA_BOOTSTRAP" \
  --broker-dir "$work/broker" --work "$work" \
  --records "${RESCALE_E2E_RECORDS:-60000}" --rate "${RESCALE_E2E_RATE:-1500}" "$@" || {
  # What a failure leaves is what explains it: checkpoints, the replicas'
  # logs, the broker's data.
  keep=1
  echo "e2e rescale: FAILED; kept $work (checkpoints, replica logs, the broker's data)"
  exit 1
}
echo "e2e rescale: passed"
