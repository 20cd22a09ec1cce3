//! Fail points for crash tests, after TiKV's `fail` crate: with
//! `SLUICE_FAIL_POINT=<point>:<batch>` in the environment, the engine kills
//! itself with SIGKILL when batch `<batch>` reaches `<point>`, so a test can
//! crash it at an exact step of the protocol. Without the variable a fail
//! point costs one comparison.
//!
//! The points, in the order a batch reaches them:
//! - `offsets`: `offsets/N` is written, nothing read yet;
//! - `sink-data`: the sink's data is written, its commit record is not;
//! - `sink`: the sink has committed batch N, `commits/N` is not written;
//! - `commit`: `commits/N` is written.

use std::sync::OnceLock;

/// The environment variable that arms a fail point.
pub const ENV: &str = "SLUICE_FAIL_POINT";

fn armed() -> Option<&'static (String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (point, batch) = value.rsplit_once(':')?;
            Some((point.to_owned(), batch.parse().ok()?))
        })
        .as_ref()
}

/// Kills the process with SIGKILL if `point` of `batch_id` is armed.
pub fn point(point: &str, batch_id: u64) {
    if let Some((armed_point, armed_batch)) = armed()
        && armed_point == point
        && *armed_batch == batch_id
    {
        eprintln!("{ENV}: killing the engine at {point}:{batch_id}");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
