# Readers of Delta tables for the e2e tests, set up once and cached:
#
#   delta_readers_setup   a Python virtualenv at $(delta_venv) with PySpark
#                         and delta-spark (PyPI), delta-rs's Python package
#                         (`deltalake`) and boto3; and delta-spark's jars
#                         (Maven Central) in $(delta_spark_jars_dir).
#   delta_spark_jars      those jars, less what PySpark ships, comma separated
#                         (for spark.jars).
#
# Why a virtualenv: delta-spark is built against one Spark release, and the
# newest (4.4.x) against Spark 4.2; on PySpark 4.3 (the one the differential
# tests use) its reader fails with NoSuchMethodError (LogicalRDD.<init>).
# The virtualenv keeps PySpark 4.2.0 for Delta apart from PySpark 4.3.
#   DELTA_SPARK_VERSION  delta-spark, PyPI and Maven (default 4.4.1 / 4.4.0)
#   DELTA_PYSPARK_VERSION PySpark for it (default 4.2.0)
#   SLUICE_CACHE         cache root (default ~/.cache/sluice)

DELTA_E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DELTA_PYPI_VERSION="${DELTA_SPARK_VERSION:-4.4.1}"
DELTA_MAVEN_VERSION="${DELTA_MAVEN_VERSION:-4.4.0}"
DELTA_PYSPARK_VERSION="${DELTA_PYSPARK_VERSION:-4.2.0}"

delta_venv() {
  echo "${SLUICE_CACHE:-$HOME/.cache/sluice}/delta-readers/venv-$DELTA_PYSPARK_VERSION-$DELTA_PYPI_VERSION"
}

delta_spark_jars_dir() {
  echo "${SLUICE_CACHE:-$HOME/.cache/sluice}/delta-readers/jars-$DELTA_MAVEN_VERSION"
}

delta_readers_setup() {
  local venv dir tmp
  venv="$(delta_venv)"
  if [[ ! -f "$venv/.complete" ]]; then
    echo "delta_readers_setup: PySpark $DELTA_PYSPARK_VERSION, delta-spark $DELTA_PYPI_VERSION, deltalake into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q "pyspark==$DELTA_PYSPARK_VERSION" "delta-spark==$DELTA_PYPI_VERSION" \
      deltalake pyarrow boto3 || { rm -rf "$venv"; return 1; }
    touch "$venv/.complete"
  fi
  dir="$(delta_spark_jars_dir)"
  if [[ ! -f "$dir/.complete" ]]; then
    command -v mvn > /dev/null || { echo "delta_readers_setup: mvn is not installed" >&2; return 1; }
    mkdir -p "$(dirname "$dir")"
    tmp="$(mktemp -d "$dir.tmp.XXXXXX")"
    echo "delta_readers_setup: downloading delta-spark_2.13 $DELTA_MAVEN_VERSION from Maven Central" >&2
    if ! mvn -q -B -Dstyle.color=never -s "$DELTA_E2E_DIR/../kafka/maven-settings.xml" \
        -f "$DELTA_E2E_DIR/delta-pom.xml" -Ddelta.version="$DELTA_MAVEN_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" > "$tmp.log" 2>&1; then
      cat "$tmp.log" >&2
      rm -rf "$tmp" "$tmp.log"; echo "delta_readers_setup: mvn failed" >&2; return 1
    fi
    rm -f "$tmp.log"
    touch "$tmp/.complete"
    mv -T "$tmp" "$dir" 2> /dev/null || rm -rf "$tmp"
  fi
  [[ -f "$dir/.complete" ]]
}

delta_spark_jars() {
  "$(delta_venv)/bin/python" - "$(delta_spark_jars_dir)" <<'PY'
import os, re, sys
import pyspark
have = {re.sub(r"-[0-9][^-]*$", "", f[:-4]) for f in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars")) if f.endswith(".jar")}
d = sys.argv[1]
print(",".join(sorted(os.path.join(d, f) for f in os.listdir(d)
                      if f.endswith(".jar") and re.sub(r"-[0-9][^-]*$", "", f[:-4]) not in have)))
PY
}
