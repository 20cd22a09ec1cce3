//! The Delta Lake sink: each batch is one commit of a Delta table
//! (delta-rs, on the arrow and DataFusion the engine runs), exactly once by
//! Delta's own idempotent-write mechanism, as Spark's Delta sink does it:
//! every commit carries a `txn` action with the query's id as `appId` and
//! the batch id as `version`. A batch replayed after a crash finds its
//! version in the table's log and is not written again; a zombie run
//! committing the same batch at the same time loses Delta's conflict check
//! (a concurrent commit with the same `appId`) and leaves it. Any Delta
//! reader (Spark, delta-rs, DuckDB) sees each batch once.
//!
//! - append mode appends each batch's rows;
//! - complete mode overwrites the table with each batch's result;
//! - update mode merges each batch's changed rows into the table on
//!   `mergeKeys` (a `MERGE`, null keys equal to null keys as grouping takes
//!   them). Spark's Delta sink has no update mode: a Spark user writes the
//!   same MERGE in `foreachBatch`.
//!
//! A table the sink creates gets `delta.checkpointInterval = 10` (Delta's
//! usual interval; delta-rs would take 100), so that a reader replays at
//! most ten JSON commits; a table that exists keeps its own settings.
//! Data files a crashed run wrote and never committed are not in any
//! commit: readers never see them, and Delta's `VACUUM` removes them.

use std::sync::{Arc, Once};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Column;
use datafusion::logical_expr::{Expr, Operator, binary_expr};
use datafusion::prelude::SessionContext;
use deltalake_core::kernel::Transaction;
use deltalake_core::kernel::transaction::{CommitProperties, TransactionError};
use deltalake_core::logstore::{LogStoreFactory, LogStoreRef, ObjectStoreRef, StorageConfig};
use deltalake_core::operations::write::SchemaMode;
use deltalake_core::protocol::SaveMode;
use deltalake_core::{DeltaResult, DeltaTable, DeltaTableBuilder, DeltaTableError};
use sluice_crds::{DeltaSink as DeltaSpec, OutputMode};
use url::Url;

use super::{Sink, SinkContext};
use crate::{Error, Result};

/// Delta's usual checkpoint interval, set on the tables the sink creates.
const CHECKPOINT_INTERVAL: &str = "10";

/// The alias of a batch's rows in the update-mode merge.
const SOURCE: &str = "source";
/// The alias of the table in the update-mode merge.
const TARGET: &str = "target";

/// Writes each batch as one commit of a Delta table.
pub struct DeltaSink {
    location: String,
    url: Url,
    store: ObjectStoreRef,
    mode: OutputMode,
    merge_schema: bool,
    merge_keys: Vec<String>,
    partition_by: Vec<String>,
    context: SinkContext,
    /// The table, once opened (with its state when it exists).
    table: Option<DeltaTable>,
    /// The prepared batch and its rows.
    pending: Option<(u64, SchemaRef, Vec<RecordBatch>)>,
}

/// delta-rs builds a log store for a URL scheme it has a factory for; it
/// knows `file://` and `memory://`, and `s3://` only with its AWS crate
/// (which brings a second AWS client). The engine hands it its own S3 store
/// (the retries, timeouts and credentials every S3 access here has) under
/// Delta's default log store, whose commits are create-only puts: S3's
/// conditional writes, as the checkpoint's fencing uses them.
#[derive(Debug, Default)]
struct EngineStoreFactory;

impl LogStoreFactory for EngineStoreFactory {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<LogStoreRef> {
        Ok(deltalake_core::logstore::default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

fn register_s3_log_store() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        deltalake_core::logstore::logstore_factories().insert(
            Url::parse("s3://").expect("a valid URL"),
            Arc::new(EngineStoreFactory),
        );
    });
}

impl DeltaSink {
    /// A Delta sink writing the table at the spec's location, in `mode`.
    pub fn new(spec: &DeltaSpec, mode: OutputMode) -> Result<Self> {
        register_s3_log_store();
        let (store, url) = crate::storage::root_store(&spec.path, "spec.sink.delta.path")?;
        if mode == OutputMode::Update && spec.merge_keys.is_empty() {
            return Err(Error::Unsupported {
                path: "spec.sink.delta.mergeKeys".into(),
                message: "is required in update mode: name the columns a changed row replaces the table's row on".into(),
            });
        }
        Ok(Self {
            location: spec.path.clone(),
            url,
            store,
            mode,
            merge_schema: spec.merge_schema.unwrap_or(false),
            merge_keys: spec.merge_keys.clone(),
            partition_by: spec.partition_by.clone(),
            context: SinkContext::default(),
            table: None,
            pending: None,
        })
    }

    /// The `appId` of the sink's `txn` actions: the query's id, as Spark's.
    fn app_id(&self) -> &str {
        &self.context.query_id
    }

    fn error(&self, doing: &str, err: DeltaTableError) -> Error {
        let message = format!("cannot {doing}: {err}");
        if is_transient(&err) {
            Error::Unavailable {
                what: format!("Delta table {}", self.location),
                message,
            }
        } else {
            Error::Sink {
                sink: self.description(),
                message,
            }
        }
    }

    /// The table, its state read afresh from the log (`None` inside when
    /// there is no table yet).
    async fn refreshed(&mut self) -> Result<DeltaTable> {
        let mut table = match self.table.take() {
            Some(table) => table,
            None => DeltaTableBuilder::from_url(self.url.clone())
                .map_err(|e| self.error("open it", e))?
                .with_storage_backend(self.store.clone(), self.url.clone())
                .build()
                .map_err(|e| self.error("open it", e))?,
        };
        match table.load().await {
            Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
            Err(err) => Err(self.error("read its log", err)),
        }
    }

    /// The last batch of this query the table holds.
    async fn committed_version(&self, table: &DeltaTable) -> Result<Option<i64>> {
        let Ok(state) = table.snapshot() else {
            return Ok(None);
        };
        state
            .transaction_version(table.log_store().as_ref(), self.app_id())
            .await
            .map_err(|e| self.error("read its transactions", e))
    }

    /// The commit's properties: the `txn` action, and what Spark's Delta
    /// sink records of a streaming write (`queryId`, `epochId`,
    /// `outputMode`) among the operation's parameters.
    fn commit_properties(&self, batch_id: u64) -> CommitProperties {
        let parameters = serde_json::json!({
            "queryId": self.context.query_id,
            "epochId": batch_id.to_string(),
            "outputMode": self.mode.to_string(),
        });
        CommitProperties::default()
            .with_application_transaction(Transaction::new(self.app_id(), batch_id as i64))
            .with_metadata([
                ("operationParameters".to_owned(), parameters),
                (
                    "userMetadata".to_owned(),
                    serde_json::json!(format!(
                        "sluice query {} batch {batch_id} run {}",
                        self.context.query_id, self.context.run_id
                    )),
                ),
            ])
    }

    async fn write(
        &self,
        table: DeltaTable,
        batch_id: u64,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> DeltaResult<DeltaTable> {
        let exists = table.version().is_some();
        // Delta commits every batch, an empty one too (its `txn` records
        // that the batch ran), as Spark's sink does.
        let batches = if batches.is_empty() {
            vec![RecordBatch::new_empty(schema.clone())]
        } else {
            batches
        };
        if self.mode == OutputMode::Update && exists {
            let source = SessionContext::new().read_batches(batches)?;
            let (table, _) = table
                .merge(source, self.merge_predicate())
                .with_source_alias(SOURCE)
                .with_target_alias(TARGET)
                .with_merge_schema(self.merge_schema)
                .with_commit_properties(self.commit_properties(batch_id))
                .when_matched_update(|update| {
                    schema.fields().iter().fold(update, |update, field| {
                        update.update(field.name().as_str(), qualified(SOURCE, field.name()))
                    })
                })?
                .when_not_matched_insert(|insert| {
                    schema.fields().iter().fold(insert, |insert, field| {
                        insert.set(field.name().as_str(), qualified(SOURCE, field.name()))
                    })
                })?
                .await?;
            return Ok(table);
        }
        // Update mode into a table not created yet: every row is new.
        let save_mode = match self.mode {
            OutputMode::Complete => SaveMode::Overwrite,
            OutputMode::Append | OutputMode::Update => SaveMode::Append,
        };
        let mut write = table
            .write(batches)
            .with_save_mode(save_mode)
            .with_commit_properties(self.commit_properties(batch_id));
        if self.merge_schema {
            write = write.with_schema_mode(SchemaMode::Merge);
        }
        if !exists {
            write =
                write.with_configuration([("delta.checkpointInterval", Some(CHECKPOINT_INTERVAL))]);
            if !self.partition_by.is_empty() {
                write = write.with_partition_columns(self.partition_by.clone());
            }
        }
        write.await
    }

    /// `target.k <=> source.k AND ...` over the merge keys.
    fn merge_predicate(&self) -> Expr {
        self.merge_keys
            .iter()
            .map(|key| {
                binary_expr(
                    qualified(TARGET, key),
                    Operator::IsNotDistinctFrom,
                    qualified(SOURCE, key),
                )
            })
            .reduce(Expr::and)
            .expect("update mode has merge keys (checked in new())")
    }
}

fn qualified(relation: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(relation), name))
}

/// Whether a retry can help: the store failed, or could not be reached.
fn is_transient(err: &DeltaTableError) -> bool {
    let store = match err {
        DeltaTableError::ObjectStore { source } => source,
        DeltaTableError::Transaction {
            source: TransactionError::ObjectStore { source },
        } => source,
        _ => return false,
    };
    matches!(
        store,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Whether a commit failed because another commit with the same `appId`
/// landed first (a zombie run, or this run's own earlier attempt).
fn lost_to_concurrent_commit(err: &DeltaTableError) -> bool {
    matches!(
        err,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_)
                | TransactionError::VersionAlreadyExists(_)
                | TransactionError::MaxCommitAttempts(_)
        } | DeltaTableError::VersionAlreadyExists(_)
    )
}

#[async_trait]
impl Sink for DeltaSink {
    fn description(&self) -> String {
        format!("delta {}", self.location)
    }

    async fn open(&mut self, context: &SinkContext) -> Result<()> {
        self.context = context.clone();
        self.pending = None;
        let table = self.refreshed().await?;
        self.table = Some(table);
        Ok(())
    }

    async fn is_committed(&mut self, batch_id: u64) -> Result<bool> {
        let table = self.refreshed().await?;
        let version = self.committed_version(&table).await;
        self.table = Some(table);
        Ok(version?.is_some_and(|v| v >= batch_id as i64))
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        // A Delta commit writes its data files and its log entry in one
        // call: the rows wait here for the commit (batches share their
        // buffers; this copies no data).
        self.pending = Some((batch_id, schema.clone(), batches.to_vec()));
        Ok(())
    }

    async fn commit(&mut self, batch_id: u64) -> Result<()> {
        let Some((prepared, schema, batches)) = self.pending.take() else {
            return Err(Error::Sink {
                sink: self.description(),
                message: format!("batch {batch_id} was committed without being prepared"),
            });
        };
        if prepared != batch_id {
            return Err(Error::Sink {
                sink: self.description(),
                message: format!(
                    "batch {batch_id} was committed, but batch {prepared} was prepared"
                ),
            });
        }
        let table = self.refreshed().await?;
        if self
            .committed_version(&table)
            .await?
            .is_some_and(|v| v >= batch_id as i64)
        {
            // Another run of the query committed it first.
            self.table = Some(table);
            return Ok(());
        }
        match self.write(table, batch_id, &schema, batches).await {
            Ok(table) => {
                self.table = Some(table);
                Ok(())
            }
            Err(err) if lost_to_concurrent_commit(&err) => {
                // The winner may be another run of this query with the same
                // batch: then the batch is in. Anything else is a failure.
                if self.is_committed(batch_id).await? {
                    tracing::info!(
                        batch_id,
                        "another run of the query committed this batch to the Delta table first"
                    );
                    Ok(())
                } else {
                    Err(self.error(&format!("commit batch {batch_id}"), err))
                }
            }
            Err(err) => Err(self.error(&format!("commit batch {batch_id}"), err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn spec(path: &std::path::Path, keys: &[&str]) -> DeltaSpec {
        DeltaSpec {
            path: path.display().to_string(),
            merge_schema: None,
            merge_keys: keys.iter().map(|k| k.to_string()).collect(),
            partition_by: vec![],
        }
    }

    fn context(query_id: &str) -> SinkContext {
        SinkContext {
            query_id: query_id.into(),
            run_id: "run".into(),
            epoch: 1,
            ..SinkContext::default()
        }
    }

    fn batch(users: &[&str], counts: &[i64]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(users.to_vec())),
                Arc::new(Int64Array::from(counts.to_vec())),
            ],
        )
        .unwrap();
        (schema, batch)
    }

    async fn rows(path: &std::path::Path) -> Vec<(String, i64)> {
        let url = Url::from_directory_path(path).unwrap();
        let mut table = DeltaTableBuilder::from_url(url).unwrap().build().unwrap();
        table.load().await.unwrap();
        let ctx = SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("t", table.table_provider().await.unwrap())
            .unwrap();
        let batches = ctx
            .sql("SELECT user, n FROM t ORDER BY user, n")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut out = vec![];
        for b in batches {
            // NB: delta-rs may read strings back as Utf8View.
            let users = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let users = users.as_any().downcast_ref::<StringArray>().unwrap();
            let ns = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                out.push((users.value(i).to_owned(), ns.value(i)));
            }
        }
        out
    }

    async fn run(sink: &mut DeltaSink, id: u64, users: &[&str], counts: &[i64]) {
        let (schema, b) = batch(users, counts);
        if sink.is_committed(id).await.unwrap() {
            return;
        }
        sink.prepare(id, &schema, &[b]).await.unwrap();
        sink.commit(id).await.unwrap();
    }

    #[tokio::test]
    async fn appends_each_batch_once_with_its_txn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut sink = DeltaSink::new(&spec(&path, &[]), OutputMode::Append).unwrap();
        sink.open(&context("q1")).await.unwrap();
        run(&mut sink, 0, &["a"], &[1]).await;
        run(&mut sink, 1, &[], &[]).await;
        run(&mut sink, 2, &["b"], &[2]).await;
        // A restarted run replays batch 2: the table has it.
        let mut again = DeltaSink::new(&spec(&path, &[]), OutputMode::Append).unwrap();
        again.open(&context("q1")).await.unwrap();
        assert!(again.is_committed(2).await.unwrap());
        assert!(!again.is_committed(3).await.unwrap());
        assert_eq!(rows(&path).await, [("a".into(), 1), ("b".into(), 2)]);
        // One commit per batch, the empty one too.
        let table = again.refreshed().await.unwrap();
        assert_eq!(table.version(), Some(2));
    }

    #[tokio::test]
    async fn a_zombie_commit_of_the_same_batch_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut zombie = DeltaSink::new(&spec(&path, &[]), OutputMode::Append).unwrap();
        let mut live = DeltaSink::new(&spec(&path, &[]), OutputMode::Append).unwrap();
        zombie.open(&context("q1")).await.unwrap();
        live.open(&context("q1")).await.unwrap();
        let (schema, b) = batch(&["a"], &[1]);
        zombie
            .prepare(0, &schema, std::slice::from_ref(&b))
            .await
            .unwrap();
        live.prepare(0, &schema, &[b]).await.unwrap();
        live.commit(0).await.unwrap();
        zombie.commit(0).await.unwrap();
        assert_eq!(rows(&path).await, [("a".into(), 1)]);
    }

    #[tokio::test]
    async fn update_mode_merges_on_the_keys_and_complete_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u");
        let mut sink = DeltaSink::new(&spec(&path, &["user"]), OutputMode::Update).unwrap();
        sink.open(&context("q2")).await.unwrap();
        run(&mut sink, 0, &["a", "b"], &[1, 1]).await;
        run(&mut sink, 1, &["b", "c"], &[2, 1]).await;
        assert_eq!(
            rows(&path).await,
            [("a".into(), 1), ("b".into(), 2), ("c".into(), 1)]
        );

        let path = dir.path().join("c");
        let mut sink = DeltaSink::new(&spec(&path, &[]), OutputMode::Complete).unwrap();
        sink.open(&context("q3")).await.unwrap();
        run(&mut sink, 0, &["a"], &[1]).await;
        run(&mut sink, 1, &["a", "b"], &[2, 1]).await;
        assert_eq!(rows(&path).await, [("a".into(), 2), ("b".into(), 1)]);
    }

    #[tokio::test]
    async fn another_schema_is_refused_unless_merge_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut sink = DeltaSink::new(&spec(&path, &[]), OutputMode::Append).unwrap();
        sink.open(&context("q1")).await.unwrap();
        run(&mut sink, 0, &["a"], &[1]).await;
        let wider = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
            Field::new("extra", DataType::Int64, true),
        ]));
        let b = RecordBatch::try_new(
            wider.clone(),
            vec![
                Arc::new(StringArray::from(vec!["b"])),
                Arc::new(Int64Array::from(vec![2])),
                Arc::new(Int64Array::from(vec![7])),
            ],
        )
        .unwrap();
        sink.prepare(1, &wider, std::slice::from_ref(&b))
            .await
            .unwrap();
        let error = sink.commit(1).await.unwrap_err().to_string();
        assert!(error.starts_with("sink delta "), "{error}");

        let mut merging = spec(&path, &[]);
        merging.merge_schema = Some(true);
        let mut sink = DeltaSink::new(&merging, OutputMode::Append).unwrap();
        sink.open(&context("q1")).await.unwrap();
        sink.prepare(1, &wider, &[b]).await.unwrap();
        sink.commit(1).await.unwrap();
        assert_eq!(rows(&path).await, [("a".into(), 1), ("b".into(), 2)]);
    }
}
