//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the leader renews the Lease every retry period;
//! a replica takes it over only when the Lease's record has not changed for
//! its whole duration, timed on this replica's own clock from when it first
//! saw that record — never by comparing the holder's `renewTime` with this
//! replica's clock, which may be set differently. Writes carry the
//! `resourceVersion` read, so two replicas racing for the same Lease cannot
//! both win: the API server refuses the second write with 409 Conflict.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

use crate::{Error, Result};

/// How one replica takes part in the election (client-go's defaults).
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal: 15 s.
    pub duration: Duration,
    /// How long the leader keeps leading without a successful renewal
    /// before it stops, less than `duration` so that it stops before
    /// another replica may take over: 10 s.
    pub renew_deadline: Duration,
    /// How often the leader renews, and a follower looks again: 2 s.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults for the Lease `name` held by `identity`.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a replica may do with the Lease as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// There is no Lease: create it.
    Create,
    /// The Lease is free or expired: take it.
    Take,
    /// This replica holds it: renew it.
    Renew,
    /// Another replica holds it and renews it.
    Wait {
        /// The holder's identity.
        holder: String,
    },
}

/// What `identity` may do with `lease`, whose record (holder and times) has
/// been seen unchanged for `unchanged_for` on this replica's clock.
pub fn claim(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> Claim {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Claim::Take
        } else {
            Claim::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Claim::Take;
    }
    if holder == identity {
        return Claim::Renew;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    if unchanged_for >= duration {
        Claim::Take
    } else {
        Claim::Wait { holder }
    }
}

/// `lease` as `config.identity` writes it when it creates, takes or renews
/// it at `now` (the times are for people; no replica compares them with its
/// own clock).
pub fn claimed(lease: Option<Lease>, config: &LeaseConfig, now: Timestamp) -> Lease {
    let mut lease = lease.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let old = lease.spec.take().unwrap_or_default();
    let renewing = old.holder_identity.as_deref() == Some(config.identity.as_str());
    let taken_over = !renewing
        && old
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: if renewing {
            old.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(old.lease_transitions.unwrap_or(0) + i32::from(taken_over)),
        ..old
    });
    lease
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease's record last read, and when (this replica's clock) it was
    /// first seen as it is.
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

impl Elector {
    /// An elector over the Leases of `api` (namespaced: the operator's own
    /// namespace).
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Elector {
            api,
            config,
            observed: Mutex::new(None),
        }
    }

    /// How long the Lease's record `spec` has been seen unchanged, noting it
    /// when it changed.
    fn unchanged_for(&self, spec: Option<&LeaseSpec>) -> Duration {
        let now = Instant::now();
        let mut observed = self.observed.lock().expect("not poisoned");
        let record = spec.cloned().unwrap_or_default();
        match &*observed {
            Some((seen, since)) if *seen == record => now.duration_since(*since),
            _ => {
                *observed = Some((record, now));
                Duration::ZERO
            }
        }
    }

    /// Creates, takes or renews the Lease when this replica may; `Ok(true)`
    /// when it holds the Lease afterwards.
    pub async fn try_lead(&self) -> Result<bool> {
        let current = self.api.get_opt(&self.config.name).await?;
        let unchanged_for = self.unchanged_for(current.as_ref().and_then(|l| l.spec.as_ref()));
        let now = Timestamp::now();
        let write = match claim(current.as_ref(), &self.config.identity, unchanged_for) {
            Claim::Wait { .. } => return Ok(false),
            Claim::Create => {
                self.api
                    .create(&PostParams::default(), &claimed(None, &self.config, now))
                    .await
            }
            Claim::Take | Claim::Renew => {
                self.api
                    .replace(
                        &self.config.name,
                        &PostParams::default(),
                        &claimed(current, &self.config, now),
                    )
                    .await
            }
        };
        match write {
            Ok(written) => {
                // What we wrote is the record now seen.
                self.unchanged_for(written.spec.as_ref());
                Ok(true)
            }
            // Another replica wrote first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Returns once this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_lead().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot claim the leader Lease"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the Lease every retry period until leadership is lost or
    /// cannot be proven (no successful renewal for the renew deadline, so
    /// that this replica stops before another may take over), and says why.
    pub async fn hold(&self) -> Error {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_lead().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    return Error::Lease(format!(
                        "the Lease {} is held by another replica",
                        self.config.name
                    ));
                }
                Err(e) if renewed.elapsed() >= self.config.renew_deadline => {
                    return Error::Lease(format!(
                        "could not renew the Lease {} for {:?}: {e}",
                        self.config.name,
                        renewed.elapsed()
                    ));
                }
                Err(e) => tracing::warn!(error = %e, "Cannot renew the leader Lease; retrying."),
            }
        }
    }

    /// Gives the Lease up on a clean shutdown, so that another replica takes
    /// over at once instead of after the Lease's duration.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn held(by: &str, renewed_at: i64) -> Lease {
        claimed(
            None,
            &LeaseConfig::new("sluice-operator", by),
            at(renewed_at),
        )
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_missing_lease_is_created_and_a_free_one_taken() {
        assert_eq!(claim(None, "a", secs(0)), Claim::Create);
        let mut free = held("a", 0);
        free.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(claim(Some(&free), "b", secs(0)), Claim::Take);
    }

    #[test]
    fn a_lease_is_waited_for_until_seen_unchanged_for_its_duration() {
        let lease = held("a", 0);
        assert_eq!(claim(Some(&lease), "a", secs(5)), Claim::Renew);
        assert_eq!(
            claim(Some(&lease), "b", secs(14)),
            Claim::Wait { holder: "a".into() }
        );
        assert_eq!(claim(Some(&lease), "b", secs(15)), Claim::Take);
    }

    #[test]
    fn the_holders_clock_does_not_matter() {
        // Renewed, by the holder's clock, a day ago: just seen, so held.
        let lease = held("a", -86_400);
        assert_eq!(
            claim(Some(&lease), "b", secs(0)),
            Claim::Wait { holder: "a".into() }
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let config_b = LeaseConfig::new("sluice-operator", "b");
        let taken = claimed(Some(held("a", 0)), &config_b, at(20));
        let spec = taken.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(20))));
        let renewed = claimed(Some(taken), &config_b, at(25)).spec.unwrap();
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(25))));
        assert_eq!(renewed.lease_transitions, Some(1));
    }
}
