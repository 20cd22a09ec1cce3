#!/usr/bin/env bash
# Kafka -> Kafka end-to-end latency, Sluice against Apache Spark, on one real
# Apache Kafka broker (e2e/kafka/lib.sh: Kafka 4.3.1 from Maven Central jars),
# in one run (bench/latency.py):
#
#   - QUERY=stateless (the default): a stateless query (SELECT id, user_id, amount * 100 AS cents,
#     produced_ms WHERE amount >= 0: every event gives a result), micro-batches
#     back to back (`trigger: {processingTime: 0s}`; Spark's default trigger),
#     read_committed, JSON to a topic: Sluice exactly once (a Kafka
#     transaction a batch), Spark at least once (its only mode);
#   - QUERY=windowed: the fraud query's aggregation (hop 5m/1m by user, count,
#     sum, avg, 10-minute watermark) in update mode, without its HAVING, over
#     USERS users (default 100), with max(id) to tell which events a result
#     holds (see bench/latency.py);
#   - a producer writes RATE events a second (default 10,000) for WARMUP +
#     DURATION seconds, each stamped with the time it was produced; a
#     read_committed consumer stamps each result when it becomes readable;
#   - prints p50 / p90 / p99 / max of (readable - produced) in ms for each
#     engine, over the events after the warm-up, and Spark's over Sluice's;
#     exits 1 if an event has no result.
#
# Run: bench/latency.sh     Settings: QUERY (stateless), RATE (10000),
# DURATION (60), WARMUP (10), USERS,
# ENGINES (sluice,spark), SINK_OPTIONS (librdkafka settings for Sluice's sink,
# k=v,k=v, to try one), SLUICE_BIN, SLUICE_BENCH_TARGET, BENCH_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export PYTHONDONTWRITEBYTECODE=1 SPARK_MASTER=${SPARK_MASTER:-local[2]}
source "$here/lib.sh"
source "$repo/e2e/kafka/lib.sh"
ensure_spark
python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install -q confluent-kafka
build_sluice
SPARK_KAFKA_JARS=$(kafka_spark_jars)
export SPARK_KAFKA_JARS
make_work_dir sluice-latency

kafka_start "$work/kafka"
trap 'kafka_kill "$work/kafka" 2>/dev/null || true' EXIT
for engine in sluice spark; do
  kafka_topic_create "latency-in-$engine" 4 >/dev/null
  kafka_topic_create "latency-out-$engine" 4 >/dev/null
done
python3 "$here/latency.py" --bootstrap "$KAFKA_BOOTSTRAP" --sluice "$sluice" --work "$work" \
  --rate "${RATE:-10000}" --seconds "${DURATION:-60}" --warmup "${WARMUP:-10}" \
  --engines "${ENGINES:-sluice,spark}" --sink-options "${SINK_OPTIONS:-}" \
  --query "${QUERY:-stateless}" ${USERS:+--users "$USERS"}
