//! The reference daemon: what runs next to an agent runtime, behind NAT. It heartbeats, asking
//! the server to hold each heartbeat until a request comes (see [`pace`] for when the next
//! one goes); each request an answer hands it — a model list, a skill list, a skill import,
//! an update — it serves in a task of its own, so the heartbeats go on meanwhile, renews the
//! request's lease every heartbeat interval while the work runs (an update's with its output
//! so far), and reports the result, retrying what a retry can fix.
//! Every heartbeat lists the requests the daemon holds (`working_on`), so that the server can
//! hand out again one whose hand-out was lost on the way.
//!
//! [`run`] is the seam: `model-relay daemon` and `model-relay demo` call it with a config and
//! a shutdown future, and so do the tests, against a real server on port 0.

mod client;
pub mod command;
mod discover;
mod pace;
pub mod skills;
mod update;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

pub use client::{CallError, HandOut, ReportBody, hand_outs};
pub use discover::{Discovery, Source, parse_models};
pub use skills::SkillsDir;

use serde_json::{Value, json};

use crate::ids::{RequestId, RuntimeId, Token};
use crate::kind::Kind;
use client::{RelayClient, with_retries};
use pace::{Backoff, Pace, random_seed};

/// Waits before each retry of a report: four retries after a first attempt.
pub const REPORT_BACKOFF: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// Everything one daemon needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The relay's base URL, `http(s)://host:port`, without a trailing slash.
    pub server: String,
    /// Certificates (PEM) trusted for an `https://` server besides the system's roots: a
    /// private CA's.
    pub ca_cert: Option<PathBuf>,
    pub runtime_id: RuntimeId,
    /// The runtime's daemon token.
    pub token: Token,
    pub source: Source,
    /// How often to renew the lease of a request being discovered; also the pause between
    /// heartbeats when the server does not hold them, and the cap of the error backoff.
    pub heartbeat_interval: Duration,
    /// How long each heartbeat asks the server to hold it (`wait_ms`) until a request comes,
    /// so discovery starts at once instead of at the next poll. Zero: poll every interval.
    pub heartbeat_wait: Duration,
    /// How long one discovery may take before it is reported as failed.
    pub discover_timeout: Duration,
    /// Waits before each retry of a final report; see [`REPORT_BACKOFF`].
    pub report_backoff: Vec<Duration>,
    /// How long one HTTP call may take before it counts as a network error.
    pub call_timeout: Duration,
    /// After shutdown, how long in-flight requests get to send their last report.
    pub stop_grace: Duration,
    /// Where the runtime's skills are (`--skills-dir`); none: a skill list reports
    /// `supported: false`.
    pub skills_dirs: Vec<SkillsDir>,
    /// The command that updates the runtime's CLI (`--update-cmd`); none: an update fails.
    pub update_cmd: Option<String>,
    /// How long an update may run before it is killed and reported as failed.
    pub update_timeout: Duration,
}

impl Config {
    /// A config with the documented defaults: heartbeats held up to 25 s, an interval of
    /// 15 s, discovery bounded at 30 s. `server` must be an `http://` or `https://` root.
    pub fn new(
        server: &str,
        runtime_id: RuntimeId,
        token: Token,
        source: Source,
    ) -> Result<Self, String> {
        Ok(Config {
            server: server_base(server)?,
            ca_cert: None,
            runtime_id,
            token,
            source,
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_wait: Duration::from_secs(25),
            discover_timeout: Duration::from_secs(30),
            report_backoff: REPORT_BACKOFF.to_vec(),
            call_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
            skills_dirs: Vec::new(),
            update_cmd: None,
            update_timeout: Duration::from_secs(120),
        })
    }
}

/// `http(s)://host[:port][/]` → `http(s)://host[:port]`.
fn server_base(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let uri: hyper::Uri = trimmed
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let (Some(scheme @ ("http" | "https")), Some(authority)) = (uri.scheme_str(), uri.authority())
    else {
        return Err(format!(
            "{url:?}: expected https://HOST[:PORT] or http://HOST[:PORT]"
        ));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || authority.as_str().contains('@')
    {
        return Err(format!(
            "{url:?}: give the server's root, without a path, query or user"
        ));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Whether a daemon token sent to `base` crosses a network in clear: plain `http://` to a
/// host that is not this machine.
fn token_in_clear(base: &str) -> bool {
    let Some(rest) = base.strip_prefix("http://") else {
        return false;
    };
    let Ok(authority) = rest.parse::<hyper::http::uri::Authority>() else {
        return true;
    };
    let host = authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Why the daemon stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A heartbeat got a 4xx: a wrong token, a deleted runtime. Heartbeating on cannot fix it.
    #[error("the server refused the heartbeat ({0}); check --server, --runtime-id and the token")]
    Refused(CallError),
    /// The server's certificate does not verify: nothing was sent, and nothing will be.
    #[error(
        "{0}; nothing was sent to the server. Check --server, or give the CA that signed its certificate with --ca-cert"
    )]
    Certificate(CallError),
    /// `--ca-cert` cannot be read or holds no certificate.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Heartbeats and serves requests until `shutdown` completes (then stops cleanly: running
/// discoveries are cancelled and reported as failed, within `stop_grace`), or until the
/// server refuses a heartbeat with a 4xx.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    // Every line this daemon logs names its runtime: the demo runs several in one process.
    let span = tracing::info_span!("daemon", runtime = %config.runtime_id);
    serve(config, shutdown).instrument(span).await
}

async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let client = Arc::new(RelayClient::new(
        config.server.clone(),
        config.ca_cert.as_deref(),
        config.runtime_id,
        config.token.clone(),
        config.call_timeout,
    )?);
    if token_in_clear(&config.server) {
        tracing::warn!(
            server = %config.server,
            "plain http:// to a host that is not this machine: the daemon token travels in clear; use https://"
        );
    }
    let (stop, stopping) = watch::channel(false);
    let worker = Worker {
        client: Arc::clone(&client),
        config: Arc::clone(&config),
        holdings: Holdings::default(),
        stopping,
    };
    let mut requests = JoinSet::new();
    let pace = Pace {
        wait: config.heartbeat_wait,
        interval: config.heartbeat_interval,
    };
    let mut backoff = Backoff::new(config.heartbeat_interval, random_seed());
    let mut next_beat = Instant::now();
    tokio::pin!(shutdown);
    tracing::info!(server = %config.server, wait = ?config.heartbeat_wait, "daemon started");
    let outcome = loop {
        let pause = tokio::time::sleep_until(next_beat);
        if unless_stopped(pause, shutdown.as_mut(), &mut requests)
            .await
            .is_none()
        {
            break Ok(());
        }
        let sent = Instant::now();
        let working_on = worker.holdings.ids();
        let call = client.heartbeat(config.heartbeat_wait, &working_on);
        let Some(beat) = unless_stopped(call, shutdown.as_mut(), &mut requests).await else {
            break Ok(());
        };
        let wait = match beat {
            Ok(handed) => {
                backoff.reset();
                if handed.is_empty() {
                    tracing::debug!(took = ?sent.elapsed(), "heartbeat");
                }
                let claimed = !handed.is_empty();
                for hand_out in handed {
                    worker.hand_out(hand_out, &mut requests);
                }
                pace.after_answer(claimed, sent.elapsed())
            }
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "heartbeat failed; trying again");
                wait
            }
            Err(e @ CallError::Certificate(_)) => break Err(DaemonError::Certificate(e)),
            Err(e) => break Err(DaemonError::Refused(e)),
        };
        next_beat = from_now(wait);
    };
    tracing::info!("daemon stopping");
    let _ = stop.send(true);
    drain(requests, config.stop_grace).await;
    tracing::info!("daemon stopped");
    outcome
}

/// `wait` from now. `checked_add` fails only for an absurd interval; then it is a day.
fn from_now(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

/// Gives the request tasks, told to stop, `grace` to send their last reports.
async fn drain(mut requests: JoinSet<()>, grace: Duration) {
    let drained = tokio::time::timeout(grace, async {
        while requests.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("in-flight requests did not report in time; dropping them");
    }
}

/// Runs `work` to its end, reaping finished request tasks meanwhile; `None` when `shutdown`
/// completes first. Dropping `work` then cancels it: a held heartbeat does not delay a stop.
async fn unless_stopped<T>(
    work: impl Future<Output = T>,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
    requests: &mut JoinSet<()>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return None,
            Some(joined) = requests.join_next() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a request task panicked");
                }
            }
            done = &mut work => return Some(done),
        }
    }
}

/// What a request task needs, shared by all of them.
struct Worker {
    client: Arc<RelayClient>,
    config: Arc<Config>,
    holdings: Holdings,
    stopping: watch::Receiver<bool>,
}

impl Worker {
    /// A heartbeat handed out a request: serve it, unless this daemon holds it already. The
    /// server hands out a request again when it thinks its first hand-out was lost; if it
    /// was not, the task serving it goes on, and a second one would only race it.
    fn hand_out(&self, hand_out: HandOut, requests: &mut JoinSet<()>) {
        let id = hand_out.id;
        // Taken here, before the next heartbeat is sent, so that heartbeat lists it.
        let Some(holding) = self.holdings.take(id) else {
            tracing::debug!(request = %id, "handed out again a request this daemon holds; ignored");
            return;
        };
        let kind = hand_out.kind.name();
        tracing::info!(request = %id, kind, "claimed a request; working on it");
        requests.spawn(
            serve_request(
                Arc::clone(&self.client),
                Arc::clone(&self.config),
                holding,
                hand_out,
                self.stopping.clone(),
            )
            .in_current_span(),
        );
    }
}

/// The requests this daemon holds right now: what each heartbeat's `working_on` says.
#[derive(Clone, Default)]
struct Holdings(Arc<Mutex<BTreeSet<RequestId>>>);

impl Holdings {
    /// Takes `id`, unless it is held already; the returned guard lets go of it when dropped.
    fn take(&self, id: RequestId) -> Option<Holding> {
        self.lock().insert(id).then(|| Holding {
            id,
            holdings: self.clone(),
        })
    }

    fn ids(&self) -> Vec<RequestId> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<RequestId>> {
        // The set is only inserted into and removed from: a panic elsewhere cannot leave it
        // half changed, so a poisoned lock is still good.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One held request. Dropped when the task serving it ends in any way (reported, given up,
/// abandoned, aborted at stop), so `working_on` never names a request nobody serves.
struct Holding {
    id: RequestId,
    holdings: Holdings,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.holdings.lock().remove(&self.id);
    }
}

/// One claimed request: its work in a task of its own, a lease renewal every heartbeat
/// interval while it runs (on its own timer: a held heartbeat does not delay it; an update's
/// carries its output so far), then the report. The request stays in `working_on` until
/// `holding` drops, after the last call.
async fn serve_request(
    client: Arc<RelayClient>,
    config: Arc<Config>,
    holding: Holding,
    hand_out: HandOut,
    mut stopping: watch::Receiver<bool>,
) {
    let (id, kind) = (holding.id, hand_out.kind);
    // A JoinSet aborts its task when dropped, and dropping the work kills its command:
    // nothing outlives this function.
    let mut work = JoinSet::new();
    let output = update::Output::default();
    work.spawn(work_on(Arc::clone(&config), hand_out, output.clone()));
    let every = config.heartbeat_interval;
    let mut renewals = tokio::time::interval_at(Instant::now() + every, every);
    renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let body = loop {
        tokio::select! {
            joined = work.join_next() => break match joined {
                Some(Ok(body)) => body,
                Some(Err(e)) => failed(format!("the work crashed: {e}")),
                None => failed("the work did not run".into()),
            },
            _ = renewals.tick() => {
                let running = match kind {
                    Kind::Update => json!({"status": "running", "output": output.text()}),
                    _ => json!({"status": "running"}),
                };
                match client.report(kind, id, &running).await {
                    Ok(()) => tracing::info!(request = %id, "still working; lease renewed"),
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(request = %id, error = %e, "lease renewal failed; trying again at the next interval");
                    }
                    Err(e) => {
                        tracing::warn!(request = %id, error = %e, "the server no longer takes this request; work abandoned");
                        return;
                    }
                }
            }
            () = stop_signalled(&mut stopping) => {
                drop(work);
                let work = match kind {
                    Kind::Models => "discovery",
                    Kind::LocalSkills => "the skill list",
                    Kind::SkillImport => "the import",
                    Kind::Update => "the update",
                };
                let body = failed(format!("the daemon stopped before {work} finished"));
                match client.report(kind, id, &body).await {
                    Ok(()) => tracing::info!(request = %id, "reported as failed: the daemon is stopping"),
                    Err(e) => tracing::warn!(request = %id, error = %e, "could not report the stop"),
                }
                return;
            }
        }
    };
    let status = body["status"].as_str().unwrap_or_default();
    tracing::info!(request = %id, status, "work done; reporting");
    match with_retries(&config.report_backoff, || client.report(kind, id, &body)).await {
        Ok(()) => tracing::info!(request = %id, "report delivered"),
        Err(e) => tracing::error!(request = %id, error = %e, "report not delivered; giving up"),
    }
}

/// A failed report with `error`.
fn failed(error: String) -> Value {
    // The shape of a failed model list's report, which every kind's route takes.
    serde_json::to_value(ReportBody::failed(error)).unwrap_or_else(|_| json!({"status": "failed"}))
}

/// The work of one request of any kind: what it finds, as the report that ends it.
async fn work_on(config: Arc<Config>, hand_out: HandOut, output: update::Output) -> Value {
    let completed = |result: Value| {
        let mut body = json!({"status": "completed"});
        if let (Some(body), Value::Object(result)) = (body.as_object_mut(), result) {
            body.extend(result);
        }
        body
    };
    // Reading skill files is blocking work: off the async workers.
    let blocking = |f: Box<dyn FnOnce() -> Result<Value, String> + Send>| async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(format!("the work crashed: {e}")))
    };
    match hand_out.kind {
        Kind::Models => {
            let found = config.source.discover(config.discover_timeout).await;
            match &found {
                Discovery::Found {
                    models,
                    supported,
                    fallback,
                } => tracing::info!(
                    models = models.len(),
                    supported,
                    fallback,
                    "discovery completed"
                ),
                Discovery::Failed(error) => tracing::warn!(%error, "discovery failed"),
            }
            serde_json::to_value(ReportBody::ended(found)).unwrap_or_else(|e| failed(e.to_string()))
        }
        Kind::LocalSkills => {
            let dirs = config.skills_dirs.clone();
            match blocking(Box::new(move || skills::list(&dirs))).await {
                Ok(list) => completed(list),
                Err(error) => failed(error),
            }
        }
        Kind::SkillImport => {
            let Some(key) = hand_out.skill_key else {
                return failed("the hand-out named no skill_key".into());
            };
            let dirs = config.skills_dirs.clone();
            match blocking(Box::new(move || skills::import(&dirs, &key))).await {
                Ok(skill) => completed(skill),
                Err(error) => failed(error),
            }
        }
        Kind::Update => {
            let Some(command) = config.update_cmd.as_deref() else {
                return failed("this daemon cannot update itself".into());
            };
            let version = hand_out.target_version.unwrap_or_default();
            let ran = update::run(command, &version, config.update_timeout, &output).await;
            let mut body = match ran {
                Ok(()) => json!({"status": "completed"}),
                Err(error) => failed(error),
            };
            body["output"] = output.text().into();
            body
        }
    }
}

/// Completes once `run` says stop (or is gone).
async fn stop_signalled(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; it must not live across the select.
    let _ = stopping.wait_for(|stop| *stop).await.map(drop);
}

#[cfg(test)]
mod tests {
    use super::{server_base, token_in_clear};

    #[test]
    fn the_server_url_is_an_http_or_https_root() {
        assert_eq!(
            server_base("http://127.0.0.1:8080/").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(
            server_base("http://relay.internal").as_deref(),
            Ok("http://relay.internal")
        );
        assert_eq!(
            server_base(" HTTPS://relay.example:8443/ ").as_deref(),
            Ok("https://relay.example:8443")
        );
        for bad in [
            "relay:8080",
            "https://user:secret@relay.example",
            "ftp://h",
            "http://h/api",
            "http://h?x=1",
            "",
        ] {
            assert!(server_base(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_plain_http_off_this_machine_sends_the_token_in_clear() {
        for clear in [
            "http://relay.example",
            "http://10.0.0.7:8080",
            "http://[2001:db8::1]",
        ] {
            assert!(token_in_clear(clear), "{clear}");
        }
        for safe in [
            "https://relay.example",
            "http://localhost:8080",
            "http://LOCALHOST",
            "http://127.0.0.1:8080",
            "http://127.8.0.1",
            "http://[::1]:8080",
        ] {
            assert!(!token_in_clear(safe), "{safe}");
        }
    }
}
