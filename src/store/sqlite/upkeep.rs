//! The SQLite statements behind the sweeper and the metrics: batched expiry and deletion,
//! counts per status, and the checkpoint that keeps the write-ahead log small.
//!
//! Each batch is one transaction, so the write lock is held for one batch at a time and
//! other writers get their turn between batches.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};

use super::super::{
    Active, Expired, RequestCounts, Result, StoreError, request_id_from_db, runtime_id_from_db,
    status_from_db,
};
use crate::clock::Millis;
use crate::kind::Kind;
use crate::model::{Status, Timeouts};

/// How long a checkpoint waits for writers to finish and readers to leave the log. It holds
/// the write lock while it waits for readers, so it must give up long before a writer's
/// `busy_timeout` runs out; what it could not do, the next sweep does.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(200);

/// The most free pages one housekeeping pass gives back (8 MiB of 4 KiB pages): every
/// `--sweep-every`, so a file that lost a gigabyte shrinks within a couple of minutes.
const VACUUM_STEP: u32 = 2048;

/// Every active request: a range of `requests_by_status` per status, for the instance's
/// re-check of its waiting calls.
pub(super) fn active_requests(conn: &Connection) -> Result<Vec<Active>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, runtime_id, status, deadline_at FROM requests
          WHERE status IN ('pending', 'running')",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, Millis>(3)?,
        ))
    })?;
    rows.map(|row| {
        let (id, runtime_id, status, deadline_at) = row?;
        Ok(Active {
            id: request_id_from_db(&id)?,
            runtime_id: runtime_id_from_db(&runtime_id)?,
            status: status_from_db(&status)?,
            deadline_at,
        })
    })
    .collect()
}

/// Expires up to `limit` overdue requests of `kind`, pending ones first, then running
/// ones; each phase in deadline order along `requests_by_status`.
pub(super) fn expire_overdue(
    conn: &Connection,
    kind: Kind,
    timeouts: &Timeouts,
    now: Millis,
    limit: u32,
) -> Result<Expired> {
    let mut expired = Expired::default();
    for phase in [Status::Pending, Status::Running] {
        let left =
            i64::from(limit).saturating_sub(i64::try_from(expired.total()).unwrap_or(i64::MAX));
        if left <= 0 {
            break;
        }
        // The outer conditions repeat the inner ones: the row count of this compare-and-set
        // is what was ended, whatever else ran.
        let n = conn
            .prepare_cached(
                "UPDATE requests
                    SET status = 'timeout', error = ?4,
                        updated_at = deadline_at, ended_at = deadline_at
                  WHERE id IN (SELECT id FROM requests
                                WHERE status = ?1 AND deadline_at <= ?2 AND kind = ?5
                                ORDER BY deadline_at LIMIT ?3)
                    AND status = ?1 AND deadline_at <= ?2 AND kind = ?5",
            )?
            .execute(params![
                phase.as_str(),
                now,
                left,
                kind.timeout_error(timeouts, phase),
                kind.name()
            ])?;
        expired = expired.plus(phase, n as u64);
    }
    Ok(expired)
}

/// One batch, and the counts of stored requests it lowers, in one transaction.
pub(super) fn delete_ended_before(
    conn: &mut Connection,
    kind: Kind,
    cutoff: Millis,
    limit: u32,
) -> Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut gone: HashMap<String, i64> = HashMap::new();
    {
        let mut delete = tx.prepare_cached(
            "DELETE FROM requests WHERE id IN
               (SELECT id FROM requests WHERE kind = ?3 AND ended_at < ?1
                 ORDER BY ended_at LIMIT ?2)
             RETURNING runtime_id",
        )?;
        let mut rows = delete.query(params![cutoff, limit, kind.name()])?;
        while let Some(row) = rows.next()? {
            *gone.entry(row.get(0)?).or_default() += 1;
        }
    }
    for (runtime, n) in &gone {
        super::count_stored(&tx, runtime, -n)?;
    }
    tx.commit()?;
    Ok(gone.values().map(|&n| n as u64).sum())
}

/// One statement, so one snapshot. Each count is a range of `requests_by_status` (a
/// covering index: the table is not read), and the oldest pending request comes from the
/// partial index of pending requests, which holds at most one row per runtime.
const COUNT_REQUESTS: &str = "SELECT
    (SELECT COUNT(*) FROM requests WHERE status = 'pending'),
    (SELECT COUNT(*) FROM requests WHERE status = 'running'),
    (SELECT COUNT(*) FROM requests WHERE status = 'completed'),
    (SELECT COUNT(*) FROM requests WHERE status = 'failed'),
    (SELECT COUNT(*) FROM requests WHERE status = 'timeout'),
    (SELECT MIN(created_at) FROM requests WHERE status = 'pending')";

pub(super) fn count_requests(conn: &Connection) -> Result<RequestCounts> {
    let raw: ([i64; 5], Option<Millis>) =
        conn.prepare_cached(COUNT_REQUESTS)?.query_row([], |row| {
            Ok((
                [
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ],
                row.get(5)?,
            ))
        })?;
    let count = |i: usize| {
        u64::try_from(raw.0[i]).map_err(|_| StoreError::Corrupt(format!("count {}", raw.0[i])))
    };
    Ok(RequestCounts {
        pending: count(0)?,
        running: count(1)?,
        completed: count(2)?,
        failed: count(3)?,
        timeout: count(4)?,
        oldest_pending_created_at: raw.1,
    })
}

/// Copies the log into the database and truncates it to zero bytes.
///
/// SQLite checkpoints on its own after every 1000 pages written, but that checkpoint never
/// waits: under a steady load some reader is always on the log, it can never start over
/// from the beginning, and the file grows. TRUNCATE waits (briefly) for those readers.
///
/// A connection of its own, so that the short wait applies to this statement only.
pub(super) fn checkpoint(path: &Path) -> Result<()> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(CHECKPOINT_WAIT)?;
    // The pages the sweeper's deletions freed go back to the file system, a bounded number
    // per pass: moving pages holds the write lock, and a pass must not hold it long. The
    // checkpoint below then copies the shorter file home and truncates it.
    // The pragma gives back one page per step of its statement: step it to the end. Busy:
    // writers kept the lock for the whole wait; the next pass gives the pages back.
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP})"))?;
    let mut steps = stmt.query([])?;
    loop {
        match steps.next() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(steps);
    drop(stmt);
    // Answers (busy, log pages, checkpointed pages). Busy means readers or writers kept it
    // from finishing within the wait; the next sweep tries again, so it is no error.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRequest;
    use crate::store::sqlite::SqliteStore;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map([], |row| row.get::<_, String>(3)).unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    }

    /// "Never a full-table scan per scrape": SQLite's own plan for the counts reads
    /// indexes only.
    #[test]
    fn counting_requests_reads_indexes_not_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        SqliteStore::open(&path, Timeouts::default()).unwrap();
        let conn = Connection::open(&path).unwrap();
        let plan = plan(&conn, COUNT_REQUESTS);
        assert!(
            !plan.lines().any(|step| step.trim() == "SCAN requests"),
            "{plan}"
        );
        assert_eq!(
            plan.matches("USING COVERING INDEX requests_by_status (status=?)")
                .count(),
            5,
            "{plan}"
        );
    }

    #[test]
    fn a_checkpoint_truncates_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path, Timeouts::default()).unwrap();
        let wal = dir.path().join("relay.db-wal");
        {
            let conn = store.conn().unwrap();
            conn.execute_batch("CREATE TABLE filler (x BLOB)").unwrap();
            for _ in 0..200 {
                conn.execute("INSERT INTO filler VALUES (randomblob(4096))", [])
                    .unwrap();
            }
        }
        let before = std::fs::metadata(&wal).unwrap().len();
        assert!(before > 200 * 4096, "the log holds the writes: {before}");
        crate::store::Storer::checkpoint(&store).unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        assert_eq!(
            store
                .conn()
                .unwrap()
                .query_row("SELECT COUNT(*) FROM filler", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            200,
            "and the data is in the database"
        );
    }

    /// Retention deletes rows; the file must give their space back, not keep it for ever
    /// (it did: `auto_vacuum` was off, and a file that grew to 1.27 GB stayed 1.18 GB).
    #[test]
    fn the_file_shrinks_after_retention_deletes_its_rows() {
        use crate::ids::{RequestId, RuntimeId, Token, WorkspaceId};
        use crate::model::{ModelEntry, Outcome, Report};
        use crate::store::{NewRuntime, Storer};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path, Timeouts::default()).unwrap();
        let workspace = WorkspaceId::random().unwrap();
        let api = Token::new_api().unwrap().hash();
        store.create_workspace(workspace, "ws", &api, 0).unwrap();
        let runtime = RuntimeId::random().unwrap();
        let new = NewRuntime {
            id: runtime,
            workspace_id: workspace,
            name: "laptop".into(),
            provider: "claude".into(),
            daemon_token: Token::new_daemon().unwrap().hash(),
        };
        store.create_runtime(&new, 0).unwrap();
        let big = Report::Ended(Outcome {
            result: None,
            status: Status::Completed,
            models: vec![ModelEntry {
                id: "m".into(),
                label: "x".repeat(60_000),
                ..Default::default()
            }],
            supported: true,
            error: None,
            fallback: false,
        });
        for now in 1..=300 {
            let id = RequestId::random().unwrap();
            store
                .create_or_coalesce(runtime, &NewRequest::of(Kind::Models, id), now)
                .unwrap();
            store
                .claim_next_pending(runtime, Kind::Models, now)
                .unwrap();
            assert!(
                store
                    .apply_report(runtime, Kind::Models, id, &big, now)
                    .unwrap()
            );
        }
        store.checkpoint().unwrap();
        let full = std::fs::metadata(&path).unwrap().len();
        assert!(full > 300 * 60_000, "the rows are in the file: {full}");

        let retention = Duration::from_secs(600);
        crate::sweeper::sweep_once(&store, 1_000_000, retention).unwrap();
        let free_pages = || -> i64 {
            let conn = store.conn().unwrap();
            conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap()
        };
        // Each pass gives back a bounded number of pages; a few passes give back all.
        for _ in 0..20 {
            if free_pages() == 0 {
                break;
            }
            store.checkpoint().unwrap();
        }
        assert_eq!(free_pages(), 0);
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(after < full / 10, "{full} bytes, then {after}");
    }
}
