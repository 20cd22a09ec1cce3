//! What the autoscaler observes, measured from the engines' recent progress
//! reports (each replica's `/progress`): rates over a metric window, as
//! Flink's autoscaler measures them from its task metrics.
//!
//! Per replica, over the reports of the window: the records it processed,
//! the CPU time its batches took (its load, see [`cost`]: its true rate is
//! what its core processes when busy, its overhead aside), and the records
//! that arrived at its partitions: what its batches read plus the growth of
//! its lag (the records behind the source's latest offsets). The query's
//! input rate and lag are the sums over replicas, its true rate the
//! slowest replica's. A replica that ran no batch in the window had nothing
//! to read (the engine runs a batch as soon as data is available): it adds
//! no input, and its lag is its last report's.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_crds::progress::QueryProgress;

use super::Observation;
use super::cost::{self, Load};

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
    /// Each replica's load over the window (those that ran two batches or
    /// more in it): points for later fits of the per-record cost.
    pub loads: Vec<Load>,
    /// The per-record cost (CPU seconds a record) fitted in this step, over
    /// the loads of the window and the earlier ones given, else over a
    /// replica's batches; `None` when neither told it.
    pub per_record: Option<f64>,
    /// What the slowest replica that stayed behind the latest offsets in
    /// every batch of the window processed a second: all it can, whatever
    /// holds it back (CPU, `maxOffsetsPerTrigger`, the brokers).
    pub observed_capacity: Option<f64>,
}

/// What earlier steps measured, for this one.
#[derive(Clone, Debug, Default)]
pub struct Earlier<'a> {
    /// The replicas' loads of the last minutes.
    pub loads: &'a [Load],
    /// The per-record cost last fitted (CPU seconds a record).
    pub per_record: Option<f64>,
    /// The capacity a replica was last observed at (see
    /// [`Measured::observed_capacity`]).
    pub capacity: Option<f64>,
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
/// the `window` before `now`. A replica's true rate is what the CPU left
/// after its overhead buys at the per-record cost ([`cost`]): fitted over
/// this window's loads and `earlier` ones (the last minutes'), else over a
/// replica's batches, else the last fit; without any, its records over its
/// whole CPU time. It is at most what a replica was last observed to
/// process while it stayed behind (in this window, else `earlier`), as
/// Flink's autoscaler takes its observed rate while a source lags: a
/// replica limited by something else than its CPU (`maxOffsetsPerTrigger`
/// a batch, the brokers) shows it only so, and the limit stays when it
/// catches up. `idle_for` is left at zero:
/// idleness spans polls, and the caller keeps it.
pub fn measure(
    replicas: &[Vec<QueryProgress>],
    window: Duration,
    now: DateTime<Utc>,
    earlier: &Earlier,
) -> Measured {
    let mut seen = Observation {
        replicas: replicas.len() as u32,
        ..Observation::default()
    };
    let mut partitions = BTreeSet::new();
    let mut stateful = None;
    // Per replica that processed records: what it processed in the window
    // and its load.
    let mut working: Vec<(f64, Load)> = Vec::new();
    let mut loads = Vec::new();
    let mut batch_slopes: Vec<f64> = Vec::new();
    let mut observed_capacity: Option<f64> = None;
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
        let batches: Vec<(f64, f64)> = recent
            .iter()
            .map(|(r, _)| (r.num_input_rows as f64, busy(r)))
            .collect();
        batch_slopes.extend(cost::batch_slope(&batches));
        let processed: f64 = batches.iter().map(|(n, _)| n).sum();
        seen.processed += processed;
        let span = (newest_at - first_at).to_std().unwrap_or_default();
        let spans = recent.len() > 1 && !span.is_zero();
        let load = if spans {
            // What the batches after the first did between the first's
            // start and the newest's.
            let later = &batches[1..];
            let secs = span.as_secs_f64();
            Load {
                rate: later.iter().map(|(n, _)| n).sum::<f64>() / secs,
                cpu: later.iter().map(|(_, ms)| ms).sum::<f64>() / 1000.0 / secs,
            }
        } else {
            // One batch: as if it were the window's only second.
            Load {
                rate: processed,
                cpu: batches.iter().map(|(_, ms)| ms).sum::<f64>() / 1000.0,
            }
        };
        if spans {
            loads.push(load);
            // Behind after every batch, three or more: going as fast as it
            // can.
            if recent.len() > 2 && recent.iter().all(|(r, _)| behind(r) > 0) {
                observed_capacity =
                    Some(observed_capacity.map_or(load.rate, |c: f64| c.min(load.rate)));
            }
        }
        if processed > 0.0 {
            working.push((processed, load));
        }
        seen.input_rate += if spans {
            // Records that arrived between the first batch's plan and the
            // newest's: what the later batches read, plus the lag's growth.
            let read: u64 = recent[1..].iter().map(|(r, _)| r.num_input_rows).sum();
            let arrived = read as f64 + behind(newest) as f64 - behind(first) as f64;
            arrived.max(0.0) / span.as_secs_f64()
        } else {
            newest.input_rows_per_second
        };
    }
    let history: Vec<Load> = earlier.loads.iter().chain(&loads).copied().collect();
    // A slope over small batches is noisy: the replicas' median.
    batch_slopes.sort_by(f64::total_cmp);
    let median = batch_slopes.get(batch_slopes.len() / 2);
    let per_record = cost::fit(&history).or(median.map(|ms| ms / 1000.0));
    let used = per_record.or(earlier.per_record);
    let bound = observed_capacity
        .or(earlier.capacity)
        .unwrap_or(f64::INFINITY);
    let mut slowest: Option<f64> = None;
    for (processed, load) in working {
        let rate = cost::true_rate(load, used).min(bound);
        slowest = Some(slowest.map_or(rate, |s| s.min(rate)));
        if rate.is_finite() {
            seen.busy_seconds += processed / rate;
        }
    }
    seen.slowest_true_rate = slowest.unwrap_or(0.0);
    Measured {
        observation: seen,
        partitions: partitions.len() as u32,
        stateful,
        loads,
        per_record,
        observed_capacity,
    }
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
/// would look slower still. The CPU time leaves the waits out; what it
/// still has that does not grow with the records (planning the query, a
/// second stage's batches) is the overhead [`cost`] tells apart.
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
            measure(
                &[vec![r]],
                Duration::from_secs(30),
                at(20),
                &Earlier::default(),
            )
            .stateful
        };
        assert_eq!(with("stateStoreSave"), Some(false));
        assert_eq!(with("dedupe"), Some(false));
        assert_eq!(with("sessionWindowStateStoreSaveExec"), Some(false));
        assert_eq!(with("symmetricHashJoin"), Some(true));
        assert_eq!(
            measure(
                &[Vec::new()],
                Duration::from_secs(30),
                at(20),
                &Earlier::default()
            )
            .stateful,
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
        let m = measure(
            &[r0, r1],
            Duration::from_secs(60),
            at(95),
            &Earlier::default(),
        );
        let seen = &m.observation;
        assert_eq!(seen.replicas, 2);
        assert_eq!(m.partitions, 3);
        assert_eq!(seen.lag, 9_000.0, "the newest reports' lag");
        // 6 batches of each replica in the window.
        assert_eq!(seen.processed, 120_000.0);
        // Replica 0 stayed behind after every batch (its lag grows: each
        // reads 10,000 at most): 1,000/s is all it can, whatever its CPU
        // says (5,000/s), and what replica 1 is taken to do at most.
        assert_eq!(m.observed_capacity, Some(1_000.0));
        assert_eq!(seen.slowest_true_rate, 1_000.0);
        assert_eq!(seen.busy_seconds, 120.0);
        // Caught up, each is what its CPU says: 5,000/s and 2,500/s.
        let caught_up = |r: &QueryProgress| {
            let mut r = r.clone();
            r.sources[0].records_behind_latest = 0;
            r
        };
        let r0: Vec<_> = (0..10)
            .map(|i| caught_up(&report(i * 10, 10_000, 2_000, 0, &[0, 2])))
            .collect();
        let r1: Vec<_> = (0..10)
            .map(|i| report(i * 10 + 5, 10_000, 4_000, 0, &[1]))
            .collect();
        let replicas = [r0, r1];
        let m = measure(
            &replicas,
            Duration::from_secs(60),
            at(95),
            &Earlier::default(),
        );
        assert_eq!(m.observed_capacity, None);
        assert_eq!(m.observation.busy_seconds, 36.0);
        assert_eq!(m.observation.slowest_true_rate, 2_500.0);
        // A capacity observed before, while behind, still bounds them.
        let earlier = Earlier {
            capacity: Some(1_500.0),
            ..Earlier::default()
        };
        let m = measure(&replicas, Duration::from_secs(60), at(95), &earlier);
        assert_eq!(m.observation.slowest_true_rate, 1_500.0);
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
            &Earlier::default(),
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
        let m = measure(
            &[free],
            Duration::from_secs(60),
            at(50),
            &Earlier::default(),
        );
        assert_eq!(m.observation.slowest_true_rate, f64::INFINITY);
        assert_eq!(m.observation.busy_seconds, 0.0);
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
        let m = measure(
            std::slice::from_ref(&batches),
            window,
            at(60),
            &Earlier::default(),
        );
        let rate = m.observation.slowest_true_rate;
        assert!((rate - 20_000.0).abs() < 1_000.0, "{m:?}");
        assert!(
            (m.per_record.unwrap() - 0.000_05).abs() < 0.000_005,
            "{m:?}"
        );
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
        let m = measure(&[smaller], window, at(60), &Earlier::default());
        let rate = m.observation.slowest_true_rate;
        assert!((rate - 20_000.0).abs() < 2_000.0, "{m:?}");
    }

    #[test]
    fn a_per_record_cost_fitted_before_serves_batches_alike_in_size() {
        // 100 records in 150 ms every 10 s: 10 records and 15 ms a second.
        let alike: Vec<_> = (0..5).map(|i| report(i * 10, 100, 150, 0, &[0])).collect();
        let window = Duration::from_secs(60);
        let naive = measure(
            std::slice::from_ref(&alike),
            window,
            at(50),
            &Earlier::default(),
        );
        assert!((naive.observation.slowest_true_rate - 666.7).abs() < 0.1);
        assert_eq!(naive.per_record, None);
        assert_eq!(naive.loads.len(), 1);
        // 0.5 ms a record: 10 ms of the 15 is overhead; the other 0.99 of
        // the core buys 1,980 records a second.
        let known = Earlier {
            per_record: Some(0.0005),
            ..Earlier::default()
        };
        let known = measure(std::slice::from_ref(&alike), window, at(50), &known);
        assert!((known.observation.slowest_true_rate - 1_980.0).abs() < 1e-6);
        // Loads of earlier windows at other rates tell the cost: 1 ms a
        // record over 5 ms of overhead a second.
        let earlier = [
            Load {
                rate: 40.0,
                cpu: 0.045,
            },
            Load {
                rate: 20.0,
                cpu: 0.025,
            },
        ];
        let earlier = Earlier {
            loads: &earlier,
            ..Earlier::default()
        };
        let fitted = measure(&[alike], window, at(50), &earlier);
        assert!(
            (fitted.per_record.unwrap() - 0.001).abs() < 1e-9,
            "{fitted:?}"
        );
        assert!((fitted.observation.slowest_true_rate - 995.0).abs() < 1e-6);
    }

    #[test]
    fn replicas_at_different_rates_tell_the_per_record_cost_apart_from_the_overhead() {
        // Two-stage replicas of a windowed GROUP BY at 300 records/s over
        // four replicas (as measured on this machine, debug build): 20
        // batches a second, each with ~15 ms of CPU whatever it reads
        // (planning, transactions, the second stage's batches), give or
        // take 5 ms; 200 µs a record. Two replicas own one partition, two
        // own two. Records over CPU time said ~170/s; the batches alone are
        // too noisy to fit.
        let replica = |rows: &[u64]| -> Vec<QueryProgress> {
            (0..600u32)
                .map(|i| {
                    let n = rows[i as usize % rows.len()];
                    let mut r = report(i / 20, n, 50, 0, &[0]);
                    r.timestamp = format!("2026-11-22T10:00:{:02}.{:03}Z", i / 20, (i % 20) * 50);
                    let noise = [4.0, -5.0, 1.0, -2.0, 3.0, -1.0][i as usize % 6];
                    r.cpu_ms = Some(15.0 + 0.2 * n as f64 + noise);
                    r
                })
                .collect()
        };
        let one = [2, 3, 2, 3];
        let two = [5, 4, 6, 5];
        let replicas = [replica(&one), replica(&one), replica(&two), replica(&two)];
        let m = measure(
            &replicas,
            Duration::from_secs(30),
            at(30),
            &Earlier::default(),
        );
        let per_record = m.per_record.unwrap();
        assert!((per_record - 0.0002).abs() < 0.000_02, "{m:?}");
        let rate = m.observation.slowest_true_rate;
        assert!((2_900.0..4_000.0).contains(&rate), "{m:?}");
    }

    #[test]
    fn a_replica_without_a_batch_in_the_window_adds_no_input_and_keeps_its_lag() {
        let old = vec![report(0, 500, 100, 3, &[0])];
        let m = measure(
            &[old],
            Duration::from_secs(60),
            at(600),
            &Earlier::default(),
        );
        assert_eq!(m.observation.input_rate, 0.0);
        assert_eq!(m.observation.processed, 0.0);
        assert_eq!(m.observation.lag, 3.0);
        assert_eq!(m.partitions, 1);
        // One batch in the window: its own input rate.
        let one = vec![report(590, 500, 100, 0, &[0])];
        let m = measure(
            &[one],
            Duration::from_secs(60),
            at(600),
            &Earlier::default(),
        );
        assert_eq!(m.observation.input_rate, 7.0);
        assert_eq!(m.observation.slowest_true_rate, 5_000.0);
    }

    #[test]
    fn a_replica_that_has_not_reported_counts_but_measures_nothing() {
        let m = measure(
            &[Vec::new(), vec![report(10, 10, 10, 0, &[0])]],
            Duration::from_secs(60),
            at(20),
            &Earlier::default(),
        );
        assert_eq!(m.observation.replicas, 2);
        assert_eq!(m.observation.slowest_true_rate, 1_000.0);
    }
}
