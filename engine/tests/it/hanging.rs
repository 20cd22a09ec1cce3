//! A transaction a broker left open, on a real Kafka broker (`e2e/kafka.sh`
//! runs it): what CI once saw after a broker was SIGKILLed mid-commit, made
//! on purpose. The coordinator ends a transaction of the sink's producer
//! while two of its partitions never get the marker: one of the output
//! topic's and the marker group's offsets partition. Then `read_committed`
//! consumers stop at the open transaction and the marker group's stable
//! offsets never come; the sink's next run must end it as the coordinator
//! did, so that the batch counts once, committed or not.
//!
//! Making it takes what only a broker's bug or an unclean election does in
//! production: the test writes the transaction's records and offset commit
//! itself (Kafka requests through `sluice_engine::kafka::wire`), to
//! partitions it never added to the transaction, with the broker's
//! `transaction.partition.verification.enable` turned off for the while.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, EndTxnRequest, FindCoordinatorRequest, InitProducerIdRequest,
    ProduceRequest, TxnOffsetCommitRequest,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::kafka::hanging::Outcome;
use sluice_engine::kafka::sink::KafkaSink;
use sluice_engine::kafka::wire::Connection;
use sluice_engine::sink::{Sink, SinkContext};

const REAL_BROKER: &str = "SLUICE_TEST_KAFKA";
const TIMEOUT: Duration = Duration::from_secs(10);

fn str(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

/// The coordinator of `key` (`key_type` 0: a group, 1: a transactional id).
fn coordinator(brokers: &str, key: &str, key_type: i8) -> Connection {
    let mut any = Connection::open(brokers, TIMEOUT).unwrap();
    for _ in 0..40 {
        let found = any
            .call(
                4,
                &FindCoordinatorRequest::default()
                    .with_key_type(key_type)
                    .with_coordinator_keys(vec![str(key)]),
            )
            .unwrap();
        let c = &found.coordinators[0];
        if c.error_code == 0 {
            return Connection::open(&format!("{}:{}", c.host.as_str(), c.port), TIMEOUT).unwrap();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("no coordinator for {key}");
}

/// Sets `transaction.partition.verification.enable` on every broker.
async fn verification(brokers: &str, enabled: bool) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = admin.inner().fetch_metadata(None, TIMEOUT).unwrap();
    for broker in metadata.brokers() {
        let value = if enabled { "true" } else { "false" };
        let config = AlterConfig::new(ResourceSpecifier::Broker(broker.id()))
            .set("transaction.partition.verification.enable", value);
        let results = admin
            .alter_configs([&config], &AdminOptions::new())
            .await
            .unwrap();
        for result in results {
            result.unwrap();
        }
    }
    // Dynamic broker settings take effect as the metadata log reaches the
    // broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// A transaction of the producer of `transactional_id` that writes `rows`
/// to partitions 0 and 1 of `topic` and commits offset `marker` for
/// `group`, which the coordinator ends with `outcome`: it knows of
/// partition 1 only, so partition 0 and the group's offsets partition keep
/// it open.
fn leave_open(
    brokers: &str,
    transactional_id: &str,
    topic: &str,
    group: &str,
    marker: i64,
    outcome: Outcome,
) {
    let mut txn = coordinator(brokers, transactional_id, 1);
    let init = (0..40)
        .find_map(|_| {
            let init = txn
                .call(
                    4,
                    &InitProducerIdRequest::default()
                        .with_transactional_id(Some(str(transactional_id).into()))
                        .with_transaction_timeout_ms(60_000)
                        .with_producer_id((-1).into())
                        .with_producer_epoch(-1),
                )
                .unwrap();
            if init.error_code == 0 {
                Some(init)
            } else {
                std::thread::sleep(Duration::from_millis(250));
                None
            }
        })
        .expect("InitProducerId");
    let (producer_id, epoch) = (init.producer_id.0, init.producer_epoch);
    let added = txn
        .call(
            3,
            &AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(str(transactional_id).into())
                .with_v3_and_below_producer_id(producer_id.into())
                .with_v3_and_below_producer_epoch(epoch)
                .with_v3_and_below_topics(vec![
                    AddPartitionsToTxnTopic::default()
                        .with_name(str(topic).into())
                        .with_partitions(vec![1]),
                ]),
        )
        .unwrap();
    for result in &added.results_by_topic_v3_and_below {
        for p in &result.results_by_partition {
            assert_eq!(p.partition_error_code, 0, "AddPartitionsToTxn");
        }
    }
    // The rows, on both partitions (partition 0 never added).
    let batch = |partition: i32| {
        let records: Vec<Record> = (0..2)
            .map(|i| Record {
                transactional: true,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id,
                producer_epoch: epoch,
                timestamp_type: TimestampType::Creation,
                offset: i,
                sequence: i as i32,
                timestamp: 0,
                key: None,
                value: Some(Bytes::from(format!(
                    r#"{{"n":{}}}"#,
                    100 + partition as i64 * 10 + i
                ))),
                headers: Default::default(),
            })
            .collect();
        let mut encoded = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut encoded,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        PartitionProduceData::default()
            .with_index(partition)
            .with_records(Some(encoded.freeze()))
    };
    let mut leader = Connection::open(brokers, TIMEOUT).unwrap();
    let produced = leader
        .call(
            9,
            &ProduceRequest::default()
                .with_transactional_id(Some(str(transactional_id).into()))
                .with_acks(-1)
                .with_timeout_ms(10_000)
                .with_topic_data(vec![
                    TopicProduceData::default()
                        .with_name(str(topic).into())
                        .with_partition_data(vec![batch(0), batch(1)]),
                ]),
        )
        .unwrap();
    for topic in &produced.responses {
        for p in &topic.partition_responses {
            assert_eq!(
                p.error_code, 0,
                "Produce to partition {}: {:?}",
                p.index, p.error_message
            );
        }
    }
    // The batch's marker, on the group's offsets partition (never added).
    let mut group_coordinator = coordinator(brokers, group, 0);
    let committed = group_coordinator
        .call(
            3,
            &TxnOffsetCommitRequest::default()
                .with_transactional_id(str(transactional_id).into())
                .with_group_id(str(group).into())
                .with_producer_id(producer_id.into())
                .with_producer_epoch(epoch)
                .with_generation_id(-1)
                .with_member_id(str(""))
                .with_topics(vec![
                    TxnOffsetCommitRequestTopic::default()
                        .with_name(str(topic).into())
                        .with_partitions(vec![
                            TxnOffsetCommitRequestPartition::default()
                                .with_partition_index(0)
                                .with_committed_offset(marker)
                                .with_committed_leader_epoch(-1)
                                .with_committed_metadata(Some(str(""))),
                        ]),
                ]),
        )
        .unwrap();
    for t in &committed.topics {
        for p in &t.partitions {
            assert_eq!(p.error_code, 0, "TxnOffsetCommit");
        }
    }
    let ended = txn
        .call(
            3,
            &EndTxnRequest::default()
                .with_transactional_id(str(transactional_id).into())
                .with_producer_id(producer_id.into())
                .with_producer_epoch(epoch)
                .with_committed(outcome == Outcome::Commit),
        )
        .unwrap();
    assert_eq!(ended.error_code, 0, "EndTxn");
}

/// The values a `read_committed` consumer reads from `topic`'s partitions
/// 0 and 1, sorted.
fn read_committed(brokers: &str, topic: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "hanging-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut values = Vec::new();
    let mut quiet = 0;
    while quiet < 3 {
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(m)) => {
                values.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
                quiet = 0;
            }
            Some(Err(e)) => panic!("{e}"),
            None => quiet += 1,
        }
    }
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Kafka broker: run e2e/kafka.sh"]
async fn a_transaction_a_broker_left_open_is_ended_as_its_coordinator_recorded_it() {
    let brokers = std::env::var(REAL_BROKER)
        .unwrap_or_else(|_| panic!("{REAL_BROKER} is not set: run e2e/kafka.sh"));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let rows = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
    )
    .unwrap();
    for outcome in [Outcome::Commit, Outcome::Abort] {
        let topic = format!("hanging-{}-{outcome:?}", std::process::id()).to_lowercase();
        let created = admin
            .create_topics(
                [&NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        created[0].as_ref().unwrap();
        let spec: sluice_crds::KafkaSink = serde_yaml::from_str(&format!(
            r#"{{bootstrapServers: "{brokers}", topic: {topic}}}"#
        ))
        .unwrap();
        let context = SinkContext {
            query_id: topic.clone(),
            run_id: "run".into(),
            epoch: 1,
            ..SinkContext::default()
        };
        let transactional_id = format!("sluice-{topic}");
        // Batch 0, as the sink writes it.
        let mut sink = KafkaSink::new(&spec).unwrap();
        sink.open(&context).await.unwrap();
        sink.prepare(0, &schema, std::slice::from_ref(&rows))
            .await
            .unwrap();
        sink.commit(0).await.unwrap();
        drop(sink);
        let before = read_committed(&brokers, &topic);
        assert_eq!(before.len(), 3, "{before:?}");
        // Batch 1: its coordinator ends it, two partitions never hear.
        verification(&brokers, false).await;
        let (b, t) = (brokers.clone(), transactional_id.clone());
        let topic_ = topic.clone();
        tokio::task::spawn_blocking(move || leave_open(&b, &t, &topic_, &t, 2, outcome))
            .await
            .unwrap();
        verification(&brokers, true).await;
        // What CI saw: the stable offsets of the marker group never come.
        let marker: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &transactional_id)
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Invalid)
            .unwrap();
        assert!(
            marker
                .committed_offsets(tpl, Duration::from_secs(5))
                .is_err(),
            "{outcome:?}: the marker group's offsets should wait for the open transaction"
        );
        drop(marker);
        // The next run ends it as the coordinator did.
        let mut again = KafkaSink::new(&spec).unwrap();
        again.open(&context).await.unwrap();
        let committed = again.is_committed(1).await.unwrap();
        assert_eq!(committed, outcome == Outcome::Commit, "{outcome:?}");
        assert!(again.is_committed(0).await.unwrap());
        let mut expected = before.clone();
        if outcome == Outcome::Commit {
            expected.extend(["100", "101", "110", "111"].map(|n| format!(r#"{{"n":{n}}}"#)));
        }
        expected.sort();
        assert_eq!(read_committed(&brokers, &topic), expected, "{outcome:?}");
        // And the sink writes on: batch 1 again when it was aborted, or 2.
        let next = if committed { 2 } else { 1 };
        again
            .prepare(next, &schema, std::slice::from_ref(&rows))
            .await
            .unwrap();
        again.commit(next).await.unwrap();
        assert!(again.is_committed(next).await.unwrap());
    }
}
