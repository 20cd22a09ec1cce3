//! Generator → SQL → file sink, in process, checked row for row.

use std::sync::Arc;

use sluice_engine::monitor::Monitor;
use sluice_engine::{RunOptions, Runner, Stopped};
use tokio::sync::watch;

async fn run(yaml: &str, max_batches: Option<u64>) -> sluice_engine::Summary {
    run_monitored(yaml, max_batches).await.0
}

/// Runs a query in process; returns what it did and its monitor.
async fn run_monitored(
    yaml: &str,
    max_batches: Option<u64>,
) -> (sluice_engine::Summary, Arc<Monitor>) {
    let query = sluice_crds::load(yaml, "test.yaml").unwrap();
    let name = query.metadata.name.clone().unwrap();
    let monitor = Arc::new(Monitor::new(&name));
    let runner = Runner::new(&query, monitor.clone()).await.unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let summary = runner
        .run(
            RunOptions {
                max_batches,
                ..RunOptions::default()
            },
            stop_rx,
        )
        .await
        .unwrap();
    (summary, monitor)
}

#[tokio::test]
async fn rate_rows_are_filtered_transformed_and_written_a_file_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: rate-test}}
spec:
  sources:
    - name: rate
      generator: {{kind: rate, rowsPerSecond: 4, rowsPerBatch: 5, startTime: "2026-01-01T00:00:00Z"}}
  query: |
    SELECT value,
           value * value AS squared,
           CASE WHEN value % 2 = 0 THEN 'even' ELSE 'odd' END AS parity,
           CAST(value AS DOUBLE) / 4 AS seconds,
           timestamp
    FROM rate WHERE value % 3 <> 0
  sink: {{files: {{path: "{}"}}}}
"#,
        out.display()
    );
    let summary = run(&yaml, Some(3)).await;
    assert_eq!(summary.batches, 3);
    assert_eq!(summary.input_rows, 15);
    assert_eq!(summary.output_rows, 10);
    assert_eq!(summary.stopped, Stopped::MaxBatches);

    // Row v's event time is v / rowsPerSecond seconds after startTime;
    // whole seconds are written without a fraction.
    let row = |v: i64| {
        let ms = v * 250;
        let fraction = if ms % 1000 == 0 {
            String::new()
        } else {
            format!(".{:03}", ms % 1000)
        };
        format!(
            r#"{{"value":{v},"squared":{},"parity":"{}","seconds":{},"timestamp":"2026-01-01T00:00:{:02}{fraction}Z"}}"#,
            v * v,
            if v % 2 == 0 { "even" } else { "odd" },
            serde_json::to_string(&(v as f64 / 4.0)).unwrap(),
            ms / 1000,
        )
    };
    let expected = |values: &[i64]| values.iter().map(|v| row(*v) + "\n").collect::<String>();
    let committed = sluice_engine::sink::committed_files(&out).unwrap();
    let read = |i: usize| std::fs::read_to_string(&committed[i]).unwrap();
    assert_eq!(committed.len(), 3);
    assert_eq!(read(0), expected(&[1, 2, 4]));
    assert_eq!(read(1), expected(&[5, 7, 8]));
    assert_eq!(read(2), expected(&[10, 11, 13, 14]));
    // Each batch's file is named by its batch and the run that wrote it.
    for (i, file) in committed.iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("part-{i:08}-")) && name.ends_with(".jsonl"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn available_now_reads_every_row_once_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: all-rows}}
spec:
  sources:
    - name: rate
      generator: {{kind: rate, rowsPerSecond: 1000, rowsPerBatch: 300, totalRows: 1000}}
  query: SELECT value FROM rate
  sink: {{files: {{path: "{}"}}, format: parquet}}
  trigger: {{availableNow: true}}
"#,
        dir.path().display()
    );
    let summary = run(&yaml, None).await;
    assert_eq!(
        (summary.batches, summary.input_rows, summary.output_rows),
        (4, 1000, 1000)
    );
    assert_eq!(summary.stopped, Stopped::Completed);
    let ctx = datafusion::prelude::SessionContext::new();
    let df = ctx
        .read_parquet(dir.path().to_str().unwrap(), Default::default())
        .await
        .unwrap();
    ctx.register_table("t", df.into_view()).unwrap();
    let out = ctx
        .sql("SELECT count(*) AS n, count(DISTINCT value) AS d, min(value) AS lo, max(value) AS hi FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&out)
        .unwrap()
        .to_string();
    assert!(text.contains("| 1000 | 1000 | 0  | 999 |"), "{text}");
}

/// The transactions generator's rows for a seed are fixed: the golden file
/// holds them. Regenerate on purpose with `SLUICE_BLESS=1 cargo test`.
#[tokio::test]
async fn transactions_for_a_seed_match_the_golden_file() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: golden}}
spec:
  sources:
    - name: transactions
      generator: {{kind: transactions, rowsPerSecond: 10, rowsPerBatch: 12, totalRows: 12, seed: 42, users: 20, merchants: 5, startTime: "2026-01-01T00:00:00Z"}}
  query: SELECT * FROM transactions
  sink: {{files: {{path: "{}"}}}}
  trigger: {{availableNow: true}}
"#,
        dir.path().display()
    );
    run(&yaml, None).await;
    let files = sluice_engine::sink::committed_files(dir.path()).unwrap();
    let actual = std::fs::read_to_string(&files[0]).unwrap();
    let golden = super::repo_root().join("engine/tests/it/golden/transactions-seed42.jsonl");
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&golden, &actual).unwrap();
    }
    assert_eq!(
        actual,
        std::fs::read_to_string(&golden).unwrap_or_default(),
        "regenerate with SLUICE_BLESS=1"
    );
}

/// A query with a checkpoint, stopped and started again, resumes after its
/// last committed batch: batch ids and rows continue, nothing is repeated.
#[tokio::test]
async fn a_restarted_query_resumes_after_its_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: resume}}
spec:
  sources:
    - name: rate
      generator: {{kind: rate, rowsPerSecond: 10, rowsPerBatch: 3}}
  query: SELECT value FROM rate
  sink: {{files: {{path: "{}"}}}}
  checkpoint: {{location: "{}"}}
"#,
        out.display(),
        dir.path().join("checkpoint").display()
    );
    run(&yaml, Some(2)).await;
    run(&yaml, Some(2)).await;
    let files = sluice_engine::sink::committed_files(&out).unwrap();
    let batches: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy()[..13].to_owned())
        .collect();
    assert_eq!(
        batches,
        [
            "part-00000000",
            "part-00000001",
            "part-00000002",
            "part-00000003"
        ]
    );
    let values: Vec<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<String> = (0..12).map(|v| format!(r#"{{"value":{v}}}"#)).collect();
    assert_eq!(values, expected);
}

/// Malformed records go to the dead-letter destination with their file, line
/// and reason, and are counted; the rest of the batch goes on to the sink.
#[tokio::test]
async fn malformed_records_go_to_the_dead_letter_destination_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(
        input.join("a.json"),
        "{\"id\": 1, \"name\": \"one\"}\n{\"id\": \"two\", \"name\": \"two\"}\n{\"id\": 3, \"name\": \"three\"}\n{oops\n",
    )
    .unwrap();
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: dead-letters}}
spec:
  sources:
    - name: people
      files: {{path: "{}"}}
      schema: [{{name: id, type: long}}, {{name: name, type: string}}]
      deadLetter: {{path: "{}"}}
  query: SELECT id, upper(name) AS name FROM people
  sink: {{files: {{path: "{}"}}}}
  trigger: {{availableNow: true}}
"#,
        input.display(),
        dir.path().join("dead").display(),
        dir.path().join("out").display()
    );
    let (summary, monitor) = run_monitored(&yaml, None).await;
    assert_eq!((summary.input_rows, summary.output_rows), (2, 2));

    let files = sluice_engine::sink::committed_files(&dir.path().join("out")).unwrap();
    let out = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(
        out,
        "{\"id\":1,\"name\":\"ONE\"}\n{\"id\":3,\"name\":\"THREE\"}\n"
    );
    let dead = std::fs::read_to_string(dir.path().join("dead/people-00000000.jsonl")).unwrap();
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["line"], 2);
    assert_eq!(dead[0]["record"], r#"{"id": "two", "name": "two"}"#);
    assert!(dead[0]["file"].as_str().unwrap().ends_with("in/a.json"));
    assert!(!dead[0]["error"].as_str().unwrap().is_empty());
    assert_eq!(dead[1]["line"], 4);

    let progress = monitor.last().unwrap();
    assert_eq!(progress.sources[0].num_dead_letter_records, 2);
    assert!(
        monitor.metrics().render().contains(
            "sluice_dead_letter_records_total{query=\"dead-letters\",source=\"people\"} 2"
        )
    );
}

/// Each batch after the first is read ahead while the one before it
/// commits: its rows and its malformed records still belong to the batch
/// its offsets entry names, file by file.
#[tokio::test]
async fn a_batch_read_ahead_holds_the_rows_and_dead_letters_its_offsets_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for f in 0..4 {
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!("{{\"id\": {}, \"file\": {f}}}\n", f * 100 + i));
        }
        text.push_str(&format!("{{broken in file {f}\n"));
        std::fs::write(input.join(format!("{f}.json")), text).unwrap();
    }
    let yaml = format!(
        r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: read-ahead}}
spec:
  sources:
    - name: rows
      files: {{path: "{}", maxFilesPerTrigger: 1}}
      schema: [{{name: id, type: long}}, {{name: file, type: long}}]
      deadLetter: {{path: "{}"}}
  query: SELECT id, file FROM rows
  sink: {{files: {{path: "{}"}}}}
  checkpoint: {{location: "{}"}}
  trigger: {{availableNow: true}}
"#,
        input.display(),
        dir.path().join("dead").display(),
        dir.path().join("out").display(),
        dir.path().join("checkpoint").display(),
    );
    let summary = run(&yaml, None).await;
    assert_eq!((summary.batches, summary.output_rows), (4, 200));
    for batch in 0..4u64 {
        let offsets: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("checkpoint/offsets/{batch}"))).unwrap(),
        )
        .unwrap();
        let named = offsets.to_string();
        assert!(
            named.contains(&format!("{batch}.json")),
            "offsets/{batch}: {named}"
        );
        let files: Vec<_> = sluice_engine::sink::committed_files(&dir.path().join("out"))
            .unwrap()
            .into_iter()
            .filter(|f| {
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("part-{batch:08}-"))
            })
            .collect();
        assert_eq!(files.len(), 1, "batch {batch}: {files:?}");
        let rows = std::fs::read_to_string(&files[0]).unwrap();
        assert_eq!(rows.lines().count(), 50, "batch {batch}");
        assert!(
            rows.lines()
                .all(|l| l.ends_with(&format!("\"file\":{batch}}}"))),
            "batch {batch} holds rows of another file: {rows}"
        );
        let dead = std::fs::read_to_string(dir.path().join(format!("dead/rows-{batch:08}.jsonl")))
            .unwrap();
        assert!(
            dead.contains(&format!("broken in file {batch}")) && dead.lines().count() == 1,
            "batch {batch}'s dead letters: {dead}"
        );
    }
}
