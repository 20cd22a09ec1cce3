//! The state store: operator state in RocksDB, split into `statePartitions`
//! by key hash (one RocksDB instance each), checkpointed incrementally to the
//! query's checkpoint location.
//!
//! ```text
//! <checkpoint>/state/<operator>/v<N>.json        the manifest of version N (batch N):
//!                                                every partition's files, rows in state
//! <checkpoint>/state/<operator>/<p>/<name>.sst   SST files, immutable, uploaded once
//! <checkpoint>/state/<operator>/<p>/v<N>/<name>  the other files of partition p's version N
//!                                                (MANIFEST, CURRENT, OPTIONS)
//! ```
//!
//! Committing version N takes a RocksDB checkpoint of each partition changed
//! since the last version (a flush, then hard links), uploads the SST files
//! not uploaded before and the small files, then writes the manifest; a
//! partition that did not change keeps its previous files. So a commit costs
//! what changed, not the whole state. Recovery downloads the files the
//! manifest of the last committed batch lists and opens them; the local
//! directory is scratch.

use std::collections::{BTreeMap, HashSet};

use futures::TryStreamExt;
use std::path::{Path as LocalPath, PathBuf};
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rocksdb::{
    BlockBasedOptions, Cache, DB, IteratorMode, Options, WriteBatch, WriteOptions,
    checkpoint::Checkpoint as RocksCheckpoint,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One file of a partition's version, and where it was uploaded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct StoredFile {
    name: String,
    path: String,
}

/// The manifest of one version of an operator's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    version: u64,
    /// Keys in state.
    rows: u64,
    partitions: Vec<Vec<StoredFile>>,
}

/// How many state versions the checkpoint keeps: Spark's
/// `spark.sql.streaming.minBatchesToRetain` default.
pub const VERSIONS_TO_RETAIN: u64 = 100;

/// Old versions are cleaned up once every this many commits.
const CLEAN_EVERY: u64 = 10;

impl Manifest {
    /// Every file this version needs.
    fn paths(&self) -> HashSet<String> {
        self.partitions
            .iter()
            .flatten()
            .map(|f| f.path.clone())
            .collect()
    }
}

/// An operator's state.
pub struct StateStore {
    operator: String,
    local: PathBuf,
    dbs: Vec<DB>,
    dirty: Vec<bool>,
    remote: Option<Arc<dyn ObjectStore>>,
    uploaded: HashSet<String>,
    manifest: Manifest,
    cache: Cache,
    rows: u64,
    /// The files of the retained versions read so far, by version.
    retained: BTreeMap<u64, HashSet<String>>,
    retain: u64,
}

fn state_error(what: impl std::fmt::Display) -> Error {
    Error::State(what.to_string())
}

/// FNV-1a of a key: which partition holds it.
fn hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl StateStore {
    /// Opens the state of `operator` with `partitions` partitions in the
    /// scratch directory `local`, restored from version `restore` of the
    /// checkpoint store `remote` when given (the last committed batch).
    pub async fn open(
        operator: &str,
        partitions: u32,
        local: &LocalPath,
        remote: Option<Arc<dyn ObjectStore>>,
        restore: Option<u64>,
    ) -> Result<Self> {
        let local = local.join(operator);
        if local.exists() {
            std::fs::remove_dir_all(&local)
                .map_err(|e| state_error(format!("cannot clear {}: {e}", local.display())))?;
        }
        std::fs::create_dir_all(&local)
            .map_err(|e| state_error(format!("cannot create {}: {e}", local.display())))?;
        // One block cache for every partition: state lives on disk, and
        // memory stays bounded whatever the number of keys.
        let cache = Cache::new_lru_cache(64 << 20);
        let mut manifest = Manifest {
            partitions: vec![Vec::new(); partitions as usize],
            ..Manifest::default()
        };
        let mut uploaded = HashSet::new();
        if let (Some(store), Some(version)) = (&remote, restore) {
            manifest = read_manifest(store, operator, version).await?;
            if manifest.partitions.len() != partitions as usize {
                return Err(Error::Checkpoint {
                    file: format!("state/{operator}/v{version}.json"),
                    message: format!(
                        "holds {} state partitions, the spec {partitions}",
                        manifest.partitions.len()
                    ),
                });
            }
            for (p, files) in manifest.partitions.iter().enumerate() {
                let dir = local.join(p.to_string());
                std::fs::create_dir_all(&dir).map_err(state_error)?;
                for file in files {
                    let data = store
                        .get(&Path::from(file.path.as_str()))
                        .await
                        .map_err(|e| Error::Checkpoint {
                            file: file.path.clone(),
                            message: format!(
                                "listed by the state manifest v{version} but cannot be read: {e}"
                            ),
                        })?
                        .bytes()
                        .await
                        .map_err(state_error)?;
                    std::fs::write(dir.join(&file.name), &data).map_err(state_error)?;
                    if file.name.ends_with(".sst") {
                        uploaded.insert(file.path.clone());
                    }
                }
            }
        }
        let mut dbs = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            dbs.push(open_db(&local.join(p.to_string()), &cache)?);
        }
        Ok(StateStore {
            operator: operator.to_owned(),
            local,
            dirty: vec![false; dbs.len()],
            dbs,
            remote,
            uploaded,
            rows: manifest.rows,
            manifest,
            cache,
            retained: BTreeMap::new(),
            retain: VERSIONS_TO_RETAIN,
        })
    }

    fn partition(&self, key: &[u8]) -> usize {
        (hash(key) % self.dbs.len() as u64) as usize
    }

    /// The values of `keys`, in order.
    pub fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out = vec![None; keys.len()];
        let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); self.dbs.len()];
        for (i, key) in keys.iter().enumerate() {
            by_partition[self.partition(key)].push(i);
        }
        for (p, indices) in by_partition.iter().enumerate() {
            if indices.is_empty() {
                continue;
            }
            let values = self.dbs[p].multi_get(indices.iter().map(|&i| &keys[i]));
            for (&i, value) in indices.iter().zip(values) {
                out[i] = value.map_err(state_error)?;
            }
        }
        Ok(out)
    }

    /// One empty write batch per partition.
    fn write_batches(&self) -> Vec<WriteBatch> {
        (0..self.dbs.len()).map(|_| WriteBatch::default()).collect()
    }

    /// Writes `entries`; `new_keys` of them were not in state before.
    pub fn put_many(&mut self, entries: &[(Vec<u8>, Vec<u8>)], new_keys: u64) -> Result<()> {
        let mut batches = self.write_batches();
        for (key, value) in entries {
            batches[self.partition(key)].put(key, value);
        }
        self.write(batches)?;
        self.rows += new_keys;
        Ok(())
    }

    fn write(&mut self, batches: Vec<WriteBatch>) -> Result<()> {
        // No write-ahead log: the checkpoint is what makes state durable.
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        for (p, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            self.dbs[p]
                .write_opt(batch, &options)
                .map_err(state_error)?;
            self.dirty[p] = true;
        }
        Ok(())
    }

    /// Removes and returns every entry whose key sorts before `bound` (keys
    /// start with their window's end, so this is every closed window).
    pub fn take_below(&mut self, bound: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut batches = self.write_batches();
        for (p, db) in self.dbs.iter().enumerate() {
            for item in db.iterator(IteratorMode::Start) {
                let (key, value) = item.map_err(state_error)?;
                if key.as_ref() >= bound {
                    break;
                }
                batches[p].delete(&key);
                out.push((key.to_vec(), value.to_vec()));
            }
        }
        self.write(batches)?;
        self.rows = self.rows.saturating_sub(out.len() as u64);
        Ok(out)
    }

    /// Removes `keys` (each present in state).
    pub fn delete_many(&mut self, keys: &[Vec<u8>]) -> Result<()> {
        let mut batches = self.write_batches();
        for key in keys {
            batches[self.partition(key)].delete(key);
        }
        self.write(batches)?;
        self.rows = self.rows.saturating_sub(keys.len() as u64);
        Ok(())
    }

    /// Every entry whose key starts with `prefix`, in every partition.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for db in &self.dbs {
            let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
            for item in db.iterator(mode) {
                let (key, value) = item.map_err(state_error)?;
                if !key.starts_with(prefix) {
                    break;
                }
                out.push((key.to_vec(), value.to_vec()));
            }
        }
        Ok(out)
    }

    /// Every entry (complete mode's output).
    pub fn scan(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for db in &self.dbs {
            for item in db.iterator(IteratorMode::Start) {
                let (key, value) = item.map_err(state_error)?;
                out.push((key.to_vec(), value.to_vec()));
            }
        }
        Ok(out)
    }

    /// Keys in state.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Memory RocksDB uses: memtables and the block cache.
    pub fn memory_used_bytes(&self) -> u64 {
        let memtables: u64 = self
            .dbs
            .iter()
            .filter_map(|db| {
                db.property_int_value("rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
            })
            .sum();
        memtables + self.cache.get_usage() as u64
    }

    /// Makes this state version `version` (the batch that wrote it): with a
    /// checkpoint location, uploads what changed and writes the manifest.
    pub async fn commit(&mut self, version: u64) -> Result<()> {
        let Some(remote) = self.remote.clone() else {
            self.dirty.iter_mut().for_each(|d| *d = false);
            return Ok(());
        };
        let mut partitions = self.manifest.partitions.clone();
        for (p, stored) in partitions.iter_mut().enumerate() {
            // A partition not written since its last checkpoint keeps it.
            if !self.dirty[p] && !stored.is_empty() {
                continue;
            }
            let snapshot = self.local.join(format!("checkpoint-{p}-{version}"));
            if snapshot.exists() {
                std::fs::remove_dir_all(&snapshot).map_err(state_error)?;
            }
            RocksCheckpoint::new(&self.dbs[p])
                .and_then(|c| c.create_checkpoint(&snapshot))
                .map_err(state_error)?;
            let mut files = Vec::new();
            let mut names: Vec<String> = std::fs::read_dir(&snapshot)
                .map_err(state_error)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            names.sort();
            for name in names {
                let path = if name.ends_with(".sst") {
                    format!("state/{}/{p}/{name}", self.operator)
                } else {
                    format!("state/{}/{p}/v{version}/{name}", self.operator)
                };
                if !self.uploaded.contains(&path) {
                    let data = std::fs::read(snapshot.join(&name)).map_err(state_error)?;
                    remote
                        .put(&Path::from(path.as_str()), PutPayload::from(data))
                        .await
                        .map_err(|e| state_error(format!("cannot upload {path}: {e}")))?;
                    if name.ends_with(".sst") {
                        self.uploaded.insert(path.clone());
                    }
                }
                files.push(StoredFile { name, path });
            }
            std::fs::remove_dir_all(&snapshot).map_err(state_error)?;
            *stored = files;
        }
        let manifest = Manifest {
            version,
            rows: self.rows,
            partitions,
        };
        let path = format!("state/{}/v{version}.json", self.operator);
        remote
            .put(
                &Path::from(path.as_str()),
                PutPayload::from(serde_json::to_vec_pretty(&manifest).map_err(state_error)?),
            )
            .await
            .map_err(|e| state_error(format!("cannot write {path}: {e}")))?;
        self.retained.insert(version, manifest.paths());
        self.manifest = manifest;
        self.dirty.iter_mut().for_each(|d| *d = false);
        if version % CLEAN_EVERY == CLEAN_EVERY - 1 {
            self.clean(&remote).await?;
        }
        Ok(())
    }

    /// Keeps the newest `retain` versions: deletes older manifests and every
    /// file under the operator's state that no kept manifest lists (files of
    /// old versions, and of commits a crash interrupted).
    async fn clean(&mut self, remote: &Arc<dyn ObjectStore>) -> Result<()> {
        let prefix = Path::from(format!("state/{}", self.operator));
        let objects: Vec<Path> = remote
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|e| state_error(format!("cannot list {prefix}: {e}")))?;
        let manifest_version = |path: &Path| -> Option<u64> {
            path.filename()?
                .strip_prefix('v')?
                .strip_suffix(".json")?
                .parse()
                .ok()
        };
        let mut versions: Vec<u64> = objects
            .iter()
            .filter(|p| p.parts().count() == 3)
            .filter_map(manifest_version)
            .collect();
        versions.sort_unstable();
        let keep_from = versions.len().saturating_sub(self.retain as usize);
        let (old, kept) = versions.split_at(keep_from);
        let mut referenced: HashSet<String> = HashSet::new();
        for version in kept {
            if !self.retained.contains_key(version) {
                let manifest = read_manifest(remote, &self.operator, *version).await?;
                self.retained.insert(*version, manifest.paths());
            }
            referenced.extend(self.retained[version].iter().cloned());
        }
        self.retained.retain(|v, _| kept.contains(v));
        for path in &objects {
            let is_old_manifest = manifest_version(path).is_some_and(|v| old.contains(&v))
                && path.parts().count() == 3;
            let is_file = manifest_version(path).is_none() || path.parts().count() != 3;
            if is_old_manifest || (is_file && !referenced.contains(path.as_ref())) {
                remote
                    .delete(path)
                    .await
                    .map_err(|e| state_error(format!("cannot delete {path}: {e}")))?;
                self.uploaded.remove(path.as_ref());
            }
        }
        Ok(())
    }
}

/// The manifest of `operator`'s state version `version`.
async fn read_manifest(
    store: &Arc<dyn ObjectStore>,
    operator: &str,
    version: u64,
) -> Result<Manifest> {
    let file = format!("state/{operator}/v{version}.json");
    let damaged = |message: String| Error::Checkpoint {
        file: file.clone(),
        message,
    };
    let bytes = store
        .get(&Path::from(file.as_str()))
        .await
        .map_err(|e| damaged(format!("cannot be read ({e}): the checkpoint is damaged")))?
        .bytes()
        .await
        .map_err(|e| damaged(format!("cannot be read ({e})")))?;
    serde_json::from_slice(&bytes).map_err(|e| damaged(format!("is not a state manifest: {e}")))
}

fn open_db(path: &LocalPath, cache: &Cache) -> Result<DB> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_write_buffer_size(8 << 20);
    options.set_max_write_buffer_number(2);
    options.set_max_open_files(256);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    options.set_block_based_table_factory(&table);
    DB::open(&options, path)
        .map_err(|e| state_error(format!("cannot open {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use object_store::local::LocalFileSystem;

    use super::*;

    #[tokio::test]
    async fn state_survives_through_the_checkpoint_and_uploads_only_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let remote_dir = dir.path().join("checkpoint");
        std::fs::create_dir_all(&remote_dir).unwrap();
        let remote: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(&remote_dir).unwrap());
        let local = dir.path().join("scratch");
        let mut store = StateStore::open("agg", 4, &local, Some(remote.clone()), None)
            .await
            .unwrap();
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0u32..100)
            .map(|i| (i.to_be_bytes().to_vec(), format!("v{i}").into_bytes()))
            .collect();
        store.put_many(&entries, 100).unwrap();
        store.commit(0).await.unwrap();
        // Batch 1 changes one key: one partition gets a new SST file.
        store
            .put_many(&[(7u32.to_be_bytes().to_vec(), b"seven".to_vec())], 0)
            .unwrap();
        store.commit(1).await.unwrap();
        let manifest = |v: u64| -> Manifest {
            serde_json::from_slice(
                &std::fs::read(remote_dir.join(format!("state/agg/v{v}.json"))).unwrap(),
            )
            .unwrap()
        };
        let (m0, m1) = (manifest(0), manifest(1));
        let changed = (0..4)
            .filter(|&p| m0.partitions[p] != m1.partitions[p])
            .count();
        assert_eq!(
            changed, 1,
            "only the partition written to is checkpointed again"
        );
        assert_eq!(m1.rows, 100);

        // A crash loses the scratch directory; version 1 comes back.
        drop(store);
        std::fs::remove_dir_all(&local).unwrap();
        let mut restored = StateStore::open("agg", 4, &local, Some(remote.clone()), Some(1))
            .await
            .unwrap();
        let keys: Vec<Vec<u8>> = [7u32, 8].iter().map(|k| k.to_be_bytes().to_vec()).collect();
        assert_eq!(
            restored.get_many(&keys).unwrap(),
            [Some(b"seven".to_vec()), Some(b"v8".to_vec())]
        );
        assert_eq!(restored.rows(), 100);
        // Closed windows come out in key order and leave the state.
        let taken = restored.take_below(&10u32.to_be_bytes()).unwrap();
        assert_eq!(taken.len(), 10);
        assert_eq!(restored.rows(), 90);
        assert_eq!(restored.scan().unwrap().len(), 90);
        // Version 0 is still there, as it was.
        drop(restored);
        let old = StateStore::open("agg", 4, &local, Some(remote), Some(0))
            .await
            .unwrap();
        assert_eq!(old.get_many(&keys[..1]).unwrap(), [Some(b"v7".to_vec())]);
    }

    #[tokio::test]
    async fn old_versions_and_the_files_only_they_use_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let remote_dir = dir.path().join("checkpoint");
        std::fs::create_dir_all(&remote_dir).unwrap();
        let remote: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(&remote_dir).unwrap());
        let local = dir.path().join("scratch");
        let mut store = StateStore::open("agg", 2, &local, Some(remote.clone()), None)
            .await
            .unwrap();
        store.retain = 3;
        for version in 0..20u32 {
            // Each batch rewrites every key: old SST files become garbage.
            let entries: Vec<(Vec<u8>, Vec<u8>)> = (0u32..50)
                .map(|i| (i.to_be_bytes().to_vec(), version.to_be_bytes().to_vec()))
                .collect();
            store
                .put_many(&entries, if version == 0 { 50 } else { 0 })
                .unwrap();
            store.commit(u64::from(version)).await.unwrap();
        }
        let manifests: Vec<String> = std::fs::read_dir(remote_dir.join("state/agg"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json"))
            .collect();
        let mut manifests = manifests;
        manifests.sort();
        // Cleaned after version 19: versions 17, 18 and 19 are kept.
        assert_eq!(manifests, ["v17.json", "v18.json", "v19.json"]);
        let kept: HashSet<String> = [17u64, 18, 19]
            .iter()
            .flat_map(|v| {
                let m: Manifest = serde_json::from_slice(
                    &std::fs::read(remote_dir.join(format!("state/agg/v{v}.json"))).unwrap(),
                )
                .unwrap();
                m.partitions
                    .into_iter()
                    .flatten()
                    .map(|f| f.path)
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut on_disk = Vec::new();
        for p in ["0", "1"] {
            for entry in walk(&remote_dir.join("state/agg").join(p)) {
                on_disk.push(
                    entry
                        .strip_prefix(&remote_dir)
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
        assert!(!on_disk.is_empty());
        for file in &on_disk {
            assert!(
                kept.contains(file),
                "{file} is kept but no retained version lists it"
            );
        }
        // The oldest kept version still opens, whole.
        drop(store);
        let old = StateStore::open("agg", 2, &local, Some(remote), Some(17))
            .await
            .unwrap();
        assert_eq!(
            old.get_many(&[3u32.to_be_bytes().to_vec()]).unwrap(),
            [Some(17u32.to_be_bytes().to_vec())]
        );
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn a_missing_manifest_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let remote: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let err = StateStore::open("agg", 2, &dir.path().join("s"), Some(remote), Some(3))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("state/agg/v3.json"), "{err}");
    }
}
