//! PostgreSQL's numbered migrations. Each applied version is a row of `schema_version`.

use postgres::Client;
use postgres::types::Type;

use crate::store::{Migration, Result, StoreError, migrations, migrations_after};

pub const MIGRATIONS: &[Migration] = migrations![
    1 "001_tables",
    2 "002_requests_by_status",
    3 "003_renewed_at_and_notify",
    4 "004_catalog",
    5 "005_token_ids",
    6 "006_stored_requests",
    7 "007_request_kinds",
];

/// Any key, the same for every instance: the advisory lock that makes instances starting
/// together on one database take turns.
const MIGRATION_LOCK: i64 = 0x6d6f_6465_6c72;

/// Applies what the database still needs, all in one transaction under the lock: a failed
/// step leaves the database as it was. Every statement goes unnamed (`query_typed`, or the
/// simple protocol), so that it works behind a transaction pooler too: a named statement's
/// closing can reach the server after the commit, on a session the proxy lent to another.
pub fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.query_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&MIGRATION_LOCK, Type::INT8)],
    )?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: Option<i64> = tx
        .query_typed_one("SELECT max(version) FROM schema_version", &[])?
        .try_get(0)?;
    for m in migrations_after(MIGRATIONS, found.unwrap_or(0))? {
        tx.batch_execute(m.sql)
            .and_then(|()| {
                tx.query_typed(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[(&m.version, Type::INT8)],
                )
            })
            .map_err(|e| StoreError::Migration {
                name: m.name,
                source: Box::new(e.into()),
            })?;
    }
    tx.commit()?;
    Ok(())
}
