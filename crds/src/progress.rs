//! The progress report of one micro-batch, as the engine serves it on
//! `/progress` and the operator reads it. Shaped like Spark's
//! `StreamingQueryProgress`, so its fields mean what Spark users expect.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The progress of one micro-batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueryProgress {
    /// The query's id: the same across restarts from one checkpoint.
    pub id: String,
    /// This run's id: new each time the query starts.
    pub run_id: String,
    /// The query's name (`metadata.name`).
    pub name: String,
    /// When the batch started, RFC 3339.
    pub timestamp: String,
    /// The batch number, from 0.
    pub batch_id: u64,
    /// Rows read from all sources in this batch.
    pub num_input_rows: u64,
    /// Rows that arrived per second since the previous batch started.
    pub input_rows_per_second: f64,
    /// Rows processed per second of this batch's duration.
    pub processed_rows_per_second: f64,
    /// Milliseconds spent in each phase: `latestOffset` (planning the
    /// batch: the sources' latest offsets and the offset log), `getBatch`
    /// (reading it), `addBatch` (running the query and writing the sink,
    /// its commit included), within it `execute` (the query), `sinkWrite`
    /// (writing the output, not yet visible) and `sinkCommit` (the sink's
    /// commit: a Kafka transaction's commit, a manifest), `commitOffsets`
    /// (state, the commit log, the sources' commits), `triggerExecution`
    /// (the whole batch).
    pub duration_ms: BTreeMap<String, u64>,
    /// CPU time the engine process spent (all its threads) from reading the
    /// batch to its commit, in milliseconds; Sluice's, not Spark's. Unlike
    /// the durations it leaves out waiting (for the brokers, the object
    /// store), so it grows with the records a batch reads even when the
    /// batch is small: the autoscaler's measure of a replica's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
    /// Event-time statistics of this batch (`min`, `max`, `avg`) and the
    /// `watermark`, RFC 3339; empty when no source declares a watermark.
    #[serde(default)]
    pub event_time: BTreeMap<String, String>,
    /// One entry per stateful operator (empty for stateless queries).
    #[serde(default)]
    pub state_operators: Vec<StateOperatorProgress>,
    /// One entry per source.
    pub sources: Vec<SourceProgress>,
    /// The sink.
    pub sink: SinkProgress,
}

/// The progress of one stateful operator in a batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateOperatorProgress {
    /// The operator, e.g. `windowAggregate`.
    pub operator_name: String,
    /// Rows held in state after the batch.
    pub num_rows_total: u64,
    /// Rows added or changed by the batch.
    pub num_rows_updated: u64,
    /// Rows evicted by the batch.
    pub num_rows_removed: u64,
    /// Input rows dropped as later than the watermark.
    pub num_rows_dropped_by_watermark: u64,
    /// Bytes of memory the state uses.
    pub memory_used_bytes: u64,
    /// How long committing the state to the checkpoint took, in ms.
    #[serde(default)]
    pub commit_time_ms: u64,
    /// Counters of the state store, as Spark's `customMetrics`: Sluice's
    /// `partitionsCommitted` (state partitions the batch changed),
    /// `snapshotsCommitted` (of them, committed as a snapshot of their
    /// RocksDB files, the rest as a changelog of the batch's writes),
    /// `filesUploaded` and `bytesUploaded` (what the commit wrote to the
    /// checkpoint).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_metrics: BTreeMap<String, u64>,
}

/// The progress of one source in a batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceProgress {
    /// What the source is, e.g. `GeneratorSource[transactions, seed=42]`.
    pub description: String,
    /// The offset the batch started at (source-specific JSON), null for the
    /// first batch.
    pub start_offset: serde_json::Value,
    /// The offset the batch ended at, exclusive.
    pub end_offset: serde_json::Value,
    /// The newest offset the source had when the batch was planned.
    pub latest_offset: serde_json::Value,
    /// Rows read from this source in the batch.
    pub num_input_rows: u64,
    /// Rows that arrived per second since the previous batch started.
    pub input_rows_per_second: f64,
    /// Rows processed per second of this batch's duration.
    pub processed_rows_per_second: f64,
    /// Records between the batch's end and the latest offset: the lag.
    pub records_behind_latest: u64,
    /// Malformed records set aside in the dead-letter destination.
    #[serde(default)]
    pub num_dead_letter_records: u64,
    /// Source-specific metrics, as Spark's `SourceProgress.metrics`: a Kafka
    /// source's `minOffsetsBehindLatest`, `maxOffsetsBehindLatest`,
    /// `avgOffsetsBehindLatest`, `recordsLost`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, String>,
}

/// The progress of the sink in a batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SinkProgress {
    /// What the sink is, e.g. `FileSink[/data/out, json]`.
    pub description: String,
    /// Rows written by the batch.
    pub num_output_rows: u64,
}

/// What a query is doing right now, as Spark's `StreamingQueryStatus`:
/// served on `/status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueryStatus {
    /// In words: "Waiting for data to arrive", "Processing new data", or
    /// what went wrong and when the query retries.
    pub message: String,
    /// Whether the sources had new data when last asked.
    pub is_data_available: bool,
    /// Whether a batch is running.
    pub is_trigger_active: bool,
}
