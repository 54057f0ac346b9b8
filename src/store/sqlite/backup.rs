//! `model-relay backup`: a copy of a live SQLite database through SQLite's online backup
//! API, taken while `serve` processes keep reading and writing it.
//!
//! The copy is one snapshot. The source connection opens a read transaction before the
//! first page is copied and keeps it until the last: in WAL mode a reader holds off no
//! writer, and the snapshot it pins does not move, so the copy is consistent. Without it,
//! SQLite restarts a backup from the first page whenever another connection writes
//! between two steps, and under a steady stream of writes the copy would never end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::create_new_private;

/// Pages copied per step (4 MiB at SQLite's default 4 KiB page). Each step is one call
/// into SQLite; between steps the destination file is left alone and progress can show.
const PAGES_PER_STEP: i32 = 1024;

/// The longest the copy waits for a lock (the source's WAL recovery by another process,
/// say) before it gives up: the store's own default wait.
const LOCK_WAIT: Duration = super::DEFAULT_WAIT;

/// Why a backup was not made. Its own type, not `StoreError`: these are answers for the
/// person at the command line, and none of them means the service is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no database file at {}", .0.display())]
    NoSource(PathBuf),
    #[error(
        "{} already exists: a backup never overwrites a file; remove it or choose another name",
        .0.display()
    )]
    TargetExists(PathBuf),
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
    #[error("the database stayed locked for {0:?}; try again")]
    Locked(Duration),
    #[error("the copy is not sound: {0}")]
    BadCopy(String),
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// What a backup wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Pages in the copy.
    pub pages: u64,
    /// Size of the copy in bytes.
    pub bytes: u64,
}

/// Copies the SQLite database at `source` into a new file `target`, created readable and
/// writable by its owner only. `target` must not exist: a backup never overwrites a file.
/// The copy is a complete database in one file (what the write-ahead log held is in it,
/// and it has no `-wal` of its own); it is checked with `PRAGMA integrity_check` before
/// this answers. On failure, a `target` this call created is removed.
pub fn backup(source: &Path, target: &Path) -> Result<Copied> {
    backup_in_steps(source, target, PAGES_PER_STEP, &mut || {})
}

/// [`backup`], `pages_per_step` pages at a time, calling `between_steps` after each step
/// that left pages to copy (tests write to the source there).
fn backup_in_steps(
    source: &Path,
    target: &Path,
    pages_per_step: i32,
    between_steps: &mut dyn FnMut(),
) -> Result<Copied> {
    if !source.is_file() {
        return Err(BackupError::NoSource(source.to_owned()));
    }
    // Read-only, and never created: a backup must not change, or make, the live database.
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    from.busy_timeout(LOCK_WAIT)?;
    // The snapshot (see the module's comment). A deferred transaction takes it at its first
    // read; this read also refuses a file that is not a database before a copy is made.
    from.execute_batch("BEGIN DEFERRED")?;
    from.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;

    create_new_private(target).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            BackupError::TargetExists(target.to_owned())
        } else {
            BackupError::Create(target.to_owned(), e)
        }
    })?;
    match copy_into(&from, target, pages_per_step, between_steps) {
        Ok(copied) => Ok(copied),
        Err(e) => {
            // The file is this call's own (it was created new above): a partial copy must
            // not be mistaken for a backup. The rollback journal goes with it.
            let _ = std::fs::remove_file(target);
            let mut journal = target.as_os_str().to_owned();
            journal.push("-journal");
            let _ = std::fs::remove_file(journal);
            Err(e)
        }
    }
}

fn copy_into(
    from: &Connection,
    target: &Path,
    pages_per_step: i32,
    between_steps: &mut dyn FnMut(),
) -> Result<Copied> {
    let mut to = Connection::open_with_flags(
        target,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    {
        let backup = Backup::new(from, &mut to)?;
        let mut waiting_since: Option<Instant> = None;
        loop {
            match backup.step(pages_per_step)? {
                StepResult::Done => break,
                StepResult::More => {
                    waiting_since = None;
                    between_steps();
                }
                // Busy or Locked: not expected while the snapshot is held, but SQLite allows
                // them. Wait and try again, within the store's usual bound.
                _ => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > LOCK_WAIT {
                        return Err(BackupError::Locked(LOCK_WAIT));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    // The source's header says WAL, and the copy took it. Rollback mode makes the copy one
    // self-contained file that opens anywhere, read-only media included; `serve` sets WAL
    // again when it opens it.
    let mode: String =
        to.pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(BackupError::BadCopy(format!(
            "its journal_mode is {mode}, not delete"
        )));
    }
    let check: String = to.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    if check != "ok" {
        return Err(BackupError::BadCopy(format!("integrity_check: {check}")));
    }
    let pages: i64 = to.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    let page_size: i64 = to.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    to.close().map_err(|(_, e)| e)?;
    // SQLite never answers a negative count or size.
    let pages = u64::try_from(pages).unwrap_or_default();
    Ok(Copied {
        pages,
        bytes: pages * u64::try_from(page_size).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::Connection;

    use super::{BackupError, backup, backup_in_steps};

    /// A WAL database with `rows` rows of about 1 KiB each in table `t`.
    fn wal_database(path: &Path, rows: i64) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB)")
            .unwrap();
        for _ in 0..rows {
            insert(&conn);
        }
        conn
    }

    fn insert(conn: &Connection) {
        conn.execute("INSERT INTO t (pad) VALUES (zeroblob(1000))", [])
            .unwrap();
    }

    fn count(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_copy_in_steps_ends_and_is_the_snapshot_from_before_its_first_step() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("live.db"), dir.path().join("copy.db"));
        // Rows of 1 KiB on 4 KiB pages: about 100 pages, so about 100 steps of one page.
        let writer = wal_database(&source, 400);
        let mut steps = 0;
        // Another connection writes after every step, as a serving process would. Were the
        // snapshot not held, each write would send the copy back to its first page and it
        // would never end: the writes stop after 10,000 steps so such a failure shows as
        // a count, not a hang.
        let copied = backup_in_steps(&source, &target, 1, &mut || {
            steps += 1;
            if steps < 10_000 {
                insert(&writer);
            }
        })
        .unwrap();
        assert!(
            u64::try_from(steps).unwrap() < copied.pages,
            "{steps} steps for {} pages",
            copied.pages
        );
        assert_eq!(count(&target), 400);
        assert_eq!(count(&source), 400 + steps);
    }

    #[test]
    fn the_copy_is_one_private_file_and_an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("live.db"), dir.path().join("copy.db"));
        let _writer = wal_database(&source, 10);
        backup(&source, &target).unwrap();
        assert_eq!(count(&target), 10);
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut side = target.as_os_str().to_owned();
            side.push(suffix);
            assert!(!Path::new(&side).exists(), "{suffix} left beside the copy");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::read(&target).unwrap();
        let again = backup(&source, &target).unwrap_err();
        assert!(
            matches!(&again, BackupError::TargetExists(path) if *path == target),
            "{again}"
        );
        assert!(again.to_string().contains("never overwrites"), "{again}");
        assert_eq!(std::fs::read(&target).unwrap(), before);
    }

    #[test]
    fn a_missing_source_or_one_that_is_not_a_database_leaves_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("copy.db");
        let missing = backup(&dir.path().join("missing.db"), &target).unwrap_err();
        assert!(
            missing.to_string().contains("no database file"),
            "{missing}"
        );
        assert!(!dir.path().join("missing.db").exists());
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a database, not at all; just some words here").unwrap();
        let not_a_database = backup(&text, &target).unwrap_err();
        assert!(
            matches!(not_a_database, BackupError::Sqlite(_)),
            "{not_a_database}"
        );
        assert!(!target.exists());
    }
}
