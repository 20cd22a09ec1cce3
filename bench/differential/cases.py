"""Generated streaming cases for the differential test (Sluice against Spark).

A case is a directory holding `case.json` (what the query is: its kind,
output mode, watermark and parameters, the Sluice SQL, the output columns)
and `input/NNNNN.jsonl`, the source `events` (k string, v long, ts
timestamp) as JSON-lines files, one a micro-batch. Everything follows from
the suite's seed and the case's number, so a suite is reproducible.

The query kinds, and the output modes Spark 4.3 accepts for each (probed:
`suite.py --probe` runs every kind in every mode, with and without a
watermark, and reports which combinations each engine refuses):

| kind          | what                                               | modes Spark accepts               |
| ------------- | -------------------------------------------------- | --------------------------------- |
| `filter`      | stateless filter / projection                      | append, update                    |
| `window_only` | tumble() or hop() with no GROUP BY (window())      | append, update                    |
| `tumble`      | count/sum/min/max per (tumbling window, k)         | append (watermark), update, complete |
| `hop`         | the same over sliding windows                      | append (watermark), update, complete |
| `session`     | count/sum per (session window, k)                  | append (watermark), complete (no update) |
| `group_by`    | count/sum/min/max/avg GROUP BY k                   | update, complete (no append, even with a watermark) |
| `dedup`       | SELECT DISTINCT k, v, ts / dropDuplicates          | append, update                    |

This module only describes cases; it imports no Spark. `spark_query()`
builds the Spark side of a case from a streaming DataFrame, so that both
sides of each kind are written next to each other.
"""

import json
import os
import random
import time
from datetime import datetime, timezone

KINDS = ["filter", "window_only", "tumble", "hop", "session", "group_by", "dedup"]

# The (kind, mode) pairs the generated suites draw from, with how often. The
# brief of the suite: stateless kinds in append, the rest in each mode Spark
# accepts. `requires_watermark` marks what Spark refuses without one.
SUITE_MODES = {
    "filter": ["append"],
    "window_only": ["append"],
    "tumble": ["append", "update", "complete"],
    "hop": ["append", "update", "complete"],
    "session": ["append", "complete"],
    "group_by": ["update", "complete"],
    "dedup": ["append", "update"],
}
REQUIRES_WATERMARK = {("tumble", "append"), ("hop", "append"), ("session", "append")}
# Kinds whose watermark is on the source but has no event-time key in the
# stateful operator, or no stateful operator at all: generated with and
# without one.
ALL_MODES = ["append", "update", "complete"]

SCHEMA_YAML = """      schema:
        - {name: k, type: string}
        - {name: v, type: long}
        - {name: ts, type: timestamp}"""

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
BASE_TIME_US = int((datetime(2026, 1, 1, tzinfo=timezone.utc) - EPOCH).total_seconds()) * 1_000_000
S = 1_000_000  # microseconds in a second


def fmt_ts(us: int) -> str:
    """RFC 3339 in UTC with as many fractional digits as the value needs (0, 3 or 6)."""
    secs, frac = divmod(us, S)
    text = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac == 0:
        return text + "Z"
    if frac % 1000 == 0:
        return f"{text}.{frac // 1000:03d}Z"
    return f"{text}.{frac:06d}Z"


def delay_text(delay_ms: int) -> tuple[str, str]:
    """The watermark delay as Sluice writes it and as Spark's withWatermark takes it."""
    if delay_ms % 1000 == 0:
        return f"{delay_ms // 1000}s", f"{delay_ms // 1000} seconds"
    return f"{delay_ms}ms", f"{delay_ms} milliseconds"


# ---------------------------------------------------------------------------
# Queries


def make_query(rng: random.Random, kind: str) -> dict:
    """Sluice SQL, output columns and the parameters the Spark side needs."""
    if kind == "filter":
        variant = rng.choice(["threshold", "expr", "case"])
        if variant == "threshold":
            t = rng.randint(0, 100)
            sql = f"SELECT k, v, ts FROM events WHERE v >= {t}"
            cols = ["k", "v", "ts"]
        elif variant == "expr":
            key = rng.choice("abcd")
            sql = f"SELECT k, v * 2 + 1 AS w, ts FROM events WHERE k <> '{key}'"
            cols = ["k", "w", "ts"]
        else:
            t = rng.randint(20, 80)
            sql = (
                "SELECT upper(k) AS uk, coalesce(v, -1) AS v, ts, "
                f"CASE WHEN v IS NULL THEN 'none' WHEN v > {t} THEN 'big' ELSE 'small' END AS size "
                "FROM events WHERE v IS NULL OR v % 3 <> 0"
            )
            cols = ["uk", "v", "ts", "size"]
        # Spark runs the same SQL text over a temporary view `events`.
        return {"sql": sql, "columns": cols, "timestamp_columns": ["ts"], "params": {"variant": variant}}
    if kind == "window_only":
        if rng.random() < 0.5:
            size = rng.choice([5, 10, 15])
            frm, params = f"tumble(events, ts, INTERVAL '{size}' SECOND)", {"size_s": size}
        else:
            slide = rng.choice([2, 5])
            size = slide * rng.choice([2, 3])
            frm = f"hop(events, ts, INTERVAL '{slide}' SECOND, INTERVAL '{size}' SECOND)"
            params = {"size_s": size, "slide_s": slide}
        sql = f"SELECT window_start, window_end, k, v, ts FROM {frm}"
        return {
            "sql": sql,
            "columns": ["window_start", "window_end", "k", "v", "ts"],
            "timestamp_columns": ["window_start", "window_end", "ts"],
            "params": params,
        }
    if kind in ("tumble", "hop"):
        if kind == "tumble":
            size = rng.choice([5, 10, 15, 30])
            frm, params = f"tumble(events, ts, INTERVAL '{size}' SECOND)", {"size_s": size}
        else:
            slide = rng.choice([2, 3, 5])
            size = slide * rng.choice([2, 3, 4])
            frm = f"hop(events, ts, INTERVAL '{slide}' SECOND, INTERVAL '{size}' SECOND)"
            params = {"size_s": size, "slide_s": slide}
        sql = (
            "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, "
            f"min(v) AS lo, max(v) AS hi FROM {frm} GROUP BY window_start, window_end, k"
        )
        return {
            "sql": sql,
            "columns": ["window_start", "window_end", "k", "n", "total", "lo", "hi"],
            "timestamp_columns": ["window_start", "window_end"],
            "params": params,
        }
    if kind == "session":
        gap = rng.choice([2, 3, 5])
        sql = (
            "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total "
            f"FROM session(events, ts, INTERVAL '{gap}' SECOND) GROUP BY window_start, window_end, k"
        )
        return {
            "sql": sql,
            "columns": ["window_start", "window_end", "k", "n", "total"],
            "timestamp_columns": ["window_start", "window_end"],
            "params": {"gap_s": gap},
        }
    if kind == "group_by":
        sql = (
            "SELECT k, count(*) AS n, sum(v) AS total, min(v) AS lo, max(v) AS hi, avg(v) AS mean "
            "FROM events GROUP BY k"
        )
        return {"sql": sql, "columns": ["k", "n", "total", "lo", "hi", "mean"], "timestamp_columns": [], "params": {}}
    if kind == "dedup":
        return {
            "sql": "SELECT DISTINCT k, v, ts FROM events",
            "columns": ["k", "v", "ts"],
            "timestamp_columns": ["ts"],
            "params": {},
        }
    raise ValueError(kind)


def spark_query(spark, df, case: dict):
    """The Spark side of `case` over the streaming DataFrame `df` (watermark
    already applied): a DataFrame with exactly `case["columns"]`."""
    from pyspark.sql import functions as F

    kind, p = case["kind"], case["params"]
    if kind == "filter":
        df.createOrReplaceTempView("events")
        return spark.sql(case["sql"])
    if kind in ("window_only", "tumble", "hop"):
        size = f"{p['size_s']} seconds"
        w = F.window("ts", size, f"{p['slide_s']} seconds") if "slide_s" in p else F.window("ts", size)
        if kind == "window_only":
            return df.select(w.alias("w"), "k", "v", "ts").select(
                F.col("w.start").alias("window_start"), F.col("w.end").alias("window_end"), "k", "v", "ts"
            )
        agg = df.groupBy(w.alias("w"), "k").agg(
            F.count("*").alias("n"), F.sum("v").alias("total"), F.min("v").alias("lo"), F.max("v").alias("hi")
        )
        return agg.select(
            F.col("w.start").alias("window_start"), F.col("w.end").alias("window_end"), "k", "n", "total", "lo", "hi"
        )
    if kind == "session":
        agg = df.groupBy(F.session_window("ts", f"{p['gap_s']} seconds").alias("w"), "k").agg(
            F.count("*").alias("n"), F.sum("v").alias("total")
        )
        return agg.select(
            F.col("w.start").alias("window_start"), F.col("w.end").alias("window_end"), "k", "n", "total"
        )
    if kind == "group_by":
        return df.groupBy("k").agg(
            F.count("*").alias("n"),
            F.sum("v").alias("total"),
            F.min("v").alias("lo"),
            F.max("v").alias("hi"),
            F.avg("v").alias("mean"),
        )
    if kind == "dedup":
        return df.dropDuplicates(["k", "v", "ts"]).select("k", "v", "ts")
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# Input


def trunc_ms(us: int) -> int:
    return us - us % 1000


def make_input(rng: random.Random, case: dict) -> list[list[dict]]:
    """4-12 files of 0-25 rows: event time moving forward with a few seconds
    of disorder, and rows chosen to land on the edges Spark's semantics
    turn on: very late rows (behind the watermark), rows just before, at and
    after the watermark of the previous batches (with sub-millisecond
    parts, as Spark truncates the max event time to milliseconds), rows on
    window boundaries, rows a session gap apart (touching sessions), exact
    duplicates, null v, now and then a null k."""
    n_files = rng.randint(4, 12)
    keys = rng.sample(["a", "b", "c", "d"], rng.randint(2, 4))
    delay_us = (case["watermark"]["delay_ms"] if case["watermark"] else rng.choice([0, 3000, 10000])) * 1000
    gap_us = case["params"].get("gap_s", rng.choice([2, 3, 5])) * S
    size_us = case["params"].get("size_s", rng.choice([5, 10])) * S
    disorder_us = rng.randint(0, 4) * S
    clock = BASE_TIME_US + rng.randint(0, 86_400) * S
    file_maxes: list[int] = []  # the max event time after each file
    max_ts = None
    last_by_key: dict[str, int] = {}
    written: list[dict] = []
    files = []
    p_dup = 0.15 if case["kind"] == "dedup" else 0.05
    for _ in range(n_files):
        n = 0 if rng.random() < 0.12 else rng.randint(1, 25)
        clock += rng.randint(0, 8) * S + rng.choice([0, rng.randint(0, S - 1)])
        rows = []
        for _ in range(n):
            k = None if rng.random() < 0.03 else rng.choice(keys)
            r = rng.random()
            if written and r < p_dup:
                rows.append(dict(rng.choice(written)))
                continue
            r = rng.random()
            if max_ts is not None and r < 0.07:
                # Very late: well behind the watermark.
                ts = max_ts - delay_us - rng.randint(1, 30) * S - rng.randint(0, 999)
            elif file_maxes and r < 0.20:
                # At the watermark of one of the last batches, to the microsecond.
                ref = rng.choice(file_maxes[-3:])
                wm = trunc_ms(ref) - delay_us
                ts = wm + rng.choice([-1000, -1, 0, 1, rng.randint(1, 999), ref % 1000, 1000])
            elif r < 0.27:
                # On a window boundary (ts itself, or the end of a window at it).
                ts = (clock // size_us) * size_us + rng.choice([0, 0, -1, 1])
            elif k in last_by_key and r < 0.35:
                # A session gap after the key's last event: touching sessions.
                ts = last_by_key[k] + gap_us + rng.choice([0, 0, -1, 1])
            else:
                ts = clock - rng.randint(0, disorder_us)
                precision = rng.random()
                if precision < 0.2:
                    ts -= ts % S
                elif precision < 0.5:
                    ts -= ts % 1000
            v = None if rng.random() < 0.1 else rng.randint(0, 100)
            row = {"k": k, "v": v, "ts": fmt_ts(ts)}
            rows.append(row)
            written.append(row)
            last_by_key[k] = ts
            max_ts = ts if max_ts is None else max(max_ts, ts)
        if max_ts is not None:
            file_maxes.append(max_ts)
        files.append(rows)
    return files


def write_input(case_dir: str, files: list[list[dict]]) -> list[str]:
    """Writes the files in name order with modification times 1 s apart,
    increasing in the same order (Spark's file source takes files in order
    of modification time, Sluice's in order of name)."""
    input_dir = os.path.join(case_dir, "input")
    os.makedirs(input_dir, exist_ok=True)
    names = []
    start = int(time.time()) - len(files) - 5
    for i, rows in enumerate(files):
        name = f"{i:05d}.jsonl"
        path = os.path.join(input_dir, name)
        with open(path, "w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
        os.utime(path, (start + i, start + i))
        names.append(name)
    return names


def restamp_input(case_dir: str) -> None:
    """Sets the input files' modification times again (1 s apart, in name
    order), e.g. after a copy that did not keep them."""
    input_dir = os.path.join(case_dir, "input")
    names = sorted(n for n in os.listdir(input_dir) if n.endswith(".jsonl"))
    start = int(time.time()) - len(names) - 5
    for i, name in enumerate(names):
        os.utime(os.path.join(input_dir, name), (start + i, start + i))


# ---------------------------------------------------------------------------
# Cases


def make_case(seed: int, index: int, kind: str | None = None, mode: str | None = None,
              watermark: bool | None = None) -> dict:
    """Case `index` of the suite with `seed`: kind, mode and watermark drawn
    from the seed unless given."""
    rng = random.Random(f"{seed}:{index}")
    kind = kind or rng.choice(KINDS)
    mode = mode or rng.choice(SUITE_MODES[kind])
    q = make_query(rng, kind)
    if watermark is None:
        watermark = (kind, mode) in REQUIRES_WATERMARK or rng.random() < 0.75
    wm = None
    if watermark:
        delay_ms = rng.randint(0, 20) * 1000 if rng.random() < 0.9 else rng.randint(1, 20_000)
        wm = {"column": "ts", "delay_ms": delay_ms}
    case = {
        "id": f"{index:04d}",
        "seed": seed,
        "index": index,
        "kind": kind,
        "mode": mode,
        "watermark": wm,
        "sql": q["sql"],
        "columns": q["columns"],
        "timestamp_columns": q["timestamp_columns"],
        "params": q["params"],
    }
    case["input"] = make_input(rng, case)
    return case


def case_dir_name(case: dict) -> str:
    wm = f"wm{case['watermark']['delay_ms']}ms" if case["watermark"] else "nowm"
    return f"{case['id']}-{case['kind']}-{case['mode']}-{wm}"


def write_case(root: str, case: dict) -> str:
    """Writes the case's directory under `root`: case.json and input/."""
    case = dict(case)
    files = case.pop("input")
    d = os.path.join(root, case_dir_name(case))
    os.makedirs(d, exist_ok=True)
    case["files"] = write_input(d, files)
    with open(os.path.join(d, "case.json"), "w") as out:
        json.dump(case, out, indent=2)
        out.write("\n")
    return d


def load_case(case_dir: str) -> dict:
    with open(os.path.join(case_dir, "case.json")) as f:
        return json.load(f)


def sluice_sink(case: dict) -> str:
    """`files` (committed output, read through its manifests) in append
    mode; `console` in update and complete modes, which Sluice's file sink
    refuses as Spark's does (the only other sink, Kafka, needs a broker).
    SLUICE_SINK=console|files forces one."""
    forced = os.environ.get("SLUICE_SINK")
    if forced:
        return forced
    return "files" if case["mode"] == "append" else "console"


def sluice_yaml(case: dict, case_dir: str, sink: str = "files") -> str:
    """The case as a StreamingQuery manifest reading case_dir/input and
    writing case_dir/sluice/out (or the console: standard output, every row
    of every batch), checkpoint in case_dir/sluice/checkpoint."""
    case_dir = os.path.abspath(case_dir)
    if sink == "console":
        sink_yaml = "{console: {numRows: 1000000, truncate: false}}"
    else:
        sink_yaml = f"{{files: {{path: {case_dir}/sluice/out}}, format: json}}"
    wm = ""
    if case["watermark"]:
        wm = f"\n      watermark: {{column: ts, delay: {delay_text(case['watermark']['delay_ms'])[0]}}}"
    sql = "\n".join("    " + line for line in case["sql"].splitlines())
    return f"""apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: differential-{case['id']}}}
spec:
  sources:
    - name: events
      files: {{path: {case_dir}/input, maxFilesPerTrigger: 1}}
      format: json
{SCHEMA_YAML}{wm}
  query: |
{sql}
  sink: {sink_yaml}
  outputMode: {case['mode']}
  checkpoint: {{location: {case_dir}/sluice/checkpoint}}
  trigger: {{availableNow: true}}
"""


def suite_pairs() -> list[tuple[str, str]]:
    return [(kind, mode) for kind in KINDS for mode in SUITE_MODES[kind]]


def generate(root: str, seed: int, count: int, kinds: list[str] | None = None) -> list[str]:
    """The suite: `count` cases drawn from `seed`. Kinds and modes take turns
    (every (kind, mode) pair of SUITE_MODES once, in an order drawn from the
    seed, then again), so that even 20 cases cover each pair; the rest of
    each case (watermark, parameters, input) is drawn from the seed."""
    pairs = [p for p in suite_pairs() if not kinds or p[0] in kinds]
    dirs = []
    for i in range(count):
        round_, pos = divmod(i, len(pairs))
        order = list(pairs)
        random.Random(f"{seed}:order:{round_}").shuffle(order)
        kind, mode = order[pos]
        dirs.append(write_case(root, make_case(seed, i, kind=kind, mode=mode)))
    return dirs


def generate_probe(root: str, seed: int) -> list[str]:
    """Every kind in every output mode, with and without a watermark: which
    combinations does each engine accept?"""
    dirs = []
    i = 0
    for kind in KINDS:
        for mode in ALL_MODES:
            for wm in (True, False):
                case = make_case(seed, i, kind=kind, mode=mode, watermark=wm)
                case["probe"] = True
                dirs.append(write_case(root, case))
                i += 1
    return dirs
