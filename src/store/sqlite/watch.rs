//! How an SQLite instance learns that another connection — of this process or of another
//! one sharing the file — committed a change: `PRAGMA data_version` on a connection of its
//! own. SQLite changes the value it answers whenever a commit by any other connection has
//! reached the file since the last time this connection asked; the pragma reads the
//! write-ahead log's shared index and touches no table, so polling it is cheap.
//!
//! It cannot say what changed, so every change is [`Change::Unknown`]: the instance then
//! re-checks its waiting calls with one query. The alternative, a table of notifications
//! that every writing transaction appends to and each instance reads by id (River's SQLite
//! driver), says what changed but adds a write to every transaction and a table to prune;
//! see BENCHMARKS.md for the idle cost of both.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::super::{Change, Listener, Result};

/// How often the data version is read. A change is seen at most this late; each read
/// costs a few microseconds.
pub(super) const POLL: Duration = Duration::from_millis(5);

pub(super) struct DataVersion {
    conn: Connection,
    /// The value last read: a different one means another connection committed.
    seen: i64,
}

impl DataVersion {
    pub(super) fn open(path: &Path) -> Result<Self> {
        // Read-only and outside the pools: it never writes, so it never waits for the lock,
        // and its own commits (there are none) could not hide anyone else's.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let seen = read(&conn)?;
        Ok(DataVersion { conn, seen })
    }
}

fn read(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |row| row.get(0))?)
}

impl Listener for DataVersion {
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Change>> {
        let until = Instant::now() + timeout;
        loop {
            let now = read(&self.conn)?;
            if now != self.seen {
                self.seen = now;
                return Ok(vec![Change::Unknown]);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            thread::sleep(left.min(POLL));
        }
    }
}
