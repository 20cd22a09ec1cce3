//! Golden SQL tests: each case of `engine/tests/sql/` runs its query over its
//! input files, one file per batch, and compares every committed output row,
//! with the batch that wrote it, against `expected.jsonl`. `SLUICE_BLESS=1`
//! rewrites the expected files on purpose.

use std::sync::Arc;

use serde_json::{Map, Value};
use sluice_engine::monitor::Monitor;
use sluice_engine::{RunOptions, Runner, Stopped};
use tokio::sync::watch;

use crate::repo_root;

/// Runs one case and compares (or, with `SLUICE_BLESS=1`, rewrites) its
/// expected output.
async fn case(name: &str) {
    let dir = repo_root().join("engine/tests/sql").join(name);
    let work = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir.join("query.yaml"))
        .unwrap()
        .replace(
            "path: input",
            &format!("path: \"{}\"", dir.join("input").display()),
        )
        .replace(
            "path: output",
            &format!("path: \"{}\"", work.path().join("output").display()),
        )
        .replace(
            "path: tables/",
            &format!("path: {}/", dir.join("tables").display()),
        );
    let query = sluice_crds::load(&text, &format!("{name}/query.yaml")).unwrap();
    let lines = if query.spec.sink.console.is_some() {
        console_rows(&text, work.path())
    } else {
        file_rows(name, &query, &text, work.path()).await
    };
    let got = lines.join("\n") + "\n";
    let expected_path = dir.join("expected.jsonl");
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run with SLUICE_BLESS=1 to write it",
            expected_path.display()
        )
    });
    assert_eq!(
        got,
        expected,
        "{name}: the output differs from {}",
        expected_path.display()
    );
}

/// Runs the query in process with its file sink; the committed rows.
async fn file_rows(
    name: &str,
    query: &sluice_crds::StreamingQuery,
    text: &str,
    work: &std::path::Path,
) -> Vec<String> {
    let monitor = Arc::new(Monitor::new(name));
    let runner = Runner::with_state_dir(query, monitor, work.join("state"))
        .await
        .unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let summary = runner.run(RunOptions::default(), stop_rx).await.unwrap();
    assert_eq!(summary.stopped, Stopped::Completed);
    let mut lines = Vec::new();
    for file in sluice_engine::sink::committed_files(&work.join("output")).unwrap() {
        let batch: u64 = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("part-"))
            .and_then(|n| n.split(['.', '-']).next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        let rows = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        lines.extend(batch_lines(batch, rows, text));
    }
    lines
}

/// Runs the query with `sluice run` and its console sink (update and
/// complete modes, which the file sink refuses as Spark's does); the rows of
/// each batch's table, values as printed.
fn console_rows(text: &str, work: &std::path::Path) -> Vec<String> {
    let spec = work.join("query.yaml");
    std::fs::write(&spec, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&spec)
        .env("SLUICE_STATE_DIR", work.join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = Vec::new();
    let mut batch = None;
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    let cells = |line: &str| -> Vec<String> {
        line.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    for line in stdout.lines().chain(["Batch: end"]) {
        if let Some(id) = line.strip_prefix("Batch: ") {
            if let Some(b) = batch {
                lines.extend(batch_lines(b, std::mem::take(&mut rows), text));
            }
            batch = id.parse().ok();
            header = None;
        } else if line.starts_with('|') {
            match &header {
                None => header = Some(cells(line)),
                Some(names) => rows.push(
                    names
                        .iter()
                        .cloned()
                        .zip(cells(line).into_iter().map(Value::String))
                        .collect(),
                ),
            }
        }
    }
    lines
}

/// One JSON text per row, with its batch; sorted unless the query orders.
fn batch_lines(batch: u64, rows: Vec<Map<String, Value>>, text: &str) -> Vec<String> {
    let mut lines: Vec<String> = rows
        .into_iter()
        .map(|mut row| {
            row.insert("_batch".into(), batch.into());
            // serde_json's map is ordered by key: one text per row.
            serde_json::to_string(&row).unwrap()
        })
        .collect();
    if !text.contains("ORDER BY") {
        lines.sort();
    }
    lines
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                case(stringify!($name)).await;
            }
        )*
    };
}

cases!(
    tumble_append,
    hop_having,
    update_group_by,
    complete_count_distinct,
    stream_static_join,
    deduplicate,
    session_append,
);
