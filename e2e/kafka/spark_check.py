"""PySpark Structured Streaming against the real Kafka broker of
e2e/kafka/lib.sh, with Spark's Kafka connector loaded offline from the jar
cache (spark.jars, see kafka_spark_jars in lib.sh). Prints PASS/FAIL lines
and timings; exits 1 if a check failed.

  python3 e2e/kafka/spark_check.py
      starts its own broker (through lib.sh), fills the topics, runs the
      checks, stops the broker
  KAFKA_BOOTSTRAP=127.0.0.1:PORT SPARK_KAFKA_JARS=a.jar,b.jar \\
  python3 e2e/kafka/spark_check.py --no-broker
      uses a running broker whose topics spark-in (1000 records, 4
      partitions) and spark-txn (check.py txn: 130 committed, 50 aborted)
      exist, and writes to spark-out

Checks: an availableNow streaming query reads spark-in whole; with
kafka.isolation.level=read_committed it reads only the committed records of
spark-txn; a streaming query writes spark-in to spark-out through Spark's
Kafka sink.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def with_own_broker():
    """Re-run this script with --no-broker inside a shell that starts a broker
    and fills the topics, and stops it at the end."""
    me = shlex.quote(os.path.abspath(__file__))
    lib = shlex.quote(os.path.join(HERE, "lib.sh"))
    check = shlex.quote(os.path.join(HERE, "check.py"))
    script = f"""
set -euo pipefail
source {lib}
work="$(mktemp -d)"
trap 'kafka_kill; rm -rf "$work"' EXIT
python3 -c 'import confluent_kafka' 2> /dev/null || python3 -m pip install -q confluent-kafka
SPARK_KAFKA_JARS="$(kafka_spark_jars)"
export SPARK_KAFKA_JARS
kafka_start "$work/kafka"
kafka_topic_create spark-in 4
kafka_topic_create spark-txn 4
kafka_topic_create spark-out 4
python3 {check} produce spark-in 1000 > /dev/null
python3 {check} txn spark-txn > /dev/null
python3 {me} --no-broker
kafka_stop
"""
    return subprocess.call(["bash", "-c", script])


def main():
    if "--no-broker" not in sys.argv:
        return with_own_broker()

    bootstrap = os.environ["KAFKA_BOOTSTRAP"]
    jars = os.environ.get("SPARK_KAFKA_JARS") or subprocess.check_output(
        ["bash", "-c", f"source {shlex.quote(os.path.join(HERE, 'lib.sh'))}; kafka_spark_jars"], text=True).strip()
    failed = False

    def check(ok, what):
        nonlocal failed
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        failed = failed or not ok

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    t0 = time.time()
    spark = (SparkSession.builder.master("local[2]").appName("sluice-spark-kafka-check")
             .config("spark.jars", jars)
             .config("spark.driver.memory", "1g")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "2")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    print(f"TIME spark session {time.time() - t0:.1f}s (PySpark {spark.version})", flush=True)
    work = tempfile.mkdtemp(prefix="spark-kafka-check-")

    def stream_count(topic, name, **options):
        t = time.time()
        reader = (spark.readStream.format("kafka")
                  .option("kafka.bootstrap.servers", bootstrap)
                  .option("subscribe", topic)
                  .option("startingOffsets", "earliest"))
        for k, v in options.items():
            reader = reader.option(k, v)
        q = (reader.load().selectExpr("CAST(value AS STRING) AS value", "partition", "offset")
             .writeStream.format("memory").queryName(name)
             .option("checkpointLocation", os.path.join(work, name))
             .trigger(availableNow=True).start())
        q.awaitTermination(300)
        if q.exception():
            raise q.exception()
        rows = [r.value for r in spark.sql(f"SELECT value FROM {name}").collect()]
        print(f"TIME streaming read of {topic} ({len(rows)} rows) {time.time() - t:.1f}s", flush=True)
        return rows

    try:
        rows = stream_count("spark-in", "spark_in")
        check(len(rows) == 1000 and len(set(rows)) == 1000,
              f"spark: an availableNow streaming query read {len(rows)} records of spark-in (expected 1000)")

        rows = stream_count("spark-txn", "spark_txn_committed", **{"kafka.isolation.level": "read_committed"})
        aborted = sum(v.startswith("aborted-") for v in rows)
        check(len(rows) == 130 and aborted == 0,
              f"spark: read_committed streaming read of spark-txn saw {len(rows)} records, {aborted} aborted "
              f"(expected 130, 0)")
        rows = stream_count("spark-txn", "spark_txn_all")
        check(len(rows) == 180,
              f"spark: the default (read_uncommitted) read of spark-txn saw {len(rows)} records, "
              f"aborted ones included (expected 180)")

        t = time.time()
        q = (spark.readStream.format("kafka")
             .option("kafka.bootstrap.servers", bootstrap)
             .option("subscribe", "spark-in").option("startingOffsets", "earliest").load()
             .select(F.col("key"), F.upper(F.col("value").cast("string")).alias("value"))
             .writeStream.format("kafka")
             .option("kafka.bootstrap.servers", bootstrap).option("topic", "spark-out")
             .option("checkpointLocation", os.path.join(work, "sink"))
             .trigger(availableNow=True).start())
        q.awaitTermination(300)
        if q.exception():
            raise q.exception()
        out = (spark.read.format("kafka").option("kafka.bootstrap.servers", bootstrap)
               .option("subscribe", "spark-out").option("startingOffsets", "earliest").load()
               .selectExpr("CAST(value AS STRING) AS value").collect())
        print(f"TIME streaming write to spark-out {time.time() - t:.1f}s", flush=True)
        check(len(out) == 1000 and all(r.value.startswith("V") for r in out),
              f"spark: a streaming query wrote {len(out)} records to spark-out through the Kafka sink (expected 1000)")
    except Exception as e:  # the connector not loading is the failure to report
        check(False, f"spark: {type(e).__name__}: {str(e)[:2000]}")
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
