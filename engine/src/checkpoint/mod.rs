//! The checkpoint: Spark's offset-log / commit-log protocol on a [`Storage`],
//! with fencing.
//!
//! ```text
//! <location>/metadata        the query it belongs to: id, name, sources, statePartitions, format
//! <location>/epochs/<E>      run E's claim on the checkpoint, create-only (fence.rs)
//! <location>/offsets/<N>     everything batch N reads and decides with: each source's range
//!                            (exact: a file list, per-partition offsets), both watermarks of
//!                            the batch, the epoch that planned it; written create-only before
//!                            the batch reads anything
//! <location>/commits/<N>     batch N is in the sink and its state committed: the epoch whose
//!                            state version is the committed one, and the watermark tracker
//!                            after the batch (what the next batch's watermark comes from)
//! <location>/state/...       operator state (crate::state)
//! ```
//!
//! Recovery: the newest `offsets/N` without `commits/N` is run again with
//! exactly what its entry says, nothing recomputed from the current spec;
//! otherwise the query resumes after the newest commit. Both logs keep the
//! newest [`BATCHES_TO_RETAIN`] entries (Spark's `minBatchesToRetain`).

pub mod fence;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::storage::{Created, Storage};
use crate::watermark::{BatchWatermarks, TrackerState};
use crate::{Error, Result};

/// The format version of the checkpoint files. Format 1 (offsets without
/// watermarks or epochs, state in arrow's row format) cannot be resumed.
pub const VERSION: u32 = 2;

/// How many batches the offset and commit logs keep: Spark's
/// `spark.sql.streaming.minBatchesToRetain` default.
pub const BATCHES_TO_RETAIN: u64 = 100;

/// The logs are purged once every this many batches.
const PURGE_EVERY: u64 = 10;

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
    /// Where it ends: the next batch starts there.
    pub end: Value,
    /// What exactly the batch reads, when start and end do not say it
    /// alone (a file source's file list).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// `<location>/offsets/<N>`: what batch N reads and decides with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffsetEntry {
    /// The batch.
    pub batch_id: u64,
    /// The run that planned it.
    pub epoch: u64,
    /// When it was planned, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Each source's range, in spec order.
    pub sources: Vec<SourceOffsets>,
    /// The watermarks the batch runs with.
    pub watermarks: BatchWatermarks,
    /// The format version.
    pub version: u32,
}

/// `<location>/commits/<N>`: batch N is done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitEntry {
    /// The batch.
    pub batch_id: u64,
    /// The run that committed it: its state version is the committed one.
    pub epoch: u64,
    /// That run's id.
    pub run_id: String,
    /// When it was committed, Unix milliseconds.
    pub timestamp_ms: i64,
    /// The watermark tracker once the batch ran.
    pub watermark: TrackerState,
    /// The format version.
    pub version: u32,
}

/// The last committed batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// Its offsets: the sources resume at their ends.
    pub offsets: OffsetEntry,
    /// Its commit.
    pub commit: CommitEntry,
}

/// Where a query resumes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// The next batch id to run.
    pub next_batch: u64,
    /// A batch whose offsets were written but which was not committed: it is
    /// run again with exactly this entry.
    pub replay: Option<OffsetEntry>,
    /// The newest committed batch.
    pub committed: Option<Committed>,
}

/// A query's checkpoint location.
#[derive(Clone)]
pub struct Checkpoint {
    storage: Storage,
}

impl Checkpoint {
    /// Opens a checkpoint location: `s3://bucket/prefix`, a local path or
    /// `file://...`.
    pub fn open(location: &str) -> Result<Self> {
        Ok(Self {
            storage: Storage::open(location, "spec.checkpoint.location")?,
        })
    }

    /// The storage at the location (state and fencing write under it too).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    async fn read_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        let Some(bytes) = self.storage.get(path).await? else {
            return Ok(None);
        };
        parse(&self.storage, path, &bytes).map(Some)
    }

    /// The JSON object at `path`, which must be there.
    pub(crate) async fn read_existing<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.read_json(path)
            .await?
            .ok_or_else(|| Error::Checkpoint {
                file: self.storage.name_of(path),
                message: "vanished while being read: is another run of this query purging it?"
                    .into(),
            })
    }

    /// Writes `value` at `path`, create-only: another run that wrote it
    /// first makes this run stop.
    async fn create_json<T: Serialize>(&self, path: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).expect("checkpoint entries serialize");
        match self.storage.create(path, bytes).await? {
            Created::Written => Ok(()),
            Created::Exists(_) => Err(Error::Fenced {
                message: format!(
                    "{} was written by another run of this query: this run stops and leaves the query to it",
                    self.storage.name_of(path)
                ),
            }),
        }
    }

    /// Returns the checkpoint's metadata, writing `wanted` when there is none.
    /// A checkpoint of another query, of this query with other sources or
    /// state partitions, or of an older format is refused.
    pub async fn metadata(&self, wanted: Metadata) -> Result<Metadata> {
        let path = "metadata";
        let refuse = |message: String| Error::Checkpoint {
            file: self.storage.name_of(path),
            message,
        };
        let bytes = serde_json::to_vec_pretty(&wanted).expect("metadata serializes");
        let existing: Metadata = match self.storage.get(path).await? {
            Some(bytes) => parse_metadata(&self.storage, &bytes)?,
            None => match self.storage.create(path, bytes).await? {
                Created::Written => return Ok(wanted),
                // Another run created it first: check what it wrote.
                Created::Exists(bytes) => parse_metadata(&self.storage, &bytes)?,
            },
        };
        if existing.version != VERSION {
            return Err(refuse(format!(
                "was written by a Sluice whose checkpoint format is {} (this one writes {VERSION}) and cannot be resumed: point spec.checkpoint.location at a new location to start over",
                existing.version
            )));
        }
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
        self.storage.list_numbered(dir).await
    }

    /// The newest committed batch's id, if any (one listing).
    pub async fn newest_commit(&self) -> Result<Option<u64>> {
        Ok(self.batch_ids("commits").await?.last().copied())
    }

    /// Reads where the query resumes.
    pub async fn recover(&self) -> Result<Recovery> {
        let offsets = self.batch_ids("offsets").await?;
        let commits = self.batch_ids("commits").await?;
        let last_commit = commits.last().copied();
        let Some(&last_offsets) = offsets.last() else {
            return Ok(Recovery::default());
        };
        let committed = match last_commit {
            Some(id) => Some(Committed {
                offsets: self.read_offsets(id).await?,
                commit: self.read_existing(&format!("commits/{id}")).await?,
            }),
            None => None,
        };
        if let Some(c) = last_commit
            && c >= last_offsets
        {
            return Ok(Recovery {
                next_batch: c + 1,
                replay: None,
                committed,
            });
        }
        let expected = last_commit.map_or(0, |c| c + 1);
        if last_offsets != expected {
            return Err(Error::Checkpoint {
                file: self.storage.name_of(&format!("offsets/{last_offsets}")),
                message: format!(
                    "follows the last commit ({}) by more than one batch: the checkpoint is damaged",
                    last_commit.map_or("none".to_owned(), |c| c.to_string())
                ),
            });
        }
        Ok(Recovery {
            next_batch: last_offsets,
            replay: Some(self.read_offsets(last_offsets).await?),
            committed,
        })
    }

    /// Where the source `name` started, if the query ever started.
    pub async fn read_initial(&self, name: &str) -> Result<Option<Value>> {
        self.read_json(&format!("sources/{name}/initial")).await
    }

    /// Where the source `name` of a new replica starts: `given` (its slice
    /// of a generation's starts) written to `sources/<name>/initial`
    /// create-only, or, when null or already written, as
    /// [`Checkpoint::initial_offset`].
    pub async fn initial_offset_given(
        &self,
        name: &str,
        given: &Value,
        source: &mut dyn crate::source::Source,
    ) -> Result<Value> {
        if !given.is_null() {
            let bytes = serde_json::to_vec_pretty(given).expect("offsets serialize");
            let path = format!("sources/{name}/initial");
            return match self.storage.create(&path, bytes).await? {
                Created::Written => Ok(given.clone()),
                Created::Exists(theirs) => parse(&self.storage, &path, &theirs),
            };
        }
        self.initial_offset(name, source).await
    }

    /// Where the source `name` of a new query starts: read from
    /// `sources/<name>/initial`, or resolved by the source and written there
    /// (create-only) when the query first starts.
    pub async fn initial_offset(
        &self,
        name: &str,
        source: &mut dyn crate::source::Source,
    ) -> Result<Value> {
        let path = format!("sources/{name}/initial");
        if let Some(value) = self.read_json::<Value>(&path).await? {
            return Ok(value);
        }
        let resolved = source.resolve_start(&source.initial_offset()).await?;
        let bytes = serde_json::to_vec_pretty(&resolved).expect("offsets serialize");
        match self.storage.create(&path, bytes).await? {
            Created::Written => Ok(resolved),
            // Another run resolved it first.
            Created::Exists(theirs) => parse(&self.storage, &path, &theirs),
        }
    }

    /// Batch `id`'s offsets entry.
    pub async fn read_offsets(&self, id: u64) -> Result<OffsetEntry> {
        let path = format!("offsets/{id}");
        let entry: OffsetEntry = self.read_existing(&path).await?;
        if entry.batch_id != id {
            return Err(Error::Checkpoint {
                file: self.storage.name_of(&path),
                message: format!("holds batch {}: the checkpoint is damaged", entry.batch_id),
            });
        }
        Ok(entry)
    }

    /// Batch `id`'s commit entry, if it was committed (and not purged).
    pub async fn read_commit(&self, id: u64) -> Result<Option<CommitEntry>> {
        self.read_json(&format!("commits/{id}")).await
    }

    /// Writes `offsets/N`, create-only, before batch N reads anything.
    pub async fn write_offsets(&self, entry: &OffsetEntry) -> Result<()> {
        self.create_json(&format!("offsets/{}", entry.batch_id), entry)
            .await
    }

    /// Writes `commits/N`, create-only, once batch N is in the sink and its
    /// state committed.
    pub async fn write_commit(&self, entry: &CommitEntry) -> Result<()> {
        self.create_json(&format!("commits/{}", entry.batch_id), entry)
            .await
    }

    /// After batch `committed` committed: once every [`PURGE_EVERY`]
    /// batches, deletes the log entries older than the newest
    /// [`BATCHES_TO_RETAIN`].
    pub async fn purge(&self, committed: u64) -> Result<()> {
        if committed % PURGE_EVERY != PURGE_EVERY - 1 || committed < BATCHES_TO_RETAIN {
            return Ok(());
        }
        let keep_from = committed + 1 - BATCHES_TO_RETAIN;
        for dir in ["commits", "offsets"] {
            for id in self.batch_ids(dir).await? {
                if id >= keep_from {
                    break;
                }
                self.storage.delete(&format!("{dir}/{id}")).await?;
            }
        }
        Ok(())
    }
}

fn parse<T: DeserializeOwned>(storage: &Storage, path: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Checkpoint {
        file: storage.name_of(path),
        message: format!(
            "is damaged ({e}): restore it, or point spec.checkpoint.location at a new location to start over"
        ),
    })
}

fn parse_metadata(storage: &Storage, bytes: &[u8]) -> Result<Metadata> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version = parse(storage, "metadata", bytes)?;
    if version.version != VERSION {
        return Err(Error::Checkpoint {
            file: storage.name_of("metadata"),
            message: format!(
                "was written by a Sluice whose checkpoint format is {} (this one writes {VERSION}) and cannot be resumed: point spec.checkpoint.location at a new location to start over",
                version.version
            ),
        });
    }
    parse(storage, "metadata", bytes)
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
        OffsetEntry {
            batch_id,
            epoch: 1,
            timestamp_ms: 0,
            sources: vec![SourceOffsets {
                name: "s".into(),
                start: Value::from(end.saturating_sub(10)),
                end: Value::from(end),
                detail: Value::Null,
            }],
            watermarks: BatchWatermarks::default(),
            version: VERSION,
        }
    }

    fn commit(batch_id: u64) -> CommitEntry {
        CommitEntry {
            batch_id,
            epoch: 1,
            run_id: "r".into(),
            timestamp_ms: 0,
            watermark: TrackerState::default(),
            version: VERSION,
        }
    }

    fn open(dir: &std::path::Path) -> Checkpoint {
        Checkpoint::open(dir.to_str().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_new_checkpoint_starts_at_batch_zero_and_keeps_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("ck");
        let cp = open(&location);
        let first = cp
            .metadata(new_metadata("q", vec!["s".into()], 16))
            .await
            .unwrap();
        assert_eq!(cp.recover().await.unwrap(), Recovery::default());
        let second = open(&location)
            .metadata(new_metadata("q", vec!["s".into()], 16))
            .await
            .unwrap();
        assert_eq!(first.id, second.id);
    }

    #[tokio::test]
    async fn an_uncommitted_batch_is_replayed_with_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        cp.write_commit(&commit(0)).await.unwrap();
        cp.write_offsets(&offsets(1, 20)).await.unwrap();
        let recovery = cp.recover().await.unwrap();
        assert_eq!(recovery.next_batch, 1);
        assert_eq!(recovery.replay.unwrap().sources[0].end, Value::from(20));
        assert_eq!(
            recovery.committed.unwrap().offsets.sources[0].end,
            Value::from(10)
        );

        cp.write_commit(&commit(1)).await.unwrap();
        let recovery = cp.recover().await.unwrap();
        assert_eq!((recovery.next_batch, recovery.replay), (2, None));
    }

    #[tokio::test]
    async fn entries_are_written_once_and_a_second_writer_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        // The same entry again is a retry of the same write.
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        let err = cp.write_offsets(&offsets(0, 99)).await.unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("offsets/0") && err.contains("another run"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_querys_or_an_older_formats_checkpoint_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
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

        let old = tempfile::tempdir().unwrap();
        std::fs::write(
            old.path().join("metadata"),
            r#"{"id": "x", "name": "orders", "sources": ["s"], "statePartitions": 16, "version": 1}"#,
        )
        .unwrap();
        let err = open(old.path())
            .metadata(new_metadata("orders", vec!["s".into()], 16))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoint format is 1"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        std::fs::write(dir.path().join("offsets/0"), b"{\"batchId\": 0, trunc").unwrap();
        let err = cp.recover().await.unwrap_err().to_string();
        let file = format!("{}/offsets/0", dir.path().display());
        assert!(err.contains(&file) && err.contains("is damaged"), "{err}");
    }

    #[tokio::test]
    async fn a_gap_in_the_logs_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
        cp.write_offsets(&offsets(0, 10)).await.unwrap();
        cp.write_commit(&commit(0)).await.unwrap();
        cp.write_offsets(&offsets(2, 30)).await.unwrap();
        let err = cp.recover().await.unwrap_err().to_string();
        assert!(
            err.contains("offsets/2") && err.contains("damaged"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_logs_keep_the_newest_batches() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path());
        for id in 0..=119 {
            cp.write_offsets(&offsets(id, id * 10)).await.unwrap();
            cp.write_commit(&commit(id)).await.unwrap();
            cp.purge(id).await.unwrap();
        }
        let kept = cp.batch_ids("offsets").await.unwrap();
        assert_eq!(kept.first(), Some(&20));
        assert_eq!(kept.len(), 100);
        assert_eq!(cp.batch_ids("commits").await.unwrap().first(), Some(&20));
        let recovery = cp.recover().await.unwrap();
        assert_eq!(recovery.next_batch, 120);
    }
}
