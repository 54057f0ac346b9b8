//! The harness against separate OS processes: three `model-relay serve` of the built binary
//! on one SQLite file, so that SQLite's locking between processes is exercised, not only
//! threads of one. One process is stopped (SIGTERM) and started again mid-run when the
//! schedule says so.
//!
//! Cases: `HARNESS_CASES` (default 2).

mod support;

use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::harness::check::{Limits, check};
use support::harness::cluster::Processes;
use support::harness::schedule::schedule;
use support::harness::{drive, summary};

const LIMITS: Limits = Limits {
    pending_ms: 400,
    running_ms: 500,
};

#[test]
fn serve_processes_on_one_sqlite_file_keep_every_invariant() {
    let cases = std::env::var("HARNESS_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 8,
        // Cases are generated afresh each run; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&schedule(), |s| {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite:{}", dir.path().join("relay.db").display());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let violations = runtime.block_on(async {
            let flags = [
                "--pending-timeout",
                "400ms",
                "--running-timeout",
                "500ms",
                // Every kind alike: the checker knows one pair of deadlines.
                "--local-skills-pending-timeout",
                "400ms",
                "--local-skills-running-timeout",
                "500ms",
                "--skill-import-pending-timeout",
                "400ms",
                "--skill-import-running-timeout",
                "500ms",
                "--update-pending-timeout",
                "400ms",
                "--update-running-timeout",
                "500ms",
                "--offline-after",
                "1h",
            ];
            let cluster = Processes::start(3, &database, &flags).await;
            let tenancy = cluster.tenancy(s.runtimes).await;
            let history = drive(cluster.clone(), tenancy, s, LIMITS).await;
            cluster.stop().await;
            eprintln!("run: {}", summary(&history));
            check(&history, LIMITS)
        });
        runtime.shutdown_timeout(Duration::from_secs(10));
        if violations.is_empty() {
            Ok(())
        } else {
            let listed: Vec<String> = violations.iter().take(20).map(|v| v.to_string()).collect();
            Err(TestCaseError::fail(listed.join("\n")))
        }
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
