//! The micro-batch protocol, the same for every connector:
//!
//! 1. **plan** batch N: each source's range from where the last batch
//!    ended, and the batch's watermarks; with a checkpoint, check the fence
//!    and write all of it to `offsets/N` (create-only) before reading;
//! 2. **read** the ranges and **execute** the query (stateful operators merge
//!    the batch into their state);
//! 3. **sink**: prepare batch N, check the fence, commit it — skipped for a
//!    replayed batch the sink has already committed;
//! 4. **state**: commit state version N (uploads, manifests);
//! 5. **commit**: check the fence, write `commits/N` with the watermark
//!    tracker's state; tell the sources; report progress.
//!
//! When the next batch starts at once (no trigger interval), its ranges
//! are planned and read **ahead**, from where batch N ends, while batch N
//! writes its sink and commits its state (not while it runs its query,
//! which keeps the cores busy already): reading has no effect
//! outside the process, and the ranges read ahead become batch N + 1 only
//! when written to `offsets/N+1` after `commits/N`, as any plan does. A
//! crash or a stop before that drops them; a read ahead that fails is
//! dropped too, and the next batch plans and reads as usual (meeting the
//! error itself). The cores read while the batch waits on its sink and
//! the checkpoint store.
//!
//! A batch planned before a crash is run again with exactly its
//! `offsets/N` entry: its ranges and its watermarks, nothing recomputed from
//! the current spec. Fail points (`crate::fault`) sit between the steps.
//!
//! [`run_query`] runs a [`Runner`] and, when it fails with an error a retry
//! can help with (an object store or broker unavailable), starts it again
//! from the checkpoint with exponential backoff, saying so in `/status`, as
//! Flink's restart strategies do.

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

use crate::checkpoint::fence::Fence;
use crate::checkpoint::{self, Checkpoint, CommitEntry, OffsetEntry, SourceOffsets, new_metadata};
use crate::dead_letter::DeadLetters;
use crate::monitor::Monitor;
use crate::plan::{QueryPlan, Stage};
use crate::replicas::{self, Replica, ReplicaRun};
use crate::shuffle::{self, ShuffleSink, WatermarkFeed};
use crate::sink::{self, Sink, SinkContext};
use crate::source::{self, BatchRange, ReadMode, Source};
use crate::state::PartitionRef;
use crate::watermark::{BatchWatermarks, SourceWatermark, Tracker};
use crate::{Error, Result};
use crate::{fault, storage};

/// The first wait before a restart after a transient error; it doubles up
/// to [`MAX_BACKOFF`] and starts over after a batch completes.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Options of one run, beyond the spec.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop after this many batches.
    pub max_batches: Option<u64>,
    /// Which replica this run is, of how many (`--replica`, `--replicas`).
    pub replica: Replica,
    /// Only finish the batch a stopped run left planned, then stop (a
    /// hand-over settling a replica of an older generation).
    pub drain: bool,
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
    /// Asked to drain, and no planned batch is left.
    Drained,
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

impl Default for Summary {
    fn default() -> Self {
        Self {
            batches: 0,
            input_rows: 0,
            output_rows: 0,
            stopped: Stopped::Requested,
        }
    }
}

/// Which reads a batch uses and makes (see [`Runner::run_batch`]).
struct Reads {
    /// This batch's rows, read ahead by the previous batch.
    this: Option<Vec<SourceRead>>,
    /// Whether to read the next batch ahead.
    next: bool,
}

/// The next batch, planned and read while the previous one ran.
struct ReadAhead {
    /// Each source's range, from where the previous batch ended.
    ranges: Vec<BatchRange>,
    /// Each source's rows and malformed records for its range.
    reads: Vec<SourceRead>,
}

/// What one source read for a batch.
struct SourceRead {
    batches: Vec<RecordBatch>,
    /// The malformed records it set aside.
    bad: Vec<crate::source::BadRecord>,
    /// Which partition each row came from (Kafka).
    partitions: Option<crate::source::RowPartitions>,
}

impl SourceRead {
    /// Reads `range` from `source`.
    async fn from(source: &mut dyn Source, range: &BatchRange) -> Result<Self> {
        let batches = source.read(range).await;
        let bad = source.take_bad_records();
        let partitions = source.take_row_partitions();
        Ok(Self {
            batches: batches?,
            bad,
            partitions,
        })
    }
}

/// Plans and reads the batch after the one whose ranges end at `starts`
/// (see the module's documentation). `None` when no source has new data or
/// one fails: the next batch then plans and reads as usual.
async fn read_ahead(sources: &mut [SourceState], starts: Vec<Value>) -> Option<ReadAhead> {
    let mut ranges = Vec::with_capacity(sources.len());
    for (state, start) in sources.iter_mut().zip(&starts) {
        match state.source.plan_batch(start).await {
            Ok(range) => ranges.push(range),
            Err(err) => {
                debug!(error = %err, "Reading ahead failed: the next batch plans again.");
                return None;
            }
        }
    }
    if !ranges.iter().any(|r| r.rows > 0) {
        return None;
    }
    let mut reads = Vec::with_capacity(sources.len());
    for (state, range) in sources.iter_mut().zip(&ranges) {
        match SourceRead::from(state.source.as_mut(), range).await {
            Ok(read) => reads.push(read),
            Err(err) => {
                debug!(error = %err, "Reading ahead failed: the next batch reads again.");
                return None;
            }
        }
    }
    Some(ReadAhead { ranges, reads })
}

struct SourceState {
    source: Box<dyn Source>,
    offset: Value,
    /// Where malformed records go (`deadLetter`).
    dead_letter: Option<DeadLetters>,
}

/// What a two-stage query's second stage tells the first, whose progress
/// is the query's: the state, the watermark, the user's sink.
#[derive(Default)]
struct StageReport {
    state_operators: Vec<sluice_crds::progress::StateOperatorProgress>,
    watermark: Option<String>,
    sink: Option<String>,
    /// Rows the user's sink took since the first stage's last report.
    output_rows: u64,
}

/// Which end of a [`StageReport`] a runner holds.
enum Link {
    /// The second stage: writes it after each batch.
    Writes(Arc<std::sync::Mutex<StageReport>>),
    /// The first: reports it with each batch.
    Reads(Arc<std::sync::Mutex<StageReport>>),
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
    fence: Option<Fence>,
    /// The sources' names, in spec order (metric labels).
    source_names: Vec<String>,
    /// The first batch id this run runs.
    next_batch: u64,
    /// A batch planned before a crash but not committed: run first, with
    /// exactly its offsets entry.
    replay: Option<OffsetEntry>,
    tracker: Tracker,
    /// The next batch, read while the last one ran.
    ahead: Option<ReadAhead>,
    /// The eviction watermark of the last batch that ran (in this run or,
    /// from the checkpoint, before it); `None` before any batch.
    last_eviction: Option<Option<i64>>,
    summary: Summary,
    /// When this run joined its generation of replicas, until its first
    /// batch is committed.
    joined: Option<Instant>,
    /// A two-stage query's second stage: its watermark, from the first
    /// stage's replicas.
    feed: Option<WatermarkFeed>,
    /// A two-stage query's stages: what the second tells the first.
    link: Option<Link>,
    /// A replica of a generation: a source's own watermark does not pass a
    /// partition a batch left records of unread (see
    /// [`crate::watermark::Tracker::observe`]).
    hold_for_partitions: bool,
}

/// Set to `off` not to read the next batch ahead (for comparisons: the
/// output is the same).
pub const READ_AHEAD_ENV: &str = "SLUICE_READ_AHEAD";

/// The watermark declarations of the spec's sources, in spec order.
fn declarations(query: &StreamingQuery) -> Result<Vec<(String, Option<SourceWatermark>)>> {
    query
        .spec
        .sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let declared = match &s.watermark {
                None => None,
                Some(w) => {
                    let millis = |field: &str, text: &str| -> Result<i64> {
                        parse_duration(text)
                            .map(|d| d.as_millis() as i64)
                            .map_err(|message| Error::Unsupported {
                                path: format!("spec.sources[{i}].watermark.{field}"),
                                message,
                            })
                    };
                    Some(SourceWatermark {
                        column: w.column.clone(),
                        delay_ms: millis("delay", &w.delay)?,
                        idle_timeout_ms: w
                            .idle_timeout
                            .as_deref()
                            .map(|t| millis("idleTimeout", t))
                            .transpose()?,
                    })
                }
            };
            Ok((s.name.clone(), declared))
        })
        .collect()
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
        && let Err(err) = storage::check_location(&checkpoint.location, "spec.checkpoint.location")
    {
        push(err);
    }
    if let Err(err) = sink::check(&spec.sink) {
        push(err);
    }
    let mode = read_mode(query);
    let mut schemas = Vec::new();
    for (i, source_spec) in spec.sources.iter().enumerate() {
        let name = query.metadata.name.as_deref().unwrap_or_default();
        match source::build(
            source_spec,
            &format!("spec.sources[{i}]"),
            mode,
            Utc::now(),
            name,
        ) {
            Ok(source) => schemas.push((source.name().to_owned(), source.schema())),
            Err(err) => push(err),
        }
    }
    let watermarks: Vec<Option<String>> = spec
        .sources
        .iter()
        .map(|s| s.watermark.as_ref().map(|w| w.column.clone()))
        .collect();
    if schemas.len() == spec.sources.len() {
        match QueryPlan::new(
            &spec.query,
            &schemas,
            &watermarks,
            &spec.tables,
            spec.output_mode,
        )
        .await
        {
            Ok(plan) => {
                let replicas = spec.replicas.unwrap_or(1).max(1) as u32;
                if replicas > 1
                    && let Err(err) = scale_out(query, &plan, replicas)
                {
                    push(err);
                }
            }
            Err(err) => push(err),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Checks that a query can run on several replicas: what is not built yet
/// is refused, naming it.
fn scale_out(query: &StreamingQuery, plan: &QueryPlan, count: u32) -> Result<()> {
    let refuse = |path: &str, message: String| {
        Err(Error::Unsupported {
            path: path.to_owned(),
            message,
        })
    };
    let keyed = crate::replicas::keyed_by(query).is_some();
    if keyed
        && plan.aggregated().is_some()
        && query.spec.output_mode == sluice_crds::OutputMode::Complete
    {
        return refuse(
            "spec.outputMode",
            format!(
                "complete writes the whole result every batch, which {count} replicas each holding part of the state cannot do yet: use update or append, or run it on 1 replica"
            ),
        );
    }
    if !keyed && let Some((path, message)) = plan.two_stages_refused() {
        return refuse(path, message);
    }
    if plan.aggregated().is_some() && read_mode(query) == ReadMode::AvailableNow {
        return refuse(
            "spec.trigger.availableNow",
            format!(
                "{count} replicas of a stateful query run continuously (each replica's watermark waits for the others', and a second stage cannot tell when the first has read everything): use processingTime, or run it on 1 replica"
            ),
        );
    }
    for (i, source) in query.spec.sources.iter().enumerate() {
        if source.kafka.is_none() {
            return refuse(
                &format!("spec.sources[{i}]"),
                format!(
                    "{count} replicas split Kafka partitions between them; a {} source cannot be split yet: run it on 1 replica",
                    source.kind().unwrap_or("non-Kafka")
                ),
            );
        }
    }
    if query.spec.sink.kafka.is_none() {
        return refuse(
            "spec.sink",
            format!(
                "{count} replicas write through one transactional producer each; only the Kafka sink takes writers from several replicas yet: run it on 1 replica"
            ),
        );
    }
    Ok(())
}

/// Whether the query keeps state (and so runs in two stages on several
/// replicas).
pub async fn keeps_state(query: &StreamingQuery) -> Result<bool> {
    let spec = &query.spec;
    let name = query.metadata.name.as_deref().unwrap_or_default();
    let mut schemas = Vec::new();
    for (i, source_spec) in spec.sources.iter().enumerate() {
        let source = source::build(
            source_spec,
            &format!("spec.sources[{i}]"),
            read_mode(query),
            Utc::now(),
            name,
        )?;
        schemas.push((source.name().to_owned(), source.schema()));
    }
    let watermarks: Vec<Option<String>> = spec
        .sources
        .iter()
        .map(|s| s.watermark.as_ref().map(|w| w.column.clone()))
        .collect();
    let plan = QueryPlan::new(
        &spec.query,
        &schemas,
        &watermarks,
        &spec.tables,
        spec.output_mode,
    )
    .await?;
    Ok(plan.aggregated().is_some())
}

/// A source's entry in a batch's offsets.
fn offsets_of<'a>(entry: &'a OffsetEntry, source: &str) -> Result<&'a SourceOffsets> {
    entry
        .sources
        .iter()
        .find(|s| s.name == source)
        .ok_or_else(|| Error::Checkpoint {
            file: format!("offsets/{}", entry.batch_id),
            message: format!(
                "has no offsets for the source {source:?}: the checkpoint is damaged or another query's"
            ),
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

/// The CPU time the process has used so far (every thread, user and
/// system), in milliseconds, to the microsecond; `None` if the system does
/// not say.
fn process_cpu_ms() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Some(ms(usage.ru_utime) + ms(usage.ru_stime))
}

/// The default local state directory of a query.
fn default_state_dir(name: &str) -> PathBuf {
    std::env::var_os("SLUICE_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir()
                .join("sluice-state")
                .join(format!("{name}-{}", std::process::id()))
        })
}

/// Runs a query until it stops (see [`Runner::run`]); an error a retry can
/// help with restarts it from its checkpoint after a backoff (1 s doubling
/// to 60 s), counted in `sluice_query_restarts_total` and told in
/// `/status`. Other errors end the run. Local state goes to `state_dir`, or
/// `$SLUICE_STATE_DIR`, or a directory under the system's temporary
/// directory.
pub async fn run_query(
    query: &StreamingQuery,
    monitor: Arc<Monitor>,
    state_dir: Option<PathBuf>,
    options: RunOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<Summary> {
    let name = query.metadata.name.clone().unwrap_or_default();
    let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&name));
    let mut total = Summary::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let remaining = RunOptions {
            max_batches: options.max_batches.map(|m| m.saturating_sub(total.batches)),
            ..options.clone()
        };
        let mut runners = Vec::new();
        let result = match start(query, &monitor, &state_dir, options.replica, &mut stop).await {
            Ok(Some(started)) => {
                runners = started;
                let mut stops: Vec<_> = runners.iter().map(|_| stop.clone()).collect();
                // Two stages run side by side; the first to fail stops the
                // run (both restart from their checkpoints).
                let runs = runners
                    .iter_mut()
                    .zip(stops.iter_mut())
                    .map(|(r, stop)| r.run_until(&remaining, stop));
                futures::future::try_join_all(runs)
                    .await
                    .map(|stopped| stopped.into_iter().next().unwrap_or(Stopped::Requested))
            }
            Ok(None) => Ok(Stopped::Requested),
            Err(err) => Err(err),
        };
        for (i, r) in runners.iter().enumerate() {
            let done = &r.summary;
            if done.batches > 0 {
                backoff = FIRST_BACKOFF;
            }
            // With two stages, the first reads the input and the second
            // writes the output.
            if i == 0 {
                total.batches += done.batches;
                total.input_rows += done.input_rows;
            }
            if i + 1 == runners.len() {
                total.output_rows += done.output_rows;
            }
        }
        drop(runners);
        match result {
            Ok(stopped) => {
                total.stopped = stopped;
                return Ok(total);
            }
            Err(err) if err.is_transient() && !*stop.borrow() => {
                warn!(error = %err, retry_in_s = backoff.as_secs(), "The query failed; restarting from the checkpoint.");
                monitor.set_status(
                    format!(
                        "Restarting from the checkpoint in {} s after an error a retry can help with: {err}",
                        backoff.as_secs()
                    ),
                    false,
                    false,
                );
                monitor.count_restart(err.to_string());
                wait_or_stop(Instant::now() + backoff, &mut stop).await;
                if *stop.borrow() {
                    total.stopped = Stopped::Requested;
                    return Ok(total);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(err) if err.is_transient() => {
                // Asked to stop while the batch under way failed for a
                // reason a retry can help with (a replica paused past its
                // writes' timeout, then stopped for a rescale): stopped as
                // asked, the batch left uncommitted for the next run, as
                // Spark's `stop()` ends a query without its batch's error.
                warn!(error = %err, "Stopped as asked; the batch under way failed and is left to the next run.");
                total.stopped = Stopped::Requested;
                return Ok(total);
            }
            Err(err) => return Err(err),
        }
    }
}

/// Opens a run of the query as `replica`: with a checkpoint, joins its
/// generation of replicas first (see [`crate::replicas`]). `None` when
/// asked to stop while waiting to join. A generation in two stages (see
/// [`crate::shuffle`]) gives two runners, the first stage's first.
async fn start(
    query: &StreamingQuery,
    monitor: &Arc<Monitor>,
    state_dir: &std::path::Path,
    replica: Replica,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<Runner>>> {
    if query.spec.checkpoint.is_none() {
        if replica.count > 1 {
            return Err(Error::Unsupported {
                path: "spec.checkpoint".into(),
                message: "is needed to run several replicas: each keeps its logs under it".into(),
            });
        }
        return Runner::with_state_dir(query, monitor.clone(), state_dir.to_owned())
            .await
            .map(|r| Some(vec![r]));
    }
    let joining = Instant::now();
    let Some(run) = replicas::join(query, replica, monitor, stop).await? else {
        return Ok(None);
    };
    if replica.index != 0 {
        monitor
            .metrics()
            .record_rescale("wait", joining.elapsed().as_secs_f64());
    }
    monitor
        .metrics()
        .record_replica(replica.index, replica.count, run.generation);
    let mut runner =
        Runner::for_replica(query, monitor.clone(), state_dir.to_owned(), &run).await?;
    runner.joined = Some(joining);
    if run.stages.is_none() {
        return Ok(Some(vec![runner]));
    }
    // The second stage reports on a monitor of its own: the query's
    // (status, progress, lag for the autoscaler) is the first stage's,
    // which reads the sources.
    let merge_monitor = Arc::new(Monitor::new(
        query.metadata.name.as_deref().unwrap_or_default(),
    ));
    let mut merge = Runner::for_stage(
        query,
        merge_monitor,
        state_dir.join("merge"),
        &run,
        Stage::Merge,
    )
    .await?;
    let report = Arc::new(std::sync::Mutex::new(StageReport::default()));
    runner.link = Some(Link::Reads(report.clone()));
    merge.link = Some(Link::Writes(report));
    Ok(Some(vec![runner, merge]))
}

impl Runner {
    /// Opens the sources and the sink and plans the query. The spec must have
    /// passed `validate()`.
    /// Local state goes to `$SLUICE_STATE_DIR`, or a directory under the
    /// system's temporary directory.
    pub async fn new(query: &StreamingQuery, monitor: Arc<Monitor>) -> Result<Self> {
        let name = query.metadata.name.clone().unwrap_or_default();
        Self::with_state_dir(query, monitor, default_state_dir(&name)).await
    }

    /// [`Runner::new`], with local state in `state_dir` (scratch: state is
    /// restored from the checkpoint).
    pub async fn with_state_dir(
        query: &StreamingQuery,
        monitor: Arc<Monitor>,
        state_dir: PathBuf,
    ) -> Result<Self> {
        Self::open(query, monitor, state_dir, None, Stage::Whole).await
    }

    /// [`Runner::with_state_dir`], as one replica of one generation: its
    /// logs at `run.location`, its sources reading only its slice, its
    /// sinks' transactional ids scoped to it.
    pub async fn for_replica(
        query: &StreamingQuery,
        monitor: Arc<Monitor>,
        state_dir: PathBuf,
        run: &ReplicaRun,
    ) -> Result<Self> {
        let stage = if run.stages.is_some() {
            Stage::Shuffle
        } else {
            Stage::Whole
        };
        Self::open(query, monitor, state_dir, Some(run), stage).await
    }

    /// [`Runner::for_replica`], running one `stage` of a query that runs in
    /// two (see [`crate::shuffle`]).
    pub async fn for_stage(
        query: &StreamingQuery,
        monitor: Arc<Monitor>,
        state_dir: PathBuf,
        run: &ReplicaRun,
        stage: Stage,
    ) -> Result<Self> {
        Self::open(query, monitor, state_dir, Some(run), stage).await
    }

    async fn open(
        query: &StreamingQuery,
        monitor: Arc<Monitor>,
        state_dir: PathBuf,
        run: Option<&ReplicaRun>,
        stage: Stage,
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
            let source = source::build(
                source_spec,
                &format!("spec.sources[{i}]"),
                mode,
                started,
                &name,
            )?;
            sources.push(SourceState {
                offset: source.initial_offset(),
                dead_letter: DeadLetters::of(source_spec)?,
                source,
            });
        }
        let schemas: Vec<_> = sources
            .iter()
            .map(|s| (s.source.name().to_owned(), s.source.schema()))
            .collect();
        let declared = declarations(query)?;
        let watermark_columns: Vec<Option<String>> = declared
            .iter()
            .map(|(_, w)| w.as_ref().map(|w| w.column.clone()))
            .collect();
        let mut plan = QueryPlan::new(
            &spec.query,
            &schemas,
            &watermark_columns,
            &spec.tables,
            spec.output_mode,
        )
        .await?;
        let stages = run.and_then(|r| r.stages.as_ref());
        // What the stage that keeps the state (the second of two, or the
        // one stage of a keyed generation) takes over.
        let stateful_stage = if stages.is_some() {
            Stage::Merge
        } else {
            Stage::Whole
        };
        let handed = run
            .and_then(|r| r.handed.as_ref())
            .filter(|_| stage == stateful_stage);
        if let Some(run) = run.filter(|r| r.replica.count > 1) {
            scale_out(query, &plan, run.replica.count)?;
        }
        if let Some((i, column)) = crate::replicas::keyed_by(query)
            && plan.aggregated().is_some()
        {
            // The state is partitioned as the topic is, on any number of
            // replicas, so that a rescale can hand it over as it is.
            plan.set_partitioning(crate::state::Partitioning::KafkaKey {
                column: column.to_owned(),
                field: format!("spec.sources[{i}].kafka.keyedBy"),
            });
            for state in sources.iter_mut() {
                state.source.set_state_partitions(spec.state_partitions());
            }
        }
        plan.set_stage(stage).await?;
        let mut sink = match stage {
            Stage::Shuffle => {
                let partitioner = plan
                    .partitioner()
                    .cloned()
                    .ok_or_else(|| Error::Plan("the query has no aggregation".into()))?;
                Box::new(ShuffleSink::new(
                    query,
                    spec.state_partitions(),
                    partitioner,
                )?) as Box<dyn Sink>
            }
            _ => sink::build(&spec.sink, spec.output_mode)?,
        };
        if stage == Stage::Merge && handed.is_none() {
            return Err(Error::Plan(
                "the second stage runs only as a replica of a two-stage generation".into(),
            ));
        }
        if stage == Stage::Merge {
            let schema = shuffle::shuffle_schema(&plan)?;
            sources = vec![SourceState {
                source: Box::new(shuffle::source(query, mode, schema)?),
                offset: Value::Null,
                dead_letter: None,
            }];
            sources[0].offset = sources[0].source.initial_offset();
        }
        // The watermark of a stage that keeps state on several replicas:
        // the minimum over the generation's (first-stage) replicas, this
        // one's own rows included (from its commits) in a keyed generation.
        let feed = handed
            .map(|handed| {
                WatermarkFeed::new(
                    &handed.peers,
                    declarations(query)?,
                    started.timestamp_millis(),
                )
            })
            .transpose()?;
        if let Some(run) = run.filter(|r| r.replica.count > 1) {
            for state in sources.iter_mut() {
                state.source.set_slice(run.replica)?;
            }
        }
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
        let run_id = uuid::Uuid::new_v4().to_string();
        // The second stage's watermark comes from the first's replicas.
        let tracked = if stage == Stage::Merge {
            Vec::new()
        } else {
            declared
        };
        let mut tracker = Tracker::new(tracked, started.timestamp_millis());
        let mut id = uuid::Uuid::new_v4().to_string();
        let (mut checkpoint, mut fence) = (None, None);
        let (mut next_batch, mut replay, mut last_eviction, mut restore) = (0, None, None, None);
        let mut seeds = Vec::new();
        if let Some(root) = spec.checkpoint.as_ref().map(|c| &c.location) {
            let location = match (stage, stages) {
                (Stage::Merge, Some(stages)) => &stages.merge,
                _ => run.map_or(root, |r| &r.location),
            };
            let store = Checkpoint::open(location)?;
            let names = sources.iter().map(|s| s.source.name().to_owned()).collect();
            let mut wanted = new_metadata(&name, names, spec.state_partitions());
            if let Some(run) = run {
                wanted.id = run.query_id.clone();
            }
            let metadata = store.metadata(wanted).await?;
            let claimed = Fence::claim(store.storage(), &run_id).await?;
            let recovery = store.recover().await?;
            if let Some(committed) = &recovery.committed {
                for state in sources.iter_mut() {
                    state.offset = offsets_of(&committed.offsets, state.source.name())?
                        .end
                        .clone();
                }
                tracker.restore(committed.commit.watermark.clone());
                last_eviction = Some(committed.offsets.watermarks.eviction_ms);
                restore = Some(PartitionRef {
                    version: committed.offsets.batch_id,
                    epoch: committed.commit.epoch,
                });
            }
            info!(
                location = %location,
                epoch = claimed.epoch(),
                next_batch = recovery.next_batch,
                replay = recovery.replay.is_some(),
                "Recovered from the checkpoint."
            );
            if let (Some(handed), None) = (handed, &recovery.committed) {
                // A replica's first commit is still to come: its state
                // partitions are where the previous generation left them,
                // and so is the watermark.
                for (p, at) in &handed.seeds {
                    seeds.push(crate::state::Seed {
                        partition: *p,
                        storage: Checkpoint::open(&at.location)?.storage().clone(),
                        at: PartitionRef {
                            version: at.version,
                            epoch: at.epoch,
                        },
                        evicted_ms: at.evicted_ms,
                    });
                }
                last_eviction = Some(handed.watermark_ms);
                tracker.set_global(handed.watermark_ms);
            }
            if recovery.committed.is_none() && recovery.replay.is_none() {
                // A new query: where each source starts is decided once and
                // kept (Spark's `sources/<i>/0`), so that a restart before
                // the first batch starts at the same place.
                for state in sources.iter_mut() {
                    let source_name = state.source.name().to_owned();
                    let given = run
                        .and_then(|r| r.starts.get(&source_name))
                        .cloned()
                        .unwrap_or(Value::Null);
                    state.offset = store
                        .initial_offset_given(&source_name, &given, &mut *state.source)
                        .await?;
                }
            }
            id = metadata.id;
            next_batch = recovery.next_batch;
            replay = recovery.replay;
            fence = Some(claimed);
            checkpoint = Some(store);
        }
        if checkpoint.is_none() {
            for state in sources.iter_mut() {
                state.offset = state.source.resolve_start(&state.offset).await?;
            }
        }
        let epoch = fence.as_ref().map_or(0, Fence::epoch);
        plan.open_state(
            spec.state_partitions(),
            &state_dir,
            checkpoint
                .as_ref()
                .map(|c: &Checkpoint| c.storage().clone()),
            restore,
            &seeds,
            epoch,
        )
        .await?;
        let context = SinkContext {
            query_id: id.clone(),
            run_id: run_id.clone(),
            epoch,
            scope: run.map(|r| r.scope.clone()).unwrap_or_default(),
        };
        sink.open(&context).await?;
        for state in sources.iter_mut() {
            if let Some(dead) = &mut state.dead_letter {
                dead.open(&context, state.source.name()).await?;
            }
        }
        Ok(Self {
            name,
            id,
            run_id,
            source_names: sources.iter().map(|s| s.source.name().to_owned()).collect(),
            sources,
            sink,
            plan,
            interval,
            available_now: mode == ReadMode::AvailableNow,
            monitor,
            checkpoint,
            fence,
            next_batch,
            replay,
            tracker,
            ahead: None,
            last_eviction,
            summary: Summary::default(),
            joined: None,
            feed,
            link: None,
            hold_for_partitions: run.is_some(),
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
        let stopped = self.run_until(&options, &mut stop).await?;
        Ok(Summary {
            stopped,
            ..self.summary.clone()
        })
    }

    /// Tells apart the two causes of [`Error::TransactionAborted`]: when a
    /// newer run claimed the checkpoint, this run is fenced; otherwise the
    /// transaction coordinator aborted a transaction that stayed open too
    /// long (a broker outage), and the run restarts from the checkpoint,
    /// where the batch's sink marker says it is still to be written. Other
    /// errors are returned as they are.
    async fn judge_refused_transaction(&self, err: Error) -> Error {
        let Error::TransactionAborted { message } = err else {
            return err;
        };
        if let Some(fence) = &self.fence
            && let Err(fenced) = fence.check().await
        {
            return match fenced {
                Error::Fenced { message: by } => Error::Fenced {
                    message: format!("{message}; {by}"),
                },
                other => other,
            };
        }
        Error::Unavailable {
            what: "Kafka".into(),
            message: format!(
                "{message}; no newer run claimed the checkpoint, so the coordinator aborted the transaction"
            ),
        }
    }

    async fn run_until(
        &mut self,
        options: &RunOptions,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Stopped> {
        self.monitor.set_ready();
        info!(query = %self.name, id = %self.id, run_id = %self.run_id, sink = %self.sink.description(), "Query started.");
        let mut previous_start: Option<Instant> = None;
        let mut batch_id = self.next_batch;
        let stopped = loop {
            if *stop.borrow() {
                break Stopped::Requested;
            }
            if options
                .max_batches
                .is_some_and(|max| self.summary.batches >= max)
            {
                break Stopped::MaxBatches;
            }
            if options.drain && self.replay.is_none() {
                break Stopped::Drained;
            }
            let trigger_start = Instant::now();
            let timestamp = Utc::now();
            let mut reads = None;
            let (ranges, watermarks, replayed) = if let Some(entry) = self.replay.take() {
                info!(
                    batch_id,
                    "Running again a batch that did not commit before the last stop."
                );
                (
                    self.replay_ranges(&entry)?,
                    entry.watermarks,
                    Some(entry.epoch),
                )
            } else {
                // The second stage's watermark is read before its input's
                // ends: every row written before it moved is in the batch.
                let fed = match &mut self.feed {
                    Some(feed) => Some(
                        feed.global_at(timestamp.timestamp_millis(), self.tracker.global())
                            .await?,
                    ),
                    None => None,
                };
                let ranges = match self.ahead.take() {
                    Some(ahead) => {
                        reads = Some(ahead.reads);
                        ahead.ranges
                    }
                    None => {
                        self.monitor
                            .set_status("Getting offsets from the sources", false, true);
                        let mut ranges = Vec::with_capacity(self.sources.len());
                        for state in &mut self.sources {
                            ranges.push(state.source.plan_batch(&state.offset).await?);
                        }
                        ranges
                    }
                };
                let next =
                    fed.unwrap_or_else(|| self.tracker.global_at(timestamp.timestamp_millis()));
                let has_data = ranges.iter().any(|r| r.rows > 0);
                // As in Spark, a batch runs without new data when the
                // watermark moved and the query has state it evicts, so
                // that the windows it closes are written.
                let no_data_batch = !has_data
                    && self
                        .last_eviction
                        .is_some_and(|last| self.plan.needs_no_data_batch(next, last));
                if !has_data && !no_data_batch {
                    if self.available_now {
                        break Stopped::Completed;
                    }
                    debug!("No new data.");
                    self.monitor
                        .set_status("Waiting for data to arrive", false, false);
                    // The trigger's interval, else the sources' idle poll.
                    let wait = self.interval.unwrap_or_else(|| {
                        self.sources
                            .iter()
                            .map(|state| state.source.idle_poll())
                            .min()
                            .unwrap_or(source::DEFAULT_IDLE_POLL)
                    });
                    wait_or_stop(trigger_start + wait, stop).await;
                    continue;
                }
                let watermarks = BatchWatermarks {
                    eviction_ms: next,
                    // Spark (allowMultiple): late rows are judged by the
                    // previous batch's watermark.
                    late_events_ms: self.last_eviction.unwrap_or(next),
                };
                // The write-ahead: what this batch reads and decides with is
                // durable before it reads anything.
                if let (Some(store), Some(fence)) = (&self.checkpoint, &self.fence) {
                    fence.check().await?;
                    let sources = self
                        .sources
                        .iter()
                        .zip(&ranges)
                        .map(|(state, range)| SourceOffsets {
                            name: state.source.name().to_owned(),
                            start: range.start.clone(),
                            end: range.end.clone(),
                            detail: range.detail.clone(),
                        })
                        .collect();
                    store
                        .write_offsets(&OffsetEntry {
                            batch_id,
                            epoch: fence.epoch(),
                            timestamp_ms: timestamp.timestamp_millis(),
                            sources,
                            watermarks,
                            version: checkpoint::VERSION,
                        })
                        .await?;
                    fault::point("offsets", batch_id);
                }
                (ranges, watermarks, None)
            };
            self.tracker.set_global(watermarks.eviction_ms);
            self.monitor.set_status("Processing new data", true, true);
            let latest_offset_ms = trigger_start.elapsed().as_millis() as u64;
            // The next batch starts at once: read it while this one runs.
            let next_at_once = self.interval.is_none()
                && self.feed.is_none()
                && std::env::var(READ_AHEAD_ENV).as_deref() != Ok("off")
                && !options.drain
                && options
                    .max_batches
                    .is_none_or(|max| self.summary.batches + 1 < max);
            let mut progress = match self
                .run_batch(
                    batch_id,
                    timestamp,
                    trigger_start,
                    previous_start,
                    latest_offset_ms,
                    ranges,
                    watermarks,
                    replayed,
                    Reads {
                        this: reads,
                        next: next_at_once,
                    },
                )
                .await
            {
                Ok(progress) => progress,
                Err(err) => return Err(self.judge_refused_transaction(err).await),
            };
            self.link_stages(&mut progress);
            self.summary.batches += 1;
            self.summary.input_rows += progress.num_input_rows;
            self.summary.output_rows += progress.sink.num_output_rows;
            let late: u64 = progress
                .state_operators
                .iter()
                .map(|s| s.num_rows_dropped_by_watermark)
                .sum();
            info!(
                batch_id,
                input_rows = progress.num_input_rows,
                output_rows = progress.sink.num_output_rows,
                late_rows = late,
                watermark = progress
                    .event_time
                    .get("watermark")
                    .map_or("", String::as_str),
                input_rows_per_second = format!("{:.1}", progress.input_rows_per_second),
                processed_rows_per_second = format!("{:.1}", progress.processed_rows_per_second),
                duration_ms = progress.duration_ms["triggerExecution"],
                "Batch completed."
            );
            let watermark_seconds = watermarks.eviction_ms.map_or(0.0, |m| m as f64 / 1e3);
            self.monitor
                .record(progress, &self.source_names, watermark_seconds);
            if let Some(joined) = self.joined.take() {
                self.monitor
                    .metrics()
                    .record_rescale("first_batch", joined.elapsed().as_secs_f64());
            }
            self.monitor
                .set_status("Waiting for next trigger", true, false);
            previous_start = Some(trigger_start);
            batch_id += 1;
            if let Some(interval) = self.interval {
                wait_or_stop(trigger_start + interval, stop).await;
            }
        };
        self.monitor.set_status("Stopped", false, false);
        info!(
            query = %self.name,
            batches = self.summary.batches,
            input_rows = self.summary.input_rows,
            output_rows = self.summary.output_rows,
            stopped = ?stopped,
            "Query stopped."
        );
        Ok(stopped)
    }

    /// With two stages: the second stage's batch is told to the first;
    /// the first's progress (the query's) reports the state, the
    /// watermark and the user's sink from it.
    fn link_stages(&self, progress: &mut QueryProgress) {
        match &self.link {
            Some(Link::Writes(report)) => {
                let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
                report.state_operators = progress.state_operators.clone();
                report.watermark = progress.event_time.get("watermark").cloned();
                report.sink = Some(progress.sink.description.clone());
                report.output_rows += progress.sink.num_output_rows;
            }
            Some(Link::Reads(report)) => {
                let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
                progress.state_operators = report.state_operators.clone();
                match &report.watermark {
                    Some(w) => {
                        progress.event_time.insert("watermark".into(), w.clone());
                    }
                    None => {
                        progress.event_time.remove("watermark");
                    }
                }
                if let Some(sink) = &report.sink {
                    progress.sink = SinkProgress {
                        description: sink.clone(),
                        num_output_rows: std::mem::take(&mut report.output_rows),
                    };
                }
            }
            None => {}
        }
    }

    /// The ranges of a batch planned before a crash, as its offsets entry
    /// says.
    fn replay_ranges(&self, entry: &OffsetEntry) -> Result<Vec<BatchRange>> {
        self.sources
            .iter()
            .map(|state| {
                let offsets = offsets_of(entry, state.source.name())?;
                Ok(BatchRange {
                    start: offsets.start.clone(),
                    end: offsets.end.clone(),
                    detail: offsets.detail.clone(),
                    // Not known: the read counts every partition as left
                    // behind (see `Source::take_row_partitions`).
                    latest: Value::Null,
                    rows: 0,
                    records_behind_latest: 0,
                    metrics: Default::default(),
                })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    /// Runs batch `batch_id` over `ranges`: with `reads.this`, over the rows
    /// read ahead for them; with `reads.next`, reading the next batch ahead
    /// while this one writes its sink and commits.
    async fn run_batch(
        &mut self,
        batch_id: u64,
        timestamp: DateTime<Utc>,
        trigger_start: Instant,
        previous_start: Option<Instant>,
        latest_offset_ms: u64,
        ranges: Vec<BatchRange>,
        watermarks: BatchWatermarks,
        replayed: Option<u64>,
        reads: Reads,
    ) -> Result<QueryProgress> {
        let read_start = Instant::now();
        let cpu_start = process_cpu_ms();
        let mut inputs = Vec::with_capacity(self.sources.len());
        let mut rows_read = Vec::with_capacity(self.sources.len());
        let mut dead_letters = Vec::with_capacity(self.sources.len());
        let mut max_events = Vec::with_capacity(self.sources.len());
        let mut event_stats = EventTimeStats::default();
        let mut read = reads.this.map(Vec::into_iter);
        for (i, (state, range)) in self.sources.iter_mut().zip(&ranges).enumerate() {
            let SourceRead {
                batches,
                bad,
                partitions,
            } = match read.as_mut().and_then(Iterator::next) {
                Some(ahead) => ahead,
                None => SourceRead::from(state.source.as_mut(), range).await?,
            };
            rows_read.push(batches.iter().map(|b| b.num_rows() as u64).sum::<u64>());
            if let (Some(dead), false) = (&mut state.dead_letter, bad.is_empty()) {
                let to = dead.write(state.source.name(), batch_id, &bad).await?;
                warn!(source = state.source.name(), batch_id, records = bad.len(), to = %to, "Set malformed records aside.");
            }
            dead_letters.push(bad.len() as u64);
            let declared = self.tracker.declaration(i);
            let seen = declared.and_then(|declared| event_stats.add(&declared.column, &batches));
            let held = match (declared, &partitions) {
                (Some(declared), Some(partitions)) if self.hold_for_partitions => {
                    crate::watermark::behind_partitions_max(&declared.column, &batches, partitions)
                }
                _ => None,
            };
            max_events.push((seen, held));
            inputs.push(batches);
        }
        let get_batch_ms = read_start.elapsed().as_millis() as u64;
        let exec_start = Instant::now();
        let output = self
            .plan
            .execute(inputs, watermarks)
            .await
            .map_err(|source| Error::Execute { batch_id, source })?;
        let execute_ms = exec_start.elapsed().as_millis() as u64;
        let output_rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        // The next batch is read while this one writes its sink and commits
        // (the sources are not used until this one has committed). Not
        // while it executes: the query keeps both cores busy already.
        let mut sources = std::mem::take(&mut self.sources);
        let starts: Option<Vec<Value>> = reads
            .next
            .then(|| ranges.iter().map(|r| r.end.clone()).collect());
        let next = async {
            match starts {
                Some(starts) => read_ahead(&mut sources, starts).await,
                None => None,
            }
        };
        let this = async {
            // `replayed`: the epoch that planned the batch.
            let already = match replayed {
                Some(_) => self.sink.is_committed(batch_id).await?,
                None => false,
            };
            let (mut sink_write_ms, mut sink_commit_ms) = (0, 0);
            if already {
                info!(
                    batch_id,
                    "The sink committed this batch before the last stop: not written again."
                );
            } else {
                let write_start = Instant::now();
                self.sink
                    .prepare(batch_id, self.plan.output_schema(), &output)
                    .await?;
                sink_write_ms = write_start.elapsed().as_millis() as u64;
                fault::point("sink-data", batch_id);
                if let Some(fence) = &self.fence {
                    fence.check().await?;
                }
                let commit_start = Instant::now();
                self.sink.commit(batch_id).await?;
                sink_commit_ms = commit_start.elapsed().as_millis() as u64;
            }
            if let (Some(planned_by), Some(fence)) = (replayed, &self.fence) {
                self.sink
                    .discard_attempts(batch_id, planned_by..fence.epoch())
                    .await?;
            }
            let add_batch_ms = exec_start.elapsed().as_millis() as u64;
            let offsets_start = Instant::now();
            fault::point("sink", batch_id);
            self.plan.commit_state(batch_id).await?;
            fault::point("state", batch_id);
            let now_ms = timestamp.timestamp_millis();
            for (i, (rows, (max, held))) in rows_read.iter().zip(&max_events).enumerate() {
                self.tracker.observe(i, *rows, *max, *held, now_ms);
            }
            if let (Some(store), Some(fence)) = (&self.checkpoint, &self.fence) {
                fence.check().await?;
                store
                    .write_commit(&CommitEntry {
                        batch_id,
                        epoch: fence.epoch(),
                        run_id: self.run_id.clone(),
                        timestamp_ms: Utc::now().timestamp_millis(),
                        watermark: self.tracker.state().clone(),
                        version: checkpoint::VERSION,
                    })
                    .await?;
                fault::point("commit", batch_id);
            }
            Ok::<_, Error>((sink_write_ms, sink_commit_ms, add_batch_ms, offsets_start))
        };
        let (this, next) = tokio::join!(this, next);
        self.sources = sources;
        let (sink_write_ms, sink_commit_ms, add_batch_ms, offsets_start) = this?;
        self.ahead = next;
        self.last_eviction = Some(watermarks.eviction_ms);
        for (state, range) in self.sources.iter_mut().zip(&ranges) {
            state.offset = range.end.clone();
            state.source.commit(&range.end).await?;
        }
        if let Some(store) = &self.checkpoint {
            self.plan.clean_state(store, batch_id).await?;
            store.purge(batch_id).await?;
        }

        let commit_offsets_ms = offsets_start.elapsed().as_millis() as u64;
        let cpu_ms = cpu_start
            .zip(process_cpu_ms())
            .map(|(start, end)| (end - start).max(0.0));
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
                latest_offset: if range.latest.is_null() {
                    range.end.clone()
                } else {
                    range.latest.clone()
                },
                num_input_rows: rows,
                input_rows_per_second: per_second(rows, arrival_window),
                processed_rows_per_second: per_second(rows, elapsed),
                records_behind_latest: range.records_behind_latest,
                num_dead_letter_records: bad,
                metrics: range.metrics.clone(),
            })
            .collect();
        let mut event_time = event_stats.report();
        if self.tracker.any() || self.feed.as_ref().is_some_and(WatermarkFeed::any) {
            // As Spark: the epoch when there is no watermark yet.
            let w = watermarks.eviction_ms.unwrap_or(0);
            event_time.insert(
                "watermark".into(),
                micros_to_rfc3339(w.saturating_mul(1000)),
            );
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
                ("execute".to_owned(), execute_ms),
                ("sinkWrite".to_owned(), sink_write_ms),
                ("sinkCommit".to_owned(), sink_commit_ms),
                ("commitOffsets".to_owned(), commit_offsets_ms),
                ("triggerExecution".to_owned(), elapsed.as_millis() as u64),
            ]),
            cpu_ms,
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
