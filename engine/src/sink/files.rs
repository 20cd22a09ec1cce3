//! The file sink: each batch's rows as files under a location (a local path,
//! `file://...` or `s3://bucket/prefix`), JSON lines or Parquet, and a
//! manifest per batch, as Spark's file sink keeps `_spark_metadata`:
//!
//! ```text
//! <dir>/part-<N>-<query>-<E>.jsonl | .parquet   batch N's rows, written by run (epoch) E of the query
//!                                               whose id starts with <query> (none for an empty batch)
//! <dir>/_sluice_metadata/<N>              {"batchId": N, "queryId": ..., "epoch": E, "files": [...]}
//! ```
//!
//! Prepare writes the data files under names unique to the query and the
//! run, so two runs of one query (a zombie and its replacement) never write
//! the same object, nor do two queries pointed at one directory. Commit
//! writes the manifest, create-only: it is the batch's commit in the sink.
//! The first run to create it wins; the other's files are left out of every
//! manifest and deleted. When a batch is replayed, the files earlier runs
//! prepared for it and no manifest lists are deleted. Readers that want
//! exactly the committed rows read the files the manifests list
//! ([`committed_files`]); a data file that no manifest lists belongs to a
//! batch that had not committed.
//! Local writes are fsynced (`crate::storage`).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use sluice_crds::{FileSink as FileSpec, Format};

use super::{Sink, SinkContext};
use crate::storage::{Created, Storage};
use crate::{Error, Result};

/// The folder of the per-batch manifests, inside the sink's directory.
pub const METADATA_DIR: &str = "_sluice_metadata";

/// A batch's manifest.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    batch_id: u64,
    #[serde(default)]
    query_id: String,
    #[serde(default)]
    epoch: u64,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFile {
    path: String,
    rows: u64,
    #[serde(default)]
    bytes: u64,
}

/// Writes each batch as one file and a manifest.
pub struct FileSink {
    storage: Storage,
    format: Format,
    context: SinkContext,
    /// The prepared batch and its files.
    pending: Option<(u64, Vec<ManifestFile>)>,
}

impl FileSink {
    /// A file sink writing under the spec's location.
    pub fn new(spec: &FileSpec, format: Option<Format>) -> Result<Self> {
        Ok(Self {
            storage: Storage::open(&spec.path, "spec.sink.files.path")?,
            format: format.unwrap_or(Format::Json),
            context: SinkContext::default(),
            pending: None,
        })
    }

    fn manifest_path(batch_id: u64) -> String {
        format!("{METADATA_DIR}/{batch_id}")
    }

    /// The data file batch `batch_id` gets from run `epoch` in `format`.
    fn data_file(&self, batch_id: u64, epoch: u64, format: Format) -> String {
        let query: String = self
            .context
            .query_id
            .chars()
            .filter(|c| *c != '-')
            .take(8)
            .collect();
        let ext = match format {
            Format::Parquet => "parquet",
            _ => "jsonl",
        };
        format!("part-{batch_id:08}-{query}-{epoch}.{ext}")
    }

    fn error(&self, message: String) -> Error {
        Error::Sink {
            sink: self.description(),
            message,
        }
    }
}

/// Encodes `batches` as one file's bytes.
fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match format {
        Format::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), Some(props))
                .map_err(|e| e.to_string())?;
            for batch in batches {
                writer.write(batch).map_err(|e| e.to_string())?;
            }
            writer.close().map_err(|e| e.to_string())?;
        }
        _ => {
            let mut writer = LineDelimitedWriter::new(&mut out);
            for batch in batches {
                writer.write(batch).map_err(|e| e.to_string())?;
            }
            writer.finish().map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// The data files of the committed batches of a local file sink's
/// directory, in batch order.
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

#[async_trait]
impl Sink for FileSink {
    fn description(&self) -> String {
        // NB: validate() lets the file sink write json or parquet only.
        format!("FileSink[{}, {}]", self.storage.location(), self.format)
    }

    async fn open(&mut self, context: &SinkContext) -> Result<()> {
        self.context = context.clone();
        Ok(())
    }

    async fn is_committed(&mut self, batch_id: u64) -> Result<bool> {
        self.storage.exists(&Self::manifest_path(batch_id)).await
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let mut files = Vec::new();
        if rows > 0 {
            let name = self.data_file(batch_id, self.context.epoch, self.format);
            let (format, schema, batches) = (self.format, schema.clone(), batches.to_vec());
            let bytes = tokio::task::spawn_blocking(move || encode(format, &schema, &batches))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
                .map_err(|message| {
                    self.error(format!("cannot encode batch {batch_id}: {message}"))
                })?;
            let size = bytes.len() as u64;
            self.storage.put(&name, bytes).await?;
            files.push(ManifestFile {
                path: name,
                rows,
                bytes: size,
            });
        }
        self.pending = Some((batch_id, files));
        Ok(())
    }

    async fn commit(&mut self, batch_id: u64) -> Result<()> {
        let files = match self.pending.take() {
            Some((id, files)) if id == batch_id => files,
            _ => return Err(self.error(format!("batch {batch_id} was not prepared"))),
        };
        let manifest = Manifest {
            batch_id,
            query_id: self.context.query_id.clone(),
            epoch: self.context.epoch,
            files: files.clone(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let path = Self::manifest_path(batch_id);
        let Created::Exists(theirs) = self.storage.create(&path, bytes).await? else {
            return Ok(());
        };
        let theirs: Manifest = serde_json::from_slice(&theirs)
            .map_err(|e| self.error(format!("{} is damaged: {e}", self.storage.name_of(&path))))?;
        if theirs.query_id != self.context.query_id {
            return Err(self.error(format!(
                "{} was written by another query (id {:?}): give each query its own output directory",
                self.storage.name_of(&path),
                theirs.query_id
            )));
        }
        // Another run of this query committed the batch first, with the
        // same rows: ours are left out, and go.
        for file in files {
            self.storage.delete(&file.path).await?;
        }
        Ok(())
    }

    async fn discard_attempts(
        &mut self,
        batch_id: u64,
        earlier: std::ops::Range<u64>,
    ) -> Result<()> {
        let path = Self::manifest_path(batch_id);
        let Some(bytes) = self.storage.get(&path).await? else {
            return Ok(());
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| self.error(format!("{} is damaged: {e}", self.storage.name_of(&path))))?;
        for epoch in earlier {
            for format in [Format::Json, Format::Parquet] {
                let name = self.data_file(batch_id, epoch, format);
                if !manifest.files.iter().any(|f| f.path == name) {
                    self.storage.delete(&name).await?;
                }
            }
        }
        Ok(())
    }
}
