//! What a record costs a replica, and so what a replica can process.
//!
//! A replica's CPU a second is an *overhead* that does not grow with its
//! input (each micro-batch's planning, transactions and commits, run back
//! to back; the clients' polling; a second stage's own batches) plus a
//! *per-record* cost times its input rate: `cpu = overhead + per_record ×
//! rate` ([`Load`]). Its true rate (what it processes a second when busy,
//! Flink's measure) is then what the core left after the overhead buys:
//! `(1 − overhead) / per_record`. Records over busy time, as Flink computes
//! it, counts the overhead as if records caused it: at a low input, where
//! the overhead is nearly all of a replica's CPU, that understates a
//! replica many times over, and more replicas (each with its own overhead
//! and fewer records) look slower still.
//!
//! The per-record cost is not visible in one replica's batches at a low
//! input: a few records' cost drowns in the batches' overhead and its
//! noise. It is fitted where the rates differ: over the replicas' loads of
//! the last minutes ([`fit`]: replicas owning more partitions than others,
//! an input that rose or fell), else over one replica's batches of
//! different sizes ([`batch_slope`]), else the last fit serves.

/// One replica's load over a metric window.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    /// Records it processed a second.
    pub rate: f64,
    /// CPU seconds its batches took a second (wall-clock busy seconds from
    /// an engine that does not report CPU time).
    pub cpu: f64,
}

/// The share of a core the overhead is taken to leave at least: a
/// replica's overhead near a whole core says its batches are mostly fixed
/// cost, not that it cannot process more (larger batches would amortize
/// it).
const MIN_LEFT: f64 = 0.25;

/// A replica using at least this share of a core is busy: its records over
/// its CPU time are its true rate, measured rather than modelled (the
/// overhead is then amortized over large batches).
pub const BUSY: f64 = 0.8;

/// The per-record cost (CPU seconds a record) fitted by least squares to
/// `cpu = overhead + per_record × rate` over `loads`, when their rates
/// differ enough to tell the parts apart: at least 3 loads, the highest
/// rate at least twice the lowest. A slope of 0 or less (more records took
/// no more CPU) is a cost of 0.
pub fn fit(loads: &[Load]) -> Option<f64> {
    let (lowest, highest) = loads.iter().fold((f64::MAX, 0.0f64), |(lo, hi), l| {
        (lo.min(l.rate), hi.max(l.rate))
    });
    if loads.len() < 3 || highest <= 0.0 || highest < 2.0 * lowest {
        return None;
    }
    let pairs: Vec<(f64, f64)> = loads.iter().map(|l| (l.rate, l.cpu)).collect();
    Some(slope(&pairs).max(0.0))
}

/// The per-record cost (milliseconds a record) fitted over one replica's
/// batches (`(records, ms)` each, those that read records) as `ms = fixed +
/// per_record × records`, when their sizes differ enough: at least 4, the
/// largest at least twice the smallest. Noisy when batches hold a few
/// records each (their fixed part varies more than the records cost).
pub fn batch_slope(batches: &[(f64, f64)]) -> Option<f64> {
    let read: Vec<(f64, f64)> = batches.iter().copied().filter(|(n, _)| *n > 0.0).collect();
    let (smallest, largest) = read.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (n, _)| {
        (lo.min(*n), hi.max(*n))
    });
    if read.len() < 4 || largest < 2.0 * smallest {
        return None;
    }
    Some(slope(&read).max(0.0))
}

/// The least-squares slope of `y` over `x` (`(x, y)` each); the points'
/// `x` must differ.
fn slope(points: &[(f64, f64)]) -> f64 {
    let count = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / count;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / count;
    let spread: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum::<f64>()
        / spread
}

/// What a replica with `load` processes a second when busy, for a
/// per-record cost of `per_record` CPU seconds (`None`: not known, and the
/// whole CPU time is counted as the records', which errs towards more
/// replicas). Infinite when its records cost nothing measurable.
pub fn true_rate(load: Load, per_record: Option<f64>) -> f64 {
    let naive = if load.cpu > 0.0 {
        load.rate / load.cpu
    } else {
        f64::INFINITY
    };
    let Some(per_record) = per_record else {
        return naive;
    };
    if load.cpu >= BUSY {
        return naive;
    }
    if per_record <= 0.0 {
        return f64::INFINITY;
    }
    let overhead = (load.cpu - per_record * load.rate).max(0.0);
    (1.0 - overhead).max(MIN_LEFT) / per_record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(rate: f64, cpu: f64) -> Load {
        Load { rate, cpu }
    }

    #[test]
    fn the_per_record_cost_is_fitted_over_loads_of_different_rates() {
        // 0.3 of a core of overhead, 200 µs a record (as two-stage replicas
        // of a windowed GROUP BY measured on this machine, debug build).
        let loads: Vec<Load> = [49.0, 51.0, 98.0, 102.0, 300.0]
            .iter()
            .map(|r| load(*r, 0.3 + 0.0002 * r))
            .collect();
        assert!((fit(&loads).unwrap() - 0.0002).abs() < 1e-12);
        // Alike in rate, or too few: nothing to tell the parts apart by.
        assert_eq!(fit(&loads[..2]), None);
        assert_eq!(
            fit(&[load(100.0, 0.3), load(120.0, 0.3), load(150.0, 0.4)]),
            None
        );
        // More records, no more CPU: they cost nothing measurable.
        assert_eq!(
            fit(&[load(50.0, 0.3), load(100.0, 0.3), load(200.0, 0.29)]),
            Some(0.0)
        );
    }

    #[test]
    fn a_replica_s_overhead_is_not_counted_as_records_cost() {
        // 50 records a second for 0.31 of a core, 0.3 of it overhead: the
        // core's other 0.7 buys 3,500 records a second at 200 µs each,
        // where records over CPU time would say 161.
        let quiet = load(50.0, 0.31);
        assert!((true_rate(quiet, Some(0.0002)) - 3_500.0).abs() < 1e-6);
        assert!((true_rate(quiet, None) - 161.3).abs() < 0.1);
        // A busy replica is measured: its overhead is amortized.
        let busy = load(4_000.0, 0.9);
        assert!((true_rate(busy, Some(0.0002)) - 4_444.4).abs() < 0.1);
        // An overhead near a whole core still leaves a quarter of it.
        assert!((true_rate(load(10.0, 0.79), Some(0.0001)) - 2_500.0).abs() < 1e-6);
        assert_eq!(true_rate(quiet, Some(0.0)), f64::INFINITY);
    }

    #[test]
    fn the_per_record_cost_is_fitted_over_batches_of_different_sizes() {
        // 15 ms a batch, 0.2 ms a record.
        let batches: Vec<(f64, f64)> = [2.0, 5.0, 8.0, 14.0, 0.0]
            .iter()
            .map(|n| (*n, 15.0 + 0.2 * n))
            .collect();
        assert!((batch_slope(&batches).unwrap() - 0.2).abs() < 1e-12);
        let alike = [
            (2000.0, 1100.0),
            (2000.0, 1090.0),
            (1900.0, 1050.0),
            (2000.0, 1110.0),
        ];
        assert_eq!(batch_slope(&alike), None);
    }
}
