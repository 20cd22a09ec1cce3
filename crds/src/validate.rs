//! One validation of a `StreamingQuery`, shared by `sluice validate`,
//! `sluice run` and the operator's `Degraded` condition. It returns every
//! problem at once, each with its field path and what to write instead.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use sqlparser::ast::{Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::duration::{parse_bytes, parse_duration};
use crate::spec::{
    Autoscaling, ColumnType, Format, GeneratorKind, GeneratorSource, KafkaSource, OutputMode,
    SecretOption, Source, StreamingQuery, StreamingQuerySpec,
};

/// One thing wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, e.g. `spec.sources[0].watermark.delay`.
    pub path: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl Problems {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The longest query name: a StatefulSet's pods carry a label made of its
/// name and a hash, and labels are limited to 63 characters.
pub const MAX_NAME_LEN: usize = 52;

/// Checks a whole `StreamingQuery`: its name and its spec.
pub fn validate(query: &StreamingQuery) -> Result<(), Problems> {
    let mut problems = Problems::default();
    match query.metadata.name.as_deref() {
        None | Some("") => problems.push(
            "metadata.name",
            "is required: every query needs a name (lower-case letters, digits and '-')",
        ),
        Some(name) => check_dns_label(&mut problems, "metadata.name", name),
    }
    validate_spec_into(&query.spec, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Checks a spec alone.
pub fn validate_spec(spec: &StreamingQuerySpec) -> Result<(), Problems> {
    let mut problems = Problems::default();
    validate_spec_into(spec, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn validate_spec_into(spec: &StreamingQuerySpec, problems: &mut Problems) {
    if spec.sources.is_empty() {
        problems.push("spec.sources", "needs at least one source");
    }
    if let Some(replicas) = spec.replicas
        && replicas > 1
        && !spec
            .autoscaling
            .as_ref()
            .is_some_and(Autoscaling::is_enabled)
        && !scales_out(spec)
    {
        problems.push(
            "spec.replicas",
            format!(
                "{replicas} replicas split the partitions of Kafka sources between them and write to a Kafka sink, each with its own logs under spec.checkpoint: scale-out of other sources and sinks is not built in this version yet; set 1 (or 0 to stop the query)"
            ),
        );
    }
    if let Some(autoscaling) = &spec.autoscaling {
        check_autoscaling(problems, spec, autoscaling);
    }
    let mut names = HashSet::new();
    for (i, source) in spec.sources.iter().enumerate() {
        let path = format!("spec.sources[{i}]");
        check_source(problems, &path, source);
        if !names.insert(source.name.as_str()) {
            problems.push(
                format!("{path}.name"),
                format!(
                    "{:?} is used by an earlier source: give each source its own name",
                    source.name
                ),
            );
        }
    }
    if spec.sources.len() > 1
        && let Some(i) = spec
            .sources
            .iter()
            .position(|s| s.kafka.as_ref().is_some_and(|k| k.keyed_by.is_some()))
    {
        problems.push(
            format!("spec.sources[{i}].kafka.keyedBy"),
            format!(
                "is set on a query of {} sources: the state is partitioned as one topic is, which only a query of one source can be yet (a lookup goes in spec.tables)",
                spec.sources.len()
            ),
        );
    }
    for (i, table) in spec.tables.iter().enumerate() {
        let path = format!("spec.tables[{i}]");
        if !is_sql_identifier(&table.name) {
            problems.push(
                format!("{path}.name"),
                format!(
                    "{:?} is not a table name the query can use: use lower-case letters, digits and '_', starting with a letter (e.g. {:?})",
                    table.name,
                    suggest_identifier(&table.name)
                ),
            );
        }
        if !names.insert(table.name.as_str()) {
            problems.push(
                format!("{path}.name"),
                format!(
                    "{:?} is already a source's or an earlier table's name: give each its own",
                    table.name
                ),
            );
        }
        if table.path.trim().is_empty() {
            problems.push(
                format!("{path}.path"),
                "is empty: write the file or directory",
            );
        } else if let Some((scheme, _)) = table.path.split_once("://")
            && scheme != "file"
        {
            problems.push(
                format!("{path}.path"),
                format!("uses the scheme {scheme:?}: static tables are local files (or file://) in this version"),
            );
        }
        match table.format {
            Format::Csv | Format::Json if table.schema.is_none() => problems.push(
                format!("{path}.schema"),
                format!(
                    "is missing: {} tables need their columns declared",
                    table.format
                ),
            ),
            Format::Avro => problems.push(
                format!("{path}.format"),
                "avro is not supported for static tables: use csv, parquet or json",
            ),
            _ => {}
        }
    }
    check_query(problems, spec);
    check_sink(problems, spec);
    check_trigger(problems, spec);
    if let Some(checkpoint) = &spec.checkpoint {
        check_location(problems, "spec.checkpoint.location", &checkpoint.location);
    }
    if let Some(timeout) = &spec.stall_timeout {
        match parse_duration(timeout) {
            Err(message) => problems.push("spec.stallTimeout", message),
            Ok(d) if d.is_zero() => problems.push(
                "spec.stallTimeout",
                "is zero: every query would be stalled; leave it out to never report a stall",
            ),
            Ok(_) => {}
        }
    }
    if let Some(policy) = &spec.restart_policy {
        if let Some(n) = policy.max_restarts
            && !(0..=1000).contains(&n)
        {
            problems.push(
                "spec.restartPolicy.maxRestarts",
                format!("{n} is out of range: use 0 to 1000"),
            );
        }
        if policy.rollback == Some(true) && spec.is_available_now() {
            problems.push(
                "spec.restartPolicy.rollback",
                "does not apply to an availableNow query, whose failed run is not rolled back: remove it",
            );
        }
    }
    if let Some(n) = spec.state_partitions
        && !(1..=4096).contains(&n)
    {
        problems.push(
            "spec.statePartitions",
            format!("{n} is out of range: use 1 to 4096"),
        );
    }
}

/// Whether the query can run on several replicas: scale-out splits Kafka
/// partitions between them, each writing through its own transactional
/// producer with its own logs; the rest is not built.
fn scales_out(spec: &StreamingQuerySpec) -> bool {
    spec.sources.iter().all(|s| s.kafka.is_some())
        && spec.sink.kafka.is_some()
        && spec.checkpoint.is_some()
}

fn check_autoscaling(
    problems: &mut Problems,
    spec: &StreamingQuerySpec,
    autoscaling: &Autoscaling,
) {
    let path = "spec.autoscaling";
    if autoscaling.is_enabled() && !scales_out(spec) {
        problems.push(
            path,
            "the autoscaler scales queries that read Kafka sources and write to a Kafka sink with a checkpoint (their replicas split the partitions); scale-out of other sources and sinks is not built in this version yet: remove autoscaling or set enabled: false",
        );
    }
    let min = autoscaling.min_replicas.unwrap_or(1);
    if min > autoscaling.max_replicas {
        problems.push(
            format!("{path}.minReplicas"),
            format!(
                "{min} is more than maxReplicas {}",
                autoscaling.max_replicas
            ),
        );
    }
    for (field, value) in [
        ("catchUpWithin", &autoscaling.catch_up_within),
        ("restartTime", &autoscaling.restart_time),
        ("scaleUpWindow", &autoscaling.scale_up_window),
        ("scaleDownWindow", &autoscaling.scale_down_window),
        ("metricWindow", &autoscaling.metric_window),
        ("scaleToZeroAfter", &autoscaling.scale_to_zero_after),
    ] {
        if let Some(text) = value
            && let Err(message) = parse_duration(text)
        {
            problems.push(format!("{path}.{field}"), message);
        }
    }
}

fn check_dns_label(problems: &mut Problems, path: &str, name: &str) {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let valid_ends = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !valid_chars || !valid_ends {
        problems.push(
            path,
            format!("{name:?} is not a valid name: use lower-case letters, digits and '-', starting with a letter (e.g. \"fraud-detection\")"),
        );
    } else if name.len() > MAX_NAME_LEN {
        problems.push(
            path,
            format!(
                "{name:?} is {} characters long: use at most {MAX_NAME_LEN}",
                name.len()
            ),
        );
    }
}

fn is_sql_identifier(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check_source(problems: &mut Problems, path: &str, source: &Source) {
    if !is_sql_identifier(&source.name) {
        problems.push(
            format!("{path}.name"),
            format!(
                "{:?} is not a table name the query can use: use lower-case letters, digits and '_', starting with a letter (e.g. {:?})",
                source.name,
                suggest_identifier(&source.name)
            ),
        );
    }
    let set = [
        source.generator.is_some().then_some("generator"),
        source.kafka.is_some().then_some("kafka"),
        source.files.is_some().then_some("files"),
    ];
    let set: Vec<&str> = set.into_iter().flatten().collect();
    match set.len() {
        0 => problems.push(path, "names no input: set one of generator, kafka or files"),
        1 => {}
        _ => problems.push(path, format!("sets {}: set only one", set.join(" and "))),
    }
    if let Some(generator) = &source.generator {
        check_generator(problems, path, source, generator);
    }
    if let Some(kafka) = &source.kafka {
        check_kafka_source(problems, &format!("{path}.kafka"), kafka);
        if source.format == Some(Format::Parquet) {
            problems.push(
                format!("{path}.format"),
                "parquet is a file format: Kafka records are json, csv or avro",
            );
        }
    }
    check_avro_schema(problems, path, source);
    if let Some(files) = &source.files {
        check_location(problems, &format!("{path}.files.path"), &files.path);
        if let Some(size) = &files.max_bytes_per_trigger
            && let Err(message) = parse_bytes(size)
        {
            problems.push(format!("{path}.files.maxBytesPerTrigger"), message);
        }
        if let Some(age) = &files.max_file_age
            && let Err(message) = parse_duration(age)
        {
            problems.push(format!("{path}.files.maxFileAge"), message);
        }
        if files.max_files_per_trigger == Some(0) {
            problems.push(
                format!("{path}.files.maxFilesPerTrigger"),
                "must be at least 1",
            );
        }
    }
    if source.kafka.is_some() || source.files.is_some() {
        match &source.schema {
            None => problems.push(format!("{path}.schema"), "is required for Kafka and file sources: list the columns, e.g. [{name: user_id, type: string}]"),
            Some(columns) if columns.is_empty() => problems.push(format!("{path}.schema"), "is empty: list at least one column"),
            Some(columns) => {
                let mut seen = HashSet::new();
                for (j, column) in columns.iter().enumerate() {
                    if column.name.trim().is_empty() {
                        problems.push(format!("{path}.schema[{j}].name"), "is empty");
                    } else if !seen.insert(column.name.as_str()) {
                        problems.push(format!("{path}.schema[{j}].name"), format!("{:?} appears twice", column.name));
                    }
                }
                if let Some(keyed_by) = source.kafka.as_ref().and_then(|k| k.keyed_by.as_ref())
                    && !columns.iter().any(|c| &c.name == keyed_by)
                {
                    problems.push(
                        format!("{path}.kafka.keyedBy"),
                        format!("is {keyed_by:?}, which is not a column of the source's schema"),
                    );
                }
            }
        }
    }
    if let Some(dead_letter) = &source.dead_letter {
        match (&dead_letter.path, &dead_letter.kafka) {
            (Some(dir), None) => check_location(problems, &format!("{path}.deadLetter.path"), dir),
            (None, Some(topic)) => {
                if topic.topic.trim().is_empty() {
                    problems.push(
                        format!("{path}.deadLetter.kafka.topic"),
                        "is empty: name the topic",
                    );
                }
                if source.kafka.is_none() && topic.bootstrap_servers.is_none() {
                    problems.push(
                        format!("{path}.deadLetter.kafka.bootstrapServers"),
                        "is required when the source is not a Kafka source: write host:port",
                    );
                }
            }
            (None, None) => problems.push(
                format!("{path}.deadLetter"),
                "names no destination: set path (a directory) or kafka (a topic)",
            ),
            (Some(_), Some(_)) => problems.push(
                format!("{path}.deadLetter"),
                "sets path and kafka: set only one",
            ),
        }
        if source.generator.is_some() {
            problems.push(
                format!("{path}.deadLetter"),
                "does not apply to a generator, whose rows are always well-formed: remove it",
            );
        }
    }
    if let Some(watermark) = &source.watermark {
        if let Err(message) = parse_duration(&watermark.delay) {
            problems.push(format!("{path}.watermark.delay"), message);
        }
        if let Some(idle) = &watermark.idle_timeout {
            match parse_duration(idle) {
                Err(message) => problems.push(format!("{path}.watermark.idleTimeout"), message),
                Ok(d) if d.is_zero() => problems.push(
                    format!("{path}.watermark.idleTimeout"),
                    "must be longer than 0s: remove it to let an idle source hold the watermark",
                ),
                Ok(_) => {}
            }
        }
        match source_column_type(source, &watermark.column) {
            Some(ColumnType::Timestamp) => {}
            Some(other) => problems.push(
                format!("{path}.watermark.column"),
                format!(
                    "{:?} is of type {other:?}: a watermark needs a timestamp column",
                    watermark.column
                ),
            ),
            None => problems.push(
                format!("{path}.watermark.column"),
                format!(
                    "{:?} is not a column of this source (its timestamp columns: {})",
                    watermark.column,
                    timestamp_columns(source).join(", ")
                ),
            ),
        }
    }
}

fn check_generator(
    problems: &mut Problems,
    path: &str,
    source: &Source,
    generator: &GeneratorSource,
) {
    let gpath = format!("{path}.generator");
    if generator.rows_per_second == 0 {
        problems.push(format!("{gpath}.rowsPerSecond"), "must be at least 1");
    }
    if generator.rows_per_batch == Some(0) {
        problems.push(
            format!("{gpath}.rowsPerBatch"),
            "must be at least 1 (or left out, to follow the wall clock)",
        );
    }
    if let Some(start) = &generator.start_time
        && chrono::DateTime::parse_from_rfc3339(start).is_err()
    {
        problems.push(
            format!("{gpath}.startTime"),
            format!("{start:?} is not an RFC 3339 time: write e.g. \"2026-01-01T00:00:00Z\""),
        );
    }
    if generator.kind != GeneratorKind::Transactions {
        for (field, set) in [
            ("users", generator.users.is_some()),
            ("merchants", generator.merchants.is_some()),
            ("maxDisorder", generator.max_disorder.is_some()),
        ] {
            if set {
                problems.push(
                    format!("{gpath}.{field}"),
                    "applies to kind transactions only: remove it, or set kind: transactions",
                );
            }
        }
    }
    if generator.users == Some(0) {
        problems.push(format!("{gpath}.users"), "must be at least 1");
    }
    if generator.merchants == Some(0) {
        problems.push(format!("{gpath}.merchants"), "must be at least 1");
    }
    if let Some(disorder) = &generator.max_disorder
        && let Err(message) = parse_duration(disorder)
    {
        problems.push(format!("{gpath}.maxDisorder"), message);
    }
    if source.format.is_some() {
        problems.push(
            format!("{path}.format"),
            "does not apply to a generator, which makes typed rows: remove it",
        );
    }
    if source.schema.is_some() {
        problems.push(
            format!("{path}.schema"),
            "does not apply to a generator, whose columns are fixed: remove it",
        );
    }
}

/// The columns of a generator of this kind, with their types.
pub fn generator_columns(kind: GeneratorKind) -> &'static [(&'static str, ColumnType)] {
    match kind {
        GeneratorKind::Rate => &[
            ("timestamp", ColumnType::Timestamp),
            ("value", ColumnType::Long),
        ],
        GeneratorKind::Transactions => &[
            ("transaction_id", ColumnType::String),
            ("user_id", ColumnType::String),
            ("amount", ColumnType::Double),
            ("merchant_id", ColumnType::String),
            ("event_time", ColumnType::Timestamp),
            ("device_type", ColumnType::String),
        ],
        GeneratorKind::NexmarkPerson => &[
            ("id", ColumnType::Long),
            ("name", ColumnType::String),
            ("emailaddress", ColumnType::String),
            ("creditcard", ColumnType::String),
            ("city", ColumnType::String),
            ("state", ColumnType::String),
            ("datetime", ColumnType::Timestamp),
            ("extra", ColumnType::String),
        ],
        GeneratorKind::NexmarkAuction => &[
            ("id", ColumnType::Long),
            ("itemname", ColumnType::String),
            ("description", ColumnType::String),
            ("initialbid", ColumnType::Long),
            ("reserve", ColumnType::Long),
            ("datetime", ColumnType::Timestamp),
            ("expires", ColumnType::Timestamp),
            ("seller", ColumnType::Long),
            ("category", ColumnType::Long),
            ("extra", ColumnType::String),
        ],
        GeneratorKind::NexmarkBid => &[
            ("auction", ColumnType::Long),
            ("bidder", ColumnType::Long),
            ("price", ColumnType::Long),
            ("channel", ColumnType::String),
            ("url", ColumnType::String),
            ("datetime", ColumnType::Timestamp),
            ("extra", ColumnType::String),
        ],
    }
}

fn source_columns(source: &Source) -> Vec<(String, ColumnType)> {
    if let Some(generator) = &source.generator {
        return generator_columns(generator.kind)
            .iter()
            .map(|(name, ty)| ((*name).to_owned(), *ty))
            .collect();
    }
    let mut columns: Vec<(String, ColumnType)> = source
        .schema
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.data_type))
        .collect();
    if source.kafka.is_some() {
        // The record's own columns (key, value and headers are binary).
        for (name, ty) in KAFKA_RECORD_COLUMNS {
            if !columns.iter().any(|(n, _)| n == name) {
                columns.push(((*name).to_owned(), *ty));
            }
        }
    }
    columns
}

/// The columns a Kafka record adds to its source's declared ones, with a
/// type the spec can name (`key`, `value` and `headers` are binary).
pub const KAFKA_RECORD_COLUMNS: &[(&str, ColumnType)] = &[
    ("topic", ColumnType::String),
    ("partition", ColumnType::Int),
    ("offset", ColumnType::Long),
    ("timestamp", ColumnType::Timestamp),
];

fn source_column_type(source: &Source, column: &str) -> Option<ColumnType> {
    source_columns(source)
        .into_iter()
        .find(|(name, _)| name == column)
        .map(|(_, ty)| ty)
}

fn timestamp_columns(source: &Source) -> Vec<String> {
    let names: Vec<String> = source_columns(source)
        .into_iter()
        .filter(|(_, ty)| *ty == ColumnType::Timestamp)
        .map(|(name, _)| name)
        .collect();
    if names.is_empty() {
        vec!["none".to_owned()]
    } else {
        names
    }
}

fn suggest_identifier(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "t_");
    }
    out
}

fn check_location(problems: &mut Problems, path: &str, location: &str) {
    if location.trim().is_empty() {
        problems.push(
            path,
            "is empty: write a local path, file://... or s3://bucket/prefix",
        );
    } else if let Some((scheme, _)) = location.split_once("://")
        && !matches!(scheme, "file" | "s3")
    {
        problems.push(
                path,
                format!("{location:?} uses the scheme {scheme:?}: use a local path, file://... or s3://bucket/prefix"),
            );
    }
}

/// Collects the tables a query reads, leaving out its own CTEs and table
/// functions.
#[derive(Default)]
struct TableRefs {
    tables: Vec<String>,
    ctes: HashSet<String>,
}

impl Visitor for TableRefs {
    type Break = ();

    fn pre_visit_query(&mut self, query: &sqlparser::ast::Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(normalize_ident(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, args: None, ..
        } = factor
        {
            let parts: Vec<String> = name
                .0
                .iter()
                .map(|part| match part.as_ident() {
                    Some(ident) => normalize_ident(ident),
                    None => part.to_string(),
                })
                .collect();
            self.tables.push(parts.join("."));
        }
        ControlFlow::Continue(())
    }
}

/// SQL folds unquoted identifiers to lower case (as DataFusion does).
fn normalize_ident(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

fn check_query(problems: &mut Problems, spec: &StreamingQuerySpec) {
    if spec.query.trim().is_empty() {
        problems.push("spec.query", "is empty: write a SELECT over the sources");
        return;
    }
    let statements = match Parser::parse_sql(&GenericDialect {}, &spec.query) {
        Ok(statements) => statements,
        Err(err) => {
            problems.push("spec.query", format!("is not valid SQL: {err}"));
            return;
        }
    };
    let [statement] = statements.as_slice() else {
        problems.push(
            "spec.query",
            format!(
                "holds {} statements: write exactly one SELECT",
                statements.len()
            ),
        );
        return;
    };
    if !matches!(statement, Statement::Query(_)) {
        problems.push(
            "spec.query",
            "is not a query: write a SELECT over the sources; the sink says where rows go",
        );
        return;
    }
    let mut refs = TableRefs::default();
    let _ = statement.visit(&mut refs);
    let names: Vec<&str> = spec
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .chain(spec.tables.iter().map(|t| t.name.as_str()))
        .collect();
    let mut reported = HashSet::new();
    for table in refs.tables {
        if refs.ctes.contains(&table) || names.contains(&table.as_str()) {
            continue;
        }
        if reported.insert(table.clone()) {
            problems.push(
                "spec.query",
                format!(
                    "reads the table {table:?}, which is not a {}: the {} {}",
                    if spec.tables.is_empty() {
                        "source"
                    } else {
                        "source or table"
                    },
                    if spec.tables.is_empty() {
                        "sources are"
                    } else {
                        "sources and tables are"
                    },
                    names
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

/// Kafka client settings Sluice sets itself, and why.
const OWNED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set bootstrapServers"),
    ("group.id", "the source's consumer group is groupId"),
    (
        "enable.auto.commit",
        "offsets are committed by the engine after each batch",
    ),
    (
        "auto.offset.reset",
        "set startingOffsets; a resumed query starts from its checkpoint",
    ),
    ("transactional.id", "set the sink's transactionalId"),
    ("enable.idempotence", "set the sink's delivery"),
];

/// Whether a client setting holds a secret.
fn is_secret_option(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || name.ends_with(".key.pem")
        || name == "sasl.jaas.config"
}

/// Checks the client settings of a Kafka source or sink.
fn check_kafka_options(
    problems: &mut Problems,
    path: &str,
    options: &BTreeMap<String, String>,
    secrets: &[SecretOption],
) {
    for name in options.keys() {
        if let Some((_, why)) = OWNED_KAFKA_OPTIONS.iter().find(|(n, _)| n == name) {
            problems.push(
                format!("{path}.options.{name}"),
                format!("is set by Sluice: {why}"),
            );
        } else if is_secret_option(name) {
            problems.push(
                format!("{path}.options.{name}"),
                "holds a secret: move it to secretOptions (from an environment variable or a file), so that it is never shown with the spec",
            );
        }
    }
    for (i, secret) in secrets.iter().enumerate() {
        let at = format!("{path}.secretOptions[{i}]");
        if secret.name.trim().is_empty() {
            problems.push(
                format!("{at}.name"),
                "is empty: name the client setting, e.g. sasl.password",
            );
        }
        match (&secret.env, &secret.file) {
            (Some(_), None) | (None, Some(_)) => {}
            (None, None) => problems.push(at, "names no value: set env (a variable) or file"),
            (Some(_), Some(_)) => problems.push(at, "sets env and file: set only one"),
        }
    }
}

fn check_brokers(problems: &mut Problems, path: &str, brokers: &str) {
    if brokers.trim().is_empty() {
        problems.push(path, "is empty: write host:port, e.g. \"kafka:9092\"");
    } else if let Some(bad) = brokers.split(',').map(str::trim).find(|b| {
        b.rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    }) {
        problems.push(
            path,
            format!("{bad:?} is not host:port, e.g. \"kafka:9092\""),
        );
    }
}

/// `avroSchema`: given exactly when a Kafka source's format is avro, an Avro
/// record schema (its JSON) whose fields include every declared column.
/// The engine parses it fully; this checks what a user gets wrong first.
fn check_avro_schema(problems: &mut Problems, path: &str, source: &Source) {
    let avro = source.format == Some(Format::Avro);
    let field = format!("{path}.avroSchema");
    let Some(text) = &source.avro_schema else {
        if avro && source.kafka.is_some() {
            problems.push(
                field,
                "is missing: format avro needs the writer's Avro schema, as its JSON text",
            );
        }
        return;
    };
    if !avro || source.kafka.is_none() {
        problems.push(field, "is for Kafka sources with format: avro");
        return;
    }
    let schema: serde_json::Value = match serde_json::from_str(text) {
        Ok(schema) => schema,
        Err(e) => {
            problems.push(field, format!("is not JSON: {e}"));
            return;
        }
    };
    let fields: Vec<&str> = match (schema.get("type"), schema.get("fields")) {
        (Some(t), Some(serde_json::Value::Array(fields))) if t == "record" => fields
            .iter()
            .filter_map(|f| f.get("name").and_then(|n| n.as_str()))
            .collect(),
        _ => {
            problems.push(
                field,
                r#"is not an Avro record schema: write {"type": "record", "name": ..., "fields": [...]}"#,
            );
            return;
        }
    };
    for column in source.schema.iter().flatten() {
        if !fields.contains(&column.name.as_str()) {
            problems.push(
                field.clone(),
                format!(
                    "has no field {:?}, a column of the source's schema (its fields: {})",
                    column.name,
                    fields.join(", ")
                ),
            );
        }
    }
}

fn check_kafka_source(problems: &mut Problems, path: &str, kafka: &KafkaSource) {
    check_brokers(
        problems,
        &format!("{path}.bootstrapServers"),
        &kafka.bootstrap_servers,
    );
    let set: Vec<&str> = [
        kafka.topic.is_some().then_some("topic"),
        kafka.topics.is_some().then_some("topics"),
        kafka.topic_pattern.is_some().then_some("topicPattern"),
    ]
    .into_iter()
    .flatten()
    .collect();
    match set.len() {
        0 => problems.push(path, "names no topic: set topic, topics or topicPattern"),
        1 => {}
        _ => problems.push(path, format!("sets {}: set only one", set.join(" and "))),
    }
    if kafka.topic.as_deref().is_some_and(|t| t.trim().is_empty()) {
        problems.push(format!("{path}.topic"), "is empty: name the topic to read");
    }
    if let Some(topics) = &kafka.topics {
        if topics.is_empty() {
            problems.push(
                format!("{path}.topics"),
                "is empty: list the topics to read",
            );
        }
        for (i, topic) in topics.iter().enumerate() {
            if topic.trim().is_empty() {
                problems.push(format!("{path}.topics[{i}]"), "is empty");
            }
        }
    }
    if kafka
        .topic_pattern
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        problems.push(
            format!("{path}.topicPattern"),
            "is empty: write a regular expression",
        );
    }
    if let Some(start) = &kafka.starting_offsets
        && let Err(why) = parse_starting_offsets(start)
    {
        problems.push(format!("{path}.startingOffsets"), why);
    }
    if kafka.max_offsets_per_trigger == Some(0) {
        problems.push(format!("{path}.maxOffsetsPerTrigger"), "must be at least 1");
    }
    if kafka
        .group_id
        .as_deref()
        .is_some_and(|g| g.trim().is_empty())
    {
        problems.push(
            format!("{path}.groupId"),
            "is empty: remove it for sluice-<query name>",
        );
    }
    if let Some(column) = &kafka.keyed_by
        && kafka.topic.is_none()
        && kafka.topics.as_ref().is_none_or(|t| t.len() != 1)
    {
        problems.push(
            format!("{path}.keyedBy"),
            format!(
                "is {column:?}, but the source does not read a single topic: the state is partitioned as one topic is, so name it in topic"
            ),
        );
    }
    check_kafka_options(problems, path, &kafka.options, &kafka.secret_options);
}

/// Where a Kafka source starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartingOffsets {
    /// The oldest records.
    Earliest,
    /// Records written after the query starts.
    Latest,
    /// Per topic and partition: an offset, -2 (earliest) or -1 (latest).
    Partitions(BTreeMap<String, BTreeMap<i32, i64>>),
}

/// Parses `startingOffsets`: `earliest`, `latest` or Spark's JSON.
pub fn parse_starting_offsets(text: &str) -> Result<StartingOffsets, String> {
    match text.trim() {
        "earliest" => return Ok(StartingOffsets::Earliest),
        "latest" => return Ok(StartingOffsets::Latest),
        _ => {}
    }
    let usage = r#"write earliest, latest, or JSON such as {"topic": {"0": 42, "1": -2}} (-2: earliest, -1: latest)"#;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| format!("{text:?} is neither earliest, latest nor JSON: {usage}"))?;
    let topics = value
        .as_object()
        .ok_or_else(|| format!("{text:?} is not a JSON object: {usage}"))?;
    let mut out = BTreeMap::new();
    for (topic, partitions) in topics {
        let partitions = partitions.as_object().ok_or_else(|| {
            format!("the offsets of {topic:?} are not an object of partitions: {usage}")
        })?;
        let mut offsets = BTreeMap::new();
        for (partition, offset) in partitions {
            let p: i32 = partition.parse().map_err(|_| {
                format!("{topic:?} partition {partition:?} is not a partition number: {usage}")
            })?;
            let o = offset.as_i64().filter(|o| *o >= -2).ok_or_else(|| {
                format!("{topic:?} partition {p}: {offset} is not an offset: {usage}")
            })?;
            offsets.insert(p, o);
        }
        out.insert(topic.clone(), offsets);
    }
    Ok(StartingOffsets::Partitions(out))
}

/// A list of column names: none empty, none twice.
fn check_column_list(problems: &mut Problems, path: &str, columns: &[String]) {
    let mut seen = HashSet::new();
    for (i, column) in columns.iter().enumerate() {
        if column.trim().is_empty() {
            problems.push(
                format!("{path}[{i}]"),
                "is empty: name a column of the result",
            );
        } else if !seen.insert(column.as_str()) {
            problems.push(format!("{path}[{i}]"), format!("{column:?} appears twice"));
        }
    }
}

fn check_sink(problems: &mut Problems, spec: &StreamingQuerySpec) {
    let sink = &spec.sink;
    let set = [
        sink.console.is_some().then_some("console"),
        sink.files.is_some().then_some("files"),
        sink.kafka.is_some().then_some("kafka"),
        sink.delta.is_some().then_some("delta"),
    ];
    let set: Vec<&str> = set.into_iter().flatten().collect();
    match set.len() {
        0 => problems.push(
            "spec.sink",
            "names no output: set one of console, files, kafka or delta",
        ),
        1 => {}
        _ => problems.push(
            "spec.sink",
            format!("sets {}: set only one", set.join(" and ")),
        ),
    }
    if let Some(files) = &sink.files {
        check_location(problems, "spec.sink.files.path", &files.path);
        if matches!(sink.format, Some(Format::Csv | Format::Avro)) {
            problems.push("spec.sink.format", "the file sink writes json or parquet");
        }
        if let Some(size) = &files.target_file_size
            && let Err(message) = parse_bytes(size)
        {
            problems.push("spec.sink.files.targetFileSize", message);
        }
        check_column_list(problems, "spec.sink.files.partitionBy", &files.partition_by);
    }
    if let Some(delta) = &sink.delta {
        check_location(problems, "spec.sink.delta.path", &delta.path);
        if sink.format.is_some_and(|f| f != Format::Parquet) {
            problems.push(
                "spec.sink.format",
                "a Delta table holds parquet files: remove it",
            );
        }
        check_column_list(problems, "spec.sink.delta.partitionBy", &delta.partition_by);
        check_column_list(problems, "spec.sink.delta.mergeKeys", &delta.merge_keys);
        match spec.output_mode {
            OutputMode::Update if delta.merge_keys.is_empty() => problems.push(
                "spec.sink.delta.mergeKeys",
                "is required in update mode: name the columns a changed row replaces the table's row on (e.g. [window_start, user_id])",
            ),
            OutputMode::Append | OutputMode::Complete if !delta.merge_keys.is_empty() => problems.push(
                "spec.sink.delta.mergeKeys",
                format!("applies to update mode only; {} mode {}: remove it", spec.output_mode, if spec.output_mode == OutputMode::Append { "appends" } else { "overwrites the table" }),
            ),
            _ => {}
        }
    }
    if let Some(kafka) = &sink.kafka {
        check_brokers(
            problems,
            "spec.sink.kafka.bootstrapServers",
            &kafka.bootstrap_servers,
        );
        check_kafka_options(
            problems,
            "spec.sink.kafka",
            &kafka.options,
            &kafka.secret_options,
        );
        if kafka
            .transactional_id
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            problems.push(
                "spec.sink.kafka.transactionalId",
                "is empty: remove it for sluice-<query id>",
            );
        }
        if kafka.topic.trim().is_empty() {
            problems.push("spec.sink.kafka.topic", "is empty: name the topic to write");
        }
        if matches!(
            sink.format,
            Some(Format::Parquet | Format::Csv | Format::Avro)
        ) {
            problems.push("spec.sink.format", "the Kafka sink writes json records");
        }
    }
    if sink.console.is_some() && sink.format.is_some() {
        problems.push(
            "spec.sink.format",
            "does not apply to the console sink: remove it",
        );
    }
    if let Some(console) = &sink.console
        && console.num_rows == Some(0)
    {
        problems.push("spec.sink.console.numRows", "must be at least 1");
    }
    if sink.files.is_some() && spec.output_mode != OutputMode::Append {
        // Spark's rule: a file sink only supports append mode.
        problems.push(
            "spec.outputMode",
            format!(
                "{} is not supported by the file sink, which only appends (as in Spark): use append",
                spec.output_mode
            ),
        );
    }
}

fn check_trigger(problems: &mut Problems, spec: &StreamingQuerySpec) {
    let Some(trigger) = &spec.trigger else {
        return;
    };
    if trigger.processing_time.is_some() && trigger.available_now.is_some() {
        problems.push(
            "spec.trigger",
            "sets processingTime and availableNow: set only one",
        );
    }
    if let Some(interval) = &trigger.processing_time
        && let Err(message) = parse_duration(interval)
    {
        problems.push("spec.trigger.processingTime", message);
    }
    if trigger.is_available_now() {
        for (i, source) in spec.sources.iter().enumerate() {
            if let Some(generator) = &source.generator
                && generator.total_rows.is_none()
            {
                problems.push(
                    format!("spec.sources[{i}].generator.totalRows"),
                    "is required with trigger.availableNow: a generator without it never ends",
                );
            }
        }
    }
}
