"""Runs differential cases through Apache Spark Structured Streaming, all of
them in ONE SparkSession (the JVM starts once).

    python3 spark_side.py CASE_DIR...

For each case: a fresh checkpoint (CASE_DIR/spark/checkpoint), readStream
json with the declared schema and maxFilesPerTrigger 1, the watermark,
the kind's query (cases.spark_query), trigger availableNow, and a
foreachBatch that collects each batch's rows. Writes, in CASE_DIR:

- spark.jsonl: one line per output row, {"batch": id, "row": {...}}, in
  batch order; timestamps as RFC 3339 UTC text with microseconds;
- spark_batches.json: every batch foreachBatch saw (with its row count),
  each batch's progress (input rows, watermark, rows dropped by the
  watermark), the Spark version, the seconds the query took;
- spark_error.txt instead, when Spark refuses the query or it fails.

Settings from the environment: SPARK_MASTER (local[2]),
SPARK_SHUFFLE_PARTITIONS (2), SPARK_DRIVER_MEMORY (1g), SPARK_STATE_STORE
(default: Spark's default, HDFS-backed; `rocksdb` for RocksDB), SPARK_CONF
(more settings, `key=value,key=value`).
"""

import json
import os
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType  # noqa: E402

SCHEMA = StructType(
    [StructField("k", StringType()), StructField("v", LongType()), StructField("ts", TimestampType())]
)


def session() -> SparkSession:
    builder = (
        SparkSession.builder.master(os.environ.get("SPARK_MASTER", "local[2]"))
        .appName("sluice-differential")
        .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "1g"))
        .config("spark.sql.shuffle.partitions", os.environ.get("SPARK_SHUFFLE_PARTITIONS", "2"))
        .config("spark.default.parallelism", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.streaming.numRecentProgressUpdates", "1000")
    )
    if os.environ.get("SPARK_STATE_STORE") == "rocksdb":
        builder = builder.config(
            "spark.sql.streaming.stateStore.providerClass",
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
        )
    for item in filter(None, os.environ.get("SPARK_CONF", "").split(",")):
        key, _, value = item.partition("=")
        builder = builder.config(key.strip(), value.strip())
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def fmt_us(us):
    return None if us is None else cases.fmt_ts(us)


def run_case(spark: SparkSession, case_dir: str) -> str:
    case = cases.load_case(case_dir)
    work = os.path.join(case_dir, "spark")
    shutil.rmtree(work, ignore_errors=True)
    for name in ("spark.jsonl", "spark_batches.json", "spark_error.txt"):
        if os.path.exists(os.path.join(case_dir, name)):
            os.remove(os.path.join(case_dir, name))
    os.makedirs(work)
    # Modification times 1 s apart in name order, again (a copy may have lost them).
    cases.restamp_input(case_dir)
    ts_cols = set(case["timestamp_columns"])
    cols = case["columns"]
    batches = []
    out_path = os.path.join(case_dir, "spark.jsonl")
    out = open(out_path + ".tmp", "w")

    def each_batch(df, batch_id):
        # Timestamps as epoch microseconds: collect() would turn them into
        # naive datetimes in the Python process's zone.
        rows = df.select(*[F.unix_micros(c).alias(c) if c in ts_cols else F.col(c) for c in cols]).collect()
        for r in rows:
            d = r.asDict()
            for c in ts_cols:
                d[c] = fmt_us(d[c])
            out.write(json.dumps({"batch": batch_id, "row": d}, sort_keys=True) + "\n")
        out.flush()
        batches.append({"batch": batch_id, "rows": len(rows)})

    started = time.perf_counter()
    try:
        df = spark.readStream.schema(SCHEMA).option("maxFilesPerTrigger", 1).json(os.path.join(case_dir, "input"))
        if case["watermark"]:
            df = df.withWatermark("ts", cases.delay_text(case["watermark"]["delay_ms"])[1])
        result = cases.spark_query(spark, df, case)
        query = (
            result.writeStream.outputMode(case["mode"])
            .foreachBatch(each_batch)
            .option("checkpointLocation", os.path.join(work, "checkpoint"))
            .trigger(availableNow=True)
            .start()
        )
        query.awaitTermination()
    except Exception as e:  # a refused query or a failed one
        out.close()
        os.remove(out_path + ".tmp")
        msg = str(e)
        with open(os.path.join(case_dir, "spark_error.txt"), "w") as f:
            f.write(msg + "\n\n" + traceback.format_exc())
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        return f"error: {first[:200]}"
    out.close()
    os.replace(out_path + ".tmp", out_path)
    seconds = time.perf_counter() - started
    progress = []
    for p in query.recentProgress:
        progress.append(
            {
                "batch": p["batchId"],
                "input_rows": p["numInputRows"],
                "watermark": (p["eventTime"] or {}).get("watermark"),
                "max_event_time": (p["eventTime"] or {}).get("max"),
                "dropped_by_watermark": sum(
                    s.get("numRowsDroppedByWatermark", 0) for s in (p["stateOperators"] or [])
                ),
                "state_rows": sum(s.get("numRowsTotal", 0) for s in (p["stateOperators"] or [])),
            }
        )
    with open(os.path.join(case_dir, "spark_batches.json"), "w") as f:
        json.dump({"spark_version": spark.version, "seconds": round(seconds, 3), "batches": batches,
                   "progress": progress}, f, indent=1)
        f.write("\n")
    # The checkpoint is not needed to compare; the case directory stays small.
    shutil.rmtree(work, ignore_errors=True)
    return f"{len(batches)} batches, {sum(b['rows'] for b in batches)} rows, {seconds:.1f}s"


def main() -> None:
    dirs = sys.argv[1:]
    if not dirs:
        sys.exit(__doc__)
    t0 = time.perf_counter()
    spark = session()
    print(f"spark {spark.version} up in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    for i, d in enumerate(dirs):
        status = run_case(spark, d)
        print(f"  spark [{i + 1}/{len(dirs)}] {os.path.basename(d)}: {status}", file=sys.stderr, flush=True)
    spark.stop()
    print(f"spark: {len(dirs)} cases in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
