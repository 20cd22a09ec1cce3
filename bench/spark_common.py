"""What bench/spark_*.py share: the generated transactions' schema and a
local Spark session set up as the Sluice side runs (UTC, microsecond Parquet
timestamps, every progress report kept, no UI).

Settings from the environment: SPARK_MASTER (local[2]),
SPARK_SHUFFLE_PARTITIONS (2), SPARK_DRIVER_MEMORY (2g).
"""

import os

from pyspark.sql import SparkSession
from pyspark.sql.types import DoubleType, StringType, StructField, StructType, TimestampType

# The columns of Sluice's `transactions` generator, as its sources declare them.
SCHEMA = StructType(
    [
        StructField("transaction_id", StringType()),
        StructField("user_id", StringType()),
        StructField("amount", DoubleType()),
        StructField("merchant_id", StringType()),
        StructField("event_time", TimestampType()),
        StructField("device_type", StringType()),
    ]
)


def session(
    app_name: str, parquet_codec: str | None = None, conf: dict[str, str] | None = None
) -> SparkSession:
    """A local Spark session for one benchmark query, with `conf` on top."""
    builder = (
        SparkSession.builder.master(os.environ.get("SPARK_MASTER", "local[2]"))
        .appName(app_name)
        .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.sql.shuffle.partitions", os.environ.get("SPARK_SHUFFLE_PARTITIONS", "2"))
        .config("spark.sql.session.timeZone", "UTC")
        # Microsecond timestamps in the Parquet output, as Sluice writes them
        # (Spark's default is INT96).
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # Keep every batch's progress report.
        .config("spark.sql.streaming.numRecentProgressUpdates", "100000")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if parquet_codec:
        builder = builder.config("spark.sql.parquet.compression.codec", parquet_codec)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run_available_now(
    result, fmt: str, output_dir: str, checkpoint_dir: str, partition_by: list[str] | None = None
):
    """Runs `result` into `fmt` files under `output_dir` in append mode, with
    its checkpoint, trigger availableNow, to its end; with `partition_by`,
    one directory per value of those columns. Returns the finished query
    and the seconds from its start to its end."""
    import time

    started = time.perf_counter()
    writer = result.writeStream.format(fmt).outputMode("append")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    query = (
        writer.option("path", output_dir)
        .option("checkpointLocation", checkpoint_dir)
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    return query, time.perf_counter() - started


def kafka_writer(result, bootstrap: str, topic: str, checkpoint: str):
    """A stream writer of `result`'s rows as JSON values to `topic`, append
    mode, with its checkpoint: the caller sets the trigger and starts it."""
    from pyspark.sql import functions as F

    return (
        result.select(F.to_json(F.struct("*")).alias("value"))
        .writeStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap)
        .option("topic", topic)
        .option("checkpointLocation", checkpoint)
        .outputMode("append")
    )
