"""The Spark side of bench/kafka.sh: one query, Kafka to Kafka, through
Spark Structured Streaming with Spark's Kafka connector (spark.jars from
e2e/kafka/lib.sh's kafka_spark_jars), reading the same topic as Sluice,
read_committed, availableNow. Prints one JSON line: the query's own time
(after the session started) and the rows written.

  python3 bench/spark_kafka.py --bootstrap HOST:PORT --input TOPIC --output TOPIC \
      --query stateless|fraud --checkpoint DIR [--per-trigger N] [--min-count N]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyspark.sql import functions as F  # noqa: E402

from spark_common import SCHEMA, kafka_writer, session  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--query", choices=["stateless", "fraud"], required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--per-trigger", type=int, default=100000)
    parser.add_argument("--min-count", type=int, default=20)
    args = parser.parse_args()

    builder_jars = os.environ["SPARK_KAFKA_JARS"]
    os.environ.setdefault("PYSPARK_SUBMIT_ARGS", f"--jars {builder_jars} pyspark-shell")
    spark = session(f"bench-kafka-{args.query}")
    records = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.bootstrap)
        .option("subscribe", args.input)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", args.per_trigger)
        .option("kafka.isolation.level", "read_committed")
        .load()
        .select(F.from_json(F.col("value").cast("string"), SCHEMA).alias("r"))
        .select("r.*")
    )
    if args.query == "stateless":
        # Keep in step with the Sluice query in bench/kafka.sh.
        result = records.where("amount > 50").select(
            "transaction_id", "user_id", (F.col("amount") * 100).alias("cents"), "event_time"
        )
    else:
        result = (
            records.withWatermark("event_time", "10 minutes")
            .groupBy(F.window("event_time", "5 minutes", "1 minute"), "user_id")
            .agg(F.count("*").alias("n"), F.sum("amount").alias("total"), F.avg("amount").alias("avg_amount"))
            .where(F.col("n") >= args.min_count)
            .select(
                F.col("window.start").alias("window_start"),
                F.col("window.end").alias("window_end"),
                "user_id", "n", "total", "avg_amount",
            )
        )
    start = time.time()
    query = kafka_writer(result, args.bootstrap, args.output, args.checkpoint).trigger(availableNow=True).start()
    query.awaitTermination()
    seconds = time.time() - start
    progress = query.recentProgress
    rows_in = sum(p["numInputRows"] for p in progress)
    print(json.dumps({"seconds": seconds, "input_rows": rows_in, "batches": len(progress)}))
    spark.stop()


if __name__ == "__main__":
    main()
