"""The differential suite: generated streaming cases through Apache Spark
Structured Streaming and Sluice, compared batch by batch.

    python3 suite.py --sluice BIN --work DIR [--cases N] [--seed S]
                     [--kinds tumble,hop] [--probe] [--known FILE]

1. generates N cases from the seed into DIR/cases/<id>-<kind>-<mode>-<wm>/
   (cases.py; --probe: every kind in every output mode, with and without a
   watermark, to see which combinations each engine refuses);
2. runs them all through Spark in one SparkSession (spark_side.py, a
   subprocess) and, meanwhile, each through `sluice run` (sluice_side.py);
3. compares (compare.py): one line per case, a table by kind and mode,
   DIR/summary.json; exits 1 if a difference is not explained by
   known_differences.json.

--reuse compares again the cases already in DIR (no generation);
--skip-spark / --skip-sluice keep that engine's earlier output.
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import cases  # noqa: E402
import compare  # noqa: E402
import sluice_side  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", required=True, help="the sluice binary")
    ap.add_argument("--work", required=True, help="work directory (its cases/ is replaced)")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", help="comma-separated kinds to keep (of " + ",".join(cases.KINDS) + ")")
    ap.add_argument("--probe", action="store_true", help="every kind x mode x watermark instead")
    ap.add_argument("--known", default=os.path.join(here, "known_differences.json"))
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--skip-spark", action="store_true")
    ap.add_argument("--skip-sluice", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    root = os.path.join(os.path.abspath(args.work), "cases")
    if args.reuse:
        dirs = sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    else:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        if args.probe:
            dirs = cases.generate_probe(root, args.seed)
        else:
            keep = args.kinds.split(",") if args.kinds else None
            bad = [k for k in keep or [] if k not in cases.KINDS]
            if bad:
                sys.exit(f"unknown kinds {bad}: the kinds are {cases.KINDS}")
            dirs = cases.generate(root, args.seed, args.cases, keep)
    print(f"{len(dirs)} cases (seed {args.seed}) in {root}", file=sys.stderr, flush=True)

    spark = None
    spark_log = os.path.join(args.work, "spark.log")
    if not args.skip_spark:
        # Spark's own chatter (JVM, log4j) goes to spark.log; its per-case
        # lines come here too, as they come (a thread drains the pipe).
        spark = subprocess.Popen(
            [sys.executable, os.path.join(here, "spark_side.py"), *dirs],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TZ="UTC"),
        )

        def drain():
            with open(spark_log, "w") as log:
                for line in spark.stderr:
                    log.write(line)
                    log.flush()
                    if line.startswith(("  spark [", "spark ")):
                        print(line.rstrip(), file=sys.stderr, flush=True)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
    t_start = time.perf_counter()
    sluice_seconds = None
    if not args.skip_sluice:
        for i, d in enumerate(dirs):
            status = sluice_side.run_case(os.path.abspath(args.sluice), d)
            print(f"  sluice [{i + 1}/{len(dirs)}] {os.path.basename(d)}: {status}", file=sys.stderr, flush=True)
        sluice_seconds = time.perf_counter() - t_start
    spark_seconds = None
    if spark:
        code = spark.wait()
        drainer.join()
        if code != 0:
            print(f"spark_side.py failed (exit {code}); see {spark_log}", file=sys.stderr)
            return 2
        spark_seconds = time.perf_counter() - t_start
    print(file=sys.stderr)
    summary = os.path.join(args.work, "summary.json")
    argv = ["--known", args.known, "--summary", summary, *dirs]
    sys.argv = ["compare.py", *argv]
    code = compare.main()
    total = time.perf_counter() - t0
    timing = ", ".join(f"{name} side {secs:.1f}s" for name, secs in (("sluice", sluice_seconds), ("spark", spark_seconds))
                       if secs is not None)
    print(f"\nwork dir: {os.path.abspath(args.work)} (summary: {summary}); {timing}; total {total:.1f}s")
    import json
    with open(summary) as f:
        failing = [r["dir"] for r in json.load(f)["results"] if r["status"] == "FAIL"]
    example = failing[0] if failing else (dirs[0] if dirs else "CASE_DIR")
    print(f"re-run one case{' (the first that failed)' if failing else ''}: "
          f"{os.path.join(here, 'run_case.sh')} {example}")
    return code


if __name__ == "__main__":
    sys.exit(main())
