"""Kafka in and out, exactly once, against a real Apache Kafka broker
(started by e2e/kafka.sh). Each check prints `ok   ...` or fails loudly.

1. An external client (confluent-kafka) produces the transactions into a
   4-partition topic; the same records go to JSON-lines files. The seed's
   fraud query (per user, 5-minute windows sliding every minute, count / sum
   / avg, a 10-minute watermark, append mode, HAVING) runs from the file
   source to a file sink: the reference.
2. The same query Kafka -> Kafka with a checkpoint: the output topic, read
   with read_committed by the external client, equals the reference row for
   row.
3. Again while the engine is killed with SIGKILL 10 times at random
   moments and restarted: still equal, no duplicates.
4. Killed between producing a batch's records and committing its
   transaction: read_committed does not see them (read_uncommitted does);
   restarted, the output equals the reference.
5. Lag: the consumer group's lag (ConsumerGroupCommand --describe) equals
   what /progress reports at the same moment.
6. Malformed records (bad JSON, wrong types, a 2 MB value, an empty value,
   a tombstone) land in the dead-letter topic with their reason and origin;
   the counts match /progress.
7. The broker killed (SIGKILL) and down for 30 s in the middle of a run: the
   engine resumes and the output equals the reference. When /status says
   the brokers are unavailable (until a batch completes, even while a run
   is blocked in a call), /metrics counts restarts and the log says so too.
   A run that never noticed within 120 s fails (it sat in dropping its
   Kafka consumer, which waited for the coordinator: fixed).
8. Partitions added to a topic while a query reads it are read, from their
   first record.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from confluent_kafka import Consumer, Producer, TopicPartition

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
from results import FRAUD, Row, committed_rows, compare, fail, ok  # noqa: E402
from results import TX_SCHEMA as SCHEMA  # noqa: E402


def sh(script):
    """Runs bash with the broker library sourced."""
    return subprocess.run(["bash", "-c", f"source {HERE}/lib.sh; {script}"],
                          check=True, capture_output=True, text=True).stdout


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Env:
    def __init__(self, args):
        self.sluice = args.sluice
        self.bootstrap = args.bootstrap
        self.broker_dir = args.broker_dir
        self.work = args.work
        self.records = args.records

    def topic(self, name, partitions, *configs):
        sh(f"source {self.broker_dir}/kafka.env; kafka_topic_create {name} {partitions} {' '.join(configs)}")

    def spec(self, name, source, sink, extra="", query=FRAUD,
             watermark="{column: event_time, delay: 10m}"):
        """A query over the transactions, the fraud query by default;
        `watermark` None for none."""
        path = os.path.join(self.work, f"{name}.yaml")
        watermark = f"\n      watermark: {watermark}" if watermark else ""
        with open(path, "w") as f:
            f.write(f"""apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: {name}}}
spec:
  sources:
    - name: transactions
      {source}
      schema: {SCHEMA}{watermark}
  query: |
    {query}
  sink: {sink}
  outputMode: append
  checkpoint: {{location: "{self.work}/{name}-checkpoint"}}
  statePartitions: 4
{extra}""")
        return path

    def kafka_source(self, topic, per_trigger=100000):
        return (f'kafka: {{bootstrapServers: "{self.bootstrap}", topic: {topic}, '
                f'startingOffsets: earliest, maxOffsetsPerTrigger: {per_trigger}}}')

    def kafka_sink(self, topic):
        return f'{{kafka: {{bootstrapServers: "{self.bootstrap}", topic: {topic}}}}}'

    def start(self, spec, extra_env=None, args=()):
        env = dict(os.environ, SLUICE_LOG="info",
                   SLUICE_STATE_DIR=spec + ".state")
        env.pop("SLUICE_FAIL_POINT", None)
        env.update(extra_env or {})
        log = open(spec + ".log", "a")
        return subprocess.Popen([self.sluice, "run", spec, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)

    def run(self, spec, **kw):
        p = self.start(spec, **kw)
        if p.wait(timeout=1800) != 0:
            fail(f"{spec} exited {p.returncode}:\n" + open(spec + ".log").read()[-3000:])

    def read_topic(self, topic, isolation="read_committed"):
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{time.time()}",
                      "isolation.level": isolation, "enable.auto.commit": False,
                      "enable.partition.eof": True})
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        eof, rows = set(), []
        deadline = time.time() + 120
        while len(eof) < len(parts) and time.time() < deadline:
            m = c.poll(1)
            if m is None:
                continue
            if m.error():
                if m.error().code() == -191:
                    eof.add(m.partition())
                    continue
                raise RuntimeError(m.error())
            rows.append(m)
        c.close()
        return rows


def generate(env):
    """Produces the transactions to Kafka and writes them to files: the same
    records, seeded."""
    rnd = random.Random(20261121)
    files = os.path.join(env.work, "files")
    os.makedirs(files)
    producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 20,
                         "batch.num.messages": 10000})
    per_file = max(1, env.records // 20)
    out = None
    for i in range(env.records):
        if i % per_file == 0:
            if out:
                out.close()
            out = open(os.path.join(files, f"{i // per_file:03d}.jsonl"), "w")
        # 100 a second of event time, up to 2 s out of order.
        micros = 1767225600_000000 + i * 10_000 - rnd.randrange(2_000_000)
        seconds, frac = divmod(micros, 1_000_000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:06d}Z"
        user = f"user-{int(rnd.paretovariate(1.2)) % 2000:05d}"
        row = {"transaction_id": f"tx-{i:09d}", "user_id": user,
               "amount": round(rnd.lognormvariate(3.5, 1.0), 2), "event_time": stamp}
        text = json.dumps(row)
        out.write(text + "\n")
        while True:
            try:
                producer.produce("transactions", key=user.encode(), value=text.encode())
                break
            except BufferError:
                producer.poll(0.1)
    out.close()
    producer.flush()
    del producer
    return files


def rows_of_topic(env, topic):
    return sorted(Row(json.loads(m.value())) for m in env.read_topic(topic))


def rows_of_files(directory):
    return committed_rows(directory)


def same(env, topic, expected, what):
    actual = rows_of_topic(env, topic)
    compare(actual, expected, what, where="Kafka")
    ok(f"{what}: {len(actual)} rows, each once, equal to the file source's")


def restarts_total(port):
    """The engine's `sluice_query_restarts_total`, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("sluice_query_restarts_total"):
                    return float(line.rsplit(" ", 1)[1])
    except Exception:
        return None
    return None


def get_json(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body = r.read()
            return json.loads(body) if body else None
    except Exception:
        return None


def env_arguments():
    """A parser of what every script over the broker takes (see `Env`):
    the sluice binary, the broker's address and directory, a work
    directory."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--broker-dir", required=True)
    parser.add_argument("--work", required=True)
    return parser


def main():
    parser = env_arguments()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--growing-only", action="store_true", help="only the check of added partitions")
    args = parser.parse_args()
    env = Env(args)
    if args.growing_only:
        return growing(env)
    for topic in ["transactions"] + [f"alerts-{n}" for n in ("clean", "killed", "open", "aborted", "outage")]:
        env.topic(topic, 4)

    start = time.time()
    files = generate(env)
    ok(f"produced {env.records} transactions to a 4-partition topic and to files ({time.time() - start:.1f} s)")

    # 1. The reference: the same query from the files.
    reference = env.spec("reference", f'files: {{path: "{files}"}}\n      format: json',
                         f'{{files: {{path: "{env.work}/reference-out"}}}}',
                         "  trigger: {availableNow: true}\n")
    start = time.time()
    env.run(reference)
    expected = rows_of_files(f"{env.work}/reference-out")
    if len(expected) < 100:
        fail(f"the reference holds only {len(expected)} rows")
    ok(f"reference from the file source: {len(expected)} windows ({time.time() - start:.1f} s)")

    # 2. Kafka to Kafka.
    clean = env.spec("clean", env.kafka_source("transactions"), env.kafka_sink("alerts-clean"),
                     "  trigger: {availableNow: true}\n")
    start = time.time()
    env.run(clean)
    clean_secs = time.time() - start
    same(env, "alerts-clean", expected, f"Kafka to Kafka ({clean_secs:.1f} s)")

    # 3. Killed 10 times at random moments.
    killed = env.spec("killed", env.kafka_source("transactions", 50000), env.kafka_sink("alerts-killed"),
                      "  trigger: {availableNow: true}\n")
    rnd = random.Random(7)
    # Spread over the uninterrupted run's time (each restart also pays its
    # start-up), so that all 10 land before the end on a faster machine too.
    step = max(clean_secs / 10, 0.3)
    kills = 0
    while kills < 10:
        p = env.start(killed)
        time.sleep(rnd.uniform(0.4 * step, 1.1 * step))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    env.run(killed)
    same(env, "alerts-killed", expected, f"killed {kills} times with SIGKILL and restarted")
    if kills < 10:
        fail(f"the run ended after {kills} kills: make it longer")

    # 4. A transaction begun and never committed.
    opened = env.spec("opened", env.kafka_source("transactions", 50000), env.kafka_sink("alerts-open"),
                      "  trigger: {availableNow: true}\n")
    p = env.start(opened, {"SLUICE_FAIL_POINT": "sink-data:3"})
    p.wait(timeout=600)
    if p.returncode != -signal.SIGKILL:
        fail(f"the fail point sink-data:3 did not kill the engine: {p.returncode}")
    committed = env.read_topic("alerts-open")
    uncommitted = env.read_topic("alerts-open", "read_uncommitted")
    if not len(uncommitted) > len(committed):
        fail(f"batch 3's records are not in the log ({len(uncommitted)} uncommitted, {len(committed)} committed)")
    ok(f"killed between producing batch 3 and committing it: read_committed sees {len(committed)} rows, "
       f"read_uncommitted {len(uncommitted)}")
    env.run(opened)
    same(env, "alerts-open", expected, "restarted after the open transaction")

    # 4b. A transaction the coordinator aborts: the engine holds batch 3
    # (it has output rows, as step 4 showed: a transaction without records
    # is not open at the coordinator yet) open past transaction.timeout.ms (as a broker outage does), the
    # coordinator aborts it and bumps the producer's epoch. No other run
    # claimed the checkpoint, so the run restarts from it, not fenced.
    aborted = env.spec("aborted", env.kafka_source("transactions", 50000),
                       f'{{kafka: {{bootstrapServers: "{env.bootstrap}", topic: alerts-aborted, '
                       f'options: {{transaction.timeout.ms: "5000", socket.timeout.ms: "5000"}}}}}}',
                       "  trigger: {availableNow: true}\n")
    port = free_port()
    p = env.start(aborted, {"SLUICE_FAIL_POINT": "sink-data:3:pause25000"},
                  args=("--http-port", str(port), "--http-address", "127.0.0.1"))
    restarts = None
    while p.poll() is None:
        seen = restarts_total(port)
        restarts = restarts if seen is None else seen
        time.sleep(0.5)
    log = open(aborted + ".log").read()
    if p.returncode != 0:
        fail(f"the run whose transaction the coordinator aborted exited {p.returncode}:\n" + log[-3000:])
    if "coordinator aborted the transaction" not in log:
        fail("the transaction held 25 s past its 5 s timeout was not aborted by the coordinator "
             f"(restarts {restarts}); the log ends:\n" + log[-2000:])
    same(env, "alerts-aborted", expected,
         f"batch 3 held 25 s past transaction.timeout.ms 5 s, aborted by the coordinator, restarted "
         f"(sluice_query_restarts_total {restarts})")

    # 5. Lag: the consumer group against /progress.
    port = free_port()
    lag_spec = env.spec("lag", env.kafka_source("transactions", 20000), "{console: {numRows: 1}}",
                        "  trigger: {processingTime: 3s}\n")
    p = env.start(lag_spec, args=("--http-port", str(port), "--http-address", "127.0.0.1"))
    compared = None
    deadline = time.time() + 120
    while compared is None and time.time() < deadline:
        time.sleep(0.5)
        before = get_json(port, "/progress/latest")
        if not before or before["batchId"] < 1:
            continue
        time.sleep(1)
        described = sh(f"source {env.broker_dir}/kafka.env; kafka_group_describe sluice-lag")
        after = get_json(port, "/progress/latest")
        if not after or after["batchId"] != before["batchId"]:
            continue
        group_lag = sum(int(line.split()[5]) for line in described.splitlines()
                        if line.startswith("sluice-lag ") and line.split()[5].isdigit())
        reported = after["sources"][0]["recordsBehindLatest"]
        compared = (group_lag, reported, after["sources"][0]["metrics"])
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    if compared is None:
        fail("could not read the lag twice between batches:\n" + open(lag_spec + ".log").read()[-2000:])
    if compared[0] != compared[1] or compared[0] == 0:
        fail(f"ConsumerGroupCommand says lag {compared[0]}, /progress {compared[1]}")
    ok(f"ConsumerGroupCommand --describe --group sluice-lag: lag {compared[0]}, as /progress reports "
       f"(max behind per partition {compared[2].get('maxOffsetsBehindLatest')})")

    # 6. Malformed records to the dead-letter topic.
    env.topic("raw", 2, "max.message.bytes=10485760")
    env.topic("dead", 1, "max.message.bytes=10485760")
    env.topic("clean", 2)
    producer = Producer({"bootstrap.servers": env.bootstrap, "message.max.bytes": 10000000})
    bad = {b"not json at all": "Json error", b'{"transaction_id": "t", "amount": "lots"}': "amount",
           b"x" * (2 * 1024 * 1024): "Json error", b"": "empty", None: "tombstone"}
    for i in range(1000):
        producer.produce("raw", key=b"good", value=json.dumps({"transaction_id": f"g{i}", "amount": i}).encode())
    for value in bad:
        producer.produce("raw", key=b"bad", value=value)
    producer.flush()
    del producer
    dlq = os.path.join(env.work, "dlq.yaml")
    port = free_port()
    with open(dlq, "w") as f:
        f.write(f"""apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: dead-letters}}
spec:
  sources:
    - name: records
      kafka: {{bootstrapServers: "{env.bootstrap}", topic: raw, startingOffsets: earliest}}
      schema: [{{name: transaction_id, type: string}}, {{name: amount, type: double}}]
      deadLetter: {{kafka: {{topic: dead}}}}
  query: SELECT transaction_id, amount, topic, partition, "offset" FROM records
  sink: {env.kafka_sink("clean")}
  checkpoint: {{location: "{env.work}/dlq-checkpoint"}}
""")
    p = env.start(dlq, args=("--http-port", str(port), "--http-address", "127.0.0.1"))
    counted = 0
    deadline = time.time() + 120
    while time.time() < deadline:
        reports = get_json(port, "/progress") or []
        counted = sum(r["sources"][0].get("numDeadLetterRecords", 0) for r in reports)
        if sum(r["numInputRows"] for r in reports) >= 1000:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    letters = env.read_topic("dead")
    good = env.read_topic("clean")
    reasons = {}
    for m in letters:
        headers = {k: v.decode() for k, v in (m.headers() or [])}
        if headers.get("sluice.source.topic") != "raw" or "sluice.source.offset" not in headers:
            fail(f"a dead letter without its origin: {headers}")
        reasons[m.value()] = headers["sluice.error"]
    for value, reason in bad.items():
        got = reasons.get(value if value is not None else None)
        if got is None or reason not in got:
            fail(f"the dead letter of {str(value)[:40]!r} says {got!r}, expected {reason!r}")
    if len(letters) != len(bad) or counted != len(bad) or len(good) != 1000:
        fail(f"{len(letters)} dead letters, {counted} counted in /progress, {len(good)} good rows")
    ok(f"{len(bad)} malformed records (bad JSON, a wrong type, a 2 MB value, an empty value, a tombstone) "
       f"in the dead-letter topic with their reason and origin, {counted} counted; 1000 rows written")

    # 7. The broker killed and down for 30 s in the middle of a run.
    port = free_port()
    # NB: the broker is killed (SIGKILL), not stopped cleanly: a clean
    # shutdown takes seconds, and since Kafka batches lost their 100 ms flush
    # wait the whole run (~10 s) could end before the broker was down.
    outage = env.spec("outage", env.kafka_source("transactions", 20000), env.kafka_sink("alerts-outage"),
                      "  trigger: {availableNow: true}\n")
    p = env.start(outage, args=("--http-port", str(port), "--http-address", "127.0.0.1"))
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = get_json(port, "/progress/latest")
        if latest and latest["batchId"] >= 3:
            break
        time.sleep(0.2)
    sh(f"kafka_kill {env.broker_dir}")
    down = time.time()
    said = None
    last_status = None
    # NB: down for 30 s at least, and until /status said so (a call blocked
    # in librdkafka notices within CALL_TIMEOUT, later on a loaded machine).
    # Between restarts /status names the error; while a new run is blocked
    # in a call it says what the run does with the error it restarted
    # after, until a batch completes.
    while time.time() - down < 30 or (said is None and time.time() - down < 120):
        status = get_json(port, "/status")
        if status:
            last_status = status["message"]
        if status and "unavailable" in status["message"]:
            said = status["message"]
        # DEBUG_STACKS=1: every thread's stack when the run has not noticed
        # in 45 s (how the blocking consumer drop was found).
        if os.environ.get("DEBUG_STACKS") and said is None and 45 < time.time() - down < 46:
            sh(f"gdb -p {p.pid} -batch -ex 'thread apply all bt 25' > /tmp/outage-stacks.txt 2>&1 || true")
        time.sleep(0.5)
    down_for = time.time() - down
    restarts = restarts_total(port)
    sh(f"KAFKA_DETACH=1 kafka_restart {env.broker_dir}")
    if p.wait(timeout=900) != 0:
        fail("the run failed after the outage:\n" + open(outage + ".log").read()[-3000:])
    log = open(outage + ".log").read()
    if said:
        if not restarts or "unavailable" not in log:
            fail(f"/status said {said!r} but sluice_query_restarts_total is {restarts} and the log "
                 f"says 'unavailable': {'unavailable' in log}")
        ok(f"broker killed and down for {down_for:.0f} s: /status said {last_status[:160]!r} at the end, "
           f"sluice_query_restarts_total {restarts:.0f}")
    else:
        # Seen in CI before the fix (2026-11-22 in "Getting offsets from the
        # sources", 2026-12-07 in "Processing new data"): the run had failed
        # within seconds, but dropping it dropped its Kafka consumer, which
        # closes itself and waited for the coordinator through the outage;
        # the status stayed at the run's last step. DEBUG_STACKS=1 shows
        # where a run sits.
        told = [line for line in log.splitlines()
                if " DEBUG " not in line and "Batch completed" not in line]
        fail(f"the run did not notice the {down_for:.0f} s outage (/status: {last_status!r}, "
             f"restarts {restarts}); its log but batches:\n" + "\n".join(told[-40:]))
    same(env, "alerts-outage", expected, "after the broker came back")

    growing(env)


def growing(env):
    """8. Partitions added while the query runs."""
    env.topic("growing", 1)
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for i in range(100):
        producer.produce("growing", value=json.dumps({"transaction_id": f"a{i}", "amount": i}).encode())
    producer.flush()
    growing = os.path.join(env.work, "growing.yaml")
    out = os.path.join(env.work, "growing-out")
    with open(growing, "w") as f:
        f.write(f"""apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: growing}}
spec:
  sources:
    - name: records
      kafka: {{bootstrapServers: "{env.bootstrap}", topic: growing, startingOffsets: earliest}}
      schema: [{{name: transaction_id, type: string}}, {{name: amount, type: double}}]
  query: SELECT transaction_id, partition FROM records
  sink: {{files: {{path: "{out}"}}}}
  checkpoint: {{location: "{env.work}/growing-checkpoint"}}
  trigger: {{processingTime: 500ms}}
""")
    p = env.start(growing)
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(os.path.join(out, "_sluice_metadata", "0")):
        time.sleep(0.2)
    sh(f"source {env.broker_dir}/kafka.env; kafka_java org.apache.kafka.tools.TopicCommand "
       f"--bootstrap-server {env.bootstrap} --alter --topic growing --partitions 3")
    del producer
    producer = Producer({"bootstrap.servers": env.bootstrap})
    deadline = time.time() + 30
    while len(producer.list_topics("growing", timeout=10).topics["growing"].partitions) < 3:
        if time.time() > deadline:
            fail("the topic never showed its 3 partitions")
        time.sleep(0.5)
    for i in range(99):
        producer.produce("growing", value=json.dumps({"transaction_id": f"b{i}", "amount": i}).encode(),
                         partition=i % 3)
    producer.flush()
    del producer
    rows = []
    deadline = time.time() + 120
    while time.time() < deadline and len(rows) < 199:
        time.sleep(0.5)
        rows = rows_of_files(out) if os.path.isdir(os.path.join(out, "_sluice_metadata")) else []
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    partitions = sorted({dict(r.exact)["partition"] for r in rows})
    if len(rows) != 199 or partitions != [0, 1, 2]:
        fail(f"after adding partitions: {len(rows)} rows from partitions {partitions}, expected 199 from [0, 1, 2]")
    ok("partitions added to the topic while the query ran: read from their first record")


if __name__ == "__main__":
    main()
