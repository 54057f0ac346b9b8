//! The cost of connections that start a request and stall it (DESIGN.md "Transport", the
//! limits): 1,000 connections each send the head of a `POST /api/daemon/heartbeat` that
//! announces a 1,000,000-byte body, maybe part of the body, and then nothing. Measured: the
//! server's resident memory before, while they stall, and after they were cut off and
//! closed, twice over; what each was answered, and how long after it started.
//!
//! Three kinds: a valid daemon token and no body yet; a valid token and 512 KiB of the body;
//! no valid token and 512 KiB of the body (answered 401 before the body is read). Each runs
//! on a fresh server with the default limits (`--read-timeout` 30 s, so a body must arrive
//! within 10 s of its head). The transport does not depend on the engine: SQLite only.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Res, create_runtimes, create_workspace, start_server_with};
use crate::waiting::{ready, rss, settled_rss};

pub const CONNECTIONS: usize = 1_000;
const ANNOUNCED: usize = 1_000_000;
const PART: usize = 512 * 1024;

/// One kind of stalled request, as measured.
pub struct Stalled {
    pub kind: &'static str,
    pub sent: usize,
    pub rss_before: u64,
    pub rss_stalled: u64,
    pub rss_after: u64,
    /// The same in a second round on the same server: freed memory the allocator kept is
    /// reused, if the peak does not grow.
    pub rss_stalled_again: u64,
    pub rss_after_again: u64,
    /// The answers, as (status line or "closed", how many).
    pub answers: Vec<(String, usize)>,
    /// The longest time from a connection's start to its answer (or close).
    pub cut_after: Duration,
}

pub fn run(runtime: &tokio::runtime::Runtime, server: &Path, scratch: &Path) -> Res<Vec<Stalled>> {
    let kinds = [
        ("token, head only", true, 0),
        ("token, 512 KiB of the body", true, PART),
        ("no token, 512 KiB of the body", false, PART),
    ];
    let mut measured = Vec::new();
    for (i, (kind, token, sent)) in kinds.into_iter().enumerate() {
        let database = format!(
            "sqlite:{}",
            scratch.join(format!("stalled-{i}.db")).display()
        );
        let api = create_workspace(server, &database)?;
        let log = scratch.join(format!("serve-stalled-{i}.log"));
        let process = start_server_with(server, &database, &log, &[])?;
        let (addr, pid) = (process.addr, process.child.id());
        let mut first = runtime.block_on(stall(addr, pid, &api, kind, token, sent))?;
        let again = runtime.block_on(stall(addr, pid, &api, kind, token, sent))?;
        first.rss_stalled_again = again.rss_stalled;
        first.rss_after_again = again.rss_after;
        measured.push(first);
    }
    Ok(measured)
}

async fn stall(
    addr: SocketAddr,
    pid: u32,
    api: &str,
    kind: &'static str,
    token: bool,
    sent: usize,
) -> Res<Stalled> {
    ready(addr).await?;
    let rt = create_runtimes(addr, api, 1, 1).await?.remove(0);
    let token = if token {
        rt.daemon_token.clone()
    } else {
        "mrd_not_a_token".to_owned()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss(pid);

    let head = format!(
        "POST /api/daemon/heartbeat HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {ANNOUNCED}\r\n\r\n"
    );
    let written = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await?;
        let head = head.clone();
        let written = Arc::clone(&written);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            // A server that answers without reading the body stops taking it: the write
            // then waits (or fails when it closes); the answer is read meanwhile.
            let (mut reader, mut writer) = stream.split();
            let write = async {
                let _ = writer.write_all(head.as_bytes()).await;
                let _ = writer.write_all(&vec![b' '; sent]).await;
                written.fetch_add(1, Ordering::Relaxed);
                std::future::pending().await
            };
            let read = async {
                let mut answer = vec![0u8; 1024];
                let n = reader.read(&mut answer).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&answer[..n])
                    .lines()
                    .next()
                    .map_or("closed".to_owned(), str::to_owned);
                (line, started.elapsed())
            };
            tokio::select! {
                answered = write => answered,
                answered = read => answered,
            }
        }));
    }
    // Stalled: every head (and part) written, or answered; then let memory settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::Relaxed) < CONNECTIONS
        && tasks.iter().any(|t| !t.is_finished())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_stalled = settled_rss(pid).await;

    let mut answers: Vec<(String, usize)> = Vec::new();
    let mut cut_after = Duration::ZERO;
    for task in tasks {
        let (line, after) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .map_err(|_| "a stalled request was never cut off")??;
        cut_after = cut_after.max(after);
        match answers.iter_mut().find(|(seen, _)| *seen == line) {
            Some((_, count)) => *count += 1,
            None => answers.push((line, 1)),
        }
    }
    // Every connection is closed now (the tasks dropped their streams).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(pid);
    // The server still answers a plain call.
    let mut probe = ready(addr).await?;
    probe
        .expect(StatusCode::OK, Method::GET, "/healthz", None, None)
        .await?;
    Ok(Stalled {
        kind,
        sent,
        rss_before,
        rss_stalled,
        rss_after,
        rss_stalled_again: 0,
        rss_after_again: 0,
        answers,
        cut_after,
    })
}
