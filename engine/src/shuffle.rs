//! Two stages for a stateful query on several replicas: its rows are
//! repartitioned by key through an internal Kafka topic, as Kafka Streams
//! repartitions (the distributed part runs on Kafka, not on a network layer
//! of our own).
//!
//! - **Stage 1** (`shuffle`), on each replica: reads the replica's slice of
//!   the sources' partitions, runs the query up to the aggregation's first
//!   phase (one row of partial accumulator state per group and window or
//!   pane: what Flink calls local aggregation), and writes each row to the
//!   partition of `sluice-<query>-repartition` that is the row's **state
//!   partition** (the state codec's hash of its grouping columns). One
//!   Arrow IPC stream per partition and batch, in the batch's Kafka
//!   transaction, with the batch's marker: the rows of a batch are in the
//!   topic exactly once, and only with the batch.
//! - **Stage 2** (`merge`), on each replica: reads the topic's partitions
//!   it owns (the same rule as any Kafka partition, [`Replica::owns`]), so
//!   it holds the state partitions of the same numbers; merges the partial
//!   states into its state, and runs the final phase, `HAVING`, the
//!   projection and the user's sink, exactly once as a one-replica query
//!   does.
//!
//! Each stage has its own offset and commit logs (stage 1's under the
//! replica's directory, stage 2's under `merge/` in it) and is fenced and
//! replayed as a query is.
//!
//! **Watermarks.** Stage 1 drops no row as late. Stage 2's watermark is the
//! minimum over the generation's stage-1 replicas of their own (the largest
//! event time each has read, minus the delay), read from their commit logs
//! before stage 2 plans its batch: every row a stage-1 replica wrote before
//! the batch that moved its watermark is then already in the topic, and in
//! the batch (the batch is planned after). A stage-1 replica that has read
//! no row yet does not hold the watermark back; with `idleTimeout`, one
//! that has read nothing for that long neither. Stage 2 judges late rows by
//! it, per window, as the window table functions do. A rescale hands the
//! highest stage-2 watermark of the old generation to the new one, so no
//! window is written twice.
//!
//! [`Replica::owns`]: crate::replicas::Replica::owns

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use sluice_crds::{Delivery, KafkaSink as KafkaSinkSpec, StreamingQuery};
use tracing::info;

use crate::checkpoint::Checkpoint;
use crate::kafka::sink::{KafkaSink, OutRecord};
use crate::kafka::source::KafkaSource;
use crate::kafka::{Offsets, client_config};
use crate::plan::Partitioner;
use crate::sink::{Sink, SinkContext};
use crate::source::ReadMode;
use crate::watermark::{SourceState, SourceWatermark, Tracker, TrackerState};
use crate::{Error, Result};

/// The name stage 2's source has in its logs (its offsets, by topic and
/// partition, are the repartition topic's).
pub const SOURCE: &str = "__repartition";

/// About how many bytes of partial states go in one record.
const RECORD_BYTES: usize = 256 << 10;

/// How long creating or describing the repartition topic may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The repartition topic of the query named `query`.
pub fn topic(query: &str) -> String {
    format!("sluice-{query}-repartition")
}

/// The spec of the query's first Kafka source: the repartition topic lives
/// on its brokers, with its client settings.
fn kafka_of(query: &StreamingQuery) -> Result<(usize, &sluice_crds::Source)> {
    query
        .spec
        .sources
        .iter()
        .enumerate()
        .find(|(_, s)| s.kafka.is_some())
        .ok_or_else(|| Error::Unsupported {
            path: "spec.sources".into(),
            message: "a stateful query on several replicas repartitions its rows through a Kafka topic on its Kafka source's brokers: it needs a Kafka source".into(),
        })
}

fn name_of(query: &StreamingQuery) -> String {
    query.metadata.name.clone().unwrap_or_default()
}

/// Creates the repartition topic with `partitions` partitions (the state
/// partitions) if it does not exist, checks its partition count, and
/// returns where each partition ends now (a new generation's stage 2
/// starts there: nothing older is this checkpoint's).
pub async fn prepare_topic(query: &StreamingQuery, partitions: u32) -> Result<Offsets> {
    let (i, source) = kafka_of(query)?;
    let kafka = source.kafka.as_ref().expect("found by kafka");
    let field = format!("spec.sources[{i}].kafka");
    let config = client_config(
        &kafka.bootstrap_servers,
        &kafka.options,
        &kafka.secret_options,
        &[],
        &field,
    )?;
    let topic = topic(&name_of(query));
    let brokers = kafka.bootstrap_servers.clone();
    let unavailable = |message: String| Error::Unavailable {
        what: format!("Kafka at {brokers}"),
        message,
    };
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| Error::Unsupported {
            path: field.clone(),
            message: format!("the Kafka client settings are refused: {e}"),
        })?;
    // Kept until read (then purged, as Kafka Streams keeps its
    // repartition topics): a stage down past a retention loses nothing.
    let new = NewTopic::new(&topic, partitions as i32, TopicReplication::Fixed(-1))
        .set("retention.ms", "-1");
    let created = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
        )
        .await
        .map_err(|e| unavailable(format!("creating the topic {topic}: {e}")))?;
    for result in created {
        match result {
            Ok(_) => info!(topic, partitions, "Created the repartition topic."),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(Error::Unsupported {
                    path: "spec.replicas".into(),
                    message: format!(
                        "the repartition topic {topic} could not be created on {brokers}: {code}; create it with {partitions} partitions, or give the query the rights to"
                    ),
                });
            }
        }
    }
    let consumer: BaseConsumer = config.create().map_err(|e| Error::Unsupported {
        path: field,
        message: format!("the Kafka client settings are refused: {e}"),
    })?;
    let t = topic.clone();
    let ends = crate::kafka::blocking(move || {
        // A topic just created may take a moment to have its leaders.
        let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
        loop {
            let found = consumer
                .fetch_metadata(Some(&t), Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    let count = m.topics().first().map_or(0, |t| t.partitions().len());
                    if count == 0 {
                        return Err("no partitions yet".into());
                    }
                    let mut ends = std::collections::BTreeMap::new();
                    for p in 0..count as i32 {
                        let (_, high) = consumer
                            .fetch_watermarks(&t, p, Duration::from_secs(5))
                            .map_err(|e| e.to_string())?;
                        ends.insert(p, high);
                    }
                    Ok(ends)
                });
            match found {
                Ok(ends) => return Ok(ends),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(Error::Unavailable {
                        what: "Kafka".into(),
                        message: format!("describing the repartition topic {t}: {e}"),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .await?;
    if ends.len() != partitions as usize {
        return Err(Error::Unsupported {
            path: "spec.statePartitions".into(),
            message: format!(
                "is {partitions}, but the repartition topic {topic} has {} partitions: they must be equal (a state partition is a topic partition); delete the topic or set statePartitions to its count",
                ends.len()
            ),
        });
    }
    Ok(Offsets::from([(topic, ends)]))
}

/// Stage 2's source: the repartition topic, read `read_committed`, each
/// record an IPC stream of partial states in `schema`.
pub fn source(query: &StreamingQuery, mode: ReadMode, schema: SchemaRef) -> Result<KafkaSource> {
    let (i, user) = kafka_of(query)?;
    let name = name_of(query);
    let mut spec = user.clone();
    let mut kafka = spec.kafka.take().expect("found by kafka");
    kafka.topic = Some(topic(&name));
    kafka.topics = None;
    kafka.topic_pattern = None;
    kafka.starting_offsets = Some("earliest".into());
    kafka.group_id = Some(format!("sluice-{name}-merge"));
    kafka.max_offsets_per_trigger = None;
    kafka.fail_on_data_loss = Some(true);
    spec.name = SOURCE.into();
    spec.watermark = None;
    spec.dead_letter = None;
    spec.schema = None;
    spec.format = None;
    spec.avro_schema = None;
    let source = KafkaSource::new(&spec, &kafka, &format!("spec.sources[{i}]"), mode, &name)?;
    Ok(source.into_shuffle(schema))
}

/// Stage 1's sink: each batch's partial states, by state partition, one
/// Arrow IPC stream per partition, in one Kafka transaction.
pub struct ShuffleSink {
    inner: KafkaSink,
    topic: String,
    partitions: usize,
    partitioner: Partitioner,
}

impl ShuffleSink {
    /// The sink of the query's repartition topic, which has `partitions`
    /// partitions.
    pub fn new(query: &StreamingQuery, partitions: u32, partitioner: Partitioner) -> Result<Self> {
        let (_, user) = kafka_of(query)?;
        let kafka = user.kafka.as_ref().expect("found by kafka");
        let topic = topic(&name_of(query));
        let inner = KafkaSink::new(&KafkaSinkSpec {
            bootstrap_servers: kafka.bootstrap_servers.clone(),
            topic: topic.clone(),
            delivery: Some(Delivery::ExactlyOnce),
            transactional_id: None,
            options: kafka
                .options
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "isolation.level" | "group.id"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([("message.max.bytes".to_owned(), "100000000".to_owned())])
                .collect(),
            secret_options: kafka.secret_options.clone(),
        })?;
        Ok(Self {
            inner,
            topic,
            partitions: partitions as usize,
            partitioner,
        })
    }

    /// The records of one batch: per partition, its rows as one IPC
    /// stream.
    fn records(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<OutRecord>> {
        let encode_error = |e: String| Error::Sink {
            sink: self.description(),
            message: format!("cannot encode partial states: {e}"),
        };
        let mut rows: Vec<Vec<RecordBatch>> = vec![Vec::new(); self.partitions];
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            let parts = self
                .partitioner
                .partitions(batch, self.partitions)
                .map_err(|e| encode_error(e.to_string()))?;
            let mut by_partition: Vec<Vec<u32>> = vec![Vec::new(); self.partitions];
            for (row, p) in parts.into_iter().enumerate() {
                by_partition[p].push(row as u32);
            }
            for (p, indices) in by_partition.into_iter().enumerate() {
                if indices.is_empty() {
                    continue;
                }
                let taken = take_record_batch(batch, &UInt32Array::from(indices))
                    .map_err(|e| encode_error(e.to_string()))?;
                rows[p].push(taken);
            }
        }
        let mut records = Vec::new();
        for (p, batches) in rows.into_iter().enumerate() {
            if batches.is_empty() {
                continue;
            }
            let all = datafusion::arrow::compute::concat_batches(schema, &batches)
                .map_err(|e| encode_error(e.to_string()))?;
            // Records well below the brokers' default `message.max.bytes`
            // (1 MB).
            let row_bytes = all.get_array_memory_size() / all.num_rows().max(1);
            let per_record = (RECORD_BYTES / row_bytes.max(1)).max(1);
            let mut start = 0;
            while start < all.num_rows() {
                let rows = per_record.min(all.num_rows() - start);
                let mut value = Vec::new();
                {
                    let mut writer =
                        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut value, schema)
                            .map_err(|e| encode_error(e.to_string()))?;
                    writer
                        .write(&all.slice(start, rows))
                        .map_err(|e| encode_error(e.to_string()))?;
                    writer.finish().map_err(|e| encode_error(e.to_string()))?;
                }
                records.push(OutRecord {
                    partition: Some(p as i32),
                    value: Some(value),
                    ..OutRecord::default()
                });
                start += rows;
            }
        }
        Ok(records)
    }
}

#[async_trait]
impl Sink for ShuffleSink {
    fn description(&self) -> String {
        format!("RepartitionTopic[{}]", self.topic)
    }

    async fn open(&mut self, context: &SinkContext) -> Result<()> {
        // Its own transactional ids: `sluice-<id>-repartition-g<g>-r<i>`.
        let mut scoped = context.clone();
        scoped.query_id = format!("{}-repartition", context.query_id);
        self.inner.open(&scoped).await
    }

    async fn is_committed(&mut self, batch_id: u64) -> Result<bool> {
        self.inner.is_committed(batch_id).await
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let records = self.records(schema, batches)?;
        self.inner.prepare_records(batch_id, records).await
    }

    async fn commit(&mut self, batch_id: u64) -> Result<()> {
        self.inner.commit(batch_id).await
    }
}

/// Stage 2's watermark: the minimum over the generation's stage-1
/// replicas' own, read from their commit logs (see the module's
/// documentation).
pub struct WatermarkFeed {
    /// Each stage-1 replica's logs.
    writers: Vec<Checkpoint>,
    /// Per stage-1 replica, once known: the sources it owns no partition
    /// of (its starts are empty: more replicas than partitions), left out
    /// of the minimum for them.
    owns_none: Vec<Option<BTreeSet<String>>>,
    /// Per stage-1 replica: its newest commit read, and its tracker state.
    seen: Vec<Option<(u64, TrackerState)>>,
    /// The sources' watermark declarations, in spec order.
    declared: Vec<(String, Option<SourceWatermark>)>,
    /// When this run started (idle sources).
    started_ms: i64,
}

impl WatermarkFeed {
    /// A feed from the stage-1 replicas whose logs are at `locations`.
    pub fn new(
        locations: &[String],
        declared: Vec<(String, Option<SourceWatermark>)>,
        started_ms: i64,
    ) -> Result<Self> {
        Ok(Self {
            writers: locations
                .iter()
                .map(|l| Checkpoint::open(l))
                .collect::<Result<_>>()?,
            owns_none: vec![None; locations.len()],
            seen: vec![None; locations.len()],
            declared,
            started_ms,
        })
    }

    /// Whether any source declares a watermark.
    pub fn any(&self) -> bool {
        self.declared.iter().any(|(_, w)| w.is_some())
    }

    /// The global watermark for a batch planned at `now_ms`, never below
    /// `last` (the last batch's).
    pub async fn global_at(&mut self, now_ms: i64, last: Option<i64>) -> Result<Option<i64>> {
        if !self.any() {
            return Ok(last);
        }
        for (writer, owns_none) in self.writers.iter().zip(self.owns_none.iter_mut()) {
            if owns_none.is_some() {
                continue;
            }
            let mut none = BTreeSet::new();
            let mut known = true;
            for (name, declared) in &self.declared {
                if declared.is_none() {
                    continue;
                }
                match writer.read_initial(name).await? {
                    Some(Value::Object(partitions)) if partitions.is_empty() => {
                        none.insert(name.clone());
                    }
                    Some(_) => {}
                    // Not started yet: it may own some.
                    None => known = false,
                }
            }
            if known {
                *owns_none = Some(none);
            }
        }
        let mut states = Vec::new();
        for (writer, seen) in self.writers.iter().zip(self.seen.iter_mut()) {
            // A replica that committed nothing yet has read nothing. A
            // commit is read once: only the listing is polled.
            let newest = writer.newest_commit().await?;
            if let Some(id) = newest
                && seen.as_ref().is_none_or(|(at, _)| *at != id)
            {
                let commit: crate::checkpoint::CommitEntry =
                    writer.read_existing(&format!("commits/{id}")).await?;
                *seen = Some((id, commit.watermark));
            }
            states.push(seen.as_ref().map(|(_, w)| w.clone()).unwrap_or_default());
        }
        let excluded: Vec<BTreeSet<String>> = self
            .owns_none
            .iter()
            .map(|o| o.clone().unwrap_or_default())
            .collect();
        let merged = merge_states(
            &self.declared,
            &states,
            &excluded,
            now_ms,
            self.started_ms,
            last,
        );
        let mut tracker = Tracker::new(self.declared.clone(), self.started_ms);
        tracker.restore(merged);
        Ok(tracker.global_at(now_ms))
    }
}

/// The stage-1 replicas' tracker states as one: per source, the smallest
/// watermark over the replicas, none (the watermark holds where it is)
/// while a replica has none yet, as a source that has produced no row
/// holds the global watermark; with `idleTimeout`, a replica that has read
/// no row of the source for that long (since `started_ms` when it never
/// has) is left out, and so is one that owns none of its partitions
/// (`excluded`, per state). The latest time any replica read a row is the
/// source's.
fn merge_states(
    declared: &[(String, Option<SourceWatermark>)],
    states: &[TrackerState],
    excluded: &[BTreeSet<String>],
    now_ms: i64,
    started_ms: i64,
    last: Option<i64>,
) -> TrackerState {
    let mut merged = TrackerState {
        global_ms: last,
        ..TrackerState::default()
    };
    for (name, declaration) in declared {
        let Some(declaration) = declaration else {
            continue;
        };
        let mut source = SourceState::default();
        let mut smallest: Option<Option<i64>> = None;
        for (i, state) in states.iter().enumerate() {
            if excluded.get(i).is_some_and(|e| e.contains(name)) {
                continue;
            }
            let own = state.sources.get(name).cloned().unwrap_or_default();
            source.last_data_ms = source.last_data_ms.max(own.last_data_ms);
            let idle = declaration.idle_timeout_ms.is_some_and(|timeout| {
                now_ms.saturating_sub(own.last_data_ms.unwrap_or(started_ms)) >= timeout
            });
            if idle {
                continue;
            }
            smallest = Some(match (smallest, own.watermark_ms) {
                (None, w) => w,
                (Some(Some(a)), Some(b)) => Some(a.min(b)),
                _ => None,
            });
        }
        source.watermark_ms = smallest.flatten();
        merged.sources.insert(name.clone(), source);
    }
    merged
}

/// The partial-state schema as the shuffle source declares it.
pub fn shuffle_schema(plan: &crate::plan::QueryPlan) -> Result<SchemaRef> {
    plan.partial_schema()
        .cloned()
        .ok_or_else(|| Error::Plan("the query has no aggregation to repartition".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(idle: Option<i64>) -> Vec<(String, Option<SourceWatermark>)> {
        vec![(
            "events".into(),
            Some(SourceWatermark {
                column: "ts".into(),
                delay_ms: 0,
                idle_timeout_ms: idle,
            }),
        )]
    }

    fn state(watermark: Option<i64>, last_data: Option<i64>) -> TrackerState {
        TrackerState {
            global_ms: None,
            sources: [(
                "events".to_owned(),
                SourceState {
                    watermark_ms: watermark,
                    last_data_ms: last_data,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn the_watermark_is_the_smallest_replicas_and_never_goes_back() {
        let at = |states: &[TrackerState], idle, now, last| {
            let mut tracker = Tracker::new(declared(idle), 0);
            tracker.restore(merge_states(&declared(idle), states, &[], now, 0, last));
            tracker.global_at(now)
        };
        let states = [state(Some(500), Some(10)), state(Some(300), Some(20))];
        assert_eq!(at(&states, None, 30, None), Some(300));
        // A replica that has read nothing yet holds it where it is.
        let states = [state(Some(500), Some(10)), TrackerState::default()];
        assert_eq!(at(&states, None, 30, None), None);
        assert_eq!(at(&states, None, 30, Some(200)), Some(200));
        // Never below the last batch's.
        let states = [state(Some(300), Some(10))];
        assert_eq!(at(&states, None, 30, Some(400)), Some(400));
        // One that owns no partition of the source is left out.
        let states = [state(Some(500), Some(10)), TrackerState::default()];
        let excluded = [BTreeSet::new(), BTreeSet::from(["events".to_owned()])];
        let mut tracker = Tracker::new(declared(None), 0);
        tracker.restore(merge_states(
            &declared(None),
            &states,
            &excluded,
            30,
            0,
            None,
        ));
        assert_eq!(tracker.global_at(30), Some(500));
    }

    #[test]
    fn an_idle_replica_stops_holding_the_watermark_back() {
        let at = |states: &[TrackerState], now| {
            let mut tracker = Tracker::new(declared(Some(500)), 0);
            tracker.restore(merge_states(
                &declared(Some(500)),
                states,
                &[],
                now,
                0,
                None,
            ));
            tracker.global_at(now)
        };
        let states = [state(Some(500), Some(1_000)), state(Some(300), Some(100))];
        assert_eq!(at(&states, 1_200), Some(500));
        // One that never read a row, once the timeout passed since the
        // run started.
        let states = [state(Some(500), Some(1_000)), TrackerState::default()];
        assert_eq!(at(&states, 400), None);
        assert_eq!(at(&states, 1_200), Some(500));
    }
}
