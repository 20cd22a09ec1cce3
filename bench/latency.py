"""The driver of bench/latency.sh: Kafka -> Kafka end-to-end latency of a
query, Sluice against Apache Spark, on one real broker.

For each engine in turn: the engine is started on its own input and output
topics (4 partitions each) and warmed up; a producer writes RATE JSON events
a second for WARMUP + SECONDS seconds, each carrying the wall-clock time it
was handed to the producer (`produced_ms`); a `read_committed` consumer on
the output topic records, for every result, the time it became readable
minus its event's `produced_ms`. That is the latency a downstream consumer
sees: the producer's batching, the engine's trigger, read, query, write and
commit. Events produced during the warm-up are left out. Prints p50, p90,
p99 and the maximum for each engine, and Spark's over Sluice's.

Two queries (--query):
- `stateless`: a filter and a projection; every event gives one result.
- `windowed`: the fraud query's aggregation (bench/kafka.sh: hop windows of
  5 minutes every minute by user, count, sum and avg, a 10-minute
  watermark on the event time) in update mode, without its HAVING so that
  every event changes a result, plus `max(id) AS last_id`. An event's
  latency is until the first result of its user with `last_id` at or past
  its id is readable: its user's events are keyed to one partition, so
  they are read in id order, and the batch that read it emitted that row.
  Spark uses its default state store, kept in memory between batches.

  python3 bench/latency.py --bootstrap HOST:PORT --sluice BIN --work DIR \
      [--query stateless|windowed] [--rate 10000] [--seconds 60] [--warmup 10] \
      [--users 1000] [--engines sluice,spark]
"""

import argparse
import bisect
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from confluent_kafka import Consumer, Producer

HERE = os.path.dirname(os.path.abspath(__file__))

SLUICE_SPEC = """apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: latency}}
spec:
  sources:
    - name: events
      kafka: {{bootstrapServers: "{bootstrap}", topic: {input}, startingOffsets: earliest}}
      format: json
      schema:
        - {{name: id, type: long}}
        - {{name: user_id, type: string}}
        - {{name: amount, type: double}}
        - {{name: produced_ms, type: double}}
        - {{name: event_time, type: timestamp}}
      watermark: {{column: event_time, delay: 10m}}
  query: {query}
  sink: {{kafka: {{bootstrapServers: "{bootstrap}", topic: {output}{sink_options}}}}}
  outputMode: {mode}
  checkpoint: {{location: "{work}/latency-checkpoint"}}
  trigger: {{processingTime: 0s}}
"""

# Keep in step with bench/spark_latency.py.
QUERIES = {
    "stateless": ("append", "SELECT id, user_id, amount * 100 AS cents, produced_ms FROM events WHERE amount >= 0"),
    "windowed": ("update", "|\n    SELECT window_start, window_end, user_id, count(*) AS n, sum(amount) AS total,\n"
                 "           avg(amount) AS avg_amount, max(id) AS last_id\n"
                 "    FROM hop(events, event_time, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)\n"
                 "    GROUP BY window_start, window_end, user_id"),
}


def percentile(values, q):
    """The q-th percentile (0..100) of sorted `values`, nearest rank."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, int(round(q / 100 * len(values) + 0.5)) - 1))
    return values[rank]


class Collector(threading.Thread):
    """Reads the output topic read_committed. For the stateless query keeps
    each event's latency by id; for the windowed one, each user's results
    as (readable ms, last_id), in the order they became readable."""

    def __init__(self, bootstrap, topic, windowed):
        super().__init__(daemon=True)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"latency-{topic}",
                                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.consumer.subscribe([topic])
        self.windowed = windowed
        self.latencies = {}
        self.results = {}
        self.stop = threading.Event()

    def run(self):
        # NB: poll, one message at a time: `consume(n, timeout)` returns
        # only when n messages are there or the timeout passed, which would
        # add up to the timeout to every measure.
        while not self.stop.is_set():
            m = self.consumer.poll(0.1)
            if m is None or m.error():
                continue
            now = time.time() * 1000
            row = json.loads(m.value())
            if self.windowed:
                self.results.setdefault(row["user_id"], []).append((now, row["last_id"]))
            else:
                self.latencies.setdefault(row["id"], now - row["produced_ms"])
        self.consumer.close()

    def latency(self, ids, produced, users):
        """Each of `ids`' latency in ms (None: no result yet)."""
        if not self.windowed:
            return {i: self.latencies.get(i) for i in ids}
        reach = {}
        for user, rows in list(self.results.items()):
            rows = list(rows)
            highest, times = [], []
            for at, last_id in rows:
                if not highest or last_id > highest[-1]:
                    highest.append(last_id)
                    times.append(at)
            reach[user] = (highest, times)
        out = {}
        for i in ids:
            highest, times = reach.get(f"u{i % users}", ([], []))
            k = bisect.bisect_left(highest, i)
            out[i] = times[k] - produced[i] if k < len(highest) else None
        return out


def produce(bootstrap, topic, rate, seconds, first_id, users, produced):
    """Writes `rate` events a second for `seconds`, in 1 ms-granular steps,
    keeping when each was produced in `produced`; returns the next id."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
    start = time.time()
    n = first_id
    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            break
        due = first_id + int(elapsed * rate)
        while n < due:
            now = time.time()
            event = {"id": n, "user_id": f"u{n % users}", "amount": (n % 997) / 10, "produced_ms": now * 1000,
                     "event_time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                     .isoformat(timespec="milliseconds").replace("+00:00", "Z")}
            produced[n] = now * 1000
            producer.produce(topic, json.dumps(event).encode(), key=str(n % users).encode())
            n += 1
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(30)
    return n


def start_engine(engine, args, input_topic, output_topic):
    log = open(os.path.join(args.work, f"{engine}.log"), "w")
    if engine == "sluice":
        options = ""
        if args.sink_options:
            pairs = ", ".join(f'"{k}": "{v}"' for k, v in
                              (o.split("=", 1) for o in args.sink_options.split(",")))
            options = f", options: {{{pairs}}}"
        spec = os.path.join(args.work, "latency.yaml")
        with open(spec, "w") as f:
            mode, query = QUERIES[args.query]
            f.write(SLUICE_SPEC.format(bootstrap=args.bootstrap, input=input_topic, output=output_topic,
                                       work=args.work, sink_options=options, mode=mode, query=query))
        env = dict(os.environ, SLUICE_STATE_DIR=os.path.join(args.work, "sluice-state"),
                   SLUICE_HTTP_PORT=str(args.http_port), SLUICE_HTTP_ADDRESS="127.0.0.1")
        return subprocess.Popen([args.sluice, "run", spec], stdout=log, stderr=log, env=env)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "spark_latency.py"), "--bootstrap",
                             args.bootstrap, "--input", input_topic, "--output", output_topic,
                             "--query", args.query, "--checkpoint", os.path.join(args.work, "spark-checkpoint")],
                            stdout=log, stderr=log)


def measure(engine, args):
    input_topic, output_topic = f"latency-in-{engine}", f"latency-out-{engine}"
    collector = Collector(args.bootstrap, output_topic, args.query == "windowed")
    collector.start()
    proc = start_engine(engine, args, input_topic, output_topic)
    produced = {}

    def waiting(ids):
        return sum(1 for v in collector.latency(ids, produced, args.users).values() if v is None)

    # Warm up until results come out: the engine started, its consumer
    # joined and its first batches (and Spark's code generation) ran.
    warm = produce(args.bootstrap, input_topic, 100, 1, 0, args.users, produced)
    deadline = time.time() + 180
    while waiting(range(warm)):
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"{engine} produced no results (exit {proc.poll()}): see {args.work}/{engine}.log")
        time.sleep(0.2)
    first = produce(args.bootstrap, input_topic, args.rate, args.warmup, warm, args.users, produced)
    last = produce(args.bootstrap, input_topic, args.rate, args.seconds, first, args.users, produced)
    deadline = time.time() + 120
    while waiting(range(last - args.users, last)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    phases = sluice_phases(args.http_port) if engine == "sluice" else {}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    collector.stop.set()
    collector.join()
    latencies = collector.latency(range(first, last), produced, args.users)
    missing = [i for i, v in latencies.items() if v is None]
    if missing:
        sys.exit(f"{engine}: {len(missing)} of {last - first} measured events have no result "
                 f"(first {missing[:5]}): see {args.work}/{engine}.log")
    values = sorted(latencies.values())
    return {"engine": engine, "events": len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": values[-1],
            "phases": phases}


def sluice_phases(port):
    """The median of each phase of Sluice's recent batches (its /progress
    `durationMs`), and their rows: where a batch's time goes."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5) as r:
            reports = [p for p in json.load(r) if p.get("numInputRows", 0) > 0]
    except OSError as e:
        return {"error": str(e)}
    phases = {}
    for report in reports:
        for phase, ms in report.get("durationMs", {}).items():
            phases.setdefault(phase, []).append(ms)
    out = {phase: statistics.median(v) for phase, v in phases.items()}
    out["rows"] = statistics.median(p["numInputRows"] for p in reports) if reports else 0
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--sluice", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--rate", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--engines", default="sluice,spark")
    parser.add_argument("--query", choices=sorted(QUERIES), default="stateless")
    parser.add_argument("--users", type=int, default=None,
                        help="distinct user_id values (default 1000 stateless, 100 windowed: "
                             "each result of the windowed query is 5 windows of a user)")
    parser.add_argument("--sink-options", default="",
                        help="librdkafka settings for Sluice's sink, k=v,k=v (to try settings)")
    args = parser.parse_args()
    if args.users is None:
        args.users = 100 if args.query == "windowed" else 1000
    args.http_port = free_port()

    results = [measure(engine, args) for engine in args.engines.split(",")]
    what = "stateless query" if args.query == "stateless" else \
        f"windowed query (hop 5m/1m by user, update mode, {args.users} users)"
    print(f"\nKafka -> Kafka latency, {what}, {args.rate} events/s for {args.seconds:.0f} s "
          f"(produced -> readable read_committed), {os.cpu_count()} cores")
    print(f"{'engine':<8} {'events':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in results:
        print(f"{r['engine']:<8} {r['events']:>8} {r['p50']:>8.1f} {r['p90']:>8.1f} {r['p99']:>8.1f} "
              f"{r['max']:>8.1f}")
    for r in results:
        if r["phases"]:
            phases = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]))
            print(f"{r['engine']}: a batch's median phases (ms; rows a batch): {phases}")
    by = {r["engine"]: r for r in results}
    if "sluice" in by and "spark" in by:
        print(f"Spark over Sluice: p50 {by['spark']['p50'] / by['sluice']['p50']:.1f}x, "
              f"p99 {by['spark']['p99'] / by['sluice']['p99']:.1f}x")
    with open(os.path.join(args.work, f"latency-{args.query}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
