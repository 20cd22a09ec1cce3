//! The reconciler against a scripted API server: one scenario per expected
//! call sequence (create, no-op, spec change, suspend and resume, invalid
//! spec, refused change, an apply the server refuses, too many restarts,
//! rollback, an `availableNow` Job to completion, deletion through the
//! finalizer and its timeout). Each scenario fails on a call it did not
//! expect and on an expected call that never comes. One operator (one
//! `Context`) runs the reconciles of a scenario, as it would in a cluster.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sluice_crds::StreamingQuery;
use sluice_operator::Error;
use sluice_operator::controller::{Context, FINALIZER, Settings, reconcile};
use sluice_operator::metrics::Metrics;
use sluice_operator::objects::{self, Defaults, SPEC_HASH_ANNOTATION};

use crate::api_server::{ApiServer, pair};

const NS: &str = "risk";
const QUERY: &str = "/apis/sluice.dev/v1alpha1/namespaces/risk/streamingqueries/fraud";
const STATUS: &str = "/apis/sluice.dev/v1alpha1/namespaces/risk/streamingqueries/fraud/status";
const CM: &str = "/api/v1/namespaces/risk/configmaps/fraud-query";
const SVC: &str = "/api/v1/namespaces/risk/services/fraud";
const PDB: &str = "/apis/policy/v1/namespaces/risk/poddisruptionbudgets/fraud";
const STS: &str = "/apis/apps/v1/namespaces/risk/statefulsets/fraud";
const JOBS: &str = "/apis/batch/v1/namespaces/risk/jobs";
const PODS: &str = "/api/v1/namespaces/risk/pods";

/// The query of every scenario, with the operator's finalizer already on.
fn query() -> StreamingQuery {
    query_of(
        r#"
  sources: [{name: transactions, generator: {kind: transactions, rowsPerSecond: 100}}]
  query: SELECT user_id, amount FROM transactions WHERE amount > 100
  sink: {console: {}}
  checkpoint: {location: "s3://checkpoints/fraud"}
"#,
    )
}

/// The query `fraud` with `spec` (YAML lines under `spec:`).
fn query_of(spec: &str) -> StreamingQuery {
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
spec:{spec}"#
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

/// One operator replica against a scripted API server.
struct Operator {
    ctx: Arc<Context>,
    api: Option<ApiServer>,
}

impl Operator {
    fn new() -> Self {
        Self::with_settings(Settings::default())
    }

    fn with_settings(settings: Settings) -> Self {
        let (client, api) = pair();
        let ctx = Context::new(
            client,
            Defaults {
                engine_image: "sluice:test".into(),
            },
            Arc::new(Metrics::default()),
            Some("sluice-operator-0".into()),
        )
        .with_settings(settings);
        Operator {
            ctx: Arc::new(ctx),
            api: Some(api),
        }
    }

    /// Runs `reconcile` on `query` against `scenario`, which must see every
    /// call it expects and no other.
    async fn reconcile<T, F, Fut>(
        &mut self,
        query: StreamingQuery,
        scenario: F,
    ) -> (Result<Action, Error>, T)
    where
        T: Send + 'static,
        F: FnOnce(ApiServer) -> Fut,
        Fut: Future<Output = (ApiServer, T)> + Send + 'static,
    {
        let scenario = scenario(self.api.take().expect("one scenario at a time"));
        let server = tokio::spawn(async move {
            let (mut api, out) = scenario.await;
            api.done().await;
            (api, out)
        });
        let result = tokio::time::timeout(
            Duration::from_secs(20),
            reconcile(Arc::new(query), self.ctx.clone()),
        )
        .await
        .expect("reconcile finished");
        match server.await {
            Ok((api, out)) => {
                self.api = Some(api);
                (result, out)
            }
            Err(e) => {
                eprintln!("the reconcile ended with {result:?}");
                std::panic::resume_unwind(e.into_panic())
            }
        }
    }
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
    /// Answers the reads every reconcile of a continuous query starts with:
    /// the ConfigMap, the StatefulSet `sts` with `status`, no Job, `pods`.
    async fn serve_reads(&self, api: &mut ApiServer, sts: &Value, status: Value, pods: Vec<Value>) {
        api.get(CM, Some(&stored(&self.cm, None))).await;
        api.get(STS, Some(&stored(sts, Some(status)))).await;
        api.list(JOBS, vec![]).await;
        api.list(PODS, pods).await;
    }

    /// Answers the reads of the Service and the PDB, as applied.
    async fn serve_svc_pdb(&self, api: &mut ApiServer) {
        api.get(SVC, Some(&stored(&self.svc, None))).await;
        api.get(PDB, Some(&stored(&self.pdb, None))).await;
    }
}

/// An applied object as the API server returns it: with a resourceVersion,
/// defaulted fields and, for the StatefulSet, `status`.
fn stored(applied: &Value, status: Option<Value>) -> Value {
    let mut object = applied.clone();
    if object["metadata"]["resourceVersion"].is_null() {
        object["metadata"]["resourceVersion"] = json!("17");
    }
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
           "availableReplicas": ready, "currentReplicas": replicas,
           "currentRevision": "fraud-1", "updateRevision": "fraud-1"})
}

/// An engine pod of the StatefulSet whose container restarted `restarts`
/// times and now waits in CrashLoopBackOff after `message`.
fn crashing_pod(restarts: i32, message: &str) -> Value {
    json!({
        "metadata": {"name": "fraud-0", "namespace": NS,
                     "labels": {"controller-revision-hash": "fraud-1"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "fraud",
                                          "uid": "s-1", "controller": true}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "engine", "image": "sluice:test", "imageID": "", "ready": false,
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 1, "message": message}},
        }]},
    })
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

/// Whether `action` requeues for the next progress poll, due within the
/// 30 s interval since the last one (Action keeps its delay private: read
/// from its Debug form, `Action { requeue_after: Some(29.7s) }`).
fn polls(action: &Action) -> bool {
    let text = format!("{action:?}");
    let seconds: f64 = text
        .split("Some(")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1.0);
    (20.0..=30.0).contains(&seconds)
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
async fn create(operator: &mut Operator) -> (Cluster, Vec<(String, String, String)>) {
    let (result, out) = operator
        .reconcile(query(), |mut api| async move {
            api.get(CM, None).await;
            api.get(STS, None).await;
            let jobs = api.list(JOBS, vec![]).await;
            assert!(
                jobs.query
                    .contains("labelSelector=app.kubernetes.io%2Finstance%3Dfraud"),
                "{}",
                jobs.query
            );
            api.list(PODS, vec![]).await;
            let cm = api.apply(CM).await.body;
            api.get(SVC, None).await;
            let svc = api.apply(SVC).await.body;
            api.get(PDB, None).await;
            let pdb = api.apply(PDB).await.body;
            let sts = api.apply(STS).await.body;
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
async fn running(operator: &mut Operator) -> Cluster {
    let (mut cluster, _) = create(operator).await;
    let before = cluster.clone();
    let (result, status) = operator
        .reconcile(with_status(query(), &before.status), |mut api| async move {
            before
                .serve_reads(&mut api, &before.sts, sts_status(1, 1, 1), vec![])
                .await;
            // What this operator applied is unchanged on the server: no
            // apply is sent again.
            before.serve_svc_pdb(&mut api).await;
            let status = apply_status(&mut api).await;
            let event = api.event(NS).await;
            assert_eq!(event.1, "Running");
            (api, status)
        })
        .await;
    let action = result.unwrap();
    assert!(polls(&action), "{action:?}");
    cluster.status = status;
    cluster
}

#[tokio::test]
async fn create_adds_the_finalizer_first() {
    let new = query_with(|q| q.metadata.finalizers = None);
    let (result, patch) = Operator::new()
        .reconcile(new, |mut api| async move {
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
    let (cluster, events) = create(&mut Operator::new()).await;
    // The ConfigMap holds the query the engine runs.
    let manifest = cluster.cm["data"]["query.yaml"].as_str().unwrap();
    assert!(manifest.contains("SELECT user_id, amount FROM transactions WHERE amount > 100"));
    // Every object is owned by the query, and is a plain apply: no hash of
    // our own on it.
    for object in [&cluster.cm, &cluster.svc, &cluster.pdb, &cluster.sts] {
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(
            (&owner["kind"], &owner["name"]),
            (&json!("StreamingQuery"), &json!("fraud"))
        );
        assert_eq!(object["metadata"]["annotations"], Value::Null, "{object}");
    }
    assert_eq!(cluster.sts["spec"]["replicas"], 1);
    let container = &cluster.sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["terminationMessagePolicy"],
        "FallbackToLogsOnError"
    );
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
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    assert_eq!(cluster.status["phase"], "Running");
    let (result, ()) = operator
        .reconcile(
            with_status(query(), &cluster.status),
            |mut api| async move {
                cluster
                    .serve_reads(&mut api, &cluster.sts, sts_status(1, 1, 1), vec![])
                    .await;
                cluster.serve_svc_pdb(&mut api).await;
                // No apply, no status write, no Event: `done` fails on any call.
                (api, ())
            },
        )
        .await;
    // The next poll of progress is due within the interval.
    let action = result.unwrap();
    assert!(polls(&action), "{action:?}");
    let metrics = operator.ctx.metrics.render();
    assert!(
        metrics.contains("sluice_operator_object_writes_total{kind=\"StatefulSet\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_operator_status_writes_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_object_changed_by_someone_else_is_applied_again() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let (result, sts) = operator
        .reconcile(
            with_status(query(), &cluster.status),
            |mut api| async move {
                // Someone scaled the StatefulSet by hand: a new resourceVersion.
                let mut edited = cluster.sts.clone();
                edited["spec"]["replicas"] = json!(3);
                edited["metadata"]["resourceVersion"] = json!("40");
                cluster
                    .serve_reads(&mut api, &edited, sts_status(3, 3, 3), vec![])
                    .await;
                cluster.serve_svc_pdb(&mut api).await;
                let sts = api
                    .apply_onto(STS, stored(&edited, Some(sts_status(3, 3, 3))))
                    .await
                    .body;
                api.apply_onto(STATUS, serde_json::to_value(query()).unwrap())
                    .await;
                assert_eq!(api.event(NS).await.2, "Applied StatefulSet fraud.");
                (api, sts)
            },
        )
        .await;
    assert!(result.is_ok());
    assert_eq!(
        sts["spec"]["replicas"], 1,
        "the spec's replicas are put back"
    );
}

#[tokio::test]
async fn a_spec_change_rolls_the_pods_and_keeps_the_checkpoint() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let changed = with_status(
        query_with(|q| {
            q.spec.query = "SELECT user_id, amount FROM transactions WHERE amount > 500".into();
            q.metadata.generation = Some(2);
        }),
        &cluster.status,
    );
    let before = cluster.clone();
    let (result, (cm, sts, status, event)) = operator
        .reconcile(changed, |mut api| async move {
            let cluster = before;
            cluster
                .serve_reads(&mut api, &cluster.sts, sts_status(1, 1, 1), vec![])
                .await;
            let cm = api.apply_onto(CM, stored(&cluster.cm, None)).await.body;
            cluster.serve_svc_pdb(&mut api).await;
            let sts = api
                .apply_onto(STS, stored(&cluster.sts, Some(sts_status(1, 1, 0))))
                .await
                .body;
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
    assert_eq!(event.2, "Applied ConfigMap fraud-query, StatefulSet fraud.");
}

#[tokio::test]
async fn suspend_stops_the_pods_and_resume_starts_them_without_a_roll() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let suspended = with_status(query_with(|q| q.spec.suspend = Some(true)), &cluster.status);
    let before = cluster.clone();
    let (result, (sts, status, events)) = operator
        .reconcile(suspended, |mut api| async move {
            // The ConfigMap does not hold `suspend`: it is not rewritten.
            before
                .serve_reads(&mut api, &before.sts, sts_status(1, 1, 1), vec![])
                .await;
            before.serve_svc_pdb(&mut api).await;
            let sts = api
                .apply_onto(STS, stored(&before.sts, Some(sts_status(1, 1, 1))))
                .await
                .body;
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
    let (result, sts) = operator
        .reconcile(resumed, |mut api| async move {
            let mut sts = stored(&sts, None);
            sts["metadata"]["resourceVersion"] = json!("18");
            stopped
                .serve_reads(&mut api, &sts, sts_status(0, 0, 0), vec![])
                .await;
            stopped.serve_svc_pdb(&mut api).await;
            let sts = api
                .apply_onto(STS, stored(&sts, Some(sts_status(0, 0, 0))))
                .await
                .body;
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
    let (result, (status, event)) = Operator::new()
        .reconcile(invalid, |mut api| async move {
            api.get(CM, None).await;
            api.get(STS, None).await;
            api.list(JOBS, vec![]).await;
            api.list(PODS, vec![]).await;
            // No object is applied.
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
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let breaking = with_status(
        query_with(|q| {
            q.spec.state_partitions = Some(32);
            q.metadata.generation = Some(2);
        }),
        &cluster.status,
    );
    let (result, (status, event)) = operator
        .reconcile(breaking, |mut api| async move {
            cluster
                .serve_reads(&mut api, &cluster.sts, sts_status(1, 1, 1), vec![])
                .await;
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

/// A change the API server refuses (a StatefulSet's volumeClaimTemplates
/// are immutable) is Degraded with the server's own message, in the status
/// and in an Event; the pods keep running.
#[tokio::test]
async fn an_apply_the_server_refuses_is_degraded_with_its_message() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let bigger = with_status(
        query_with(|q| {
            q.spec.engine =
                Some(serde_json::from_value(json!({"stateVolume": {"size": "20Gi"}})).unwrap());
            q.metadata.generation = Some(2);
        }),
        &cluster.status,
    );
    let refusal = "StatefulSet.apps \"fraud\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden";
    let (result, (status, event)) = operator
        .reconcile(bigger, move |mut api| async move {
            cluster
                .serve_reads(&mut api, &cluster.sts, sts_status(1, 1, 1), vec![])
                .await;
            cluster.serve_svc_pdb(&mut api).await;
            api.refuse_apply(STS, refusal).await;
            let status = apply_status(&mut api).await;
            let event = api.event(NS).await;
            (api, (status, event))
        })
        .await;
    assert!(result.is_ok(), "{result:?}");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "ApplyFailed");
    let expected = format!("The API server refused the change: StatefulSet fraud: {refusal}");
    assert_eq!(degraded["message"], expected.as_str());
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(
        (event.0.as_str(), event.1.as_str(), event.2.as_str()),
        ("Warning", "Failed", expected.as_str())
    );
}

/// The objects of `query` as the operator builds them.
fn cm_of(query: &StreamingQuery) -> Value {
    serde_json::to_value(objects::config_map(query).unwrap()).unwrap()
}

fn sts_of(query: &StreamingQuery) -> Value {
    serde_json::to_value(objects::stateful_set(query, &defaults()).unwrap()).unwrap()
}

fn defaults() -> Defaults {
    Defaults {
        engine_image: "sluice:test".into(),
    }
}

/// The engine keeps crashing: past `maxRestarts` (6 by default) the pods
/// are stopped and the query is Failed with the engine's last error, and it
/// stays so once the pods are gone.
#[tokio::test]
async fn past_the_restart_limit_the_pods_stop_and_the_query_fails_with_the_last_error() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
    let error = "INFO Query started.\nerror: sink files /out: permission denied";
    let before = cluster.clone();
    let (result, (sts, status, events)) = operator
        .reconcile(
            with_status(query(), &cluster.status),
            move |mut api| async move {
                before
                    .serve_reads(
                        &mut api,
                        &before.sts,
                        sts_status(1, 0, 1),
                        vec![crashing_pod(7, error)],
                    )
                    .await;
                // The ConfigMap keeps the failed spec (memo: not sent again).
                before.serve_svc_pdb(&mut api).await;
                let sts = api
                    .apply_onto(STS, stored(&before.sts, Some(sts_status(1, 0, 1))))
                    .await
                    .body;
                let status = apply_status(&mut api).await;
                let events = vec![api.event(NS).await, api.event(NS).await];
                (api, (sts, status, events))
            },
        )
        .await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(sts["spec"]["replicas"], 0, "the pods are stopped");
    assert_eq!(status["phase"], "Failed");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "RestartLimitExceeded");
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.starts_with("The engine failed 7 times in a row, more than spec.restartPolicy.maxRestarts (6), and its pods are stopped; last error: pod fraud-0 container engine: CrashLoopBackOff (restarted 7 times; last exit code 1: error: sink files /out: permission denied)."),
        "{message}"
    );
    assert_eq!(status["lastError"], message);
    assert_eq!(status["failures"]["gaveUp"], true);
    assert_eq!(events[0].2, "Applied StatefulSet fraud.");
    assert_eq!(
        (events[1].1.as_str(), events[1].2.as_str()),
        ("Failed", message)
    );

    // The pods are gone: the decision holds, the message too (no Event).
    let mut stopped = stored(&sts, Some(sts_status(0, 0, 0)));
    stopped["metadata"]["resourceVersion"] = json!("18"); // as the apply answered
    let (again, after) = (cluster.clone(), stopped.clone());
    let (result, later) = operator
        .reconcile(with_status(query(), &status), move |mut api| async move {
            again
                .serve_reads(&mut api, &after, sts_status(0, 0, 0), vec![])
                .await;
            again.serve_svc_pdb(&mut api).await;
            let later = apply_status(&mut api).await;
            (api, later)
        })
        .await;
    assert_eq!(result.unwrap(), requeue(300));
    assert_eq!(
        (&later["phase"], &later["replicas"]),
        (&json!("Failed"), &json!(0))
    );
    assert_eq!(condition(&later, "Degraded")["message"], message);
    // And then nothing is written at all.
    let (result, ()) = operator
        .reconcile(with_status(query(), &later), move |mut api| async move {
            cluster
                .serve_reads(&mut api, &stopped, sts_status(0, 0, 0), vec![])
                .await;
            cluster.serve_svc_pdb(&mut api).await;
            (api, ())
        })
        .await;
    assert_eq!(result.unwrap(), requeue(300));
}

/// A spec change whose engine keeps failing goes back to the last spec that
/// ran, when `restartPolicy.rollback` asks for it.
#[tokio::test]
async fn a_failed_change_is_rolled_back_to_the_last_spec_that_ran() {
    let stable = query();
    let changed = query_with(|q| {
        q.metadata.generation = Some(2);
        q.spec.query = "SELECT user_id, amount / 0 AS x FROM transactions".into();
        q.spec.restart_policy =
            Some(serde_json::from_value(json!({"maxRestarts": 2, "rollback": true})).unwrap());
        q.status = Some(
            serde_json::from_value(json!({
                "phase": "Running",
                "lastStableSpec": serde_json::to_string(&stable.spec).unwrap(),
                "lastStableGeneration": 1,
                "failures": {"revision": "2", "restarts": 0, "restartCountBase": 0},
            }))
            .unwrap(),
        );
    });
    let (cm, sts) = (cm_of(&changed), sts_of(&changed));
    let (result, (cm, sts, status)) = Operator::new()
        .reconcile(changed, |mut api| async move {
            api.get(CM, Some(&stored(&cm, None))).await;
            api.get(STS, Some(&stored(&sts, Some(sts_status(1, 0, 1)))))
                .await;
            api.list(JOBS, vec![]).await;
            api.list(PODS, vec![crashing_pod(3, "error: division by zero")])
                .await;
            let cm = api.apply_onto(CM, stored(&cm, None)).await.body;
            api.get(SVC, None).await;
            api.apply(SVC).await;
            api.get(PDB, None).await;
            api.apply(PDB).await;
            let sts = api
                .apply_onto(STS, stored(&sts, Some(sts_status(1, 0, 1))))
                .await
                .body;
            let status = apply_status(&mut api).await;
            assert_eq!(api.event(NS).await.1, "Applied");
            assert_eq!(api.event(NS).await.1, "Pending");
            assert_eq!(api.event(NS).await.1, "RolledBack");
            (api, (cm, sts, status))
        })
        .await;
    assert!(result.is_ok(), "{result:?}");
    let manifest = cm["data"]["query.yaml"].as_str().unwrap();
    assert!(manifest.contains("amount > 100"), "{manifest}");
    let hash = |sts: &Value| {
        sts["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION].clone()
    };
    assert_eq!(hash(&sts), hash(&sts_of(&stable)));
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(status["runningGeneration"], 1);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "RolledBack");
    assert!(
        degraded["message"].as_str().unwrap().starts_with(
            "Generation 2 failed 3 times in a row (last error: pod fraud-0 container engine: CrashLoopBackOff (restarted 3 times; last exit code 1: error: division by zero)); rolled back to generation 1, the last spec that ran."
        ),
        "{degraded}"
    );
}

/// An `availableNow` query runs as a Job, and ends Completed with its final
/// progress (the engine's termination message) in the status.
#[tokio::test]
async fn an_available_now_query_runs_as_a_job_and_completes_with_its_final_progress() {
    let batch = query_with(|q| {
        q.spec.trigger = Some(serde_json::from_value(json!({"availableNow": true})).unwrap());
        q.spec.sources[0].generator.as_mut().unwrap().total_rows = Some(1000);
    });
    let job = serde_json::to_value(objects::job(&batch, &defaults()).unwrap()).unwrap();
    let job_name = job["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(job_name.starts_with("fraud-") && job_name.len() == "fraud-".len() + 8);
    let job_path = format!("{JOBS}/{job_name}");
    let mut operator = Operator::new();
    let path = job_path.clone();
    let (result, (cluster, applied_job, status)) = operator
        .reconcile(batch.clone(), |mut api| async move {
            api.get(CM, None).await;
            api.get(STS, None).await;
            api.list(JOBS, vec![]).await;
            api.list(PODS, vec![]).await;
            let cm = api.apply(CM).await.body;
            api.get(SVC, None).await;
            let svc = api.apply(SVC).await.body;
            api.get(PDB, None).await;
            let pdb = api.apply(PDB).await.body;
            let applied_job = api.apply(&path).await.body;
            let status = apply_status(&mut api).await;
            let applied = api.event(NS).await;
            assert_eq!(
                applied.2,
                format!("Applied ConfigMap fraud-query, Service fraud, PodDisruptionBudget fraud, Job {}.", applied_job["metadata"]["name"].as_str().unwrap())
            );
            assert_eq!(api.event(NS).await.1, "Pending");
            let cluster = Cluster {
                cm,
                svc,
                pdb,
                sts: Value::Null,
                status: status.clone(),
            };
            (api, (cluster, applied_job, status))
        })
        .await;
    assert!(result.is_ok());
    assert_eq!(applied_job["spec"]["backoffLimit"], 6);
    assert_eq!(
        applied_job["spec"]["template"]["spec"]["restartPolicy"],
        "Never"
    );
    assert_eq!(status["job"], job_name.as_str());

    // The run ends: the Job is Complete, its pod wrote its final progress.
    let progress = json!({
        "id": "q", "runId": "r", "name": "fraud", "timestamp": "2026-11-21T10:00:02.000Z",
        "batchId": 4, "numInputRows": 200, "inputRowsPerSecond": 100.0,
        "processedRowsPerSecond": 2000.0, "durationMs": {}, "eventTime": {},
        "stateOperators": [], "sources": [], "sink": {"description": "console", "numOutputRows": 3},
    });
    let pod = json!({
        "metadata": {"name": format!("{job_name}-x7k2p"), "namespace": NS,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                          "uid": "j-1", "controller": true}]},
        "status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "engine", "image": "sluice:test", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": progress.to_string()}},
        }]},
    });
    let mut done = stored(&applied_job, None);
    done["status"] = json!({"succeeded": 1, "conditions": [
        {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]});
    let (result, (status, event)) = operator
        .reconcile(with_status(batch, &status), move |mut api| async move {
            api.get(CM, Some(&stored(&cluster.cm, None))).await;
            api.get(STS, None).await;
            api.list(JOBS, vec![done]).await;
            api.list(PODS, vec![pod]).await;
            cluster.serve_svc_pdb(&mut api).await;
            let status = apply_status(&mut api).await;
            let event = api.event(NS).await;
            (api, (status, event))
        })
        .await;
    assert_eq!(result.unwrap(), requeue(300));
    assert_eq!(status["phase"], "Completed");
    assert_eq!(status["progress"]["batchId"], 4);
    assert_eq!(
        status["progress"]["lastCommitTime"],
        "2026-11-21T10:00:02.000Z"
    );
    assert_eq!(
        condition(&status, "Ready")["message"],
        "The query processed all its input (last batch 4) and stopped."
    );
    assert_eq!(
        (event.0.as_str(), event.1.as_str()),
        ("Normal", "Completed")
    );
}

#[tokio::test]
async fn deletion_stops_the_pods_before_the_finalizer_goes() {
    let mut operator = Operator::new();
    let cluster = running(&mut operator).await;
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
    let (result, stopped) = operator
        .reconcile(deleting.clone(), |mut api| async move {
            api.get(STS, Some(&running_sts)).await;
            let stopped = api.apply_onto(STS, running_sts).await.body;
            api.list(JOBS, vec![]).await;
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
    let (result, patch) = operator
        .reconcile(deleting, |mut api| async move {
            api.get(STS, Some(&stored(&stopped, Some(sts_status(0, 0, 0)))))
                .await;
            api.list(JOBS, vec![]).await;
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

/// A pod stuck terminating does not hold the query forever: after the
/// deletion timeout an Event names it and the finalizer goes.
#[tokio::test]
async fn deletion_gives_up_after_its_timeout_and_names_the_pod_that_blocks() {
    let mut operator = Operator::with_settings(Settings {
        deletion_timeout: Duration::ZERO,
        ..Settings::default()
    });
    let deleting = query_with(|q| {
        q.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-21T10:00:00Z".parse().unwrap(),
        ));
    });
    let mut stopped = sts_of(&query_with(|q| q.spec.suspend = Some(true)));
    stopped = stored(&stopped, Some(sts_status(0, 0, 0)));
    let stuck = json!({
        "metadata": {"name": "fraud-0", "namespace": NS, "finalizers": ["example.com/backup"],
                     "deletionTimestamp": "2026-11-21T10:00:05Z"},
        "spec": {"nodeName": "node-7", "containers": [{"name": "engine"}]},
        "status": {"phase": "Running"},
    });
    let (result, event) = operator
        .reconcile(deleting, |mut api| async move {
            api.get(STS, Some(&stopped)).await;
            api.list(JOBS, vec![]).await;
            api.list(PODS, vec![stuck]).await;
            let event = api.event(NS).await;
            let mut gone = serde_json::to_value(query()).unwrap();
            gone["metadata"]["finalizers"] = json!([]);
            api.answer("PATCH", QUERY, 200, gone).await;
            (api, event)
        })
        .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(
        (event.0.as_str(), event.1.as_str()),
        ("Warning", "DeletionTimedOut")
    );
    assert!(
        event.2.contains("pod fraud-0 (Running on node-7, terminating since 2026-11-21T10:00:05Z, finalizers example.com/backup)"),
        "{}",
        event.2
    );
}

/// Answers the reads of a missing Service and PDB and their creation.
async fn create_svc_pdb(api: &mut ApiServer) {
    api.get(SVC, None).await;
    api.apply(SVC).await;
    api.get(PDB, None).await;
    api.apply(PDB).await;
}

/// A Kafka → Kafka query that the operator autoscales.
fn autoscaled_query() -> StreamingQuery {
    query_of(
        r#"
  sources:
    - name: transactions
      kafka: {bootstrapServers: "kafka:9092", topic: transactions}
      format: json
      schema: [{name: user_id, type: string}]
  query: SELECT user_id FROM transactions
  sink: {kafka: {bootstrapServers: "kafka:9092", topic: flagged}}
  checkpoint: {location: "s3://checkpoints/fraud"}
  autoscaling: {maxReplicas: 8, catchUpWithin: 1m, restartTime: 10s}
"#,
    )
}

/// Serves `/progress` (and `/progress/latest`, `/healthz`) as an engine
/// whose batches, 10 s apart, each read 5,000 records in 1 s and leave its
/// lag 20,000 higher, from 420,000 to 520,000: 2,500/s arrive, it processes
/// 5,000/s when busy.
async fn lagging_engine() -> u16 {
    use axum::routing::get;
    let now = chrono::Utc::now();
    // Batches back to back, each reading 5,000 records (its
    // maxOffsetsPerTrigger) in 1 s, while 2,500 a second arrive: the lag
    // falls by 2,500 a batch, down to 520,000.
    let reports: Vec<Value> = (0..6)
        .map(|i| {
            let at = now - chrono::Duration::seconds(5 - i);
            json!({
                "id": "q", "runId": "r", "name": "fraud",
                "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "batchId": i, "numInputRows": 5000, "inputRowsPerSecond": 500.0,
                "processedRowsPerSecond": 5000.0, "durationMs": {"triggerExecution": 1000},
                "sources": [{"description": "kafka", "startOffset": null,
                             "endOffset": {"transactions": {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1}},
                             "latestOffset": null, "numInputRows": 5000, "inputRowsPerSecond": 500.0,
                             "processedRowsPerSecond": 5000.0, "recordsBehindLatest": 520_000 + 2_500 * (5 - i)}],
                "sink": {"description": "kafka", "numOutputRows": 5000},
            })
        })
        .collect();
    let latest = reports.last().unwrap().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = axum::Router::new()
        .route("/progress", get(move || async move { axum::Json(reports) }))
        .route(
            "/progress/latest",
            get(move || async move { axum::Json(latest) }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    port
}

#[tokio::test]
async fn the_autoscaler_sets_the_stateful_sets_replicas_and_the_status_never_the_spec() {
    let port = lagging_engine().await;
    let (client, api) = pair();
    let mut ctx = Context::new(client, defaults(), Arc::new(Metrics::default()), None)
        .with_settings(Settings {
            progress_interval: Duration::ZERO,
            ..Settings::default()
        });
    ctx.progress = sluice_operator::progress::ProgressReader::new(port);
    let mut operator = Operator {
        ctx: Arc::new(ctx),
        api: Some(api),
    };
    // Created: one replica (spec.replicas' default), nothing measured yet.
    let (result, (sts, status)) = operator
        .reconcile(autoscaled_query(), |mut api| async move {
            api.get(CM, None).await;
            api.get(STS, None).await;
            api.list(JOBS, vec![]).await;
            api.list(PODS, vec![]).await;
            api.apply(CM).await;
            create_svc_pdb(&mut api).await;
            let sts = api.apply(STS).await.body;
            let status = apply_status(&mut api).await;
            api.event(NS).await;
            api.event(NS).await;
            (api, (sts, status))
        })
        .await;
    result.unwrap();
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(status["autoscaling"]["replicas"], 1);
    assert_eq!(
        status["autoscaling"]["reason"],
        "keeping 1: waiting for the StatefulSet to have 1 ready engine pods of its current template"
    );
    // Its pod runs and reports a backlog: 2,500/s in and 520,000 behind,
    // to drain within 1 m less the 10 s restart, with the 25,000 that
    // arrive during it: 2,500 + 545,000 / 50 = 13,400/s at 5,000/s a
    // replica (busy, and behind after every batch: all it does): 3
    // replicas (the steady input alone needs 1).
    let pod = json!({
        "metadata": {"name": "fraud-0", "namespace": NS,
                     "labels": {"controller-revision-hash": "fraud-1"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "fraud",
                                          "uid": "s-1", "controller": true}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    });
    let created = sts.clone();
    let (result, (sts, status, rescaled)) = operator
        .reconcile(
            with_status(autoscaled_query(), &status),
            |mut api| async move {
                api.get(
                    CM,
                    Some(&stored(
                        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "fraud-query", "namespace": NS}}),
                        None,
                    )),
                )
                .await;
                api.get(STS, Some(&stored(&created, Some(sts_status(1, 1, 1)))))
                    .await;
                api.list(JOBS, vec![]).await;
                api.list(PODS, vec![pod]).await;
                let rescaled = api.event(NS).await;
                create_svc_pdb(&mut api).await;
                let sts = api.apply(STS).await.body;
                let status = apply_status(&mut api).await;
                api.event(NS).await;
                (api, (sts, status, rescaled))
            },
        )
        .await;
    result.unwrap();
    let scaled = status["autoscaling"].clone();
    assert_eq!(scaled["replicas"], sts["spec"]["replicas"], "{scaled}");
    let replicas = scaled["replicas"].as_i64().unwrap();
    assert_eq!(replicas, 3, "{scaled}");
    assert_eq!(scaled["recommendedReplicas"], 3);
    assert_eq!(scaled["lag"], 520_000);
    assert_eq!(scaled["inputRowsPerSecond"], 2_500.0);
    assert_eq!(scaled["trueProcessingRate"], 5_000.0);
    assert!(scaled["lastScaleTime"].is_string());
    let env = &sts["spec"]["template"]["spec"]["containers"][0]["env"];
    let count = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SLUICE_REPLICAS")
        .unwrap();
    assert_eq!(count["value"], replicas.to_string());
    assert_eq!(rescaled.1, "Rescaled");
    assert!(
        rescaled
            .2
            .starts_with("The autoscaler scaled the query from 1 to 3 replicas: input 2500/s and lag 520000 to drain within 60s: 13400/s needed"),
        "{}",
        rescaled.2
    );
    let metrics = operator.ctx.metrics.render();
    assert!(
        metrics.contains(&format!(
            "sluice_operator_autoscaler{{query=\"risk/fraud\",value=\"replicas\"}} {replicas}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(
        "sluice_operator_autoscaler_rescales_total{direction=\"up\",query=\"risk/fraud\"} 1"
    ));
}
