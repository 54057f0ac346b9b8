//! The proof that the 404 cannot happen: three instances of the service in this process,
//! each with its own pool, sweeper and port, over ONE database; UI pollers and daemons call
//! random instances concurrently; proptest chooses the schedule (runtimes, pollers, which
//! instance serves each call, what daemons report and when, pauses, a restart mid-run);
//! every call is recorded and checked against DESIGN.md's invariants.
//!
//! The negative control runs the same harness with a memory store per instance — the
//! design this service replaces — and must see the 404.
//!
//! Cases per engine: `HARNESS_CASES` (default 8); see TESTING.md for the long soak.

mod support;

use std::sync::Arc;
use std::time::Duration;

use model_relay::config::Settings;
use model_relay::kind::Kind;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::engines::{Engine, engine_tests};
use support::harness::check::{Invariant, Limits, Violation, check};
use support::harness::cluster::{InProcess, Opener, tenancy_in};
use support::harness::schedule::{Schedule, schedule};
use support::harness::{drive, summary};

const INSTANCES: usize = 3;
/// Short deadlines, so that runs see requests time out both ways.
const LIMITS: Limits = Limits {
    pending_ms: 400,
    running_ms: 500,
};

fn settings() -> Settings {
    Settings {
        timeouts: Timeouts {
            pending: Duration::from_millis(LIMITS.pending_ms as u64),
            running: Duration::from_millis(LIMITS.running_ms as u64),
        }
        .into(),
        // Everything a run creates must stay readable until the final reads.
        retention: Duration::from_secs(600).into(),
        offline_after: Duration::from_secs(3600),
        sweep_every: Duration::from_millis(100),
        // Runs see catalogs fresh, then stale with a discovery in the background.
        catalog_fresh: Duration::from_millis(100),
        ..Settings::default()
    }
}

pub fn cases(default: u32) -> u32 {
    std::env::var("HARNESS_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// One run: a cluster whose instance `i` gets `open(i)`, the tenancy written through
/// `targets`, the schedule driven, the history checked.
fn run_once(open: Opener, targets: Vec<Arc<dyn Storer>>, s: &Schedule) -> Vec<Violation> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = s.clone();
    let violations = runtime.block_on(async move {
        let runtimes = s.runtimes;
        let tenancy = tokio::task::spawn_blocking(move || tenancy_in(&targets, runtimes))
            .await
            .unwrap();
        let cluster = InProcess::start(INSTANCES, settings(), open).await;
        let history = drive(cluster.clone(), tenancy, s, LIMITS).await;
        cluster.stop().await;
        eprintln!("run: {}", summary(&history));
        check(&history, LIMITS)
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    violations
}

engine_tests!(with_pgbouncer settings().timeouts; instances_on_one_database_keep_every_invariant);

/// Runs generated schedules, each on a fresh database of `engine`'s kind.
fn instances_on_one_database_keep_every_invariant(engine: &dyn Engine) {
    let mut runner = TestRunner::new(Config {
        cases: cases(8),
        // A case takes about a second: shrink a little, not for minutes.
        max_shrink_iters: 16,
        // Cases are generated afresh each run; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&schedule(), |s| {
        let database = engine.fresh();
        let shared = database.clone();
        let open: Opener = Arc::new(move |_| shared.open());
        let targets = vec![open(0)];
        let violations = run_once(open, targets, &s);
        // The instances let go of the database before it goes.
        drop(database);
        if violations.is_empty() {
            Ok(())
        } else {
            let listed: Vec<String> = violations.iter().take(20).map(|v| v.to_string()).collect();
            Err(TestCaseError::fail(format!(
                "{} violations, first ones:\n{}",
                violations.len(),
                listed.join("\n")
            )))
        }
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// The original design: each instance keeps requests in its own memory. The harness must
/// catch the 404 that made the model picker say "No models available", and the same 404
/// of every other kind.
#[test]
fn per_instance_memory_store_is_caught_404() {
    for kind in Kind::ALL {
        per_instance_memory_store_is_caught_404_for(kind);
    }
}

fn per_instance_memory_store_is_caught_404_for(kind: Kind) {
    let mut runner = TestRunner::new(Config {
        cases: cases(4),
        max_shrink_iters: 0,
        // Cases are generated afresh each run; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let only = schedule().prop_map(move |s| Schedule {
        kinds: vec![kind],
        ..s
    });
    let outcome = runner.run(&only, |s| {
        let stores: Vec<Arc<dyn Storer>> = (0..INSTANCES)
            .map(|_| Arc::new(MemoryStore::new(settings().timeouts)) as Arc<dyn Storer>)
            .collect();
        let own = stores.clone();
        let open: Opener = Arc::new(move |i| own[i].clone());
        let violations = run_once(open, stores, &s);
        let caught = violations
            .iter()
            .any(|v| v.invariant == Invariant::Readable404);
        if caught {
            Ok(())
        } else {
            Err(TestCaseError::fail(format!(
                "per-instance memory stores passed unnoticed with {kind:?} requests: \
                 {violations:?}"
            )))
        }
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
