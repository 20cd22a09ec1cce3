//! Two runners on one checkpoint: engine processes started together and at
//! random moments on the same checkpoint and sink, one of them paused with
//! SIGSTOP (the zombie: alive, but no longer the query's) while the other
//! takes over, resumed with SIGCONT, some killed with SIGKILL. Whatever
//! interleaving happens, the sink's committed content must equal one
//! uninterrupted run's, a run started afterwards must restore the
//! checkpoint and finish, and at least one zombie must have been refused
//! with a message saying that another run took the query over.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use super::crash::{
    S3_ENV, STATELESS, WATERMARK, WINDOWED, Workload, file_source, generator_source, log_of,
    sink_rows, start_with_args, start_with_state, wait, write_spec,
};

/// A seeded sequence of numbers (SplitMix64).
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child we spawned and have not waited for.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// Runs the zombie scenario for `workload` over `source`; returns the
/// checkpoint location.
fn zombie_test(source: &str, workload: &Workload, checkpoint_of: impl Fn(&Path) -> String) {
    let reference = tempfile::tempdir().unwrap();
    let reference_spec = write_spec(
        reference.path(),
        &checkpoint_of(reference.path()),
        source,
        workload,
    );
    let status = wait(&mut start_with_state(
        &reference_spec,
        None,
        &reference.path().join("state"),
    ));
    assert!(status.success(), "{}", log_of(&reference_spec));
    let expected = sink_rows(reference.path());
    assert!(expected.len() > 20, "{} rows", expected.len());

    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &checkpoint_of(dir.path()), source, workload);
    let mut rng = Seeded(0x2B1E);
    let (mut refused, mut finished, mut killed) = (0, 0, 0);
    for round in 0..8 {
        let state = |who: &str| dir.path().join(format!("state-{who}-{round}"));
        // A few batches a run, so that every round has work left.
        let limit = |rng: &mut Seeded| (2 + rng.below(5)).to_string();
        let (a, b) = (limit(&mut rng), limit(&mut rng));
        let mut first = start_with_args(&spec, None, &state("a"), &["--max-batches", &a]);
        let mut second;
        if round % 2 == 0 {
            // The first run stops being scheduled (a zombie) while its
            // successor takes over, and wakes up later.
            std::thread::sleep(rng.millis(0, 150));
            signal(&first, libc::SIGSTOP);
            second = start_with_args(&spec, None, &state("b"), &["--max-batches", &b]);
            std::thread::sleep(rng.millis(100, 800));
            match rng.below(3) {
                // The successor dies too; the zombie wakes up alone.
                0 => signal(&second, libc::SIGKILL),
                // The successor finishes first; the zombie wakes up after.
                1 => {
                    wait(&mut second);
                }
                _ => {}
            }
            signal(&first, libc::SIGCONT);
        } else {
            // Both start at once; one may be killed.
            second = start_with_args(&spec, None, &state("b"), &["--max-batches", &b]);
            std::thread::sleep(rng.millis(0, 400));
            if rng.below(2) == 0 {
                signal(
                    if rng.below(2) == 0 { &first } else { &second },
                    libc::SIGKILL,
                );
            }
        }
        for child in [&mut first, &mut second] {
            let status = wait(child);
            match (status.code(), status.signal()) {
                (Some(0), _) => finished += 1,
                (_, Some(libc::SIGKILL)) => killed += 1,
                (Some(_), _) => refused += 1,
                other => panic!("unexpected exit {other:?}\n{}", log_of(&spec)),
            }
        }
    }
    eprintln!("zombie test: {refused} runs refused, {finished} finished, {killed} killed");
    let log = log_of(&spec);
    // Every refusal is a run stopped by the fence, with a message that says
    // so; nothing else may fail. A run can be killed after it printed its
    // refusal and before it exited: it counts as killed, its line stays.
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        (refused..=refused + killed).contains(&errors.len()),
        "{} error lines for {refused} refused and {killed} killed runs:\n{log}",
        errors.len()
    );
    for error in &errors {
        assert!(error.starts_with("error: fenced: "), "{error}");
    }
    assert!(
        refused >= 1,
        "no run was refused: {finished} finished, {killed} killed\n{log}"
    );
    // The checkpoint restores: a run afterwards finishes (nothing left, or
    // the rest of the input).
    let status = wait(&mut start_with_state(
        &spec,
        None,
        &dir.path().join("state-final"),
    ));
    assert!(status.success(), "{}", log_of(&spec));

    let actual = sink_rows(dir.path());
    assert_eq!(actual.len(), expected.len(), "rows lost or duplicated");
    assert!(
        actual == expected,
        "the rows differ from the uninterrupted run's"
    );
}

#[test]
fn two_runners_on_one_checkpoint_write_every_row_once() {
    zombie_test(&generator_source(), &STATELESS, |dir| {
        dir.join("checkpoint").display().to_string()
    });
}

#[test]
fn two_runners_of_a_windowed_aggregation_write_every_window_once() {
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    zombie_test(&source, &WINDOWED, |dir| {
        dir.join("checkpoint").display().to_string()
    });
}

#[test]
#[ignore = "needs an S3 server: run e2e/s3-crash.sh"]
fn two_runners_of_a_windowed_aggregation_write_every_window_once_with_an_s3_checkpoint() {
    let base = std::env::var(S3_ENV)
        .unwrap_or_else(|_| panic!("{S3_ENV} is not set: run e2e/s3-crash.sh"));
    let input = tempfile::tempdir().unwrap();
    let source = file_source(input.path(), WATERMARK);
    zombie_test(&source, &WINDOWED, |_| {
        format!("{base}/{}", uuid::Uuid::new_v4())
    });
}
