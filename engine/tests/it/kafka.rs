//! The Kafka connector against librdkafka's mock cluster (in process, the
//! Kafka protocol on loopback): what the mock implements. What it does not
//! (it hands aborted transactions to `read_committed` consumers, it cannot
//! delete records or add partitions) is checked against a real broker by
//! `e2e/kafka.sh`.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::AsArray;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::kafka::sink::KafkaSink;
use sluice_engine::kafka::source::KafkaSource;
use sluice_engine::monitor::Monitor;
use sluice_engine::sink::{Sink, SinkContext};
use sluice_engine::source::{ReadMode, Source};
use sluice_engine::{RunOptions, Stopped, run_query};
use tokio::sync::watch;

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(1).unwrap()
}

/// Produces `values` to `topic`, round robin over `partitions`.
fn produce(brokers: &str, topic: &str, partitions: i32, values: &[String]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (i, value) in values.iter().enumerate() {
        producer
            .send(
                BaseRecord::<str, str>::to(topic)
                    .payload(value)
                    .key("k")
                    .partition(i as i32 % partitions),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

fn source_spec(brokers: &str, kafka: &str) -> sluice_crds::Source {
    serde_yaml::from_str(&format!(
        r#"{{name: payments, kafka: {{bootstrapServers: "{brokers}", {kafka}}},
             schema: [{{name: id, type: long}}, {{name: amount, type: double}}]}}"#
    ))
    .unwrap()
}

fn source(spec: &sluice_crds::Source) -> KafkaSource {
    KafkaSource::new(
        spec,
        spec.kafka.as_ref().unwrap(),
        "spec.sources[0]",
        ReadMode::Continuous,
        "q",
    )
    .unwrap()
}

fn payments(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| format!(r#"{{"id": {i}, "amount": {i}.5}}"#))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_reads_exactly_its_per_partition_range_with_the_records_columns() {
    let mock = cluster();
    mock.create_topic("payments", 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    produce(&brokers, "payments", 3, &payments(0..90));
    let spec = source_spec(
        &brokers,
        "topic: payments, startingOffsets: earliest, maxOffsetsPerTrigger: 30",
    );
    let mut s = source(&spec);
    let start = s.resolve_start(&s.initial_offset()).await.unwrap();
    assert_eq!(
        start,
        serde_json::json!({"payments": {"0": 0, "1": 0, "2": 0}})
    );
    let first = s.plan_batch(&start).await.unwrap();
    assert_eq!(
        first.end,
        serde_json::json!({"payments": {"0": 10, "1": 10, "2": 10}})
    );
    assert_eq!((first.rows, first.records_behind_latest), (30, 60));
    assert_eq!(first.metrics["maxOffsetsBehindLatest"], "20");
    let batches = s.read(&first).await.unwrap();
    let batch = &batches[0];
    assert_eq!(batch.num_rows(), 30);
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "amount",
            "key",
            "value",
            "topic",
            "partition",
            "offset",
            "timestamp",
            "headers"
        ]
    );
    let offsets = batch
        .column_by_name("offset")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    assert!(offsets.values().iter().all(|o| *o < 10));
    // A replay of the range reads the same records, even after more arrive.
    produce(&brokers, "payments", 3, &payments(90..99));
    assert_eq!(s.read(&first).await.unwrap()[0], batches[0]);
    // Spark's per-partition JSON: -2 earliest, -1 latest, unnamed latest.
    let spec = source_spec(
        &brokers,
        r#"topic: payments, startingOffsets: '{"payments": {"0": 5, "1": -2}}'"#,
    );
    let mut s = source(&spec);
    let start = s.resolve_start(&s.initial_offset()).await.unwrap();
    assert_eq!(
        start,
        serde_json::json!({"payments": {"0": 5, "1": 0, "2": 33}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pattern_picks_up_topics_that_appear_from_their_earliest_offset() {
    let mock = cluster();
    mock.create_topic("events-a", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    produce(&brokers, "events-a", 1, &payments(0..5));
    let spec = source_spec(
        &brokers,
        r#"topicPattern: "events-.*", startingOffsets: latest"#,
    );
    let mut s = source(&spec);
    let start = s.resolve_start(&s.initial_offset()).await.unwrap();
    assert_eq!(start, serde_json::json!({"events-a": {"0": 5}}));
    mock.create_topic("events-b", 2, 1).unwrap();
    produce(&brokers, "events-b", 2, &payments(0..4));
    let range = s.plan_batch(&start).await.unwrap();
    assert_eq!(
        range.end,
        serde_json::json!({"events-a": {"0": 5}, "events-b": {"0": 2, "1": 2}})
    );
    assert_eq!(s.read(&range).await.unwrap()[0].num_rows(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_value_is_set_aside_with_its_origin_or_stops_the_query() {
    let mock = cluster();
    mock.create_topic("payments", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let mut values = payments(0..3);
    values.insert(1, r#"{"id": "one", "amount": 1}"#.to_owned());
    values.push(String::new());
    produce(&brokers, "payments", 1, &values);
    let spec = source_spec(&brokers, "topic: payments, startingOffsets: earliest");
    let mut strict = source(&spec);
    let start = strict
        .resolve_start(&strict.initial_offset())
        .await
        .unwrap();
    let range = strict.plan_batch(&start).await.unwrap();
    let err = strict.read(&range).await.unwrap_err().to_string();
    assert!(
        err.contains("topic payments partition 0 offset 1") && err.contains("set deadLetter"),
        "{err}"
    );
    let mut lenient_spec = spec.clone();
    lenient_spec.dead_letter = Some(sluice_crds::DeadLetter {
        path: Some("/unused".into()),
        kafka: None,
    });
    let mut lenient = source(&lenient_spec);
    assert_eq!(lenient.read(&range).await.unwrap()[0].num_rows(), 3);
    let bad = lenient.take_bad_records();
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].file, "kafka:payments/0@1");
    assert_eq!(bad[1].error, "the value is empty");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_topic_s_records_outside_their_key_s_partition_are_set_aside() {
    let mock = cluster();
    mock.create_topic("payments", 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    // Ids 0..30 where Kafka's default partitioner puts them, then id 7 in
    // a partition that is not its own.
    let home = |id: usize| sluice_engine::kafka::default_partition(id.to_string().as_bytes(), 3);
    let mut sent: Vec<(usize, i32)> = (0..30).map(|id| (id, home(id) as i32)).collect();
    sent.push((7, (home(7) as i32 + 1) % 3));
    for (id, partition) in &sent {
        producer
            .send(
                BaseRecord::<str, str>::to("payments")
                    .payload(&format!(r#"{{"id": {id}, "amount": 1.5}}"#))
                    .key(&id.to_string())
                    .partition(*partition),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut spec = source_spec(
        &brokers,
        "topic: payments, startingOffsets: earliest, keyedBy: id",
    );
    spec.dead_letter = Some(sluice_crds::DeadLetter {
        path: Some("/unused".into()),
        kafka: None,
    });
    let mut keyed = source(&spec);
    keyed.set_state_partitions(3);
    let start = keyed.resolve_start(&keyed.initial_offset()).await.unwrap();
    let range = keyed.plan_batch(&start).await.unwrap();
    let rows: usize = keyed
        .read(&range)
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 30);
    let bad = keyed.take_bad_records();
    assert_eq!(bad.len(), 1, "{bad:?}");
    let expected = format!(
        "id \"7\" belongs in partition {} of 3 (Kafka's default partitioner, murmur2, as spec.sources[0].kafka.keyedBy says), not {}",
        home(7),
        (home(7) + 1) % 3
    );
    assert_eq!(bad[0].error, expected);
    // The state must have as many partitions as the topic.
    let mut mismatched = source(&spec);
    mismatched.set_state_partitions(4);
    let err = mismatched.plan_batch(&start).await.unwrap_err().to_string();
    assert!(
        err.contains("spec.statePartitions") && err.contains("topic payments has 3 partitions"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_values_decode_with_the_writers_schema_and_others_are_set_aside() {
    use apache_avro::types::Value;
    let mock = cluster();
    mock.create_topic("payments", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let writer = r#"{"type": "record", "name": "Payment", "fields": [
        {"name": "id", "type": "long"}, {"name": "amount", "type": "double"},
        {"name": "memo", "type": ["null", "string"], "default": null}]}"#;
    let schema = apache_avro::Schema::parse_str(writer).unwrap();
    let datum = |id: i64| {
        apache_avro::to_avro_datum(
            &schema,
            Value::Record(vec![
                ("id".into(), Value::Long(id)),
                ("amount".into(), Value::Double(id as f64 + 0.5)),
                ("memo".into(), Value::Union(0, Box::new(Value::Null))),
            ]),
        )
        .unwrap()
    };
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let mut values: Vec<Vec<u8>> = (0..3).map(datum).collect();
    values.insert(1, br#"{"id": 1, "amount": 1.5}"#.to_vec());
    for value in &values {
        producer
            .send(BaseRecord::<str, [u8]>::to("payments").payload(value.as_slice()))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut spec = source_spec(&brokers, "topic: payments, startingOffsets: earliest");
    spec.format = Some(sluice_crds::Format::Avro);
    spec.avro_schema = Some(writer.to_owned());
    spec.dead_letter = Some(sluice_crds::DeadLetter {
        path: Some("/unused".into()),
        kafka: None,
    });
    let mut avro = source(&spec);
    let start = avro.resolve_start(&avro.initial_offset()).await.unwrap();
    let range = avro.plan_batch(&start).await.unwrap();
    let batch = &avro.read(&range).await.unwrap()[0];
    let ids = batch
        .column_by_name("id")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    assert_eq!(ids.values().to_vec(), vec![0, 1, 2]);
    let amounts = batch
        .column_by_name("amount")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
    assert_eq!(amounts.values().to_vec(), vec![0.5, 1.5, 2.5]);
    let bad = avro.take_bad_records();
    assert_eq!(bad.len(), 1, "the JSON value is not an Avro datum");
    assert_eq!(bad[0].file, "kafka:payments/0@1");
    spec.avro_schema = Some(
        r#"{"type": "record", "name": "P", "fields": [{"name": "id", "type": "nope"}]}"#.into(),
    );
    let Err(error) = KafkaSource::new(
        &spec,
        spec.kafka.as_ref().unwrap(),
        "spec.sources[0]",
        ReadMode::Continuous,
        "q",
    ) else {
        panic!("a schema Avro cannot parse is refused");
    };
    assert!(
        error.to_string().contains("spec.sources[0].avroSchema"),
        "{error}"
    );
}

/// The environment variable naming a real broker (`e2e/kafka.sh` sets it).
const REAL_BROKER: &str = "SLUICE_TEST_KAFKA";

/// NB: the mock cluster does not show a transaction's offset commit to
/// OffsetFetch, so this runs against the real broker only.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Kafka broker: run e2e/kafka.sh"]
async fn the_sink_knows_which_batches_it_committed_on_a_real_broker() {
    let brokers = std::env::var(REAL_BROKER)
        .unwrap_or_else(|_| panic!("{REAL_BROKER} is not set: run e2e/kafka.sh"));
    let spec: sluice_crds::KafkaSink = serde_yaml::from_str(&format!(
        r#"{{bootstrapServers: "{brokers}", topic: alerts}}"#
    ))
    .unwrap();
    let context = SinkContext {
        query_id: format!("query-{}", std::process::id()),
        run_id: "run".into(),
        epoch: 1,
        ..SinkContext::default()
    };
    let mut sink = KafkaSink::new(&spec).unwrap();
    sink.open(&context).await.unwrap();
    assert!(!sink.is_committed(0).await.unwrap());
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "n",
            datafusion::arrow::datatypes::DataType::Int64,
            false,
        ),
    ]));
    let batch = datafusion::arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(datafusion::arrow::array::Int64Array::from(vec![
            1, 2, 3,
        ]))],
    )
    .unwrap();
    sink.prepare(0, &schema, &[batch]).await.unwrap();
    sink.commit(0).await.unwrap();
    assert!(sink.is_committed(0).await.unwrap());
    assert!(!sink.is_committed(1).await.unwrap());
    // A new run (the same query) opens the same transactional id and sees it.
    let mut again = KafkaSink::new(&spec).unwrap();
    again.open(&context).await.unwrap();
    assert!(again.is_committed(0).await.unwrap());
    // The marker is the group named like the transactional id.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("sluice-{}", context.query_id))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("alerts", 0, Offset::Invalid)
        .unwrap();
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(committed.elements()[0].offset(), Offset::Offset(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_reads_kafka_resumes_from_its_checkpoint_and_commits_the_group() {
    let mock = cluster();
    mock.create_topic("payments", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    produce(&brokers, "payments", 2, &payments(0..40));
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: pay}}
spec:
  sources:
    - name: payments
      kafka: {{bootstrapServers: "{brokers}", topic: payments, startingOffsets: earliest, maxOffsetsPerTrigger: 10}}
      schema: [{{name: id, type: long}}, {{name: amount, type: double}}]
  query: SELECT id, amount * 2 AS doubled, partition FROM payments
  sink: {{files: {{path: "{out}"}}}}
  checkpoint: {{location: "{checkpoint}"}}
  trigger: {{availableNow: true}}
"#,
        out = dir.path().join("out").display(),
        checkpoint = dir.path().join("checkpoint").display(),
    );
    let query = sluice_crds::load(&yaml, "pay.yaml").unwrap();
    let run = |max| {
        let query = query.clone();
        let state = dir.path().join("state");
        async move {
            let (_stop, stop) = watch::channel(false);
            run_query(
                &query,
                Arc::new(Monitor::new("pay")),
                Some(state),
                RunOptions {
                    max_batches: max,
                    ..RunOptions::default()
                },
                stop,
            )
            .await
            .unwrap()
        }
    };
    let first = run(Some(2)).await;
    assert_eq!((first.batches, first.input_rows), (2, 20));
    produce(&brokers, "payments", 2, &payments(40..50));
    let rest = run(None).await;
    assert_eq!(rest.stopped, Stopped::Completed);
    assert_eq!(rest.input_rows, 30, "resumed after the committed batches");
    let ids: std::collections::BTreeSet<i64> =
        sluice_engine::sink::committed_files(&dir.path().join("out"))
            .unwrap()
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                            .as_i64()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    assert_eq!(ids.len(), 50);
    // The processed offsets, in the consumer group, for monitoring.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "sluice-pay")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("payments", 0, Offset::Invalid)
        .unwrap();
    tpl.add_partition_offset("payments", 1, Offset::Invalid)
        .unwrap();
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let offsets: Vec<Offset> = committed.elements().iter().map(|e| e.offset()).collect();
    assert_eq!(offsets, [Offset::Offset(25), Offset::Offset(25)]);
}
