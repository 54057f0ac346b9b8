//! SQLite's numbered migrations. The version applied is the file's `user_version`.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{Migration, Result, StoreError, migrations, migrations_after};

pub const MIGRATIONS: &[Migration] = migrations![
    1 "001_tables",
    2 "002_requests_by_status",
    3 "003_renewed_at",
    4 "004_catalog",
    5 "005_token_ids",
    6 "006_stored_requests",
    7 "007_request_kinds",
];

/// Applies what the file still needs, all in one `BEGIN IMMEDIATE` transaction: processes
/// starting together on one file take turns, and a failed step leaves the file as it was.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for m in migrations_after(MIGRATIONS, found)? {
        tx.execute_batch(m.sql)
            .and_then(|()| tx.pragma_update(None, "user_version", m.version))
            .map_err(|e| StoreError::Migration {
                name: m.name,
                source: Box::new(e.into()),
            })?;
    }
    tx.commit()?;
    Ok(())
}
