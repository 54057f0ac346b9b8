//! The sweeper: every instance runs one. It ends active requests whose deadline passed, so a
//! request nobody polls still ends, and deletes ended requests past retention in bounded
//! batches, off the request path. Several sweepers at once are safe: expiry is a
//! compare-and-set, and deleting a row twice deletes it once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Millis, millis};
use crate::http::{App, error_chain};
use crate::store::{Result, Storer};

/// Rows deleted per statement: small enough that one batch holds the write lock briefly.
pub const DELETE_BATCH: u32 = 500;

/// What one sweep did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Swept {
    pub expired: u64,
    pub deleted: u64,
}

/// One pass: expire what is overdue, then delete what ended more than `retention` ago.
pub fn sweep_once(store: &dyn Storer, now: Millis, retention: Duration) -> Result<Swept> {
    let expired = store.expire_overdue(now)?;
    let cutoff = now.saturating_sub(millis(retention));
    let mut deleted = 0;
    loop {
        let n = store.delete_ended_before(cutoff, DELETE_BATCH)?;
        deleted += n;
        if n < u64::from(DELETE_BATCH) {
            return Ok(Swept { expired, deleted });
        }
    }
}

/// Sweeps every `settings.sweep_every` until `stop`'s sender is dropped.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<()>) {
    let mut every = tokio::time::interval(app.settings.sweep_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let app = Arc::clone(&app);
        let swept = tokio::task::spawn_blocking(move || {
            sweep_once(app.store.as_ref(), app.clock.now(), app.settings.retention)
        })
        .await;
        match swept {
            Ok(Ok(swept)) if swept != Swept::default() => {
                tracing::info!(swept.expired, swept.deleted, "sweep");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "sweep failed"),
            Err(e) => tracing::error!(error = %e, "sweep panicked"),
        }
    }
}
