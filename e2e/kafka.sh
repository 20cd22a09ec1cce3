#!/usr/bin/env bash
# Kafka in and out, exactly once, against a real Apache Kafka 4 broker
# assembled from Maven Central jars (e2e/kafka/lib.sh; cached under
# ~/.cache/sluice/kafka). The checks are in e2e/kafka/e2e.py: the fraud query
# Kafka -> Kafka equal row for row to the file source's result, with and
# without 10 SIGKILLs, an open transaction invisible to read_committed,
# consumer-group lag equal to /progress, malformed records in a dead-letter
# topic, and the broker stopped for 30 s mid-run.
# KAFKA_E2E_RECORDS sets the number of transactions (default 1,000,000).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib/cleanup.sh
source e2e/kafka/lib.sh
kafka_e2e_prepare

work=$(mktemp -d)
trap 'kafka_kill "$work/broker" 2>/dev/null || true; remove_dir "$work"' EXIT
kafka_start "$work/broker"
kafka_topic_create alerts 2
SLUICE_TEST_KAFKA="$KAFKA_BOOTSTRAP" cargo test --locked --workspace --test it -- --ignored --exact \
  kafka::the_sink_knows_which_batches_it_committed_on_a_real_broker \
  hanging::a_transaction_a_broker_left_open_is_ended_as_its_coordinator_recorded_it
python3 e2e/kafka/e2e.py --sluice "$CARGO_TARGET_DIR/debug/sluice" --bootstrap "$KAFKA_BOOTSTRAP" \
  --broker-dir "$work/broker" --work "$work" --records "${KAFKA_E2E_RECORDS:-1000000}"
echo "e2e kafka: passed"
