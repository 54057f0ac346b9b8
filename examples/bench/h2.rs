//! The cost of HTTP/2 clients that stop taking what they asked for, or never finish what
//! they send (the transport's back-pressure): over TLS, `CONNECTIONS` connections of
//! `STREAMS` streams each, on a `serve` process with the default limits.
//!
//! - *answers nobody reads*: every stream asks for one completed request whose model list
//!   is about 1 MB (68 entries of about 14.5 KB, within the report bounds), with a stream
//!   window of 0, so that no byte of any answer can be sent;
//! - *bodies never finished*: every stream posts a heartbeat announcing 1,000,000 bytes
//!   with a valid daemon token, sends what the server's windows let it, then nothing.
//!
//! Measured: the server's RSS before, once every stream is stalled, and 2 s after the
//! server has cut them off; how each stream was answered; and when the last was cut off.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::{Res, create_workspace, start_server_with};
use crate::waiting::{rss, settled_rss};

pub const CONNECTIONS: usize = 4;
pub const STREAMS: usize = 100;
const ANNOUNCED: usize = 1_000_000;

/// One kind of stall, as measured.
pub struct H2 {
    pub kind: &'static str,
    /// The size of one answer asked for, or of the body part each stream could send.
    pub each: usize,
    pub rss_before: u64,
    pub rss_stalled: u64,
    pub rss_after: u64,
    /// The answers, as (status or "cut", how many).
    pub answers: Vec<(String, usize)>,
    /// From the first stream's start to the last stream's answer (or cut), and to the end
    /// of the last connection.
    pub answered_after: Duration,
    pub closed_after: Duration,
}

pub fn run(runtime: &tokio::runtime::Runtime, server: &Path, scratch: &Path) -> Res<Vec<H2>> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    let (cert_file, key_file) = (scratch.join("h2-cert.pem"), scratch.join("h2-key.pem"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(
        cert.pem().as_bytes(),
    )?)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = TlsConnector::from(Arc::new(config));

    let mut measured = Vec::new();
    for (i, kind) in ["answers nobody reads", "bodies never finished"]
        .into_iter()
        .enumerate()
    {
        let database = format!("sqlite:{}", scratch.join(format!("h2-{i}.db")).display());
        let api = create_workspace(server, &database)?;
        let log = scratch.join(format!("serve-h2-{i}.log"));
        let args = [
            "--tls-cert",
            cert_file.to_str().ok_or("path")?,
            "--tls-key",
            key_file.to_str().ok_or("path")?,
        ];
        let process = start_server_with(server, &database, &log, &args)?;
        let (addr, pid) = (process.addr, process.child.id());
        measured.push(runtime.block_on(stall(addr, pid, &tls, &api, kind, i == 0))?);
    }
    Ok(measured)
}

/// An HTTP/2 connection whose streams open with `window` bytes of receive window; the task
/// that drives it ends when the server closes it.
async fn connect(
    addr: SocketAddr,
    tls: &TlsConnector,
    window: u32,
) -> Res<(h2::client::SendRequest<Bytes>, JoinHandle<()>)> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tls
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await?;
    Ok((client, tokio::spawn(async move { drop(connection.await) })))
}

fn request(method: Method, path: &str, token: &str) -> Res<Request<()>> {
    Ok(Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(())?)
}

/// One call read whole: its status and body as JSON (null if empty or not JSON).
async fn call(
    client: &h2::client::SendRequest<Bytes>,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Res<(StatusCode, Value)> {
    let mut ready = client.clone().ready().await?;
    let (answer, mut send) = ready.send_request(request(method, path, token)?, body.is_none())?;
    if let Some(body) = body {
        let body = Bytes::from(serde_json::to_vec(&body)?);
        send.reserve_capacity(body.len());
        send.send_data(body, true)?;
    }
    let answer = answer.await?;
    let status = answer.status();
    let mut stream = answer.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk?;
        let _ = stream.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// About 1 MB of model entries, each within the report bounds (14 levels with a
/// 1,000-character description: about 14.5 KB).
fn large_list() -> Value {
    let levels: Vec<Value> = (0..14)
        .map(|l| json!({"value": format!("l{l}"), "label": format!("L{l}"), "description": "d".repeat(1000)}))
        .collect();
    (0..68)
        .map(|i| json!({"id": format!("model-{i}"), "label": format!("Model {i}"), "thinking": {"supported_levels": levels}}))
        .collect()
}

async fn stall(
    addr: SocketAddr,
    pid: u32,
    tls: &TlsConnector,
    api: &str,
    kind: &'static str,
    answers: bool,
) -> Res<H2> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (setup, _) = loop {
        match connect(addr, tls, 65_535).await {
            Ok(connected) => break connected,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let (_, rt) = call(
        &setup,
        Method::POST,
        "/api/runtimes",
        api,
        Some(json!({"name": "h2", "provider": "claude"})),
    )
    .await?;
    let (rt_id, daemon) = (
        rt["id"].as_str().ok_or("no id")?.to_owned(),
        rt["daemon_token"].as_str().ok_or("no token")?.to_owned(),
    );
    let beat = json!({"runtime_id": rt_id});
    call(
        &setup,
        Method::POST,
        "/api/daemon/heartbeat",
        &daemon,
        Some(beat.clone()),
    )
    .await?;
    let models = format!("/api/runtimes/{rt_id}/models");
    let (_, created) = call(&setup, Method::POST, &models, api, None).await?;
    let id = created["id"].as_str().ok_or("no request id")?.to_owned();
    let (_, ack) = call(
        &setup,
        Method::POST,
        "/api/daemon/heartbeat",
        &daemon,
        Some(beat),
    )
    .await?;
    if ack["pending_model_list"]["id"] != id.as_str() {
        return Err(format!("not claimed: {ack}").into());
    }
    let report = json!({"status": "completed", "models": large_list(), "supported": true});
    let result = format!("/api/daemon/runtimes/{rt_id}/models/{id}/result");
    let (status, _) = call(&setup, Method::POST, &result, &daemon, Some(report)).await?;
    if status != StatusCode::OK {
        return Err(format!("report: {status}").into());
    }
    let read = format!("{models}/{id}");
    let (_, record) = call(&setup, Method::GET, &read, api, None).await?;
    let record_len = serde_json::to_vec(&record)?.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss(pid);

    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::new();
    let mut streams: Vec<JoinHandle<String>> = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, connection) = connect(addr, tls, if answers { 0 } else { 65_535 }).await?;
        for _ in 0..STREAMS {
            let mut ready = client.clone().ready().await?;
            if answers {
                let (answer, _) = ready.send_request(request(Method::GET, &read, api)?, true)?;
                streams.push(tokio::spawn(async move {
                    match answer.await {
                        // Kept: its stream stays open, its window shut.
                        Ok(answer) => {
                            let status = answer.status().as_u16().to_string();
                            let body = answer.into_body();
                            std::mem::forget(body);
                            status
                        }
                        Err(_) => "cut".to_owned(),
                    }
                }));
            } else {
                let mut head = request(Method::POST, "/api/daemon/heartbeat", &daemon)?;
                head.headers_mut()
                    .insert("content-length", ANNOUNCED.into());
                let (answer, mut body) = ready.send_request(head, false)?;
                let sent = Arc::clone(&sent);
                streams.push(tokio::spawn(async move {
                    let send = async {
                        // All but the last byte, never more than announced.
                        let mut mine = 0;
                        while mine < ANNOUNCED - 1 {
                            body.reserve_capacity(ANNOUNCED - 1 - mine);
                            match poll_fn(|cx| body.poll_capacity(cx)).await {
                                Some(Ok(0)) => {}
                                Some(Ok(n)) => {
                                    let n = n.min(ANNOUNCED - 1 - mine);
                                    if body.send_data(Bytes::from(vec![b' '; n]), false).is_err() {
                                        break;
                                    }
                                    mine += n;
                                    sent.fetch_add(n, Ordering::Relaxed);
                                }
                                None | Some(Err(_)) => break,
                            }
                        }
                        std::future::pending::<String>().await
                    };
                    tokio::select! {
                        answer = answer => answer.map_or("cut".to_owned(), |a| a.status().as_u16().to_string()),
                        never = send => never,
                    }
                }));
            }
        }
        connections.push(connection);
    }
    // Stalled: every answer head in (or every body sent as far as it can go).
    if answers {
        while streams.iter().any(|s| !s.is_finished()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rss_stalled = settled_rss(pid).await;
    let mut counted: Vec<(String, usize)> = Vec::new();
    for stream in streams {
        let status = tokio::time::timeout(Duration::from_secs(120), stream)
            .await
            .map_err(|_| "a stalled stream was never cut off")??;
        match counted.iter_mut().find(|(seen, _)| *seen == status) {
            Some((_, n)) => *n += 1,
            None => counted.push((status, 1)),
        }
    }
    let answered_after = started.elapsed();
    // Three read timeouts: a server that cuts nothing off (as before its bounds) is shown
    // as closing after this long.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(90);
    for connection in connections {
        let _ = tokio::time::timeout_at(give_up, connection).await;
    }
    let closed_after = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(pid);
    let each = if answers {
        record_len
    } else {
        sent.load(Ordering::Relaxed) / (CONNECTIONS * STREAMS)
    };
    Ok(H2 {
        kind,
        each,
        rss_before,
        rss_stalled,
        rss_after,
        answers: counted,
        answered_after,
        closed_after,
    })
}
