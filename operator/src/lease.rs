//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the leader renews the Lease every few seconds; a
//! replica takes it over only when it was not renewed for its whole
//! duration. Writes carry the `resourceVersion` read, so two replicas racing
//! for the same Lease cannot both win: the API server refuses the second
//! write with 409 Conflict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::{Error, Result};

/// How one replica takes part in the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal (client-go's default: 15 s).
    pub duration: Duration,
    /// How often the leader renews, and a follower retries (client-go's
    /// retry period: 2 s; renewing every 5 s leaves three tries per
    /// duration).
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// The defaults for the Lease `name` held by `identity`.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
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

/// What `identity` may do with `lease` at `now`.
pub fn claim(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Claim {
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
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(MicroTime(renewed)) if *renewed + SignedDuration::from_secs(seconds) > now => {
            Claim::Wait { holder }
        }
        _ => Claim::Take,
    }
}

/// `lease` as `config.identity` writes it when it creates, takes or renews
/// it at `now`.
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
}

impl Elector {
    /// An elector over the Leases of `api` (namespaced: the operator's own
    /// namespace).
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Elector { api, config }
    }

    /// Creates, takes or renews the Lease when this replica may; `Ok(true)`
    /// when it holds the Lease afterwards.
    pub async fn try_lead(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.name).await?;
        let write = match claim(current.as_ref(), &self.config.identity, now) {
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
            Ok(_) => Ok(true),
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
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the Lease until leadership is lost or cannot be proven (no
    /// successful renewal for the Lease's duration less one renewal period,
    /// so this replica stops before another may start), and says why.
    pub async fn hold(&self) -> Error {
        let deadline = self.config.duration.saturating_sub(self.config.renew_every);
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_lead().await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    return Error::Lease(format!(
                        "the Lease {} is held by another replica",
                        self.config.name
                    ));
                }
                Err(e) if renewed.elapsed() >= deadline => {
                    return Error::Lease(format!(
                        "could not renew the Lease {} for {:?}: {e}",
                        self.config.name,
                        renewed.elapsed()
                    ));
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the leader Lease; retrying"),
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

    #[test]
    fn a_missing_lease_is_created_and_a_free_one_taken() {
        assert_eq!(claim(None, "a", at(0)), Claim::Create);
        let mut free = held("a", 0);
        free.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(claim(Some(&free), "b", at(1)), Claim::Take);
    }

    #[test]
    fn a_renewed_lease_is_waited_for_until_it_expires() {
        let lease = held("a", 0);
        assert_eq!(claim(Some(&lease), "a", at(5)), Claim::Renew);
        assert_eq!(
            claim(Some(&lease), "b", at(14)),
            Claim::Wait { holder: "a".into() }
        );
        assert_eq!(claim(Some(&lease), "b", at(15)), Claim::Take);
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
