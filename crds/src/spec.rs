//! The `StreamingQuery` custom resource: what a user writes. The same type is
//! read by `sluice run` from a file and by the operator from the API server.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::StreamingQueryStatus;

/// A streaming SQL query: where its rows come from, the SQL that transforms
/// them, where the results go, and how often it runs.
// NB: each printcolumn(...) names its own `type_`; clippy reads the repeats as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "StreamingQuery",
    namespaced,
    shortname = "sq",
    status = "StreamingQueryStatus",
    derive = "PartialEq",
    doc = "A streaming SQL query run as micro-batches by Sluice engine pods.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Recommended",
        type_ = "integer",
        json_path = ".status.autoscaling.recommendedReplicas"
    ),
    printcolumn(
        name = "Input/s",
        type_ = "number",
        json_path = ".status.progress.inputRowsPerSecond"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.progress.lag"),
    printcolumn(
        name = "Watermark",
        type_ = "string",
        json_path = ".status.progress.watermark",
        priority = 1
    ),
    printcolumn(
        name = "Last Batch",
        type_ = "date",
        json_path = ".status.progress.lastCommitTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamingQuerySpec {
    /// The input streams. Each is a table the query reads under its `name`.
    // NB: the API server estimates the cost of each item's CEL rule over the
    // longest list the schema allows; without a bound it refuses the CRD.
    #[schemars(length(min = 1, max = 64))]
    pub sources: Vec<Source>,
    /// Static tables the query may join the streams with (stream-static
    /// joins): files read again by every batch, as Spark re-reads a static
    /// DataFrame, so an updated file is seen by the next batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<StaticTable>,
    /// The SQL query, run by DataFusion over each micro-batch. It reads the
    /// sources by name, e.g. `SELECT user_id, amount FROM transactions WHERE amount > 100`.
    pub query: String,
    /// Where the query's results are written.
    pub sink: Sink,
    /// Which rows each batch writes to the sink: `append` (new rows only, the
    /// default, as in Spark), `update` (changed rows) or `complete` (the whole
    /// result every batch).
    #[serde(default, skip_serializing_if = "is_default")]
    pub output_mode: OutputMode,
    /// When batches run. Without it, each batch starts as soon as the previous
    /// one ends and new data is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// Where offsets and state are checkpointed, so that a restarted query
    /// resumes where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The number of partitions that state is split into by key hash. Fixed
    /// when the query is first started, as `spark.sql.shuffle.partitions` is
    /// for a Spark checkpoint. Default 16. On several replicas, also the
    /// partition count of the query's repartition topic
    /// (`sluice-<name>-repartition`), and the most replicas its stateful
    /// part can use. With a keyed source (`keyedBy`), the state is split as
    /// the topic is instead, and this must equal the topic's partition
    /// count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub state_partitions: Option<u32>,
    /// Stop the engine pods and keep the checkpoint; set back to false to
    /// resume where the query stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// The number of engine pods: 1 (the default) runs the query, 0 stops
    /// it. More than one splits the partitions of Kafka sources between
    /// the pods (a Kafka sink and a checkpoint needed); a stateful query's
    /// rows (`GROUP BY`, session windows, `SELECT DISTINCT`) are
    /// repartitioned by key between them through a Kafka topic, unless the
    /// topic is keyed with `keyedBy` (complete mode runs on one pod in this
    /// version). The `/scale` subresource sets it
    /// (`kubectl scale`, KEDA, an HPA). Ignored while `autoscaling` is
    /// enabled: the operator then picks the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Scale the engine pods on the source's lag: the operator picks the
    /// replicas from the engines' progress (each replica's processing rate
    /// over its busy time, the input rate, the lag) and writes them to the
    /// StatefulSet and to `status.autoscaling`, never to `spec.replicas`
    /// (a GitOps tool sees no drift). For queries that scale out: Kafka
    /// sources, a Kafka sink, a checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// How the engine pods run: image, resources, environment, state volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSpec>,
    /// After how long without a completed batch, while one is due (the
    /// trigger is active: a source being read, a batch running, a sink
    /// writing), the engine's `/healthz` reports the query stalled, e.g.
    /// `10m`; on Kubernetes the liveness probe then restarts the engine pod
    /// and the status says so. Waiting for data or for the next trigger is
    /// not a stall. Default: never (a long first batch is not mistaken for
    /// a hang).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<String>,
    /// What the operator does when the engine keeps failing: how many
    /// restarts before the query is `Failed`, and whether a spec change
    /// whose engine fails is rolled back to the last spec that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
}

/// How the operator scales a query on its lag, after Flink's Kubernetes
/// autoscaler: enough replicas to keep up with the input at
/// `targetUtilization` and to drain the lag within `catchUpWithin`,
/// counting `restartTime`; scale-ups at once (or after `scaleUpWindow`),
/// scale-downs only once `scaleDownWindow` held nothing higher.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// Whether the operator scales the query. Default true; `false` keeps
    /// these settings and leaves the count to `spec.replicas` (`kubectl
    /// scale`, KEDA, an HPA): never turn both on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The fewest replicas while records flow. Default 1. A query starts
    /// on one replica until an engine's report shows it can run on several
    /// (complete mode runs on one in this version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: Option<i32>,
    /// The most replicas. The source's partition count caps them too: a
    /// replica more would own no partition.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// The share of a replica's processing rate the steady input may use,
    /// in percent. Default 70.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_utilization: Option<i32>,
    /// The time a backlog is to be drained within, e.g. `5m` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_within: Option<String>,
    /// How long a rescale stops processing (hand-over and first batch),
    /// counted against `catchUpWithin`. Default `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_time: Option<String>,
    /// A scale-up takes the lowest recommendation of this window. Default
    /// `0s`: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_window: Option<String>,
    /// A scale-down takes the highest recommendation of this window.
    /// Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_window: Option<String>,
    /// The engines' batches the rates are measured over. Default `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_window: Option<String>,
    /// Scale to zero once the source has had no new records and no lag for
    /// this long, e.g. `10m`; the operator then checks the broker (the
    /// group's committed offsets against the partitions' latest) and starts
    /// `minReplicas` when records arrive. Default: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<String>,
}

impl Autoscaling {
    /// Whether the operator scales the query (`enabled`, default true).
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
}

/// How failures of the engine are retried (Kubernetes only; `sluice run`
/// ignores it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestartPolicy {
    /// How many times the engine may fail before the query is `Failed`
    /// with its last error and its pods stopped. A continuous query counts
    /// the engine's restarts since its spec last changed or it last
    /// completed a batch (the kubelet restarts it with its backoff, 10 s
    /// doubling to 5 min); an `availableNow` query's Job counts its failed
    /// runs (the Job's `backoffLimit`). Default 6, as a Kubernetes Job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: Option<i32>,
    /// When a spec change's engine fails `maxRestarts` times, run the last
    /// spec that ran (completed a batch with every pod ready) again instead
    /// of stopping, as the Flink operator's `lastStableSpec` rollback does;
    /// the status says which generation runs and why. Continuous queries
    /// only. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<bool>,
}

/// The default of `spec.restartPolicy.maxRestarts`: a Kubernetes Job's
/// default `backoffLimit`.
pub const DEFAULT_MAX_RESTARTS: i32 = 6;

/// The engine pods' settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineSpec {
    /// The engine image. Default: the operator's own engine image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// CPU and memory requests and limits of the engine container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Environment variables of the engine container, e.g. AWS credentials
    /// from a Secret (`valueFrom.secretKeyRef`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    /// Whole Secrets or ConfigMaps as environment variables, e.g. Kafka and S3
    /// credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<k8s_openapi::api::core::v1::EnvFromSource>,
    /// The volume holding local state. Default: an emptyDir (state is
    /// restored from the checkpoint after a reschedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_volume: Option<StateVolume>,
}

/// A PersistentVolumeClaim per engine pod for local state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateVolume {
    /// The claim's size, e.g. `20Gi`.
    pub size: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    /// The storage class. Default: the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// The default of `spec.statePartitions`.
pub const DEFAULT_STATE_PARTITIONS: u32 = 16;

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// One input stream. Set exactly one of `generator`, `kafka` or `files`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// The API server checks this CEL rule on apply; `validate()` checks the same.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.generator), has(self.kafka), has(self.files)].filter(x, x).size() == 1",
    "message": "set exactly one of generator, kafka or files",
}]))]
pub struct Source {
    /// The table name the query uses for this source: lower-case letters,
    /// digits and `_`, starting with a letter.
    pub name: String,
    /// A built-in, seeded data generator: no external system needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<GeneratorSource>,
    /// A Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
    /// A directory of data files; new files are picked up as they appear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileSource>,
    /// How records are encoded (Kafka and file sources). Default `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// The columns of each record (Kafka and file sources). Generators have
    /// a fixed schema and take none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Vec<Column>>,
    /// With `format: avro` (Kafka sources): the writer's Avro schema, as its
    /// JSON text. Each record's value is one Avro datum of this schema in
    /// Avro's binary encoding, without a container header or a schema
    /// registry's prefix (what Spark's `from_avro` reads); the declared
    /// `schema` columns are its record's fields of the same names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro_schema: Option<String>,
    /// Event-time watermark: how late rows may arrive before windows over
    /// their time are closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<Watermark>,
    /// Where records that do not decode with the schema go, with their file,
    /// line and reason, instead of stopping the query. Without it, such a
    /// record stops the query with an error that names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
}

/// A static table: a file, or a directory of files, of one format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticTable {
    /// The table name the query uses: lower-case letters, digits and `_`,
    /// starting with a letter; not a source's name.
    pub name: String,
    /// A local file or directory (`file://...` too).
    pub path: String,
    /// `csv` (with a header row), `parquet` or `json` (JSON lines).
    pub format: Format,
    /// The columns (CSV and JSON; Parquet files carry their own schema, and
    /// when given, columns are read by these names and types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Vec<Column>>,
}

/// A dead-letter destination for malformed records. Set exactly one of
/// `path` or `kafka`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetter {
    /// A local directory. Batch N's malformed records go to
    /// `<path>/<source>-<N>.jsonl`, one JSON object each: `file`, `line`,
    /// `error`, `record`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A Kafka topic: each malformed record is written with its original
    /// key and value, and headers naming where it came from and why
    /// (`sluice.source.topic`, `sluice.source.partition`,
    /// `sluice.source.offset`, `sluice.error`), in the batch's transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaDeadLetter>,
}

/// A dead-letter topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaDeadLetter {
    /// The topic.
    pub topic: String,
    /// The brokers. Default: the source's (with its client settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
}

/// A seeded generator of rows. The row at offset `i` depends only on the
/// seed, `startTime` and `i`, so a batch re-read after a restart is the same.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratorSource {
    /// What to generate: `rate` (columns `timestamp`, `value`, as Spark's
    /// rate source), `transactions` (card transactions for fraud
    /// detection: `transaction_id`, `user_id`, `amount`, `merchant_id`,
    /// `event_time`, `device_type`), or one table of the Nexmark benchmark's
    /// auction stream: `nexmarkPerson`, `nexmarkAuction` or `nexmarkBid`.
    pub kind: GeneratorKind,
    /// Rows per second of event time. Unless `rowsPerBatch` is set, rows are
    /// also released at this rate of wall-clock time. For the Nexmark kinds,
    /// rows are events of the whole stream (persons, auctions and bids in
    /// the standard 1:3:46 mix), of which the source keeps its table's.
    pub rows_per_second: u64,
    /// A fixed number of rows per batch, not tied to the wall clock (as
    /// Spark's `rate-micro-batch` source): runs are reproducible and run as
    /// fast as the query can go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_batch: Option<u64>,
    /// Stop after this many rows. Needed by `trigger.availableNow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_rows: Option<u64>,
    /// The event time of the first row, RFC 3339 (e.g.
    /// `2026-01-01T00:00:00Z`). Default: when the query starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// The random seed. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `transactions` only: the number of distinct users. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// `transactions` only: the number of distinct merchants. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchants: Option<u64>,
    /// `transactions` only: how far before its place in the stream a row's
    /// event time may be, uniformly at random (event-time disorder).
    /// Default `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disorder: Option<String>,
}

/// The data a generator source produces.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GeneratorKind {
    /// `timestamp`, `value`: a counter, as Spark's rate source.
    Rate,
    /// Card transactions: `transaction_id`, `user_id`, `amount`,
    /// `merchant_id`, `event_time`, `device_type`.
    Transactions,
    /// Nexmark's new persons: `id`, `name`, `emailaddress`, `creditcard`,
    /// `city`, `state`, `datetime`, `extra`. Column names are Nexmark's in
    /// lower case, so that its queries as written (`dateTime`) resolve:
    /// SQL lower-cases unquoted names.
    NexmarkPerson,
    /// Nexmark's new auctions: `id`, `itemname`, `description`,
    /// `initialbid`, `reserve`, `datetime`, `expires`, `seller`,
    /// `category`, `extra`.
    NexmarkAuction,
    /// Nexmark's bids: `auction`, `bidder`, `price`, `channel`, `url`,
    /// `datetime`, `extra`.
    NexmarkBid,
}

/// Kafka topics to read. Set exactly one of `topic`, `topics` or
/// `topicPattern`. Each record is a row of the source's declared columns,
/// decoded from the record's value by `format`, and the record's `key`,
/// `value` (bytes), `topic`, `partition`, `offset`, `timestamp` and `headers`
/// (a declared column of the same name takes precedence).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSource {
    /// `host:port[,host:port...]` of the Kafka brokers.
    pub bootstrap_servers: String,
    /// The topic to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Several topics to read (Spark's `subscribe` with a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
    /// A regular expression: every topic whose whole name matches, also
    /// those created while the query runs (Spark's `subscribePattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_pattern: Option<String>,
    /// Where a query without a checkpoint starts: `earliest`, `latest` (the
    /// default, as in Spark), or per partition as Spark's JSON,
    /// `{"transactions": {"0": 1200, "1": -2}}` (-2: earliest, -1: latest;
    /// partitions not named start at `latest`). Ignored when the query
    /// resumes from a checkpoint. Partitions that appear later start at
    /// their earliest offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_offsets: Option<String>,
    /// The most records one batch reads, spread over the partitions in
    /// proportion to their backlog. Default: everything available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_offsets_per_trigger: Option<u64>,
    /// Whether records the query still needs but the broker no longer holds
    /// (deleted by retention, a recreated topic) stop it, with an error
    /// naming topic, partition and the missing offsets. `false` skips them
    /// with a warning and counts them. Default true, as in Spark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_on_data_loss: Option<bool>,
    /// The consumer group the processed offsets are committed to after each
    /// batch, for monitoring only (lag in `kafka-consumer-groups`, KEDA,
    /// Burrow); a restart resumes from the checkpoint, never from the group.
    /// Default `sluice-<metadata.name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// A column of the source's schema the topic is already partitioned by:
    /// every record's key is the column's value as text (UTF-8) and the
    /// producer chose its partition with Kafka's default partitioner
    /// (murmur2 of the key, as the Java client, Kafka Streams and Spark's
    /// Kafka sink do; librdkafka clients with `partitioner:
    /// murmur2_random`). Then the query's state is partitioned as the
    /// topic is (state partition p holds the keys of topic partition p, so
    /// `statePartitions` must equal the topic's partition count), and a
    /// stateful query whose grouping keys include the column runs on
    /// several replicas without the repartition topic: each replica keeps
    /// the state of the partitions it reads. A record whose partition is
    /// not its key's is set aside as malformed (to `deadLetter`), never
    /// counted in another replica's state. Only with a single `topic`;
    /// fixed for the life of the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed_by: Option<String>,
    /// Kafka client settings (librdkafka's names, as Spark's `kafka.*`
    /// options), e.g. `security.protocol: SASL_SSL`, `sasl.mechanism:
    /// SCRAM-SHA-512`, `isolation.level: read_uncommitted` (the default is
    /// `read_committed`). Secrets go in `secretOptions`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Kafka client settings whose values are secrets, read from an
    /// environment variable or a file (where a Kubernetes Secret is
    /// mounted); never logged, printed, or written to the checkpoint or the
    /// status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_options: Vec<SecretOption>,
}

/// A client setting whose value is a secret. Set exactly one of `env` or
/// `file`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretOption {
    /// The setting, e.g. `sasl.password`.
    pub name: String,
    /// The environment variable that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// The file that holds the value (trailing newline removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A directory of data files (its files, not its subdirectories').
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSource {
    /// The directory: a local path, `file://...` or `s3://bucket/prefix`
    /// (credentials from the environment, as the AWS tools read them).
    pub path: String,
    /// The most new files one batch reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files_per_trigger: Option<u64>,
    /// The most bytes one batch reads, e.g. `256MiB` (a batch takes at
    /// least one file), as Spark's `maxBytesPerTrigger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_trigger: Option<String>,
    /// The order files are taken in: `name` (the default) or
    /// `modificationTime` (then name), as Spark takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<FileOrder>,
    /// Files older than this (by modification time) when the query first
    /// starts are left out, e.g. `7d` (Spark's `maxFileAge`). Default: none
    /// is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_age: Option<String>,
}

/// The order a file source takes files in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FileOrder {
    /// By name: name new files to sort last (a timestamp, a sequence).
    #[default]
    Name,
    /// By modification time, then name.
    ModificationTime,
}

/// A record encoding.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Format {
    /// One JSON object per record (JSON lines in files).
    Json,
    /// Comma-separated values, columns in schema order.
    Csv,
    /// Apache Avro.
    Avro,
    /// Apache Parquet (files only).
    Parquet,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Avro => "avro",
            Format::Parquet => "parquet",
        })
    }
}

/// One column of a source's schema.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Column {
    /// The column name, as the query sees it.
    pub name: String,
    /// The column type.
    #[serde(rename = "type")]
    pub data_type: ColumnType,
    /// Whether the column may be null. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nullable: Option<bool>,
}

/// The type of a source column (Spark SQL's names).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ColumnType {
    /// UTF-8 text.
    String,
    /// 32-bit signed integer.
    Int,
    /// 64-bit signed integer.
    Long,
    /// 64-bit floating point.
    Double,
    /// true or false.
    Boolean,
    /// An instant, microsecond precision, UTC.
    Timestamp,
    /// A calendar date.
    Date,
}

/// An event-time watermark on one source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Watermark {
    /// The timestamp column that holds each row's event time.
    pub column: String,
    /// How late a row may be, e.g. `10m`: the watermark is the largest event
    /// time seen minus this delay.
    pub delay: String,
    /// After this long without a row (e.g. `5m`), the source no longer holds
    /// the query's watermark back (Flink's idleness). Without it, a source
    /// that produces nothing holds the watermark where it is, as in Spark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Where results are written. Set exactly one of `console`, `files`,
/// `kafka` or `delta`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.console), has(self.files), has(self.kafka), has(self.delta)].filter(x, x).size() == 1",
    "message": "set exactly one of console, files, kafka or delta",
}]))]
pub struct Sink {
    /// Print each batch as a table on standard output, as Spark's console sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleSink>,
    /// Write each batch as files in a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileSink>,
    /// Write each row as a record to a Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
    /// Write each batch as one commit of a Delta Lake table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaSink>,
    /// How rows are encoded (file and Kafka sinks): `json` (the default) or
    /// `parquet` (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
}

/// The console sink's options.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsoleSink {
    /// The most rows printed per batch. Default 20, as in Spark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_rows: Option<u32>,
    /// Cut values longer than 20 characters. Default true, as in Spark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// The file sink's options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSink {
    /// The output directory: a local path, `file://...` or
    /// `s3://bucket/prefix` (credentials from the environment).
    pub path: String,
    /// Columns whose values make directories, `col=value/`, as Spark writes
    /// partitioned output; the files hold the other columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_by: Vec<String>,
    /// The size a data file is closed at, e.g. `128MiB` (the default); a
    /// batch bigger than that writes several files per partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_file_size: Option<String>,
}

/// A Delta Lake table to write.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeltaSink {
    /// The table: a local path, `file://...` or `s3://bucket/prefix`
    /// (created at the first batch when missing).
    pub path: String,
    /// Add to the table the columns a result has and the table has not
    /// (Delta's `mergeSchema`). Default false: such a result is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_schema: Option<bool>,
    /// Update mode: the columns a result row is merged on: it replaces the
    /// table's row with the same values there, or is inserted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merge_keys: Vec<String>,
    /// The table's partition columns, when the sink creates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_by: Vec<String>,
}

/// The Kafka sink's options. As Spark's Kafka sink, the result's columns
/// `value` (text or bytes), `key`, `headers` (a list of `{key, value}`),
/// `partition` and `topic` become the record's; a result without a `value`
/// column is written whole as a JSON object per row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSink {
    /// `host:port[,host:port...]` of the Kafka brokers.
    pub bootstrap_servers: String,
    /// The topic to write (a result column `topic` overrides it per row).
    pub topic: String,
    /// `exactlyOnce` (the default): each batch is one Kafka transaction, so
    /// a `read_committed` consumer sees each result row once whatever
    /// crashes; `atLeastOnce`: an idempotent producer without transactions,
    /// lower latency, and a batch replayed after a crash is written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// The transactional id. Default `sluice-<query id>`, stable across
    /// restarts of the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
    /// Kafka client settings (librdkafka's names), e.g.
    /// `compression.type: lz4`. Secrets go in `secretOptions`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Kafka client settings whose values are secrets (see the source's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_options: Vec<SecretOption>,
}

/// What a sink promises.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    /// Each result row once, across crashes.
    #[default]
    ExactlyOnce,
    /// Each result row at least once.
    AtLeastOnce,
}

/// Which rows of the result each batch writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OutputMode {
    /// Only new rows; a window's row once the watermark has passed its end.
    #[default]
    Append,
    /// Rows that changed in this batch.
    Update,
    /// The whole result, every batch.
    Complete,
}

impl std::fmt::Display for OutputMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputMode::Append => "append",
            OutputMode::Update => "update",
            OutputMode::Complete => "complete",
        })
    }
}

/// When batches run. Set at most one of the fields.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.processingTime) && has(self.availableNow) && self.availableNow)",
    "message": "set processingTime or availableNow, not both",
}]))]
pub struct Trigger {
    /// Start a batch every interval, e.g. `30s`; a batch that takes longer is
    /// followed at once by the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_time: Option<String>,
    /// Process everything available when the query starts, in as many batches
    /// as the sources' limits ask, then stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_now: Option<bool>,
}

/// Where the query's progress is checkpointed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    /// A local path, `file://...` or `s3://bucket/prefix`.
    pub location: String,
}

impl Source {
    /// Which kind of source this is, by the field that is set; `None` when
    /// none or several are.
    pub fn kind(&self) -> Option<&'static str> {
        match (&self.generator, &self.kafka, &self.files) {
            (Some(_), None, None) => Some("generator"),
            (None, Some(_), None) => Some("kafka"),
            (None, None, Some(_)) => Some("files"),
            _ => None,
        }
    }
}

impl Sink {
    /// Which kind of sink this is, by the field that is set; `None` when none
    /// or several are.
    pub fn kind(&self) -> Option<&'static str> {
        match (&self.console, &self.files, &self.kafka, &self.delta) {
            (Some(_), None, None, None) => Some("console"),
            (None, Some(_), None, None) => Some("files"),
            (None, None, Some(_), None) => Some("kafka"),
            (None, None, None, Some(_)) => Some("delta"),
            _ => None,
        }
    }
}

impl Trigger {
    /// Whether this trigger asks to process what is there and stop.
    pub fn is_available_now(&self) -> bool {
        self.available_now == Some(true)
    }
}

impl StreamingQuerySpec {
    /// `statePartitions`, or its default.
    pub fn state_partitions(&self) -> u32 {
        self.state_partitions.unwrap_or(DEFAULT_STATE_PARTITIONS)
    }

    /// Whether `suspend` is set.
    pub fn is_suspended(&self) -> bool {
        self.suspend == Some(true)
    }

    /// Whether the query processes what is there and stops
    /// (`trigger.availableNow`).
    pub fn is_available_now(&self) -> bool {
        self.trigger.as_ref().is_some_and(Trigger::is_available_now)
    }

    /// `restartPolicy.maxRestarts`, or its default.
    pub fn max_restarts(&self) -> i32 {
        self.restart_policy
            .as_ref()
            .and_then(|p| p.max_restarts)
            .unwrap_or(DEFAULT_MAX_RESTARTS)
    }

    /// Whether `restartPolicy.rollback` is set.
    pub fn rolls_back(&self) -> bool {
        self.restart_policy
            .as_ref()
            .and_then(|p| p.rollback)
            .unwrap_or(false)
    }
}
