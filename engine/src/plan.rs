//! Planning: the query's SQL is planned once, against tables whose contents
//! are swapped for each batch's rows, and checked to be something this engine
//! can run on a stream.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use sluice_crds::OutputMode;

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

/// The query, planned once and run over each batch.
pub struct QueryPlan {
    ctx: SessionContext,
    plan: LogicalPlan,
    tables: Vec<(String, Arc<BatchTable>)>,
    output_schema: SchemaRef,
    partitions: usize,
}

impl QueryPlan {
    /// Plans `sql` over sources with these names and schemas, and checks that
    /// it can run on a stream in `output_mode`.
    pub async fn new(
        sql: &str,
        sources: &[(String, SchemaRef)],
        output_mode: OutputMode,
    ) -> Result<Self> {
        let config = SessionConfig::new().with_information_schema(false);
        let partitions = config.target_partitions();
        let ctx = SessionContext::new_with_config(config);
        let mut tables = Vec::new();
        for (name, schema) in sources {
            let table = Arc::new(BatchTable::new(schema.clone()).map_err(plan_error)?);
            ctx.register_table(name.as_str(), table.clone())
                .map_err(plan_error)?;
            tables.push((name.clone(), table));
        }
        let df = ctx.sql(sql).await.map_err(plan_error)?;
        let plan = df.logical_plan().clone();
        check_streamable(&plan, output_mode)?;
        let output_schema = Arc::new(df.schema().as_arrow().clone());
        Ok(Self {
            ctx,
            plan,
            tables,
            output_schema,
            partitions,
        })
    }

    /// The schema of the query's result.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Runs the query over one batch: `inputs` holds each source's rows, in
    /// the order the sources were given to [`QueryPlan::new`].
    pub async fn execute(
        &self,
        inputs: Vec<Vec<RecordBatch>>,
    ) -> std::result::Result<Vec<RecordBatch>, DataFusionError> {
        for ((_, table), batches) in self.tables.iter().zip(inputs) {
            // Spread the batch over the session's partitions so that
            // DataFusion runs it on every core.
            let mut partitions = vec![Vec::new(); self.partitions.max(1)];
            for (i, batch) in batches.into_iter().enumerate() {
                partitions[i % self.partitions.max(1)].push(batch);
            }
            partitions.retain(|p| !p.is_empty());
            if partitions.is_empty() {
                partitions.push(Vec::new());
            }
            table.replace(partitions)?;
        }
        let df = self.ctx.execute_logical_plan(self.plan.clone()).await?;
        df.collect().await
    }
}

fn plan_error(err: DataFusionError) -> Error {
    Error::Plan(err.strip_backtrace().to_string())
}

/// Refuses what needs state across batches, which this engine version does
/// not keep yet, and Spark's output-mode rules for stateless queries.
fn check_streamable(plan: &LogicalPlan, output_mode: OutputMode) -> Result<()> {
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        let why = match node {
            LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) => Some(
                "aggregations (GROUP BY, count(*), DISTINCT, ...) need state kept across batches",
            ),
            LogicalPlan::Window(_) => Some("window functions (OVER ...) need state kept across batches"),
            LogicalPlan::Join(_) => Some("joins need state kept across batches"),
            LogicalPlan::Sort(_) => Some(
                "ORDER BY is not supported on a stream (Spark allows it only after an aggregation in complete mode)",
            ),
            LogicalPlan::Limit(_) => Some("LIMIT needs state kept across batches"),
            LogicalPlan::RecursiveQuery(_) => Some("recursive queries are not supported on a stream"),
            LogicalPlan::Subquery(_) => Some("subqueries need state kept across batches"),
            _ => None,
        };
        if let Some(why) = why {
            refused = Some(why.to_owned());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(plan_error)?;
    if let Some(why) = refused {
        return Err(Error::Unsupported {
            path: "spec.query".to_owned(),
            message: format!(
                "{why}; this version of the engine runs stateless queries only (projection, filter, functions, casts, CASE, UNION ALL)"
            ),
        });
    }
    if output_mode == OutputMode::Complete {
        // Spark's rule: complete mode needs an aggregation to keep whole.
        return Err(Error::Unsupported {
            path: "spec.outputMode".to_owned(),
            message: "complete is not supported when the query has no aggregation (as in Spark): use append".to_owned(),
        });
    }
    Ok(())
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
        QueryPlan::new(sql, &[("t".to_owned(), schema())], mode).await
    }

    #[tokio::test]
    async fn one_plan_runs_over_each_batch() {
        let plan = plan(
            "SELECT v * 10 AS w FROM t WHERE v % 2 = 1",
            OutputMode::Append,
        )
        .await
        .unwrap();
        for (input, expected) in [(vec![1, 2, 3], vec![10, 30]), (vec![4, 5], vec![50])] {
            let batch =
                RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(input))]).unwrap();
            let out = plan.execute(vec![vec![batch]]).await.unwrap();
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
            ("SELECT count(*) FROM t", "aggregations"),
            ("SELECT DISTINCT v FROM t", "aggregations"),
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
                err.starts_with("spec.query: ") && err.contains(expected),
                "{sql}: {err}"
            );
        }
        plan(
            "SELECT v FROM t UNION ALL SELECT v + 1 FROM t",
            OutputMode::Append,
        )
        .await
        .unwrap();
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
