//! The dead-letter destinations: malformed records set aside with where
//! they came from and why, instead of stopping the query, exactly once per
//! batch like the sink's output.
//!
//! - A directory: batch N's records from source S go to
//!   `<dir>/<S>-<N>.jsonl` (`file`, `line`, `error`, `record`), written
//!   through a temporary file and a rename, so a replayed batch writes the
//!   same file again rather than adding its records twice.
//! - A Kafka topic: each record with its original key and value, and
//!   headers saying where it came from and why (`sluice.source`,
//!   `sluice.source.topic`, `sluice.source.partition`,
//!   `sluice.source.offset`, or `sluice.source.file` and
//!   `sluice.source.line`, and `sluice.error`), in one transaction per batch
//!   with the Kafka sink's protocol (`crate::kafka::sink`), so a replayed
//!   batch whose dead letters were committed does not write them again.

use std::path::{Path, PathBuf};

use crate::kafka::sink::{KafkaSink, OutRecord};
use crate::sink::{Sink, SinkContext};
use crate::source::BadRecord;
use crate::{Error, Result};

/// Where a source's malformed records go.
pub enum DeadLetters {
    /// A local directory.
    Dir(PathBuf),
    /// A Kafka topic.
    Kafka(Box<KafkaSink>),
}

impl DeadLetters {
    /// The destination of a source spec's `deadLetter`, if it has one.
    pub fn of(source: &sluice_crds::Source) -> Result<Option<Self>> {
        let Some(spec) = &source.dead_letter else {
            return Ok(None);
        };
        if let Some(path) = &spec.path {
            return Ok(Some(Self::Dir(PathBuf::from(
                path.strip_prefix("file://").unwrap_or(path),
            ))));
        }
        let Some(topic) = &spec.kafka else {
            return Ok(None);
        };
        let (brokers, options, secrets) = match &source.kafka {
            Some(k) => (
                topic
                    .bootstrap_servers
                    .clone()
                    .unwrap_or_else(|| k.bootstrap_servers.clone()),
                k.options.clone(),
                k.secret_options.clone(),
            ),
            None => (
                topic.bootstrap_servers.clone().unwrap_or_default(),
                Default::default(),
                Vec::new(),
            ),
        };
        // The transactional id is set when the run opens it.
        Ok(Some(Self::Kafka(Box::new(KafkaSink::for_dead_letters(
            &brokers,
            &topic.topic,
            &options,
            &secrets,
            String::new(),
        )?))))
    }

    /// Opens it for a run of the query, for the source `source`.
    pub async fn open(&mut self, context: &SinkContext, source: &str) -> Result<()> {
        match self {
            Self::Dir(_) => Ok(()),
            Self::Kafka(sink) => {
                sink.set_transactional_id(format!(
                    "sluice-{}-dead-letters-{source}",
                    context.query_id
                ));
                // NB: the sink scopes the id to the replica when it opens.
                sink.open(context).await
            }
        }
    }

    /// Writes batch `batch_id`'s malformed records from `source` (once: a
    /// replay whose records were committed writes nothing); says where.
    pub async fn write(
        &mut self,
        source: &str,
        batch_id: u64,
        records: &[BadRecord],
    ) -> Result<String> {
        match self {
            Self::Dir(dir) => write(dir, source, batch_id, records)
                .await
                .map(|p| p.display().to_string()),
            Self::Kafka(sink) => {
                let description = sink.description();
                if sink.is_committed(batch_id).await? {
                    return Ok(description);
                }
                let out = records.iter().map(|r| kafka_record(source, r)).collect();
                sink.prepare_records(batch_id, out).await?;
                sink.commit(batch_id).await?;
                Ok(description)
            }
        }
    }
}

/// A malformed record as a dead-letter record.
fn kafka_record(source: &str, r: &BadRecord) -> OutRecord {
    let text = |s: String| Some(s.into_bytes());
    let mut headers = vec![("sluice.source".to_owned(), text(source.to_owned()))];
    let (key, value) = match &r.kafka {
        Some(k) => {
            headers.push(("sluice.source.topic".into(), text(k.topic.clone())));
            headers.push((
                "sluice.source.partition".into(),
                text(k.partition.to_string()),
            ));
            headers.push(("sluice.source.offset".into(), text(k.offset.to_string())));
            (k.key.clone(), k.value.clone())
        }
        None => {
            headers.push(("sluice.source.file".into(), text(r.file.clone())));
            headers.push(("sluice.source.line".into(), text(r.line.to_string())));
            (None, Some(r.record.clone().into_bytes()))
        }
    };
    headers.push(("sluice.error".into(), text(r.error.clone())));
    OutRecord {
        topic: None,
        partition: None,
        key,
        value,
        headers,
    }
}

/// Writes a batch's malformed records to a directory; returns the file.
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
