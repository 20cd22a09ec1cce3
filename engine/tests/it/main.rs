//! Engine integration tests: one binary, a module per area.

mod cli;
mod crash;
mod examples;
mod pipeline;
mod sql;

use std::path::PathBuf;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}
