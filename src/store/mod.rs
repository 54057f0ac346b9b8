//! The `Storer` trait: every operation the service needs from its database, declared once.
//!
//! Engines implement the *primitives*: each is one query or one short transaction, and
//! every state change among them is a compare-and-set whose row count is checked. The
//! *composites* (lazy expiry on read, the answer to a report, a heartbeat) are written
//! once here on top of the primitives, so no engine can drift from the others.
//!
//! Engines: [`memory`] (tests and the reference model), [`sqlite`] (embedded default),
//! [`postgres`] (several machines). Only these modules know SQL.

pub mod memory;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use crate::clock::Millis;
use crate::config::DatabaseUrl;
use crate::ids::{RandomError, RequestId, RuntimeId, TokenHash, WorkspaceId};
use crate::model::{ModelRequest, Report, ReportOutcome, Runtime, Status, Timeouts};

/// The store could not answer. The HTTP layer turns every one of these into
/// 503 `store unavailable`: none of them says anything about the caller's input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no database connection: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    #[error("the database schema is version {found}; this build knows up to {known}")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error("the store is closed")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The schema every engine applies at start-up (idempotent), and its version.
pub const SCHEMA: &str = include_str!("../../schema.sql");
pub const SCHEMA_VERSION: i64 = 1;

/// A runtime about to be created.
#[derive(Clone, Debug)]
pub struct NewRuntime {
    pub id: RuntimeId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub provider: String,
    pub daemon_token: TokenHash,
}

/// The answer to a heartbeat.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Heartbeat {
    /// The runtime does not exist (any more).
    UnknownRuntime,
    /// Recorded; the request this heartbeat claimed, if any.
    Alive(Option<RequestId>),
}

pub trait Storer: Send + Sync {
    // ---- primitives: one query or one short transaction each ----

    /// A cheap query that proves the database answers.
    fn ping(&self) -> Result<()>;

    /// The deadlines this store writes and the errors it gives requests that miss them.
    fn timeouts(&self) -> Timeouts;

    fn create_workspace(
        &self,
        id: WorkspaceId,
        name: &str,
        api_token: &TokenHash,
        now: Millis,
    ) -> Result<()>;

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>>;

    fn create_runtime(&self, new: &NewRuntime, now: Millis) -> Result<Runtime>;

    /// The workspace's runtimes, oldest first.
    fn list_runtimes(&self, workspace: WorkspaceId) -> Result<Vec<Runtime>>;

    /// The runtime, if it exists and belongs to `workspace`.
    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>>;

    /// Deletes the runtime and its requests. False if it was not there (or not the
    /// workspace's).
    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool>;

    fn runtime_by_daemon_token(&self, token: &TokenHash) -> Result<Option<RuntimeId>>;

    /// Records that the runtime's daemon is alive. False if the runtime does not exist.
    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool>;

    /// The request as stored, if it belongs to `runtime`; no expiry applied.
    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<ModelRequest>>;

    /// Atomically: ends the runtime's overdue active request, then inserts a new pending
    /// request `id` unless the runtime still has an active one, which is returned instead.
    /// `None` if the runtime does not exist.
    fn create_or_coalesce(
        &self,
        runtime: RuntimeId,
        id: RequestId,
        now: Millis,
    ) -> Result<Option<ModelRequest>>;

    /// Moves the runtime's oldest claimable pending request to running, with a fresh lease.
    /// A pending request past its deadline is never claimed.
    fn claim_next_pending(&self, runtime: RuntimeId, now: Millis) -> Result<Option<RequestId>>;

    /// Compare-and-set: applies `report` if the request is running, its lease unexpired.
    /// False if it changed nothing.
    fn apply_report(
        &self,
        runtime: RuntimeId,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<bool>;

    /// Compare-and-set: ends one active request whose deadline has passed, as `timeout`.
    fn expire_request(&self, id: RequestId, now: Millis) -> Result<bool>;

    /// Ends every active request whose deadline has passed. Returns how many.
    fn expire_overdue(&self, now: Millis) -> Result<u64>;

    /// Deletes at most `limit` requests that ended before `cutoff`. Returns how many.
    fn delete_ended_before(&self, cutoff: Millis, limit: u32) -> Result<u64>;

    // ---- composites: written once, on the primitives ----

    /// The request with its deadline applied: an overdue one is ended first, so a reader
    /// never sees a request that should have timed out as still active.
    fn get_request(
        &self,
        runtime: RuntimeId,
        id: RequestId,
        now: Millis,
    ) -> Result<Option<ModelRequest>> {
        let found = self.find_request(runtime, id)?;
        match found {
            Some(request) if request.is_overdue(now) => {
                self.expire_request(id, now)?;
                self.find_request(runtime, id)
            }
            other => Ok(other),
        }
    }

    /// Records a daemon's report. A report that finds the request not running is refused,
    /// unless it repeats exactly the report that ended it (a retry after a lost answer).
    fn report(
        &self,
        runtime: RuntimeId,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<ReportOutcome> {
        if self.apply_report(runtime, id, report, now)? {
            return Ok(ReportOutcome::Recorded);
        }
        let Some(request) = self.get_request(runtime, id, now)? else {
            return Ok(ReportOutcome::NotFound);
        };
        Ok(match report {
            Report::Ended(outcome) if outcome.is_recorded_in(&request) => ReportOutcome::Replayed,
            _ => ReportOutcome::NotRunning(request.status),
        })
    }

    /// A daemon's heartbeat: marks the runtime alive and claims at most one request.
    fn heartbeat(&self, runtime: RuntimeId, now: Millis) -> Result<Heartbeat> {
        if !self.touch_runtime(runtime, now)? {
            return Ok(Heartbeat::UnknownRuntime);
        }
        Ok(Heartbeat::Alive(self.claim_next_pending(runtime, now)?))
    }
}

/// Opens the store a database URL names, creating or upgrading its schema.
pub fn open(url: &DatabaseUrl, timeouts: Timeouts) -> Result<Arc<dyn Storer>> {
    Ok(match url {
        DatabaseUrl::Sqlite { path, synchronous } => Arc::new(sqlite::SqliteStore::open_with(
            path,
            timeouts,
            *synchronous,
        )?),
        DatabaseUrl::Postgres(url) => Arc::new(postgres::PostgresStore::open(url, timeouts)?),
    })
}

/// The columns' text form of a status, for the engines.
fn status_from_db(s: &str) -> Result<Status> {
    Status::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}")))
}

fn request_id_from_db(s: &str) -> Result<RequestId> {
    RequestId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad request id {s:?}")))
}

fn runtime_id_from_db(s: &str) -> Result<RuntimeId> {
    RuntimeId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad runtime id {s:?}")))
}

fn workspace_id_from_db(s: &str) -> Result<WorkspaceId> {
    WorkspaceId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad workspace id {s:?}")))
}

fn models_from_db(json: Option<&str>) -> Result<Vec<crate::model::ModelEntry>> {
    match json {
        None => Ok(Vec::new()),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| StoreError::Corrupt(format!("models column: {e}"))),
    }
}

/// Models as stored: `NULL` for none, so an empty list and a missing one read the same.
fn models_to_db(models: &[crate::model::ModelEntry]) -> Option<String> {
    if models.is_empty() {
        None
    } else {
        // Serializing plain strings and booleans cannot fail.
        serde_json::to_string(models).ok()
    }
}
