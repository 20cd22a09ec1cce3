//! What the autoscaler observes, measured from the engines' recent progress
//! reports (each replica's `/progress`): rates over a metric window, as
//! Flink's autoscaler measures them from its task metrics.
//!
//! Per replica, over the reports of the window: the records it processed
//! and the time its batches took (its busy time; their ratio is its *true*
//! rate), and the records that arrived at its partitions: what its batches
//! read plus the growth of its lag (the records behind the source's latest
//! offsets). The query's input rate and lag are the sums over replicas, its
//! true rate the slowest replica's. A replica that ran no batch in the
//! window had nothing to read (the engine runs a batch as soon as data is
//! available): it adds no input, and its lag is its last report's.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_crds::progress::QueryProgress;

use super::Observation;

/// An [`Observation`] and what else the reports tell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// What the decision reads.
    pub observation: Observation,
    /// The topic-partitions the replicas read, over all replicas (each
    /// partition has exactly one owner): the most replicas that can share
    /// the work. 0 when no report names them.
    pub partitions: u32,
    /// Whether the query runs on one replica only: a report names a
    /// stateful operator other than those repartitioned by key over the
    /// replicas ([`REPARTITIONED`]). `None` while no replica has reported a
    /// batch: not known yet.
    pub stateful: Option<bool>,
    /// The fixed part of a batch's time fitted in this window (the
    /// smallest over the replicas), in milliseconds.
    pub fixed_ms: Option<f64>,
}

/// The reports of `reports` whose batch started in the `window` before
/// `now`, with when.
fn in_window(
    reports: &[QueryProgress],
    window: Duration,
    now: DateTime<Utc>,
) -> Vec<(&QueryProgress, DateTime<Utc>)> {
    let since = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    reports
        .iter()
        .filter_map(|r| Some((r, started(r)?)))
        .filter(|(_, at)| *at > since && *at <= now)
        .collect()
}

/// The progress names of the stateful operators that run on several
/// replicas (repartitioned by key): a `GROUP BY`'s, a `SELECT DISTINCT`'s
/// and a session window's (Spark's names for their state). An engine that
/// reports another (a newer operator, or an older engine that ran these on
/// one replica under another name) holds the query at one replica.
pub const REPARTITIONED: [&str; 3] = [
    "stateStoreSave",
    "dedupe",
    "sessionWindowStateStoreSaveExec",
];

/// Measures `replicas` (each replica's recent reports, oldest first) over
/// the `window` before `now`. A replica's true rate counts the time its
/// batches took beyond their fixed part ([`fixed_part`], else
/// `known_fixed_ms`: what an earlier window fitted). `idle_for` is left at
/// zero: idleness spans polls, and the caller keeps it.
pub fn measure(
    replicas: &[Vec<QueryProgress>],
    window: Duration,
    now: DateTime<Utc>,
    known_fixed_ms: Option<f64>,
) -> Measured {
    let mut seen = Observation {
        replicas: replicas.len() as u32,
        ..Observation::default()
    };
    let mut slowest: Option<f64> = None;
    let mut partitions = BTreeSet::new();
    let mut stateful = None;
    let mut fixed_ms = None;
    for reports in replicas {
        let Some(last) = reports.last() else {
            continue;
        };
        let pinned = last
            .state_operators
            .iter()
            .any(|op| !REPARTITIONED.contains(&op.operator_name.as_str()));
        stateful = Some(stateful.unwrap_or(false) || pinned);
        seen.lag += behind(last) as f64;
        partitions.extend(topic_partitions(last));
        let recent = in_window(reports, window, now);
        let Some(((first, first_at), (newest, newest_at))) =
            recent.first().copied().zip(recent.last().copied())
        else {
            continue;
        };
        let processed: u64 = recent.iter().map(|(r, _)| r.num_input_rows).sum();
        let batches: Vec<(f64, f64)> = recent
            .iter()
            .map(|(r, _)| (r.num_input_rows as f64, busy(r)))
            .collect();
        let fitted = fixed_part(&batches);
        if let Some(f) = fitted {
            fixed_ms = Some(fixed_ms.map_or(f, |k: f64| k.min(f)));
        }
        let busy_ms = variable_ms(&batches, fitted.or(known_fixed_ms));
        seen.processed += processed as f64;
        seen.busy_seconds += busy_ms / 1000.0;
        if processed > 0 {
            // No time beyond the fixed cost: more than the input could ask.
            let rate = if busy_ms > 0.0 {
                processed as f64 * 1000.0 / busy_ms
            } else {
                f64::INFINITY
            };
            slowest = Some(slowest.map_or(rate, |s| s.min(rate)));
        }
        let span = (newest_at - first_at).to_std().unwrap_or_default();
        seen.input_rate += if recent.len() > 1 && !span.is_zero() {
            // Records that arrived between the first batch's plan and the
            // newest's: what the later batches read, plus the lag's growth.
            let read: u64 = recent[1..].iter().map(|(r, _)| r.num_input_rows).sum();
            let arrived = read as f64 + behind(newest) as f64 - behind(first) as f64;
            arrived.max(0.0) / span.as_secs_f64()
        } else {
            newest.input_rows_per_second
        };
    }
    seen.slowest_true_rate = slowest.unwrap_or(0.0);
    Measured {
        observation: seen,
        partitions: partitions.len() as u32,
        stateful,
        fixed_ms,
    }
}

/// The part of a batch's time that does not grow with its records, fitted
/// by least squares to `ms = fixed + per_record × records` over the
/// batches (`(records, ms)` each) that read records. A micro-batch's time
/// has such a part (a Kafka transaction's round trips take ~20 ms for one
/// record or a thousand; planning the query takes CPU time whatever the
/// batch reads), and at a low input it is nearly all of it:
/// counted as load, a replica that idles would look saturated. `None` when
/// the batches are too alike in size to tell the parts apart (fewer than 4,
/// or the largest not twice the smallest: a backlog read at
/// `maxOffsetsPerTrigger`, a steady input). Records that took no
/// measurable time (a slope of 0 or less) leave the quickest batch's time
/// as the fixed part.
fn fixed_part(batches: &[(f64, f64)]) -> Option<f64> {
    let read: Vec<(f64, f64)> = batches.iter().copied().filter(|(n, _)| *n > 0.0).collect();
    let (smallest, largest) = read.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (n, _)| {
        (lo.min(*n), hi.max(*n))
    });
    if read.len() < 4 || largest < 2.0 * smallest {
        return None;
    }
    let count = read.len() as f64;
    let mean_n = read.iter().map(|(n, _)| n).sum::<f64>() / count;
    let mean_ms = read.iter().map(|(_, ms)| ms).sum::<f64>() / count;
    let spread: f64 = read.iter().map(|(n, _)| (n - mean_n).powi(2)).sum();
    let slope = read
        .iter()
        .map(|(n, ms)| (n - mean_n) * (ms - mean_ms))
        .sum::<f64>()
        / spread;
    let quickest = read.iter().map(|(_, ms)| *ms).fold(f64::MAX, f64::min);
    Some(if slope <= 0.0 {
        quickest
    } else {
        (mean_ms - slope * mean_n).clamp(0.0, quickest)
    })
}

/// The time the batches (`(records, ms)` each) took for their records:
/// beyond `fixed` each, or all of it when the fixed part is unknown (which
/// overstates the load: more replicas, never fewer).
fn variable_ms(batches: &[(f64, f64)], fixed: Option<f64>) -> f64 {
    batches
        .iter()
        .filter(|(n, _)| *n > 0.0)
        .map(|(_, ms)| (ms - fixed.unwrap_or(0.0)).max(0.0))
        .sum()
}

/// When the batch of `report` started.
fn started(report: &QueryProgress) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&report.timestamp)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The phases of a batch whose time does not grow with the records it
/// reads: planning (the latest offsets, the offset log), the sink's commit
/// (a Kafka transaction's round trips) and the commit log.
const FIXED_PHASES: [&str; 3] = ["latestOffset", "sinkCommit", "commitOffsets"];

/// What the batch of `report` cost, in milliseconds: the CPU time the
/// engine spent on it when it reports it (`cpuMs`), else the time it took
/// beyond its fixed phases. Micro-batches at a low input are small and
/// nearly all their time is waiting (for the brokers' answers, a
/// transaction's markers), whatever they read: counted in, a replica that
/// idles would look saturated, and more replicas (smaller batches each)
/// would look slower still. The CPU time leaves the waits out, and what it
/// still has that does not grow with the records (planning the query) is
/// steady enough for [`fixed_part`] to fit where wall-clock times are not.
fn busy(report: &QueryProgress) -> f64 {
    if let Some(cpu) = report.cpu_ms {
        return cpu;
    }
    let phase = |name: &str| report.duration_ms.get(name).copied().unwrap_or(0);
    let fixed: u64 = FIXED_PHASES.iter().map(|p| phase(p)).sum();
    phase("triggerExecution").saturating_sub(fixed) as f64
}

/// The records behind the latest offsets after the batch of `report`.
fn behind(report: &QueryProgress) -> u64 {
    report.sources.iter().map(|s| s.records_behind_latest).sum()
}

/// The topic-partitions a Kafka source's end offsets name
/// (`{"topic": {"0": 12, ...}}`), as `topic/partition`.
fn topic_partitions(report: &QueryProgress) -> Vec<String> {
    report
        .sources
        .iter()
        .filter_map(|s| s.end_offset.as_object())
        .flat_map(|topics| {
            topics.iter().flat_map(|(topic, partitions)| {
                partitions
                    .as_object()
                    .into_iter()
                    .flat_map(move |ps| ps.keys().map(move |p| format!("{topic}/{p}")))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_crds::progress::StateOperatorProgress;

    /// A report of a batch that started `at` seconds after 10:00, read
    /// `rows` in `busy_ms` and left `behind` records behind, on `partitions`
    /// of topic `t`.
    fn report(at: u32, rows: u64, busy_ms: u64, behind: u64, partitions: &[u32]) -> QueryProgress {
        let ends: serde_json::Map<String, serde_json::Value> = partitions
            .iter()
            .map(|p| (p.to_string(), json!(100)))
            .collect();
        serde_json::from_value(json!({
            "id": "q", "runId": "r", "name": "q",
            "timestamp": format!("2026-11-22T10:{:02}:{:02}.000Z", at / 60, at % 60),
            "batchId": at, "numInputRows": rows, "inputRowsPerSecond": 7.0,
            "processedRowsPerSecond": 0.0, "durationMs": {"triggerExecution": busy_ms},
            "sources": [{"description": "kafka", "startOffset": null, "endOffset": {"t": ends},
                         "latestOffset": null, "numInputRows": rows, "inputRowsPerSecond": 7.0,
                         "processedRowsPerSecond": 0.0, "recordsBehindLatest": behind}],
            "sink": {"description": "kafka", "numOutputRows": rows},
        }))
        .unwrap()
    }

    fn at(seconds: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!(
            "2026-11-22T10:{:02}:{:02}Z",
            seconds / 60,
            seconds % 60
        ))
        .unwrap()
        .with_timezone(&Utc)
    }

    #[test]
    fn only_a_state_that_is_not_repartitioned_holds_the_query_on_one_replica() {
        let with = |operator: &str| {
            let mut r = report(10, 100, 50, 0, &[0]);
            r.state_operators = vec![StateOperatorProgress {
                operator_name: operator.into(),
                num_rows_total: 1,
                num_rows_updated: 1,
                num_rows_removed: 0,
                num_rows_dropped_by_watermark: 0,
                memory_used_bytes: 0,
                commit_time_ms: 0,
                custom_metrics: Default::default(),
            }];
            measure(&[vec![r]], Duration::from_secs(30), at(20), None).stateful
        };
        assert_eq!(with("stateStoreSave"), Some(false));
        assert_eq!(with("dedupe"), Some(false));
        assert_eq!(with("sessionWindowStateStoreSaveExec"), Some(false));
        assert_eq!(with("symmetricHashJoin"), Some(true));
        assert_eq!(
            measure(&[Vec::new()], Duration::from_secs(30), at(20), None).stateful,
            None
        );
    }

    #[test]
    fn rates_are_measured_over_the_window_per_replica() {
        // Replica 0: a batch every 10 s reading 10,000 records in 2 s, its
        // lag growing by 1,000 a batch: 1,100/s arrive, 5,000/s when busy.
        let r0: Vec<_> = (0..10)
            .map(|i| report(i * 10, 10_000, 2_000, 1_000 * u64::from(i), &[0, 2]))
            .collect();
        // Replica 1: slower, 10,000 in 4 s; no lag.
        let r1: Vec<_> = (0..10)
            .map(|i| report(i * 10 + 5, 10_000, 4_000, 0, &[1]))
            .collect();
        // The window (60 s before 01:35) holds batches from 00:40.
        let m = measure(&[r0, r1], Duration::from_secs(60), at(95), None);
        let seen = &m.observation;
        assert_eq!(seen.replicas, 2);
        assert_eq!(m.partitions, 3);
        assert_eq!(seen.lag, 9_000.0, "the newest reports' lag");
        // 6 batches of each replica in the window.
        assert_eq!(seen.processed, 120_000.0);
        assert_eq!(seen.busy_seconds, 36.0);
        assert_eq!(seen.slowest_true_rate, 2_500.0);
        // Replica 0: (5 × 10,000 + 5,000) / 50 s = 1,100/s; replica 1:
        // 50,000 / 50 s = 1,000/s.
        assert!((seen.input_rate - 2_100.0).abs() < 1e-9, "{seen:?}");
    }

    #[test]
    fn a_batchs_fixed_phases_are_not_counted_as_capacity_used() {
        // Small batches at a low input: 12 records in 110 ms, 100 ms of it
        // the sink's commit.
        let small: Vec<_> = (0..5)
            .map(|i| {
                let mut r = report(i * 10, 12, 110, 0, &[0]);
                r.duration_ms.insert("sinkCommit".into(), 95);
                r.duration_ms.insert("latestOffset".into(), 3);
                r.duration_ms.insert("commitOffsets".into(), 2);
                r
            })
            .collect();
        let m = measure(
            std::slice::from_ref(&small),
            Duration::from_secs(60),
            at(50),
            None,
        );
        assert!(
            (m.observation.slowest_true_rate - 1_200.0).abs() < 1e-6,
            "{m:?}"
        );
        assert!((m.observation.busy_seconds - 0.05).abs() < 1e-9);
        // Nothing beyond the fixed phases: no measurable cost.
        let free: Vec<_> = small
            .into_iter()
            .map(|mut r| {
                r.duration_ms.insert("sinkCommit".into(), 105);
                r
            })
            .collect();
        let m = measure(&[free], Duration::from_secs(60), at(50), None);
        assert_eq!(m.observation.slowest_true_rate, f64::INFINITY);
        assert_eq!(m.observation.busy_seconds, 0.0);
    }

    #[test]
    fn the_fixed_part_of_a_batchs_time_is_fitted_out() {
        // 100 ms a batch, 0.5 ms a record: a replica does 2,000/s when busy.
        let batches: Vec<(f64, f64)> = [5.0, 10.0, 20.0, 40.0, 80.0]
            .iter()
            .map(|n| (*n, 100.0 + 0.5 * n))
            .collect();
        let fixed = fixed_part(&batches).unwrap();
        assert!((fixed - 100.0).abs() < 1e-9);
        assert!((variable_ms(&batches, Some(fixed)) - 77.5).abs() < 1e-9);
        // Alike in size (a backlog at maxOffsetsPerTrigger): not fitted;
        // all counted unless an earlier window fitted the fixed part.
        let alike = [
            (2000.0, 1100.0),
            (2000.0, 1090.0),
            (1900.0, 1050.0),
            (2000.0, 1110.0),
        ];
        assert_eq!(fixed_part(&alike), None);
        assert_eq!(variable_ms(&alike, None), 4350.0);
        assert_eq!(variable_ms(&alike, Some(100.0)), 3950.0);
        // More records, no more time: the quickest batch is the fixed part.
        let flat = [(5.0, 110.0), (12.0, 105.0), (3.0, 112.0), (9.0, 108.0)];
        assert_eq!(fixed_part(&flat), Some(105.0));
    }

    #[test]
    fn the_cpu_time_a_batch_reports_is_its_cost_not_its_waits() {
        // Back-to-back batches of a few records: 20 ms each, nearly all of
        // it waiting for the brokers, so the time beyond the fixed phases
        // is noise around 12 ms whatever a batch read. The CPU time is
        // 1.5 ms of planning and 0.05 ms a record (20,000/s a core), give
        // or take a little noise.
        let batches: Vec<_> = (0..60)
            .map(|i| {
                let records = 5 + (i * 7) % 20;
                let mut r = report(i as u32, records, 20 + (i * 13) % 5, 0, &[0]);
                r.duration_ms.insert("latestOffset".into(), 3);
                r.duration_ms.insert("sinkCommit".into(), 2);
                r.duration_ms.insert("commitOffsets".into(), 2);
                let noise = [0.02, -0.03, 0.01, 0.0, -0.01][i as usize % 5];
                r.cpu_ms = Some(1.5 + 0.05 * records as f64 + noise);
                r
            })
            .collect();
        let window = Duration::from_secs(60);
        let m = measure(std::slice::from_ref(&batches), window, at(60), None);
        let rate = m.observation.slowest_true_rate;
        assert!((rate - 20_000.0).abs() < 1_000.0, "{m:?}");
        assert!((m.fixed_ms.unwrap() - 1.5).abs() < 0.1, "{m:?}");
        // Six replicas sharing the same input read a sixth a batch: the
        // measure does not fall with the batches (it did on wall-clock
        // times, so that more replicas asked for more still).
        let smaller: Vec<_> = (0..60)
            .map(|i| {
                let records = 1 + (i * 7) % 4;
                let mut r = report(i as u32, records, 20, 0, &[0]);
                let noise = [0.02, -0.03, 0.01, 0.0, -0.01][i as usize % 5];
                r.cpu_ms = Some(1.5 + 0.05 * records as f64 + noise);
                r
            })
            .collect();
        let m = measure(&[smaller], window, at(60), None);
        let rate = m.observation.slowest_true_rate;
        assert!((rate - 20_000.0).abs() < 2_000.0, "{m:?}");
    }

    #[test]
    fn a_fixed_part_fitted_before_serves_batches_alike_in_size() {
        let alike: Vec<_> = (0..5).map(|i| report(i * 10, 100, 150, 0, &[0])).collect();
        let window = Duration::from_secs(60);
        let naive = measure(std::slice::from_ref(&alike), window, at(50), None);
        assert!((naive.observation.slowest_true_rate - 666.7).abs() < 0.1);
        assert_eq!(naive.fixed_ms, None);
        let known = measure(&[alike], window, at(50), Some(100.0));
        assert!((known.observation.slowest_true_rate - 2_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_replica_without_a_batch_in_the_window_adds_no_input_and_keeps_its_lag() {
        let old = vec![report(0, 500, 100, 3, &[0])];
        let m = measure(&[old], Duration::from_secs(60), at(600), None);
        assert_eq!(m.observation.input_rate, 0.0);
        assert_eq!(m.observation.processed, 0.0);
        assert_eq!(m.observation.lag, 3.0);
        assert_eq!(m.partitions, 1);
        // One batch in the window: its own input rate.
        let one = vec![report(590, 500, 100, 0, &[0])];
        let m = measure(&[one], Duration::from_secs(60), at(600), None);
        assert_eq!(m.observation.input_rate, 7.0);
        assert_eq!(m.observation.slowest_true_rate, 5_000.0);
    }

    #[test]
    fn a_replica_that_has_not_reported_counts_but_measures_nothing() {
        let m = measure(
            &[Vec::new(), vec![report(10, 10, 10, 0, &[0])]],
            Duration::from_secs(60),
            at(20),
            None,
        );
        assert_eq!(m.observation.replicas, 2);
        assert_eq!(m.observation.slowest_true_rate, 1_000.0);
    }
}
