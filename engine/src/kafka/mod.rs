//! The Kafka connector: a source that reads topics by exact per-partition
//! ranges (`source.rs`), a sink that writes each batch in one transaction
//! (`sink.rs`) and ends the transactions a broker left open on its
//! partitions (`hanging.rs`, over Kafka requests of its own: `wire.rs`),
//! and what they share: client settings with their secrets,
//! offsets as Spark writes them, and errors that say who must act.
//!
//! Every call into librdkafka blocks; the connector makes them on Tokio's
//! blocking threads, so the engine's HTTP endpoints answer meanwhile.

mod avro;
pub mod hanging;
pub mod sink;
pub mod source;
pub mod wire;

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde_json::Value;
use sluice_crds::SecretOption;

use crate::{Error, Result};

/// How long a metadata, offsets or transaction call may take before the
/// broker counts as unavailable.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Per topic and partition, an offset: Spark's JSON shape,
/// `{"topic": {"0": 42, "1": 7}}`.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): the
/// hash of a record's key its default partitioner takes.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner (the Java client's, Kafka
/// Streams', librdkafka's `murmur2_random`) gives a record with `key`, of
/// `partitions`.
pub fn default_partition(key: &[u8], partitions: usize) -> usize {
    (murmur2(key) & 0x7fff_ffff) as usize % partitions
}

/// The JSON of offsets.
pub fn offsets_json(offsets: &Offsets) -> Value {
    Value::Object(
        offsets
            .iter()
            .map(|(topic, partitions)| {
                (
                    topic.clone(),
                    Value::Object(
                        partitions
                            .iter()
                            .map(|(p, o)| (p.to_string(), Value::from(*o)))
                            .collect(),
                    ),
                )
            })
            .collect(),
    )
}

/// Offsets from their JSON; `None` when `value` is not offsets.
pub fn offsets_from_json(value: &Value) -> Option<Offsets> {
    let mut out = Offsets::new();
    for (topic, partitions) in value.as_object()? {
        let mut offsets = BTreeMap::new();
        for (p, o) in partitions.as_object()? {
            offsets.insert(p.parse().ok()?, o.as_i64()?);
        }
        out.insert(topic.clone(), offsets);
    }
    Some(out)
}

/// A client configuration: the brokers, the user's settings, the secrets
/// read from where the spec says (never logged), and `defaults` under the
/// user's settings. `field` is the spec field, for errors.
pub fn client_config(
    brokers: &str,
    options: &BTreeMap<String, String>,
    secrets: &[SecretOption],
    defaults: &[(&str, &str)],
    field: &str,
) -> Result<ClientConfig> {
    let mut config = ClientConfig::new();
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    config.set("bootstrap.servers", brokers);
    for (key, value) in options {
        config.set(key, value);
    }
    for (i, secret) in secrets.iter().enumerate() {
        let value = match (&secret.env, &secret.file) {
            (Some(var), _) => std::env::var(var).map_err(|_| Error::Unsupported {
                path: format!("{field}.secretOptions[{i}].env"),
                message: format!(
                    "the environment variable {var} (for {}) is not set: set it, e.g. from a Kubernetes Secret",
                    secret.name
                ),
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|v| v.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| Error::Unsupported {
                    path: format!("{field}.secretOptions[{i}].file"),
                    message: format!("cannot read {file} (for {}): {e}", secret.name),
                })?,
            (None, None) => continue,
        };
        config.set(&secret.name, value);
    }
    Ok(config)
}

/// Whether a retry can help with a Kafka error: the broker is down or
/// moving, a request timed out.
fn transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | Resolve
            | AllBrokersDown
            | OperationTimedOut
            | TimedOutQueue
            | RequestTimedOut
            | BrokerNotAvailable
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NetworkException
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | NotCoordinator
            | ConcurrentTransactions
            | QueueFull
            // librdkafka's own, while it has no leader for the partition
            // (a broker down): the next metadata fetch tells whether the
            // partition is really gone.
            | UnknownPartition
            | UnknownTopic
    )
}

/// Whether a Kafka error refuses the producer's epoch: another producer
/// with this transactional id took over, or the coordinator aborted a
/// transaction that outlived `transaction.timeout.ms` and bumped the epoch
/// (brokers answer either with either code, depending on the request and
/// its version).
fn epoch_refused(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(code, Fenced | ProducerFenced | InvalidProducerEpoch)
}

/// What a Kafka error means for the engine: `what` says what was done, and
/// against which brokers (never a secret).
pub fn classify(what: String, err: &KafkaError, user_error: impl FnOnce(String) -> Error) -> Error {
    let code = match err {
        KafkaError::Transaction(e) => Some(e.code()),
        other => other.rdkafka_error_code(),
    };
    let message = format!("{what}: {err}");
    match code {
        Some(code) if epoch_refused(code) => Error::TransactionAborted {
            message: format!(
                "{message}: the broker no longer takes this run's transaction (another run opened the sink with the same transactional id, or the coordinator aborted the transaction after transaction.timeout.ms)"
            ),
        },
        Some(code) if transient(code) => Error::Unavailable {
            what: "Kafka".into(),
            message,
        },
        _ if matches!(err, KafkaError::Transaction(e) if e.is_retriable()) => Error::Unavailable {
            what: "Kafka".into(),
            message,
        },
        _ => user_error(message),
    }
}

/// How long dropping a consumer waits for it to close before leaving it
/// to close in the background.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Drops a consumer that has a group on a thread of its own, waiting
/// [`CLOSE_WAIT`] at most for it to close.
///
/// NB: rdkafka's `BaseConsumer` closes itself when dropped and polls until
/// the group says it is closed, which waits for the group coordinator:
/// through a broker outage (with an offset commit queued for it) that took
/// as long as the outage. Dropped in place, a run that failed for the
/// outage sat in the drop until the broker came back, and the query
/// neither restarted nor said why (e2e/kafka.sh, the 120 s outage). With
/// the brokers up a consumer closes at once, its last offset commit (for
/// monitoring) sent before the process exits; without them nothing needs
/// the close: the commits it settles are for monitoring, and the marker
/// consumer's group is read again by the next run.
pub fn close_in_background(consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>) {
    let (closed, done) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("sluice-kafka-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = closed.send(());
        });
    match spawned {
        Ok(_) => {
            if done.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!(
                    "A Kafka consumer is still closing after {} s (the brokers do not answer): left to close in the background.",
                    CLOSE_WAIT.as_secs()
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Could not start a thread to close a Kafka consumer.")
        }
    }
}

/// Runs a blocking Kafka call on Tokio's blocking threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::State(format!("a Kafka call panicked: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients() {
        // Kafka's own UtilsTest, and librdkafka's rdmurmur2 unit test.
        for (key, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("kafka", 0xd067_cf64_u32 as i32),
        ] {
            assert_eq!(murmur2(key.as_bytes()), expected, "{key}");
        }
        assert!((0..1000).all(|i| default_partition(format!("k{i}").as_bytes(), 6) < 6));
    }

    #[test]
    fn a_refused_epoch_is_told_apart_from_an_outage_and_a_user_error() {
        let user = |message| Error::Sink {
            sink: "k".into(),
            message,
        };
        for code in [
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::ProducerFenced,
        ] {
            let err = classify(
                "committing".into(),
                &KafkaError::MessageProduction(code),
                user,
            );
            assert!(matches!(err, Error::TransactionAborted { .. }), "{err}");
            assert!(!err.is_transient(), "judged by the runner's fence first");
        }
        let err = classify(
            "committing".into(),
            &KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure),
            user,
        );
        assert!(err.is_transient(), "{err}");
        let err = classify(
            "committing".into(),
            &KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
            user,
        );
        assert!(matches!(err, Error::Sink { .. }), "{err}");
    }

    #[test]
    fn offsets_are_sparks_json() {
        let mut offsets = Offsets::new();
        offsets.insert("t".into(), BTreeMap::from([(0, 42), (1, 7)]));
        let json = offsets_json(&offsets);
        assert_eq!(json, serde_json::json!({"t": {"0": 42, "1": 7}}));
        assert_eq!(offsets_from_json(&json), Some(offsets));
        assert_eq!(
            offsets_from_json(&serde_json::json!({"lastFile": "x"})),
            None
        );
    }

    #[test]
    fn secrets_come_from_the_environment_or_files_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let secrets = vec![SecretOption {
            name: "sasl.password".into(),
            env: None,
            file: Some(file.display().to_string()),
        }];
        let config =
            client_config("k:9092", &BTreeMap::new(), &secrets, &[], "spec.sink.kafka").unwrap();
        assert_eq!(config.get("sasl.password"), Some("s3cret"));
        let missing = vec![SecretOption {
            name: "sasl.password".into(),
            env: Some("SLUICE_TEST_UNSET_VARIABLE".into()),
            file: None,
        }];
        let err = client_config("k:9092", &BTreeMap::new(), &missing, &[], "spec.sink.kafka")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("spec.sink.kafka.secretOptions[0].env: the environment variable SLUICE_TEST_UNSET_VARIABLE"),
            "{err}"
        );
    }
}
