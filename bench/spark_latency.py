"""The Spark side of bench/latency.sh: the query of bench/latency.py (--query
stateless or windowed) through Spark Structured Streaming with Spark's Kafka connector (spark.jars
from e2e/kafka/lib.sh's kafka_spark_jars), read_committed, micro-batches
back to back (processingTime 0, Spark's default trigger), writing JSON to a
topic. Runs until it is terminated.

  python3 bench/spark_latency.py --bootstrap HOST:PORT --input TOPIC --output TOPIC --query Q --checkpoint DIR
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import (  # noqa: E402
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from spark_common import kafka_writer, session  # noqa: E402

# Keep in step with bench/latency.py's Sluice spec.
SCHEMA = StructType([StructField("id", LongType()), StructField("user_id", StringType()),
                     StructField("amount", DoubleType()), StructField("produced_ms", DoubleType()),
                     StructField("event_time", TimestampType())])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--query", choices=("stateless", "windowed"), default="stateless")
    args = parser.parse_args()

    jars = os.environ["SPARK_KAFKA_JARS"]
    os.environ.setdefault("PYSPARK_SUBMIT_ARGS", f"--jars {jars} pyspark-shell")
    spark = session("bench-latency", conf={"spark.sql.streaming.numRecentProgressUpdates": "100"})
    events = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.bootstrap)
        .option("subscribe", args.input)
        .option("startingOffsets", "earliest")
        .option("kafka.isolation.level", "read_committed")
        .load()
        .select(F.from_json(F.col("value").cast("string"), SCHEMA).alias("r"))
        .select("r.*")
    )
    if args.query == "stateless":
        result = events.where("amount >= 0").select(
            "id", "user_id", (F.col("amount") * 100).alias("cents"), "produced_ms"
        )
        mode = "append"
    else:
        result = (
            events.withWatermark("event_time", "10 minutes")
            .groupBy(F.window("event_time", "5 minutes", "1 minute"), "user_id")
            .agg(F.count("*").alias("n"), F.sum("amount").alias("total"),
                 F.avg("amount").alias("avg_amount"), F.max("id").alias("last_id"))
            .select(F.col("window.start").alias("window_start"), F.col("window.end").alias("window_end"),
                    "user_id", "n", "total", "avg_amount", "last_id")
        )
        mode = "update"
    writer = kafka_writer(result, args.bootstrap, args.output, args.checkpoint).outputMode(mode)
    query = writer.trigger(processingTime="0 seconds").start()
    query.awaitTermination()


if __name__ == "__main__":
    main()
