"""The driver of bench/state.sh: what Sluice's state costs at scale.

One aggregation keeps KEYS keys (default 10 million) in state: Spark's rate
source shape (`value` counts up), grouped by `value % KEYS`, with a count,
a sum and a 64-character tag (two md5 hex strings) per key, in update mode,
the checkpoint on an S3-compatible server (bench/state.sh starts moto) or a
local directory. Printed, each by a separate run of `sluice run`:

1. Building the state: KEYS rows in batches of KEYS/10 (every key new).
   Time, rows/s, the engine's peak RSS, and the state's size (the newest
   version's snapshot files on the local disk, and everything under
   `state/` in the checkpoint).
2. Checkpoint cost when 1% of the state changes: batches of KEYS/100 rows,
   each updating KEYS/100 keys already in state. Per batch: the state
   commit's time, partitions committed, of them snapshots, and bytes
   uploaded (from the engine's "Committed the state." log lines; the same
   figures are in `stateOperators[].commitTimeMs` and `customMetrics` of
   /progress). A changelog batch should cost what changed; the partitions
   whose snapshot falls due upload their new SST files.
3. Restart after SIGKILL: a run with a processing-time trigger is killed
   after a batch, then started again on the same state directory (a pod on
   its PersistentVolume: the local copy of the files is reused) and then on
   an empty one (a new pod: everything from the checkpoint). Time from the
   process start to the first batch committed, and what the restore took
   from where.

  python3 bench/state.py --sluice BIN --work DIR --checkpoint URL [--keys N]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

SPEC = """apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: bench-state}}
spec:
  sources:
    - name: rate
      generator: {{kind: rate, rowsPerSecond: {per_batch}, rowsPerBatch: {per_batch}{total},
                  startTime: "2026-01-01T00:00:00Z"}}
  query: |
    SELECT value % {keys} AS k, count(*) AS n, sum(value) AS total,
           max(concat(md5(CAST(value AS VARCHAR)), md5(CAST(value + 1 AS VARCHAR)))) AS tag
    FROM rate GROUP BY value % {keys}
  sink: {{console: {{numRows: 1}}}}
  outputMode: update
  statePartitions: 16
  checkpoint: {{location: "{checkpoint}"}}
  trigger: {trigger}
"""

COMMITTED = re.compile(r"Committed the state\..*?version=(\d+) partitions=(\d+) snapshots=(\d+) "
                       r"files=(\d+) bytes=(\d+) changelog_bytes=(\d+) ms=(\d+)")
RESTORED = re.compile(r"Restored the state\..*?downloaded_files=(\d+) downloaded_bytes=(\d+) "
                      r"local_files=(\d+) local_bytes=(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def spec_file(args, name, per_batch, total=None, trigger="{availableNow: true}"):
    path = os.path.join(args.work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(SPEC.format(per_batch=per_batch, total=f", totalRows: {total}" if total else "",
                            keys=args.keys, checkpoint=args.checkpoint, trigger=trigger))
    return path


def env(args, state_dir, http_port=None):
    out = dict(os.environ, SLUICE_STATE_DIR=state_dir,
               SLUICE_LOG="info,sluice_engine::state=debug", NO_COLOR="1")
    if http_port:
        out.update(SLUICE_HTTP_PORT=str(http_port), SLUICE_HTTP_ADDRESS="127.0.0.1")
    return out


def run(args, name, spec, state_dir):
    """Runs `sluice run spec` to its end; returns (seconds, peak RSS bytes, log)."""
    log_path = os.path.join(args.work, f"{name}.log")
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen([args.sluice, "run", spec], stdout=subprocess.DEVNULL, stderr=log,
                                env=env(args, state_dir))
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - start
    text = ANSI.sub("", open(log_path).read())
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed: see {log_path}\n" + text[-2000:])
    return seconds, usage.ru_maxrss * 1024, text


def commits(text):
    return [dict(zip(("version", "partitions", "snapshots", "files", "bytes", "changelog", "ms"),
                     map(int, m.groups())))
            for m in COMMITTED.finditer(text)]


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def checkpoint_state_bytes(args):
    """Bytes of every object under the checkpoint's `state/`."""
    if args.checkpoint.startswith("s3://"):
        import boto3
        bucket, _, prefix = args.checkpoint[5:].partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
        total = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=prefix.rstrip("/") + "/state/"):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total
    return dir_bytes(os.path.join(args.checkpoint, "state"))


def latest_batch(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress/latest", timeout=2) as r:
            return json.load(r).get("batchId")
    except Exception:
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart(args, name, spec, state_dir, after):
    """Starts the query; returns (seconds to the first batch after `after`
    committed, the restore's figures, the process) or exits."""
    port = free_port()
    log_path = os.path.join(args.work, f"{name}.log")
    log = open(log_path, "w")
    start = time.time()
    proc = subprocess.Popen([args.sluice, "run", spec], stdout=subprocess.DEVNULL, stderr=log,
                            env=env(args, state_dir, port))
    while True:
        batch = latest_batch(port)
        if batch is not None and (after is None or batch > after):
            seconds = time.time() - start
            break
        if proc.poll() is not None or time.time() - start > 900:
            sys.exit(f"{name}: no batch committed (exit {proc.poll()}): see {log_path}")
        time.sleep(0.05)
    text = ANSI.sub("", open(log_path).read())
    m = RESTORED.search(text)
    restored = dict(zip(("downloaded_files", "downloaded_bytes", "local_files", "local_bytes"),
                        map(int, m.groups()))) if m else None
    return seconds, restored, proc, batch


def mib(n):
    return f"{n / 2**20:,.1f} MiB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--changed-batches", type=int, default=12)
    args = parser.parse_args()
    keys = args.keys
    state_dir = os.path.join(args.work, "state")
    print(f"\nState at scale: {keys:,} keys, {os.cpu_count()} cores, checkpoint {args.checkpoint}", flush=True)

    # 1. Build the state.
    seconds, rss, text = run(args, "build", spec_file(args, "build", keys // 10, keys), state_dir)
    built = commits(text)
    snapshot_bytes = dir_bytes(os.path.join(state_dir, "aggregate.files"))
    print(f"\n1. Building: {keys:,} rows, every key new, in {len(built)} batches: {seconds:.1f} s "
          f"({keys / seconds:,.0f} rows/s); peak RSS {mib(rss)}")
    print(f"   state: {keys:,} keys; the newest snapshot's files {mib(snapshot_bytes)} on the local disk; "
          f"everything under state/ in the checkpoint {mib(checkpoint_state_bytes(args))}")
    each = ", ".join(f"{c['ms']} ms ({mib(c['bytes'])})" for c in built)
    print(f"   commits: {each}", flush=True)

    # 2. 1% changes.
    changed = keys // 100
    total = keys + changed * args.changed_batches
    seconds, rss, text = run(args, "changes", spec_file(args, "changes", changed, total), state_dir)
    rows = commits(text)
    print(f"\n2. Checkpoint cost when 1% of the state changes: {args.changed_batches} batches of {changed:,} "
          f"updated keys ({seconds:.1f} s in all, peak RSS {mib(rss)})")
    print(f"   {'batch':>5} {'commit ms':>9} {'partitions':>10} {'snapshots':>9} {'uploaded':>12} "
          f"{'changelogs':>12} {'snapshots':>12}")
    for c in rows:
        print(f"   {c['version']:>5} {c['ms']:>9} {c['partitions']:>10} {c['snapshots']:>9} {mib(c['bytes']):>12} "
              f"{mib(c['changelog']):>12} {mib(c['bytes'] - c['changelog']):>12}")
    if rows:
        mean = sum(c["changelog"] for c in rows) / len(rows)
        print(f"   the changelogs: {mean / changed:.0f} bytes per changed key; the snapshots: the new SST files "
              f"(memtable flushes and compactions) of the 1-2 partitions whose snapshot falls due")
    sys.stdout.flush()

    # 3. Restart after SIGKILL.
    live = spec_file(args, "live", changed // 10, None, "{processingTime: 1s}")
    _, restored, proc, batch = restart(args, "live-0", live, state_dir, None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = []
    for case, fresh in (("same disk (a pod on its volume)", False), ("empty disk (state from the checkpoint)", True)):
        if fresh:
            shutil.rmtree(state_dir)
        name = "live-fresh" if fresh else "live-same"
        seconds, restored, proc, batch = restart(args, name, live, state_dir, batch)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = (f"{restored['downloaded_files']} files ({mib(restored['downloaded_bytes'])}) downloaded, "
                 f"{restored['local_files']} ({mib(restored['local_bytes'])}) from the disk") if restored else "?"
        lines.append(f"   {case}: {seconds:.1f} s to the first batch committed; {where}")
    print("\n3. Restart after SIGKILL, process start to the first batch committed:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
