//! The file sink: each batch's rows as files under a location (a local path,
//! `file://...` or `s3://bucket/prefix`), JSON lines or Parquet, and a
//! manifest per batch, as Spark's file sink keeps `_spark_metadata`:
//!
//! ```text
//! <dir>/[col=value/...]part-<N>-<query>-<E>-<k>.jsonl | .parquet
//!                                        batch N's rows, file k, written by run (epoch) E of the
//!                                        query whose id starts with <query>; with partitionBy, under
//!                                        one directory per partition value, as Spark writes them
//! <dir>/_sluice_metadata/<N>             {"batchId": N, "queryId": ..., "epoch": E, "files": [...]}
//! <dir>/_sluice_metadata/<N>.compact     every 10 batches: the files of every batch up to N
//! ```
//!
//! Prepare writes the data files under names unique to the query and the
//! run, so two runs of one query (a zombie and its replacement) never write
//! the same object, nor do two queries pointed at one directory; a file is
//! closed at `targetFileSize`. Commit writes the manifest, create-only: it
//! is the batch's commit in the sink. The first run to create it wins; the
//! other's files are left out of every manifest and deleted. When a batch is
//! replayed, the files earlier runs prepared for it and no manifest lists
//! are deleted. Every 10 batches a compact manifest lists every committed
//! file so far, so that readers read one file and the few manifests after it
//! (Spark's `_spark_metadata` compaction); manifests older than the offset
//! log's retention are deleted. Readers that want exactly the committed rows
//! read the files the manifests list ([`committed_files`]); a data file that
//! no manifest lists belongs to a batch that had not committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use sluice_crds::duration::parse_bytes;
use sluice_crds::{FileSink as FileSpec, Format};

use super::{Sink, SinkContext};
use crate::checkpoint::BATCHES_TO_RETAIN;
use crate::storage::{Created, Storage};
use crate::{Error, Result};

/// The folder of the per-batch manifests, inside the sink's directory.
pub const METADATA_DIR: &str = "_sluice_metadata";

/// A compact manifest is written once every this many batches.
const COMPACT_EVERY: u64 = 10;

/// The file size a data file is closed at, by default.
const DEFAULT_TARGET_FILE_SIZE: u64 = 128 << 20;

/// Rows encoded at once, between checks of a file's size.
const CHUNK_ROWS: usize = 1024;

/// Spark's name for a null partition value.
const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// A batch's manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    batch_id: u64,
    #[serde(default)]
    query_id: String,
    #[serde(default)]
    epoch: u64,
    files: Vec<ManifestFile>,
}

/// A compact manifest: every batch's files up to `compacted_through`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Compact {
    compacted_through: u64,
    batches: Vec<Manifest>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFile {
    path: String,
    rows: u64,
    #[serde(default)]
    bytes: u64,
}

/// Writes each batch as files and a manifest.
pub struct FileSink {
    storage: Storage,
    format: Format,
    partition_by: Vec<String>,
    target_size: u64,
    context: SinkContext,
    /// The prepared batch and its files.
    pending: Option<(u64, Vec<ManifestFile>)>,
}

/// Spark's escaping of a partition value in a path
/// (`ExternalCatalogUtils.escapePathName`).
fn escape_path_name(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() || "\"#%'*/:=?\\\u{7f}{[]^".contains(c) {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl FileSink {
    /// A file sink writing under the spec's location.
    pub fn new(spec: &FileSpec, format: Option<Format>) -> Result<Self> {
        let target_size = match &spec.target_file_size {
            Some(text) => parse_bytes(text).map_err(|message| Error::Unsupported {
                path: "spec.sink.files.targetFileSize".into(),
                message,
            })?,
            None => DEFAULT_TARGET_FILE_SIZE,
        };
        Ok(Self {
            storage: Storage::open(&spec.path, "spec.sink.files.path")?,
            format: format.unwrap_or(Format::Json),
            partition_by: spec.partition_by.clone(),
            target_size,
            context: SinkContext::default(),
            pending: None,
        })
    }

    fn manifest_path(batch_id: u64) -> String {
        format!("{METADATA_DIR}/{batch_id}")
    }

    fn compact_path(batch_id: u64) -> String {
        format!("{METADATA_DIR}/{batch_id}.compact")
    }

    /// The start of the names of batch `batch_id`'s data files from run
    /// `epoch`.
    fn file_prefix(&self, batch_id: u64, epoch: u64) -> String {
        let query: String = self
            .context
            .query_id
            .chars()
            .filter(|c| *c != '-')
            .take(8)
            .collect();
        format!("part-{batch_id:08}-{query}-{epoch}-")
    }

    fn extension(&self) -> &'static str {
        match self.format {
            Format::Parquet => "parquet",
            _ => "jsonl",
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Sink {
            sink: self.description(),
            message,
        }
    }

    /// Splits the result by the partition columns' values: each group's
    /// directory (`col=value/...`) and its rows without those columns.
    fn partitions(
        &self,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<Vec<(String, Vec<RecordBatch>)>> {
        if self.partition_by.is_empty() {
            return Ok(vec![(String::new(), batches.to_vec())]);
        }
        let mut positions = Vec::new();
        for name in &self.partition_by {
            positions.push(schema.index_of(name).map_err(|_| Error::Unsupported {
                path: "spec.sink.files.partitionBy".into(),
                message: format!(
                    "{name:?} is not a column of the query's result ({})",
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?);
        }
        let kept: Vec<usize> = (0..schema.fields().len())
            .filter(|i| !positions.contains(i))
            .collect();
        let data_schema = std::sync::Arc::new(Schema::new(
            kept.iter()
                .map(|i| schema.field(*i).clone())
                .collect::<Vec<_>>(),
        ));
        let options = FormatOptions::default().with_null(NULL_PARTITION);
        let mut groups: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
        for batch in batches {
            let formatters = positions
                .iter()
                .map(|i| ArrayFormatter::try_new(batch.column(*i).as_ref(), &options))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| self.error(e.to_string()))?;
            let mut rows: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for row in 0..batch.num_rows() {
                let dir: Vec<String> = self
                    .partition_by
                    .iter()
                    .zip(&formatters)
                    .zip(&positions)
                    .map(|((name, f), i)| {
                        let value = if batch.column(*i).is_null(row) {
                            NULL_PARTITION.to_owned()
                        } else {
                            escape_path_name(&f.value(row).to_string())
                        };
                        format!("{}={value}", escape_path_name(name))
                    })
                    .collect();
                rows.entry(dir.join("/")).or_default().push(row as u32);
            }
            for (dir, indices) in rows {
                let taken = take_record_batch(batch, &UInt32Array::from(indices))
                    .map_err(|e| self.error(e.to_string()))?;
                let columns = kept.iter().map(|i| taken.column(*i).clone()).collect();
                let data = RecordBatch::try_new(data_schema.clone(), columns)
                    .map_err(|e| self.error(e.to_string()))?;
                groups.entry(dir).or_default().push(data);
            }
        }
        Ok(groups.into_iter().collect())
    }

    /// Every committed manifest, by batch (the latest compact and those
    /// after it).
    async fn committed(&self) -> Result<BTreeMap<u64, Manifest>> {
        let names = self.storage.list_names(METADATA_DIR).await?;
        let mut out = BTreeMap::new();
        let latest_compact = names
            .iter()
            .filter_map(|n| n.strip_suffix(".compact")?.parse::<u64>().ok())
            .max();
        if let Some(c) = latest_compact {
            let path = Self::compact_path(c);
            if let Some(bytes) = self.storage.get(&path).await? {
                let compact: Compact = serde_json::from_slice(&bytes).map_err(|e| {
                    self.error(format!("{} is damaged: {e}", self.storage.name_of(&path)))
                })?;
                out.extend(compact.batches.into_iter().map(|m| (m.batch_id, m)));
            }
        }
        for id in names.iter().filter_map(|n| n.parse::<u64>().ok()) {
            if latest_compact.is_some_and(|c| id <= c) {
                continue;
            }
            let path = Self::manifest_path(id);
            if let Some(bytes) = self.storage.get(&path).await? {
                let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                    self.error(format!("{} is damaged: {e}", self.storage.name_of(&path)))
                })?;
                out.insert(id, manifest);
            }
        }
        Ok(out)
    }

    /// After batch `batch_id` committed: every [`COMPACT_EVERY`] batches, a
    /// compact manifest of every batch so far; manifests older than the
    /// retention go.
    async fn compact(&self, batch_id: u64) -> Result<()> {
        if batch_id % COMPACT_EVERY != COMPACT_EVERY - 1 {
            return Ok(());
        }
        let batches: Vec<Manifest> = self
            .committed()
            .await?
            .into_values()
            .filter(|m| m.batch_id <= batch_id)
            .collect();
        let compact = Compact {
            compacted_through: batch_id,
            batches,
        };
        let bytes = serde_json::to_vec(&compact).expect("a compact manifest serializes");
        self.storage
            .put(&Self::compact_path(batch_id), bytes)
            .await?;
        for name in self.storage.list_names(METADATA_DIR).await? {
            let old_compact = name
                .strip_suffix(".compact")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|c| c < batch_id);
            let old_manifest = name
                .parse::<u64>()
                .is_ok_and(|id| id + BATCHES_TO_RETAIN <= batch_id);
            if old_compact || old_manifest {
                self.storage
                    .delete(&format!("{METADATA_DIR}/{name}"))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Writes `batches` as files closed at `target` bytes: each file's bytes and
/// rows.
fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    target: u64,
) -> std::result::Result<Vec<(Vec<u8>, u64)>, String> {
    let chunks = batches.iter().flat_map(|b| {
        (0..b.num_rows())
            .step_by(CHUNK_ROWS)
            .map(move |at| b.slice(at, CHUNK_ROWS.min(b.num_rows() - at)))
    });
    let mut files = Vec::new();
    match format {
        Format::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut writer: Option<(ArrowWriter<Vec<u8>>, u64)> = None;
            for chunk in chunks {
                let (w, rows) = match &mut writer {
                    Some(w) => w,
                    None => writer.insert((
                        ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone()))
                            .map_err(|e| e.to_string())?,
                        0,
                    )),
                };
                w.write(&chunk).map_err(|e| e.to_string())?;
                *rows += chunk.num_rows() as u64;
                if (w.bytes_written() + w.in_progress_size()) as u64 >= target {
                    let (w, rows) = writer.take().expect("open");
                    files.push((w.into_inner().map_err(|e| e.to_string())?, rows));
                }
            }
            if let Some((w, rows)) = writer {
                files.push((w.into_inner().map_err(|e| e.to_string())?, rows));
            }
        }
        _ => {
            let mut current: (Vec<u8>, u64) = (Vec::new(), 0);
            for chunk in chunks {
                let mut writer = LineDelimitedWriter::new(&mut current.0);
                writer.write(&chunk).map_err(|e| e.to_string())?;
                writer.finish().map_err(|e| e.to_string())?;
                current.1 += chunk.num_rows() as u64;
                if current.0.len() as u64 >= target {
                    files.push(std::mem::take(&mut current));
                }
            }
            if current.1 > 0 {
                files.push(current);
            }
        }
    }
    Ok(files)
}

/// The data files of the committed batches of a local file sink's
/// directory, in batch order.
pub fn committed_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let invalid = |path: &Path, e: serde_json::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    let mut batches: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir.join(METADATA_DIR))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    let latest_compact = names
        .iter()
        .filter_map(|n| n.strip_suffix(".compact")?.parse::<u64>().ok())
        .max();
    if let Some(c) = latest_compact {
        let path = dir.join(METADATA_DIR).join(format!("{c}.compact"));
        let compact: Compact =
            serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| invalid(&path, e))?;
        batches.extend(compact.batches.into_iter().map(|m| (m.batch_id, m)));
    }
    for id in names.iter().filter_map(|n| n.parse::<u64>().ok()) {
        if latest_compact.is_some_and(|c| id <= c) {
            continue;
        }
        let path = dir.join(METADATA_DIR).join(id.to_string());
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| invalid(&path, e))?;
        batches.insert(id, manifest);
    }
    Ok(batches
        .into_values()
        .flat_map(|m| m.files.into_iter().map(|f| dir.join(f.path)))
        .collect())
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
        if self.storage.exists(&Self::manifest_path(batch_id)).await? {
            return Ok(true);
        }
        // Compacted and deleted since.
        Ok(self
            .storage
            .list_names(METADATA_DIR)
            .await?
            .iter()
            .filter_map(|n| n.strip_suffix(".compact")?.parse::<u64>().ok())
            .any(|c| c >= batch_id))
    }

    async fn prepare(
        &mut self,
        batch_id: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let groups = self.partitions(schema, batches)?;
        let prefix = self.file_prefix(batch_id, self.context.epoch);
        let ext = self.extension();
        let mut files = Vec::new();
        let mut k = 0;
        for (dir, rows) in groups {
            if rows.iter().all(|b| b.num_rows() == 0) {
                continue;
            }
            let data_schema = rows[0].schema();
            let (format, target) = (self.format, self.target_size);
            let encoded =
                tokio::task::spawn_blocking(move || encode(format, &data_schema, &rows, target))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                    .map_err(|message| {
                        self.error(format!("cannot encode batch {batch_id}: {message}"))
                    })?;
            for (bytes, rows) in encoded {
                let name = format!("{prefix}{k:05}.{ext}");
                let path = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                k += 1;
                let size = bytes.len() as u64;
                self.storage.put(&path, bytes).await?;
                files.push(ManifestFile {
                    path,
                    rows,
                    bytes: size,
                });
            }
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
            return self.compact(batch_id).await;
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
        let Some(manifest) = self.committed().await?.remove(&batch_id) else {
            return Ok(());
        };
        let prefixes: Vec<String> = earlier
            .map(|epoch| self.file_prefix(batch_id, epoch))
            .collect();
        for object in self.storage.list("").await? {
            let path = object.location.as_ref();
            let name = path.rsplit('/').next().unwrap_or(path);
            if prefixes.iter().any(|p| name.starts_with(p))
                && !manifest.files.iter().any(|f| f.path == path)
            {
                self.storage.delete(path).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field};

    use super::*;

    #[test]
    fn partition_values_are_escaped_as_spark_escapes_them() {
        assert_eq!(
            escape_path_name("2026-01-01 10:00:00"),
            "2026-01-01 10%3A00%3A00"
        );
        assert_eq!(escape_path_name("a/b=c"), "a%2Fb%3Dc");
        assert_eq!(escape_path_name("plain"), "plain");
    }

    #[tokio::test]
    async fn output_is_partitioned_split_at_the_target_size_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let spec: FileSpec = serde_json::from_value(serde_json::json!({
            "path": dir.path().display().to_string(),
            "partitionBy": ["country"],
            "targetFileSize": "2KiB",
        }))
        .unwrap();
        let mut sink = FileSink::new(&spec, Some(Format::Json)).unwrap();
        sink.open(&SinkContext {
            query_id: "q1".into(),
            run_id: "r".into(),
            epoch: 1,
            ..SinkContext::default()
        })
        .await
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("country", DataType::Utf8, true),
        ]));
        let n = 20_000;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from((0..n).collect::<Vec<i64>>())),
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|i| match i % 3 {
                            0 => Some("fr"),
                            1 => Some("de/x"),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        for id in 0..10 {
            let rows = if id == 0 {
                vec![batch.clone()]
            } else {
                Vec::new()
            };
            sink.prepare(id, &schema, &rows).await.unwrap();
            sink.commit(id).await.unwrap();
        }
        let files = committed_files(dir.path()).unwrap();
        assert!(
            files.len() > 3,
            "several files per partition: {}",
            files.len()
        );
        let dirs: std::collections::BTreeSet<String> = files
            .iter()
            .map(|f| {
                f.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            dirs.into_iter().collect::<Vec<_>>(),
            [
                "country=__HIVE_DEFAULT_PARTITION__",
                "country=de%2Fx",
                "country=fr"
            ]
        );
        let rows: usize = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
            .sum();
        assert_eq!(rows, n as usize);
        let first = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            !first.contains("country"),
            "the partition column is in the path only"
        );
        assert!(dir.path().join("_sluice_metadata/9.compact").exists());
        assert!(sink.is_committed(3).await.unwrap());
        assert!(!sink.is_committed(10).await.unwrap());
    }
}
