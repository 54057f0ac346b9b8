//! How large SQLite's write-ahead log grows under a sustained write load, with the
//! sweeper's checkpoint and without it. The figures are in README.md (Operations).
//!
//! ```sh
//! cargo run --example wal_size -- [SECONDS per run, default 60]
//! ```
//!
//! Four "instances" (store handles with pools of their own) share one file, as four
//! `serve` processes would. Each has two writer threads running whole request cycles
//! (heartbeat, create, claim, report: four write transactions) and one reader polling,
//! which keeps some reader on the log nearly all the time. Each instance sweeps every five
//! seconds (the default) with a retention of five seconds, so rows are deleted too. The
//! `-wal` file's size is sampled every 20 ms.

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use model_relay::clock::{Clock, SystemClock};
use model_relay::ids::{RequestId, RuntimeId, Token, WorkspaceId};
use model_relay::model::{Outcome, Report, Status, Timeouts};
use model_relay::store::sqlite::SqliteStore;
use model_relay::store::{NewRuntime, Storer};
use model_relay::sweeper::sweep_once;

const INSTANCES: usize = 4;
const WRITERS: usize = 2;
/// `serve`'s default `--sweep-every`.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const RETENTION: Duration = Duration::from_secs(5);

struct Figures {
    cycles: u64,
    max_wal: u64,
    mean_wal: u64,
    final_wal: u64,
}

fn main() {
    let seconds = std::env::args()
        .nth(1)
        .map_or(60, |s| s.parse().expect("seconds"));
    let run = Duration::from_secs(seconds);
    for checkpoint in [false, true] {
        let f = measure(run, checkpoint);
        println!(
            "checkpoint {:>3}: {:>7} cycles ({:>5.0}/s, {} write transactions each): \
             WAL max {:.1} MiB, mean {:.1} MiB, at the end {:.1} MiB",
            if checkpoint { "on" } else { "off" },
            f.cycles,
            f.cycles as f64 / run.as_secs_f64(),
            4,
            mib(f.max_wal),
            mib(f.mean_wal),
            mib(f.final_wal),
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn measure(run: Duration, checkpoint: bool) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("relay.db");
    let stores: Vec<Arc<dyn Storer>> = (0..INSTANCES)
        .map(|_| {
            Arc::new(SqliteStore::open(&path, Timeouts::default()).expect("open"))
                as Arc<dyn Storer>
        })
        .collect();
    let workspace = WorkspaceId::random().expect("random");
    let token = Token::new_api().expect("random").hash();
    stores[0]
        .create_workspace(workspace, "load", &token, SystemClock.now())
        .expect("workspace");

    let stopping = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for instance in &stores {
        for _ in 0..WRITERS {
            let (store, stop, cycles) = (instance.clone(), stopping.clone(), cycles.clone());
            threads.push(thread::spawn(move || {
                let runtime = runtime_in(store.as_ref(), workspace);
                let mut last = None;
                while !stop.load(Ordering::Relaxed) {
                    last = Some(cycle(store.as_ref(), runtime));
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                last
            }));
        }
        let (store, stop) = (instance.clone(), stopping.clone());
        threads.push(thread::spawn(move || {
            let runtime = runtime_in(store.as_ref(), workspace);
            let id = cycle(store.as_ref(), runtime);
            while !stop.load(Ordering::Relaxed) {
                let _ = store.find_request(runtime, id);
            }
            None
        }));
        let (store, stop) = (instance.clone(), stopping.clone());
        threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(SWEEP_EVERY);
                if let Err(e) = sweep_once(store.as_ref(), SystemClock.now(), RETENTION) {
                    eprintln!("sweep: {e}");
                }
                if checkpoint && let Err(e) = store.checkpoint() {
                    eprintln!("checkpoint: {e}");
                }
            }
            None
        }));
    }

    let wal = dir.path().join("relay.db-wal");
    let (mut max, mut sum, mut samples) = (0, 0, 0);
    let started = Instant::now();
    while started.elapsed() < run {
        let size = wal_size(&wal);
        max = max.max(size);
        sum += size;
        samples += 1;
        thread::sleep(Duration::from_millis(20));
    }
    stopping.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("worker");
    }
    Figures {
        cycles: cycles.load(Ordering::Relaxed),
        max_wal: max,
        mean_wal: sum / samples.max(1),
        final_wal: wal_size(&wal),
    }
}

fn wal_size(wal: &Path) -> u64 {
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

fn runtime_in(store: &dyn Storer, workspace: WorkspaceId) -> RuntimeId {
    let id = RuntimeId::random().expect("random");
    store
        .create_runtime(
            &NewRuntime {
                id,
                workspace_id: workspace,
                name: "load".into(),
                provider: "claude".into(),
                daemon_token: Token::new_daemon().expect("random").hash(),
            },
            SystemClock.now(),
        )
        .expect("runtime");
    id
}

/// One request's whole life: heartbeat, create, claim, report. Store errors (a lock wait
/// past `busy_timeout`) are counted as a cycle all the same; they are printed.
fn cycle(store: &dyn Storer, runtime: RuntimeId) -> RequestId {
    let now = SystemClock.now();
    let id = RequestId::random().expect("random");
    if let Err(e) = store.touch_runtime(runtime, now) {
        eprintln!("heartbeat: {e}");
    }
    match store.create_or_coalesce(runtime, &NewRequest::of(Kind::Models, id), now) {
        Ok(Some(created)) => {
            let _ = store.claim_next_pending(runtime, Kind::Models, now);
            let report = Report::Ended(Outcome {
                result: None,
                status: Status::Completed,
                models: Vec::new(),
                supported: true,
                error: None,
                fallback: false,
            });
            if let Err(e) =
                store.apply_report(runtime, Kind::Models, created.request.id, &report, now)
            {
                eprintln!("report: {e}");
            }
            created.request.id
        }
        Ok(None) => id,
        Err(e) => {
            eprintln!("create: {e}");
            id
        }
    }
}
