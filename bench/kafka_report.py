"""The report of bench/kafka.sh: reads both engines' output topics
(read_committed), checks they hold the same rows, and prints records/s for
each query, Sluice over Spark, and Sluice over a plain consumer's read rate.
Exits 1 when the outputs differ."""

import argparse
import datetime
import json
import math
import os
import re
import sys

from confluent_kafka import Consumer, TopicPartition


def read_topic(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"report-{topic}",
                  "isolation.level": "read_committed", "enable.auto.commit": False,
                  "enable.partition.eof": True})
    parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    eof, rows = set(), []
    while len(eof) < len(parts):
        m = c.poll(10)
        if m is None:
            break
        if m.error():
            if m.error().code() == -191:
                eof.add(m.partition())
                continue
            raise RuntimeError(m.error())
        rows.append(json.loads(m.value()))
    c.close()
    return rows


def micros(text):
    """An RFC 3339 timestamp (either engine's spelling) as UTC microseconds."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def key(row):
    return tuple((k, micros(v) if k.startswith("window_") or k == "event_time" else v)
                 for k, v in sorted(row.items()) if not isinstance(v, float))


def same(a, b):
    if len(a) != len(b):
        return False
    a = sorted(a, key=key)
    b = sorted(b, key=key)
    for x, y in zip(a, b):
        if key(x) != key(y):
            return False
        for k, v in x.items():
            if isinstance(v, float) and not math.isclose(v, y[k], rel_tol=1e-9):
                return False
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--rows", type=int, required=True)
    args = parser.parse_args()
    w = args.work
    ceiling = float(re.search(r"([0-9.]+) records/s", open(os.path.join(w, "read-rate.txt")).read()).group(1))
    lines = [f"{'engine':<34}{'seconds':>10}{'records/s':>14}"]
    lines.append(f"{'plain librdkafka consumer (read)':<34}{args.rows / ceiling:>10.2f}{ceiling:>14,.0f}")
    failed = False
    for q in ["stateless", "fraud"]:
        sluice_s = float(open(os.path.join(w, f"sluice-{q}.seconds")).read())
        spark = json.loads(open(os.path.join(w, f"spark-{q}.json")).read())
        sluice_rows = read_topic(args.bootstrap, f"sluice-{q}")
        spark_rows = read_topic(args.bootstrap, f"spark-{q}")
        if spark["input_rows"] != args.rows:
            print(f"FAIL {q}: Spark read {spark['input_rows']} records, not {args.rows}")
            failed = True
        equal = same(sluice_rows, spark_rows) if q == "fraud" else len(sluice_rows) == len(spark_rows)
        if not equal:
            print(f"FAIL {q}: Sluice wrote {len(sluice_rows)} rows, Spark {len(spark_rows)}"
                  f"{' (rows differ)' if len(sluice_rows) == len(spark_rows) else ''}")
            failed = True
        lines.append(f"{'Sluice ' + q + ' (whole process)':<34}{sluice_s:>10.2f}{args.rows / sluice_s:>14,.0f}")
        lines.append(f"{'Spark ' + q + ' (query only)':<34}{spark['seconds']:>10.2f}{args.rows / spark['seconds']:>14,.0f}")
        lines.append(f"  {q}: {len(sluice_rows)} rows from each engine{' (equal)' if equal else ''}; "
                     f"Sluice {spark['seconds'] / sluice_s:.1f}x Spark, "
                     f"{100 * (args.rows / sluice_s) / ceiling:.0f}% of the plain consumer's read rate")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
