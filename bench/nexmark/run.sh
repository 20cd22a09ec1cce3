#!/usr/bin/env bash
# Nexmark on Sluice, Apache Spark and Apache Flink, on the same generated
# data in one run. Sluice's seeded `nexmarkBid` generator writes the bid
# table of Nexmark's auction stream (EVENTS events in the standard mix of
# persons, auctions and bids, RATE events a second of event time) as
# JSON-lines files of EVENTS_PER_FILE events; then each query of
# queries.py (QUERIES, default all) runs through Sluice (release build,
# whole process), Spark (PySpark 4.3, local[2], the query's own time) and
# Flink (PyFlink 2.3, parallelism 2, the job's own time; the same bids as
# two sorted files, see below), each reading the files as a stream
# (FILES_PER_TRIGGER a micro-batch for Sluice and Spark)
# and writing JSON lines; report.py compares the three outputs and prints
# bids/s per core for each engine (2 cores each) and the ratios.
#
# Run: bench/nexmark/run.sh    Settings: EVENTS (2000000), RATE (10000),
# EVENTS_PER_FILE (200000), FILES_PER_TRIGGER (1), QUERIES, SLUICE_BIN,
# SLUICE_BENCH_TARGET, BENCH_DIR, PYFLINK_VERSION (2.3.0),
# FLINK_VENV (~/.cache/sluice/flink-venv).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bench=$(dirname "$here")
repo=$(dirname "$bench")
export PYTHONDONTWRITEBYTECODE=1
source "$bench/lib.sh"
EVENTS=${EVENTS:-2000000}
RATE=${RATE:-10000}
EVENTS_PER_FILE=${EVENTS_PER_FILE:-200000}
export FILES_PER_TRIGGER=${FILES_PER_TRIGGER:-1}
QUERIES=${QUERIES:-$(python3 "$here/queries.py" names)}

ensure_spark
# PyFlink in a virtualenv of its own: its pinned dependencies (pandas,
# pyarrow, apache-beam) would clash with PySpark's.
venv=${FLINK_VENV:-$HOME/.cache/sluice/flink-venv}
if ! "$venv/bin/python" -c 'import pyflink' 2>/dev/null; then
  say "installing apache-flink==${PYFLINK_VERSION:-2.3.0} into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "apache-flink==${PYFLINK_VERSION:-2.3.0}"
fi
build_sluice
make_work_dir sluice-nexmark

rm -rf "$work/input" "$work/input-flink"
cat >"$work/generate.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: nexmark-generate}
spec:
  sources:
    - name: bid
      generator: {kind: nexmarkBid, rowsPerSecond: $RATE, rowsPerBatch: $EVENTS_PER_FILE,
                  totalRows: $EVENTS, startTime: "2026-01-01T00:00:00Z", seed: 42}
  query: SELECT * FROM bid
  sink: {files: {path: $work/input}, format: json}
  trigger: {availableNow: true}
YAML
say "generating $EVENTS Nexmark events' bids with sluice"
"$sluice" run "$work/generate.yaml" 2>"$work/generate.log" || { cat "$work/generate.log" >&2; exit 1; }
bids=$(cat "$work"/input/part-*.jsonl | wc -l)
say "$bids bids in $(ls "$work"/input/part-*.jsonl | wc -l) files"
# Flink reads the same bids sorted by event time, cut in one file of
# contiguous times for each of its 2 readers. The sink that wrote the
# files writes a batch's rows partition after partition, so a file is out
# of order by up to its span: Sluice and Spark advance the watermark
# between batches and lose nothing to that, Flink advances it within its
# input and would drop the stragglers as late. And Flink's file source
# hands out a directory's files newest first: a reader given more than
# one would read older bids after newer ones.
mkdir -p "$work/input-flink"
python3 - "$work/input" "$work/input-flink" <<'PY'
import datetime, glob, json, os, sys
lines = [l for f in glob.glob(os.path.join(sys.argv[1], "part-*.jsonl")) for l in open(f) if l.strip()]
lines.sort(key=lambda l: datetime.datetime.fromisoformat(json.loads(l)["datetime"]))
half = len(lines) // 2
for i, part in enumerate((lines[:half], lines[half:])):
    open(os.path.join(sys.argv[2], f"bids-{i}.jsonl"), "w").writelines(part)
PY

# Nexmark's side input (q13), with a header row for Sluice's and Spark's
# CSV readers and without one for Flink's.
python3 "$here/queries.py" side-input "$work/side_input.csv" header
python3 "$here/queries.py" side-input "$work/side_input-flink.csv" no-header

for q in $QUERIES; do
  dir=$work/$q
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 "$here/queries.py" sluice-yaml "$q" "$work/input" "$dir/sluice/out" "$dir/sluice/checkpoint" \
    "$FILES_PER_TRIGGER" "$work/side_input.csv" >"$dir/sluice.yaml"
  say "$q: sluice"
  t0=$(now)
  SLUICE_STATE_DIR="$dir/state" "$sluice" run "$dir/sluice.yaml" 2>"$dir/sluice.log" &
  pid=$!
  ticks=0
  while kill -0 "$pid" 2>/dev/null; do
    t=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }' || echo 0)
    [ "${t:-0}" -gt "$ticks" ] && ticks=$t
    sleep 0.1
  done
  wait "$pid" || { tail -20 "$dir/sluice.log" >&2; exit 1; }
  t1=$(now)
  cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }')
  printf '{"query_seconds": %s, "cpu_seconds": %s}\n' "$(elapsed "$t0" "$t1")" "$cpu" >"$dir/sluice.json"

  say "$q: spark"
  python3 "$here/spark_nexmark.py" "$q" "$work/input" "$dir/spark/out" "$dir/spark/checkpoint" \
    "$dir/spark.json" "$work/side_input.csv" >"$dir/spark.log" 2>&1 || { tail -40 "$dir/spark.log" >&2; exit 1; }

  if python3 "$here/queries.py" runs-on-flink "$q"; then
    say "$q: flink"
    "$venv/bin/python" "$here/flink_nexmark.py" "$q" "$work/input-flink" "$dir/flink/out" \
      "$dir/flink.json" "$work/side_input-flink.csv" >"$dir/flink.log" 2>&1 || { tail -40 "$dir/flink.log" >&2; exit 1; }
  else
    say "$q: not on flink (queries.py says why)"
  fi
done

python3 "$here/report.py" "$work" "$bids" $QUERIES
