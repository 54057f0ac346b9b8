//! Attacks on the server's resources, over real sockets: trickled headers, stalled
//! bodies, idle connections, a flood past `--max-connections`. Each limit must cut the
//! attacker off while `/healthz` and an honest client are still answered.
//!
//! The server runs with a read timeout of 500 ms, so that cutting off takes a moment; the
//! test waits for each cut as an event (a closed socket), bounded by 10 s.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use model_relay::config::Settings;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use support::server::{Http, Instance, T0, clock, settings, workspace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// The most a cut may take before the test says it did not happen.
const BOUND: Duration = Duration::from_secs(10);

struct Target {
    instance: Instance,
    addr: String,
    api: String,
}

async fn target(max_connections: usize) -> Target {
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
    let (_, api) = workspace(store.as_ref(), T0);
    let instance = Instance::start(
        store,
        clock(),
        Settings {
            read_timeout: READ_TIMEOUT,
            max_connections,
            ..settings()
        },
    )
    .await;
    let addr = instance.base.trim_start_matches("http://").to_owned();
    Target {
        instance,
        addr,
        api,
    }
}

/// Reads until the server closes the connection; what it sent before that.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server never closed the connection");
    String::from_utf8_lossy(&got).into_owned()
}

async fn healthz(t: &Target) -> StatusCode {
    Http::default()
        .get_text(&format!("{}/healthz", t.instance.base))
        .await
        .status
}

#[tokio::test]
async fn trickled_headers_are_cut_off_at_the_read_timeout() {
    let t = target(64).await;
    let mut slow = TcpStream::connect(&t.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // One header line every 100 ms, never the blank line that ends them.
    let trickle = async {
        for i in 0..100 {
            if slow
                .write_all(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let honest = async {
        // Answered meanwhile.
        healthz(&t).await
    };
    let (cut, status) = tokio::join!(trickle, honest);
    assert_eq!(status, StatusCode::OK);
    if !cut {
        panic!("ten seconds of trickled headers were never cut off");
    }
    assert_eq!(healthz(&t).await, StatusCode::OK);
    t.instance.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_at_the_read_timeout() {
    let t = target(64).await;
    let mut stalled = TcpStream::connect(&t.addr).await.unwrap();
    let head = format!(
        "POST /api/runtimes HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{\"name\":",
        t.api
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(healthz(&t).await, StatusCode::OK, "answered meanwhile");
    let answer = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body not received in time"), "{answer}");
    t.instance.stop().await;
}

#[tokio::test]
async fn a_connection_idle_between_requests_is_closed() {
    let t = target(64).await;
    let mut idle = TcpStream::connect(&t.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    t.instance.stop().await;
}

#[tokio::test]
async fn past_max_connections_new_ones_are_closed_at_once_and_slots_come_back() {
    let t = target(8).await;
    // Eight connections that each made a request and stay open: every slot taken.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut conn = TcpStream::connect(&t.addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(conn);
    }
    // The ninth is accepted and closed, unanswered.
    let mut over = TcpStream::connect(&t.addr).await.unwrap();
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let answer = until_closed(&mut over).await;
    assert_eq!(answer, "", "a connection past the cap got an answer");
    // The held ones idle out after the read timeout; an honest client then gets in.
    let honest = tokio::time::timeout(BOUND, async {
        loop {
            let answer = Http::default()
                .try_raw(
                    hyper::Method::GET,
                    &format!("{}/healthz", t.instance.base),
                    None,
                    None,
                )
                .await;
            if let Ok(answer) = answer {
                return answer.status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no slot came back");
    assert_eq!(honest, StatusCode::OK);
    drop(held);
    t.instance.stop().await;
}
