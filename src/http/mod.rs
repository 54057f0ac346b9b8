//! The HTTP server: an accept loop over hyper's connections — HTTP/1.1, or HTTP/2 when TLS
//! negotiated it — shut down gracefully.
//! It only serves: the instance's background work is started by [`crate::run`], the seam
//! every caller uses — `main` with a real listener, tests with one bound to `127.0.0.1:0`.

mod connection;
mod error;
mod json;
mod kinds;
mod metrics_listener;
mod routes;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

pub use error::ApiError;
pub use metrics_listener::serve_metrics;
// The parsers of everything a caller sends, public so that the fuzz targets under `fuzz/`
// and the OpenAPI agreement test reach exactly what the server runs.
pub use kinds::{Input, parse_input, parse_result};
pub use routes::Route;
pub use wire::{
    HeartbeatBody, NewRuntimeBody, parse_ask, parse_heartbeat, parse_new_runtime, parse_report,
    parse_wait_query,
};

use crate::instance::App;
use connection::{Answer, Budget, Connection, InFlight};

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

/// Where [`serve`] takes connections: a TCP listener, plain or with TLS in front.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Listener {
    /// HTTPS on `tcp`: HTTP/2 or HTTP/1.1 as the client's ALPN chooses (HTTP/1.1 without).
    pub fn tls(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Listener {
            tcp,
            tls: Some(TlsAcceptor::from(config)),
        }
    }
}

impl From<TcpListener> for Listener {
    /// Plain HTTP/1.1 on `tcp`.
    fn from(tcp: TcpListener) -> Self {
        Listener { tcp, tls: None }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, answers
/// every held call at once, and lets in-flight requests finish (up to a bound).
pub async fn serve(
    listener: Listener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let Listener { tcp, tls } = listener;
    tokio::pin!(shutdown);
    let (stop, stopping) = watch::channel(false);
    // One permit per open connection: past `--max-connections` a new connection is closed
    // as soon as it is accepted, never queued, so the server's descriptors stay bounded.
    // Having them all back again is also how the drain knows every connection has ended.
    let capacity = u32::try_from(app.settings.max_connections).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(capacity as usize));
    // The answer bytes all connections together may hold that hyper has not taken yet.
    let answers = Arc::new(Budget::new(app.settings.answer_bytes_total));
    let mut refused_since_logged = 0u64;
    let mut refusal_logged_at: Option<Instant> = None;
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut failed_since_logged = 0u64;
    let mut logged_at: Option<Instant> = None;
    loop {
        let (stream, _) = tokio::select! {
            accepted = tcp.accept() => match accepted {
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
        // Spawned as it is: wrapped in another async block, the task would hold the
        // future twice over (once before it starts, once while it runs).
        tokio::spawn(connection(
            stream,
            tls.clone(),
            Arc::clone(&app),
            Arc::clone(&answers),
            stopping.clone(),
            slot,
        ));
    }
    drop(tcp);
    app.begin_shutdown();
    let _ = stop.send(true);
    let drained = slots.acquire_many(capacity);
    if tokio::time::timeout(app.settings.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("shutdown: in-flight requests did not finish in time");
    }
    tracing::debug!("shutdown: drained");
    Ok(())
}

/// One connection, from the TLS handshake (if any) to its end: HTTP/1.1, or HTTP/2 when
/// ALPN chose it. It shuts down gracefully once `stopping` turns true, and holds its `slot`
/// until it ends.
async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    answers: Arc<Budget>,
    stopping: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().ok();
    let state = Arc::new(Connection::new(
        app.settings.answer_bytes_per_connection,
        answers,
    ));
    let ended = match tls {
        None => http1(TokioIo::new(stream), app, state, stopping).await,
        // Boxed: the handshake's state and an HTTP/2 connection are large, and a task's
        // size is its future's largest state, so a plain connection would carry them too.
        Some(acceptor) => Box::pin(over_tls(stream, acceptor, app, state, stopping)).await,
    };
    if let Err(e) = ended {
        tracing::debug!(?peer, error = %e, "connection ended with an error");
    }
    drop(slot);
}

async fn over_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    state: Arc<Connection>,
    stopping: watch::Receiver<bool>,
) -> Result<(), String> {
    // A client that opens a connection and never finishes its handshake holds a slot like
    // one that never finishes its headers, and gets as long.
    let handshake = acceptor.accept(stream);
    let stream = match tokio::time::timeout(app.settings.read_timeout, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err("no TLS handshake within --read-timeout".to_owned()),
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        http2(TokioIo::new(stream), app, state, stopping).await
    } else {
        http1(TokioIo::new(stream), app, state, stopping).await
    }
}

async fn http1<I>(
    io: I,
    app: Arc<App>,
    state: Arc<Connection>,
    stopping: watch::Receiver<bool>,
) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let read_timeout = app.settings.read_timeout;
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // A request's headers must arrive within `--read-timeout`, and so must the next
        // request's on a connection left idle: an idle connection is closed then.
        .header_read_timeout(read_timeout)
        .serve_connection(io, service(app, Arc::clone(&state)));
    connection::drive(connection, state, stopping, read_timeout).await
}

async fn http2<I>(
    io: I,
    app: Arc<App>,
    state: Arc<Connection>,
    stopping: watch::Receiver<bool>,
) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let read_timeout = app.settings.read_timeout;
    // The client may send this much that no handler has read yet, over all its streams:
    // with bodies read one at a time (`Connection::body_turn`), a connection holds at most
    // one window plus the one body being read.
    let window = u32::try_from(app.settings.body_limit).unwrap_or(u32::MAX);
    let streams = u32::try_from(app.settings.max_streams_per_connection).unwrap_or(u32::MAX);
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        // Each stream may be a held call: a bound per connection, so that one connection
        // cannot open more than its share of them before `--max-waiting` is felt.
        .max_concurrent_streams(streams)
        .serve_connection(io, service(app, Arc::clone(&state)));
    connection::drive(connection, state, stopping, read_timeout).await
}

/// The routes as hyper calls them, counting each request in flight on `state`.
fn service(
    app: Arc<App>,
    state: Arc<Connection>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Answer>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
+ 'static {
    service_fn(move |request| {
        let app = Arc::clone(&app);
        let state = Arc::clone(&state);
        async move {
            let in_flight = InFlight::begin(Arc::clone(&state));
            let response = routes::handle(app, &state, request).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    })
}
