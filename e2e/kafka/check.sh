#!/usr/bin/env bash
# Self-test of e2e/kafka/lib.sh: a real Kafka broker from Maven Central jars,
# checked from Python's confluent-kafka (librdkafka): produce and consume,
# transactions with read_committed (aborted and open transactions filtered
# out, which librdkafka's mock cluster does not do), committed group offsets
# and the LAG of ConsumerGroupCommand, a clean stop and a crash with the data
# kept across restarts on the same ports. Prints PASS/FAIL lines and timings;
# exits 1 if a check failed. Leaves no process behind.
#
#   e2e/kafka/check.sh            # about a minute once the jars are cached
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=e2e/kafka/lib.sh
source "$here/lib.sh"

python3 -c 'import confluent_kafka' 2> /dev/null || python3 -m pip install -q confluent-kafka

work="$(mktemp -d)"
cleanup() {
  kafka_kill
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then echo "check: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

failures=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
py() { python3 "$here/check.py" "$@" || failures=$((failures + 1)); }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

cached=no; [[ -f "$(kafka_home)/libs/.complete" ]] && cached=yes
t0=$(now); kafka_fetch; t1=$(now)
echo "TIME kafka_fetch (jars already cached: $cached) $(secs "$t0" "$t1")s"

t0=$(now); kafka_start "$work/kafka"; t1=$(now)
echo "TIME broker start (format + launch until serving) $(secs "$t0" "$t1")s"
pass "broker $KAFKA_VERSION started: KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP pid $KAFKA_PID"

kafka_topic_create check 4
kafka_topic_create check-txn 4
if [[ "$(kafka_topic_list | sort | tr '\n' ' ')" == "check check-txn " ]]; then
  pass "topics created (kafka_topic_create, kafka_topic_list)"
else
  fail "topics: $(kafka_topic_list | tr '\n' ' ')"
fi
if [[ "$(kafka_topic_describe check | grep -c 'Leader: 1')" == 4 ]]; then
  pass "topic check has 4 partitions led by node 1"
else
  fail "topic check: $(kafka_topic_describe check)"
fi

# Produce and consume; a group reads and commits all 1000 records, then 400
# more are produced: its lag is 400, spread over the 4 partitions.
py produce check 1000
py count check 1000
py consume-commit check check-group 1000
py committed check check-group 1000
py produce check 400
describe="$(kafka_group_describe check-group)"
echo "$describe"
lag="$(kafka_group_lag check-group)"
rows="$(awk '$1 == "check-group" && $2 == "check" && $6 ~ /^[0-9]+$/' <<< "$describe" | wc -l)"
if [[ "$lag" == 400 && "$rows" == 4 ]] && grep -q 'LOG-END-OFFSET' <<< "$describe"; then
  pass "kafka_group_describe shows the group's LAG: 400 in all"
else
  fail "kafka_group_describe: total lag $lag over $rows partitions, expected 400 over 4"
fi
offsets="$(kafka_end_offsets check | awk -F: '{s += $3} END {print s + 0}')"
[[ "$offsets" == 1400 ]] && pass "kafka_end_offsets: the end offsets of check sum to 1400" \
  || fail "kafka_end_offsets: the end offsets of check sum to $offsets"
# The console tools: kafka_produce from stdin, kafka_consume read_committed.
kafka_topic_create check-console 1
printf 'a\nb\nc\n' | kafka_produce check-console
got="$(kafka_consume check-console 3 2> /dev/null | tr '\n' ' ')"
[[ "$got" == "a b c " ]] && pass "kafka_produce / kafka_consume: 3 lines through the console tools" \
  || fail "kafka_consume returned '$got'"

# Transactions: committed, aborted (in the log) and open transactions.
py txn check-txn

# A clean stop, a pause, a restart on the same ports: the data is kept.
port_before="$KAFKA_PORT"
t0=$(now); kafka_stop; t1=$(now)
echo "TIME broker clean stop $(secs "$t0" "$t1")s"
if (exec 3<> "/dev/tcp/127.0.0.1/$port_before") 2> /dev/null; then
  fail "the broker still answers on $port_before after kafka_stop"
else
  pass "kafka_stop: the broker is down"
fi
sleep "${CHECK_PAUSE:-5}"
t0=$(now); kafka_restart; t1=$(now)
echo "TIME broker restart after clean stop $(secs "$t0" "$t1")s"
[[ "$KAFKA_BOOTSTRAP" == "127.0.0.1:$port_before" ]] && pass "restarted on the same port $port_before" \
  || fail "restarted on $KAFKA_BOOTSTRAP, not port $port_before"
py count check 1400
py committed check check-group 1000
lag="$(kafka_group_lag check-group)"
[[ "$lag" == 400 ]] && pass "after the restart the group's lag is still 400" || fail "after the restart the lag is $lag"
py txn-verify check-txn

# A crash (SIGKILL) and a restart: the log is recovered, nothing is lost.
kafka_kill
t0=$(now); kafka_restart; t1=$(now)
echo "TIME broker restart after SIGKILL $(secs "$t0" "$t1")s"
py count check 1400
py count check-txn 131 read_committed
py committed check check-group 1000

kafka_stop
if ((failures > 0)); then
  echo "check: $failures failed check(s); the broker log was $KAFKA_LOG (KEEP_WORK=1 keeps it)"
  exit 1
fi
echo "check: all passed"
