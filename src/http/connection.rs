//! One connection's shared state and its driver: what its requests have begun and
//! answered, the answers still being sent (and the bytes they hold of the connection's and
//! the server's budgets), and the one slot for reading a request body. `drive` reads it to
//! close a connection that is idle, or whose answers make no write progress.
//!
//! Why: hyper's HTTP/2 has no idle timeout, holds a stream's whole answer while the client
//! keeps its window shut, and reads as many bodies at once as the client opens streams. A
//! client that stops reading could pin answers (up to 200 streams of a megabyte each) for as
//! long as it liked, and one that stops sending could pin a megabyte per stream. Answers are
//! now handed to hyper a chunk at a time as it can send them, counted against a budget per
//! connection and per server, and cut off when they stop moving; bodies are read one at a
//! time per connection, so a connection holds at most one body's limit of them.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{Semaphore, SemaphorePermit, watch};

/// What an answer hands hyper at a time. An answer no larger is sent as it is, and counts
/// against no budget: its bytes are as few as a request's head.
pub(super) const CHUNK: usize = 16 * 1024;

/// Bytes of answers not yet handed to hyper, against a limit.
pub(super) struct Budget {
    bytes: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(super) fn new(limit: usize) -> Self {
        Budget {
            bytes: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if they fit — or if nothing is taken, so that an answer larger than
    /// the limit can still be sent, alone.
    fn take(&self, n: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held == 0 || held.saturating_add(n) <= self.limit).then_some(held + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Why an answer was not admitted: the budget that was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Full {
    Connection,
    Server,
}

/// The state one connection's requests share with its driver.
pub(super) struct Connection {
    opened: Instant,
    /// Requests being answered now (a held call among them).
    in_flight: AtomicUsize,
    /// Milliseconds since `opened` of the last event: a request begun or answered, a chunk
    /// handed to hyper, an answer finished. A connection is quiet from its last event.
    last_event: AtomicU64,
    /// The answers that hold budget, for the driver to find one that stopped moving.
    large: Mutex<Vec<Weak<Progress>>>,
    /// This connection's answer bytes not yet handed to hyper.
    queued: Budget,
    /// The server's, over all its connections.
    server: Arc<Budget>,
    /// Held while a request body is read: one at a time per connection.
    body: Semaphore,
}

impl Connection {
    pub(super) fn new(per_connection: usize, server: Arc<Budget>) -> Self {
        Connection {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_event: AtomicU64::new(0),
            large: Mutex::new(Vec::new()),
            queued: Budget::new(per_connection),
            server,
            body: Semaphore::new(1),
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn event(&self) {
        self.last_event.store(self.millis(), Ordering::Release);
    }

    fn quiet_for(&self) -> Duration {
        let last = self.last_event.load(Ordering::Acquire);
        Duration::from_millis(self.millis().saturating_sub(last))
    }

    /// The turn to read a request body: one at a time, so that the bodies a connection
    /// holds never pass one body's limit however many streams it opens. Bodies waiting for
    /// their turn stay in hyper's receive window, which is bounded too.
    pub(super) async fn body_turn(&self) -> SemaphorePermit<'_> {
        // Never closed, so the error cannot happen; wait forever rather than panic.
        match self.body.acquire().await {
            Ok(permit) => permit,
            Err(_) => std::future::pending().await,
        }
    }

    /// `bytes` as the body hyper sends: as it is when small, else in chunks, counted
    /// against this connection's budget and the server's. `Err` names the budget that had
    /// no room; nothing is held then.
    pub(super) fn answer(self: &Arc<Self>, bytes: Bytes) -> Result<Answer, Full> {
        let counted = if bytes.len() > CHUNK { bytes.len() } else { 0 };
        let progress = if counted > 0 {
            if !self.queued.take(counted) {
                return Err(Full::Connection);
            }
            if !self.server.take(counted) {
                self.queued.give_back(counted);
                return Err(Full::Server);
            }
            let progress = Arc::new(Progress(AtomicU64::new(self.millis())));
            let mut large = self.large.lock().unwrap_or_else(PoisonError::into_inner);
            large.retain(|p| p.strong_count() > 0);
            large.push(Arc::downgrade(&progress));
            Some(progress)
        } else {
            None
        };
        Ok(Answer {
            rest: bytes,
            counted,
            progress,
            connection: Arc::clone(self),
        })
    }

    /// `bytes` as the body hyper sends, counted against no budget: for the short answer
    /// that says a budget is full.
    pub(super) fn uncounted(self: &Arc<Self>, bytes: Bytes) -> Answer {
        Answer {
            rest: bytes,
            counted: 0,
            progress: None,
            connection: Arc::clone(self),
        }
    }

    /// Whether an answer holding budget has handed hyper nothing for `period`: its client
    /// reads nothing of it.
    fn stalled(&self, period: Duration) -> bool {
        let now = self.millis();
        let period = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
        let mut large = self.large.lock().unwrap_or_else(PoisonError::into_inner);
        large.retain(|p| p.strong_count() > 0);
        large
            .iter()
            .filter_map(Weak::upgrade)
            .any(|p| now.saturating_sub(p.0.load(Ordering::Acquire)) >= period)
    }
}

/// When an answer last handed hyper a chunk, in milliseconds since its connection opened.
struct Progress(AtomicU64);

/// Counts one request as in flight while it lives.
pub(super) struct InFlight(Arc<Connection>);

impl InFlight {
    pub(super) fn begin(connection: Arc<Connection>) -> Self {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        connection.event();
        InFlight(connection)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.event();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body as hyper sends it. hyper asks for the next chunk only once it has
/// room to send the last (HTTP/2: window; HTTP/1.1: its write buffer), so the chunks it has
/// taken are a connection's write progress, and the rest stays here, counted.
pub(super) struct Answer {
    rest: Bytes,
    /// The bytes held of both budgets, given back when the answer is dropped.
    counted: usize,
    /// Set for an answer that holds budget: when it last moved.
    progress: Option<Arc<Progress>>,
    connection: Arc<Connection>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let chunk = if self.counted == 0 {
            std::mem::take(&mut self.rest)
        } else {
            // A copy, not a slice: a slice would keep the whole answer's allocation alive
            // for as long as hyper holds the chunk, after this answer has given its bytes
            // back to the budgets.
            let n = self.rest.len().min(CHUNK);
            let chunk = Bytes::copy_from_slice(&self.rest[..n]);
            self.rest = self.rest.slice(n..);
            chunk
        };
        if let Some(progress) = &self.progress {
            progress
                .0
                .store(self.connection.millis(), Ordering::Release);
        }
        self.connection.event();
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.counted > 0 {
            self.connection.queued.give_back(self.counted);
            self.connection.server.give_back(self.counted);
        }
        self.connection.event();
    }
}

/// Runs `connection` to its end, checking `state` every quarter of `period` (the read
/// timeout):
/// - an answer that has moved nothing for a whole period ends the connection at once: its
///   client stopped reading, and waiting longer would only keep its bytes;
/// - a connection quiet for a whole period with nothing in flight shuts down gracefully
///   (hyper's HTTP/2 has no idle timeout of its own; HTTP/1.1's header timeout usually
///   comes first); an answer still alive then has moved nothing for that long either;
/// - a graceful shutdown (idle, or `stopping`) that has not ended the connection after a
///   further quiet period with nothing in flight ends it at once: its last answers are
///   stuck in a window or a socket that will not open.
pub(super) async fn drive<C>(
    connection: C,
    state: Arc<Connection>,
    mut stopping: watch::Receiver<bool>,
    period: Duration,
) -> Result<(), String>
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let every = (period / 4).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut closing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended.map_err(|e| e.to_string()),
            // Sent once, or its sender dropped: either way the server is stopping.
            _ = stopping.changed(), if closing_since.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = ticks.tick() => {
                if state.stalled(period) {
                    return Err("an answer made no progress within --read-timeout".to_owned());
                }
                let idle = state.in_flight.load(Ordering::Acquire) == 0;
                let quiet = state.quiet_for() >= period;
                match closing_since {
                    None if idle && quiet => {
                        connection.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                    Some(since) if idle && quiet && since.elapsed() >= period => {
                        return Err("did not close within --read-timeout of being told to".to_owned());
                    }
                    _ => {}
                }
            }
        }
    }
}
