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

use datafusion::arrow::array::{ArrayRef, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::concat_batches;
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
        let task = ctx.task_ctx();
        let partial = phases.partial.clone();
        let state_schema = partial.schema();
        let groups = partial.group_expr().expr().len();
        // Keys start with the column the watermark removes state by.
        let evict_by = match &self.kind {
            Kind::Aggregate { .. } | Kind::Session { .. } => Some(WINDOW_END),
            Kind::Deduplicate { event_time } => event_time.as_deref(),
        };
        let window_end = evict_by.and_then(|name| {
            state_schema
                .fields()
                .iter()
                .take(groups)
                .position(|f| f.name() == name)
        });
        let keys = KeyCodec::new(&state_schema, groups, window_end)?;
        if let Kind::Deduplicate { .. } = self.kind {
            return self
                .deduplicate(ctx, &phases, &plan, keys, window_end, watermark, late)
                .await;
        }
        if let Kind::Session { evicts } = self.kind {
            return self
                .sessions(ctx, &phases, &plan, evicts, watermark, late)
                .await;
        }

        // 1. This batch's state per group.
        let new_states = collect(partial.clone() as Arc<dyn ExecutionPlan>, task.clone()).await?;
        let new_states = concat_batches(&state_schema, &new_states)?;

        // 2. The stored state of the same groups, merged with it.
        let mut rows_updated = 0;
        let mut touched = RecordBatch::new_empty(state_schema.clone());
        if new_states.num_rows() > 0 {
            let wanted = keys.keys(&new_states)?;
            let mut unique = wanted.clone();
            unique.sort_unstable();
            unique.dedup();
            let stored = self
                .store
                .get_many(&unique)
                .map_err(|e| internal(e.to_string()))?;
            let found: Vec<&[u8]> = stored.iter().flatten().map(Vec::as_slice).collect();
            let new_keys = (unique.len() - found.len()) as u64;
            let stored = keys.decode(&found)?;
            let reduce = Arc::new(AggregateExec::try_new(
                AggregateMode::PartialReduce,
                partial.group_expr().as_final(),
                partial.aggr_expr().to_vec(),
                vec![None; partial.aggr_expr().len()],
                MemorySourceConfig::try_new_exec(
                    &[vec![stored, new_states]],
                    state_schema.clone(),
                    None,
                )?,
                partial.input_schema(),
            )?);
            let merged = collect(reduce, task.clone()).await?;
            touched = concat_batches(&state_schema, &merged)?;
            let entries: Vec<(Vec<u8>, Vec<u8>)> = keys
                .keys(&touched)?
                .into_iter()
                .zip(keys.values(&touched)?)
                .collect();
            rows_updated = entries.len() as u64;
            self.store
                .put_many(&entries, new_keys)
                .map_err(|e| internal(e.to_string()))?;
        }

        // 3. What this batch emits, and what leaves the state.
        let mut rows_removed = 0;
        let evicts = self.kind == Kind::Aggregate { evicts: true };
        let closed = match (evicts, watermark) {
            (true, Some(w)) => {
                let bound = window_prefix(w.saturating_add(1));
                let taken = self
                    .store
                    .take_below(&bound)
                    .map_err(|e| internal(e.to_string()))?;
                rows_removed = taken.len() as u64;
                let values: Vec<&[u8]> = taken.iter().map(|(_, v)| v.as_slice()).collect();
                keys.decode(&values)?
            }
            _ => RecordBatch::new_empty(state_schema.clone()),
        };
        let emit = match self.mode {
            OutputMode::Append => closed,
            OutputMode::Update => touched,
            OutputMode::Complete => {
                let all = self.store.scan().map_err(|e| internal(e.to_string()))?;
                let values: Vec<&[u8]> = all.iter().map(|(_, v)| v.as_slice()).collect();
                keys.decode(&values)?
            }
        };
        self.last = StateStats {
            rows_total: self.store.rows(),
            rows_updated,
            rows_removed,
            rows_dropped_by_watermark: late,
            memory_used_bytes: self.store.memory_used_bytes(),
        };
        if emit.num_rows() == 0 && self.mode != OutputMode::Complete {
            return Ok(Vec::new());
        }
        finish(&phases, &plan, emit, ctx).await
    }

    /// A batch of a deduplication: the rows not seen before are written and
    /// remembered; with an event-time column, rows at or before the
    /// watermark are dropped, and remembered rows that old forgotten.
    #[allow(clippy::too_many_arguments)]
    async fn deduplicate(
        &mut self,
        ctx: &SessionContext,
        phases: &Phases,
        plan: &Arc<dyn ExecutionPlan>,
        keys: KeyCodec,
        event_time: Option<usize>,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let partial = phases.partial.clone() as Arc<dyn ExecutionPlan>;
        let schema = phases.partial.schema();
        let seen = concat_batches(&schema, &collect(partial, ctx.task_ctx()).await?)?;
        let mut dropped = late;
        let mut fresh_rows = Vec::new();
        let mut entries = Vec::new();
        if seen.num_rows() > 0 {
            let all = keys.keys(&seen)?;
            let times = event_time.and_then(|i| {
                seen.column(i)
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .map(|a| a.values().to_vec())
            });
            let stored = self
                .store
                .get_many(&all)
                .map_err(|e| internal(e.to_string()))?;
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
        let fresh = datafusion::arrow::compute::take_record_batch(
            &seen,
            &datafusion::arrow::array::UInt32Array::from(fresh_rows),
        )?;
        let new_keys = entries.len() as u64;
        self.store
            .put_many(&entries, new_keys)
            .map_err(|e| internal(e.to_string()))?;
        let rows_removed = match (event_time, watermark) {
            (Some(_), Some(w)) => self
                .store
                .take_below(&window_prefix(w.saturating_add(1)))
                .map_err(|e| internal(e.to_string()))?
                .len() as u64,
            _ => 0,
        };
        self.last = StateStats {
            rows_total: self.store.rows(),
            rows_updated: new_keys,
            rows_removed,
            rows_dropped_by_watermark: dropped,
            memory_used_bytes: self.store.memory_used_bytes(),
        };
        if fresh.num_rows() == 0 {
            return Ok(Vec::new());
        }
        finish(phases, plan, fresh, ctx).await
    }
}

impl Aggregation {
    /// A batch of a session-window aggregation. State keys are the group's
    /// values other than the window, then the session's start; a batch
    /// reads every stored session of the keys it touches, merges those that
    /// overlap (a session is `[first event, last event + gap)`), and
    /// replaces them. Closed sessions are found by a scan of the state.
    async fn sessions(
        &mut self,
        ctx: &SessionContext,
        phases: &Phases,
        plan: &Arc<dyn ExecutionPlan>,
        evicts: bool,
        watermark: Option<i64>,
        late: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let task = ctx.task_ctx();
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

        let new_states = collect(partial.clone() as Arc<dyn ExecutionPlan>, task.clone()).await?;
        let new_states = concat_batches(&schema, &new_states)?;
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
                for (k, v) in self
                    .store
                    .scan_prefix(prefix)
                    .map_err(|e| internal(e.to_string()))?
                {
                    old_keys.push(k);
                    old_values.push(v);
                }
            }
            let values: Vec<&[u8]> = old_values.iter().map(Vec::as_slice).collect();
            let old = codec.decode(&values)?;
            let all = concat_batches(&schema, &[old, new_states])?;
            // Merge overlapping sessions of each key.
            let merged_bounds = codec.merge_bounds(&all)?;
            let all = codec.with_bounds(&all, &merged_bounds)?;
            let reduce = Arc::new(AggregateExec::try_new(
                AggregateMode::PartialReduce,
                partial.group_expr().as_final(),
                partial.aggr_expr().to_vec(),
                vec![None; partial.aggr_expr().len()],
                MemorySourceConfig::try_new_exec(&[vec![all]], schema.clone(), None)?,
                partial.input_schema(),
            )?);
            touched = concat_batches(&schema, &collect(reduce, task.clone()).await?)?;
            self.store
                .delete_many(&old_keys)
                .map_err(|e| internal(e.to_string()))?;
            let entries: Vec<(Vec<u8>, Vec<u8>)> = codec
                .keys(&touched)?
                .into_iter()
                .zip(codec.values(&touched)?)
                .collect();
            rows_updated = entries.len() as u64;
            self.store
                .put_many(&entries, entries.len() as u64)
                .map_err(|e| internal(e.to_string()))?;
        }
        // Closed sessions: those that ended at or before the watermark.
        let mut rows_removed = 0;
        let mut closed = RecordBatch::new_empty(schema.clone());
        if let (true, Some(w)) = (evicts, watermark) {
            let all = self.store.scan().map_err(|e| internal(e.to_string()))?;
            let values: Vec<&[u8]> = all.iter().map(|(_, v)| v.as_slice()).collect();
            let states = codec.decode(&values)?;
            let ends = codec.column_micros(&states, end_col)?;
            let done: Vec<usize> = (0..states.num_rows()).filter(|&i| ends[i] <= w).collect();
            let keys: Vec<Vec<u8>> = done.iter().map(|&i| all[i].0.clone()).collect();
            self.store
                .delete_many(&keys)
                .map_err(|e| internal(e.to_string()))?;
            rows_removed = keys.len() as u64;
            closed = datafusion::arrow::compute::take_record_batch(
                &states,
                &datafusion::arrow::array::UInt32Array::from(
                    done.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                ),
            )?;
        }
        let emit = match self.mode {
            OutputMode::Append => closed,
            OutputMode::Update => touched,
            OutputMode::Complete => {
                let all = self.store.scan().map_err(|e| internal(e.to_string()))?;
                let values: Vec<&[u8]> = all.iter().map(|(_, v)| v.as_slice()).collect();
                codec.decode(&values)?
            }
        };
        self.last = StateStats {
            rows_total: self.store.rows(),
            rows_updated,
            rows_removed,
            rows_dropped_by_watermark: late,
            memory_used_bytes: self.store.memory_used_bytes(),
        };
        if emit.num_rows() == 0 && self.mode != OutputMode::Complete {
            return Ok(Vec::new());
        }
        finish(phases, plan, emit, ctx).await
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
    value: RowConverter,
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
            value: RowConverter::new((0..schema.fields().len()).map(|i| sort(&i)).collect())?,
            key_cols,
            start_col,
            end_col,
        })
    }

    fn column_micros(&self, batch: &RecordBatch, col: usize) -> DfResult<Vec<i64>> {
        batch
            .column(col)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .map(|a| a.values().to_vec())
            .ok_or_else(|| internal("a session bound is not a timestamp"))
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
        let starts = self.column_micros(batch, self.start_col)?;
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

    fn values(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let rows = self.value.convert_columns(batch.columns())?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn decode(&self, values: &[&[u8]]) -> DfResult<RecordBatch> {
        if values.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let parser = self.value.parser();
        let columns = self
            .value
            .convert_rows(values.iter().map(|v| parser.parse(v)))?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Each row's merged session: rows of one key whose sessions overlap
    /// (directly or through others) get the union's bounds.
    fn merge_bounds(&self, batch: &RecordBatch) -> DfResult<Vec<(i64, i64)>> {
        let prefixes = self.prefixes(batch)?;
        let starts = self.column_micros(batch, self.start_col)?;
        let ends = self.column_micros(batch, self.end_col)?;
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
    let partial = &phases.partial;
    let top = phases
        .top
        .downcast_ref::<AggregateExec>()
        .ok_or_else(|| internal("the aggregation node moved"))?;
    let schema = partial.schema();
    let last = Arc::new(AggregateExec::try_new(
        AggregateMode::Final,
        partial.group_expr().as_final(),
        partial.aggr_expr().to_vec(),
        vec![None; partial.aggr_expr().len()],
        MemorySourceConfig::try_new_exec(&[vec![states]], schema, None)?,
        top.input_schema(),
    )?);
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

/// Turns state rows into keys and values and back.
struct KeyCodec {
    schema: SchemaRef,
    groups: usize,
    window_end: Option<usize>,
    key: RowConverter,
    value: RowConverter,
}

impl KeyCodec {
    fn new(schema: &SchemaRef, groups: usize, window_end: Option<usize>) -> DfResult<Self> {
        let fields = |n: usize| -> Vec<SortField> {
            schema
                .fields()
                .iter()
                .take(n)
                .map(|f| SortField::new(f.data_type().clone()))
                .collect()
        };
        Ok(KeyCodec {
            schema: schema.clone(),
            groups,
            window_end,
            key: RowConverter::new(fields(groups))?,
            value: RowConverter::new(fields(schema.fields().len()))?,
        })
    }

    fn keys(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let rows = self.key.convert_columns(&batch.columns()[..self.groups])?;
        let ends = self.window_end.map(|i| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .map(|a| a.values().to_vec())
        });
        let ends = match ends {
            Some(Some(ends)) => Some(ends),
            Some(None) => return Err(internal("window_end is not a timestamp")),
            None => None,
        };
        Ok((0..batch.num_rows())
            .map(|i| {
                let mut key = Vec::new();
                if let Some(ends) = &ends {
                    key.extend_from_slice(&window_prefix(ends[i]));
                }
                key.extend_from_slice(rows.row(i).as_ref());
                key
            })
            .collect())
    }

    fn values(&self, batch: &RecordBatch) -> DfResult<Vec<Vec<u8>>> {
        let rows = self.value.convert_columns(batch.columns())?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn decode(&self, values: &[&[u8]]) -> DfResult<RecordBatch> {
        if values.is_empty() {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        let parser = self.value.parser();
        let rows = values.iter().map(|v| parser.parse(v));
        let columns: Vec<ArrayRef> = self.value.convert_rows(rows)?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}
