"""One Nexmark query (bench/nexmark/queries.py) on Apache Spark Structured
Streaming (PySpark, local mode).

    python3 bench/nexmark/spark_nexmark.py QUERY INPUT_DIR OUTPUT_DIR CHECKPOINT_DIR RESULT_JSON SIDE_INPUT_CSV

Reads the bid table's JSON-lines files (maxFilesPerTrigger FILES_PER_TRIGGER,
default 1; trigger availableNow) with Nexmark's 4-second watermark, runs the
query's Spark SQL over a streaming view (and the side input, a CSV file with
a header row, as a static view `side_input` when the query joins it), writes
JSON lines in append mode with a checkpoint (partitioned as the query says),
and writes the Spark version, the streaming query's own time and the
batches to RESULT_JSON.

Settings from the environment: FILES_PER_TRIGGER, SPARK_MASTER (local[2]),
SPARK_SHUFFLE_PARTITIONS (2), SPARK_DRIVER_MEMORY (2g).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType  # noqa: E402
from queries import BID_COLUMNS, QUERIES, WATERMARK_SECONDS  # noqa: E402
from spark_common import run_available_now, session  # noqa: E402

TYPES = {"long": LongType(), "string": StringType(), "timestamp": TimestampType()}


def main() -> None:
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    name, input_dir, output_dir, checkpoint_dir, result_path, side_input = sys.argv[1:]
    spark = session(f"sluice-bench-nexmark-{name}")
    schema = StructType([StructField(column, TYPES[ty]) for column, ty in BID_COLUMNS])
    bids = (
        spark.readStream.schema(schema)
        .option("maxFilesPerTrigger", int(os.environ.get("FILES_PER_TRIGGER", "1")))
        .json(input_dir)
        .withWatermark("datetime", f"{WATERMARK_SECONDS} seconds")
    )
    bids.createOrReplaceTempView("bid")
    q = QUERIES[name]
    if q.get("side_input"):
        side = StructType([StructField("key", LongType()), StructField("value", StringType())])
        spark.read.schema(side).option("header", True).csv(side_input).createOrReplaceTempView("side_input")
    result = spark.sql(q["spark"])
    query, query_seconds = run_available_now(
        result, "json", output_dir, checkpoint_dir, q.get("partition_by")
    )
    progress = query.recentProgress
    with open(result_path, "w") as out:
        json.dump(
            {
                "spark_version": spark.version,
                "query_seconds": query_seconds,
                "batches": len({p["batchId"] for p in progress}),
                "input_rows": sum(p["numInputRows"] for p in progress),
            },
            out,
        )
    spark.stop()


if __name__ == "__main__":
    main()
