//! The engine's health, as `/healthz` reports it: failed, stalled, or
//! healthy. A query is stalled when a batch that has data to process (the
//! trigger active, data available: reading the planned range, running the
//! query, writing the sink, committing) or the query's start (opening the
//! sources, restoring state) has not moved on for `spec.stallTimeout`: a
//! hung source or a stuck sink. Waiting for data or for the next trigger is
//! not a stall, however long it lasts.
//!
//! It only reads the [`Monitor`]: [`Health::sample`] notes what the query is
//! doing (the latest batch, the status message, whether it started) and
//! since when that has not changed; `main` samples every second.
//!
//! NB: a source that hangs while asked for its latest offsets ("Getting
//! offsets from the sources", no data known yet) is not reported: from the
//! monitor it cannot be told from a source that is polled back to back and
//! has nothing new.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::monitor::Monitor;

/// What the query is doing, as far as a stall is concerned: any change of it
/// is progress.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Activity {
    batch_id: Option<u64>,
    message: String,
    started: bool,
    due: bool,
}

/// The query's health at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Running, waiting, or busy for less than the stall timeout.
    Healthy,
    /// The query stopped with an error.
    Failed(String),
    /// Busy without moving on for at least the stall timeout.
    Stalled {
        /// How long nothing moved.
        stuck_for: Duration,
        /// What the query was doing (its status message).
        doing: String,
    },
}

impl Verdict {
    /// The verdict in words, as `/healthz` and the termination log give it.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Healthy => "ok".to_owned(),
            Verdict::Failed(why) => format!("failed: {why}"),
            Verdict::Stalled { stuck_for, doing } => format!(
                "stalled: no batch completed for {}s while \"{doing}\" (spec.stallTimeout)",
                stuck_for.as_secs()
            ),
        }
    }
}

/// Watches one query's monitor for stalls.
pub struct Health {
    monitor: Arc<Monitor>,
    timeout: Option<Duration>,
    seen: Mutex<Option<(Activity, Instant)>>,
}

impl Health {
    /// Health of the query behind `monitor`; `timeout` is its
    /// `spec.stallTimeout` (`None`: never stalled).
    pub fn new(monitor: Arc<Monitor>, timeout: Option<Duration>) -> Self {
        Health {
            monitor,
            timeout,
            seen: Mutex::new(None),
        }
    }

    /// Notes what the query is doing now.
    pub fn sample(&self) {
        self.sample_at(Instant::now());
    }

    /// [`Health::sample`] at `now`.
    pub fn sample_at(&self, now: Instant) {
        let status = self.monitor.status();
        let started = self.monitor.is_ready();
        let due = if started {
            status.is_trigger_active && status.is_data_available
        } else {
            self.monitor.failure().is_none()
        };
        let activity = Activity {
            batch_id: self.monitor.last().map(|p| p.batch_id),
            message: status.message,
            started,
            due,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match &*seen {
            Some((previous, _)) if *previous == activity => {}
            _ => *seen = Some((activity, now)),
        }
    }

    /// The query's health now (after a sample).
    pub fn verdict(&self) -> Verdict {
        let now = Instant::now();
        self.sample_at(now);
        self.verdict_at(now)
    }

    /// The query's health at `now`, from the samples taken so far.
    pub fn verdict_at(&self, now: Instant) -> Verdict {
        if let Some(why) = self.monitor.failure() {
            return Verdict::Failed(why);
        }
        let Some(timeout) = self.timeout else {
            return Verdict::Healthy;
        };
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match &*seen {
            Some((activity, since)) if activity.due => {
                let stuck_for = now.saturating_duration_since(*since);
                if stuck_for >= timeout {
                    Verdict::Stalled {
                        stuck_for,
                        doing: activity.message.clone(),
                    }
                } else {
                    Verdict::Healthy
                }
            }
            _ => Verdict::Healthy,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use sluice_crds::progress::{QueryProgress, SinkProgress};

    use super::*;

    /// A progress report of batch `batch_id`.
    pub(crate) fn progress(batch_id: u64) -> QueryProgress {
        QueryProgress {
            id: "q".into(),
            run_id: "r".into(),
            name: "q".into(),
            timestamp: "2026-11-21T10:00:00Z".into(),
            batch_id,
            num_input_rows: 1,
            input_rows_per_second: 1.0,
            processed_rows_per_second: 1.0,
            duration_ms: BTreeMap::new(),
            cpu_ms: None,
            event_time: BTreeMap::new(),
            state_operators: Vec::new(),
            sources: Vec::new(),
            sink: SinkProgress {
                description: "console".into(),
                num_output_rows: 1,
            },
        }
    }

    fn health(timeout: u64) -> (Arc<Monitor>, Health) {
        let monitor = Arc::new(Monitor::new("q"));
        let health = Health::new(monitor.clone(), Some(Duration::from_secs(timeout)));
        (monitor, health)
    }

    #[test]
    fn a_batch_that_does_not_complete_is_a_stall() {
        let (monitor, health) = health(60);
        let t0 = Instant::now();
        monitor.set_ready();
        monitor.set_status("Processing new data", true, true);
        health.sample_at(t0);
        health.sample_at(t0 + Duration::from_secs(59));
        assert_eq!(
            health.verdict_at(t0 + Duration::from_secs(59)),
            Verdict::Healthy
        );
        let stalled = health.verdict_at(t0 + Duration::from_secs(61));
        assert_eq!(
            stalled.describe(),
            "stalled: no batch completed for 61s while \"Processing new data\" (spec.stallTimeout)"
        );
        // The batch completes: healthy again, and the clock starts afresh.
        monitor.record(progress(0), &[], 0.0);
        health.sample_at(t0 + Duration::from_secs(62));
        assert_eq!(
            health.verdict_at(t0 + Duration::from_secs(100)),
            Verdict::Healthy
        );
        assert!(matches!(
            health.verdict_at(t0 + Duration::from_secs(122)),
            Verdict::Stalled { .. }
        ));
    }

    #[test]
    fn waiting_for_data_or_the_next_trigger_is_not_a_stall() {
        let (monitor, health) = health(10);
        let t0 = Instant::now();
        monitor.set_ready();
        for (message, data, active) in [
            ("Waiting for data to arrive", false, false),
            ("Waiting for next trigger", true, false),
            ("Getting offsets from the sources", false, true),
        ] {
            monitor.set_status(message, data, active);
            health.sample_at(t0);
            assert_eq!(
                health.verdict_at(t0 + Duration::from_secs(3600)),
                Verdict::Healthy,
                "{message}"
            );
        }
    }

    #[test]
    fn a_start_that_never_finishes_is_a_stall_and_a_failure_is_a_failure() {
        let (monitor, health) = health(30);
        let t0 = Instant::now();
        health.sample_at(t0);
        assert!(matches!(
            health.verdict_at(t0 + Duration::from_secs(30)),
            Verdict::Stalled { .. }
        ));
        monitor.set_failed("checkpoint /c: damaged".into());
        assert_eq!(
            health.verdict_at(t0 + Duration::from_secs(31)).describe(),
            "failed: checkpoint /c: damaged"
        );
    }

    #[test]
    fn without_a_timeout_nothing_is_a_stall() {
        let monitor = Arc::new(Monitor::new("q"));
        let health = Health::new(monitor.clone(), None);
        monitor.set_ready();
        monitor.set_status("Processing new data", true, true);
        let t0 = Instant::now();
        health.sample_at(t0);
        assert_eq!(
            health.verdict_at(t0 + Duration::from_secs(86_400)),
            Verdict::Healthy
        );
    }
}
