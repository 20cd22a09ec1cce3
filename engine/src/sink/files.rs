//! The file sink: each batch's rows as a file in a directory, JSON lines or
//! Parquet, and a manifest per batch, as Spark's file sink keeps
//! `_spark_metadata`:
//!
//! ```text
//! <dir>/part-<N>.jsonl | .parquet      batch N's rows (none for an empty batch)
//! <dir>/_sluice_metadata/<N>           {"batchId": N, "files": [{"path": ..., "rows": ...}]}
//! ```
//!
//! Every file is written under a hidden temporary name and renamed into place,
//! so no reader sees half a file. The manifest is written last: it is the
//! batch's commit in the sink. A batch whose manifest exists is not written
//! again, so a batch replayed after a crash adds nothing twice; a data file
//! without a manifest belongs to a batch that did not finish and is replaced
//! when the batch is run again. Readers that want exactly the committed rows
//! read the files the manifests list ([`committed_files`]).

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

/// The folder of the per-batch manifests, inside the sink's directory.
pub const METADATA_DIR: &str = "_sluice_metadata";

/// A batch's manifest.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    batch_id: u64,
    files: Vec<ManifestFile>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFile {
    path: String,
    rows: u64,
}

/// The data files of the committed batches of a file sink's directory, in
/// batch order.
pub fn committed_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut manifests: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir.join(METADATA_DIR))? {
        let path = entry?.path();
        if let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
        {
            manifests.push((id, path));
        }
    }
    manifests.sort();
    let mut files = Vec::new();
    for (_, path) in manifests {
        let manifest: Manifest = serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        files.extend(manifest.files.into_iter().map(|f| dir.join(f.path)));
    }
    Ok(files)
}

/// Writes `bytes` to `path` through a hidden temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[async_trait]
impl Sink for FileSink {
    fn description(&self) -> String {
        // NB: validate() lets the file sink write json or parquet only.
        format!("FileSink[{}, {}]", self.dir.display(), self.format)
    }

    async fn add_batch(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let name = self.file_name(batch_id);
        let dir = self.dir.clone();
        let (format, schema, batches) = (self.format, schema.clone(), batches.to_vec());
        tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            let manifest_path = dir.join(METADATA_DIR).join(batch_id.to_string());
            if manifest_path.exists() {
                // Committed before a crash: the batch is replayed, not rewritten.
                return Ok(());
            }
            let mut files = Vec::new();
            if rows > 0 {
                let tmp = dir.join(format!(".{name}.tmp"));
                let target = dir.join(&name);
                write_file(&tmp, format, &schema, &batches)?;
                std::fs::rename(&tmp, &target)
                    .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
                files.push(ManifestFile { path: name, rows });
            }
            crate::fault::point("sink-data", batch_id);
            std::fs::create_dir_all(dir.join(METADATA_DIR)).map_err(|e| e.to_string())?;
            let manifest =
                serde_json::to_vec(&Manifest { batch_id, files }).expect("a manifest serializes");
            write_atomically(&manifest_path, &manifest)
                .map_err(|e| format!("cannot write {}: {e}", manifest_path.display()))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .map_err(|message| Error::Sink {
            sink: self.description(),
            message,
        })
    }
}
