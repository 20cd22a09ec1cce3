#!/usr/bin/env bash
# Kafka to Kafka throughput, on one real Apache Kafka broker (e2e/kafka/lib.sh:
# Kafka 4.3.1 from Maven Central jars) and one topic, in one run:
#
#   - input: ROWS card transactions (default 1,000,000; Sluice's seeded
#     generator: USERS users, RATE rows a second of event time, up to 2 s out
#     of order) as JSON records in a 4-partition topic;
#   - the ceiling: a plain librdkafka consumer (engine/examples/
#     kafka_read_rate.rs) reading the topic from the start to the end,
#     decoding nothing;
#   - two queries, each through Sluice (release build, `sluice run`, whole
#     process) and through Apache Spark Structured Streaming (PySpark 4.3 with
#     Spark's Kafka connector, local[2], the query's own time after the JVM
#     started), both read_committed, PER_TRIGGER records a micro-batch,
#     availableNow, writing JSON records to a topic of their own (Sluice
#     exactly once, in transactions; Spark at least once, its only mode):
#       stateless: SELECT transaction_id, user_id, amount * 100 AS cents,
#                  event_time WHERE amount > 50;
#       fraud: per user, 5-minute windows every minute, count / sum / avg,
#              a 10-minute watermark, append, HAVING count >= MIN_COUNT;
#   - checks: both engines read every input record and write the same rows
#     (fraud: compared row for row, floats to 1e-9 relative; stateless: the
#     row counts), else exit 1;
#   - prints records/s for each, Sluice over Spark, Sluice over the ceiling.
#
# Run: bench/kafka.sh    (ROWS=200000 for a quick look)
# Settings: ROWS (1000000), USERS (2000), RATE (100), PER_TRIGGER (100000),
# MIN_COUNT (20), BENCH_DIR, SLUICE_BENCH_TARGET (~/.cache/sluice/bench-target),
# SLUICE_BIN and KAFKA_READ_RATE_BIN (use these binaries instead of
# building), SPARK_MASTER (local[2]).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
ROWS=${ROWS:-1000000}
USERS=${USERS:-2000}
RATE=${RATE:-100}
PER_TRIGGER=${PER_TRIGGER:-100000}
MIN_COUNT=${MIN_COUNT:-20}
export SPARK_MASTER=${SPARK_MASTER:-local[2]} PYTHONDONTWRITEBYTECODE=1

source "$here/lib.sh"
source "$repo/e2e/kafka/lib.sh"
ensure_spark
python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install -q confluent-kafka
build_sluice
if [ -n "${KAFKA_READ_RATE_BIN:-}" ]; then
  read_rate=$KAFKA_READ_RATE_BIN
else
  target=${SLUICE_BENCH_TARGET:-$HOME/.cache/sluice/bench-target}
  (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --release --locked --example kafka_read_rate)
  read_rate="$target/release/examples/kafka_read_rate"
fi
SPARK_KAFKA_JARS=$(kafka_spark_jars)
export SPARK_KAFKA_JARS
make_work_dir sluice-kafka

kafka_start "$work/kafka"
trap 'kafka_kill "$work/kafka" 2>/dev/null || true' EXIT
for topic in bench-in sluice-stateless sluice-fraud spark-stateless spark-fraud; do
  kafka_topic_create "$topic" 4 >/dev/null
done

say "producing $ROWS transactions into bench-in with sluice's generator"
cat >"$work/produce.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-produce}
spec:
  sources:
    - name: transactions
      generator: {kind: transactions, rowsPerSecond: $RATE, rowsPerBatch: 100000, totalRows: $ROWS,
                  startTime: "2026-01-01T00:00:00Z", seed: 42, users: $USERS}
  query: SELECT transaction_id, user_id, amount, event_time FROM transactions
  sink: {kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP", topic: bench-in, delivery: atLeastOnce}}
  trigger: {availableNow: true}
YAML
"$sluice" run "$work/produce.yaml" 2>"$work/produce.log" || { cat "$work/produce.log" >&2; exit 1; }

say "the ceiling: a plain librdkafka consumer"
"$read_rate" "$KAFKA_BOOTSTRAP" bench-in | tee "$work/read-rate.txt"

sluice_query() {   # NAME SQL
  cat >"$work/$1.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-$1}
spec:
  sources:
    - name: transactions
      kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP", topic: bench-in, startingOffsets: earliest,
              maxOffsetsPerTrigger: $PER_TRIGGER}
      format: json
      schema:
        - {name: transaction_id, type: string}
        - {name: user_id, type: string}
        - {name: amount, type: double}
        - {name: event_time, type: timestamp}
      watermark: {column: event_time, delay: 10m}
  query: |
    $2
  sink: {kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP", topic: sluice-$1}}
  outputMode: append
  checkpoint: {location: "$work/$1-checkpoint"}
  trigger: {availableNow: true}
YAML
  say "Sluice: $1"
  local t0 t1
  t0=$(date +%s.%N)
  SLUICE_STATE_DIR="$work/$1-state" "$sluice" run "$work/$1.yaml" 2>"$work/$1.log" \
    || { tail -20 "$work/$1.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)" >"$work/sluice-$1.seconds"
}
sluice_query stateless "SELECT transaction_id, user_id, amount * 100 AS cents, event_time FROM transactions WHERE amount > 50"
sluice_query fraud "SELECT window_start, window_end, user_id,
           count(*) AS n, sum(amount) AS total, avg(amount) AS avg_amount
    FROM hop(transactions, event_time, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
    GROUP BY window_start, window_end, user_id
    HAVING count(*) >= $MIN_COUNT"

for q in stateless fraud; do
  say "Spark: $q"
  python3 "$here/spark_kafka.py" --bootstrap "$KAFKA_BOOTSTRAP" --input bench-in --output "spark-$q" \
    --query "$q" --checkpoint "$work/spark-$q-checkpoint" --per-trigger "$PER_TRIGGER" \
    --min-count "$MIN_COUNT" 2>"$work/spark-$q.log" | tail -1 >"$work/spark-$q.json" \
    || { tail -30 "$work/spark-$q.log" >&2; exit 1; }
done

python3 "$here/kafka_report.py" --bootstrap "$KAFKA_BOOTSTRAP" --work "$work" --rows "$ROWS"
