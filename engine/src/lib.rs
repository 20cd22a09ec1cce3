//! The Sluice streaming engine: runs a `StreamingQuery` as micro-batches of
//! SQL on DataFusion. `sluice run` drives it from a file; engine pods drive it
//! from a mounted ConfigMap.

pub mod checkpoint;
pub mod dead_letter;
pub mod fault;
pub mod health;
pub mod http;
pub mod kafka;
pub mod monitor;
pub mod operators;
pub mod plan;
pub mod replicas;
pub mod runner;
pub mod shuffle;
pub mod sink;
pub mod source;
pub mod state;
pub mod storage;
pub mod watermark;
pub mod window;

pub use runner::{RunOptions, Runner, Stopped, Summary, check, run_query};

/// The errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec could not be loaded, or has problems.
    #[error(transparent)]
    Spec(#[from] sluice_crds::Error),
    /// The spec asks for something this engine does not do (yet).
    #[error("{path}: {message}")]
    Unsupported {
        /// The field.
        path: String,
        /// What is not supported, and what to do instead.
        message: String,
    },
    /// The SQL does not plan against the sources' schemas.
    #[error("spec.query: {0}")]
    Plan(String),
    /// A batch failed while running the query.
    #[error("batch {batch_id}: the query failed: {source}")]
    Execute {
        /// The batch.
        batch_id: u64,
        /// Why.
        source: datafusion::error::DataFusionError,
    },
    /// A source could not read.
    #[error("source {source_name}: {message}")]
    Source {
        /// The source's name.
        source_name: String,
        /// What failed: the file, the line, why.
        message: String,
    },
    /// A source was handed an offset it does not understand.
    #[error("source {source_name}: offset {offset} is not {expected}")]
    Offset {
        /// The source's name.
        source_name: String,
        /// The offset, as JSON.
        offset: String,
        /// What the source expected.
        expected: String,
    },
    /// The checkpoint cannot be used: damaged, or another query's.
    #[error("checkpoint {file}: {message}")]
    Checkpoint {
        /// The file (or directory) at fault.
        file: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A storage location refused a request: credentials, permissions, a
    /// missing bucket, a full disk. Someone must act; retrying will not help.
    #[error("{file}: {message}")]
    Storage {
        /// The object or directory.
        file: String,
        /// What failed.
        message: String,
    },
    /// An external system (object store, broker) failed or could not be
    /// reached: retrying can help. The runner restarts the query from its
    /// checkpoint with backoff.
    #[error("{what} is unavailable: {message}")]
    Unavailable {
        /// The system, object or address.
        what: String,
        /// What failed.
        message: String,
    },
    /// Another run of this query took the checkpoint over: this one stops
    /// without writing more.
    #[error("fenced: {message}")]
    Fenced {
        /// Who took over, and where it was seen.
        message: String,
    },
    /// The broker refused this run's transaction for its producer epoch:
    /// either another run opened the sink with the same transactional id
    /// (a zombie is fenced), or the transaction coordinator aborted the
    /// transaction and bumped the epoch because it stayed open past
    /// `transaction.timeout.ms` (as it does through a broker outage). The
    /// runner tells the two apart by its checkpoint's fence: fenced when a
    /// newer run claimed the checkpoint, else restarted like
    /// [`Error::Unavailable`].
    #[error("{message}")]
    TransactionAborted {
        /// What was done, and the broker's answer.
        message: String,
    },
    /// The checkpoint's state was written by a query that kept other state
    /// (another aggregation, other grouping columns): refused, naming them.
    #[error(
        "{location}: the query's state changed since the checkpoint was written: {message}; undo the change to the query, or point spec.checkpoint.location at a new location to start over"
    )]
    StateSchema {
        /// The state in the checkpoint.
        location: String,
        /// Which columns changed.
        message: String,
    },
    /// The sink could not write.
    #[error("sink {sink}: {message}")]
    Sink {
        /// The sink's description.
        sink: String,
        /// Why.
        message: String,
    },
    /// The state store failed (RocksDB, or uploading its checkpoint).
    #[error("state store: {0}")]
    State(String),
    /// The HTTP endpoints could not be served.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether a retry can help: the runner restarts the query from its
    /// checkpoint, with backoff, instead of stopping.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

/// The `Result` of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
