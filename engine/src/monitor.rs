//! What a running query reports: the recent progress reports (served on
//! `/progress`) and the Prometheus metrics (served on `/metrics`). The runner
//! writes here; the HTTP server reads.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sluice_crds::progress::{QueryProgress, QueryStatus};

/// How many reports `/progress` keeps: Spark's
/// `spark.sql.streaming.numRecentProgressUpdates` default.
pub const RECENT_PROGRESS: usize = 100;

/// The Prometheus metrics of one query.
pub struct Metrics {
    registry: Registry,
    batches: IntCounter,
    input_rows: IntCounterVec,
    output_rows: IntCounter,
    batch_duration: Histogram,
    input_rate: Gauge,
    processed_rate: Gauge,
    records_behind: IntGaugeVec,
    dead_letter: IntCounterVec,
    last_batch_id: IntGauge,
    last_commit: Gauge,
    watermark: Gauge,
    state_rows: IntGauge,
    state_memory: IntGauge,
    state_updated: IntCounter,
    state_removed: IntCounter,
    dropped_late: IntCounter,
    restarts: IntCounter,
    partition_lag: IntGaugeVec,
    replica: IntGaugeVec,
    rescale: GaugeVec,
}

impl Metrics {
    fn new(query: &str) -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("query", query);
        let batches =
            IntCounter::with_opts(opts("sluice_batches_total", "Micro-batches completed."))
                .unwrap();
        let input_rows = IntCounterVec::new(
            opts("sluice_input_rows_total", "Rows read, by source."),
            &["source"],
        )
        .unwrap();
        let output_rows = IntCounter::with_opts(opts(
            "sluice_output_rows_total",
            "Rows written to the sink.",
        ))
        .unwrap();
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_batch_duration_seconds",
                "Time to run one micro-batch, end to end.",
            )
            .const_label("query", query)
            .buckets(prometheus::exponential_buckets(0.005, 2.0, 14).unwrap()),
        )
        .unwrap();
        let input_rate = Gauge::with_opts(opts(
            "sluice_input_rows_per_second",
            "Rows arriving per second, over the latest batch.",
        ))
        .unwrap();
        let processed_rate = Gauge::with_opts(opts(
            "sluice_processed_rows_per_second",
            "Rows processed per second of batch time, latest batch.",
        ))
        .unwrap();
        let records_behind = IntGaugeVec::new(
            opts(
                "sluice_source_records_behind_latest",
                "Records the source holds beyond the latest batch: the lag.",
            ),
            &["source"],
        )
        .unwrap();
        let dead_letter = IntCounterVec::new(
            opts(
                "sluice_dead_letter_records_total",
                "Malformed records set aside in the dead-letter destination, by source.",
            ),
            &["source"],
        )
        .unwrap();
        let last_batch_id = IntGauge::with_opts(opts(
            "sluice_last_batch_id",
            "The id of the latest completed batch.",
        ))
        .unwrap();
        let last_commit = Gauge::with_opts(opts(
            "sluice_last_batch_timestamp_seconds",
            "When the latest batch completed, Unix seconds.",
        ))
        .unwrap();
        let watermark = Gauge::with_opts(opts(
            "sluice_watermark_timestamp_seconds",
            "The event-time watermark, Unix seconds (0 before any).",
        ))
        .unwrap();
        let state_rows = IntGauge::with_opts(opts(
            "sluice_state_rows",
            "Keys held in operator state (stateOperators.numRowsTotal).",
        ))
        .unwrap();
        let state_memory = IntGauge::with_opts(opts(
            "sluice_state_memory_bytes",
            "Memory the state store uses: RocksDB memtables and block cache.",
        ))
        .unwrap();
        let state_updated = IntCounter::with_opts(opts(
            "sluice_state_rows_updated_total",
            "Keys written to operator state.",
        ))
        .unwrap();
        let state_removed = IntCounter::with_opts(opts(
            "sluice_state_rows_removed_total",
            "Keys removed from operator state (windows the watermark closed).",
        ))
        .unwrap();
        let dropped_late = IntCounter::with_opts(opts(
            "sluice_rows_dropped_by_watermark_total",
            "Input rows (row and window pairs) dropped as later than the watermark.",
        ))
        .unwrap();
        let restarts = IntCounter::with_opts(opts(
            "sluice_query_restarts_total",
            "Restarts from the checkpoint after an error a retry can help with (an unavailable store or broker).",
        ))
        .unwrap();
        let partition_lag = IntGaugeVec::new(
            opts(
                "sluice_source_partition_records_behind_latest",
                "Records a partition holds beyond the latest batch (Kafka sources), per topic and partition.",
            ),
            &["source", "topic", "partition"],
        )
        .unwrap();
        let replica = IntGaugeVec::new(
            opts(
                "sluice_replica_generation",
                "The generation of replicas this engine runs in, labelled with its replica index and the replica count.",
            ),
            &["replica", "replicas"],
        )
        .unwrap();
        let rescale = GaugeVec::new(
            opts(
                "sluice_rescale_seconds",
                "How long the last rescale took, by phase: handover (settling the previous generation and writing the new assignment, on replica 0), wait (waiting for it, on the others), first_batch (from joining to the first batch committed).",
            ),
            &["phase"],
        )
        .unwrap();
        for collector in [
            Box::new(batches.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(replica.clone()),
            Box::new(rescale.clone()),
            Box::new(restarts.clone()),
            Box::new(partition_lag.clone()),
            Box::new(state_rows.clone()),
            Box::new(state_memory.clone()),
            Box::new(state_updated.clone()),
            Box::new(state_removed.clone()),
            Box::new(dropped_late.clone()),
            Box::new(input_rows.clone()),
            Box::new(output_rows.clone()),
            Box::new(batch_duration.clone()),
            Box::new(input_rate.clone()),
            Box::new(processed_rate.clone()),
            Box::new(records_behind.clone()),
            Box::new(dead_letter.clone()),
            Box::new(last_batch_id.clone()),
            Box::new(last_commit.clone()),
            Box::new(watermark.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            batches,
            input_rows,
            output_rows,
            batch_duration,
            input_rate,
            processed_rate,
            records_behind,
            dead_letter,
            last_batch_id,
            last_commit,
            watermark,
            state_rows,
            state_memory,
            state_updated,
            state_removed,
            dropped_late,
            restarts,
            partition_lag,
            replica,
            rescale,
        }
    }

    /// Records which replica of which generation this engine runs as.
    pub fn record_replica(&self, index: u32, count: u32, generation: u64) {
        self.replica.reset();
        self.replica
            .with_label_values(&[&index.to_string(), &count.to_string()])
            .set(generation as i64);
    }

    /// Records how long a rescale's `phase` took.
    pub fn record_rescale(&self, phase: &str, seconds: f64) {
        self.rescale.with_label_values(&[phase]).set(seconds);
    }

    /// Records how long this replica's hand-over took.
    pub fn record_handover(&self, seconds: f64) {
        self.record_rescale("handover", seconds);
    }

    fn record(&self, progress: &QueryProgress, source_names: &[String], watermark_seconds: f64) {
        self.batches.inc();
        for (name, source) in source_names.iter().zip(&progress.sources) {
            let name = name.as_str();
            self.input_rows
                .with_label_values(&[name])
                .inc_by(source.num_input_rows);
            self.dead_letter
                .with_label_values(&[name])
                .inc_by(source.num_dead_letter_records);
            self.records_behind
                .with_label_values(&[name])
                .set(source.records_behind_latest as i64);
            if let (Some(end), Some(latest)) = (
                crate::kafka::offsets_from_json(&source.end_offset),
                crate::kafka::offsets_from_json(&source.latest_offset),
            ) {
                for (topic, partitions) in &latest {
                    for (partition, hi) in partitions {
                        let at = end
                            .get(topic)
                            .and_then(|t| t.get(partition))
                            .copied()
                            .unwrap_or(*hi);
                        self.partition_lag
                            .with_label_values(&[name, topic, &partition.to_string()])
                            .set((hi - at).max(0));
                    }
                }
            }
        }
        self.output_rows.inc_by(progress.sink.num_output_rows);
        let total_ms = progress
            .duration_ms
            .get("triggerExecution")
            .copied()
            .unwrap_or(0);
        self.batch_duration.observe(total_ms as f64 / 1000.0);
        self.input_rate.set(progress.input_rows_per_second);
        self.processed_rate.set(progress.processed_rows_per_second);
        self.last_batch_id.set(progress.batch_id as i64);
        self.last_commit
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        self.watermark.set(watermark_seconds);
        for op in &progress.state_operators {
            self.state_rows.set(op.num_rows_total as i64);
            self.state_memory.set(op.memory_used_bytes as i64);
            self.state_updated.inc_by(op.num_rows_updated);
            self.state_removed.inc_by(op.num_rows_removed);
            self.dropped_late.inc_by(op.num_rows_dropped_by_watermark);
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// The state a running query shares with its HTTP endpoints.
pub struct Monitor {
    recent: Mutex<VecDeque<QueryProgress>>,
    metrics: Metrics,
    ready: AtomicBool,
    failure: Mutex<Option<String>>,
    status: Mutex<QueryStatus>,
    /// The error the query restarted after, until a batch completes.
    retrying: Mutex<Option<String>>,
}

impl Monitor {
    /// A monitor for the query named `query`.
    pub fn new(query: &str) -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_PROGRESS)),
            metrics: Metrics::new(query),
            ready: AtomicBool::new(false),
            failure: Mutex::new(None),
            status: Mutex::new(QueryStatus {
                message: "Initializing sources".into(),
                ..QueryStatus::default()
            }),
            retrying: Mutex::new(None),
        }
    }

    /// Says what the query is doing now.
    pub fn set_status(
        &self,
        message: impl Into<String>,
        data_available: bool,
        trigger_active: bool,
    ) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = QueryStatus {
            message: message.into(),
            is_data_available: data_available,
            is_trigger_active: trigger_active,
        };
    }

    /// What the query is doing now. Until a batch completes after a
    /// restart, the message ends with the error restarted after: a run
    /// blocked in a call to a store or broker that is still down says so,
    /// not only that it is getting offsets.
    pub fn status(&self) -> QueryStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(error) = &*self.retrying.lock().unwrap_or_else(|e| e.into_inner())
            && !status.message.contains(error.as_str())
        {
            status.message = format!("{} (retrying after: {error})", status.message);
        }
        status
    }

    /// Counts a restart from the checkpoint after a transient error, and
    /// keeps the error in the status until a batch completes.
    pub fn count_restart(&self, error: String) {
        self.metrics.restarts.inc();
        *self.retrying.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Records a batch's progress; `source_names` are the sources' table
    /// names, in the order of `progress.sources`.
    pub fn record(&self, progress: QueryProgress, source_names: &[String], watermark_seconds: f64) {
        self.metrics
            .record(&progress, source_names, watermark_seconds);
        *self.retrying.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_PROGRESS {
            recent.pop_front();
        }
        recent.push_back(progress);
    }

    /// The recent progress reports, oldest first.
    pub fn recent(&self) -> Vec<QueryProgress> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The latest progress report.
    pub fn last(&self) -> Option<QueryProgress> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .back()
            .cloned()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Marks the query started: sources and sink are open, the plan is made.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the query has started.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the query failed, with why.
    pub fn set_failed(&self, why: String) {
        self.ready.store(false, Ordering::Release);
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Why the query failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::tests::progress;

    #[test]
    fn the_status_tells_the_error_restarted_after_until_a_batch_completes() {
        let monitor = Monitor::new("q");
        let error = "Kafka is unavailable: broker down".to_owned();
        monitor.set_status(
            format!("Restarting from the checkpoint in 1 s after an error a retry can help with: {error}"),
            false,
            false,
        );
        monitor.count_restart(error.clone());
        // Said once, not twice.
        assert_eq!(monitor.status().message.matches(&error).count(), 1);
        monitor.set_status("Getting offsets from the sources", false, true);
        assert_eq!(
            monitor.status().message,
            format!("Getting offsets from the sources (retrying after: {error})")
        );
        monitor.record(progress(0), &[], 0.0);
        assert_eq!(monitor.status().message, "Getting offsets from the sources");
        assert!(
            monitor
                .metrics()
                .render()
                .contains("sluice_query_restarts_total")
        );
    }
}
