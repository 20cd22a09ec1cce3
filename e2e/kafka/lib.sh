# shellcheck shell=bash
# A real Apache Kafka broker for the end-to-end tests: single node, KRaft
# combined mode (broker and controller in one JVM), from Maven Central jars.
#
#   source e2e/kafka/lib.sh
#   kafka_start "$work/kafka"          # fetches the jars on first use
#   trap kafka_kill EXIT               # or kafka_stop, for a clean shutdown
#   kafka_topic_create transactions 4
#   ... use "$KAFKA_BOOTSTRAP" (127.0.0.1:PORT) ...
#   kafka_stop; sleep 30; kafka_restart  # same ports, same data
#   kafka_group_describe my-group
#
# Call kafka_start and kafka_restart directly, not inside $(...), a pipeline
# or ( ... ): they set the state variables below in the calling shell, and the
# broker is stopped when the shell that started it exits (KAFKA_DETACH=1 to
# keep it). Another script can still reach a broker by its folder:
# `kafka_restart DIR`, `kafka_stop DIR`, `kafka_kill DIR`, or `source DIR/kafka.env`.
#
# Safe under `set -euo pipefail`. Every function returns non-zero (with a
# message on standard error) when it fails. Java 17+ and Maven 3.6.3+ are
# needed; the first kafka_fetch downloads about 55 MB from Maven Central.
#
# Settings (environment, all optional):
#   KAFKA_VERSION           Kafka version (default 4.3.1)
#   SLUICE_CACHE            cache root (default ~/.cache/sluice); the jars go
#                           to $SLUICE_CACHE/kafka/$KAFKA_VERSION/libs
#   KAFKA_HEAP_OPTS         broker heap (default -Xms256m -Xmx512m)
#   KAFKA_AUTO_CREATE_TOPICS  auto.create.topics.enable (default false:
#                           tests create their topics with kafka_topic_create)
#   KAFKA_EXTRA_PROPERTIES  more server.properties lines (newline separated),
#                           appended last, so they override the defaults
#   KAFKA_START_TIMEOUT     seconds to wait for the broker (default 90)
#   KAFKA_STOP_TIMEOUT      seconds to wait for a clean stop (default 60)
#   KAFKA_DETACH            1: the broker outlives the shell that started it
#   KAFKA_LISTEN_PORT       the clients' port (default: a free one)
#   KAFKA_TOOLS_CDS         0: no class-data-sharing archive for the tools
#
# State, set by kafka_start and kafka_restart (also written to DIR/kafka.env):
#   KAFKA_BOOTSTRAP=127.0.0.1:PORT  KAFKA_PORT  KAFKA_CONTROLLER_PORT
#   KAFKA_PID  KAFKA_DIR  KAFKA_LOG (DIR/kafka.log, appended across restarts)

KAFKA_E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${KAFKA_VERSION:=4.3.1}"
: "${KAFKA_BOOTSTRAP:=}" "${KAFKA_PORT:=}" "${KAFKA_CONTROLLER_PORT:=}"
: "${KAFKA_PID:=}" "${KAFKA_DIR:=}" "${KAFKA_LOG:=}"

# The Kafka cache directory of this version (libs/ inside it).
kafka_home() {
  echo "${SLUICE_CACHE:-$HOME/.cache/sluice}/kafka/$KAFKA_VERSION"
}

# What a script running `sluice` against a broker from Python needs: the
# confluent-kafka client, the workspace's binaries built as `cargo test
# --workspace` builds them (the test suite's feature set: nothing rebuilt),
# and the broker's jars. Run from the repository's root.
kafka_e2e_prepare() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}" PYTHONDONTWRITEBYTECODE=1
  python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install -q confluent-kafka || return 1
  cargo test --workspace --locked --quiet --no-run || return 1
  kafka_fetch
}

# Download the broker and tool jars into the cache, once. Idempotent and safe
# to run from two scripts at once (each copies into its own temporary folder
# and renames it into place).
kafka_fetch() {
  local home libs tmp
  home="$(kafka_home)"
  libs="$home/libs"
  [[ -f "$libs/.complete" ]] && return 0
  command -v mvn > /dev/null || { echo "kafka_fetch: mvn is not installed (apt-get install -y maven)" >&2; return 1; }
  command -v java > /dev/null || { echo "kafka_fetch: java is not installed (Java 17+)" >&2; return 1; }
  mkdir -p "$home"
  tmp="$(mktemp -d "$home/libs.tmp.XXXXXX")"
  echo "kafka_fetch: downloading Kafka $KAFKA_VERSION jars from Maven Central into $libs" >&2
  if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_E2E_DIR/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" > "$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"
    echo "kafka_fetch: mvn failed to fetch Kafka $KAFKA_VERSION" >&2
    return 1
  fi
  rm -f "$tmp.log"
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar "$tmp"/kafka-tools-"$KAFKA_VERSION".jar > /dev/null || {
    rm -rf "$tmp"; echo "kafka_fetch: the broker or tools jar is missing" >&2; return 1; }
  touch "$tmp/.complete"
  if ! mv -T "$tmp" "$libs" 2> /dev/null; then
    rm -rf "$tmp"   # another script got there first
    [[ -f "$libs/.complete" ]] || { echo "kafka_fetch: could not move the jars into $libs" >&2; return 1; }
  fi
}

# Run one Kafka class with the cached jars: kafka_java [JVM-OPTIONS...] CLASS ARGS...
# A quick-starting JVM for the command-line tools, warnings on stderr. The
# first call of an org.apache.kafka.tools class also writes a class-data-
# sharing archive of the classes it loaded (kafka_home/tools-*.jsa), which later
# calls map: a tool call then takes about 0.6 s instead of 1.2 s.
# KAFKA_TOOLS_CDS=0 turns that off.
kafka_java() {
  kafka_fetch || return 1
  local home cds=() tmp="" rc=0 jsa
  home="$(kafka_home)"
  if [[ "${KAFKA_TOOLS_CDS:-1}" == 1 ]]; then
    # An archive only fits the JVM that wrote it: name it after that JVM.
    jsa="$home/tools-$(stat -L -c %Y-%s "$(command -v java)").jsa"
    if [[ -f "$jsa" ]]; then
      cds=(-XX:SharedArchiveFile="$jsa")
    elif [[ "${1:-}" == org.apache.kafka.tools.* ]]; then   # an admin-client tool, not StorageTool
      tmp="$jsa.tmp.$$.$RANDOM"
      cds=(-XX:ArchiveClassesAtExit="$tmp" -Xlog:cds*=off:stderr)   # its warnings are harmless noise
    fi
  fi
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Xlog:disable -Xlog:all=warning:stderr "${cds[@]}" \
    -Dlog4j2.configurationFile="$KAFKA_E2E_DIR/tools-log4j2.properties" \
    -cp "$home/libs/*" "$@" || rc=$?
  if [[ -n "$tmp" ]]; then
    if [[ $rc == 0 && -s "$tmp" ]]; then mv -f "$tmp" "$jsa"; else rm -f "$tmp"; fi
  fi
  return $rc
}

# A free TCP port on 127.0.0.1, below the kernel's ephemeral range, so that
# no client connection takes it while the broker is stopped between
# kafka_stop and kafka_restart.
kafka_free_port() {
  python3 - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    low = 32768
for port in random.sample(range(15000, max(low, 15001)), min(200, max(low - 15000, 1))) + [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print(s.getsockname()[1])
        break
    except OSError:
        pass
    finally:
        s.close()
PY
}

_kafka_since() {   # EPOCHREALTIME: seconds since, e.g. 4.2
  local now="$EPOCHREALTIME"
  local ms=$(( (${now/./} - ${1/./}) / 1000 ))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

_kafka_alive() {   # PID: a running broker (a zombie counts as dead; so does a reused pid)
  local pid="$1" state
  [[ -n "$pid" ]] && kill -0 "$pid" 2> /dev/null || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2> /dev/null || true)"
  [[ "$state" != Z && "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null || true)" == *"kafka.Kafka "* ]]
}

_kafka_require() {   # the state of a started broker
  [[ -n "$KAFKA_BOOTSTRAP" ]] || { echo "${FUNCNAME[1]}: no broker: call kafka_start DIR first" >&2; return 1; }
}

_kafka_save_env() {
  cat > "$KAFKA_DIR/kafka.env" <<EOF
KAFKA_VERSION=$KAFKA_VERSION
KAFKA_DIR=$KAFKA_DIR
KAFKA_LOG=$KAFKA_LOG
KAFKA_PORT=$KAFKA_PORT
KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT
KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP
KAFKA_PID=$KAFKA_PID
EOF
}

# Start a new single-node broker whose files (server.properties, data/,
# kafka.log, kafka.env) live in DIR (created; must not hold a broker already).
# Picks two free loopback ports, formats the storage, starts the broker in the
# background and returns when it serves requests. Exports KAFKA_BOOTSTRAP,
# KAFKA_PID and the rest of the state above.
kafka_start() {
  local dir="${1:?kafka_start DIR}" cluster_id
  kafka_fetch || return 1
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [[ -e "$dir/data/meta.properties" ]]; then
    echo "kafka_start: $dir already holds a broker's data: use kafka_restart $dir, or an empty folder" >&2
    return 1
  fi
  KAFKA_DIR="$dir"
  KAFKA_LOG="$dir/kafka.log"
  # KAFKA_LISTEN_PORT: a fixed port for the clients (e.g. 9092, for the
  # examples); otherwise a free one.
  KAFKA_PORT="${KAFKA_LISTEN_PORT:-$(kafka_free_port)}"
  KAFKA_CONTROLLER_PORT="$(kafka_free_port)"
  while [[ "$KAFKA_CONTROLLER_PORT" == "$KAFKA_PORT" ]]; do KAFKA_CONTROLLER_PORT="$(kafka_free_port)"; done
  KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
  KAFKA_PID=""
  cat > "$dir/server.properties" <<EOF
# Written by e2e/kafka/lib.sh (kafka_start): one node, KRaft combined mode.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=${KAFKA_AUTO_CREATE_TOPICS:-false}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=-1
# After a crash (SIGKILL) the restarted broker cannot register until the
# controller expires its previous session (default 9 s): shorter here.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=5000
${KAFKA_EXTRA_PROPERTIES:-}
EOF
  # What `kafka.tools.StorageTool random-uuid` prints (a base64url UUID not
  # starting with "-"), without starting a JVM for it.
  cluster_id="$(python3 -c 'import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break')" || return 1
  local t0="$EPOCHREALTIME"
  if ! kafka_java kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
      --config "$dir/server.properties" > "$dir/format.log" 2>&1; then
    echo "kafka_start: formatting the storage failed:" >&2
    cat "$dir/format.log" >&2
    return 1
  fi
  echo "kafka_start: storage formatted in $(_kafka_since "$t0")s" >&2
  _kafka_launch
}

# Start the broker of DIR (default: the last one started in this shell) again,
# on the same ports with the same data, and wait until it serves requests.
kafka_restart() {
  if [[ $# -gt 0 ]]; then
    [[ -f "$1/kafka.env" ]] || { echo "kafka_restart: $1/kafka.env not found: not a kafka_start folder" >&2; return 1; }
    # shellcheck disable=SC1091
    source "$1/kafka.env"
  fi
  _kafka_require || return 1
  if _kafka_alive "$KAFKA_PID"; then
    echo "kafka_restart: the broker (pid $KAFKA_PID) is still running: kafka_stop or kafka_kill it first" >&2
    return 1
  fi
  _kafka_launch
}

# Start the JVM and wait for it (internal; the state variables are set).
_kafka_launch() {
  local offset deadline waited=0 t0="$EPOCHREALTIME"
  offset=0
  [[ -f "$KAFKA_LOG" ]] && offset="$(stat -c %s "$KAFKA_LOG")"
  # A port still held (e.g. by a broker killed a moment ago) fails the start
  # with a clear log line; wait briefly for it to be released.
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    for _ in $(seq 1 50); do
      (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null || break
      sleep 0.2
    done
  done
  echo "=== kafka_start $(date -Is) ===" >> "$KAFKA_LOG"
  # The broker gets SIGTERM when the shell that started it exits, whatever
  # way it exits (setpriv --pdeathsig), so a test killed mid-run leaves no
  # broker behind; KAFKA_DETACH=1 lets it outlive the shell instead.
  local guard=()
  if [[ "${KAFKA_DETACH:-0}" == 1 ]]; then
    guard=(setsid)
  elif command -v setpriv > /dev/null; then
    guard=(setpriv --pdeathsig TERM)
  fi
  # shellcheck disable=SC2086
  "${guard[@]}" java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_E2E_DIR/log4j2.properties" \
    -Dkafka.logs.dir="$KAFKA_DIR" \
    -cp "$(kafka_home)/libs/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
    >> "$KAFKA_LOG" 2>&1 < /dev/null &
  KAFKA_PID=$!
  echo "$KAFKA_PID" > "$KAFKA_DIR/kafka.pid"
  _kafka_save_env
  export KAFKA_BOOTSTRAP KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_PID KAFKA_DIR KAFKA_LOG
  deadline=$((${KAFKA_START_TIMEOUT:-90} * 10))
  # "Kafka Server started" is logged once the broker caught up with the
  # metadata log and was unfenced: it then serves produce, fetch, admin,
  # group and transaction requests.
  # (Not `tail | grep -q`: under pipefail, tail's SIGPIPE would fail a match.)
  until grep -q 'Kafka Server started' <(tail -c +"$((offset + 1))" "$KAFKA_LOG"); do
    if ! _kafka_alive "$KAFKA_PID"; then
      wait "$KAFKA_PID" 2> /dev/null || true
      echo "kafka_start: the broker exited during startup; the end of $KAFKA_LOG:" >&2
      tail -n 40 "$KAFKA_LOG" >&2
      KAFKA_PID=""
      return 1
    fi
    if ((waited >= deadline)); then
      echo "kafka_start: the broker did not start within ${KAFKA_START_TIMEOUT:-90}s; the end of $KAFKA_LOG:" >&2
      tail -n 40 "$KAFKA_LOG" >&2
      kafka_kill
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "kafka_start: broker pid $KAFKA_PID serving on $KAFKA_BOOTSTRAP after $(_kafka_since "$t0")s (log: $KAFKA_LOG)" >&2
}

_kafka_wait_exit() {   # PID TENTHS: wait for PID to exit; 1 if it did not in time
  local pid="$1" tenths="$2" i=0
  while _kafka_alive "$pid"; do
    ((i >= tenths)) && return 1
    sleep 0.1
    i=$((i + 1))
  done
  wait "$pid" 2> /dev/null || true
}

# Clean stop: SIGTERM (controlled shutdown: logs flushed, clean-shutdown
# marker written) and wait; SIGKILL if it has not exited after
# KAFKA_STOP_TIMEOUT seconds (then returns 1). Keeps ports and data for
# kafka_restart. No-op when the broker is not running. kafka_stop [DIR]
# stops the broker of DIR (default: the one this shell started).
kafka_stop() {
  local pid="${KAFKA_PID:-}" dir="${1:-$KAFKA_DIR}"
  if [[ $# -gt 0 || -z "$pid" ]] && [[ -n "$dir" && -f "$dir/kafka.pid" ]]; then pid="$(cat "$dir/kafka.pid")"; fi
  _kafka_alive "$pid" || { wait "$pid" 2> /dev/null || true; return 0; }
  kill -TERM "$pid" 2> /dev/null || true
  if ! _kafka_wait_exit "$pid" "$((${KAFKA_STOP_TIMEOUT:-60} * 10))"; then
    echo "kafka_stop: the broker (pid $pid) did not stop within ${KAFKA_STOP_TIMEOUT:-60}s: killing it" >&2
    kill -KILL "$pid" 2> /dev/null || true
    _kafka_wait_exit "$pid" 100 || true
    return 1
  fi
}

# Crash the broker: SIGKILL, and wait for the process to be gone. Keeps ports
# and data for kafka_restart (which then recovers the logs). No-op when the
# broker is not running. Fit for `trap kafka_kill EXIT`. kafka_kill [DIR].
kafka_kill() {
  local pid="${KAFKA_PID:-}" dir="${1:-$KAFKA_DIR}"
  if [[ $# -gt 0 || -z "$pid" ]] && [[ -n "$dir" && -f "$dir/kafka.pid" ]]; then pid="$(cat "$dir/kafka.pid")"; fi
  _kafka_alive "$pid" || { wait "$pid" 2> /dev/null || true; return 0; }
  kill -KILL "$pid" 2> /dev/null || true
  _kafka_wait_exit "$pid" 100 || true
}

# Create a topic: kafka_topic_create NAME PARTITIONS [KEY=VALUE...] (topic
# configs, e.g. retention.ms=-1). Replication factor 1.
kafka_topic_create() {
  local name="${1:?kafka_topic_create NAME PARTITIONS [KEY=VALUE...]}" partitions="${2:?kafka_topic_create NAME PARTITIONS}"
  shift 2
  _kafka_require || return 1
  local args=() kv
  for kv in "$@"; do args+=(--config "$kv"); done
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --create --topic "$name" --partitions "$partitions" --replication-factor 1 "${args[@]}" > /dev/null
}

kafka_topic_delete() {   # NAME
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --delete --topic "${1:?kafka_topic_delete NAME}"
}

kafka_topic_describe() {   # NAME: partitions, leaders, configs
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --describe --topic "${1:?kafka_topic_describe NAME}"
}

kafka_topic_list() {   # the topic names, one a line
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" --list
}

# The end offsets (high watermarks) of a topic: lines TOPIC:PARTITION:OFFSET.
# With read_committed isolation it gives the last stable offsets instead:
# kafka_end_offsets TOPIC [read_committed]
kafka_end_offsets() {
  _kafka_require || return 1
  local extra=()
  if [[ "${2:-}" == read_committed ]]; then
    local cfg="$KAFKA_DIR/read_committed.properties"
    echo "isolation.level=read_committed" > "$cfg"
    extra=(--command-config "$cfg")
  fi
  kafka_java org.apache.kafka.tools.GetOffsetShell --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --topic "${1:?kafka_end_offsets TOPIC}" --time -1 "${extra[@]}"
}

# ConsumerGroupCommand --describe: one line per partition with
# CURRENT-OFFSET, LOG-END-OFFSET and LAG.
kafka_group_describe() {   # GROUP
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$KAFKA_BOOTSTRAP" --describe --group "${1:?kafka_group_describe GROUP}"
}

# The total lag of a group (sum of the LAG column; "-" counts as 0).
kafka_group_lag() {   # GROUP
  kafka_group_describe "$@" | awk '
    $1 == "GROUP" { for (i = 1; i <= NF; i++) if ($i == "LAG") col = i; next }
    col && NF >= col && $col ~ /^[0-9]+$/ { sum += $col }
    END { print sum + 0 }'
}

kafka_group_list() {   # the consumer group ids, one a line
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$KAFKA_BOOTSTRAP" --list
}

# Produce standard input, one record a line: kafka_produce TOPIC [ConsoleProducer options...]
# (e.g. --property parse.key=true --property key.separator=:)
kafka_produce() {
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --topic "${1:?kafka_produce TOPIC}" "${@:2}"
}

# Print N records of TOPIC from the beginning, read_committed, one value a
# line; fails if fewer than N arrive within TIMEOUT_MS (default 20000):
# kafka_consume TOPIC N [TIMEOUT_MS [ConsoleConsumer options...]]
kafka_consume() {
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --topic "${1:?kafka_consume TOPIC N}" --max-messages "${2:?kafka_consume TOPIC N}" \
    --from-beginning --isolation-level read_committed --timeout-ms "${3:-20000}" "${@:4}"
}

# Open and pending transactions (TransactionsCommand list).
kafka_transactions() {
  _kafka_require || return 1
  kafka_java org.apache.kafka.tools.TransactionsCommand --bootstrap-server "$KAFKA_BOOTSTRAP" list
}

# ---- Spark's Kafka connector (benchmarks) ---------------------------------
#
# PySpark from PyPI ships no Kafka connector. Maven Central, as reached here,
# has spark-sql-kafka-0-10_2.13 up to 4.2.0 (not 4.3.0, PyPI's newest
# PySpark) and spark-token-provider-kafka-0-10_2.13 only for 4.0.0 among the
# 4.x releases. So: connector 4.2.0 + token provider 4.0.0 + kafka-clients,
# passed as spark.jars (no Ivy): seen working with PySpark 4.3.0 (read,
# read_committed, write), see spark_check.py.
#   KAFKA_SPARK_CONNECTOR_VERSION  (default 4.2.0)
#   KAFKA_SPARK_TOKEN_VERSION      (default 4.0.0)

# The PySpark version installed for python3 (e.g. 4.3.0).
kafka_pyspark_version() {
  python3 -c 'import pyspark; print(pyspark.__version__)'
}

_kafka_spark_dir() {
  echo "${SLUICE_CACHE:-$HOME/.cache/sluice}/spark-kafka/${KAFKA_SPARK_CONNECTOR_VERSION:-4.2.0}"
}

# Fetch the connector and its dependencies once into $(_kafka_spark_dir)/jars
# (and so into ~/.m2 too).
kafka_spark_fetch() {
  local dir tmp
  dir="$(_kafka_spark_dir)"
  [[ -f "$dir/jars/.complete" ]] && return 0
  command -v mvn > /dev/null || { echo "kafka_spark_fetch: mvn is not installed" >&2; return 1; }
  mkdir -p "$dir"
  tmp="$(mktemp -d "$dir/jars.tmp.XXXXXX")"
  echo "kafka_spark_fetch: downloading spark-sql-kafka-0-10_2.13 ${KAFKA_SPARK_CONNECTOR_VERSION:-4.2.0} from Maven Central" >&2
  # -s: Spark's parent POM names a Google mirror of Central that does not
  # resolve here; maven-settings.xml sends it to Central.
  if ! mvn -q -B -Dstyle.color=never -s "$KAFKA_E2E_DIR/maven-settings.xml" -f "$KAFKA_E2E_DIR/spark-pom.xml" \
      -Dspark.kafka.version="${KAFKA_SPARK_CONNECTOR_VERSION:-4.2.0}" \
      -Dspark.token.provider.version="${KAFKA_SPARK_TOKEN_VERSION:-4.0.0}" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" > "$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    rm -rf "$tmp" "$tmp.log"; echo "kafka_spark_fetch: mvn failed" >&2; return 1
  fi
  rm -f "$tmp.log"
  touch "$tmp/.complete"
  mv -T "$tmp" "$dir/jars" 2> /dev/null || rm -rf "$tmp"
  [[ -f "$dir/jars/.complete" ]]
}

# The connector's jars that PySpark does not already ship (by artifact name:
# PySpark's scala-library, hadoop-client, lz4, snappy, slf4j... are kept),
# comma separated, for spark.jars or spark-submit --jars.
kafka_spark_jars() {
  kafka_spark_fetch || return 1
  python3 - "$(_kafka_spark_dir)/jars" <<'PY'
import os, re, sys
import pyspark
have = {re.sub(r"-[0-9][^-]*$", "", f[:-4]) for f in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars")) if f.endswith(".jar")}
d = sys.argv[1]
jars = sorted(os.path.join(d, f) for f in os.listdir(d)
              if f.endswith(".jar") and re.sub(r"-[0-9][^-]*$", "", f[:-4]) not in have)
print(",".join(jars))
PY
}

# Options for spark-submit / pyspark that load the connector offline:
#   spark-submit $(kafka_spark_conf) job.py
# In Python: SparkSession.builder.config("spark.jars", <kafka_spark_jars>).
kafka_spark_conf() {
  local jars
  jars="$(kafka_spark_jars)" || return 1
  echo "--conf spark.jars=$jars"
}
