//! A checkpoint written by an earlier build restores in this one: the
//! fixture `engine/tests/fixtures/checkpoint-v2/` holds a windowed
//! aggregation's checkpoint (offsets, commits, RocksDB state in the
//! `sluice-row/1` encoding) and sink after 3 of its 6 input files, committed
//! in the repository. A run from it must finish the query with exactly the
//! rows of a fresh run over the same input. When a dependency upgrade (Arrow,
//! DataFusion, RocksDB) or a change of ours breaks it, this test says so.
//!
//! The fixture is written once, on purpose, with `SLUICE_WRITE_FIXTURE=1`
//! (not `SLUICE_BLESS`): rewriting it would hide exactly what it guards.

use std::path::Path;

use super::crash::{log_of, sink_rows, start_with_args, wait};
use super::repo_root;

const QUERY: &str = r#"apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {name: upgrade-fixture}
spec:
  sources:
    - name: clicks
      files: {path: "DIR/input", maxFilesPerTrigger: 1}
      format: json
      schema:
        - {name: user_id, type: string}
        - {name: page, type: string}
        - {name: amount, type: double}
        - {name: ts, type: timestamp}
      watermark: {column: ts, delay: 10s}
  query: |
    SELECT window_start, window_end, page,
           count(*) AS n, sum(CAST(amount * 100 AS BIGINT)) AS cents,
           min(amount) AS smallest, max(amount) AS largest,
           count(DISTINCT user_id) AS users
    FROM tumble(clicks, ts, INTERVAL '1' MINUTE)
    GROUP BY window_start, window_end, page
  sink: {files: {path: "DIR/out"}}
  outputMode: append
  checkpoint: {location: "DIR/checkpoint"}
  trigger: {availableNow: true}
  statePartitions: 2
"#;

fn fixture() -> std::path::PathBuf {
    repo_root().join("engine/tests/fixtures/checkpoint-v2")
}

/// Six input files of clicks, one a batch, over a few minutes.
fn write_input(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in 0..6u64 {
        let mut text = String::new();
        for i in 0..40u64 {
            let n = file * 40 + i;
            // 45 s of event time per file, a little out of order.
            let seconds = file * 45 + (i * 7) % 40;
            text.push_str(&format!(
                "{{\"user_id\": \"u{}\", \"page\": \"{}\", \"amount\": {}.{:02}, \"ts\": \"2026-03-01T10:{:02}:{:02}Z\"}}\n",
                n % 7,
                ["home", "cart", "pay"][(n % 3) as usize],
                n % 50,
                (n * 13) % 100,
                seconds / 60,
                seconds % 60
            ));
        }
        std::fs::write(dir.join(format!("clicks-{file:02}.jsonl")), text).unwrap();
    }
}

fn spec_in(dir: &Path) -> std::path::PathBuf {
    let spec = dir.join("query.yaml");
    std::fs::write(&spec, QUERY.replace("DIR", &dir.display().to_string())).unwrap();
    spec
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn run(spec: &Path, args: &[&str]) {
    let status = wait(&mut start_with_args(
        spec,
        None,
        &spec.with_file_name("state"),
        args,
    ));
    assert!(status.success(), "{}", log_of(spec));
}

#[test]
fn a_checkpoint_written_by_an_earlier_build_restores() {
    if std::env::var_os("SLUICE_WRITE_FIXTURE").is_some() {
        let _ = std::fs::remove_dir_all(fixture());
        let work = tempfile::tempdir().unwrap();
        write_input(&work.path().join("input"));
        run(&spec_in(work.path()), &["--max-batches", "3"]);
        for part in ["input", "checkpoint", "out"] {
            copy_dir(&work.path().join(part), &fixture().join(part));
        }
    }
    let resumed = tempfile::tempdir().unwrap();
    for part in ["input", "checkpoint", "out"] {
        copy_dir(&fixture().join(part), &resumed.path().join(part));
    }
    run(&spec_in(resumed.path()), &[]);
    let fresh = tempfile::tempdir().unwrap();
    copy_dir(&fixture().join("input"), &fresh.path().join("input"));
    run(&spec_in(fresh.path()), &[]);
    let expected = sink_rows(fresh.path());
    assert!(expected.len() > 5, "{expected:?}");
    assert_eq!(sink_rows(resumed.path()), expected);
    // It did resume: batches 0 to 2 came from the fixture.
    let log = log_of(&resumed.path().join("query.yaml"));
    assert!(!log.contains("error"), "{log}");
}
