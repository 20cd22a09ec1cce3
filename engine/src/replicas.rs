//! Scale-out: replica `i` of `n` runs the query on its slice of the Kafka
//! partitions, with its own offset and commit logs, its own epochs and its
//! own transactional id, as a Kafka Streams instance runs its tasks.
//!
//! Replicas run in **generations**. Generation `g` is written once, create
//! only, to `assignments/<g>` under the query's checkpoint: how many
//! replicas it has and where each partition of each source starts. Replica
//! `i` of generation `g` keeps its logs under `replicas/g<g>/r<i>/`.
//! Generation 0 is implicit: one replica whose logs are the checkpoint's
//! own `offsets/` and `commits/` (a query that never scaled out looks as
//! it always did).
//!
//! A **rescale** starts replicas with another count. Replica 0 of the new
//! count hands over, while the others wait for the new assignment:
//!
//! 1. it *settles* every replica of the newest generation: claims the next
//!    epoch of its logs (a replica still running is fenced at its next
//!    check, and its producer by Kafka when the transactional id is
//!    opened again) and finishes the batch it left planned but not
//!    committed, exactly as a restart would;
//! 2. it merges where each partition stands: the generation's starts,
//!    overlaid with each replica's last committed batch's ends;
//! 3. it writes `assignments/<g+1>` with the new count and those starts.
//!
//! Each partition's records before its start were committed by exactly one
//! replica of an older generation, and the ones after it are read by
//! exactly one replica of the new one: nothing lost, nothing twice.
//!
//! A stateful query's generations from 1 on run in two stages (see
//! [`crate::shuffle`]): the hand-over settles both stages of every replica
//! and also writes, in `assignments/<g+1>`, where each state partition's
//! newest committed version is and the highest watermark the old second
//! stages ran with; a new replica's first run restores the partitions it
//! owns from there. Complete mode still runs on one replica.
//!
//! A stateful query over a topic already keyed by one of its grouping
//! columns (`keyedBy`) runs in one stage instead (a **keyed** generation):
//! its state is partitioned as the topic is, so the replica that reads
//! topic partition `p` keeps state partition `p`; the hand-over writes
//! where each state partition's newest version is and the highest
//! watermark, as above, and each replica's watermark is the minimum over
//! the generation's replicas (read from their commit logs, as a second
//! stage reads the first's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_crds::StreamingQuery;
use tokio::sync::watch;
use tracing::info;

use crate::checkpoint::{Checkpoint, new_metadata};
use crate::kafka::{offsets_from_json, offsets_json};
use crate::monitor::Monitor;
use crate::runner::{RunOptions, Runner};
use crate::storage::Created;
use crate::{Error, Result};

/// The format of `assignments/<g>`.
const VERSION: u32 = 1;

/// How often a replica waiting for a hand-over looks for it.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// Which replica this is, of how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// From 0 (the StatefulSet ordinal).
    pub index: u32,
    /// How many replicas run the query.
    pub count: u32,
}

impl Default for Replica {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Replica {
    /// Checks that `index` is below `count` and `count` at least 1.
    pub fn new(index: u32, count: u32) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Unsupported {
                path: "--replica".into(),
                message: format!(
                    "replica {index} of {count} does not exist: replicas are numbered from 0 to the count minus 1"
                ),
            });
        }
        Ok(Self { index, count })
    }

    /// Whether this replica reads `partition` of `topic`: partitions go
    /// round-robin, each topic starting at a replica given by a stable hash
    /// of its name, so that a partition added later does not move the
    /// others.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        let start = fnv1a(topic.as_bytes()) % u64::from(self.count);
        (start + partition as u64) % u64::from(self.count) == u64::from(self.index)
    }

    /// Keeps the partitions of Kafka offsets (`{topic: {partition:
    /// offset}}`) this replica owns; other offsets unchanged.
    pub fn slice(&self, offsets: &Value) -> Value {
        match offsets_from_json(offsets) {
            Some(mut parsed) => {
                for (topic, partitions) in parsed.iter_mut() {
                    partitions.retain(|p, _| self.owns(topic, *p));
                }
                parsed.retain(|_, partitions| !partitions.is_empty());
                offsets_json(&parsed)
            }
            None => offsets.clone(),
        }
    }
}

/// FNV-1a, 64 bits: a hash that never changes between builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where a state partition's newest committed version is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateAt {
    /// The checkpoint location (a replica's `merge/` logs, or the query's
    /// own for generation 0).
    pub location: String,
    /// The version (batch) that lists it.
    pub version: u64,
    /// The run that committed that version.
    pub epoch: u64,
    /// The eviction watermark that version was written with: the windows
    /// of the partition ending at or before it were written. Replicas of
    /// one generation stop at different watermarks, and the next starts at
    /// the highest: a partition whose owner stopped lower still has windows
    /// to write, from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted_ms: Option<i64>,
}

/// `assignments/<g>`: a generation of replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// The generation.
    pub generation: u64,
    /// How many replicas it has.
    pub replicas: u32,
    /// Where each source starts, by name (Kafka offsets of every partition
    /// known at the hand-over; null: resolved from `startingOffsets`).
    pub starts: BTreeMap<String, Value>,
    /// How long the hand-over from the previous generation took, in ms.
    pub handover_ms: u64,
    /// The format.
    pub version: u32,
    /// Whether the generation runs the query in two stages, its rows
    /// repartitioned by key (a stateful query; see [`crate::shuffle`]).
    #[serde(default)]
    pub stages: bool,
    /// With stages: each state partition's newest committed version at
    /// the hand-over (`None`: it has none yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<Option<StateAt>>,
    /// With stages: the highest watermark the previous generation's
    /// stateful stage ran with (ms), where the new one's starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark_ms: Option<i64>,
    /// Whether the generation runs a stateful query in one stage, each
    /// replica keeping the state partitions of the topic partitions it
    /// reads (`keyedBy`); `state` and `watermarkMs` as with stages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keyed: bool,
}

impl Assignment {
    /// Generation 0: one replica, the checkpoint's own logs.
    fn first() -> Self {
        Self {
            generation: 0,
            replicas: 1,
            starts: BTreeMap::new(),
            handover_ms: 0,
            version: VERSION,
            stages: false,
            state: Vec::new(),
            watermark_ms: None,
            keyed: false,
        }
    }
}

/// What a replica's stateful stage takes over in a generation that keeps
/// state on several replicas (the second stage of two, or the one stage of
/// a keyed generation), and whose watermarks make its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Handed {
    /// Where every replica of the generation keeps its (first-stage) logs:
    /// the watermark is the minimum over them.
    pub peers: Vec<String>,
    /// The state partitions it owns that have a committed version, and
    /// where it is.
    pub seeds: Vec<(usize, StateAt)>,
    /// The watermark its first run starts with.
    pub watermark_ms: Option<i64>,
}

/// The index and the `keyedBy` column of the query's keyed Kafka source.
pub fn keyed_by(query: &StreamingQuery) -> Option<(usize, &str)> {
    query.spec.sources.iter().enumerate().find_map(|(i, s)| {
        s.kafka
            .as_ref()
            .and_then(|k| k.keyed_by.as_deref())
            .map(|column| (i, column))
    })
}

/// The topic whose partitions' owners own the state partitions of the same
/// numbers: a keyed source's topic, else the repartition topic.
pub fn state_topic(query: &StreamingQuery) -> String {
    keyed_by(query)
        .and_then(|(i, _)| query.spec.sources[i].kafka.as_ref())
        .and_then(|k| {
            k.topic
                .clone()
                .or_else(|| k.topics.as_ref().and_then(|t| t.first().cloned()))
        })
        .unwrap_or_else(|| {
            crate::shuffle::topic(query.metadata.name.as_deref().unwrap_or_default())
        })
}

/// A replica's part of a two-stage generation (see [`crate::shuffle`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Stages {
    /// Where its second stage's logs are: `<its location>/merge`.
    pub merge: String,
}

/// What one replica of one generation runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRun {
    /// The replica.
    pub replica: Replica,
    /// Its generation.
    pub generation: u64,
    /// Where its logs are: the checkpoint's location, or
    /// `<location>/replicas/g<g>/r<i>`.
    pub location: String,
    /// Where each source starts when this replica's logs are new (its
    /// slice of the assignment's starts; null: from `startingOffsets`).
    pub starts: BTreeMap<String, Value>,
    /// Told to the sinks: their transactional ids end with it (empty for
    /// generation 0, whose ids are those of a query never scaled out).
    pub scope: String,
    /// The query's id, from the checkpoint's metadata: a replica's logs
    /// carry it too.
    pub query_id: String,
    /// With two stages: the second's.
    pub stages: Option<Stages>,
    /// In a generation that keeps state on several replicas (two stages,
    /// or keyed): what its stateful stage takes over.
    pub handed: Option<Handed>,
}

/// Where replica `i` of generation `g` keeps its logs.
fn replica_location(root: &str, g: u64, i: u32) -> String {
    format!("{}/replicas/g{g}/r{i}", root.trim_end_matches('/'))
}

impl ReplicaRun {
    /// The run of `replica` in `assignment`; `topic` is the query's
    /// [`state_topic`] (a state partition is owned as its topic partition
    /// is).
    pub fn of(
        root: &str,
        assignment: &Assignment,
        replica: Replica,
        query_id: &str,
        topic: &str,
    ) -> Self {
        if assignment.generation == 0 {
            return Self {
                replica,
                generation: 0,
                location: root.to_owned(),
                starts: BTreeMap::new(),
                scope: String::new(),
                query_id: query_id.to_owned(),
                stages: None,
                handed: None,
            };
        }
        let (g, i) = (assignment.generation, replica.index);
        let location = replica_location(root, g, i);
        let stages = assignment.stages.then(|| Stages {
            merge: format!("{location}/merge"),
        });
        let handed = (assignment.stages || assignment.keyed).then(|| Handed {
            peers: (0..assignment.replicas)
                .map(|j| replica_location(root, g, j))
                .collect(),
            seeds: assignment
                .state
                .iter()
                .enumerate()
                .filter(|(p, _)| replica.owns(topic, *p as i32))
                .filter_map(|(p, at)| at.clone().map(|at| (p, at)))
                .collect(),
            watermark_ms: assignment.watermark_ms,
        });
        Self {
            replica,
            generation: g,
            stages,
            handed,
            location,
            starts: assignment
                .starts
                .iter()
                .map(|(name, start)| {
                    let start = if start.is_null() {
                        Value::Null
                    } else {
                        replica.slice(start)
                    };
                    (name.clone(), start)
                })
                .collect(),
            scope: format!("g{g}-r{i}"),
            query_id: query_id.to_owned(),
        }
    }
}

/// The newest generation written under `root`.
pub async fn newest(root: &Checkpoint) -> Result<Assignment> {
    match root.storage().list_numbered("assignments").await?.last() {
        Some(g) => root.read_existing(&format!("assignments/{g}")).await,
        None => Ok(Assignment::first()),
    }
}

/// Joins the query's replicas as `replica`: returns the run of the newest
/// generation when it has `replica.count` replicas; otherwise replica 0
/// hands over to a new generation of that many (see the module's
/// documentation) and the others wait for it. `None` when `stop` turned
/// true while waiting.
pub async fn join(
    query: &StreamingQuery,
    replica: Replica,
    monitor: &Monitor,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<ReplicaRun>> {
    let location = &query
        .spec
        .checkpoint
        .as_ref()
        .ok_or_else(|| Error::Unsupported {
            path: "spec.checkpoint".into(),
            message: "is needed to run several replicas: each keeps its logs under it".into(),
        })?
        .location;
    let root = Checkpoint::open(location)?;
    let name = query.metadata.name.clone().unwrap_or_default();
    let topic = state_topic(query);
    let sources = query.spec.sources.iter().map(|s| s.name.clone()).collect();
    let id = root
        .metadata(new_metadata(&name, sources, query.spec.state_partitions()))
        .await?
        .id;
    loop {
        let current = newest(&root).await?;
        if current.replicas == replica.count {
            if replica.index == 0 {
                // A clean a stop cut short.
                spawn_forget(&root, &current);
            }
            return Ok(Some(ReplicaRun::of(
                location, &current, replica, &id, &topic,
            )));
        }
        if replica.index != 0 {
            monitor.set_status(
                format!(
                    "Waiting for replica 0 to hand generation {} ({} replicas) over to {} replicas",
                    current.generation, current.replicas, replica.count
                ),
                false,
                false,
            );
            tokio::select! {
                _ = tokio::time::sleep(WAIT_POLL) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return Ok(None);
            }
            continue;
        }
        let started = Instant::now();
        monitor.set_status(
            format!(
                "Handing generation {} ({} replicas) over to {} replicas",
                current.generation, current.replicas, replica.count
            ),
            false,
            false,
        );
        let stateful = crate::runner::keeps_state(query).await?;
        let keyed = stateful && keyed_by(query).is_some();
        let handover = settle(query, location, &current, &id, stateful).await?;
        let next = Assignment {
            generation: current.generation + 1,
            replicas: replica.count,
            starts: handover.starts,
            handover_ms: started.elapsed().as_millis() as u64,
            version: VERSION,
            stages: stateful && !keyed,
            state: handover.state,
            watermark_ms: handover.watermark_ms,
            keyed,
        };
        let path = format!("assignments/{}", next.generation);
        let bytes = serde_json::to_vec_pretty(&next).expect("assignments serialize");
        match root.storage().create(&path, bytes).await? {
            Created::Written => {
                info!(
                    generation = next.generation,
                    replicas = next.replicas,
                    previous_replicas = current.replicas,
                    stages = next.stages,
                    keyed = next.keyed,
                    handover_ms = next.handover_ms,
                    "Handed the query over to a new generation of replicas."
                );
                monitor
                    .metrics()
                    .record_handover(next.handover_ms as f64 / 1e3);
                spawn_forget(&root, &next);
                return Ok(Some(ReplicaRun::of(location, &next, replica, &id, &topic)));
            }
            // Another replica 0 (a zombie, or a second rescale) wrote it
            // first: look again.
            Created::Exists(_) => continue,
        }
    }
}

/// Objects deleted at once.
const DELETES: usize = 16;

/// [`forget_old_generations`] in the background: the generation starts
/// meanwhile, and a clean cut short is finished when replica 0 next joins.
fn spawn_forget(root: &Checkpoint, generation: &Assignment) {
    if generation.generation == 0 {
        return;
    }
    let (root, generation) = (root.clone(), generation.clone());
    tokio::spawn(async move {
        match forget_old_generations(&root, &generation).await {
            Ok(0) => {}
            Ok(deleted) => info!(
                generation = generation.generation,
                deleted, "Deleted what older generations left that no state version needs."
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "Could not delete what older generations left; replica 0 tries again when it next joins."
            ),
        }
    });
}

/// Deletes what the generations before `next` left under `root` that
/// nothing needs any more: once a generation is settled its logs are read
/// no more (`next`'s starts say where each partition is), and its state
/// only while `next` names it as where a state partition is (a new replica
/// that has not committed yet restores from there; after its first commit
/// its own location holds the partition whole). So every object of
/// `replicas/g<k>/` outside the locations `next.state` names is deleted,
/// for k at least two below `next`'s generation (the one just settled may
/// still have a zombie finishing a batch into it: it goes at the next
/// hand-over), and the checkpoint's own `state/` (a query that never
/// scaled out) once no generation names it; `epochs/` and `metadata` stay,
/// so that a replica of an old generation still running finds itself
/// fenced. Returns how many objects it deleted.
pub async fn forget_old_generations(root: &Checkpoint, next: &Assignment) -> Result<usize> {
    let storage = root.storage();
    let base = storage.location().trim_end_matches('/');
    let named: Vec<String> = next
        .state
        .iter()
        .flatten()
        .map(|at| {
            at.location
                .trim_end_matches('/')
                .strip_prefix(base)
                .unwrap_or(&at.location)
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    let needed = |path: &str| {
        named
            .iter()
            .any(|n| !n.is_empty() && path.starts_with(&format!("{n}/")))
            || path.contains("/epochs/")
            || path.ends_with("/metadata")
    };
    let generation_of = |path: &str| -> Option<u64> {
        path.strip_prefix("replicas/g")?
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    let mut doomed: Vec<String> = storage
        .list("replicas")
        .await?
        .into_iter()
        .map(|o| o.location.to_string())
        .filter(|path| generation_of(path).is_some_and(|g| g + 1 < next.generation))
        .filter(|path| !needed(path))
        .collect();
    if next.generation >= 2 && !named.iter().any(String::is_empty) {
        doomed.extend(
            storage
                .list("state")
                .await?
                .into_iter()
                .map(|o| o.location.to_string()),
        );
    }
    let count = doomed.len();
    futures::stream::iter(doomed)
        .map(|path| async move { storage.delete(&path).await })
        .buffer_unordered(DELETES)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(count)
}

/// What a generation hands over to the next.
struct Handover {
    starts: BTreeMap<String, Value>,
    state: Vec<Option<StateAt>>,
    watermark_ms: Option<i64>,
}

/// Runs `run`'s `stage` until its planned batch is committed (a drain),
/// and returns what its logs committed last.
async fn drain(
    query: &StreamingQuery,
    run: &ReplicaRun,
    stage: crate::plan::Stage,
) -> Result<Option<crate::checkpoint::Committed>> {
    let monitor = Arc::new(Monitor::new(
        query.metadata.name.as_deref().unwrap_or_default(),
    ));
    let state_dir = std::env::temp_dir().join(format!(
        "sluice-settle-{}-g{}-r{}-{stage:?}",
        std::process::id(),
        run.generation,
        run.replica.index
    ));
    let runner = Runner::for_stage(query, monitor, state_dir.clone(), run, stage).await?;
    let (_never, stop) = watch::channel(false);
    runner
        .run(
            RunOptions {
                drain: true,
                ..RunOptions::default()
            },
            stop,
        )
        .await?;
    let _ = std::fs::remove_dir_all(&state_dir);
    let logs = match (stage, &run.stages) {
        (crate::plan::Stage::Merge, Some(stages)) => Checkpoint::open(&stages.merge)?,
        _ => Checkpoint::open(&run.location)?,
    };
    Ok(logs.recover().await?.committed)
}

/// Settles every replica of `generation` (fences it and finishes its
/// planned batch, in each stage) and returns where each source's
/// partitions stand and, for a `stateful` query, where each state
/// partition is and the watermark.
async fn settle(
    query: &StreamingQuery,
    root: &str,
    generation: &Assignment,
    query_id: &str,
    stateful: bool,
) -> Result<Handover> {
    use crate::plan::Stage;
    let topic = state_topic(query);
    let keyed = keyed_by(query).is_some();
    let partitions = query.spec.state_partitions() as usize;
    let mut ends = Vec::new();
    let mut state = generation.state.clone();
    state.resize(partitions, None);
    let mut watermark_ms = generation.watermark_ms;
    for index in 0..generation.replicas {
        let replica = Replica::new(index, generation.replicas)?;
        let run = ReplicaRun::of(root, generation, replica, query_id, &topic);
        let first = if run.stages.is_some() {
            Stage::Shuffle
        } else {
            Stage::Whole
        };
        if let Some(committed) = drain(query, &run, first).await? {
            ends.extend(committed.offsets.sources);
            if first == Stage::Whole && stateful {
                // Generation 0 (one replica: the whole state) or a keyed
                // generation: the partitions it owns are at its last
                // version.
                let at = StateAt {
                    location: run.location.clone(),
                    version: committed.offsets.batch_id,
                    epoch: committed.commit.epoch,
                    evicted_ms: committed.offsets.watermarks.eviction_ms,
                };
                for (p, slot) in state.iter_mut().enumerate() {
                    if replica.owns(&topic, p as i32) {
                        *slot = Some(at.clone());
                    }
                }
                watermark_ms = watermark_ms.max(committed.offsets.watermarks.eviction_ms);
            }
        }
        let Some(stages) = &run.stages else {
            continue;
        };
        if let Some(committed) = drain(query, &run, Stage::Merge).await? {
            ends.extend(committed.offsets.sources);
            for (p, at) in state.iter_mut().enumerate() {
                if replica.owns(&topic, p as i32) {
                    *at = Some(StateAt {
                        location: stages.merge.clone(),
                        version: committed.offsets.batch_id,
                        epoch: committed.commit.epoch,
                        evicted_ms: committed.offsets.watermarks.eviction_ms,
                    });
                }
            }
            watermark_ms = watermark_ms.max(committed.offsets.watermarks.eviction_ms);
        }
    }
    let mut starts: BTreeMap<String, Value> = generation.starts.clone();
    if generation.generation == 0 {
        // Where a query that never scaled out started (read after its
        // drain, which resolves it when the query never ran).
        let checkpoint = Checkpoint::open(root)?;
        for source in &query.spec.sources {
            starts.insert(
                source.name.clone(),
                checkpoint
                    .read_initial(&source.name)
                    .await?
                    .unwrap_or(Value::Null),
            );
        }
    }
    if stateful && !keyed && !generation.stages {
        // The first generation in two stages: the repartition topic is
        // read from where it ends now.
        let now = crate::shuffle::prepare_topic(query, partitions as u32).await?;
        starts.insert(crate::shuffle::SOURCE.to_owned(), offsets_json(&now));
    } else if stateful && !keyed {
        crate::shuffle::prepare_topic(query, partitions as u32).await?;
    }
    for ended in &ends {
        let merged = starts.entry(ended.name.clone()).or_insert(Value::Null);
        *merged = overlay(merged, &ended.end);
    }
    if !stateful {
        state.clear();
        watermark_ms = None;
    }
    Ok(Handover {
        starts,
        state,
        watermark_ms,
    })
}

/// Kafka offsets `base` with the partitions `top` has replaced.
fn overlay(base: &Value, top: &Value) -> Value {
    let Some(top) = offsets_from_json(top) else {
        return base.clone();
    };
    let mut merged = offsets_from_json(base).unwrap_or_default();
    for (topic, partitions) in top {
        merged.entry(topic).or_default().extend(partitions);
    }
    offsets_json(&merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_partition_has_exactly_one_owner_and_counts_balance() {
        for count in 1..=5 {
            let mut per_replica = vec![0; count as usize];
            for topic in ["orders", "payments", "t"] {
                for p in 0..12 {
                    let owners: Vec<u32> = (0..count)
                        .filter(|&i| Replica::new(i, count).unwrap().owns(topic, p))
                        .collect();
                    assert_eq!(owners.len(), 1, "{topic}/{p} of {count}: {owners:?}");
                    per_replica[owners[0] as usize] += 1;
                }
            }
            let (lo, hi) = (
                per_replica.iter().min().unwrap(),
                per_replica.iter().max().unwrap(),
            );
            assert!(hi - lo <= 3, "{count} replicas: {per_replica:?}");
        }
    }

    #[test]
    fn the_owner_is_stable_across_builds() {
        // Pinned: changing the hash would move partitions between the
        // replicas of a running generation.
        assert_eq!(fnv1a(b"orders"), 0x0012_5d92_50be_8b4c);
    }

    #[test]
    fn a_slice_keeps_the_owned_partitions_and_overlay_replaces_by_partition() {
        let all = json!({"t": {"0": 5, "1": 6, "2": 7, "3": 8}});
        let r0 = Replica::new(0, 2).unwrap();
        let r1 = Replica::new(1, 2).unwrap();
        let (a, b) = (r0.slice(&all), r1.slice(&all));
        let count = |v: &Value| v["t"].as_object().map_or(0, |o| o.len());
        assert_eq!(count(&a) + count(&b), 4);
        assert_eq!(overlay(&overlay(&all, &a), &b), all);
        let moved = overlay(&all, &json!({"t": {"1": 60}, "u": {"0": 1}}));
        assert_eq!(
            moved,
            json!({"t": {"0": 5, "1": 60, "2": 7, "3": 8}, "u": {"0": 1}})
        );
        assert_eq!(overlay(&Value::Null, &a), a);
        assert!(Replica::new(2, 2).is_err());
        assert!(Replica::new(0, 0).is_err());
    }

    #[tokio::test]
    async fn a_hand_over_deletes_what_no_generation_needs_and_keeps_the_fences() {
        let dir = tempfile::tempdir().unwrap();
        let root_location = dir.path().to_str().unwrap().to_owned();
        let root = Checkpoint::open(&root_location).unwrap();
        let storage = root.storage();
        let objects = [
            "state/aggregate/v9-1.json",
            "offsets/9",
            "epochs/1",
            "replicas/g1/r0/state/aggregate/0/5-1-000009.sst",
            "replicas/g1/r0/merge/state/aggregate/v5-1.json",
            "replicas/g1/r0/merge/epochs/2",
            "replicas/g1/r0/offsets/5",
            "replicas/g1/r0/epochs/2",
            "replicas/g1/r0/metadata",
            "replicas/g2/r0/merge/state/aggregate/v7-1.json",
            "replicas/g2/r0/offsets/7",
            "replicas/g2/r1/merge/state/aggregate/v8-1.json",
            "replicas/g3/r0/offsets/0",
        ];
        for path in objects {
            storage.put(path, b"x".to_vec()).await.unwrap();
        }
        let at = |location: String| {
            Some(StateAt {
                location,
                version: 7,
                epoch: 1,
                evicted_ms: None,
            })
        };
        // Generation 4 names one partition at g2/r0's merge location and
        // one at the checkpoint's own (a replica that never committed): g1
        // and g2 go but for their fences and that location; g3 (the one
        // just settled) and the root's state stay.
        let mut next = Assignment {
            generation: 4,
            state: vec![
                at(format!("{root_location}/replicas/g2/r0/merge")),
                at(root_location.clone()),
            ],
            ..Assignment::first()
        };
        assert_eq!(forget_old_generations(&root, &next).await.unwrap(), 5);
        let left: Vec<String> = storage
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.location.to_string())
            .collect();
        for kept in [
            "state/aggregate/v9-1.json",
            "offsets/9",
            "replicas/g1/r0/merge/epochs/2",
            "replicas/g1/r0/epochs/2",
            "replicas/g1/r0/metadata",
            "replicas/g2/r0/merge/state/aggregate/v7-1.json",
            "replicas/g3/r0/offsets/0",
        ] {
            assert!(left.contains(&kept.to_owned()), "{kept} deleted: {left:?}");
        }
        for gone in [
            "replicas/g1/r0/state/aggregate/0/5-1-000009.sst",
            "replicas/g2/r0/offsets/7",
            "replicas/g2/r1/merge/state/aggregate/v8-1.json",
        ] {
            assert!(!left.contains(&gone.to_owned()), "{gone} kept: {left:?}");
        }
        // Once no generation names the checkpoint's own state, it goes too.
        next.state.pop();
        assert_eq!(forget_old_generations(&root, &next).await.unwrap(), 1);
        assert!(
            storage
                .get("state/aggregate/v9-1.json")
                .await
                .unwrap()
                .is_none()
        );
        assert!(storage.get("epochs/1").await.unwrap().is_some());
    }

    #[test]
    fn generation_zero_is_the_checkpoint_itself() {
        let first = Assignment::first();
        let run = ReplicaRun::of("s3://b/q/", &first, Replica::default(), "id", "t");
        assert_eq!(run.location, "s3://b/q/");
        assert_eq!(run.scope, "");
        let second = Assignment {
            generation: 2,
            replicas: 3,
            starts: BTreeMap::from([("in".to_owned(), json!({"t": {"0": 1, "1": 2, "2": 3}}))]),
            handover_ms: 0,
            version: VERSION,
            stages: false,
            state: Vec::new(),
            watermark_ms: None,
            keyed: false,
        };
        let run = ReplicaRun::of("s3://b/q/", &second, Replica::new(1, 3).unwrap(), "id", "t");
        assert_eq!(run.location, "s3://b/q/replicas/g2/r1");
        assert_eq!(run.scope, "g2-r1");
        assert_eq!(run.starts["in"]["t"].as_object().unwrap().len(), 1);
    }
}
