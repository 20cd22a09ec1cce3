//! Stateful operators: the query's `GROUP BY` (over windows or not), session
//! windows and deduplication, kept across batches in the state store.
//!
//! Each batch, DataFusion runs the aggregation's first phase over the new
//! rows (`AggregateMode::Partial`: one row of accumulator state per group).
//! The operator merges those with the groups' stored states
//! (`AggregateMode::PartialReduce`, the accumulators' own `merge_batch`),
//! writes them back, and returns the state rows its output mode writes; they
//! go through the final phase (`AggregateMode::Final`: each accumulator's
//! `evaluate`) and the rest of the query (`HAVING`, the projection). Any
//! DataFusion aggregate with state and merge works this way: count, sum,
//! avg, min, max, count(DISTINCT ...), approx_distinct, stddev, ...
//!
//! One file per operator (`aggregate`, `session`, `dedup`), behind
//! [`StatefulOperator`]; `codec` holds their keys and values.

pub mod aggregate;
pub mod codec;
mod dedup;
mod session;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, collect};
use datafusion::prelude::SessionContext;
use sluice_crds::OutputMode;

use crate::state::StateStore;
use crate::watermark::BatchWatermarks;
use crate::window::{WINDOW_END, WINDOW_START};

/// The name a pane's start has in the state's schema.
pub const PANE_START: &str = "pane_start";
/// The name a pane's end has in the state's schema.
pub const PANE_END: &str = "pane_end";

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

/// What the state keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Aggregates per group (`GROUP BY`); with `evicts`, the watermark
    /// closes windows and they leave the state (append and update modes of
    /// a windowed, watermarked query; complete mode keeps all).
    Aggregate {
        /// See above.
        evicts: bool,
        /// A hop window's aggregation kept as panes (the state's window
        /// columns are named `pane_start` and `pane_end`).
        panes: Option<crate::window::Panes>,
    },
    /// Aggregates per session window: a key's sessions that overlap or
    /// touch are merged into one; with `evicts`, the watermark closes
    /// sessions.
    Session {
        /// See above.
        evicts: bool,
    },
    /// Rows already seen (`SELECT DISTINCT`): a row is written the first
    /// time it is seen. With `event_time` (the position, among the
    /// distinct columns, of the one derived from a source's watermark
    /// column) rows older than the watermark are dropped and forgotten, as
    /// Spark's dropDuplicates with a watermark.
    Deduplicate {
        /// See above.
        event_time: Option<usize>,
    },
}

/// The codec of the state `kind` keeps for `phases` (what decides each
/// key's state partition); the repartition topic's partitioner is the
/// state's own codec, so that a row goes to the partition its key is kept
/// in.
pub fn codec_of(kind: &Kind, phases: &Phases) -> DfResult<codec::Codec> {
    Ok(match kind {
        Kind::Aggregate { .. } => aggregate::codec_of(phases),
        Kind::Session { .. } => session::codec_of(phases)?,
        Kind::Deduplicate { event_time } => dedup::codec_of(phases, *event_time),
    })
}

/// The aggregation's plumbing, found in the query's physical plan.
pub struct Phases {
    /// The aggregation node of the plan, replaced by the final phase.
    top: Arc<dyn ExecutionPlan>,
    /// The first phase over this batch's rows.
    pub partial: Arc<AggregateExec>,
}

impl Phases {
    /// The schema of the partial phase's rows: what the state keeps.
    pub fn state_schema(&self) -> SchemaRef {
        self.partial.schema()
    }

    /// How many of its first columns are the grouping columns.
    pub fn groups(&self) -> usize {
        self.partial.group_expr().expr().len()
    }

    /// The position of the grouping column named `name`.
    pub fn group_position(&self, name: &str) -> Option<usize> {
        self.state_schema()
            .fields()
            .iter()
            .take(self.groups())
            .position(|f| f.name() == name)
    }
}

/// What one batch hands an operator.
pub struct BatchInput<'a> {
    /// The session, for the merge phase.
    pub ctx: &'a SessionContext,
    /// The aggregation's phases.
    pub phases: &'a Phases,
    /// The batch's rows, through the first phase: one state row per group.
    pub new_states: RecordBatch,
    /// The watermarks the batch runs with.
    pub watermarks: BatchWatermarks,
    /// Input (row, window) pairs found late before the operator (by the
    /// window table functions).
    pub late: u64,
}

/// What an operator's batch did.
pub struct BatchOutput {
    /// The state rows the output mode writes, in the partial phase's schema.
    pub emit: RecordBatch,
    /// Keys written.
    pub rows_updated: u64,
    /// Keys removed.
    pub rows_removed: u64,
    /// Input rows dropped as late.
    pub rows_dropped: u64,
}

/// A stateful operator: merges each batch into its state.
#[async_trait]
pub trait StatefulOperator: Send + Sync {
    /// Runs one batch over `store`.
    async fn process(
        &mut self,
        store: &mut StateStore,
        input: BatchInput<'_>,
    ) -> DfResult<BatchOutput>;
}

/// Each row's late-events watermark (microseconds) for a batch whose own is
/// `late`: its state partition's, where a partition seeded from another
/// replica still has windows to write below `late` (see
/// [`StateStore::late_by_partition`]); `None` when every row's is `late`.
/// `rows` are state rows (`codec`'s).
pub(crate) fn lates_of_rows(
    codec: &codec::Codec,
    store: &StateStore,
    rows: &RecordBatch,
    late: i64,
) -> DfResult<Option<Vec<i64>>> {
    let Some(by_partition) = store.late_by_partition(late) else {
        return Ok(None);
    };
    let groups = codec.groups_of(rows)?;
    let partitions =
        codec.partitions_of(rows, &groups, store.partitioning(), store.partitions())?;
    Ok(Some(
        partitions.into_iter().map(|p| by_partition[p]).collect(),
    ))
}

/// A query's stateful operator with its state.
pub struct Stateful {
    mode: OutputMode,
    operator: Box<dyn StatefulOperator>,
    store: StateStore,
    last: StateStats,
}

fn internal(message: impl Into<String>) -> DataFusionError {
    DataFusionError::Execution(message.into())
}

/// A state store error, as DataFusion's (the batch fails with it).
pub(crate) fn store_error(error: crate::Error) -> DataFusionError {
    internal(error.to_string())
}

/// The aggregation's `mode` phase over `states` (rows of the partial
/// phase's schema): `PartialReduce` merges them into one state per group,
/// `Final` evaluates them. Many rows are hash-partitioned by group over the
/// cores first, so that each core merges its own groups.
pub(crate) fn phase_over(
    mode: AggregateMode,
    partial: &AggregateExec,
    states: Vec<RecordBatch>,
    input_schema: SchemaRef,
) -> DfResult<Arc<AggregateExec>> {
    let rows: usize = states.iter().map(RecordBatch::num_rows).sum();
    let cores = crate::state::cores();
    let source = MemorySourceConfig::try_new_exec(&[states], partial.schema(), None)?;
    let (input, mode): (Arc<dyn ExecutionPlan>, _) = if rows >= PARALLEL_ROWS && cores > 1 {
        let schema = partial.schema();
        let groups = (0..partial.group_expr().expr().len())
            .map(|i| Arc::new(Column::new(schema.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
            .collect();
        let mode = match mode {
            AggregateMode::Final => AggregateMode::FinalPartitioned,
            other => other,
        };
        (
            Arc::new(RepartitionExec::try_new(
                source,
                Partitioning::Hash(groups, cores),
            )?),
            mode,
        )
    } else {
        (source, mode)
    };
    Ok(Arc::new(AggregateExec::try_new(
        mode,
        partial.group_expr().as_final(),
        partial.aggr_expr().to_vec(),
        vec![None; partial.aggr_expr().len()],
        input,
        input_schema,
    )?))
}

/// From this many state rows, merges run over the cores.
const PARALLEL_ROWS: usize = 8192;

/// Merges `states` (several rows per group possible) into one state row
/// per group.
pub(crate) async fn merge(
    ctx: &SessionContext,
    partial: &AggregateExec,
    states: Vec<RecordBatch>,
) -> DfResult<RecordBatch> {
    let reduce = phase_over(
        AggregateMode::PartialReduce,
        partial,
        states,
        partial.input_schema(),
    )?;
    concat_batches(&partial.schema(), &collect(reduce, ctx.task_ctx()).await?).map_err(Into::into)
}

impl Stateful {
    /// The stateful operator of `kind` for the query whose physical plan is
    /// `plan` (planned over empty batches), over `store`; checks the
    /// restored state's schema against the query's.
    pub fn new(
        mode: OutputMode,
        kind: Kind,
        plan: &Arc<dyn ExecutionPlan>,
        mut store: StateStore,
    ) -> crate::Result<Self> {
        let phases = find_phases(plan).map_err(|e| crate::Error::Plan(e.to_string()))?;
        // As `aggregate::Aggregate::new` decides.
        let keeps_panes = matches!(kind, Kind::Aggregate { panes: Some(_), .. })
            && mode != OutputMode::Complete
            && phases.group_position(WINDOW_START).is_some()
            && phases.group_position(WINDOW_END).is_some();
        let (operator, codec): (Box<dyn StatefulOperator>, codec::Codec) = match kind {
            Kind::Aggregate { evicts, panes } => {
                let (op, codec) = aggregate::Aggregate::new(&phases, mode, evicts, panes);
                (Box::new(op), codec)
            }
            Kind::Session { evicts } => {
                let (op, codec) = session::Session::new(&phases, mode, evicts)
                    .map_err(|e| crate::Error::Plan(e.to_string()))?;
                (Box::new(op), codec)
            }
            Kind::Deduplicate { event_time } => {
                let (op, codec) = dedup::Deduplicate::new(&phases, event_time);
                (Box::new(op), codec)
            }
        };
        let mut schema = codec.state_schema()?;
        if keeps_panes {
            // Another layout than windows: a version written with one is
            // never read as the other.
            for column in schema.keys.iter_mut().chain(schema.values.iter_mut()) {
                column.name = match column.name.as_str() {
                    WINDOW_START => PANE_START.to_owned(),
                    WINDOW_END => PANE_END.to_owned(),
                    _ => continue,
                };
            }
        }
        store.set_schema(schema)?;
        codec.check_partitioning(store.partitioning())?;
        let last = StateStats {
            rows_total: store.rows(),
            ..StateStats::default()
        };
        Ok(Stateful {
            mode,
            operator,
            store,
            last,
        })
    }

    /// The last batch's state statistics.
    pub fn stats(&self) -> &StateStats {
        &self.last
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The state store, to commit it.
    pub fn store_mut(&mut self) -> &mut StateStore {
        &mut self.store
    }

    /// Runs one batch of the query whose physical plan is `plan` (planned
    /// over this batch's rows), with its watermarks; `late` input pairs were
    /// dropped before it.
    pub async fn execute(
        &mut self,
        ctx: &SessionContext,
        plan: Arc<dyn ExecutionPlan>,
        watermarks: BatchWatermarks,
        late: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let phases = find_phases(&plan)?;
        // This batch's state per group.
        let partial = phases.partial.clone() as Arc<dyn ExecutionPlan>;
        let new_states = collect(partial, ctx.task_ctx()).await?;
        let new_states = concat_batches(&phases.partial.schema(), &new_states)?;
        self.process(ctx, &phases, &plan, new_states, watermarks, late)
            .await
    }

    /// Runs one batch whose first phase ran elsewhere (on the replicas that
    /// read the sources; see [`crate::shuffle`]): `states` are rows of the
    /// partial phase's schema, several per group possible. A row of a
    /// window that ended at or before the batch's late-events watermark is
    /// late: dropped and counted (the replicas that ran the first phase
    /// drop nothing, since the watermark is the minimum over them all).
    pub async fn execute_states(
        &mut self,
        ctx: &SessionContext,
        plan: Arc<dyn ExecutionPlan>,
        states: Vec<RecordBatch>,
        watermarks: BatchWatermarks,
        late_after: Option<LateAfter>,
    ) -> DfResult<Vec<RecordBatch>> {
        let phases = find_phases(&plan)?;
        let schema = phases.partial.schema();
        let mut columns_fixed = Vec::with_capacity(states.len());
        for batch in states {
            // The decoded rows, in the phase's own schema (names, types,
            // nullability and metadata exactly).
            columns_fixed.push(RecordBatch::try_new(
                schema.clone(),
                batch.columns().to_vec(),
            )?);
        }
        let mut new_states = concat_batches(&schema, &columns_fixed)?;
        let mut late = 0;
        if let (Some(rule), Some(w)) = (late_after, watermarks.late_micros()) {
            // Judged by the generation's watermark, also in a partition
            // seeded from a replica that stopped lower (see
            // [`StateStore::late_by_partition`]): as late as a one-replica
            // run would judge them.
            let (kept, dropped) = rule.drop_late(&new_states, w)?;
            new_states = kept;
            late = dropped;
        }
        self.process(ctx, &phases, &plan, new_states, watermarks, late)
            .await
    }

    async fn process(
        &mut self,
        ctx: &SessionContext,
        phases: &Phases,
        plan: &Arc<dyn ExecutionPlan>,
        new_states: RecordBatch,
        watermarks: BatchWatermarks,
        late: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let out = self
            .operator
            .process(
                &mut self.store,
                BatchInput {
                    ctx,
                    phases,
                    new_states,
                    watermarks,
                    late,
                },
            )
            .await?;
        self.last = StateStats {
            rows_total: self.store.rows(),
            rows_updated: out.rows_updated,
            rows_removed: out.rows_removed,
            rows_dropped_by_watermark: out.rows_dropped,
            memory_used_bytes: self.store.memory_used_bytes(),
        };
        if out.emit.num_rows() == 0 && self.mode != OutputMode::Complete {
            return Ok(Vec::new());
        }
        finish(phases, plan, out.emit, ctx).await
    }
}

/// Which first-phase rows are late, for a windowed aggregation whose first
/// phase ran on other replicas: a row is late when every window it counts
/// in ended at or before the late-events watermark (as the window table
/// functions judge input rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LateAfter {
    /// The position of `window_start` among the state's columns.
    pub window_start: usize,
    /// The position of `window_end`.
    pub window_end: usize,
    /// With panes, the rows' window columns are a pane's.
    pub panes: Option<crate::window::Panes>,
}

impl LateAfter {
    /// `states` without their late rows, and how many were dropped.
    pub fn drop_late(&self, states: &RecordBatch, watermark: i64) -> DfResult<(RecordBatch, u64)> {
        let ends: Vec<i64> = match self.panes {
            Some(panes) => codec::micros(states, self.window_start)?
                .into_iter()
                .map(|start| panes.window_ends(start).next().unwrap_or(start))
                .collect(),
            None => codec::micros(states, self.window_end)?,
        };
        let keep: Vec<u32> = ends
            .iter()
            .enumerate()
            .filter(|(_, end)| **end > watermark)
            .map(|(i, _)| i as u32)
            .collect();
        let dropped = (ends.len() - keep.len()) as u64;
        if dropped == 0 {
            return Ok((states.clone(), 0));
        }
        let kept = datafusion::arrow::compute::take_record_batch(
            states,
            &datafusion::arrow::array::UInt32Array::from(keep),
        )?;
        Ok((kept, dropped))
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
pub fn find_phases(plan: &Arc<dyn ExecutionPlan>) -> DfResult<Phases> {
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
