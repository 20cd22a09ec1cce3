//! The Sluice operator: reconciles `StreamingQuery` resources into engine
//! pods.
//!
//! NB: this crate holds only the pure builders of desired objects so far.
//! The controller (reconcile, status, finalizer, leader election) and its
//! binary are not built yet; the engine runs queries with `sluice run`.

pub mod objects;
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
}

/// The `Result` of the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
