//! The dead-letter destination: malformed records set aside with where they
//! came from and why, instead of stopping the query. Batch N's records from
//! source S go to `<dir>/<S>-<N>.jsonl`, written through a temporary file and
//! a rename, so a batch replayed after a crash writes the same file again
//! rather than adding its records twice.

use std::path::{Path, PathBuf};

use crate::source::BadRecord;
use crate::{Error, Result};

/// Writes a batch's malformed records; returns the file.
pub async fn write(
    dir: &Path,
    source: &str,
    batch_id: u64,
    records: &[BadRecord],
) -> Result<PathBuf> {
    let path = dir.join(format!("{source}-{batch_id:08}.jsonl"));
    let mut text = Vec::new();
    for record in records {
        serde_json::to_writer(&mut text, record).expect("a bad record serializes");
        text.push(b'\n');
    }
    let (target, dir) = (path.clone(), dir.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        crate::storage::write_local_atomically(&target, &text)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(|e| Error::Source {
        source_name: source.to_owned(),
        message: format!("cannot write the dead letters to {}: {e}", path.display()),
    })?;
    Ok(path)
}
