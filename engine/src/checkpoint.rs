//! The checkpoint: Spark's offset-log / commit-log protocol on an object
//! store.
//!
//! ```text
//! <location>/metadata        the query it belongs to: id, name, sources, statePartitions
//! <location>/offsets/<N>     batch N's offsets, written create-only before the batch reads anything
//! <location>/commits/<N>     written once batch N's output is in the sink
//! ```
//!
//! Recovery: the newest `offsets/N` without `commits/N` is run again with
//! exactly its offsets; otherwise the query resumes after the newest commit.
//! `offsets/N` is written with `PutMode::Create`, so a second (zombie) run of
//! the same query fails instead of overwriting it.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// The format version of the checkpoint files.
const VERSION: u32 = 1;

/// `<location>/metadata`: which query a checkpoint belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The query's id, the same across restarts.
    pub id: String,
    /// The query's name.
    pub name: String,
    /// The sources' names, in spec order.
    pub sources: Vec<String>,
    /// `spec.statePartitions` when the checkpoint was created.
    pub state_partitions: u32,
    /// The format version.
    pub version: u32,
}

/// One source's range in a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceOffsets {
    /// The source's name.
    pub name: String,
    /// Where the batch starts.
    pub start: Value,
    /// Where it ends, exclusive.
    pub end: Value,
    /// The largest event time seen before the batch, for the watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_micros: Option<i64>,
}

/// `<location>/offsets/<N>`: what batch N reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffsetEntry {
    /// The batch.
    pub batch_id: u64,
    /// When it was planned, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Each source's range.
    pub sources: Vec<SourceOffsets>,
    /// The format version.
    pub version: u32,
}

/// `<location>/commits/<N>`: batch N is in the sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitEntry {
    /// The batch.
    pub batch_id: u64,
    /// The largest event time seen per source once the batch ran, for the
    /// watermark of the next.
    #[serde(default)]
    pub max_event_micros: BTreeMap<String, i64>,
    /// When it was committed, Unix milliseconds.
    pub timestamp_ms: i64,
    /// The format version.
    pub version: u32,
}

/// Where a query resumes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// The next batch id to run.
    pub next_batch: u64,
    /// A batch whose offsets were written but which was not committed: it is
    /// run again with exactly these offsets.
    pub replay: Option<OffsetEntry>,
    /// The newest committed batch's offsets: the sources resume at their ends.
    pub committed: Option<OffsetEntry>,
    /// The largest event time seen per source by the committed batches.
    pub max_event_micros: BTreeMap<String, i64>,
}

/// A query's checkpoint location.
pub struct Checkpoint {
    store: Arc<dyn ObjectStore>,
    location: String,
}

/// Checks that this engine can use a checkpoint location, without touching it.
pub fn check_location(location: &str) -> Result<()> {
    if let Some(rest) = location.strip_prefix("s3://")
        && rest.split('/').next().is_none_or(str::is_empty)
    {
        return Err(Error::Unsupported {
            path: "spec.checkpoint.location".into(),
            message: format!("{location:?} names no bucket: write s3://BUCKET/PREFIX"),
        });
    }
    Ok(())
}

/// An S3 store rooted at `s3://bucket/prefix`. Endpoint, region and
/// credentials come from the environment, as the AWS tools read them
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint),
/// so S3-compatible servers work and a pod takes them from a Secret.
fn s3_store(location: &str) -> Result<Arc<dyn ObjectStore>> {
    let s3 = AmazonS3Builder::from_env()
        .with_url(location)
        .build()
        .map_err(|e| Error::Checkpoint {
            file: location.to_owned(),
            message: format!("cannot open it: {e}"),
        })?;
    let prefix = location
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .map_or("", |(_, prefix)| prefix.trim_matches('/'));
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    })
}

impl Checkpoint {
    /// The object store rooted at the location (the state store writes
    /// under `state/`).
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Opens a checkpoint location: `s3://bucket/prefix`, a local path or
    /// `file://...` (a local directory is created when missing).
    pub fn open(location: &str) -> Result<Self> {
        check_location(location)?;
        if location.starts_with("s3://") {
            return Ok(Self {
                store: s3_store(location)?,
                location: location.trim_end_matches('/').to_owned(),
            });
        }
        let dir = location.strip_prefix("file://").unwrap_or(location);
        let error = |message: String| Error::Checkpoint {
            file: dir.to_owned(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| error(format!("cannot create the directory: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| error(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            location: dir.trim_end_matches('/').to_owned(),
        })
    }

    fn name_of(&self, path: &Path) -> String {
        format!("{}/{path}", self.location)
    }

    async fn read_json<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>> {
        let bytes = match self.store.get(path).await {
            Ok(result) => result.bytes().await,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => Err(err),
        }
        .map_err(|e| Error::Checkpoint {
            file: self.name_of(path),
            message: format!("cannot read it: {e}"),
        })?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Checkpoint {
            file: self.name_of(path),
            message: format!("is damaged ({e}): restore it, or point spec.checkpoint.location at a new directory to start over"),
        })
    }

    /// Writes `value` at `path`, failing if the file exists.
    async fn create_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).expect("checkpoint entries serialize");
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(Error::Checkpoint {
                file: self.name_of(path),
                message:
                    "was written by another run of this query at the same time: stop the other run"
                        .into(),
            }),
            Err(err) => Err(Error::Checkpoint {
                file: self.name_of(path),
                message: format!("cannot write it: {err}"),
            }),
        }
    }

    /// Returns the checkpoint's metadata, writing `wanted` when there is none.
    /// A checkpoint of another query, or of this query with other sources or
    /// state partitions, is refused.
    pub async fn metadata(&self, wanted: Metadata) -> Result<Metadata> {
        let path = Path::from("metadata");
        let existing = match self.read_json::<Metadata>(&path).await? {
            Some(existing) => existing,
            None => match self.create_json(&path, &wanted).await {
                Ok(()) => return Ok(wanted),
                // Another run created it first: read what it wrote.
                Err(_) => self
                    .read_json(&path)
                    .await?
                    .ok_or_else(|| Error::Checkpoint {
                        file: self.name_of(&path),
                        message: "vanished while being created".into(),
                    })?,
            },
        };
        let refuse = |message: String| Error::Checkpoint {
            file: self.name_of(&path),
            message,
        };
        if existing.name != wanted.name {
            return Err(refuse(format!(
                "belongs to the query {:?}, not {:?}: give each query its own spec.checkpoint.location",
                existing.name, wanted.name
            )));
        }
        if existing.sources != wanted.sources {
            return Err(refuse(format!(
                "was written with the sources {:?}; the spec now has {:?}: keep the sources, or start over with a new spec.checkpoint.location",
                existing.sources, wanted.sources
            )));
        }
        if existing.state_partitions != wanted.state_partitions {
            return Err(refuse(format!(
                "was written with statePartitions {}; the spec now says {}: it cannot change once a query has started",
                existing.state_partitions, wanted.state_partitions
            )));
        }
        Ok(existing)
    }

    /// The batch ids present under `dir/`, ascending.
    async fn batch_ids(&self, dir: &str) -> Result<Vec<u64>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&Path::from(dir)))
            .await
            .map_err(|e| Error::Checkpoint {
                file: format!("{}/{dir}", self.location),
                message: format!("cannot list it: {e}"),
            })?;
        let mut ids: Vec<u64> = listing
            .objects
            .iter()
            .filter_map(|o| o.location.filename()?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads where the query resumes.
    pub async fn recover(&self) -> Result<Recovery> {
        let offsets = self.batch_ids("offsets").await?;
        let commits = self.batch_ids("commits").await?;
        let last_commit = commits.last().copied();
        let Some(&last_offsets) = offsets.last() else {
            return Ok(Recovery::default());
        };
        let read_offsets = |id: u64| async move {
            let path = Path::from(format!("offsets/{id}"));
            self.read_json::<OffsetEntry>(&path)
                .await?
                .ok_or_else(|| Error::Checkpoint {
                    file: self.name_of(&path),
                    message: "vanished while being read".into(),
                })
        };
        let max_event_micros = match last_commit {
            Some(id) => {
                let path = Path::from(format!("commits/{id}"));
                self.read_json::<CommitEntry>(&path)
                    .await?
                    .map(|c| c.max_event_micros)
                    .unwrap_or_default()
            }
            None => BTreeMap::new(),
        };
        match last_commit {
            Some(committed) if committed >= last_offsets => Ok(Recovery {
                next_batch: committed + 1,
                replay: None,
                committed: Some(read_offsets(committed).await?),
                max_event_micros,
            }),
            _ => {
                let committed = match last_commit {
                    Some(id) => Some(read_offsets(id).await?),
                    None => None,
                };
                let replay = read_offsets(last_offsets).await?;
                if last_offsets != last_commit.map_or(0, |c| c + 1) {
                    return Err(Error::Checkpoint {
                        file: self.name_of(&Path::from(format!("offsets/{last_offsets}"))),
                        message: format!(
                            "follows the last commit ({}) by more than one batch: the checkpoint is damaged",
                            last_commit.map_or("none".to_owned(), |c| c.to_string())
                        ),
                    });
                }
                Ok(Recovery {
                    next_batch: last_offsets,
                    replay: Some(replay),
                    committed,
                    max_event_micros,
                })
            }
        }
    }

    /// Writes `offsets/N`, create-only, before batch N reads anything.
    pub async fn write_offsets(&self, entry: &OffsetEntry) -> Result<()> {
        self.create_json(&Path::from(format!("offsets/{}", entry.batch_id)), entry)
            .await
    }

    /// Writes `commits/N` once batch N is in the sink.
    pub async fn write_commit(
        &self,
        batch_id: u64,
        max_event_micros: BTreeMap<String, i64>,
    ) -> Result<()> {
        let entry = CommitEntry {
            batch_id,
            max_event_micros,
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            version: VERSION,
        };
        self.create_json(&Path::from(format!("commits/{batch_id}")), &entry)
            .await
    }
}

/// A new offsets entry.
pub fn offset_entry(batch_id: u64, sources: Vec<SourceOffsets>) -> OffsetEntry {
    OffsetEntry {
        batch_id,
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        sources,
        version: VERSION,
    }
}

/// New metadata for a query.
pub fn new_metadata(name: &str, sources: Vec<String>, state_partitions: u32) -> Metadata {
    Metadata {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        sources,
        state_partitions,
        version: VERSION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(batch_id: u64, end: u64) -> OffsetEntry {
        offset_entry(
            batch_id,
            vec![SourceOffsets {
                name: "s".into(),
                start: Value::from(end.saturating_sub(10)),
                end: Value::from(end),
                max_event_micros: None,
            }],
        )
    }

    #[tokio::test]
    async fn a_new_checkpoint_starts_at_batch_zero_and_keeps_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("ck");
        let cp = Checkpoint::open(location.to_str().unwrap()).unwrap();
        let first = cp
            .metadata(new_metadata("q", vec!["s".into()], 16))
            .await
            .unwrap();
        assert_eq!(cp.recover().await.unwrap(), Recovery::default());
        let again = Checkpoint::open(location.to_str().unwrap()).unwrap();
        let second = again
            .metadata(new_metadata("q", vec!["s".into()], 16))
            .await
            .unwrap();
        assert_eq!(first.id, second.id);
    }

    #[tokio::test]
    async fn an_uncommitted_batch_is_replayed_with_its_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        cp.write_commit(0, BTreeMap::new()).await.unwrap();
        cp.write_offsets(&offsets(1, 20)).await.unwrap();
        let recovery = cp.recover().await.unwrap();
        assert_eq!(recovery.next_batch, 1);
        assert_eq!(recovery.replay.unwrap().sources[0].end, Value::from(20));
        assert_eq!(recovery.committed.unwrap().sources[0].end, Value::from(10));

        cp.write_commit(1, BTreeMap::from([("s".to_owned(), 7)]))
            .await
            .unwrap();
        let recovery = cp.recover().await.unwrap();
        assert_eq!((recovery.next_batch, recovery.replay), (2, None));
        assert_eq!(recovery.max_event_micros["s"], 7);
    }

    #[tokio::test]
    async fn offsets_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        let err = cp
            .write_offsets(&offsets(0, 99))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("offsets/0") && err.contains("another run"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_querys_checkpoint_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        cp.metadata(new_metadata("orders", vec!["s".into()], 16))
            .await
            .unwrap();
        let err = cp
            .metadata(new_metadata("fraud", vec!["s".into()], 16))
            .await
            .unwrap_err()
            .to_string();
        let file = format!("{}/metadata", dir.path().display());
        assert!(
            err.contains(&file) && err.contains("belongs to the query \"orders\""),
            "{err}"
        );
        let err = cp
            .metadata(new_metadata("orders", vec!["s".into()], 8))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("statePartitions 16"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        std::fs::write(dir.path().join("offsets/0"), b"{\"batchId\": 0, trunc").unwrap();
        let err = cp.recover().await.unwrap_err().to_string();
        let file = format!("{}/offsets/0", dir.path().display());
        assert!(err.contains(&file) && err.contains("is damaged"), "{err}");
    }

    #[tokio::test]
    async fn a_gap_in_the_logs_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        cp.write_offsets(&offsets(2, 30)).await.unwrap();
        let err = cp.recover().await.unwrap_err().to_string();
        assert!(
            err.contains("offsets/2") && err.contains("damaged"),
            "{err}"
        );
    }
}
