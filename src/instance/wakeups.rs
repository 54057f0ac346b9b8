//! The instance's wake-up thread: it blocks on the store's [`Listener`] and wakes the
//! waiters each change concerns; and, as a safety net on every engine, it re-checks all
//! waiters against the store at least once a second (`Settings::recheck_every`) — one query
//! for all of them — so that
//! a lost notification costs latency, never a wrong or missing answer.
//!
//! A thread, not a task: the listener blocks (PostgreSQL's synchronous client must not run
//! on an async worker), and it is one thread per instance, whatever the number of waiters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{App, Source, WAKEUP_SLICE};
use crate::errors::error_chain;
use crate::store::{Change, Listener};

/// After the listener fails, the first wait before opening a new one; doubled up to
/// [`MAX_BACKOFF`] while it keeps failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) fn run(app: &App, stop: &AtomicBool) {
    let mut listener: Option<Box<dyn Listener>> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at = Instant::now();
    let recheck_every = app.settings.recheck_every;
    let mut last_recheck = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Re-check after this wait when the listener asks for it or fails, or when the
        // periodic one is due.
        let mut recheck: Option<Source> = None;
        if app.settings.listen
            && app.store.listens()
            && listener.is_none()
            && Instant::now() >= retry_at
        {
            match app.store.listen() {
                Ok(opened) => {
                    listener = Some(opened);
                    backoff = FIRST_BACKOFF;
                    // Changes made before it listened are not in it: re-check at once, and
                    // only then say it is up.
                    last_recheck = Instant::now();
                    recheck_all(app, Source::Notification);
                    app.metrics.listening(true);
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), ?backoff, "wake-ups: cannot listen");
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let slice = recheck_every
            .saturating_sub(last_recheck.elapsed())
            .min(WAKEUP_SLICE);
        match listener.as_mut() {
            Some(open) => match open.wait(slice) {
                Ok(changes) => {
                    for change in changes {
                        match change {
                            Change::Pending(runtime) => {
                                app.waiters.wake_runtime(runtime, Source::Notification);
                            }
                            Change::Status(id) => {
                                app.waiters.wake_request(id, Source::Notification);
                            }
                            Change::Unknown => recheck = Some(Source::Notification),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "wake-ups: listener failed");
                    listener = None;
                    app.metrics.listening(false);
                    retry_at = Instant::now() + backoff;
                    // What changed while it was down is unknown.
                    recheck = Some(Source::Notification);
                }
            },
            None => thread::sleep(slice),
        }
        if recheck.is_none() && last_recheck.elapsed() >= recheck_every {
            recheck = Some(Source::Recheck);
        }
        if let Some(source) = recheck {
            last_recheck = Instant::now();
            recheck_all(app, source);
        }
    }
}

/// One query, then every waiter compared with its answer. Nothing to do (and no query)
/// while no call is held.
fn recheck_all(app: &App, source: Source) {
    if app.waiters.is_empty() {
        return;
    }
    match app.store.active_requests() {
        Ok(active) => app.waiters.recheck(&active, app.clock.now(), source),
        Err(e) => tracing::warn!(error = %error_chain(&e), "wake-ups: re-check failed"),
    }
}
