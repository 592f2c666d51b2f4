//! Support for the slow test tiers (the end-to-end tests here and the worker's libtorch tests):
//! a bound on each test's wall time, so a hung test fails in minutes with its name instead of
//! holding CI until its 90-minute limit.

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Alive while a bounded test runs; dropping it (the test returned or panicked) lifts the bound.
#[must_use = "the bound holds only while the guard lives: `let _bound = bound(…);`"]
pub struct Bound {
    _alive: mpsc::Sender<()>,
}

/// Bounds the calling test to `secs` seconds of wall time (times `SWEEP_TEST_TIME_SCALE`, for a
/// slow machine). Past it, the test binary prints the test's name and exits with status 124, as
/// `timeout` does: a test that hangs (a process that never answers, a lost wake-up) cannot
/// outlive its bound. Call it first in the test: `let _bound = sweep_tests::bound(300);`.
pub fn bound(secs: u64) -> Bound {
    let scale = std::env::var("SWEEP_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    let limit = Duration::from_secs_f64((secs as f64 * scale).min(86_400.0));
    // libtest names each test's thread after the test.
    let name = std::thread::current().name().unwrap_or("(unnamed test)").to_string();
    let (alive, watched) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = watched.recv_timeout(limit) {
            // Straight to the process's stderr: libtest captures the print macros of test
            // threads and of the threads they spawn, and that capture dies with the process.
            let _ = writeln!(
                std::io::stderr(),
                "\ntest {name} ran past its bound of {limit:?} and is stopped; the test binary exits (124)"
            );
            std::process::exit(124);
        }
    });
    Bound { _alive: alive }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_that_returns_in_time_lifts_its_bound() {
        let guard = bound(1);
        drop(guard);
        // Past the bound: the watcher saw the guard go and did not stop the binary.
        std::thread::sleep(Duration::from_millis(1_300));
    }

    #[test]
    #[ignore = "hangs on purpose; run by a_hung_test_is_stopped_at_its_bound_with_its_name"]
    fn hangs_past_its_bound() {
        let _bound = bound(1);
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    #[test]
    fn a_hung_test_is_stopped_at_its_bound_with_its_name() {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "tests::hangs_past_its_bound"])
            .env_remove("SWEEP_TEST_TIME_SCALE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(124), "stderr: {stderr}");
        assert!(stderr.contains("test tests::hangs_past_its_bound ran past its bound of 1s"), "stderr: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
