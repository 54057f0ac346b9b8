//! The benchmark suite: drives real `model-relay serve` processes over HTTP and measures the
//! engines' own ceilings in the same run, then writes BENCHMARKS.md. Run it through
//! `scripts/bench [--quick]`, which builds the release binaries first.
//!
//! ```sh
//! cargo run --release --example bench -- --server target/release/model-relay [--quick]
//! ```
//!
//! Per engine (SQLite, PostgreSQL) and table (empty, and with 1,000,000 retained terminal
//! rows), a fresh server is started and driven by `--concurrency` workers, each with one
//! keep-alive connection and one call in flight, for these routes:
//! - `GET /healthz`: the HTTP ceiling of this server and this client;
//! - poll: `GET` of an existing (completed) request;
//! - idle heartbeat: heartbeats over 10,000 runtimes with nothing pending;
//! - full cycle: create, heartbeat (claims it), report completed, poll until completed.
//!
//! Each phase also reads from `/proc` the CPU time the client, the server and PostgreSQL
//! spent per call. After a server's phases, the same full cycle runs through the store's API
//! in this process, with no HTTP, on the same database: the engine's share of a cycle.
//!
//! Then the waiting calls ([`waiting`]): click → completed across two instances with held
//! heartbeats and waiting reads, and the cost of 10,000 held heartbeats and 1,000 waiting
//! reads with nothing happening.
//!
//! Last, stalled requests ([`stalled`]): what 1,000 connections that start a request and
//! never finish its body cost the server, and when they are cut off; and the same over
//! HTTP/2 ([`h2`]): streams whose large answers are never read, and bodies never finished.
//!
//! To look at one part (with `perf`, say): `--engine sqlite|postgres`, `--empty-only` and
//! `--phase healthz|poll|idle|full|skill list|skill import|mixed|waiting|stalled|h2` run only that part, print its figures
//! and write no report.
//!
//! Baselines, measured in the same run because the machine is shared and noisy: raw rusqlite
//! single-row write transactions with the service's pragmas, on the same disk; and
//! `pgbench -b simple-update` against the same PostgreSQL, with PostgreSQL's CPU time per
//! transaction. The only SQL outside
//! `src/store` lives here: the baselines and the seeding of retained rows are not the
//! service's.

mod h2;
mod stalled;
mod waiting;

use std::error::Error;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

type BoxError = Box<dyn Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const IDLE_RUNTIMES: usize = 10_000;
const RETAINED_ROWS: u64 = 1_000_000;
/// Cycle runtimes per worker: the cycle goes round many runtimes, never two workers on one.
const CYCLE_RUNTIMES_PER_WORKER: usize = 8;
/// Calls before this long into a phase are not counted: connections and caches warm up.
const WARMUP: Duration = Duration::from_millis(300);

struct Options {
    server: PathBuf,
    postgres: String,
    out: PathBuf,
    concurrency: usize,
    phase: Duration,
    quick: bool,
    /// Exploring rather than reporting: one engine, or no retained rows. Prints each
    /// phase's figures and writes no report (its ratios need every run and baseline).
    only: Option<Engine>,
    empty_only: bool,
    /// Exploring one route: the other phases are skipped.
    phase_only: Option<Op>,
    /// Exploring the waiting calls only.
    waiting_only: bool,
    /// Exploring the stalled requests only.
    stalled_only: bool,
    /// Exploring HTTP/2 back-pressure only.
    h2_only: bool,
}

fn parse_options() -> Res<Options> {
    let mut options = Options {
        server: PathBuf::from("target/release/model-relay"),
        postgres: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        out: PathBuf::from("BENCHMARKS.md"),
        concurrency: 16,
        phase: Duration::from_secs(10),
        quick: false,
        only: None,
        empty_only: false,
        phase_only: None,
        waiting_only: false,
        stalled_only: false,
        h2_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--server" => options.server = value()?.into(),
            "--postgres" => options.postgres = value()?,
            "--out" => options.out = value()?.into(),
            "--concurrency" => options.concurrency = value()?.parse()?,
            "--seconds" => options.phase = Duration::from_secs_f64(value()?.parse()?),
            "--quick" => {
                options.quick = true;
                options.phase = Duration::from_secs(3);
            }
            "--engine" => {
                options.only = Some(match value()?.as_str() {
                    "sqlite" => Engine::Sqlite,
                    "postgres" => Engine::Postgres,
                    other => return Err(format!("--engine sqlite|postgres, not {other}").into()),
                })
            }
            "--empty-only" => options.empty_only = true,
            "--phase" => {
                let name = value()?;
                if name == "waiting" {
                    options.waiting_only = true;
                    continue;
                }
                if name == "stalled" {
                    options.stalled_only = true;
                    continue;
                }
                if name == "h2" {
                    options.h2_only = true;
                    continue;
                }
                let op = [
                    Op::Healthz,
                    Op::Poll,
                    Op::IdleHeartbeat,
                    Op::Cycle,
                    Op::CachedCreate,
                    Op::SkillsCycle,
                    Op::ImportCycle,
                    Op::MixedCycle,
                ]
                .into_iter()
                .find(|op| op.name().starts_with(name.as_str()))
                .ok_or(format!(
                    "--phase healthz|poll|idle|full|cached|skill|mixed|waiting|stalled|h2, \
                     not {name}"
                ))?;
                options.phase_only = Some(op);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(options)
}

fn main() -> Res<()> {
    let options = parse_options()?;
    let scratch = tempfile::tempdir_in("target")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let exploring = options.only.is_some()
        || options.empty_only
        || options.phase_only.is_some()
        || options.waiting_only
        || options.stalled_only
        || options.h2_only;

    // The baselines are for the report's ratios; exploring writes no report.
    let baselines = if exploring {
        None
    } else {
        eprintln!("bench: raw SQLite write transactions");
        let raw_sqlite = raw_sqlite_writes(&scratch.path().join("raw.db"), options.phase)?;
        eprintln!("bench: pgbench simple-update");
        Some((raw_sqlite, pgbench_simple_update(&options)?))
    };

    let mut runs = Vec::new();
    for engine in [Engine::Sqlite, Engine::Postgres] {
        if options.only.is_some_and(|only| only != engine)
            || options.waiting_only
            || options.stalled_only
            || options.h2_only
        {
            continue;
        }
        for retained in [0, RETAINED_ROWS] {
            if retained > 0 && options.empty_only {
                continue;
            }
            eprintln!("bench: {} with {retained} retained rows", engine.name());
            runs.push(run_suite(
                &options,
                &runtime,
                scratch.path(),
                engine,
                retained,
            )?);
        }
    }
    let mut waits = Vec::new();
    if options.phase_only.is_none() && !options.stalled_only && !options.h2_only {
        for engine in [Engine::Sqlite, Engine::Postgres] {
            if options.only.is_some_and(|only| only != engine) {
                continue;
            }
            eprintln!("bench: {} waiting calls", engine.name());
            let waited = waiting::run(&options, &runtime, scratch.path(), engine)?;
            if exploring {
                print_waiting(&waited);
            }
            waits.push(waited);
        }
    }
    let stalled = if options.phase_only.is_none() && !options.waiting_only && !options.h2_only {
        eprintln!("bench: stalled requests");
        stalled::run(&runtime, &options.server, scratch.path())?
    } else {
        Vec::new()
    };
    if exploring {
        for s in &stalled {
            println!("{}", stalled_row(s));
        }
    }
    let h2 = if options.phase_only.is_none() && !options.waiting_only && !options.stalled_only {
        eprintln!("bench: HTTP/2 back-pressure");
        h2::run(&runtime, &options.server, scratch.path())?
    } else {
        Vec::new()
    };
    if exploring {
        for s in &h2 {
            println!("{}", h2_row(s));
        }
    }
    let watcher = waiting::watcher(scratch.path())?;
    if exploring {
        println!(
            "watcher: data_version {:.2} µs/poll, notification table {:.2} µs/poll, +{:.1} µs/write",
            watcher.data_version_us, watcher.table_read_us, watcher.table_write_us
        );
    }
    let Some((raw_sqlite, pgbench)) = baselines else {
        return Ok(());
    };
    let mut report = render(&options, raw_sqlite, pgbench, &runs)?;
    let at = report.find(NOTES).unwrap_or(report.len());
    report.insert_str(at, &render_h2(&h2)?);
    report.insert_str(at, &render_stalled(&stalled)?);
    report.insert_str(at, &render_waiting(&waits, &watcher)?);
    std::fs::write(&options.out, report)?;
    eprintln!("bench: wrote {}", options.out.display());
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }
}

/// Throughput and latency of one phase.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    count: usize,
    /// CPU time per call, over the counted part of the phase.
    cpu: Cpu,
}

/// CPU time (user and system) of the bench itself (the client), the server process and
/// every PostgreSQL process, read from `/proc`. Linux only: zero where there is no `/proc`.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    client: Duration,
    server: Duration,
    postgres: Duration,
}

impl Cpu {
    fn now(server_pid: u32) -> Cpu {
        Cpu {
            client: cpu_time(Path::new("/proc/self")),
            server: cpu_time(&Path::new("/proc").join(server_pid.to_string())),
            postgres: postgres_cpu(),
        }
    }

    /// From `earlier` to `self`, per call of `calls`.
    fn per_call(self, earlier: Cpu, calls: usize) -> Cpu {
        let per = |now: Duration, then: Duration| {
            now.saturating_sub(then) / u32::try_from(calls.max(1)).unwrap_or(u32::MAX)
        };
        Cpu {
            client: per(self.client, earlier.client),
            server: per(self.server, earlier.server),
            postgres: per(self.postgres, earlier.postgres),
        }
    }
}

/// The CPU time of every PostgreSQL process now running.
fn postgres_cpu() -> Duration {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .map(|e| cpu_time(&e.path()))
        .sum()
}

/// utime + stime of the process at `proc_dir`; zero if it cannot be read.
fn cpu_time(proc_dir: &Path) -> Duration {
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return Duration::ZERO;
    };
    // The command name is in parentheses and may hold spaces: count fields after it.
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = after_name.split_whitespace().skip(11);
    let mut ticks = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = ticks() + ticks();
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).unwrap_or(100).max(1);
    Duration::from_secs_f64(total as f64 / per_second as f64)
}

impl Figures {
    fn of(mut latencies: Vec<Duration>, elapsed: Duration, cpu: Cpu) -> Figures {
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies.get(i).copied().unwrap_or_default()
        };
        Figures {
            per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.5),
            p99: at(0.99),
            max: latencies.last().copied().unwrap_or_default(),
            count: latencies.len(),
            cpu,
        }
    }
}

struct Run {
    engine: Engine,
    retained: u64,
    healthz: Figures,
    poll: Figures,
    idle: Figures,
    cycle: Figures,
    /// The picker's open answered from a fresh catalog: one call, no daemon.
    cached: Figures,
    /// The full cycle again, while [`FLOODERS`] connections call `/healthz` flat out: what
    /// any flood of the cheapest route costs the API on these shared cores.
    cycle_flooded: Figures,
    /// The full cycle again, while [`FLOODERS`] connections scrape `/metrics` flat out.
    cycle_scraped: Figures,
    /// Full cycles per second through the store's API in this process, with no HTTP.
    store_cycles: f64,
    /// The other kinds' cycles, each alone, and every runtime through all three kinds.
    skills: Figures,
    import: Figures,
    mixed: Figures,
}

// ---- baselines ----

/// Single-row write transactions per second, one connection (SQLite has one writer), with
/// the pragmas the SQLite store sets: WAL, synchronous NORMAL, foreign keys, busy timeout.
fn raw_sqlite_writes(path: &Path, seconds: Duration) -> Res<f64> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000)
         INSERT INTO t SELECT i, 0 FROM n;",
    )?;
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < seconds {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.prepare_cached("UPDATE t SET v = v + 1 WHERE id = ?1")?
            .execute([(done % 10_000) as i64 + 1])?;
        conn.execute_batch("COMMIT")?;
        done += 1;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Full cycles per second with no HTTP: `workers` threads each create, claim, report
/// completed and read back requests through the store's API (the primitives the handlers
/// call), on the database the HTTP runs used, its server stopped. What is left between
/// this and the HTTP cycle rate is the HTTP calls and the hand-offs between threads.
fn store_cycles(database: &str, workers: usize, length: Duration) -> Res<f64> {
    use model_relay::clock::{Clock, SystemClock};
    use model_relay::config::DatabaseUrl;
    use model_relay::ids::{RequestId, RuntimeId, Token, WorkspaceId};
    use model_relay::kind::Kind;
    use model_relay::model::{Outcome, Report, Status, Timeouts};
    use model_relay::store::NewRequest;
    use model_relay::store::NewRuntime;

    let store = DatabaseUrl::parse(database)?.open(Timeouts::default())?;
    let workspace = WorkspaceId::random()?;
    store.create_workspace(
        workspace,
        "store cycles",
        &Token::new_api()?.hash(),
        SystemClock.now(),
    )?;
    let mut runtimes = Vec::new();
    for _ in 0..workers * CYCLE_RUNTIMES_PER_WORKER {
        let id = RuntimeId::random()?;
        let new = NewRuntime {
            id,
            workspace_id: workspace,
            name: "store cycles".into(),
            provider: "claude".into(),
            daemon_token: Token::new_daemon()?.hash(),
        };
        store.create_runtime(&new, SystemClock.now())?;
        runtimes.push(id);
    }
    let runtimes = Arc::new(runtimes);
    let started = Instant::now();
    let counted_from = started + WARMUP;
    let end = counted_from + length;
    let threads: Vec<_> = (0..workers)
        .map(|worker| {
            let (store, runtimes) = (Arc::clone(&store), Arc::clone(&runtimes));
            std::thread::spawn(move || -> Res<u64> {
                let mut counted = 0;
                for i in 0.. {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let rt = runtimes[worker + workers * (i % CYCLE_RUNTIMES_PER_WORKER)];
                    let created = store
                        .create_or_coalesce(
                            rt,
                            &NewRequest::of(Kind::Models, RequestId::random()?),
                            SystemClock.now(),
                        )?
                        .ok_or("store cycles: runtime gone")?;
                    let id = created.request.id;
                    if store
                        .claim_next_pending(rt, Kind::Models, SystemClock.now())?
                        .claimed
                        != Some(id)
                    {
                        return Err("store cycles: the claim did not hand out the request".into());
                    }
                    let done = Report::Ended(Outcome {
                        result: None,
                        status: Status::Completed,
                        models: Vec::new(),
                        supported: true,
                        error: None,
                        fallback: false,
                    });
                    if !store.apply_report(rt, Kind::Models, id, &done, SystemClock.now())? {
                        return Err("store cycles: the report was refused".into());
                    }
                    let read = store.get_request(rt, id, SystemClock.now())?;
                    if read.map(|r| r.status) != Some(Status::Completed) {
                        return Err("store cycles: the request did not read completed".into());
                    }
                    if began >= counted_from {
                        counted += 1;
                    }
                }
                Ok(counted)
            })
        })
        .collect();
    let mut total = 0;
    for thread in threads {
        total += thread
            .join()
            .map_err(|_| "store cycles: a worker panicked")??;
    }
    Ok(total as f64 / counted_from.elapsed().as_secs_f64())
}

fn pgbench_binary() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .max();
    found.unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// The URL of another database on the same server.
fn database_url(base: &str, name: &str) -> String {
    let (server, rest) = base.rsplit_once('/').unwrap_or((base, ""));
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}"));
    format!("{server}/{name}{}", query.unwrap_or_default())
}

fn recreate_database(base: &str, name: &str) -> Res<String> {
    let mut admin = postgres::Client::connect(base, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
    Ok(database_url(base, name))
}

fn drop_database(base: &str, name: &str) -> Res<()> {
    let mut admin = postgres::Client::connect(base, postgres::NoTls)?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    Ok(())
}

/// `pgbench -b simple-update` TPS, in a database of its own that is dropped afterwards,
/// with as many clients as the HTTP suite has workers.
/// pgbench's transactions per second, and PostgreSQL's CPU time per transaction (sampled
/// while pgbench runs: its connections' processes are gone once it ends).
fn pgbench_simple_update(options: &Options) -> Res<(f64, Duration)> {
    const DB: &str = "model_relay_pgbench";
    let url = recreate_database(&options.postgres, DB)?;
    let pgbench = pgbench_binary();
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1", &url])
        .output()?;
    if !init.status.success() {
        return Err(format!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr)).into());
    }
    let length = options.phase.as_secs().max(2);
    let running = Command::new(&pgbench)
        .args(["-b", "simple-update", "-j", "2"])
        .args(["-c", &options.concurrency.to_string()])
        .args(["-T", &length.to_string()])
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The middle of the run, clear of connecting and of ending.
    std::thread::sleep(Duration::from_millis(500));
    let (from, sampled_at) = (postgres_cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(length) - Duration::from_millis(1000));
    let postgres_rate =
        postgres_cpu().saturating_sub(from).as_secs_f64() / sampled_at.elapsed().as_secs_f64();
    let run = running.wait_with_output()?;
    drop_database(&options.postgres, DB)?;
    let out = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        return Err(format!("pgbench: {}", String::from_utf8_lossy(&run.stderr)).into());
    }
    let tps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench output: {out}"))?;
    Ok((tps, Duration::from_secs_f64(postgres_rate / tps.max(1.0))))
}

// ---- the HTTP suite ----

/// A `serve` process, stopped when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: a graceful stop, so PostgreSQL connections are closed properly.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child process by its id.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start_server_with(server: &Path, database: &str, log: &Path, extra: &[&str]) -> Res<Server> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(server)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--database",
            database,
        ])
        // Seeded rows must outlive the run; the sweeper would delete them after retention.
        .args(["--retention", "1h"])
        // The load puts 10,000 idle runtimes and more in one workspace, and more requests
        // than an hour's retention of the default limit: past both limits per workspace.
        .args(["--max-runtimes-per-workspace", "1000000"])
        .args(["--max-requests-per-workspace", "1000000000"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    Ok(Server { child, addr })
}

fn create_workspace(server: &Path, database: &str) -> Res<String> {
    let out = Command::new(server)
        .args([
            "workspace",
            "create",
            "bench",
            "--json",
            "--database",
            database,
        ])
        .output()?;
    if !out.status.success() {
        return Err(format!("workspace create: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let created: Value = serde_json::from_slice(&out.stdout)?;
    created["api_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "workspace create: no api_token".into())
}

fn run_suite(
    options: &Options,
    runtime: &tokio::runtime::Runtime,
    scratch: &Path,
    engine: Engine,
    retained: u64,
) -> Res<Run> {
    const DB: &str = "model_relay_bench";
    let database = match engine {
        Engine::Sqlite => {
            let file = scratch.join(format!("relay-{retained}.db"));
            format!("sqlite:{}", file.display())
        }
        Engine::Postgres => recreate_database(&options.postgres, DB)?,
    };
    let api_token = create_workspace(&options.server, &database)?;
    let log = scratch.join(format!("serve-{}-{retained}.log", engine.name()));
    // Catalogs stay fresh through every phase: the cached phase measures fresh answers.
    let server = start_server_with(
        &options.server,
        &database,
        &log,
        &["--catalog-fresh", "24h"],
    )?;
    let server_pid = server.child.id();
    let setup = runtime.block_on(set_up(
        server.addr,
        server_pid,
        api_token,
        options.concurrency,
    ))?;
    if retained > 0 {
        eprintln!("bench: seeding {retained} retained rows");
        seed(engine, &database, retained)?;
    }
    let setup = Arc::new(setup);
    let phase = |op: Op| {
        if options.phase_only.is_some_and(|only| only != op) {
            return Ok(Figures::default());
        }
        if op == Op::IdleHeartbeat {
            runtime.block_on(bring_online(Arc::clone(&setup)))?;
        }
        let figures = runtime.block_on(drive(Arc::clone(&setup), op, options.phase, None))?;
        eprintln!("bench:   {}: {figures:?}", op.name());
        Ok::<_, BoxError>(figures)
    };
    let flooded = |op: Op, path: &'static str| {
        if options.phase_only.is_some_and(|only| only != op) {
            return Ok(Figures::default());
        }
        let flood = Some(path);
        let figures = runtime.block_on(drive(Arc::clone(&setup), op, options.phase, flood))?;
        eprintln!(
            "bench:   {} under a flood of {path}: {figures:?}",
            op.name()
        );
        Ok::<_, BoxError>(figures)
    };
    let run = Run {
        engine,
        retained,
        healthz: phase(Op::Healthz)?,
        poll: phase(Op::Poll)?,
        idle: phase(Op::IdleHeartbeat)?,
        cycle: phase(Op::Cycle)?,
        cached: phase(Op::CachedCreate)?,
        cycle_flooded: flooded(Op::Cycle, "/healthz")?,
        cycle_scraped: flooded(Op::Cycle, "/metrics")?,
        store_cycles: 0.0,
        skills: phase(Op::SkillsCycle)?,
        import: phase(Op::ImportCycle)?,
        mixed: phase(Op::MixedCycle)?,
    };
    if options.phase_only.is_some() {
        runtime.block_on(print_slow_ops(server.addr))?;
    }
    drop(server);
    let run = if options.phase_only.is_none_or(|op| op == Op::Cycle) {
        eprintln!("bench:   the same cycles without HTTP, through the store's API");
        let store_cycles = store_cycles(&database, options.concurrency, options.phase)?;
        eprintln!("bench:   store cycles: {store_cycles:.0}/s");
        Run {
            store_cycles,
            ..run
        }
    } else {
        run
    };
    if engine == Engine::Postgres {
        drop_database(&options.postgres, DB)?;
    }
    Ok(run)
}

/// `count` terminal requests, spread over every runtime, ended now (the server keeps them
/// for an hour). Written straight into the database: through the API it would take hours.
fn seed(engine: Engine, database: &str, count: u64) -> Res<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let models = r#"[{"id":"claude-sonnet-4-6","label":"Claude Sonnet 4.6","default":true}]"#;
    match engine {
        Engine::Sqlite => {
            let path = database.trim_start_matches("sqlite:");
            let mut conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(Duration::from_secs(30))?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let runtimes: i64 = tx.query_row("SELECT count(*) FROM runtimes", [], |r| r.get(0))?;
            tx.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1)
                 INSERT INTO requests (id, runtime_id, status, models, supported, created_at,
                                       updated_at, deadline_at, ended_at)
                 SELECT lower(hex(randomblob(16))),
                        (SELECT id FROM runtimes WHERE rowid = 1 + n.i % ?4),
                        'completed', ?2, TRUE, ?3 - 1000, ?3, ?3, ?3
                   FROM n",
                rusqlite::params![count as i64, models, now, runtimes],
            )?;
            tx.commit()?;
        }
        Engine::Postgres => {
            let mut client = postgres::Client::connect(database, postgres::NoTls)?;
            client.execute(
                "INSERT INTO requests (id, runtime_id, status, models, supported, created_at,
                                       updated_at, deadline_at, ended_at)
                 SELECT md5(random()::text || g::text), rts.ids[1 + g % cardinality(rts.ids)],
                        'completed', $2, TRUE, $3::bigint - 1000, $3, $3, $3
                   FROM generate_series(0, $1::bigint - 1) g,
                        (SELECT array_agg(id ORDER BY id) AS ids FROM runtimes) rts",
                &[&(count as i64), &models, &now],
            )?;
            // What autovacuum would have done by the time a table holds this many rows.
            client.batch_execute("VACUUM ANALYZE requests")?;
        }
    }
    Ok(())
}

/// A runtime as the bench drives it.
struct Rt {
    id: String,
    daemon_token: String,
}

struct Setup {
    addr: SocketAddr,
    /// The server's process, whose CPU time each phase reads.
    server_pid: u32,
    api_token: String,
    concurrency: usize,
    idle: Vec<Rt>,
    cycle: Vec<Rt>,
    /// Completed requests (runtime index into `cycle`, request id), one per worker, to poll.
    polled: Vec<(usize, String)>,
}

/// One keep-alive HTTP/1 connection with one call in flight.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Res<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn { sender })
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Res<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bench");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&body)?)
            }
            None => Bytes::new(),
        };
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(request.body(Full::new(body))?)
            .await?;
        let status = response.status();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }

    /// A call that must answer `want`; its body as JSON (null if empty).
    async fn expect(
        &mut self,
        want: StatusCode,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Res<Value> {
        let (status, bytes) = self.call(method, path, token, body).await?;
        if status != want {
            return Err(format!(
                "{path}: {status}, wanted {want}: {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

async fn create_runtimes(
    addr: SocketAddr,
    api_token: &str,
    count: usize,
    workers: usize,
) -> Res<Vec<Rt>> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let api_token = api_token.to_owned();
        let mine = (w..count).step_by(workers).count();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut made = Vec::with_capacity(mine);
            for _ in 0..mine {
                let body = json!({"name": "bench", "provider": "claude"});
                let rt = conn
                    .expect(
                        StatusCode::CREATED,
                        Method::POST,
                        "/api/runtimes",
                        Some(&api_token),
                        Some(body),
                    )
                    .await?;
                let field = |k: &str| rt[k].as_str().map(str::to_owned).ok_or("no id or token");
                made.push(Rt {
                    id: field("id")?,
                    daemon_token: field("daemon_token")?,
                });
            }
            Ok::<_, BoxError>(made)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// Runtimes and requests the phases use. Every cycle runtime heartbeats once (so it is
/// online) and runs one cycle, whose request is what the poll phase reads.
async fn set_up(
    addr: SocketAddr,
    server_pid: u32,
    api_token: String,
    concurrency: usize,
) -> Res<Setup> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        if let Ok(mut conn) = Conn::open(addr).await
            && conn.call(Method::GET, "/healthz", None, None).await.is_ok()
        {
            break conn;
        }
        if Instant::now() > deadline {
            return Err("the server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let idle = create_runtimes(addr, &api_token, IDLE_RUNTIMES, concurrency).await?;
    let cycle_count = concurrency * CYCLE_RUNTIMES_PER_WORKER;
    let cycle = create_runtimes(addr, &api_token, cycle_count, concurrency).await?;
    let mut setup = Setup {
        addr,
        server_pid,
        api_token,
        concurrency,
        idle,
        cycle,
        polled: Vec::new(),
    };
    let mut polled = Vec::new();
    for i in 0..cycle_count {
        let request = full_cycle(&mut conn, &setup, i).await?;
        if i < concurrency {
            polled.push((i, request));
        }
    }
    setup.polled = polled;
    Ok(setup)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Healthz,
    Poll,
    IdleHeartbeat,
    Cycle,
    CachedCreate,
    /// A skill list's cycle (create, claim, report three skills, poll).
    SkillsCycle,
    /// A skill import's cycle, the report carrying a 100 KiB skill.
    ImportCycle,
    /// Each runtime in turn through a model list, a skill list and an import: one call of
    /// this op is the three cycles.
    MixedCycle,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Healthz => "healthz",
            Op::Poll => "poll",
            Op::IdleHeartbeat => "idle heartbeat",
            Op::Cycle => "full cycle",
            Op::CachedCreate => "cached create",
            Op::SkillsCycle => "skill list cycle",
            Op::ImportCycle => "skill import cycle",
            Op::MixedCycle => "mixed kinds (models, skills, import)",
        }
    }
}

/// Create (skipping the catalog: the daemon is asked) → heartbeat (which must claim it) →
/// report completed → poll until completed. Returns the request's id.
async fn full_cycle(conn: &mut Conn, setup: &Setup, index: usize) -> Res<String> {
    let rt = &setup.cycle[index];
    let refresh = || Some(json!({"refresh": true}));
    let created = conn
        .expect(
            StatusCode::OK,
            Method::POST,
            &format!("/api/runtimes/{}/models", rt.id),
            Some(&setup.api_token),
            refresh(),
        )
        .await;
    // A runtime that has never heartbeated is offline: heartbeat once, then create.
    let created = match created {
        Ok(created) => created,
        Err(_) => {
            heartbeat(conn, rt).await?;
            conn.expect(
                StatusCode::OK,
                Method::POST,
                &format!("/api/runtimes/{}/models", rt.id),
                Some(&setup.api_token),
                refresh(),
            )
            .await?
        }
    };
    let id = created["id"].as_str().ok_or("create: no id")?.to_owned();
    let ack = heartbeat(conn, rt).await?;
    if ack["pending_model_list"]["id"].as_str() != Some(&id) {
        return Err(format!("heartbeat did not claim {id}: {ack}").into());
    }
    let report = json!({
        "status": "completed",
        "models": [
            {"id": "claude-sonnet-4-6", "label": "Claude Sonnet 4.6", "provider": "anthropic", "default": true},
            {"id": "claude-opus-4-1", "label": "Claude Opus 4.1", "provider": "anthropic"}
        ],
        "supported": true
    });
    report_then_poll(conn, setup, rt, ("models", &id), &report).await?;
    Ok(id)
}

/// The report of a skill import: one skill whose files are 100 KiB of text in all.
fn import_report() -> &'static Value {
    static REPORT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REPORT.get_or_init(|| {
        let files: Vec<Value> = (0..10)
            .map(|i| json!({"path": format!("refs/{i}.md"), "content": "x".repeat(10 * 1024)}))
            .collect();
        json!({"status": "completed", "skill": {"key": "claude:review", "name": "Review",
               "content": "# Review\n", "source_path": "/home/u/.claude/skills/review",
               "provider": "claude", "files": files}})
    })
}

/// The report of a skill list: three skills.
fn skills_report() -> Value {
    let skills: Vec<Value> = ["review", "deploy", "triage"]
        .iter()
        .map(|name| {
            json!({"key": format!("claude:{name}"), "name": name,
                           "source_path": format!("/home/u/.claude/skills/{name}"),
                           "provider": "claude", "file_count": 2})
        })
        .collect();
    json!({"status": "completed", "skills": skills, "supported": true})
}

/// One cycle of another kind than `models` on runtime `index`: create on the kind's route
/// (`path`, with `body`), the heartbeat that claims it from the field `ack`, the report,
/// and polls until it has completed.
async fn kind_cycle(
    conn: &mut Conn,
    setup: &Setup,
    index: usize,
    (path, body, ack, report): (&str, Option<Value>, &str, &Value),
) -> Res<()> {
    let rt = &setup.cycle[index];
    let created = conn
        .expect(
            StatusCode::OK,
            Method::POST,
            &format!("/api/runtimes/{}/{path}", rt.id),
            Some(&setup.api_token),
            body,
        )
        .await?;
    let id = created["id"].as_str().ok_or("create: no id")?.to_owned();
    let handed = heartbeat(conn, rt).await?;
    if handed[ack]["id"].as_str() != Some(&id) {
        return Err(format!("heartbeat did not hand out {id}: {handed}").into());
    }
    report_then_poll(conn, setup, rt, (path, &id), report).await
}

/// The second half of every cycle: the daemon reports `report` for request `id` on the
/// kind's route `path`, and the UI polls until the request has completed.
async fn report_then_poll(
    conn: &mut Conn,
    setup: &Setup,
    rt: &Rt,
    (path, id): (&str, &str),
    report: &Value,
) -> Res<()> {
    conn.expect(
        StatusCode::OK,
        Method::POST,
        &format!("/api/daemon/runtimes/{}/{path}/{id}/result", rt.id),
        Some(&rt.daemon_token),
        Some(report.clone()),
    )
    .await?;
    loop {
        let polled = conn
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/runtimes/{}/{path}/{id}", rt.id),
                Some(&setup.api_token),
                None,
            )
            .await?;
        match polled["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("pending" | "running") => continue,
            other => return Err(format!("request {id} ended as {other:?}").into()),
        }
    }
}

async fn skills_cycle(conn: &mut Conn, setup: &Setup, index: usize) -> Res<()> {
    let report = skills_report();
    kind_cycle(
        conn,
        setup,
        index,
        ("local-skills", None, "pending_local_skills", &report),
    )
    .await
}

async fn import_cycle(conn: &mut Conn, setup: &Setup, index: usize) -> Res<()> {
    let body = Some(json!({"skill_key": "claude:review"}));
    let cycle = (
        "local-skills/import",
        body,
        "pending_local_skill_import",
        import_report(),
    );
    kind_cycle(conn, setup, index, cycle).await
}

async fn heartbeat(conn: &mut Conn, rt: &Rt) -> Res<Value> {
    conn.expect(
        StatusCode::OK,
        Method::POST,
        "/api/daemon/heartbeat",
        Some(&rt.daemon_token),
        Some(json!({"runtime_id": rt.id})),
    )
    .await
}

/// One heartbeat from every idle runtime, before the idle phase: a runtime's first
/// heartbeat writes `last_seen_at`, and the phase is to measure the heartbeats of runtimes
/// already online. (Each is written again once its `last_seen_at` is older than a tenth of
/// `offline_after`, 4.5 s: past that, a longer phase counts those writes at their steady
/// rate, one per runtime per 4.5 s.)
async fn bring_online(setup: Arc<Setup>) -> Res<()> {
    let c = setup.concurrency;
    let mut workers = Vec::new();
    for worker in 0..c {
        let setup = Arc::clone(&setup);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(setup.addr).await?;
            for rt in setup.idle.iter().skip(worker).step_by(c) {
                heartbeat(&mut conn, rt).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

async fn one(conn: &mut Conn, setup: &Setup, op: Op, worker: usize, i: usize) -> Res<()> {
    let c = setup.concurrency;
    match op {
        Op::Healthz => {
            conn.expect(StatusCode::OK, Method::GET, "/healthz", None, None)
                .await?;
        }
        Op::Poll => {
            let (rt, id) = &setup.polled[worker];
            let path = format!("/api/runtimes/{}/models/{id}", setup.cycle[*rt].id);
            conn.expect(
                StatusCode::OK,
                Method::GET,
                &path,
                Some(&setup.api_token),
                None,
            )
            .await?;
        }
        Op::IdleHeartbeat => {
            let rt = &setup.idle[(worker + i * c) % setup.idle.len()];
            let ack = heartbeat(conn, rt).await?;
            if ack.get("pending_model_list").is_some() {
                return Err("an idle heartbeat claimed a request".into());
            }
        }
        Op::Cycle => {
            // Worker w keeps to runtimes w, w + c, w + 2c, …: never one another's.
            full_cycle(conn, setup, (worker + i * c) % setup.cycle.len()).await?;
        }
        Op::CachedCreate => {
            // Every cycle runtime has run a cycle: its catalog answers.
            let rt = &setup.cycle[(worker + i * c) % setup.cycle.len()];
            let answer = conn
                .expect(
                    StatusCode::OK,
                    Method::POST,
                    &format!("/api/runtimes/{}/models", rt.id),
                    Some(&setup.api_token),
                    None,
                )
                .await?;
            if answer["cached"] != true {
                return Err(format!("not answered from the catalog: {answer}").into());
            }
        }
        Op::SkillsCycle => skills_cycle(conn, setup, (worker + i * c) % setup.cycle.len()).await?,
        Op::ImportCycle => import_cycle(conn, setup, (worker + i * c) % setup.cycle.len()).await?,
        Op::MixedCycle => {
            let index = (worker + i * c) % setup.cycle.len();
            full_cycle(conn, setup, index).await?;
            skills_cycle(conn, setup, index).await?;
            import_cycle(conn, setup, index).await?;
        }
    }
    Ok(())
}

/// Connections that call one path back to back in the flood phases (64 scraping `/metrics`
/// slowed another tenant's writes twelvefold when each scrape counted in the store).
const FLOODERS: usize = 64;

/// `concurrency` workers, each on its own connection, repeat `op` for `length`; meanwhile,
/// with `flood`, [`FLOODERS`] more connections `GET` that path back to back (not counted).
async fn drive(
    setup: Arc<Setup>,
    op: Op,
    length: Duration,
    flood: Option<&'static str>,
) -> Res<Figures> {
    let started = Instant::now();
    let counted_from = started + WARMUP;
    let end = counted_from + length;
    let mut flooding = Vec::new();
    for path in flood
        .into_iter()
        .flat_map(|path| std::iter::repeat_n(path, FLOODERS))
    {
        let addr = setup.addr;
        flooding.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            while Instant::now() < end {
                let (status, _) = conn.call(Method::GET, path, None, None).await?;
                if status != StatusCode::OK {
                    return Err::<(), BoxError>(format!("{path}: {status}").into());
                }
            }
            Ok(())
        }));
    }
    let server_pid = setup.server_pid;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(counted_from.into()).await;
        let from = Cpu::now(server_pid);
        tokio::time::sleep_until(end.into()).await;
        (from, Cpu::now(server_pid))
    });
    let mut workers = Vec::new();
    for worker in 0..setup.concurrency {
        let setup = Arc::clone(&setup);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(setup.addr).await?;
            let mut latencies = Vec::new();
            let mut i = 0;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                one(&mut conn, &setup, op, worker, i).await?;
                if began >= counted_from {
                    latencies.push(began.elapsed());
                }
                i += 1;
            }
            Ok::<_, BoxError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    for flooder in flooding {
        flooder.await??;
    }
    let (from, to) = cpu.await?;
    let cpu = to.per_call(from, latencies.len());
    Ok(Figures::of(latencies, counted_from.elapsed(), cpu))
}

// ---- the report ----

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    let kernel = command_output("uname", &["-sr"]);
    let postgres = command_output("psql", &["--version"]);
    format!("{cpu}, {cores} cores, {memory} RAM, {kernel}; {postgres}")
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn row(out: &mut String, name: &str, f: &Figures, engine: Engine) -> std::fmt::Result {
    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let postgres = match engine {
        Engine::Sqlite => "—".to_owned(),
        Engine::Postgres => us(f.cpu.postgres),
    };
    writeln!(
        out,
        "| {name} | {:.0} | {} | {} | {} | {} | {} | {} | {postgres} |",
        f.per_second,
        ms(f.p50),
        ms(f.p99),
        ms(f.max),
        f.count,
        us(f.cpu.client),
        us(f.cpu.server),
    )
}

fn ratio_row(out: &mut String, what: &str, value: f64, target: f64) -> std::fmt::Result {
    let verdict = if value >= target { "met" } else { "**missed**" };
    // Cut to two places, not rounded: 0.897 shows as 0.89, not as a 0.90 that "missed" 0.9.
    let shown = (value * 100.0).floor() / 100.0;
    writeln!(out, "| {what} | {shown:.2} | ≥ {target} | {verdict} |")
}

fn render(
    options: &Options,
    raw_sqlite: f64,
    (pgbench, pgbench_cpu): (f64, Duration),
    runs: &[Run],
) -> Res<String> {
    let mut out = String::new();
    let now = humantime::format_rfc3339_seconds(SystemTime::now());
    writeln!(out, "# Benchmarks\n")?;
    writeln!(
        out,
        "Written by `scripts/bench{}` — do not edit by hand; rerun it. The reading of these \
         figures (what limits each ratio, what was optimized) is in the notes at the end, \
         which the script keeps from the previous file.\n",
        if options.quick { " --quick" } else { "" }
    )?;
    writeln!(out, "- Date: {now}")?;
    writeln!(out, "- Machine: {}", machine())?;
    writeln!(
        out,
        "- Load: {} workers, each one keep-alive HTTP/1 connection with one call in flight; \
         {} s per phase after {} ms of warm-up; client and server on the same machine.",
        options.concurrency,
        options.phase.as_secs_f64(),
        WARMUP.as_millis()
    )?;
    writeln!(
        out,
        "- CPU µs/call: user + system time, from `/proc`, of the bench process (the client), \
         the server process and all PostgreSQL processes over the counted part of a phase, \
         divided by the calls counted. On two shared cores it says where a call's time goes."
    )?;
    writeln!(
        out,
        "- The machine is shared (other builds, a soak test): absolute figures move from run \
         to run, which is why every ratio divides by a baseline measured in the same run.\n"
    )?;
    writeln!(out, "## Engine baselines (same run)\n")?;
    writeln!(
        out,
        "- Raw rusqlite, one connection, `BEGIN IMMEDIATE; UPDATE one row; COMMIT`, WAL, \
         synchronous NORMAL, same disk: **{raw_sqlite:.0} write transactions/s**"
    )?;
    writeln!(
        out,
        "- `pgbench -b simple-update -c {} -j 2` (scale 1), same PostgreSQL: **{pgbench:.0} TPS**, \
         PostgreSQL CPU {:.1} µs per transaction\n",
        options.concurrency,
        pgbench_cpu.as_secs_f64() * 1e6
    )?;
    for run in runs {
        writeln!(
            out,
            "## {}, {} retained terminal rows\n",
            run.engine.name(),
            run.retained
        )?;
        writeln!(
            out,
            "| route | per second | p50 ms | p99 ms | max ms | calls | CPU µs/call: client | \
             server | PostgreSQL |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        let e = run.engine;
        row(&mut out, "`GET /healthz` (HTTP ceiling)", &run.healthz, e)?;
        row(&mut out, "poll (`GET` a completed request)", &run.poll, e)?;
        row(&mut out, "idle heartbeat (10,000 runtimes)", &run.idle, e)?;
        row(&mut out, "full cycle (4+ calls each)", &run.cycle, e)?;
        row(
            &mut out,
            "cached create (answer from the catalog)",
            &run.cached,
            e,
        )?;
        row(
            &mut out,
            &format!("full cycle while {FLOODERS} connections call `/healthz`"),
            &run.cycle_flooded,
            e,
        )?;
        row(&mut out, "skill list cycle (3 skills)", &run.skills, e)?;
        row(
            &mut out,
            "skill import cycle (a 100 KiB skill)",
            &run.import,
            e,
        )?;
        row(
            &mut out,
            "mixed: models + skill list + import, one runtime in turn",
            &run.mixed,
            e,
        )?;
        row(
            &mut out,
            &format!("full cycle while {FLOODERS} connections scrape `/metrics`"),
            &run.cycle_scraped,
            e,
        )?;
        writeln!(
            out,
            "\nThe picker's open: from the catalog, one call, p50 {} ms; asking the daemon, \
             the full cycle above (create, claim, report, poll; a real daemon adds its \
             discovery and heartbeat wait), p50 {} ms.",
            ms(run.cached.p50),
            ms(run.cycle.p50)
        )?;
        writeln!(
            out,
            "\nUnder a flood of {FLOODERS} connections (on the same two cores as the server), \
             full cycles per second: {:.2} of the quiet figure while they scrape `/metrics`, \
             {:.2} while they call `/healthz`, the cheapest route.",
            run.cycle_scraped.per_second / run.cycle.per_second,
            run.cycle_flooded.per_second / run.cycle.per_second
        )?;
        writeln!(
            out,
            "\nKinds: a skill list's cycle costs {:.2} and an import's (100 KiB) {:.2} of a model \
             list's server CPU; the three in turn run {:.1} mixed cycles/s, {:.0} µs of server \
             CPU each (the three alone add up to {:.0} µs).",
            run.skills.cpu.server.as_secs_f64() / run.cycle.cpu.server.as_secs_f64(),
            run.import.cpu.server.as_secs_f64() / run.cycle.cpu.server.as_secs_f64(),
            run.mixed.per_second,
            run.mixed.cpu.server.as_secs_f64() * 1e6,
            (run.cycle.cpu.server + run.skills.cpu.server + run.import.cpu.server).as_secs_f64()
                * 1e6
        )?;
        writeln!(
            out,
            "\nThe same full cycle without HTTP, {} threads calling the store's API in one \
             process on this database: **{:.0} cycles/s**; the HTTP cycle reaches {:.2} of it.\n",
            options.concurrency,
            run.store_cycles,
            run.cycle.per_second / run.store_cycles
        )?;
    }
    writeln!(out, "## Ratios\n")?;
    writeln!(out, "| ratio | value | target | |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    let find = |engine: Engine, retained: u64| {
        runs.iter()
            .find(|r| r.engine == engine && r.retained == retained)
    };
    for engine in [Engine::Sqlite, Engine::Postgres] {
        let (Some(empty), Some(full)) = (find(engine, 0), find(engine, RETAINED_ROWS)) else {
            continue;
        };
        let name = engine.name();
        let h = empty.healthz.per_second;
        ratio_row(
            &mut out,
            &format!(
                "{name}: poll {:.0}/s ÷ healthz {h:.0}/s",
                empty.poll.per_second
            ),
            empty.poll.per_second / h,
            0.8,
        )?;
        ratio_row(
            &mut out,
            &format!(
                "{name}: idle heartbeat {:.0}/s ÷ healthz {h:.0}/s",
                empty.idle.per_second
            ),
            empty.idle.per_second / h,
            0.8,
        )?;
        let c = empty.cycle.per_second;
        match engine {
            Engine::Sqlite => {
                ratio_row(
                    &mut out,
                    &format!(
                        "SQLite: 3 × cycles {c:.1}/s ÷ raw write transactions {raw_sqlite:.0}/s"
                    ),
                    3.0 * c / raw_sqlite,
                    0.5,
                )?;
                let s = empty.store_cycles;
                writeln!(
                    out,
                    "| (for the reading: 3 × cycles without HTTP {s:.0}/s ÷ raw write \
                     transactions) | {:.2} | | |",
                    3.0 * s / raw_sqlite
                )?;
            }
            Engine::Postgres => {
                ratio_row(
                    &mut out,
                    &format!(
                        "PostgreSQL: cycles {c:.1}/s ÷ pgbench simple-update {pgbench:.0} TPS"
                    ),
                    c / pgbench,
                    1.0,
                )?;
                let s = empty.store_cycles;
                writeln!(
                    out,
                    "| (for the reading: cycles without HTTP {s:.0}/s ÷ pgbench simple-update) \
                     | {:.2} | | |",
                    s / pgbench
                )?;
            }
        }
        ratio_row(
            &mut out,
            &format!(
                "{name}: cycles with 1M retained rows {:.1}/s ÷ empty {c:.1}/s",
                full.cycle.per_second
            ),
            full.cycle.per_second / c,
            0.9,
        )?;
    }
    writeln!(out)?;
    let notes = std::fs::read_to_string(&options.out)
        .ok()
        .and_then(|old| old.find(NOTES).map(|at| old[at..].to_owned()))
        .unwrap_or_else(|| format!("{NOTES}\n\n(none yet)\n"));
    out.push_str(&notes);
    Ok(out)
}

/// Exploring: for each store operation the server timed, how many calls and what share
/// took longer than 10 and 25 ms (from its histogram's buckets).
async fn print_slow_ops(addr: SocketAddr) -> Res<()> {
    let mut conn = Conn::open(addr).await?;
    let (_, text) = conn.call(Method::GET, "/metrics", None, None).await?;
    let text = String::from_utf8_lossy(&text);
    let bucket = |op: &str, le: &str| -> f64 {
        let prefix = format!(
            "model_relay_store_operation_duration_seconds_bucket{{op=\"{op}\",le=\"{le}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let ops: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("model_relay_store_operation_duration_seconds_count{op=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    for op in ops {
        let all = bucket(op, "+Inf");
        let over = |le| (all - bucket(op, le)) / all.max(1.0) * 100.0;
        println!(
            "store op {op}: {all} calls, {:.2}% over 10 ms, {:.2}% over 25 ms, {:.2}% over 100 ms",
            over("0.01"),
            over("0.025"),
            over("0.1")
        );
    }
    Ok(())
}

fn print_waiting(w: &waiting::Waiting) {
    for (what, l) in [("alone", &w.alone), ("16 users", &w.busy)] {
        println!(
            "{} click→completed {what}: {:.0}/s p50 {} p90 {} p99 {} max {} ({} clicks)",
            w.engine.name(),
            l.per_second,
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.max),
            l.count
        );
    }
    let i = &w.idle;
    println!(
        "{} idle: {} held heartbeats + {} waiting reads: RSS {:.1} → {:.1} MiB, server {:.2}% of a core, client {:.2}%; idle connections alone {:.1} → {:.1} MiB",
        w.engine.name(),
        i.heartbeats,
        i.reads,
        i.rss_before as f64 / 1048576.0,
        i.rss_held as f64 / 1048576.0,
        i.cpu_share * 100.0,
        i.client_share * 100.0,
        i.rss_fresh as f64 / 1048576.0,
        i.rss_idle_connections as f64 / 1048576.0
    );
}

fn render_waiting(waits: &[waiting::Waiting], watcher: &waiting::Watcher) -> Res<String> {
    let mut out = String::new();
    writeln!(
        out,
        "## Waiting calls
"
    )?;
    writeln!(
        out,
        "Click → completed across two `serve` processes on one database: daemons hold their \
         heartbeats on A (`wait_ms` 25 s) and report `completed` as soon as they are handed a \
         request; a UI user creates on B and reads with `?wait_ms=20000` until completed. \
         Alone: one user clicking, 16 runtimes in turn. 16 users: one per runtime, at once. \
         Targets: p50 ≤ 25 ms, p99 ≤ 150 ms.\n"
    )?;
    writeln!(
        out,
        "| engine | users | clicks/s | p50 | p90 | p99 | max | clicks |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )?;
    for w in waits {
        for (users, l) in [("1", &w.alone), ("16", &w.busy)] {
            writeln!(
                out,
                "| {} | {users} | {:.0} | {} | {} | {} | {} | {} |",
                w.engine.name(),
                l.per_second,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max),
                l.count
            )?;
        }
    }
    writeln!(
        out,
        "\nIdle: one server, 10,000 runtimes each holding a heartbeat and 1,000 reads waiting \
         on pending requests, each on a connection of its own, nothing happening. RSS from \
         `/proc` before the calls and once they are all held; CPU over the phase's window. \
         Targets: 10,000 held heartbeats cost ≤ 100 MiB of RSS and ≤ 10% of one core.\n"
    )?;
    writeln!(
        out,
        "| engine | held calls | RSS before | RSS held | growth | per held call | server CPU | client CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for w in waits {
        let i = &w.idle;
        let held = i.heartbeats + i.reads;
        let growth = i.rss_held.saturating_sub(i.rss_before);
        writeln!(
            out,
            "| {} | {held} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.2}% | {:.2}% |",
            w.engine.name(),
            i.rss_before as f64 / 1048576.0,
            i.rss_held as f64 / 1048576.0,
            growth as f64 / 1048576.0,
            growth as f64 / 1024.0 / held.max(1) as f64,
            i.cpu_share * 100.0,
            i.client_share * 100.0
        )?;
    }
    writeln!(
        out,
        "\nSQLite's watcher, idle (a loop on an idle file): `PRAGMA data_version` \
         **{:.2} µs** per poll — at one poll per 5 ms, {:.3}% of a core; reading a notification \
         table by id **{:.2} µs** per poll ({:.3}%), and it adds **{:.1} µs** to every write \
         transaction (a row appended), plus a table to prune.\n",
        watcher.data_version_us,
        watcher.data_version_us / 5000.0 * 100.0,
        watcher.table_read_us,
        watcher.table_read_us / 5000.0 * 100.0,
        watcher.table_write_us
    )?;
    Ok(out)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn stalled_row(s: &stalled::Stalled) -> String {
    let growth = s.rss_stalled.saturating_sub(s.rss_before);
    let answers: Vec<String> = s
        .answers
        .iter()
        .map(|(line, n)| format!("{n} × `{line}`"))
        .collect();
    format!(
        "| {} | {} | {:.1} KiB | {:.1} MiB | {:.1} MiB | {:.1} KiB | {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        s.kind,
        stalled::CONNECTIONS,
        s.sent as f64 / 1024.0,
        mib(s.rss_before),
        mib(s.rss_stalled),
        growth as f64 / 1024.0 / stalled::CONNECTIONS as f64,
        answers.join(", "),
        s.cut_after.as_secs_f64(),
        mib(s.rss_after),
        mib(s.rss_stalled_again),
        mib(s.rss_after_again),
    )
}

fn render_stalled(stalled: &[stalled::Stalled]) -> Res<String> {
    let mut out = String::new();
    writeln!(out, "## Stalled requests\n")?;
    writeln!(
        out,
        "{} connections each send the head of a heartbeat announcing a 1,000,000-byte body, \
         maybe part of it, then nothing; one fresh server per kind, default limits \
         (`--read-timeout` 30 s: a body within 10 s of its head). RSS from `/proc` before, \
         once all are stalled, and 2 s after the last was answered and closed; then the same \
         again on the same server: its peak, and RSS after it. *Cut after*: the longest time \
         from a connection's start to its answer.\n",
        stalled::CONNECTIONS
    )?;
    writeln!(
        out,
        "| kind | connections | body sent | RSS before | RSS stalled | per connection | answers | cut after | RSS after close | 2nd round: stalled | after |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )?;
    for s in stalled {
        writeln!(out, "{}", stalled_row(s))?;
    }
    writeln!(out)?;
    Ok(out)
}

fn h2_row(s: &h2::H2) -> String {
    let streams = h2::CONNECTIONS * h2::STREAMS;
    let growth = s.rss_stalled.saturating_sub(s.rss_before);
    let answers: Vec<String> = s
        .answers
        .iter()
        .map(|(status, n)| format!("{n} × {status}"))
        .collect();
    format!(
        "| {} | {} × {} | {:.1} KiB | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {} | {:.1} s | {:.1} s | {:.1} MiB |",
        s.kind,
        h2::CONNECTIONS,
        h2::STREAMS,
        s.each as f64 / 1024.0,
        mib(s.rss_before),
        mib(s.rss_stalled),
        growth as f64 / 1024.0 / streams as f64,
        mib(growth) / h2::CONNECTIONS as f64,
        answers.join(", "),
        s.answered_after.as_secs_f64(),
        s.closed_after.as_secs_f64(),
        mib(s.rss_after),
    )
}

fn render_h2(measured: &[h2::H2]) -> Res<String> {
    let mut out = String::new();
    writeln!(
        out,
        "## HTTP/2 back-pressure
"
    )?;
    writeln!(
        out,
        "Over TLS, {} HTTP/2 connections of {} streams each, one fresh server per kind, \
         default limits (`--read-timeout` 30 s). *Answers nobody reads*: every stream asks \
         for a completed request whose list is about 1 MB, with a stream window of 0. \
         *Bodies never finished*: every stream posts a heartbeat announcing 1,000,000 bytes \
         and sends what the windows allow (*each*: what a stream could send, on average). \
         RSS before, once all are stalled, and 2 s after the last connection ended.\n",
        h2::CONNECTIONS,
        h2::STREAMS
    )?;
    writeln!(
        out,
        "| kind | connections × streams | each | RSS before | RSS stalled | per stream | per connection | answers | answered after | closed after | RSS after |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )?;
    for s in measured {
        writeln!(out, "{}", h2_row(s))?;
    }
    writeln!(out)?;
    Ok(out)
}

/// The heading of the hand-written part of BENCHMARKS.md, which a rerun keeps.
const NOTES: &str = "## Notes";
