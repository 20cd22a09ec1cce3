//! Planning: the query's SQL is planned once, against tables whose contents
//! are swapped for each batch's rows, and checked to be something this engine
//! can run on a stream.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::JoinType;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{
    CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionConfig, SessionContext,
};
use sluice_crds::progress::StateOperatorProgress;
use sluice_crds::{Format, OutputMode, StaticTable};

use crate::checkpoint::Checkpoint;
use crate::operators::{Kind, Stateful};
use crate::state::{PartitionRef, StateStore};
use crate::storage::Storage;
use crate::watermark::BatchWatermarks;
use crate::window::{self, WINDOW_END, WINDOW_START, WindowFunction};
use crate::{Error, Result};

/// A table that holds the current batch's rows of one source.
#[derive(Debug)]
struct BatchTable {
    schema: SchemaRef,
    current: RwLock<Arc<MemTable>>,
}

impl BatchTable {
    fn new(schema: SchemaRef) -> datafusion::error::Result<Self> {
        let empty = MemTable::try_new(schema.clone(), vec![vec![]])?;
        Ok(Self {
            schema,
            current: RwLock::new(Arc::new(empty)),
        })
    }

    fn replace(&self, partitions: Vec<Vec<RecordBatch>>) -> datafusion::error::Result<()> {
        let table = MemTable::try_new(self.schema.clone(), partitions)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }
}

#[async_trait]
impl TableProvider for BatchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let table = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        table.scan(state, projection, filters, limit).await
    }
}

/// A window table function's table, filled from its source each batch.
struct WindowTable {
    function: WindowFunction,
    source: usize,
    schema: SchemaRef,
    table: Arc<BatchTable>,
}

/// What kind of stateful query this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aggregated {
    /// Grouped by an event-time window whose source has a watermark on the
    /// window's column: the watermark closes windows.
    pub windowed_with_watermark: bool,
    /// `SELECT DISTINCT`: rows are written the first time they are seen.
    pub deduplicates: bool,
}

/// Which part of the query a plan runs. A stateful query on several
/// replicas runs in two stages (see [`crate::shuffle`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// All of it.
    #[default]
    Whole,
    /// Up to the aggregation's first phase, over the sources' rows: its
    /// result is the partial states, written to the repartition topic.
    Shuffle,
    /// From the partial states (read from the repartition topic) on: the
    /// merge with the state, the final phase and the rest of the query.
    Merge,
}

/// Where the state's partition of each partial-state row is decided: by
/// the state's own codec, so that a row goes to the partition the state
/// keeps its key in.
#[derive(Clone)]
pub struct Partitioner {
    codec: crate::operators::codec::Codec,
}

impl Partitioner {
    /// Each row's state partition, of `partitions`.
    pub fn partitions(
        &self,
        batch: &RecordBatch,
        partitions: usize,
    ) -> std::result::Result<Vec<usize>, DataFusionError> {
        Ok(self
            .codec
            .groups_of(batch)?
            .iter()
            .map(|group| StateStore::partition_in(group, partitions))
            .collect())
    }
}

/// The query, planned once and run over each batch.
pub struct QueryPlan {
    stage: Stage,
    /// With a stage: the partial phase's schema, what goes between them.
    partial_schema: Option<SchemaRef>,
    partitioner: Option<Partitioner>,
    /// How the state's keys are partitioned.
    partitioning: crate::state::Partitioning,
    late_after: Option<crate::operators::LateAfter>,
    ctx: SessionContext,
    plan: LogicalPlan,
    tables: Vec<(String, Arc<BatchTable>)>,
    windows: Vec<WindowTable>,
    output_schema: SchemaRef,
    partitions: usize,
    output_mode: OutputMode,
    aggregated: Option<Aggregated>,
    stateful: Option<Stateful>,
    /// For `SELECT DISTINCT`: the position of the distinct column that is
    /// a source's watermark column (by lineage: aliases do not hide it).
    dedup_event_time: Option<usize>,
    /// The hop window's panes, when the aggregation keeps its state per
    /// pane (see [`window::Panes`]).
    panes: Option<window::Panes>,
}

impl QueryPlan {
    /// Plans `sql` over sources with these names and schemas, and checks that
    /// it can run on a stream in `output_mode`.
    /// `watermarks` holds each source's watermark column, if it has one;
    /// `tables` are the static tables the query may join the sources with.
    pub async fn new(
        sql: &str,
        sources: &[(String, SchemaRef)],
        watermarks: &[Option<String>],
        static_tables: &[StaticTable],
        output_mode: OutputMode,
    ) -> Result<Self> {
        let config = SessionConfig::new().with_information_schema(false);
        let partitions = config.target_partitions();
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .build();
        // count(DISTINCT x) stays one aggregation with mergeable state
        // instead of being rewritten into two (which could not be kept
        // across batches).
        let rules = state
            .optimizers()
            .iter()
            .filter(|r| r.name() != "single_distinct_aggregation_to_group_by")
            .cloned()
            .collect();
        let state = SessionStateBuilder::new_from_existing(state)
            .with_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        let mut tables = Vec::new();
        for (name, schema) in sources {
            let table = Arc::new(BatchTable::new(schema.clone()).map_err(plan_error)?);
            ctx.register_table(name.as_str(), table.clone())
                .map_err(plan_error)?;
            tables.push((name.clone(), table));
        }
        for (i, table) in static_tables.iter().enumerate() {
            register_static(&ctx, table)
                .await
                .map_err(|e| Error::Unsupported {
                    path: format!("spec.tables[{i}]"),
                    message: format!("cannot read {}: {}", table.path, e.strip_backtrace()),
                })?;
        }
        let names: Vec<String> = sources.iter().map(|(n, _)| n.clone()).collect();
        let (sql, functions) = window::rewrite(sql, &names)?;
        let mut windows = Vec::new();
        for function in functions {
            let source = names
                .iter()
                .position(|n| *n == function.source)
                .expect("rewrite checks the source");
            let schema = function.schema(&sources[source].1)?;
            let table = Arc::new(BatchTable::new(schema.clone()).map_err(plan_error)?);
            ctx.register_table(function.table.as_str(), table.clone())
                .map_err(plan_error)?;
            windows.push(WindowTable {
                function,
                source,
                schema,
                table,
            });
        }
        let df = ctx.sql(&sql).await.map_err(plan_error)?;
        let plan = df.logical_plan().clone();
        let watermarked = windows.iter().any(|w| {
            watermarks.get(w.source).cloned().flatten().as_deref()
                == Some(w.function.column.as_str())
        });
        let mut streams: Vec<String> = names.clone();
        streams.extend(windows.iter().map(|w| w.function.table.clone()));
        let aggregated = check_streamable(&plan, output_mode, watermarked, &streams)?;
        if aggregated.is_some_and(|a| !a.deduplicates)
            && output_mode == OutputMode::Update
            && windows.iter().any(|w| w.function.session)
        {
            // Spark's rule (STREAMING_OUTPUT_MODE.UNSUPPORTED_OPERATION).
            return Err(Error::Unsupported {
                path: "spec.outputMode".into(),
                message: "update is not supported for session window aggregations (as in Spark): use append or complete".into(),
            });
        }
        let output_schema = Arc::new(df.schema().as_arrow().clone());
        let watermark_columns: Vec<&str> =
            watermarks.iter().flatten().map(String::as_str).collect();
        let dedup_event_time = distinct_event_time(&plan, &watermark_columns);
        let panes = match windows.as_slice() {
            [only]
                if aggregated.is_some_and(|a| !a.deduplicates)
                    && output_mode != OutputMode::Complete
                    && std::env::var(PANES_ENV).as_deref() != Ok("off")
                    && groups_by_window_only(&plan) =>
            {
                only.function.panes()
            }
            _ => None,
        };
        Ok(Self {
            stage: Stage::Whole,
            partial_schema: None,
            partitioner: None,
            partitioning: crate::state::Partitioning::Hash,
            late_after: None,
            panes,
            dedup_event_time,
            ctx,
            plan,
            tables,
            windows,
            output_schema,
            partitions,
            output_mode,
            aggregated,
            stateful: None,
        })
    }

    /// Whether the query aggregates, and so keeps state.
    pub fn aggregated(&self) -> Option<Aggregated> {
        self.aggregated
    }

    /// Why this query cannot run in two stages on several replicas, if it
    /// cannot (the field to blame and the reason).
    pub fn two_stages_refused(&self) -> Option<(&'static str, String)> {
        self.aggregated?;
        if self.output_mode == OutputMode::Complete {
            return Some((
                "spec.outputMode",
                "complete mode writes the whole result every batch, which several replicas each holding a part of the state cannot: use append or update, or run it on 1 replica".into(),
            ));
        }
        None
    }

    /// Makes this plan run one `stage` of the query (see [`Stage`]).
    pub async fn set_stage(&mut self, stage: Stage) -> Result<()> {
        if stage == Stage::Whole {
            self.stage = stage;
            return Ok(());
        }
        if let Some((path, message)) = self.two_stages_refused() {
            return Err(Error::Unsupported {
                path: path.into(),
                message,
            });
        }
        let Some(shape) = self.aggregated else {
            return Err(Error::Plan(
                "a stateless query runs whole on each replica, not in stages".into(),
            ));
        };
        let physical = self
            .ctx
            .state()
            .create_physical_plan(&self.plan)
            .await
            .map_err(plan_error)?;
        let phases =
            crate::operators::find_phases(&physical).map_err(|e| Error::Plan(e.to_string()))?;
        let window_start = phases.group_position(WINDOW_START);
        let window_end = phases.group_position(WINDOW_END);
        let codec = crate::operators::codec_of(&self.state_kind(shape), &phases)
            .map_err(|e| Error::Plan(e.to_string()))?;
        // A deduplication judges late rows by its event time itself, in
        // the second stage as in the whole query.
        let evicts = shape.windowed_with_watermark && !shape.deduplicates;
        self.late_after = match (window_start, window_end) {
            (Some(window_start), Some(window_end)) if evicts => Some(crate::operators::LateAfter {
                window_start,
                window_end,
                panes: self.panes,
            }),
            _ => None,
        };
        self.partial_schema = Some(phases.state_schema());
        self.partitioner = Some(Partitioner { codec });
        if stage == Stage::Shuffle {
            self.output_schema = phases.state_schema();
        }
        self.stage = stage;
        Ok(())
    }

    /// With a stage: the partial phase's schema (the rows between stages).
    pub fn partial_schema(&self) -> Option<&SchemaRef> {
        self.partial_schema.as_ref()
    }

    /// With a stage: what decides each partial-state row's partition.
    pub fn partitioner(&self) -> Option<&Partitioner> {
        self.partitioner.as_ref()
    }

    /// Partitions the state's keys as `partitioning` says (before
    /// [`QueryPlan::open_state`]); a stateful query whose keys it cannot
    /// place is refused when the state opens.
    pub fn set_partitioning(&mut self, partitioning: crate::state::Partitioning) {
        self.partitioning = partitioning;
    }

    /// Opens the query's state (for a stateful query) for the run `epoch`,
    /// restored from version `restore` of the checkpoint `remote` (or, for
    /// a replica's first run, from `seeds`: its partitions' versions under
    /// the previous replicas' checkpoints), and checks that the stored
    /// state has the schema this query keeps.
    pub async fn open_state(
        &mut self,
        partitions: u32,
        local: &std::path::Path,
        remote: Option<Storage>,
        restore: Option<PartitionRef>,
        seeds: &[crate::state::Seed],
        epoch: u64,
    ) -> Result<()> {
        let Some(shape) = self.aggregated else {
            return Ok(());
        };
        if self.stage == Stage::Shuffle {
            return Ok(());
        }
        let mut store = StateStore::open_seeded(
            "aggregate",
            partitions,
            local,
            remote,
            restore,
            seeds,
            epoch,
        )
        .await?;
        store.set_partitioning(self.partitioning.clone())?;
        if self.panes.is_some()
            && store
                .restored_schema()
                .is_some_and(|s| s.keys.iter().any(|c| c.name == WINDOW_END))
        {
            // A checkpoint written before panes: it goes on with windows.
            if self.stage != Stage::Whole {
                // The replicas running the first phase would send panes.
                return Err(Error::Unsupported {
                    path: "spec.replicas".into(),
                    message: "the checkpoint's state keeps windows, written before panes: it cannot be repartitioned to several replicas, which send panes; run it on 1 replica".into(),
                });
            }
            tracing::info!("The restored state keeps windows, not panes: the query goes on so.");
            self.panes = None;
        }
        let kind = self.state_kind(shape);
        // The plan over empty batches: the state's schema.
        let physical = self
            .ctx
            .state()
            .create_physical_plan(&self.plan)
            .await
            .map_err(plan_error)?;
        self.stateful = Some(Stateful::new(self.output_mode, kind, &physical, store)?);
        Ok(())
    }

    /// What the state of a query of `shape` keeps.
    fn state_kind(&self, shape: Aggregated) -> Kind {
        let evicts = shape.windowed_with_watermark && self.output_mode != OutputMode::Complete;
        if shape.deduplicates {
            Kind::Deduplicate {
                event_time: self.dedup_event_time,
            }
        } else if self.windows.iter().any(|w| w.function.session) {
            Kind::Session { evicts }
        } else {
            Kind::Aggregate {
                evicts,
                panes: self.panes,
            }
        }
    }

    /// Commits the state batch `batch_id` wrote.
    pub async fn commit_state(&mut self, batch_id: u64) -> Result<()> {
        match &mut self.stateful {
            Some(s) => s.store_mut().commit(batch_id).await,
            None => Ok(()),
        }
    }

    /// After batch `committed` committed: deletes state no kept version
    /// needs (now and then).
    pub async fn clean_state(&mut self, checkpoint: &Checkpoint, committed: u64) -> Result<()> {
        match &mut self.stateful {
            Some(s) => s.store_mut().clean(checkpoint, committed).await,
            None => Ok(()),
        }
    }

    /// Whether a batch without new data must run because the watermark
    /// moved from `last` (the last batch's eviction watermark) to `next`:
    /// when the query has state the watermark evicts (Spark's
    /// `shouldRunAnotherBatch`: aggregations in append or update mode,
    /// deduplication).
    pub fn needs_no_data_batch(&self, next: Option<i64>, last: Option<i64>) -> bool {
        let Some(shape) = self.aggregated else {
            return false;
        };
        let evicts = shape.deduplicates || self.output_mode != OutputMode::Complete;
        evicts && next.is_some() && next > last
    }

    /// The last batch's `stateOperators` progress.
    pub fn state_progress(&self) -> Vec<StateOperatorProgress> {
        let Some(stateful) = &self.stateful else {
            return Vec::new();
        };
        let s = stateful.stats();
        let committed = stateful.store().committed();
        // Spark's operator names.
        let name = if self.aggregated.is_some_and(|a| a.deduplicates) {
            DEDUPE
        } else if self.windows.iter().any(|w| w.function.session) {
            "sessionWindowStateStoreSaveExec"
        } else {
            STATE_STORE_SAVE
        };
        vec![StateOperatorProgress {
            operator_name: name.into(),
            num_rows_total: s.rows_total,
            num_rows_updated: s.rows_updated,
            num_rows_removed: s.rows_removed,
            num_rows_dropped_by_watermark: s.rows_dropped_by_watermark,
            memory_used_bytes: s.memory_used_bytes,
            commit_time_ms: committed.ms,
            custom_metrics: BTreeMap::from([
                ("partitionsCommitted".to_owned(), committed.partitions),
                ("snapshotsCommitted".to_owned(), committed.snapshots),
                ("filesUploaded".to_owned(), committed.files),
                ("bytesUploaded".to_owned(), committed.bytes),
            ]),
        }]
    }

    /// The schema of the query's result.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Runs the query over one batch: `inputs` holds each source's rows, in
    /// the order the sources were given to [`QueryPlan::new`], with the
    /// batch's watermarks.
    pub async fn execute(
        &mut self,
        inputs: Vec<Vec<RecordBatch>>,
        watermarks: BatchWatermarks,
    ) -> std::result::Result<Vec<RecordBatch>, DataFusionError> {
        let n = self.partitions.max(1);
        let spread = |batches: Vec<RecordBatch>| {
            // Spread the batch over the session's partitions so that
            // DataFusion runs it on every core.
            let mut partitions = vec![Vec::new(); n];
            for (i, batch) in batches.into_iter().enumerate() {
                partitions[i % n].push(batch);
            }
            partitions.retain(|p| !p.is_empty());
            if partitions.is_empty() {
                partitions.push(Vec::new());
            }
            partitions
        };
        // As in Spark, only a stateful operator that keeps windows drops
        // late rows: not complete mode (it keeps every group) except for
        // session windows, not a stateless query, not deduplication (it
        // drops by event time itself).
        let sessions = self.windows.iter().any(|w| w.function.session);
        let drops_late = self.aggregated.is_some_and(|a| {
            !a.deduplicates && (sessions || self.output_mode != OutputMode::Complete)
        });
        if self.stage == Stage::Merge {
            let Some(stateful) = &mut self.stateful else {
                return Err(DataFusionError::Execution(
                    "the state of the query is not open".into(),
                ));
            };
            let physical = self.ctx.state().create_physical_plan(&self.plan).await?;
            let states = inputs.into_iter().flatten().collect();
            return stateful
                .execute_states(&self.ctx, physical, states, watermarks, self.late_after)
                .await;
        }
        // The first stage drops nothing as late: the second judges by the
        // watermark of every replica.
        let late_watermark = watermarks
            .late_micros()
            .filter(|_| drops_late && self.stage == Stage::Whole);
        // Input (row, window) pairs dropped as later than the watermark.
        let mut late = 0;
        for window in &self.windows {
            let mut expanded = Vec::new();
            for batch in &inputs[window.source] {
                let (rows, dropped) = match self.panes {
                    Some(panes) => {
                        window
                            .function
                            .expand_panes(panes, batch, &window.schema, late_watermark)
                    }
                    None => window
                        .function
                        .expand(batch, &window.schema, late_watermark),
                }
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
                late += dropped;
                expanded.push(rows);
            }
            window.table.replace(spread(expanded))?;
        }
        for ((_, table), batches) in self.tables.iter().zip(inputs) {
            table.replace(spread(batches))?;
        }
        if self.stage == Stage::Shuffle {
            let physical = self.ctx.state().create_physical_plan(&self.plan).await?;
            let phases = crate::operators::find_phases(&physical)?;
            let partial = phases.partial.clone() as Arc<dyn ExecutionPlan>;
            return datafusion::physical_plan::collect(partial, self.ctx.task_ctx()).await;
        }
        if let Some(stateful) = &mut self.stateful {
            let physical = self.ctx.state().create_physical_plan(&self.plan).await?;
            return stateful
                .execute(&self.ctx, physical, watermarks, late)
                .await;
        }
        if self.aggregated.is_some() {
            return Err(DataFusionError::Execution(
                "the state of the query is not open".into(),
            ));
        }
        let df = self.ctx.execute_logical_plan(self.plan.clone()).await?;
        df.collect().await
    }
}

/// The progress name of a `GROUP BY`'s state (Spark's).
pub const STATE_STORE_SAVE: &str = "stateStoreSave";

/// The progress name of a `SELECT DISTINCT`'s state (Spark's).
pub const DEDUPE: &str = "dedupe";

/// Set to `off` to keep a hop window's state per window, not per pane (for
/// comparisons: both give the same results).
pub const PANES_ENV: &str = "SLUICE_WINDOW_PANES";

/// Whether the query's one aggregation groups by `window_start` and
/// `window_end` as the window table gives them and nothing below the
/// aggregation reads them otherwise (a filter, a join condition, an
/// aggregate's argument, a computed column would see panes instead of
/// windows): then its state can be kept per pane.
fn groups_by_window_only(plan: &LogicalPlan) -> bool {
    let is_window = |name: &str| name == WINDOW_START || name == WINDOW_END;
    let reads_window = |e: &Expr| e.column_refs().iter().any(|c| is_window(&c.name));
    let bare = |e: &Expr| matches!(e, Expr::Column(_));
    let mut aggregates = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::Aggregate(a) = node {
            aggregates.push(a.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let [aggregate] = aggregates.as_slice() else {
        return false;
    };
    let grouped: Vec<&str> = aggregate
        .group_expr
        .iter()
        .filter_map(|e| match e {
            Expr::Column(c) => Some(c.name.as_str()),
            _ => None,
        })
        .collect();
    if !grouped.contains(&WINDOW_START) || !grouped.contains(&WINDOW_END) {
        return false;
    }
    if aggregate
        .group_expr
        .iter()
        .any(|e| !bare(e) && reads_window(e))
        || aggregate.aggr_expr.iter().any(reads_window)
    {
        return false;
    }
    let mut clean = true;
    let _ = aggregate.input.apply(|node| {
        clean &= match node {
            LogicalPlan::Projection(p) => !p.expr.iter().any(|e| !bare(e) && reads_window(e)),
            other => !other.expressions().iter().any(reads_window),
        };
        Ok(if clean {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    clean
}

/// For `SELECT DISTINCT`: the position of the distinct column that is one
/// of the sources' watermark columns, followed through aliases
/// (`SELECT DISTINCT id, ts AS seen_at`).
fn distinct_event_time(plan: &LogicalPlan, watermark_columns: &[&str]) -> Option<usize> {
    let mut found = None;
    let _ = plan.apply(|node| {
        if let LogicalPlan::Distinct(datafusion::logical_expr::Distinct::All(input)) = node {
            found = match input.as_ref() {
                LogicalPlan::Projection(projection) => projection.expr.iter().position(|e| {
                    let mut e = e;
                    while let Expr::Alias(alias) = e {
                        e = alias.expr.as_ref();
                    }
                    matches!(e, Expr::Column(c) if watermark_columns.contains(&c.name.as_str()))
                }),
                other => other
                    .schema()
                    .fields()
                    .iter()
                    .position(|f| watermark_columns.contains(&f.name().as_str())),
            };
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Registers a static table as a listing table: DataFusion reads its files
/// again in every batch that uses it.
async fn register_static(
    ctx: &SessionContext,
    table: &StaticTable,
) -> std::result::Result<(), DataFusionError> {
    let path = table.path.strip_prefix("file://").unwrap_or(&table.path);
    let schema = table.schema.as_ref().map(|columns| {
        Schema::new(
            columns
                .iter()
                .map(|c| {
                    Field::new(
                        &c.name,
                        crate::source::arrow_type(c.data_type),
                        c.nullable.unwrap_or(true),
                    )
                })
                .collect::<Vec<_>>(),
        )
    });
    // Any file name: the format is declared, not guessed from extensions.
    let extension = if std::path::Path::new(path).is_dir() {
        match table.format {
            Format::Csv => ".csv",
            Format::Json => ".jsonl",
            _ => ".parquet",
        }
    } else {
        ""
    };
    match table.format {
        Format::Csv => {
            let mut options = CsvReadOptions::new()
                .has_header(true)
                .file_extension(extension);
            if let Some(schema) = &schema {
                options = options.schema(schema);
            }
            ctx.register_csv(&table.name, path, options).await
        }
        Format::Json => {
            let mut options = JsonReadOptions::default().file_extension(extension);
            if let Some(schema) = &schema {
                options = options.schema(schema);
            }
            ctx.register_json(&table.name, path, options).await
        }
        _ => {
            let mut options = ParquetReadOptions::default().file_extension(extension);
            if let Some(schema) = &schema {
                options = options.schema(schema);
            }
            ctx.register_parquet(&table.name, path, options).await
        }
    }
}

fn plan_error(err: DataFusionError) -> Error {
    Error::Plan(err.strip_backtrace().to_string())
}

/// Refuses what this engine cannot run on a stream, with the reason, and
/// enforces Spark's rules of which query may use which output mode. Returns
/// the shape of the aggregation, if the query has one.
fn check_streamable(
    plan: &LogicalPlan,
    output_mode: OutputMode,
    watermarked_window: bool,
    streams: &[String],
) -> Result<Option<Aggregated>> {
    // Whether a subtree reads a stream (a source, or a window over one).
    let reads_stream = |node: &LogicalPlan| {
        let mut found = false;
        let _ = node.apply(|n| {
            if let LogicalPlan::TableScan(scan) = n
                && streams.iter().any(|s| scan.table_name.table() == s)
            {
                found = true;
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found
    };
    let mut refused: Option<String> = None;
    let mut aggregates = 0;
    let mut distinct = 0;
    let mut windowed = false;
    let mut sorted = false;
    plan.apply_with_subqueries(|node| {
        let why = match node {
            LogicalPlan::Aggregate(aggregate) => {
                aggregates += 1;
                windowed |= aggregate
                    .group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::Column(c) if c.name == WINDOW_END));
                None
            }
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::All(_)) => {
                distinct += 1;
                None
            }
            LogicalPlan::Distinct(_) => Some("DISTINCT ON is not supported on a stream: use SELECT DISTINCT"),
            LogicalPlan::Window(_) => Some("window functions (OVER ...) are not supported on a stream: use tumble() or hop() with GROUP BY"),
            LogicalPlan::Join(join) => {
                // Spark's rules for stream-static joins: the static side may
                // only be the outer side of an outer join.
                match (reads_stream(&join.left), reads_stream(&join.right), join.join_type) {
                    (true, true, _) => Some("stream-stream joins are not implemented in this version of the engine yet: join a stream with a static table (spec.tables)"),
                    (false, false, _) => None,
                    (true, false, JoinType::Inner | JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti)
                    | (false, true, JoinType::Inner | JoinType::Right | JoinType::RightSemi | JoinType::RightAnti) => None,
                    _ => Some("a stream-static join keeps the stream on the outer side (as in Spark): use an inner join, or a LEFT JOIN with the stream on the left"),
                }
            }
            LogicalPlan::Sort(_) => {
                sorted = true;
                None
            }
            LogicalPlan::Limit(_) => Some("LIMIT is not supported on a stream"),
            LogicalPlan::RecursiveQuery(_) => Some("recursive queries are not supported on a stream"),
            LogicalPlan::Subquery(_) => Some("subqueries are not supported on a stream"),
            _ => None,
        };
        if let Some(why) = why {
            refused = Some(why.to_owned());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(plan_error)?;
    let unsupported = |path: &str, message: String| Error::Unsupported {
        path: path.to_owned(),
        message,
    };
    if let Some(why) = refused {
        return Err(unsupported("spec.query", why));
    }
    if distinct > 0 {
        if distinct + aggregates > 1 {
            return Err(unsupported(
                "spec.query",
                "holds more than one aggregation or DISTINCT: this version of the engine keeps state for one per query".into(),
            ));
        }
        if output_mode == OutputMode::Complete {
            return Err(unsupported(
                "spec.outputMode",
                "complete is not supported for SELECT DISTINCT (as for Spark's dropDuplicates): use append".into(),
            ));
        }
        return Ok(Some(Aggregated {
            windowed_with_watermark: false,
            deduplicates: true,
        }));
    }
    if aggregates > 1 {
        return Err(unsupported(
            "spec.query",
            "holds more than one aggregation: this version of the engine keeps state for one GROUP BY per query".into(),
        ));
    }
    if sorted && !(aggregates == 1 && output_mode == OutputMode::Complete) {
        // Spark's rule: sorting a stream needs the whole result, which only
        // complete mode has.
        return Err(unsupported(
            "spec.query",
            "ORDER BY is supported on a stream only after an aggregation in complete mode (as in Spark)".into(),
        ));
    }
    if aggregates == 0 {
        if output_mode == OutputMode::Complete {
            // Spark's rule: complete mode needs an aggregation to keep whole.
            return Err(unsupported(
                "spec.outputMode",
                "complete is not supported when the query has no aggregation (as in Spark): use append".into(),
            ));
        }
        return Ok(None);
    }
    let windowed_with_watermark = windowed && watermarked_window;
    if output_mode == OutputMode::Append && !windowed_with_watermark {
        // Spark's rule: in append mode a row is written once and never
        // changed, so an aggregate can only be written when its group is
        // final: when the watermark has passed the end of its window.
        return Err(unsupported(
            "spec.outputMode",
            format!(
                "append needs an aggregation over an event-time window with a watermark (as in Spark): {}; or use update or complete",
                if windowed {
                    "declare spec.sources[].watermark on the window's time column"
                } else {
                    "GROUP BY window_start, window_end of tumble() or hop() over a source with a watermark"
                }
            ),
        ));
    }
    Ok(Some(Aggregated {
        windowed_with_watermark,
        deduplicates: false,
    }))
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    async fn plan(sql: &str, mode: OutputMode) -> Result<QueryPlan> {
        QueryPlan::new(sql, &[("t".to_owned(), schema())], &[None], &[], mode).await
    }

    #[tokio::test]
    async fn one_plan_runs_over_each_batch() {
        let mut plan = plan(
            "SELECT v * 10 AS w FROM t WHERE v % 2 = 1",
            OutputMode::Append,
        )
        .await
        .unwrap();
        for (input, expected) in [(vec![1, 2, 3], vec![10, 30]), (vec![4, 5], vec![50])] {
            let batch =
                RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(input))]).unwrap();
            let out = plan
                .execute(vec![vec![batch]], BatchWatermarks::default())
                .await
                .unwrap();
            let values: Vec<i64> = out
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect();
            assert_eq!(values, expected);
        }
    }

    #[tokio::test]
    async fn stateful_operators_are_refused_with_the_reason() {
        for (sql, expected) in [
            (
                "SELECT count(*) FROM t",
                "append needs an aggregation over an event-time window",
            ),
            ("SELECT DISTINCT ON (v) v FROM t", "DISTINCT ON"),
            ("SELECT v FROM t ORDER BY v", "ORDER BY"),
            ("SELECT v FROM t LIMIT 3", "LIMIT"),
            ("SELECT a.v FROM t a JOIN t b ON a.v = b.v", "joins"),
            (
                "SELECT v, row_number() OVER (ORDER BY v) FROM t",
                "window functions",
            ),
            (
                "SELECT v FROM t WHERE v IN (SELECT v FROM t WHERE v > 2)",
                "subqueries",
            ),
        ] {
            let err = plan(sql, OutputMode::Append)
                .await
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.starts_with("spec.") && err.contains(expected),
                "{sql}: {err}"
            );
        }
        plan("SELECT v, count(*) FROM t GROUP BY v", OutputMode::Update)
            .await
            .unwrap();
        plan(
            "SELECT v FROM t UNION ALL SELECT v + 1 FROM t",
            OutputMode::Append,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_stream_joins_a_static_table_keeping_the_stream_on_the_outer_side() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("dim.csv");
        std::fs::write(&csv, "v,label\n1,one\n2,two\n").unwrap();
        let table: StaticTable = serde_json::from_value(serde_json::json!({
            "name": "dim", "path": csv.display().to_string(), "format": "csv",
            "schema": [{"name": "v", "type": "long"}, {"name": "label", "type": "string"}],
        }))
        .unwrap();
        let plan = |sql: &'static str| {
            let table = table.clone();
            async move {
                QueryPlan::new(
                    sql,
                    &[("t".to_owned(), schema())],
                    &[None],
                    &[table],
                    OutputMode::Append,
                )
                .await
            }
        };
        let mut joined = plan("SELECT t.v, dim.label FROM t LEFT JOIN dim ON t.v = dim.v")
            .await
            .unwrap();
        let batch =
            RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(vec![2, 3]))]).unwrap();
        let out = joined
            .execute(vec![vec![batch]], BatchWatermarks::default())
            .await
            .unwrap();
        let rows: usize = out.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2, "every stream row is kept");
        for sql in [
            "SELECT t.v FROM t RIGHT JOIN dim ON t.v = dim.v",
            "SELECT t.v FROM t FULL JOIN dim ON t.v = dim.v",
        ] {
            let err = plan(sql).await.err().unwrap().to_string();
            assert!(
                err.contains("keeps the stream on the outer side"),
                "{sql}: {err}"
            );
        }
    }

    /// The rows of `batches`, formatted and sorted.
    fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
        let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string();
        let mut rows: Vec<String> = text
            .lines()
            .skip(3)
            .filter(|l| l.starts_with('|'))
            .map(str::to_owned)
            .collect();
        rows.sort();
        rows
    }

    /// Events of `Int64` columns `columns` and a timestamp `ts`.
    fn events_schema(columns: &[&str]) -> SchemaRef {
        let mut fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(*c, DataType::Int64, false))
            .collect();
        fields.push(Field::new(
            "ts",
            DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Microsecond, None),
            false,
        ));
        Arc::new(Schema::new(fields))
    }

    /// Seeded `(k, v, ts)` events: `shape.0` batches of `shape.1` rows, a
    /// row every `step` µs of the clock, up to 60 s out of order and one in
    /// 20 far behind (late); `k` below `range.0`, `v` below `range.1`.
    fn seeded_events(
        events: &SchemaRef,
        mut seed: u64,
        shape: (usize, usize),
        step: i64,
        range: (u64, u64),
    ) -> Vec<RecordBatch> {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut batches = Vec::new();
        let mut clock = 0i64;
        for _ in 0..shape.0 {
            let (mut k, mut v, mut ts) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..shape.1 {
                clock += step;
                let behind = if next(20) == 0 { 300 } else { next(60) } as i64;
                k.push(next(range.0) as i64);
                v.push(next(range.1) as i64);
                ts.push(clock - behind * 1_000_000);
            }
            batches.push(
                RecordBatch::try_new(
                    events.clone(),
                    vec![
                        Arc::new(Int64Array::from(k)),
                        Arc::new(Int64Array::from(v)),
                        Arc::new(TimestampMicrosecondArray::from(ts)),
                    ],
                )
                .unwrap(),
            );
        }
        batches
    }

    #[tokio::test]
    async fn a_hop_window_kept_as_panes_writes_what_windows_would() {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        let events = events_schema(&["k", "v"]);
        let sources = [("events".to_owned(), events.clone())];
        // 20 s slide, 50 s size: 10 s panes, windows of 5 panes.
        let sql = "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, min(v) AS lo \
                   FROM hop(events, ts, '20 seconds', '50 seconds') \
                   GROUP BY window_start, window_end, k HAVING count(*) >= 2";
        let batches = seeded_events(&events, 42, (12, 200), 150_000, (7, 1000));
        for mode in [OutputMode::Append, OutputMode::Update] {
            let mut outputs = Vec::new();
            let mut state_rows = Vec::new();
            for panes in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let mut plan = QueryPlan::new(sql, &sources, &[Some("ts".into())], &[], mode)
                    .await
                    .unwrap();
                assert!(plan.panes.is_some(), "{mode:?}: the plan keeps panes");
                if !panes {
                    plan.panes = None;
                }
                plan.open_state(4, dir.path(), None, None, &[], 1)
                    .await
                    .unwrap();
                // As the runner: late rows are judged by the previous
                // batch's eviction watermark.
                let (mut max_ts, mut last_eviction) = (None::<i64>, None::<Option<i64>>);
                let mut written = Vec::new();
                for (n, batch) in batches.iter().enumerate() {
                    // The watermark: 30 s behind the largest event time seen
                    // before the batch (milliseconds), as the tracker keeps it.
                    let eviction = max_ts.map(|t| t / 1000 - 30_000);
                    let watermarks = BatchWatermarks {
                        eviction_ms: eviction,
                        late_events_ms: last_eviction.unwrap_or(eviction),
                    };
                    let out = plan
                        .execute(vec![vec![batch.clone()]], watermarks)
                        .await
                        .unwrap();
                    plan.commit_state(n as u64).await.unwrap();
                    written.push(sorted_rows(&out));
                    last_eviction = Some(eviction);
                    let times = batch
                        .column(2)
                        .as_any()
                        .downcast_ref::<TimestampMicrosecondArray>()
                        .unwrap();
                    max_ts = max_ts.max(times.values().iter().copied().max());
                }
                // A batch without data, far ahead: every window closes.
                let end = max_ts.map(|t| t / 1000 + 3_600_000);
                let out = plan
                    .execute(
                        vec![vec![RecordBatch::new_empty(events.clone())]],
                        BatchWatermarks {
                            eviction_ms: end,
                            late_events_ms: last_eviction.flatten(),
                        },
                    )
                    .await
                    .unwrap();
                written.push(sorted_rows(&out));
                let progress = &plan.state_progress()[0];
                state_rows.push((
                    progress.num_rows_total,
                    progress.num_rows_dropped_by_watermark,
                ));
                outputs.push(written);
            }
            let total: usize = outputs[0].iter().map(Vec::len).sum();
            assert!(total > 50, "{mode:?}: {total} rows written");
            for (n, (panes, windows)) in outputs[0].iter().zip(&outputs[1]).enumerate() {
                assert_eq!(panes, windows, "{mode:?}, batch {n}");
            }
            // Everything closed and left the state; the same late pairs.
            assert_eq!(state_rows[0].0, 0, "{mode:?}");
            assert_eq!(state_rows[1].0, 0, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn large_batches_merge_over_the_cores_to_every_window_once() {
        use std::collections::BTreeMap as Map;

        use datafusion::arrow::array::TimestampMicrosecondArray;
        let events = events_schema(&["k", "v"]);
        let sql = "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total \
                   FROM hop(events, ts, '20 seconds', '50 seconds') \
                   GROUP BY window_start, window_end, k";
        // Batches of 30,000 rows over 6,000 keys (merges of more than
        // PARALLEL_ROWS states), up to 60 s out of order, none late.
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut expected: Map<(i64, i64), (i64, i64)> = Map::new();
        let mut batches = Vec::new();
        let mut clock = 0i64;
        for _ in 0..3 {
            let (mut k, mut v, mut ts) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..30_000 {
                clock += 5_000;
                let (key, value) = (next(6_000) as i64, next(1000) as i64);
                let t = clock - next(60) as i64 * 1_000_000;
                let mut start = t - t.rem_euclid(20_000_000);
                while start + 50_000_000 > t {
                    let e = expected.entry((start, key)).or_default();
                    *e = (e.0 + 1, e.1 + value);
                    start -= 20_000_000;
                }
                k.push(key);
                v.push(value);
                ts.push(t);
            }
            batches.push(
                RecordBatch::try_new(
                    events.clone(),
                    vec![
                        Arc::new(Int64Array::from(k)),
                        Arc::new(Int64Array::from(v)),
                        Arc::new(TimestampMicrosecondArray::from(ts)),
                    ],
                )
                .unwrap(),
            );
        }
        let sources = [("events".to_owned(), events.clone())];
        for panes in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut plan =
                QueryPlan::new(sql, &sources, &[Some("ts".into())], &[], OutputMode::Append)
                    .await
                    .unwrap();
            if !panes {
                plan.panes = None;
            }
            plan.open_state(4, dir.path(), None, None, &[], 1)
                .await
                .unwrap();
            let mut got: Map<(i64, i64), (i64, i64)> = Map::new();
            let mut last = None;
            let mut outputs = Vec::new();
            for (n, batch) in batches.iter().enumerate() {
                // 10 minutes behind the newest event: nothing is late.
                let eviction = (n > 0).then(|| clock / 1000 * n as i64 / 3 - 600_000);
                let watermarks = BatchWatermarks {
                    eviction_ms: eviction,
                    late_events_ms: last,
                };
                outputs.extend(
                    plan.execute(vec![vec![batch.clone()]], watermarks)
                        .await
                        .unwrap(),
                );
                last = eviction;
            }
            outputs.extend(
                plan.execute(
                    vec![vec![RecordBatch::new_empty(events.clone())]],
                    BatchWatermarks {
                        eviction_ms: Some(clock / 1000 + 3_600_000),
                        late_events_ms: last,
                    },
                )
                .await
                .unwrap(),
            );
            for out in &outputs {
                let col = |i: usize| out.column(i).clone();
                let starts = col(0);
                let starts = starts
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .unwrap();
                let ints = |a: &datafusion::arrow::array::ArrayRef| {
                    a.as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                };
                let (keys, counts, totals) = (ints(&col(2)), ints(&col(3)), ints(&col(4)));
                for i in 0..out.num_rows() {
                    let previous = got.insert((starts.value(i), keys[i]), (counts[i], totals[i]));
                    assert!(previous.is_none(), "panes {panes}: a window written twice");
                }
            }
            assert_eq!(got.len(), expected.len(), "panes {panes}");
            assert!(
                got == expected,
                "panes {panes}: other values than the windows'"
            );
        }
    }

    /// Each row of `batches` as its cells, trimmed, sorted.
    fn cells(batches: &[RecordBatch]) -> Vec<String> {
        let mut rows: Vec<String> = sorted_rows(batches)
            .iter()
            .map(|row| row.split('|').map(str::trim).collect::<Vec<_>>().join("|"))
            .collect();
        rows.sort();
        rows
    }

    /// The rounds a test of several replicas runs: each batch of
    /// `batches` with the watermarks one query would run it with (the
    /// largest event time so far minus 30 s; late rows judged by the last
    /// batch's, as in Spark), then a round without data that closes every
    /// window.
    fn rounds(batches: &[RecordBatch]) -> Vec<(RecordBatch, BatchWatermarks)> {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        let empty = RecordBatch::new_empty(batches[0].schema());
        let mut max_ts = None::<i64>;
        let mut last_eviction = None::<Option<i64>>;
        let mut out = Vec::new();
        for batch in batches.iter().map(Some).chain([None]) {
            let eviction = match batch {
                Some(_) => max_ts.map(|t| t / 1000 - 30_000),
                None => max_ts.map(|t| t / 1000 + 3_600_000),
            };
            let watermarks = BatchWatermarks {
                eviction_ms: eviction,
                late_events_ms: last_eviction.unwrap_or(eviction),
            };
            last_eviction = Some(eviction);
            let batch = batch.cloned().unwrap_or_else(|| empty.clone());
            if let Some(t) = batch
                .column(2)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .and_then(|t| t.values().iter().copied().max())
            {
                max_ts = max_ts.max(Some(t));
            }
            out.push((batch, watermarks));
        }
        out
    }

    #[tokio::test]
    async fn two_stages_over_replicas_write_what_the_whole_query_writes() {
        use datafusion::arrow::array::UInt32Array;
        use datafusion::arrow::compute::take_record_batch;
        let events = events_schema(&["k", "v"]);
        let sources = [("events".to_owned(), events.clone())];
        let partitions = 4;
        for (sql, mode) in [
            // Hop windows kept as panes, in append and update mode.
            (
                "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, min(v) AS lo \
                 FROM hop(events, ts, '20 seconds', '50 seconds') \
                 GROUP BY window_start, window_end, k HAVING count(*) >= 2",
                OutputMode::Append,
            ),
            (
                "SELECT window_start, window_end, k, count(*) AS n, avg(v) AS mean \
                 FROM hop(events, ts, '20 seconds', '50 seconds') \
                 GROUP BY window_start, window_end, k",
                OutputMode::Update,
            ),
            // Tumbling windows, and no window at all.
            (
                "SELECT window_start, k, count(DISTINCT v) AS d FROM tumble(events, ts, '30 seconds') \
                 GROUP BY window_start, window_end, k",
                OutputMode::Append,
            ),
            (
                "SELECT k, count(*) AS n, max(v) AS hi FROM events GROUP BY k",
                OutputMode::Update,
            ),
            // Session windows: a key's sessions merged in the second stage.
            (
                "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, max(v) AS hi \
                 FROM session(events, ts, '3 seconds') GROUP BY window_start, window_end, k",
                OutputMode::Append,
            ),
            // Deduplication: by the other columns, and with the event time
            // among the columns (late rows dropped, old ones forgotten).
            ("SELECT DISTINCT k FROM events", OutputMode::Append),
            ("SELECT DISTINCT ts, k FROM events", OutputMode::Append),
        ] {
            let batches = seeded_events(&events, 7, (10, 300), 100_000, (23, 50));
            let watermarks = [Some("ts".to_owned())];
            let new_plan = || QueryPlan::new(sql, &sources, &watermarks, &[], mode);
            let dir = tempfile::tempdir().unwrap();
            let mut whole = new_plan().await.unwrap();
            whole
                .open_state(partitions, &dir.path().join("whole"), None, None, &[], 1)
                .await
                .unwrap();
            // Two replicas run the first stage, each over half the rows;
            // three the second, each over its state partitions.
            let mut firsts = Vec::new();
            for _ in 0..2 {
                let mut plan = new_plan().await.unwrap();
                plan.set_stage(Stage::Shuffle).await.unwrap();
                firsts.push(plan);
            }
            let mut seconds = Vec::new();
            for r in 0..3 {
                let mut plan = new_plan().await.unwrap();
                plan.set_stage(Stage::Merge).await.unwrap();
                plan.open_state(
                    partitions,
                    &dir.path().join(format!("r{r}")),
                    None,
                    None,
                    &[],
                    1,
                )
                .await
                .unwrap();
                seconds.push(plan);
            }
            let (mut total, mut dropped) = (0, 0);
            for (n, (batch, watermarks)) in rounds(&batches).into_iter().enumerate() {
                let expected = whole
                    .execute(vec![vec![batch.clone()]], watermarks)
                    .await
                    .unwrap();
                let half = batch.num_rows() / 2;
                let mut to: Vec<Vec<RecordBatch>> = vec![Vec::new(); 3];
                for (i, first) in firsts.iter_mut().enumerate() {
                    let rows = batch.slice(
                        i * half,
                        if i == 0 {
                            half
                        } else {
                            batch.num_rows() - half
                        },
                    );
                    for partial in first.execute(vec![vec![rows]], watermarks).await.unwrap() {
                        let parts = first
                            .partitioner()
                            .unwrap()
                            .partitions(&partial, partitions as usize)
                            .unwrap();
                        for (r, rows) in to.iter_mut().enumerate() {
                            let mine: Vec<u32> = (0..partial.num_rows() as u32)
                                .filter(|i| parts[*i as usize] % 3 == r)
                                .collect();
                            rows.push(
                                take_record_batch(&partial, &UInt32Array::from(mine)).unwrap(),
                            );
                        }
                    }
                }
                let mut actual = Vec::new();
                for (r, (second, rows)) in seconds.iter_mut().zip(to).enumerate() {
                    actual.extend(second.execute(vec![rows], watermarks).await.unwrap());
                    // Its keys are in the state partitions it owns: a
                    // rescale hands those over.
                    let store = second.stateful.as_ref().unwrap().store();
                    for (p, _, _) in store.scan().unwrap() {
                        assert_eq!(p % 3, r, "{sql}: replica {r} keeps a key of partition {p}");
                    }
                }
                assert_eq!(
                    cells(&actual),
                    cells(&expected),
                    "{sql} {mode:?}, batch {n}"
                );
                total += cells(&expected).len();
                dropped += seconds
                    .iter()
                    .map(|p| p.state_progress()[0].num_rows_dropped_by_watermark)
                    .sum::<u64>();
            }
            assert!(total > 20, "{sql}: {total} rows written");
            // Every case but the deduplication without an event time drops
            // some.
            if mode == OutputMode::Append && sql != "SELECT DISTINCT k FROM events" {
                assert!(dropped > 0, "{sql}: late rows were dropped");
            }
        }
    }

    /// The partial states one first-stage plan writes for `batch`, by state
    /// partition (of `partitions`).
    async fn partials_by_partition(
        first: &mut QueryPlan,
        batch: RecordBatch,
        watermarks: BatchWatermarks,
        partitions: usize,
    ) -> Vec<Vec<RecordBatch>> {
        use datafusion::arrow::array::UInt32Array;
        use datafusion::arrow::compute::take_record_batch;
        let mut by: Vec<Vec<RecordBatch>> = vec![Vec::new(); partitions];
        for partial in first.execute(vec![vec![batch]], watermarks).await.unwrap() {
            let parts = first
                .partitioner()
                .unwrap()
                .partitions(&partial, partitions)
                .unwrap();
            for (p, rows) in by.iter_mut().enumerate() {
                let mine: Vec<u32> = (0..partial.num_rows() as u32)
                    .filter(|i| parts[*i as usize] == p)
                    .collect();
                rows.push(take_record_batch(&partial, &UInt32Array::from(mine)).unwrap());
            }
        }
        by
    }

    /// One round of a two-stage test: the whole query's output for `batch`
    /// added to `expected`, and the first stage's partial states by state
    /// partition.
    async fn one_round(
        whole: &mut QueryPlan,
        first: &mut QueryPlan,
        batch: &RecordBatch,
        watermarks: BatchWatermarks,
        partitions: usize,
        expected: &mut Vec<RecordBatch>,
    ) -> Vec<Vec<RecordBatch>> {
        expected.extend(
            whole
                .execute(vec![vec![batch.clone()]], watermarks)
                .await
                .unwrap(),
        );
        partials_by_partition(first, batch.clone(), watermarks, partitions).await
    }

    #[tokio::test]
    async fn a_new_replica_writes_the_windows_its_partitions_old_owner_left_open() {
        use crate::state::{PartitionRef, Seed};
        // Hop windows kept as panes, in append mode: a batch writes the
        // windows ending in (its late-events watermark, its eviction one].
        // Two second-stage replicas stop at different watermarks (one's
        // last batch read its rows before the watermark moved); the next
        // generation starts at the higher. The windows between the two of
        // the lower one's partitions are written by their new owner, once.
        let events = events_schema(&["k", "v"]);
        let sources = [("events".to_owned(), events.clone())];
        let sql = "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total \
                   FROM hop(events, ts, '20 seconds', '50 seconds') \
                   GROUP BY window_start, window_end, k";
        let partitions = 4usize;
        let batches = seeded_events(&events, 7, (10, 300), 100_000, (23, 50));
        let watermarks = [Some("ts".to_owned())];
        let new_plan = || QueryPlan::new(sql, &sources, &watermarks, &[], OutputMode::Append);
        let dir = tempfile::tempdir().unwrap();
        let storage =
            |name: &str| Storage::open(dir.path().join(name).to_str().unwrap(), "f").unwrap();
        let mut whole = new_plan().await.unwrap();
        whole
            .open_state(
                partitions as u32,
                &dir.path().join("whole"),
                None,
                None,
                &[],
                1,
            )
            .await
            .unwrap();
        let mut first = new_plan().await.unwrap();
        first.set_stage(Stage::Shuffle).await.unwrap();
        let mut olds = Vec::new();
        for r in 0..2 {
            let mut plan = new_plan().await.unwrap();
            plan.set_stage(Stage::Merge).await.unwrap();
            plan.open_state(
                partitions as u32,
                &dir.path().join(format!("old{r}")),
                Some(storage(&format!("c{r}"))),
                None,
                &[],
                1,
            )
            .await
            .unwrap();
            olds.push(plan);
        }
        let rounds = rounds(&batches);
        let (mut expected, mut actual) = (Vec::new(), Vec::new());
        let stop = rounds.len() / 2;
        let mut evicted = [None, None];
        for (n, (batch, watermarks)) in rounds[..=stop].iter().enumerate() {
            let parts = one_round(
                &mut whole,
                &mut first,
                batch,
                *watermarks,
                partitions,
                &mut expected,
            )
            .await;
            for (r, old) in olds.iter_mut().enumerate() {
                // Replica 1's last batch reads its rows before its
                // watermark moves: its windows ending in between stay open.
                let at = if r == 1 && n == stop {
                    let held = rounds[stop - 1].1.eviction_ms;
                    BatchWatermarks {
                        eviction_ms: held,
                        late_events_ms: held,
                    }
                } else {
                    *watermarks
                };
                let rows: Vec<RecordBatch> = parts
                    .iter()
                    .enumerate()
                    .filter(|(p, _)| p % 2 == r)
                    .flat_map(|(_, rows)| rows.clone())
                    .collect();
                actual.extend(old.execute(vec![rows], at).await.unwrap());
                evicted[r] = at.eviction_ms;
            }
        }
        assert!(evicted[0] > evicted[1], "{evicted:?}");
        for old in &mut olds {
            old.commit_state(stop as u64).await.unwrap();
        }
        // The next generation: one replica, every partition seeded from its
        // old owner's last version, at the higher watermark.
        let seeds: Vec<Seed> = (0..partitions)
            .map(|p| Seed {
                partition: p,
                storage: storage(&format!("c{}", p % 2)),
                at: PartitionRef {
                    version: stop as u64,
                    epoch: 1,
                },
                evicted_ms: evicted[p % 2],
            })
            .collect();
        let mut next = new_plan().await.unwrap();
        next.set_stage(Stage::Merge).await.unwrap();
        next.open_state(
            partitions as u32,
            &dir.path().join("next"),
            Some(storage("c2")),
            None,
            &seeds,
            2,
        )
        .await
        .unwrap();
        for (n, (batch, watermarks)) in rounds.iter().enumerate().skip(stop + 1) {
            let parts = one_round(
                &mut whole,
                &mut first,
                batch,
                *watermarks,
                partitions,
                &mut expected,
            )
            .await;
            actual.extend(
                next.execute(vec![parts.concat()], *watermarks)
                    .await
                    .unwrap(),
            );
            // Each batch commits: from the first commit on, every partition
            // writes its windows from the batch's own watermark.
            next.commit_state(n as u64).await.unwrap();
        }
        assert!(cells(&expected).len() > 20);
        assert_eq!(cells(&actual), cells(&expected));
    }

    #[tokio::test]
    async fn keyed_replicas_over_their_topic_partitions_write_what_the_whole_query_writes() {
        // A topic keyed by k (`keyedBy: k`): each replica runs the whole
        // query over the topic partitions it owns, its state partitioned as
        // the topic is, under the global watermark. GROUP BY over panes,
        // session windows and SELECT DISTINCT, which need no repartition.
        use datafusion::arrow::array::{Int64Array, UInt32Array};
        use datafusion::arrow::compute::take_record_batch;
        let events = events_schema(&["k", "v"]);
        let sources = [("events".to_owned(), events.clone())];
        let partitions = 4;
        let keyed = crate::state::Partitioning::KafkaKey {
            column: "k".into(),
            field: "spec.sources[0].kafka.keyedBy".into(),
        };
        for (sql, mode) in [
            (
                "SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total \
                 FROM hop(events, ts, '20 seconds', '50 seconds') \
                 GROUP BY window_start, window_end, k HAVING count(*) >= 2",
                OutputMode::Append,
            ),
            (
                "SELECT window_start, window_end, k, count(*) AS n, max(v) AS hi \
                 FROM session(events, ts, '3 seconds') GROUP BY window_start, window_end, k",
                OutputMode::Append,
            ),
            ("SELECT DISTINCT k, v FROM events", OutputMode::Append),
        ] {
            let batches = seeded_events(&events, 11, (10, 300), 100_000, (23, 50));
            let watermarks = [Some("ts".to_owned())];
            let new_plan = || QueryPlan::new(sql, &sources, &watermarks, &[], mode);
            let dir = tempfile::tempdir().unwrap();
            let mut whole = new_plan().await.unwrap();
            whole
                .open_state(partitions, &dir.path().join("whole"), None, None, &[], 1)
                .await
                .unwrap();
            let mut replicas = Vec::new();
            for r in 0..3 {
                let mut plan = new_plan().await.unwrap();
                plan.set_partitioning(keyed.clone());
                plan.open_state(
                    partitions,
                    &dir.path().join(format!("r{r}")),
                    None,
                    None,
                    &[],
                    1,
                )
                .await
                .unwrap();
                replicas.push(plan);
            }
            let mut total = 0;
            for (n, (batch, watermarks)) in rounds(&batches).into_iter().enumerate() {
                let expected = whole
                    .execute(vec![vec![batch.clone()]], watermarks)
                    .await
                    .unwrap();
                // Each row is in the topic partition its key's murmur2
                // gives; partition p is read by replica p % 3.
                let keys = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                let topic_partition: Vec<usize> = keys
                    .values()
                    .iter()
                    .map(|k| crate::kafka::default_partition(k.to_string().as_bytes(), 4))
                    .collect();
                let mut actual = Vec::new();
                for (r, replica) in replicas.iter_mut().enumerate() {
                    let mine: Vec<u32> = (0..batch.num_rows() as u32)
                        .filter(|i| topic_partition[*i as usize] % 3 == r)
                        .collect();
                    let rows = take_record_batch(&batch, &UInt32Array::from(mine)).unwrap();
                    actual.extend(replica.execute(vec![vec![rows]], watermarks).await.unwrap());
                    let store = replica.stateful.as_ref().unwrap().store();
                    for (p, _, _) in store.scan().unwrap() {
                        assert_eq!(p % 3, r, "{sql}: replica {r} keeps a key of partition {p}");
                    }
                }
                assert_eq!(cells(&actual), cells(&expected), "{sql}, batch {n}");
                total += cells(&expected).len();
            }
            assert!(total > 20, "{sql}: {total} rows written");
        }
        // A key that is not a grouping column cannot place the state.
        let mut plan = QueryPlan::new(
            "SELECT v, count(*) AS n FROM events GROUP BY v",
            &sources,
            &[None],
            &[],
            OutputMode::Update,
        )
        .await
        .unwrap();
        plan.set_partitioning(keyed);
        let dir = tempfile::tempdir().unwrap();
        let err = plan
            .open_state(partitions, dir.path(), None, None, &[], 1)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.sources[0].kafka.keyedBy") && err.contains("[v]"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_whose_state_keeps_windows_goes_on_with_windows() {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        let events = events_schema(&["k"]);
        let sources = [("events".to_owned(), events.clone())];
        let sql = "SELECT window_start, window_end, k, count(*) AS n \
                   FROM hop(events, ts, '1 minute', '5 minutes') GROUP BY window_start, window_end, k";
        let batch = |keys: Vec<i64>, minutes: Vec<i64>| {
            RecordBatch::try_new(
                events.clone(),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(TimestampMicrosecondArray::from(
                        minutes.iter().map(|m| m * 60_000_000).collect::<Vec<_>>(),
                    )),
                ],
            )
            .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let remote = || Storage::open(dir.path().join("cp").to_str().unwrap(), "f").unwrap();
        let open = |panes: bool, scratch: &'static str, restore: Option<PartitionRef>, epoch| {
            let sources = sources.clone();
            let remote = remote();
            let scratch = dir.path().join(scratch);
            async move {
                let mut plan =
                    QueryPlan::new(sql, &sources, &[Some("ts".into())], &[], OutputMode::Update)
                        .await
                        .unwrap();
                if !panes {
                    plan.panes = None;
                }
                plan.open_state(4, &scratch, Some(remote), restore, &[], epoch)
                    .await
                    .map(|()| plan)
            }
        };
        // Version 0 written per window (as before panes).
        let mut old = open(false, "s1", None, 1).await.unwrap();
        let out = old
            .execute(
                vec![vec![batch(vec![1, 1], vec![10, 11])]],
                BatchWatermarks::default(),
            )
            .await
            .unwrap();
        assert_eq!(sorted_rows(&out).len(), 6);
        old.commit_state(0).await.unwrap();
        // A newer engine restores it: windows still.
        let at = Some(PartitionRef {
            version: 0,
            epoch: 1,
        });
        let mut new = open(true, "s2", at, 2).await.unwrap();
        assert!(new.panes.is_none());
        let out = new
            .execute(
                vec![vec![batch(vec![1], vec![12])]],
                BatchWatermarks::default(),
            )
            .await
            .unwrap();
        // The windows from [8, 13) to [11, 16) hold 12:00 with what the
        // restored state held of 10:00 and 11:00; [12, 17) is new.
        let counts: Vec<String> = sorted_rows(&out)
            .iter()
            .map(|r| r.split('|').nth(4).unwrap().trim().to_owned())
            .collect();
        assert_eq!(counts, ["3", "3", "3", "2", "1"]);
        // A fresh checkpoint keeps panes; a state kept per pane is not read
        // as windows: refused, naming the columns.
        let fresh = tempfile::tempdir().unwrap();
        let remote = Storage::open(fresh.path().join("cp").to_str().unwrap(), "f").unwrap();
        let mut panes =
            QueryPlan::new(sql, &sources, &[Some("ts".into())], &[], OutputMode::Update)
                .await
                .unwrap();
        panes
            .open_state(
                4,
                &fresh.path().join("s"),
                Some(remote.clone()),
                None,
                &[],
                1,
            )
            .await
            .unwrap();
        assert!(panes.panes.is_some());
        panes
            .execute(
                vec![vec![batch(vec![1], vec![10])]],
                BatchWatermarks::default(),
            )
            .await
            .unwrap();
        panes.commit_state(0).await.unwrap();
        let mut windows =
            QueryPlan::new(sql, &sources, &[Some("ts".into())], &[], OutputMode::Update)
                .await
                .unwrap();
        windows.panes = None;
        let err = windows
            .open_state(4, &fresh.path().join("s2"), Some(remote), at, &[], 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pane_start") || err.contains("window_start"),
            "{err}"
        );
    }

    #[test]
    fn panes_need_the_window_columns_untouched_below_the_aggregation() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let events = events_schema(&["k"]);
        let sources = [("events".to_owned(), events)];
        let from = "FROM hop(events, ts, '1 minute', '5 minutes')";
        for (sql, panes) in [
            (
                format!(
                    "SELECT window_start, window_end, k, count(*) AS n {from} GROUP BY window_start, window_end, k"
                ),
                true,
            ),
            (
                format!(
                    "SELECT window_end, k, count(*) AS n {from} GROUP BY window_start, window_end, k HAVING max(k) > 1"
                ),
                true,
            ),
            (
                format!(
                    "SELECT window_start, window_end, count(*) AS n {from} WHERE window_start > TIMESTAMP '2026-01-01 00:00:00' GROUP BY window_start, window_end"
                ),
                false,
            ),
            (
                format!(
                    "SELECT window_start, window_end, max(window_start) AS m {from} GROUP BY window_start, window_end"
                ),
                false,
            ),
            (
                format!("SELECT window_end, count(*) AS n {from} GROUP BY window_end"),
                false,
            ),
            (
                "SELECT window_start, window_end, k, count(*) AS n FROM hop(events, ts, '5 minutes', '5 minutes') GROUP BY window_start, window_end, k".to_string(),
                false,
            ),
        ] {
            let plan = rt
                .block_on(QueryPlan::new(
                    &sql,
                    &sources,
                    &[Some("ts".into())],
                    &[],
                    OutputMode::Update,
                ))
                .unwrap();
            assert_eq!(plan.panes.is_some(), panes, "{sql}");
        }
    }

    #[tokio::test]
    async fn session_windows_refuse_update_mode_as_spark_does() {
        let events = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(
                    datafusion::arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                ),
                true,
            ),
        ]));
        let sql = "SELECT window_start, window_end, k, count(*) AS n FROM session(events, ts, '5s') GROUP BY window_start, window_end, k";
        let sources = [("events".to_owned(), events.clone())];
        let watermarks = [Some("ts".to_owned())];
        let plan = |mode| QueryPlan::new(sql, &sources, &watermarks, &[], mode);
        let err = plan(OutputMode::Update).await.err().unwrap().to_string();
        assert!(
            err.starts_with("spec.outputMode: update is not supported for session window"),
            "{err}"
        );
        plan(OutputMode::Complete).await.unwrap();
        plan(OutputMode::Append).await.unwrap();
    }

    #[tokio::test]
    async fn complete_mode_needs_an_aggregation() {
        let err = plan("SELECT v FROM t", OutputMode::Complete)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("spec.outputMode: complete is not supported"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_columns_are_named() {
        let err = plan("SELECT nope FROM t", OutputMode::Append)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("spec.query: ") && err.contains("nope"),
            "{err}"
        );
    }
}
