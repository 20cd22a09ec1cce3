//! Sources: where a query's rows come from. A source's lifecycle, driven by
//! the runner the same way for every connector:
//!
//! 1. **plan** the next batch from where the last one ended: a
//!    [`BatchRange`] whose `start`, `end` and `detail` (JSON, as Spark's
//!    offset log stores offsets) say exactly what the batch reads — a file
//!    source's file list, a Kafka source's per-partition offsets. The runner
//!    writes it to `offsets/N` before anything is read;
//! 2. **read** a range: the same rows every time it is given the same range,
//!    so that a batch replayed after a crash is the batch that was planned;
//! 3. hear that a batch **committed** (a Kafka source commits its consumer
//!    group's offsets there, for monitoring).
//!
//! A connector is a module here implementing [`Source`], built by
//! [`build`].

mod files;
pub(crate) use files::arrow_type;
mod generator;
mod nexmark;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_crds::Source as SourceSpec;

pub use files::FileSource;
pub use generator::GeneratorSource;

use crate::{Error, Result};

/// How a source releases data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Data arrives over time; each batch reads what has arrived.
    Continuous,
    /// Everything the source holds counts as available now
    /// (`trigger.availableNow`); the query stops once it is all read.
    AvailableNow,
}

/// The range one batch reads from a source.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRange {
    /// Where the batch starts (the previous batch's end).
    pub start: Value,
    /// Where the batch ends, exclusive: the latest offset, capped by the
    /// source's per-batch limit. The next batch starts here.
    pub end: Value,
    /// What exactly the batch reads when `start` and `end` do not say it
    /// alone (a file source's list of files); `Null` otherwise.
    pub detail: Value,
    /// The newest offset the source has.
    pub latest: Value,
    /// Records from `start` to `end` (files, for a file source).
    pub rows: u64,
    /// Records between `end` and `latest`: the lag after this batch (files,
    /// for a file source).
    pub records_behind_latest: u64,
    /// Source-specific metrics for the progress report (Spark's
    /// `SourceProgress.metrics`, e.g. a Kafka source's
    /// `maxOffsetsBehindLatest`).
    pub metrics: std::collections::BTreeMap<String, String>,
}

/// A record that did not decode with the source's schema.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BadRecord {
    /// Where it came from: its file, or `kafka:<topic>/<partition>@<offset>`.
    pub file: String,
    /// Its line in the file, from 1 (a Kafka record's offset).
    pub line: u64,
    /// Why it did not decode.
    pub error: String,
    /// The record's text.
    pub record: String,
    /// A Kafka record as it was read, for a dead-letter topic.
    #[serde(skip)]
    pub kafka: Option<KafkaRecord>,
}

/// A Kafka record as it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaRecord {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key's bytes.
    pub key: Option<Vec<u8>>,
    /// Its value's bytes.
    pub value: Option<Vec<u8>>,
}

/// How long a query with no interval waits after finding no new data,
/// unless its sources ask sooner ([`Source::idle_poll`]).
pub const DEFAULT_IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A streaming source.
#[async_trait]
pub trait Source: Send + Sync {
    /// The table name the query reads this source under.
    fn name(&self) -> &str;
    /// Says what the source is, for progress reports.
    fn description(&self) -> String;
    /// The schema of the rows it produces.
    fn schema(&self) -> SchemaRef;
    /// The offset a new query starts from; it may need resolving against
    /// the external system ([`Source::resolve_start`]).
    fn initial_offset(&self) -> Value;
    /// Resolves a start offset that depends on the external system (a Kafka
    /// source's `startingOffsets: latest`) into a concrete one. The runner
    /// does it once when a query first starts, and keeps the result in the
    /// checkpoint, so that a restart before the first batch starts at the
    /// same place.
    async fn resolve_start(&mut self, start: &Value) -> Result<Value> {
        Ok(start.clone())
    }
    /// How long a query whose trigger sets no interval waits before it asks
    /// again after finding no new data: 100 ms by default, the least of its
    /// sources'. A source that is cheap to ask (a Kafka ListOffsets) asks
    /// sooner, as Spark's `pollingDelay` (10 ms) does; one that lists an
    /// object store does not (a LIST costs).
    fn idle_poll(&self) -> std::time::Duration {
        DEFAULT_IDLE_POLL
    }
    /// Plans the next batch from `start`.
    async fn plan_batch(&mut self, start: &Value) -> Result<BatchRange>;
    /// Reads the rows of a planned range (`start`, `end` and `detail` as
    /// planned; the rest is not used).
    async fn read(&mut self, range: &BatchRange) -> Result<Vec<RecordBatch>>;
    /// Hears that the batch ending at `end` committed.
    async fn commit(&mut self, end: &Value) -> Result<()> {
        let _ = end;
        Ok(())
    }
    /// Reads only the partitions `replica` owns (scale-out); a source that
    /// cannot be split refuses.
    fn set_slice(&mut self, replica: crate::replicas::Replica) -> Result<()> {
        Err(Error::Unsupported {
            path: format!("source {}", self.name()),
            message: format!(
                "cannot be split between {} replicas yet: only Kafka sources can",
                replica.count
            ),
        })
    }
    /// Tells a source that the query's state has `partitions` partitions:
    /// a Kafka source whose topic is keyed (`keyedBy`) checks that its
    /// topic has as many. Others ignore it.
    fn set_state_partitions(&mut self, _partitions: u32) {}
    /// The malformed records the last `read` set aside; only a source with
    /// a dead-letter destination sets any aside instead of failing.
    fn take_bad_records(&mut self) -> Vec<BadRecord> {
        Vec::new()
    }
    /// Which partition each row of the last `read` came from, for a source
    /// whose partitions a batch may read at different paces (Kafka, with
    /// `maxOffsetsPerTrigger`); `None` for others.
    fn take_row_partitions(&mut self) -> Option<RowPartitions> {
        None
    }
}

/// Which partition each row a `read` returned came from (see
/// [`Source::take_row_partitions`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowPartitions {
    /// The partitions the read took rows from.
    pub partitions: Vec<PartitionRead>,
    /// Per row, in order over the batches `read` returned: its partition,
    /// an index into `partitions`.
    pub rows: Vec<u32>,
}

/// One partition a `read` took rows from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRead {
    /// Its name (`topic/partition`).
    pub name: String,
    /// Whether the batch left records of it unread: its end is short of
    /// the latest offset when the batch was planned (a per-batch limit), or
    /// that is not known (a batch replayed after a restart).
    pub behind: bool,
}

/// Builds the source a spec describes.
pub fn build(
    spec: &SourceSpec,
    path: &str,
    mode: ReadMode,
    started: chrono::DateTime<chrono::Utc>,
    query: &str,
) -> Result<Box<dyn Source>> {
    if let Some(generator) = &spec.generator {
        return Ok(Box::new(GeneratorSource::new(
            spec, generator, mode, started,
        )?));
    }
    if let Some(files) = &spec.files {
        return Ok(Box::new(FileSource::new(spec, files, path, mode)?));
    }
    if let Some(kafka) = &spec.kafka {
        return Ok(Box::new(crate::kafka::source::KafkaSource::new(
            spec, kafka, path, mode, query,
        )?));
    }
    let kind = spec.kind().unwrap_or("unknown");
    Err(Error::Unsupported {
        path: path.to_owned(),
        message: format!(
            "the {kind} source is not implemented in this version of the engine yet: use a generator, files or kafka source"
        ),
    })
}
