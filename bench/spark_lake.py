"""The Parquet-on-S3 workload of bench/lake.sh on Apache Spark Structured
Streaming (PySpark, local mode, S3A).

    python3 bench/spark_lake.py INPUT_DIR OUTPUT_URI CHECKPOINT_DIR RESULT_JSON

Reads the JSON-lines files of INPUT_DIR with the declared schema, one file a
micro-batch (maxFilesPerTrigger=1, availableNow), writes every row as
Parquet (zstd) partitioned by device_type to OUTPUT_URI (s3a://...), exactly
as the Sluice side does. Writes to RESULT_JSON the Spark version, the time of
the streaming query alone (start() to awaitTermination()), the batches, and
the rows Spark's own file-sink log says the output holds (read back through
`_spark_metadata`).

Settings from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION (the S3 server), SPARK_S3A_JARS (comma
separated), and spark_common's.
"""

import json
import os
import sys
import time

from spark_common import SCHEMA, session


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    input_dir, output_uri, checkpoint_dir, result_path = sys.argv[1:]
    # The session spark_common builds, with S3A pointed at the test server.
    conf = {"spark.jars": os.environ["SPARK_S3A_JARS"]}
    for key, value in {
        "fs.s3a.endpoint": os.environ["AWS_ENDPOINT_URL"],
        "fs.s3a.endpoint.region": os.environ.get("AWS_REGION", "us-east-1"),
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.access.key": os.environ["AWS_ACCESS_KEY_ID"],
        "fs.s3a.secret.key": os.environ["AWS_SECRET_ACCESS_KEY"],
    }.items():
        conf[f"spark.hadoop.{key}"] = value
    spark = session("sluice-bench-lake", parquet_codec="zstd", conf=conf)

    stream = (
        spark.readStream.schema(SCHEMA)
        .option("maxFilesPerTrigger", 1)
        .json(input_dir)
    )
    query = (
        stream.writeStream.format("parquet")
        .partitionBy("device_type")
        .option("path", output_uri)
        .option("checkpointLocation", checkpoint_dir)
        .trigger(availableNow=True)
        .start()
    )
    t0 = time.perf_counter()
    query.awaitTermination()
    seconds = time.perf_counter() - t0
    progress = query.recentProgress
    rows_in = sum(p["numInputRows"] for p in progress)
    rows_out = spark.read.parquet(output_uri).count()
    with open(result_path, "w") as f:
        json.dump(
            {
                "spark_version": spark.version,
                "query_seconds": seconds,
                "batches": sum(1 for p in progress if p["numInputRows"] > 0),
                "input_rows": rows_in,
                "output_rows": rows_out,
            },
            f,
        )
    spark.stop()


if __name__ == "__main__":
    main()
