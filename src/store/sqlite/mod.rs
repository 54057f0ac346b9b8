//! The SQLite engine: the embedded default. One file, WAL mode, any number of processes.
//!
//! Writers serialize on SQLite's one write lock. Every write of more than one statement runs
//! in `BEGIN IMMEDIATE`, which takes that lock up front: a deferred transaction that reads
//! first and upgrades later can fail with `SQLITE_BUSY` without waiting, and a read-then-write
//! without the lock is how a concurrent change gets lost. `busy_timeout` makes a writer wait
//! for the lock instead of failing at once.
//!
//! The sweeper's statements and the WAL checkpoint live in [`upkeep`].

mod backup;
pub mod migration;
mod rows;
mod upkeep;
mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub use self::backup::{BackupError, Copied, backup};
use self::rows::{RUNTIME_COLUMNS, RawRequest, RawRuntime};

use super::{
    API_TOKEN_USE_REFRESH, Active, Added, ApiToken, ApiTokenUse, Ask, Claim, Created, DEFAULT_WAIT,
    Daemon, Expired, Listener, NewRequest, NewRuntime, RequestCounts, Result, RuntimeCursor,
    Scoped, StoreError, Storer, Workspace, daemon_lists_from_db, models_to_db, request_id_from_db,
    runtime_id_from_db, status_from_db, token_id_from_db, workspace_id_from_db,
};
use crate::clock::Millis;
use crate::ids::{RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use crate::kind::{Kind, PerKind};
use crate::model::{CatalogChange, Outcome, Report, Runtime, Status, StoredRequest, Timeouts};

/// Connections for writers. SQLite takes one writer at a time; a writer that finds the
/// lock taken sleeps in the busy handler (1, 2, 5, 10 … ms) however soon it frees, so more
/// writers waiting there only lengthen the tail. With 4 rather than 8, full cycles under 16
/// callers kept their rate (2,532–2,786/s against 2,338–2,510/s, three runs each) and their
/// p99 halved (26–28 ms against 57–62 ms); the others wait for a connection, within `wait`.
const WRITERS: u32 = 4;
/// Connections for the read-only primitives, which wait for no lock.
const READERS: u32 = 8;
/// After a checkpoint resets the write-ahead log, the file is cut back to this size. Twice
/// what SQLite's automatic checkpoint lets it grow to (1000 pages of 4 KiB), so the file is
/// not cut and regrown on every reset.
const JOURNAL_SIZE_LIMIT: i64 = 8 * 1024 * 1024;

/// `synchronous` setting: NORMAL is durable against a crash of the process and, in WAL mode,
/// keeps the database consistent after power loss; FULL also keeps the last commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

impl Synchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// How an SQLite store is opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Options {
    pub synchronous: Synchronous,
    /// How long a call waits for a pooled connection, and a writer for the write lock
    /// (`busy_timeout`), before the store reports itself unavailable.
    pub wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            synchronous: Synchronous::default(),
            wait: DEFAULT_WAIT,
        }
    }
}

pub struct SqliteStore {
    /// Connections for everything that may write.
    pool: r2d2::Pool<SqliteConnectionManager>,
    /// Connections for the read-only primitives, which run on the HTTP layer's async
    /// workers ([`Storer::reads_in_place`]): apart from the writers' pool, so that a read
    /// never waits for a connection that a writer holds while it queues for the lock.
    readers: r2d2::Pool<SqliteConnectionManager>,
    timeouts: PerKind<Timeouts>,
    /// The file, for the checkpoint's connection of its own.
    path: PathBuf,
}

const REQUEST_COLUMNS: &str = "id, runtime_id, status, models, supported, error, created_at, updated_at, deadline_at, ended_at, fallback, cached_at, refresh_id, kind, coalesce_key, input, result";

impl SqliteStore {
    pub fn open(path: &Path, timeouts: impl Into<PerKind<Timeouts>>) -> Result<Self> {
        Self::open_with(path, timeouts, Options::default())
    }

    pub fn open_with(
        path: &Path,
        timeouts: impl Into<PerKind<Timeouts>>,
        options: Options,
    ) -> Result<Self> {
        let timeouts = timeouts.into();
        let Options { synchronous, wait } = options;
        create_private(path)?;
        // WAL is a property of the file: set it once, on one connection, before the pool
        // opens more. `journal_mode` answers with a row, so it is read, not executed.
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(wait)?;
        incremental_auto_vacuum(&conn)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "journal_mode is {mode}, WAL could not be set"
            )));
        }
        migration::migrate(&mut conn)?;
        drop(conn);

        let manager = || {
            SqliteConnectionManager::file(path).with_init(move |c| {
                c.busy_timeout(wait)?;
                c.pragma_update(None, "foreign_keys", "ON")?;
                c.pragma_update(None, "synchronous", synchronous.pragma_value())?;
                // Per connection: whichever connection resets the log cuts the file back.
                c.pragma_update_and_check(
                    None,
                    "journal_size_limit",
                    JOURNAL_SIZE_LIMIT,
                    |_| Ok(()),
                )
            })
        };
        let pool = |size| {
            r2d2::Pool::builder()
                .max_size(size)
                .min_idle(Some(1))
                .connection_timeout(wait)
                // A connection to a file does not go stale the way a socket does; the check
                // r2d2 would run on every checkout is a statement prepared and run for
                // nothing.
                .test_on_check_out(false)
                .build(manager())
        };
        let (pool, readers) = (pool(WRITERS)?, pool(READERS)?);
        Ok(SqliteStore {
            pool,
            readers,
            timeouts,
            path: path.to_owned(),
        })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        Ok(self.pool.get()?)
    }

    fn reader(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        Ok(self.readers.get()?)
    }
}

/// Creates the database file, if it is not there yet, readable and writable by its owner
/// only: it holds token hashes and every tenant's requests. SQLite gives the `-wal` and
/// `-shm` files it makes the database file's permissions.
fn create_private(path: &Path) -> Result<()> {
    match create_new_private(path) {
        Ok(()) => Ok(()),
        // There already (another process made it first, or an existing database): its
        // permissions are its owner's business.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates `path`, empty, readable and writable by its owner only (0600 on Unix); fails
/// with `AlreadyExists` when something is there.
fn create_new_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(drop)
}

/// What a recorded outcome does to its runtime's catalog, inside the report's transaction.
fn change_catalog(
    conn: &Connection,
    runtime: RuntimeId,
    outcome: &Outcome,
    now: Millis,
) -> Result<()> {
    match outcome.catalog() {
        CatalogChange::Keep => {}
        CatalogChange::Write => {
            conn.prepare_cached(
                "INSERT INTO catalogs (runtime_id, models, supported, reported_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (runtime_id) DO UPDATE
                    SET models = excluded.models, supported = excluded.supported,
                        reported_at = excluded.reported_at",
            )?
            .execute(params![
                runtime.to_string(),
                models_to_db(&outcome.models),
                outcome.supported,
                now
            ])?;
        }
        CatalogChange::Remove => {
            conn.prepare_cached("DELETE FROM catalogs WHERE runtime_id = ?1")?
                .execute([runtime.to_string()])?;
        }
    }
    Ok(())
}

/// Makes the file give back the pages its deletions free (in steps: see
/// `upkeep::checkpoint`): `auto_vacuum = INCREMENTAL`. A new file takes it with its first
/// table; a file made before (any release up to schema 4) is rebuilt once, by `VACUUM`,
/// which needs the write lock and time in proportion to the file's size.
fn incremental_auto_vacuum(conn: &Connection) -> Result<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", INCREMENTAL)?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
    if tables > 0 {
        tracing::info!("sqlite: rebuilding the file once so that it can give space back");
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// An answer from the runtime's catalog ($1) that can be handed out again: from this very
/// catalog (reported after $2: its time, models and `supported`), naming refresh $3, ended
/// at or after $4; the newest. One seek of `requests_by_runtime`.
const REUSABLE_ANSWER: &str = "FROM requests,
         (SELECT reported_at, models AS catalog_models, supported AS catalog_supported
            FROM catalogs WHERE runtime_id = ?1 AND reported_at > ?2) catalog
   WHERE runtime_id = ?1 AND cached_at = catalog.reported_at AND status = 'completed'
     AND kind = 'models'
     AND models = catalog_models AND supported = catalog_supported
     AND refresh_id IS ?3 AND ended_at >= ?4
   ORDER BY ended_at DESC LIMIT 1";

/// How many requests the runtime's workspace stores; `None` if the runtime does not exist.
fn stored_beside(conn: &Connection, runtime: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT w.stored_requests FROM runtimes t JOIN workspaces w ON w.id = t.workspace_id
              WHERE t.id = ?1",
        )?
        .query_row([runtime], |row| row.get(0))
        .optional()?)
}

/// Adds `n` to the count of stored requests of the runtime's workspace: in the transaction
/// of the insert or delete it counts.
fn count_stored(conn: &Connection, runtime: &str, n: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE workspaces SET stored_requests = stored_requests + ?2
          WHERE id = (SELECT workspace_id FROM runtimes WHERE id = ?1)",
    )?
    .execute(params![runtime, n])?;
    Ok(())
}

fn find_request_in(
    conn: &Connection,
    runtime: RuntimeId,
    id: RequestId,
) -> Result<Option<StoredRequest>> {
    conn.prepare_cached(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?1 AND runtime_id = ?2"
    ))?
    .query_row(
        params![id.to_string(), runtime.to_string()],
        RawRequest::from_row,
    )
    .optional()?
    .map(RawRequest::parse)
    .transpose()
}

/// Ends the request as `timeout` if it is still in `phase` and overdue; one compare-and-set.
/// Works on a pooled connection or inside a transaction. A terminal `phase` matches
/// nothing: terminal is final.
fn expire_in(
    conn: &Connection,
    timeouts: &PerKind<Timeouts>,
    id: &str,
    kind: Kind,
    phase: Status,
    now: Millis,
) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE requests
                SET status = 'timeout', error = ?4, updated_at = deadline_at, ended_at = deadline_at
              WHERE id = ?1 AND status = ?2 AND status IN ('pending', 'running')
                AND deadline_at <= ?3 AND kind = ?5",
        )?
        .execute(params![
            id,
            phase.as_str(),
            now,
            kind.timeout_error(&timeouts.of(kind), phase),
            kind.name()
        ])?;
    Ok(changed == 1)
}

impl Storer for SqliteStore {
    fn ping(&self) -> Result<()> {
        // Ready means writable: every route but the reads needs the one write lock, and a
        // lock that another process holds for longer than `wait` is the outage SQLite has.
        // Take it (waiting as long as any writer would) and give it back, writing nothing.
        let mut conn = self.conn()?;
        conn.transaction_with_behavior(TransactionBehavior::Immediate)?
            .rollback()?;
        Ok(())
    }

    fn timeouts(&self) -> PerKind<Timeouts> {
        self.timeouts
    }

    fn reads_in_place(&self) -> bool {
        true
    }

    fn create_workspace(
        &self,
        id: WorkspaceId,
        name: &str,
        api_token: &TokenHash,
        now: Millis,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO workspaces (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![id.to_string(), name, now],
        )?;
        tx.execute(
            "INSERT INTO api_tokens (token_hash, workspace_id, created_at, id)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                api_token.as_str(),
                id.to_string(),
                now,
                api_token.id().as_str()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>> {
        let conn = self.reader()?;
        let found: Option<String> = conn
            .prepare_cached("SELECT workspace_id FROM api_tokens WHERE token_hash = ?1")?
            .query_row([token.as_str()], |row| row.get(0))
            .optional()?;
        found.as_deref().map(workspace_id_from_db).transpose()
    }

    fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, created_at FROM workspaces ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Millis>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, created_at) = row?;
            Ok(Workspace {
                id: workspace_id_from_db(&id)?,
                name,
                created_at,
            })
        })
        .collect()
    }

    fn create_api_token(
        &self,
        workspace: WorkspaceId,
        token: &TokenHash,
        now: Millis,
    ) -> Result<bool> {
        let inserted = self.conn()?.execute(
            "INSERT INTO api_tokens (token_hash, workspace_id, created_at, id)
             SELECT ?1, id, ?3, ?4 FROM workspaces WHERE id = ?2",
            params![
                token.as_str(),
                workspace.to_string(),
                now,
                token.id().as_str()
            ],
        )?;
        Ok(inserted == 1)
    }

    fn list_api_tokens(&self, workspace: WorkspaceId) -> Result<Vec<ApiToken>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, created_at, last_used_at FROM api_tokens
              WHERE workspace_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([workspace.to_string()], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Millis>(1)?,
                row.get::<_, Option<Millis>>(2)?,
            ))
        })?;
        rows.map(|row| {
            let (id, created_at, last_used_at) = row?;
            Ok(ApiToken {
                id: token_id_from_db(&id)?,
                created_at,
                last_used_at,
            })
        })
        .collect()
    }

    fn revoke_api_token(&self, workspace: WorkspaceId, id: &TokenId) -> Result<bool> {
        let deleted = self.conn()?.execute(
            "DELETE FROM api_tokens WHERE id = ?1 AND workspace_id = ?2",
            params![id.as_str(), workspace.to_string()],
        )?;
        Ok(deleted == 1)
    }

    fn api_token_use(&self, token: &TokenHash) -> Result<Option<ApiTokenUse>> {
        let conn = self.reader()?;
        let found: Option<(String, Option<Millis>)> = conn
            .prepare_cached(
                "SELECT workspace_id, last_used_at FROM api_tokens WHERE token_hash = ?1",
            )?
            .query_row([token.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        found
            .map(|(workspace, last_used_at)| {
                Ok(ApiTokenUse {
                    workspace: workspace_id_from_db(&workspace)?,
                    last_used_at,
                })
            })
            .transpose()
    }

    fn touch_api_token(&self, token: &TokenHash, now: Millis) -> Result<bool> {
        let changed = self
            .conn()?
            .prepare_cached(
                "UPDATE api_tokens SET last_used_at = ?2
                  WHERE token_hash = ?1 AND (last_used_at IS NULL OR last_used_at <= ?3)",
            )?
            .execute(params![token.as_str(), now, now - API_TOKEN_USE_REFRESH])?;
        Ok(changed == 1)
    }

    fn rotate_daemon_token(
        &self,
        workspace: WorkspaceId,
        runtime: RuntimeId,
        token: &TokenHash,
    ) -> Result<bool> {
        let changed = self.conn()?.execute(
            "UPDATE runtimes SET daemon_token_hash = ?3 WHERE id = ?1 AND workspace_id = ?2",
            params![runtime.to_string(), workspace.to_string(), token.as_str()],
        )?;
        Ok(changed == 1)
    }
    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>> {
        // One statement: a write statement takes the write lock before it reads, so the
        // count it checks is the latest and no other writer comes between it and the
        // insert.
        let inserted = self.conn()?.execute(
            "INSERT INTO runtimes (id, workspace_id, name, provider, daemon_token_hash, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6
              WHERE (SELECT count(*) FROM runtimes WHERE workspace_id = ?2) < ?7",
            params![
                new.id.to_string(),
                new.workspace_id.to_string(),
                new.name,
                new.provider,
                new.daemon_token.as_str(),
                now,
                i64::try_from(max).unwrap_or(i64::MAX),
            ],
        )?;
        Ok((inserted == 1).then(|| Runtime {
            id: new.id,
            workspace_id: new.workspace_id,
            name: new.name.clone(),
            provider: new.provider.clone(),
            last_seen_at: None,
            created_at: now,
            catalog_at: None,
        }))
    }

    fn list_runtimes(
        &self,
        workspace: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>> {
        let conn = self.reader()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let workspace = workspace.to_string();
        let rows: Vec<RawRuntime> = match after {
            None => conn
                .prepare_cached(&format!(
                    "SELECT {RUNTIME_COLUMNS} FROM runtimes WHERE workspace_id = ?1
                      ORDER BY created_at, id LIMIT ?2"
                ))?
                .query_map(params![workspace, limit], RawRuntime::from_row)?
                .collect::<rusqlite::Result<_>>()?,
            Some(after) => conn
                .prepare_cached(&format!(
                    "SELECT {RUNTIME_COLUMNS} FROM runtimes
                      WHERE workspace_id = ?1 AND (created_at, id) > (?2, ?3)
                      ORDER BY created_at, id LIMIT ?4"
                ))?
                .query_map(
                    params![workspace, after.created_at, after.id.to_string(), limit],
                    RawRuntime::from_row,
                )?
                .collect::<rusqlite::Result<_>>()?,
        };
        rows.into_iter().map(RawRuntime::parse).collect()
    }

    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>> {
        let conn = self.reader()?;
        conn.prepare_cached(&format!(
            "SELECT {RUNTIME_COLUMNS} FROM runtimes WHERE id = ?1 AND workspace_id = ?2"
        ))?
        .query_row(
            params![id.to_string(), workspace.to_string()],
            RawRuntime::from_row,
        )
        .optional()?
        .map(RawRuntime::parse)
        .transpose()
    }

    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids = params![id.to_string(), workspace.to_string()];
        // The runtime's requests go with it (ON DELETE CASCADE, foreign_keys is on), and
        // out of its workspace's count.
        tx.prepare_cached(
            "UPDATE workspaces
                SET stored_requests = stored_requests
                                      - (SELECT count(*) FROM requests WHERE runtime_id = ?1)
              WHERE id = ?2 AND EXISTS (SELECT 1 FROM runtimes WHERE id = ?1 AND workspace_id = ?2)",
        )?
        .execute(ids)?;
        let deleted = tx
            .prepare_cached("DELETE FROM runtimes WHERE id = ?1 AND workspace_id = ?2")?
            .execute(ids)?;
        tx.commit()?;
        Ok(deleted == 1)
    }

    fn daemon_by_token(&self, token: &TokenHash) -> Result<Option<Daemon>> {
        let conn = self.reader()?;
        type Found = (String, Option<Millis>, Option<String>, Option<String>);
        // The kinds pending, and the unrenewed running requests as `kind id` pairs: each a
        // few rows of the partial indexes of active requests.
        let found: Option<Found> = conn
            .prepare_cached(
                "SELECT id, last_seen_at,
                        (SELECT group_concat(DISTINCT kind) FROM requests
                          WHERE runtime_id = runtimes.id AND status = 'pending'),
                        (SELECT group_concat(kind || ' ' || id) FROM requests
                          WHERE runtime_id = runtimes.id AND status = 'running'
                            AND renewed_at IS NULL)
                   FROM runtimes WHERE daemon_token_hash = ?1",
            )?
            .query_row([token.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        found
            .map(|(id, last_seen_at, pending, unrenewed)| {
                let (pending, unrenewed) =
                    daemon_lists_from_db(pending.as_deref(), unrenewed.as_deref())?;
                Ok(Daemon {
                    runtime: runtime_id_from_db(&id)?,
                    last_seen_at,
                    pending,
                    unrenewed,
                })
            })
            .transpose()
    }

    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool> {
        // MAX: instances whose clocks differ a little never move last_seen_at backwards.
        let changed = self
            .conn()?
            .prepare_cached(
                "UPDATE runtimes SET last_seen_at = MAX(COALESCE(last_seen_at, ?2), ?2)
                 WHERE id = ?1",
            )?
            .execute(params![id.to_string(), now])?;
        Ok(changed == 1)
    }

    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>> {
        find_request_in(&*self.reader()?, runtime, id)
    }

    fn find_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        let conn = self.reader()?;
        // The request's columns first, so that RawRequest reads them where it always does;
        // then whether the runtime was found. No row at all: the token is nobody's.
        let found: Option<(Option<RawRequest>, bool)> = conn
            .prepare_cached(
                "SELECT r.id, r.runtime_id, r.status, r.models, r.supported, r.error,
                        r.created_at, r.updated_at, r.deadline_at, r.ended_at,
                        r.fallback, r.cached_at, r.refresh_id, r.kind, r.coalesce_key,
                        r.input, r.result, rt.id IS NOT NULL
                   FROM api_tokens t
                   LEFT JOIN runtimes rt ON rt.id = ?2 AND rt.workspace_id = t.workspace_id
                   LEFT JOIN requests r ON r.id = ?3 AND r.runtime_id = rt.id
                  WHERE t.token_hash = ?1",
            )?
            .query_row(
                params![api_token.as_str(), runtime.to_string(), id.to_string()],
                |row| {
                    let request = match row.get::<_, Option<String>>(0)? {
                        Some(_) => Some(RawRequest::from_row(row)?),
                        None => None,
                    };
                    Ok((request, row.get(17)?))
                },
            )
            .optional()?;
        Ok(match found {
            None => Scoped::Unauthorized,
            Some((_, false)) => Scoped::NoRuntime,
            Some((request, true)) => Scoped::Found(request.map(RawRequest::parse).transpose()?),
        })
    }

    fn create_or_coalesce_within(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>> {
        let kind = new.kind.name();
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let runtime_text = runtime.to_string();
        let Some(stored) = stored_beside(&tx, &runtime_text)? else {
            return Ok(Added::Missing);
        };
        let room = u64::try_from(stored).unwrap_or(0) < max;
        // The write lock is ours until commit, so what this reads is what the expiry below
        // finds; the expiry still names the status and deadline it expects.
        let overdue: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT id, status FROM requests
                  WHERE runtime_id = ?1 AND kind = ?3 AND coalesce_key = ?4
                    AND status IN ('pending', 'running') AND deadline_at <= ?2",
            )?
            .query_row(params![runtime_text, now, kind, new.key], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let mut expired = Expired::default();
        if let Some((overdue_id, phase)) = overdue {
            let phase = status_from_db(&phase)?;
            if expire_in(&tx, &self.timeouts, &overdue_id, new.kind, phase, now)? {
                expired = Expired::one(phase);
            }
        }
        // The unique index on active requests per runtime turns a second active request
        // into a conflict, which DO NOTHING turns into "coalesce".
        let inserted = match room {
            true => tx
                .prepare_cached(
                    "INSERT INTO requests (id, runtime_id, status, supported, created_at, updated_at,
                                           deadline_at, kind, coalesce_key, input)
                     VALUES (?1, ?2, 'pending', TRUE, ?3, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    new.id.to_string(),
                    runtime_text,
                    now,
                    self.timeouts.of(new.kind).pending_deadline(now),
                    kind,
                    new.key,
                    new.input
                ])?,
            false => 0,
        };
        let request = if inserted == 1 {
            count_stored(&tx, &runtime_text, 1)?;
            find_request_in(&tx, runtime, new.id)?
        } else {
            tx.prepare_cached(&format!(
                "SELECT {REQUEST_COLUMNS} FROM requests
                  WHERE runtime_id = ?1 AND kind = ?2 AND coalesce_key = ?3
                    AND status IN ('pending', 'running')"
            ))?
            .query_row(params![runtime_text, kind, new.key], RawRequest::from_row)
            .optional()?
            .map(RawRequest::parse)
            .transpose()?
        };
        tx.commit()?;
        match request {
            Some(request) => Ok(Added::Done(Created { request, expired })),
            None if !room => Ok(Added::Full),
            None => Err(StoreError::Corrupt(format!(
                "runtime {runtime}: insert coalesced but no active request exists"
            ))),
        }
    }

    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64> {
        let stored: Option<i64> = self
            .reader()?
            .prepare_cached("SELECT stored_requests FROM workspaces WHERE id = ?1")?
            .query_row([workspace.to_string()], |row| row.get(0))
            .optional()?;
        Ok(stored.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn claim_next_pending(&self, runtime: RuntimeId, kind: Kind, now: Millis) -> Result<Claim> {
        // No read first to spare the write lock when nothing is pending: the heartbeat only
        // claims when `daemon_by_token` has just seen a pending request.
        let mut conn = self.conn()?;
        let runtime_text = runtime.to_string();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let expired = tx
            .prepare_cached(
                "UPDATE requests
                SET status = 'timeout', error = ?3, updated_at = deadline_at, ended_at = deadline_at
              WHERE runtime_id = ?1 AND kind = ?4 AND status = 'pending' AND deadline_at <= ?2",
            )?
            .execute(params![
                runtime_text,
                now,
                kind.timeout_error(&self.timeouts.of(kind), Status::Pending),
                kind.name()
            ])?;
        let claimed: Option<(String, Option<String>)> = tx
            .prepare_cached(
                "UPDATE requests SET status = 'running', deadline_at = ?3, updated_at = ?2
                  WHERE id = (SELECT id FROM requests
                               WHERE runtime_id = ?1 AND kind = ?4 AND status = 'pending'
                                 AND deadline_at > ?2
                               ORDER BY created_at, id LIMIT 1)
                    AND status = 'pending'
                 RETURNING id, input",
            )?
            .query_row(
                params![
                    runtime_text,
                    now,
                    self.timeouts.of(kind).running_deadline(now),
                    kind.name()
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        tx.commit()?;
        let (claimed, input) = claimed.unzip();
        Ok(Claim {
            claimed: claimed.as_deref().map(request_id_from_db).transpose()?,
            input: input.flatten(),
            expired: Expired::default().plus(Status::Pending, expired as u64),
        })
    }

    fn apply_report(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<bool> {
        let mut conn = self.conn()?;
        let changed = match report {
            Report::Running | Report::Progress(_) => {
                let progress = match report {
                    Report::Progress(result) => Some(result),
                    _ => None,
                };
                conn.prepare_cached(
                    "UPDATE requests SET deadline_at = ?4, updated_at = ?3, renewed_at = ?3,
                                         result = COALESCE(?6, result)
                      WHERE id = ?1 AND runtime_id = ?2 AND kind = ?5 AND status = 'running'
                        AND deadline_at > ?3",
                )?
                .execute(params![
                    id.to_string(),
                    runtime.to_string(),
                    now,
                    self.timeouts.of(kind).running_deadline(now),
                    kind.name(),
                    progress
                ])?
            }
            Report::Ended(outcome) => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let changed = tx
                    .prepare_cached(
                        "UPDATE requests
                            SET status = ?4, models = ?5, supported = ?6, error = ?7, fallback = ?8,
                                result = ?9, updated_at = ?3, ended_at = ?3
                          WHERE id = ?1 AND runtime_id = ?2 AND kind = ?10 AND status = 'running'
                            AND deadline_at > ?3",
                    )?
                    .execute(params![
                        id.to_string(),
                        runtime.to_string(),
                        now,
                        outcome.status.as_str(),
                        models_to_db(&outcome.models),
                        outcome.supported,
                        outcome.error,
                        outcome.fallback,
                        outcome.result,
                        kind.name()
                    ])?;
                if changed == 1 && kind == Kind::Models {
                    change_catalog(&tx, runtime, outcome, now)?;
                }
                tx.commit()?;
                changed
            }
        };
        Ok(changed == 1)
    }

    fn expire_request(
        &self,
        id: RequestId,
        kind: Kind,
        phase: Status,
        now: Millis,
    ) -> Result<bool> {
        let conn = self.conn()?;
        expire_in(&conn, &self.timeouts, &id.to_string(), kind, phase, now)
    }

    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired> {
        upkeep::expire_overdue(&*self.conn()?, kind, &self.timeouts.of(kind), now, limit)
    }

    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64> {
        upkeep::delete_ended_before(&mut *self.conn()?, kind, cutoff, limit)
    }

    fn count_requests(&self) -> Result<RequestCounts> {
        upkeep::count_requests(&*self.reader()?)
    }

    fn checkpoint(&self) -> Result<()> {
        upkeep::checkpoint(&self.path)
    }

    fn hand_out_again(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool> {
        let changed = self
            .conn()?
            .prepare_cached(
                "UPDATE requests SET deadline_at = ?4, updated_at = ?3
                  WHERE id = ?1 AND runtime_id = ?2 AND kind = ?5 AND status = 'running'
                    AND renewed_at IS NULL AND deadline_at > ?3",
            )?
            .execute(params![
                id.to_string(),
                runtime.to_string(),
                now,
                self.timeouts.of(kind).running_deadline(now),
                kind.name()
            ])?;
        Ok(changed == 1)
    }

    fn active_requests(&self) -> Result<Vec<Active>> {
        upkeep::active_requests(&*self.reader()?)
    }

    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>> {
        let runtime_text = runtime.to_string();
        let refresh_text = refresh.map(|r| r.to_string());
        // A read, so the common answer (the one handed out a moment ago) takes no write
        // lock. Two callers that both find none each store one: no more than the callers.
        let reused = self
            .reader()?
            .prepare_cached(&format!("SELECT {REQUEST_COLUMNS} {REUSABLE_ANSWER}"))?
            .query_row(
                params![runtime_text, reported_after, refresh_text, ask.reuse_after],
                RawRequest::from_row,
            )
            .optional()?;
        if let Some(reused) = reused {
            return Ok(Added::Done(reused.parse()?));
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let answer = tx
            .prepare_cached(&format!(
                "INSERT INTO requests (id, runtime_id, status, models, supported, created_at,
                                       updated_at, deadline_at, ended_at, cached_at, refresh_id)
                 SELECT ?1, runtime_id, 'completed', models, supported, ?4, ?4, ?4, ?4,
                        reported_at, ?3
                   FROM catalogs WHERE runtime_id = ?2 AND reported_at > ?5
                    AND (SELECT w.stored_requests FROM runtimes t
                           JOIN workspaces w ON w.id = t.workspace_id WHERE t.id = ?2) < ?6
                 RETURNING {REQUEST_COLUMNS}"
            ))?
            .query_row(
                params![
                    ask.cached.to_string(),
                    runtime_text,
                    refresh_text,
                    now,
                    reported_after,
                    i64::try_from(ask.max_stored).unwrap_or(i64::MAX)
                ],
                RawRequest::from_row,
            )
            .optional()?;
        let added = match answer {
            Some(answer) => {
                count_stored(&tx, &runtime_text, 1)?;
                Added::Done(answer.parse()?)
            }
            None => {
                let catalog = tx
                    .prepare_cached(
                        "SELECT 1 FROM catalogs WHERE runtime_id = ?1 AND reported_at > ?2",
                    )?
                    .exists(params![runtime_text, reported_after])?;
                if catalog { Added::Full } else { Added::Missing }
            }
        };
        tx.commit()?;
        Ok(added)
    }

    fn listens(&self) -> bool {
        true
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        Ok(Box::new(watch::DataVersion::open(&self.path)?))
    }
}
