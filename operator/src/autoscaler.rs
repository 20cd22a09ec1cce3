//! The autoscaler's decision: how many replicas a query needs, as a pure
//! function of what its engines reported, after the model of Flink's
//! Kubernetes autoscaler.
//!
//! A replica's *true* processing rate is the records it processed over the
//! time it was busy processing them (not over wall time: an idle replica
//! says nothing about its capacity). The query needs enough replicas to
//! keep up with the input at a target utilization, plus what drains the
//! current lag within `catchUpWithin`, counting the time a rescale stops
//! processing. Recommendations are stabilized as the HPA does: a scale-up
//! takes the lowest recommendation of its (short) window, a scale-down the
//! highest of its (long) window, so a burst scales up at once and a lull
//! scales down only once it has lasted.
//!
//! The controller runs a step ([`scaler::step`]) at each progress poll of a
//! query with `spec.autoscaling`: [`measure`] turns the engines' recent
//! reports into an [`Observation`], the decision below picks the replicas,
//! and the controller writes them to the StatefulSet and the status. The
//! decision is tested on simulated load ([`simulation`]).

use std::time::Duration;

pub mod cost;
pub mod measure;
pub mod scaler;
pub mod simulation;

/// What the autoscaler may do, from `spec.autoscaling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The fewest replicas while records flow (at least 1).
    pub min_replicas: u32,
    /// The most replicas.
    pub max_replicas: u32,
    /// The most replicas that can share the work: the source's partition
    /// count (a replica more would own no partition).
    pub max_parallelism: u32,
    /// The share of its true rate a replica is planned to use, in (0, 1].
    pub target_utilization: f64,
    /// The lag is to be drained within this time.
    pub catch_up_within: Duration,
    /// How long a rescale stops processing (stop, restore, first batch).
    pub restart_time: Duration,
    /// Recommendations a scale-up looks back over.
    pub scale_up_window: Duration,
    /// Recommendations a scale-down looks back over.
    pub scale_down_window: Duration,
    /// Scale to zero once the source has had no input and no lag for this
    /// long; never when `None`.
    pub scale_to_zero_after: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 10,
            max_parallelism: u32::MAX,
            target_utilization: 0.7,
            catch_up_within: Duration::from_secs(5 * 60),
            restart_time: Duration::from_secs(60),
            scale_up_window: Duration::ZERO,
            scale_down_window: Duration::from_secs(5 * 60),
            scale_to_zero_after: None,
        }
    }
}

/// What the engines reported over the last metric window, summed over the
/// replicas that ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Replicas running now.
    pub replicas: u32,
    /// Records a second arriving at the source (its latest offsets' growth).
    pub input_rate: f64,
    /// Records processed in the window.
    pub processed: f64,
    /// Seconds the replicas spent processing them (summed over replicas).
    pub busy_seconds: f64,
    /// The lowest true rate of a single replica (its records over its busy
    /// time), 0 when unknown. A slow replica falls behind on its own
    /// partitions however fast the others are: planning with it keeps its
    /// share of the lag bounded.
    pub slowest_true_rate: f64,
    /// Records behind the source's latest offsets now.
    pub lag: f64,
    /// How long the source has had no input and no lag.
    pub idle_for: Duration,
}

/// A number of replicas and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    /// The replicas.
    pub replicas: u32,
    /// Why, in a sentence for status and Events.
    pub reason: String,
}

/// The replicas the observation calls for, before stabilization.
pub fn recommend(policy: &Policy, seen: &Observation) -> Recommendation {
    let floor = policy.min_replicas.max(1);
    let ceiling = policy.max_replicas.min(policy.max_parallelism).max(floor);
    let has_work = seen.lag > 0.0 || seen.input_rate > 0.0;
    if seen.replicas == 0 {
        return if has_work {
            Recommendation {
                replicas: floor,
                reason: format!(
                    "records arrived while scaled to zero (lag {:.0}): starting {floor}",
                    seen.lag
                ),
            }
        } else {
            Recommendation {
                replicas: 0,
                reason: "scaled to zero: the source is still empty".into(),
            }
        };
    }
    if let Some(after) = policy.scale_to_zero_after
        && !has_work
        && seen.idle_for >= after
    {
        return Recommendation {
            replicas: 0,
            reason: format!(
                "no input and no lag for {}s: scaling to zero",
                seen.idle_for.as_secs()
            ),
        };
    }
    if seen.processed <= 0.0 {
        let replicas = seen.replicas.clamp(floor, ceiling);
        return Recommendation {
            replicas,
            reason: format!("no processing measured yet: keeping {replicas}"),
        };
    }
    // No CPU time beyond the batches' overhead: the capacity is far above
    // what the input asks (an infinite rate counts one replica).
    let mean_rate = if seen.busy_seconds > 0.0 {
        seen.processed / seen.busy_seconds
    } else {
        f64::INFINITY
    };
    let true_rate = if seen.slowest_true_rate > 0.0 {
        mean_rate.min(seen.slowest_true_rate)
    } else {
        mean_rate
    };
    let utilization = policy.target_utilization.clamp(0.01, 1.0);
    let count = |rate: f64| (rate / true_rate).ceil().clamp(1.0, u32::MAX as f64);
    // Steady state: the input at the target utilization.
    let steady = count(seen.input_rate / utilization);
    // Catching up uses the replicas' whole rate. Without a rescale, the lag
    // has `catch_up_within`; a rescale stops processing for `restart_time`,
    // so the lag has what is left of it, and the input that arrives during
    // the restart is lag too. Counting that keeps a scale-down from
    // creating the backlog that scales it up again.
    let catch_up = policy.catch_up_within.as_secs_f64().max(1.0);
    let mut target_rate = seen.input_rate + seen.lag / catch_up;
    let mut needed = steady.max(count(target_rate));
    if needed != f64::from(seen.replicas) {
        let drain_secs = policy
            .catch_up_within
            .saturating_sub(policy.restart_time)
            .as_secs_f64()
            .max(1.0);
        let restart_backlog = seen.input_rate * policy.restart_time.as_secs_f64();
        target_rate = seen.input_rate + (seen.lag + restart_backlog) / drain_secs;
        needed = steady.max(count(target_rate));
    }
    let replicas = (needed.min(u32::MAX as f64) as u32).clamp(floor, ceiling);
    let capacity = if true_rate.is_finite() {
        format!("the slowest replica processes {true_rate:.0}/s when busy")
    } else {
        "its records cost no measurable CPU beyond its batches' overhead (far more capacity than asked)"
            .to_owned()
    };
    let mut reason = format!(
        "input {:.0}/s and lag {:.0} to drain within {}s: {:.0}/s needed; {capacity}, planned at {:.0}%: {replicas}",
        seen.input_rate,
        seen.lag,
        policy.catch_up_within.as_secs(),
        target_rate.max(seen.input_rate / utilization),
        utilization * 100.0,
    );
    if needed > replicas as f64 {
        reason.push_str(&if ceiling == policy.max_parallelism {
            format!(" (capped at the source's {ceiling} partitions)")
        } else {
            format!(" (capped at maxReplicas {ceiling})")
        });
    }
    Recommendation { replicas, reason }
}

/// The replicas to run: `now` stabilized against the recommendations made
/// before it (`past`, each with how long ago it was made).
pub fn stabilize(
    policy: &Policy,
    current: u32,
    now: Recommendation,
    past: &[(Duration, u32)],
) -> Recommendation {
    let within = |window: Duration| {
        past.iter()
            .filter(move |(ago, _)| *ago <= window)
            .map(|(_, r)| *r)
            .chain(std::iter::once(now.replicas))
    };
    if now.replicas > current {
        let up = within(policy.scale_up_window).min().unwrap_or(current);
        if up > current {
            return Recommendation {
                replicas: up,
                reason: now.reason,
            };
        }
    } else if now.replicas < current {
        let down = within(policy.scale_down_window).max().unwrap_or(current);
        if down < current {
            return Recommendation {
                replicas: down,
                reason: now.reason,
            };
        }
        return Recommendation {
            replicas: current,
            reason: format!(
                "keeping {current} for the scale-down window ({}s): {}",
                policy.scale_down_window.as_secs(),
                now.reason
            ),
        };
    }
    Recommendation {
        replicas: current,
        reason: now.reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(replicas: u32, input_rate: f64, lag: f64, true_rate: f64) -> Observation {
        Observation {
            replicas,
            input_rate,
            processed: true_rate * 10.0,
            busy_seconds: 10.0,
            slowest_true_rate: 0.0,
            lag,
            idle_for: Duration::ZERO,
        }
    }

    #[test]
    fn a_slow_replica_plans_with_its_own_rate() {
        let mut seen = running(4, 2000.0, 0.0, 1000.0);
        assert_eq!(recommend(&Policy::default(), &seen).replicas, 3);
        seen.slowest_true_rate = 400.0;
        let slow = recommend(&Policy::default(), &seen);
        assert_eq!(slow.replicas, 8, "{}", slow.reason);
        assert!(slow.reason.contains("the slowest replica processes 400/s"));
    }

    #[test]
    fn replicas_keep_up_with_the_input_at_the_target_utilization() {
        let policy = Policy::default();
        // 6,900/s in, a replica does 10,000/s busy, planned at 70%: one.
        let r = recommend(&policy, &running(1, 6_900.0, 0.0, 10_000.0));
        assert_eq!(r.replicas, 1, "{}", r.reason);
        // 7,100/s is more than one replica at 70%.
        assert_eq!(
            recommend(&policy, &running(1, 7_100.0, 0.0, 10_000.0)).replicas,
            2
        );
        // The true rate is per busy second: a replica busy half the time at
        // 5,000 processed/s of wall time still has 10,000/s in it.
        let half_busy = Observation {
            processed: 50_000.0,
            busy_seconds: 5.0,
            ..running(1, 5_000.0, 0.0, 0.0)
        };
        assert_eq!(recommend(&policy, &half_busy).replicas, 1);
    }

    #[test]
    fn a_backlog_is_drained_within_catch_up_counting_the_restart() {
        let policy = Policy {
            catch_up_within: Duration::from_secs(160),
            restart_time: Duration::from_secs(60),
            ..Policy::default()
        };
        // No input, 1.4M behind: the one replica at full speed (10,000/s)
        // drains them in 140 s, within 160 s, without a rescale.
        let r = recommend(&policy, &running(1, 0.0, 1_400_000.0, 10_000.0));
        assert_eq!(r.replicas, 1, "{}", r.reason);
        assert!(r.reason.contains("lag 1400000"), "{}", r.reason);
        // 2.4M: a rescale leaves 100 s to drain them in: 24,000/s, three.
        let r = recommend(&policy, &running(1, 0.0, 2_400_000.0, 10_000.0));
        assert_eq!(r.replicas, 3, "{}", r.reason);
        // The input comes on top, and what arrives during the restart:
        // 1,000 + (2.4M + 60,000) / 100 = 25,600/s, still three; 6,000/s
        // in makes it 6,000 + 2.76M / 100 = 33,600/s, four.
        let r = recommend(&policy, &running(1, 1_000.0, 2_400_000.0, 10_000.0));
        assert_eq!(r.replicas, 3, "{}", r.reason);
        let r = recommend(&policy, &running(1, 6_000.0, 2_400_000.0, 10_000.0));
        assert_eq!(r.replicas, 4, "{}", r.reason);
    }

    #[test]
    fn never_outside_the_bounds_nor_above_the_partitions() {
        let policy = Policy {
            min_replicas: 2,
            max_replicas: 20,
            max_parallelism: 4,
            ..Policy::default()
        };
        let r = recommend(&policy, &running(2, 1e9, 0.0, 1_000.0));
        assert_eq!(r.replicas, 4);
        assert!(
            r.reason.ends_with("(capped at the source's 4 partitions)"),
            "{}",
            r.reason
        );
        assert_eq!(
            recommend(&policy, &running(3, 1.0, 0.0, 1_000.0)).replicas,
            2
        );
        let r = recommend(
            &Policy {
                max_replicas: 3,
                ..policy.clone()
            },
            &running(2, 1e9, 0.0, 1_000.0),
        );
        assert!(
            r.reason.ends_with("(capped at maxReplicas 3)"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn nothing_measured_keeps_the_replicas() {
        let seen = Observation {
            replicas: 3,
            input_rate: 100.0,
            ..Observation::default()
        };
        let r = recommend(&Policy::default(), &seen);
        assert_eq!(r.replicas, 3);
        assert!(r.reason.starts_with("no processing measured yet"));
    }

    #[test]
    fn an_idle_source_scales_to_zero_only_when_asked_and_wakes_on_records() {
        let idle = Observation {
            replicas: 1,
            idle_for: Duration::from_secs(600),
            ..running(1, 0.0, 0.0, 10_000.0)
        };
        assert_eq!(recommend(&Policy::default(), &idle).replicas, 1);
        let policy = Policy {
            scale_to_zero_after: Some(Duration::from_secs(300)),
            ..Policy::default()
        };
        assert_eq!(recommend(&policy, &idle).replicas, 0);
        let not_yet = Observation {
            idle_for: Duration::from_secs(299),
            ..idle.clone()
        };
        assert_eq!(recommend(&policy, &not_yet).replicas, 1);
        let asleep = Observation {
            replicas: 0,
            ..Observation::default()
        };
        assert_eq!(recommend(&policy, &asleep).replicas, 0);
        let woken = Observation {
            lag: 12.0,
            ..asleep
        };
        let r = recommend(&policy, &woken);
        assert_eq!(r.replicas, 1);
        assert!(r.reason.starts_with("records arrived while scaled to zero"));
    }

    #[test]
    fn scale_up_is_immediate_and_scale_down_waits_for_its_window() {
        let policy = Policy::default();
        let rec = |replicas| Recommendation {
            replicas,
            reason: "r".into(),
        };
        assert_eq!(
            stabilize(&policy, 2, rec(5), &[(Duration::from_secs(30), 2)]).replicas,
            5
        );
        // A lull: 1 is recommended now, but 2 was within the last 5 min.
        let held = stabilize(&policy, 3, rec(1), &[(Duration::from_secs(120), 2)]);
        assert_eq!(held.replicas, 2, "down to the highest of the window");
        let held = stabilize(&policy, 2, rec(1), &[(Duration::from_secs(120), 2)]);
        assert_eq!(held.replicas, 2);
        assert!(
            held.reason
                .starts_with("keeping 2 for the scale-down window (300s)")
        );
        // Once the window holds only lower recommendations, down it goes.
        assert_eq!(
            stabilize(&policy, 2, rec(1), &[(Duration::from_secs(301), 2)]).replicas,
            1
        );
    }

    #[test]
    fn an_input_that_swings_does_not_flap() {
        let policy = Policy {
            scale_up_window: Duration::from_secs(60),
            ..Policy::default()
        };
        // Every 15 s the input swings between what needs 2 and 4 replicas.
        let mut current = 2;
        let mut past: Vec<(u64, u32)> = Vec::new();
        let mut changes = 0;
        for step in 0..40u64 {
            let t = step * 15;
            let input = if step % 2 == 0 { 14_000.0 } else { 28_000.0 };
            let now = recommend(&policy, &running(current, input, 0.0, 10_000.0));
            let ago: Vec<(Duration, u32)> = past
                .iter()
                .map(|(at, r)| (Duration::from_secs(t - at), *r))
                .collect();
            let decided = stabilize(&policy, current, now.clone(), &ago);
            if decided.replicas != current {
                changes += 1;
            }
            current = decided.replicas;
            past.push((t, now.replicas));
        }
        assert_eq!(
            changes, 0,
            "held at 2: the up window always holds a 2, the down window a 4"
        );
    }
}
