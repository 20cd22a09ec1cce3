//! Sinks: where each batch's result goes.

mod console;
mod files;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use sluice_crds::Sink as SinkSpec;

pub use console::ConsoleSink;
pub use files::{FileSink, METADATA_DIR, committed_files, write_atomically};

use crate::{Error, Result};

/// A streaming sink.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Says what the sink is, for progress reports.
    fn description(&self) -> String;
    /// Writes one batch's result.
    async fn add_batch(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()>;
}

/// Builds the sink a spec describes.
pub fn build(spec: &SinkSpec) -> Result<Box<dyn Sink>> {
    check(spec)?;
    if let Some(console) = &spec.console {
        return Ok(Box::new(ConsoleSink::new(console, std::io::stdout())));
    }
    let files = spec
        .files
        .as_ref()
        .expect("check() accepts console or files only");
    Ok(Box::new(FileSink::new(files, spec.format)?))
}

/// Checks that this engine has the sink a spec describes, without opening it.
pub fn check(spec: &SinkSpec) -> Result<()> {
    if let Some(files) = &spec.files
        && let Some((scheme, _)) = files.path.split_once("://")
        && scheme != "file"
    {
        return Err(Error::Unsupported {
            path: "spec.sink.files.path".to_owned(),
            message: format!(
                "the files sink writes to a local path (or file://) in this version of the engine; {scheme}:// output is not implemented yet"
            ),
        });
    }
    if spec.console.is_some() || spec.files.is_some() {
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
    fn object_store_output_is_refused_until_it_is_built() {
        let error = check(&files("s3://bucket/out")).unwrap_err().to_string();
        assert!(error.contains("spec.sink.files.path"), "{error}");
        assert!(
            error.contains("s3:// output is not implemented yet"),
            "{error}"
        );
        assert!(check(&files("file:///tmp/out")).is_ok());
        assert!(check(&files("out/dir")).is_ok());
    }
}
