//! The HTTP server: an accept loop over hyper's HTTP/1 connections, shut down gracefully.
//! It only serves: the instance's background work is started by [`crate::run`], the seam
//! every caller uses — `main` with a real listener, tests with one bound to `127.0.0.1:0`.

mod error;
mod routes;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::ApiError;
// The parsers of everything a caller sends, public so that the fuzz targets under `fuzz/`
// and the OpenAPI agreement test reach exactly what the server runs.
pub use routes::Route;
pub use wire::{
    HeartbeatBody, NewRuntimeBody, parse_heartbeat, parse_new_runtime, parse_report,
    parse_wait_query,
};

use crate::instance::App;

/// How handlers reach the store: its engines are synchronous, so store work runs on the
/// blocking pool, except reads that the store says are quick and local.
trait StoreCalls {
    /// Store work in two steps: `read`, which only reads and says whether `then` will
    /// write, and `then`. Where the store's reads are quick and local
    /// ([`Storer::reads_in_place`](crate::store::Storer::reads_in_place)), `read` runs
    /// right here — handing it to the blocking pool would cost more than it does — and so
    /// does `then` when it writes nothing; a `then` that writes goes to the blocking pool,
    /// since a write may queue for a lock and must not hold up an async worker. Otherwise
    /// both run in one trip to the blocking pool.
    async fn read_then<R, T, FR, FT>(&self, read: FR, then: FT) -> Result<T, ApiError>
    where
        FR: FnOnce(&App) -> Result<(R, bool), ApiError> + Send + 'static,
        FT: FnOnce(&App, R) -> Result<T, ApiError> + Send + 'static,
        R: Send + 'static,
        T: Send + 'static;

    /// Runs store work on the blocking pool: the engines are synchronous, and the
    /// PostgreSQL client panics on an async worker thread.
    async fn blocking<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static;

    /// Store work that only reads: right here where the store's reads are in place, else
    /// on the blocking pool.
    async fn read<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static;
}

impl StoreCalls for Arc<App> {
    async fn read_then<R, T, FR, FT>(&self, read: FR, then: FT) -> Result<T, ApiError>
    where
        FR: FnOnce(&App) -> Result<(R, bool), ApiError> + Send + 'static,
        FT: FnOnce(&App, R) -> Result<T, ApiError> + Send + 'static,
        R: Send + 'static,
        T: Send + 'static,
    {
        if !self.store.reads_in_place() {
            return self
                .blocking(move |app| {
                    let (read, _) = read(app)?;
                    then(app, read)
                })
                .await;
        }
        let (read, writes) = read(self)?;
        if writes {
            self.blocking(move |app| then(app, read)).await
        } else {
            then(self, read)
        }
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let app = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&app))
            .await
            .map_err(|e| ApiError::Internal(format!("store call did not finish: {e}")))?
    }

    async fn read<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        if self.store.reads_in_place() {
            work(self)
        } else {
            self.blocking(work).await
        }
    }
}

/// After a failed accept (out of file descriptors, say), the first wait before the next
/// try; doubled while it keeps failing, up to the second bound.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Failed accepts are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, answers
/// every held call at once, and lets in-flight requests finish (up to a bound).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // One permit per open connection: past `--max-connections` a new connection is closed
    // as soon as it is accepted, never queued, so the server's descriptors stay bounded.
    let slots = Arc::new(Semaphore::new(app.settings.max_connections));
    let read_timeout = app.settings.read_timeout;
    let mut refused_since_logged = 0u64;
    let mut refusal_logged_at: Option<Instant> = None;
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut failed_since_logged = 0u64;
    let mut logged_at: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = ACCEPT_BACKOFF_FIRST;
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: the listener is still good, so
                    // wait, longer each time it fails again, instead of spinning; and say
                    // so at most once a second, with how often it failed meanwhile.
                    failed_since_logged += 1;
                    if logged_at.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(error = %e, failures = failed_since_logged, "accept failed");
                        logged_at = Some(Instant::now());
                        failed_since_logged = 0;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            refused_since_logged += 1;
            if refusal_logged_at.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                tracing::warn!(
                    refused = refused_since_logged,
                    "connection refused: --max-connections reached"
                );
                refusal_logged_at = Some(Instant::now());
                refused_since_logged = 0;
            }
            continue;
        };
        // Small JSON answers: send them now rather than wait to fill a segment.
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let service = service_fn(move |request| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(routes::handle(app, request).await) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            // A request's headers must arrive within `--read-timeout`, and so must the next
            // request's on a connection left idle: an idle connection is closed then.
            .header_read_timeout(read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    app.begin_shutdown();
    if tokio::time::timeout(app.settings.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: in-flight requests did not finish in time");
    }
    tracing::debug!("shutdown: drained");
    Ok(())
}
