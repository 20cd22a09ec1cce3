//! One autoscaling step of a query, as the controller runs it at each
//! progress poll: from what was seen (the engines' reports, a rescale still
//! rolling out, or the broker while scaled to zero) and what the autoscaler
//! remembers (its past recommendations, how long the source has been idle),
//! the replicas to run and the status that says why.
//!
//! The memory lives in the operator's process. An operator that restarts
//! (or a new leader) starts it again with the current count as if just
//! recommended, so a scale-down waits a whole window after it: it never
//! acts on less than a window of its own observations.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sluice_crds::progress::QueryProgress;
use sluice_crds::{Autoscaling, AutoscalingStatus, StreamingQuery};

use super::cost::Load;
use super::measure::{Earlier, Measured, measure};
use super::{Observation, Policy, Recommendation, recommend, stabilize};

/// The defaults of `spec.autoscaling`'s durations.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(5 * 60);
const RESTART_TIME: Duration = Duration::from_secs(60);
const SCALE_DOWN_WINDOW: Duration = Duration::from_secs(5 * 60);
/// The default of `spec.autoscaling.metricWindow`.
pub const METRIC_WINDOW: Duration = Duration::from_secs(60);
/// How long the replicas' loads serve to fit the per-record cost: the last
/// minutes' input, whose rates differ as it rises or falls, without what an
/// older engine or an older input cost.
const LOAD_HISTORY: Duration = Duration::from_secs(5 * 60);

/// The policy `spec` sets, for a source of `partitions` topic-partitions (0
/// when unknown: no cap). Durations that do not parse (validation refuses
/// them first) take their defaults.
pub fn policy(spec: &Autoscaling, partitions: u32) -> Policy {
    let duration = |text: &Option<String>, default: Duration| {
        text.as_deref()
            .and_then(|t| sluice_crds::duration::parse_duration(t).ok())
            .unwrap_or(default)
    };
    Policy {
        min_replicas: spec.min_replicas.unwrap_or(1).max(1) as u32,
        max_replicas: spec.max_replicas.max(1) as u32,
        max_parallelism: if partitions == 0 {
            u32::MAX
        } else {
            partitions
        },
        target_utilization: f64::from(spec.target_utilization.unwrap_or(70).clamp(1, 100)) / 100.0,
        catch_up_within: duration(&spec.catch_up_within, CATCH_UP_WITHIN),
        restart_time: duration(&spec.restart_time, RESTART_TIME),
        scale_up_window: duration(&spec.scale_up_window, Duration::ZERO),
        scale_down_window: duration(&spec.scale_down_window, SCALE_DOWN_WINDOW),
        scale_to_zero_after: spec
            .scale_to_zero_after
            .as_deref()
            .and_then(|t| sluice_crds::duration::parse_duration(t).ok()),
    }
}

/// The metric window `spec` sets.
pub fn metric_window(spec: &Autoscaling) -> Duration {
    spec.metric_window
        .as_deref()
        .and_then(|t| sluice_crds::duration::parse_duration(t).ok())
        .unwrap_or(METRIC_WINDOW)
}

/// What the autoscaler keeps of one query between its steps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Its recommendations (before stabilization) and when they were made.
    past: Vec<(DateTime<Utc>, u32)>,
    /// Since when the source has had no input and no lag.
    idle_since: Option<DateTime<Utc>>,
    /// The partitions last seen, kept while no engine reports them.
    partitions: u32,
    /// The first step it remembers.
    since: Option<DateTime<Utc>>,
    /// Whether the engines reported state that runs on one replica only
    /// (kept while none runs); `None` before any engine reported a batch.
    #[serde(default)]
    stateful: Option<bool>,
    /// Why the spec itself holds the query at one replica (complete mode).
    #[serde(default)]
    pinned_by_spec: Option<String>,
    /// The replicas' loads measured at the last steps, with when: the
    /// points the per-record cost is fitted over.
    #[serde(default)]
    loads: Vec<(DateTime<Utc>, Load)>,
    /// The per-record cost (CPU seconds a record) as last fitted.
    #[serde(default)]
    per_record: Option<f64>,
    /// The capacity a replica was last observed at while it stayed behind
    /// (records a second): kept until observed again, since what limits
    /// it (`maxOffsetsPerTrigger`, its CPU) does not show once it keeps up.
    #[serde(default)]
    capacity: Option<f64>,
    /// The generation of the spec the loads, the cost and the capacity
    /// were measured under.
    #[serde(default)]
    generation: Option<i64>,
    /// Whether the spec says its input is keyed (`keyedBy`): every state
    /// operator then runs on several replicas.
    #[serde(default)]
    keyed: bool,
}

impl Memory {
    /// Holds the query at one replica for a reason its spec gives, or not.
    pub fn pin_by_spec(&mut self, why: Option<String>) {
        self.pinned_by_spec = why;
    }

    /// Whether the spec's input is keyed (`keyedBy`): then no state
    /// operator holds the query at one replica.
    pub fn set_keyed(&mut self, keyed: bool) {
        self.keyed = keyed;
    }

    /// The generation of the query's spec: a changed spec (its query, its
    /// source's options such as `maxOffsetsPerTrigger`) forgets what
    /// records cost and what a replica was seen to process: they are
    /// measured again.
    pub fn set_generation(&mut self, generation: Option<i64>) {
        if self.generation != generation {
            self.generation = generation;
            self.loads.clear();
            self.per_record = None;
            self.capacity = None;
        }
    }
}

/// What a step sees.
#[derive(Clone, Debug)]
pub enum Seen {
    /// Nothing to measure yet, and why (a rescale rolling out, engine pods
    /// that did not answer): nothing changes.
    Waiting(String),
    /// The engine pods' recent reports (each replica's, oldest first), to
    /// be measured over the metric window.
    Reports(Vec<Vec<QueryProgress>>),
    /// What was measured (the simulation's and the tests' input).
    Running(Measured),
    /// Scaled to zero: the records the broker holds beyond the group's
    /// committed offsets, or why it could not be asked.
    AtZero(Result<u64, String>),
}

/// One step: the replicas to run and the status, at `now`. `previous` is
/// the status of the last step (none when autoscaling was just turned on:
/// it starts from `spec_replicas`).
pub fn step(
    memory: &mut Memory,
    spec: &Autoscaling,
    previous: Option<&AutoscalingStatus>,
    spec_replicas: Option<i32>,
    seen: Seen,
    now: DateTime<Utc>,
) -> AutoscalingStatus {
    let policy = policy(spec, memory.partitions);
    let current = match previous {
        Some(p) => p.replicas.max(0) as u32,
        // Until an engine's report says whether the query can run on
        // several replicas, it starts on one (the engine of one that
        // cannot refuses more).
        None if memory.stateful != Some(false) || memory.pinned_by_spec.is_some() => 1,
        None => (spec_replicas.unwrap_or(1).max(0) as u32).clamp(
            policy.min_replicas,
            policy.max_replicas.max(policy.min_replicas),
        ),
    };
    let since = *memory.since.get_or_insert(now);
    let keep = |reason: String| AutoscalingStatus {
        replicas: current as i32,
        recommended_replicas: previous.map_or(current as i32, |p| p.recommended_replicas),
        reason,
        last_scale_time: previous.and_then(|p| p.last_scale_time.clone()),
        input_rows_per_second: previous.and_then(|p| p.input_rows_per_second),
        true_processing_rate: previous.and_then(|p| p.true_processing_rate),
        lag: previous.and_then(|p| p.lag),
    };
    let observation = match seen {
        Seen::Waiting(why) => return keep(format!("keeping {current}: {why}")),
        Seen::AtZero(Err(why)) => {
            return keep(format!(
                "scaled to zero; cannot ask the broker whether records arrived: {why}"
            ));
        }
        Seen::AtZero(Ok(lag)) => Observation {
            replicas: 0,
            lag: lag as f64,
            ..Observation::default()
        },
        Seen::Reports(reports) => {
            let recent =
                |at: &DateTime<Utc>| (now - *at).to_std().unwrap_or_default() <= LOAD_HISTORY;
            memory.loads.retain(|(at, _)| recent(at));
            let loads: Vec<Load> = memory.loads.iter().map(|(_, l)| *l).collect();
            let earlier = Earlier {
                loads: &loads,
                per_record: memory.per_record,
                capacity: memory.capacity,
            };
            let measured = measure(&reports, metric_window(spec), now, &earlier);
            memory
                .loads
                .extend(measured.loads.iter().map(|l| (now, *l)));
            if measured.observed_capacity.is_some() {
                memory.capacity = measured.observed_capacity;
            }
            if measured.per_record.is_some() {
                memory.per_record = measured.per_record;
            }
            return step(
                memory,
                spec,
                previous,
                spec_replicas,
                Seen::Running(measured),
                now,
            );
        }
        Seen::Running(measured) => {
            if measured.partitions > 0 {
                memory.partitions = measured.partitions;
            }
            if let Some(stateful) = measured.stateful {
                memory.stateful = Some(stateful && !memory.keyed);
            }
            let mut seen = measured.observation;
            seen.replicas = current;
            if seen.input_rate > 0.0 || seen.lag > 0.0 {
                memory.idle_since = None;
            } else {
                let since = *memory.idle_since.get_or_insert(now);
                seen.idle_for = (now - since).to_std().unwrap_or_default();
            }
            seen
        }
    };
    let policy = self::policy(spec, memory.partitions);
    let mut recommended = recommend(&policy, &observation);
    let held = match (&memory.pinned_by_spec, memory.stateful) {
        (Some(why), _) => Some(format!("held at 1: {why}")),
        (None, Some(false)) => None,
        (None, Some(true)) => Some(
            "held at 1: its engine reports a stateful operator not repartitioned by key (this operator knows GROUP BY, SELECT DISTINCT and session windows to be)".to_owned(),
        ),
        (None, None) => Some(
            "held at 1 until an engine reports a batch: whether the query can run on several replicas is not known yet".to_owned(),
        ),
    };
    if let (Some(why), true) = (held, recommended.replicas > 1) {
        recommended = Recommendation {
            replicas: 1,
            reason: format!("{}; {why}", recommended.reason),
        };
    }
    let past: Vec<(Duration, u32)> = memory
        .past
        .iter()
        .map(|(at, r)| ((now - *at).to_std().unwrap_or_default(), *r))
        .collect();
    let mut decided: Recommendation = stabilize(&policy, current, recommended.clone(), &past);
    let remembered = (now - since).to_std().unwrap_or_default();
    if decided.replicas < current && remembered < policy.scale_down_window {
        // A new memory (the operator restarted) has not seen a whole
        // window: what it does not remember may have been higher.
        decided = Recommendation {
            replicas: current,
            reason: format!(
                "keeping {current}: the autoscaler has observed for {}s, less than the scale-down window ({}s): {}",
                remembered.as_secs(),
                policy.scale_down_window.as_secs(),
                recommended.reason
            ),
        };
    }
    memory.past.push((now, recommended.replicas));
    let horizon = policy.scale_up_window.max(policy.scale_down_window);
    memory
        .past
        .retain(|(at, _)| (now - *at).to_std().unwrap_or_default() <= horizon);
    let changed = decided.replicas != current;
    let measured = observation.replicas > 0;
    AutoscalingStatus {
        replicas: decided.replicas as i32,
        recommended_replicas: recommended.replicas as i32,
        reason: decided.reason,
        last_scale_time: if changed {
            Some(now.to_rfc3339_opts(SecondsFormat::Secs, true))
        } else {
            previous.and_then(|p| p.last_scale_time.clone())
        },
        input_rows_per_second: measured.then_some(round(observation.input_rate)),
        true_processing_rate: (observation.slowest_true_rate > 0.0
            && observation.slowest_true_rate.is_finite())
        .then(|| round(observation.slowest_true_rate)),
        lag: Some(observation.lag as i64),
    }
}

/// A step's outcome and the memory for the next, as `sluice-operator
/// autoscale-step` keeps them in a file between its runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// What the step decided (none before the first).
    pub status: Option<AutoscalingStatus>,
    /// What the autoscaler remembers.
    pub memory: Memory,
}

/// One step of `query`'s autoscaler outside Kubernetes, for replicas run
/// as processes (the operator's controller runs the same step): from the
/// replicas' recent reports (`None` while scaled to zero: the brokers are
/// asked, blocking), or `waiting` with why nothing is measured now.
pub fn offline_step(
    query: &StreamingQuery,
    saved: Saved,
    reports: Option<Vec<Vec<QueryProgress>>>,
    waiting: Option<String>,
    now: DateTime<Utc>,
) -> Saved {
    let spec = query.spec.autoscaling.clone().unwrap_or_default();
    let Saved {
        status: previous,
        mut memory,
    } = saved;
    let seen = match (waiting, reports) {
        (Some(why), _) => Seen::Waiting(why),
        (None, None) => Seen::AtZero(crate::broker::waiting_records(query)),
        (None, Some(reports)) => Seen::Reports(reports),
    };
    let status = step(
        &mut memory,
        &spec,
        previous.as_ref(),
        query.spec.replicas,
        seen,
        now,
    );
    Saved {
        status: Some(status),
        memory,
    }
}

/// `value` to one decimal: the status changes only when the figure does.
fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Autoscaling {
        Autoscaling {
            min_replicas: Some(1),
            max_replicas: 8,
            scale_down_window: Some("2m".into()),
            scale_to_zero_after: Some("1m".into()),
            ..Autoscaling::default()
        }
    }

    fn running(replicas: u32, input_rate: f64, lag: f64, true_rate: f64) -> Seen {
        Seen::Running(Measured {
            observation: Observation {
                replicas,
                input_rate,
                processed: true_rate * 10.0,
                busy_seconds: 10.0,
                slowest_true_rate: true_rate,
                lag,
                idle_for: Duration::ZERO,
            },
            partitions: 6,
            stateful: Some(false),
            loads: Vec::new(),
            per_record: None,
            observed_capacity: None,
        })
    }

    /// A step of `spec()` after `previous`.
    fn after(
        memory: &mut Memory,
        previous: &AutoscalingStatus,
        seen: Seen,
        now: DateTime<Utc>,
    ) -> AutoscalingStatus {
        step(memory, &spec(), Some(previous), None, seen, now)
    }

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn the_spec_sets_the_policy() {
        let p = policy(&spec(), 6);
        assert_eq!(
            (p.min_replicas, p.max_replicas, p.max_parallelism),
            (1, 8, 6)
        );
        assert_eq!(p.target_utilization, 0.7);
        assert_eq!(p.scale_down_window, Duration::from_secs(120));
        assert_eq!(p.scale_to_zero_after, Some(Duration::from_secs(60)));
        assert_eq!(policy(&spec(), 0).max_parallelism, u32::MAX);
    }

    #[test]
    fn a_backlog_scales_up_at_once_and_a_lull_scales_down_after_its_window() {
        let mut memory = Memory::default();
        let spec = spec();
        // Starts from spec.replicas; 9,000/s in at 2,000/s a replica: 7,
        // capped at the 6 partitions once a report named them.
        let s = step(
            &mut memory,
            &spec,
            None,
            Some(2),
            running(2, 9_000.0, 0.0, 2_000.0),
            t(0),
        );
        assert_eq!((s.replicas, s.recommended_replicas), (6, 6), "{}", s.reason);
        assert!(
            s.reason.contains("capped at the source's 6 partitions"),
            "{}",
            s.reason
        );
        assert_eq!(s.last_scale_time.as_deref(), Some("2027-01-15T08:00:00Z"));
        assert_eq!(s.input_rows_per_second, Some(9_000.0));
        // While the pods roll, nothing changes.
        let rolling = after(&mut memory, &s, Seen::Waiting("rolling".into()), t(30));
        assert_eq!(rolling.replicas, 6);
        assert_eq!(rolling.reason, "keeping 6: rolling");
        // The input drops: 1 is enough, but 6 was recommended 60 s ago.
        let held = after(&mut memory, &s, running(6, 500.0, 0.0, 2_000.0), t(60));
        assert_eq!((held.replicas, held.recommended_replicas), (6, 1));
        assert!(
            held.reason
                .starts_with("keeping 6 for the scale-down window (120s)")
        );
        assert_eq!(held.last_scale_time, s.last_scale_time);
        // Once the window holds only 1s, down to 1.
        let down = after(&mut memory, &held, running(6, 500.0, 0.0, 2_000.0), t(121));
        assert_eq!(down.replicas, 1, "{}", down.reason);
        assert_eq!(
            down.last_scale_time.as_deref(),
            Some("2027-01-15T08:02:01Z")
        );
    }

    #[test]
    fn an_idle_source_scales_to_zero_and_records_at_the_broker_wake_it() {
        let mut memory = Memory::default();
        let one = AutoscalingStatus {
            replicas: 1,
            recommended_replicas: 1,
            ..AutoscalingStatus::default()
        };
        let mut status = one.clone();
        let mut at_zero = None;
        for i in 0..20 {
            status = after(
                &mut memory,
                &status,
                running(1, 0.0, 0.0, 2_000.0),
                t(i * 15),
            );
            if status.replicas == 0 {
                at_zero = Some(i * 15);
                break;
            }
        }
        // Idle from 0 s: recommended 0 from 60 s, down once the 2-minute
        // window held only 0s: 180 s.
        assert_eq!(at_zero, Some(180), "{}", status.reason);
        let still = after(&mut memory, &status, Seen::AtZero(Ok(0)), t(200));
        assert_eq!(still.replicas, 0);
        let unreachable = after(
            &mut memory,
            &still,
            Seen::AtZero(Err("broker down".into())),
            t(215),
        );
        assert_eq!(unreachable.replicas, 0);
        assert!(unreachable.reason.ends_with("broker down"));
        let woken = after(&mut memory, &still, Seen::AtZero(Ok(40)), t(230));
        assert_eq!(woken.replicas, 1, "{}", woken.reason);
        assert!(
            woken
                .reason
                .starts_with("records arrived while scaled to zero (lag 40)")
        );
    }

    #[test]
    fn a_query_whose_state_is_not_repartitioned_is_held_at_one_replica() {
        // One step from no status, with a busy replica whose reports say
        // (or not) that its state runs on one replica.
        let first_step = |memory: &mut Memory, stateful| {
            let Seen::Running(mut measured) = running(1, 9_000.0, 0.0, 2_000.0) else {
                unreachable!()
            };
            measured.stateful = Some(stateful);
            step(memory, &spec(), None, None, Seen::Running(measured), t(0))
        };
        let s = first_step(&mut Memory::default(), true);
        assert_eq!((s.replicas, s.recommended_replicas), (1, 1));
        assert!(s.reason.ends_with("held at 1: its engine reports a stateful operator not repartitioned by key (this operator knows GROUP BY, SELECT DISTINCT and session windows to be)"), "{}", s.reason);
        // Over a keyed input (keyedBy) they run on several replicas.
        let mut memory = Memory::default();
        memory.set_keyed(true);
        let s = first_step(&mut memory, true);
        assert!(s.recommended_replicas > 1, "{s:?}");
        assert!(!s.reason.contains("held at 1"), "{}", s.reason);
        // Complete mode, whatever the reports say.
        let mut memory = Memory::default();
        memory.pin_by_spec(Some("complete mode runs on one replica".into()));
        let s = first_step(&mut memory, false);
        assert_eq!((s.replicas, s.recommended_replicas), (1, 1));
        assert!(
            s.reason
                .ends_with("held at 1: complete mode runs on one replica"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn min_replicas_wait_for_a_report_that_says_the_query_keeps_no_state() {
        let three = Autoscaling {
            min_replicas: Some(3),
            ..spec()
        };
        let mut memory = Memory::default();
        // No batch reported yet: one replica, not minReplicas (the engine of
        // a stateful query refuses a second).
        let first = step(
            &mut memory,
            &three,
            None,
            None,
            Seen::Waiting("no engine pod answered".into()),
            t(0),
        );
        assert_eq!(first.replicas, 1, "{}", first.reason);
        let Seen::Running(mut unknown) = running(1, 100.0, 0.0, 2_000.0) else {
            unreachable!()
        };
        unknown.stateful = None;
        let s = step(
            &mut memory,
            &three,
            Some(&first),
            None,
            Seen::Running(unknown),
            t(5),
        );
        assert_eq!(s.replicas, 1);
        assert!(s.reason.ends_with("held at 1 until an engine reports a batch: whether the query can run on several replicas is not known yet"), "{}", s.reason);
        // A report without state operators: minReplicas.
        let s = step(
            &mut memory,
            &three,
            Some(&s),
            None,
            running(1, 100.0, 0.0, 2_000.0),
            t(10),
        );
        assert_eq!(s.replicas, 3, "{}", s.reason);
    }

    #[test]
    fn a_restarted_operator_waits_a_whole_window_before_scaling_down() {
        let four = AutoscalingStatus {
            replicas: 4,
            recommended_replicas: 4,
            ..AutoscalingStatus::default()
        };
        let mut memory = Memory::default();
        let s = after(&mut memory, &four, running(4, 100.0, 0.0, 2_000.0), t(0));
        assert_eq!(s.replicas, 4);
        let s = after(&mut memory, &s, running(4, 100.0, 0.0, 2_000.0), t(119));
        assert_eq!(s.replicas, 4);
        let s = after(&mut memory, &s, running(4, 100.0, 0.0, 2_000.0), t(121));
        assert_eq!(s.replicas, 1);
    }

    /// Replica reports of a batch every 50 ms over the 20 s before `t(end)`,
    /// each reading `rows` with `cpu_ms` of CPU and leaving `behind`.
    fn batches(end: i64, rows: u64, cpu_ms: f64, behind: u64) -> Vec<QueryProgress> {
        (0..400)
            .map(|i| {
                let at = t(end) - chrono::Duration::milliseconds(20_000 - i * 50);
                serde_json::from_value(serde_json::json!({
                    "id": "q", "runId": "r", "name": "q",
                    "timestamp": at.to_rfc3339_opts(SecondsFormat::Millis, true),
                    "batchId": i, "numInputRows": rows, "inputRowsPerSecond": 0.0,
                    "processedRowsPerSecond": 0.0, "durationMs": {"triggerExecution": 50},
                    "cpuMs": cpu_ms,
                    "sources": [{"description": "kafka", "startOffset": null,
                                 "endOffset": {"t": {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1}},
                                 "latestOffset": null,
                                 "numInputRows": rows, "inputRowsPerSecond": 0.0,
                                 "processedRowsPerSecond": 0.0, "recordsBehindLatest": behind}],
                    "sink": {"description": "kafka", "numOutputRows": rows},
                }))
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_capacity_seen_while_behind_still_counts_once_the_replica_keeps_up() {
        let spec = Autoscaling {
            max_replicas: 8,
            metric_window: Some("20s".into()),
            ..Autoscaling::default()
        };
        let one = AutoscalingStatus {
            replicas: 1,
            recommended_replicas: 1,
            ..AutoscalingStatus::default()
        };
        let mut memory = Memory::default();
        // Held back (by maxOffsetsPerTrigger: 100 a batch), with a third of
        // a core: 2,000/s is all it does.
        let behind = Seen::Reports(vec![batches(20, 100, 16.0, 5_000)]);
        let s = step(&mut memory, &spec, Some(&one), None, behind, t(20));
        assert_eq!(s.true_processing_rate, Some(2_000.0), "{}", s.reason);
        assert!(s.replicas >= 2, "{}", s.reason);
        // Three replicas keep up with 3,000/s: their CPU alone says far
        // more, but each can still do 2,000/s only.
        let keeping_up = |memory: &mut Memory, previous: &AutoscalingStatus, at: i64| {
            let three = (0..3).map(|_| batches(at, 50, 15.5, 0)).collect();
            step(
                memory,
                &spec,
                Some(previous),
                None,
                Seen::Reports(three),
                t(at),
            )
        };
        let s = keeping_up(&mut memory, &s, 40);
        assert_eq!(s.true_processing_rate, Some(2_000.0), "{}", s.reason);
        assert_eq!(s.recommended_replicas, 3, "{}", s.reason);
        // A changed spec (say, a higher maxOffsetsPerTrigger) is measured
        // again: nothing bounds the CPU's measure (here records over CPU
        // time: nothing fitted yet), and fewer replicas are asked for.
        memory.set_generation(Some(2));
        let s = keeping_up(&mut memory, &s, 60);
        assert_eq!(s.true_processing_rate, Some(3_225.8), "{}", s.reason);
        assert_eq!(s.recommended_replicas, 2, "{}", s.reason);
    }
}
