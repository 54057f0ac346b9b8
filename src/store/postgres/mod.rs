//! The PostgreSQL engine: for instances on several machines.
//!
//! The `postgres` client is synchronous and must never run on a tokio worker thread (it
//! starts its own runtime and panics there); the HTTP layer calls every store method
//! through `spawn_blocking`. Transitions are single conditional statements; the claim takes
//! its row with `FOR UPDATE SKIP LOCKED`, so concurrent heartbeats never wait on each other
//! and never hand out one request twice.
//!
//! Every wait is bounded by the store's `wait`: the checkout of a pooled connection, the
//! connect, and each statement (`statement_timeout`, set on every new connection). So when
//! the server is gone or stuck, a call fails within about that long and its caller gets
//! 503, and once the server is back the pool connects again by itself.
//!
//! The sweeper's statements live in [`upkeep`].

mod cached;
mod listen;
pub mod migration;
mod upkeep;

use std::time::Duration;

use postgres::error::SqlState;
use postgres::{NoTls, Row};
use r2d2_postgres::PostgresConnectionManager;

use self::cached::{CachedClient, CachedTransaction, CachingManager};

use super::{
    API_TOKEN_USE_REFRESH, Active, Added, ApiToken, ApiTokenUse, Ask, Claim, Created, DEFAULT_WAIT,
    Daemon, Expired, Listener, NewRequest, NewRuntime, RequestCounts, Result, RuntimeCursor,
    Scoped, StoreError, Storer, Workspace, daemon_lists_from_db, kind_from_db, models_from_db,
    models_to_db, request_id_from_db, runtime_id_from_db, status_from_db, token_id_from_db,
    workspace_id_from_db,
};
use crate::clock::Millis;
use crate::errors::error_chain;
use crate::ids::{RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use crate::kind::{Kind, PerKind};
use crate::model::{CatalogChange, Report, Runtime, Status, StoredRequest, Timeouts};

const POOL_SIZE: u32 = 16;

const REQUEST_COLUMNS: &str = "id, runtime_id, status, models, supported, error, created_at, updated_at, deadline_at, ended_at, fallback, cached_at, refresh_id, kind, coalesce_key, input, result";
/// A runtime's columns, and when its catalog was reported (a lookup by primary key).
const RUNTIME_COLUMNS: &str = "id, workspace_id, name, provider, last_seen_at, created_at,
     (SELECT reported_at FROM catalogs WHERE runtime_id = runtimes.id)";

pub struct PostgresStore {
    /// Always there until `drop` takes it, to close it on a thread of its own.
    pool: Option<r2d2::Pool<CachingManager>>,
    timeouts: PerKind<Timeouts>,
    /// How to connect: the listener opens a connection of its own with it.
    config: postgres::Config,
    pool_mode: PoolMode,
}

/// How model-relay's connections reach PostgreSQL: straight or through a session pooler, or
/// through a transaction pooler (`?pool_mode=transaction` in the URL).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PoolMode {
    /// Each connection is one server session: statements are prepared once per
    /// connection, the statement timeout is a session setting, and the instance `LISTEN`s.
    #[default]
    Session,
    /// A proxy (PgBouncer's `pool_mode = transaction`) lends a server session for one
    /// transaction at a time: nothing may outlive it. Statements go unnamed, nothing is
    /// `SET` (it would stay behind for the proxy's next client), and the instance does not
    /// listen; its waiting calls are woken by its own writes and by the re-check.
    Transaction,
}

impl PoolMode {
    /// The URL's query parameter that chooses the mode. The driver refuses parameters it
    /// does not know, so [`PoolMode::from_url`] takes it out before the driver sees the URL.
    pub const PARAMETER: &'static str = "pool_mode";

    /// The mode `url` asks for, and the URL without the parameter.
    pub fn from_url(url: &str) -> std::result::Result<(PoolMode, String), String> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((PoolMode::Session, url.to_owned()));
        };
        let mut mode = PoolMode::Session;
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some((key, value)) if key == Self::PARAMETER => {
                    mode = match value {
                        "session" => PoolMode::Session,
                        "transaction" => PoolMode::Transaction,
                        other => {
                            return Err(format!(
                                "unsupported {}={other:?}: use session or transaction",
                                Self::PARAMETER
                            ));
                        }
                    };
                }
                _ => kept.push(pair),
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((mode, url))
    }
}

/// How a [`PostgresStore`] connects and how long it waits.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The bound on every wait: a pooled connection, a connect, a statement.
    pub wait: Duration,
    pub pool_mode: PoolMode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            wait: DEFAULT_WAIT,
            pool_mode: PoolMode::Session,
        }
    }
}

impl PostgresStore {
    /// Opens the database `url` names; `?pool_mode=transaction` says it is behind a
    /// transaction pooler.
    pub fn open(url: &str, timeouts: impl Into<PerKind<Timeouts>>) -> Result<Self> {
        let (pool_mode, url) = PoolMode::from_url(url).map_err(StoreError::Config)?;
        let options = Options {
            pool_mode,
            ..Options::default()
        };
        Self::open_with(url.parse()?, timeouts, options)
    }

    /// Opens with a ready connection config; tests use it to give each test its own schema
    /// (`options = -c search_path=…`).
    pub fn open_config(
        config: postgres::Config,
        timeouts: impl Into<PerKind<Timeouts>>,
    ) -> Result<Self> {
        Self::open_with(config, timeouts, Options::default())
    }

    /// [`open_config`](Self::open_config), with `options.wait` as the bound on every wait.
    pub fn open_with(
        mut config: postgres::Config,
        timeouts: impl Into<PerKind<Timeouts>>,
        options: Options,
    ) -> Result<Self> {
        let timeouts = timeouts.into();
        let Options { wait, pool_mode } = options;
        // What the URL says wins; otherwise nothing waits longer than `wait`. The user
        // timeout also ends a query whose server stopped answering without closing the
        // connection, where the server's own statement timeout cannot help.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(wait);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(wait);
        }
        let mut client = config.connect(NoTls)?;
        migration::migrate(&mut client)?;
        if pool_mode == PoolMode::Transaction {
            warn_without_statement_timeout(&mut client);
        }
        drop(client);
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(wait)
            .connection_customizer(Box::new(SessionSettings {
                statement_timeout: wait,
                pool_mode,
            }))
            .error_handler(Box::new(LogConnectErrors))
            .build(CachingManager {
                inner: PostgresConnectionManager::new(config.clone(), NoTls),
                pool_mode,
            })?;
        Ok(PostgresStore {
            pool: Some(pool),
            timeouts,
            config,
            pool_mode,
        })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<CachingManager>> {
        Ok(self.pool.as_ref().ok_or(StoreError::Closed)?.get()?)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing a synchronous `postgres` connection runs a small runtime of its own, which
        // panics on a thread that drives a tokio runtime — also while that runtime is being
        // torn down, where no handle says so. The last store handle may well drop there (a
        // test's end, a server task), so the pool's connections are always closed on a
        // plain thread. Off any runtime (`serve` drops its store after its runtime) that
        // thread is waited for, so they are closed before the process exits.
        let Some(pool) = self.pool.take() else {
            return;
        };
        let closing = std::thread::Builder::new()
            .name("model-relay-pg-close".into())
            .spawn(move || drop(pool));
        if let Ok(closing) = closing
            && tokio::runtime::Handle::try_current().is_err()
        {
            let _ = closing.join();
        }
    }
}

/// Set on every new pooled connection: the server cancels any statement (a lock wait
/// included) that runs longer than the store's `wait`. Not behind a transaction pooler: the
/// setting would stay on a server session the proxy then lends to anyone, and be missing
/// from the next one it lends us (see [`warn_without_statement_timeout`]).
#[derive(Debug)]
struct SessionSettings {
    statement_timeout: Duration,
    pool_mode: PoolMode,
}

impl r2d2::CustomizeConnection<CachedClient, postgres::Error> for SessionSettings {
    fn on_acquire(&self, client: &mut CachedClient) -> Result<(), postgres::Error> {
        if self.pool_mode == PoolMode::Transaction {
            return Ok(());
        }
        let ms = self.statement_timeout.as_millis().max(1);
        client.batch_execute(&format!("SET statement_timeout = {ms}"))
    }
}

/// Behind a transaction pooler the statement timeout must come from the server's side (the
/// role's setting, or the proxy's `connect_query`): say so when there is none, since then a
/// stuck statement holds its call until the proxy gives up.
fn warn_without_statement_timeout(client: &mut postgres::Client) {
    match client.simple_query("SHOW statement_timeout") {
        Ok(messages) => {
            let value = messages.iter().find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            });
            if value.as_deref() == Some("0") {
                tracing::warn!(
                    "postgres: pool_mode=transaction and no statement_timeout: set one for the \
                     role (ALTER ROLE … SET statement_timeout = '5s') or in the pooler's \
                     connect_query"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "postgres: cannot read statement_timeout")
        }
    }
}

/// The pool connects in the background; when that fails (the server is down), say so at
/// warn with the whole cause, like every other store error.
#[derive(Debug)]
struct LogConnectErrors;

impl r2d2::HandleError<postgres::Error> for LogConnectErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::warn!(error = %error_chain(&error), "postgres: cannot open a pooled connection");
    }
}

fn parse_request(row: &Row) -> Result<StoredRequest> {
    Ok(StoredRequest {
        id: request_id_from_db(row.try_get(0)?)?,
        runtime_id: runtime_id_from_db(row.try_get(1)?)?,
        status: status_from_db(row.try_get(2)?)?,
        models: models_from_db(row.try_get(3)?)?,
        supported: row.try_get(4)?,
        error: row.try_get(5)?,
        created_at: row.try_get(6)?,
        updated_at: row.try_get(7)?,
        deadline_at: row.try_get(8)?,
        ended_at: row.try_get(9)?,
        fallback: row.try_get(10)?,
        cached_at: row.try_get(11)?,
        refresh_id: row
            .try_get::<_, Option<&str>>(12)?
            .map(request_id_from_db)
            .transpose()?,
        kind: kind_from_db(row.try_get(13)?)?,
        key: row.try_get(14)?,
        input: row.try_get(15)?,
        result: row.try_get(16)?,
    })
}

fn parse_runtime(row: &Row) -> Result<Runtime> {
    Ok(Runtime {
        id: runtime_id_from_db(row.try_get(0)?)?,
        workspace_id: workspace_id_from_db(row.try_get(1)?)?,
        name: row.try_get(2)?,
        provider: row.try_get(3)?,
        last_seen_at: row.try_get(4)?,
        created_at: row.try_get(5)?,
        catalog_at: row.try_get(6)?,
    })
}

/// One attempt at create-or-coalesce, in its own transaction. `Ok(None)` means the active
/// request that blocked the insert ended before it could be read: try again.
/// Lock order. Every transaction that adds or removes requests first locks the rows of the
/// workspaces it counts them in (`FOR NO KEY UPDATE`, which leaves other writers' foreign-key
/// checks unblocked), several in the order of their ids, and only then touches runtimes and
/// requests: so the counts are exact (a count is read under its lock) and no two such
/// transactions wait for each other in a circle.
///
/// The room a workspace has for one more request: its row, locked, if the runtime ($2) is
/// there and the workspace stores fewer than $5. `FOR NO KEY UPDATE` re-reads a row that
/// changed while it waited for the lock, and drops it if it no longer has room: the check
/// holds at the lock, not at the statement's snapshot.
const ROOM: &str = "room AS (
         SELECT w.id FROM workspaces w
          WHERE w.id = (SELECT workspace_id FROM runtimes WHERE id = $2) AND w.stored_requests < $5
            FOR NO KEY UPDATE)";

/// Counts the request `new` inserted, if it did, on the row `room` locked.
const COUNTED: &str = "counted AS (
         UPDATE workspaces SET stored_requests = stored_requests + 1
          WHERE id IN (SELECT id FROM room) AND EXISTS (SELECT 1 FROM new))";

/// A new pending request ($6 its kind, $7 its key, $8 its input), counted, if its
/// workspace has room and the runtime ($2) has no active request of that kind and key: the
/// unique index of active requests refuses it then (DO NOTHING), and nothing comes back.
/// One round trip, for the common case.
fn create_within_sql() -> String {
    format!(
        "WITH {ROOM},
              new AS (
         INSERT INTO requests (id, runtime_id, status, supported, created_at, updated_at,
                               deadline_at, kind, coalesce_key, input)
         SELECT $1, $2, 'pending', TRUE, $3, $3, $4, $6, $7, $8 FROM room
         ON CONFLICT DO NOTHING
         RETURNING {REQUEST_COLUMNS}),
              {COUNTED}
         SELECT * FROM new"
    )
}

/// The report that ends a request, and what it does to the runtime's catalog, in one
/// statement: the catalog changes only if the compare-and-set on the request did. Answers
/// the number of requests it changed.
fn report_sql(change: CatalogChange) -> &'static str {
    match change {
        CatalogChange::Keep => {
            "WITH done AS (UPDATE requests
                  SET status = $4, models = $5, supported = $6, error = $7, fallback = $8,
                      result = $9, updated_at = $3, ended_at = $3
                WHERE id = $1 AND runtime_id = $2 AND kind = $10 AND status = 'running'
                  AND deadline_at > $3
               RETURNING runtime_id)
             SELECT count(*) FROM done"
        }
        CatalogChange::Write => {
            "WITH done AS (UPDATE requests
                  SET status = $4, models = $5::text, supported = $6::boolean, error = $7,
                      fallback = $8, result = $9, updated_at = $3::bigint, ended_at = $3::bigint
                WHERE id = $1 AND runtime_id = $2 AND kind = $10 AND status = 'running'
                  AND deadline_at > $3::bigint
               RETURNING runtime_id),
                  kept AS (INSERT INTO catalogs (runtime_id, models, supported, reported_at)
               SELECT runtime_id, $5::text, $6::boolean, $3::bigint FROM done
               ON CONFLICT (runtime_id) DO UPDATE
                  SET models = excluded.models, supported = excluded.supported,
                      reported_at = excluded.reported_at)
             SELECT count(*) FROM done"
        }
        CatalogChange::Remove => {
            "WITH done AS (UPDATE requests
                  SET status = $4, models = $5, supported = $6, error = $7, fallback = $8,
                      result = $9, updated_at = $3, ended_at = $3
                WHERE id = $1 AND runtime_id = $2 AND kind = $10 AND status = 'running'
                  AND deadline_at > $3
               RETURNING runtime_id),
                  gone AS (DELETE FROM catalogs WHERE runtime_id IN (SELECT runtime_id FROM done))
             SELECT count(*) FROM done"
        }
    }
}

fn try_create_or_coalesce(
    tx: &mut CachedTransaction<'_>,
    timeouts: &PerKind<Timeouts>,
    runtime: &str,
    new: &NewRequest,
    now: Millis,
    max: u64,
) -> Result<Option<Added<Created>>> {
    let (id, kind, key) = (new.id.to_string(), new.kind, &new.key);
    let kind_name = kind.name();
    let Some(workspace) = tx.query_opt(
        "SELECT id, stored_requests FROM workspaces
          WHERE id = (SELECT workspace_id FROM runtimes WHERE id = $1) FOR NO KEY UPDATE",
        &[&runtime],
    )?
    else {
        return Ok(Some(Added::Missing));
    };
    let (workspace, stored): (String, i64) = (workspace.try_get(0)?, workspace.try_get(1)?);
    let room = u64::try_from(stored).unwrap_or(0) < max;
    // FOR KEY SHARE: a delete of the runtime that does not lock its workspace first (one
    // of an older version) waits until this transaction ends, so the insert below cannot
    // fail on the foreign key.
    if tx
        .query_opt(
            "SELECT 1 FROM runtimes WHERE id = $1 FOR KEY SHARE",
            &[&runtime],
        )?
        .is_none()
    {
        return Ok(Some(Added::Missing));
    }
    // The old status comes back from the locked subquery: which phase's deadline it missed.
    let mut expired = Expired::default();
    for row in tx.query(
        "UPDATE requests r
            SET status = 'timeout',
                error = CASE old.status WHEN 'pending' THEN $3 ELSE $4 END,
                updated_at = r.deadline_at, ended_at = r.deadline_at
           FROM (SELECT id, status FROM requests
                  WHERE runtime_id = $1 AND kind = $5 AND coalesce_key = $6
                    AND status IN ('pending', 'running') AND deadline_at <= $2
                  FOR UPDATE) old
          WHERE r.id = old.id AND r.status = old.status AND r.deadline_at <= $2
         RETURNING old.status",
        &[
            &runtime,
            &now,
            &kind.timeout_error(&timeouts.of(kind), Status::Pending),
            &kind.timeout_error(&timeouts.of(kind), Status::Running),
            &kind_name,
            key,
        ],
    )? {
        expired += Expired::one(status_from_db(row.try_get(0)?)?);
    }
    if room {
        let inserted = tx.query_opt(
            &format!(
                "INSERT INTO requests (id, runtime_id, status, supported, created_at, updated_at,
                                       deadline_at, kind, coalesce_key, input)
                 VALUES ($1, $2, 'pending', TRUE, $3, $3, $4, $5, $6, $7)
                 ON CONFLICT DO NOTHING
                 RETURNING {REQUEST_COLUMNS}"
            ),
            &[
                &id,
                &runtime,
                &now,
                &timeouts.of(kind).pending_deadline(now),
                &kind_name,
                key,
                &new.input,
            ],
        )?;
        if let Some(row) = inserted {
            tx.execute(
                "UPDATE workspaces SET stored_requests = stored_requests + 1 WHERE id = $1",
                &[&workspace],
            )?;
            let request = parse_request(&row)?;
            return Ok(Some(Added::Done(Created { request, expired })));
        }
    }
    let active = tx.query_opt(
        &format!(
            "SELECT {REQUEST_COLUMNS} FROM requests
              WHERE runtime_id = $1 AND kind = $2 AND coalesce_key = $3
                AND status IN ('pending', 'running')"
        ),
        &[&runtime, &kind_name, key],
    )?;
    Ok(match active {
        Some(row) => Some(Added::Done(Created {
            request: parse_request(&row)?,
            expired,
        })),
        None if !room => Some(Added::Full),
        None => None,
    })
}

impl Storer for PostgresStore {
    fn ping(&self) -> Result<()> {
        self.conn()?.query_one("SELECT 1", &[])?;
        Ok(())
    }

    fn timeouts(&self) -> PerKind<Timeouts> {
        self.timeouts
    }

    fn create_workspace(
        &self,
        id: WorkspaceId,
        name: &str,
        api_token: &TokenHash,
        now: Millis,
    ) -> Result<()> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let id = id.to_string();
        tx.execute(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3)",
            &[&id, &name, &now],
        )?;
        tx.execute(
            "INSERT INTO api_tokens (token_hash, workspace_id, created_at, id)
             VALUES ($1, $2, $3, $4)",
            &[&api_token.as_str(), &id, &now, &api_token.id().as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>> {
        let row = self.conn()?.query_opt(
            "SELECT workspace_id FROM api_tokens WHERE token_hash = $1",
            &[&token.as_str()],
        )?;
        row.map(|row| workspace_id_from_db(row.try_get(0)?))
            .transpose()
    }

    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let workspace = new.workspace_id.to_string();
        // Creates in one workspace queue on its row, so each counts after the one before
        // it committed: the count is a statement of its own, with a snapshot taken after
        // the lock (in one statement the snapshot would be older than the lock, and two
        // creates could both count below `max`). NO KEY UPDATE leaves the foreign-key
        // checks of other writers (KEY SHARE) unblocked.
        tx.execute(
            "SELECT 1 FROM workspaces WHERE id = $1 FOR NO KEY UPDATE",
            &[&workspace],
        )?;
        let row = tx.query_opt(
            &format!(
                "INSERT INTO runtimes (id, workspace_id, name, provider, daemon_token_hash, created_at)
                 SELECT $1, $2, $3, $4, $5, $6
                  WHERE (SELECT count(*) FROM runtimes WHERE workspace_id = $2) < $7
                 RETURNING {RUNTIME_COLUMNS}"
            ),
            &[
                &new.id.to_string(),
                &workspace,
                &new.name,
                &new.provider,
                &new.daemon_token.as_str(),
                &now,
                &i64::try_from(max).unwrap_or(i64::MAX),
            ],
        )?;
        let runtime = row.as_ref().map(parse_runtime).transpose()?;
        tx.commit()?;
        Ok(runtime)
    }

    fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        let rows = self.conn()?.query(
            "SELECT id, name, created_at FROM workspaces ORDER BY created_at, id",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                Ok(Workspace {
                    id: workspace_id_from_db(row.try_get(0)?)?,
                    name: row.try_get(1)?,
                    created_at: row.try_get(2)?,
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
             SELECT $1, id, $3, $4 FROM workspaces WHERE id = $2",
            &[
                &token.as_str(),
                &workspace.to_string(),
                &now,
                &token.id().as_str(),
            ],
        )?;
        Ok(inserted == 1)
    }

    fn list_api_tokens(&self, workspace: WorkspaceId) -> Result<Vec<ApiToken>> {
        let rows = self.conn()?.query(
            "SELECT id, created_at, last_used_at FROM api_tokens
              WHERE workspace_id = $1 ORDER BY created_at, id",
            &[&workspace.to_string()],
        )?;
        rows.iter()
            .map(|row| {
                Ok(ApiToken {
                    id: token_id_from_db(row.try_get(0)?)?,
                    created_at: row.try_get(1)?,
                    last_used_at: row.try_get(2)?,
                })
            })
            .collect()
    }

    fn revoke_api_token(&self, workspace: WorkspaceId, id: &TokenId) -> Result<bool> {
        let deleted = self.conn()?.execute(
            "DELETE FROM api_tokens WHERE id = $1 AND workspace_id = $2",
            &[&id.as_str(), &workspace.to_string()],
        )?;
        Ok(deleted == 1)
    }

    fn api_token_use(&self, token: &TokenHash) -> Result<Option<ApiTokenUse>> {
        let row = self.conn()?.query_opt(
            "SELECT workspace_id, last_used_at FROM api_tokens WHERE token_hash = $1",
            &[&token.as_str()],
        )?;
        row.map(|row| {
            Ok(ApiTokenUse {
                workspace: workspace_id_from_db(row.try_get(0)?)?,
                last_used_at: row.try_get(1)?,
            })
        })
        .transpose()
    }

    fn touch_api_token(&self, token: &TokenHash, now: Millis) -> Result<bool> {
        let changed = self.conn()?.execute(
            "UPDATE api_tokens SET last_used_at = $2
              WHERE token_hash = $1 AND (last_used_at IS NULL OR last_used_at <= $3)",
            &[&token.as_str(), &now, &(now - API_TOKEN_USE_REFRESH)],
        )?;
        Ok(changed == 1)
    }

    fn rotate_daemon_token(
        &self,
        workspace: WorkspaceId,
        runtime: RuntimeId,
        token: &TokenHash,
    ) -> Result<bool> {
        let changed = self.conn()?.execute(
            "UPDATE runtimes SET daemon_token_hash = $3 WHERE id = $1 AND workspace_id = $2",
            &[
                &runtime.to_string(),
                &workspace.to_string(),
                &token.as_str(),
            ],
        )?;
        Ok(changed == 1)
    }
    fn list_runtimes(
        &self,
        workspace: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let workspace = workspace.to_string();
        // `id COLLATE "C"`: byte order, as SQLite and the memory engine order ids,
        // whatever the database's collation.
        let rows = match after {
            None => self.conn()?.query(
                &format!(
                    "SELECT {RUNTIME_COLUMNS} FROM runtimes WHERE workspace_id = $1
                      ORDER BY created_at, id COLLATE \"C\" LIMIT $2"
                ),
                &[&workspace, &limit],
            )?,
            Some(after) => self.conn()?.query(
                &format!(
                    "SELECT {RUNTIME_COLUMNS} FROM runtimes
                      WHERE workspace_id = $1
                        AND (created_at, id COLLATE \"C\") > ($2, $3 COLLATE \"C\")
                      ORDER BY created_at, id COLLATE \"C\" LIMIT $4"
                ),
                &[&workspace, &after.created_at, &after.id.to_string(), &limit],
            )?,
        };
        rows.iter().map(parse_runtime).collect()
    }

    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>> {
        let row = self.conn()?.query_opt(
            &format!("SELECT {RUNTIME_COLUMNS} FROM runtimes WHERE id = $1 AND workspace_id = $2"),
            &[&id.to_string(), &workspace.to_string()],
        )?;
        row.as_ref().map(parse_runtime).transpose()
    }

    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let (id, workspace) = (id.to_string(), workspace.to_string());
        // The lock first (see ROOM), then a statement of its own, whose snapshot is taken
        // under the lock: it counts every request the cascade removes.
        tx.execute(
            "SELECT 1 FROM workspaces WHERE id = $1 FOR NO KEY UPDATE",
            &[&workspace],
        )?;
        // The runtime's requests go with it (ON DELETE CASCADE), and out of the count.
        let deleted = tx.query(
            "WITH gone AS (DELETE FROM runtimes WHERE id = $1 AND workspace_id = $2 RETURNING id)
             UPDATE workspaces
                SET stored_requests = stored_requests
                                      - (SELECT count(*) FROM requests WHERE runtime_id = $1)
              WHERE id = $2 AND EXISTS (SELECT 1 FROM gone)
             RETURNING 1",
            &[&id, &workspace],
        )?;
        tx.commit()?;
        Ok(deleted.len() == 1)
    }

    fn daemon_by_token(&self, token: &TokenHash) -> Result<Option<Daemon>> {
        let row = self.conn()?.query_opt(
            "SELECT id, last_seen_at,
                    (SELECT string_agg(DISTINCT kind, ',') FROM requests
                      WHERE runtime_id = runtimes.id AND status = 'pending'),
                    (SELECT string_agg(kind || ' ' || id, ',') FROM requests
                      WHERE runtime_id = runtimes.id AND status = 'running'
                        AND renewed_at IS NULL)
               FROM runtimes WHERE daemon_token_hash = $1",
            &[&token.as_str()],
        )?;
        row.map(|row| {
            let (pending, unrenewed) = daemon_lists_from_db(row.try_get(2)?, row.try_get(3)?)?;
            Ok(Daemon {
                runtime: runtime_id_from_db(row.try_get(0)?)?,
                last_seen_at: row.try_get(1)?,
                pending,
                unrenewed,
            })
        })
        .transpose()
    }

    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool> {
        // GREATEST: instances whose clocks differ a little never move last_seen_at back.
        let changed = self.conn()?.execute(
            "UPDATE runtimes SET last_seen_at = GREATEST(COALESCE(last_seen_at, $2), $2)
              WHERE id = $1",
            &[&id.to_string(), &now],
        )?;
        Ok(changed == 1)
    }

    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>> {
        let row = self.conn()?.query_opt(
            &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1 AND runtime_id = $2"),
            &[&id.to_string(), &runtime.to_string()],
        )?;
        row.as_ref().map(parse_request).transpose()
    }

    fn find_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        // The request's columns first, where parse_request reads them; then whether the
        // runtime was found. No row at all: the token is nobody's.
        let row = self.conn()?.query_opt(
            "SELECT r.id, r.runtime_id, r.status, r.models, r.supported, r.error,
                    r.created_at, r.updated_at, r.deadline_at, r.ended_at,
                    r.fallback, r.cached_at, r.refresh_id, r.kind, r.coalesce_key,
                    r.input, r.result, rt.id IS NOT NULL
               FROM api_tokens t
               LEFT JOIN runtimes rt ON rt.id = $2 AND rt.workspace_id = t.workspace_id
               LEFT JOIN requests r ON r.id = $3 AND r.runtime_id = rt.id
              WHERE t.token_hash = $1",
            &[&api_token.as_str(), &runtime.to_string(), &id.to_string()],
        )?;
        let Some(row) = row else {
            return Ok(Scoped::Unauthorized);
        };
        if !row.try_get::<_, bool>(17)? {
            return Ok(Scoped::NoRuntime);
        }
        Ok(Scoped::Found(match row.try_get::<_, Option<&str>>(0)? {
            Some(_) => Some(parse_request(&row)?),
            None => None,
        }))
    }

    fn create_or_coalesce_within(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>> {
        let mut conn = self.conn()?;
        let (runtime_text, id_text) = (runtime.to_string(), new.id.to_string());
        // The common case first, in one round trip: the runtime exists, its workspace has
        // room and it has no active request, so there is nothing to end and the insert goes
        // in. When nothing comes back, the transaction below sorts out why.
        let inserted = conn.query_opt(
            &create_within_sql(),
            &[
                &id_text,
                &runtime_text,
                &now,
                &self.timeouts.of(new.kind).pending_deadline(now),
                &i64::try_from(max).unwrap_or(i64::MAX),
                &new.kind.name(),
                &new.key,
                &new.input,
            ],
        );
        match inserted {
            Ok(Some(row)) => {
                let request = parse_request(&row)?;
                let expired = Expired::default();
                return Ok(Added::Done(Created { request, expired }));
            }
            Ok(None) => {}
            // The runtime was deleted between the check and the insert's foreign key.
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                return Ok(Added::Missing);
            }
            Err(e) => return Err(e.into()),
        }
        // Each retry means an active request ended between our conflict and our read; a
        // third in a row would mean requests end faster than they can be created.
        for _ in 0..3 {
            let mut tx = conn.transaction()?;
            let settled =
                try_create_or_coalesce(&mut tx, &self.timeouts, &runtime_text, new, now, max)?;
            tx.commit()?;
            if let Some(answer) = settled {
                return Ok(answer);
            }
        }
        Err(StoreError::Corrupt(format!(
            "runtime {runtime}: no active request after three coalesced inserts"
        )))
    }

    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64> {
        let row = self.conn()?.query_opt(
            "SELECT stored_requests FROM workspaces WHERE id = $1",
            &[&workspace.to_string()],
        )?;
        let stored: Option<i64> = row.map(|row| row.try_get(0)).transpose()?;
        Ok(stored.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn claim_next_pending(&self, runtime: RuntimeId, kind: Kind, now: Millis) -> Result<Claim> {
        // One statement: expire the runtime's overdue pending requests, and claim the oldest
        // claimable one. The two parts touch disjoint rows (deadline passed / not passed).
        let row = self.conn()?.query_one(
            "WITH expired AS (
                 UPDATE requests
                    SET status = 'timeout', error = $4, updated_at = deadline_at, ended_at = deadline_at
                  WHERE runtime_id = $1 AND kind = $5 AND status = 'pending' AND deadline_at <= $2
                 RETURNING 1
             ), claimed AS (
                 UPDATE requests SET status = 'running', deadline_at = $3, updated_at = $2
                  WHERE id = (SELECT id FROM requests
                               WHERE runtime_id = $1 AND kind = $5 AND status = 'pending'
                                 AND deadline_at > $2
                               ORDER BY created_at, id LIMIT 1
                               FOR UPDATE SKIP LOCKED)
                    AND status = 'pending'
                 RETURNING id, input
             )
             SELECT (SELECT count(*) FROM expired), (SELECT id FROM claimed),
                    (SELECT input FROM claimed)",
            &[
                &runtime.to_string(),
                &now,
                &self.timeouts.of(kind).running_deadline(now),
                &kind.timeout_error(&self.timeouts.of(kind), Status::Pending),
                &kind.name(),
            ],
        )?;
        let expired: i64 = row.try_get(0)?;
        let claimed: Option<&str> = row.try_get(1)?;
        Ok(Claim {
            claimed: claimed.map(request_id_from_db).transpose()?,
            input: row.try_get(2)?,
            expired: Expired::default().plus(Status::Pending, upkeep::count_from_db(expired)?),
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
        let (id, runtime) = (id.to_string(), runtime.to_string());
        let lease = self.timeouts.of(kind).running_deadline(now);
        let changed = match report {
            Report::Running | Report::Progress(_) => {
                let progress = match report {
                    Report::Progress(result) => Some(result.as_str()),
                    _ => None,
                };
                conn.execute(
                    "UPDATE requests SET deadline_at = $4, updated_at = $3, renewed_at = $3,
                                         result = COALESCE($6, result)
                      WHERE id = $1 AND runtime_id = $2 AND kind = $5 AND status = 'running'
                        AND deadline_at > $3",
                    &[&id, &runtime, &now, &lease, &kind.name(), &progress],
                )?
            }
            Report::Ended(outcome) => {
                let catalog = match kind {
                    Kind::Models => outcome.catalog(),
                    _ => CatalogChange::Keep,
                };
                let row = conn.query_one(
                    report_sql(catalog),
                    &[
                        &id,
                        &runtime,
                        &now,
                        &outcome.status.as_str(),
                        &models_to_db(&outcome.models),
                        &outcome.supported,
                        &outcome.error,
                        &outcome.fallback,
                        &outcome.result,
                        &kind.name(),
                    ],
                )?;
                upkeep::count_from_db(row.try_get(0)?)?
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
        let changed = self.conn()?.execute(
            "UPDATE requests
                SET status = 'timeout', error = $4, updated_at = deadline_at, ended_at = deadline_at
              WHERE id = $1 AND status = $2 AND status IN ('pending', 'running')
                AND deadline_at <= $3 AND kind = $5",
            &[
                &id.to_string(),
                &phase.as_str(),
                &now,
                &kind.timeout_error(&self.timeouts.of(kind), phase),
                &kind.name(),
            ],
        )?;
        Ok(changed == 1)
    }

    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired> {
        upkeep::expire_overdue(
            &mut *self.conn()?,
            kind,
            &self.timeouts.of(kind),
            now,
            limit,
        )
    }

    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64> {
        upkeep::delete_ended_before(&mut *self.conn()?, kind, cutoff, limit)
    }

    fn count_requests(&self) -> Result<RequestCounts> {
        upkeep::count_requests(&mut *self.conn()?)
    }

    fn checkpoint(&self) -> Result<()> {
        // Autovacuum keeps PostgreSQL's tables and log in shape; nothing to do here.
        Ok(())
    }

    fn hand_out_again(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool> {
        let changed = self.conn()?.execute(
            "UPDATE requests SET deadline_at = $4, updated_at = $3
              WHERE id = $1 AND runtime_id = $2 AND kind = $5 AND status = 'running'
                AND renewed_at IS NULL AND deadline_at > $3",
            &[
                &id.to_string(),
                &runtime.to_string(),
                &now,
                &self.timeouts.of(kind).running_deadline(now),
                &kind.name(),
            ],
        )?;
        Ok(changed == 1)
    }

    fn active_requests(&self) -> Result<Vec<Active>> {
        upkeep::active_requests(&mut *self.conn()?)
    }

    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>> {
        let mut conn = self.conn()?;
        let runtime_text = runtime.to_string();
        let refresh_text = refresh.map(|r| r.to_string());
        // The common answer, the one handed out a moment ago, is a read. Two callers that
        // both find none each store one: no more than the callers.
        let reused = conn.query_opt(
            &format!(
                "SELECT {REQUEST_COLUMNS}
                   FROM requests,
                        (SELECT reported_at, models AS catalog_models,
                                supported AS catalog_supported
                           FROM catalogs WHERE runtime_id = $1 AND reported_at > $2) catalog
                  WHERE runtime_id = $1 AND cached_at = catalog.reported_at
                    AND status = 'completed' AND kind = 'models'
                    AND models = catalog_models AND supported = catalog_supported
                    AND refresh_id IS NOT DISTINCT FROM $3::text AND ended_at >= $4
                  ORDER BY ended_at DESC LIMIT 1"
            ),
            &[
                &runtime_text,
                &reported_after,
                &refresh_text,
                &ask.reuse_after,
            ],
        )?;
        if let Some(row) = reused {
            return Ok(Added::Done(parse_request(&row)?));
        }
        let row = conn.query_opt(
            &format!(
                "WITH {ROOM},
                      new AS (
                 INSERT INTO requests (id, runtime_id, status, models, supported, created_at,
                                       updated_at, deadline_at, ended_at, cached_at, refresh_id)
                 SELECT $1, c.runtime_id, 'completed', c.models, c.supported, $3::bigint,
                        $3::bigint, $3::bigint, $3::bigint, c.reported_at, $4::text
                   FROM catalogs c, room WHERE c.runtime_id = $2 AND c.reported_at > $6
                 RETURNING {REQUEST_COLUMNS}),
                      {COUNTED}
                 SELECT * FROM new"
            ),
            &[
                &ask.cached.to_string(),
                &runtime_text,
                &now,
                &refresh_text,
                &i64::try_from(ask.max_stored).unwrap_or(i64::MAX),
                &reported_after,
            ],
        )?;
        if let Some(row) = row {
            return Ok(Added::Done(parse_request(&row)?));
        }
        let catalog = conn.query_opt(
            "SELECT 1 FROM catalogs WHERE runtime_id = $1 AND reported_at > $2",
            &[&runtime_text, &reported_after],
        )?;
        Ok(match catalog {
            Some(_) => Added::Full,
            None => Added::Missing,
        })
    }

    fn listens(&self) -> bool {
        self.pool_mode == PoolMode::Session
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        Ok(Box::new(listen::Notifications::open(&self.config)?))
    }
}
