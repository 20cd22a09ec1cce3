//! Fencing: one run at a time writes a checkpoint. A run claims the next
//! epoch by creating `epochs/<E>` (create-only, so two runs never hold the
//! same epoch); before each step that others could see (planning a batch,
//! committing the sink, committing the batch) it checks that no run claimed
//! `E + 1` since. A zombie — a paused or partitioned run whose replacement
//! has started — finds the newer epoch at its next check and stops. Between
//! a check and the write it guards, the create-only logs catch the rest:
//! every object a run writes carries its epoch in its name, and only the run
//! that creates `commits/N` has its batch N (sink output, state version)
//! become the committed one.

use serde::{Deserialize, Serialize};

use crate::storage::{Created, Storage};
use crate::{Error, Result};

/// How many older epoch files are kept (for whoever looks into the
/// checkpoint after an incident).
const EPOCHS_TO_KEEP: u64 = 10;

/// `epochs/<E>`: who claimed epoch E.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// The epoch.
    pub epoch: u64,
    /// The run's id.
    pub run_id: String,
    /// The host (pod) it ran on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it claimed the epoch, RFC 3339.
    pub claimed_at: String,
}

/// A run's claim on a checkpoint.
pub struct Fence {
    storage: Storage,
    claim: Claim,
}

fn path(epoch: u64) -> String {
    format!("epochs/{epoch}")
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Fence {
    /// Claims the next epoch of the checkpoint at `storage` for the run
    /// `run_id`.
    pub async fn claim(storage: &Storage, run_id: &str) -> Result<Self> {
        let epochs = storage.list_numbered("epochs").await?;
        let mut epoch = epochs.last().map_or(1, |e| e + 1);
        for _ in 0..100 {
            let claim = Claim {
                epoch,
                run_id: run_id.to_owned(),
                host: hostname(),
                pid: std::process::id(),
                claimed_at: chrono::Utc::now().to_rfc3339(),
            };
            let bytes = serde_json::to_vec_pretty(&claim).expect("a claim serializes");
            match storage.create(&path(epoch), bytes).await? {
                Created::Written => {
                    for old in epochs.iter().filter(|e| **e + EPOCHS_TO_KEEP < epoch) {
                        storage.delete(&path(*old)).await?;
                    }
                    return Ok(Self {
                        storage: storage.clone(),
                        claim,
                    });
                }
                // Another run started at the same moment: take the next.
                Created::Exists(_) => epoch += 1,
            }
        }
        Err(Error::Checkpoint {
            file: storage.name_of("epochs"),
            message:
                "100 runs claimed the checkpoint at once: something restarts this query in a loop"
                    .into(),
        })
    }

    /// This run's epoch.
    pub fn epoch(&self) -> u64 {
        self.claim.epoch
    }

    /// Fails with [`Error::Fenced`] when a newer run has claimed the
    /// checkpoint.
    pub async fn check(&self) -> Result<()> {
        let next = path(self.claim.epoch + 1);
        let Some(bytes) = self.storage.get(&next).await? else {
            return Ok(());
        };
        let by = serde_json::from_slice::<Claim>(&bytes)
            .map(|c| {
                format!(
                    "run {} on {} (pid {}) at {}",
                    c.run_id, c.host, c.pid, c.claimed_at
                )
            })
            .unwrap_or_else(|_| "another run".into());
        Err(Error::Fenced {
            message: format!(
                "{} was claimed by {by}: this run (epoch {}) is no longer the query's and stops without writing more",
                self.storage.name_of(&next),
                self.claim.epoch
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_run_fences_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap(), "f").unwrap();
        let first = Fence::claim(&storage, "run-a").await.unwrap();
        assert_eq!(first.epoch(), 1);
        first.check().await.unwrap();
        let second = Fence::claim(&storage, "run-b").await.unwrap();
        assert_eq!(second.epoch(), 2);
        second.check().await.unwrap();
        let err = first.check().await.unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }));
        let err = err.to_string();
        assert!(err.contains("epochs/2") && err.contains("run-b"), "{err}");
    }

    #[tokio::test]
    async fn old_claims_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap(), "f").unwrap();
        for i in 0..15 {
            Fence::claim(&storage, &format!("run-{i}")).await.unwrap();
        }
        let mut kept: Vec<u64> = storage
            .list_names("epochs")
            .await
            .unwrap()
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        kept.sort_unstable();
        assert_eq!(kept.first(), Some(&5));
        assert_eq!(kept.last(), Some(&15));
    }
}
