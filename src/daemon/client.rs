//! The daemon's side of the wire: a heartbeat and a report, over HTTP/1.1 with hyper's
//! client — HTTPS with rustls for an `https://` server — and the rule for which failures are
//! worth retrying.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::discover::Discovery;
use crate::ids::{RequestId, RuntimeId, Token};
use crate::kind::Kind;
use crate::model::{ModelEntry, replace_nul};

/// Largest answer we read: the server's answers to a daemon are a few dozen bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a call did not get a 200.
#[derive(Debug)]
pub enum CallError {
    /// No answer: the connection failed, or the server took longer than the call timeout.
    Network(String),
    /// The server answered with another status; its `error` message, when it sent one.
    Status(StatusCode, String),
    /// A 200 whose body is not what the contract says.
    BadAnswer(String),
    /// The server's TLS certificate does not verify: the call stopped at the handshake,
    /// before anything of it (the token above all) was sent.
    Certificate(String),
}

impl CallError {
    /// Network errors, 5xx and 429 (a share of the server taken for now) may pass; any
    /// other 4xx says the call itself is wrong and stays wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            CallError::Network(_) => true,
            CallError::Status(status, _) => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            CallError::BadAnswer(_) | CallError::Certificate(_) => false,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Network(e) => write!(f, "no answer: {e}"),
            CallError::Status(status, message) => write!(f, "{status}: {message}"),
            CallError::BadAnswer(e) => write!(f, "unexpected answer: {e}"),
            CallError::Certificate(e) => write!(f, "the server's certificate does not verify: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// A report body, as DESIGN.md's result route takes it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ReportBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<ModelEntry>,
    supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    fallback: bool,
}

impl ReportBody {
    /// Still working: renews the lease.
    pub fn running() -> Self {
        ReportBody {
            status: "running",
            models: Vec::new(),
            supported: true,
            error: None,
            fallback: false,
        }
    }

    /// A failure with `error`, NUL replaced ([`replace_nul`]): the error quotes the
    /// discovery command's stderr, where tools do print NULs, and the server would record
    /// U+FFFD anyway. Sending what it records keeps a retried report an exact replay.
    pub fn failed(mut error: String) -> Self {
        replace_nul(&mut error);
        ReportBody {
            status: "failed",
            error: Some(error),
            ..ReportBody::running()
        }
    }

    /// Every report the daemon sends is built here, so this is where its texts are made
    /// what the server stores: the models parser has already refused control characters in
    /// ids ([`ModelEntry::check`]); NUL in the other texts is replaced, for a fixed list too.
    pub fn ended(discovery: Discovery) -> Self {
        match discovery {
            Discovery::Found {
                mut models,
                supported,
                fallback,
            } => {
                models.iter_mut().for_each(ModelEntry::replace_nul);
                ReportBody {
                    status: "completed",
                    models,
                    supported,
                    error: None,
                    fallback,
                }
            }
            Discovery::Failed(error) => ReportBody::failed(error),
        }
    }
}

/// Talks to one relay server as one runtime.
pub struct RelayClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `http(s)://host:port` with no trailing slash; paths are appended.
    base: String,
    runtime_id: RuntimeId,
    token: Token,
    /// A call that takes longer counts as a network error: a hung connection must not stall
    /// the heartbeats.
    call_timeout: Duration,
}

impl RelayClient {
    /// A client of `base`; for an `https://` base, one that trusts the operating system's
    /// roots and the certificates in `ca_cert`.
    pub fn new(
        base: String,
        ca_cert: Option<&Path>,
        runtime_id: RuntimeId,
        token: Token,
        call_timeout: Duration,
    ) -> Result<Self, crate::tls::TlsError> {
        let connector = if base.starts_with("https://") {
            HttpsConnectorBuilder::new()
                .with_tls_config(crate::tls::client_config(ca_cert)?)
                .https_only()
                .enable_http1()
                .build()
        } else {
            // No TLS config is ever used on a plain `http://` server: the connector only
            // makes TCP connections, so it gets one that trusts nothing.
            HttpsConnectorBuilder::new()
                .with_tls_config(crate::tls::client_config_trusting_nothing()?)
                .https_or_http()
                .enable_http1()
                .build()
        };
        Ok(RelayClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            base,
            runtime_id,
            token,
            call_timeout,
        })
    }

    /// One heartbeat, asking the server to hold it up to `wait` (zero: answer at once) and
    /// saying which requests this daemon holds; the requests it handed out, of every kind.
    pub async fn heartbeat(
        &self,
        wait: Duration,
        working_on: &[RequestId],
    ) -> Result<Vec<HandOut>, CallError> {
        let body = heartbeat_body(self.runtime_id, wait, working_on);
        // A held heartbeat is slow by design: the call timeout counts from the end of the
        // wait, so it still catches a hung connection without cutting the hold short.
        let timeout = wait.saturating_add(self.call_timeout);
        let answer = self
            .post("/api/daemon/heartbeat", body.to_string(), timeout)
            .await?;
        let ack: Value = serde_json::from_slice(&answer)
            .map_err(|e| CallError::BadAnswer(format!("heartbeat answer: {e}")))?;
        hand_outs(&ack)
    }

    /// One report about request `id`, of `kind`.
    pub async fn report(
        &self,
        kind: Kind,
        id: RequestId,
        body: &impl Serialize,
    ) -> Result<(), CallError> {
        let path = format!(
            "/api/daemon/runtimes/{}/{}/{id}/result",
            self.runtime_id,
            kind.spec().path
        );
        // Serializing strings and booleans cannot fail; an empty body would be a 400.
        let json = serde_json::to_string(body).unwrap_or_default();
        self.post(&path, json, self.call_timeout).await.map(drop)
    }

    /// A POST that counts as a network error when it has no answer within `timeout`.
    async fn post(&self, path: &str, json: String, timeout: Duration) -> Result<Bytes, CallError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| CallError::Network(format!("bad URL: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            )
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| CallError::Network(format!("cannot build the request: {e}")))?;
        let call = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| match certificate_error(&e) {
                        Some(error) => CallError::Certificate(error.to_string()),
                        None => CallError::Network(crate::errors::error_chain(&e)),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| CallError::Network(format!("reading the answer: {e}")))?
                .to_bytes();
            if status == StatusCode::OK {
                Ok(body)
            } else {
                Err(CallError::Status(status, error_message(&body)))
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Network(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )))
            })
    }
}

/// A request a heartbeat handed out, with what its hand-out names of its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandOut {
    pub kind: Kind,
    pub id: RequestId,
    /// An import's skill.
    pub skill_key: Option<String>,
    /// An update's version.
    pub target_version: Option<String>,
}

/// Every request a heartbeat's answer hands out: each kind's field, and a batch.
pub fn hand_outs(ack: &Value) -> Result<Vec<HandOut>, CallError> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let spec = kind.spec();
        let batch = spec.batch_ack.and_then(|field| ack[field].as_array());
        let single = ack.get(spec.ack).filter(|v| !v.is_null());
        for entry in single.into_iter().chain(batch.into_iter().flatten()) {
            let id = entry["id"].as_str().unwrap_or_default();
            let id = RequestId::parse(id)
                .ok_or_else(|| CallError::BadAnswer(format!("handed out request id {id:?}")))?;
            let text = |field: &str| entry[field].as_str().map(str::to_owned);
            out.push(HandOut {
                kind,
                id,
                skill_key: text("skill_key"),
                target_version: text("target_version"),
            });
        }
    }
    Ok(out)
}

/// The certificate verification failure somewhere in `error`'s causes, if that is why it
/// failed. rustls's error travels inside an `io::Error` (inside another, at times), whose
/// `source()` skips what it wraps, so the walk steps into each `io::Error` instead.
fn certificate_error<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e rustls::Error> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(
            tls @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType),
        ) = error.downcast_ref::<rustls::Error>()
        {
            return Some(tls);
        }
        cause = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

/// `{"runtime_id", "wait_ms"?, "working_on", "supports_batch_import"}`. No `wait_ms` when
/// there is no wait: a v1 heartbeat but for `working_on`, which lets the server hand out
/// again a request whose hand-out this daemon never received, and the batch flag.
fn heartbeat_body(runtime_id: RuntimeId, wait: Duration, working_on: &[RequestId]) -> Value {
    let mut body = json!({
        "runtime_id": runtime_id.to_string(),
        "working_on": working_on.iter().map(ToString::to_string).collect::<Vec<_>>(),
        // Imports come as many as the server hands out at once; each is a task of its own.
        "supports_batch_import": true,
    });
    if !wait.is_zero() {
        body["wait_ms"] = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into();
    }
    body
}

/// The `error` of a `{"error": …}` body, or the start of whatever else came back.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

/// Runs `call` until it succeeds, fails with an error that retrying cannot fix, or has been
/// retried once per entry of `backoff`, waiting that entry's time before each retry.
pub async fn with_retries<F, Fut>(backoff: &[Duration], mut call: F) -> Result<(), CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), CallError>>,
{
    let mut waits = backoff.iter();
    loop {
        let error = match call().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match waits.next() {
            Some(wait) if error.is_retryable() => {
                tracing::warn!(%error, retry_in = ?wait, "report failed; retrying");
                tokio::time::sleep(*wait).await;
            }
            _ => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    const BACKOFF: [Duration; 4] = [
        Duration::ZERO,
        Duration::from_millis(500),
        Duration::from_secs(2),
        Duration::from_secs(4),
    ];

    /// Runs `with_retries` with a call that fails with `error` every time; the offsets from
    /// the start at which it was attempted.
    async fn attempts_when_failing_with(error: fn() -> CallError) -> Vec<Duration> {
        let start = Instant::now();
        let seen = Mutex::new(Vec::new());
        let result = with_retries(&BACKOFF, || {
            seen.lock().unwrap().push(start.elapsed());
            async move { Err(error()) }
        })
        .await;
        assert!(result.is_err());
        seen.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn network_errors_5xx_and_429_are_retried_after_0_half_2_and_4_seconds() {
        let ms = Duration::from_millis;
        let expected = vec![ms(0), ms(0), ms(500), ms(2500), ms(6500)];
        assert_eq!(
            attempts_when_failing_with(|| CallError::Network("refused".into())).await,
            expected
        );
        assert_eq!(
            attempts_when_failing_with(|| CallError::Status(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable".into()
            ))
            .await,
            expected
        );
        assert_eq!(
            attempts_when_failing_with(|| CallError::Status(
                StatusCode::TOO_MANY_REQUESTS,
                "too many waiting calls for this runtime".into()
            ))
            .await,
            expected
        );
    }

    #[tokio::test(start_paused = true)]
    async fn any_other_4xx_is_never_retried() {
        let refusals: [fn() -> CallError; 4] = [
            || CallError::Status(StatusCode::BAD_REQUEST, "bad body".into()),
            || CallError::Status(StatusCode::NOT_FOUND, "request not found".into()),
            || CallError::Status(StatusCode::CONFLICT, "request is timeout".into()),
            || CallError::BadAnswer("not JSON".into()),
        ];
        for refusal in refusals {
            let attempts = attempts_when_failing_with(refusal).await;
            assert_eq!(attempts, vec![Duration::ZERO], "{}", refusal());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_succeeds_stops_retrying() {
        let calls = Mutex::new(0);
        let result = with_retries(&BACKOFF, || {
            let n = {
                let mut calls = calls.lock().unwrap();
                *calls += 1;
                *calls
            };
            async move {
                if n < 3 {
                    Err(CallError::Network("reset".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(result.is_ok());
        assert_eq!(*calls.lock().unwrap(), 3);
    }

    #[test]
    fn a_heartbeat_says_how_long_to_hold_it_and_what_the_daemon_holds() {
        let rt = RuntimeId::parse("f40ded99-5e02-4ce0-95b4-efd3589327d8").unwrap();
        let id = RequestId::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            heartbeat_body(rt, Duration::from_secs(25), &[id]),
            json!({
                "runtime_id": "f40ded99-5e02-4ce0-95b4-efd3589327d8",
                "wait_ms": 25_000,
                "working_on": ["0123456789abcdef0123456789abcdef"],
                "supports_batch_import": true,
            })
        );
        assert_eq!(
            heartbeat_body(rt, Duration::ZERO, &[]),
            json!({"runtime_id": "f40ded99-5e02-4ce0-95b4-efd3589327d8", "working_on": [],
                   "supports_batch_import": true})
        );
    }

    #[test]
    fn every_kind_of_hand_out_is_read_from_the_answer() {
        let (a, b, c) = (
            "0123456789abcdef0123456789abcdef",
            "fedcba9876543210fedcba9876543210",
            "00000000000000000000000000000001",
        );
        let ack = json!({"status": "ok", "pending_model_list": {"id": a},
                         "pending_local_skill_imports": [{"id": b, "skill_key": "claude:x"},
                                                         {"id": c, "skill_key": "claude:y"}],
                         "pending_update": {"id": a, "target_version": "2.1.0"}});
        let got = hand_outs(&ack).unwrap();
        let summary: Vec<(Kind, String, Option<String>)> = got
            .iter()
            .map(|h| {
                let input = h.skill_key.clone().or(h.target_version.clone());
                (h.kind, h.id.to_string(), input)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (Kind::Models, a.to_owned(), None),
                (Kind::SkillImport, b.to_owned(), Some("claude:x".to_owned())),
                (Kind::SkillImport, c.to_owned(), Some("claude:y".to_owned())),
                (Kind::Update, a.to_owned(), Some("2.1.0".to_owned())),
            ]
        );
        assert!(hand_outs(&json!({"status": "ok"})).unwrap().is_empty());
        assert!(hand_outs(&json!({"pending_local_skills": {"id": "x"}})).is_err());
    }

    #[test]
    fn report_bodies_have_the_result_route_shape() {
        let json = |b: ReportBody| serde_json::to_value(b).unwrap();
        assert_eq!(
            json(ReportBody::running()),
            serde_json::json!({"status": "running", "supported": true})
        );
        assert_eq!(
            json(ReportBody::ended(Discovery::Failed("boom".into()))),
            serde_json::json!({"status": "failed", "supported": true, "error": "boom"})
        );
        assert_eq!(
            json(ReportBody::ended(Discovery::Found {
                models: vec![],
                supported: false,
                fallback: false
            })),
            serde_json::json!({"status": "completed", "supported": false})
        );
        assert_eq!(
            json(ReportBody::ended(Discovery::Found {
                models: vec![],
                supported: true,
                fallback: true
            }))["fallback"],
            true
        );
    }

    #[test]
    fn report_bodies_carry_u_fffd_for_nul_as_the_server_records_it() {
        let json = |b: ReportBody| serde_json::to_value(b).unwrap();
        let failed = ReportBody::ended(Discovery::Failed("stderr: a\0b\n\t𝄞".into()));
        assert_eq!(json(failed)["error"], "stderr: a\u{FFFD}b\n\t𝄞");
        let model: ModelEntry =
            serde_json::from_str(r#"{"id":"m","label":"M\u0000","provider":"p\u0000"}"#).unwrap();
        let found = ReportBody::ended(Discovery::Found {
            models: vec![model],
            supported: true,
            fallback: false,
        });
        assert_eq!(
            json(found)["models"],
            serde_json::json!([{"id": "m", "label": "M\u{FFFD}", "provider": "p\u{FFFD}"}])
        );
    }
}
