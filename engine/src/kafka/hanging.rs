//! Transactions a broker left open ("hanging transactions", KIP-664), and
//! how the sink settles its own before it writes.
//!
//! A transaction ends when its coordinator writes a COMMIT or ABORT marker
//! to each partition it touched. A broker that restarts while a transaction
//! is being prepared loads it again and writes the markers, but a marker
//! for a partition whose leader the restarted broker does not know yet is
//! skipped as if the topic were deleted (`TransactionMarkerChannelManager`:
//! "Couldn't find leader endpoint for partitions ... likely deleted
//! already"). The coordinator then records the transaction complete, and
//! the partitions keep it open for ever: the output topic's last stable
//! offset stops (a `read_committed` consumer sees nothing after it), and
//! the pending offset commit of the sink's marker group makes every
//! `OffsetFetch` that asks for stable offsets wait; the sink could not
//! tell which batches it had committed, and the query restarted in a loop
//! (seen in CI: `e2e/kafka.sh`, the broker SIGKILLed mid-commit).
//!
//! Kafka's remedy is an operator's `kafka-transactions.sh find-hanging`
//! then `abort`. The sink does it for its own transactional id, with what
//! the coordinator knew: [`last_transaction`] reads, before
//! `initTransactions`, how the id's last transaction ended (or will end:
//! `initTransactions` aborts an ongoing one); after it has fenced every
//! older producer, [`settle`] asks the leaders of the output partitions and
//! of the marker group's offsets partition which of them still hold a
//! transaction of that producer, and writes there the marker the
//! coordinator meant to write (COMMIT or ABORT, at the transaction's own
//! epoch, as `Admin.abortTransaction` does for ABORT). Rows and the batch's
//! marker end together, as they would have: exactly once holds.
//!
//! A transaction open at an older epoch than the coordinator's last one
//! (its outcome is no longer recorded) is not guessed at: the sink fails
//! with an error naming the partition, the offset and the command that
//! settles it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeTransactionsRequest, FindCoordinatorRequest, MetadataRequest,
    MetadataResponse, WriteTxnMarkersRequest,
};
use kafka_protocol::protocol::StrBytes;

use super::wire::{Connection, WireError, error_name, retriable};

/// The internal topic of consumer groups' offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// How a transaction ended, or will end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its rows are visible to `read_committed` consumers.
    Commit,
    /// Its rows are never visible.
    Abort,
}

/// What the coordinator records of a transactional id's last transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastTransaction {
    /// The id's producer.
    pub producer_id: i64,
    /// The producer's epoch in that transaction.
    pub producer_epoch: i16,
    /// How it ended; `None` when none is recorded since the last
    /// `initTransactions` (state `Empty`).
    pub outcome: Option<Outcome>,
    /// The coordinator's state, as `kafka-transactions.sh describe`
    /// prints it.
    pub state: String,
}

/// A partition where a transaction was left open, and what was done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The transaction's first offset there.
    pub start_offset: i64,
    /// The marker written.
    pub outcome: Outcome,
}

/// Why the sink's hanging transactions could not be checked or settled.
#[derive(Debug, thiserror::Error)]
pub enum HangingError {
    /// A broker could not be reached or answered with an error a retry may
    /// clear.
    #[error("{0}")]
    Unavailable(String),
    /// This client cannot do it (TLS or SASL, a broker too old for KIP-664).
    #[error("{0}")]
    Unsupported(String),
    /// A transaction is open whose outcome the coordinator no longer
    /// records, or a broker refused the marker: a person must look.
    #[error("{0}")]
    Stuck(String),
}

impl From<WireError> for HangingError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io { .. } => HangingError::Unavailable(e.to_string()),
            WireError::Protocol { .. } | WireError::Security(_) => {
                HangingError::Unsupported(e.to_string())
            }
        }
    }
}

type Result<T> = std::result::Result<T, HangingError>;

/// A broker's answer with error `code` to `what`: worth a retry, or not
/// for this client to get past.
fn refused(connection: &Connection, what: &str, code: i16) -> HangingError {
    let message = format!("{}: {what}: {}", connection.address(), error_name(code));
    if retriable(code) {
        HangingError::Unavailable(message)
    } else {
        HangingError::Unsupported(message)
    }
}

/// The partition of [`OFFSETS_TOPIC`] that holds `group`'s offsets, of
/// `partitions`: `Utils.abs(group.hashCode()) % partitions`, Java's
/// `String.hashCode` over UTF-16 units.
///
/// NB: `Utils.abs` is `Math.abs` with `Integer.MIN_VALUE` taken to 0, not
/// the partitioner's `toPositive` (`n & 0x7fffffff`): for a negative hash
/// the two differ (a group named so was looked for on the wrong partition).
pub fn offsets_partition(group: &str, partitions: i32) -> i32 {
    let hash = group.encode_utf16().fold(0i32, |h, unit| {
        h.wrapping_mul(31).wrapping_add(i32::from(unit))
    });
    let positive = if hash == i32::MIN { 0 } else { hash.abs() };
    positive % partitions
}

/// How `state` (a coordinator's transaction state) ends, or `None` when
/// no transaction is recorded.
pub fn outcome_of(state: &str) -> Option<Outcome> {
    match state {
        // `initTransactions` aborts an ongoing transaction.
        "Ongoing" | "PrepareAbort" | "CompleteAbort" | "PrepareEpochFence" => Some(Outcome::Abort),
        "PrepareCommit" | "CompleteCommit" => Some(Outcome::Commit),
        _ => None,
    }
}

/// The brokers of a `bootstrap.servers` list, `host:port` each.
fn bootstrap_addresses(bootstrap: &str) -> Vec<String> {
    bootstrap
        .split(',')
        .map(|b| b.trim())
        .filter(|b| !b.is_empty())
        .map(|b| b.rsplit("://").next().unwrap_or(b).to_owned())
        .collect()
}

/// A connection to the first of `bootstrap` that answers.
fn any_broker(bootstrap: &str, timeout: Duration) -> Result<Connection> {
    let mut last = None;
    for address in bootstrap_addresses(bootstrap) {
        match Connection::open(&address, timeout) {
            Ok(connection) => return Ok(connection),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => HangingError::Unsupported(format!("no broker in {bootstrap:?}")),
    })
}

/// Runs `attempt` until it answers without a retriable error code, or
/// `timeout` has passed.
fn retrying<T>(timeout: Duration, mut attempt: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(done) = attempt()? {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            return Err(HangingError::Unavailable(format!(
                "no answer without a retriable error within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What the coordinator of `transactional_id` records of its last
/// transaction; `None` for an id it does not know (a query's first run).
pub fn last_transaction(
    bootstrap: &str,
    transactional_id: &str,
    timeout: Duration,
) -> Result<Option<LastTransaction>> {
    let mut broker = any_broker(bootstrap, timeout)?;
    let key = StrBytes::from_string(transactional_id.to_owned());
    let coordinator = retrying(timeout, || {
        let found = broker.call(
            4,
            &FindCoordinatorRequest::default()
                .with_key_type(1)
                .with_coordinator_keys(vec![key.clone()]),
        )?;
        let Some(c) = found.coordinators.into_iter().next() else {
            return Err(HangingError::Unsupported(format!(
                "{}: FindCoordinator named no coordinator",
                broker.address()
            )));
        };
        match c.error_code {
            0 => Ok(Some(format!("{}:{}", c.host.as_str(), c.port))),
            code if retriable(code) => Ok(None),
            code => Err(refused(
                &broker,
                &format!("FindCoordinator for {transactional_id}"),
                code,
            )),
        }
    })?;
    let mut coordinator = Connection::open(&coordinator, timeout)?;
    retrying(timeout, || {
        let described = coordinator.call(
            0,
            &DescribeTransactionsRequest::default()
                .with_transactional_ids(vec![key.clone().into()]),
        )?;
        let Some(state) = described.transaction_states.into_iter().next() else {
            return Err(HangingError::Unsupported(format!(
                "{}: DescribeTransactions described nothing",
                coordinator.address()
            )));
        };
        match state.error_code {
            0 => Ok(Some(Some(LastTransaction {
                producer_id: state.producer_id.0,
                producer_epoch: state.producer_epoch,
                outcome: outcome_of(state.transaction_state.as_str()),
                state: state.transaction_state.to_string(),
            }))),
            // TRANSACTIONAL_ID_NOT_FOUND: never used, or expired.
            105 => Ok(Some(None)),
            code if retriable(code) => Ok(None),
            code => Err(refused(
                &coordinator,
                &format!("DescribeTransactions for {transactional_id}"),
                code,
            )),
        }
    })
}

/// The cluster's view of `topics`: per broker id its address, per topic
/// its partitions' leaders.
struct Leaders {
    brokers: BTreeMap<i32, String>,
    partitions: BTreeMap<String, BTreeMap<i32, i32>>,
}

fn leaders(broker: &mut Connection, topics: &[&str]) -> Result<Leaders> {
    let request = MetadataRequest::default().with_topics(Some(
        topics
            .iter()
            .map(|t| {
                MetadataRequestTopic::default()
                    .with_name(Some(StrBytes::from_string((*t).to_owned()).into()))
            })
            .collect(),
    ));
    let response: MetadataResponse = broker.call(12, &request)?;
    let brokers = response
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let mut partitions = BTreeMap::new();
    for topic in response.topics {
        let name = topic.name.map(|n| n.0.to_string()).unwrap_or_default();
        if topic.error_code != 0 {
            return Err(refused(
                broker,
                &format!("metadata of {name}"),
                topic.error_code,
            ));
        }
        let of_topic: BTreeMap<i32, i32> = topic
            .partitions
            .iter()
            .map(|p| (p.partition_index, p.leader_id.0))
            .collect();
        partitions.insert(name, of_topic);
    }
    Ok(Leaders {
        brokers,
        partitions,
    })
}

/// A transaction of the sink's producer open on a partition.
#[derive(Debug)]
struct Open {
    topic: String,
    partition: i32,
    producer_epoch: i16,
    coordinator_epoch: i32,
    start_offset: i64,
}

/// After `initTransactions`: finds where a transaction of `last`'s
/// producer is still open, on `topic`'s partitions and on the partition
/// of [`OFFSETS_TOPIC`] holding `group`, and writes there the marker
/// `last` says; returns what it settled (nothing, almost always).
pub fn settle(
    bootstrap: &str,
    last: &LastTransaction,
    topic: &str,
    group: &str,
    timeout: Duration,
) -> Result<Vec<Settled>> {
    let mut broker = any_broker(bootstrap, timeout)?;
    let cluster = leaders(&mut broker, &[topic, OFFSETS_TOPIC])?;
    let offsets_partitions = cluster
        .partitions
        .get(OFFSETS_TOPIC)
        .map(|p| p.len() as i32)
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            HangingError::Unavailable(format!(
                "{}: no partitions of {OFFSETS_TOPIC} in the metadata",
                broker.address()
            ))
        })?;
    let marker_partition = offsets_partition(group, offsets_partitions);
    // Per leader, the partitions it leads.
    let mut by_leader: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
    for (name, partitions) in &cluster.partitions {
        for (&partition, &leader) in partitions {
            if name == OFFSETS_TOPIC && partition != marker_partition {
                continue;
            }
            if leader < 0 {
                return Err(HangingError::Unavailable(format!(
                    "{name}-{partition} has no leader"
                )));
            }
            by_leader
                .entry(leader)
                .or_default()
                .push((name.clone(), partition));
        }
    }
    let mut settled = Vec::new();
    for (leader, partitions) in by_leader {
        let address = cluster.brokers.get(&leader).ok_or_else(|| {
            HangingError::Unavailable(format!("broker {leader} is not in the metadata"))
        })?;
        let mut connection = Connection::open(address, timeout)?;
        let open = open_transactions(&mut connection, last.producer_id, &partitions)?;
        for open in open {
            let outcome = ending(last, &open).ok_or_else(|| stuck(bootstrap, last, &open))?;
            write_marker(&mut connection, last.producer_id, &open, outcome)?;
            settled.push(Settled {
                topic: open.topic,
                partition: open.partition,
                start_offset: open.start_offset,
                outcome,
            });
        }
    }
    Ok(settled)
}

/// How `open` ends: as the coordinator's last transaction when it is that
/// transaction (same producer epoch: librdkafka keeps one epoch per
/// `initTransactions`, and the sink settles before it writes anything at a
/// new one); `None` when the coordinator no longer records it.
fn ending(last: &LastTransaction, open: &Open) -> Option<Outcome> {
    last.outcome
        .filter(|_| open.producer_epoch == last.producer_epoch)
}

/// The transactions of `producer_id` open on `partitions` (all led by
/// `connection`'s broker).
fn open_transactions(
    connection: &mut Connection,
    producer_id: i64,
    partitions: &[(String, i32)],
) -> Result<Vec<Open>> {
    let mut topics: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (topic, partition) in partitions {
        topics.entry(topic).or_default().push(*partition);
    }
    let request = DescribeProducersRequest::default().with_topics(
        topics
            .iter()
            .map(|(topic, partitions)| {
                TopicRequest::default()
                    .with_name(StrBytes::from_string((*topic).to_owned()).into())
                    .with_partition_indexes(partitions.clone())
            })
            .collect(),
    );
    let response = connection.call(0, &request)?;
    let mut open = Vec::new();
    for topic in response.topics {
        for partition in topic.partitions {
            let name = topic.name.0.as_str();
            if partition.error_code != 0 {
                return Err(refused(
                    connection,
                    &format!("DescribeProducers of {name}-{}", partition.partition_index),
                    partition.error_code,
                ));
            }
            for producer in partition.active_producers {
                if producer.producer_id.0 == producer_id && producer.current_txn_start_offset >= 0 {
                    open.push(Open {
                        topic: name.to_owned(),
                        partition: partition.partition_index,
                        producer_epoch: producer.producer_epoch as i16,
                        coordinator_epoch: producer.coordinator_epoch,
                        start_offset: producer.current_txn_start_offset,
                    });
                }
            }
        }
    }
    Ok(open)
}

fn write_marker(
    connection: &mut Connection,
    producer_id: i64,
    open: &Open,
    outcome: Outcome,
) -> Result<()> {
    let request = WriteTxnMarkersRequest::default().with_markers(vec![
        WritableTxnMarker::default()
            .with_producer_id(producer_id.into())
            .with_producer_epoch(open.producer_epoch)
            .with_transaction_result(outcome == Outcome::Commit)
            .with_coordinator_epoch(open.coordinator_epoch)
            .with_topics(vec![
                WritableTxnMarkerTopic::default()
                    .with_name(StrBytes::from_string(open.topic.clone()).into())
                    .with_partition_indexes(vec![open.partition]),
            ]),
    ]);
    let response = connection.call(1, &request)?;
    for marker in response.markers {
        for topic in marker.topics {
            for partition in topic.partitions {
                let code = partition.error_code;
                if code == 0 {
                    continue;
                }
                let message = format!(
                    "{}: writing the {outcome:?} marker of producer {producer_id} (epoch {}) to {}-{}: {}",
                    connection.address(),
                    open.producer_epoch,
                    open.topic,
                    open.partition,
                    error_name(code)
                );
                return Err(if retriable(code) {
                    HangingError::Unavailable(message)
                } else if code == 31 {
                    HangingError::Stuck(format!(
                        "{message}: writing a transaction marker takes the ClusterAction permission on the cluster (as kafka-transactions.sh abort does): grant it to the sink's principal, or end the transaction by hand"
                    ))
                } else {
                    HangingError::Stuck(message)
                });
            }
        }
    }
    Ok(())
}

fn stuck(bootstrap: &str, last: &LastTransaction, open: &Open) -> HangingError {
    HangingError::Stuck(format!(
        "a transaction of this sink's producer {} (epoch {}) is open on {}-{} since offset {}, \
         and its coordinator no longer records how it ended (its last transaction: epoch {}, {}): \
         read_committed consumers of the partition stop there. Check what it holds, then end it: \
         kafka-transactions.sh --bootstrap-server {bootstrap} abort --topic {} --partition {} --start-offset {}",
        last.producer_id,
        open.producer_epoch,
        open.topic,
        open.partition,
        open.start_offset,
        last.producer_epoch,
        last.state,
        open.topic,
        open.partition,
        open.start_offset,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_lives_on_the_offsets_partition_kafka_computes() {
        // Java: Utils.abs("hello".hashCode()) % 50 == 99162322 % 50.
        assert_eq!(offsets_partition("hello", 50), 99_162_322 % 50);
        // A negative hash: "polygenelubricants".hashCode() == Integer.MIN_VALUE,
        // which Utils.abs maps to 0.
        assert_eq!(offsets_partition("polygenelubricants", 50), 0);
        // A negative hash: "sluice-hanging-11794-commit".hashCode() ==
        // -1231451219; Math.abs, not & 0x7fffffff (which gives 5 of 8).
        assert_eq!(offsets_partition("sluice-hanging-11794-commit", 8), 3);
        assert_eq!(offsets_partition("sluice-hanging-11794-commit", 50), 19);
    }

    #[test]
    fn a_transaction_ends_as_its_coordinator_recorded_it() {
        assert_eq!(outcome_of("CompleteCommit"), Some(Outcome::Commit));
        assert_eq!(outcome_of("PrepareCommit"), Some(Outcome::Commit));
        assert_eq!(outcome_of("CompleteAbort"), Some(Outcome::Abort));
        assert_eq!(outcome_of("Ongoing"), Some(Outcome::Abort));
        assert_eq!(outcome_of("Empty"), None);
    }

    #[test]
    fn only_the_coordinators_last_transaction_is_ended_by_the_sink() {
        let last = |state: &str| LastTransaction {
            producer_id: 7,
            producer_epoch: 3,
            outcome: outcome_of(state),
            state: state.into(),
        };
        let open = |epoch| Open {
            topic: "alerts".into(),
            partition: 0,
            producer_epoch: epoch,
            coordinator_epoch: 0,
            start_offset: 42,
        };
        assert_eq!(
            ending(&last("CompleteCommit"), &open(3)),
            Some(Outcome::Commit)
        );
        assert_eq!(ending(&last("Ongoing"), &open(3)), Some(Outcome::Abort));
        // An older transaction: how it ended is not recorded any more.
        assert_eq!(ending(&last("CompleteCommit"), &open(2)), None);
        assert_eq!(ending(&last("Empty"), &open(3)), None);
        let message = stuck("b:9092", &last("Empty"), &open(2)).to_string();
        assert!(
            message.contains("alerts-0 since offset 42")
                && message.contains(
                    "kafka-transactions.sh --bootstrap-server b:9092 abort --topic alerts --partition 0 --start-offset 42"
                ),
            "{message}"
        );
    }

    #[test]
    fn bootstrap_servers_are_read_as_kafka_reads_them() {
        assert_eq!(
            bootstrap_addresses(" a:9092, PLAINTEXT://b:9093,,"),
            vec!["a:9092".to_owned(), "b:9093".to_owned()]
        );
    }
}
