# Shared by the bench scripts (sourced): messages and timing, Spark's Python
# side, the sluice binary, the work directory, and the generated input.

say() { printf '\n>> %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Installs pyspark (PYSPARK_VERSION, default 4.3.0) and pyarrow with pip when
# missing; Spark needs Java 17 or later on the PATH.
ensure_spark() {
  if ! python3 -c 'import pyspark, pyarrow' 2>/dev/null; then
    say "installing pyspark==${PYSPARK_VERSION:-4.3.0} and pyarrow with pip"
    python3 -m pip install --quiet "pyspark==${PYSPARK_VERSION:-4.3.0}" pyarrow
  fi
  command -v java >/dev/null || { echo "Spark needs Java (17 or later) on the PATH" >&2; exit 1; }
}

# Sets `sluice`: $SLUICE_BIN when set (a binary built already), else a
# release build in its own target dir ($SLUICE_BENCH_TARGET, default
# ~/.cache/sluice/bench-target), apart from the test suite's.
build_sluice() {
  if [ -n "${SLUICE_BIN:-}" ]; then
    sluice=$SLUICE_BIN
    return
  fi
  local target=${SLUICE_BENCH_TARGET:-$HOME/.cache/sluice/bench-target}
  say "building sluice (release) into $target"
  # NB: with the Kafka example, as bench/kafka.sh builds it: an example
  # brings the dev-dependencies' features, and building `--bin sluice` alone
  # would resolve another feature set and build DataFusion a second time.
  (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --release --locked --bin sluice --example kafka_read_rate)
  sluice="$target/release/sluice"
}

# Sets `work` to $BENCH_DIR, or a new temporary directory named after $1.
make_work_dir() {
  work=${BENCH_DIR:-$(mktemp -d -t "$1.XXXXXX")}
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
  say "work dir: $work"
}

# Writes ROWS ($1) card transactions from Sluice's seeded generator, USERS
# ($2) users, RATE ($3) rows per second of event time (up to 2 s out of
# order), as JSON-lines files of 50,000 rows into $work/input.
generate_transactions() {
  local rows=$1 users=$2 rate=$3
  rm -rf "$work/input"
  cat >"$work/generate.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: bench-generate}
spec:
  sources:
    - name: transactions
      generator: {kind: transactions, rowsPerSecond: $rate, rowsPerBatch: 50000, totalRows: $rows,
                  startTime: "2026-01-01T00:00:00Z", seed: 42, users: $users}
  query: SELECT * FROM transactions
  sink: {files: {path: $work/input}, format: json}
  trigger: {availableNow: true}
YAML
  say "generating $rows input rows with sluice ($users users, $rate rows/s of event time)"
  "$sluice" run "$work/generate.yaml" 2>"$work/generate.log" || { cat "$work/generate.log" >&2; exit 1; }
  local written
  written=$(cat "$work"/input/part-*.jsonl | wc -l)
  if [ "$written" -ne "$rows" ]; then
    echo "the generator wrote $written rows, not $rows (log: $work/generate.log)" >&2
    exit 1
  fi
}

# The generated transactions' columns, as a file source declares them.
TRANSACTIONS_SCHEMA='      schema:
        - {name: transaction_id, type: string}
        - {name: user_id, type: string}
        - {name: amount, type: double}
        - {name: merchant_id, type: string}
        - {name: event_time, type: timestamp}
        - {name: device_type, type: string}'

# Spark's S3 connector (bench/s3a-pom.xml), fetched once from Maven Central
# into $SLUICE_CACHE/spark-s3a/<hadoop version>; prints its jars that PySpark
# does not ship, comma separated, for spark.jars.
spark_s3a_jars() {
  local hadoop dir tmp
  hadoop=$(python3 -c 'import os, pyspark; print(next(f[len("hadoop-client-api-"):-4] for f in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars")) if f.startswith("hadoop-client-api-")))')
  dir="${SLUICE_CACHE:-$HOME/.cache/sluice}/spark-s3a/$hadoop"
  if [ ! -f "$dir/jars/.complete" ]; then
    say "downloading hadoop-aws $hadoop and the AWS SDK modules it loads from Maven Central"
    mkdir -p "$dir"
    tmp=$(mktemp -d "$dir/jars.tmp.XXXXXX")
    mvn -q -B -Dstyle.color=never -s "$repo/e2e/kafka/maven-settings.xml" -f "$repo/bench/s3a-pom.xml" \
      -Dhadoop.version="$hadoop" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp" >&2 || { rm -rf "$tmp"; return 1; }
    touch "$tmp/.complete"
    mv -T "$tmp" "$dir/jars" 2>/dev/null || rm -rf "$tmp"
  fi
  python3 - "$dir/jars" <<'PY'
import os, re, sys
import pyspark
have = {re.sub(r"-[0-9][^-]*$", "", f[:-4]) for f in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars")) if f.endswith(".jar")}
d = sys.argv[1]
print(",".join(sorted(os.path.join(d, f) for f in os.listdir(d)
                      if f.endswith(".jar") and re.sub(r"-[0-9][^-]*$", "", f[:-4]) not in have)))
PY
}
