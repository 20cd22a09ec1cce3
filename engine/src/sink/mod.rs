//! Sinks: where each batch's result goes. A sink's lifecycle, driven by the
//! runner the same way for every connector (Arroyo's two-phase commit, Spark's
//! idempotent sinks):
//!
//! 1. **open** for a run: learns the query's id and the run's epoch (a Kafka
//!    sink fences older producers there);
//! 2. **is committed**: asked for a batch replayed after a crash, so that a
//!    batch already in the sink is not written twice;
//! 3. **prepare** batch N: writes its rows where readers do not see them
//!    yet (data files no manifest lists; a transaction not committed);
//! 4. **commit** batch N: makes them visible at once (the manifest; the
//!    transaction's commit). A commit that finds batch N committed by
//!    another run of the query (a zombie) leaves it: both computed the same
//!    rows from the same offsets;
//! 5. for a replayed batch, **discard** what earlier runs prepared and did
//!    not commit (a file sink's data files no manifest lists).
//!
//! A connector is a module here implementing [`Sink`], built by [`build`].

mod console;
mod delta;
mod files;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use sluice_crds::{OutputMode, Sink as SinkSpec};

pub use console::ConsoleSink;
pub use delta::DeltaSink;
pub use files::{FileSink, METADATA_DIR, committed_files};

use crate::{Error, Result};

/// What a sink knows of the run it writes for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkContext {
    /// The query's id (kept across restarts by the checkpoint).
    pub query_id: String,
    /// This run's id.
    pub run_id: String,
    /// This run's epoch (0 without a checkpoint).
    pub epoch: u64,
    /// Which replica of which generation runs (`g<g>-r<i>`), empty for a
    /// query that never scaled out: a sink's transactional ids end with it.
    pub scope: String,
}

impl SinkContext {
    /// `base` scoped to this run's replica: `base-g<g>-r<i>`, or `base`.
    pub fn scoped(&self, base: &str) -> String {
        if self.scope.is_empty() {
            base.to_owned()
        } else {
            format!("{base}-{}", self.scope)
        }
    }
}

/// A streaming sink.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Says what the sink is, for progress reports.
    fn description(&self) -> String;
    /// Opens the sink for a run.
    async fn open(&mut self, context: &SinkContext) -> Result<()> {
        let _ = context;
        Ok(())
    }
    /// Whether batch `batch_id` is in the sink already.
    async fn is_committed(&mut self, batch_id: u64) -> Result<bool>;
    /// Writes batch `batch_id`'s result, not yet visible.
    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()>;
    /// Makes batch `batch_id` visible.
    async fn commit(&mut self, batch_id: u64) -> Result<()>;
    /// Batch `batch_id` is committed and was replayed: runs with the
    /// `earlier` epochs may have prepared it before they stopped; remove
    /// what they left that the commit does not hold.
    async fn discard_attempts(
        &mut self,
        batch_id: u64,
        earlier: std::ops::Range<u64>,
    ) -> Result<()> {
        let _ = (batch_id, earlier);
        Ok(())
    }
}

/// Builds the sink a spec describes, for a query in `mode`.
pub fn build(spec: &SinkSpec, mode: OutputMode) -> Result<Box<dyn Sink>> {
    check(spec)?;
    if let Some(console) = &spec.console {
        return Ok(Box::new(ConsoleSink::new(console, std::io::stdout())));
    }
    if let Some(kafka) = &spec.kafka {
        return Ok(Box::new(crate::kafka::sink::KafkaSink::new(kafka)?));
    }
    if let Some(delta) = &spec.delta {
        return Ok(Box::new(DeltaSink::new(delta, mode)?));
    }
    let files = spec
        .files
        .as_ref()
        .expect("check() accepts console, files, kafka or delta");
    Ok(Box::new(FileSink::new(files, spec.format)?))
}

/// Checks that this engine has the sink a spec describes, without opening it.
pub fn check(spec: &SinkSpec) -> Result<()> {
    if let Some(files) = &spec.files {
        return crate::storage::check_location(&files.path, "spec.sink.files.path");
    }
    if let Some(delta) = &spec.delta {
        return crate::storage::check_location(&delta.path, "spec.sink.delta.path");
    }
    if spec.console.is_some() || spec.kafka.is_some() {
        return Ok(());
    }
    let kind = spec.kind().unwrap_or("unknown");
    Err(Error::Unsupported {
        path: format!("spec.sink.{kind}"),
        message: format!(
            "the {kind} sink is not implemented in this version of the engine yet: use console or files"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(path: &str) -> SinkSpec {
        serde_json::from_value(serde_json::json!({"files": {"path": path}})).unwrap()
    }

    #[test]
    fn file_output_goes_to_local_paths_and_s3() {
        assert!(check(&files("s3://bucket/out")).is_ok());
        assert!(check(&files("file:///tmp/out")).is_ok());
        assert!(check(&files("out/dir")).is_ok());
        let error = check(&files("gs://bucket/out")).unwrap_err().to_string();
        assert!(error.starts_with("spec.sink.files.path: "), "{error}");
    }
}
