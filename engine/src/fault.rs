//! Fail points for crash tests, after TiKV's `fail` crate: with
//! `SLUICE_FAIL_POINT=<point>:<batch>` in the environment, the engine kills
//! itself with SIGKILL when batch `<batch>` reaches `<point>`, so a test can
//! crash it at an exact step of the protocol. Without the variable a fail
//! point costs one comparison. `SLUICE_FAIL_POINT=<point>:<batch>:pause<ms>`
//! instead holds the engine there for `<ms>` milliseconds, once per process
//! (a run restarted in the process goes on): a stalled engine, say one
//! whose Kafka transaction outlives `transaction.timeout.ms`.
//!
//! The points, in the order a batch reaches them:
//! - `offsets`: `offsets/N` is written, nothing read yet;
//! - `sink-data`: the sink's data is written, its commit record is not;
//! - `sink`: the sink has committed batch N, `commits/N` is not written;
//! - `commit`: `commits/N` is written.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The environment variable that arms a fail point.
pub const ENV: &str = "SLUICE_FAIL_POINT";

/// What an armed fail point does.
#[derive(Debug, PartialEq)]
enum Action {
    /// SIGKILL.
    Kill,
    /// Hold the engine for this long, once.
    Pause(Duration),
}

/// Parses `<point>:<batch>` or `<point>:<batch>:pause<ms>`.
fn parse(value: &str) -> Option<(String, u64, Action)> {
    let (rest, action) = match value.rsplit_once(':') {
        Some((rest, last)) if last.starts_with("pause") => (
            rest,
            Action::Pause(Duration::from_millis(last["pause".len()..].parse().ok()?)),
        ),
        _ => (value, Action::Kill),
    };
    let (point, batch) = rest.rsplit_once(':')?;
    Some((point.to_owned(), batch.parse().ok()?, action))
}

fn armed() -> Option<&'static (String, u64, Action)> {
    static ARMED: OnceLock<Option<(String, u64, Action)>> = OnceLock::new();
    ARMED
        .get_or_init(|| parse(&std::env::var(ENV).ok()?))
        .as_ref()
}

/// Kills the process with SIGKILL if `point` of `batch_id` is armed (or
/// pauses, the first time, if armed with `pause<ms>`).
pub fn point(point: &str, batch_id: u64) {
    static PAUSED: AtomicBool = AtomicBool::new(false);
    let Some((armed_point, armed_batch, action)) = armed() else {
        return;
    };
    if armed_point != point || *armed_batch != batch_id {
        return;
    }
    match action {
        Action::Pause(how_long) => {
            if !PAUSED.swap(true, Ordering::SeqCst) {
                eprintln!("{ENV}: holding the engine at {point}:{batch_id} for {how_long:?}");
                std::thread::sleep(*how_long);
            }
        }
        Action::Kill => {
            eprintln!("{ENV}: killing the engine at {point}:{batch_id}");
            // SAFETY: kill(2) on our own pid has no memory-safety
            // preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fail_point_kills_or_pauses() {
        assert_eq!(parse("sink:3"), Some(("sink".into(), 3, Action::Kill)));
        assert_eq!(
            parse("sink-data:1:pause15000"),
            Some((
                "sink-data".into(),
                1,
                Action::Pause(Duration::from_secs(15))
            ))
        );
        assert_eq!(parse("sink"), None);
        assert_eq!(parse("sink:x"), None);
        assert_eq!(parse("sink:1:pausex"), None);
    }
}
