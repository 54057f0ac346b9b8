//! SQLite's numbered migrations. The version applied is the file's `user_version`.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{Migration, Result, StoreError, migrations, migrations_after};

pub const MIGRATIONS: &[Migration] = migrations![
    1 "001_tables",
    2 "002_requests_by_status",
    3 "003_renewed_at",
    4 "004_catalog",
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/sqlite/migration/main");
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
