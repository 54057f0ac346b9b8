//! The reference daemon: what runs next to an agent runtime, behind NAT. It heartbeats; when
//! an answer hands it a model-list request it runs discovery in a task of its own, so the
//! heartbeats go on meanwhile, renews the request's lease every heartbeat interval while
//! discovery runs, and reports the result, retrying what a retry can fix.
//!
//! [`run`] is the seam: `model-relay daemon` and `model-relay demo` call it with a config and
//! a shutdown future, and so do the tests, against a real server on port 0.

mod client;
pub mod command;
mod discover;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

pub use client::{CallError, ReportBody};
pub use discover::{Discovery, Source, parse_models};

use crate::ids::{RequestId, RuntimeId, Token};
use client::{RelayClient, with_retries};

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
    /// The relay's base URL, `http://host:port`, without a trailing slash.
    pub server: String,
    pub runtime_id: RuntimeId,
    /// The runtime's daemon token.
    pub token: Token,
    pub source: Source,
    /// How often to heartbeat, and to renew the lease of a request being discovered.
    pub heartbeat_interval: Duration,
    /// How long one discovery may take before it is reported as failed.
    pub discover_timeout: Duration,
    /// Waits before each retry of a final report; see [`REPORT_BACKOFF`].
    pub report_backoff: Vec<Duration>,
    /// How long one HTTP call may take before it counts as a network error.
    pub call_timeout: Duration,
    /// After shutdown, how long in-flight requests get to send their last report.
    pub stop_grace: Duration,
}

impl Config {
    /// A config with the documented defaults: heartbeat every 15 s, discovery bounded at
    /// 30 s. `server` must be an `http://` URL.
    pub fn new(
        server: &str,
        runtime_id: RuntimeId,
        token: Token,
        source: Source,
    ) -> Result<Self, String> {
        Ok(Config {
            server: server_base(server)?,
            runtime_id,
            token,
            source,
            heartbeat_interval: Duration::from_secs(15),
            discover_timeout: Duration::from_secs(30),
            report_backoff: REPORT_BACKOFF.to_vec(),
            call_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
        })
    }
}

/// `http://host[:port][/]` → `http://host[:port]`. Only plain HTTP: this build has no TLS
/// client, and saying so beats failing on the first heartbeat.
fn server_base(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    if trimmed.starts_with("https://") {
        return Err(format!(
            "{url:?}: https is not supported by this build; use http:// (e.g. through a local TLS-terminating proxy)"
        ));
    }
    let uri: hyper::Uri = trimmed
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{url:?}: expected http://HOST[:PORT]"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: give the server's root, without a path or query"
        ));
    }
    Ok(trimmed.to_owned())
}

/// Why the daemon stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A heartbeat got a 4xx: a wrong token, a deleted runtime. Heartbeating on cannot fix it.
    #[error("the server refused the heartbeat ({0}); check --server, --runtime-id and the token")]
    Refused(CallError),
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
        config.runtime_id,
        config.token.clone(),
        config.call_timeout,
    ));
    let (stop, stopping) = watch::channel(false);
    let mut requests = JoinSet::new();
    let mut beats = tokio::time::interval(config.heartbeat_interval);
    beats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    tracing::info!(server = %config.server, "daemon started");
    let outcome = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            Some(joined) = requests.join_next() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a request task panicked");
                }
                continue;
            }
            _ = beats.tick() => {}
        }
        let beat = tokio::select! {
            () = &mut shutdown => break Ok(()),
            beat = client.heartbeat() => beat,
        };
        match beat {
            Ok(Some(id)) => {
                tracing::info!(request = %id, "claimed a model-list request; discovering");
                requests.spawn(
                    serve_request(
                        Arc::clone(&client),
                        Arc::clone(&config),
                        id,
                        stopping.clone(),
                    )
                    .in_current_span(),
                );
            }
            Ok(None) => tracing::debug!("heartbeat"),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "heartbeat failed; trying again at the next interval");
            }
            Err(e) => break Err(DaemonError::Refused(e)),
        }
    };
    tracing::info!("daemon stopping");
    let _ = stop.send(true);
    let drained = tokio::time::timeout(config.stop_grace, async {
        while requests.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("in-flight requests did not report in time; dropping them");
    }
    tracing::info!("daemon stopped");
    outcome
}

/// One claimed request: discovery in a task of its own, a lease renewal every heartbeat
/// interval while it runs, then the report.
async fn serve_request(
    client: Arc<RelayClient>,
    config: Arc<Config>,
    id: RequestId,
    mut stopping: watch::Receiver<bool>,
) {
    // A JoinSet aborts its task when dropped, and dropping the discovery kills its command:
    // nothing outlives this function.
    let mut discovery = JoinSet::new();
    let source = config.source.clone();
    let timeout = config.discover_timeout;
    discovery.spawn(async move { source.discover(timeout).await });
    let every = config.heartbeat_interval;
    let mut renewals = tokio::time::interval_at(Instant::now() + every, every);
    renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let found = loop {
        tokio::select! {
            joined = discovery.join_next() => break match joined {
                Some(Ok(found)) => found,
                Some(Err(e)) => Discovery::Failed(format!("discovery crashed: {e}")),
                None => Discovery::Failed("discovery did not run".into()),
            },
            _ = renewals.tick() => match client.report(id, &ReportBody::running()).await {
                Ok(()) => tracing::info!(request = %id, "still discovering; lease renewed"),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(request = %id, error = %e, "lease renewal failed; trying again at the next interval");
                }
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "the server no longer takes this request; discovery abandoned");
                    return;
                }
            },
            () = stop_signalled(&mut stopping) => {
                drop(discovery);
                let body = ReportBody::failed("the daemon stopped before discovery finished".into());
                match client.report(id, &body).await {
                    Ok(()) => tracing::info!(request = %id, "reported as failed: the daemon is stopping"),
                    Err(e) => tracing::warn!(request = %id, error = %e, "could not report the stop"),
                }
                return;
            }
        }
    };
    match &found {
        Discovery::Found { models, supported } => {
            tracing::info!(request = %id, models = models.len(), supported, "discovery completed; reporting");
        }
        Discovery::Failed(error) => {
            tracing::warn!(request = %id, %error, "discovery failed; reporting");
        }
    }
    let body = ReportBody::ended(found);
    match with_retries(&config.report_backoff, || client.report(id, &body)).await {
        Ok(()) => tracing::info!(request = %id, "report delivered"),
        Err(e) => tracing::error!(request = %id, error = %e, "report not delivered; giving up"),
    }
}

/// Completes once `run` says stop (or is gone).
async fn stop_signalled(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; it must not live across the select.
    let _ = stopping.wait_for(|stop| *stop).await.map(drop);
}

#[cfg(test)]
mod tests {
    use super::server_base;

    #[test]
    fn the_server_url_is_an_http_root() {
        assert_eq!(
            server_base("http://127.0.0.1:8080/").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(
            server_base("http://relay.internal").as_deref(),
            Ok("http://relay.internal")
        );
        for bad in [
            "https://relay.example",
            "relay:8080",
            "ftp://h",
            "http://h/api",
            "http://h?x=1",
            "",
        ] {
            assert!(server_base(bad).is_err(), "{bad:?}");
        }
    }
}
