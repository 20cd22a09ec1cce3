"""The autoscaler end to end on one machine, against a real Apache Kafka
broker (started by bench/autoscale-ramp.sh).

A producer writes transactions into a 6-partition topic at a rate that
ramps up and down over about ten minutes, then stops, then writes a last
burst. A stateless query (Kafka -> Kafka; with `--kind windowed`, the
windowed GROUP BY of rescale.py in two stages; with `--kind keyed`, the same
over a topic keyed by user, `keyedBy`, in one stage) runs as replica processes
(`sluice run --replica i --replicas n`). Every TICK seconds a driver reads
each replica's /progress and runs one step of the operator's autoscaler on
them (`sluice-operator autoscale-step`: the very decision and measurement
the controller runs on Kubernetes); while scaled to zero the step asks the
broker itself. When the decision changes the count, the driver rescales:
SIGTERM to every replica, then the new count started.

Fails unless the idle topic scales to zero, the last burst wakes one
replica, and the output topic (read_committed) holds exactly the rows the
filter keeps of everything produced (windowed: what a one-replica run
writes over the same topic), each once. Reports (without failing)
how the decisions followed the input: the count at the low rate against
the peak's, and whether it ever went down while the input rose. Prints the
timeline as a table and writes it as CSV, and as a PNG plot when
matplotlib is installed, to REPORT_DIR.
"""

import csv
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
from e2e import Env, env_arguments  # noqa: E402
from rescale import Replicas, output_rows, record, spec, wait_for_output  # noqa: E402
from results import Row, compare, fail, ok  # noqa: E402

PARTITIONS = 6
AUTOSCALING = ("  autoscaling: {maxReplicas: 6, catchUpWithin: 1m, "
               "restartTime: 10s, metricWindow: 30s, scaleDownWindow: 60s, scaleToZeroAfter: 20s}\n")
# Records a batch reads at most (per replica). A replica's CPU here is ~1/3
# of a core whatever it reads up to 8,000 records/s (nearly all of it the
# batches' overhead): its CPU would never ask for a second replica on this
# ramp. At ~20 batches a second this caps a replica near 2,000 records/s,
# below the peak: what it processes while it stays behind is its capacity
# (Flink's observed true rate), which the autoscaler plans with.
PER_TRIGGER = 100


def schedule(t, peak):
    """The target input rate at second `t`: 300/s for a minute, up to `peak`
    over three, `peak` for two, down to 300/s over two, 300/s for one, then
    nothing (from 540 s)."""
    low = 300
    if t < 60:
        return low
    if t < 240:
        return low + (peak - low) * (t - 60) / 180
    if t < 360:
        return peak
    if t < 480:
        return peak - (peak - low) * (t - 360) / 120
    if t < 540:
        return low
    return 0


class RampFeed(threading.Thread):
    """Produces at `schedule(t)` a second until 540 s."""

    def __init__(self, env, topic, peak, seed, duration=540, partitioner="consistent_random"):
        super().__init__(daemon=True)
        self.env, self.topic, self.peak, self.duration = env, topic, peak, duration
        self.config = {"bootstrap.servers": env.bootstrap, "linger.ms": 5,
                       "partitioner": partitioner}
        self.rnd = random.Random(seed)
        self.expected = []
        self.produced = 0
        self.error = None
        self.started = time.time()

    def send(self, producer, n):
        for _ in range(n):
            key, row = record(self.produced, self.rnd)
            if row["amount"] > 40:
                self.expected.append(Row({k: row[k] for k in ("transaction_id", "user_id", "amount")}))
            producer.produce(self.topic, key=key.encode(), value=json.dumps(row).encode())
            self.produced += 1
        producer.poll(0)

    def run(self):
        try:
            producer = Producer(self.config)
            owed = 0.0
            while (t := time.time() - self.started) < self.duration:
                owed += schedule(t, self.peak) * 0.05
                whole = int(owed)
                self.send(producer, whole)
                owed -= whole
                time.sleep(max(0.0, 0.05 - (time.time() - self.started - t)))
            producer.flush()
        except Exception as e:  # noqa: BLE001
            self.error = e

    def burst(self, n):
        producer = Producer(self.config)
        self.send(producer, n)
        producer.flush()


def progress(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5) as r:
            return json.load(r)
    except Exception:  # noqa: BLE001
        return None


def step(operator, path, state, work, replicas):
    """One autoscaler step over the running replicas; returns its status."""
    args = [operator, "autoscale-step", "--query", path, "--state", state]
    if replicas.procs:
        reports = [progress(replicas.ports[i]) for i in sorted(replicas.procs)]
        # As the controller: a replica that answers counts, also before its
        # first batch (an idle topic runs none); one that does not answer
        # (still starting) means nothing is measured yet.
        missing = [i for i, r in enumerate(reports) if r is None]
        if missing:
            args += ["--waiting", f"replicas {missing} do not answer yet"]
        else:
            path_reports = os.path.join(work, "reports.json")
            with open(path_reports, "w") as f:
                json.dump(reports, f)
            args += ["--reports", path_reports]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"autoscale-step failed: {out.stderr}")
    return json.loads(out.stdout)


def plot(rows, report_dir):
    """The timeline as CSV, and as a PNG when matplotlib is installed."""
    os.makedirs(report_dir, exist_ok=True)
    csv_path = os.path.join(report_dir, "autoscale-ramp.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return csv_path, None
    t = [r["t"] for r in rows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    top.plot(t, [r["target_rate"] for r in rows], label="producer's target rate")
    top.plot(t, [r["input_rate"] for r in rows], label="measured input rate")
    top.set_ylabel("records/s")
    top.legend()
    middle.plot(t, [r["lag"] for r in rows], color="tab:red")
    middle.set_ylabel("lag (records)")
    bottom.step(t, [r["replicas"] for r in rows], where="post", label="replicas")
    bottom.step(t, [r["recommended"] for r in rows], where="post", linestyle="--", label="recommended")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.suptitle("Sluice autoscaler: a ramp over 6 partitions (bench/autoscale-ramp.sh)")
    png = os.path.join(report_dir, "autoscale-ramp.png")
    fig.savefig(png, dpi=80)
    return csv_path, png


def main():
    parser = env_arguments()
    parser.add_argument("--operator", required=True)
    parser.add_argument("--peak", type=int, default=3000)
    parser.add_argument("--tick", type=float, default=10)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--kind", choices=["stateless", "windowed", "keyed"], default="stateless",
                        help="windowed: the windowed GROUP BY of e2e/kafka/rescale.py, in two "
                             "stages through its repartition topic, its state moved at each rescale; "
                             "keyed: the same over a topic keyed by user (keyedBy), in one stage")
    parser.set_defaults(records=0)
    args = parser.parse_args()
    env = Env(args)
    env.topic("ramp-in", PARTITIONS)
    env.topic("ramp-out", 3)
    path = spec(env, "ramp", "ramp-in", "ramp-out", AUTOSCALING, kind=args.kind, per_trigger=PER_TRIGGER)
    state = os.path.join(args.work, "autoscaler.json")
    replicas = Replicas(env, path)
    replicas.start_all(1)
    feed = RampFeed(env, "ramp-in", args.peak, seed=7,
                    partitioner="murmur2_random" if args.kind == "keyed" else "consistent_random")
    feed.start()
    rows, counts, burst_at, woke = [], [1], None, None
    current = 1
    print(f"{'t':>5} {'target/s':>8} {'input/s':>8} {'lag':>8} {'replicas':>8} {'recommended':>11}  reason")
    while True:
        time.sleep(args.tick)
        t = round(time.time() - feed.started)
        replicas.check_alive()
        status = step(args.operator, path, state, args.work, replicas)
        row = {"t": t, "target_rate": round(schedule(t, args.peak)),
               "input_rate": status.get("inputRowsPerSecond") or 0, "lag": status.get("lag") or 0,
               "replicas": current, "recommended": status["recommendedReplicas"]}
        rows.append(row)
        print(f"{t:>5} {row['target_rate']:>8} {row['input_rate']:>8.0f} {row['lag']:>8} "
              f"{current:>8} {row['recommended']:>11}  {status['reason'][:110]}", flush=True)
        if status["replicas"] != current:
            current = status["replicas"]
            replicas.stop_all(signal.SIGTERM)
            if current:
                replicas.start_all(current)
            counts.append(current)
        if current == 0 and burst_at is None:
            if feed.is_alive():
                fail("scaled to zero while the producer was still writing")
            burst_at = t
            feed.burst(2000)
        if burst_at is not None and current > 0:
            woke = t - burst_at
            break
        if t > 1200:
            fail(f"no scale to zero and back within 20 minutes; counts {counts}")
    feed.join()
    if feed.error:
        fail(f"the producer failed: {feed.error}")
    if args.kind != "stateless":
        # What one replica writes over the same records.
        reference = spec(env, "ramp-one", "ramp-in", "ramp-one-out", "  trigger: {availableNow: true}\n",
                         kind=args.kind)
        env.topic("ramp-one-out", 3)
        env.run(reference)
        feed.expected = output_rows(env, "ramp-one-out")
    wait_for_output(env, "ramp-out", len(feed.expected))
    replicas.check_alive()
    replicas.stop_all(signal.SIGTERM)
    csv_path, png = plot(rows, args.report_dir)
    peak = max(counts)
    low = max(r["recommended"] for r in rows if r["t"] <= 60)
    rises = counts.index(peak)
    findings = []
    if low >= peak:
        findings.append(f"at 300/s it recommended {low} replicas, as many as at the peak ({peak})")
    if any(b < a for a, b in zip(counts[:rises], counts[1:rises + 1])):
        findings.append("the count went down while the input rose")
    print("decisions: " + ("; ".join(findings) if findings else "the count followed the input"))
    actual = output_rows(env, "ramp-out")
    compare(actual, feed.expected, "the output through the autoscaler's rescales", where="Kafka")
    ok(f"{feed.produced} records over ~10 min (peak {args.peak}/s): replicas {' -> '.join(map(str, counts))}, "
       f"{len(counts) - 1} rescales; scaled to zero once idle and woken {woke} s after the last burst; "
       f"{len(actual)} rows each once, equal to "
       + ("the filter of everything produced. " if args.kind == "stateless" else "one replica's. ")
       + 
       f"Timeline: {csv_path}" + (f", plot: {png}" if png else " (no plot: matplotlib missing)"))


if __name__ == "__main__":
    main()
