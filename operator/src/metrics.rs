//! The operator's Prometheus metrics, served on `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use sluice_crds::{AutoscalingStatus, Phase};

/// Every phase, so that `sluice_operator_queries` has a series (0) for each.
const PHASES: [Phase; 5] = [
    Phase::Pending,
    Phase::Running,
    Phase::Suspended,
    Phase::Failed,
    Phase::Completed,
];

/// What the controller counts.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: IntCounter,
    /// Reconciles that failed, by a short reason.
    pub errors: IntCounterVec,
    /// How long reconciles take.
    pub duration: Histogram,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Objects an apply changed (the server answered a new
    /// resourceVersion), by kind.
    pub object_writes: IntCounterVec,
    /// Status writes.
    pub status_writes: IntCounter,
    queries: IntGaugeVec,
    phases: Mutex<BTreeMap<String, Phase>>,
    /// The autoscaler's view per query: `replicas` (what it runs),
    /// `recommended` (before stabilization), `lag`, `input_rate` and
    /// `true_rate` (the slowest replica's records per busy second).
    autoscaler: GaugeVec,
    /// Rescales the autoscaler made, per query and direction (`up`, `down`).
    pub rescales: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new(
            "sluice_operator_reconciles_total",
            "Reconciles of StreamingQuery resources.",
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "sluice_operator_reconcile_errors_total",
                "Reconciles that failed, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_operator_reconcile_duration_seconds",
                "How long a reconcile takes.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "sluice_operator_leader",
            "1 while this operator replica holds the leader Lease.",
        )
        .expect("valid metric");
        let object_writes = IntCounterVec::new(
            Opts::new(
                "sluice_operator_object_writes_total",
                "Objects the operator's applies changed, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let status_writes = IntCounter::new(
            "sluice_operator_status_writes_total",
            "Writes of a StreamingQuery's status.",
        )
        .expect("valid metric");
        let queries = IntGaugeVec::new(
            Opts::new(
                "sluice_operator_queries",
                "StreamingQuery resources by status phase.",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let autoscaler = GaugeVec::new(
            Opts::new(
                "sluice_operator_autoscaler",
                "The autoscaler's view of a query: replicas it runs, recommended replicas, lag, input_rate and true_rate (records per busy second of the slowest replica).",
            ),
            &["query", "value"],
        )
        .expect("valid metric");
        let rescales = IntCounterVec::new(
            Opts::new(
                "sluice_operator_autoscaler_rescales_total",
                "Rescales the autoscaler made, by query and direction.",
            ),
            &["query", "direction"],
        )
        .expect("valid metric");
        for phase in PHASES {
            queries.with_label_values(&[&format!("{phase:?}")]).set(0);
        }
        for metric in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(object_writes.clone()),
            Box::new(status_writes.clone()),
            Box::new(queries.clone()),
            Box::new(autoscaler.clone()),
            Box::new(rescales.clone()),
        ] {
            registry.register(metric).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            object_writes,
            status_writes,
            queries,
            phases: Mutex::default(),
            autoscaler,
            rescales,
        }
    }
}

impl Metrics {
    /// Records the phase of the query `key` (`namespace/name`); `None` when
    /// it is gone.
    pub fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().expect("not poisoned");
        match phase {
            Some(p) => phases.insert(key.to_owned(), p),
            None => phases.remove(key),
        };
        for phase in PHASES {
            let n = phases.values().filter(|p| **p == phase).count();
            self.queries
                .with_label_values(&[&format!("{phase:?}")])
                .set(n as i64);
        }
    }

    /// Records the autoscaler's view of the query `key`; `None` removes its
    /// series (autoscaling off, or the query gone).
    pub fn set_autoscaler(&self, key: &str, status: Option<&AutoscalingStatus>) {
        const VALUES: [&str; 5] = ["replicas", "recommended", "lag", "input_rate", "true_rate"];
        let Some(s) = status else {
            for value in VALUES {
                let _ = self.autoscaler.remove_label_values(&[key, value]);
            }
            return;
        };
        let figures = [
            Some(f64::from(s.replicas)),
            Some(f64::from(s.recommended_replicas)),
            s.lag.map(|l| l as f64),
            s.input_rows_per_second,
            s.true_processing_rate,
        ];
        for (value, figure) in VALUES.into_iter().zip(figures) {
            match figure {
                Some(f) => self.autoscaler.with_label_values(&[key, value]).set(f),
                None => {
                    let _ = self.autoscaler.remove_label_values(&[key, value]);
                }
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("text encoding of gathered metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_counted_by_their_latest_phase() {
        let m = Metrics::default();
        m.set_phase("a/q1", Some(Phase::Pending));
        m.set_phase("a/q2", Some(Phase::Running));
        m.set_phase("a/q1", Some(Phase::Running));
        let text = m.render();
        assert!(
            text.contains("sluice_operator_queries{phase=\"Running\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_queries{phase=\"Pending\"} 0"),
            "{text}"
        );
        m.set_phase("a/q2", None);
        assert!(
            m.render()
                .contains("sluice_operator_queries{phase=\"Running\"} 1")
        );
    }
}
