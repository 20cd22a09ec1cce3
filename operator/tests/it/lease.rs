//! The leader election's API calls: creating the Lease, losing a race for
//! it, and renewing it.

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use sluice_operator::lease::{Elector, LeaseConfig};

use crate::api_server::pair;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";

fn elector(client: kube::Client, identity: &str) -> Elector {
    Elector::new(
        Api::<Lease>::namespaced(client, "sluice-system"),
        LeaseConfig::new("sluice-operator", identity),
    )
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let (client, mut api) = pair();
    let server = tokio::spawn(async move {
        api.get(LEASE, None).await;
        let call = api.answer("POST", LEASES, 201, json!({})).await;
        api.done().await;
        call.body
    });
    assert!(elector(client, "op-0").try_lead().await.unwrap());
    let created = server.await.unwrap();
    assert_eq!(created["spec"]["holderIdentity"], "op-0");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn a_replica_that_loses_the_race_does_not_lead() {
    let (client, mut api) = pair();
    let server = tokio::spawn(async move {
        api.get(LEASE, None).await;
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "reason": "AlreadyExists", "code": 409, "message": "leases \"sluice-operator\" already exists"});
        api.answer("POST", LEASES, 409, conflict).await;
        api.done().await;
    });
    assert!(!elector(client, "op-1").try_lead().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn a_lease_renewed_by_another_replica_is_left_alone_and_ours_is_renewed() {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let held_by = |who: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "sluice-operator", "namespace": "sluice-system", "resourceVersion": "41"},
               "spec": {"holderIdentity": who, "leaseDurationSeconds": 15, "renewTime": now, "acquireTime": now}})
    };
    let (client, mut api) = pair();
    let other = held_by("op-0");
    let server = tokio::spawn(async move {
        api.get(LEASE, Some(&other)).await;
        api.done().await;
    });
    assert!(!elector(client, "op-1").try_lead().await.unwrap());
    server.await.unwrap();

    let (client, mut api) = pair();
    let ours = held_by("op-1");
    let server = tokio::spawn(async move {
        api.get(LEASE, Some(&ours)).await;
        let call = api.answer("PUT", LEASE, 200, ours.clone()).await;
        api.done().await;
        call.body
    });
    assert!(elector(client, "op-1").try_lead().await.unwrap());
    let renewed = server.await.unwrap();
    // The write carries the resourceVersion read: a racing write loses.
    assert_eq!(renewed["metadata"]["resourceVersion"], "41");
    assert_eq!(renewed["spec"]["holderIdentity"], "op-1");
}
