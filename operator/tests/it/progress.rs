//! Reading engine pods' progress over real HTTP, from a server that answers
//! as the engine does (`/progress/latest`: the report, or 204 before the
//! first batch).

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use sluice_operator::progress::{PodReport, ProgressReader, drop_foreign, stalled};
use sluice_operator::status::summarize;

fn report(batch: u64) -> serde_json::Value {
    json!({
        "id": "q", "runId": "r", "name": "fraud", "timestamp": "2026-11-21T10:00:00.000Z",
        "batchId": batch, "numInputRows": 100, "inputRowsPerSecond": 50.0,
        "processedRowsPerSecond": 400.0, "durationMs": {}, "eventTime": {"watermark": "2026-11-21T09:50:00.000Z"},
        "stateOperators": [],
        "sources": [{"description": "transactions", "startOffset": null, "endOffset": null, "latestOffset": null,
                     "numInputRows": 100, "inputRowsPerSecond": 50.0, "processedRowsPerSecond": 400.0,
                     "recordsBehindLatest": 7}],
        "sink": {"description": "console", "numOutputRows": 3},
    })
}

fn pod(name: &str, ip: Option<&str>, phase: &str) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name}, "status": {"phase": phase, "podIP": ip}}),
    )
    .unwrap()
}

#[tokio::test]
async fn progress_is_read_from_running_pods_that_answer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new()
        .route(
            "/progress/latest",
            get(|| async { axum::Json(report(41)).into_response() }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move { axum::serve(listener, router).await });

    let reader = ProgressReader::new(port);
    let pods = [
        pod("q-0", Some("127.0.0.1"), "Running"),
        // Not running yet, or without an address: not asked.
        pod("q-1", Some("127.0.0.2"), "Pending"),
        pod("q-2", None, "Running"),
    ];
    let reports = reader.read(&pods).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].pod.as_str(), &reports[0].unhealthy),
        ("q-0", &None)
    );
    let progress: Vec<_> = reports.into_iter().filter_map(|r| r.progress).collect();
    let summary = summarize(&progress).unwrap();
    assert_eq!(summary.batch_id, Some(41));
    assert_eq!(summary.lag, Some(7));
    assert_eq!(
        summary.watermark.as_deref(),
        Some("2026-11-21T09:50:00.000Z")
    );
}

/// The engine's `/healthz` answers 500 with why once a batch has not moved
/// on for `spec.stallTimeout`: the operator names the pod.
#[tokio::test]
async fn a_stalled_pod_is_reported_with_what_its_healthz_says() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new()
        .route(
            "/progress/latest",
            get(|| async { axum::Json(report(7)).into_response() }),
        )
        .route(
            "/healthz",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "stalled: no batch completed for 65s while \"Processing new data\" (spec.stallTimeout)\n",
                )
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await });
    let reports = ProgressReader::new(port)
        .read(&[pod("q-0", Some("127.0.0.1"), "Running")])
        .await;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        stalled(&reports).unwrap(),
        "pod q-0: stalled: no batch completed for 65s while \"Processing new data\" (spec.stallTimeout)"
    );
    let healthy = PodReport {
        unhealthy: None,
        ..reports[0].clone()
    };
    assert_eq!(stalled(&[healthy]), None);
}

#[tokio::test]
async fn a_pod_before_its_first_batch_has_no_progress_and_one_not_answering_is_left_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new()
        .route("/progress/latest", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let reports = ProgressReader::new(port)
        .read(&[pod("q-0", Some("127.0.0.1"), "Running")])
        .await;
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (&reports[0].progress, &reports[0].unhealthy),
        (&None, &None)
    );

    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(
        ProgressReader::new(closed)
            .read(&[pod("q-0", Some("127.0.0.1"), "Running")])
            .await
            .is_empty()
    );
}

#[test]
fn the_progress_of_another_pods_engine_is_dropped() {
    let progress = |run: &str| {
        let mut p: sluice_crds::progress::QueryProgress =
            serde_json::from_value(report(7)).unwrap();
        p.run_id = run.into();
        Some(p)
    };
    let with_uid = |uid: &str| {
        let mut p = pod("q-0", Some("127.0.0.1"), "Running");
        p.metadata.uid = Some(uid.into());
        p
    };
    let mut runs = std::collections::VecDeque::new();
    let read = |run: &str| {
        vec![PodReport {
            pod: "q-0".into(),
            progress: progress(run),
            unhealthy: None,
            recent: None,
        }]
    };
    let mut first = read("run-a");
    drop_foreign(&mut first, "fraud", &[with_uid("uid-1")], &mut runs);
    assert!(first[0].progress.is_some());
    // The pod was replaced (a new uid at the same address) while the old
    // engine still answered: its run is not the new pod's.
    let mut stale = read("run-a");
    drop_foreign(&mut stale, "fraud", &[with_uid("uid-2")], &mut runs);
    assert!(stale[0].progress.is_none());
    let mut fresh = read("run-b");
    drop_foreign(&mut fresh, "fraud", &[with_uid("uid-2")], &mut runs);
    assert!(fresh[0].progress.is_some());
    let mut again = read("run-a");
    drop_foreign(&mut again, "fraud", &[with_uid("uid-1")], &mut runs);
    assert!(
        again[0].progress.is_some(),
        "the old pod's own run is its own"
    );
    // Another query's engine at an address this pod got.
    let mut other = read("run-c");
    drop_foreign(&mut other, "clicks", &[with_uid("uid-3")], &mut runs);
    assert!(other[0].progress.is_none());
}
