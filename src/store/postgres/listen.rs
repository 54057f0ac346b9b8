//! How a PostgreSQL instance learns of changes made by any instance: `LISTEN model_relay`
//! on a connection of its own, outside the pool. The triggers of `migration 003` send one
//! notification per new pending request and per status change, on commit.
//!
//! The synchronous client delivers notifications only while it is polled, so [`wait`]
//! blocks on the connection (on the instance's wake-up thread, never an async worker). A
//! connection that dies is reported as an error; the instance then opens a new listener
//! and re-checks every waiter, since notifications sent meanwhile are lost.
//!
//! [`wait`]: Listener::wait

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls, Notification};

use super::super::{Change, Listener, Result, StoreError};
use crate::ids::{RequestId, RuntimeId};

/// The channel the triggers notify on.
const CHANNEL: &str = "model_relay";
/// An idle listening connection sends nothing, so a server that vanished without closing
/// it would never be noticed; a trivial query this often finds out (the connection's
/// `tcp_user_timeout` bounds how long that takes).
const PING_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Notifications {
    client: Client,
    last_ping: Instant,
}

impl Notifications {
    pub(super) fn open(config: &postgres::Config) -> Result<Self> {
        let mut client = config.connect(NoTls)?;
        client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        Ok(Notifications {
            client,
            last_ping: Instant::now(),
        })
    }
}

/// A notification's payload, as `migration 003` writes it. Anything else on the channel
/// (another release, a person with psql) is taken as "something changed".
fn parse(notification: &Notification) -> Change {
    let payload = notification.payload();
    if let Some(runtime) = payload.strip_prefix("pending ")
        && let Some(runtime) = RuntimeId::parse(runtime)
    {
        return Change::Pending(runtime);
    }
    if let Some(id) = payload.strip_prefix("status ")
        && let Some(id) = RequestId::parse(id)
    {
        return Change::Status(id);
    }
    Change::Unknown
}

impl Listener for Notifications {
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Change>> {
        if self.last_ping.elapsed() >= PING_EVERY {
            self.client.batch_execute("")?;
            self.last_ping = Instant::now();
        }
        let mut changes = Vec::new();
        let first = self.client.notifications().timeout_iter(timeout).next()?;
        if let Some(first) = first {
            changes.push(parse(&first));
            // Whatever else has arrived already, without waiting again.
            let mut notifications = self.client.notifications();
            let mut more = notifications.iter();
            while let Some(next) = more.next()? {
                changes.push(parse(&next));
            }
        }
        // The iterators end the same way on a timeout and on a closed connection.
        if self.client.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(changes)
    }
}
