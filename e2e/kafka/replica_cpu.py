"""What a replica's CPU goes to, against a real Apache Kafka broker
(started by bench/replica-cpu.sh): for each configuration KIND:REPLICAS:RATE
(the queries of rescale.py), the replicas run as processes while a producer
writes RATE records a second for SECS seconds into a 6-partition topic;
every replica's /progress is collected, and per replica over the second
half of the run the script prints its batches a second, records a second,
CPU (cores: the reports' cpuMs over wall time), records over CPU time (the
true rate the autoscaler used until 2026-12-07), and the per-record cost
fitted over its batches (`cpu = fixed + per_record × records`, noisy at a
low input: see the README, "A replica's true rate")."""

import signal
import sys
import os
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import ramp  # noqa: E402
from e2e import Env, env_arguments  # noqa: E402
from rescale import Replicas, spec  # noqa: E402


def started(report):
    return datetime.fromisoformat(report["timestamp"].replace("Z", "+00:00")).timestamp()


def slope(points):
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    spread = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / spread if spread else float("nan")


def run(env, index, kind, replicas, rate, secs, per_trigger):
    name = f"cpu{index}"
    env.topic(f"{name}-in", ramp.PARTITIONS)
    env.topic(f"{name}-out", 3)
    path = spec(env, name, f"{name}-in", f"{name}-out", "", kind=kind, per_trigger=per_trigger)
    procs = Replicas(env, path)
    procs.start_all(replicas)
    ramp.schedule = lambda t, peak: peak
    feed = ramp.RampFeed(env, f"{name}-in", rate, seed=7, duration=secs,
                         partitioner="murmur2_random" if kind == "keyed" else "consistent_random")
    feed.start()
    seen = [dict() for _ in range(replicas)]
    while feed.is_alive():
        time.sleep(4)  # /progress keeps the last 100 reports
        for i in range(replicas):
            for report in ramp.progress(procs.ports[i]) or []:
                seen[i][report["batchId"]] = report
    procs.check_alive()
    procs.stop_all(signal.SIGTERM)
    if feed.error:
        sys.exit(f"the producer failed: {feed.error}")
    for i, by_id in enumerate(seen):
        reports = sorted(by_id.values(), key=lambda r: r["batchId"])
        reports = [r for r in reports if r.get("cpuMs") is not None]
        reports = reports[len(reports) // 2:]
        if len(reports) < 5:
            print(f"| {kind} | {replicas} | {rate} | {i} | too few batches | | | | |")
            continue
        span = started(reports[-1]) - started(reports[0])
        later = reports[1:]
        records = sum(r["numInputRows"] for r in later)
        cpu = sum(r["cpuMs"] for r in later) / 1000
        read = [(r["numInputRows"], r["cpuMs"]) for r in reports if r["numInputRows"] > 0]
        fitted = slope(read) * 1000 if len(read) > 2 else float("nan")
        print(f"| {kind} | {replicas} | {rate} | {i} | {len(later) / span:.1f} | {records / span:.0f} "
              f"| {cpu / span:.3f} | {records / cpu:.0f} | {fitted:.0f} |", flush=True)


def main():
    parser = env_arguments()
    parser.add_argument("--secs", type=int, default=60)
    parser.add_argument("--per-trigger", type=int, default=2000)
    parser.add_argument("configs", nargs="+", help="KIND:REPLICAS:RATE, e.g. windowed:1:300")
    parser.set_defaults(records=0)
    args = parser.parse_args()
    env = Env(args)
    print("| kind | replicas | input/s | replica | batches/s | records/s | CPU (cores) "
          "| records over CPU time | per-record µs fitted over batches |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for index, config in enumerate(args.configs):
        kind, replicas, rate = config.split(":")
        run(env, index, kind, int(replicas), int(rate), args.secs, args.per_trigger)


if __name__ == "__main__":
    main()
