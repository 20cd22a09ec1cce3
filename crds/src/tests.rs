use super::*;

const VALID: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: big-spenders}
spec:
  sources:
    - name: transactions
      generator: {kind: transactions, rowsPerSecond: 1000, rowsPerBatch: 500, seed: 42, users: 50}
      watermark: {column: event_time, delay: 10m}
  query: |
    SELECT user_id, amount FROM transactions WHERE amount > 100
  sink: {files: {path: /tmp/out}, format: parquet}
  trigger: {processingTime: 5s}
"#;

fn problems_of(text: &str) -> Vec<String> {
    match load(text, "test.yaml") {
        Err(Error::Invalid { problems, .. }) => problems.0.iter().map(|p| p.to_string()).collect(),
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn a_valid_spec_loads_with_its_defaults() {
    let query = load(VALID, "test.yaml").unwrap();
    assert_eq!(query.metadata.name.as_deref(), Some("big-spenders"));
    assert_eq!(query.spec.output_mode, OutputMode::Append);
    assert_eq!(query.spec.state_partitions(), DEFAULT_STATE_PARTITIONS);
    let generator = query.spec.sources[0].generator.as_ref().unwrap();
    assert_eq!(generator.kind, GeneratorKind::Transactions);
    assert_eq!(generator.rows_per_batch, Some(500));
    assert_eq!(query.spec.sink.format, Some(Format::Parquet));
}

#[test]
fn three_mistakes_give_three_errors_with_their_paths() {
    let text = VALID
        .replace("delay: 10m", "delay: 10 minutes")
        .replace("processingTime: 5s", "processingTime: soon")
        .replace("FROM transactions", "FROM transaction");
    let problems = problems_of(&text);
    assert_eq!(
        problems,
        vec![
            r#"spec.sources[0].watermark.delay: "10 minutes" is not a duration (try "10m")"#,
            r#"spec.query: reads the table "transaction", which is not a source: the sources are "transactions""#,
            r#"spec.trigger.processingTime: "soon" is not a duration: write a number and a unit, ms, s, m, h or d, e.g. "30s" or "10m""#,
        ]
    );
}

#[test]
fn an_unknown_field_is_named_with_its_path() {
    let text = VALID.replace("seed: 42", "sead: 42");
    assert_eq!(
        problems_of(&text),
        vec![
            r#"spec.sources[0].generator.sead: is not a field here (did you mean "seed"?): the fields are kind, maxDisorder, merchants, rowsPerBatch, rowsPerSecond, seed, startTime, totalRows, users"#
        ]
    );
}

#[test]
fn a_wrong_enum_value_is_named_with_its_path() {
    let text = VALID.replace("kind: transactions", "kind: trades");
    assert_eq!(
        problems_of(&text),
        vec![
            r#"spec.sources[0].generator.kind: "trades" is not a supported value: use "rate", "transactions", "nexmarkPerson", "nexmarkAuction" or "nexmarkBid""#
        ]
    );
}

/// Every structural mistake at once, as the API server reports them: two
/// unknown fields, a wrong type and a bad enum value in one spec.
#[test]
fn every_structural_mistake_is_reported_in_one_pass() {
    let text = VALID
        .replace("seed: 42", "sead: 42")
        .replace("  query: |", "  qeury: |")
        .replace("rowsPerSecond: 1000", "rowsPerSecond: fast")
        .replace(
            "trigger: {processingTime: 5s}",
            "trigger: {processingTime: 5s}
  outputMode: upsert
  replicas: -1
  sources2: []",
        );
    let problems = problems_of(&text);
    assert_eq!(
        problems,
        vec![
            "spec.query: is required",
            r#"spec.outputMode: "upsert" is not a supported value: use "append", "update" or "complete""#,
            r#"spec.qeury: is not a field here (did you mean "query"?): the fields are autoscaling, checkpoint, engine, outputMode, query, replicas, restartPolicy, sink, sources, stallTimeout, statePartitions, suspend, tables, trigger"#,
            "spec.replicas: -1 is too small: use at least 0",
            r#"spec.sources[0].generator.rowsPerSecond: "fast" is a string: write an integer"#,
            r#"spec.sources[0].generator.sead: is not a field here (did you mean "seed"?): the fields are kind, maxDisorder, merchants, rowsPerBatch, rowsPerSecond, seed, startTime, totalRows, users"#,
            "spec.sources2: is not a field here (did you mean \"sources\"?): the fields are autoscaling, checkpoint, engine, outputMode, query, replicas, restartPolicy, sink, sources, stallTimeout, statePartitions, suspend, tables, trigger",
        ]
    );
}

#[test]
fn structure_is_checked_at_every_level_and_kind() {
    let text = VALID
        .replace(
            "sink: {files: {path: /tmp/out}, format: parquet}",
            "sink: {files: {path: [a]}, format: parquet}",
        )
        .replace(
            "watermark: {column: event_time, delay: 10m}",
            "watermark: [event_time]",
        )
        .replace(
            "metadata: {name: big-spenders}",
            "metadata: {name: big-spenders, labels: {team: risk}}
status: {phase: Done}
extra: 1",
        );
    assert_eq!(
        problems_of(&text),
        vec![
            "extra: is not a field here: the fields are apiVersion, kind, metadata, spec, status",
            "spec.sink.files.path: is a list: write a string",
            "spec.sources[0].watermark: is a list: write an object (field: value)",
            r#"status.phase: "Done" is not a supported value: use "Pending", "Running", "Suspended", "Failed" or "Completed""#,
        ]
    );
    let engine = format!(
        "{VALID}  engine:\n    stateVolume: {{size: [1]}}\n    resources: {{requests: {{cpu: 1.5}}}}\n    env: [{{name: A, value: 1}}]\n  checkpoint: {{location: null}}\n"
    );
    let problems = problems_of(&engine);
    assert!(problems.contains(&"spec.engine.stateVolume.size: is a list: write an integer or a string (e.g. \"20Gi\" or \"500m\")".to_owned()), "{problems:#?}");
    assert!(problems.contains(&"spec.engine.resources.requests.cpu: 1.5 is a number: write an integer or a string (e.g. \"20Gi\" or \"500m\")".to_owned()), "{problems:#?}");
    assert!(
        problems.contains(&"spec.engine.env[0].value: 1 is an integer: write a string".to_owned()),
        "{problems:#?}"
    );
    assert!(
        problems.contains(&"spec.checkpoint.location: is null: write a string".to_owned()),
        "{problems:#?}"
    );
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

#[test]
fn another_kind_of_manifest_is_refused() {
    let err = load("apiVersion: v1\nkind: ConfigMap\n", "cm.yaml")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cm.yaml: is a ConfigMap of v1: expected apiVersion: sluice.dev/v1alpha1 and kind: StreamingQuery"
    );
}

#[test]
fn yaml_syntax_errors_give_the_line() {
    let err = load("apiVersion: [\n", "bad.yaml").unwrap_err().to_string();
    assert!(
        err.starts_with("bad.yaml: is not valid YAML:") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn sql_is_checked_for_syntax_statement_kind_and_tables() {
    let bad_syntax = VALID.replace("WHERE amount > 100", "WHERE amount >");
    assert!(problems_of(&bad_syntax)[0].starts_with("spec.query: is not valid SQL:"));
    let insert = VALID.replace(
        "SELECT user_id, amount FROM transactions WHERE amount > 100",
        "INSERT INTO t VALUES (1)",
    );
    assert!(problems_of(&insert)[0].starts_with("spec.query: is not a query"));
    let cte = VALID.replace(
        "SELECT user_id, amount FROM transactions WHERE amount > 100",
        "WITH big AS (SELECT * FROM Transactions WHERE amount > 100) SELECT * FROM big",
    );
    load(&cte, "test.yaml").expect("CTEs and case-folded names are fine");
}

#[test]
fn source_shapes_are_checked() {
    let text = VALID
        .replace("- name: transactions", "- name: Transactions-2024")
        .replace("users: 50", "users: 0")
        .replace(
            "watermark: {column: event_time",
            "schema: [{name: a, type: string}]\n      watermark: {column: amount",
        );
    let problems = problems_of(&text);
    assert!(problems.contains(&r#"spec.sources[0].name: "Transactions-2024" is not a table name the query can use: use lower-case letters, digits and '_', starting with a letter (e.g. "transactions_2024")"#.to_owned()), "{problems:#?}");
    assert!(problems.contains(&"spec.sources[0].generator.users: must be at least 1".to_owned()));
    assert!(problems.contains(&"spec.sources[0].schema: does not apply to a generator, whose columns are fixed: remove it".to_owned()));
    assert!(problems.contains(&r#"spec.sources[0].watermark.column: "amount" is of type Double: a watermark needs a timestamp column"#.to_owned()));
}

#[test]
fn an_avro_source_needs_the_writers_record_schema_with_its_columns() {
    let kafka = |format: &str, avro: &str| {
        VALID.replace(
            "generator: {kind: transactions, rowsPerSecond: 1000, rowsPerBatch: 500, seed: 42, users: 50}",
            &format!(
                "kafka: {{bootstrapServers: k:9092, topic: t}}\n      format: {format}\n      {avro}schema: [{{name: user_id, type: string}}, {{name: amount, type: double}}, {{name: event_time, type: timestamp}}]"
            ),
        )
    };
    let record = r#"avroSchema: '{"type": "record", "name": "T", "fields": [{"name": "user_id", "type": "string"}, {"name": "amount", "type": "double"}, {"name": "event_time", "type": "long"}]}'
      "#;
    load(&kafka("avro", record), "test.yaml").unwrap();
    assert_eq!(
        problems_of(&kafka("avro", "")),
        vec![
            "spec.sources[0].avroSchema: is missing: format avro needs the writer's Avro schema, as its JSON text"
        ]
    );
    assert_eq!(
        problems_of(&kafka("json", record)),
        vec!["spec.sources[0].avroSchema: is for Kafka sources with format: avro"]
    );
    assert_eq!(
        problems_of(&kafka(
            "avro",
            &record.replace(r#"{"name": "amount", "type": "double"}, "#, "")
        )),
        vec![
            r#"spec.sources[0].avroSchema: has no field "amount", a column of the source's schema (its fields: user_id, event_time)"#
        ]
    );
    assert_eq!(
        problems_of(&kafka("avro", "avroSchema: '\"string\"'\n      ")),
        vec![
            r#"spec.sources[0].avroSchema: is not an Avro record schema: write {"type": "record", "name": ..., "fields": [...]}"#
        ]
    );
}

#[test]
fn a_dead_letter_destination_needs_a_source_that_can_be_malformed() {
    let text = VALID.replace(
        "watermark: {column: event_time, delay: 10m}",
        "watermark: {column: event_time, delay: 10m}\n      deadLetter: {path: /tmp/dead}",
    );
    assert_eq!(
        problems_of(&text),
        vec![
            "spec.sources[0].deadLetter: does not apply to a generator, whose rows are always well-formed: remove it"
        ]
    );
}

#[test]
fn sources_and_sinks_need_exactly_one_kind() {
    let text = VALID
        .replace(
            "generator: {kind",
            "files: {path: /data}\n      generator: {kind",
        )
        .replace(
            "sink: {files: {path: /tmp/out}, format: parquet}",
            "sink: {}",
        );
    let problems = problems_of(&text);
    assert!(
        problems.contains(&"spec.sources[0]: sets generator and files: set only one".to_owned()),
        "{problems:#?}"
    );
    assert!(problems.contains(
        &"spec.sink: names no output: set one of console, files, kafka or delta".to_owned()
    ));
}

#[test]
fn spark_rules_on_modes_and_triggers_are_enforced() {
    let text = VALID.replace(
        "trigger: {processingTime: 5s}",
        "trigger: {availableNow: true}\n  outputMode: update",
    );
    let problems = problems_of(&text);
    assert_eq!(
        problems,
        vec![
            "spec.outputMode: update is not supported by the file sink, which only appends (as in Spark): use append",
            "spec.sources[0].generator.totalRows: is required with trigger.availableNow: a generator without it never ends",
        ]
    );
}

#[test]
fn names_must_be_dns_labels() {
    let text = VALID.replace("name: big-spenders", "name: Big_Spenders");
    assert_eq!(
        problems_of(&text),
        vec![
            r#"metadata.name: "Big_Spenders" is not a valid name: use lower-case letters, digits and '-', starting with a letter (e.g. "fraud-detection")"#
        ]
    );
}

#[test]
fn a_spec_round_trips_through_yaml() {
    let query = load(VALID, "test.yaml").unwrap();
    let text = serde_yaml::to_string(&query).unwrap();
    assert_eq!(load(&text, "again.yaml").unwrap(), query);
}

/// The committed CRD files must be what the types generate. Regenerate them
/// with `SLUICE_BLESS=1 cargo test -p sluice-crds`.
#[test]
fn the_committed_crds_are_up_to_date() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (path, generated) in [
        (root.join("streamingquery.yaml"), crd_yaml()),
        (
            root.join("../charts/sluice/templates/crd.yaml"),
            crd_chart_template(),
        ),
    ] {
        if std::env::var_os("SLUICE_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from the CRD the types generate: run `SLUICE_BLESS=1 cargo test -p sluice-crds` and commit it",
            path.display()
        );
    }
}

/// The CRD's CEL rules, evaluated as the API server evaluates them (kube's
/// client-side CEL validator over the generated schema).
fn cel_errors(text: &str) -> Vec<String> {
    let query = parse(text, "test.yaml").unwrap();
    match kube::core::cel::validate_cel(&query) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn the_crds_cel_rules_refuse_what_validate_refuses() {
    assert_eq!(cel_errors(VALID), Vec::<String>::new());
    let two_sources = VALID.replace(
        "generator: {kind",
        "files: {path: /data}\n      generator: {kind",
    );
    let errors = cel_errors(&two_sources);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("set exactly one of generator, kafka or files"),
        "{errors:?}"
    );
    let no_sink = VALID.replace(
        "sink: {files: {path: /tmp/out}, format: parquet}",
        "sink: {}",
    );
    assert!(cel_errors(&no_sink)[0].contains("set exactly one of console, files, kafka or delta"));
    let both_triggers = VALID.replace(
        "trigger: {processingTime: 5s}",
        "trigger: {processingTime: 5s, availableNow: true}",
    );
    assert!(cel_errors(&both_triggers)[0].contains("set processingTime or availableNow, not both"));
}

#[test]
fn every_example_passes_the_crds_cel_rules() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for dir in ["kubernetes", "local"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(
                cel_errors(&text),
                Vec::<String>::new(),
                "{}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5);
}

#[test]
fn static_tables_are_checked_and_may_be_read_by_the_query() {
    let with_table = VALID.replace(
        "  query: |\n    SELECT user_id, amount FROM transactions WHERE amount > 100",
        "  tables:\n    - {name: users, path: /data/users.parquet, format: parquet}\n  query: |\n    SELECT t.user_id, u.name FROM transactions t JOIN users u ON t.user_id = u.user_id",
    );
    assert!(with_table.contains("tables:"), "the fixture changed");
    load(&with_table, "test.yaml").unwrap();
    let wrong = with_table.replace(
        "{name: users, path: /data/users.parquet, format: parquet}",
        "{name: transactions, path: \"s3://b/users.csv\", format: csv}",
    );
    let problems = problems_of(&wrong);
    for expected in [
        "spec.tables[0].name: \"transactions\" is already a source's or an earlier table's name: give each its own",
        "spec.tables[0].path: uses the scheme \"s3\": static tables are local files (or file://) in this version",
        "spec.tables[0].schema: is missing: csv tables need their columns declared",
    ] {
        assert!(problems.contains(&expected.to_owned()), "{problems:#?}");
    }
}

/// A Kafka-to-Kafka spec with `extra` lines in the source's kafka block
/// and `sink` as the sink's kafka block.
fn kafka_spec(source: &str, sink: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: fraud}}
spec:
  sources:
    - name: transactions
      kafka: {{bootstrapServers: "kafka:9092", {source}}}
      schema: [{{name: user_id, type: string}}, {{name: amount, type: double}}]
  query: SELECT user_id, amount FROM transactions
  sink: {{kafka: {{bootstrapServers: "kafka:9092", topic: alerts, {sink}}}}}
"#
    )
}

#[test]
fn kafka_sources_and_sinks_are_checked_field_by_field() {
    load(
        &kafka_spec(
            r#"topics: [a, b], startingOffsets: '{"a": {"0": 5, "1": -2}}', options: {security.protocol: SASL_SSL}, secretOptions: [{name: sasl.password, env: KAFKA_PASSWORD}]"#,
            "delivery: atLeastOnce",
        ),
        "test.yaml",
    )
    .expect("a valid Kafka spec");
    let problems = problems_of(&kafka_spec(
        r#"topic: a, topicPattern: "a.*", startingOffsets: soon, options: {group.id: mine, sasl.password: hunter2}, secretOptions: [{name: sasl.username}]"#,
        "options: {transactional.id: x}",
    ));
    for expected in [
        "spec.sources[0].kafka: sets topic and topicPattern: set only one",
        r#"spec.sources[0].kafka.startingOffsets: "soon" is neither earliest, latest nor JSON: write earliest, latest, or JSON such as {"topic": {"0": 42, "1": -2}} (-2: earliest, -1: latest)"#,
        "spec.sources[0].kafka.options.group.id: is set by Sluice: the source's consumer group is groupId",
        "spec.sources[0].kafka.options.sasl.password: holds a secret: move it to secretOptions (from an environment variable or a file), so that it is never shown with the spec",
        "spec.sources[0].kafka.secretOptions[0]: names no value: set env (a variable) or file",
        "spec.sink.kafka.options.transactional.id: is set by Sluice: set the sink's transactionalId",
    ] {
        assert!(
            problems.contains(&expected.to_owned()),
            "{expected}\n{problems:#?}"
        );
    }
    let problems = problems_of(&kafka_spec("topic: a", "").replace("kafka:9092", "kafka"));
    assert!(
        problems.contains(&r#"spec.sources[0].kafka.bootstrapServers: "kafka" is not host:port, e.g. "kafka:9092""#.to_owned()),
        "{problems:#?}"
    );
}

#[test]
fn a_keyed_source_names_one_topic_and_one_of_its_columns() {
    load(&kafka_spec("topic: a, keyedBy: user_id", ""), "test.yaml").expect("keyed by a column");
    let problems = problems_of(&kafka_spec("topics: [a, b], keyedBy: user", ""));
    for expected in [
        r#"spec.sources[0].kafka.keyedBy: is "user", but the source does not read a single topic: the state is partitioned as one topic is, so name it in topic"#,
        r#"spec.sources[0].kafka.keyedBy: is "user", which is not a column of the source's schema"#,
    ] {
        assert!(
            problems.contains(&expected.to_owned()),
            "{expected}\n{problems:#?}"
        );
    }
}

#[test]
fn starting_offsets_are_read_as_spark_writes_them() {
    use crate::validate::{StartingOffsets, parse_starting_offsets};
    assert_eq!(
        parse_starting_offsets("earliest"),
        Ok(StartingOffsets::Earliest)
    );
    assert_eq!(
        parse_starting_offsets("latest"),
        Ok(StartingOffsets::Latest)
    );
    let StartingOffsets::Partitions(p) =
        parse_starting_offsets(r#"{"t": {"0": 23, "1": -1}}"#).unwrap()
    else {
        panic!("partitions")
    };
    assert_eq!(p["t"][&0], 23);
    assert_eq!(p["t"][&1], -1);
    assert!(parse_starting_offsets(r#"{"t": {"x": 1}}"#).is_err());
    assert!(parse_starting_offsets(r#"{"t": {"0": -3}}"#).is_err());
}

#[test]
fn several_replicas_need_kafka_in_and_out_and_a_checkpoint() {
    let problems = problems_of(&format!("{VALID}  replicas: 2\n"));
    assert_eq!(
        problems,
        vec![
            "spec.replicas: 2 replicas split the partitions of Kafka sources between them and write to a Kafka sink, each with its own logs under spec.checkpoint: scale-out of other sources and sinks is not built in this version yet; set 1 (or 0 to stop the query)"
        ]
    );
    load(&format!("{VALID}  replicas: 0\n"), "test.yaml").expect("0 stops the query");
    let kafka = kafka_spec("topic: t", "delivery: atLeastOnce");
    assert_eq!(
        problems_of(&format!("{kafka}  replicas: 3\n")).len(),
        1,
        "no checkpoint"
    );
    load(
        &format!("{kafka}  replicas: 3\n  checkpoint: {{location: /tmp/c}}\n"),
        "test.yaml",
    )
    .expect("Kafka to Kafka with a checkpoint scales out");
}

#[test]
fn autoscaling_needs_a_query_that_scales_out_and_sound_bounds() {
    let problems = problems_of(&format!("{VALID}  autoscaling: {{maxReplicas: 4}}\n"));
    assert_eq!(
        problems,
        vec![
            "spec.autoscaling: the autoscaler scales queries that read Kafka sources and write to a Kafka sink with a checkpoint (their replicas split the partitions); scale-out of other sources and sinks is not built in this version yet: remove autoscaling or set enabled: false"
        ]
    );
    load(
        &format!("{VALID}  autoscaling: {{enabled: false, maxReplicas: 4}}\n"),
        "test.yaml",
    )
    .expect("settings kept while off");
    let kafka = format!(
        "{}  checkpoint: {{location: /tmp/c}}\n",
        kafka_spec("topic: t", "delivery: atLeastOnce")
    );
    load(
        &format!(
            "{kafka}  replicas: 7\n  autoscaling: {{maxReplicas: 4, scaleToZeroAfter: 10m}}\n"
        ),
        "test.yaml",
    )
    .expect("Kafka to Kafka with a checkpoint is autoscaled; spec.replicas is then ignored");
    assert_eq!(
        problems_of(&format!(
            "{kafka}  autoscaling: {{minReplicas: 5, maxReplicas: 4, catchUpWithin: 5 minutes}}\n"
        )),
        vec![
            "spec.autoscaling.minReplicas: 5 is more than maxReplicas 4",
            r#"spec.autoscaling.catchUpWithin: "5 minutes" is not a duration (try "5m")"#,
        ]
    );
    assert_eq!(
        problems_of(&format!("{kafka}  autoscaling: {{targetUtilization: 0}}\n")),
        vec![
            "spec.autoscaling.maxReplicas: is required",
            "spec.autoscaling.targetUtilization: 0 is too small: use at least 1",
        ]
    );
}

#[test]
fn a_nexmark_generator_has_its_tables_columns_and_no_transaction_settings() {
    let bids = VALID
        .replace("kind: transactions", "kind: nexmarkBid")
        .replace(", users: 50", "")
        .replace("column: event_time", "column: datetime")
        .replace(
            "SELECT user_id, amount FROM transactions WHERE amount > 100",
            "SELECT auction, price FROM transactions WHERE auction % 123 = 0",
        );
    load(&bids, "test.yaml").unwrap();
    assert_eq!(
        problems_of(&bids.replace("seed: 42", "seed: 42, users: 50, maxDisorder: 1s")),
        vec![
            "spec.sources[0].generator.users: applies to kind transactions only: remove it, or set kind: transactions",
            "spec.sources[0].generator.maxDisorder: applies to kind transactions only: remove it, or set kind: transactions",
        ]
    );
    assert_eq!(
        problems_of(&bids.replace("column: datetime", "column: price")),
        vec![
            r#"spec.sources[0].watermark.column: "price" is of type Long: a watermark needs a timestamp column"#
        ]
    );
}
