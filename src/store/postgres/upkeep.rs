//! The PostgreSQL statements behind the sweeper and the metrics: batched expiry and
//! deletion, and counts per status.
//!
//! The batches lock their rows with `FOR UPDATE SKIP LOCKED`: sweepers of several instances
//! share the work instead of queueing behind each other, and no row is ended or deleted
//! twice.

use super::cached::CachedClient;

use super::super::{
    Active, Expired, RequestCounts, Result, StoreError, request_id_from_db, runtime_id_from_db,
    status_from_db,
};
use crate::clock::Millis;
use crate::kind::Kind;
use crate::model::{Status, Timeouts};

/// Expires up to `limit` overdue requests of `kind`, pending ones first, then running
/// ones; each phase in deadline order along `requests_by_status`.
pub(super) fn expire_overdue(
    client: &mut CachedClient,
    kind: Kind,
    timeouts: &Timeouts,
    now: Millis,
    limit: u32,
) -> Result<Expired> {
    let mut expired = Expired::default();
    for phase in [Status::Pending, Status::Running] {
        let left = u64::from(limit).saturating_sub(expired.total());
        if left == 0 {
            break;
        }
        // The outer conditions repeat the inner ones: the row count of this compare-and-set
        // is what was ended, whatever else ran.
        let n = client.execute(
            "UPDATE requests
                SET status = 'timeout', error = $4, updated_at = deadline_at, ended_at = deadline_at
              WHERE id = ANY(ARRAY(
                      SELECT id FROM requests
                       WHERE status = $1 AND deadline_at <= $2 AND kind = $5
                       ORDER BY deadline_at LIMIT $3 FOR UPDATE SKIP LOCKED))
                AND status = $1 AND deadline_at <= $2 AND kind = $5",
            &[
                &phase.as_str(),
                &now,
                &i64::try_from(left).unwrap_or(i64::MAX),
                &kind.timeout_error(timeouts, phase),
                &kind.name(),
            ],
        )?;
        expired = expired.plus(phase, n);
    }
    Ok(expired)
}

pub(super) fn delete_ended_before(
    client: &mut CachedClient,
    kind: Kind,
    cutoff: Millis,
    limit: u32,
) -> Result<u64> {
    let mut tx = client.transaction()?;
    let batch = tx.query(
        "SELECT r.id, t.workspace_id FROM requests r JOIN runtimes t ON t.id = r.runtime_id
          WHERE r.kind = $3 AND r.ended_at < $1 ORDER BY r.ended_at LIMIT $2",
        &[&cutoff, &i64::from(limit), &kind.name()],
    )?;
    let mut ids = Vec::with_capacity(batch.len());
    let mut workspaces = Vec::new();
    for row in &batch {
        ids.push(row.try_get::<_, String>(0)?);
        workspaces.push(row.try_get::<_, String>(1)?);
    }
    if ids.is_empty() {
        return Ok(0);
    }
    workspaces.sort_unstable();
    workspaces.dedup();
    // The workspaces' rows first, in the order of their ids (see `ROOM` in the engine's
    // module); then a statement of its own, under the locks: it deletes what another
    // instance's sweeper has not, and counts exactly that.
    tx.execute(
        "SELECT 1 FROM workspaces WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&workspaces],
    )?;
    let deleted = tx.query(
        "WITH gone AS (DELETE FROM requests r USING runtimes t
                        WHERE r.id = ANY($1) AND r.ended_at < $2 AND t.id = r.runtime_id
                       RETURNING t.workspace_id),
              per AS (SELECT workspace_id, count(*) AS n FROM gone GROUP BY workspace_id),
              counted AS (UPDATE workspaces w SET stored_requests = w.stored_requests - per.n
                            FROM per WHERE w.id = per.workspace_id)
         SELECT coalesce(sum(n), 0)::bigint FROM per",
        &[&ids, &cutoff],
    )?;
    tx.commit()?;
    match deleted.first() {
        Some(row) => count_from_db(row.try_get(0)?),
        None => Err(StoreError::Corrupt("a sum with no row".to_owned())),
    }
}

/// One statement, so one snapshot; each count is a range of `requests_by_status`, and the
/// oldest pending request comes from the partial index of pending requests.
/// Every active request, for the instance's re-check of its waiting calls.
pub(super) fn active_requests(client: &mut CachedClient) -> Result<Vec<Active>> {
    let rows = client.query(
        "SELECT id, runtime_id, status, deadline_at FROM requests
          WHERE status IN ('pending', 'running')",
        &[],
    )?;
    rows.iter()
        .map(|row| {
            Ok(Active {
                id: request_id_from_db(row.try_get(0)?)?,
                runtime_id: runtime_id_from_db(row.try_get(1)?)?,
                status: status_from_db(row.try_get(2)?)?,
                deadline_at: row.try_get(3)?,
            })
        })
        .collect()
}

pub(super) fn count_requests(client: &mut CachedClient) -> Result<RequestCounts> {
    let row = client.query_one(
        "SELECT
            (SELECT count(*) FROM requests WHERE status = 'pending'),
            (SELECT count(*) FROM requests WHERE status = 'running'),
            (SELECT count(*) FROM requests WHERE status = 'completed'),
            (SELECT count(*) FROM requests WHERE status = 'failed'),
            (SELECT count(*) FROM requests WHERE status = 'timeout'),
            (SELECT min(created_at) FROM requests WHERE status = 'pending')",
        &[],
    )?;
    Ok(RequestCounts {
        pending: count_from_db(row.try_get(0)?)?,
        running: count_from_db(row.try_get(1)?)?,
        completed: count_from_db(row.try_get(2)?)?,
        failed: count_from_db(row.try_get(3)?)?,
        timeout: count_from_db(row.try_get(4)?)?,
        oldest_pending_created_at: row.try_get(5)?,
    })
}

/// `count(*)` is a `bigint`; a negative one would be a broken server.
pub(super) fn count_from_db(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a count of {n}")))
}
