"""Checks both outputs of bench/lake.sh and prints its figures.

    python3 bench/lake_report.py ROWS INPUT_BYTES SLUICE_SECONDS SPARK_PROCESS_SECONDS SPARK_JSON

Sluice's output: the files its manifests (`_sluice_metadata/<N>`) list must
be exactly the data files under s3://bench/sluice/ and hold ROWS rows;
Spark's: its progress must have read ROWS rows and its reader (through
`_spark_metadata`) must find ROWS rows. Exits 1 otherwise.
"""

import json
import os
import sys

import boto3


def main() -> None:
    rows, input_bytes = int(sys.argv[1]), int(sys.argv[2])
    sluice_secs, spark_process = float(sys.argv[3]), float(sys.argv[4])
    spark = json.load(open(sys.argv[5]))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="sluice/")
    objects = [o for p in pages for o in p.get("Contents", [])]
    meta = "sluice/_sluice_metadata/"
    listed = {}
    for o in objects:
        name = o["Key"][len(meta):]
        if o["Key"].startswith(meta) and name.isdigit():
            manifest = json.loads(s3.get_object(Bucket="bench", Key=o["Key"])["Body"].read())
            for f in manifest["files"]:
                listed[f["path"]] = f["rows"]
    data = {o["Key"][len("sluice/"):] for o in objects if not o["Key"].startswith(meta)}
    if data != set(listed):
        sys.exit(f"sluice: the manifests list {len(listed)} files, the bucket holds {len(data)}")
    if sum(listed.values()) != rows:
        sys.exit(f"sluice: the manifests list {sum(listed.values())} rows, not {rows}")
    if spark["output_rows"] != rows or spark["input_rows"] != rows:
        sys.exit(f"spark: read {spark['input_rows']} rows and its output holds "
                 f"{spark['output_rows']}, not {rows}")
    spark_secs = spark["query_seconds"]
    mb = input_bytes / 1e6
    print(f"\nParquet on S3 (moto), {rows:,} rows ({mb:.0f} MB of JSON), partitioned by "
          f"device_type, one input file a batch; Sluice wrote {len(listed)} files")
    print(f"{'engine':<30}{'seconds':>10}{'rows/s':>14}{'MB/s':>8}")
    for name, secs in [("sluice (process)", sluice_secs),
                       (f"spark {spark['spark_version']} (query)", spark_secs),
                       ("spark (process, with JVM)", spark_process)]:
        print(f"{name:<30}{secs:>10.2f}{rows / secs:>14,.0f}{mb / secs:>8.1f}")
    print(f"sluice / spark (query): {spark_secs / sluice_secs:.2f}x the throughput")


if __name__ == "__main__":
    main()
