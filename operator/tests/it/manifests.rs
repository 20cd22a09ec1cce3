//! The manifests Sluice ships: the examples load and validate (and the
//! invalid ones do not), every object the Helm chart renders round-trips
//! through its Kubernetes type, and the dashboard's operator panels use
//! metrics the operator exports.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_operator::metrics::Metrics;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_kubernetes_and_local_examples_load_and_validate() {
    let files = [
        yaml_files("examples/kubernetes"),
        yaml_files("examples/local"),
    ]
    .concat();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        if let Err(e) = sluice_crds::load_file(&file) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_invalid_examples_are_refused_with_the_field_named() {
    let files = yaml_files("examples/invalid");
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let error = sluice_crds::load_file(&file)
            .expect_err(&format!("{} should be refused", file.display()))
            .to_string();
        assert!(error.contains("spec."), "{}: {error}", file.display());
    }
}

/// Whether `typed` holds every field `doc` sets, with the same value.
fn covers(typed: &Value, doc: &Value) -> bool {
    match (typed, doc) {
        (Value::Object(t), Value::Object(d)) => d
            .iter()
            .all(|(k, v)| t.get(k).is_some_and(|tv| covers(tv, v))),
        (Value::Array(t), Value::Array(d)) => {
            t.len() == d.len() && t.iter().zip(d).all(|(tv, dv)| covers(tv, dv))
        }
        (t, d) => t == d,
    }
}

/// Deserializes `doc` as `K` and serializes it back: a field `K` does not
/// have (a misspelling, a wrong level) is lost on the way and fails the
/// comparison, as would a value of the wrong type.
fn round_trips<K: Serialize + DeserializeOwned>(doc: &Value) -> Result<(), String> {
    let typed: K = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if covers(&back, doc) {
        Ok(())
    } else {
        Err(format!(
            "fields were lost: {}",
            serde_json::to_string(&back).unwrap()
        ))
    }
}

/// Run by `e2e/helm.sh`, which renders the chart with the real Helm engine
/// and passes the documents in `SLUICE_RENDERED`.
#[test]
#[ignore = "needs the chart rendered by e2e/helm.sh (SLUICE_RENDERED)"]
fn rendered_chart_objects_parse_as_their_types() {
    let path = std::env::var("SLUICE_RENDERED").expect("SLUICE_RENDERED names the rendered chart");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut kinds = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let doc = Value::deserialize(document).unwrap();
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let result = match kind.as_str() {
            "Deployment" => round_trips::<Deployment>(&doc),
            "Service" => round_trips::<Service>(&doc),
            "ServiceAccount" => round_trips::<ServiceAccount>(&doc),
            "ClusterRole" => round_trips::<ClusterRole>(&doc),
            "ClusterRoleBinding" => round_trips::<ClusterRoleBinding>(&doc),
            "Role" => round_trips::<Role>(&doc),
            "RoleBinding" => round_trips::<RoleBinding>(&doc),
            "CustomResourceDefinition" => round_trips::<CustomResourceDefinition>(&doc),
            // The Prometheus Operator's types are not in k8s-openapi: check
            // the fields it requires.
            "ServiceMonitor" | "PodMonitor" => {
                let endpoints = if kind == "ServiceMonitor" {
                    "endpoints"
                } else {
                    "podMetricsEndpoints"
                };
                if doc["apiVersion"] == "monitoring.coreos.com/v1"
                    && doc["spec"]["selector"].is_object()
                    && doc["spec"][endpoints]
                        .as_array()
                        .is_some_and(|e| !e.is_empty())
                {
                    Ok(())
                } else {
                    Err(format!(
                        "not a monitoring.coreos.com/v1 {kind} with a selector and {endpoints}"
                    ))
                }
            }
            other => Err(format!("unexpected kind {other:?}: add it to this test")),
        };
        if let Err(e) = result {
            panic!("document {i} ({kind} {name}): {e}");
        }
        kinds.push(kind);
    }
    for needed in ["Deployment", "ServiceAccount", "CustomResourceDefinition"] {
        assert!(
            kinds.iter().any(|k| k == needed),
            "no {needed} in {kinds:?}"
        );
    }
}

use serde::Deserialize as _;

#[test]
fn the_dashboards_operator_panels_use_metrics_the_operator_exports() {
    let metrics = Metrics::default();
    metrics.reconciles.inc();
    metrics.errors.with_label_values(&["conflict"]).inc();
    metrics.duration.observe(0.1);
    metrics.set_autoscaler(
        "ns/q",
        Some(&sluice_crds::AutoscalingStatus {
            replicas: 2,
            recommended_replicas: 3,
            lag: Some(10),
            ..Default::default()
        }),
    );
    metrics.rescales.with_label_values(&["ns/q", "up"]).inc();
    let exported = metrics.render();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/sluice/dashboards/sluice.json")).unwrap(),
    )
    .unwrap();
    let mut used = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("sluice_operator_") {
                    used.push(word.to_owned());
                }
            }
        }
    }
    assert!(!used.is_empty(), "the dashboard has no operator panel");
    for name in used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "the dashboard uses {name}, which the operator does not export"
        );
    }
}
