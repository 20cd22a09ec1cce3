//! The micro-batch loop: plan each source's range, read it, run the query
//! over it, write the result, report progress; then wait for the trigger.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::TimestampMicrosecondArray;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_crds::duration::parse_duration;
use sluice_crds::progress::{QueryProgress, SinkProgress, SourceProgress};
use sluice_crds::{Problem, Problems, StreamingQuery};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::checkpoint::{Checkpoint, OffsetEntry, SourceOffsets, new_metadata, offset_entry};
use crate::monitor::Monitor;
use crate::plan::QueryPlan;
use crate::sink::{self, Sink};
use crate::source::{self, BatchRange, ReadMode, Source};
use crate::{Error, Result, checkpoint};
use crate::{dead_letter, fault};

/// How long to wait before asking the sources again when a batch found no
/// new data and the trigger sets no interval.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Options of one run, beyond the spec.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop after this many batches.
    pub max_batches: Option<u64>,
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to stop (SIGINT, SIGTERM).
    Requested,
    /// `--max-batches` batches ran.
    MaxBatches,
    /// `trigger.availableNow` and everything available was processed.
    Completed,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Batches run.
    pub batches: u64,
    /// Rows read from all sources.
    pub input_rows: u64,
    /// Rows written to the sink.
    pub output_rows: u64,
    /// Why it ended.
    pub stopped: Stopped,
}

struct SourceState {
    source: Box<dyn Source>,
    offset: Value,
    /// Where malformed records go (`deadLetter.path`).
    dead_letter: Option<PathBuf>,
    /// The largest event time seen, when the source declares a watermark.
    max_event_micros: Option<i64>,
}

/// A query ready to run.
pub struct Runner {
    name: String,
    id: String,
    run_id: String,
    sources: Vec<SourceState>,
    sink: Box<dyn Sink>,
    plan: QueryPlan,
    interval: Option<Duration>,
    available_now: bool,
    monitor: Arc<Monitor>,
    checkpoint: Option<Checkpoint>,
    /// The sources' names, in spec order (metric labels).
    source_names: Vec<String>,
    /// The first batch id this run runs.
    next_batch: u64,
    /// A batch planned before a crash but not committed: run first, with
    /// exactly its offsets.
    replay: Option<OffsetEntry>,
    /// The watermark the last batch ran with.
    last_watermark: Option<i64>,
}

/// Checks what `validate()` cannot: that this engine supports every part of
/// the spec, and that the SQL plans against the sources' schemas. Opens
/// nothing and writes nothing.
pub async fn check(query: &StreamingQuery) -> std::result::Result<(), Problems> {
    let mut problems = Problems::default();
    let mut push = |err: Error| match err {
        Error::Unsupported { path, message } => problems.0.push(Problem { path, message }),
        Error::Plan(message) => problems.0.push(Problem {
            path: "spec.query".into(),
            message,
        }),
        other => problems.0.push(Problem {
            path: "spec".into(),
            message: other.to_string(),
        }),
    };
    let spec = &query.spec;
    if let Some(checkpoint) = &spec.checkpoint
        && let Err(err) = checkpoint::check_location(&checkpoint.location)
    {
        push(err);
    }
    if let Err(err) = sink::check(&spec.sink) {
        push(err);
    }
    let mode = read_mode(query);
    let mut schemas = Vec::new();
    for (i, source_spec) in spec.sources.iter().enumerate() {
        match source::build(source_spec, &format!("spec.sources[{i}]"), mode, Utc::now()) {
            Ok(source) => schemas.push((source.name().to_owned(), source.schema())),
            Err(err) => push(err),
        }
    }
    let watermarks: Vec<Option<String>> = spec
        .sources
        .iter()
        .map(|s| s.watermark.as_ref().map(|w| w.column.clone()))
        .collect();
    if schemas.len() == spec.sources.len()
        && let Err(err) = QueryPlan::new(
            &spec.query,
            &schemas,
            &watermarks,
            &spec.tables,
            spec.output_mode,
        )
        .await
    {
        push(err);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Where a run starts: from the checkpoint when the spec has one.
struct Restored {
    checkpoint: Option<Checkpoint>,
    /// The last committed batch, whose state version is restored.
    committed_batch: Option<u64>,
    id: String,
    next_batch: u64,
    replay: Option<OffsetEntry>,
}

/// Opens the checkpoint, if the spec names one, and puts the sources where
/// the last committed batch left them. Without one, the query starts afresh
/// with a new id.
async fn restore(
    query: &StreamingQuery,
    name: &str,
    sources: &mut [SourceState],
) -> Result<Restored> {
    let Some(location) = query.spec.checkpoint.as_ref().map(|c| &c.location) else {
        return Ok(Restored {
            checkpoint: None,
            committed_batch: None,
            id: uuid::Uuid::new_v4().to_string(),
            next_batch: 0,
            replay: None,
        });
    };
    let store = Checkpoint::open(location)?;
    let names = sources.iter().map(|s| s.source.name().to_owned()).collect();
    let metadata = store
        .metadata(new_metadata(name, names, query.spec.state_partitions()))
        .await?;
    let recovery = store.recover().await?;
    for state in sources.iter_mut() {
        let source_name = state.source.name().to_owned();
        if let Some(committed) = &recovery.committed {
            state.offset = offsets_of(committed, &source_name)?.end.clone();
        }
        state.max_event_micros = recovery.max_event_micros.get(&source_name).copied();
    }
    info!(
        location = %location,
        next_batch = recovery.next_batch,
        replay = recovery.replay.is_some(),
        "Recovered from the checkpoint."
    );
    Ok(Restored {
        checkpoint: Some(store),
        committed_batch: recovery.committed.as_ref().map(|c| c.batch_id),
        id: metadata.id,
        next_batch: recovery.next_batch,
        replay: recovery.replay,
    })
}

/// A source's entry in a batch's offsets.
fn offsets_of<'a>(entry: &'a OffsetEntry, source: &str) -> Result<&'a SourceOffsets> {
    entry.sources.iter().find(|s| s.name == source).ok_or_else(|| Error::Checkpoint {
        file: format!("offsets/{}", entry.batch_id),
        message: format!("has no offsets for the source {source:?}: the checkpoint is damaged or another query's"),
    })
}

fn read_mode(query: &StreamingQuery) -> ReadMode {
    match &query.spec.trigger {
        Some(trigger) if trigger.is_available_now() => ReadMode::AvailableNow,
        _ => ReadMode::Continuous,
    }
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn micros_to_rfc3339(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros).map_or_else(|| micros.to_string(), rfc3339)
}

impl Runner {
    /// Opens the sources and the sink and plans the query. The spec must have
    /// passed `validate()`.
    /// Local state goes to `$SLUICE_STATE_DIR`, or a directory under the
    /// system's temporary directory.
    pub async fn new(query: &StreamingQuery, monitor: Arc<Monitor>) -> Result<Self> {
        let name = query.metadata.name.clone().unwrap_or_default();
        let state_dir = std::env::var_os("SLUICE_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir()
                    .join("sluice-state")
                    .join(format!("{name}-{}", std::process::id()))
            });
        Self::with_state_dir(query, monitor, state_dir).await
    }

    /// [`Runner::new`], with local state in `state_dir` (scratch: state is
    /// restored from the checkpoint).
    pub async fn with_state_dir(
        query: &StreamingQuery,
        monitor: Arc<Monitor>,
        state_dir: PathBuf,
    ) -> Result<Self> {
        let spec = &query.spec;
        let name = query.metadata.name.clone().unwrap_or_default();
        if let Err(problems) = check(query).await {
            return Err(Error::Spec(sluice_crds::Error::Invalid {
                origin: format!("StreamingQuery {name}"),
                problems,
            }));
        }
        let mode = read_mode(query);
        let started = Utc::now();
        let mut sources = Vec::new();
        for (i, source_spec) in spec.sources.iter().enumerate() {
            let source = source::build(source_spec, &format!("spec.sources[{i}]"), mode, started)?;
            sources.push(SourceState {
                offset: source.initial_offset(),
                dead_letter: source_spec
                    .dead_letter
                    .as_ref()
                    .map(|d| PathBuf::from(d.path.strip_prefix("file://").unwrap_or(&d.path))),
                source,
                max_event_micros: None,
            });
        }
        let schemas: Vec<_> = sources
            .iter()
            .map(|s| (s.source.name().to_owned(), s.source.schema()))
            .collect();
        let watermarks: Vec<Option<String>> = sources
            .iter()
            .map(|s| s.source.watermark().map(|(column, _)| column.to_owned()))
            .collect();
        let mut plan = QueryPlan::new(
            &spec.query,
            &schemas,
            &watermarks,
            &spec.tables,
            spec.output_mode,
        )
        .await?;
        let sink = sink::build(&spec.sink)?;
        let interval = spec
            .trigger
            .as_ref()
            .and_then(|t| t.processing_time.as_deref())
            .map(parse_duration)
            .transpose()
            .map_err(|message| Error::Unsupported {
                path: "spec.trigger.processingTime".into(),
                message,
            })?
            .filter(|d| !d.is_zero());
        let restored = restore(query, &name, &mut sources).await?;
        plan.open_state(
            spec.state_partitions(),
            &state_dir,
            restored.checkpoint.as_ref().map(Checkpoint::store),
            restored.committed_batch,
        )
        .await?;
        Ok(Self {
            name,
            source_names: sources.iter().map(|s| s.source.name().to_owned()).collect(),
            checkpoint: restored.checkpoint,
            next_batch: restored.next_batch,
            replay: restored.replay,
            run_id: uuid::Uuid::new_v4().to_string(),
            id: restored.id,
            sources,
            sink,
            plan,
            interval,
            available_now: mode == ReadMode::AvailableNow,
            monitor,
            last_watermark: None,
        })
    }

    /// The query's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs batches until `stop` turns true, `max_batches` ran, or (with
    /// `availableNow`) the input is used up. A stop request is honoured at a
    /// batch boundary: the batch under way finishes first.
    pub async fn run(
        mut self,
        options: RunOptions,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Summary> {
        self.monitor.set_ready();
        info!(query = %self.name, id = %self.id, run_id = %self.run_id, sink = %self.sink.description(), "Query started.");
        let mut summary = Summary {
            batches: 0,
            input_rows: 0,
            output_rows: 0,
            stopped: Stopped::Requested,
        };
        let mut previous_start: Option<Instant> = None;
        let mut batch_id = self.next_batch;
        loop {
            if *stop.borrow() {
                summary.stopped = Stopped::Requested;
                break;
            }
            if options
                .max_batches
                .is_some_and(|max| summary.batches >= max)
            {
                summary.stopped = Stopped::MaxBatches;
                break;
            }
            let trigger_start = Instant::now();
            let timestamp = Utc::now();
            let ranges = if let Some(entry) = self.replay.take() {
                info!(
                    batch_id,
                    "Running again a batch that did not commit before the last stop."
                );
                self.replay_ranges(&entry)?
            } else {
                let mut ranges = Vec::with_capacity(self.sources.len());
                for state in &mut self.sources {
                    ranges.push(state.source.plan_batch(&state.offset).await?);
                }
                // As in Spark, a batch runs without new data when the
                // watermark moved, so that the windows it closes are written.
                let closes_windows = self
                    .plan
                    .aggregated()
                    .is_some_and(|a| a.windowed_with_watermark)
                    && self.watermark_micros() > self.last_watermark;
                if ranges.iter().all(|r| r.rows == 0) && !closes_windows {
                    if self.available_now {
                        summary.stopped = Stopped::Completed;
                        break;
                    }
                    debug!("No new data.");
                    let wait = self.interval.unwrap_or(IDLE_POLL);
                    wait_or_stop(trigger_start + wait, &mut stop).await;
                    continue;
                }
                // The write-ahead: what this batch reads is durable before it
                // reads anything.
                if let Some(store) = &self.checkpoint {
                    let sources = self
                        .sources
                        .iter()
                        .zip(&ranges)
                        .map(|(state, range)| SourceOffsets {
                            name: state.source.name().to_owned(),
                            start: range.start.clone(),
                            end: range.end.clone(),
                            max_event_micros: state.max_event_micros,
                        })
                        .collect();
                    store
                        .write_offsets(&offset_entry(batch_id, sources))
                        .await?;
                    fault::point("offsets", batch_id);
                }
                ranges
            };
            let latest_offset_ms = trigger_start.elapsed().as_millis() as u64;
            let progress = self
                .run_batch(
                    batch_id,
                    timestamp,
                    trigger_start,
                    previous_start,
                    latest_offset_ms,
                    ranges,
                )
                .await?;
            summary.batches += 1;
            summary.input_rows += progress.num_input_rows;
            summary.output_rows += progress.sink.num_output_rows;
            info!(
                batch_id,
                input_rows = progress.num_input_rows,
                output_rows = progress.sink.num_output_rows,
                input_rows_per_second = format!("{:.1}", progress.input_rows_per_second),
                processed_rows_per_second = format!("{:.1}", progress.processed_rows_per_second),
                duration_ms = progress.duration_ms["triggerExecution"],
                "Batch completed."
            );
            let watermark_seconds = self.watermark_micros().map_or(0.0, |m| m as f64 / 1e6);
            self.monitor
                .record(progress, &self.source_names, watermark_seconds);
            previous_start = Some(trigger_start);
            batch_id += 1;
            if let Some(interval) = self.interval {
                wait_or_stop(trigger_start + interval, &mut stop).await;
            }
        }
        info!(
            query = %self.name,
            batches = summary.batches,
            input_rows = summary.input_rows,
            output_rows = summary.output_rows,
            stopped = ?summary.stopped,
            "Query stopped."
        );
        Ok(summary)
    }

    /// The ranges of a batch planned before a crash, as its offsets entry
    /// says; the watermark state is put back as it was before it.
    fn replay_ranges(&mut self, entry: &OffsetEntry) -> Result<Vec<BatchRange>> {
        let mut ranges = Vec::with_capacity(self.sources.len());
        for state in &mut self.sources {
            let offsets = offsets_of(entry, state.source.name())?;
            state.max_event_micros = offsets.max_event_micros;
            ranges.push(BatchRange {
                start: offsets.start.clone(),
                end: offsets.end.clone(),
                latest: offsets.end.clone(),
                rows: 0,
                records_behind_latest: 0,
            });
        }
        Ok(ranges)
    }

    /// The watermark in effect: for each source with one, its largest event
    /// time minus its delay; the smallest of those. None until every such
    /// source has seen a row.
    fn watermark_micros(&self) -> Option<i64> {
        let mut watermark: Option<i64> = None;
        for state in &self.sources {
            if let Some((_, delay)) = state.source.watermark() {
                let own = state.max_event_micros? - delay.as_micros() as i64;
                watermark = Some(watermark.map_or(own, |w| w.min(own)));
            }
        }
        watermark
    }

    async fn run_batch(
        &mut self,
        batch_id: u64,
        timestamp: DateTime<Utc>,
        trigger_start: Instant,
        previous_start: Option<Instant>,
        latest_offset_ms: u64,
        ranges: Vec<BatchRange>,
    ) -> Result<QueryProgress> {
        // The watermark reported for a batch is the one in effect while it
        // runs, computed from the batches before it (as in Spark).
        let watermark = self.watermark_micros();
        let read_start = Instant::now();
        let mut inputs = Vec::with_capacity(self.sources.len());
        let mut rows_read = Vec::with_capacity(self.sources.len());
        let mut dead_letters = Vec::with_capacity(self.sources.len());
        let mut event_stats = EventTimeStats::default();
        for (state, range) in self.sources.iter_mut().zip(&ranges) {
            let batches = state.source.read(&range.start, &range.end).await?;
            rows_read.push(batches.iter().map(|b| b.num_rows() as u64).sum::<u64>());
            let bad = state.source.take_bad_records();
            if let (Some(dir), false) = (&state.dead_letter, bad.is_empty()) {
                let file = dead_letter::write(dir, state.source.name(), batch_id, &bad).await?;
                warn!(source = state.source.name(), batch_id, records = bad.len(), file = %file.display(), "Set malformed records aside.");
            }
            dead_letters.push(bad.len() as u64);
            if let Some((column, _)) = state.source.watermark() {
                let seen = event_stats.add(column, &batches);
                state.max_event_micros = state.max_event_micros.max(seen);
            }
            inputs.push(batches);
        }
        let get_batch_ms = read_start.elapsed().as_millis() as u64;
        let exec_start = Instant::now();
        let output = self
            .plan
            .execute(inputs, watermark)
            .await
            .map_err(|source| Error::Execute { batch_id, source })?;
        self.last_watermark = watermark;
        let output_rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        self.sink
            .add_batch(batch_id, self.plan.output_schema(), &output)
            .await?;
        let add_batch_ms = exec_start.elapsed().as_millis() as u64;
        fault::point("sink", batch_id);
        self.plan.commit_state(batch_id).await?;
        fault::point("state", batch_id);
        if let Some(store) = &self.checkpoint {
            let max_events = self
                .sources
                .iter()
                .filter_map(|s| Some((s.source.name().to_owned(), s.max_event_micros?)))
                .collect();
            store.write_commit(batch_id, max_events).await?;
            fault::point("commit", batch_id);
        }
        for (state, range) in self.sources.iter_mut().zip(&ranges) {
            state.offset = range.end.clone();
        }

        let elapsed = trigger_start.elapsed();
        let since_previous = previous_start.map(|p| trigger_start.duration_since(p));
        let per_second = |rows: u64, over: Duration| {
            let secs = over.as_secs_f64();
            if secs > 0.0 { rows as f64 / secs } else { 0.0 }
        };
        // Rows that arrived since the previous trigger; as in Spark, 0 for the
        // first batch of a run, which has no previous trigger to measure from.
        let arrival_window = since_previous.unwrap_or(Duration::ZERO);
        let num_input_rows: u64 = rows_read.iter().sum();
        let sources = self
            .sources
            .iter()
            .zip(&ranges)
            .zip(rows_read)
            .zip(dead_letters)
            .map(|(((state, range), rows), bad)| SourceProgress {
                description: state.source.description(),
                start_offset: if batch_id == 0 {
                    Value::Null
                } else {
                    range.start.clone()
                },
                end_offset: range.end.clone(),
                latest_offset: range.latest.clone(),
                num_input_rows: rows,
                input_rows_per_second: per_second(rows, arrival_window),
                processed_rows_per_second: per_second(rows, elapsed),
                records_behind_latest: range.records_behind_latest,
                num_dead_letter_records: bad,
            })
            .collect();
        let mut event_time = event_stats.report();
        if let Some(w) = watermark {
            event_time.insert("watermark".into(), micros_to_rfc3339(w));
        } else if self.sources.iter().any(|s| s.source.watermark().is_some()) {
            event_time.insert("watermark".into(), micros_to_rfc3339(0));
        }
        Ok(QueryProgress {
            id: self.id.clone(),
            run_id: self.run_id.clone(),
            name: self.name.clone(),
            timestamp: rfc3339(timestamp),
            batch_id,
            num_input_rows,
            input_rows_per_second: per_second(num_input_rows, arrival_window),
            processed_rows_per_second: per_second(num_input_rows, elapsed),
            duration_ms: BTreeMap::from([
                ("latestOffset".to_owned(), latest_offset_ms),
                ("getBatch".to_owned(), get_batch_ms),
                ("addBatch".to_owned(), add_batch_ms),
                ("triggerExecution".to_owned(), elapsed.as_millis() as u64),
            ]),
            event_time,
            state_operators: self.plan.state_progress(),
            sources,
            sink: SinkProgress {
                description: self.sink.description(),
                num_output_rows: output_rows,
            },
        })
    }
}

/// Min, max and mean of the event-time columns of one batch.
#[derive(Default)]
struct EventTimeStats {
    min: Option<i64>,
    max: Option<i64>,
    sum: i128,
    count: u64,
}

impl EventTimeStats {
    /// Adds a source's rows; returns the largest event time among them.
    fn add(&mut self, column: &str, batches: &[RecordBatch]) -> Option<i64> {
        let mut largest = None;
        for batch in batches {
            let Some(array) = batch
                .column_by_name(column)
                .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            else {
                continue;
            };
            for value in array.iter().flatten() {
                self.sum += value as i128;
                self.count += 1;
                self.min = Some(self.min.map_or(value, |m| m.min(value)));
                largest = largest.max(Some(value));
            }
        }
        self.max = self.max.max(largest);
        largest
    }

    fn report(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let (Some(min), Some(max)) = (self.min, self.max) {
            out.insert("min".into(), micros_to_rfc3339(min));
            out.insert("max".into(), micros_to_rfc3339(max));
            out.insert(
                "avg".into(),
                micros_to_rfc3339((self.sum / self.count.max(1) as i128) as i64),
            );
        }
        out
    }
}

/// Sleeps until `deadline`, or until a stop is requested.
async fn wait_or_stop(deadline: Instant, stop: &mut watch::Receiver<bool>) {
    if *stop.borrow() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep_until(deadline.into()) => {}
        _ = stop.changed() => {}
    }
}
