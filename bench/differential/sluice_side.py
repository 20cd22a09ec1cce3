"""Runs differential cases through `sluice run`, one process per case.

    python3 sluice_side.py SLUICE_BIN CASE_DIR...

For each case: writes CASE_DIR/sluice.yaml (cases.sluice_yaml: the file
source over CASE_DIR/input with maxFilesPerTrigger 1, the watermark, the
SQL, the sink, a fresh checkpoint in CASE_DIR/sluice/checkpoint,
availableNow), runs it with SLUICE_LOG=warn and its state in
CASE_DIR/sluice/state, then reads its output:

- append mode: a JSON file sink in CASE_DIR/sluice/out, read as COMMITTED:
  each manifest `out/_sluice_metadata/<N>` and the files it lists;
- update and complete modes, which the file sink refuses (as Spark's
  does): the console sink (every row, values whole), each `Batch: N`
  table parsed from standard output (kept as CASE_DIR/sluice.stdout);
  SLUICE_SINK=console|files forces one sink for every mode.

Writes, in CASE_DIR:

- sluice.jsonl: one line per output row, {"batch": N, "row": {...}}, in
  batch order;
- sluice_batches.json: the batches committed in the checkpoint
  (`commits/N`), each manifest's batch id and row count, what each
  `offsets/N` holds (for its watermark, if it keeps one), the seconds the
  run took, and any oddity met reading the manifests;
- sluice_error.txt instead, when sluice refuses the query or fails (its
  standard error), with the exit status.

The manifest is read defensively: it may gain fields; the batch id is its
`batchId` (else the leading digits of its name); each file entry is
{"path": ..., "rows": ...} or a bare path, relative to the sink's directory
or absolute; JSON-lines and (with pyarrow) Parquet files are read.

Settings from the environment: SLUICE_CASE_TIMEOUT (seconds, 300).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402


def read_data_file(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        for r in rows:
            for c, v in r.items():
                if hasattr(v, "isoformat"):  # a datetime from a timestamp column
                    r[c] = v.isoformat()
        return rows
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_committed(out_dir: str) -> tuple[list[tuple[int, dict]], list[dict], list[str]]:
    """The rows the manifests list, as (batch, row), plus a summary of each
    manifest and the oddities met."""
    meta = os.path.join(out_dir, "_sluice_metadata")
    rows: list[tuple[int, dict]] = []
    manifests: list[dict] = []
    notes: list[str] = []
    if not os.path.isdir(meta):
        return rows, manifests, ["no _sluice_metadata directory"]
    entries = []
    for name in os.listdir(meta):
        if name.startswith(".") or name.startswith("_"):
            continue  # temporary or hidden
        m = re.match(r"^(\d+)", name)
        if not m:
            notes.append(f"manifest name without a batch number: {name}")
            continue
        entries.append((int(m.group(1)), name))
    for number, name in sorted(entries):
        try:
            with open(os.path.join(meta, name)) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"unreadable manifest {name}: {e}")
            continue
        batch = manifest.get("batchId", number) if isinstance(manifest, dict) else number
        if batch != number:
            notes.append(f"manifest {name} says batchId {batch}")
        files = manifest.get("files", []) if isinstance(manifest, dict) else manifest
        count = 0
        for entry in files:
            path = entry.get("path") if isinstance(entry, dict) else entry
            if not path:
                notes.append(f"manifest {name}: a file entry without a path: {entry}")
                continue
            full = path if os.path.isabs(path) else os.path.join(out_dir, path)
            if full.startswith("file://"):
                full = full[len("file://"):]
            try:
                data = read_data_file(full)
            except (OSError, ValueError) as e:
                notes.append(f"manifest {name}: cannot read {path}: {e}")
                continue
            declared = entry.get("rows") if isinstance(entry, dict) else None
            if declared is not None and declared != len(data):
                notes.append(f"manifest {name}: {path} declares {declared} rows, holds {len(data)}")
            count += len(data)
            rows.extend((batch, r) for r in data)
        manifests.append({"batch": batch, "name": name, "files": len(files), "rows": count})
    return rows, manifests, notes


def parse_cell(text: str):
    """A console cell back to a value: NULL, an integer, a float, or text
    (timestamps stay text, compare.py reads them)."""
    if text in ("NULL", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|Infinity|NaN)", text):
        return float(text)
    return text


def read_console(stdout: str) -> tuple[list[tuple[int, dict]], list[dict], list[str]]:
    """The rows of each `Batch: N` table the console sink printed
    (numRows large, truncate false: every row, whole values)."""
    rows: list[tuple[int, dict]] = []
    tables: list[dict] = []
    notes: list[str] = []
    batch = None
    header = None
    for line in stdout.splitlines():
        m = re.match(r"^Batch: (\d+)\s*$", line)
        if m:
            batch, header = int(m.group(1)), None
            tables.append({"batch": batch, "rows": 0})
            continue
        if not line.startswith("|") or batch is None:
            if line.startswith("only showing"):
                notes.append(f"batch {batch}: {line.strip()}")
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if len(cells) != len(header):
            notes.append(f"batch {batch}: a row of {len(cells)} cells under {len(header)} columns: {line}")
            continue
        rows.append((batch, {name: parse_cell(c) for name, c in zip(header, cells)}))
        tables[-1]["rows"] += 1
    return rows, tables, notes


def checkpoint_batches(checkpoint: str) -> tuple[list[int], dict]:
    """The committed batch ids, and each offsets/N's content (parsed when JSON)."""
    commits = []
    cdir = os.path.join(checkpoint, "commits")
    if os.path.isdir(cdir):
        commits = sorted(int(n) for n in os.listdir(cdir) if n.isdigit())
    offsets = {}
    odir = os.path.join(checkpoint, "offsets")
    if os.path.isdir(odir):
        for n in sorted((n for n in os.listdir(odir) if n.isdigit()), key=int):
            with open(os.path.join(odir, n)) as f:
                text = f.read()
            try:
                parsed = json.loads(text)
            except ValueError:  # Spark's layout: a version line, then JSON lines
                parsed = []
                for line in text.splitlines():
                    try:
                        parsed.append(json.loads(line))
                    except ValueError:
                        parsed.append(line)
            offsets[n] = parsed
    return commits, offsets


def run_case(sluice: str, case_dir: str) -> str:
    case = cases.load_case(case_dir)
    work = os.path.join(case_dir, "sluice")
    shutil.rmtree(work, ignore_errors=True)
    for name in ("sluice.jsonl", "sluice_batches.json", "sluice_error.txt", "sluice.log", "sluice.stdout"):
        if os.path.exists(os.path.join(case_dir, name)):
            os.remove(os.path.join(case_dir, name))
    os.makedirs(os.path.join(work, "state"))
    yaml_path = os.path.join(case_dir, "sluice.yaml")
    sink = cases.sluice_sink(case)
    with open(yaml_path, "w") as f:
        f.write(cases.sluice_yaml(case, case_dir, sink))
    env = dict(os.environ, SLUICE_LOG=os.environ.get("SLUICE_LOG", "warn"),
               SLUICE_STATE_DIR=os.path.join(work, "state"))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sluice, "run", yaml_path], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=float(os.environ.get("SLUICE_CASE_TIMEOUT", "300")))
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")
        code, stdout, stderr = "timeout", text(e.stdout), text(e.stderr)
    seconds = time.perf_counter() - started
    if stderr:
        with open(os.path.join(case_dir, "sluice.log"), "w") as f:
            f.write(stderr)
    if code != 0:
        with open(os.path.join(case_dir, "sluice_error.txt"), "w") as f:
            f.write(f"exit status {code}\n{stderr}")
        lines = [l for l in stderr.strip().splitlines() if l.strip()]
        return f"error (exit {code}): {(lines[-1] if lines else '')[:200]}"
    if sink == "console":
        with open(os.path.join(case_dir, "sluice.stdout"), "w") as f:
            f.write(stdout)
        rows, manifests, notes = read_console(stdout)
    else:
        rows, manifests, notes = read_committed(os.path.join(work, "out"))
    commits, offsets = checkpoint_batches(os.path.join(work, "checkpoint"))
    with open(os.path.join(case_dir, "sluice.jsonl"), "w") as f:
        for batch, row in rows:
            f.write(json.dumps({"batch": batch, "row": row}, sort_keys=True) + "\n")
    with open(os.path.join(case_dir, "sluice_batches.json"), "w") as f:
        json.dump({"seconds": round(seconds, 3), "sink": sink, "commits": commits, "manifests": manifests,
                   "notes": notes, "offsets": offsets}, f, indent=1)
        f.write("\n")
    # Keep the output and the checkpoint's logs (small), not the state store
    # nor the checkpoint's state versions (RocksDB files, ~1 MB a case).
    shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
    shutil.rmtree(os.path.join(work, "checkpoint", "state"), ignore_errors=True)
    note = f", {len(notes)} notes" if notes else ""
    return f"{len(commits)} batches, {len(rows)} rows, {seconds:.1f}s{note}"


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sluice, dirs = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    for i, d in enumerate(dirs):
        status = run_case(sluice, d)
        print(f"  sluice [{i + 1}/{len(dirs)}] {os.path.basename(d)}: {status}", file=sys.stderr, flush=True)
    print(f"sluice: {len(dirs)} cases in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
