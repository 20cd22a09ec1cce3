//! The `sluice` binary as a user runs it: `validate`, and `run` with its HTTP
//! endpoints read while the query runs, then stopped by SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::repo_root;

fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.current_dir(repo_root()).env("SLUICE_LOG", "info");
    command
}

/// A minimal HTTP/1.1 GET: status code and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[test]
fn validate_prints_every_problem_and_fails() {
    let output = sluice()
        .args(["validate", "examples/invalid/three-mistakes.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "examples/invalid/three-mistakes.yaml: 3 problems",
            r#"  spec.sources[0].watermark.delay: "10 minutes" is not a duration (try "10m")"#,
            r#"  spec.query: reads the table "transaction", which is not a source: the sources are "transactions""#,
            r#"  spec.trigger.processingTime: "soon" is not a duration: write a number and a unit, ms, s, m, h or d, e.g. "30s" or "10m""#,
        ]
    );
}

#[test]
fn run_refuses_an_invalid_spec_and_runs_nothing() {
    let output = sluice()
        .args(["run", "examples/invalid/three-mistakes.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("is not a valid StreamingQuery"), "{stderr}");
    assert!(!stderr.contains("Query started"), "{stderr}");
}

#[test]
fn validate_reports_sql_that_does_not_plan() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q.yaml");
    std::fs::write(
        &file,
        "apiVersion: sluice.dev/v1alpha1\nkind: StreamingQuery\nmetadata: {name: q}\nspec:\n  \
         sources: [{name: rate, generator: {kind: rate, rowsPerSecond: 1}}]\n  \
         query: SELECT valeu FROM rate\n  sink: {console: {}}\n",
    )
    .unwrap();
    let output = sluice().arg("validate").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("1 problem\n  spec.query: ") && stderr.contains("valeu"),
        "{stderr}"
    );
}

#[test]
fn crd_prints_the_committed_crd() {
    let output = sluice().arg("crd").output().unwrap();
    assert!(output.status.success());
    let committed = std::fs::read_to_string(repo_root().join("crds/streamingquery.yaml")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

#[test]
fn a_running_query_serves_progress_and_metrics_and_stops_on_sigterm() {
    let out = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(repo_root().join("examples/local/rate-to-files.yaml"))
        .unwrap()
        .replace("/tmp/sluice/rate-to-files", out.path().to_str().unwrap())
        .replace("processingTime: 2s", "processingTime: 200ms")
        .replace("rowsPerSecond: 10", "rowsPerSecond: 500");
    let file = out.path().join("query.yaml");
    std::fs::write(&file, spec).unwrap();
    let mut child = sluice()
        .arg("run")
        .arg(&file)
        .args(["--http-port", "0", "--http-address", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The log names the port; every line is kept for the checks below.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let port: u16 = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the engine logs its address within 60 s");
        if let Some(rest) = line.split("address=127.0.0.1:").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };

    // Wait for two batches to be reported.
    let deadline = Instant::now() + Duration::from_secs(60);
    let reports: Vec<serde_json::Value> = loop {
        let (status, body) = get(port, "/progress");
        assert_eq!(status, 200);
        let reports: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if reports.len() >= 2 {
            break reports;
        }
        assert!(Instant::now() < deadline, "no progress after 60 s: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let last = reports.last().unwrap();
    for field in [
        "id",
        "runId",
        "name",
        "timestamp",
        "batchId",
        "numInputRows",
        "inputRowsPerSecond",
        "processedRowsPerSecond",
        "durationMs",
        "sources",
        "sink",
    ] {
        assert!(last.get(field).is_some(), "{field} missing from {last}");
    }
    assert_eq!(last["name"], "rate-to-files");
    assert_eq!(reports[0]["batchId"], 0);
    assert_eq!(reports[1]["batchId"], 1);
    assert_eq!(
        reports[1]["sources"][0]["startOffset"],
        reports[0]["sources"][0]["endOffset"]
    );
    assert!(
        last["sources"][0]["description"]
            .as_str()
            .unwrap()
            .starts_with("GeneratorSource[rate")
    );
    assert!(
        last["sink"]["description"]
            .as_str()
            .unwrap()
            .starts_with("FileSink[")
    );
    assert!(last["durationMs"]["triggerExecution"].is_u64());

    let (status, metrics) = get(port, "/metrics");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("sluice_batches_total{query=\"rate-to-files\"}") >= 2.0);
    assert!(value("sluice_input_rows_total{query=\"rate-to-files\",source=\"rate\"}") > 0.0);
    assert!(
        metrics.contains(
            "sluice_source_records_behind_latest{query=\"rate-to-files\",source=\"rate\"}"
        )
    );
    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/readyz").0, 200);

    // SIGTERM stops it cleanly at a batch boundary.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(exit.success(), "exit {exit:?}\n{log}");
    assert!(
        log.contains("Batch completed. batch_id=0 input_rows="),
        "{log}"
    );
    assert!(
        log.contains("Query stopped.") && log.contains("stopped=Requested"),
        "{log}"
    );
    let files = sluice_engine::sink::committed_files(&out.path().join("out")).unwrap();
    assert!(files.len() >= 2, "{files:?}\n{log}");
    assert!(out.path().join("checkpoint/commits/1").exists(), "{log}");
}
