"""Compares what Spark and Sluice wrote for each differential case.

    python3 compare.py [--known FILE] [--summary FILE] CASE_DIR...
    python3 compare.py --detail CASE_DIR        (one case, batch by batch)

Per case, the sequence (batch id -> multiset of rows) must be equal.
Values are normalised: timestamps (RFC 3339 text, any offset, up to
nanosecond digits) to UTC microseconds; numbers compare as numbers, floats
to a relative tolerance of 1e-9; a missing column is null. A batch with no
rows is the same as no batch. Separately, whether the results agree
regardless of batch alignment ("union"): for append and update, the
multiset of all rows over all batches; for complete (each batch holds the
whole result), the last batch's rows and the set of distinct rows over all
batches. A case where Spark refuses the query passes only if Sluice refuses
it too (and the other way round).

Prints one line per case (PASS, FAIL or KNOWN, kind/mode, watermark, and
for a difference the first differing batch with rows only in Spark and
rows only in Sluice), then a table of the outcomes by kind and mode;
writes CASE_DIR/diff.json per case and, with --summary, the whole run as
JSON. Exits 1 if a case differs and known_differences.json does not
explain it.

known_differences.json is a list of entries, each excusing the
differences of matching cases:
  {"kind": "tumble", "mode": "append", "watermark": true,
   "scope": "alignment", "reason": "why this difference is deliberate"}
`kind` and `mode` may be "*"; `watermark` (true/false) is optional;
`scope` is "alignment" (only when the union agrees: batch alignment alone
differs), "results" (any difference in the rows) or "acceptance" (one
engine refuses the query, the other runs it); default "results".
"""

import argparse
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|z|[+-]\d{2}:?\d{2}|UTC)?$"
)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
REL_TOL = 1e-9


def ts_micros(text: str):
    m = TS_RE.match(text)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone.utc)
    us = int((dt - EPOCH).total_seconds()) * 1_000_000
    if frac:
        us += int((frac + "000000000")[:9]) // 1000
    if off and off not in ("Z", "z", "UTC"):
        sign = 1 if off[0] == "+" else -1
        digits = off[1:].replace(":", "")
        us -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * 1_000_000
    return us


class Ts(int):
    """A timestamp, in microseconds: prints as RFC 3339."""

    def __repr__(self):
        return cases.fmt_ts(int(self))


def norm_value(v, is_ts: bool):
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        us = ts_micros(v) if (is_ts or TS_RE.match(v)) else None
        return Ts(us) if us is not None else v
    if isinstance(v, int):
        return Ts(v) if is_ts else v
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        return v
    return json.dumps(v, sort_keys=True)  # nested: compare as text


def norm_row(row: dict, columns: list[str], ts_cols: set) -> tuple:
    names = list(columns) + sorted(c for c in row if c not in columns)
    return tuple((c, norm_value(row.get(c), c in ts_cols)) for c in names)


def close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
            return False
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return a == b


def rows_close(r1: tuple, r2: tuple) -> bool:
    return len(r1) == len(r2) and all(c1 == c2 and close(v1, v2) for (c1, v1), (c2, v2) in zip(r1, r2))


def multiset_diff(a: list, b: list) -> tuple[list, list]:
    """Rows only in a, rows only in b (multisets; floats to a tolerance)."""
    ca, cb = Counter(a), Counter(b)
    only_a = list((ca - cb).elements())
    only_b = list((cb - ca).elements())
    if only_a and only_b and any(isinstance(v, float) for r in only_a + only_b for _, v in r):
        rest_b = list(only_b)
        left_a = []
        for r in only_a:
            for i, s in enumerate(rest_b):
                if rows_close(r, s):
                    del rest_b[i]
                    break
            else:
                left_a.append(r)
        only_a, only_b = left_a, rest_b
    return only_a, only_b


def show_row(r: tuple) -> str:
    return "{" + ", ".join(f"{c}: {v!r}" if v is not None else f"{c}: null" for c, v in r) + "}"


def read_output(path: str, columns, ts_cols) -> dict[int, list]:
    batches: dict[int, list] = defaultdict(list)
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                batches[int(rec["batch"])].append(norm_row(rec["row"], columns, ts_cols))
    return dict(batches)


def load_known(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        known = json.load(f)
    if isinstance(known, dict):
        known = known.get("differences", [])
    return known


def known_reason(known: list[dict], case: dict, outcome: str) -> str | None:
    for k in known:
        if k.get("kind", "*") not in ("*", case["kind"]) or k.get("mode", "*") not in ("*", case["mode"]):
            continue
        if "watermark" in k and bool(k["watermark"]) != bool(case["watermark"]):
            continue
        scope = k.get("scope", "results")
        if outcome == "acceptance" and scope != "acceptance":
            continue
        if outcome == "results" and scope not in ("results",):
            continue
        if outcome == "alignment" and scope not in ("alignment", "results"):
            continue
        return k.get("reason", "listed in known_differences.json")
    return None


def first_line(path: str) -> str:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("exit status"):
                return line[:160]
    return ""


def input_order_problems(case_dir: str, case: dict) -> list[str]:
    """Did each engine read file N in batch N? (Spark orders files by
    modification time, Sluice by name.) Spark: the input rows of each batch
    against each file's rows; Sluice: the file each offsets/N names."""
    problems = []
    sizes = []
    for name in case["files"]:
        with open(os.path.join(case_dir, "input", name)) as f:
            sizes.append(sum(1 for line in f if line.strip()))
    try:
        if case["kind"] == "filter":
            # Spark pushes the WHERE into the JSON scan: numInputRows counts
            # the rows that pass it.
            raise KeyError
        with open(os.path.join(case_dir, "spark_batches.json")) as f:
            for p in json.load(f)["progress"]:
                b = p["batch"]
                want = sizes[b] if b < len(sizes) else 0
                if p["input_rows"] != want:
                    problems.append(f"spark batch {b} read {p['input_rows']} rows, file {b} holds {want}")
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(case_dir, "sluice_batches.json")) as f:
            offsets = json.load(f)["offsets"]
        for n, o in offsets.items():
            b = int(n)
            srcs = o.get("sources", []) if isinstance(o, dict) else []
            last = [s.get("end", {}).get("lastFile") for s in srcs if isinstance(s, dict)]
            if last and b < len(case["files"]) and last[0] not in (None, case["files"][b]):
                problems.append(f"sluice batch {b} read up to {last[0]}, not {case['files'][b]}")
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return problems


def compare_case(case_dir: str) -> dict:
    case = cases.load_case(case_dir)
    cols, ts_cols = case["columns"], set(case["timestamp_columns"])
    res = {
        "id": case["id"], "dir": case_dir, "kind": case["kind"], "mode": case["mode"],
        "watermark_ms": case["watermark"]["delay_ms"] if case["watermark"] else None,
        "probe": bool(case.get("probe")),
    }
    sp_err = os.path.join(case_dir, "spark_error.txt")
    sl_err = os.path.join(case_dir, "sluice_error.txt")
    sp_out = os.path.join(case_dir, "spark.jsonl")
    sl_out = os.path.join(case_dir, "sluice.jsonl")
    spark_refused = os.path.exists(sp_err)
    sluice_refused = os.path.exists(sl_err)
    if spark_refused or sluice_refused:
        res["spark_error"] = first_line(sp_err) if spark_refused else None
        res["sluice_error"] = first_line(sl_err) if sluice_refused else None
        if spark_refused and sluice_refused:
            res.update(outcome="both_refused", equal=True, union_equal=True)
        else:
            res.update(outcome="acceptance", equal=False, union_equal=False)
        return res
    if not os.path.exists(sp_out) or not os.path.exists(sl_out):
        missing = [n for n, p in (("spark", sp_out), ("sluice", sl_out)) if not os.path.exists(p)]
        res.update(outcome="missing", equal=False, union_equal=False, missing=missing)
        return res
    order = input_order_problems(case_dir, case)
    if order:
        # Not a difference between the engines: the harness fed them otherwise.
        res.update(outcome="harness", equal=False, union_equal=False, harness=order)
        return res
    spark = read_output(sp_out, cols, ts_cols)
    sluice = read_output(sl_out, cols, ts_cols)
    batch_diffs = []
    for b in sorted(set(spark) | set(sluice)):
        only_sp, only_sl = multiset_diff(spark.get(b, []), sluice.get(b, []))
        if only_sp or only_sl:
            batch_diffs.append({"batch": b, "spark_only": only_sp, "sluice_only": only_sl})
    if case["mode"] == "complete":
        last_sp = spark[max(spark)] if spark else []
        last_sl = sluice[max(sluice)] if sluice else []
        f_sp, f_sl = multiset_diff(last_sp, last_sl)
        set_sp = {r for rows in spark.values() for r in rows}
        set_sl = {r for rows in sluice.values() for r in rows}
        s_sp, s_sl = multiset_diff(sorted(set_sp, key=repr), sorted(set_sl, key=repr))
        union_sp, union_sl = f_sp + [r for r in s_sp if r not in f_sp], f_sl + [r for r in s_sl if r not in f_sl]
    else:
        union_sp, union_sl = multiset_diff(
            [r for rows in spark.values() for r in rows], [r for rows in sluice.values() for r in rows]
        )
    res["equal"] = not batch_diffs
    res["union_equal"] = not union_sp and not union_sl
    res["outcome"] = "equal" if res["equal"] else ("alignment" if res["union_equal"] else "results")
    res["spark_batches_with_rows"] = sorted(spark)
    res["sluice_batches_with_rows"] = sorted(sluice)
    res["batch_diffs"] = [
        {"batch": d["batch"], "spark_only": [show_row(r) for r in d["spark_only"]],
         "sluice_only": [show_row(r) for r in d["sluice_only"]]}
        for d in batch_diffs
    ]
    res["union_spark_only"] = [show_row(r) for r in union_sp]
    res["union_sluice_only"] = [show_row(r) for r in union_sl]
    # Batch counts: what each engine ran (Spark: foreachBatch calls; Sluice: commits).
    try:
        with open(os.path.join(case_dir, "spark_batches.json")) as f:
            res["spark_batches"] = len(json.load(f)["batches"])
        with open(os.path.join(case_dir, "sluice_batches.json")) as f:
            sl = json.load(f)
        res["sluice_batches"] = len(sl["commits"])
        if sl.get("notes"):
            res["sluice_notes"] = sl["notes"]
    except (OSError, ValueError, KeyError):
        pass
    return res


def summary_line(res: dict, width: int = 400) -> str:
    wm = "none" if res["watermark_ms"] is None else f"{res['watermark_ms']}ms"
    head = f"{res['status']:5} {res['id']} {res['kind']}/{res['mode']} wm={wm}"
    o = res["outcome"]
    if o == "equal":
        tail = f"{sum(1 for _ in res.get('spark_batches_with_rows', []))} batches with rows equal"
    elif o == "both_refused":
        tail = "both refuse the query: spark: " + (res["spark_error"] or "")[:100]
    elif o == "acceptance":
        tail = (f"spark: {res['spark_error'] or 'runs it'}; sluice: {res['sluice_error'] or 'runs it'}")
    elif o == "missing":
        tail = "no output from " + ", ".join(res["missing"])
    elif o == "harness":
        tail = "the engines did not read the same file in each batch: " + "; ".join(res["harness"][:3])
    else:
        d = res["batch_diffs"][0]
        kinds = "batch alignment only (union equal)" if o == "alignment" else "results differ"
        tail = (f"{kinds}; {len(res['batch_diffs'])} batch(es) differ, first {d['batch']}: "
                f"spark-only {len(d['spark_only'])} {' '.join(d['spark_only'][:2])} "
                f"sluice-only {len(d['sluice_only'])} {' '.join(d['sluice_only'][:2])}")
        if "spark_batches" in res and res["spark_batches"] != res["sluice_batches"]:
            tail += f"; batches run: spark {res['spark_batches']}, sluice {res['sluice_batches']}"
    if res.get("sluice_notes"):
        tail += f"; reading Sluice's output: {'; '.join(res['sluice_notes'][:2])}"
    if res.get("known"):
        tail = f"[known: {res['known'][:80]}] {tail}"
    line = f"{head}  {tail}"
    return line if len(line) <= width else line[: width - 3] + "..."


def table(results: list[dict]) -> str:
    cols = ["cases", "pass", "known", "fail", "alignment", "results", "acceptance"]
    groups: dict = defaultdict(Counter)
    for r in results:
        g = groups[(r["kind"], r["mode"])]
        g["cases"] += 1
        if r["status"] == "PASS":
            g["pass"] += 1
        elif r["status"] == "KNOWN":
            g["known"] += 1
        else:
            g["fail"] += 1
        if r["outcome"] in ("alignment", "results", "acceptance"):
            g[r["outcome"]] += 1
        elif r["outcome"] in ("missing", "harness"):
            g["results"] += 1
    total = Counter()
    for g in groups.values():
        total.update(g)
    lines = [f"{'kind/mode':22}" + "".join(f"{c:>11}" for c in cols)]
    for key in sorted(groups, key=lambda km: (cases.KINDS.index(km[0]) if km[0] in cases.KINDS else 99, km[1])):
        lines.append(f"{key[0] + '/' + key[1]:22}" + "".join(f"{groups[key][c]:>11}" for c in cols))
    lines.append(f"{'total':22}" + "".join(f"{total[c]:>11}" for c in cols))
    lines.append("(fail = not explained by known_differences.json; alignment = only the batches "
                 "differ, the union agrees; results = the rows differ; acceptance = one engine refuses)")
    return "\n".join(lines)


def judge(res: dict, known: list[dict]) -> dict:
    if res["outcome"] in ("equal", "both_refused"):
        res["status"] = "PASS"
    else:
        reason = known_reason(known, res | {"watermark": res["watermark_ms"] is not None}, res["outcome"])
        res["status"] = "KNOWN" if reason else "FAIL"
        if reason:
            res["known"] = reason
    return res


def detail(case_dir: str) -> None:
    """One case, batch by batch: its input, each engine's rows and watermark."""
    case = cases.load_case(case_dir)
    res = compare_case(case_dir)
    print(f"case {case['id']}: {case['kind']}/{case['mode']}, watermark "
          f"{case['watermark']['delay_ms'] if case['watermark'] else 'none'} ms, params {case['params']}")
    print(f"sql: {case['sql']}")
    for i, name in enumerate(case["files"]):
        with open(os.path.join(case_dir, "input", name)) as f:
            rows = [json.loads(l) for l in f if l.strip()]
        print(f"  input {name} (batch {i}): " + (", ".join(f"{r['k']} {r['v']} {r['ts']}" for r in rows) or "(empty)"))
    try:
        if case["kind"] == "filter":
            # Spark pushes the WHERE into the JSON scan: numInputRows counts
            # the rows that pass it.
            raise KeyError
        with open(os.path.join(case_dir, "spark_batches.json")) as f:
            for p in json.load(f)["progress"]:
                print(f"  spark batch {p['batch']}: {p['input_rows']} rows in, watermark {p['watermark']}, "
                      f"max {p['max_event_time']}, dropped {p['dropped_by_watermark']}, state {p['state_rows']}")
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(case_dir, "sluice_batches.json")) as f:
            offsets = json.load(f)["offsets"]
        for n in sorted(offsets, key=int):
            o = offsets[n]
            wms = o.get("watermarks") if isinstance(o, dict) else None
            if wms:
                shown = {k: (cases.fmt_ts(v * 1000) if isinstance(v, int) and k.endswith("Ms") else v)
                         for k, v in wms.items()}
                print(f"  sluice batch {n}: watermarks {shown}")
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    if res["outcome"] in ("acceptance", "both_refused", "missing", "harness"):
        print(summary_line(judge(res, [])))
        return
    cols, ts_cols = case["columns"], set(case["timestamp_columns"])
    spark = read_output(os.path.join(case_dir, "spark.jsonl"), cols, ts_cols)
    sluice = read_output(os.path.join(case_dir, "sluice.jsonl"), cols, ts_cols)
    for b in sorted(set(spark) | set(sluice)):
        only_sp, only_sl = multiset_diff(spark.get(b, []), sluice.get(b, []))
        print(f"batch {b}: spark {len(spark.get(b, []))} rows, sluice {len(sluice.get(b, []))} rows"
              + ("" if only_sp or only_sl else ", equal"))
        for r in sorted(only_sp, key=repr):
            print(f"    spark only:  {show_row(r)}")
        for r in sorted(only_sl, key=repr):
            print(f"    sluice only: {show_row(r)}")
    print(summary_line(judge(res, [])))


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--known", default=os.path.join(here, "known_differences.json"))
    ap.add_argument("--summary")
    ap.add_argument("--detail", action="store_true")
    args = ap.parse_args()
    if args.detail:
        for d in args.dirs:
            detail(d)
        return 0
    known = load_known(args.known)
    results = []
    for d in args.dirs:
        res = judge(compare_case(d), known)
        with open(os.path.join(d, "diff.json"), "w") as f:
            json.dump(res, f, indent=1, default=repr)
            f.write("\n")
        print(summary_line(res), flush=True)
        results.append(res)
    print()
    print(table(results))
    failed = [r for r in results if r["status"] == "FAIL"]
    counts = Counter(r["status"] for r in results)
    if counts["KNOWN"]:
        print(f"\n{counts['KNOWN']} differences explained by known_differences.json")
    print(f"\n{counts['PASS'] + counts['KNOWN']} passed, {len(failed)} failed")
    if args.summary:
        slim = [{k: v for k, v in r.items() if k not in ("batch_diffs", "union_spark_only", "union_sluice_only")}
                | {"first_diff": r["batch_diffs"][0] if r.get("batch_diffs") else None}
                for r in results]
        by = defaultdict(Counter)
        for r in results:
            by[f"{r['kind']}/{r['mode']}"][r["status"]] += 1
            by[f"{r['kind']}/{r['mode']}"][r["outcome"]] += 1
        with open(args.summary, "w") as f:
            json.dump({"cases": len(results), "passed": counts["PASS"], "failed": len(failed),
                       "known": counts["KNOWN"], "by_kind_mode": by, "results": slim}, f, indent=1, default=repr)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
