"""The windowed fraud query of bench/windowed.sh on Apache Spark Structured
Streaming (PySpark, local mode).

    python3 bench/spark_windowed.py INPUT_DIR OUTPUT_DIR CHECKPOINT_DIR RESULT_JSON

Per user, sliding windows of 5 minutes every minute over event_time, count,
sum and average of amount, a 10-minute watermark, append mode, HAVING
count >= MIN_COUNT (20); JSON-lines input with a declared schema, one file a
micro-batch (maxFilesPerTrigger $FILES_PER_TRIGGER, default 1), trigger availableNow; Parquet output with
a checkpoint. Writes the Spark version, the streaming query's own time and
the batches to RESULT_JSON.

Settings from the environment: MIN_COUNT (20), SPARK_MASTER (local[2]),
SPARK_SHUFFLE_PARTITIONS (2), SPARK_DRIVER_MEMORY (2g).
"""

import json
import os
import sys

from pyspark.sql import functions as F
from spark_common import SCHEMA, run_available_now, session


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    input_dir, output_dir, checkpoint_dir, result_path = sys.argv[1:]
    min_count = int(os.environ.get("MIN_COUNT", "20"))
    spark = session("sluice-bench-windowed")
    source = (
        spark.readStream.schema(SCHEMA).option("maxFilesPerTrigger", int(os.environ.get("FILES_PER_TRIGGER", "1"))).json(input_dir)
    ).withWatermark("event_time", "10 minutes")
    # Keep in step with QUERY in bench/windowed.sh (the Sluice side).
    result = (
        source.groupBy(F.window("event_time", "5 minutes", "1 minute"), "user_id")
        .agg(
            F.count("*").alias("n"),
            F.sum("amount").alias("total"),
            F.avg("amount").alias("avg_amount"),
        )
        .where(F.col("n") >= min_count)
        .select(
            F.col("window.start").alias("window_start"),
            F.col("window.end").alias("window_end"),
            "user_id",
            "n",
            "total",
            "avg_amount",
        )
    )
    query, query_seconds = run_available_now(result, "parquet", output_dir, checkpoint_dir)
    progress = query.recentProgress
    with open(result_path, "w") as out:
        json.dump(
            {
                "spark_version": spark.version,
                "query_seconds": query_seconds,
                "batches": len({p["batchId"] for p in progress}),
                "batch_ms": [p["durationMs"]["triggerExecution"] for p in progress],
                "state_rows_max": max(
                    (s["numRowsTotal"] for p in progress for s in p["stateOperators"]), default=0
                ),
            },
            out,
        )
    spark.stop()


if __name__ == "__main__":
    main()
