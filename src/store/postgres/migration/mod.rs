//! PostgreSQL's numbered migrations. Each applied version is a row of `schema_version`.

use postgres::Client;

use crate::store::{Migration, Result, StoreError, migrations, migrations_after};

pub const MIGRATIONS: &[Migration] = migrations![
    1 "001_tables",
    2 "002_requests_by_status",
    3 "003_renewed_at_and_notify",
    4 "004_catalog",
];

/// Any key, the same for every instance: the advisory lock that makes instances starting
/// together on one database take turns.
const MIGRATION_LOCK: i64 = 0x6d6f_6465_6c72;

/// Applies what the database still needs, all in one transaction under the lock: a failed
/// step leaves the database as it was.
pub fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: Option<i64> = tx
        .query_one("SELECT max(version) FROM schema_version", &[])?
        .try_get(0)?;
    for m in migrations_after(MIGRATIONS, found.unwrap_or(0))? {
        tx.batch_execute(m.sql)
            .and_then(|()| {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&m.version],
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::MIGRATIONS;
    use crate::store::SCHEMA_VERSION;

    /// `migrations_after` skips by version, so a gap or a step out of order would be
    /// skipped or applied out of turn; and the last one must be the version this build
    /// records.
    #[test]
    fn versions_run_from_one_to_schema_version_in_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        for m in MIGRATIONS {
            assert!(
                m.name.starts_with(&format!("{:03}_", m.version)),
                "{} is listed as version {}",
                m.name,
                m.version
            );
        }
    }

    /// A migration file added to `main/` but not listed would never run: every database
    /// would silently lack it.
    #[test]
    fn every_sql_file_in_main_is_listed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/postgres/migration/main");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        listed.sort_unstable();
        assert_eq!(files, listed, "the .sql files of {}", dir.display());
    }
}
