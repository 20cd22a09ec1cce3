"""The driver of bench/latency.sh: Kafka -> Kafka end-to-end latency of a
stateless query, Sluice against Apache Spark, on one real broker.

For each engine in turn: the engine is started on its own input and output
topics (4 partitions each) and warmed up; a producer writes RATE JSON events
a second for WARMUP + SECONDS seconds, each carrying the wall-clock time it
was handed to the producer (`produced_ms`); a `read_committed` consumer on
the output topic records, for every result, the time it became readable
minus its event's `produced_ms`. That is the latency a downstream consumer
sees: the producer's batching, the engine's trigger, read, query, write and
commit. Events produced during the warm-up are left out. Prints p50, p90,
p99 and the maximum for each engine, and Spark's over Sluice's.

  python3 bench/latency.py --bootstrap HOST:PORT --sluice BIN --work DIR \
      [--rate 10000] [--seconds 60] [--warmup 10] [--engines sluice,spark]
"""

import argparse
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
  query: SELECT id, user_id, amount * 100 AS cents, produced_ms FROM events WHERE amount >= 0
  sink: {{kafka: {{bootstrapServers: "{bootstrap}", topic: {output}{sink_options}}}}}
  checkpoint: {{location: "{work}/latency-checkpoint"}}
  trigger: {{processingTime: 0s}}
"""


def percentile(values, q):
    """The q-th percentile (0..100) of sorted `values`, nearest rank."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, int(round(q / 100 * len(values) + 0.5)) - 1))
    return values[rank]


class Collector(threading.Thread):
    """Reads the output topic read_committed; keeps (id, latency ms)."""

    def __init__(self, bootstrap, topic):
        super().__init__(daemon=True)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"latency-{topic}",
                                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.consumer.subscribe([topic])
        self.latencies = {}
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
            self.latencies.setdefault(row["id"], now - row["produced_ms"])
        self.consumer.close()


def produce(bootstrap, topic, rate, seconds, first_id):
    """Writes `rate` events a second for `seconds`, in 1 ms-granular steps;
    returns the ids written and the id where measured events start."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
    start = time.time()
    n = first_id
    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            break
        due = first_id + int(elapsed * rate)
        while n < due:
            event = {"id": n, "user_id": f"u{n % 1000}", "amount": (n % 997) / 10,
                     "produced_ms": time.time() * 1000}
            producer.produce(topic, json.dumps(event).encode(), key=str(n % 1000).encode())
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
            f.write(SLUICE_SPEC.format(bootstrap=args.bootstrap, input=input_topic, output=output_topic,
                                       work=args.work, sink_options=options))
        env = dict(os.environ, SLUICE_STATE_DIR=os.path.join(args.work, "sluice-state"),
                   SLUICE_HTTP_PORT=str(args.http_port), SLUICE_HTTP_ADDRESS="127.0.0.1")
        return subprocess.Popen([args.sluice, "run", spec], stdout=log, stderr=log, env=env)
    return subprocess.Popen([sys.executable, os.path.join(HERE, "spark_latency.py"), "--bootstrap",
                             args.bootstrap, "--input", input_topic, "--output", output_topic,
                             "--checkpoint", os.path.join(args.work, "spark-checkpoint")],
                            stdout=log, stderr=log)


def measure(engine, args):
    input_topic, output_topic = f"latency-in-{engine}", f"latency-out-{engine}"
    collector = Collector(args.bootstrap, output_topic)
    collector.start()
    proc = start_engine(engine, args, input_topic, output_topic)
    # Warm up until results come out: the engine started, its consumer
    # joined and its first batches (and Spark's code generation) ran.
    warm = produce(args.bootstrap, input_topic, 100, 1, 0)
    deadline = time.time() + 180
    while len(collector.latencies) < warm:
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"{engine} produced no results (exit {proc.poll()}): see {args.work}/{engine}.log")
        time.sleep(0.2)
    first = produce(args.bootstrap, input_topic, args.rate, args.warmup, warm)
    last = produce(args.bootstrap, input_topic, args.rate, args.seconds, first)
    deadline = time.time() + 120
    while len(collector.latencies) < last and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    phases = sluice_phases(args.http_port) if engine == "sluice" else {}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    collector.stop.set()
    collector.join()
    missing = [i for i in range(first, last) if i not in collector.latencies]
    if missing:
        sys.exit(f"{engine}: {len(missing)} of {last - first} measured events have no result "
                 f"(first {missing[:5]}): see {args.work}/{engine}.log")
    values = sorted(collector.latencies[i] for i in range(first, last))
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
    parser.add_argument("--sink-options", default="",
                        help="librdkafka settings for Sluice's sink, k=v,k=v (to try settings)")
    args = parser.parse_args()
    args.http_port = free_port()

    results = [measure(engine, args) for engine in args.engines.split(",")]
    print(f"\nKafka -> Kafka latency, stateless query, {args.rate} events/s for {args.seconds:.0f} s "
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
    with open(os.path.join(args.work, "latency.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
