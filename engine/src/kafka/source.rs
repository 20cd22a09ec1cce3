//! The Kafka source. A batch's range is, per topic and partition, a start
//! and an end offset (Spark's JSON, in `offsets/N`), so a replay reads
//! exactly the records the batch planned:
//!
//! - **plan**: the topics' partitions (a pattern picks up topics and
//!   partitions as they appear; new partitions start at their earliest
//!   offset, as in Spark), their earliest and latest offsets (the latest
//!   *stable* offset under `read_committed`, so a planned range never holds
//!   a transaction still open), `maxOffsetsPerTrigger` spread over the
//!   partitions by their backlog (Spark's rule), and data loss: offsets the
//!   query still needs that the broker no longer holds stop the query
//!   (`failOnDataLoss`) or are skipped, counted;
//! - **read** a range: the partitions are assigned at their start offsets
//!   and read until each consumer position passes its end (aborted records
//!   and transaction markers are skipped by librdkafka and still move the
//!   position); values are decoded by `format` into the declared columns,
//!   and malformed records set aside for the dead-letter destination;
//! - **commit**: the batch's end offsets are committed to the consumer
//!   group (`sluice-<query>`), for monitoring only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    StructBuilder, TimestampMicrosecondBuilder, UInt32Array,
};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;
use serde_json::Value;
use sluice_crds::validate::{StartingOffsets, parse_starting_offsets};
use sluice_crds::{Format, KafkaSource as KafkaSpec, Source as SourceSpec};
use tracing::warn;

use super::{
    CALL_TIMEOUT, Offsets, blocking, classify, client_config, offsets_from_json, offsets_json,
};
use crate::source::{BadRecord, BatchRange, KafkaRecord, ReadMode, Source};
use crate::{Error, Result};

/// How long a read may see no progress on a partition before the brokers
/// count as unavailable: time spent polling, each poll counted for at most
/// [`POLL_COUNTS_AT_MOST`], so that a process that was itself stopped (a
/// SIGSTOP, a paused VM, a starved CPU) does not blame the brokers for it.
const READ_STALL: Duration = Duration::from_secs(10);

/// The poll's timeout in [`read_range`].
const READ_POLL: Duration = Duration::from_millis(100);

/// The most one turn of [`read_range`]'s loop (a poll) adds to a read's
/// stall (see [`READ_STALL`]).
const POLL_COUNTS_AT_MOST: Duration = Duration::from_millis(500);

/// Which topics the source reads.
enum Topics {
    Names(Vec<String>),
    Pattern(Regex),
}

/// A Kafka record's own columns, as Spark's Kafka source names them.
const RECORD_COLUMNS: [&str; 7] = [
    "key",
    "value",
    "topic",
    "partition",
    "offset",
    "timestamp",
    "headers",
];

fn headers_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(header_fields()),
        true,
    )))
}

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, true),
        Field::new("value", DataType::Binary, true),
    ])
}

fn record_field(name: &str) -> Field {
    let ty = match name {
        "key" | "value" => DataType::Binary,
        "topic" => DataType::Utf8,
        "partition" => DataType::Int32,
        "offset" => DataType::Int64,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => headers_type(),
    };
    Field::new(name, ty, true)
}

/// A source of Kafka topics.
pub struct KafkaSource {
    name: String,
    brokers: String,
    topics: Topics,
    starting: StartingOffsets,
    max_per_trigger: Option<u64>,
    fail_on_data_loss: bool,
    config: rdkafka::ClientConfig,
    consumer: Option<Arc<BaseConsumer>>,
    decoding: Decoding,
    declared: SchemaRef,
    schema: SchemaRef,
    /// The record columns the table has (those no declared column shadows).
    record_columns: Vec<&'static str>,
    dead_letter: bool,
    bad_records: Vec<BadRecord>,
    mode: ReadMode,
    /// With `availableNow`: the latest offsets when the run started.
    limit: Option<Offsets>,
    /// Records skipped because the broker no longer held them.
    lost: u64,
    /// With several replicas: this one's, whose partitions only it reads.
    slice: Option<crate::replicas::Replica>,
    /// A repartition topic's reader: its admin client, and when it last
    /// purged what was read.
    admin: Option<Arc<AdminClient<DefaultClientContext>>>,
    purged_at: Option<Instant>,
    /// With `keyedBy`: the topic's keying, checked record by record.
    keyed: Option<Keyed>,
    /// The partition of each row the last `read` returned.
    row_partitions: Option<crate::source::RowPartitions>,
}

/// A topic keyed by a column (`keyedBy`): each record must be in the
/// partition Kafka's default partitioner gives its key.
struct Keyed {
    /// The column's position among the declared columns.
    column: usize,
    /// The spec field, for errors.
    field: String,
    /// How many partitions the query's state has (`statePartitions`).
    state_partitions: Option<u32>,
    /// How many partitions the topic has, once known.
    topic_partitions: Option<usize>,
}

/// How often a repartition topic's reader deletes the records it read.
const PURGE_EVERY: Duration = Duration::from_secs(10);

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // Its consumer has the query's group: closing it can wait for the
        // brokers (see `close_in_background`).
        if let Some(consumer) = self.consumer.take() {
            super::close_in_background(consumer);
        }
    }
}

impl KafkaSource {
    /// Builds a Kafka source from its (validated) spec; `path` is its field
    /// path, `query` the query's name (the default consumer group).
    pub fn new(
        source: &SourceSpec,
        spec: &KafkaSpec,
        path: &str,
        mode: ReadMode,
        query: &str,
    ) -> Result<Self> {
        let unsupported = |field: &str, message: String| Error::Unsupported {
            path: format!("{path}.{field}"),
            message,
        };
        let format = source.format.unwrap_or(Format::Json);
        let decoding = match format {
            Format::Json => Decoding::Json,
            Format::Csv => Decoding::Csv,
            Format::Avro => {
                let text = source.avro_schema.as_deref().ok_or_else(|| {
                    unsupported(
                        "avroSchema",
                        "is missing: format avro needs the writer's Avro schema".into(),
                    )
                })?;
                Decoding::Avro(Arc::new(
                    super::avro::parse_schema(text).map_err(|m| unsupported("avroSchema", m))?,
                ))
            }
            Format::Parquet => {
                return Err(unsupported(
                    "format",
                    "parquet is a file format: Kafka records are json, csv or avro".into(),
                ));
            }
        };
        let topics = match (&spec.topic, &spec.topics, &spec.topic_pattern) {
            (Some(topic), _, _) => Topics::Names(vec![topic.clone()]),
            (_, Some(topics), _) => Topics::Names(topics.clone()),
            (_, _, Some(pattern)) => {
                Topics::Pattern(Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    unsupported(
                        "kafka.topicPattern",
                        format!("is not a regular expression: {e}"),
                    )
                })?)
            }
            _ => return Err(unsupported("kafka", "names no topic".into())),
        };
        let starting = match &spec.starting_offsets {
            None => StartingOffsets::Latest,
            Some(text) => parse_starting_offsets(text)
                .map_err(|message| unsupported("kafka.startingOffsets", message))?,
        };
        let group = spec
            .group_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{query}"));
        let client_id = format!("sluice-{query}");
        let config = client_config(
            &spec.bootstrap_servers,
            &spec.options,
            &spec.secret_options,
            &[
                ("isolation.level", "read_committed"),
                ("client.id", &client_id),
            ],
            &format!("{path}.kafka"),
        )?
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        .clone();
        let declared_fields: Vec<Field> = source
            .schema
            .iter()
            .flatten()
            .map(|c| {
                Field::new(
                    &c.name,
                    crate::source::arrow_type(c.data_type),
                    c.nullable.unwrap_or(true),
                )
            })
            .collect();
        let record_columns: Vec<&'static str> = RECORD_COLUMNS
            .into_iter()
            .filter(|name| !declared_fields.iter().any(|f| f.name() == name))
            .collect();
        let mut fields = declared_fields.clone();
        fields.extend(record_columns.iter().map(|n| record_field(n)));
        Ok(Self {
            name: source.name.clone(),
            brokers: spec.bootstrap_servers.clone(),
            topics,
            starting,
            max_per_trigger: spec.max_offsets_per_trigger,
            fail_on_data_loss: spec.fail_on_data_loss.unwrap_or(true),
            config,
            consumer: None,
            decoding,
            declared: Arc::new(Schema::new(declared_fields)),
            schema: Arc::new(Schema::new(fields)),
            record_columns,
            dead_letter: source.dead_letter.is_some(),
            bad_records: Vec::new(),
            mode,
            limit: None,
            lost: 0,
            slice: None,
            admin: None,
            purged_at: None,
            keyed: spec.keyed_by.as_ref().map(|column| Keyed {
                column: source
                    .schema
                    .iter()
                    .flatten()
                    .position(|c| &c.name == column)
                    .unwrap_or(usize::MAX),
                field: format!("{path}.kafka.keyedBy"),
                state_partitions: None,
                topic_partitions: None,
            }),
            row_partitions: None,
        })
    }

    /// This source as the reader of a repartition topic: each record's
    /// value is an Arrow IPC stream of rows of `schema`, and the table is
    /// just those rows.
    pub fn into_shuffle(mut self, schema: SchemaRef) -> Self {
        self.decoding = Decoding::ArrowIpc;
        self.declared = schema.clone();
        self.schema = schema;
        self.record_columns = Vec::new();
        self.keyed = None;
        self
    }

    /// The repartition topic's records before `end` were read by a
    /// committed batch, and no replay or rescale reads them again: deleted
    /// (as Kafka Streams purges its repartition topics), at most once every
    /// [`PURGE_EVERY`], in the background; a failure is logged.
    fn purge(&mut self, end: &Offsets) {
        if self.purged_at.is_some_and(|at| at.elapsed() < PURGE_EVERY) {
            return;
        }
        self.purged_at = Some(Instant::now());
        if self.admin.is_none() {
            match self
                .config
                .clone()
                .remove("group.id")
                .remove("isolation.level")
                .remove("enable.auto.commit")
                .remove("enable.auto.offset.store")
                .remove("auto.offset.reset")
                .remove("enable.partition.eof")
                .create::<AdminClient<DefaultClientContext>>()
            {
                Ok(admin) => self.admin = Some(Arc::new(admin)),
                Err(e) => {
                    warn!(source = %self.name, error = %e, "Cannot create a Kafka admin client to purge the repartition topic.");
                    return;
                }
            }
        }
        let admin = self.admin.clone().expect("created above");
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in end {
            for (p, o) in partitions {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
            }
        }
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = admin.delete_records(&tpl, &AdminOptions::new()).await {
                warn!(source = %name, error = %e, "Could not purge the repartition topic's records already read (they stay until its retention).");
            }
        });
    }

    /// The rows of IPC-encoded records, in the declared schema; a record
    /// that does not decode fails the batch, naming it (the engine wrote
    /// it: no dead letters).
    fn decode_ipc(&self, records: &[Record]) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for r in records {
            let Some(value) = r.value.as_deref() else {
                continue;
            };
            let bad = |e: String| {
                self.source_error(format!(
                    "the record at {}/{} offset {} is not an Arrow IPC stream of partial states: {e}",
                    r.topic, r.partition, r.offset
                ))
            };
            let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(
                std::io::Cursor::new(value),
                None,
            )
            .map_err(|e| bad(e.to_string()))?;
            for batch in reader {
                let batch = batch.map_err(|e| bad(e.to_string()))?;
                let batch = RecordBatch::try_new(self.declared.clone(), batch.columns().to_vec())
                    .map_err(|e| bad(e.to_string()))?;
                out.push(batch);
            }
        }
        Ok(out)
    }

    fn source_error(&self, message: String) -> Error {
        Error::Source {
            source_name: self.name.clone(),
            message,
        }
    }

    /// The consumer, created the first time it is needed.
    async fn consumer(&mut self) -> Result<Arc<BaseConsumer>> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let config = self.config.clone();
        let name = self.name.clone();
        let consumer: BaseConsumer = config.create().map_err(|e| Error::Unsupported {
            path: format!("source {name}"),
            message: format!("the Kafka client settings are refused: {e}"),
        })?;
        let consumer = Arc::new(consumer);
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// The partitions of the topics the source reads, now.
    async fn partitions(&mut self) -> Result<Vec<(String, i32)>> {
        let consumer = self.consumer().await?;
        let brokers = self.brokers.clone();
        let name = self.name.clone();
        let metadata = blocking(move || {
            consumer.fetch_metadata(None, CALL_TIMEOUT).map_err(|e| {
                classify(
                    format!("reading the topics' metadata from {brokers}"),
                    &e,
                    |m| Error::Source {
                        source_name: name,
                        message: m,
                    },
                )
            })
        })
        .await?;
        let mut out = Vec::new();
        for topic in metadata.topics() {
            let wanted = match &self.topics {
                Topics::Names(names) => names.iter().any(|n| n == topic.name()),
                Topics::Pattern(pattern) => {
                    !topic.name().starts_with("__") && pattern.is_match(topic.name())
                }
            };
            if wanted && topic.error().is_none() {
                if let Some(keyed) = &mut self.keyed {
                    let count = topic.partitions().len();
                    if let Some(state) = keyed.state_partitions
                        && state as usize != count
                    {
                        return Err(Error::Unsupported {
                            path: "spec.statePartitions".into(),
                            message: format!(
                                "is {state}, but topic {} has {count} partitions: with {} the state is partitioned as the topic is (state partition p holds the keys of topic partition p), so they must be equal (on a new checkpoint: statePartitions is fixed for the life of one)",
                                topic.name(),
                                keyed.field
                            ),
                        });
                    }
                    keyed.topic_partitions = Some(count);
                }
                out.extend(
                    topic
                        .partitions()
                        .iter()
                        .filter(|p| self.slice.is_none_or(|r| r.owns(topic.name(), p.id())))
                        .map(|p| (topic.name().to_owned(), p.id())),
                );
            }
        }
        out.sort();
        Ok(out)
    }

    /// The earliest and the latest (stable) offset of each partition.
    async fn bounds(&mut self, partitions: &[(String, i32)]) -> Result<(Offsets, Offsets)> {
        if partitions.is_empty() {
            // A replica that owns none of the partitions (more replicas
            // than partitions): nothing to ask (the brokers refuse an empty
            // list).
            return Ok((Offsets::new(), Offsets::new()));
        }
        let consumer = self.consumer().await?;
        let brokers = self.brokers.clone();
        let name = self.name.clone();
        let partitions = partitions.to_vec();
        blocking(move || {
            let query = |at: Offset| -> Result<Offsets> {
                let mut tpl = TopicPartitionList::new();
                for (topic, p) in &partitions {
                    tpl.add_partition_offset(topic, *p, at)
                        .map_err(|e| Error::State(e.to_string()))?;
                }
                let found = consumer.offsets_for_times(tpl, CALL_TIMEOUT).map_err(|e| {
                    classify(format!("listing offsets on {brokers}"), &e, |m| {
                        Error::Source {
                            source_name: name.clone(),
                            message: m,
                        }
                    })
                })?;
                let mut out = Offsets::new();
                for e in found.elements() {
                    if let Err(err) = e.error() {
                        return Err(classify(
                            format!(
                                "listing the offsets of {} partition {} on {brokers}",
                                e.topic(),
                                e.partition()
                            ),
                            &err,
                            |m| Error::Source {
                                source_name: name.clone(),
                                message: m,
                            },
                        ));
                    }
                    let offset = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    };
                    out.entry(e.topic().to_owned())
                        .or_default()
                        .insert(e.partition(), offset);
                }
                Ok(out)
            };
            Ok((query(Offset::Beginning)?, query(Offset::End)?))
        })
        .await
    }

    /// Where a new query starts, from `startingOffsets`.
    async fn starting_offsets(&mut self) -> Result<Offsets> {
        let partitions = self.partitions().await?;
        let (earliest, latest) = self.bounds(&partitions).await?;
        let mut out = Offsets::new();
        for (topic, p) in &partitions {
            let lo = earliest[topic][p];
            let hi = latest[topic][p];
            let offset = match &self.starting {
                StartingOffsets::Earliest => lo,
                StartingOffsets::Latest => hi,
                StartingOffsets::Partitions(given) => match given.get(topic).and_then(|t| t.get(p))
                {
                    Some(-2) => lo,
                    Some(-1) | None => hi,
                    Some(o) => *o,
                },
            };
            out.entry(topic.clone()).or_default().insert(*p, offset);
        }
        Ok(out)
    }

    /// Offsets the query still needs that the broker no longer holds: an
    /// error (`failOnDataLoss`), or a warning and a count.
    fn data_loss(&mut self, what: String, records: u64) -> Result<()> {
        if self.fail_on_data_loss {
            return Err(self.source_error(format!(
                "{what}: the broker no longer holds them (deleted by retention, or the topic was deleted or recreated); set failOnDataLoss: false on this source to skip them, or start over with a new spec.checkpoint.location"
            )));
        }
        warn!(source = %self.name, records, "{what}: skipped (failOnDataLoss is false).");
        self.lost += records;
        Ok(())
    }

    /// Decodes records' values into the declared columns; the indices of
    /// the records that decoded, the rest set aside.
    fn decode(&mut self, records: &[Record]) -> Result<(Option<RecordBatch>, Vec<u32>)> {
        let mut good = Vec::with_capacity(records.len());
        let mut bad_reasons: BTreeMap<usize, String> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            match &r.value {
                None => {
                    bad_reasons.insert(i, "the record has no value (a tombstone)".into());
                }
                Some(v) if v.iter().all(u8::is_ascii_whitespace) => {
                    bad_reasons.insert(i, "the value is empty".into());
                }
                Some(_) => good.push(i),
            }
        }
        if self.declared.fields().is_empty() {
            return self.set_aside(records, good, bad_reasons, None);
        }
        let values: Vec<&[u8]> = good
            .iter()
            .map(|i| records[*i].value.as_deref().unwrap_or_default())
            .collect();
        let decoded = decode_values(&self.decoding, &self.declared, &values);
        let batch = match decoded {
            Ok(batch) if batch.num_rows() == values.len() => batch,
            _ => {
                // One by one, to find the malformed ones.
                let mut kept = Vec::with_capacity(good.len());
                for i in good {
                    let value = records[i].value.as_deref().unwrap_or_default();
                    match decode_values(&self.decoding, &self.declared, &[value]) {
                        Ok(b) if b.num_rows() == 1 => kept.push(i),
                        Ok(b) => {
                            bad_reasons.insert(
                                i,
                                format!(
                                    "the value holds {} {} records, not one",
                                    b.num_rows(),
                                    self.decoding
                                ),
                            );
                        }
                        Err(e) => {
                            bad_reasons.insert(i, e);
                        }
                    }
                }
                good = kept;
                let values: Vec<&[u8]> = good
                    .iter()
                    .map(|i| records[*i].value.as_deref().unwrap_or_default())
                    .collect();
                decode_values(&self.decoding, &self.declared, &values).map_err(|e| {
                    self.source_error(format!(
                        "records that decode one by one do not decode together: {e}"
                    ))
                })?
            }
        };
        self.set_aside(records, good, bad_reasons, Some(batch))
    }

    /// With `keyedBy`: the decoded rows (`batch`, of the records `good`)
    /// whose record is in the partition its key belongs in; the others set
    /// aside as malformed (a record elsewhere would be counted in the state
    /// of a partition another replica owns).
    fn keep_well_placed(
        &mut self,
        records: &[Record],
        batch: &RecordBatch,
        good: Vec<u32>,
    ) -> Result<(RecordBatch, Vec<u32>)> {
        let keyed = self.keyed.as_ref().expect("called when keyed");
        let count = keyed.topic_partitions.unwrap_or(0);
        let column = keyed.column;
        let field = keyed.field.clone();
        if count == 0 || column >= batch.num_columns() {
            return Err(self.source_error(format!(
                "{field}: the topic's partition count or the key column is unknown"
            )));
        }
        let name = batch.schema().field(column).name().clone();
        let text = datafusion::arrow::compute::cast(batch.column(column), &DataType::Utf8)
            .map_err(|e| self.source_error(format!("{field}: {e}")))?;
        let text = text
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .expect("cast to Utf8");
        let mut kept_rows = Vec::with_capacity(good.len());
        let mut bad = BTreeMap::new();
        for (row, i) in good.iter().enumerate() {
            let r = &records[*i as usize];
            if datafusion::arrow::array::Array::is_null(text, row) {
                bad.insert(
                    *i as usize,
                    format!("{name} (the topic's key, {field}) is null"),
                );
                continue;
            }
            let key = text.value(row);
            let owner = super::default_partition(key.as_bytes(), count);
            if owner as i32 != r.partition {
                bad.insert(
                    *i as usize,
                    format!(
                        "{name} {key:?} belongs in partition {owner} of {count} (Kafka's default partitioner, murmur2, as {field} says), not {}",
                        r.partition
                    ),
                );
                continue;
            }
            kept_rows.push(row as u32);
        }
        if bad.is_empty() {
            return Ok((batch.clone(), good));
        }
        let kept = kept_rows
            .iter()
            .map(|row| good[*row as usize] as usize)
            .collect();
        let batch = take_record_batch(batch, &UInt32Array::from(kept_rows))
            .map_err(|e| Error::State(e.to_string()))?;
        let (_, kept) = self.set_aside(records, kept, bad, None)?;
        Ok((batch, kept))
    }

    fn set_aside(
        &mut self,
        records: &[Record],
        good: Vec<usize>,
        bad: BTreeMap<usize, String>,
        batch: Option<RecordBatch>,
    ) -> Result<(Option<RecordBatch>, Vec<u32>)> {
        for (i, error) in bad {
            let r = &records[i];
            let record = BadRecord {
                file: format!("kafka:{}/{}@{}", r.topic, r.partition, r.offset),
                line: r.offset as u64,
                error: error.clone(),
                record: String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                    .into_owned(),
                kafka: Some(KafkaRecord {
                    topic: r.topic.clone(),
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key.clone(),
                    value: r.value.clone(),
                }),
            };
            if !self.dead_letter {
                return Err(self.source_error(format!(
                    "topic {} partition {} offset {}: {error}: {} (set deadLetter on this source to set such records aside and go on)",
                    r.topic,
                    r.partition,
                    r.offset,
                    record.record.chars().take(200).collect::<String>()
                )));
            }
            self.bad_records.push(record);
        }
        Ok((batch, good.into_iter().map(|i| i as u32).collect()))
    }
}

/// One record as read.
struct Record {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// How a record's value is decoded: the source's `format`.
enum Decoding {
    Json,
    Csv,
    /// Avro datums of the writer's schema.
    Avro(Arc<apache_avro::Schema>),
    /// Arrow IPC streams of many rows each: the repartition topic's
    /// partial states (see [`crate::shuffle`]).
    ArrowIpc,
}

impl std::fmt::Display for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoding::Json => "json",
            Decoding::Csv => "csv",
            Decoding::Avro(_) => "avro",
            Decoding::ArrowIpc => "arrow-ipc",
        })
    }
}

/// Decodes values into rows of `schema`.
fn decode_values(
    decoding: &Decoding,
    schema: &SchemaRef,
    values: &[&[u8]],
) -> std::result::Result<RecordBatch, String> {
    match decoding {
        Decoding::Avro(writer) => {
            let json = values
                .iter()
                .map(|v| super::avro::to_json(writer, v))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let json: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
            decode_values(&Decoding::Json, schema, &json)
        }
        Decoding::Csv => {
            let mut text = Vec::new();
            for v in values {
                text.extend_from_slice(v);
                text.push(b'\n');
            }
            let batches = datafusion::arrow::csv::ReaderBuilder::new(schema.clone())
                .with_header(false)
                .with_batch_size(values.len().max(1))
                .build(text.as_slice())
                .map_err(|e| e.to_string())?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            datafusion::arrow::compute::concat_batches(schema, &batches).map_err(|e| e.to_string())
        }
        _ => {
            let mut decoder = datafusion::arrow::json::ReaderBuilder::new(schema.clone())
                .with_batch_size(values.len() + 1)
                .build_decoder()
                .map_err(|e| e.to_string())?;
            for v in values {
                decoder.decode(v).map_err(|e| e.to_string())?;
                decoder.decode(b"\n").map_err(|e| e.to_string())?;
            }
            Ok(decoder
                .flush()
                .map_err(|e| e.to_string())?
                .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
        }
    }
}

/// Spark's `maxOffsetsPerTrigger`: each partition gets the limit in
/// proportion to its backlog (a partition with a backlog at least one
/// record), never past its latest offset.
fn rate_limit(start: &Offsets, latest: &Offsets, limit: u64) -> Offsets {
    let backlog = |t: &str, p: i32| -> i64 {
        (latest[t][&p] - start.get(t).and_then(|s| s.get(&p)).copied().unwrap_or(0)).max(0)
    };
    let total: i64 = latest
        .iter()
        .flat_map(|(t, ps)| ps.keys().map(move |p| (t, *p)))
        .map(|(t, p)| backlog(t, p))
        .sum();
    let mut end = Offsets::new();
    for (topic, partitions) in latest {
        for (&p, &hi) in partitions {
            let begin = start
                .get(topic)
                .and_then(|s| s.get(&p))
                .copied()
                .unwrap_or(hi);
            let size = backlog(topic, p);
            let offset = if total as u64 <= limit || size == 0 {
                hi
            } else {
                let prorate = limit as f64 * (size as f64 / total as f64);
                let take = if prorate < 1.0 {
                    prorate.ceil()
                } else {
                    prorate.floor()
                } as i64;
                (begin + take).min(hi)
            };
            end.entry(topic.clone()).or_default().insert(p, offset);
        }
    }
    end
}

/// The partition of each kept record (`good`, indices into `records`),
/// each partition marked behind when `end` stops short of `latest` there
/// (or `latest` is not known: a replayed batch).
fn row_partitions(
    records: &[Record],
    good: &[u32],
    end: &Offsets,
    latest: &Value,
) -> crate::source::RowPartitions {
    let latest = offsets_from_json(latest);
    let mut index: BTreeMap<(&str, i32), u32> = BTreeMap::new();
    let mut out = crate::source::RowPartitions::default();
    out.rows.reserve(good.len());
    // A read's records come sorted by partition: the map is asked once per
    // partition, not once per row.
    let mut last: Option<((&str, i32), u32)> = None;
    for &i in good {
        let record = &records[i as usize];
        let key = (record.topic.as_str(), record.partition);
        if let Some((same, at)) = last
            && same == key
        {
            out.rows.push(at);
            continue;
        }
        let at = *index.entry(key).or_insert_with(|| {
            let behind = match (&latest, end.get(key.0).and_then(|ps| ps.get(&key.1))) {
                (Some(latest), Some(end)) => latest
                    .get(key.0)
                    .and_then(|ps| ps.get(&key.1))
                    .is_none_or(|latest| latest > end),
                _ => true,
            };
            out.partitions.push(crate::source::PartitionRead {
                name: format!("{}/{}", key.0, key.1),
                behind,
            });
            (out.partitions.len() - 1) as u32
        });
        last = Some((key, at));
        out.rows.push(at);
    }
    out
}

fn start_error(source: &str, value: &Value) -> Error {
    Error::Offset {
        source_name: source.to_owned(),
        offset: value.to_string(),
        expected: r#"{"topic": {"0": <offset>, ...}}"#.to_owned(),
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        let topics = match &self.topics {
            Topics::Names(names) => format!("Subscribe[{}]", names.join(",")),
            Topics::Pattern(p) => format!("SubscribePattern[{}]", p.as_str()),
        };
        format!("KafkaV2[{topics}]")
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Unresolved until [`Source::resolve_start`]: `startingOffsets` is
    /// read against the brokers once, when the query first starts.
    fn initial_offset(&self) -> Value {
        Value::Null
    }

    async fn resolve_start(&mut self, start: &Value) -> Result<Value> {
        if !start.is_null() {
            return Ok(start.clone());
        }
        Ok(offsets_json(&self.starting_offsets().await?))
    }

    /// 10 ms, Spark's `pollingDelay`: asking is a metadata and a
    /// ListOffsets request, and the wait is the floor of an idle query's
    /// latency.
    fn idle_poll(&self) -> Duration {
        match self.decoding {
            // The repartition topic's reader also reads every first-stage
            // replica's commit log when it polls.
            Decoding::ArrowIpc => Duration::from_millis(25),
            _ => Duration::from_millis(10),
        }
    }

    async fn plan_batch(&mut self, start: &Value) -> Result<BatchRange> {
        let start_value = self.resolve_start(start).await?;
        let mut from =
            offsets_from_json(&start_value).ok_or_else(|| start_error(&self.name, &start_value))?;
        let partitions = self.partitions().await?;
        let (earliest, mut latest) = self.bounds(&partitions).await?;
        // Partitions the query read that are gone.
        let gone: Vec<(String, i32, i64)> = from
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |(p, o)| (t.clone(), *p, *o)))
            .filter(|(t, p, _)| !partitions.iter().any(|(pt, pp)| pt == t && pp == p))
            .collect();
        for (topic, p, offset) in gone {
            self.data_loss(format!("topic {topic} partition {p} is gone (the query had read it up to offset {offset})"), 0)?;
            if let Some(ps) = from.get_mut(&topic) {
                ps.remove(&p);
            }
        }
        for (topic, p) in &partitions {
            let (lo, hi) = (earliest[topic][p], latest[topic][p]);
            match from.get(topic).and_then(|t| t.get(p)).copied() {
                // A new partition starts at its earliest offset, as in Spark.
                None => {
                    from.entry(topic.clone()).or_default().insert(*p, lo);
                }
                Some(at) if at < lo => {
                    self.data_loss(
                        format!(
                            "topic {topic} partition {p}: offsets {at} to {} are needed",
                            lo - 1
                        ),
                        (lo - at) as u64,
                    )?;
                    from.get_mut(topic).unwrap().insert(*p, lo);
                }
                Some(at) if at > hi => {
                    self.data_loss(format!("topic {topic} partition {p}: the query had read up to offset {at}, but the partition now ends at {hi}"), 0)?;
                    from.get_mut(topic).unwrap().insert(*p, lo);
                }
                Some(_) => {}
            }
        }
        if self.mode == ReadMode::AvailableNow {
            let limit = self.limit.get_or_insert_with(|| latest.clone()).clone();
            for (topic, ps) in latest.iter_mut() {
                for (p, hi) in ps.iter_mut() {
                    // Partitions that appeared after the start hold nothing
                    // of this run's input.
                    let cap = limit
                        .get(topic)
                        .and_then(|l| l.get(p))
                        .copied()
                        .unwrap_or(from[topic][p]);
                    *hi = (*hi).min(cap).max(from[topic][p]);
                }
            }
        }
        let end = match self.max_per_trigger {
            Some(limit) => rate_limit(&from, &latest, limit),
            None => latest.clone(),
        };
        let mut rows = 0u64;
        let mut behind = Vec::new();
        for (topic, ps) in &end {
            for (p, e) in ps {
                rows += (e - from[topic][p]).max(0) as u64;
                behind.push((latest[topic][p] - e).max(0));
            }
        }
        let total_behind: i64 = behind.iter().sum();
        let mut metrics = BTreeMap::new();
        if !behind.is_empty() {
            metrics.insert(
                "minOffsetsBehindLatest".into(),
                behind.iter().min().unwrap().to_string(),
            );
            metrics.insert(
                "maxOffsetsBehindLatest".into(),
                behind.iter().max().unwrap().to_string(),
            );
            metrics.insert(
                "avgOffsetsBehindLatest".into(),
                format!("{:.1}", total_behind as f64 / behind.len() as f64),
            );
        }
        metrics.insert("recordsLost".into(), self.lost.to_string());
        Ok(BatchRange {
            start: offsets_json(&from),
            end: offsets_json(&end),
            detail: Value::Null,
            latest: offsets_json(&latest),
            rows,
            records_behind_latest: total_behind as u64,
            metrics,
        })
    }

    async fn read(&mut self, range: &BatchRange) -> Result<Vec<RecordBatch>> {
        self.row_partitions = None;
        let start =
            offsets_from_json(&range.start).ok_or_else(|| start_error(&self.name, &range.start))?;
        let end =
            offsets_from_json(&range.end).ok_or_else(|| start_error(&self.name, &range.end))?;
        let consumer = self.consumer().await?;
        let name = self.name.clone();
        let brokers = self.brokers.clone();
        let ends = end.clone();
        let records =
            blocking(move || read_range(&consumer, &start, &ends, &name, &brokers)).await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if matches!(self.decoding, Decoding::ArrowIpc) {
            return self.decode_ipc(&records);
        }
        let (mut declared, mut good) = self.decode(&records)?;
        if self.keyed.is_some()
            && let Some(batch) = &declared
        {
            if self
                .keyed
                .as_ref()
                .is_some_and(|k| k.topic_partitions.is_none())
            {
                self.partitions().await?;
            }
            let (batch, kept) = self.keep_well_placed(&records, batch, good)?;
            declared = Some(batch);
            good = kept;
        }
        let columns = record_columns(&records, &self.record_columns);
        let whole = RecordBatch::try_new(
            Arc::new(Schema::new(
                self.record_columns
                    .iter()
                    .map(|n| record_field(n))
                    .collect::<Vec<_>>(),
            )),
            columns,
        )
        .map_err(|e| Error::State(e.to_string()))?;
        self.row_partitions = Some(row_partitions(&records, &good, &end, &range.latest));
        let kept = take_record_batch(&whole, &UInt32Array::from(good))
            .map_err(|e| Error::State(e.to_string()))?;
        let mut columns: Vec<ArrayRef> = declared.map(|b| b.columns().to_vec()).unwrap_or_default();
        columns.extend(kept.columns().iter().cloned());
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Error::State(e.to_string()))?;
        Ok(vec![batch])
    }

    async fn commit(&mut self, end: &Value) -> Result<()> {
        let Some(end) = offsets_from_json(end) else {
            return Ok(());
        };
        if matches!(self.decoding, Decoding::ArrowIpc) {
            self.purge(&end);
        }
        let consumer = self.consumer().await?;
        let mut tpl = TopicPartitionList::new();
        for (topic, ps) in &end {
            for (p, o) in ps {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                    .map_err(|e| Error::State(e.to_string()))?;
            }
        }
        // For monitoring only: a failure is logged, not fatal.
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            warn!(source = %self.name, error = %e, "Could not commit the batch's offsets to the consumer group (monitoring only).");
        }
        Ok(())
    }

    fn take_row_partitions(&mut self) -> Option<crate::source::RowPartitions> {
        self.row_partitions.take()
    }

    fn take_bad_records(&mut self) -> Vec<BadRecord> {
        std::mem::take(&mut self.bad_records)
    }

    fn set_slice(&mut self, replica: crate::replicas::Replica) -> Result<()> {
        self.slice = Some(replica);
        Ok(())
    }

    fn set_state_partitions(&mut self, partitions: u32) {
        if let Some(keyed) = &mut self.keyed {
            keyed.state_partitions = Some(partitions);
        }
    }
}

/// How long a read has gone without progress (see [`READ_STALL`]).
struct Stall {
    stalled: Duration,
    last_turn: Instant,
}

impl Stall {
    fn new(now: Instant) -> Self {
        Self {
            stalled: Duration::ZERO,
            last_turn: now,
        }
    }

    /// Another turn of the read's loop, at `now`: the time since the last
    /// counts, at most [`POLL_COUNTS_AT_MOST`].
    fn turn(&mut self, now: Instant) {
        self.stalled += now
            .saturating_duration_since(self.last_turn)
            .min(POLL_COUNTS_AT_MOST);
        self.last_turn = now;
    }

    /// A record (or the end of a partition) arrived.
    fn progress(&mut self) {
        self.stalled = Duration::ZERO;
    }

    fn exceeded(&self) -> bool {
        self.stalled > READ_STALL
    }
}

/// Reads the records of `[start, end)` of each partition.
fn read_range(
    consumer: &BaseConsumer,
    start: &Offsets,
    end: &Offsets,
    source: &str,
    brokers: &str,
) -> Result<Vec<Record>> {
    let unavailable = |message: String| Error::Unavailable {
        what: format!("Kafka at {brokers}"),
        message,
    };
    let mut tpl = TopicPartitionList::new();
    let mut pending: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
    for (topic, ps) in end {
        for (p, e) in ps {
            let s = start
                .get(topic)
                .and_then(|t| t.get(p))
                .copied()
                .unwrap_or(*e);
            if *e > s {
                tpl.add_partition_offset(topic, *p, Offset::Offset(s))
                    .map_err(|e| Error::State(e.to_string()))?;
                pending.insert((topic.clone(), *p), (s, *e));
            }
        }
    }
    let mut records = Vec::new();
    if pending.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| unavailable(format!("cannot assign the partitions: {e}")))?;
    let mut stall = Stall::new(Instant::now());
    let mut last_position_check = Instant::now();
    let result = (|| {
        while !pending.is_empty() {
            stall.turn(Instant::now());
            let mut idle = false;
            match consumer.poll(READ_POLL) {
                Some(Ok(message)) => {
                    let key = (message.topic().to_owned(), message.partition());
                    let Some(&(s, e)) = pending.get(&key) else {
                        continue;
                    };
                    let offset = message.offset();
                    if offset >= s && offset < e {
                        stall.progress();
                        records.push(Record {
                            key: message.key().map(<[u8]>::to_vec),
                            value: message.payload().map(<[u8]>::to_vec),
                            topic: key.0.clone(),
                            partition: key.1,
                            offset,
                            timestamp_ms: message.timestamp().to_millis(),
                            headers: message
                                .headers()
                                .map(|h| {
                                    h.iter()
                                        .map(|hd| (hd.key.to_owned(), hd.value.map(<[u8]>::to_vec)))
                                        .collect()
                                })
                                .unwrap_or_default(),
                        });
                    }
                    if offset >= e - 1 {
                        pending.remove(&key);
                    }
                }
                Some(Err(err)) => {
                    if let rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange,
                    ) = err
                    {
                        return Err(Error::Source {
                            source_name: source.to_owned(),
                            message: format!(
                                "records of the batch were deleted while it read them ({err}): the broker no longer holds them"
                            ),
                        });
                    }
                    // librdkafka retries transport errors itself; the stall
                    // check below decides when to give up.
                }
                None => idle = true,
            }
            // Transaction markers and aborted records move the position
            // without a message: looked at when no message came, and now
            // and then (it is not free).
            if !idle && last_position_check.elapsed() < Duration::from_millis(50) {
                continue;
            }
            last_position_check = Instant::now();
            if let Ok(positions) = consumer.position() {
                for elem in positions.elements() {
                    let key = (elem.topic().to_owned(), elem.partition());
                    if let (Some(&(_, e)), Offset::Offset(at)) = (pending.get(&key), elem.offset())
                        && at >= e
                    {
                        pending.remove(&key);
                        stall.progress();
                    }
                }
            }
            if !pending.is_empty() && stall.exceeded() {
                let waiting: Vec<String> = pending
                    .iter()
                    .map(|((t, p), (s, e))| format!("{t}/{p} [{s}, {e})"))
                    .collect();
                return Err(unavailable(format!(
                    "no record arrived for {} s while reading {}",
                    READ_STALL.as_secs(),
                    waiting.join(", ")
                )));
            }
        }
        Ok(())
    })();
    let _ = consumer.unassign();
    result?;
    records
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    Ok(records)
}

/// The record columns, for every record.
fn record_columns(records: &[Record], names: &[&str]) -> Vec<ArrayRef> {
    names
        .iter()
        .map(|name| -> ArrayRef {
            match *name {
                "key" | "value" => {
                    let mut b = BinaryBuilder::new();
                    for r in records {
                        match if *name == "key" { &r.key } else { &r.value } {
                            Some(v) => b.append_value(v),
                            None => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                "topic" => {
                    let mut b = StringBuilder::new();
                    records.iter().for_each(|r| b.append_value(&r.topic));
                    Arc::new(b.finish())
                }
                "partition" => {
                    let mut b = Int32Builder::new();
                    records.iter().for_each(|r| b.append_value(r.partition));
                    Arc::new(b.finish())
                }
                "offset" => {
                    let mut b = Int64Builder::new();
                    records.iter().for_each(|r| b.append_value(r.offset));
                    Arc::new(b.finish())
                }
                "timestamp" => {
                    let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
                    for r in records {
                        b.append_option(r.timestamp_ms.map(|ms| ms * 1000));
                    }
                    Arc::new(b.finish())
                }
                _ => {
                    let mut b = ListBuilder::new(StructBuilder::from_fields(header_fields(), 0))
                        .with_field(Arc::new(Field::new(
                            "item",
                            DataType::Struct(header_fields()),
                            true,
                        )));
                    for r in records {
                        for (k, v) in &r.headers {
                            let s = b.values();
                            s.field_builder::<StringBuilder>(0).unwrap().append_value(k);
                            let vb = s.field_builder::<BinaryBuilder>(1).unwrap();
                            match v {
                                Some(v) => vb.append_value(v),
                                None => vb.append_null(),
                            }
                            s.append(true);
                        }
                        b.append(true);
                    }
                    Arc::new(b.finish())
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(i32, i64)]) -> Offsets {
        Offsets::from([("t".to_owned(), pairs.iter().copied().collect())])
    }

    #[test]
    fn max_offsets_per_trigger_is_spread_by_backlog_as_spark_spreads_it() {
        let start = offsets(&[(0, 0), (1, 0), (2, 100)]);
        let latest = offsets(&[(0, 900), (1, 100), (2, 100)]);
        // 1000 behind: 900 on p0, 100 on p1, none on p2; limit 100.
        assert_eq!(
            rate_limit(&start, &latest, 100),
            offsets(&[(0, 90), (1, 10), (2, 100)])
        );
        // A tiny backlog still gets a record (ceil below 1).
        let latest = offsets(&[(0, 10_000), (1, 1), (2, 100)]);
        assert_eq!(rate_limit(&start, &latest, 10)["t"][&1], 1);
        // Under the limit: everything.
        assert_eq!(rate_limit(&start, &latest, 1_000_000), latest);
    }

    #[test]
    fn a_read_is_stalled_by_polling_without_progress_not_by_being_stopped() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut stall = Stall::new(t0);
        // The process stopped for 20 s between two turns: one turn's worth.
        stall.turn(at(20_000));
        assert!(!stall.exceeded());
        // Then polls (100 ms each) with nothing: 9 s, then over 10 s.
        for i in 1..=90 {
            stall.turn(at(20_000 + i * 100));
        }
        assert!(!stall.exceeded());
        for i in 91..=100 {
            stall.turn(at(20_000 + i * 100));
        }
        assert!(stall.exceeded());
        stall.progress();
        assert!(!stall.exceeded());
    }

    #[test]
    fn each_row_is_named_with_its_partition_and_whether_the_batch_left_some_behind() {
        let record = |partition, offset| Record {
            key: None,
            value: None,
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            headers: Vec::new(),
        };
        let records = [record(1, 5), record(0, 7), record(1, 6), record(2, 3)];
        let end = offsets(&[(0, 8), (1, 7), (2, 4)]);
        // Partition 1 was planned short of its latest offset; record 3
        // (partition 2) was set aside.
        let latest = offsets_json(&offsets(&[(0, 8), (1, 50), (2, 4)]));
        let read = row_partitions(&records, &[0, 1, 2], &end, &latest);
        let named: Vec<_> = read
            .partitions
            .iter()
            .map(|p| (p.name.as_str(), p.behind))
            .collect();
        assert_eq!(named, [("t/1", true), ("t/0", false)]);
        assert_eq!(read.rows, [0, 1, 0]);
        // A replayed batch does not know the latest offsets: all behind.
        let replayed = row_partitions(&records, &[0, 1, 3], &end, &Value::Null);
        assert!(replayed.partitions.iter().all(|p| p.behind));
        assert_eq!(replayed.rows, [0, 1, 2]);
    }

    #[test]
    fn values_decode_into_the_declared_columns_and_malformed_ones_are_named() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
        ]));
        let ok = decode_values(
            &Decoding::Json,
            &schema,
            &[
                br#"{"user_id": "a", "amount": 1.5}"#,
                b"{\n \"user_id\": \"b\"\n}",
            ],
        )
        .unwrap();
        assert_eq!(ok.num_rows(), 2);
        assert!(decode_values(&Decoding::Json, &schema, &[br#"{"amount": "lots"}"#]).is_err());
        let two = decode_values(
            &Decoding::Json,
            &schema,
            &[br#"{"user_id": "a"} {"user_id": "b"}"#],
        )
        .unwrap();
        assert_eq!(
            two.num_rows(),
            2,
            "two values in one record are caught by the row count"
        );
        let csv = decode_values(&Decoding::Csv, &schema, &[b"a,1.5", b"b,2"]).unwrap();
        assert_eq!(csv.num_rows(), 2);
    }
}
