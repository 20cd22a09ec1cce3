//! The state store: an operator's state in RocksDB, split into
//! `statePartitions` by the hash of the grouping key (windows stay within
//! their key's partition), one RocksDB instance each, checkpointed
//! incrementally to the query's checkpoint location, partition by partition.
//!
//! ```text
//! <checkpoint>/state/<operator>/v<N>-<E>.json            version N, as committed by run (epoch) E:
//!                                                        schema, encoding, rows, each partition's version
//! <checkpoint>/state/<operator>/<p>/v<N>-<E>.json        partition p as of version N: its files, schema
//! <checkpoint>/state/<operator>/<p>/<N>-<E>-<file>       a file of partition p, uploaded by run E at batch N
//! ```
//!
//! Committing version N takes a RocksDB checkpoint of each partition changed
//! since the last version, uploads its SST files not uploaded before and its
//! small files, writes the partition's manifest, then the version's; a
//! partition that did not change keeps pointing at its older manifest. So a
//! commit costs what changed. Every object name carries the batch and the
//! epoch of the run that wrote it and every manifest is written create-only,
//! so two runs on one checkpoint (a zombie and its replacement) never write
//! the same object; `commits/N` names the epoch whose version N is the
//! committed one. Recovery downloads the files of that version's partitions
//! and opens them; the local directory is scratch, except for
//! `<local>/<operator>.files/<p>/`: the files of each partition's last
//! committed or restored version, by object name (hard links to the ones
//! RocksDB has), so that a restart on the same disk (a pod on its volume, a
//! process restarted) takes them from there and downloads only what it
//! lacks. An object's content never changes once written (its name carries
//! the batch and the run), so a local file of the same name and size is
//! that object.
//!
//! Keys and values are encoded with [`encoding`] (stable across releases);
//! the state schema is kept with every version, and a restart whose query
//! keeps another schema is refused, naming the column.

pub mod encoding;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path as LocalPath, PathBuf};

use futures::{StreamExt, TryStreamExt};
use rocksdb::{
    BlockBasedOptions, Cache, DB, IteratorMode, Options, WriteBatch, WriteOptions,
    checkpoint::Checkpoint as RocksCheckpoint,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::checkpoint::Checkpoint;
use crate::storage::{Created, Storage};
use crate::{Error, Result};
use encoding::{ENCODING, StateSchema};

/// How many state versions the checkpoint keeps: Spark's
/// `minBatchesToRetain` default.
pub const VERSIONS_TO_RETAIN: u64 = 100;

/// Cleans of old versions are this many commits apart at least...
const CLEAN_EVERY: u64 = 10;

/// ... and this long apart at least: Spark's
/// `spark.sql.streaming.stateStore.maintenanceInterval` default. A clean
/// lists every object of the operator's state (with 100 versions kept,
/// thousands): with batches back to back, every 10 commits was twice a
/// second, as many LIST requests on S3 (on a local checkpoint it cost
/// little CPU: `bench/replica-cpu.sh`, 0.365 against 0.349 cores). What
/// waits is only deleting: between cleans, more old versions stay.
const CLEAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Files downloaded or uploaded at once.
const TRANSFERS: usize = 8;

/// A partition's changes are committed as a changelog, and as a snapshot
/// of its RocksDB files once every this many versions (Spark's
/// `minDeltasForSnapshot`), staggered over the partitions.
const SNAPSHOT_EVERY: u64 = 10;

/// The name of a changelog in its partition's manifest.
const CHANGELOG: &str = "changelog";

/// Which manifest a partition is at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionRef {
    /// The version (batch) that wrote it.
    pub version: u64,
    /// The run that wrote it.
    pub epoch: u64,
}

/// One file of a partition's version, and where it was uploaded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct StoredFile {
    /// The file's name in the RocksDB directory.
    name: String,
    /// Its object, relative to the checkpoint location.
    path: String,
    /// Its size in bytes.
    size: u64,
}

/// `state/<op>/<p>/v<N>-<E>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartitionManifest {
    partition: u32,
    version: u64,
    epoch: u64,
    encoding: String,
    #[serde(default)]
    schema: Option<StateSchema>,
    /// The snapshot: RocksDB's files as of the last snapshot version.
    files: Vec<StoredFile>,
    /// The changes of each version since the snapshot, oldest first: RocksDB
    /// write batches, applied in order over the snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    changelogs: Vec<StoredFile>,
}

/// `state/<op>/v<N>-<E>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionManifest {
    version: u64,
    epoch: u64,
    encoding: String,
    #[serde(default)]
    schema: Option<StateSchema>,
    /// How keys are partitioned, when not by [`hash`] (see
    /// [`Partitioning`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partitioned_by: Option<String>,
    /// Keys in state.
    rows: u64,
    partitions: Vec<PartitionRef>,
}

/// Which partition a key falls in: part of the checkpoint format (each
/// version names it), fixed for the life of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Partitioning {
    /// [`hash`] of the grouping columns other than the window.
    #[default]
    Hash,
    /// As a Kafka topic keyed by `column` is partitioned: Kafka's default
    /// partitioner over the column's value as text (see
    /// [`crate::kafka::default_partition`]), so that state partition `p`
    /// holds the keys of topic partition `p`. `field` is the spec field that
    /// asked for it.
    KafkaKey {
        /// The grouping column that is the records' key.
        column: String,
        /// The spec field, for errors.
        field: String,
    },
}

impl Partitioning {
    /// What a version's manifest records (`None`: [`Partitioning::Hash`]).
    fn recorded(&self) -> Option<String> {
        match self {
            Partitioning::Hash => None,
            Partitioning::KafkaKey { column, .. } => Some(format!("kafkaKey({column})")),
        }
    }
}

fn version_path(operator: &str, version: u64, epoch: u64) -> String {
    format!("state/{operator}/v{version}-{epoch}.json")
}

fn partition_path(operator: &str, partition: usize, r: PartitionRef) -> String {
    format!(
        "state/{operator}/{partition}/v{}-{}.json",
        r.version, r.epoch
    )
}

struct Partition {
    db: DB,
    dirty: bool,
    /// The manifest the partition is at; `None` before its first commit.
    at: Option<PartitionRef>,
    /// The SST files already in the checkpoint: local name → object path.
    uploaded: HashMap<String, String>,
    /// The files of its last snapshot, and the changelogs since.
    snapshot: Vec<StoredFile>,
    changelogs: Vec<StoredFile>,
    /// What was written since the last commit: the next changelog.
    changes: WriteBatch,
}

/// What the last commit wrote, for `stateOperators` in progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Partitions that changed and were committed.
    pub partitions: u64,
    /// Of them, those committed as a snapshot of their files.
    pub snapshots: u64,
    /// Objects uploaded (files, changelogs and manifests).
    pub files: u64,
    /// Their bytes (manifests aside).
    pub bytes: u64,
    /// Of them, the changelogs' bytes.
    pub changelog_bytes: u64,
    /// How long the commit took, in ms.
    pub ms: u64,
}

/// What opening a store restored, and from where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Files downloaded from the checkpoint.
    pub downloaded_files: u64,
    /// Their bytes.
    pub downloaded_bytes: u64,
    /// Files taken from the local copy instead.
    pub local_files: u64,
    /// Their bytes.
    pub local_bytes: u64,
}

impl Restored {
    fn add(&mut self, other: Restored) {
        self.downloaded_files += other.downloaded_files;
        self.downloaded_bytes += other.downloaded_bytes;
        self.local_files += other.local_files;
        self.local_bytes += other.local_bytes;
    }
}

/// An operator's state.
pub struct StateStore {
    operator: String,
    local: PathBuf,
    /// `<local>/<operator>.files`: the committed files kept on this disk.
    kept: PathBuf,
    /// What [`StateStore::open`] restored.
    restored: Restored,
    partitions: Vec<Partition>,
    remote: Option<Storage>,
    epoch: u64,
    cache: Cache,
    /// The schema the query keeps, written with each version.
    schema: Option<StateSchema>,
    /// The schema of the restored version.
    restored_schema: Option<StateSchema>,
    /// How keys are partitioned.
    partitioning: Partitioning,
    /// How the restored (or seeded) versions partitioned them.
    restored_partitioning: Option<Option<String>>,
    rows: u64,
    /// Every key below it was taken by [`StateStore::take_below`]: the next
    /// one seeks past their tombstones instead of reading them again (a
    /// scan from the start of a partition reads every deleted key until
    /// RocksDB compacts it away).
    taken_below: Option<Vec<u8>>,
    /// Until the first commit, per partition seeded from another replica's
    /// version: the eviction watermark (milliseconds) that version was
    /// written with.
    seeded_evictions: Vec<Option<i64>>,
    commits: u64,
    /// When the last clean started, and `commits` then.
    last_clean: Option<(std::time::Instant, u64)>,
    /// A snapshot of a partition once every this many versions.
    snapshot_every: u64,
    /// What the last commit wrote.
    committed: Committed,
    /// Deletes old versions; `None` while it runs in the background.
    cleaner: Option<Cleaner>,
    cleaning: Option<tokio::task::JoinHandle<(Cleaner, Result<()>)>>,
}

/// How state is written to RocksDB: without its write-ahead log, since the
/// checkpoint (changelogs and snapshots) is what makes state durable.
fn unlogged() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.disable_wal(true);
    options
}

/// Copies the writes of one batch into another (the next changelog).
struct Record<'a>(&'a mut WriteBatch);

impl rocksdb::WriteBatchIterator for Record<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.put(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.delete(key);
    }
}

fn state_error(what: impl std::fmt::Display) -> Error {
    Error::State(what.to_string())
}

/// FNV-1a: which partition a key's grouping columns fall in. Part of the
/// checkpoint format: a state partition holds the keys of this hash.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cores this process may use (cgroup quota included), read once:
/// the standard library reads the cgroup files on every call, and the
/// state, the operators and the sources ask several times a batch.
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `f` over each of `items`, in order, the items spread over the machine's
/// cores (scoped threads; on the calling thread when there is one item or
/// one core). Partitions are separate RocksDB instances, so their reads and
/// writes run side by side.
pub(crate) fn spread<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    spread_rows(items, usize::MAX, f)
}

/// From this many rows (keys read or written), [`spread_rows`] starts
/// threads: below it, starting them costs more than the work (a batch of
/// a few records would start a thread per core for each state access).
const SPREAD_ROWS: usize = 1024;

/// [`spread`] for work of `rows` rows in all: on the calling thread below
/// [`SPREAD_ROWS`].
pub(crate) fn spread_rows<T: Send, R: Send>(
    items: Vec<T>,
    rows: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = if rows < SPREAD_ROWS {
        1
    } else {
        cores().min(items.len())
    };
    if threads <= 1 {
        return items.into_iter().map(f).collect();
    }
    let mut shares: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    let count = items.len();
    for (i, item) in items.into_iter().enumerate() {
        shares[i % threads].push((i, item));
    }
    let f = &f;
    let mut out: Vec<Option<R>> = (0..count).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    share
                        .into_iter()
                        .map(|(i, item)| (i, f(item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            let results = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (i, result) in results {
                out[i] = Some(result);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A key in one partition.
pub type PartitionedKey = (usize, Vec<u8>);

/// An entry of one partition: partition, key, value.
pub type PartitionedEntry = (usize, Vec<u8>, Vec<u8>);

/// A partition to restore from another checkpoint location: a replica's
/// first run takes the state partitions it owns from the versions the
/// previous replicas committed (see [`crate::replicas`]).
#[derive(Clone, Debug)]
pub struct Seed {
    /// The partition.
    pub partition: usize,
    /// The checkpoint location that committed it.
    pub storage: Storage,
    /// The version (of every partition) that lists it.
    pub at: PartitionRef,
    /// The eviction watermark that version was written with (see
    /// [`StateStore::late_by_partition`]).
    pub evicted_ms: Option<i64>,
}

impl StateStore {
    /// Opens the state of `operator` with `partitions` partitions in the
    /// scratch directory `local`, for the run `epoch`. With a checkpoint
    /// (`remote`), `restore` names the committed version to start from (the
    /// last committed batch and the epoch that committed it).
    pub async fn open(
        operator: &str,
        partitions: u32,
        local: &LocalPath,
        remote: Option<Storage>,
        restore: Option<PartitionRef>,
        epoch: u64,
    ) -> Result<Self> {
        Self::open_seeded(operator, partitions, local, remote, restore, &[], epoch).await
    }

    /// [`StateStore::open`], with `seeds`: partitions restored from other
    /// checkpoint locations. A seeded partition is written whole (a
    /// snapshot) to this store's location at its first commit, so that
    /// this location's versions never point at another's files.
    pub async fn open_seeded(
        operator: &str,
        partitions: u32,
        local: &LocalPath,
        remote: Option<Storage>,
        restore: Option<PartitionRef>,
        seeds: &[Seed],
        epoch: u64,
    ) -> Result<Self> {
        let kept = local.join(format!("{operator}.files"));
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
        let mut refs = vec![None; partitions as usize];
        let mut uploaded = vec![HashMap::new(); partitions as usize];
        let mut snapshots = vec![Vec::new(); partitions as usize];
        let mut changelogs = vec![Vec::new(); partitions as usize];
        let mut replays: Vec<Vec<Vec<u8>>> = vec![Vec::new(); partitions as usize];
        let mut rows = 0;
        let mut restored_schema = None;
        let mut restored_partitioning = None;
        let mut restored = Restored::default();
        if let (Some(store), Some(version)) = (&remote, restore) {
            let manifest = read_version(store, operator, version).await?;
            let file = store.name_of(&version_path(operator, version.version, version.epoch));
            if manifest.partitions.len() != partitions as usize {
                return Err(Error::Checkpoint {
                    file,
                    message: format!(
                        "holds {} state partitions, the spec {partitions}",
                        manifest.partitions.len()
                    ),
                });
            }
            rows = manifest.rows;
            restored_schema = manifest.schema.clone();
            restored_partitioning = Some(manifest.partitioned_by.clone());
            let downloads = manifest.partitions.iter().enumerate().map(|(p, r)| {
                restore_partition(
                    store,
                    operator,
                    p,
                    *r,
                    local.join(p.to_string()),
                    kept.join(p.to_string()),
                )
            });
            let partitions: Vec<RestoredPartition> = futures::stream::iter(downloads)
                .buffered(TRANSFERS)
                .try_collect()
                .await?;
            for (p, partition) in partitions.into_iter().enumerate() {
                uploaded[p] = partition.ssts;
                snapshots[p] = partition.snapshot;
                changelogs[p] = partition.changelogs;
                replays[p] = partition.replay;
                refs[p] = Some(manifest.partitions[p]);
                restored.add(partition.from);
            }
            info!(
                operator,
                version = version.version,
                downloaded_files = restored.downloaded_files,
                downloaded_bytes = restored.downloaded_bytes,
                local_files = restored.local_files,
                local_bytes = restored.local_bytes,
                "Restored the state."
            );
        }
        let mut seeded = Vec::new();
        for seed in seeds {
            let p = seed.partition;
            let manifest = read_version(&seed.storage, operator, seed.at).await?;
            let file =
                seed.storage
                    .name_of(&version_path(operator, seed.at.version, seed.at.epoch));
            let Some(at) = manifest.partitions.get(p).copied() else {
                return Err(Error::Checkpoint {
                    file,
                    message: format!("has no state partition {p}"),
                });
            };
            if manifest.partitions.len() != partitions as usize {
                return Err(Error::Checkpoint {
                    file,
                    message: format!(
                        "holds {} state partitions, the spec {partitions}",
                        manifest.partitions.len()
                    ),
                });
            }
            if restored_schema.is_none() {
                restored_schema = manifest.schema.clone();
            }
            if restored_partitioning.is_none() {
                restored_partitioning = Some(manifest.partitioned_by.clone());
            }
            // Its own directory for the files kept: object names are only
            // unique within one location.
            let kept_here = local.join(format!("seed-{p}.files"));
            let partition = restore_partition(
                &seed.storage,
                operator,
                p,
                at,
                local.join(p.to_string()),
                kept_here,
            )
            .await?;
            replays[p] = partition.replay;
            restored.add(partition.from);
            seeded.push(p);
        }
        if !seeds.is_empty() {
            info!(
                operator,
                partitions = ?seeded,
                downloaded_files = restored.downloaded_files,
                downloaded_bytes = restored.downloaded_bytes,
                "Restored the state partitions this replica takes over."
            );
        }
        let mut dbs = Vec::with_capacity(partitions as usize);
        let restored_parts = refs
            .into_iter()
            .zip(uploaded)
            .zip(snapshots.into_iter().zip(changelogs))
            .zip(replays);
        for (p, (((at, uploaded), (snapshot, changelogs)), replay)) in restored_parts.enumerate() {
            let db = open_db(&local.join(p.to_string()), &cache)?;
            let options = unlogged();
            for changes in replay {
                db.write_opt(WriteBatch::from_data(&changes), &options)
                    .map_err(state_error)?;
            }
            dbs.push(Partition {
                db,
                dirty: false,
                at,
                uploaded,
                snapshot,
                changelogs,
                changes: WriteBatch::default(),
            });
        }
        let mut seeded_evictions = vec![None; partitions as usize];
        for seed in seeds {
            seeded_evictions[seed.partition] = seed.evicted_ms;
        }
        for p in seeded {
            rows += dbs[p].db.iterator(IteratorMode::Start).count() as u64;
            let _ = std::fs::remove_dir_all(local.join(format!("seed-{p}.files")));
        }
        let cleaner = remote.as_ref().map(|remote| Cleaner::new(operator, remote));
        Ok(StateStore {
            operator: operator.to_owned(),
            local,
            kept,
            restored,
            partitions: dbs,
            remote,
            epoch,
            cache,
            schema: None,
            restored_schema,
            partitioning: Partitioning::Hash,
            restored_partitioning,
            taken_below: None,
            seeded_evictions,
            rows,
            commits: 0,
            last_clean: None,
            snapshot_every: SNAPSHOT_EVERY,
            committed: Committed::default(),
            cleaner,
            cleaning: None,
        })
    }

    /// What opening the store restored, and from where.
    pub fn restored(&self) -> Restored {
        self.restored
    }

    /// What the last commit wrote.
    pub fn committed(&self) -> Committed {
        self.committed
    }

    /// The schema of the restored version (`None`: nothing restored, or a
    /// version written before schemas were kept).
    pub fn restored_schema(&self) -> Option<&StateSchema> {
        self.restored_schema.as_ref()
    }

    /// Sets the schema of the state the query keeps; a restored version
    /// written with another schema is refused, naming the columns.
    pub fn set_schema(&mut self, schema: StateSchema) -> Result<()> {
        if let Some(stored) = &self.restored_schema
            && let Some(why) = encoding::compare(stored, &schema)
        {
            return Err(Error::StateSchema {
                location: self
                    .remote
                    .as_ref()
                    .map(|r| r.name_of(&format!("state/{}", self.operator)))
                    .unwrap_or_default(),
                message: why,
            });
        }
        self.schema = Some(schema);
        Ok(())
    }

    /// Sets how keys are partitioned; a restored version partitioned
    /// otherwise is refused, naming the spec field that changed it.
    pub fn set_partitioning(&mut self, partitioning: Partitioning) -> Result<()> {
        if let Some(stored) = &self.restored_partitioning
            && *stored != partitioning.recorded()
        {
            let field = match &partitioning {
                Partitioning::KafkaKey { field, .. } => field.clone(),
                Partitioning::Hash => "spec.sources[].kafka.keyedBy".to_owned(),
            };
            let was = stored
                .as_deref()
                .unwrap_or("the hash of the grouping columns");
            let now = partitioning
                .recorded()
                .unwrap_or_else(|| "the hash of the grouping columns".to_owned());
            return Err(Error::Unsupported {
                path: field,
                message: format!(
                    "the checkpoint's state is partitioned by {was}, the spec asks for {now}: how the state is partitioned is fixed for the life of a checkpoint (start the query on a new checkpoint to change it)"
                ),
            });
        }
        self.partitioning = partitioning;
        Ok(())
    }

    /// How keys are partitioned.
    pub fn partitioning(&self) -> &Partitioning {
        &self.partitioning
    }

    /// The partition of `group` among `partitions`.
    pub fn partition_in(group: &[u8], partitions: usize) -> usize {
        (hash(group) % partitions as u64) as usize
    }

    /// How many partitions the state has.
    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    /// The late-events watermark (microseconds) of each partition for a
    /// batch whose own is `late`, when some partition was seeded from a
    /// version written with a lower eviction watermark and this store has
    /// not committed since: its windows ending after that one and up to
    /// `late` were not written by its old owner, and are still to be (the
    /// generation's watermark is the highest its replicas reached). `None`
    /// when every partition is at `late`.
    pub fn late_by_partition(&self, late: i64) -> Option<Vec<i64>> {
        let lower = |e: &Option<i64>| e.map(|ms| ms.saturating_mul(1000)).filter(|e| *e < late);
        if !self.seeded_evictions.iter().any(|e| lower(e).is_some()) {
            return None;
        }
        Some(
            self.seeded_evictions
                .iter()
                .map(|e| lower(e).unwrap_or(late))
                .collect(),
        )
    }

    /// The values of `keys`, in order. The partitions are read in parallel
    /// over the cores.
    pub fn get_many(&self, keys: &[PartitionedKey]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); self.partitions.len()];
        for (i, (p, _)) in keys.iter().enumerate() {
            by_partition[*p].push(i);
        }
        let work: Vec<(&DB, Vec<usize>)> = self
            .partitions
            .iter()
            .zip(by_partition)
            .filter(|(_, indices)| !indices.is_empty())
            .map(|(partition, indices)| (&partition.db, indices))
            .collect();
        let found = spread_rows(work, keys.len(), |(db, indices)| {
            let values = db.multi_get(indices.iter().map(|&i| &keys[i].1));
            (indices, values)
        });
        let mut out = vec![None; keys.len()];
        for (indices, values) in found {
            for (i, value) in indices.into_iter().zip(values) {
                out[i] = value.map_err(state_error)?;
            }
        }
        Ok(out)
    }

    fn write_batches(&self) -> Vec<WriteBatch> {
        (0..self.partitions.len())
            .map(|_| WriteBatch::default())
            .collect()
    }

    /// Writes `entries` (partition, key, value); `new_keys` of them were not
    /// in state before.
    pub fn put_many(&mut self, entries: &[PartitionedEntry], new_keys: u64) -> Result<()> {
        let mut batches = self.write_batches();
        for (p, key, value) in entries {
            batches[*p].put(key, value);
        }
        self.write(batches)?;
        self.rows += new_keys;
        Ok(())
    }

    /// Applies each partition's batch, the partitions in parallel over the
    /// cores.
    fn write(&mut self, batches: Vec<WriteBatch>) -> Result<()> {
        let rows = batches.iter().map(WriteBatch::len).sum();
        let work: Vec<(&mut Partition, WriteBatch)> = self
            .partitions
            .iter_mut()
            .zip(batches)
            .filter(|(_, batch)| !batch.is_empty())
            .collect();
        spread_rows(work, rows, |(partition, batch)| {
            let options = unlogged();
            // Kept for the next changelog too.
            batch.iterate(&mut Record(&mut partition.changes));
            partition.dirty = true;
            partition.db.write_opt(batch, &options)
        })
        .into_iter()
        .collect::<std::result::Result<(), _>>()
        .map_err(state_error)
    }

    /// Removes and returns every entry whose key sorts before `bound`, in
    /// every partition (keys that start with a window's end or an event
    /// time: every closed window). The operators never write a key below a
    /// bound they took (those rows are late), so the next call starts at
    /// this one's bound.
    ///
    /// A partition that had such entries gets one range deletion (in
    /// RocksDB and in its next changelog) rather than a tombstone per key:
    /// the same keys, as a point deletion of each would remove them, for
    /// the cost of one write.
    pub fn take_below(&mut self, bound: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let low = self.taken_below.clone().unwrap_or_default();
        let found = self.range(Some(&low), bound)?;
        let mut out = Vec::new();
        for (p, entries) in found.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            // NB: written here, not through `write`: a batch's iteration
            // (which records `write`'s batches for the changelog) does not
            // see range deletions.
            let mut batch = WriteBatch::default();
            batch.delete_range(&low[..], bound);
            let partition = &mut self.partitions[p];
            partition.changes.delete_range(&low[..], bound);
            partition.dirty = true;
            partition
                .db
                .write_opt(batch, &unlogged())
                .map_err(state_error)?;
            out.extend(entries);
        }
        self.rows = self.rows.saturating_sub(out.len() as u64);
        if self.taken_below.as_deref().is_none_or(|low| low < bound) {
            self.taken_below = Some(bound.to_vec());
        }
        Ok(out)
    }

    /// Every entry whose key sorts in `[low, high)`, in every partition.
    pub fn scan_between(&self, low: &[u8], high: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.range(Some(low), high)?.into_iter().flatten().collect())
    }

    /// Each partition's entries whose key sorts in `[low, high)`, the
    /// partitions read in parallel over the cores.
    fn range(&self, low: Option<&[u8]>, high: &[u8]) -> Result<Vec<Vec<Entry>>> {
        let dbs: Vec<&DB> = self.partitions.iter().map(|p| &p.db).collect();
        spread(dbs, |db| {
            let mode = match low {
                Some(low) => IteratorMode::From(low, rocksdb::Direction::Forward),
                None => IteratorMode::Start,
            };
            let mut out = Vec::new();
            for item in db.iterator(mode) {
                let (key, value) = item.map_err(state_error)?;
                if key.as_ref() >= high {
                    break;
                }
                out.push((key.to_vec(), value.to_vec()));
            }
            Ok(out)
        })
        .into_iter()
        .collect()
    }

    /// Removes `keys` (each present in state).
    pub fn delete_many(&mut self, keys: &[PartitionedKey]) -> Result<()> {
        let mut batches = self.write_batches();
        for (p, key) in keys {
            batches[*p].delete(key);
        }
        self.write(batches)?;
        self.rows = self.rows.saturating_sub(keys.len() as u64);
        Ok(())
    }

    /// Every entry of partition `p` whose key starts with `prefix`.
    pub fn scan_prefix(&self, p: usize, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.partitions[p].db.iterator(mode) {
            let (key, value) = item.map_err(state_error)?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Every entry, with its partition.
    pub fn scan(&self) -> Result<Vec<PartitionedEntry>> {
        let mut out = Vec::new();
        for (p, partition) in self.partitions.iter().enumerate() {
            for item in partition.db.iterator(IteratorMode::Start) {
                let (key, value) = item.map_err(state_error)?;
                out.push((p, key.to_vec(), value.to_vec()));
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
            .partitions
            .iter()
            .filter_map(|p| {
                p.db.property_int_value("rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
            })
            .sum();
        memtables + self.cache.get_usage() as u64
    }

    /// Makes this state version `version` (the batch that wrote it): with a
    /// checkpoint location, writes what changed and the manifests. A
    /// partition that changed is written as a changelog of the batch's
    /// writes, or, once every [`SNAPSHOT_EVERY`] versions, as a snapshot of
    /// its RocksDB files (only those not uploaded before).
    pub async fn commit(&mut self, version: u64) -> Result<()> {
        let started = std::time::Instant::now();
        let Some(remote) = self.remote.clone() else {
            for partition in &mut self.partitions {
                partition.dirty = false;
                partition.changes.clear();
            }
            self.committed = Committed::default();
            self.seeded_evictions.fill(None);
            return Ok(());
        };
        let here = PartitionRef {
            version,
            epoch: self.epoch,
        };
        let mut committed = Committed::default();
        let mut changelogs = Vec::new();
        for p in 0..self.partitions.len() {
            let partition = &self.partitions[p];
            // A partition not written since its last checkpoint keeps it.
            if !partition.dirty && partition.at.is_some() {
                continue;
            }
            committed.partitions += 1;
            let every = self.snapshot_every.max(1);
            let snapshot = partition.at.is_none()
                || partition.changelogs.len() as u64 + 1 >= 2 * every
                || (version + p as u64).is_multiple_of(every);
            if snapshot {
                let (files, bytes) = self.commit_partition(&remote, p, here).await?;
                committed.snapshots += 1;
                committed.files += files;
                committed.bytes += bytes;
                continue;
            }
            let data = partition.changes.data().to_vec();
            let file = StoredFile {
                name: CHANGELOG.into(),
                path: format!(
                    "state/{}/{p}/{}-{}-{CHANGELOG}",
                    self.operator, here.version, here.epoch
                ),
                size: data.len() as u64,
            };
            let mut chain = partition.changelogs.clone();
            chain.push(file);
            let manifest = PartitionManifest {
                partition: p as u32,
                version,
                epoch: self.epoch,
                encoding: ENCODING.into(),
                schema: self.schema.clone(),
                files: partition.snapshot.clone(),
                changelogs: chain,
            };
            changelogs.push((data, manifest));
        }
        // Changelogs go up in parallel, each before its manifest, and are
        // kept on this disk with the snapshot's files: a link to the
        // checkpoint's own file when that is on this machine (no second
        // file to create), a copy otherwise.
        let operator = &self.operator;
        let remote_ref = &remote;
        let kept = &self.kept;
        let written: Vec<PartitionManifest> =
            futures::stream::iter(changelogs.into_iter().map(|(data, manifest)| async move {
                let log = manifest.changelogs.last().expect("a changelog");
                let local = kept
                    .join(manifest.partition.to_string())
                    .join(object_name(&log.path));
                let data = bytes::Bytes::from(data);
                // Made durable with its manifest, beside it.
                remote_ref
                    .put_before_manifest(&log.path, data.clone())
                    .await?;
                let linked = match remote_ref.local_root() {
                    Some(root) => tokio::fs::hard_link(root.join(&log.path), &local)
                        .await
                        .is_ok(),
                    None => false,
                };
                if !linked {
                    tokio::fs::write(&local, &data).await.map_err(state_error)?;
                }
                let path = partition_path(operator, manifest.partition as usize, here);
                create(remote_ref, &path, &manifest).await?;
                Ok::<_, Error>(manifest)
            }))
            .buffer_unordered(TRANSFERS)
            .try_collect()
            .await?;
        for manifest in written {
            let size = manifest.changelogs.last().map_or(0, |f| f.size);
            committed.files += 1;
            committed.bytes += size;
            committed.changelog_bytes += size;
            let partition = &mut self.partitions[manifest.partition as usize];
            partition.changelogs = manifest.changelogs;
            partition.at = Some(here);
            partition.dirty = false;
            partition.changes.clear();
        }
        let manifest = VersionManifest {
            version,
            epoch: self.epoch,
            encoding: ENCODING.into(),
            schema: self.schema.clone(),
            partitioned_by: self.partitioning.recorded(),
            rows: self.rows,
            partitions: self
                .partitions
                .iter()
                .map(|p| p.at.expect("every partition is committed"))
                .collect(),
        };
        let path = version_path(&self.operator, version, self.epoch);
        create(&remote, &path, &manifest).await?;
        self.commits += 1;
        committed.ms = started.elapsed().as_millis() as u64;
        debug!(
            operator = self.operator,
            version,
            partitions = committed.partitions,
            snapshots = committed.snapshots,
            files = committed.files,
            bytes = committed.bytes,
            changelog_bytes = committed.changelog_bytes,
            ms = committed.ms,
            "Committed the state."
        );
        self.committed = committed;
        self.seeded_evictions.fill(None);
        Ok(())
    }

    /// Commits partition `p` as a snapshot of its RocksDB files; returns
    /// the files uploaded and their bytes.
    async fn commit_partition(
        &mut self,
        remote: &Storage,
        p: usize,
        here: PartitionRef,
    ) -> Result<(u64, u64)> {
        let snapshot = self.local.join(format!("checkpoint-{p}-{}", here.version));
        if snapshot.exists() {
            std::fs::remove_dir_all(&snapshot).map_err(state_error)?;
        }
        RocksCheckpoint::new(&self.partitions[p].db)
            .and_then(|c| c.create_checkpoint(&snapshot))
            .map_err(state_error)?;
        let mut names: Vec<String> = std::fs::read_dir(&snapshot)
            .map_err(state_error)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut files = Vec::new();
        let mut uploads = Vec::new();
        let mut uploaded_bytes = 0;
        for name in names {
            let local = snapshot.join(&name);
            let size = std::fs::metadata(&local).map_err(state_error)?.len();
            let known = self.partitions[p].uploaded.get(&name).cloned();
            let path = known.clone().unwrap_or_else(|| {
                format!(
                    "state/{}/{p}/{}-{}-{name}",
                    self.operator, here.version, here.epoch
                )
            });
            if known.is_none() {
                uploaded_bytes += size;
                uploads.push((local, path.clone()));
                if name.ends_with(".sst") {
                    self.partitions[p]
                        .uploaded
                        .insert(name.clone(), path.clone());
                }
            }
            files.push(StoredFile { name, path, size });
        }
        futures::stream::iter(uploads.iter().map(|(local, path)| async move {
            let data = tokio::fs::read(local).await.map_err(state_error)?;
            // Made durable with the partition's manifest, beside it.
            remote.put_before_manifest(path, data).await
        }))
        .buffer_unordered(TRANSFERS)
        .try_collect::<Vec<()>>()
        .await?;
        // Kept on this disk for a restart: what was uploaded, by its object
        // name; the rest of the version is there from before.
        let kept = self.kept.join(p.to_string());
        std::fs::create_dir_all(&kept).map_err(state_error)?;
        for (local, path) in &uploads {
            let target = kept.join(object_name(path));
            if !target.exists() {
                link_or_copy(local, &target).await?;
            }
        }
        keep_only(&kept, &files)?;
        std::fs::remove_dir_all(&snapshot).map_err(state_error)?;
        let manifest = PartitionManifest {
            partition: p as u32,
            version: here.version,
            epoch: here.epoch,
            encoding: ENCODING.into(),
            schema: self.schema.clone(),
            files,
            changelogs: Vec::new(),
        };
        create(remote, &partition_path(&self.operator, p, here), &manifest).await?;
        let partition = &mut self.partitions[p];
        partition.snapshot = manifest.files;
        partition.changelogs.clear();
        partition.changes.clear();
        partition.at = Some(here);
        partition.dirty = false;
        Ok((uploads.len() as u64 + 1, uploaded_bytes))
    }

    /// After batch `committed` committed: once every [`CLEAN_EVERY`]
    /// commits and [`CLEAN_INTERVAL`] at most, starts
    /// deleting what no kept version needs, in the background (the next
    /// batches run meanwhile; an error is returned by the next call). Kept:
    /// the newest [`VERSIONS_TO_RETAIN`] committed versions and everything
    /// they list. Deleted: older versions, versions of batches that another
    /// run committed, and files and partition manifests that only those
    /// list. Nothing of a batch after `committed` is touched: a run may
    /// still be writing it, and a newer version lists no file of a batch up
    /// to `committed` that version `committed` does not.
    pub async fn clean(&mut self, checkpoint: &Checkpoint, committed: u64) -> Result<()> {
        if self.remote.is_none() {
            return Ok(());
        }
        let due = match self.last_clean {
            None => self.commits >= CLEAN_EVERY,
            Some((at, commits)) => {
                self.commits >= commits + CLEAN_EVERY && at.elapsed() >= CLEAN_INTERVAL
            }
        };
        if !due && !self.cleaning.as_ref().is_some_and(|c| c.is_finished()) {
            return Ok(());
        }
        self.cleaned().await?;
        if due {
            self.last_clean = Some((std::time::Instant::now(), self.commits));
            let mut cleaner = self.cleaner.take().expect("no clean is running");
            let checkpoint = checkpoint.clone();
            self.cleaning = Some(tokio::spawn(async move {
                let result = cleaner.clean(&checkpoint, committed).await;
                (cleaner, result)
            }));
        }
        Ok(())
    }

    /// Waits for a clean running in the background; its error if it failed.
    pub async fn cleaned(&mut self) -> Result<()> {
        let Some(running) = self.cleaning.take() else {
            return Ok(());
        };
        match running.await {
            Ok((cleaner, result)) => {
                self.cleaner = Some(cleaner);
                result
            }
            Err(e) => {
                if let Some(remote) = &self.remote {
                    self.cleaner = Some(Cleaner::new(&self.operator, remote));
                }
                Err(state_error(format!("the state clean-up task failed: {e}")))
            }
        }
    }
}

/// Deletes what no kept state version needs; remembers the manifests it
/// read, which never change once written.
struct Cleaner {
    operator: String,
    remote: Storage,
    /// How many committed versions it keeps.
    retain: u64,
    /// Each version's partitions, each partition manifest's objects.
    read_versions: HashMap<(u64, u64), Vec<PartitionRef>>,
    read_partitions: HashMap<String, Vec<String>>,
}

impl Cleaner {
    fn new(operator: &str, remote: &Storage) -> Self {
        Self {
            operator: operator.to_owned(),
            remote: remote.clone(),
            retain: VERSIONS_TO_RETAIN,
            read_versions: HashMap::new(),
            read_partitions: HashMap::new(),
        }
    }

    async fn clean(&mut self, checkpoint: &Checkpoint, committed: u64) -> Result<()> {
        let prefix = format!("state/{}", self.operator);
        let objects = self.remote.list(&prefix).await?;
        // What the objects are, from their names.
        let mut versions: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut others: Vec<(String, u64, u64)> = Vec::new(); // (path, version, epoch)
        for object in &objects {
            let path = object.location.as_ref().to_owned();
            let Some(rest) = path.strip_prefix(&format!("{prefix}/")) else {
                continue;
            };
            if let Some((version, epoch)) = parse_manifest_name(rest) {
                versions.entry(version).or_default().push(epoch);
            } else if let Some((_, name)) = rest.split_once('/') {
                let parsed = parse_manifest_name(name).or_else(|| parse_file_name(name));
                if let Some((version, epoch)) = parsed {
                    others.push((path, version, epoch));
                }
            }
        }
        // The committed epoch of each version that is done.
        let mut committed_versions: Vec<(u64, u64)> = Vec::new();
        for (&version, epochs) in versions.range(..=committed) {
            let epoch = if epochs.len() == 1 {
                epochs[0]
            } else {
                match checkpoint.read_commit(version).await? {
                    Some(commit) => commit.epoch,
                    None => continue,
                }
            };
            committed_versions.push((version, epoch));
        }
        let keep_from = committed_versions
            .len()
            .saturating_sub(self.retain as usize);
        let kept: HashSet<(u64, u64)> = committed_versions[keep_from..].iter().copied().collect();
        let mut referenced: HashSet<String> = HashSet::new();
        let mut partition_refs: BTreeSet<(usize, PartitionRef)> = BTreeSet::new();
        // Manifests never change: each is read once by this store.
        self.read_versions.retain(|key, _| kept.contains(key));
        for &(version, epoch) in &kept {
            if !self.read_versions.contains_key(&(version, epoch)) {
                let manifest = read_version(
                    &self.remote,
                    &self.operator,
                    PartitionRef { version, epoch },
                )
                .await?;
                self.read_versions
                    .insert((version, epoch), manifest.partitions);
            }
            for (p, r) in self.read_versions[&(version, epoch)].iter().enumerate() {
                partition_refs.insert((p, *r));
            }
        }
        let paths: HashSet<String> = partition_refs
            .iter()
            .map(|(p, r)| partition_path(&self.operator, *p, *r))
            .collect();
        self.read_partitions.retain(|path, _| paths.contains(path));
        for path in paths {
            if !self.read_partitions.contains_key(&path) {
                let manifest = read_partition(&self.remote, &path).await?;
                let objects = manifest
                    .files
                    .into_iter()
                    .chain(manifest.changelogs)
                    .map(|f| f.path)
                    .collect();
                self.read_partitions.insert(path.clone(), objects);
            }
            referenced.extend(self.read_partitions[&path].iter().cloned());
            referenced.insert(path);
        }
        let mut garbage = Vec::new();
        for (&version, epochs) in versions.range(..=committed) {
            for &epoch in epochs {
                if !kept.contains(&(version, epoch)) {
                    garbage.push(version_path(&self.operator, version, epoch));
                }
            }
        }
        for (path, version, _) in others {
            if version <= committed && !referenced.contains(&path) {
                garbage.push(path);
            }
        }
        // NB: each future owns what it uses: a closure over borrowed paths
        // makes the spawned clean-up not `Send` for every lifetime.
        let deletes = garbage.into_iter().map(|path| {
            let remote = self.remote.clone();
            async move { remote.delete(&path).await }
        });
        futures::stream::iter(deletes)
            .buffer_unordered(TRANSFERS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// `v<N>-<E>.json` → (N, E).
fn parse_manifest_name(name: &str) -> Option<(u64, u64)> {
    let (version, epoch) = name
        .strip_prefix('v')?
        .strip_suffix(".json")?
        .split_once('-')?;
    Some((version.parse().ok()?, epoch.parse().ok()?))
}

/// `<N>-<E>-<file>` → (N, E).
fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let mut parts = name.splitn(3, '-');
    let version = parts.next()?.parse().ok()?;
    let epoch = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((version, epoch))
}

async fn create<T: Serialize>(remote: &Storage, path: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(state_error)?;
    match remote.create(path, bytes).await? {
        Created::Written => Ok(()),
        Created::Exists(_) => Err(Error::Fenced {
            message: format!(
                "{} was written by another run with this run's epoch: the checkpoint's epochs are damaged",
                remote.name_of(path)
            ),
        }),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(remote: &Storage, path: &str) -> Result<T> {
    let damaged = |message: String| Error::Checkpoint {
        file: remote.name_of(path),
        message,
    };
    let bytes = remote
        .get(path)
        .await?
        .ok_or_else(|| damaged("is missing: the checkpoint is damaged".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| damaged(format!("is not a state manifest: {e}")))
}

async fn read_version(
    remote: &Storage,
    operator: &str,
    r: PartitionRef,
) -> Result<VersionManifest> {
    let path = version_path(operator, r.version, r.epoch);
    let manifest: VersionManifest = read_json(remote, &path).await?;
    if manifest.encoding != ENCODING {
        return Err(Error::Checkpoint {
            file: remote.name_of(&path),
            message: format!(
                "holds state encoded as {:?}, which this engine does not read ({ENCODING})",
                manifest.encoding
            ),
        });
    }
    Ok(manifest)
}

async fn read_partition(remote: &Storage, path: &str) -> Result<PartitionManifest> {
    read_json(remote, path).await
}

/// A partition restored: its snapshot's files are in place, its changelogs
/// still to be applied.
struct RestoredPartition {
    /// Its SST files' objects, by name.
    ssts: HashMap<String, String>,
    /// The manifest's snapshot files and changelogs.
    snapshot: Vec<StoredFile>,
    changelogs: Vec<StoredFile>,
    /// The changelogs' write batches, oldest first.
    replay: Vec<Vec<u8>>,
    /// What came from where.
    from: Restored,
}

/// Restores partition `p` at `r` into `dir`: each file of its snapshot from
/// `kept` when this disk has it (same object name and size), else
/// downloaded (and kept); its changelogs downloaded.
async fn restore_partition(
    remote: &Storage,
    operator: &str,
    p: usize,
    r: PartitionRef,
    dir: PathBuf,
    kept: PathBuf,
) -> Result<RestoredPartition> {
    let path = partition_path(operator, p, r);
    let manifest = read_partition(remote, &path).await?;
    tokio::fs::create_dir_all(&dir).await.map_err(state_error)?;
    tokio::fs::create_dir_all(&kept)
        .await
        .map_err(state_error)?;
    let mut ssts = HashMap::new();
    let downloads = manifest.files.iter().map(|file| {
        let target = dir.join(&file.name);
        let local = kept.join(object_name(&file.path));
        let path = path.clone();
        async move {
            let mut from = Restored::default();
            let have = tokio::fs::metadata(&local)
                .await
                .is_ok_and(|m| m.len() == file.size);
            if have {
                from.local_files = 1;
                from.local_bytes = file.size;
            } else {
                let data = remote
                    .get(&file.path)
                    .await?
                    .ok_or_else(|| Error::Checkpoint {
                        file: remote.name_of(&file.path),
                        message: format!(
                            "is listed by {} but missing: the checkpoint is damaged",
                            remote.name_of(&path)
                        ),
                    })?;
                from.downloaded_files = 1;
                from.downloaded_bytes = data.len() as u64;
                // Whole or not at all: a crash leaves no short file.
                let part = local.with_extension("part");
                tokio::fs::write(&part, &data).await.map_err(state_error)?;
                tokio::fs::rename(&part, &local)
                    .await
                    .map_err(state_error)?;
            }
            // SST files are never written again: RocksDB shares them with
            // the kept copy. Its other files (MANIFEST, OPTIONS) it may
            // append to: a copy of their own.
            if file.name.ends_with(".sst") {
                link_or_copy(&local, &target).await?;
            } else {
                tokio::fs::copy(&local, &target)
                    .await
                    .map_err(state_error)?;
            }
            Ok::<_, Error>(from)
        }
    });
    let each: Vec<Restored> = futures::stream::iter(downloads)
        .buffer_unordered(TRANSFERS)
        .try_collect()
        .await?;
    let mut restored = Restored::default();
    each.into_iter().for_each(|r| restored.add(r));
    for file in &manifest.files {
        if file.name.ends_with(".sst") {
            ssts.insert(file.name.clone(), file.path.clone());
        }
    }
    let replay: Vec<(Vec<u8>, Restored)> =
        futures::stream::iter(manifest.changelogs.iter().map(|log| {
            let (path, local) = (&path, kept.join(object_name(&log.path)));
            async move {
                let mut from = Restored::default();
                if let Ok(data) = tokio::fs::read(&local).await
                    && data.len() as u64 == log.size
                {
                    from.local_files = 1;
                    from.local_bytes = log.size;
                    return Ok((data, from));
                }
                let data = remote
                    .get(&log.path)
                    .await?
                    .map(|b| b.to_vec())
                    .ok_or_else(|| Error::Checkpoint {
                        file: remote.name_of(&log.path),
                        message: format!(
                            "is listed by {} but missing: the checkpoint is damaged",
                            remote.name_of(path)
                        ),
                    })?;
                from.downloaded_files = 1;
                from.downloaded_bytes = log.size;
                let part = local.with_extension("part");
                tokio::fs::write(&part, &data).await.map_err(state_error)?;
                tokio::fs::rename(&part, &local)
                    .await
                    .map_err(state_error)?;
                Ok::<_, Error>((data, from))
            }
        }))
        .buffered(TRANSFERS)
        .try_collect()
        .await?;
    let replay = replay
        .into_iter()
        .map(|(data, from)| {
            restored.add(from);
            data
        })
        .collect();
    keep_only(&kept, manifest.files.iter().chain(&manifest.changelogs))?;
    Ok(RestoredPartition {
        ssts,
        snapshot: manifest.files,
        changelogs: manifest.changelogs,
        replay,
        from: restored,
    })
}

/// The last part of an object's path: its name in the kept directory.
fn object_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A hard link to `from` at `to` (same disk), else a copy.
async fn link_or_copy(from: &LocalPath, to: &LocalPath) -> Result<()> {
    if tokio::fs::hard_link(from, to).await.is_ok() {
        return Ok(());
    }
    tokio::fs::copy(from, to).await.map(|_| ()).map_err(|e| {
        state_error(format!(
            "cannot copy {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Removes from `kept` every file the version (`files`) does not list.
fn keep_only<'a>(kept: &LocalPath, files: impl IntoIterator<Item = &'a StoredFile>) -> Result<()> {
    let listed: HashSet<&str> = files.into_iter().map(|f| object_name(&f.path)).collect();
    for entry in std::fs::read_dir(kept).map_err(state_error)? {
        let entry = entry.map_err(state_error)?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| listed.contains(n)) {
            std::fs::remove_file(entry.path()).map_err(state_error)?;
        }
    }
    Ok(())
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
    use super::*;

    fn key(i: u32) -> (usize, Vec<u8>) {
        ((i % 4) as usize, i.to_be_bytes().to_vec())
    }

    async fn open_at(dir: &LocalPath, restore: Option<PartitionRef>, epoch: u64) -> StateStore {
        let remote = Storage::open(dir.join("checkpoint").to_str().unwrap(), "f").unwrap();
        StateStore::open(
            "agg",
            4,
            &dir.join(format!("scratch-{epoch}")),
            Some(remote),
            restore,
            epoch,
        )
        .await
        .unwrap()
    }

    /// Version `version` as committed by epoch 1.
    fn at(version: u64) -> PartitionRef {
        PartitionRef { version, epoch: 1 }
    }

    /// Version 0: keys 0..100 with values `v<i>`.
    async fn commit_hundred_keys(store: &mut StateStore) {
        let entries: Vec<PartitionedEntry> = (0u32..100)
            .map(|i| {
                let (p, k) = key(i);
                (p, k, format!("v{i}").into_bytes())
            })
            .collect();
        store.put_many(&entries, 100).unwrap();
        store.commit(0).await.unwrap();
    }

    /// Version 0: keys 0..100 with values `v<i>`; version 1: key 7 is
    /// `seven`.
    async fn commit_two_versions(store: &mut StateStore) {
        commit_hundred_keys(store).await;
        let (p, k) = key(7);
        store.put_many(&[(p, k, b"seven".to_vec())], 0).unwrap();
        store.commit(1).await.unwrap();
    }

    #[tokio::test]
    async fn a_replica_takes_over_the_partitions_it_owns_from_another_location() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = open_at(dir.path(), None, 1).await;
        commit_two_versions(&mut first).await;
        let old = Storage::open(dir.path().join("checkpoint").to_str().unwrap(), "f").unwrap();
        // A new location, seeded with partitions 1 and 3 as of version 1
        // (epoch 1) of the old one.
        let new = Storage::open(dir.path().join("replica").to_str().unwrap(), "f").unwrap();
        let seeds: Vec<Seed> = [1, 3]
            .map(|partition| Seed {
                partition,
                storage: old.clone(),
                at: at(1),
                evicted_ms: (partition == 3).then_some(20_000),
            })
            .to_vec();
        let mut taken = StateStore::open_seeded(
            "agg",
            4,
            &dir.path().join("scratch-seeded"),
            Some(new.clone()),
            None,
            &seeds,
            2,
        )
        .await
        .unwrap();
        let all: Vec<PartitionedKey> = (0u32..100).map(key).collect();
        let got = taken.get_many(&all).unwrap();
        for (i, value) in got.iter().enumerate() {
            let owned = i % 4 == 1 || i % 4 == 3;
            let want = match i {
                7 => Some(b"seven".to_vec()),
                _ if owned => Some(format!("v{i}").into_bytes()),
                _ => None,
            };
            assert_eq!(value, &want, "key {i}");
        }
        assert_eq!(taken.rows(), 50);
        // Partition 3's old owner had written its windows up to 20 s: until
        // the first commit, its late-events watermark is that, not the
        // generation's (higher) one.
        assert_eq!(taken.late_by_partition(19_000_000), None);
        assert_eq!(
            taken.late_by_partition(20_196_000),
            Some(vec![20_196_000, 20_196_000, 20_196_000, 20_000_000])
        );
        // Its first commit writes them whole to its own location: a
        // restart from there needs nothing of the old one.
        taken.commit(5).await.unwrap();
        assert_eq!(taken.late_by_partition(20_196_000), None);
        std::fs::remove_dir_all(dir.path().join("checkpoint")).unwrap();
        let again = StateStore::open(
            "agg",
            4,
            &dir.path().join("scratch-again"),
            Some(new),
            Some(PartitionRef {
                version: 5,
                epoch: 2,
            }),
            3,
        )
        .await
        .unwrap();
        assert_eq!(again.get_many(&all).unwrap(), got);
    }

    #[test]
    fn spread_keeps_the_order_of_its_items() {
        for n in [0usize, 1, 2, 3, 17] {
            let out = spread((0..n).collect(), |i| i * 10);
            assert_eq!(out, (0..n).map(|i| i * 10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn little_work_is_not_spread_over_threads() {
        let here = std::thread::current().id();
        let out = spread_rows((0..4).collect(), SPREAD_ROWS - 1, |i| {
            (i, std::thread::current().id())
        });
        assert_eq!(out, (0..4).map(|i| (i, here)).collect::<Vec<_>>());
        if cores() > 1 {
            let out = spread_rows((0..4).collect(), SPREAD_ROWS, |_| {
                std::thread::current().id()
            });
            assert!(out.iter().all(|id| *id != here));
        }
    }

    #[tokio::test]
    async fn taking_below_a_bound_twice_takes_each_key_once_and_scans_leave_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_at(dir.path(), None, 1).await;
        let entries: Vec<PartitionedEntry> = (0u32..100)
            .map(|i| {
                let (p, k) = key(i);
                (p, k, vec![i as u8])
            })
            .collect();
        store.put_many(&entries, 100).unwrap();
        let keys: Vec<PartitionedKey> = (0u32..100).map(key).collect();
        let values = store.get_many(&keys).unwrap();
        assert!(
            values
                .iter()
                .enumerate()
                .all(|(i, v)| v.as_deref() == Some(&[i as u8][..]))
        );
        let between = store
            .scan_between(&30u32.to_be_bytes(), &40u32.to_be_bytes())
            .unwrap();
        assert_eq!(between.len(), 10);
        let first = store.take_below(&50u32.to_be_bytes()).unwrap();
        assert_eq!(first.len(), 50);
        assert_eq!(store.rows(), 50);
        // The next take starts where this one stopped.
        let second = store.take_below(&60u32.to_be_bytes()).unwrap();
        let mut taken: Vec<u32> = second
            .iter()
            .map(|(k, _)| u32::from_be_bytes(k[..4].try_into().unwrap()))
            .collect();
        taken.sort_unstable();
        assert_eq!(taken, (50..60).collect::<Vec<_>>());
        assert!(store.take_below(&60u32.to_be_bytes()).unwrap().is_empty());
        assert_eq!(store.scan().unwrap().len(), 40);
    }

    #[tokio::test]
    async fn state_survives_through_the_checkpoint_and_uploads_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_at(dir.path(), None, 1).await;
        // Batch 1 changes one key: one partition gets a new manifest.
        commit_two_versions(&mut store).await;
        let remote = Storage::open(dir.path().join("checkpoint").to_str().unwrap(), "f").unwrap();
        let v1 = read_version(
            &remote,
            "agg",
            PartitionRef {
                version: 1,
                epoch: 1,
            },
        )
        .await
        .unwrap();
        let changed: Vec<usize> = v1
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.version == 1)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            changed,
            [3],
            "only the partition written to is checkpointed again"
        );
        assert_eq!(v1.rows, 100);

        // Another run (epoch 2) restores version 1.
        drop(store);
        let mut restored = open_at(
            dir.path(),
            Some(PartitionRef {
                version: 1,
                epoch: 1,
            }),
            2,
        )
        .await;
        let keys = vec![key(7), key(8)];
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
        restored.commit(2).await.unwrap();
        // Version 0 is still there, as it was.
        drop(restored);
        let old = open_at(
            dir.path(),
            Some(PartitionRef {
                version: 0,
                epoch: 1,
            }),
            3,
        )
        .await;
        assert_eq!(old.get_many(&keys[..1]).unwrap(), [Some(b"v7".to_vec())]);
    }

    #[tokio::test]
    async fn a_restart_on_the_same_disk_downloads_only_what_the_disk_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = || Storage::open(dir.path().join("checkpoint").to_str().unwrap(), "f");
        let open = |disk: &'static str, restore: Option<PartitionRef>, epoch: u64| {
            let remote = checkpoint().unwrap();
            let local = dir.path().join(disk);
            async move {
                StateStore::open("agg", 4, &local, Some(remote), restore, epoch)
                    .await
                    .unwrap()
            }
        };
        let v1 = PartitionRef {
            version: 1,
            epoch: 1,
        };
        let mut store = open("disk", None, 1).await;
        // Snapshots only: what this test shows is the reuse of their files.
        store.snapshot_every = 1;
        commit_two_versions(&mut store).await;
        drop(store);

        // Another disk downloads every file of version 1.
        let elsewhere = open("other-disk", Some(v1), 2).await;
        let all = elsewhere.restored();
        assert!(all.downloaded_files >= 8, "{all:?}");
        assert_eq!((all.local_files, all.local_bytes), (0, 0));
        drop(elsewhere);

        // The same disk downloads none.
        let again = open("disk", Some(v1), 3).await;
        assert_eq!(
            again.restored(),
            Restored {
                downloaded_files: 0,
                downloaded_bytes: 0,
                local_files: all.downloaded_files,
                local_bytes: all.downloaded_bytes,
            }
        );
        assert_eq!(
            again.get_many(&[key(7), key(8)]).unwrap(),
            [Some(b"seven".to_vec()), Some(b"v8".to_vec())]
        );
        drop(again);

        // Not even when the checkpoint lost its SST files (they are read
        // from the disk, not the store)...
        let remote_dir = dir.path().join("checkpoint/state/agg");
        let mut removed = 0;
        for p in 0..4 {
            for entry in std::fs::read_dir(remote_dir.join(p.to_string())).unwrap() {
                let path = entry.unwrap().path();
                if path.to_str().unwrap().ends_with(".sst") {
                    std::fs::remove_file(path).unwrap();
                    removed += 1;
                }
            }
        }
        assert!(removed >= 4);
        let again = open("disk", Some(v1), 4).await;
        assert_eq!(again.restored().downloaded_files, 0);
        assert_eq!(again.rows(), 100);
        drop(again);

        // ...and a local file of another size is no copy: downloaded again.
        let kept = dir.path().join("disk/agg.files/3");
        let manifest = std::fs::read_dir(&kept)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_str().unwrap().contains("MANIFEST"))
            .unwrap();
        std::fs::write(&manifest, b"short").unwrap();
        let again = open("disk", Some(v1), 5).await;
        assert_eq!(again.restored().downloaded_files, 1);
        assert_eq!(
            again.get_many(&[key(7)]).unwrap(),
            [Some(b"seven".to_vec())]
        );
    }

    #[tokio::test]
    async fn keys_taken_below_a_bound_leave_as_one_range_deletion_that_a_restore_replays() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_at(dir.path(), None, 1).await;
        commit_hundred_keys(&mut store).await;
        let taken = store.take_below(&40u32.to_be_bytes()).unwrap();
        assert_eq!(taken.len(), 40);
        store.commit(1).await.unwrap();
        let committed = store.committed();
        assert_eq!((committed.partitions, committed.snapshots), (4, 0));
        // A range deletion a partition (~20 bytes), not 10 tombstones each.
        assert!(committed.changelog_bytes < 120, "{committed:?}");
        drop(store);
        // Another disk: version 0's snapshot, then version 1's changelog.
        let restored = open_at(dir.path(), Some(at(1)), 2).await;
        let keys: Vec<_> = (0u32..100).map(key).collect();
        let values = restored.get_many(&keys).unwrap();
        for (i, value) in values.iter().enumerate() {
            assert_eq!(value.is_some(), i >= 40, "key {i}");
        }
        assert_eq!(restored.scan().unwrap().len(), 60);
        assert_eq!(restored.rows(), 60);
    }

    #[tokio::test]
    async fn a_batch_commits_its_changes_as_a_changelog_and_a_snapshot_once_every_few_versions() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Storage::open(dir.path().join("checkpoint").to_str().unwrap(), "f").unwrap();
        let mut store = open_at(dir.path(), None, 1).await;
        store.snapshot_every = 3;
        // Version 0: every partition's first commit is a snapshot.
        let entries: Vec<PartitionedEntry> = (0u32..1000)
            .map(|i| {
                let (p, k) = key(i);
                (p, k, vec![b'x'; 100])
            })
            .collect();
        store.put_many(&entries, 1000).unwrap();
        store.commit(0).await.unwrap();
        let first = store.committed();
        assert_eq!((first.partitions, first.snapshots), (4, 4));
        assert!(first.bytes > 4000, "{first:?}");
        // Versions 1-7 change key 7 (partition 3); version 2 deletes key 8
        // (partition 0) too.
        let mut kinds = Vec::new();
        for version in 1..=7u64 {
            let (p, k) = key(7);
            store
                .put_many(&[(p, k, format!("v{version}").into_bytes())], 0)
                .unwrap();
            if version == 2 {
                store.delete_many(&[key(8)]).unwrap();
            }
            store.commit(version).await.unwrap();
            let committed = store.committed();
            kinds.push((committed.partitions, committed.snapshots));
            if committed.snapshots == 0 {
                // A changelog costs what changed, not what is kept.
                assert!(committed.bytes < 100, "{committed:?}");
            }
        }
        // Partition 3 snapshots when (version + 3) % 3 == 0: versions 3 and 6.
        assert_eq!(
            kinds,
            [(1, 0), (2, 0), (1, 1), (1, 0), (1, 0), (1, 1), (1, 0)]
        );
        let manifest = read_partition(&remote, &partition_path("agg", 3, at(7)))
            .await
            .unwrap();
        let snapshot = read_partition(&remote, &partition_path("agg", 3, at(6)))
            .await
            .unwrap();
        assert!(snapshot.changelogs.is_empty());
        assert_eq!(manifest.files, snapshot.files, "version 6's snapshot");
        assert_eq!(manifest.changelogs.len(), 1, "and version 7's changes");
        drop(store);
        // Another disk restores each version: snapshot, then changelogs.
        for (version, seven) in [(7u64, "v7"), (5, "v5"), (1, "v1")] {
            let restored = open_at(dir.path(), Some(at(version)), 2 + version).await;
            assert_eq!(
                restored.get_many(&[key(7), key(8), key(9)]).unwrap(),
                [
                    Some(seven.as_bytes().to_vec()),
                    if version >= 2 {
                        None
                    } else {
                        Some(vec![b'x'; 100])
                    },
                    Some(vec![b'x'; 100])
                ],
                "version {version}"
            );
            assert_eq!(restored.rows(), if version >= 2 { 999 } else { 1000 });
        }
        // The writer's disk kept the changelogs too: it downloads nothing.
        let again = open_at(dir.path(), Some(at(7)), 1).await;
        assert_eq!(
            again.restored().downloaded_files,
            0,
            "{:?}",
            again.restored()
        );
        assert_eq!(again.get_many(&[key(7)]).unwrap(), [Some(b"v7".to_vec())]);
    }

    #[tokio::test]
    async fn a_changed_schema_is_refused_at_restore() {
        use datafusion::arrow::datatypes::{DataType, Field};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let schema = |names: &[&str]| {
            StateSchema::new(
                &[Arc::new(Field::new("k", DataType::Utf8, true))],
                &names
                    .iter()
                    .map(|n| Arc::new(Field::new(*n, DataType::Int64, true)))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        let mut store = open_at(dir.path(), None, 1).await;
        store.set_schema(schema(&["n"])).unwrap();
        store.commit(0).await.unwrap();
        drop(store);
        let mut again = open_at(
            dir.path(),
            Some(PartitionRef {
                version: 0,
                epoch: 1,
            }),
            2,
        )
        .await;
        again.set_schema(schema(&["n"])).unwrap();
        let err = again
            .set_schema(schema(&["n", "mx"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"mx\" is new") && err.contains("state/agg"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn old_versions_and_a_losing_runs_objects_are_deleted_and_nothing_newer() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = Checkpoint::open(dir.path().join("checkpoint").to_str().unwrap()).unwrap();
        let mut store = open_at(dir.path(), None, 1).await;
        for version in 0..30u32 {
            // Each batch rewrites every key: old SST files become garbage.
            let entries: Vec<(usize, Vec<u8>, Vec<u8>)> = (0u32..50)
                .map(|i| {
                    let (p, k) = key(i);
                    (p, k, version.to_be_bytes().to_vec())
                })
                .collect();
            store
                .put_many(&entries, if version == 0 { 50 } else { 0 })
                .unwrap();
            store.commit(u64::from(version)).await.unwrap();
        }
        // A zombie of epoch 9 wrote version 28 too, and version 31 (not committed).
        let mut zombie = open_at(
            dir.path(),
            Some(PartitionRef {
                version: 27,
                epoch: 1,
            }),
            9,
        )
        .await;
        zombie.put_many(&[(0, vec![0], vec![1])], 1).unwrap();
        zombie.commit(28).await.unwrap();
        zombie.commit(31).await.unwrap();
        for version in 0..30u64 {
            checkpoint
                .write_commit(&crate::checkpoint::CommitEntry {
                    batch_id: version,
                    epoch: 1,
                    run_id: "r".into(),
                    timestamp_ms: 0,
                    watermark: Default::default(),
                    version: crate::checkpoint::VERSION,
                })
                .await
                .unwrap();
        }
        let remote = Storage::open(dir.path().join("checkpoint").to_str().unwrap(), "f").unwrap();
        store.commits = 10 * 4;
        store.cleaner.as_mut().unwrap().retain = 5;
        store.clean(&checkpoint, 29).await.unwrap();
        store.cleaned().await.unwrap();
        let names: HashSet<String> = remote
            .list("state/agg")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.location.as_ref().to_owned())
            .collect();
        assert!(
            !names.contains("state/agg/v28-9.json"),
            "the loser's version goes"
        );
        assert!(names.contains("state/agg/v28-1.json"));
        assert!(
            names.contains("state/agg/v31-9.json"),
            "an uncommitted batch is left alone"
        );
        assert!(
            !names.iter().any(|n| n.contains("/28-9-")),
            "the loser's files go"
        );
        // Every file left is listed by a kept version or belongs to batch 31.
        for name in &names {
            if name.ends_with(".json") {
                continue;
            }
            let file = name.rsplit('/').next().unwrap();
            let (version, _) = parse_file_name(file).unwrap();
            assert!(version <= 29 || version == 31, "{name}");
        }
        let mut manifests: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("state/agg/v"))
            .collect();
        manifests.sort();
        assert_eq!(
            manifests,
            [
                "state/agg/v25-1.json",
                "state/agg/v26-1.json",
                "state/agg/v27-1.json",
                "state/agg/v28-1.json",
                "state/agg/v29-1.json",
                "state/agg/v31-9.json"
            ],
            "the newest 5 committed versions are kept"
        );
        // The newest version still restores whole.
        drop(store);
        let restored = open_at(
            dir.path(),
            Some(PartitionRef {
                version: 29,
                epoch: 1,
            }),
            10,
        )
        .await;
        assert_eq!(
            restored.get_many(&[key(3)]).unwrap(),
            [Some(29u32.to_be_bytes().to_vec())]
        );
    }

    #[tokio::test]
    async fn a_missing_manifest_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Storage::open(dir.path().to_str().unwrap(), "f").unwrap();
        let err = StateStore::open(
            "agg",
            2,
            &dir.path().join("s"),
            Some(remote),
            Some(PartitionRef {
                version: 3,
                epoch: 1,
            }),
            2,
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("state/agg/v3-1.json"), "{err}");
    }
}
