//! Engine integration tests: one binary, a module per area.

mod cli;
mod crash;
mod examples;
mod faults;
mod hanging;
mod kafka;
mod pipeline;
mod replay;
mod sql;
mod upgrade;
mod zombie;

use std::path::PathBuf;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}
