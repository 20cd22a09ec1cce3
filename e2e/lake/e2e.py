"""Files on an object store and a Delta Lake sink, exactly once, against a
real S3-compatible server (moto, started by e2e/lake.sh). Each check prints
`ok   ...` or fails loudly.

1. Clickstream: JSON files arrive one by one in s3://landing/clicks/ while
   the query runs (a projection and filter, as examples/local/
   clickstream-to-s3.yaml); its output goes to s3://warehouse/, Parquet,
   partitioned by country (`country=US/`, Spark's null directory
   `__HIVE_DEFAULT_PARTITION__`). The engine is killed with SIGKILL 10 times
   and restarted. The committed output equals an uninterrupted run's over
   the same files, row for row and partition for partition, and the bucket
   holds no data file that no manifest lists (a plain directory reader such
   as Spark's `spark.read.parquet` reads the same rows).
2. Fraud: the seed's fraud query (5-minute windows sliding every minute, a
   watermark, append mode) from transaction files on S3 to a Delta table on
   S3, killed 10 times with SIGKILL. delta-rs's Python reader (from S3) and
   Apache Spark with delta-spark (from a copy of the table) both see exactly
   the rows of the same query written by the file sink, none twice; Spark's
   DESCRIBE HISTORY shows one commit per batch, each carrying the query's id
   and its batch id, and the log has Delta checkpoints.
"""

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import boto3
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
from results import FRAUD, TX_SCHEMA, Row, committed_rows, compare, fail, ok  # noqa: E402

CLICK_SCHEMA = """[{name: event_time, type: timestamp}, {name: session_id, type: string},
               {name: user_id, type: string}, {name: url, type: string},
               {name: referrer, type: string}, {name: user_agent, type: string},
               {name: country, type: string}, {name: load_ms, type: int}]"""
CLICK_QUERY = """SELECT event_time, session_id, user_id, url, referrer,
           upper(country) AS country, load_ms
    FROM clicks
    WHERE user_agent NOT LIKE '%bot%' AND url NOT LIKE '/healthz%'"""


def s3():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")


def keys(bucket, prefix):
    pages = s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def get(bucket, key):
    return s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def stamp(micros):
    seconds, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:06d}Z"


def micros_of(value):
    """A timestamp as Unix microseconds: from a datetime, or the JSON sink's text."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1_000_000)
    text = value.replace("Z", "+00:00")
    return int(datetime.datetime.fromisoformat(text).timestamp() * 1_000_000)


class Env:
    def __init__(self, args):
        self.sluice = args.sluice
        self.work = args.work

    def spec(self, name, source, sink, trigger, extra=""):
        path = os.path.join(self.work, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(f"""apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: {name}}}
spec:
{source}
  sink: {sink}
  outputMode: append
  trigger: {trigger}
  checkpoint: {{location: "s3://checkpoints/{name}"}}
{extra}""")
        return path

    def start(self, spec):
        env = dict(os.environ, SLUICE_LOG="info", SLUICE_STATE_DIR=spec + ".state")
        log = open(spec + ".log", "a")
        return subprocess.Popen([self.sluice, "run", spec], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)

    def run(self, spec):
        p = self.start(spec)
        if p.wait(timeout=1800) != 0:
            fail(f"{spec} exited {p.returncode}:\n" + open(spec + ".log").read()[-3000:])

    def kill_repeatedly(self, spec, kills, seed, low, high):
        """Starts the query and kills it with SIGKILL `kills` times at random
        moments; returns how many kills landed before it ended by itself."""
        rnd = random.Random(seed)
        done = 0
        while done < kills:
            p = self.start(spec)
            time.sleep(rnd.uniform(low, high))
            if p.poll() is not None:
                if p.returncode != 0:
                    fail(f"{spec} exited {p.returncode}:\n" + open(spec + ".log").read()[-3000:])
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            done += 1
        return done


# ---- 1. clickstream -> partitioned Parquet ---------------------------------

def click_files(count, rows_per_file):
    rnd = random.Random(20261121)
    countries = ["us", "de", "fr", "br", "jp", "in", None]
    agents = ["Mozilla/5.0", "curl/8", "Googlebot/2.1", "Safari/17"]
    urls = ["/", "/cart", "/checkout", "/search?q=a%2Fb", "/healthz", "/product/42"]
    base = 1767225600_000000
    files = []
    i = 0
    for n in range(count):
        lines = []
        for _ in range(rows_per_file):
            row = {"event_time": stamp(base + i * 50_000 + rnd.randrange(1_000_000)),
                   "session_id": f"s-{rnd.randrange(5000):05d}",
                   "user_id": f"u-{rnd.randrange(2000):05d}",
                   "url": rnd.choice(urls),
                   "referrer": rnd.choice(["", "https://example.com/", "https://search.example/?q=x"]),
                   "user_agent": rnd.choice(agents),
                   "country": rnd.choice(countries),
                   "load_ms": rnd.randrange(5, 5000)}
            lines.append(json.dumps(row))
            i += 1
        files.append((f"clicks-{n:05d}.json", ("\n".join(lines) + "\n").encode()))
    return files


def partitioned_rows(bucket, prefix):
    """The rows of the files the manifests list, with the partition column
    from the path; and the data files in the bucket no manifest lists."""
    names = keys(bucket, prefix + "/")
    meta = prefix + "/_sluice_metadata/"
    manifests = {}
    compacts = []
    for key in names:
        if not key.startswith(meta):
            continue
        name = key[len(meta):]
        if name.isdigit():
            manifests[int(name)] = json.loads(get(bucket, key))
        elif name.endswith(".compact"):
            compacts.append(json.loads(get(bucket, key)))
    listed = {}
    for compact in compacts:
        for batch in compact["batches"]:
            manifests.setdefault(batch["batchId"], batch)
    for manifest in manifests.values():
        for f in manifest["files"]:
            listed[f["path"]] = f["rows"]
    rows = []
    for path, count in listed.items():
        local = os.path.join("/tmp", "lake-e2e-" + str(os.getpid()) + ".parquet")
        with open(local, "wb") as out:
            out.write(get(bucket, f"{prefix}/{path}"))
        table = pq.read_table(local)
        os.unlink(local)
        partition = {}
        for part in path.split("/")[:-1]:
            column, value = part.split("=", 1)
            value = urllib.parse.unquote(value)
            partition[column] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
        found = table.to_pylist()
        if len(found) != count:
            fail(f"{path}: {len(found)} rows where its manifest says {count}")
        for row in found:
            row.update(partition)
            row["event_time"] = micros_of(row["event_time"])
            rows.append(Row(row))
    data = {k[len(prefix) + 1:] for k in names if not k.startswith(meta)}
    return rows, data - set(listed), len(manifests)


def clickstream(env):
    files = click_files(50, 2000)
    for name, body in files:
        s3().put_object(Bucket="landing", Key=f"all/{name}", Body=body)

    def source(prefix, per_trigger):
        return f"""  sources:
    - name: clicks
      files: {{path: "s3://landing/{prefix}", maxFilesPerTrigger: {per_trigger}}}
      format: json
      schema: {CLICK_SCHEMA}
  query: |
    {CLICK_QUERY}"""

    sink = '{files: {path: "s3://warehouse/%s", partitionBy: [country]}, format: parquet}'
    reference = env.spec("clicks-reference", source("all", 5), sink % "reference", "{availableNow: true}")
    start = time.time()
    env.run(reference)
    expected, orphans, batches = partitioned_rows("warehouse", "reference")
    if len(expected) < 10_000:
        fail(f"the reference holds only {len(expected)} rows")
    ok(f"clickstream reference: {len(expected)} rows in {batches} batches, partitioned by country "
       f"({time.time() - start:.1f} s)")

    # Files arrive while the query runs and is killed.
    def upload():
        for name, body in files:
            s3().put_object(Bucket="landing", Key=f"live/{name}", Body=body)
            time.sleep(0.4)

    uploader = threading.Thread(target=upload)
    uploader.start()
    live = env.spec("clicks-live", source("live", 2), sink % "live", "{processingTime: 1s}")
    kills = env.kill_repeatedly(live, 10, seed=11, low=1.0, high=3.0)
    uploader.join()
    if kills < 10:
        fail(f"the query ended after {kills} kills")
    # The same query and checkpoint, to the end of what arrived.
    drain = env.spec("clicks-live", source("live", 2), sink % "live", "{availableNow: true}")
    env.run(drain)
    actual, orphans, batches = partitioned_rows("warehouse", "live")
    compare(actual, expected, "clickstream while files arrived, killed 10 times")
    if orphans:
        fail(f"data files no manifest lists are left in the bucket: {sorted(orphans)[:5]}")
    partitions = sorted({p.split("/")[0] for p in keys("warehouse", "live/")} - {"live"})
    dirs = sorted({k.split("/")[1] for k in keys("warehouse", "live/") if "=" in k})
    if "country=__HIVE_DEFAULT_PARTITION__" not in dirs or "country=US" not in dirs:
        fail(f"expected Spark's partition directories, found {dirs}")
    del partitions
    ok(f"clickstream while 50 files arrived, killed {kills} times with SIGKILL: {len(actual)} rows in "
       f"{batches} batches, each once, equal to the uninterrupted run; directories {', '.join(dirs)}; "
       "no uncommitted file left")


# ---- 2. fraud -> Delta -----------------------------------------------------

def transaction_files(records, count):
    rnd = random.Random(20261121)
    per_file = records // count
    files = []
    for n in range(count):
        lines = []
        for j in range(per_file):
            i = n * per_file + j
            micros = 1767225600_000000 + i * 10_000 - rnd.randrange(2_000_000)
            user = f"user-{int(rnd.paretovariate(1.2)) % 2000:05d}"
            lines.append(json.dumps({"transaction_id": f"tx-{i:09d}", "user_id": user,
                                     "amount": round(rnd.lognormvariate(3.5, 1.0), 2),
                                     "event_time": stamp(micros)}))
        files.append((f"tx-{n:05d}.jsonl", ("\n".join(lines) + "\n").encode()))
    return files


def fraud_row(row):
    row = dict(row)
    for column in ("window_start", "window_end"):
        if not isinstance(row[column], int):
            row[column] = micros_of(row[column])
    return Row(row)


def fraud(env, args):
    for name, body in transaction_files(args.records, 40):
        s3().put_object(Bucket="landing", Key=f"transactions/{name}", Body=body)
    source = f"""  sources:
    - name: transactions
      files: {{path: "s3://landing/transactions", maxFilesPerTrigger: 1}}
      format: json
      schema: {TX_SCHEMA}
      watermark: {{column: event_time, delay: 10m}}
  query: |
    {FRAUD}"""
    extra = "  statePartitions: 4\n"
    reference = env.spec("fraud-files", source, f'{{files: {{path: "{env.work}/fraud-files"}}}}',
                         "{availableNow: true}", extra)
    start = time.time()
    env.run(reference)
    reference_secs = time.time() - start
    expected = committed_rows(os.path.join(env.work, "fraud-files"), fraud_row)
    if len(expected) < 100:
        fail(f"the file sink's result holds only {len(expected)} rows")
    ok(f"fraud query, file sink: {len(expected)} windows ({time.time() - start:.1f} s)")

    delta = env.spec("fraud-delta", source, '{delta: {path: "s3://lake/fraud"}}',
                     "{availableNow: true}", extra)
    start = time.time()
    # The kills are spread over the reference run's time (each restart also
    # pays its start-up), so that 10 land before the end on a fast machine
    # too: fixed intervals let a quick run finish after 8 in a CI run.
    step = max(reference_secs / 10, 0.3)
    kills = env.kill_repeatedly(delta, 10, seed=5, low=0.4 * step, high=1.1 * step)
    env.run(delta)
    if kills < 10:
        fail(f"the Delta run ended after {kills} kills: make it longer (FRAUD_RECORDS)")
    ok(f"fraud query to Delta on S3, killed {kills} times with SIGKILL ({time.time() - start:.1f} s)")

    # A copy of the table for Spark (its S3 connector is not set up here).
    local = os.path.join(env.work, "fraud-delta-copy")
    for key in keys("lake", "fraud/"):
        path = os.path.join(local, key[len("fraud/"):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(get("lake", key))
    out = subprocess.run([args.delta_python, os.path.join(HERE, "read_delta.py"), "s3://lake/fraud",
                          local, args.delta_jars], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"reading the Delta table failed:\n{out.stderr[-4000:]}")
    read = json.loads(out.stdout)
    compare([fraud_row(r) for r in read["deltalake"]], expected, "delta-rs (Python) reading the table")
    ok(f"delta-rs's Python reader sees the file sink's {len(expected)} rows, each once")
    compare([fraud_row(r) for r in read["spark"]], expected, "Spark with delta-spark reading the table")
    ok(f"Spark with delta-spark sees the file sink's {len(expected)} rows, each once")

    commits = sorted(int(k.rsplit("/", 1)[1]) for k in keys("checkpoints", "fraud-delta/commits/"))
    metadata = json.loads(get("checkpoints", "fraud-delta/metadata"))
    query_id = metadata["id"]
    history = sorted(read["history"], key=lambda h: h["version"])
    epochs = [int(h["operationParameters"].get("epochId", -1)) for h in history]
    if epochs != commits:
        fail(f"DESCRIBE HISTORY's batch ids {epochs} are not the query's batches {commits}")
    strangers = [h for h in history if h["operationParameters"].get("queryId") != query_id]
    if strangers:
        fail(f"commits without the query's id {query_id}: {strangers[:2]}")
    checkpoints = [k for k in keys("lake", "fraud/_delta_log/") if k.endswith(".checkpoint.parquet")]
    if len(commits) >= 10 and not checkpoints:
        fail("no Delta checkpoint in _delta_log after 10 commits")
    ok(f"DESCRIBE HISTORY: {len(history)} commits, one per batch (0..{commits[-1]}), each with the query's "
       f"id {query_id} and its batch id; Delta checkpoints: "
       f"{', '.join(sorted(k.rsplit('/', 1)[1] for k in checkpoints))}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--delta-python", required=True)
    parser.add_argument("--delta-jars", required=True)
    parser.add_argument("--records", type=int, default=400_000, help="fraud transactions")
    args = parser.parse_args()
    env = Env(args)
    for bucket in ("landing", "warehouse", "lake"):
        s3().create_bucket(Bucket=bucket)
    clickstream(env)
    fraud(env, args)


if __name__ == "__main__":
    main()
