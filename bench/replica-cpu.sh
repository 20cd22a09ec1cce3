#!/usr/bin/env bash
# What a replica's CPU goes to (e2e/kafka/replica_cpu.py): replicas as
# `sluice run --replica i --replicas n` processes against a real Kafka
# broker at a constant input, one configuration KIND:REPLICAS:RATE after
# another, printing per replica its batches, records and CPU a second and
# what the autoscaler could fit from them (see the README, "A replica's true
# rate"). About a minute per configuration; not run by scripts/test.sh.
#
# Usage: bash bench/replica-cpu.sh [KIND:REPLICAS:RATE...]
#   (default: windowed:1:300 windowed:1:1500 windowed:1:4000 windowed:1:8000
#    windowed:4:300)
# Environment: SECS (seconds of input per configuration, default 60),
# SLUICE_BIN (default the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
source e2e/kafka/lib.sh
kafka_e2e_prepare
work=$(mktemp -d)
trap 'pkill -KILL -f "$work/cpu" 2>/dev/null || true; kafka_kill "$work/broker" 2>/dev/null || true; remove_dir "$work"' EXIT
kafka_start "$work/broker"
[ $# -gt 0 ] || set -- windowed:1:300 windowed:1:1500 windowed:1:4000 windowed:1:8000 windowed:4:300
python3 e2e/kafka/replica_cpu.py --sluice "${SLUICE_BIN:-$CARGO_TARGET_DIR/debug/sluice}" \
  --bootstrap "$KAFKA_BOOTSTRAP" --broker-dir "$work/broker" --work "$work" --secs "${SECS:-60}" "$@"
