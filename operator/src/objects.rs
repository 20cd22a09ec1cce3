//! Desired objects, built by pure functions of a `StreamingQuery` so that
//! they are tested without an API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, EphemeralVolumeSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sluice_crds::{API_VERSION, KIND, StreamingQuery, StreamingQuerySpec};

use crate::{Error, Result};

/// The key of the spec file in the query's ConfigMap; engine pods mount it
/// and run `sluice run /etc/sluice/query.yaml`.
pub const QUERY_FILE: &str = "query.yaml";
/// Where engine pods mount the query's ConfigMap.
pub const QUERY_DIR: &str = "/etc/sluice";
/// Where engine pods keep local state.
pub const STATE_DIR: &str = "/var/lib/sluice";
/// The engine's HTTP port: `/progress`, `/metrics`, `/healthz`, `/readyz`.
pub const HTTP_PORT: i32 = 9464;
/// The pod-template annotation holding a hash of the query's manifest: a spec
/// change changes it, and so rolls the pods.
pub const SPEC_HASH_ANNOTATION: &str = "sluice.dev/spec-hash";
/// The uid the engine runs as (the image's non-root user).
const ENGINE_UID: i64 = 65532;

/// What the operator is configured with, beyond each query's spec.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// The engine image when `spec.engine.image` is not set.
    pub engine_image: String,
}

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

/// [`labels`] as a label selector, `k=v,k=v`: the engine pods' selector
/// for listing them and for the `/scale` subresource.
pub fn label_selector(query: &StreamingQuery) -> String {
    labels(query)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The ConfigMap holding the query's manifest, as the engine reads it: the
/// same file `sluice run` takes, without status or server-side metadata, and
/// without the fields that shape the pods rather than the query (`replicas`,
/// `suspend`, `engine`), so that scaling or suspending does not change it and
/// roll the pods.
pub fn config_map(query: &StreamingQuery) -> Result<ConfigMap> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let owner = owner(query)?;
    let manifest = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": query.namespace()},
        "spec": StreamingQuerySpec {
            replicas: None,
            suspend: None,
            engine: None,
            ..query.spec.clone()
        },
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
mod config_map_tests {
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

fn metadata(query: &StreamingQuery, name: String) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: query.namespace(),
        labels: Some(labels(query)),
        owner_references: Some(vec![owner(query)?]),
        ..ObjectMeta::default()
    })
}

fn owner(query: &StreamingQuery) -> Result<OwnerReference> {
    query
        .controller_owner_ref(&())
        .ok_or(Error::Missing("metadata.uid"))
}

fn selector(query: &StreamingQuery) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(query)),
        ..LabelSelector::default()
    }
}

/// FNV-1a, 64 bits: stable across Rust versions and builds, unlike
/// `DefaultHasher`, so that upgrading the operator does not roll every pod.
pub(crate) fn fnv1a(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The headless Service that gives each engine pod a stable DNS name.
pub fn service(query: &StreamingQuery) -> Result<Service> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    Ok(Service {
        metadata: metadata(query, name)?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(labels(query)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The PodDisruptionBudget: voluntary evictions take one engine pod at a time.
pub fn pod_disruption_budget(query: &StreamingQuery) -> Result<PodDisruptionBudget> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    Ok(PodDisruptionBudget {
        metadata: metadata(query, name)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector(query)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// The annotation on a StreamingQuery that restarts its engine when it
/// changes (Argo CD's restart action sets it to the time, as `kubectl
/// rollout restart` does for a Deployment): copied onto the pod template, it
/// rolls the pods, starts a new run of an `availableNow` query, and gives a
/// query stopped after too many failures a new chance.
pub const RESTARTED_AT: &str = "sluice.dev/restartedAt";

/// The engine pods' template: `spec.engine`'s image, resources and
/// environment, the query mounted from its ConfigMap, non-root with a
/// read-only root filesystem and no capabilities, probed on `/healthz` and
/// `/readyz`, scraped by Prometheus on `/metrics`; its last error (or its
/// log's tail) as the termination message. `replicas`: the variables that
/// say which replica a pod is (none for a Job's single run).
fn pod_template(
    query: &StreamingQuery,
    defaults: &Defaults,
    restart_policy: &str,
    state: Option<Volume>,
    replicas: Vec<EnvVar>,
) -> Result<PodTemplateSpec> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let engine = query.spec.engine.clone().unwrap_or_default();
    let manifest = config_map(query)?
        .data
        .and_then(|mut d| d.remove(QUERY_FILE))
        .unwrap_or_default();
    let probe = |path: &str, initial_delay: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let mut env = vec![EnvVar {
        name: "POD_NAME".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    // RocksDB's scratch directory: the state volume (restored from the
    // checkpoint when a pod starts).
    env.push(EnvVar {
        name: "SLUICE_STATE_DIR".to_owned(),
        value: Some(format!("{STATE_DIR}/state")),
        ..EnvVar::default()
    });
    env.extend(engine.env.iter().cloned());
    env.extend(replicas);
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let container = Container {
        name: "engine".to_owned(),
        image: Some(
            engine
                .image
                .clone()
                .unwrap_or_else(|| defaults.engine_image.clone()),
        ),
        image_pull_policy: engine.image_pull_policy.clone(),
        args: Some(vec![
            "run".to_owned(),
            format!("{QUERY_DIR}/{QUERY_FILE}"),
            "--http-port".to_owned(),
            HTTP_PORT.to_string(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: HTTP_PORT,
            ..ContainerPort::default()
        }]),
        env: Some(env),
        env_from: (!engine.env_from.is_empty()).then(|| engine.env_from.clone()),
        resources: engine.resources.clone(),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        // The engine writes its last error to /dev/termination-log; a crash
        // that cannot (a panic, the OOM killer) leaves its log's tail there.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("query", QUERY_DIR, true),
            mount("state", STATE_DIR, false),
            // The root filesystem is read-only; /tmp is the one scratch place.
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mut volumes = vec![
        Volume {
            name: "query".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: format!("{name}-query"),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        empty_dir("tmp"),
    ];
    volumes.extend(state);
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), HTTP_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        (SPEC_HASH_ANNOTATION.to_owned(), fnv1a(&manifest)),
    ]);
    if let Some(at) = query.annotations().get(RESTARTED_AT) {
        annotations.insert(RESTARTED_AT.to_owned(), at.clone());
    }
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(query)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            restart_policy: Some(restart_policy.to_owned()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(ENGINE_UID),
                run_as_group: Some(ENGINE_UID),
                fs_group: Some(ENGINE_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            // Let a batch under way finish (SIGTERM stops at a batch boundary).
            termination_grace_period_seconds: Some(60),
            ..PodSpec::default()
        }),
    })
}

/// The claim of `spec.engine.stateVolume`.
fn state_claim(query: &StreamingQuery) -> Option<PersistentVolumeClaimSpec> {
    let volume = query.spec.engine.as_ref()?.state_volume.as_ref()?;
    Some(PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
        storage_class_name: volume.storage_class_name.clone(),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                volume.size.clone(),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    })
}

/// The number of engine pods the query asks for: [`running_replicas`], 0
/// when suspended.
pub fn desired_replicas(query: &StreamingQuery) -> i32 {
    if query.spec.is_suspended() {
        0
    } else {
        running_replicas(query)
    }
}

/// Whether the operator's autoscaler picks the query's replicas.
pub fn autoscaled(query: &StreamingQuery) -> bool {
    query
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.is_enabled())
}

/// The replicas a query that is not suspended runs: the autoscaler's
/// (`status.autoscaling.replicas`) while `spec.autoscaling` is enabled,
/// else `spec.replicas` (default 1).
pub fn running_replicas(query: &StreamingQuery) -> i32 {
    let decided = query
        .status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .filter(|_| autoscaled(query));
    match decided {
        Some(a) => a.replicas,
        None => query.spec.replicas.unwrap_or(1),
    }
}

/// Which replica an engine pod is, of how many: `SLUICE_REPLICA` from the
/// pod's StatefulSet ordinal (its `apps.kubernetes.io/pod-index` label),
/// `SLUICE_REPLICAS` from [`running_replicas`] (not 0 when suspended or
/// scaled to zero: that rolls nothing). A new count changes the pod template, so
/// the pods restart with it and replica 0 hands the query over to the new
/// count at a batch boundary.
fn replica_env(query: &StreamingQuery) -> Vec<EnvVar> {
    vec![
        EnvVar {
            name: "SLUICE_REPLICA".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels['apps.kubernetes.io/pod-index']".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: "SLUICE_REPLICAS".to_owned(),
            value: Some(running_replicas(query).max(1).to_string()),
            ..EnvVar::default()
        },
    ]
}

/// The StatefulSet of engine pods of a continuous query: [`desired_replicas`]
/// of them, each with its state volume (a claim of
/// `spec.engine.stateVolume`, or an emptyDir).
pub fn stateful_set(query: &StreamingQuery, defaults: &Defaults) -> Result<StatefulSet> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let claim = state_claim(query);
    let state = claim.is_none().then(|| Volume {
        name: "state".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    let claims = claim.map(|spec| {
        vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("state".to_owned()),
                labels: Some(labels(query)),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            ..PersistentVolumeClaim::default()
        }]
    });
    let template = pod_template(query, defaults, "Always", state, replica_env(query))?;
    Ok(StatefulSet {
        metadata: metadata(query, name.clone())?,
        spec: StatefulSetSpec {
            replicas: Some(desired_replicas(query)),
            service_name: Some(name),
            // Engine pods share nothing at start-up: start and stop them together.
            pod_management_policy: Some("Parallel".to_owned()),
            selector: selector(query),
            template,
            volume_claim_templates: claims,
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    })
}

/// The Job that runs an `availableNow` query to the end of its input once.
/// Its name carries a hash of its pod template, so that a new spec (or a
/// restart) is a new Job, a new run, while the Job of an unchanged spec is
/// left as it ended. Failed runs are retried with the Job controller's
/// backoff up to `spec.restartPolicy.maxRestarts` (its `backoffLimit`); the
/// state volume is an ephemeral claim per pod (state is restored from the
/// checkpoint).
pub fn job(query: &StreamingQuery, defaults: &Defaults) -> Result<Job> {
    let name = query
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let state = Volume {
        name: "state".to_owned(),
        ephemeral: state_claim(query).map(|spec| EphemeralVolumeSource {
            volume_claim_template: Some(PersistentVolumeClaimTemplate {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(query)),
                    ..ObjectMeta::default()
                }),
                spec,
            }),
        }),
        empty_dir: state_claim(query)
            .is_none()
            .then(EmptyDirVolumeSource::default),
        ..Volume::default()
    };
    let template = pod_template(query, defaults, "Never", Some(state), Vec::new())?;
    let run = fnv1a(&serde_json::to_string(&template)?);
    Ok(Job {
        metadata: metadata(query, format!("{name}-{}", &run[..8]))?,
        spec: Some(JobSpec {
            // Both may change on a Job that exists (its template may not).
            parallelism: Some(query.spec.replicas.unwrap_or(1).min(1)),
            suspend: Some(query.spec.is_suspended()),
            completions: Some(1),
            backoff_limit: Some(query.spec.max_restarts()),
            template,
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

#[cfg(test)]
mod builder_tests {
    use super::*;

    const QUERY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: fraud, namespace: risk, uid: 1234-abcd}
spec:
  sources: [{name: transactions, generator: {kind: transactions, rowsPerSecond: 100}}]
  query: SELECT * FROM transactions WHERE amount > 100
  sink: {console: {}}
"#;

    fn defaults() -> Defaults {
        Defaults {
            engine_image: "sluice:test".to_owned(),
        }
    }

    fn query(extra: &str) -> StreamingQuery {
        sluice_crds::load(&format!("{QUERY}{extra}"), "test").unwrap()
    }

    fn container(sts: &StatefulSet) -> &Container {
        &sts.spec.template.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn the_statefulset_runs_the_mounted_query_safely() {
        let sts = stateful_set(&query(""), &defaults()).unwrap();
        let spec = &sts.spec;
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("fraud"));
        assert_eq!(
            sts.metadata.owner_references.as_ref().unwrap()[0].name,
            "fraud"
        );
        let c = container(&sts);
        assert_eq!(c.image.as_deref(), Some("sluice:test"));
        assert_eq!(
            c.args.as_ref().unwrap(),
            &["run", "/etc/sluice/query.yaml", "--http-port", "9464"]
        );
        let security = c.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security
                .capabilities
                .as_ref()
                .unwrap()
                .drop
                .as_ref()
                .unwrap(),
            &["ALL"]
        );
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        };
        assert_eq!(
            (path(&c.liveness_probe), path(&c.readiness_probe)),
            ("/healthz".into(), "/readyz".into())
        );
        let template = spec.template.metadata.as_ref().unwrap();
        let annotations = template.annotations.as_ref().unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "9464");
        let volumes = spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .as_ref()
            .unwrap();
        assert_eq!(volumes[0].config_map.as_ref().unwrap().name, "fraud-query");
        assert!(
            volumes
                .iter()
                .any(|v| v.name == "state" && v.empty_dir.is_some())
        );
        assert_eq!(spec.selector.match_labels, template.labels);
    }

    #[test]
    fn suspend_scales_to_zero_and_replicas_are_taken_from_the_spec() {
        let suspended =
            stateful_set(&query("  suspend: true\n  replicas: 1\n"), &defaults()).unwrap();
        assert_eq!(suspended.spec.replicas, Some(0));
        let one = stateful_set(&query(""), &defaults()).unwrap();
        assert_eq!(one.spec.replicas, Some(1));
        let stopped = stateful_set(&query("  replicas: 0\n"), &defaults()).unwrap();
        assert_eq!(stopped.spec.replicas, Some(0));
    }

    #[test]
    fn a_spec_change_changes_the_pod_template_and_rolls_the_pods() {
        let hash = |q: &StreamingQuery| {
            stateful_set(q, &defaults())
                .unwrap()
                .spec
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[SPEC_HASH_ANNOTATION]
                .clone()
        };
        assert_eq!(hash(&query("")), hash(&query("")));
        assert_eq!(
            hash(&query("")),
            hash(&query("  replicas: 0\n  suspend: false\n")),
            "scaling rolls nothing"
        );
        let changed =
            sluice_crds::load(&QUERY.replace("amount > 100", "amount > 200"), "test").unwrap();
        assert_ne!(hash(&query("")), hash(&changed));
    }

    #[test]
    fn each_pod_knows_its_replica_and_the_count() {
        let env = |extra: &str| {
            let sts = stateful_set(&query(extra), &defaults()).unwrap();
            let env = container(&sts).env.clone().unwrap();
            let index = env.iter().find(|e| e.name == "SLUICE_REPLICA").unwrap();
            let count = env.iter().find(|e| e.name == "SLUICE_REPLICAS").unwrap();
            (
                index
                    .value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.field_path.clone()),
                count.value.clone(),
            )
        };
        assert_eq!(
            env(""),
            (
                Some("metadata.labels['apps.kubernetes.io/pod-index']".to_owned()),
                Some("1".to_owned())
            )
        );
        let mut three = query("");
        three.spec.replicas = Some(3);
        let sts = stateful_set(&three, &defaults()).unwrap();
        let env3 = container(&sts).env.clone().unwrap();
        assert_eq!(
            env3.iter()
                .find(|e| e.name == "SLUICE_REPLICAS")
                .and_then(|e| e.value.as_deref()),
            Some("3")
        );
        assert_eq!(
            env("  replicas: 0\n").1.as_deref(),
            Some("1"),
            "scaled to zero"
        );
    }

    #[test]
    fn engine_settings_reach_the_container() {
        let sts = stateful_set(
            &query(
                "  engine:\n    image: registry.example/sluice:2\n    env: [{name: AWS_REGION, value: eu-west-1}]\n    envFrom: [{secretRef: {name: s3-credentials}}]\n    resources: {requests: {cpu: 500m, memory: 1Gi}}\n    stateVolume: {size: 20Gi, storageClassName: fast}\n",
            ),
            &defaults(),
        )
        .unwrap();
        let c = container(&sts);
        assert_eq!(c.image.as_deref(), Some("registry.example/sluice:2"));
        let env = c.env.as_ref().unwrap();
        assert_eq!(env[0].name, "POD_NAME");
        // RocksDB's scratch directory is on the state volume.
        assert_eq!(
            (env[1].name.as_str(), env[1].value.as_deref()),
            ("SLUICE_STATE_DIR", Some("/var/lib/sluice/state"))
        );
        assert_eq!(
            (env[2].name.as_str(), env[2].value.as_deref()),
            ("AWS_REGION", Some("eu-west-1"))
        );
        assert_eq!(
            c.env_from.as_ref().unwrap()[0]
                .secret_ref
                .as_ref()
                .unwrap()
                .name,
            "s3-credentials"
        );
        assert_eq!(
            c.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"].0,
            "1Gi"
        );
        let spec = sts.spec;
        let claim = &spec.volume_claim_templates.unwrap()[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("state"));
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "20Gi"
        );
        let volumes = spec.template.spec.unwrap().volumes.unwrap();
        assert!(
            !volumes.iter().any(|v| v.name == "state"),
            "the claim replaces the emptyDir"
        );
    }

    #[test]
    fn the_service_is_headless_and_the_budget_takes_one_pod_at_a_time() {
        let q = query("");
        let svc = service(&q).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.ports.unwrap()[0].port, HTTP_PORT);
        assert_eq!(spec.selector, Some(labels(&q)));
        let pdb = pod_disruption_budget(&q).unwrap();
        assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn the_engine_reports_its_last_error_and_a_restart_rolls_the_pods() {
        let sts = stateful_set(&query(""), &defaults()).unwrap();
        assert_eq!(
            container(&sts).termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let mut restarted = query("");
        restarted.metadata.annotations = Some(BTreeMap::from([(
            RESTARTED_AT.to_owned(),
            "2026-11-21T10:00:00Z".to_owned(),
        )]));
        let again = stateful_set(&restarted, &defaults()).unwrap();
        let annotations = again.spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations[RESTARTED_AT], "2026-11-21T10:00:00Z");
    }

    #[test]
    fn an_available_now_query_is_a_job_named_after_its_pod_template() {
        let batch = |extra: &str| {
            sluice_crds::load(
                &format!(
                    "{}  trigger: {{availableNow: true}}\n  restartPolicy: {{maxRestarts: 2}}\n{extra}",
                    QUERY.replace("rowsPerSecond: 100", "rowsPerSecond: 100, totalRows: 1000")
                ),
                "test",
            )
            .unwrap()
        };
        let job = job(&batch(""), &defaults()).unwrap();
        let name = job.metadata.name.clone().unwrap();
        assert!(name.starts_with("fraud-") && name.len() == 14, "{name}");
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(2));
        assert_eq!((spec.completions, spec.parallelism), (Some(1), Some(1)));
        assert_eq!(spec.suspend, Some(false));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(
            pod.volumes
                .unwrap()
                .iter()
                .any(|v| v.name == "state" && v.empty_dir.is_some())
        );
        // The same spec is the same Job; another spec, or a restart, another.
        let same = super::job(&batch(""), &defaults()).unwrap();
        assert_eq!(same.metadata.name.as_deref(), Some(name.as_str()));
        let other = super::job(&batch("  statePartitions: 4\n"), &defaults()).unwrap();
        assert_ne!(other.metadata.name.as_deref(), Some(name.as_str()));
        // Suspending or scaling to zero keeps the Job and stops its pod.
        let suspended = super::job(&batch("  suspend: true\n"), &defaults()).unwrap();
        assert_eq!(suspended.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(suspended.spec.unwrap().suspend, Some(true));
        let stopped = super::job(&batch("  replicas: 0\n"), &defaults()).unwrap();
        assert_eq!(stopped.spec.unwrap().parallelism, Some(0));
    }

    #[test]
    fn a_jobs_state_volume_is_an_ephemeral_claim() {
        let text = format!(
            "{}  trigger: {{availableNow: true}}\n  engine:\n    stateVolume: {{size: 5Gi, storageClassName: fast}}\n",
            QUERY.replace("rowsPerSecond: 100", "rowsPerSecond: 100, totalRows: 1000")
        );
        let job = job(&sluice_crds::load(&text, "test").unwrap(), &defaults()).unwrap();
        let volumes = job.spec.unwrap().template.spec.unwrap().volumes.unwrap();
        let state = volumes.iter().find(|v| v.name == "state").unwrap();
        assert!(state.empty_dir.is_none());
        let claim = state
            .ephemeral
            .as_ref()
            .unwrap()
            .volume_claim_template
            .as_ref()
            .unwrap();
        assert_eq!(claim.spec.storage_class_name.as_deref(), Some("fast"));
    }
}
