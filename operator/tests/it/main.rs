//! The operator's integration tests, one binary: the reconciler against a
//! mocked API server (`reconcile`), the leader election's writes (`lease`),
//! reading engine pods' progress over real HTTP (`progress`), and the
//! shipped manifests (`manifests`).

mod api_server;
mod lease;
mod manifests;
mod progress;
mod reconcile;
