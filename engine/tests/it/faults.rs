//! The checkpoint on an S3 server that fails: `e2e/s3-faults.sh` puts a
//! proxy (`e2e/s3proxy.py`) in front of a real S3-compatible server that
//! answers 500 to some requests (before or after doing them), drops
//! connections, answers slowly, and, told to, fails everything for 25 s.
//! The windowed aggregation runs through it: object_store retries single
//! requests, and when the outage outlasts those retries the engine restarts
//! from its checkpoint with backoff, saying so in `/status`. The sink must
//! hold exactly an uninterrupted run's rows.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::crash::{
    WATERMARK, WINDOWED, file_source, log_of, sink_rows, start_with_args, wait, wait_for,
    write_spec,
};

/// The environment variables the e2e script sets.
const CHECKPOINT_ENV: &str = "SLUICE_TEST_S3_FAULTY_CHECKPOINT";
const CONTROL_ENV: &str = "SLUICE_TEST_S3_FAULT_CONTROL";

/// A minimal HTTP/1.1 request to `addr` (`host:port`): status and body.
fn request(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
#[ignore = "needs the faulty S3 server: run e2e/s3-faults.sh"]
fn a_failing_object_store_loses_and_duplicates_nothing() {
    let base = std::env::var(CHECKPOINT_ENV)
        .unwrap_or_else(|_| panic!("{CHECKPOINT_ENV} is not set: run e2e/s3-faults.sh"));
    let control = std::env::var(CONTROL_ENV)
        .unwrap_or_else(|_| panic!("{CONTROL_ENV} is not set: run e2e/s3-faults.sh"));
    let control = control.trim_start_matches("http://").to_owned();
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);

    // What an uninterrupted run writes, with a local checkpoint.
    let reference = tempfile::tempdir().unwrap();
    let reference_spec = write_spec(
        reference.path(),
        &reference.path().join("checkpoint").display().to_string(),
        &source,
        &WINDOWED,
    );
    let status = wait(&mut start_with_args(
        &reference_spec,
        None,
        &reference.path().join("state"),
        &[],
    ));
    assert!(status.success(), "{}", log_of(&reference_spec));
    let expected = sink_rows(reference.path());

    let dir = tempfile::tempdir().unwrap();
    let location = format!("{base}/{}", uuid::Uuid::new_v4());
    let spec = write_spec(dir.path(), &location, &source, &WINDOWED);
    let port = free_port();
    let mut child = start_with_args(
        &spec,
        None,
        &dir.path().join("state"),
        &[
            "--http-port",
            &port.to_string(),
            "--http-address",
            "127.0.0.1",
        ],
    );
    let engine = format!("127.0.0.1:{port}");
    // Some batches go through the random faults first.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Some((200, body)) = request(&engine, "GET", "/progress/latest")
            && body.contains("\"batchId\"")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Then the server fails everything for longer than the client retries.
    let (status, _) = request(&control, "POST", "/__faults/outage?seconds=25").unwrap();
    assert_eq!(status, 200);
    let mut told = None;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(25) && told.is_none() {
        if let Some((200, body)) = request(&engine, "GET", "/status") {
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            let message = status["message"].as_str().unwrap_or_default().to_owned();
            if message.contains("Restarting from the checkpoint") {
                told = Some(message);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let message = told.unwrap_or_else(|| {
        panic!(
            "/status never said the query was restarting\n{}",
            log_of(&spec)
        )
    });
    assert!(message.contains("unavailable"), "{message}");
    let status = wait_for(&mut child, Duration::from_secs(600));
    assert!(status.success(), "{status:?}\n{}", log_of(&spec));
    let (_, counts) = request(&control, "GET", "/__faults").unwrap();
    eprintln!("faults injected: {counts}");
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    for fault in ["fail", "fail_after", "reset", "slow", "outage"] {
        assert!(
            counts[fault].as_u64().unwrap() > 0,
            "no {fault} fault happened: {counts}"
        );
    }
    let metrics = request(&engine, "GET", "/metrics");
    assert!(metrics.is_none(), "the engine has stopped");

    let actual = sink_rows(dir.path());
    assert_eq!(actual.len(), expected.len(), "rows lost or duplicated");
    assert!(
        actual == expected,
        "the rows differ from the uninterrupted run's"
    );
}
