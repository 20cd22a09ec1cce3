"""Compares the outputs of bench/nexmark/run.sh's engines and prints the
table: bids/s per core of Sluice, Spark and Flink on each query (2 cores
each: Sluice's process, Spark's local[2], Flink's parallelism 2), the
ratios, and whether the results agree.

    python3 bench/nexmark/report.py WORK_DIR BIDS QUERY...

Rows are compared as multisets, column names in lower case (a partitioned
output's columns taken from its `column=value` directories when the files
leave them out, as Spark's and Flink's do), timestamps as
epoch milliseconds and numbers to 3 decimals (q1 and q14's price is a
double in Sluice, a decimal in Spark and Flink). Stateless queries must
agree on every row. A windowed query's rows are compared where every
engine must have written them: windows that end at or before the final
watermark (the last bid's time minus 4 seconds). Sluice and Spark write
exactly those, in append mode; Flink's bounded source ends with a watermark
at the end of time and writes every window, so its later ones are left out
of the comparison (and counted).
"""

import collections
import datetime
import functools
import json
import os
import re
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from queries import NOT_RUN, QUERIES, WATERMARK_SECONDS  # noqa: E402

ENGINES = ("sluice", "spark", "flink")
CORES = 2
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


@functools.lru_cache(maxsize=1 << 16)
def epoch_ms(text: str) -> int:
    text = text.replace(" ", "T")
    if not text.endswith("Z") and "+" not in text[10:]:
        text += "Z"
    return round(datetime.datetime.fromisoformat(text).timestamp() * 1000)


def value(v):
    if isinstance(v, str) and TIMESTAMP.match(v):
        return epoch_ms(v)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    return round(float(v), 3)


def rows_of(out_dir: str) -> list[tuple]:
    rows = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        # `column=value` directories (values escaped as Spark and Flink
        # escape them in paths).
        partition = dict(
            (k.lower(), urllib.parse.unquote(v))
            for k, _, v in (
                segment.partition("=") for segment in os.path.relpath(root, out_dir).split(os.sep)
            )
            if _
        )
        for name in sorted(files):
            if name.startswith(("_", ".")):
                continue
            with open(os.path.join(root, name)) as lines:
                for line in lines:
                    if line.strip():
                        record = {k.lower(): v for k, v in json.loads(line).items()}
                        for k, v in partition.items():
                            record.setdefault(k, v)
                        rows.append(tuple(sorted((k, value(v)) for k, v in record.items())))
    return rows


def final_watermark(work: str) -> int:
    """The last bid's time minus the delay, in epoch ms: files hold the
    bids in event-time order, the last file the latest."""
    inputs = sorted(f for f in os.listdir(os.path.join(work, "input")) if f.startswith("part-"))
    with open(os.path.join(work, "input", inputs[-1])) as lines:
        latest = max(value(json.loads(line)["datetime"]) for line in lines if line.strip())
    return latest - WATERMARK_SECONDS * 1000


def main() -> None:
    work, bids, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    watermark = final_watermark(work)
    summary, lines = {}, []
    for q in names:
        d = os.path.join(work, q)
        # The engines that ran the query (Flink does not run every one).
        engines = [e for e in ENGINES if e != "flink" or QUERIES[q]["flink"]]
        times = {e: json.load(open(os.path.join(d, f"{e}.json"))) for e in engines}
        outputs = {e: rows_of(os.path.join(d, e, "out")) for e in engines}
        window = QUERIES[q]["window"]
        later = {}
        if window:
            for e in engines:
                kept = [r for r in outputs[e] if dict(r)[window] <= watermark]
                later[e] = len(outputs[e]) - len(kept)
                outputs[e] = kept
        counts = {e: collections.Counter(outputs[e]) for e in engines}
        problems = []
        for e in engines[1:]:
            if counts[e] != counts["sluice"]:
                only_s = sum((counts["sluice"] - counts[e]).values())
                only_e = sum((counts[e] - counts["sluice"]).values())
                problems.append(f"{e}: {only_s} rows only in Sluice's, {only_e} only in {e}'s")
        for e in ("sluice", "spark"):
            if later.get(e):
                problems.append(f"{e} wrote {later[e]} windows past the final watermark")
        rate = {e: bids / times[e]["query_seconds"] / CORES for e in engines}
        summary[q] = {
            "rows": len(outputs["sluice"]),
            "seconds": {e: times[e]["query_seconds"] for e in engines},
            "bids_per_second_per_core": rate,
            "sluice_cores_busy": times["sluice"]["cpu_seconds"] / times["sluice"]["query_seconds"],
            "flink_windows_after_watermark": later.get("flink", 0),
            "equal": not problems,
            "problems": problems,
        }
        check = "equal" if not problems else "DIFFERENT: " + "; ".join(problems)
        flink, versus_flink = "not run", "-"
        if "flink" in rate:
            flink, versus_flink = f"{rate['flink']:,.0f}", f"{rate['sluice'] / rate['flink']:.1f}x"
        lines.append(
            f"| {q} | {QUERIES[q]['about']} | {rate['sluice']:,.0f} | {rate['spark']:,.0f} | "
            f"{flink} | {rate['sluice'] / rate['spark']:.1f}x | "
            f"{versus_flink} | {len(outputs['sluice']):,} {check} |"
        )
    spark_version = json.load(open(os.path.join(work, names[0], "spark.json")))["spark_version"]
    flink_version = next(
        (
            json.load(open(os.path.join(work, q, "flink.json")))["flink_version"]
            for q in names
            if QUERIES[q]["flink"]
        ),
        "(not run)",
    )
    print(
        f"\nNexmark, {bids:,} bids, {os.cpu_count()} cores; bids/s per core (each engine on 2 cores: "
        f"Sluice's whole process, Spark {spark_version}'s and Flink {flink_version}'s query time)\n"
    )
    print("| query | what | Sluice | Spark | Flink | Sluice / Spark | Sluice / Flink | rows compared |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))
    for q in names:
        if not QUERIES[q]["flink"]:
            print(f"\n{q} not on Flink: {QUERIES[q]['flink_not_run']}")
    print("\nNot run:")
    for q, why in NOT_RUN.items():
        print(f"  {q}: {why}")
    with open(os.path.join(work, "summary.json"), "w") as out:
        json.dump(summary, out, indent=1)
    if any(not s["equal"] for s in summary.values()):
        sys.exit("the engines' results differ (above)")


if __name__ == "__main__":
    main()
