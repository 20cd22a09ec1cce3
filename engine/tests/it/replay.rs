//! A replayed batch is the batch that was planned: it runs with exactly what
//! `offsets/N` recorded (its file list, its watermarks), whatever changed
//! between the crash and the restart (the spec's watermark delay, files
//! arriving), and a restart adds no batch the uninterrupted run would not
//! have run. Also: a restart whose query keeps other state is refused,
//! naming the column.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::crash::{STATELESS, WATERMARK, file_source, log_of, start, wait, write_spec};

/// A file source over `input` (written by [`file_source`]) with `extra`.
fn spec_text(dir: &Path, source: &str, query: &str, sink: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: replay-test}}
spec:
  sources:
    - {source}
  {query}
  sink: {sink}
  checkpoint: {{location: "{checkpoint}"}}
  trigger: {{availableNow: true}}
  statePartitions: 4
"#,
        checkpoint = dir.join("checkpoint").display(),
    )
}

fn files_sink(dir: &Path) -> String {
    format!(r#"{{files: {{path: "{}"}}}}"#, dir.join("out").display())
}

/// The committed rows of a sink directory, by batch, each batch sorted.
fn batch_rows(dir: &Path) -> BTreeMap<u64, Vec<String>> {
    let metadata = dir.join("out/_sluice_metadata");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&metadata).unwrap() {
        let path = entry.unwrap().path();
        let Some(batch) = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u64>()
            .ok()
        else {
            continue;
        };
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut rows = Vec::new();
        for file in manifest["files"].as_array().unwrap() {
            let text =
                std::fs::read_to_string(dir.join("out").join(file["path"].as_str().unwrap()))
                    .unwrap();
            rows.extend(text.lines().map(str::to_owned));
        }
        rows.sort();
        out.insert(batch, rows);
    }
    out
}

fn run_to_end(spec: &Path) {
    let status = wait(&mut start(spec, None));
    assert!(status.success(), "{status:?}\n{}", log_of(spec));
}

fn kill_at(spec: &Path, point: &str) {
    let status = wait(&mut start(spec, Some(point)));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{point}\n{}",
        log_of(spec)
    );
}

const WINDOWS: &str = "query: >-
    SELECT window_start, window_end, device_type, count(*) AS n
    FROM tumble(transactions, event_time, INTERVAL '1' SECOND)
    GROUP BY window_start, window_end, device_type
  outputMode: append";

/// The watermark delay changed between the crash and the restart: the
/// replayed batch still runs with the watermark its offsets recorded, so
/// nothing it wrote differs, and every window is still written exactly once
/// (before, the replay computed a later watermark and its windows' output
/// was skipped as already committed: 50 of 300 were lost).
#[test]
fn a_replayed_batch_keeps_its_watermark_when_the_delay_changes() {
    let input = tempfile::tempdir().unwrap();
    let slow = file_source(input.path(), ", watermark: {column: event_time, delay: 3s}");
    let fast = slow.replace("delay: 3s", "delay: 1s");
    let reference = tempfile::tempdir().unwrap();
    let reference_spec = reference.path().join("query.yaml");
    std::fs::write(
        &reference_spec,
        spec_text(
            reference.path(),
            &slow,
            WINDOWS,
            &files_sink(reference.path()),
        ),
    )
    .unwrap();
    run_to_end(&reference_spec);
    let expected = batch_rows(reference.path());

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("query.yaml");
    std::fs::write(
        &spec,
        spec_text(dir.path(), &slow, WINDOWS, &files_sink(dir.path())),
    )
    .unwrap();
    // Batch 20's state is committed, its commit is not: it is replayed.
    kill_at(&spec, "state:20");
    std::fs::write(
        &spec,
        spec_text(dir.path(), &fast, WINDOWS, &files_sink(dir.path())),
    )
    .unwrap();
    run_to_end(&spec);
    let actual = batch_rows(dir.path());
    for batch in 0..=20 {
        assert_eq!(
            actual.get(&batch),
            expected.get(&batch),
            "batch {batch} differs from the uninterrupted run's"
        );
    }
    // Every window of the uninterrupted run is written, once.
    let window_of = |row: &String| -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(row).unwrap();
        (v["window_start"].to_string(), v["device_type"].to_string())
    };
    let written: Vec<(String, String)> = actual.values().flatten().map(window_of).collect();
    let distinct: BTreeSet<_> = written.iter().cloned().collect();
    assert_eq!(written.len(), distinct.len(), "a window was written twice");
    // With the shorter delay the watermark ends later, so the last windows
    // close too; none of the uninterrupted run's is missing.
    let expected_windows: BTreeSet<_> = expected.values().flatten().map(window_of).collect();
    let lost: Vec<_> = expected_windows.difference(&distinct).collect();
    assert!(lost.is_empty(), "windows lost: {lost:?}");
}

/// A file that arrives, between the crash and the restart, inside the range
/// of the batch being replayed (its name sorts between the files the batch
/// read) is not read by the replay: the offsets list the batch's files.
#[test]
fn a_replayed_batch_reads_exactly_its_files() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), "");
    let reference = tempfile::tempdir().unwrap();
    run_to_end(&write_spec(
        reference.path(),
        &reference.path().join("checkpoint").display().to_string(),
        &source,
        &STATELESS,
    ));
    let expected = batch_rows(reference.path());

    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        &dir.path().join("checkpoint").display().to_string(),
        &source,
        &STATELESS,
    );
    kill_at(&spec, "sink-data:10");
    // Sorts after batch 9's file and before batch 10's.
    let mut names: Vec<String> = std::fs::read_dir(input.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("part-"))
        .collect();
    names.sort();
    let late = format!("{}~late.jsonl", names[9].trim_end_matches(".jsonl"));
    assert!(late.as_str() > names[9].as_str() && late.as_str() < names[10].as_str());
    std::fs::write(
        input.path().join(&late),
        r#"{"transaction_id": "late", "user_id": "u", "amount": 999.0, "merchant_id": "m", "event_time": "2026-01-01T00:00:00Z", "device_type": "web"}
"#,
    )
    .unwrap();
    run_to_end(&spec);
    let actual = batch_rows(dir.path());
    let differing: Vec<u64> = expected
        .keys()
        .chain(actual.keys())
        .filter(|b| actual.get(b) != expected.get(b))
        .copied()
        .collect();
    let sizes =
        |m: &BTreeMap<u64, Vec<String>>| m.iter().map(|(b, r)| (*b, r.len())).collect::<Vec<_>>();
    assert!(
        differing.is_empty(),
        "batches {differing:?} differ: {:?} vs {:?}",
        sizes(&actual),
        sizes(&expected)
    );
}

/// The `sluice run` of a complete-mode query, stopped after `max` batches
/// (or run to the end), its console output by batch.
fn console_batches(spec: &Path, max: Option<u64>) -> BTreeMap<u64, Vec<String>> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("run")
        .arg(spec)
        .env("SLUICE_LOG", "warn")
        .env("SLUICE_STATE_DIR", spec.with_file_name("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(max) = max {
        command.args(["--max-batches", &max.to_string()]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut batches = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        if let Some(id) = line.strip_prefix("Batch: ") {
            current = Some(id.parse::<u64>().unwrap());
            batches.insert(current.unwrap(), Vec::new());
        } else if line.starts_with('|')
            && let Some(b) = current
        {
            batches.get_mut(&b).unwrap().push(line.to_owned());
        }
    }
    for rows in batches.values_mut() {
        rows.sort();
    }
    batches
}

/// A complete-mode query stopped and restarted writes the batches the
/// uninterrupted run writes, no more: no extra batch at the restart that
/// would write the whole result again.
#[test]
fn a_restarted_complete_mode_query_writes_no_extra_batch() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    let query = "query: >-
    SELECT window_start, device_type, count(*) AS n
    FROM tumble(transactions, event_time, INTERVAL '2' SECOND)
    GROUP BY window_start, window_end, device_type
  outputMode: complete";
    let sink = "{console: {numRows: 1000, truncate: false}}";
    let reference = tempfile::tempdir().unwrap();
    let reference_spec = reference.path().join("query.yaml");
    std::fs::write(
        &reference_spec,
        spec_text(reference.path(), &source, query, sink),
    )
    .unwrap();
    let expected = console_batches(&reference_spec, None);
    assert_eq!(expected.len(), 40, "one batch per file, no more");

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("query.yaml");
    std::fs::write(&spec, spec_text(dir.path(), &source, query, sink)).unwrap();
    let mut actual = console_batches(&spec, Some(15));
    actual.extend(console_batches(&spec, Some(10)));
    actual.extend(console_batches(&spec, None));
    assert_eq!(actual, expected);
}

/// A restart whose query keeps other state than the checkpoint's (one more
/// aggregate) is refused, naming the column, and nothing runs.
#[test]
fn a_restart_with_another_state_schema_is_refused_naming_the_column() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("query.yaml");
    std::fs::write(
        &spec,
        spec_text(dir.path(), &source, WINDOWS, &files_sink(dir.path())),
    )
    .unwrap();
    let status = wait(&mut start(&spec, Some("commit:5")));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let changed = WINDOWS.replace("count(*) AS n", "count(*) AS n, max(amount) AS mx");
    std::fs::write(
        &spec,
        spec_text(dir.path(), &source, &changed, &files_sink(dir.path())),
    )
    .unwrap();
    let status = wait(&mut start(&spec, None));
    assert_eq!(status.code(), Some(1));
    let log = log_of(&spec);
    let error = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.contains("state/aggregate")
            && error.contains(r#"state column "max(amount)[value]" is new"#)
            && error.contains("spec.checkpoint.location at a new location"),
        "{log}"
    );
    // Undone, the query goes on from its checkpoint.
    std::fs::write(
        &spec,
        spec_text(dir.path(), &source, WINDOWS, &files_sink(dir.path())),
    )
    .unwrap();
    run_to_end(&spec);
}
