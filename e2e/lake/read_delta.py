"""Reads a Delta table the way other engines do, for e2e/lake/e2e.py; runs
in the Delta readers' virtualenv (e2e/lake/lib.sh). Prints one JSON object:

  {"deltalake": [rows...],   delta-rs's Python reader, straight from S3
   "spark": [rows...],       Apache Spark with delta-spark, from a local copy
   "history": [...]}         Spark's DESCRIBE HISTORY: version, operation,
                             operationParameters, userMetadata

Timestamps become Unix microseconds, so that both readers' rows compare.

usage: read_delta.py S3_URI LOCAL_COPY JARS
"""

import datetime
import json
import os
import sys


def plain(value):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1_000_000)
    return value


def main():
    uri, local, jars = sys.argv[1:4]
    from deltalake import DeltaTable

    options = {
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
    }
    table = DeltaTable(uri, storage_options=options).to_pyarrow_table()
    deltalake_rows = [{k: plain(v) for k, v in row.items()} for row in table.to_pylist()]

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]")
             .config("spark.jars", jars)
             .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
             .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.ui.enabled", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark_rows = [{k: plain(v) for k, v in row.asDict().items()}
                  for row in spark.read.format("delta").load(local).collect()]
    history = [{"version": r["version"], "operation": r["operation"],
                "operationParameters": dict(r["operationParameters"] or {}),
                "userMetadata": r["userMetadata"]}
               for r in spark.sql(f"DESCRIBE HISTORY delta.`{local}`").collect()]
    spark.stop()
    json.dump({"deltalake": deltalake_rows, "spark": spark_rows, "history": history}, sys.stdout)


if __name__ == "__main__":
    main()
