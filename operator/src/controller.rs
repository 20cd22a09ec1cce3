//! The controller: reconciles each `StreamingQuery` into its ConfigMap,
//! headless Service, PodDisruptionBudget and the controller of its engine
//! pods — a StatefulSet for a continuous query, a Job for an `availableNow`
//! one — and writes the status. The decisions are pure functions in
//! [`crate::objects`], [`crate::status`], [`crate::lifecycle`] and
//! [`crate::changes`]; this module makes the API calls.
//!
//! What wakes a reconcile: a new generation of a query, its finalizers or
//! its restart annotation (not its status: the operator's own status writes
//! would wake it in a loop); any change of an object it owns or of an engine
//! pod; and its own timer, which polls the engine pods' progress at most
//! every [`Settings::progress_interval`].
//!
//! Every desired object is written with a plain server-side apply under one
//! field manager: the API server decides what changed. An apply the server
//! already answered is not sent again while the object keeps the
//! `resourceVersion` that answer gave it and the desired body is the same,
//! so a reconcile with nothing changed makes no write request at all. The
//! server's refusal of an apply (an immutable field) is reported in the
//! status and an Event, with the server's message.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalized, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_crds::{API_VERSION, KIND, Phase, StreamingQuery, StreamingQuerySpec};

use crate::autoscaler::scaler;
use crate::events::Events;
use crate::lifecycle::{self, Run, Seen};
use crate::metrics::Metrics;
use crate::objects::{self, Defaults, QUERY_FILE, RESTARTED_AT};
use crate::progress::{self, ProgressReader};
use crate::status::{self, Observed, Workload};
use crate::{Error, Result, changes};

/// The field manager of every write, and the Events' reporting controller.
pub const MANAGER: &str = "sluice-operator";
/// The finalizer that stops the engine pods before a query's objects go.
pub const FINALIZER: &str = "sluice.dev/stop-engine-pods";
/// The label every owned object carries; the controller watches only these.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=sluice-operator";

/// How often and how long the controller waits.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The engine pods' progress (and health) is read at most this often
    /// per query, and at least this often while they run.
    pub progress_interval: Duration,
    /// How long the cleanup of a deleted query waits for its engine pods to
    /// stop before it gives up (an Event names the pods that block) and
    /// lets the query go.
    pub deletion_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            progress_interval: Duration::from_secs(30),
            deletion_timeout: Duration::from_secs(300),
        }
    }
}

/// The body of an object's last apply and the `resourceVersion` the server
/// answered it with.
type Applied = (Value, String);

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The operator's configuration beyond each query's spec.
    pub defaults: Defaults,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events on the StreamingQuery.
    pub events: Events,
    /// Reads the engine pods' progress.
    pub progress: ProgressReader,
    /// Intervals and timeouts.
    pub settings: Settings,
    /// Per query: consecutive failed reconciles, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per query, per object: its last apply.
    applied: Mutex<HashMap<String, HashMap<String, Applied>>>,
    /// Per query: when its engine pods' progress was last read.
    polled: Mutex<HashMap<String, Instant>>,
    /// Per query being deleted: when its cleanup started waiting.
    deleting: Mutex<HashMap<String, Instant>>,
    /// The engine runs seen and the pod each was first seen in (see
    /// [`progress::drop_foreign`]).
    runs: Mutex<std::collections::VecDeque<(String, String)>>,
    /// Per autoscaled query: what the autoscaler remembers between steps.
    autoscaler: Mutex<HashMap<String, scaler::Memory>>,
}

impl Context {
    /// A context over `client`, with the default [`Settings`]; `instance`
    /// names this operator replica in Events (its pod name).
    pub fn new(
        client: Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let instance = instance.unwrap_or_else(|| MANAGER.to_owned());
        Context {
            events: Events::new(client.clone(), MANAGER, &instance),
            client,
            defaults,
            metrics,
            progress: ProgressReader::new(objects::HTTP_PORT as u16),
            settings: Settings::default(),
            failures: Mutex::default(),
            applied: Mutex::default(),
            polled: Mutex::default(),
            deleting: Mutex::default(),
            runs: Mutex::default(),
            autoscaler: Mutex::default(),
        }
    }

    /// This context with `settings`.
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    async fn publish(&self, query: &StreamingQuery, warning: bool, reason: &str, note: String) {
        let regarding = query.object_ref(&());
        if let Err(e) = self
            .events
            .publish(&regarding, warning, reason, &note)
            .await
        {
            // An Event is a courtesy: failing to record one fails nothing.
            tracing::warn!(query = %key(query), error = %e, "Cannot publish an Event.");
        }
    }

    /// Whether the progress of the query `key` is due to be read; if so,
    /// notes that it is read now.
    fn poll_due(&self, key: &str) -> bool {
        let mut polled = self.polled.lock().expect("not poisoned");
        let due = polled
            .get(key)
            .is_none_or(|at| at.elapsed() >= self.settings.progress_interval);
        if due {
            polled.insert(key.to_owned(), Instant::now());
        }
        due
    }

    /// How long until the progress of the query `key` is due (at least 1 s).
    fn next_poll(&self, key: &str) -> Duration {
        let polled = self.polled.lock().expect("not poisoned");
        let since = polled.get(key).map_or(Duration::MAX, Instant::elapsed);
        self.settings
            .progress_interval
            .saturating_sub(since)
            .max(Duration::from_secs(1))
    }

    /// Forgets what was kept about the query `key` (it is gone).
    fn forget(&self, key: &str) {
        self.applied.lock().expect("not poisoned").remove(key);
        self.polled.lock().expect("not poisoned").remove(key);
        self.deleting.lock().expect("not poisoned").remove(key);
        self.failures.lock().expect("not poisoned").remove(key);
        self.autoscaler.lock().expect("not poisoned").remove(key);
        self.metrics.set_autoscaler(key, None);
    }
}

/// The query's namespace (a StreamingQuery is namespaced).
fn namespace_of(query: &StreamingQuery) -> Result<String> {
    query
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))
}

fn key(query: &StreamingQuery) -> String {
    format!(
        "{}/{}",
        query.namespace().unwrap_or_default(),
        query.name_any()
    )
}

/// What of a query wakes its reconcile: its generation (its spec and its
/// deletion), its finalizers and its restart annotation; not its status.
pub fn wakes(query: &StreamingQuery) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    query.metadata.generation.hash(&mut hasher);
    query
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    query.finalizers().hash(&mut hasher);
    query.annotations().get(RESTARTED_AT).hash(&mut hasher);
    Some(hasher.finish())
}

/// Reconciles one query: through the finalizer, the apply path while it
/// exists and the cleanup path once it is being deleted.
pub async fn reconcile(query: Arc<StreamingQuery>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.duration.start_timer();
    ctx.metrics.reconciles.inc();
    let namespace = namespace_of(&query)?;
    let api: Api<StreamingQuery> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, query, |event| async {
        match event {
            Finalized::Apply(q) => apply(&q, &ctx).await,
            Finalized::Cleanup(q) => cleanup(&q, &ctx).await,
        }
    })
    .await;
    match action {
        // NB: a reconcile queued before the query went sees it from the
        // cache, still with its finalizer: it is gone, as wanted.
        Err(FinalizerError::RemoveFinalizer(kube::Error::Api(status))) if status.code == 404 => {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

/// After a failed reconcile: counts the error by reason and retries with
/// exponential backoff per query (5 s, doubling, at most 5 min); a cleanup
/// waiting for pods to stop is retried every 2 s and is not an error.
pub fn error_policy(query: Arc<StreamingQuery>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_waiting() {
        tracing::info!(query = %key(&query), "{error}");
        return Action::requeue(Duration::from_secs(2));
    }
    ctx.metrics
        .errors
        .with_label_values(&[error.metric_label()])
        .inc();
    let failures = {
        let mut map = ctx.failures.lock().expect("not poisoned");
        let n = map.entry(key(&query)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(query = %key(&query), error = %error, retry_in = ?delay, "Reconcile failed.");
    Action::requeue(delay)
}

/// The delay before retry `n` (1-based) of a failing reconcile.
pub fn backoff(n: u32) -> Duration {
    let seconds = 5u64.saturating_mul(1 << n.saturating_sub(1).min(16));
    Duration::from_secs(seconds.min(300))
}

/// The spec the engine pods run now, from the query's ConfigMap.
fn applied_spec(cm: &ConfigMap) -> Option<StreamingQuerySpec> {
    let text = cm.data.as_ref()?.get(QUERY_FILE)?;
    sluice_crds::load(text, "ConfigMap").ok().map(|q| q.spec)
}

/// Whether `pod` is owned by the `kind` named `name`.
fn owned_by(pod: &Pod, kind: &str, name: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.kind == kind && o.name == name)
}

/// What one reconcile wrote, and what the server refused.
#[derive(Default)]
struct Writes {
    /// The objects whose apply changed them, `Kind name`.
    changed: Vec<String>,
    /// The first apply the server refused: `Kind name: message`.
    refused: Option<String>,
}

async fn apply(query: &StreamingQuery, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(query)?;
    let name = query.name_any();
    let query_key = key(query);
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    let companions = Companions {
        config_maps: &config_maps,
        services: &services,
        budgets: &budgets,
    };
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let mut observed = Observed::default();
    let mut writes = Writes::default();

    let existing_cm = config_maps.get_opt(&format!("{name}-query")).await?;
    let running_spec = existing_cm.as_ref().and_then(applied_spec);
    let existing_sts = stateful_sets.get_opt(&name).await?;
    let selector = objects::label_selector(query);
    let existing_jobs = jobs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let pods = engine_pods(ctx, query).await?;
    let available_now = query.spec.is_available_now();
    let desired_job = if available_now {
        Some(objects::job(query, &ctx.defaults)?)
    } else {
        None
    };
    // The pods of the workload the spec asks for (a Job's, or the
    // StatefulSet's): those whose progress and failures count.
    let workload_pods: Vec<Pod> = pods
        .iter()
        .filter(|p| match &desired_job {
            Some(job) => owned_by(p, "Job", &job.name_any()),
            None => owned_by(p, "StatefulSet", &name),
        })
        .cloned()
        .collect();
    let mut recent = None;
    if ctx.poll_due(&query_key) {
        let autoscaled = objects::autoscaled(query);
        let mut reports = if autoscaled {
            ctx.progress.read_recent(&workload_pods).await
        } else {
            ctx.progress.read(&workload_pods).await
        };
        progress::drop_foreign(
            &mut reports,
            &name,
            &workload_pods,
            &mut ctx.runs.lock().expect("not poisoned"),
        );
        observed.progress = reports.iter().filter_map(|r| r.progress.clone()).collect();
        observed.stalled = progress::stalled(&reports);
        if autoscaled {
            recent = Some(reports.into_iter().filter_map(|r| r.recent).collect());
        }
    }
    observed.pod_failure = status::pod_failure(&workload_pods);

    if let Err(problems) = sluice_crds::validate(query) {
        // Nothing is applied: a new query gets no pods, a running one keeps
        // running its last valid spec.
        observed.problems = Some(problems);
        observed.workload = observe_workload(existing_sts.as_ref(), None, &[]);
    } else if let Some(why) = running_spec
        .as_ref()
        .and_then(|before| changes::refused(before, &query.spec))
    {
        observed.refused_change = Some(why);
        observed.workload = observe_workload(existing_sts.as_ref(), None, &[]);
    } else if let Some(desired) = desired_job {
        // An availableNow query runs as a Job, one per spec: another
        // spec's Job (and a StatefulSet, when the query was continuous)
        // goes.
        let job_name = desired.name_any();
        if existing_sts.is_some() {
            remove(&stateful_sets, &name, &mut writes).await?;
        }
        for old in existing_jobs.iter().filter(|j| j.name_any() != job_name) {
            remove(&jobs, &old.name_any(), &mut writes).await?;
        }
        companions
            .ensure(ctx, query, query, existing_cm, &mut writes)
            .await?;
        let current = existing_jobs.into_iter().find(|j| j.name_any() == job_name);
        let job = ensure(ctx, &jobs, desired, current, &mut writes).await?;
        observed.workload = observe_workload(None, job.as_ref(), &workload_pods);
    } else {
        for old in &existing_jobs {
            remove(&jobs, &old.name_any(), &mut writes).await?;
        }
        let sts_status = existing_sts.as_ref().and_then(|s| s.status.clone());
        let desired = objects::desired_replicas(query);
        let seen = Seen {
            restart_count: lifecycle::restart_count(
                &workload_pods,
                sts_status
                    .as_ref()
                    .and_then(|s| s.update_revision.as_deref()),
            ),
            progressed: status::progressed(
                query.status.as_ref().and_then(|s| s.progress.as_ref()),
                &observed.progress,
            ),
            rolled_out: sts_status.as_ref().is_some_and(|s| {
                desired > 0
                    && s.ready_replicas.unwrap_or(0) >= desired
                    && s.updated_replicas.unwrap_or(0) >= desired
                    && s.current_revision == s.update_revision
            }),
            last_error: observed.pod_failure.clone(),
        };
        let decision = lifecycle::decide(query, &seen);
        let mut target = query.clone();
        if objects::autoscaled(query) && !query.spec.is_suspended() {
            let polled = recent.take();
            let first = query
                .status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .is_none();
            if polled.is_some() || first {
                let step = autoscale(ctx, query, polled, seen.rolled_out).await;
                target.status.get_or_insert_default().autoscaling = Some(step.clone());
                observed.autoscaling = Some(step);
            }
        }
        match &decision.run {
            Run::Current => {}
            Run::Rollback { spec, .. } => target.spec = (**spec).clone(),
            // Keep the failed spec, with no pod running it.
            Run::Stop => target.spec.suspend = Some(true),
        }
        companions
            .ensure(ctx, &target, query, existing_cm, &mut writes)
            .await?;
        let sts = ensure(
            ctx,
            &stateful_sets,
            objects::stateful_set(&target, &ctx.defaults)?,
            existing_sts,
            &mut writes,
        )
        .await?;
        observed.workload = observe_workload(sts.as_ref(), None, &[]);
        observed.decision = Some(decision);
    }
    observed.apply_error = writes.refused.clone();
    let new_status = status::compute(query, &observed, Utc::now());

    if query.status.as_ref() != Some(&new_status) {
        let api: Api<StreamingQuery> = Api::namespaced(client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "status": new_status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.status_writes.inc();
    }
    if !writes.changed.is_empty() {
        ctx.publish(
            query,
            false,
            "Applied",
            format!("Applied {}.", writes.changed.join(", ")),
        )
        .await;
    }
    for t in status::transitions(query.status.as_ref(), &new_status) {
        ctx.publish(query, t.warning, &t.reason, t.note).await;
    }
    ctx.metrics.set_phase(&query_key, new_status.phase);
    ctx.metrics
        .set_autoscaler(&query_key, new_status.autoscaling.as_ref());
    ctx.failures
        .lock()
        .expect("not poisoned")
        .remove(&query_key);

    let settled = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "False");
    let pods_run = new_status.replicas.unwrap_or(0) > 0;
    Ok(Action::requeue(match new_status.phase {
        // Pods starting, rolling or stopping: look again soon (their
        // changes wake the controller anyway).
        Some(Phase::Running | Phase::Pending | Phase::Suspended) if !settled => {
            Duration::from_secs(10).min(ctx.next_poll(&query_key))
        }
        // Progress moves while pods run: poll it. An autoscaled query
        // scaled to zero polls the broker instead.
        _ if pods_run || (objects::autoscaled(query) && !query.spec.is_suspended()) => {
            ctx.next_poll(&query_key)
        }
        // Changes to the query or its objects wake the controller.
        _ => Duration::from_secs(300),
    }))
}

/// One autoscaling step of `query` (see [`scaler`]): from the engine pods'
/// recent reports (`recent`, when they were polled), or from the broker
/// while scaled to zero. A change is announced in an Event and counted.
async fn autoscale(
    ctx: &Context,
    query: &StreamingQuery,
    recent: Option<Vec<Vec<sluice_crds::progress::QueryProgress>>>,
    rolled_out: bool,
) -> sluice_crds::AutoscalingStatus {
    let query_key = key(query);
    let spec = query.spec.autoscaling.clone().unwrap_or_default();
    let previous = query.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let current = objects::running_replicas(query);
    let now = Utc::now();
    let seen = match recent {
        _ if previous.is_some() && current == 0 => {
            let asked = query.clone();
            let answer =
                tokio::task::spawn_blocking(move || crate::broker::waiting_records(&asked))
                    .await
                    .unwrap_or_else(|e| Err(format!("the broker check failed: {e}")));
            scaler::Seen::AtZero(answer)
        }
        None => scaler::Seen::Waiting("no progress read yet".into()),
        Some(_) if !rolled_out => scaler::Seen::Waiting(format!(
            "waiting for the StatefulSet to have {current} ready engine pods of its current template"
        )),
        Some(reports) if reports.len() < current as usize => scaler::Seen::Waiting(format!(
            "{} of {current} engine pods answered with their progress",
            reports.len()
        )),
        Some(reports) => scaler::Seen::Reports(reports),
    };
    let step = {
        let mut memories = ctx.autoscaler.lock().expect("not poisoned");
        let memory = memories.entry(query_key.clone()).or_default();
        memory.set_generation(query.metadata.generation);
        memory.set_keyed(
            query
                .spec
                .sources
                .iter()
                .any(|s| s.kafka.as_ref().is_some_and(|k| k.keyed_by.is_some())),
        );
        memory.pin_by_spec(
            (query.spec.output_mode == sluice_crds::OutputMode::Complete).then(|| {
                "complete mode writes the whole result every batch, which runs on one replica"
                    .to_owned()
            }),
        );
        scaler::step(memory, &spec, previous, query.spec.replicas, seen, now)
    };
    let before = previous.map_or(current, |p| p.replicas);
    if step.replicas != before {
        let direction = if step.replicas > before { "up" } else { "down" };
        ctx.metrics
            .rescales
            .with_label_values(&[&query_key, direction])
            .inc();
        ctx.publish(
            query,
            false,
            "Rescaled",
            format!(
                "The autoscaler scaled the query from {before} to {} replicas: {}",
                step.replicas, step.reason
            ),
        )
        .await;
    }
    step
}

/// The observed workload: the StatefulSet's status, or the Job's with the
/// final progress of its pods.
fn observe_workload(sts: Option<&StatefulSet>, job: Option<&Job>, pods: &[Pod]) -> Workload {
    match (sts, job) {
        (_, Some(job)) => Workload::Job {
            name: job.name_any(),
            status: job.status.clone().unwrap_or_default(),
            final_progress: status::final_progress(pods).map(Box::new),
        },
        (Some(sts), None) => Workload::StatefulSet(sts.status.clone().unwrap_or_default()),
        (None, None) => Workload::None,
    }
}

/// Stops the engine pods (the StatefulSet scaled to zero, the Jobs deleted)
/// and waits until they are gone; then the finalizer goes, and with it,
/// through the owner references, the query's objects. A pod that does not
/// go within [`Settings::deletion_timeout`] (stuck terminating on a node
/// that is gone, a finalizer of another controller) is named in a Warning
/// Event and left behind. The checkpoint is kept: a query created again
/// with the same `checkpoint.location` resumes from it.
async fn cleanup(query: &StreamingQuery, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(query)?;
    let query_key = key(query);
    let started = *ctx
        .deleting
        .lock()
        .expect("not poisoned")
        .entry(query_key.clone())
        .or_insert_with(Instant::now);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut writes = Writes::default();
    if let Some(sts) = stateful_sets.get_opt(&query.name_any()).await?
        && sts.spec.replicas != Some(0)
    {
        let mut stopping = query.clone();
        stopping.spec.suspend = Some(true);
        let desired = objects::stateful_set(&stopping, &ctx.defaults)?;
        ensure(ctx, &stateful_sets, desired, Some(sts), &mut writes).await?;
    }
    let selector = objects::label_selector(query);
    for job in jobs.list(&ListParams::default().labels(&selector)).await? {
        if job.metadata.deletion_timestamp.is_none() {
            remove(&jobs, &job.name_any(), &mut writes).await?;
        }
    }
    if !writes.changed.is_empty() {
        let kept = query
            .spec
            .checkpoint
            .as_ref()
            .map(|c| format!("; the checkpoint at {} is kept", c.location))
            .unwrap_or_default();
        ctx.publish(
            query,
            false,
            "Stopping",
            format!("Stopping the engine pods before the query is deleted{kept}."),
        )
        .await;
    }
    let running: Vec<Pod> = engine_pods(ctx, query)
        .await?
        .into_iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    if running.is_empty() {
        ctx.metrics.set_phase(&query_key, None);
        ctx.forget(&query_key);
        return Ok(Action::await_change());
    }
    let waited = started.elapsed();
    if waited < ctx.settings.deletion_timeout {
        return Err(Error::Waiting(format!(
            "{} engine pod(s) of {query_key} still running",
            running.len()
        )));
    }
    let blocking: Vec<String> = running.iter().map(describe_pod).collect();
    ctx.publish(
        query,
        true,
        "DeletionTimedOut",
        format!(
            "Gave up after {}s waiting for the engine pods to stop: {}. The query and its objects are deleted; delete the pod by hand once its node is back, or force it (kubectl delete pod --force).",
            waited.as_secs(),
            blocking.join("; "),
        ),
    )
    .await;
    tracing::warn!(query = %query_key, pods = %blocking.join("; "), "Gave up waiting for engine pods to stop.");
    ctx.metrics.set_phase(&query_key, None);
    ctx.forget(&query_key);
    Ok(Action::await_change())
}

/// A pod in words, for the Event of a deletion that gave up on it.
fn describe_pod(pod: &Pod) -> String {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "no node".into());
    let mut text = format!("pod {} ({phase} on {node}", pod.name_any());
    if let Some(at) = &pod.metadata.deletion_timestamp {
        text += &format!(", terminating since {}", at.0);
    }
    if !pod.finalizers().is_empty() {
        text += &format!(", finalizers {}", pod.finalizers().join(", "));
    }
    text + ")"
}

async fn engine_pods(ctx: &Context, query: &StreamingQuery) -> Result<Vec<Pod>> {
    let namespace = namespace_of(query)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = objects::label_selector(query);
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Deletes `name` (its pods go with it, in the background).
async fn remove<K>(api: &Api<K>, name: &str, writes: &mut Writes) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            writes
                .changed
                .push(format!("deleted {} {name}", K::kind(&())));
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The objects a query's pods run with, whichever controls them: the
/// ConfigMap of the spec they run, the headless Service and the PDB.
struct Companions<'a> {
    config_maps: &'a Api<ConfigMap>,
    services: &'a Api<Service>,
    budgets: &'a Api<PodDisruptionBudget>,
}

impl Companions<'_> {
    /// Applies them: the ConfigMap from `running` (the spec the pods are to
    /// run, which a rollback or a stop makes differ from `query`'s).
    async fn ensure(
        &self,
        ctx: &Context,
        running: &StreamingQuery,
        query: &StreamingQuery,
        existing_cm: Option<ConfigMap>,
        writes: &mut Writes,
    ) -> Result<()> {
        let config_map = objects::config_map(running)?;
        ensure(ctx, self.config_maps, config_map, existing_cm, writes).await?;
        ensure_current(ctx, self.services, objects::service(query)?, writes).await?;
        let budget = objects::pod_disruption_budget(query)?;
        ensure_current(ctx, self.budgets, budget, writes).await?;
        Ok(())
    }
}

/// [`ensure`], reading the object's current state first.
async fn ensure_current<K>(
    ctx: &Context,
    api: &Api<K>,
    desired: K,
    writes: &mut Writes,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let existing = api.get_opt(&desired.name_any()).await?;
    ensure(ctx, api, desired, existing, writes).await
}

/// Applies `desired` (server-side, under [`MANAGER`]) and returns the object
/// as it now is on the server. The apply is not sent again when `existing`
/// still has the `resourceVersion` the last identical apply got. An apply
/// the server refuses as invalid or forbidden is noted in `writes` (and
/// `existing` returned); other errors fail the reconcile.
async fn ensure<K>(
    ctx: &Context,
    api: &Api<K>,
    desired: K,
    existing: Option<K>,
    writes: &mut Writes,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let kind = K::kind(&()).into_owned();
    let name = desired.name_any();
    let query_key = format!(
        "{}/{}",
        desired.namespace().unwrap_or_default(),
        owner(&desired)
    );
    let object_key = format!("{kind}/{name}");
    let body = serde_json::to_value(&desired)?;
    let existing_version = existing.as_ref().and_then(|e| e.resource_version());
    if let Some(version) = &existing_version {
        let applied = ctx.applied.lock().expect("not poisoned");
        if applied
            .get(&query_key)
            .and_then(|objects| objects.get(&object_key))
            .is_some_and(|(last, answered)| *last == body && answered == version)
        {
            return Ok(existing);
        }
    }
    match api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(object) => {
            let version = object.resource_version().unwrap_or_default();
            if existing_version.as_deref() != Some(version.as_str()) {
                writes.changed.push(format!("{kind} {name}"));
                ctx.metrics.object_writes.with_label_values(&[&kind]).inc();
            }
            ctx.applied
                .lock()
                .expect("not poisoned")
                .entry(query_key)
                .or_default()
                .insert(object_key, (body, version));
            Ok(Some(object))
        }
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 422) => {
            tracing::warn!(%kind, %name, message = %status.message, "The API server refused an apply.");
            writes
                .refused
                .get_or_insert(format!("{kind} {name}: {}", status.message));
            Ok(existing)
        }
        Err(e) => Err(e.into()),
    }
}

/// The name of the query that owns `object` (its controller owner).
fn owner<K: Resource>(object: &K) -> String {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.name.clone())
        .unwrap_or_default()
}

/// Runs the controller over the StreamingQueries of `namespace` (all
/// namespaces when `None`) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = ctx.client.clone();
    let queries: Api<StreamingQuery> = api(&client, &namespace);
    // Fail early, and say why, when the CRD is missing or RBAC forbids.
    queries
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "cannot list StreamingQueries ({e}); is the CRD installed (`sluice-operator crd | kubectl apply -f -`) and may the operator's ServiceAccount list them?"
            ))
        })?;
    let (reader, writer) = reflector::store();
    let triggers = watcher(queries, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(wakes, Default::default());
    let owned = watcher::Config::default().labels(MANAGED_BY);
    Controller::for_stream(triggers, reader)
        .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
        .owns(api::<Job>(&client, &namespace), owned.clone())
        .owns(api::<ConfigMap>(&client, &namespace), owned.clone())
        .owns(api::<Service>(&client, &namespace), owned.clone())
        .owns(
            api::<PodDisruptionBudget>(&client, &namespace),
            owned.clone(),
        )
        // Engine pods belong to the StatefulSet or Job, not to the query:
        // their label names it.
        .watches(api::<Pod>(&client, &namespace), owned, |pod: Pod| {
            let query = pod.labels().get("app.kubernetes.io/instance")?;
            Some(ObjectRef::new(query).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(query = %object, "Reconciled."),
                Err(e) => tracing::debug!(error = %e, "Reconcile error."),
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        let delays: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn only_the_generation_finalizers_and_restart_annotation_wake_a_reconcile() {
        let query = |extra: &str| -> StreamingQuery {
            sluice_crds::parse(
                &format!(
                    "apiVersion: sluice.dev/v1alpha1\nkind: StreamingQuery\nmetadata: {{name: q, generation: 2{extra}}}\nspec:\n  sources: [{{name: t, generator: {{kind: rate, rowsPerSecond: 1}}}}]\n  query: SELECT * FROM t\n  sink: {{console: {{}}}}\n"
                ),
                "test",
            )
            .unwrap()
        };
        let base = wakes(&query(""));
        let mut with_status = query("");
        with_status.status = Some(sluice_crds::StreamingQueryStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        });
        assert_eq!(wakes(&with_status), base, "a status write does not wake it");
        assert_eq!(
            wakes(&query(", labels: {team: a}, resourceVersion: \"9\"")),
            base
        );
        assert_ne!(wakes(&query("").tap_generation(3)), base);
        assert_ne!(wakes(&query(", finalizers: [x]")), base);
        assert_ne!(
            wakes(&query(", annotations: {sluice.dev/restartedAt: now}")),
            base
        );
    }

    trait TapGeneration {
        fn tap_generation(self, generation: i64) -> Self;
    }

    impl TapGeneration for StreamingQuery {
        fn tap_generation(mut self, generation: i64) -> Self {
            self.metadata.generation = Some(generation);
            self
        }
    }
}
