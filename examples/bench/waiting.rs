//! The waiting-calls phases (DESIGN.md "Waiting calls"):
//!
//! - **latency**: two `serve` processes on one database. On instance A, one simulated daemon
//!   per runtime holds its heartbeat (`wait_ms` 25 s, `working_on`) and reports `completed`
//!   the moment it is handed a request; on instance B, UI users "click": create a request,
//!   then read it with `?wait_ms` until it has completed. One user clicking alone gives the
//!   click → completed latency across instances; 16 users on 16 runtimes give cycles/s.
//! - **idle**: one server, 10,000 runtimes each holding a heartbeat and 1,000 reads waiting
//!   on pending requests, nothing happening: the server's resident memory before and while
//!   they are held, and its CPU time per second while they are.
//! - **watcher**: the idle cost of SQLite's two ways to learn of another process's commit:
//!   `PRAGMA data_version` (what the SQLite engine polls) against reading a notification
//!   table by id (River's way), each timed in a loop on an idle file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{
    Conn, Engine, Options, Res, Rt, Server, cpu_time, create_runtimes, create_workspace,
    recreate_database, start_server_with,
};

/// What one engine's waiting-calls phases measured.
pub struct Waiting {
    pub engine: Engine,
    /// Click → completed, one user at a time, across two instances.
    pub alone: Latencies,
    /// The same with 16 users on 16 runtimes at once.
    pub busy: Latencies,
    pub idle: Idle,
}

#[derive(Clone, Copy, Default)]
pub struct Latencies {
    pub per_second: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub count: usize,
}

impl Latencies {
    fn of(mut all: Vec<Duration>, elapsed: Duration) -> Self {
        all.sort_unstable();
        let at = |q: f64| {
            let i = ((all.len() as f64 - 1.0) * q).round() as usize;
            all.get(i).copied().unwrap_or_default()
        };
        Latencies {
            per_second: all.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: all.last().copied().unwrap_or_default(),
            count: all.len(),
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct Idle {
    pub heartbeats: usize,
    pub reads: usize,
    /// Resident memory of the server with nothing held, and with every call held.
    pub rss_before: u64,
    pub rss_held: u64,
    /// Server CPU time per second of wall time while everything is held.
    pub cpu_share: f64,
    /// The bench's own CPU share meanwhile (it keeps 11,000 connections).
    pub client_share: f64,
    /// For comparison, a fresh server's resident memory before and after as many
    /// keep-alive connections, each after one `GET /healthz`, sit idle: what a connection
    /// costs whatever it waits for.
    pub rss_fresh: u64,
    pub rss_idle_connections: u64,
}

/// SQLite watcher costs: microseconds per poll.
pub struct Watcher {
    pub data_version_us: f64,
    pub table_read_us: f64,
    /// Microseconds a write transaction gains by also appending a notification row.
    pub table_write_us: f64,
}

const RUNTIMES: usize = 16;
const IDLE_HEARTBEATS: usize = 10_000;
const IDLE_READS: usize = 1_000;

/// A database of the engine's, made afresh.
fn fresh_database(options: &Options, scratch: &Path, engine: Engine, name: &str) -> Res<String> {
    Ok(match engine {
        Engine::Sqlite => format!("sqlite:{}", scratch.join(format!("{name}.db")).display()),
        Engine::Postgres => recreate_database(&options.postgres, name)?,
    })
}

pub fn run(
    options: &Options,
    runtime: &tokio::runtime::Runtime,
    scratch: &Path,
    engine: Engine,
) -> Res<Waiting> {
    let database = fresh_database(options, scratch, engine, "model_relay_bench_wait")?;
    let api = create_workspace(&options.server, &database)?;
    let flags = ["--offline-after", "1h"];
    let log = |which: &str| scratch.join(format!("serve-wait-{}-{which}.log", engine.name()));
    let a = start_server_with(&options.server, &database, &log("a"), &flags)?;
    let b = start_server_with(&options.server, &database, &log("b"), &flags)?;
    let (alone, busy) = runtime.block_on(latency(a.addr, b.addr, &api, options.phase))?;
    drop((a, b));

    let database = fresh_database(options, scratch, engine, "model_relay_bench_idle")?;
    let api = create_workspace(&options.server, &database)?;
    let flags = [
        "--offline-after",
        "1h",
        "--max-wait",
        "10m",
        "--pending-timeout",
        "1h",
        "--max-waiting",
        "20000",
        "--max-connections",
        "20000",
    ];
    let plain = start_server_with(&options.server, &database, &log("connections"), &flags)?;
    let (rss_fresh, rss_idle_connections) = runtime.block_on(idle_connections(&plain))?;
    drop(plain);
    let server = start_server_with(&options.server, &database, &log("idle"), &flags)?;
    let mut idle = runtime.block_on(idle(&server, &api, options.phase))?;
    idle.rss_fresh = rss_fresh;
    idle.rss_idle_connections = rss_idle_connections;
    Ok(Waiting {
        engine,
        alone,
        busy,
        idle,
    })
}

pub async fn ready(addr: SocketAddr) -> Res<Conn> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = Conn::open(addr).await
            && conn.call(Method::GET, "/healthz", None, None).await.is_ok()
        {
            return Ok(conn);
        }
        if Instant::now() > deadline {
            return Err("the server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A daemon on `addr`: holds its heartbeat, and reports `completed` at once for every
/// request it is handed, until `stop`.
async fn daemon(addr: SocketAddr, rt: Rt, stop: Arc<AtomicBool>) -> Res<()> {
    let mut beats = Conn::open(addr).await?;
    let mut reports = Conn::open(addr).await?;
    let models = json!([{"id": "claude-sonnet-4-6", "label": "Claude Sonnet 4.6"}]);
    while !stop.load(Ordering::Relaxed) {
        let body = json!({"runtime_id": rt.id, "wait_ms": 25_000, "working_on": []});
        let ack = beats
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/daemon/heartbeat",
                Some(&rt.daemon_token),
                Some(body),
            )
            .await?;
        if let Some(id) = ack["pending_model_list"]["id"].as_str() {
            let path = format!("/api/daemon/runtimes/{}/models/{id}/result", rt.id);
            let report = json!({"status": "completed", "models": models});
            reports
                .expect(
                    StatusCode::OK,
                    Method::POST,
                    &path,
                    Some(&rt.daemon_token),
                    Some(report),
                )
                .await?;
        }
    }
    Ok(())
}

/// One click: create on `conn`'s instance, then waiting reads until completed.
async fn click(conn: &mut Conn, api: &str, rt: &Rt) -> Res<Duration> {
    let started = Instant::now();
    let base = format!("/api/runtimes/{}/models", rt.id);
    let mut record = conn
        .expect(StatusCode::OK, Method::POST, &base, Some(api), None)
        .await?;
    while record["status"] != "completed" {
        let id = record["id"].as_str().ok_or("no id")?;
        if !matches!(record["status"].as_str(), Some("pending" | "running")) {
            return Err(format!("request ended as {}", record["status"]).into());
        }
        let path = format!("{base}/{id}?wait_ms=20000");
        record = conn
            .expect(StatusCode::OK, Method::GET, &path, Some(api), None)
            .await?;
    }
    Ok(started.elapsed())
}

/// Users clicking on B while the daemons hold their heartbeats on A: one user alone, then
/// one user per runtime.
async fn latency(
    a: SocketAddr,
    b: SocketAddr,
    api: &str,
    length: Duration,
) -> Res<(Latencies, Latencies)> {
    ready(a).await?;
    ready(b).await?;
    let runtimes = create_runtimes(a, api, RUNTIMES, 4).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let daemons: Vec<_> = runtimes
        .iter()
        .map(|rt| {
            let rt = Rt {
                id: rt.id.clone(),
                daemon_token: rt.daemon_token.clone(),
            };
            tokio::spawn(daemon(a, rt, stop.clone()))
        })
        .collect();
    // Every daemon has heartbeated (so its runtime is online) and holds its heartbeat.
    let mut probe = Conn::open(a).await?;
    wait_for_held(&mut probe, "heartbeat", RUNTIMES, None).await?;
    let runtimes = Arc::new(runtimes);

    let mut results = Vec::new();
    for users in [1, RUNTIMES] {
        let until = Instant::now() + length;
        let tasks: Vec<_> = (0..users)
            .map(|u| {
                let (api, runtimes) = (api.to_owned(), runtimes.clone());
                tokio::spawn(async move {
                    let mut conn = Conn::open(b).await?;
                    let mut took = Vec::new();
                    let mut i = u;
                    while Instant::now() < until {
                        took.push(click(&mut conn, &api, &runtimes[i % RUNTIMES]).await?);
                        i += users;
                    }
                    Ok::<_, super::BoxError>(took)
                })
            })
            .collect();
        let started = Instant::now();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        results.push(Latencies::of(all, started.elapsed()));
    }
    for (name, addr) in [("A (daemons)", a), ("B (users)", b)] {
        println!("instance {name}:");
        super::print_slow_ops(addr).await?;
    }
    stop.store(true, Ordering::Relaxed);
    // The daemons' held heartbeats end when their servers stop; nothing more to wait for.
    for daemon in daemons {
        daemon.abort();
    }
    Ok((results[0], results[1]))
}

/// Waits until the server at `probe` holds `n` calls of `kind`; with `pid`, also until
/// its resident memory stops growing.
async fn wait_for_held(probe: &mut Conn, kind: &str, n: usize, pid: Option<u32>) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let want = format!("model_relay_held_calls{{kind=\"{kind}\"}} {n}");
    loop {
        let (_, text) = probe.call(Method::GET, "/metrics", None, None).await?;
        if String::from_utf8_lossy(&text).lines().any(|l| l == want) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("never held {n} {kind} calls").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(pid) = pid {
        settled_rss(pid).await;
    }
    Ok(())
}

/// Waits until the resident memory of process `pid` stops growing between two readings
/// half a second apart; the last reading.
pub async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss(pid);
        if now <= last {
            return now;
        }
        last = now;
    }
}

/// Resident set size of process `pid`, in bytes (0 if unreadable).
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A fresh server's RSS, then with 11,000 idle keep-alive connections that each made one
/// `GET /healthz`.
async fn idle_connections(server: &Server) -> Res<(u64, u64)> {
    let pid = server.child.id();
    ready(server.addr).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss(pid);
    let mut conns = Vec::with_capacity(IDLE_HEARTBEATS + IDLE_READS);
    for _ in 0..IDLE_HEARTBEATS + IDLE_READS {
        let mut conn = Conn::open(server.addr).await?;
        conn.expect(StatusCode::OK, Method::GET, "/healthz", None, None)
            .await?;
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pid);
    drop(conns);
    Ok((before, after))
}

/// 10,000 held heartbeats and 1,000 waiting reads, then a window with nothing happening.
async fn idle(server: &Server, api: &str, window: Duration) -> Res<Idle> {
    let addr = server.addr;
    let pid = server.child.id();
    let mut probe = ready(addr).await?;
    let sleepers = create_runtimes(addr, api, IDLE_HEARTBEATS, 16).await?;
    let readers = create_runtimes(addr, api, IDLE_READS, 16).await?;
    // The readers' runtimes heartbeat once (online), then get a request each that nobody
    // claims: their heartbeats are not held.
    let mut pending: Vec<(String, String)> = Vec::new();
    for rt in &readers {
        probe
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/daemon/heartbeat",
                Some(&rt.daemon_token),
                Some(json!({"runtime_id": rt.id})),
            )
            .await?;
        let path = format!("/api/runtimes/{}/models", rt.id);
        let record = probe
            .expect(StatusCode::OK, Method::POST, &path, Some(api), None)
            .await?;
        let id = record["id"].as_str().ok_or("no id")?.to_owned();
        pending.push((rt.id.clone(), id));
    }
    // Settle, then the baseline: everything made, nothing held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss(pid);

    let mut tasks = Vec::new();
    for rt in sleepers {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            loop {
                let body = json!({"runtime_id": rt.id, "wait_ms": 600_000, "working_on": []});
                let path = "/api/daemon/heartbeat";
                let token = Some(rt.daemon_token.as_str());
                conn.expect(StatusCode::OK, Method::POST, path, token, Some(body))
                    .await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), super::BoxError>(())
        }));
    }
    for (rt, id) in pending {
        let api = api.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let path = format!("/api/runtimes/{rt}/models/{id}?wait_ms=600000");
            loop {
                let record: Value = conn
                    .expect(StatusCode::OK, Method::GET, &path, Some(&api), None)
                    .await?;
                if record["status"] != "pending" {
                    return Err(format!("pending request became {}", record["status"]).into());
                }
            }
        }));
    }
    wait_for_held(&mut probe, "heartbeat", IDLE_HEARTBEATS, None).await?;
    wait_for_held(&mut probe, "read", IDLE_READS, Some(pid)).await?;
    let rss_held = rss(pid);
    let server_dir = Path::new("/proc").join(pid.to_string());
    let (server0, client0, started) = (
        cpu_time(&server_dir),
        cpu_time(Path::new("/proc/self")),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let elapsed = started.elapsed().as_secs_f64();
    let share = |now: Duration, then: Duration| now.saturating_sub(then).as_secs_f64() / elapsed;
    let cpu_share = share(cpu_time(&server_dir), server0);
    let client_share = share(cpu_time(Path::new("/proc/self")), client0);
    for task in &tasks {
        if task.is_finished() {
            return Err("a held call ended during the idle window".into());
        }
    }
    for task in tasks {
        task.abort();
    }
    Ok(Idle {
        heartbeats: IDLE_HEARTBEATS,
        reads: IDLE_READS,
        rss_before,
        rss_held,
        cpu_share,
        client_share,
        rss_fresh: 0,
        rss_idle_connections: 0,
    })
}

/// The idle cost of each way an SQLite instance could learn of another's commits.
pub fn watcher(scratch: &Path) -> Res<Watcher> {
    const POLLS: u32 = 200_000;
    let path = scratch.join("watcher.db");
    let conn = rusqlite::Connection::open(&path)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE notifications (id INTEGER PRIMARY KEY, payload TEXT NOT NULL);
         CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL);
         INSERT INTO t VALUES (1, 0);",
    )?;
    let reader =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let started = Instant::now();
    for _ in 0..POLLS {
        let _: i64 = reader
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get(0))?;
    }
    let data_version_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(POLLS);
    let started = Instant::now();
    for _ in 0..POLLS {
        let mut stmt =
            reader.prepare_cached("SELECT id, payload FROM notifications WHERE id > ?1")?;
        let mut rows = stmt.query([0])?;
        while rows.next()?.is_some() {}
    }
    let table_read_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(POLLS);
    // A write transaction alone, then with a notification row appended in it.
    const WRITES: u32 = 5_000;
    let write = |notify: bool| -> Res<f64> {
        let started = Instant::now();
        for i in 0..WRITES {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            conn.prepare_cached("UPDATE t SET v = v + 1 WHERE id = 1")?
                .execute([])?;
            if notify {
                conn.prepare_cached("INSERT INTO notifications (payload) VALUES (?1)")?
                    .execute([format!("status {i:032x}")])?;
            }
            conn.execute_batch("COMMIT")?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(WRITES))
    };
    let plain = write(false)?;
    let notified = write(true)?;
    Ok(Watcher {
        data_version_us,
        table_read_us,
        table_write_us: notified - plain,
    })
}
