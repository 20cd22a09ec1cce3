//! The status the operator writes, computed by a pure function of what it
//! observed: the spec's problems, the StatefulSet's status and the engine
//! pods' latest progress. Conditions follow Kubernetes' conventions: `Ready`,
//! `Progressing`, `Degraded`, each with a reason, a message, the generation
//! it describes, and a transition time that moves only when its status does.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::StatefulSetStatus;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_crds::progress::QueryProgress;
use sluice_crds::{
    Condition, Phase, Problems, ProgressSummary, StreamingQuery, StreamingQueryStatus,
};

use crate::objects::label_selector;

/// What the operator saw of a query, for [`compute`].
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The spec's problems (`validate()`), if it has any.
    pub problems: Option<Problems>,
    /// A change the checkpoint cannot take (e.g. `statePartitions`), refused.
    pub refused_change: Option<String>,
    /// The engine StatefulSet's status, once it exists.
    pub stateful_set: Option<StatefulSetStatus>,
    /// The latest progress report of each engine pod that answered.
    pub progress: Vec<QueryProgress>,
    /// Why engine pods are failing (e.g. a container's last termination
    /// message), when they are.
    pub pod_failure: Option<String>,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: now.to_owned(),
        observed_generation: generation,
    }
}

/// The status of `query` given what was observed, at `now`. Conditions whose
/// status is unchanged from `query.status` keep their transition time.
pub fn compute(
    query: &StreamingQuery,
    observed: &Observed,
    now: DateTime<Utc>,
) -> StreamingQueryStatus {
    let now_text = now.to_rfc3339_opts(SecondsFormat::Secs, true);
    let generation = query.metadata.generation;
    let desired = if query.spec.is_suspended() {
        0
    } else {
        query.spec.replicas.unwrap_or(1)
    };
    let sts = observed.stateful_set.as_ref();
    let ready = sts.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = sts.and_then(|s| s.updated_replicas).unwrap_or(0);
    // Running once a pod is ready, Pending until then.
    let live = if ready > 0 {
        Phase::Running
    } else {
        Phase::Pending
    };
    let c = |type_: &str, status: bool, reason: &str, message: String| {
        condition(type_, status, reason, message, generation, &now_text)
    };

    let (phase, conditions, last_error) = if let Some(problems) = &observed.problems {
        let message = problems
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        (
            Phase::Failed,
            vec![
                c(
                    "Ready",
                    false,
                    "InvalidSpec",
                    "The spec is invalid and was not applied; engine pods, if any, keep running the last valid spec.".into(),
                ),
                c(
                    "Progressing",
                    false,
                    "InvalidSpec",
                    "Waiting for a valid spec.".into(),
                ),
                c("Degraded", true, "InvalidSpec", message.clone()),
            ],
            Some(message),
        )
    } else if let Some(refused) = &observed.refused_change {
        (
            Phase::Failed,
            vec![
                c(
                    "Ready",
                    ready > 0,
                    "ChangeRefused",
                    "Engine pods keep running the previous spec.".into(),
                ),
                c("Progressing", false, "ChangeRefused", refused.clone()),
                c("Degraded", true, "ChangeRefused", refused.clone()),
            ],
            Some(refused.clone()),
        )
    } else if query.spec.is_suspended() {
        let stopped = sts.is_none_or(|s| s.replicas == 0);
        (
            Phase::Suspended,
            vec![
                c(
                    "Ready",
                    false,
                    "Suspended",
                    "The query is suspended; its checkpoint is kept.".into(),
                ),
                c(
                    "Progressing",
                    !stopped,
                    "Suspended",
                    if stopped {
                        "Engine pods are stopped.".into()
                    } else {
                        "Stopping the engine pods.".into()
                    },
                ),
                c("Degraded", false, "Suspended", String::new()),
            ],
            None,
        )
    } else if let Some(failure) = &observed.pod_failure {
        (
            live,
            vec![
                c(
                    "Ready",
                    ready >= desired && desired > 0,
                    "PodsFailing",
                    format!("{ready}/{desired} engine pods ready."),
                ),
                c(
                    "Progressing",
                    true,
                    "PodsFailing",
                    "Engine pods are restarting with backoff.".into(),
                ),
                c("Degraded", true, "PodsFailing", failure.clone()),
            ],
            Some(failure.clone()),
        )
    } else {
        let rolled_out = ready >= desired && updated >= desired;
        let message = format!("{ready}/{desired} engine pods ready.");
        (
            live,
            vec![
                c(
                    "Ready",
                    rolled_out,
                    if rolled_out { "Running" } else { "Starting" },
                    message.clone(),
                ),
                c(
                    "Progressing",
                    !rolled_out,
                    if rolled_out {
                        "RolledOut"
                    } else {
                        "RollingOut"
                    },
                    message,
                ),
                c("Degraded", false, "Healthy", String::new()),
            ],
            None,
        )
    };

    let previous = query
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = conditions
        .into_iter()
        .map(|mut new| {
            if let Some(old) = previous
                .iter()
                .find(|o| o.type_ == new.type_ && o.status == new.status)
            {
                new.last_transition_time = old.last_transition_time.clone();
            }
            new
        })
        .collect();
    let selector = label_selector(query);
    StreamingQueryStatus {
        phase: Some(phase),
        observed_generation: generation,
        conditions,
        replicas: Some(sts.map_or(0, |s| s.replicas)),
        selector: Some(selector),
        progress: summarize(&observed.progress)
            .or_else(|| query.status.as_ref().and_then(|s| s.progress.clone())),
        last_error,
    }
}

/// The progress of a query over its engine pods: rates and lag add up, the
/// watermark is the smallest, the batch and commit time the latest.
pub fn summarize(reports: &[QueryProgress]) -> Option<ProgressSummary> {
    if reports.is_empty() {
        return None;
    }
    let sum = |f: fn(&QueryProgress) -> f64| reports.iter().map(f).sum::<f64>();
    let lag: u64 = reports
        .iter()
        .flat_map(|r| &r.sources)
        .map(|s| s.records_behind_latest)
        .sum();
    let state_rows: u64 = reports
        .iter()
        .flat_map(|r| &r.state_operators)
        .map(|s| s.num_rows_total)
        .sum();
    Some(ProgressSummary {
        batch_id: reports.iter().map(|r| r.batch_id as i64).max(),
        input_rows_per_second: Some(sum(|r| r.input_rows_per_second)),
        processed_rows_per_second: Some(sum(|r| r.processed_rows_per_second)),
        watermark: reports
            .iter()
            .filter_map(|r| r.event_time.get("watermark"))
            .min()
            .cloned(),
        state_rows: Some(state_rows as i64),
        lag: Some(lag as i64),
        last_commit_time: reports.iter().map(|r| r.timestamp.clone()).max(),
    })
}

/// Why the engine pods are failing, in words, or `None` when none is: a
/// container waiting to restart (`CrashLoopBackOff`, with its last exit code
/// and termination message) or unable to start (`ImagePullBackOff`,
/// `CreateContainerConfigError` for a missing Secret, ...), a pod that failed,
/// or one that cannot be scheduled. The kubelet restarts crashed containers
/// with exponential backoff; this says why it has to.
pub fn pod_failure(pods: &[Pod]) -> Option<String> {
    let mut reasons = Vec::new();
    for pod in pods {
        let name = pod.name_any();
        let Some(status) = &pod.status else { continue };
        if status.phase.as_deref() == Some("Failed") {
            reasons.push(format!(
                "pod {name} failed: {}",
                status.message.as_deref().unwrap_or("no message")
            ));
            continue;
        }
        for c in status.container_statuses.iter().flatten() {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if !FAILING_WAIT_REASONS.contains(&reason) {
                continue;
            }
            let mut text = format!("pod {name} container {}: {reason}", c.name);
            if let Some(last) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                text += &format!(
                    " (restarted {} times; last exit code {}",
                    c.restart_count, last.exit_code
                );
                if let Some(message) = last.message.as_deref().filter(|m| !m.trim().is_empty()) {
                    text += &format!(": {}", last_line(message));
                }
                text += ")";
            } else if let Some(message) = &waiting.message {
                text += &format!(": {message}");
            }
            reasons.push(text);
        }
        for c in status.conditions.iter().flatten() {
            if c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
            {
                reasons.push(format!(
                    "pod {name} cannot be scheduled: {}",
                    c.message.as_deref().unwrap_or("no message")
                ));
            }
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// The waiting reasons that mean a container is failing rather than
/// starting (`ContainerCreating`, `PodInitializing`).
const FAILING_WAIT_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The last non-empty line of a termination message: the engine's error,
/// after its log lines.
fn last_line(message: &str) -> &str {
    message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
}

/// A change of status worth an Event on the StreamingQuery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// A Warning rather than a Normal event.
    pub warning: bool,
    /// The event's reason: the new phase, or the reason the query became
    /// degraded.
    pub reason: String,
    /// The details, for a person.
    pub note: String,
}

/// The Events that going from `old` to `new` deserves: one when the phase
/// changes, one when the query becomes degraded or degraded for another
/// reason. A status that did not change gives none, so re-reconciling emits
/// nothing.
pub fn transitions(
    old: Option<&StreamingQueryStatus>,
    new: &StreamingQueryStatus,
) -> Vec<Transition> {
    let degraded = |s: &StreamingQueryStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let ready_message = |s: &StreamingQueryStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let old_phase = old.and_then(|s| s.phase);
    if let Some(phase) = new.phase.filter(|p| Some(*p) != old_phase) {
        out.push(Transition {
            warning: phase == Phase::Failed,
            reason: format!("{phase:?}"),
            note: new.last_error.clone().unwrap_or_else(|| ready_message(new)),
        });
    }
    // Becoming Failed is told once, by the phase's event.
    let became_failed = new.phase == Some(Phase::Failed) && new.phase != old_phase;
    if let Some((reason, message)) = degraded(new)
        && !became_failed
        && old.and_then(degraded) != Some((reason.clone(), message.clone()))
    {
        out.push(Transition {
            warning: true,
            reason,
            note: message,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_crds::progress::{SinkProgress, SourceProgress};

    use super::*;

    const QUERY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: fraud, namespace: risk, uid: u-1, generation: 4}
spec:
  sources: [{name: transactions, generator: {kind: transactions, rowsPerSecond: 100}}]
  query: SELECT * FROM transactions
  sink: {console: {}}
  replicas: 2
"#;

    fn query(extra: &str) -> StreamingQuery {
        sluice_crds::parse(&format!("{QUERY}{extra}"), "test").unwrap()
    }

    fn sts(replicas: i32, ready: i32) -> Option<StatefulSetStatus> {
        Some(StatefulSetStatus {
            replicas,
            ready_replicas: Some(ready),
            updated_replicas: Some(replicas),
            ..StatefulSetStatus::default()
        })
    }

    fn at(minute: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-21T10:{minute:02}:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The status with a StatefulSet of `replicas` pods, `ready` of them
    /// ready, at minute `minute`.
    fn with_pods(
        q: &StreamingQuery,
        replicas: i32,
        ready: i32,
        minute: u32,
    ) -> StreamingQueryStatus {
        let observed = Observed {
            stateful_set: sts(replicas, ready),
            ..Observed::default()
        };
        compute(q, &observed, at(minute))
    }

    fn get<'a>(status: &'a StreamingQueryStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn an_invalid_spec_is_degraded_with_every_problem() {
        let q = query("");
        let problems = sluice_crds::validate(
            &sluice_crds::parse(
                &QUERY
                    .replace("rowsPerSecond: 100", "rowsPerSecond: 0")
                    .replace("FROM transactions", "FROM nope"),
                "test",
            )
            .unwrap(),
        )
        .unwrap_err();
        let status = compute(
            &q,
            &Observed {
                problems: Some(problems),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        let degraded = get(&status, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(
            degraded
                .message
                .contains("spec.sources[0].generator.rowsPerSecond: must be at least 1"),
            "{}",
            degraded.message
        );
        assert!(
            degraded
                .message
                .contains("spec.query: reads the table \"nope\""),
            "{}",
            degraded.message
        );
        assert_eq!(degraded.observed_generation, Some(4));
        assert_eq!(status.observed_generation, Some(4));
    }

    #[test]
    fn pods_starting_then_ready() {
        let q = query("");
        let starting = with_pods(&q, 2, 0, 0);
        assert_eq!(starting.phase, Some(Phase::Pending));
        assert_eq!(get(&starting, "Ready").status, "False");
        assert_eq!(get(&starting, "Progressing").reason, "RollingOut");
        let ready = with_pods(&q, 2, 2, 1);
        assert_eq!(ready.phase, Some(Phase::Running));
        assert_eq!(
            (
                get(&ready, "Ready").status.as_str(),
                get(&ready, "Ready").message.as_str()
            ),
            ("True", "2/2 engine pods ready.")
        );
        assert_eq!(ready.replicas, Some(2));
        assert_eq!(
            ready.selector.as_deref(),
            Some(
                "app.kubernetes.io/instance=fraud,app.kubernetes.io/managed-by=sluice-operator,app.kubernetes.io/name=sluice-engine"
            )
        );
    }

    #[test]
    fn a_transition_time_moves_only_when_the_status_does() {
        let mut q = query("");
        q.status = Some(with_pods(&q, 2, 2, 0));
        let again = with_pods(&q, 2, 2, 5);
        assert_eq!(
            get(&again, "Ready").last_transition_time,
            "2026-11-21T10:00:00Z"
        );
        let lost = with_pods(&q, 2, 1, 7);
        assert_eq!(
            get(&lost, "Ready").last_transition_time,
            "2026-11-21T10:07:00Z"
        );
        assert_eq!(
            get(&lost, "Degraded").last_transition_time,
            "2026-11-21T10:00:00Z"
        );
    }

    #[test]
    fn suspended_queries_say_so_until_their_pods_are_gone() {
        let q = query("  suspend: true\n");
        let stopping = with_pods(&q, 2, 2, 0);
        assert_eq!(stopping.phase, Some(Phase::Suspended));
        assert_eq!(get(&stopping, "Progressing").status, "True");
        let stopped = with_pods(&q, 0, 0, 1);
        assert_eq!(get(&stopped, "Progressing").status, "False");
        assert_eq!(get(&stopped, "Ready").reason, "Suspended");
    }

    #[test]
    fn failing_pods_and_refused_changes_are_degraded_with_the_reason() {
        let q = query("");
        let failing = compute(
            &q,
            &Observed {
                stateful_set: sts(2, 1),
                pod_failure: Some("fraud-1: CrashLoopBackOff: checkpoint s3://ck/fraud/metadata: belongs to the query \"orders\"".into()),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(get(&failing, "Degraded").reason, "PodsFailing");
        assert!(
            failing
                .last_error
                .as_deref()
                .unwrap()
                .contains("belongs to the query")
        );
        let refused = compute(
            &q,
            &Observed {
                stateful_set: sts(2, 2),
                refused_change: Some(
                    "spec.statePartitions: cannot change from 16 to 32 once the query has started"
                        .into(),
                ),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(refused.phase, Some(Phase::Failed));
        assert_eq!(get(&refused, "Degraded").reason, "ChangeRefused");
        assert_eq!(
            get(&refused, "Ready").status,
            "True",
            "the pods keep running the previous spec"
        );
    }

    fn report(
        batch_id: u64,
        rate: f64,
        lag: u64,
        watermark: &str,
        timestamp: &str,
    ) -> QueryProgress {
        QueryProgress {
            id: "q".into(),
            run_id: "r".into(),
            name: "fraud".into(),
            timestamp: timestamp.into(),
            batch_id,
            num_input_rows: 10,
            input_rows_per_second: rate,
            processed_rows_per_second: rate * 2.0,
            duration_ms: BTreeMap::new(),
            event_time: BTreeMap::from([("watermark".to_owned(), watermark.to_owned())]),
            state_operators: Vec::new(),
            sources: vec![SourceProgress {
                description: "s".into(),
                start_offset: serde_json::Value::Null,
                end_offset: serde_json::Value::Null,
                latest_offset: serde_json::Value::Null,
                num_input_rows: 10,
                input_rows_per_second: rate,
                processed_rows_per_second: rate,
                records_behind_latest: lag,
                num_dead_letter_records: 0,
                metrics: BTreeMap::new(),
            }],
            sink: SinkProgress {
                description: "k".into(),
                num_output_rows: 1,
            },
        }
    }

    #[test]
    fn progress_adds_rates_and_lag_and_keeps_the_smallest_watermark() {
        let summary = summarize(&[
            report(
                7,
                100.0,
                30,
                "2026-11-21T10:00:00.000Z",
                "2026-11-21T10:05:00.000Z",
            ),
            report(
                9,
                50.0,
                12,
                "2026-11-21T09:59:00.000Z",
                "2026-11-21T10:05:02.000Z",
            ),
        ])
        .unwrap();
        assert_eq!(summary.batch_id, Some(9));
        assert_eq!(summary.input_rows_per_second, Some(150.0));
        assert_eq!(summary.processed_rows_per_second, Some(300.0));
        assert_eq!(summary.lag, Some(42));
        assert_eq!(
            summary.watermark.as_deref(),
            Some("2026-11-21T09:59:00.000Z")
        );
        assert_eq!(
            summary.last_commit_time.as_deref(),
            Some("2026-11-21T10:05:02.000Z")
        );
        assert_eq!(summarize(&[]), None);
    }

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_crash_looping_engine_is_reported_with_its_last_error() {
        let crashing = pod(
            "fraud-0",
            serde_json::json!({
                "phase": "Running",
                "containerStatuses": [{
                    "name": "engine", "image": "sluice", "imageID": "", "ready": false,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {"terminated": {
                        "exitCode": 1,
                        "message": "INFO starting\nerror: checkpoint s3://b/q/metadata: was written by query other\n",
                    }},
                }],
            }),
        );
        let starting = pod(
            "fraud-1",
            serde_json::json!({
                "phase": "Pending",
                "containerStatuses": [{
                    "name": "engine", "image": "sluice", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }],
            }),
        );
        assert_eq!(pod_failure(std::slice::from_ref(&starting)), None);
        assert_eq!(
            pod_failure(&[crashing, starting]).unwrap(),
            "pod fraud-0 container engine: CrashLoopBackOff (restarted 4 times; last exit code 1: error: checkpoint s3://b/q/metadata: was written by query other)"
        );
    }

    #[test]
    fn missing_secrets_and_unschedulable_pods_are_failures() {
        let no_secret = pod(
            "q-0",
            serde_json::json!({
                "containerStatuses": [{
                    "name": "engine", "image": "sluice", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"kafka\" not found"}},
                }],
            }),
        );
        let unschedulable = pod(
            "q-1",
            serde_json::json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": "0/3 nodes are available: 3 Insufficient memory."}],
            }),
        );
        assert_eq!(
            pod_failure(&[no_secret, unschedulable]).unwrap(),
            "pod q-0 container engine: CreateContainerConfigError: secret \"kafka\" not found; pod q-1 cannot be scheduled: 0/3 nodes are available: 3 Insufficient memory."
        );
    }

    #[test]
    fn events_mark_phase_changes_and_new_degradations_only() {
        let q = query("");
        let pending = with_pods(&q, 2, 0, 1);
        let created = transitions(None, &pending);
        assert_eq!(
            created,
            vec![Transition {
                warning: false,
                reason: "Pending".into(),
                note: "0/2 engine pods ready.".into()
            }]
        );
        // Nothing changed: no event.
        assert_eq!(transitions(Some(&pending), &with_pods(&q, 2, 0, 2)), vec![]);
        let running = with_pods(&q, 2, 2, 3);
        assert_eq!(transitions(Some(&pending), &running)[0].reason, "Running");
        // Pods failing while Running: the phase holds, a Warning says why.
        let failing = compute(
            &q,
            &Observed {
                stateful_set: sts(2, 1),
                pod_failure: Some("pod fraud-1 container engine: CrashLoopBackOff".into()),
                ..Observed::default()
            },
            at(4),
        );
        assert_eq!(
            transitions(Some(&running), &failing),
            vec![Transition {
                warning: true,
                reason: "PodsFailing".into(),
                note: "pod fraud-1 container engine: CrashLoopBackOff".into()
            }]
        );
        // Failing is told once, by the phase's event, with the error.
        let invalid = compute(
            &q,
            &Observed {
                problems: Some(sluice_crds::Problems(vec![])),
                ..Observed::default()
            },
            at(5),
        );
        let events = transitions(Some(&running), &invalid);
        assert_eq!(events.len(), 1);
        assert!(events[0].warning && events[0].reason == "Failed");
    }
}
