//! A scripted stand-in for the relay, for what the real server cannot be made to do on cue:
//! hold a heartbeat, hand out a request again, answer 503 to exactly these heartbeats. It
//! records every call the daemon makes, with its arrival time and body.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use model_relay::daemon::{Config, Source};
use model_relay::ids::{RequestId, RuntimeId, Token};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const HEARTBEAT: &str = "/api/daemon/heartbeat";

/// How the fake answers one heartbeat.
pub struct Reply {
    /// How long it holds the call before answering.
    pub hold: Duration,
    /// The request it hands out, if any.
    pub claim: Option<String>,
    pub status: StatusCode,
}

impl Reply {
    /// `{"status":"ok"}` at once: what a server that does not hold heartbeats answers.
    pub fn at_once() -> Self {
        Reply {
            hold: Duration::ZERO,
            claim: None,
            status: StatusCode::OK,
        }
    }

    /// Hands out `id` at once.
    pub fn claim(id: &str) -> Self {
        Reply {
            claim: Some(id.to_owned()),
            ..Reply::at_once()
        }
    }

    /// What a holding server answers when nothing comes: `{"status":"ok"}` once the
    /// heartbeat's `wait_ms` has passed.
    pub fn held(body: &Value) -> Self {
        let wait = body["wait_ms"].as_u64().unwrap_or(0);
        Reply::at_once().after(Duration::from_millis(wait))
    }

    pub fn status(status: StatusCode) -> Self {
        Reply {
            status,
            ..Reply::at_once()
        }
    }

    pub fn after(self, hold: Duration) -> Self {
        Reply { hold, ..self }
    }
}

/// Decides the answer to heartbeat number `n` (from 0), given its body.
type Script = dyn Fn(usize, &Value) -> Reply + Send + Sync;

/// One call the daemon made.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    pub path: String,
    pub body: Value,
}

impl Call {
    pub fn is_heartbeat(&self) -> bool {
        self.path == HEARTBEAT
    }

    /// The request a report is about (`…/models/{id}/result`).
    pub fn report_of(&self) -> Option<&str> {
        self.path.strip_suffix("/result")?.rsplit('/').next()
    }

    /// A completed or failed report (not a lease renewal).
    pub fn is_final_report(&self) -> bool {
        self.report_of().is_some() && self.body["status"] != "running"
    }

    pub fn working_on(&self) -> Vec<String> {
        let ids = self.body["working_on"].as_array();
        ids.into_iter()
            .flatten()
            .map(|id| id.as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

pub struct FakeRelay {
    pub base: String,
    calls: Arc<Mutex<Vec<Call>>>,
    server: JoinHandle<()>,
}

impl FakeRelay {
    pub async fn start(script: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let log = Arc::clone(&calls);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (log, script) = (Arc::clone(&log), Arc::clone(&script));
                let service = service_fn(move |request| {
                    answer(request, Arc::clone(&log), Arc::clone(&script))
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeRelay {
            base,
            calls,
            server,
        }
    }

    /// A daemon config for this fake: test timings as `Relay::config` sets them.
    pub fn config(&self, source: Source) -> Config {
        let rt = RuntimeId::parse("f40ded99-5e02-4ce0-95b4-efd3589327d8").unwrap();
        let mut config =
            Config::new(&self.base, rt, Token::from_header("mrd_fake"), source).unwrap();
        config.heartbeat_interval = Duration::from_millis(50);
        config.call_timeout = Duration::from_secs(5);
        config.stop_grace = Duration::from_secs(10);
        config.report_backoff = vec![Duration::ZERO; 4];
        config
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn heartbeats(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(Call::is_heartbeat)
            .collect()
    }

    pub fn final_reports(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(Call::is_final_report)
            .collect()
    }

    pub fn renewals_of(&self, id: &str) -> usize {
        let calls = self.calls();
        let renewal = |c: &&Call| c.report_of() == Some(id) && c.body["status"] == "running";
        calls.iter().filter(renewal).count()
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A fresh request id, as the server makes them.
pub fn request_id() -> String {
    RequestId::random().unwrap().to_string()
}

/// The gaps between the arrivals of consecutive calls.
pub fn gaps(calls: &[Call]) -> Vec<Duration> {
    calls.windows(2).map(|w| w[1].at - w[0].at).collect()
}

async fn answer(
    request: Request<Incoming>,
    log: Arc<Mutex<Vec<Call>>>,
    script: Arc<Script>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let bytes = request.into_body().collect().await?.to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let call = Call {
        at: Instant::now(),
        path: path.clone(),
        body: body.clone(),
    };
    let heartbeats_before = {
        let mut log = log.lock().unwrap();
        let before = log.iter().filter(|c| c.is_heartbeat()).count();
        log.push(call);
        before
    };
    if path != HEARTBEAT {
        return Ok(json_response(StatusCode::OK, json!({"status": "ok"})));
    }
    let reply = script(heartbeats_before, &body);
    tokio::time::sleep(reply.hold).await;
    let answer = match (reply.status, reply.claim) {
        (StatusCode::OK, Some(id)) => json!({"status": "ok", "pending_model_list": {"id": id}}),
        (StatusCode::OK, None) => json!({"status": "ok"}),
        (_, _) => json!({"error": "injected"}),
    };
    Ok(json_response(reply.status, answer))
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}
