"""Checks that Sluice and Spark wrote the same rows and prints the figures of
bench/stateless.sh.

    python3 bench/stateless_report.py RESULTS_JSON

RESULTS_JSON (written by bench/stateless.sh) holds the machine, the versions,
each engine's runs (seconds, input rows) and the two output directories.

Correctness: both Parquet outputs are read with pyarrow (Sluice: the files its
sink's manifests `_sluice_metadata/<N>` list, which must be the `part-*.parquet`
files of the directory; Spark: its `part-*.parquet` files, `_spark_metadata`
aside), normalised (strings as plain strings, timestamps as UTC microseconds,
rows sorted by transaction_id) and compared row for row, amount exactly as a
float. Exits 1 if they differ, after a summary of the differences.
"""

import glob
import json
import os
import sys
from statistics import median

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = [
    "transaction_id",
    "user_id",
    "merchant_id",
    "device_type",
    "event_time",
    "amount",
    "risk",
]


def sluice_files(out_dir: str) -> list[str]:
    """The files the manifests list, checked against the part files."""
    meta = os.path.join(out_dir, "_sluice_metadata")
    listed = []
    for name in sorted(os.listdir(meta), key=lambda n: int(n) if n.isdigit() else -1):
        if not name.isdigit():
            continue
        with open(os.path.join(meta, name)) as f:
            manifest = json.load(f)
        listed += [os.path.join(out_dir, file["path"]) for file in manifest["files"]]
    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))
    if sorted(listed) != parts:
        sys.exit(
            f"Sluice's manifests list {len(listed)} files but {out_dir} holds "
            f"{len(parts)} part files: {sorted(set(listed) ^ set(parts))[:5]}"
        )
    return listed


def spark_files(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))


def read(files: list[str]) -> tuple[pa.Table, pa.Schema]:
    """The rows of `files`, normalised, and the schema as written."""
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in COLUMNS}), pa.schema([])
    tables = [pq.read_table(f) for f in files]
    written = tables[0].schema.remove_metadata()
    normalised = []
    for t in tables:
        missing = [c for c in COLUMNS if c not in t.column_names]
        if missing:
            sys.exit(f"{files[0]}: columns {missing} missing; it has {t.column_names}")
        cols = {}
        for c in COLUMNS:
            a = t.column(c)
            if c == "event_time":
                # Any unit / zone to UTC microseconds; refuses to drop precision.
                if a.type.tz is None:
                    a = a.cast(pa.timestamp(a.type.unit, tz="UTC"))
                a = a.cast(pa.timestamp("us", tz="UTC"))
            elif c == "amount":
                a = a.cast(pa.float64())
            else:
                a = a.cast(pa.string())
            cols[c] = a
        normalised.append(pa.table(cols))
    table = pa.concat_tables(normalised).combine_chunks()
    table = table.sort_by([(c, "ascending") for c in COLUMNS])
    return table, written


def compare(sluice: pa.Table, spark: pa.Table) -> list[str]:
    """A summary of the differences, empty when the tables are equal."""
    problems = []
    if sluice.num_rows != spark.num_rows:
        problems.append(f"row counts differ: Sluice {sluice.num_rows}, Spark {spark.num_rows}")
    ids_sluice = set(sluice.column("transaction_id").to_pylist())
    ids_spark = set(spark.column("transaction_id").to_pylist())
    if len(ids_sluice) != sluice.num_rows:
        problems.append(f"Sluice wrote {sluice.num_rows - len(ids_sluice)} duplicate transaction_ids")
    if len(ids_spark) != spark.num_rows:
        problems.append(f"Spark wrote {spark.num_rows - len(ids_spark)} duplicate transaction_ids")
    only_sluice = sorted(ids_sluice - ids_spark)
    only_spark = sorted(ids_spark - ids_sluice)
    if only_sluice:
        problems.append(f"{len(only_sluice)} transaction_ids only in Sluice's output, e.g. {only_sluice[:5]}")
    if only_spark:
        problems.append(f"{len(only_spark)} transaction_ids only in Spark's output, e.g. {only_spark[:5]}")
    if problems:
        return problems
    for c in COLUMNS:
        a, b = sluice.column(c), spark.column(c)
        if a.equals(b):
            continue
        same = pc.fill_null(pc.equal(a, b), False)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        differ = pc.invert(pc.or_(same, both_null))
        idx = pc.indices_nonzero(differ)
        if len(idx) == 0:
            continue
        examples = [
            (sluice.column("transaction_id")[i].as_py(), a[i].as_py(), b[i].as_py())
            for i in idx.to_pylist()[:5]
        ]
        problems.append(
            f"column {c}: {len(idx)} rows differ, e.g. (transaction_id, Sluice, Spark) {examples}"
        )
    return problems


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("nan")


def main() -> None:
    with open(sys.argv[1]) as f:
        r = json.load(f)

    sluice_table, sluice_schema = read(sluice_files(r["sluice_out"]))
    spark_table, spark_schema = read(spark_files(r["spark_out"]))

    print()
    print("== machine and versions")
    print(f"machine:  {r['nproc']} CPUs ({r['cpu']}), {r['memory']} memory, {r['os']},"
          f" load average {r['loadavg']} before the runs")
    print(f"sluice:   commit {r['sluice_commit']} (release build)")
    print(f"spark:    {r['spark_version']} (PySpark, {r['spark_master']}, Java {r['java']}),"
          f" Parquet codec {r['spark_codec']}")
    print(f"pyarrow:  {pa.__version__}")

    print()
    print("== workload")
    print(f"input:    {r['rows']} rows in {r['input_files']} JSON-lines files"
          f" ({r['input_bytes'] / 1e6:.1f} MB), one file a micro-batch, availableNow")
    print("query:    filter + CASE projection (stateless) -> Parquet sink with checkpoint")

    print()
    print("== correctness")
    last_sluice, last_spark = r["sluice"]["runs"][-1], r["spark"]["runs"][-1]
    print(f"Sluice read {last_sluice['input_rows']} input rows in {last_sluice['batches']} batches;"
          f" Spark read {len(last_spark['files_read'])} files in {last_spark['batches']} batches"
          f" (its progress counts numInputRows={last_spark['progress_input_rows']}: the rows its"
          " JSON scan returned after the filter it pushes down into the parser)")
    print(f"Sluice output rows: {sluice_table.num_rows}")
    print(f"Spark output rows:  {spark_table.num_rows}")
    print(f"Sluice schema as written: {', '.join(f'{f.name} {f.type}' for f in sluice_schema)}")
    print(f"Spark schema as written:  {', '.join(f'{f.name} {f.type}' for f in spark_schema)}")
    problems = compare(sluice_table, spark_table)
    # Both engines must have read every input file, each once, one a batch.
    input_problems = []
    inputs = sorted(os.path.basename(f) for f in glob.glob(os.path.join(r["input_dir"], "part-*.jsonl")))
    for run in r["sluice"]["runs"]:
        if run["input_rows"] != r["rows"] or run["batches"] != len(inputs):
            input_problems.append(
                f"Sluice run {run['run']} read {run['input_rows']} rows in {run['batches']} batches,"
                f" not {r['rows']} rows in {len(inputs)}"
            )
    for run in r["spark"]["runs"]:
        if run["files_read"] != inputs or run["batches"] != len(inputs):
            input_problems.append(
                f"Spark run {run['run']} read {len(run['files_read'])} files in {run['batches']} batches"
                f" (e.g. {run['files_read'][:3]}), not the {len(inputs)} input files one a batch"
            )
    if problems or input_problems:
        print("RESULTS DIFFER:")
        for p in input_problems + problems:
            print(f"  - {p}")
    else:
        print(f"results identical: {sluice_table.num_rows} rows, equal row for row"
              " (sorted by transaction_id; event_time in UTC microseconds; amount exact)")

    print()
    print("== throughput" + (f" (best of {r['runs']} runs each)" if r["runs"] > 1 else ""))
    sluice_best = min(r["sluice"]["runs"], key=lambda x: x["seconds"])
    spark_query_best = min(r["spark"]["runs"], key=lambda x: x["query_seconds"])
    spark_total_best = min(r["spark"]["runs"], key=lambda x: x["seconds"])
    rows = [
        ("Sluice (process wall time)", r["rows"], sluice_table.num_rows,
         sluice_best["seconds"]),
        ("Spark (streaming query only)", r["rows"], spark_table.num_rows,
         spark_query_best["query_seconds"]),
        ("Spark (process, incl. JVM start)", r["rows"], spark_table.num_rows,
         spark_total_best["seconds"]),
    ]
    header = f"{'engine':<34} {'input rows':>11} {'output rows':>12} {'seconds':>9} {'input rows/s':>14}"
    print(header)
    print("-" * len(header))
    for name, inp, out, secs in rows:
        print(f"{name:<34} {inp:>11} {out:>12} {secs:>9.2f} {rate(inp, secs):>14,.0f}")
    if r["runs"] > 1:
        for engine, key in (("sluice", "seconds"), ("spark", "query_seconds"), ("spark", "seconds")):
            times = ", ".join(f"{x[key]:.2f}" for x in r[engine]["runs"])
            print(f"  all runs, {engine} {key}: {times}")

    print()
    print("median batch (ms), last run: Sluice"
          f" {median(r['sluice']['runs'][-1]['batch_ms'])}, Spark {median(r['spark']['runs'][-1]['batch_ms'])}"
          f" ({len(r['sluice']['runs'][-1]['batch_ms'])} and {len(r['spark']['runs'][-1]['batch_ms'])} batches;"
          f" Spark's first batch {r['spark']['runs'][-1]['batch_ms'][0]} ms, Sluice's"
          f" {r['sluice']['runs'][-1]['batch_ms'][0]} ms)")

    s_rate = rate(rows[0][1], rows[0][3])
    print()
    print(f"Sluice is {s_rate / rate(rows[1][1], rows[1][3]):.1f}× Spark"
          " (input rows/s; Spark's streaming query time, start() to awaitTermination())")
    print(f"Sluice is {s_rate / rate(rows[2][1], rows[2][3]):.1f}× Spark"
          " (input rows/s; Spark's whole process, JVM start included)")

    if problems or input_problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
