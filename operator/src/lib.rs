//! The Sluice operator: reconciles `StreamingQuery` resources into engine
//! pods and writes their progress back into the resource's status.
//!
//! Most of it is pure: [`objects`] builds the desired objects, [`status`]
//! computes the status from what was observed, [`changes`] decides which
//! spec changes the checkpoint can take, [`lifecycle`] what runs when the
//! engine keeps failing, [`autoscaler`] how many replicas a query needs
//! (not called yet: scale-out is not built). [`controller`] makes the API calls,
//! [`lease`] elects one leader among the operator's replicas, [`metrics`]
//! counts what the controller does, [`progress`] reads the engine pods'
//! `/progress`.

pub mod autoscaler;
pub mod broker;
pub mod changes;
pub mod controller;
pub mod events;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod objects;
pub mod progress;
pub mod status;

/// The errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource lacks a field every object is built from.
    #[error("StreamingQuery has no {0}")]
    Missing(&'static str),
    /// A desired object could not be serialized.
    #[error("cannot serialize the spec: {0}")]
    Serialize(#[from] serde_yaml::Error),
    /// A desired object could not be turned into JSON for the API server.
    #[error("cannot serialize an object: {0}")]
    Json(#[from] serde_json::Error),
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed, or the apply or cleanup it
    /// wraps did.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not an error: the cleanup waits for something (engine pods to stop)
    /// and is retried shortly.
    #[error("waiting: {0}")]
    Waiting(String),
    /// The leader-election Lease could not be read or written.
    #[error("leader election: {0}")]
    Lease(String),
    /// The controller cannot start (no CRD, no permission).
    #[error("cannot start: {0}")]
    Setup(String),
}

impl Error {
    /// A short label for the `reason` of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Missing(_) => "missing_field",
            Error::Serialize(_) | Error::Json(_) => "serialize",
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api_rejected",
            Error::Kube(_) => "api_unreachable",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Waiting(_) => "waiting",
            Error::Lease(_) => "lease",
            Error::Setup(_) => "setup",
        }
    }

    /// Whether this is the cleanup waiting rather than something failing.
    pub fn is_waiting(&self) -> bool {
        match self {
            Error::Waiting(_) => true,
            Error::Finalizer(inner) => matches!(
                inner.as_ref(),
                kube::runtime::finalizer::Error::CleanupFailed(Error::Waiting(_))
            ),
            _ => false,
        }
    }
}

/// The `Result` of the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
