//! Streaming aggregation: the query's `GROUP BY`, kept across batches in the
//! state store.
//!
//! Each batch, DataFusion runs the aggregation's first phase over the new
//! rows (`AggregateMode::Partial`: one row of accumulator state per group).
//! The groups' stored states are read back and merged with those
//! (`AggregateMode::PartialReduce`, the accumulators' own `merge_batch`), and
//! written back. What the output mode asks for then goes through the final
//! phase (`AggregateMode::Final`: each accumulator's `evaluate`) and the rest
//! of the query (`HAVING`, the projection): in append mode the windows the
//! watermark closed (and they leave the state), in update mode the groups
//! this batch changed, in complete mode every group. Any DataFusion aggregate
//! with state and merge works this way: count, sum, avg, min, max,
//! count(DISTINCT ...), approx_distinct, stddev, ...
//!
//! State keys are the group's values in arrow's row format, after the
//! window's end when the query is windowed, so that closed windows are a
//! prefix of the key space. Values are the whole state row in row format.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::SessionContext;
use sluice_crds::OutputMode;

use crate::state::StateStore;
use crate::window::{WINDOW_END, WINDOW_START};

/// What the state did in the last batch, for `stateOperators` in progress.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateStats {
    /// Keys in state after the batch.
    pub rows_total: u64,
    /// Keys written by the batch.
    pub rows_updated: u64,
    /// Keys removed by the batch (windows the watermark closed).
    pub rows_removed: u64,
    /// Input rows (row and window pairs) dropped as later than the watermark.
    pub rows_dropped_by_watermark: u64,
    /// Memory the state store uses.
    pub memory_used_bytes: u64,
}

/// The aggregation's plumbing, found in the query's physical plan.
struct Phases {
    /// The aggregation node of the plan, replaced by the final phase.
    top: Arc<dyn ExecutionPlan>,
    /// The first phase over this batch's rows.
    partial: Arc<AggregateExec>,
}

/// What the state keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Aggregates per group (`GROUP BY`); with `evicts`, the watermark
    /// closes windows and they leave the state (append and update modes of
    /// a windowed, watermarked query; complete mode keeps all).
    Aggregate {
        /// See above.
        evicts: bool,
    },
    /// Aggregates per session window: a key's sessions that overlap are
    /// merged into one; with `evicts`, the watermark closes sessions.
    Session {
        /// See above.
        evicts: bool,
    },
    /// Rows already seen (`SELECT DISTINCT`): a row is written the first
    /// time it is seen. With `event_time` (the source's watermark column,
    /// among the distinct columns) rows older than the watermark are
    /// dropped and forgotten, as Spark's dropDuplicates with a watermark.
    Deduplicate {
        /// See above.
        event_time: Option<String>,
    },
}

/// A streaming aggregation and its state.
pub struct Aggregation {
    mode: OutputMode,
    kind: Kind,
    store: StateStore,
    last: StateStats,
}

/// Encodes the window end so that byte order is numeric order.
fn window_prefix(micros: i64) -> [u8; 8] {
    ((micros as u64) ^ (1 << 63)).to_be_bytes()
}

fn internal(message: impl Into<String>) -> DataFusionError {
    DataFusionError::Execution(message.into())
}

/// A state store error, as DataFusion's (the batch fails with it).
fn store_error(error: crate::Error) -> DataFusionError {
    internal(error.to_string())
}

/// The values of a timestamp (microsecond) column.
fn micros(batch: &RecordBatch, col: usize) -> DfResult<Vec<i64>> {
    batch
        .column(col)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .map(|a| a.values().to_vec())
        .ok_or_else(|| {
            internal(format!(
                "{} is not a timestamp",
                batch.schema().field(col).name()
            ))
        })
}

/// The aggregation's `mode` phase over `states` (rows of the partial
/// phase's schema): `PartialReduce` merges them into one state per group,
/// `Final` evaluates them.
fn phase_over(
    mode: AggregateMode,
    partial: &AggregateExec,
    states: Vec<RecordBatch>,
    input_schema: SchemaRef,
) -> DfResult<Arc<AggregateExec>> {
    Ok(Arc::new(AggregateExec::try_new(
        mode,
        partial.group_expr().as_final(),
        partial.aggr_expr().to_vec(),
        vec![None; partial.aggr_expr().len()],
        MemorySourceConfig::try_new_exec(&[states], partial.schema(), None)?,
        input_schema,
    )?))
}

impl Aggregation {
    /// An aggregation of `kind` in `mode` over `store`.
    pub fn new(mode: OutputMode, kind: Kind, store: StateStore) -> Self {
        let last = StateStats {
            rows_total: store.rows(),
            ..StateStats::default()
        };
        Aggregation {
            mode,
            kind,
            store,
            last,
        }
    }

    /// The last batch's state statistics.
    pub fn stats(&self) -> &StateStats {
        &self.last
    }

    /// Commits the state written by batch `version`.
    pub async fn commit(&mut self, version: u64) -> crate::Result<()> {
        self.store.commit(version).await
    }

    fn record(&mut self, rows_updated: u64, rows_removed: u64, dropped: u64) {
        self.last = StateStats {
            rows_total: self.store.rows(),
            rows_updated,
            rows_removed,
            rows_dropped_by_watermark: dropped,
            memory_used_bytes: self.store.memory_used_bytes(),
        };
    }

    /// Every state row (complete mode's output).
    fn all_states(&self, codec: &RowCodec) -> DfResult<RecordBatch> {
        let all = self.store.scan().map_err(store_error)?;
        codec.decode(all.iter().map(|(_, v)| v.as_slice()))
    }

    /// Runs one batch of the query whose physical plan is `plan` (planned
    /// over this batch's rows), with the watermark in effect; `late` input
    /// pairs were dropped before it.
    pub async fn execute(
        &mut self,
        ctx: &SessionContext,
        plan: Arc<dyn ExecutionPlan>,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let phases = find_phases(&plan)?;
        // This batch's state per group.
        let partial = phases.partial.clone() as Arc<dyn ExecutionPlan>;
        let new_states = collect(partial, ctx.task_ctx()).await?;
        let new_states = concat_batches(&phases.partial.schema(), &new_states)?;
        let emit = match self.kind.clone() {
            Kind::Aggregate { evicts } => {
                self.aggregate(ctx, &phases, new_states, evicts, watermark, late)
                    .await?
            }
            Kind::Session { evicts } => {
                self.sessions(ctx, &phases, new_states, evicts, watermark, late)
                    .await?
            }
            Kind::Deduplicate { event_time } => {
                self.deduplicate(&phases, new_states, event_time.as_deref(), watermark, late)?
            }
        };
        if emit.num_rows() == 0 && self.mode != OutputMode::Complete {
            return Ok(Vec::new());
        }
        finish(&phases, &plan, emit, ctx).await
    }

    /// A batch of a `GROUP BY`: merges `new_states` into the stored states
    /// of their groups; returns what the output mode writes.
    async fn aggregate(
        &mut self,
        ctx: &SessionContext,
        phases: &Phases,
        new_states: RecordBatch,
        evicts: bool,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<RecordBatch> {
        let partial = &phases.partial;
        let state_schema = partial.schema();
        let groups = partial.group_expr().expr().len();
        // Keys start with the window's end when the query is windowed.
        let window_end = state_schema
            .fields()
            .iter()
            .take(groups)
            .position(|f| f.name() == WINDOW_END);
        let keys = KeyCodec::new(&state_schema, groups, window_end)?;

        // The stored state of the same groups, merged with it.
        let mut rows_updated = 0;
        let mut touched = RecordBatch::new_empty(state_schema.clone());
        if new_states.num_rows() > 0 {
            let mut unique = keys.keys(&new_states)?;
            unique.sort_unstable();
            unique.dedup();
            let stored = self.store.get_many(&unique).map_err(store_error)?;
            let found: Vec<&[u8]> = stored.iter().flatten().map(Vec::as_slice).collect();
            let new_keys = (unique.len() - found.len()) as u64;
            let stored = keys.rows.decode(found)?;
            let reduce = phase_over(
                AggregateMode::PartialReduce,
                partial,
                vec![stored, new_states],
                partial.input_schema(),
            )?;
            touched = concat_batches(&state_schema, &collect(reduce, ctx.task_ctx()).await?)?;
            let entries: Vec<(Vec<u8>, Vec<u8>)> = keys
                .keys(&touched)?
                .into_iter()
                .zip(keys.rows.encode(&touched)?)
                .collect();
            rows_updated = entries.len() as u64;
            self.store
                .put_many(&entries, new_keys)
                .map_err(store_error)?;
        }

        // What this batch emits, and what leaves the state.
        let mut rows_removed = 0;
        let closed = match (evicts, watermark) {
            (true, Some(w)) => {
                let bound = window_prefix(w.saturating_add(1));
                let taken = self.store.take_below(&bound).map_err(store_error)?;
                rows_removed = taken.len() as u64;
                keys.rows.decode(taken.iter().map(|(_, v)| v.as_slice()))?
            }
            _ => RecordBatch::new_empty(state_schema.clone()),
        };
        let emit = match self.mode {
            OutputMode::Append => closed,
            OutputMode::Update => touched,
            OutputMode::Complete => self.all_states(&keys.rows)?,
        };
        self.record(rows_updated, rows_removed, late);
        Ok(emit)
    }

    /// A batch of a deduplication: the rows not seen before are written and
    /// remembered; with an event-time column, rows at or before the
    /// watermark are dropped, and remembered rows that old forgotten.
    fn deduplicate(
        &mut self,
        phases: &Phases,
        seen: RecordBatch,
        event_time: Option<&str>,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<RecordBatch> {
        let schema = phases.partial.schema();
        let groups = phases.partial.group_expr().expr().len();
        // Keys start with the event time, so that old rows are a key range.
        let event_time = event_time.and_then(|name| {
            schema
                .fields()
                .iter()
                .take(groups)
                .position(|f| f.name() == name)
        });
        let keys = KeyCodec::new(&schema, groups, event_time)?;
        let mut dropped = late;
        let mut fresh_rows = Vec::new();
        let mut entries = Vec::new();
        if seen.num_rows() > 0 {
            let all = keys.keys(&seen)?;
            let times = event_time.map(|i| micros(&seen, i)).transpose()?;
            let stored = self.store.get_many(&all).map_err(store_error)?;
            let mut first = std::collections::HashSet::new();
            for (row, (key, stored)) in all.into_iter().zip(stored).enumerate() {
                if let (Some(times), Some(w)) = (&times, watermark)
                    && times[row] <= w
                {
                    dropped += 1;
                    continue;
                }
                if stored.is_none() && first.insert(key.clone()) {
                    fresh_rows.push(row as u32);
                    entries.push((key, Vec::new()));
                }
            }
        }
        let fresh = take_record_batch(&seen, &UInt32Array::from(fresh_rows))?;
        let new_keys = entries.len() as u64;
        self.store
            .put_many(&entries, new_keys)
            .map_err(store_error)?;
        let rows_removed = match (event_time, watermark) {
            (Some(_), Some(w)) => self
                .store
                .take_below(&window_prefix(w.saturating_add(1)))
                .map_err(store_error)?
                .len() as u64,
            _ => 0,
        };
        self.record(new_keys, rows_removed, dropped);
        Ok(fresh)
    }

    /// A batch of a session-window aggregation. State keys are the group's
    /// values other than the window, then the session's start; a batch
    /// reads every stored session of the keys it touches, merges those that
    /// overlap (a session is `[first event, last event + gap)`), and
    /// replaces them. Closed sessions are found by a scan of the state.
    async fn sessions(
        &mut self,
        ctx: &SessionContext,
        phases: &Phases,
        new_states: RecordBatch,
        evicts: bool,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<RecordBatch> {
        let partial = &phases.partial;
        let schema = partial.schema();
        let groups = partial.group_expr().expr().len();
        let position = |name: &str| {
            schema
                .fields()
                .iter()
                .take(groups)
                .position(|f| f.name() == name)
                .ok_or_else(|| internal(format!("session windows need GROUP BY {name}")))
        };
        let (start_col, end_col) = (position(WINDOW_START)?, position(WINDOW_END)?);
        let key_cols: Vec<usize> = (0..groups)
            .filter(|i| *i != start_col && *i != end_col)
            .collect();
        let codec = SessionCodec::new(&schema, key_cols, start_col, end_col)?;
        let mut rows_updated = 0;
        let mut touched = RecordBatch::new_empty(schema.clone());
        if new_states.num_rows() > 0 {
            // Every stored session of the keys this batch touches.
            let mut prefixes = codec.prefixes(&new_states)?;
            prefixes.sort_unstable();
            prefixes.dedup();
            let mut old_keys = Vec::new();
            let mut old_values = Vec::new();
            for prefix in &prefixes {
                for (k, v) in self.store.scan_prefix(prefix).map_err(store_error)? {
                    old_keys.push(k);
                    old_values.push(v);
                }
            }
            let old = codec.rows.decode(old_values.iter().map(Vec::as_slice))?;
            let all = concat_batches(&schema, &[old, new_states])?;
            // Merge overlapping sessions of each key.
            let merged_bounds = codec.merge_bounds(&all)?;
            let all = codec.with_bounds(&all, &merged_bounds)?;
            let reduce = phase_over(
                AggregateMode::PartialReduce,
                partial,
                vec![all],
                partial.input_schema(),
            )?;
            touched = concat_batches(&schema, &collect(reduce, ctx.task_ctx()).await?)?;
            self.store.delete_many(&old_keys).map_err(store_error)?;
            let entries: Vec<(Vec<u8>, Vec<u8>)> = codec
                .keys(&touched)?
                .into_iter()
                .zip(codec.rows.encode(&touched)?)
                .collect();
            rows_updated = entries.len() as u64;
            self.store
                .put_many(&entries, rows_updated)
                .map_err(store_error)?;
        }
        // Closed sessions: those that ended at or before the watermark.
        let mut rows_removed = 0;
        let mut closed = RecordBatch::new_empty(schema.clone());
        if let (true, Some(w)) = (evicts, watermark) {
            let mut all = self.store.scan().map_err(store_error)?;
            let states = codec.rows.decode(all.iter().map(|(_, v)| v.as_slice()))?;
            let ends = micros(&states, end_col)?;
            let done: Vec<u32> = (0..states.num_rows() as u32)
                .filter(|&i| ends[i as usize] <= w)
                .collect();
            let keys: Vec<Vec<u8>> = done
                .iter()
                .map(|&i| std::mem::take(&mut all[i as usize].0))
                .collect();
            self.store.delete_many(&keys).map_err(store_error)?;
            rows_removed = keys.len() as u64;
            closed = take_record_batch(&states, &UInt32Array::from(done))?;
        }
        let emit = match self.mode {
            OutputMode::Append => closed,
            OutputMode::Update => touched,
            OutputMode::Complete => self.all_states(&codec.rows)?,
        };
        self.record(rows_updated, rows_removed, late);
        Ok(emit)
    }
}

/// Session state rows: keys (the group's values but the window, then the
/// session start) and values, and the merging of overlapping sessions.
struct SessionCodec {
    schema: SchemaRef,
    key_cols: Vec<usize>,
    start_col: usize,
    end_col: usize,
    key: RowConverter,
    rows: RowCodec,
}

impl SessionCodec {
    fn new(
        schema: &SchemaRef,
        key_cols: Vec<usize>,
        start_col: usize,
        end_col: usize,
    ) -> DfResult<Self> {
        let sort = |i: &usize| SortField::new(schema.field(*i).data_type().clone());
        Ok(SessionCodec {
            schema: schema.clone(),
            key: RowConverter::new(key_cols.iter().map(sort).collect())?,
            rows: RowCodec::new(schema)?,
            key_cols,
            start_col,
            end_col,
        })
    }

    /// The key prefix (the group's values but the window) of each row.
    fn prefixes(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let columns: Vec<ArrayRef> = self
            .key_cols
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        let rows = self.key.convert_columns(&columns)?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn keys(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let starts = micros(batch, self.start_col)?;
        Ok(self
            .prefixes(batch)?
            .into_iter()
            .zip(starts)
            .map(|(mut k, s)| {
                k.extend_from_slice(&window_prefix(s));
                k
            })
            .collect())
    }

    /// Each row's merged session: rows of one key whose sessions overlap
    /// (directly or through others) get the union's bounds.
    fn merge_bounds(&self, batch: &RecordBatch) -> DfResult<Vec<(i64, i64)>> {
        let prefixes = self.prefixes(batch)?;
        let starts = micros(batch, self.start_col)?;
        let ends = micros(batch, self.end_col)?;
        let mut order: Vec<usize> = (0..batch.num_rows()).collect();
        order.sort_by(|a, b| (&prefixes[*a], starts[*a]).cmp(&(&prefixes[*b], starts[*b])));
        let mut bounds = vec![(0, 0); batch.num_rows()];
        let mut run: Vec<usize> = Vec::new();
        let mut current: Option<(usize, i64, i64)> = None; // (first row, start, end)
        let flush = |run: &mut Vec<usize>, start: i64, end: i64, bounds: &mut Vec<(i64, i64)>| {
            for &r in run.iter() {
                bounds[r] = (start, end);
            }
            run.clear();
        };
        for &row in &order {
            match current {
                Some((first, start, end))
                    if prefixes[first] == prefixes[row] && starts[row] < end =>
                {
                    current = Some((first, start, end.max(ends[row])));
                }
                Some((_, start, end)) => {
                    flush(&mut run, start, end, &mut bounds);
                    current = Some((row, starts[row], ends[row]));
                }
                None => current = Some((row, starts[row], ends[row])),
            }
            run.push(row);
        }
        if let Some((_, start, end)) = current {
            flush(&mut run, start, end, &mut bounds);
        }
        Ok(bounds)
    }

    /// `batch` with its session bounds replaced by `bounds`.
    fn with_bounds(&self, batch: &RecordBatch, bounds: &[(i64, i64)]) -> DfResult<RecordBatch> {
        let tz = match self.schema.field(self.start_col).data_type() {
            datafusion::arrow::datatypes::DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        };
        let mut columns = batch.columns().to_vec();
        let array = |values: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone_opt(tz.clone()))
        };
        columns[self.start_col] = array(bounds.iter().map(|b| b.0).collect());
        columns[self.end_col] = array(bounds.iter().map(|b| b.1).collect());
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Runs `states` through the aggregation's final phase and the rest of the
/// query above it.
async fn finish(
    phases: &Phases,
    plan: &Arc<dyn ExecutionPlan>,
    states: RecordBatch,
    ctx: &SessionContext,
) -> DfResult<Vec<RecordBatch>> {
    let top = phases
        .top
        .downcast_ref::<AggregateExec>()
        .ok_or_else(|| internal("the aggregation node moved"))?;
    let last = phase_over(
        AggregateMode::Final,
        &phases.partial,
        vec![states],
        top.input_schema(),
    )?;
    let rest = replace(plan, &phases.top, last)?;
    collect(rest, ctx.task_ctx()).await
}

/// Finds the aggregation in `plan`, and its first phase.
fn find_phases(plan: &Arc<dyn ExecutionPlan>) -> DfResult<Phases> {
    let top = find(plan, &|p| p.is::<AggregateExec>())
        .ok_or_else(|| internal("the query has no aggregation"))?;
    let aggregate = top.downcast_ref::<AggregateExec>().expect("found by type");
    let partial = match aggregate.mode() {
        AggregateMode::Final | AggregateMode::FinalPartitioned => {
            let below = find(aggregate.input(), &|p| {
                p.downcast_ref::<AggregateExec>()
                    .is_some_and(|a| *a.mode() == AggregateMode::Partial)
            })
            .ok_or_else(|| internal("a final aggregation without its partial phase"))?;
            let below = below
                .downcast_ref::<AggregateExec>()
                .expect("found by type");
            Arc::new(below.clone())
        }
        _ => Arc::new(AggregateExec::try_new(
            AggregateMode::Partial,
            aggregate.group_expr().clone(),
            aggregate.aggr_expr().to_vec(),
            aggregate.filter_expr().to_vec(),
            aggregate.input().clone(),
            aggregate.input_schema(),
        )?),
    };
    Ok(Phases { top, partial })
}

fn find(
    plan: &Arc<dyn ExecutionPlan>,
    matches: &dyn Fn(&Arc<dyn ExecutionPlan>) -> bool,
) -> Option<Arc<dyn ExecutionPlan>> {
    if matches(plan) {
        return Some(plan.clone());
    }
    plan.children().into_iter().find_map(|c| find(c, matches))
}

/// `plan` with the node `target` replaced by `new`.
fn replace(
    plan: &Arc<dyn ExecutionPlan>,
    target: &Arc<dyn ExecutionPlan>,
    new: Arc<dyn ExecutionPlan>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    if Arc::ptr_eq(plan, target) {
        return Ok(new);
    }
    let children = plan.children();
    if children.is_empty() {
        return Ok(plan.clone());
    }
    let replaced = children
        .into_iter()
        .map(|c| replace(c, target, new.clone()))
        .collect::<DfResult<Vec<_>>>()?;
    plan.clone().replace_children(
        replaced,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

/// Whole state rows in arrow's row format, and back: the state's values.
struct RowCodec {
    schema: SchemaRef,
    converter: RowConverter,
}

impl RowCodec {
    fn new(schema: &SchemaRef) -> DfResult<Self> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        Ok(RowCodec {
            schema: schema.clone(),
            converter: RowConverter::new(fields)?,
        })
    }

    fn encode(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let rows = self.converter.convert_columns(batch.columns())?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn decode<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) -> DfResult<RecordBatch> {
        let parser = self.converter.parser();
        let rows: Vec<_> = values.into_iter().map(|v| parser.parse(v)).collect();
        if rows.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let columns: Vec<ArrayRef> = self.converter.convert_rows(rows)?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Keys of state rows: the group's values, after the column the watermark
/// removes state by (a window's end, an event time) when there is one.
struct KeyCodec {
    groups: usize,
    prefix_col: Option<usize>,
    key: RowConverter,
    rows: RowCodec,
}

impl KeyCodec {
    fn new(schema: &SchemaRef, groups: usize, prefix_col: Option<usize>) -> DfResult<Self> {
        let fields = schema
            .fields()
            .iter()
            .take(groups)
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        Ok(KeyCodec {
            groups,
            prefix_col,
            key: RowConverter::new(fields)?,
            rows: RowCodec::new(schema)?,
        })
    }

    fn keys(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let rows = self.key.convert_columns(&batch.columns()[..self.groups])?;
        let prefixes = self.prefix_col.map(|i| micros(batch, i)).transpose()?;
        Ok((0..batch.num_rows())
            .map(|i| {
                let mut key = Vec::new();
                if let Some(prefixes) = &prefixes {
                    key.extend_from_slice(&window_prefix(prefixes[i]));
                }
                key.extend_from_slice(rows.row(i).as_ref());
                key
            })
            .collect())
    }
}
