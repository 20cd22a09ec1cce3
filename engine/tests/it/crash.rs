//! Exactly once across crashes: the engine, as a child process with a
//! checkpoint and a file sink, is killed with SIGKILL at every step of the
//! protocol (fail points, see `sluice_engine::fault`) and at random moments,
//! and restarted each time. At the end the committed rows in the sink must be
//! exactly those of an uninterrupted run: none lost, none twice. It runs with
//! the checkpoint on the local filesystem, and on an S3 server when
//! `e2e/s3-crash.sh` starts one.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sluice_engine::sink::committed_files;

/// 40 batches of 200 rows.
pub const BATCHES: u64 = 40;

/// The generated transactions: `BATCHES` batches of 200 rows.
pub fn generator_source() -> String {
    format!(
        r#"{{name: transactions, generator: {{kind: transactions, rowsPerSecond: 1000, rowsPerBatch: 200, totalRows: {}, seed: 7, startTime: "2026-01-01T00:00:00Z"}}}}"#,
        BATCHES * 200
    )
}

/// A query the crash test runs, and the fail points it kills it at.
pub struct Workload {
    /// The SQL and any further spec lines (output mode).
    pub query: &'static str,
    /// The steps of the protocol to kill the engine at.
    pub points: &'static [&'static str],
}

/// A stateless filter.
pub const STATELESS: Workload = Workload {
    query: "query: SELECT transaction_id, user_id, amount, event_time FROM transactions WHERE amount > 20",
    points: &["offsets", "sink-data", "sink", "commit"],
};

/// A sliding-window aggregation in append mode: state in RocksDB (the
/// windows' panes), checkpointed with each batch, windows written when the
/// watermark closes them. Integer
/// aggregates only, so that a replay's output is byte for byte the same.
pub const WINDOWED: Workload = Workload {
    query: "query: >-
    SELECT window_start, window_end, device_type, count(*) AS n,
           sum(CAST(amount * 100 AS BIGINT)) AS cents, min(amount) AS smallest, max(amount) AS largest
    FROM hop(transactions, event_time, INTERVAL '1' SECOND, INTERVAL '3' SECOND)
    GROUP BY window_start, window_end, device_type
  outputMode: append",
    points: &["offsets", "sink-data", "sink", "state", "commit"],
};

pub fn write_spec(
    dir: &Path,
    checkpoint: &str,
    source: &str,
    workload: &Workload,
) -> std::path::PathBuf {
    let spec = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: crash-test}}
spec:
  sources:
    - {source}
  {query}
  sink: {{files: {{path: "{out}"}}}}
  checkpoint: {{location: "{checkpoint}"}}
  trigger: {{availableNow: true}}
  statePartitions: 4
"#,
        out = dir.join("out").display(),
        checkpoint = checkpoint,
        query = workload.query,
    );
    let path = dir.join("query.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

pub fn start(spec: &Path, fail_point: Option<&str>) -> Child {
    start_with_state(spec, fail_point, &spec.with_file_name("state"))
}

/// Starts `sluice run` on `spec` with its local state in `state`.
pub fn start_with_state(spec: &Path, fail_point: Option<&str>, state: &Path) -> Child {
    start_with_args(spec, fail_point, state, &[])
}

/// Starts `sluice run` on `spec` with its local state in `state` and more
/// arguments.
pub fn start_with_args(
    spec: &Path,
    fail_point: Option<&str>,
    state: &Path,
    args: &[&str],
) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("run")
        .arg(spec)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .env("SLUICE_STATE_DIR", state)
        .stdout(Stdio::null())
        .stderr(log_file(spec));
    match fail_point {
        Some(point) => command.env(sluice_engine::fault::ENV, point),
        None => command.env_remove(sluice_engine::fault::ENV),
    };
    command.spawn().unwrap()
}

/// Every run's standard error goes to `engine.log` beside the spec, shown
/// when an assertion fails.
fn log_file(spec: &Path) -> std::fs::File {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(spec.with_file_name("engine.log"))
        .unwrap()
}

pub fn log_of(spec: &Path) -> String {
    std::fs::read_to_string(spec.with_file_name("engine.log")).unwrap_or_default()
}

pub fn wait(child: &mut Child) -> ExitStatus {
    wait_for(child, Duration::from_secs(120))
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the engine ran for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The committed rows of a sink directory, sorted.
pub fn sink_rows(dir: &Path) -> Vec<String> {
    let mut rows: Vec<String> = committed_files(&dir.join("out"))
        .unwrap()
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn killed_at_any_step_the_sink_holds_every_row_once() {
    crash_test(&generator_source(), &STATELESS, |dir| {
        dir.join("checkpoint").display().to_string()
    });
}

/// The same over a file source: `BATCHES` JSON-lines files, one a batch,
/// written beforehand by `sluice` itself from the generator.
#[test]
fn killed_at_any_step_over_a_file_source_the_sink_holds_every_row_once() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), "");
    crash_test(&source, &STATELESS, |dir| {
        dir.join("checkpoint").display().to_string()
    });
}

/// The windowed aggregation over the file source: killed at each step,
/// the state commit included, its output equals an uninterrupted run's.
#[test]
fn killed_at_any_step_a_windowed_aggregation_writes_every_window_once() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    crash_test(&source, &WINDOWED, |dir| {
        dir.join("checkpoint").display().to_string()
    });
}

/// The generator's rows are up to 2 s out of order.
pub const WATERMARK: &str = ", watermark: {column: event_time, delay: 2s}";

/// Writes `BATCHES` JSON-lines files into `input` (with `sluice` itself,
/// from the generator) and returns a file source over them, one a batch,
/// with `extra` spec (a watermark).
pub fn file_source(input: &Path, extra: &str) -> String {
    let spec = format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: crash-input}}
spec:
  sources:
    - {}
  query: SELECT * FROM transactions
  sink: {{files: {{path: "{}"}}}}
  trigger: {{availableNow: true}}
"#,
        generator_source(),
        input.display()
    );
    // NB: in a folder the file source skips, with its log.
    std::fs::create_dir_all(input.join("_generator")).unwrap();
    let spec_path = input.join("_generator/input.yaml");
    std::fs::write(&spec_path, spec).unwrap();
    assert!(
        wait(&mut start(&spec_path, None)).success(),
        "{}",
        log_of(&spec_path)
    );
    let files = committed_files(input).unwrap();
    assert_eq!(files.len() as u64, BATCHES);
    format!(
        r#"{{name: transactions, files: {{path: "{}", maxFilesPerTrigger: 1}}, format: json, schema: [{{name: transaction_id, type: string}}, {{name: user_id, type: string}}, {{name: amount, type: double}}, {{name: merchant_id, type: string}}, {{name: event_time, type: timestamp}}, {{name: device_type, type: string}}]{extra}}}"#,
        input.display()
    )
}

/// The environment variable naming the S3 location for the S3 variant, e.g.
/// `s3://checkpoints/crash-test`; `AWS_ENDPOINT_URL` and the credentials come
/// from the environment too.
pub const S3_ENV: &str = "SLUICE_TEST_S3_CHECKPOINT";

#[test]
#[ignore = "needs an S3 server: run e2e/s3-crash.sh"]
fn killed_at_any_step_the_sink_holds_every_row_once_with_an_s3_checkpoint() {
    let base = std::env::var(S3_ENV)
        .unwrap_or_else(|_| panic!("{S3_ENV} is not set: run e2e/s3-crash.sh"));
    let location = crash_test(&generator_source(), &STATELESS, |_| {
        format!("{base}/{}", uuid::Uuid::new_v4())
    });
    // The checkpoint really is on S3: it holds every batch's commit.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let recovery = runtime.block_on(async {
        let checkpoint = sluice_engine::checkpoint::Checkpoint::open(&location).unwrap();
        checkpoint.recover().await.unwrap()
    });
    assert_eq!(recovery.next_batch, BATCHES, "{location}");
}

/// The windowed aggregation, with the checkpoint and its state on S3.
#[test]
#[ignore = "needs an S3 server: run e2e/s3-crash.sh"]
fn killed_at_any_step_a_windowed_aggregation_writes_every_window_once_with_an_s3_checkpoint() {
    let base = std::env::var(S3_ENV)
        .unwrap_or_else(|_| panic!("{S3_ENV} is not set: run e2e/s3-crash.sh"));
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    crash_test(&source, &WINDOWED, |_| {
        format!("{base}/{}", uuid::Uuid::new_v4())
    });
}

/// Runs the crash test of `workload` over `source` (a source's spec, in
/// YAML flow style) with checkpoints at `checkpoint_of(dir)`; returns the
/// crashed run's checkpoint location.
fn crash_test(
    source: &str,
    workload: &Workload,
    checkpoint_of: impl Fn(&Path) -> String,
) -> String {
    let reference = tempfile::tempdir().unwrap();
    let reference_spec = write_spec(
        reference.path(),
        &checkpoint_of(reference.path()),
        source,
        workload,
    );
    let status = wait(&mut start(&reference_spec, None));
    assert!(
        status.success(),
        "the uninterrupted run failed: {status:?}\n{}",
        log_of(&reference_spec)
    );
    let expected = sink_rows(reference.path());
    assert!(expected.len() > 20, "{} rows", expected.len());

    let crashed = tempfile::tempdir().unwrap();
    let location = checkpoint_of(crashed.path());
    let spec = write_spec(crashed.path(), &location, source, workload);
    let mut kills = 0;
    // Every step of the protocol, in eight batches spread over the run.
    for batch in [0, 1, 4, 7, 11, 15, 19, 23] {
        for point in workload.points {
            let fail_point = format!("{point}:{batch}");
            let status = wait(&mut start(&spec, Some(&fail_point)));
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{fail_point} did not kill the engine: {status:?}\n{}",
                log_of(&spec)
            );
            kills += 1;
        }
    }
    // Then at moments the test does not choose step by step: a seeded
    // sequence of delays after start.
    let mut seed: u64 = 0x5EED;
    let mut random_kills = 0;
    for _ in 0..8 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(30 + (seed >> 33) % 120);
        let mut child = start(&spec, None);
        std::thread::sleep(delay);
        let _ = child.kill();
        if wait(&mut child).signal() == Some(libc::SIGKILL) {
            random_kills += 1;
        }
    }
    let status = wait(&mut start(&spec, None));
    assert!(
        status.success(),
        "the final run failed: {status:?}\n{}",
        log_of(&spec)
    );

    assert!(kills + random_kills >= 30, "{kills} + {random_kills} kills");
    let actual = sink_rows(crashed.path());
    assert_eq!(actual.len(), expected.len(), "rows lost or duplicated");
    assert!(
        actual == expected,
        "the rows differ from the uninterrupted run's"
    );
    // Every visible data file belongs to a committed batch.
    let committed: Vec<_> = committed_files(&crashed.path().join("out")).unwrap();
    for entry in std::fs::read_dir(crashed.path().join("out")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("part-") {
            assert!(committed.contains(&path), "{name} is not in any manifest");
        }
    }
    location
}
