//! Asks a query's Kafka brokers how many records wait for it, while it is
//! scaled to zero and no engine runs to say so: the partitions' latest
//! offsets against the offsets the engines committed to the query's
//! consumer group (`sluice-<name>`, or the source's `groupId`), as KEDA's
//! Kafka scaler does. The engines commit each batch's end there after the
//! batch is committed, so an idle query's group is at the latest offsets.
//!
//! The operator connects with the source's `bootstrapServers` and
//! `options`; a `secretOptions` entry is read from the operator's own
//! environment or files (the engine pods' Secrets are not the operator's):
//! one that is missing there is named in the error, and the query stays at
//! zero until the operator can ask.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use regex::Regex;
use sluice_crds::{KafkaSource, StreamingQuery};

/// How long one request to the broker may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The records the query's Kafka sources hold beyond its group's committed
/// offsets (a partition the group never committed counts all it holds), or
/// why the brokers could not be asked. Blocking: call it off the runtime.
pub fn waiting_records(query: &StreamingQuery) -> Result<u64, String> {
    let name = query.metadata.name.clone().unwrap_or_default();
    let mut total = 0;
    for (i, source) in query.spec.sources.iter().enumerate() {
        let Some(kafka) = &source.kafka else {
            continue;
        };
        let path = format!("spec.sources[{i}].kafka");
        total += source_lag(kafka, &name, &path)?;
    }
    Ok(total)
}

fn source_lag(kafka: &KafkaSource, query: &str, path: &str) -> Result<u64, String> {
    let group = kafka
        .group_id
        .clone()
        .unwrap_or_else(|| format!("sluice-{query}"));
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("client.id", format!("sluice-operator-{query}"));
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    for secret in &kafka.secret_options {
        let value = match (&secret.env, &secret.file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                format!(
                    "{path}.secretOptions {}: the environment variable {var} is not set in the operator",
                    secret.name
                )
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|v| v.trim_end_matches('\n').to_owned())
                .map_err(|e| {
                    format!(
                        "{path}.secretOptions {}: cannot read {file} in the operator: {e}",
                        secret.name
                    )
                })?,
            (None, None) => continue,
        };
        config.set(&secret.name, value);
    }
    config
        .set("group.id", &group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| format!("{path}: cannot create a Kafka client: {e}"))?;
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| format!("{path}: {} did not answer: {e}", kafka.bootstrap_servers))?;
    let wanted = Topics::of(kafka).map_err(|e| format!("{path}: {e}"))?;
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        if wanted.matches(topic.name()) {
            for p in topic.partitions() {
                partitions.add_partition(topic.name(), p.id());
            }
        }
    }
    if partitions.count() == 0 {
        return Ok(0);
    }
    let committed = consumer
        .committed_offsets(partitions.clone(), TIMEOUT)
        .map_err(|e| format!("{path}: cannot read group {group}'s offsets: {e}"))?;
    let mut lag = 0u64;
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), TIMEOUT)
            .map_err(|e| {
                format!(
                    "{path}: cannot read the offsets of {}-{}: {e}",
                    element.topic(),
                    element.partition()
                )
            })?;
        let from = match element.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        lag += (high - from).max(0) as u64;
    }
    Ok(lag)
}

/// The topics a source reads.
enum Topics {
    Named(Vec<String>),
    Pattern(Regex),
}

impl Topics {
    fn of(kafka: &KafkaSource) -> Result<Self, String> {
        if let Some(pattern) = &kafka.topic_pattern {
            return Regex::new(&format!("^(?:{pattern})$"))
                .map(Topics::Pattern)
                .map_err(|e| format!("topicPattern is not a regular expression: {e}"));
        }
        Ok(Topics::Named(
            kafka
                .topic
                .iter()
                .chain(kafka.topics.iter().flatten())
                .cloned()
                .collect(),
        ))
    }

    fn matches(&self, topic: &str) -> bool {
        match self {
            Topics::Named(names) => names.iter().any(|n| n == topic),
            Topics::Pattern(re) => re.is_match(topic),
        }
    }
}
