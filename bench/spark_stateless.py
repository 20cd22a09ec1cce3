"""The stateless workload of bench/stateless.sh on Apache Spark Structured
Streaming (PySpark, local mode).

    python3 bench/spark_stateless.py INPUT_DIR OUTPUT_DIR CHECKPOINT_DIR RESULT_JSON

Reads the JSON-lines files of INPUT_DIR with the declared schema, one file a
micro-batch (maxFilesPerTrigger=1, trigger availableNow), runs QUERY and
writes Parquet to OUTPUT_DIR with a checkpoint, exactly as the Sluice side
does. Writes to RESULT_JSON the Spark version, the time of the streaming
query alone (from start() until awaitTermination() returns), the number of
batches, the names of the files the source read (from its log in the
checkpoint) and the input rows Spark counted in its progress reports.

Settings from the environment: SPARK_MASTER (local[2]), SPARK_SHUFFLE_PARTITIONS
(2), SPARK_DRIVER_MEMORY (2g), SPARK_PARQUET_CODEC (zstd, as Sluice's file
sink writes).
"""

import json
import os
import sys

from spark_common import SCHEMA, run_available_now, session


# Keep in step with the query in bench/stateless.sh (the Sluice side).
QUERY = """
SELECT transaction_id, user_id, merchant_id, device_type, event_time, amount,
       CASE WHEN amount >= 1000 THEN 'high'
            WHEN device_type = 'atm' AND amount >= 300 THEN 'atm-large'
            ELSE 'elevated'
       END AS risk
FROM transactions
WHERE amount >= 250 OR (device_type = 'atm' AND amount >= 100)
"""


def source_log_files(log_dir: str) -> set[str]:
    """The names of the files a file source's log (`sources/0/<batch>` and
    its `.compact` files: a version line, then one JSON entry a file) holds."""
    names = set()
    for name in os.listdir(log_dir):
        if name.startswith("."):
            continue
        with open(os.path.join(log_dir, name)) as f:
            for line in f.read().splitlines()[1:]:
                if line.strip():
                    names.add(os.path.basename(json.loads(line)["path"]))
    return names


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    input_dir, output_dir, checkpoint_dir, result_path = sys.argv[1:]
    codec = os.environ.get("SPARK_PARQUET_CODEC", "zstd")

    spark = session("sluice-bench-stateless", parquet_codec=codec)

    source = (
        spark.readStream.schema(SCHEMA)
        .option("maxFilesPerTrigger", 1)
        .json(input_dir)
    )
    source.createOrReplaceTempView("transactions")
    result = spark.sql(QUERY)

    query, query_seconds = run_available_now(result, "parquet", output_dir, checkpoint_dir)

    # Spark's numInputRows counts the rows its JSON scan returns, after the
    # filters it pushes down into the parser, so it is not the input's size:
    # the files each batch read are taken from the source's log instead.
    progress = query.recentProgress
    progress_input_rows = sum(p["numInputRows"] for p in progress)
    batches = len({p["batchId"] for p in progress})
    batch_ms = [p["durationMs"]["triggerExecution"] for p in progress]
    files_read = sorted(source_log_files(os.path.join(checkpoint_dir, "sources", "0")))

    with open(result_path, "w") as out:
        json.dump(
            {
                "spark_version": spark.version,
                "query_seconds": query_seconds,
                "progress_input_rows": progress_input_rows,
                "batches": batches,
                "files_read": files_read,
                "batch_ms": batch_ms,
                "parquet_codec": codec,
            },
            out,
        )
    spark.stop()


if __name__ == "__main__":
    main()
