//! What a continuous query's engine pods run when the engine keeps failing,
//! decided by a pure function of the query and what was seen of its pods:
//! restarts are counted against `spec.restartPolicy.maxRestarts` (those since
//! the spec, or the restart annotation, last changed, and since the query
//! last completed a batch); past it the query is stopped, or, when the spec
//! asks for it, rolled back to the last spec that ran, as the Flink
//! operator's `lastStableSpec` rollback does. (An `availableNow` query's Job
//! counts its own failures: its `backoffLimit`.)
//!
//! The count lives in the status, so that another operator replica, or this
//! one after a restart, carries on from it.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_crds::{Failures, StreamingQuery, StreamingQuerySpec};

use crate::objects::RESTARTED_AT;

/// The revision of `query` that failures are counted against: its
/// generation, and the restart annotation when set.
pub fn revision(query: &StreamingQuery) -> String {
    let generation = query.metadata.generation.unwrap_or(0);
    match query.annotations().get(RESTARTED_AT) {
        Some(at) => format!("{generation}@{at}"),
        None => generation.to_string(),
    }
}

/// What was seen of a continuous query's engine pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The kubelet's restart counters of the engine containers, summed over
    /// the pods of the StatefulSet's current revision.
    pub restart_count: i32,
    /// A batch completed since the status was last written.
    pub progressed: bool,
    /// Every pod the spec asks for runs the current template and is ready.
    pub rolled_out: bool,
    /// Why the engine pods are failing, when they are.
    pub last_error: Option<String>,
}

/// The spec the engine pods are to run.
#[derive(Clone, Debug, PartialEq)]
pub enum Run {
    /// The query's own spec.
    Current,
    /// The last spec that ran, after the current one failed too often.
    Rollback {
        /// The spec.
        spec: Box<StreamingQuerySpec>,
        /// Its generation.
        generation: i64,
    },
    /// None: the current spec failed too often and there is nothing to go
    /// back to; the pods are stopped.
    Stop,
}

/// The decision for one reconcile, and what the status records of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What the pods run.
    pub run: Run,
    /// The failures counted.
    pub failures: Failures,
    /// The last spec that ran (JSON) and its generation.
    pub last_stable: Option<(String, i64)>,
}

/// Decides what a continuous query runs, given what was seen of its pods.
pub fn decide(query: &StreamingQuery, seen: &Seen) -> Decision {
    let status = query.status.as_ref();
    let revision = revision(query);
    let generation = query.metadata.generation.unwrap_or(0);
    let previous = status
        .and_then(|s| s.failures.as_ref())
        .filter(|f| f.revision == revision);
    // A new revision counts from what its pods show now; the counters drop
    // when pods are replaced, and a completed batch starts the count again.
    let mut base = previous.map_or(seen.restart_count, |f| f.restart_count_base);
    if seen.restart_count < base || seen.progressed {
        base = seen.restart_count;
    }
    let already = previous.filter(|f| f.gave_up);
    let restarts = match already {
        // The pods are stopped or run another spec: keep the count given up at.
        Some(f) => f.restarts,
        None => seen.restart_count - base,
    };
    let gave_up = already.is_some() || restarts > query.spec.max_restarts();
    let failures = Failures {
        revision,
        restarts,
        restart_count_base: base,
        gave_up,
        last_error: seen
            .last_error
            .clone()
            .or_else(|| previous.and_then(|f| f.last_error.clone())),
    };
    let stable = status.and_then(|s| s.last_stable_spec.clone().zip(s.last_stable_generation));
    let run = if !gave_up {
        Run::Current
    } else {
        match stable.as_ref().filter(|_| query.spec.rolls_back()) {
            Some((text, stable_generation)) => {
                match serde_json::from_str::<StreamingQuerySpec>(text) {
                    Ok(spec) if spec != query.spec => Run::Rollback {
                        spec: Box::new(spec),
                        generation: *stable_generation,
                    },
                    // The failing spec is the stable one (or unreadable):
                    // nothing else to run.
                    _ => Run::Stop,
                }
            }
            None => Run::Stop,
        }
    };
    let last_stable = match run {
        Run::Current if seen.rolled_out && seen.progressed && restarts == 0 => Some((
            serde_json::to_string(&query.spec).expect("a spec serializes"),
            generation,
        )),
        _ => stable,
    };
    Decision {
        run,
        failures,
        last_stable,
    }
}

/// The kubelet's restart counters of the engine containers of `pods` that
/// belong to the StatefulSet revision `revision` (all of them when `None`).
pub fn restart_count(pods: &[Pod], revision: Option<&str>) -> i32 {
    pods.iter()
        .filter(|p| {
            revision.is_none_or(|r| {
                p.labels()
                    .get("controller-revision-hash")
                    .map(String::as_str)
                    == Some(r)
            })
        })
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter(|c| c.name == "engine")
        .map(|c| c.restart_count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: fraud, namespace: risk, uid: u-1, generation: 3}
spec:
  sources: [{name: t, generator: {kind: rate, rowsPerSecond: 10}}]
  query: SELECT * FROM t
  sink: {console: {}}
  restartPolicy: {maxRestarts: 2, rollback: true}
"#;

    fn query() -> StreamingQuery {
        sluice_crds::load(QUERY, "test").unwrap()
    }

    fn seen(restart_count: i32, progressed: bool) -> Seen {
        Seen {
            restart_count,
            progressed,
            rolled_out: true,
            last_error: None,
        }
    }

    /// `query` after writing the status that `decision` records.
    fn after(mut query: StreamingQuery, decision: &Decision) -> StreamingQuery {
        let status = query.status.get_or_insert_with(Default::default);
        status.failures = Some(decision.failures.clone());
        status.last_stable_spec = decision.last_stable.as_ref().map(|s| s.0.clone());
        status.last_stable_generation = decision.last_stable.as_ref().map(|s| s.1);
        query
    }

    #[test]
    fn restarts_count_from_the_revision_and_a_completed_batch_starts_again() {
        let q = query();
        // First seen with pods that restarted 5 times under an older spec.
        let first = decide(&q, &seen(5, false));
        assert_eq!(first.failures.restarts, 0);
        assert_eq!(first.failures.revision, "3");
        let q = after(q, &first);
        // New pods: the counters drop, then climb.
        let d = decide(&q, &seen(0, false));
        let q = after(q, &d);
        let d = decide(&q, &seen(2, false));
        assert_eq!((d.failures.restarts, d.run.clone()), (2, Run::Current));
        // A batch completed: the count starts again from here.
        let q = after(q, &d);
        let d = decide(&q, &seen(2, true));
        assert_eq!(d.failures.restarts, 0);
        let q = after(q, &d);
        assert_eq!(decide(&q, &seen(4, false)).failures.restarts, 2);
    }

    #[test]
    fn past_the_limit_without_a_stable_spec_the_pods_stop_until_the_spec_or_a_restart_changes() {
        let mut q = query();
        q.spec.restart_policy.as_mut().unwrap().rollback = None;
        let q = after(q.clone(), &decide(&q, &seen(0, false)));
        let d = decide(&q, &seen(3, false));
        assert_eq!(d.run, Run::Stop);
        assert!(d.failures.gave_up);
        // The pods are gone, the decision holds.
        let q = after(q, &d);
        let d = decide(&q, &seen(0, false));
        assert_eq!((d.run.clone(), d.failures.restarts), (Run::Stop, 3));
        // A restart is a new revision, counted from zero.
        let mut restarted = after(q, &d);
        restarted.metadata.annotations =
            Some([(RESTARTED_AT.to_owned(), "2026-11-21T10:00:00Z".to_owned())].into());
        let d = decide(&restarted, &seen(0, false));
        assert_eq!(d.failures.revision, "3@2026-11-21T10:00:00Z");
        assert_eq!((d.run, d.failures.gave_up), (Run::Current, false));
    }

    #[test]
    fn a_failed_change_rolls_back_to_the_last_spec_that_ran() {
        // Generation 3 runs: rolled out and a batch completed.
        let q = query();
        let d = decide(&q, &seen(0, true));
        let (stable, generation) = d.last_stable.clone().unwrap();
        assert_eq!(generation, 3);
        let q = after(q, &d);
        // Generation 4 changes the query, and its engine keeps failing.
        let mut changed = q.clone();
        changed.metadata.generation = Some(4);
        changed.spec.query = "SELECT value FROM t".into();
        let changed = after(changed.clone(), &decide(&changed, &seen(0, false)));
        let d = decide(&changed, &seen(3, false));
        match &d.run {
            Run::Rollback { spec, generation } => {
                assert_eq!(*generation, 3);
                assert_eq!(serde_json::to_string(spec).unwrap(), stable);
            }
            other => panic!("{other:?}"),
        }
        // The stable spec is still generation 3's, though the rolled-back
        // pods make progress.
        let changed = after(changed, &d);
        let d = decide(&changed, &seen(0, true));
        assert!(matches!(d.run, Run::Rollback { .. }));
        assert_eq!(d.last_stable.unwrap().1, 3);
    }

    #[test]
    fn a_spec_that_never_ran_is_not_stable() {
        let q = query();
        let restarting = Seen {
            restart_count: 1,
            progressed: true,
            rolled_out: true,
            last_error: None,
        };
        let q = after(q.clone(), &decide(&q, &Seen::default()));
        assert!(
            decide(&q, &restarting).last_stable.is_some(),
            "restarted, then ran a batch"
        );
        let not_ready = Seen {
            rolled_out: false,
            ..seen(0, true)
        };
        assert_eq!(decide(&q, &not_ready).last_stable, None);
        assert_eq!(decide(&q, &seen(0, false)).last_stable, None);
    }

    #[test]
    fn restarts_are_summed_over_the_engine_containers_of_one_revision() {
        let pod = |revision: &str, restarts: i32| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "q-0", "labels": {"controller-revision-hash": revision}},
                "status": {"containerStatuses": [
                    {"name": "engine", "image": "i", "imageID": "", "ready": true, "restartCount": restarts},
                ]},
            }))
            .unwrap()
        };
        let pods = [pod("q-abc", 3), pod("q-def", 5)];
        assert_eq!(restart_count(&pods, Some("q-def")), 5);
        assert_eq!(restart_count(&pods, None), 8);
    }
}
