//! The status the operator writes, computed by a pure function of what it
//! observed: the spec's problems, the StatefulSet's status and the engine
//! pods' latest progress. Conditions follow Kubernetes' conventions: `Ready`,
//! `Progressing`, `Degraded`, each with a reason, a message, the generation
//! it describes, and a transition time that moves only when its status does.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::StatefulSetStatus;
use k8s_openapi::api::batch::v1::JobStatus;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_crds::progress::QueryProgress;
use sluice_crds::{
    AutoscalingStatus, Condition, Failures, Phase, Problems, ProgressSummary, StreamingQuery,
    StreamingQueryStatus,
};

use crate::lifecycle::{self, Decision, Run};
use crate::objects::{desired_replicas, label_selector};

/// What the operator saw of a query, for [`compute`].
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The spec's problems (`validate()`), if it has any.
    pub problems: Option<Problems>,
    /// A change the checkpoint cannot take (e.g. `statePartitions`), refused.
    pub refused_change: Option<String>,
    /// The API server's refusal of an object the operator applied (an
    /// immutable field changed, an admission webhook said no), with the
    /// object's kind and name.
    pub apply_error: Option<String>,
    /// The engine pods' controller and its status.
    pub workload: Workload,
    /// The latest progress report of each engine pod that answered.
    pub progress: Vec<QueryProgress>,
    /// Why engine pods are failing (e.g. a container's last termination
    /// message), when they are.
    pub pod_failure: Option<String>,
    /// Engine pods whose `/healthz` says they are stalled, and why.
    pub stalled: Option<String>,
    /// What a continuous query runs, given its failures (see
    /// [`crate::lifecycle`]).
    pub decision: Option<Decision>,
    /// The autoscaler's step, when `spec.autoscaling` is enabled and it ran
    /// (at a progress poll); the previous status's is kept otherwise.
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The controller of a query's engine pods, as observed.
#[derive(Clone, Debug, Default)]
pub enum Workload {
    /// None (yet).
    #[default]
    None,
    /// A continuous query's StatefulSet.
    StatefulSet(StatefulSetStatus),
    /// An `availableNow` query's Job for its current spec.
    Job {
        /// The Job's name.
        name: String,
        /// Its status (default before the Job controller wrote one).
        status: JobStatus,
        /// The final progress of its run that succeeded, from the engine's
        /// termination message.
        final_progress: Option<Box<QueryProgress>>,
    },
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

/// The condition of `type_` on a Job status that is `True`, if any.
fn job_condition<'a>(
    status: &'a JobStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == "True")
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
    let previous_status = query.status.clone().unwrap_or_default();
    let autoscaling = if crate::objects::autoscaled(query) {
        observed
            .autoscaling
            .clone()
            .or_else(|| previous_status.autoscaling.clone())
    } else {
        None
    };
    let desired = match &autoscaling {
        Some(a) if !query.spec.is_suspended() => a.replicas,
        _ => desired_replicas(query),
    };
    let (ready, updated, replicas) = match &observed.workload {
        Workload::StatefulSet(s) => (
            s.ready_replicas.unwrap_or(0),
            s.updated_replicas.unwrap_or(0),
            s.replicas,
        ),
        Workload::Job { status, .. } => {
            let active = status.active.unwrap_or(0);
            (status.ready.unwrap_or(0), active, active)
        }
        Workload::None => (0, 0, 0),
    };
    // Running once a pod is ready, Pending until then.
    let live = if ready > 0 {
        Phase::Running
    } else {
        Phase::Pending
    };
    let c = |type_: &str, status: bool, reason: &str, message: String| {
        condition(type_, status, reason, message, generation, &now_text)
    };
    let ready_message = format!("{ready}/{desired} engine pods ready.");
    // Failed with `reason`: the pods (if any) keep running what they ran.
    let failed = |reason: &str, message: &str, hold: &str| {
        (
            Phase::Failed,
            vec![
                c("Ready", ready > 0, reason, hold.to_owned()),
                c("Progressing", false, reason, message.to_owned()),
                c("Degraded", true, reason, message.to_owned()),
            ],
            Some(message.to_owned()),
        )
    };
    // Running (or starting) but degraded for `reason`.
    let degraded = |reason: &str, message: &str| {
        (
            live,
            vec![
                c(
                    "Ready",
                    ready >= desired && desired > 0,
                    reason,
                    ready_message.clone(),
                ),
                c(
                    "Progressing",
                    ready < desired || updated < desired,
                    reason,
                    ready_message.clone(),
                ),
                c("Degraded", true, reason, message.to_owned()),
            ],
            Some(message.to_owned()),
        )
    };
    let job = match &observed.workload {
        Workload::Job {
            name,
            status,
            final_progress,
        } => Some((name, status, final_progress)),
        _ => None,
    };
    let stop = observed.decision.as_ref().filter(|d| d.run == Run::Stop);
    let rollback = observed.decision.as_ref().and_then(|d| match &d.run {
        Run::Rollback { generation, .. } => Some((*generation, d.failures.restarts)),
        _ => None,
    });
    let failures = match (&observed.decision, job) {
        (Some(decision), _) => Some(decision.failures.clone()),
        (None, Some((_, status, _))) => {
            let revision = lifecycle::revision(query);
            let before = previous_status
                .failures
                .as_ref()
                .filter(|f| f.revision == revision);
            Some(Failures {
                revision,
                restarts: status.failed.unwrap_or(0),
                restart_count_base: 0,
                gave_up: job_condition(status, "Failed").is_some(),
                last_error: observed
                    .pod_failure
                    .clone()
                    .or_else(|| before.and_then(|f| f.last_error.clone())),
            })
        }
        (None, None) => previous_status.failures.clone(),
    };
    // The engine's last error, kept while its pods come and go.
    let last_error = failures.as_ref().and_then(|f| f.last_error.clone());

    let (phase, conditions, last_error) = if let Some(problems) = &observed.problems {
        let message = problems
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        failed(
            "InvalidSpec",
            &message,
            "The spec is invalid and was not applied; engine pods, if any, keep running the last valid spec.",
        )
    } else if let Some(refused) = &observed.refused_change {
        failed(
            "ChangeRefused",
            refused,
            "Engine pods keep running the previous spec.",
        )
    } else if let Some(refusal) = &observed.apply_error {
        failed(
            "ApplyFailed",
            &format!("The API server refused the change: {refusal}"),
            "Engine pods keep running the previous spec.",
        )
    } else if autoscaling.is_some() && desired == 0 && !query.spec.is_suspended() {
        let reason = autoscaling
            .as_ref()
            .map(|a| a.reason.clone())
            .unwrap_or_default();
        let stopped = replicas == 0;
        (
            Phase::Running,
            vec![
                c(
                    "Ready",
                    true,
                    "ScaledToZero",
                    format!(
                        "The autoscaler scaled the query to zero ({reason}); it starts engine pods when records arrive."
                    ),
                ),
                c(
                    "Progressing",
                    !stopped,
                    "ScaledToZero",
                    if stopped {
                        "Engine pods are stopped.".into()
                    } else {
                        "Stopping the engine pods.".into()
                    },
                ),
                c("Degraded", false, "ScaledToZero", String::new()),
            ],
            None,
        )
    } else if query.spec.is_suspended() || desired == 0 {
        let (reason, why) = if query.spec.is_suspended() {
            ("Suspended", "The query is suspended")
        } else {
            ("ScaledToZero", "spec.replicas is 0")
        };
        let stopped = replicas == 0;
        (
            Phase::Suspended,
            vec![
                c(
                    "Ready",
                    false,
                    reason,
                    format!("{why}; its checkpoint is kept."),
                ),
                c(
                    "Progressing",
                    !stopped,
                    reason,
                    if stopped {
                        "Engine pods are stopped.".into()
                    } else {
                        "Stopping the engine pods.".into()
                    },
                ),
                c("Degraded", false, reason, String::new()),
            ],
            None,
        )
    } else if let Some((_, _, final_progress)) =
        job.filter(|(_, s, _)| job_condition(s, "Complete").is_some())
    {
        let batches = final_progress
            .as_ref()
            .map(|p| format!(" (last batch {})", p.batch_id))
            .unwrap_or_default();
        let message = format!("The query processed all its input{batches} and stopped.");
        (
            Phase::Completed,
            vec![
                c("Ready", false, "Completed", message.clone()),
                c("Progressing", false, "Completed", message),
                c("Degraded", false, "Completed", String::new()),
            ],
            None,
        )
    } else if let Some((name, status, _)) =
        job.filter(|(_, s, _)| job_condition(s, "Failed").is_some())
    {
        let failed_runs = status.failed.unwrap_or(0);
        let why = job_condition(status, "Failed")
            .and_then(|c| c.message.clone())
            .unwrap_or_default();
        let message = format!(
            "The Job {name} failed ({failed_runs} failed runs, spec.restartPolicy.maxRestarts {}: {why}); last error: {}. Change the spec, or restart the query (annotate it {}), to run it again.",
            query.spec.max_restarts(),
            last_error.as_deref().unwrap_or("none reported"),
            crate::objects::RESTARTED_AT,
        );
        failed(
            "RestartLimitExceeded",
            &message,
            "The query's Job failed; no engine pod runs.",
        )
    } else if let Some(decision) = stop {
        let message = format!(
            "The engine failed {} times in a row, more than spec.restartPolicy.maxRestarts ({}), and its pods are stopped; last error: {}. Change the spec, or restart the query (annotate it {}), to run it again.",
            decision.failures.restarts,
            query.spec.max_restarts(),
            last_error.as_deref().unwrap_or("none reported"),
            crate::objects::RESTARTED_AT,
        );
        failed(
            "RestartLimitExceeded",
            &message,
            "The engine pods are stopped.",
        )
    } else if let Some((stable_generation, restarts)) = rollback {
        let message = format!(
            "Generation {} failed {restarts} times in a row (last error: {}); rolled back to generation {stable_generation}, the last spec that ran. Change the spec to try again.",
            generation.unwrap_or(0),
            last_error.as_deref().unwrap_or("none reported"),
        );
        degraded("RolledBack", &message)
    } else if let Some(stalled) = &observed.stalled {
        degraded("Stalled", stalled)
    } else if let Some(failure) = &observed.pod_failure {
        let mut out = degraded("PodsFailing", failure);
        // Kubernetes restarts them with backoff.
        out.1[1] = c(
            "Progressing",
            true,
            "PodsFailing",
            "Engine pods are restarting with backoff.".into(),
        );
        out
    } else {
        let rolled_out = ready >= desired && updated >= desired;
        (
            live,
            vec![
                c(
                    "Ready",
                    rolled_out,
                    if rolled_out { "Running" } else { "Starting" },
                    ready_message.clone(),
                ),
                c(
                    "Progressing",
                    !rolled_out,
                    if rolled_out {
                        "RolledOut"
                    } else {
                        "RollingOut"
                    },
                    ready_message,
                ),
                c("Degraded", false, "Healthy", String::new()),
            ],
            None,
        )
    };

    let previous = previous_status.conditions.as_slice();
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
    let final_progress = job.and_then(|(_, _, p)| p.clone());
    let progress = summarize(&observed.progress)
        .or_else(|| final_progress.map(|p| summarize(&[*p]).expect("one report")))
        .or_else(|| previous_status.progress.clone());
    let last_stable = match &observed.decision {
        Some(decision) => decision.last_stable.clone(),
        None => previous_status
            .last_stable_spec
            .clone()
            .zip(previous_status.last_stable_generation),
    };
    StreamingQueryStatus {
        phase: Some(phase),
        observed_generation: generation,
        conditions,
        replicas: Some(replicas),
        selector: Some(label_selector(query)),
        progress,
        last_error,
        failures,
        last_stable_spec: last_stable.as_ref().map(|s| s.0.clone()),
        last_stable_generation: last_stable.map(|s| s.1),
        running_generation: rollback.map(|r| r.0),
        job: job.map(|(name, _, _)| name.clone()),
        autoscaling,
    }
}

/// Whether `fresh` progress shows a batch newer than `previous` status
/// progress: the query made progress since the status was written.
pub fn progressed(previous: Option<&ProgressSummary>, fresh: &[QueryProgress]) -> bool {
    let Some(latest) = fresh.iter().map(|r| r.timestamp.as_str()).max() else {
        return false;
    };
    previous
        .and_then(|p| p.last_commit_time.as_deref())
        .is_none_or(|before| latest > before)
}

/// The final progress report of a run that ended by itself (an
/// `availableNow` Job's pod that succeeded): the engine writes it as JSON
/// to its termination message.
pub fn final_progress(pods: &[Pod]) -> Option<QueryProgress> {
    pods.iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter(|c| c.name == "engine")
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code == 0)
        .filter_map(|t| serde_json::from_str::<QueryProgress>(t.message.as_deref()?).ok())
        .max_by(|a, b| a.timestamp.cmp(&b.timestamp))
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
/// `CreateContainerConfigError` for a missing Secret, ...), the latest pod
/// that failed (a Job's run: its exit code and termination message), or one
/// that cannot be scheduled. Kubernetes restarts crashed containers (and
/// Jobs their failed runs) with exponential backoff; this says why it has
/// to.
pub fn pod_failure(pods: &[Pod]) -> Option<String> {
    let mut reasons = Vec::new();
    let latest_failed = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .max_by_key(|p| p.creation_timestamp().map(|t| t.0));
    for pod in pods {
        let name = pod.name_any();
        let Some(status) = &pod.status else { continue };
        if status.phase.as_deref() == Some("Failed") {
            if std::ptr::eq(pod, latest_failed.expect("a failed pod")) {
                let exited = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter(|c| c.name == "engine")
                    .find_map(|c| c.state.as_ref()?.terminated.as_ref());
                let why = match exited {
                    Some(t) => {
                        let mut text = format!("exit code {}", t.exit_code);
                        if let Some(m) = t.message.as_deref().filter(|m| !m.trim().is_empty()) {
                            text += &format!(": {}", last_line(m));
                        }
                        text
                    }
                    None => status
                        .message
                        .clone()
                        .unwrap_or_else(|| "no message".into()),
                };
                reasons.push(format!("pod {name} failed: {why}"));
            }
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

    fn sts(replicas: i32, ready: i32) -> Workload {
        Workload::StatefulSet(StatefulSetStatus {
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
            workload: sts(replicas, ready),
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
                workload: sts(2, 1),
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
                workload: sts(2, 2),
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
            cpu_ms: None,
            event_time: BTreeMap::from([("watermark".to_owned(), watermark.to_owned())]),
            state_operators: Vec::new(),
            sources: vec![
                serde_json::from_value::<SourceProgress>(serde_json::json!({
                    "description": "s", "startOffset": null, "endOffset": null,
                    "latestOffset": null, "numInputRows": 10,
                    "inputRowsPerSecond": rate, "processedRowsPerSecond": rate,
                    "recordsBehindLatest": lag,
                }))
                .unwrap(),
            ],
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
                workload: sts(2, 1),
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

    fn job(conditions: serde_json::Value, failed: i32) -> Workload {
        Workload::Job {
            name: "fraud-1a2b3c4d".into(),
            status: serde_json::from_value(serde_json::json!({
                "failed": failed, "conditions": conditions,
            }))
            .unwrap(),
            final_progress: None,
        }
    }

    #[test]
    fn a_job_that_completed_is_completed_with_its_final_progress() {
        let q = query("");
        let mut done = job(
            serde_json::json!([{"type": "Complete", "status": "True"}]),
            0,
        );
        if let Workload::Job { final_progress, .. } = &mut done {
            *final_progress = Some(Box::new(report(
                4,
                10.0,
                0,
                "2026-11-21T09:00:00.000Z",
                "2026-11-21T10:00:02.000Z",
            )));
        }
        let status = compute(
            &q,
            &Observed {
                workload: done,
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(status.phase, Some(Phase::Completed));
        assert_eq!(status.job.as_deref(), Some("fraud-1a2b3c4d"));
        assert_eq!(status.progress.as_ref().unwrap().batch_id, Some(4));
        assert_eq!(get(&status, "Degraded").status, "False");
    }

    #[test]
    fn a_job_past_its_backoff_limit_failed_with_the_last_error() {
        let q = query("");
        let status = compute(
            &q,
            &Observed {
                workload: job(
                    serde_json::json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                        "message": "Job has reached the specified backoff limit"}]),
                    7,
                ),
                pod_failure: Some("pod fraud-x failed: exit code 1: error: boom".into()),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        let degraded = get(&status, "Degraded");
        assert_eq!(degraded.reason, "RestartLimitExceeded");
        assert!(
            degraded.message.starts_with("The Job fraud-1a2b3c4d failed (7 failed runs, spec.restartPolicy.maxRestarts 6: Job has reached the specified backoff limit); last error: pod fraud-x failed: exit code 1: error: boom."),
            "{}",
            degraded.message
        );
        let failures = status.failures.unwrap();
        assert_eq!((failures.restarts, failures.gave_up), (7, true));
    }

    #[test]
    fn a_stalled_engine_and_a_refused_apply_are_degraded_with_why() {
        let q = query("");
        let stalled = compute(
            &q,
            &Observed {
                workload: sts(2, 2),
                stalled: Some("pod fraud-0: stalled: no batch completed for 600s".into()),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(stalled.phase, Some(Phase::Running));
        assert_eq!(get(&stalled, "Degraded").reason, "Stalled");
        assert_eq!(
            stalled.last_error.as_deref(),
            Some("pod fraud-0: stalled: no batch completed for 600s")
        );
        let refused = compute(
            &q,
            &Observed {
                workload: sts(2, 2),
                apply_error: Some("StatefulSet fraud: field is immutable".into()),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(refused.phase, Some(Phase::Failed));
        assert_eq!(
            get(&refused, "Degraded").message,
            "The API server refused the change: StatefulSet fraud: field is immutable"
        );
        assert_eq!(get(&refused, "Ready").status, "True");
    }

    #[test]
    fn zero_replicas_is_suspended_and_says_why() {
        let q = sluice_crds::parse(&QUERY.replace("replicas: 2", "replicas: 0"), "test").unwrap();
        let status = compute(
            &q,
            &Observed {
                workload: sts(0, 0),
                ..Observed::default()
            },
            at(0),
        );
        assert_eq!(status.phase, Some(Phase::Suspended));
        let ready = get(&status, "Ready");
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (
                "ScaledToZero",
                "spec.replicas is 0; its checkpoint is kept."
            )
        );
    }

    #[test]
    fn the_final_progress_is_read_from_a_succeeded_pods_termination_message() {
        let progress = serde_json::to_string(&report(
            3,
            1.0,
            0,
            "2026-11-21T09:00:00.000Z",
            "2026-11-21T10:00:00.000Z",
        ))
        .unwrap();
        let done = pod(
            "q-1",
            serde_json::json!({"phase": "Succeeded", "containerStatuses": [{
                "name": "engine", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": progress}}}]}),
        );
        let failed = pod(
            "q-0",
            serde_json::json!({"phase": "Failed", "containerStatuses": [{
                "name": "engine", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "message": "INFO x\nerror: boom\n"}}}]}),
        );
        let pods = [failed, done];
        assert_eq!(final_progress(&pods).unwrap().batch_id, 3);
        assert_eq!(
            pod_failure(&pods).unwrap(),
            "pod q-0 failed: exit code 1: error: boom"
        );
    }

    #[test]
    fn progress_is_new_when_its_latest_batch_is() {
        let fresh = [report(
            3,
            1.0,
            0,
            "2026-11-21T09:00:00.000Z",
            "2026-11-21T10:00:05.000Z",
        )];
        assert!(progressed(None, &fresh));
        let before = summarize(&fresh).unwrap();
        assert!(!progressed(Some(&before), &fresh));
        assert!(!progressed(Some(&before), &[]));
        let later = [report(
            4,
            1.0,
            0,
            "2026-11-21T09:00:00.000Z",
            "2026-11-21T10:00:06.000Z",
        )];
        assert!(progressed(Some(&before), &later));
    }
}
