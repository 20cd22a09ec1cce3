//! The autoscaler driven by simulated load: an input rate over time, replicas
//! with a processing capacity each, partitions split between them as the
//! engine splits them, and a rescale that stops all processing for the
//! policy's restart time. Each step observes what the engines would report,
//! asks [`recommend`] and [`stabilize`] and applies the result. The tests
//! below check what the decisions must achieve on the traces the scale-out
//! issue names; `cargo run --example autoscaler_traces` prints each trace's
//! decisions as a table (`bench/autoscaler.sh`).

use std::time::Duration;

use super::{Observation, Policy, Recommendation, recommend, stabilize};

/// A load to drive the autoscaler with.
pub struct Trace {
    /// Its name.
    pub name: &'static str,
    /// Records a second arriving at `t` seconds.
    pub input: fn(f64) -> f64,
    /// What replica `i` processes a second when busy.
    pub capacity: fn(u32) -> f64,
    /// The source's partitions.
    pub partitions: u32,
    /// How long it runs, in seconds.
    pub seconds: u64,
    /// The policy it runs under.
    pub policy: Policy,
}

/// One step of a simulation.
#[derive(Clone, Debug)]
pub struct Step {
    /// Seconds from the start.
    pub t: u64,
    /// Records a second arriving.
    pub input_rate: f64,
    /// Records behind after the step.
    pub lag: f64,
    /// Replicas running during the step.
    pub replicas: u32,
    /// The decision at its end, with its reason.
    pub decision: Recommendation,
}

/// The policy the traces run under unless they say otherwise: 1 to 10
/// replicas at 70% utilization, the lag drained within 5 minutes, a
/// rescale costing 30 s, scale-down after 5 minutes of lower
/// recommendations, scale to zero after 5 idle minutes.
pub fn policy() -> Policy {
    Policy {
        min_replicas: 1,
        max_replicas: 10,
        max_parallelism: 12,
        target_utilization: 0.7,
        catch_up_within: Duration::from_secs(300),
        restart_time: Duration::from_secs(30),
        scale_up_window: Duration::ZERO,
        scale_down_window: Duration::from_secs(300),
        scale_to_zero_after: Some(Duration::from_secs(300)),
    }
}

/// The traces the scale-out issue names.
pub fn traces() -> Vec<Trace> {
    let even = |_: u32| 1000.0;
    vec![
        Trace {
            name: "steady",
            input: |_| 3000.0,
            capacity: even,
            partitions: 12,
            seconds: 1800,
            policy: policy(),
        },
        Trace {
            name: "ramp",
            input: |t| 500.0 + 4500.0 * (t / 1200.0).min(1.0),
            capacity: even,
            partitions: 12,
            seconds: 2400,
            policy: policy(),
        },
        Trace {
            name: "spike",
            input: |t| {
                if (600.0..720.0).contains(&t) {
                    6000.0
                } else {
                    1000.0
                }
            },
            capacity: even,
            partitions: 12,
            seconds: 2400,
            policy: policy(),
        },
        Trace {
            name: "drop to zero",
            input: |t| {
                if (600.0..1800.0).contains(&t) {
                    0.0
                } else {
                    2000.0
                }
            },
            capacity: even,
            partitions: 12,
            seconds: 2700,
            policy: policy(),
        },
        Trace {
            name: "one slow replica",
            input: |_| 3000.0,
            capacity: |i| if i == 0 { 300.0 } else { 1000.0 },
            partitions: 12,
            seconds: 3600,
            // NB: replica 0 keeps up with its share only when it owns one
            // partition of the twelve.
            policy: Policy {
                max_replicas: 12,
                ..policy()
            },
        },
        Trace {
            name: "partition cap",
            input: |_| 9000.0,
            capacity: even,
            partitions: 6,
            seconds: 1800,
            policy: Policy {
                max_parallelism: 6,
                ..policy()
            },
        },
    ]
}

/// Runs `trace` in steps of `step` seconds from one replica.
pub fn run(trace: &Trace, step: u64) -> Vec<Step> {
    let policy = &trace.policy;
    let dt = step as f64;
    let mut lag = vec![0.0_f64; trace.partitions as usize];
    let mut replicas = 1_u32;
    let mut downtime = 0.0_f64;
    let mut idle_for = 0_u64;
    let mut past: Vec<(u64, u32)> = Vec::new();
    let mut steps = Vec::new();
    let mut t = 0;
    while t < trace.seconds {
        let input = (trace.input)(t as f64);
        for l in lag.iter_mut() {
            *l += input * dt / trace.partitions as f64;
        }
        let stopped = downtime.min(dt);
        downtime -= stopped;
        let working = dt - stopped;
        let (mut processed, mut busy) = (0.0, 0.0);
        let mut slowest = f64::INFINITY;
        for r in 0..replicas {
            // As the engine splits them: partition p to replica p mod n.
            let owned: Vec<usize> = (0..trace.partitions as usize)
                .filter(|p| *p as u32 % replicas == r)
                .collect();
            let backlog: f64 = owned.iter().map(|p| lag[*p]).sum();
            let capacity = (trace.capacity)(r);
            let done = backlog.min(capacity * working);
            if backlog > 0.0 {
                for p in &owned {
                    lag[*p] -= done * lag[*p] / backlog;
                }
            }
            processed += done;
            busy += done / capacity;
            if done > 0.0 {
                slowest = slowest.min(capacity);
            }
        }
        let total_lag: f64 = lag.iter().sum();
        idle_for = if input == 0.0 && total_lag < 1.0 {
            idle_for + step
        } else {
            0
        };
        let seen = Observation {
            replicas,
            input_rate: input,
            processed,
            busy_seconds: busy,
            slowest_true_rate: if slowest.is_finite() { slowest } else { 0.0 },
            lag: total_lag,
            idle_for: Duration::from_secs(idle_for),
        };
        let now = recommend(policy, &seen);
        let history: Vec<(Duration, u32)> = past
            .iter()
            .map(|(at, r)| (Duration::from_secs(t - at), *r))
            .collect();
        let decision = stabilize(policy, replicas, now.clone(), &history);
        past.push((t, now.replicas));
        steps.push(Step {
            t,
            input_rate: input,
            lag: total_lag,
            replicas,
            decision: decision.clone(),
        });
        if decision.replicas != replicas {
            replicas = decision.replicas;
            downtime = policy.restart_time.as_secs_f64();
        }
        t += step;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(name: &str) -> (Trace, Vec<Step>) {
        let trace = traces().into_iter().find(|t| t.name == name).unwrap();
        let steps = run(&trace, 15);
        (trace, steps)
    }

    /// The times at which the replicas changed, with the new count.
    fn changes(steps: &[Step]) -> Vec<(u64, u32, u32)> {
        steps
            .windows(2)
            .filter(|w| w[0].replicas != w[1].replicas)
            .map(|w| (w[1].t, w[0].replicas, w[1].replicas))
            .collect()
    }

    fn max_lag(steps: &[Step]) -> f64 {
        steps.iter().map(|s| s.lag).fold(0.0, f64::max)
    }

    /// Scale-downs come at most once a scale-down window.
    fn no_flapping(trace: &Trace, steps: &[Step]) {
        let downs: Vec<u64> = changes(steps)
            .into_iter()
            .filter(|(_, from, to)| to < from && *to > 0)
            .map(|(t, _, _)| t)
            .collect();
        for pair in downs.windows(2) {
            assert!(
                pair[1] - pair[0] >= trace.policy.scale_down_window.as_secs(),
                "{}: scale-downs at {}s and {}s",
                trace.name,
                pair[0],
                pair[1]
            );
        }
        // A scale-down is not undone within its window while the input
        // stays as it was.
        for pair in changes(steps).windows(2) {
            let ((t0, from0, to0), (t1, from1, to1)) = (pair[0], pair[1]);
            if to0 < from0 && to0 > 0 && to1 > from1 {
                let input = |t: u64| (trace.input)(t as f64);
                assert!(
                    t1 - t0 >= trace.policy.scale_down_window.as_secs() || input(t1) > input(t0),
                    "{}: down to {to0} at {t0}s, up to {to1} at {t1}s",
                    trace.name
                );
            }
        }
        for (t, from, to) in changes(steps) {
            assert!(
                to <= trace.partitions && to <= trace.policy.max_replicas,
                "{}: {from} -> {to} at {t}s",
                trace.name
            );
        }
    }

    #[test]
    fn steady_input_settles_on_the_replicas_it_needs_and_stays() {
        let (trace, steps) = trace("steady");
        no_flapping(&trace, &steps);
        // 3000/s at 70% of 1000/s: 5 replicas.
        assert_eq!(steps.last().unwrap().replicas, 5);
        assert!(changes(&steps).len() <= 2, "{:?}", changes(&steps));
        assert!(steps.last().unwrap().lag < 3000.0, "keeps up");
    }

    #[test]
    fn a_ramp_is_followed_up_with_bounded_lag() {
        let (trace, steps) = trace("ramp");
        no_flapping(&trace, &steps);
        assert!(
            changes(&steps).iter().all(|(_, from, to)| to > from),
            "a rising input never scales down: {:?}",
            changes(&steps)
        );
        // Never more than a minute and a half of input behind.
        assert!(max_lag(&steps) < 90.0 * 5000.0, "{}", max_lag(&steps));
        assert!(steps.last().unwrap().lag < 5000.0);
    }

    #[test]
    fn a_spike_drains_within_catch_up_and_scales_down_slowly() {
        let (trace, steps) = trace("spike");
        no_flapping(&trace, &steps);
        let end = 720;
        let drained = steps
            .iter()
            .find(|s| s.t > end && s.lag < 1000.0)
            .map(|s| s.t)
            .expect("the spike's lag drains");
        assert!(
            drained - end <= trace.policy.catch_up_within.as_secs(),
            "drained {}s after the spike",
            drained - end
        );
        let up = changes(&steps)
            .into_iter()
            .find(|(_, from, to)| to > from)
            .unwrap();
        let down = changes(&steps)
            .into_iter()
            .find(|(_, from, to)| to < from)
            .expect("scales down after the spike");
        assert!(down.0 - up.0 >= trace.policy.scale_down_window.as_secs());
        assert!(steps.last().unwrap().replicas <= 2);
    }

    #[test]
    fn an_empty_topic_scales_to_zero_and_records_bring_a_replica_back() {
        let (trace, steps) = trace("drop to zero");
        no_flapping(&trace, &steps);
        let zero = steps
            .iter()
            .find(|s| s.replicas == 0)
            .expect("scaled to zero");
        assert!(
            zero.t >= 600 + trace.policy.scale_to_zero_after.unwrap().as_secs(),
            "at {}s",
            zero.t
        );
        let back = steps
            .iter()
            .find(|s| s.t >= 1800 && s.replicas > 0)
            .expect("records wake it");
        assert!(back.t <= 1800 + 30, "woke at {}s", back.t);
        assert!(steps.last().unwrap().lag < 2000.0 * 60.0);
    }

    #[test]
    fn one_slow_replica_does_not_let_the_lag_grow_without_bound() {
        let (trace, steps) = trace("one slow replica");
        no_flapping(&trace, &steps);
        let late = &steps[steps.len() - 20..];
        let growth = late.last().unwrap().lag - late[0].lag;
        assert!(
            growth <= 0.0 || late.last().unwrap().lag < 30.0 * 3000.0,
            "lag still grows: {growth}"
        );
    }

    #[test]
    fn the_partition_count_caps_the_replicas_and_says_so() {
        let (trace, steps) = trace("partition cap");
        no_flapping(&trace, &steps);
        assert!(steps.iter().all(|s| s.replicas <= 6));
        let last = steps.last().unwrap();
        assert_eq!(last.replicas, 6);
        assert!(
            last.decision
                .reason
                .contains("capped at the source's 6 partitions"),
            "{}",
            last.decision.reason
        );
    }
}
