//! The Kafka sink. With `delivery: exactlyOnce` (the default) each batch is
//! one Kafka transaction of a transactional producer whose id is stable for
//! the query (`sluice-<query id>`):
//!
//! - **open**: `initTransactions`, which fences any older producer of the
//!   query (a zombie run) and completes or aborts its open transaction;
//!   then the transactions a broker left open on the sink's partitions
//!   (markers lost in a broker restart) are ended as their coordinator
//!   recorded them (`hanging.rs`);
//! - **prepare** batch N: begin a transaction, produce the rows;
//! - **commit** batch N: add to the transaction a marker, an offset commit
//!   of N + 1 for the consumer group named like the transactional id, on
//!   partition 0 of the output topic (Kafka Streams commits its input
//!   offsets the same way), then commit the transaction: rows and marker
//!   become visible together, or neither does;
//! - **is committed** batch N: the marker group's committed offset is past
//!   N. A replayed batch that is not has its earlier attempt aborted (by
//!   `initTransactions`) and is written again.
//!
//! A `read_committed` consumer sees each result row once. With `delivery:
//! atLeastOnce` the producer is idempotent without transactions: a batch
//! replayed after a crash is written again.
//!
//! As Spark's Kafka sink: the result's `value` column (text or bytes) is the
//! record's value, `key`, `headers` (a list of `{key, value}`), `partition`
//! and `topic` its others; without a `value` column each row is written
//! whole as a JSON object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sluice_crds::{Delivery, KafkaSink as KafkaSpec};

use super::hanging::{self, HangingError, LastTransaction};
use super::{CALL_TIMEOUT, blocking, classify, client_config, wire};
use crate::sink::{Sink, SinkContext};
use crate::{Error, Result};

/// How long flushing a batch's records or committing its transaction may
/// take before the brokers count as unavailable (the query then restarts
/// from its checkpoint; the next run's `initTransactions` settles the
/// transaction either way, and the marker says which).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the brokers may take no record at all, while records wait to
/// be sent, before they count as unavailable. A large batch that goes on
/// slowly is not a stall.
const SEND_STALL: Duration = Duration::from_secs(10);

/// Counts the records the brokers acknowledged or refused, and remembers
/// the first refusal.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<Option<String>>,
    /// Delivery reports served so far: the measure of the brokers taking
    /// records (see [`Progress`]).
    reported: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        self.reported.fetch_add(1, Ordering::Relaxed);
        if let Err((err, _)) = result {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            failed.get_or_insert_with(|| err.to_string());
        }
    }
}

/// One record to write.
#[derive(Clone, Debug, Default)]
pub struct OutRecord {
    /// Another topic than the sink's.
    pub topic: Option<String>,
    /// A partition, or the producer's partitioner.
    pub partition: Option<i32>,
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Option<Vec<u8>>,
    /// The headers.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Writes each batch to a Kafka topic.
pub struct KafkaSink {
    topic: String,
    brokers: String,
    delivery: Delivery,
    transactional_id: Option<String>,
    /// The producer's settings.
    config: rdkafka::ClientConfig,
    /// The marker consumer's settings: the user's, without the producer's.
    consumer_config: rdkafka::ClientConfig,
    producer: Option<Arc<ThreadedProducer<Deliveries>>>,
    /// A consumer of the marker group: its committed offset, and its group
    /// metadata for the transaction.
    marker: Option<Arc<BaseConsumer>>,
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // The marker consumer has a group: closing it can wait for the
        // brokers (see `close_in_background`).
        if let Some(marker) = self.marker.take() {
            super::close_in_background(marker);
        }
    }
}

impl KafkaSink {
    /// A writer of dead letters to `topic` on `brokers`, with the client
    /// settings `options` and `secrets` (the source's), exactly once
    /// under its own transactional id, `transactional_id`.
    pub fn for_dead_letters(
        brokers: &str,
        topic: &str,
        options: &std::collections::BTreeMap<String, String>,
        secrets: &[sluice_crds::SecretOption],
        transactional_id: String,
    ) -> Result<Self> {
        Self::new(&KafkaSpec {
            bootstrap_servers: brokers.to_owned(),
            topic: topic.to_owned(),
            delivery: Some(Delivery::ExactlyOnce),
            transactional_id: Some(transactional_id),
            // Malformed records can be large: the broker's limit decides.
            options: options
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "isolation.level"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([("message.max.bytes".to_owned(), "100000000".to_owned())])
                .collect(),
            secret_options: secrets.to_vec(),
        })
    }

    /// What a failed Kafka call made while doing `what` is: a transient
    /// failure the run retries from the checkpoint, fenced, or this sink's.
    fn failure(&self, what: String) -> impl Fn(KafkaError) -> Error + Send + 'static {
        let description = self.description();
        move |e| {
            classify(what.clone(), &e, |message| Error::Sink {
                sink: description.clone(),
                message,
            })
        }
    }

    /// Writes `records` as batch `batch_id`, not yet visible (see
    /// [`Sink::prepare`]).
    pub async fn prepare_records(&mut self, batch_id: u64, records: Vec<OutRecord>) -> Result<()> {
        let producer = self.producer()?;
        let topic = self.topic.clone();
        let exactly_once = self.marker.is_some();
        let what = format!(
            "writing batch {batch_id} to {} on {}",
            self.topic, self.brokers
        );
        let fail = self.failure(what.clone());
        let description = self.description();
        blocking(move || {
            if exactly_once {
                producer.begin_transaction().map_err(&fail)?;
            }
            let sent = produce(&producer, &topic, &records).map_err(&fail);
            let refused = producer
                .context()
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let outcome = match (sent, refused) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(why)) => Err(Error::Sink {
                    sink: description,
                    message: format!("{what}: the brokers refused a record: {why}"),
                }),
                (Ok(()), None) => Ok(()),
            };
            // NB: not when the brokers do not answer. Aborting needs the
            // coordinator, and librdkafka's abort waits for it past its
            // timeout: through a broker outage the sink sat in this call
            // until the broker came back (e2e/kafka.sh, the 120 s outage),
            // and the query never noticed. The transaction left open is
            // aborted by the next run's initTransactions (the query
            // restarts), or by the coordinator after transaction.timeout.ms.
            // A record the brokers refused is aborted at once, so that
            // read_committed consumers are not held back by it.
            if exactly_once && matches!(&outcome, Err(e) if !matches!(e, Error::Unavailable { .. }))
            {
                let _ = producer.abort_transaction(COMMIT_TIMEOUT);
            }
            outcome
        })
        .await
    }

    /// A Kafka sink from its (validated) spec.
    pub fn new(spec: &KafkaSpec) -> Result<Self> {
        let settings = |defaults: &[(&str, &str)]| {
            client_config(
                &spec.bootstrap_servers,
                &spec.options,
                &spec.secret_options,
                defaults,
                "spec.sink.kafka",
            )
        };
        // NB: librdkafka times a transaction's requests (AddOffsetsToTxn,
        // EndTxn) out by `socket.timeout.ms` (60 s), whatever the call's
        // own timeout: 20 s lets an outage be reported within the call's
        // timeout rather than a minute later.
        let config = settings(&[
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
            ("socket.timeout.ms", "20000"),
        ])?;
        let mut consumer_config = settings(&[])?;
        // The user's settings are the producer's: keep only what a consumer
        // reads (connection, security), quietly.
        consumer_config.set("log_level", "3");
        Ok(Self {
            topic: spec.topic.clone(),
            brokers: spec.bootstrap_servers.clone(),
            delivery: spec.delivery.unwrap_or_default(),
            transactional_id: spec.transactional_id.clone(),
            config,
            consumer_config,
            producer: None,
            marker: None,
        })
    }

    /// Sets the transactional id (before [`Sink::open`]).
    pub fn set_transactional_id(&mut self, id: String) {
        self.transactional_id = Some(id);
    }

    fn error(&self, message: String) -> Error {
        Error::Sink {
            sink: self.description(),
            message,
        }
    }

    fn producer(&self) -> Result<Arc<ThreadedProducer<Deliveries>>> {
        self.producer
            .clone()
            .ok_or_else(|| self.error("the sink is not open".into()))
    }

    /// What the coordinator records of `transactional_id`'s last
    /// transaction; `None` for a new id, or when it cannot be asked (TLS or
    /// SASL, a broker before KIP-664: warned).
    async fn last_transaction(&self, transactional_id: &str) -> Result<Option<LastTransaction>> {
        if let Err(e) = wire::check_security(self.config.get("security.protocol")) {
            tracing::warn!(
                sink = %self.description(),
                "Transactions a broker left open are not checked for: {e}. If read_committed consumers of the topic stop, end them with kafka-transactions.sh find-hanging and abort."
            );
            return Ok(None);
        }
        let (brokers, id) = (self.brokers.clone(), transactional_id.to_owned());
        match blocking(move || Ok(hanging::last_transaction(&brokers, &id, CALL_TIMEOUT))).await? {
            Ok(last) => Ok(last),
            Err(e) => self.hanging_failed(e).map(|()| None),
        }
    }

    /// Ends the transactions of `last`'s producer a broker left open on
    /// the topic and on the marker group's offsets partition.
    async fn settle_hanging(&self, last: LastTransaction, group: &str) -> Result<()> {
        let (brokers, topic, group) = (self.brokers.clone(), self.topic.clone(), group.to_owned());
        let settled = blocking(move || {
            Ok(hanging::settle(
                &brokers,
                &last,
                &topic,
                &group,
                CALL_TIMEOUT,
            ))
        })
        .await?;
        match settled {
            Ok(settled) => {
                for s in settled {
                    tracing::warn!(
                        sink = %self.description(),
                        partition = %format!("{}-{}", s.topic, s.partition),
                        start_offset = s.start_offset,
                        outcome = ?s.outcome,
                        "A transaction a broker had left open (its coordinator had ended it, but the partition never got its marker) is ended as the coordinator recorded it."
                    );
                }
                Ok(())
            }
            Err(e) => self.hanging_failed(e),
        }
    }

    fn hanging_failed(&self, e: HangingError) -> Result<()> {
        match e {
            HangingError::Unavailable(message) => Err(Error::Unavailable {
                what: "Kafka".into(),
                message: format!(
                    "checking {} for transactions a broker left open: {message}",
                    self.brokers
                ),
            }),
            HangingError::Unsupported(message) => {
                tracing::warn!(
                    sink = %self.description(),
                    "Transactions a broker left open could not be checked for ({message}). If read_committed consumers of the topic stop, end them with kafka-transactions.sh find-hanging and abort."
                );
                Ok(())
            }
            HangingError::Stuck(message) => Err(self.error(message)),
        }
    }

    fn marker_partition(&self, offset: Offset) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, offset)
            .map_err(|e| self.error(e.to_string()))?;
        Ok(tpl)
    }
}

/// The bytes of a text or binary column's value.
fn bytes_of(column: &dyn Array, row: usize, name: &str) -> Result<Option<Vec<u8>>> {
    if column.is_null(row) {
        return Ok(None);
    }
    Ok(Some(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row).as_bytes().to_vec(),
        DataType::LargeUtf8 => column.as_string::<i64>().value(row).as_bytes().to_vec(),
        DataType::Utf8View => column.as_string_view().value(row).as_bytes().to_vec(),
        DataType::Binary => column.as_binary::<i32>().value(row).to_vec(),
        DataType::LargeBinary => column.as_binary::<i64>().value(row).to_vec(),
        DataType::BinaryView => column.as_binary_view().value(row).to_vec(),
        other => {
            return Err(Error::Unsupported {
                path: "spec.query".into(),
                message: format!(
                    "the result's column {name:?} is {other}: the Kafka sink writes text or bytes there (CAST it to STRING)"
                ),
            });
        }
    }))
}

/// The records of a batch's result, as Spark's Kafka sink makes them.
fn records(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<OutRecord>> {
    let mut out = Vec::new();
    let has_value = schema.field_with_name("value").is_ok();
    for batch in batches {
        if !has_value {
            let mut text = Vec::new();
            let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut text);
            writer
                .write(batch)
                .and_then(|()| writer.finish())
                .map_err(|e| Error::State(e.to_string()))?;
            for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.push(OutRecord {
                    topic: None,
                    partition: None,
                    key: None,
                    value: Some(line.to_vec()),
                    headers: Vec::new(),
                });
            }
            continue;
        }
        let column = |name: &str| batch.column_by_name(name).cloned();
        let (value, key, topic, partition, headers) = (
            column("value").expect("checked"),
            column("key"),
            column("topic"),
            column("partition"),
            column("headers"),
        );
        for row in 0..batch.num_rows() {
            let partition = match &partition {
                Some(p) if !p.is_null(row) => Some(match p.data_type() {
                    DataType::Int32 => p
                        .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
                        .value(row),
                    DataType::Int64 => p
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                        .value(row) as i32,
                    other => {
                        return Err(Error::Unsupported {
                            path: "spec.query".into(),
                            message: format!(
                                "the result's column \"partition\" is {other}: write an INT"
                            ),
                        });
                    }
                }),
                _ => None,
            };
            let mut record_headers = Vec::new();
            if let Some(h) = &headers
                && !h.is_null(row)
            {
                let list = h.as_list_opt::<i32>().ok_or_else(|| Error::Unsupported {
                    path: "spec.query".into(),
                    message: "the result's column \"headers\" must be a list of {key, value}"
                        .into(),
                })?;
                let items = list.value(row);
                let items = items.as_struct_opt().ok_or_else(|| Error::Unsupported {
                    path: "spec.query".into(),
                    message: "the result's column \"headers\" must be a list of {key, value}"
                        .into(),
                })?;
                let (keys, values) = (items.column(0), items.column(1));
                for i in 0..items.len() {
                    let k = bytes_of(keys.as_ref(), i, "headers.key")?.unwrap_or_default();
                    record_headers.push((
                        String::from_utf8_lossy(&k).into_owned(),
                        bytes_of(values.as_ref(), i, "headers.value")?,
                    ));
                }
            }
            out.push(OutRecord {
                topic: match &topic {
                    Some(t) => bytes_of(t.as_ref(), row, "topic")?
                        .map(|b| String::from_utf8_lossy(&b).into_owned()),
                    None => None,
                },
                partition,
                key: match &key {
                    Some(k) => bytes_of(k.as_ref(), row, "key")?,
                    None => None,
                },
                value: bytes_of(value.as_ref(), row, "value")?,
                headers: record_headers,
            });
        }
    }
    Ok(out)
}

/// Sends every record, waiting when the producer's queue is full, then
/// waits for every delivery.
fn produce(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    records: &[OutRecord],
) -> std::result::Result<(), KafkaError> {
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(r.topic.as_deref().unwrap_or(topic)).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        let mut progress = Progress::new(reported(producer));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // The queue drains as the brokers take records.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if !progress.stalled(reported(producer), Instant::now()) =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((err, _)) => return Err(err),
            }
        }
    }
    wait_for_deliveries(producer)
}

/// How often [`wait_for_deliveries`] looks at the producer's queue.
const DELIVERY_POLL: Duration = Duration::from_millis(1);

/// Waits until every record sent was delivered (or refused: the delivery
/// callbacks note it), while the brokers take records.
///
/// NB: not `producer.flush`: rdkafka's flush checks the queue, then polls
/// for events for up to 100 ms before it checks again, and the delivery
/// reports it waits for are taken by the `ThreadedProducer`'s own polling
/// thread, so every flush that did not find the queue empty at once took
/// 100 ms: most of a small batch's time, and the floor of Kafka -> Kafka
/// latency (`bench/latency.sh`). The queue's length counts delivery reports
/// not yet served, so an empty queue means every callback ran.
fn wait_for_deliveries(
    producer: &ThreadedProducer<Deliveries>,
) -> std::result::Result<(), KafkaError> {
    let mut progress = Progress::new(reported(producer));
    while producer.in_flight_count() > 0 {
        if progress.stalled(reported(producer), Instant::now()) {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(DELIVERY_POLL);
    }
    Ok(())
}

/// The delivery reports `producer` served so far.
fn reported(producer: &ThreadedProducer<Deliveries>) -> u64 {
    producer.context().reported.load(Ordering::Relaxed)
}

/// Whether the brokers are taking records: delivery reports keep coming.
///
/// NB: not the producer's queue length going down: it also counts the
/// error events librdkafka queues for the application (one for each
/// failed reconnection to a broker that is down), and the polling thread
/// serving them makes it shrink while no record leaves.
struct Progress {
    reported: u64,
    since: Instant,
}

impl Progress {
    fn new(reported: u64) -> Self {
        Self {
            reported,
            since: Instant::now(),
        }
    }

    /// Whether no delivery was reported for [`SEND_STALL`] up to `now`,
    /// given the reports served so far.
    fn stalled(&mut self, reported: u64, now: Instant) -> bool {
        if reported > self.reported {
            self.reported = reported;
            self.since = now;
        }
        now.saturating_duration_since(self.since) > SEND_STALL
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn description(&self) -> String {
        format!("KafkaSink[{}]", self.topic)
    }

    async fn open(&mut self, context: &SinkContext) -> Result<()> {
        let mut config = self.config.clone();
        config.set("enable.idempotence", "true");
        let exactly_once = self.delivery == Delivery::ExactlyOnce;
        let transactional_id = context.scoped(
            &self
                .transactional_id
                .clone()
                .unwrap_or_else(|| format!("sluice-{}", context.query_id)),
        );
        if exactly_once {
            config.set("transactional.id", &transactional_id);
        }
        let producer: ThreadedProducer<Deliveries> = config
            .create_with_context(Deliveries::default())
            .map_err(|e| Error::Unsupported {
                path: "spec.sink.kafka".into(),
                message: format!("the Kafka client settings are refused: {e}"),
            })?;
        let producer = Arc::new(producer);
        if exactly_once {
            let p = producer.clone();
            let fail = self.failure(format!(
                "opening the transactional producer {transactional_id} on {}",
                self.brokers
            ));
            // How the id's last transaction ended, read before
            // `initTransactions` forgets it; then, with every older
            // producer fenced, the transactions a broker left open on the
            // sink's partitions are ended as the coordinator meant
            // (hanging.rs).
            let last = self.last_transaction(&transactional_id).await?;
            blocking(move || p.init_transactions(COMMIT_TIMEOUT).map_err(fail)).await?;
            if let Some(last) = last {
                self.settle_hanging(last, &transactional_id).await?;
            }
            let marker: BaseConsumer = self
                .consumer_config
                .clone()
                .set("group.id", &transactional_id)
                .set("isolation.level", "read_committed")
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| self.error(format!("the Kafka client settings are refused: {e}")))?;
            self.marker = Some(Arc::new(marker));
        }
        self.producer = Some(producer);
        Ok(())
    }

    async fn is_committed(&mut self, batch_id: u64) -> Result<bool> {
        let Some(marker) = self.marker.clone() else {
            // At least once: nothing to tell, the batch is written again.
            return Ok(false);
        };
        let tpl = self.marker_partition(Offset::Invalid)?;
        let what = format!(
            "reading the committed batches of {} from {}",
            self.description(),
            self.brokers
        );
        let description = self.description();
        let committed = blocking(move || {
            // NB: a group's coordinator takes a moment to load after the
            // group first appears: retried, as clients retry it.
            let mut attempt = 0;
            loop {
                match marker.committed_offsets(tpl.clone(), CALL_TIMEOUT) {
                    Ok(found) => return Ok(found),
                    Err(e)
                        if attempt < 40
                            && matches!(
                                e.rdkafka_error_code(),
                                Some(
                                    RDKafkaErrorCode::NotCoordinator
                                        | RDKafkaErrorCode::CoordinatorLoadInProgress
                                        | RDKafkaErrorCode::CoordinatorNotAvailable
                                )
                            ) =>
                    {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => {
                        return Err(classify(what, &e, |message| Error::Sink {
                            sink: description,
                            message,
                        }));
                    }
                }
            }
        })
        .await?;
        Ok(committed.elements().iter().any(|e| match e.offset() {
            Offset::Offset(next) => next > batch_id as i64,
            _ => false,
        }))
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let (schema, batches) = (schema.clone(), batches.to_vec());
        let records = blocking(move || records(&schema, &batches)).await?;
        self.prepare_records(batch_id, records).await
    }

    async fn commit(&mut self, batch_id: u64) -> Result<()> {
        let Some(marker) = self.marker.clone() else {
            return Ok(());
        };
        let producer = self.producer()?;
        let tpl = self.marker_partition(Offset::Offset(batch_id as i64 + 1))?;
        let fail = self.failure(format!(
            "committing batch {batch_id} to {} on {}",
            self.topic, self.brokers
        ));
        let description = self.description();
        blocking(move || {
            let group = marker.group_metadata().ok_or_else(|| Error::Sink {
                sink: description,
                message: "the marker consumer has no group metadata".into(),
            })?;
            producer
                .send_offsets_to_transaction(&tpl, &group, COMMIT_TIMEOUT)
                .map_err(&fail)?;
            producer.commit_transaction(COMMIT_TIMEOUT).map_err(fail)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_stalls_when_no_delivery_is_reported_for_the_stall_time() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let stall = SEND_STALL.as_millis() as u64;
        let mut progress = Progress {
            reported: 5,
            since: start,
        };
        assert!(!progress.stalled(5, at(stall)));
        // A delivery restarts the clock.
        assert!(!progress.stalled(6, at(stall - 1)));
        assert!(!progress.stalled(6, at(2 * stall - 1)));
        assert!(progress.stalled(6, at(2 * stall)));
        // Anything else (the queue's length, error events) does not count:
        // the same number of reports, however much later, stays stalled.
        assert!(progress.stalled(6, at(10 * stall)));
        assert!(!progress.stalled(7, at(10 * stall)));
    }
}
