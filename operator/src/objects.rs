//! Desired objects, built by pure functions of a `StreamingQuery` so that
//! they are tested without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use sluice_crds::{API_VERSION, KIND, StreamingQuery};

use crate::{Error, Result};

/// The key of the spec file in the query's ConfigMap; engine pods mount it
/// and run `sluice run /etc/sluice/query.yaml`.
pub const QUERY_FILE: &str = "query.yaml";

/// The labels every object of a query carries.
pub fn labels(query: &StreamingQuery) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sluice-engine".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), query.name_any()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "sluice-operator".to_owned(),
        ),
    ])
}

/// The ConfigMap holding the query's manifest, as the engine reads it: the
/// same file `sluice run` takes, without status or server-side metadata.
pub fn config_map(query: &StreamingQuery) -> Result<ConfigMap> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let owner = query
        .controller_owner_ref(&())
        .ok_or(Error::Missing("metadata.uid"))?;
    let manifest = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": query.namespace()},
        "spec": query.spec,
    });
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("{name}-query")),
            namespace: query.namespace(),
            labels: Some(labels(query)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            QUERY_FILE.to_owned(),
            serde_yaml::to_string(&manifest)?,
        )])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: fraud, namespace: risk, uid: 1234-abcd, generation: 3}
spec:
  sources: [{name: transactions, generator: {kind: transactions, rowsPerSecond: 100}}]
  query: SELECT * FROM transactions WHERE amount > 100
  sink: {console: {}}
status: {phase: Running}
"#;

    #[test]
    fn the_config_map_holds_a_manifest_the_engine_loads_back() {
        let query = sluice_crds::load(QUERY, "test").unwrap();
        let cm = config_map(&query).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("fraud-query"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("risk"));
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("StreamingQuery", "fraud", Some(true))
        );
        let text = &cm.data.as_ref().unwrap()[QUERY_FILE];
        let loaded = sluice_crds::load(text, "configmap").unwrap();
        assert_eq!(loaded.spec, query.spec);
        assert!(!text.contains("status") && !text.contains("uid"), "{text}");
    }

    #[test]
    fn a_query_without_uid_has_no_owner_to_point_at() {
        let query = sluice_crds::load(&QUERY.replace("uid: 1234-abcd, ", ""), "test").unwrap();
        assert_eq!(
            config_map(&query).unwrap_err().to_string(),
            "StreamingQuery has no metadata.uid"
        );
    }
}
