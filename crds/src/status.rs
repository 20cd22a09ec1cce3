//! What the operator reports back on a `StreamingQuery`. Written only by the
//! operator, through the status subresource.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The observed state of a StreamingQuery.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamingQueryStatus {
    /// Pending, Running, Suspended, Failed or Completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Engine pods running the query (for the `/scale` subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// The label selector of the engine pods (for the `/scale` subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// A summary of the latest progress reported by the engine pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressSummary>,
    /// The last error, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Engine failures counted against `spec.restartPolicy.maxRestarts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Failures>,
    /// The last spec whose engine ran (every pod ready and a batch
    /// completed), as JSON: what `spec.restartPolicy.rollback` goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec: Option<String>,
    /// The generation of `lastStableSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_generation: Option<i64>,
    /// The generation whose spec the engine pods run, when it is not
    /// `metadata.generation`: a failed change was rolled back to
    /// `lastStableSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_generation: Option<i64>,
    /// What the autoscaler decided, while `spec.autoscaling` is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The Job that runs (or ran) the current spec of an `availableNow`
    /// query: `kubectl logs job/<job>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// The autoscaler's view of a query: what it runs, what it recommends and
/// why, from what it measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The replicas the autoscaler runs (the StatefulSet's).
    pub replicas: i32,
    /// What the latest measurement calls for, before the stabilization
    /// windows.
    pub recommended_replicas: i32,
    /// Why, in words.
    pub reason: String,
    /// When the autoscaler last changed the replicas, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// Records a second arriving at the source, over the metric window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_rows_per_second: Option<f64>,
    /// What the slowest replica processes a second when busy: what the CPU
    /// its batches' overhead leaves buys at the records' cost, at most what
    /// it was last seen to process while it stayed behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_processing_rate: Option<f64>,
    /// Records behind the source's latest offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
}

/// The operator's count of engine failures for one revision of the spec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failures {
    /// The revision counted: `<generation>`, or `<generation>@<restartedAt>`
    /// once the query was restarted (the `sluice.dev/restartedAt`
    /// annotation); another revision counts from zero.
    pub revision: String,
    /// The failures counted: a continuous query's engine restarts since the
    /// revision was applied or last completed a batch; an `availableNow`
    /// query's failed runs.
    pub restarts: i32,
    /// The kubelet's restart counters, summed over the engine pods, that
    /// `restarts` counts from (they only grow while a pod lives).
    #[serde(default)]
    pub restart_count_base: i32,
    /// Whether `restarts` went past `maxRestarts`: the revision's engine is
    /// stopped (phase `Failed`), or a rollback runs `lastStableSpec`.
    #[serde(default)]
    pub gave_up: bool,
    /// The engine's last error seen for this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The lifecycle phase of a query.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted; engine pods are not running yet.
    Pending,
    /// Engine pods are running batches.
    Running,
    /// Stopped by `spec.suspend`; the checkpoint is kept.
    Suspended,
    /// Stopped by an error that needs the user: see `lastError` and the
    /// `Degraded` condition.
    Failed,
    /// An `availableNow` query processed all its input and stopped.
    Completed,
}

/// A condition, as Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word saying why.
    pub reason: String,
    /// The details, for a person.
    pub message: String,
    /// When `status` last changed, RFC 3339.
    pub last_transition_time: String,
    /// The spec generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The latest progress of a query, summed over its engine pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressSummary {
    /// The latest committed batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<i64>,
    /// Input rows per second over the latest batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_rows_per_second: Option<f64>,
    /// Rows processed per second of batch time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_rows_per_second: Option<f64>,
    /// The event-time watermark, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// Rows held in state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_rows: Option<i64>,
    /// Source records not yet processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// When the latest batch was committed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit_time: Option<String>,
}
