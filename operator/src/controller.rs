//! The controller: reconciles each `StreamingQuery` into its ConfigMap,
//! headless Service, PodDisruptionBudget and StatefulSet of engine pods, and
//! writes the status. The decisions are pure functions in [`crate::objects`],
//! [`crate::status`] and [`crate::changes`]; this module makes the API calls.
//!
//! Every write is a server-side apply under one field manager, and only
//! happens when the object on the server does not already hold what would be
//! written, so a reconcile with nothing changed writes nothing.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_crds::{API_VERSION, KIND, Phase, StreamingQuery, StreamingQuerySpec};

use crate::metrics::Metrics;
use crate::objects::{self, Defaults, QUERY_FILE};
use crate::progress::ProgressReader;
use crate::status::{self, Observed};
use crate::{Error, Result, changes};

/// The field manager of every write, and the Events' reporting controller.
pub const MANAGER: &str = "sluice-operator";
/// The finalizer that stops the engine pods before a query's objects go.
pub const FINALIZER: &str = "sluice.dev/stop-engine-pods";
/// The annotation holding a hash of what the operator last applied to an
/// object: a field the operator stops setting changes it, so the next apply
/// removes that field.
pub const APPLIED_HASH: &str = "sluice.dev/applied-hash";
/// The label every owned object carries; the controller watches only these.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=sluice-operator";

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The operator's configuration beyond each query's spec.
    pub defaults: Defaults,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events on the StreamingQuery.
    pub recorder: Recorder,
    /// Reads the engine pods' progress.
    pub progress: ProgressReader,
    /// Consecutive failed reconciles per query, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context over `client`; `instance` names this operator replica in
    /// Events (its pod name).
    pub fn new(
        client: Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            progress: ProgressReader::new(objects::HTTP_PORT as u16),
            failures: Mutex::default(),
        }
    }

    async fn publish(&self, query: &StreamingQuery, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &query.object_ref(&())).await {
            // An Event is a courtesy: failing to record one fails nothing.
            tracing::warn!(query = %key(query), error = %e, "cannot publish an Event");
        }
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
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    Ok(action)
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
    tracing::warn!(query = %key(&query), error = %error, retry_in = ?delay, "reconcile failed");
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

async fn apply(query: &StreamingQuery, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(query)?;
    let name = query.name_any();
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let mut observed = Observed::default();
    let mut applied = Vec::new();

    let desired_cm = objects::config_map(query)?;
    let existing_cm = config_maps.get_opt(&desired_cm.name_any()).await?;
    let refused = existing_cm
        .as_ref()
        .and_then(applied_spec)
        .and_then(|before| changes::refused(&before, &query.spec));
    let stateful_set = if let Err(problems) = sluice_crds::validate(query) {
        // Nothing is applied: a new query gets no pods, a running one keeps
        // running its last valid spec.
        observed.problems = Some(problems);
        stateful_sets.get_opt(&name).await?
    } else if let Some(why) = refused {
        observed.refused_change = Some(why);
        stateful_sets.get_opt(&name).await?
    } else {
        ensure(&config_maps, desired_cm, existing_cm, &mut applied).await?;
        let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
        ensure_current(&services, objects::service(query)?, &mut applied).await?;
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
        ensure_current(
            &budgets,
            objects::pod_disruption_budget(query)?,
            &mut applied,
        )
        .await?;
        let desired = objects::stateful_set(query, &ctx.defaults)?;
        Some(ensure_current(&stateful_sets, desired, &mut applied).await?)
    };

    let pods = match &stateful_set {
        Some(_) => engine_pods(ctx, query).await?,
        None => Vec::new(),
    };
    observed.stateful_set = stateful_set.and_then(|s| s.status);
    observed.pod_failure = status::pod_failure(&pods);
    observed.progress = ctx.progress.read(&pods).await;
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
    }
    if !applied.is_empty() {
        ctx.publish(
            query,
            false,
            "Applied",
            format!("Applied {}.", applied.join(", ")),
        )
        .await;
    }
    for t in status::transitions(query.status.as_ref(), &new_status) {
        ctx.publish(query, t.warning, &t.reason, t.note).await;
    }
    ctx.metrics.set_phase(&key(query), new_status.phase);
    ctx.failures
        .lock()
        .expect("not poisoned")
        .remove(&key(query));

    let settled = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "False");
    Ok(Action::requeue(match new_status.phase {
        // Progress moves: refresh it.
        Some(Phase::Running) if settled => Duration::from_secs(30),
        // Pods starting, rolling or stopping: look again soon.
        Some(Phase::Running | Phase::Pending | Phase::Suspended) if !settled => {
            Duration::from_secs(10)
        }
        // Changes to the query or its objects wake the controller anyway.
        _ => Duration::from_secs(300),
    }))
}

/// Stops the engine pods (the StatefulSet scaled to zero) and waits until
/// they are gone; then the finalizer goes, and with it, through the owner
/// references, the query's objects. The checkpoint is kept: a query created
/// again with the same `checkpoint.location` resumes from it.
async fn cleanup(query: &StreamingQuery, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(query)?;
    let stateful_sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(sts) = stateful_sets.get_opt(&query.name_any()).await?
        && sts.spec.replicas != Some(0)
    {
        let mut stopping = query.clone();
        stopping.spec.suspend = Some(true);
        let desired = objects::stateful_set(&stopping, &ctx.defaults)?;
        ensure(&stateful_sets, desired, Some(sts), &mut Vec::new()).await?;
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
    let running = engine_pods(ctx, query).await?.len();
    if running > 0 {
        return Err(Error::Waiting(format!(
            "{running} engine pod(s) of {} still running",
            key(query)
        )));
    }
    ctx.metrics.set_phase(&key(query), None);
    Ok(Action::await_change())
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

/// [`ensure`], reading the object's current state first.
async fn ensure_current<K>(api: &Api<K>, desired: K, applied: &mut Vec<String>) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let existing = api.get_opt(&desired.name_any()).await?;
    ensure(api, desired, existing, applied).await
}

/// Applies `desired` (server-side, under [`MANAGER`]) unless `existing`
/// already holds every field of it, including the [`APPLIED_HASH`] of what
/// would be applied; returns the object as it now is on the server.
async fn ensure<K>(
    api: &Api<K>,
    mut desired: K,
    existing: Option<K>,
    applied: &mut Vec<String>,
) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let hash = objects::fnv1a(&serde_json::to_string(&desired)?);
    desired
        .annotations_mut()
        .insert(APPLIED_HASH.to_owned(), hash);
    let body = serde_json::to_value(&desired)?;
    if let Some(existing) = existing
        && covers(&serde_json::to_value(&existing)?, &body)
    {
        return Ok(existing);
    }
    let name = desired.name_any();
    let out = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    applied.push(format!("{} {name}", K::kind(&())));
    Ok(out)
}

/// Whether `existing` holds every field `desired` sets, with the same value
/// (fields the API server defaulted are ignored).
pub fn covers(existing: &Value, desired: &Value) -> bool {
    match (existing, desired) {
        (Value::Object(e), Value::Object(d)) => d
            .iter()
            .all(|(k, v)| e.get(k).is_some_and(|ev| covers(ev, v))),
        (Value::Array(e), Value::Array(d)) => {
            e.len() == d.len() && e.iter().zip(d).all(|(ev, dv)| covers(ev, dv))
        }
        (e, d) => e == d,
    }
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
    let owned = watcher::Config::default().labels(MANAGED_BY);
    Controller::new(queries, watcher::Config::default().any_semantic())
        .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
        .owns(api::<ConfigMap>(&client, &namespace), owned.clone())
        .owns(api::<Service>(&client, &namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(query = %object, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
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
    fn server_defaults_do_not_count_as_a_difference() {
        let desired = serde_json::json!({"spec": {"ports": [{"port": 9464}], "clusterIP": "None"}});
        let existing = serde_json::json!({
            "spec": {"ports": [{"port": 9464, "protocol": "TCP"}], "clusterIP": "None", "type": "ClusterIP"},
            "status": {},
        });
        assert!(covers(&existing, &desired));
        let changed = serde_json::json!({"spec": {"ports": [{"port": 9465}], "clusterIP": "None"}});
        assert!(!covers(&existing, &changed));
        let more = serde_json::json!({"spec": {"ports": [{"port": 9464}, {"port": 1}]}});
        assert!(!covers(&existing, &more));
    }
}
