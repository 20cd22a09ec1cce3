//! The file sink: each batch's rows as a file in a directory, JSON lines or
//! Parquet. A file is written under a hidden temporary name and renamed into
//! place, so a reader never sees half a file.
//!
//! NB: this sink is at-least-once: a batch replayed after a crash writes its
//! file again under the same name. Exactly-once output (a manifest per batch)
//! comes with the checkpoint protocol.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use sluice_crds::{FileSink as FileSpec, Format};

use super::Sink;
use crate::{Error, Result};

/// Writes each batch as one file.
pub struct FileSink {
    dir: PathBuf,
    format: Format,
}

impl FileSink {
    /// A file sink writing under the spec's directory, which is created.
    pub fn new(spec: &FileSpec, format: Option<Format>) -> Result<Self> {
        let dir = PathBuf::from(spec.path.strip_prefix("file://").unwrap_or(&spec.path));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Sink {
            sink: format!("files at {}", dir.display()),
            message: format!("cannot create the directory: {e}"),
        })?;
        Ok(Self {
            dir,
            format: format.unwrap_or(Format::Json),
        })
    }

    /// The name of batch `batch_id`'s file.
    pub fn file_name(&self, batch_id: u64) -> String {
        let ext = match self.format {
            Format::Parquet => "parquet",
            _ => "jsonl",
        };
        format!("part-{batch_id:08}.{ext}")
    }
}

/// Writes `batches` to a new file at `path`, flushed to disk.
fn write_file(
    path: &Path,
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> std::result::Result<(), String> {
    let file = File::create(path).map_err(|e| e.to_string())?;
    let file = match format {
        Format::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
                .map_err(|e| e.to_string())?;
            for batch in batches {
                writer.write(batch).map_err(|e| e.to_string())?;
            }
            writer.into_inner().map_err(|e| e.to_string())?
        }
        _ => {
            let mut writer = LineDelimitedWriter::new(BufWriter::new(file));
            for batch in batches {
                writer.write(batch).map_err(|e| e.to_string())?;
            }
            writer.finish().map_err(|e| e.to_string())?;
            writer
                .into_inner()
                .into_inner()
                .map_err(|e| e.to_string())?
        }
    };
    file.sync_all().map_err(|e| e.to_string())
}

#[async_trait]
impl Sink for FileSink {
    fn description(&self) -> String {
        let format = match self.format {
            Format::Parquet => "parquet",
            _ => "json",
        };
        format!("FileSink[{}, {format}]", self.dir.display())
    }

    async fn add_batch(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(());
        }
        let name = self.file_name(batch_id);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let target = self.dir.join(&name);
        let (format, schema, batches, dest) = (
            self.format,
            schema.clone(),
            batches.to_vec(),
            target.clone(),
        );
        tokio::task::spawn_blocking(move || {
            write_file(&tmp, format, &schema, &batches)?;
            std::fs::rename(&tmp, &dest).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .map_err(|message| Error::Sink {
            sink: self.description(),
            message: format!("cannot write {}: {message}", target.display()),
        })
    }
}
