//! The reconciler against a scripted API server: one scenario per expected
//! call sequence (create, no-op, spec change, suspend and resume, invalid
//! spec, refused change, deletion through the finalizer). Each scenario
//! fails on a call it did not expect and on an expected call that never
//! comes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sluice_crds::StreamingQuery;
use sluice_operator::Error;
use sluice_operator::controller::{APPLIED_HASH, Context, FINALIZER, reconcile};
use sluice_operator::metrics::Metrics;
use sluice_operator::objects::{Defaults, SPEC_HASH_ANNOTATION};

use crate::api_server::{ApiServer, pair};

const NS: &str = "risk";
const QUERY: &str = "/apis/sluice.dev/v1alpha1/namespaces/risk/streamingqueries/fraud";
const STATUS: &str = "/apis/sluice.dev/v1alpha1/namespaces/risk/streamingqueries/fraud/status";
const CM: &str = "/api/v1/namespaces/risk/configmaps/fraud-query";
const SVC: &str = "/api/v1/namespaces/risk/services/fraud";
const PDB: &str = "/apis/policy/v1/namespaces/risk/poddisruptionbudgets/fraud";
const STS: &str = "/apis/apps/v1/namespaces/risk/statefulsets/fraud";
const PODS: &str = "/api/v1/namespaces/risk/pods";

/// The query of every scenario, with the operator's finalizer already on.
fn query() -> StreamingQuery {
    sluice_crds::load(
        &format!(
            r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata:
  name: fraud
  namespace: risk
  uid: 7c9e6679-7425-40de-944b-e07fc1f90ae7
  generation: 1
  finalizers: [{FINALIZER}]
spec:
  sources: [{{name: transactions, generator: {{kind: transactions, rowsPerSecond: 100}}}}]
  query: SELECT user_id, amount FROM transactions WHERE amount > 100
  sink: {{console: {{}}}}
  checkpoint: {{location: "s3://checkpoints/fraud"}}
"#
        ),
        "test",
    )
    .unwrap()
}

/// `query()` changed by `change`.
fn query_with(change: impl FnOnce(&mut StreamingQuery)) -> StreamingQuery {
    let mut q = query();
    change(&mut q);
    q
}

/// Runs `reconcile` on `query` against the scripted API server `scenario`,
/// which must see every call it expects and no other.
async fn reconcile_with<T, F, Fut>(query: StreamingQuery, scenario: F) -> (Result<Action, Error>, T)
where
    T: Send + 'static,
    F: FnOnce(ApiServer) -> Fut,
    Fut: Future<Output = (ApiServer, T)> + Send + 'static,
{
    let (client, api) = pair();
    let ctx = Arc::new(Context::new(
        client,
        Defaults {
            engine_image: "sluice:test".into(),
        },
        Arc::new(Metrics::default()),
        Some("sluice-operator-0".into()),
    ));
    let scenario = scenario(api);
    let server = tokio::spawn(async move {
        let (api, out) = scenario.await;
        api.done().await;
        out
    });
    let result = tokio::time::timeout(Duration::from_secs(20), reconcile(Arc::new(query), ctx))
        .await
        .expect("reconcile finished");
    let out = match server.await {
        Ok(out) => out,
        Err(e) => {
            eprintln!("the reconcile ended with {result:?}");
            std::panic::resume_unwind(e.into_panic())
        }
    };
    (result, out)
}

/// What the operator applied, as the API server keeps it.
#[derive(Clone)]
struct Cluster {
    cm: Value,
    svc: Value,
    pdb: Value,
    sts: Value,
    status: Value,
}

impl Cluster {
    /// Answers the reads of a reconcile that does not rewrite the ConfigMap:
    /// the ConfigMap, Service and PDB as applied, then the StatefulSet `sts`
    /// with `status`.
    async fn serve_reads(&self, api: &mut ApiServer, sts: &Value, status: Value) {
        api.get(CM, Some(&stored(&self.cm, None))).await;
        api.get(SVC, Some(&stored(&self.svc, None))).await;
        api.get(PDB, Some(&stored(&self.pdb, None))).await;
        api.get(STS, Some(&stored(sts, Some(status)))).await;
    }
}

/// An applied object as the API server returns it: with a resourceVersion,
/// defaulted fields and, for the StatefulSet, `status`.
fn stored(applied: &Value, status: Option<Value>) -> Value {
    let mut object = applied.clone();
    object["metadata"]["resourceVersion"] = json!("17");
    object["metadata"]["uid"] = json!("0000-1111");
    object["metadata"]["managedFields"] =
        json!([{"manager": "sluice-operator", "operation": "Apply"}]);
    if object["kind"] == "Service" {
        object["spec"]["type"] = json!("ClusterIP");
        object["spec"]["ports"][0]["protocol"] = json!("TCP");
    }
    if object["kind"] == "StatefulSet" {
        object["spec"]["revisionHistoryLimit"] = json!(10);
    }
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn sts_status(replicas: i32, ready: i32, updated: i32) -> Value {
    json!({"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
           "availableReplicas": ready, "currentReplicas": replicas})
}

/// `query` carrying the status the operator last wrote.
fn with_status(mut query: StreamingQuery, status: &Value) -> StreamingQuery {
    query.status = Some(serde_json::from_value(status.clone()).unwrap());
    query
}

/// Answers the status apply and returns the status written.
async fn apply_status(api: &mut ApiServer) -> Value {
    let stored = serde_json::to_value(query()).unwrap();
    api.apply_onto(STATUS, stored).await.body["status"].clone()
}

fn requeue(seconds: u64) -> Action {
    Action::requeue(Duration::from_secs(seconds))
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

/// The first reconcile of a new query: every object is created, the status
/// says Pending. Returns what was applied and the Events.
async fn create() -> (Cluster, Vec<(String, String, String)>) {
    let (result, out) = reconcile_with(query(), |mut api| async move {
        api.get(CM, None).await;
        let cm = api.apply(CM).await.body;
        api.get(SVC, None).await;
        let svc = api.apply(SVC).await.body;
        api.get(PDB, None).await;
        let pdb = api.apply(PDB).await.body;
        api.get(STS, None).await;
        let sts = api.apply(STS).await.body;
        let pods = api.list(PODS, vec![]).await;
        assert!(
            pods.query
                .contains("labelSelector=app.kubernetes.io%2Finstance%3Dfraud"),
            "{}",
            pods.query
        );
        let status = apply_status(&mut api).await;
        let events = vec![api.event(NS).await, api.event(NS).await];
        let cluster = Cluster {
            cm,
            svc,
            pdb,
            sts,
            status,
        };
        (api, (cluster, events))
    })
    .await;
    assert_eq!(result.unwrap(), requeue(10));
    out
}

/// A query whose pods came up: created, then reconciled once more with its
/// StatefulSet ready (the status turns Running).
async fn running() -> Cluster {
    let (mut cluster, _) = create().await;
    let before = cluster.clone();
    let (result, status) =
        reconcile_with(with_status(query(), &before.status), |mut api| async move {
            before
                .serve_reads(&mut api, &before.sts, sts_status(1, 1, 1))
                .await;
            api.list(PODS, vec![]).await;
            let status = apply_status(&mut api).await;
            let event = api.event(NS).await;
            assert_eq!(event.1, "Running");
            (api, status)
        })
        .await;
    assert_eq!(result.unwrap(), requeue(30));
    cluster.status = status;
    cluster
}

#[tokio::test]
async fn create_adds_the_finalizer_first() {
    let new = query_with(|q| q.metadata.finalizers = None);
    let (result, patch) = reconcile_with(new, |mut api| async move {
        let mut stored = serde_json::to_value(query()).unwrap();
        stored["metadata"]["resourceVersion"] = json!("2");
        let call = api.answer("PATCH", QUERY, 200, stored).await;
        (api, call.body)
    })
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(
        patch
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "add" && op["value"] == json!([FINALIZER])),
        "{patch}"
    );
}

#[tokio::test]
async fn create_applies_every_object_and_reports_pending() {
    let (cluster, events) = create().await;
    // The ConfigMap holds the query the engine runs.
    let manifest = cluster.cm["data"]["query.yaml"].as_str().unwrap();
    assert!(manifest.contains("SELECT user_id, amount FROM transactions WHERE amount > 100"));
    // Every object is owned by the query and carries the applied hash.
    for object in [&cluster.cm, &cluster.svc, &cluster.pdb, &cluster.sts] {
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["name"]),
            (&json!("StreamingQuery"), &json!("fraud"))
        );
        assert!(object["metadata"]["annotations"][APPLIED_HASH].is_string());
    }
    assert_eq!(cluster.sts["spec"]["replicas"], 1);
    assert_eq!(cluster.status["phase"], "Pending");
    assert_eq!(cluster.status["observedGeneration"], 1);
    assert_eq!(condition(&cluster.status, "Ready")["reason"], "Starting");
    assert_eq!(
        events,
        [
            (
                "Normal".into(),
                "Applied".into(),
                "Applied ConfigMap fraud-query, Service fraud, PodDisruptionBudget fraud, StatefulSet fraud.".into()
            ),
            ("Normal".into(), "Pending".into(), "0/1 engine pods ready.".into()),
        ]
    );
}

#[tokio::test]
async fn a_reconcile_with_nothing_changed_writes_nothing() {
    let cluster = running().await;
    assert_eq!(cluster.status["phase"], "Running");
    let (result, ()) = reconcile_with(
        with_status(query(), &cluster.status),
        |mut api| async move {
            cluster
                .serve_reads(&mut api, &cluster.sts, sts_status(1, 1, 1))
                .await;
            api.list(PODS, vec![]).await;
            // No apply, no status write, no Event: `done` fails on any call.
            (api, ())
        },
    )
    .await;
    assert_eq!(result.unwrap(), requeue(30));
}

#[tokio::test]
async fn a_spec_change_rolls_the_pods_and_keeps_the_checkpoint() {
    let cluster = running().await;
    let changed = with_status(
        query_with(|q| {
            q.spec.query = "SELECT user_id, amount FROM transactions WHERE amount > 500".into();
            q.metadata.generation = Some(2);
        }),
        &cluster.status,
    );
    let before = cluster.clone();
    let (result, (cm, sts, status, event)) = reconcile_with(changed, |mut api| async move {
        let cluster = before;
        api.get(CM, Some(&stored(&cluster.cm, None))).await;
        let cm = api.apply(CM).await.body;
        api.get(SVC, Some(&stored(&cluster.svc, None))).await;
        api.get(PDB, Some(&stored(&cluster.pdb, None))).await;
        api.get(STS, Some(&stored(&cluster.sts, Some(sts_status(1, 1, 1)))))
            .await;
        let sts = api
            .apply_onto(STS, stored(&cluster.sts, Some(sts_status(1, 1, 0))))
            .await
            .body;
        api.list(PODS, vec![]).await;
        let status = apply_status(&mut api).await;
        let event = api.event(NS).await;
        (api, (cm, sts, status, event))
    })
    .await;
    assert!(result.is_ok());
    assert!(
        cm["data"]["query.yaml"]
            .as_str()
            .unwrap()
            .contains("amount > 500")
    );
    let hash = |sts: &Value| {
        sts["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION].clone()
    };
    assert_ne!(
        hash(&sts),
        hash(&cluster.sts),
        "a new pod template rolls the pods"
    );
    assert_eq!(
        sts["spec"]["template"]["spec"],
        cluster.sts["spec"]["template"]["spec"]
    );
    assert!(
        cm["data"]["query.yaml"]
            .as_str()
            .unwrap()
            .contains("s3://checkpoints/fraud")
    );
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(condition(&status, "Progressing")["reason"], "RollingOut");
    assert_eq!(event.2, "Applied ConfigMap fraud-query, StatefulSet fraud.");
}

#[tokio::test]
async fn suspend_stops_the_pods_and_resume_starts_them_without_a_roll() {
    let cluster = running().await;
    let suspended = with_status(query_with(|q| q.spec.suspend = Some(true)), &cluster.status);
    let before = cluster.clone();
    let (result, (sts, status, events)) = reconcile_with(suspended, |mut api| async move {
        // The ConfigMap does not hold `suspend`: it is not rewritten.
        before
            .serve_reads(&mut api, &before.sts, sts_status(1, 1, 1))
            .await;
        let sts = api
            .apply_onto(STS, stored(&before.sts, Some(sts_status(1, 1, 1))))
            .await
            .body;
        api.list(PODS, vec![]).await;
        let status = apply_status(&mut api).await;
        let events = vec![api.event(NS).await, api.event(NS).await];
        (api, (sts, status, events))
    })
    .await;
    assert_eq!(result.unwrap(), requeue(10));
    assert_eq!(sts["spec"]["replicas"], 0);
    assert_eq!(sts["spec"]["template"], cluster.sts["spec"]["template"]);
    assert_eq!(status["phase"], "Suspended");
    assert_eq!(events[1].1, "Suspended");

    // Resume: the pods come back, with the same template (no roll).
    let resumed = with_status(query(), &status);
    let stopped = cluster.clone();
    let (result, sts) = reconcile_with(resumed, |mut api| async move {
        stopped
            .serve_reads(&mut api, &sts, sts_status(0, 0, 0))
            .await;
        let sts = api
            .apply_onto(STS, stored(&sts, Some(sts_status(0, 0, 0))))
            .await
            .body;
        api.list(PODS, vec![]).await;
        let status = apply_status(&mut api).await;
        assert_eq!(status["phase"], "Pending");
        api.event(NS).await;
        assert_eq!(api.event(NS).await.1, "Pending");
        (api, sts)
    })
    .await;
    assert!(result.is_ok());
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["spec"]["template"], cluster.sts["spec"]["template"]);
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_with_every_field_path_and_gets_no_pods() {
    let invalid = query_with(|q| {
        q.spec.query = "SELECT * FROM payments".into();
        q.spec.state_partitions = Some(0);
    });
    let (result, (status, event)) = reconcile_with(invalid, |mut api| async move {
        api.get(CM, None).await;
        api.get(STS, None).await;
        // No object is applied and no pods are listed: there are none.
        let status = apply_status(&mut api).await;
        let event = api.event(NS).await;
        (api, (status, event))
    })
    .await;
    assert_eq!(result.unwrap(), requeue(300));
    assert_eq!(status["phase"], "Failed");
    let degraded = condition(&status, "Degraded");
    assert_eq!(
        (&degraded["status"], &degraded["reason"]),
        (&json!("True"), &json!("InvalidSpec"))
    );
    let message = degraded["message"].as_str().unwrap();
    assert!(message.contains("spec.query"), "{message}");
    assert!(message.contains("payments"), "{message}");
    assert!(message.contains("spec.statePartitions"), "{message}");
    assert_eq!((event.0.as_str(), event.1.as_str()), ("Warning", "Failed"));
    assert_eq!(event.2, message);
}

#[tokio::test]
async fn a_change_the_checkpoint_cannot_take_is_refused_and_nothing_is_applied() {
    let cluster = running().await;
    let breaking = with_status(
        query_with(|q| {
            q.spec.state_partitions = Some(32);
            q.metadata.generation = Some(2);
        }),
        &cluster.status,
    );
    let (result, (status, event)) = reconcile_with(breaking, |mut api| async move {
        api.get(CM, Some(&stored(&cluster.cm, None))).await;
        api.get(STS, Some(&stored(&cluster.sts, Some(sts_status(1, 1, 1)))))
            .await;
        api.list(PODS, vec![]).await;
        let status = apply_status(&mut api).await;
        let event = api.event(NS).await;
        (api, (status, event))
    })
    .await;
    assert!(result.is_ok());
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "ChangeRefused");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.statePartitions: the checkpoint at s3://checkpoints/fraud splits state into 16 partitions"),
        "{degraded}"
    );
    // The pods keep running the previous spec.
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!((event.0.as_str(), event.1.as_str()), ("Warning", "Failed"));
}

#[tokio::test]
async fn deletion_stops_the_pods_before_the_finalizer_goes() {
    let cluster = running().await;
    let deleting = with_status(
        query_with(|q| {
            q.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-11-21T10:00:00Z".parse().unwrap(),
                ));
        }),
        &cluster.status,
    );
    let pod =
        json!({"metadata": {"name": "fraud-0", "namespace": NS}, "status": {"phase": "Running"}});
    let running_sts = stored(&cluster.sts, Some(sts_status(1, 1, 1)));
    let (result, stopped) = reconcile_with(deleting.clone(), |mut api| async move {
        api.get(STS, Some(&running_sts)).await;
        let stopped = api.apply(STS).await.body;
        let event = api.event(NS).await;
        assert_eq!(
            event.2,
            "Stopping the engine pods before the query is deleted; the checkpoint at s3://checkpoints/fraud is kept."
        );
        api.list(PODS, vec![pod]).await;
        (api, stopped)
    })
    .await;
    assert_eq!(stopped["spec"]["replicas"], 0);
    let error = result.unwrap_err();
    assert!(error.is_waiting(), "{error}");

    // The pods are gone: the finalizer is removed, and the owner references
    // let Kubernetes delete the objects.
    let (result, patch) = reconcile_with(deleting, |mut api| async move {
        api.get(STS, Some(&stored(&stopped, Some(sts_status(0, 0, 0)))))
            .await;
        api.list(PODS, vec![]).await;
        let mut gone = serde_json::to_value(query()).unwrap();
        gone["metadata"]["finalizers"] = json!([]);
        let call = api.answer("PATCH", QUERY, 200, gone).await;
        (api, call.body)
    })
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(
        patch
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "remove"),
        "{patch}"
    );
}
