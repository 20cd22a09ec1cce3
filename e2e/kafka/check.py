"""Client side of e2e/kafka/check.sh: confluent-kafka (librdkafka) against
the real broker at $KAFKA_BOOTSTRAP. Each step prints PASS/FAIL lines and
exits 1 if one failed.

  python3 check.py produce TOPIC N           N records, keys k0..k9, values v0..v{N-1}
  python3 check.py consume-commit TOPIC GROUP N
                                             consume N records (no more), commit them
  python3 check.py committed TOPIC GROUP N   the group's committed offsets sum to N
  python3 check.py count TOPIC N [read_committed]
                                             the topic holds exactly N records
  python3 check.py txn TOPIC                 commit one transaction, abort one,
                                             leave one open, check read_committed
  python3 check.py txn-verify TOPIC          after a restart: the committed ones only
"""

import os
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

BOOTSTRAP = os.environ["KAFKA_BOOTSTRAP"]
failed = False


def check(ok, what):
    global failed
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failed = True


def consumer(isolation, group=None, **extra):
    conf = {
        "bootstrap.servers": BOOTSTRAP,
        "group.id": group or f"check-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
    }
    conf.update(extra)
    return Consumer(conf)


def partitions(topic):
    c = consumer("read_uncommitted")
    try:
        md = c.list_topics(topic, timeout=10)
        return sorted(md.topics[topic].partitions)
    finally:
        c.close()


def read_all(topic, isolation, limit=None, group=None, timeout=30.0):
    """Values read from the beginning until every partition reports EOF (or
    `limit` records were read)."""
    c = consumer(isolation, group)
    parts = partitions(topic)
    c.assign([TopicPartition(topic, p, 0) if group is None else TopicPartition(topic, p) for p in parts])
    values, eof = [], set()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if limit is not None and len(values) >= limit:
                break
            if limit is None and eof == set(parts):
                break
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == -191:  # _PARTITION_EOF
                    eof.add(m.partition())
                    continue
                raise KafkaException(m.error())
            eof.discard(m.partition())
            values.append(m.value().decode())
        else:
            raise TimeoutError(f"read {len(values)} records of {topic} in {timeout}s; EOF on {sorted(eof)} of {parts}")
        if group is not None:
            c.commit(asynchronous=False)
        return values
    finally:
        c.close()


def produce(topic, n):
    p = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "linger.ms": 5})
    errors = []
    for i in range(n):
        p.produce(topic, key=f"k{i % 10}", value=f"v{i}",
                  on_delivery=lambda err, msg: err and errors.append(err))
    left = p.flush(30)
    check(left == 0 and not errors, f"produce: {n} records to {topic} acknowledged (unsent {left}, errors {errors[:3]})")


def consume_commit(topic, group, n):
    values = read_all(topic, "read_committed", limit=n, group=group)
    check(len(values) == n, f"consume: group {group} read {len(values)} of {n} records and committed")


def committed(topic, group, n):
    c = consumer("read_committed", group)
    try:
        offs = c.committed([TopicPartition(topic, p) for p in partitions(topic)], timeout=10)
        total = sum(max(tp.offset, 0) for tp in offs)
        check(total == n, f"committed offsets of group {group} on {topic} sum to {total} (expected {n}): "
              + ", ".join(f"p{tp.partition}={tp.offset}" for tp in offs))
    finally:
        c.close()


def count(topic, n, isolation="read_uncommitted"):
    values = read_all(topic, isolation)
    check(len(values) == n, f"{topic} holds {len(values)} records seen {isolation} (expected {n})")
    return values


def watermarks(topic, isolation):
    c = consumer(isolation)
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions(topic)}
    finally:
        c.close()


def txn(topic):
    p = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": "sluice-check-txn", "linger.ms": 5})
    p.init_transactions(30)
    # Transaction 1: 100 records, committed.
    p.begin_transaction()
    for i in range(100):
        p.produce(topic, key=f"k{i % 10}", value=f"committed-{i}")
    p.commit_transaction(30)
    # Transaction 2: 50 records written to the log (flushed), then aborted.
    p.begin_transaction()
    for i in range(50):
        p.produce(topic, key=f"k{i % 10}", value=f"aborted-{i}")
    check(p.flush(30) == 0, "txn: the records of the transaction to abort reached the broker before the abort")
    p.abort_transaction(30)
    # Transaction 3: 30 records, left open while we read.
    p.begin_transaction()
    for i in range(30):
        p.produce(topic, key=f"k{i % 10}", value=f"open-{i}")
    check(p.flush(30) == 0, "txn: the records of the open transaction reached the broker")

    uncommitted = count(topic, 180, "read_uncommitted")
    check(sum(v.startswith("aborted-") for v in uncommitted) == 50,
          "txn: read_uncommitted sees the 50 aborted records (they are in the log)")
    committed_values = read_all(topic, "read_committed")
    check(sorted(committed_values) == sorted(f"committed-{i}" for i in range(100)),
          f"txn: read_committed sees exactly the 100 committed records, no aborted or open ones "
          f"(saw {len(committed_values)}: {sum(v.startswith('aborted-') for v in committed_values)} aborted, "
          f"{sum(v.startswith('open-') for v in committed_values)} open)")
    hw = watermarks(topic, "read_uncommitted")
    lso = watermarks(topic, "read_committed")
    check(any(lso[q][1] < hw[q][1] for q in hw),
          f"txn: the open transaction holds the last stable offset below the high watermark "
          f"(LSO {[lso[q][1] for q in sorted(lso)]}, HW {[hw[q][1] for q in sorted(hw)]})")

    p.commit_transaction(30)
    committed_values = read_all(topic, "read_committed")
    check(len(committed_values) == 130 and not any(v.startswith("aborted-") for v in committed_values),
          f"txn: after committing the third transaction read_committed sees 130 records, none aborted "
          f"(saw {len(committed_values)})")


def txn_verify(topic):
    values = read_all(topic, "read_committed")
    check(len(values) == 130 and not any(v.startswith("aborted-") for v in values),
          f"txn-verify: read_committed still sees the 130 committed records and no aborted one (saw {len(values)})")
    # The same transactional id can be fenced in and used again.
    p = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": "sluice-check-txn"})
    p.init_transactions(60)
    p.begin_transaction()
    p.produce(topic, key="k0", value="after-restart")
    p.commit_transaction(30)
    values = read_all(topic, "read_committed")
    check(len(values) == 131 and "after-restart" in values,
          "txn-verify: a transaction commits after the restart with the same transactional.id")


def main(argv):
    cmd = argv[1]
    if cmd == "produce":
        produce(argv[2], int(argv[3]))
    elif cmd == "consume-commit":
        consume_commit(argv[2], argv[3], int(argv[4]))
    elif cmd == "committed":
        committed(argv[2], argv[3], int(argv[4]))
    elif cmd == "count":
        count(argv[2], int(argv[3]), argv[4] if len(argv) > 4 else "read_uncommitted")
    elif cmd == "txn":
        txn(argv[2])
    elif cmd == "txn-verify":
        txn_verify(argv[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception as e:  # a client error is a failed check, with its reason
        print(f"FAIL {' '.join(sys.argv[1:])}: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
