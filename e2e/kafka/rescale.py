"""Scale-out and rescales, exactly once, against a real Apache Kafka broker
(started by e2e/rescale.sh). Each check prints `ok   ...` or fails loudly.

A producer writes transactions into a 6-partition topic at a steady rate
while a query runs as replica processes (`sluice run --replica i
--replicas n`), rescaled 1 -> 3 -> 2 during the run: a stateless one (a
filter and a projection, Kafka -> Kafka), then a windowed aggregation keyed
by user (hop 20 s / 10 s, a 5 s watermark, append), whose rows are
repartitioned by key through its internal topic and whose state partitions
move between replicas at each rescale:

1. graceful: the old replicas stop at a batch boundary (SIGTERM), the new
   ones start;
2. killed: every rescale's old replicas are SIGKILLed at random moments, a
   single replica is SIGKILLed and restarted in between, and replica 0 of a
   new generation is SIGKILLed in the middle of its hand-over;
3. zombies: the new replicas start while the old ones still run; the old
   ones must stop by themselves, fenced, having written nothing more;
4. lagging (windowed and keyed): before the 3 -> 2 rescale one replica is
   paused (SIGSTOP) for 20 s, 30 s of event time behind the others, while
   the producer goes on writing: each new replica gains partitions that
   stand far apart in event time and reads them in proportion to their
   backlogs; the records of the lagging ones must not be dropped as late.

Each time, the output topic (read_committed) holds exactly the rows one
replica writes from the same topic (a one-replica availableNow run on a new
checkpoint), each once, and for the stateless query exactly the rows the
filter keeps of what was produced. The hand-over's duration (settling the
old generation) and the time to the new generation's first batch are
printed from /metrics, and what older generations left and no state
version needs is deleted (their fences kept). The windowed query runs twice: over a topic keyed
by user with the default (librdkafka) partitioner, in two stages through
the repartition topic, and over a topic a murmur2 producer keyed by user
with `keyedBy: user_id` (`--kind keyed`), in one stage, no repartition
topic. A SELECT DISTINCT (by user and amount band, `--kind distinct`) and
session windows per user (`--kind sessions`) run in two stages as the
GROUP BY does, rescaled gracefully and with SIGKILLs. Also: complete mode
on 2 replicas is refused, naming spec.outputMode.
"""

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from confluent_kafka import Producer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
from e2e import Env, env_arguments, free_port  # noqa: E402
from results import Row, compare, fail, ok  # noqa: E402

PARTITIONS = 6
QUERY = "SELECT transaction_id, user_id, amount FROM transactions WHERE amount > 40"
# Keyed by user, not by the input's key: the rows are repartitioned by key
# through the query's internal topic (statePartitions: 4).
WINDOWED = """SELECT window_start, window_end, user_id,
           count(*) AS n, sum(amount) AS total, avg(amount) AS avg_amount
    FROM hop(transactions, event_time, INTERVAL '10' SECOND, INTERVAL '20' SECOND)
    GROUP BY window_start, window_end, user_id
    HAVING count(*) >= 2"""
# A deduplication by user and amount band, not by the input's key:
# repartitioned by key through the query's internal topic, as GROUP BY is.
DISTINCT = """SELECT DISTINCT user_id, CAST(floor(amount / 25) AS BIGINT) AS band
    FROM transactions"""
# Session windows per user (a 1 s gap: about one event in eight starts a
# new session), repartitioned by user through the internal topic.
SESSIONS = """SELECT window_start, window_end, user_id, count(*) AS n, sum(amount) AS total
    FROM session(transactions, event_time, INTERVAL '1' SECOND)
    GROUP BY window_start, window_end, user_id"""
EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def spec(env, name, source_topic, sink_topic, extra="", kind="stateless", per_trigger=2000):
    if kind == "windowed":
        return env.spec(name, env.kafka_source(source_topic, per_trigger), env.kafka_sink(sink_topic),
                        extra, query=WINDOWED, watermark="{column: event_time, delay: 5s}")
    if kind == "distinct":
        return env.spec(name, env.kafka_source(source_topic, per_trigger), env.kafka_sink(sink_topic),
                        extra, query=DISTINCT, watermark=None)
    if kind == "sessions":
        return env.spec(name, env.kafka_source(source_topic, per_trigger), env.kafka_sink(sink_topic),
                        extra, query=SESSIONS, watermark="{column: event_time, delay: 5s}")
    if kind == "keyed":
        # The topic is keyed by user (murmur2, as the Java client): no
        # repartition topic; state partition p is topic partition p.
        source = env.kafka_source(source_topic, per_trigger)[:-1] + ", keyedBy: user_id}"
        path = env.spec(name, source, env.kafka_sink(sink_topic), extra, query=WINDOWED,
                        watermark="{column: event_time, delay: 5s}")
        with open(path) as f:
            text = f.read().replace("statePartitions: 4", f"statePartitions: {PARTITIONS}")
        with open(path, "w") as f:
            f.write(text)
        return path
    return env.spec(name, env.kafka_source(source_topic, per_trigger), env.kafka_sink(sink_topic),
                    extra, query=QUERY, watermark=None)


def record(i, rnd):
    """Record i: a millisecond of event time after the one before."""
    user = f"user-{rnd.randrange(500):04d}"
    at = EPOCH + datetime.timedelta(milliseconds=i)
    return user, {"transaction_id": f"tx-{i:08d}", "user_id": user,
                  "amount": round(rnd.lognormvariate(3.5, 1.0), 2),
                  "event_time": at.isoformat().replace("+00:00", "Z")}


class Feed(threading.Thread):
    """Produces `total` records at `rate` a second into `topic`."""

    def __init__(self, env, topic, total, rate, seed, partitioner="consistent_random"):
        super().__init__(daemon=True)
        self.env, self.topic, self.total, self.rate = env, topic, total, rate
        self.partitioner = partitioner
        self.rnd = random.Random(seed)
        self.expected = []
        self.error = None

    def run(self):
        try:
            producer = Producer({"bootstrap.servers": self.env.bootstrap, "linger.ms": 5,
                                 "partitioner": self.partitioner})
            start = time.time()
            for i in range(self.total):
                key, row = record(i, self.rnd)
                if row["amount"] > 40:
                    self.expected.append(Row({k: row[k] for k in ("transaction_id", "user_id", "amount")}))
                producer.produce(self.topic, key=key.encode(), value=json.dumps(row).encode())
                if i % 100 == 99:
                    producer.poll(0)
                    ahead = (i + 1) / self.rate - (time.time() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            producer.flush()
        except Exception as e:  # noqa: BLE001
            self.error = e


class Replicas:
    """The replica processes of one query."""

    def __init__(self, env, path):
        self.env, self.path = env, path
        self.procs = {}
        self.ports = {}
        self.retired = []

    def start(self, index, count):
        port = free_port()
        p = self.env.start(self.path, extra_env={"SLUICE_STATE_DIR": f"{self.path}.state-{index}"},
                           args=("--replica", str(index), "--replicas", str(count),
                                 "--http-port", str(port)))
        self.procs[index], self.ports[index] = p, port
        return p

    def start_all(self, count):
        for i in range(count):
            self.start(i, count)

    def signal_all(self, sig):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(sig)

    def stop_all(self, sig=signal.SIGTERM, timeout=120):
        self.signal_all(sig)
        for i, p in self.procs.items():
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                fail(f"replica {i} did not stop within {timeout} s after {sig!r}")
            if sig == signal.SIGTERM and p.returncode != 0:
                fail(f"replica {i} exited {p.returncode}:\n" + open(self.path + ".log").read()[-3000:])
        self.procs, self.ports = {}, {}

    def retire(self):
        """Leaves the running replicas running (zombies), untracked."""
        self.retired.extend(self.procs.values())
        self.procs, self.ports = {}, {}

    def check_alive(self):
        for i, p in self.procs.items():
            if p.poll() is not None:
                fail(f"replica {i} exited {p.returncode}:\n" + open(self.path + ".log").read()[-3000:])

    def metric(self, index, name):
        port = self.ports.get(index)
        if port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except Exception:  # noqa: BLE001
            return None
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_first_batches(self, timeout=120):
        """Waits until every replica committed a batch after joining; returns
        replica 0's hand-over and the slowest first batch, in seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            firsts = [self.metric(i, 'sluice_rescale_seconds{phase="first_batch"') for i in self.procs]
            if all(f is not None for f in firsts):
                # As the assignment says: a hand-over killed midway is
                # finished by the next run of replica 0.
                assignments = self.path.replace(".yaml", "-checkpoint/assignments")
                newest = max(os.listdir(assignments), key=int)
                with open(os.path.join(assignments, newest)) as f:
                    handover = json.load(f)["handoverMs"] / 1000
                return handover, max(firsts)
            time.sleep(0.5)
        fail(f"the {len(self.procs)} replicas did not all commit a batch within {timeout} s")


def leftovers(checkpoint):
    """Files older generations left that the newest does not need: under
    replicas/g<k>/ (k two or more older) outside the locations the newest assignment
    names for state, and the checkpoint's own state/ once none names it;
    epochs/ and metadata stay (they fence old replicas)."""
    assignments = os.path.join(checkpoint, "assignments")
    newest_g = max(int(g) for g in os.listdir(assignments))
    with open(os.path.join(assignments, str(newest_g))) as f:
        newest = json.load(f)
    named = [os.path.normpath(at["location"]) for at in newest.get("state", []) if at]
    found = []
    for dirpath, _, files in os.walk(checkpoint):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, checkpoint)
            parts = rel.split(os.sep)
            if "epochs" in parts or name == "metadata":
                continue
            if any(path.startswith(n + os.sep) for n in named):
                continue
            old_generation = (parts[0] == "replicas" and int(parts[1][1:]) + 1 < newest_g)
            own_state = parts[0] == "state" and os.path.normpath(checkpoint) not in named
            if old_generation or (own_state and newest_g >= 2):
                found.append(rel)
    return found


def wait_cleaned(checkpoint, what, timeout=60):
    deadline = time.time() + timeout
    while (left := leftovers(checkpoint)) and time.time() < deadline:
        time.sleep(1)
    if left:
        fail(f"{what}: {len(left)} files older generations left are still there {timeout} s on, "
             f"e.g. {left[:5]}")


def output_rows(env, topic):
    return [Row(json.loads(m.value())) for m in env.read_topic(topic)]


def wait_for_output(env, topic, count, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = output_rows(env, topic)
        if len(rows) >= count:
            return
        time.sleep(2)
    fail(f"{topic} holds {len(rows)} rows after {timeout} s; {count} expected")


def scenario(env, name, mode, total, rate, seed, kind="stateless"):
    source, sink = f"{name}-in", f"{name}-out"
    env.topic(source, PARTITIONS)
    env.topic(sink, 3)
    # Lagging: small batches, so that a new replica takes many to catch up
    # a lagging partition while its peers run batches too.
    path = spec(env, name, source, sink, kind=kind, per_trigger=300 if mode == "lagging" else 2000)
    # librdkafka's murmur2_random is the Java client's default partitioner.
    feed = Feed(env, source, total, rate, seed,
                partitioner="murmur2_random" if kind == "keyed" else "consistent_random")
    feed.start()
    rnd = random.Random(seed)
    replicas = Replicas(env, path)
    timings = []
    replicas.start_all(1)
    time.sleep(6)
    for count in (3, 2):
        if mode == "graceful":
            replicas.stop_all(signal.SIGTERM)
            replicas.start_all(count)
        elif mode == "killed":
            time.sleep(rnd.uniform(0, 2))
            replicas.stop_all(signal.SIGKILL)
            replicas.start_all(count)
            # Replica 0 killed in the middle of its hand-over, restarted.
            time.sleep(rnd.uniform(0.2, 1.5))
            replicas.procs[0].send_signal(signal.SIGKILL)
            replicas.procs[0].wait()
            replicas.start(0, count)
        elif mode == "lagging":
            # One replica paused until it is far more than the watermark's
            # delay behind the others, then all rescaled: each new replica
            # gains partitions that stand at event times far apart.
            if len(replicas.procs) > 1:
                laggard = replicas.procs[1]
                laggard.send_signal(signal.SIGSTOP)
                time.sleep(20)
                laggard.send_signal(signal.SIGCONT)
            replicas.stop_all(signal.SIGTERM)
            replicas.start_all(count)
        else:  # zombies
            replicas.retire()
            replicas.start_all(count)
        timings.append((count,) + replicas.wait_first_batches())
        if mode == "killed":
            # One replica killed mid-run and restarted.
            victim = rnd.randrange(count)
            time.sleep(rnd.uniform(1, 4))
            replicas.procs[victim].send_signal(signal.SIGKILL)
            replicas.procs[victim].wait()
            replicas.start(victim, count)
        time.sleep(8)
    if mode == "zombies":
        for p in replicas.retired:
            try:
                code = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                fail("a replica of an older generation still runs 120 s after the new one started")
            if code == 0:
                fail("a replica of an older generation exited 0: it should have been fenced")
        if "fenced" not in open(path + ".log").read().lower():
            fail("the older generation's replicas stopped without saying they were fenced")
    feed.join()
    if feed.error:
        fail(f"the producer failed: {feed.error}")
    if kind != "stateless":
        flush(env, source, total, feed.partitioner)
    # The one-replica run over the same input.
    reference = spec(env, f"{name}-one", source, f"{name}-one-out", "  trigger: {availableNow: true}\n",
                     kind=kind)
    env.topic(f"{name}-one-out", 3)
    env.run(reference)
    one = output_rows(env, f"{name}-one-out")
    expected = feed.expected if kind == "stateless" else one
    if not expected:
        fail(f"{kind} {mode}: one replica wrote no row: nothing to compare")
    wait_for_output(env, sink, len(expected))
    replicas.check_alive()
    wait_cleaned(path.replace(".yaml", "-checkpoint"), f"{kind} {mode}")
    replicas.stop_all(signal.SIGTERM)
    actual = output_rows(env, sink)
    if kind == "stateless":
        compare(actual, feed.expected, f"{mode}: the output of 1 -> 3 -> 2 replicas", where="Kafka")
    compare(actual, one, f"{kind} {mode}: against one replica", where="Kafka")
    if kind != "stateless":
        assignments = path.replace(".yaml", "-checkpoint/assignments")
        with open(os.path.join(assignments, max(os.listdir(assignments), key=int))) as f:
            newest = json.load(f)
    if kind in ("windowed", "distinct", "sessions") and not newest.get("stages"):
        fail(f"{kind} {mode}: the newest generation does not run in two stages: {newest}")
    if kind == "keyed":
        if not newest.get("keyed") or newest.get("stages"):
            fail(f"keyed {mode}: the newest generation is not keyed in one stage: {newest}")
        topics = Producer({"bootstrap.servers": env.bootstrap}).list_topics(timeout=10).topics
        if f"sluice-{name}-repartition" in topics:
            fail(f"keyed {mode}: a repartition topic was created for a keyed input")
    steps = ", ".join(f"to {c}: hand-over {h:.1f} s, first batch {f:.1f} s" for c, h, f in timings)
    ok(f"{kind} {mode}: {total} records at {rate}/s, 1 -> 3 -> 2 replicas, {len(actual)} rows each once, "
       f"equal to one replica's ({steps})")


def flush(env, topic, after, partitioner):
    """A record a minute of event time after the feed's last in every
    partition of `topic`: the watermark then passes every window and
    session of the feed's, on any number of replicas. Without it the runs
    end at different watermarks: one replica's is the largest event time
    read minus the delay, several replicas' the smallest over them, a few
    milliseconds lower, and a session ending in between is closed by one
    and not the other."""
    at = EPOCH + datetime.timedelta(milliseconds=after + 60_000)
    hit = set()
    producer = Producer({"bootstrap.servers": env.bootstrap, "partitioner": partitioner})
    for i in range(60):
        user = f"flush-{i:02d}"
        row = {"transaction_id": f"flush-{i:02d}", "user_id": user, "amount": 1.0,
               "event_time": at.isoformat().replace("+00:00", "Z")}
        producer.produce(topic, key=user.encode(), value=json.dumps(row).encode(),
                         on_delivery=lambda err, msg: hit.add(msg.partition()) if err is None else None)
    producer.flush()
    if len(hit) < PARTITIONS:
        fail(f"the flush records reached partitions {sorted(hit)} of {PARTITIONS} only")


def more_replicas_than_partitions(env):
    """3 replicas of the windowed query over a 2-partition topic: the third
    reads nothing, and neither fails nor holds the watermark back."""
    env.topic("few-in", 2)
    env.topic("few-out", 3)
    path = spec(env, "few", "few-in", "few-out", kind="windowed")
    feed = Feed(env, "few-in", 30000, 1500, seed=11)
    feed.start()
    replicas = Replicas(env, path)
    replicas.start_all(3)
    feed.join()
    if feed.error:
        fail(f"the producer failed: {feed.error}")
    reference = spec(env, "few-one", "few-in", "few-one-out", "  trigger: {availableNow: true}\n",
                     kind="windowed")
    env.topic("few-one-out", 3)
    env.run(reference)
    one = output_rows(env, "few-one-out")
    wait_for_output(env, "few-out", len(one), timeout=120)
    replicas.check_alive()
    replicas.stop_all(signal.SIGTERM)
    compare(output_rows(env, "few-out"), one, "3 replicas over 2 partitions", where="Kafka")
    ok(f"windowed, 3 replicas over 2 partitions (one reads nothing): {len(one)} rows, equal to one replica's")


def complete_refused(env):
    """Complete mode on 2 replicas is refused, naming spec.outputMode."""
    query = "SELECT user_id, count(*) AS n FROM transactions GROUP BY user_id"
    path = env.spec("complete", env.kafka_source("scale-graceful-in"), env.kafka_sink("complete-out"),
                    "  replicas: 2\n", query=query)
    with open(path) as f:
        text = f.read().replace("outputMode: append", "outputMode: complete")
    with open(path, "w") as f:
        f.write(text)
    out = subprocess.run([env.sluice, "validate", path], capture_output=True, text=True)
    if out.returncode == 0 or "spec.outputMode" not in out.stderr:
        fail(f"complete mode on 2 replicas was not refused naming spec.outputMode: {out.stderr}")
    ok("complete mode on 2 replicas is refused: " + out.stderr.strip().splitlines()[-1].strip())


# Each query's topic prefix and the rescales it goes through: lagging only
# where a watermark can make rows late; zombies where fencing differs (one
# stage, two stages, keyed).
KINDS = {
    "stateless": ("scale", ("graceful", "killed", "zombies")),
    "windowed": ("keyed", ("graceful", "killed", "zombies", "lagging")),
    "keyed": ("bykey", ("graceful", "killed", "zombies", "lagging")),
    "distinct": ("dedup", ("graceful", "killed")),
    "sessions": ("sessions", ("graceful", "killed")),
}


def main():
    parser = env_arguments()
    parser.add_argument("--records", type=int, default=60000)
    parser.add_argument("--rate", type=int, default=1500)
    parser.add_argument("--only", choices=["graceful", "killed", "zombies", "lagging"])
    parser.add_argument("--kind", choices=list(KINDS))
    args = parser.parse_args()
    env = Env(args)
    for kind, (prefix, modes) in KINDS.items():
        if args.kind not in (None, kind):
            continue
        for seed, mode in enumerate(("graceful", "killed", "zombies", "lagging")):
            if mode not in modes:
                continue
            if args.only in (None, mode):
                name = f"{prefix}-{mode}"
                # Lagging: the producer still writes well after the last
                # rescale, so that the new replicas read their partitions
                # in proportion to backlogs that stand far apart.
                total = args.records * 2 if mode == "lagging" else args.records
                scenario(env, name, mode, total, args.rate, seed, kind=kind)
    if args.kind in (None, "windowed") and args.only is None:
        more_replicas_than_partitions(env)
    complete_refused(env)


if __name__ == "__main__":
    main()
