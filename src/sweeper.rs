//! The sweeper: every instance runs one. It ends active requests whose deadline passed, so a
//! request nobody polls still ends, and deletes ended requests past retention, in bounded
//! batches, off the request path; then it lets the engine do its housekeeping (on SQLite, a
//! checkpoint that keeps the write-ahead log small).
//!
//! Several sweepers at once are safe: each expiry is a compare-and-set whose row count says
//! what it ended, a deleted row is deleted once, and on PostgreSQL concurrent batches skip
//! each other's rows instead of waiting for them.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, Millis, millis};
use crate::errors::error_chain;
use crate::kind::{Kind, PerKind};
use crate::store::{RequestCounts, Result, Storer};

/// Rows ended or deleted per statement: small enough that one batch holds SQLite's write
/// lock only briefly.
pub const BATCH: u32 = 500;
/// The most batches of each kind in one sweep. A backlog larger than that (after a long
/// outage) is worked off over the next sweeps, so one sweep — and a shutdown waiting for
/// it — stays short.
pub const MAX_BATCHES: u32 = 100;
/// The sweeper steps aside this long between two batches. SQLite's busy handler polls for
/// the write lock with sleeps; with no gap between batches a waiting writer could keep
/// missing the moment the lock is free, and time out behind the sweeper.
const PAUSE: Duration = Duration::from_millis(5);

/// What one sweep did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Swept {
    pub expired: u64,
    pub deleted: u64,
}

/// One pass: expire what is overdue, then delete what ended more than its kind's
/// `retention` ago.
pub fn sweep_once(
    store: &dyn Storer,
    now: Millis,
    retention: impl Into<PerKind<Duration>>,
) -> Result<Swept> {
    let retention = retention.into();
    let mut expired = 0;
    for kind in Kind::ALL {
        expired += in_batches(|| Ok(store.expire_overdue(kind, now, BATCH)?.total()))?;
    }
    let mut deleted = 0;
    for kind in Kind::ALL {
        let cutoff = now.saturating_sub(millis(retention.of(kind)));
        deleted += in_batches(|| store.delete_ended_before(kind, cutoff, BATCH))?;
    }
    Ok(Swept { expired, deleted })
}

/// Runs `batch` until it does less than a full batch, or `MAX_BATCHES` times.
fn in_batches(mut batch: impl FnMut() -> Result<u64>) -> Result<u64> {
    let mut total = 0;
    for i in 0..MAX_BATCHES {
        if i > 0 {
            thread::sleep(PAUSE);
        }
        let n = batch()?;
        total += n;
        if n < u64::from(BATCH) {
            break;
        }
    }
    Ok(total)
}

/// Sweeps every `every` until `stop`'s sender is dropped, and after each sweep counts the
/// stored requests per status and hands the count (`None` if it failed) to `counted`: the
/// metrics serve that count from memory, so that scrapes never reach the store.
pub async fn run(
    store: Arc<dyn Storer>,
    clock: Arc<dyn Clock>,
    every: Duration,
    retention: PerKind<Duration>,
    mut stop: watch::Receiver<()>,
    counted: impl Fn(Option<RequestCounts>) + Send + Sync + 'static,
) {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let (store, clock) = (Arc::clone(&store), Arc::clone(&clock));
        let done = tokio::task::spawn_blocking(move || {
            let swept = sweep_once(store.as_ref(), clock.now(), retention);
            (swept, store.checkpoint(), store.count_requests())
        })
        .await;
        let (swept, checkpointed, counts) = match done {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "sweep panicked");
                continue;
            }
        };
        match swept {
            Ok(swept) if swept != Swept::default() => {
                tracing::info!(swept.expired, swept.deleted, "sweep");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e), "sweep failed"),
        }
        if let Err(e) = checkpointed {
            tracing::warn!(error = %error_chain(&e), "checkpoint failed");
        }
        match counts {
            Ok(counts) => counted(Some(counts)),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot count requests");
                counted(None);
            }
        }
    }
}
