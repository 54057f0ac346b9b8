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

use std::time::Duration;

use crate::clock::Millis;
use crate::ids::{RandomError, RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use crate::kind::{Kind, PerKind};
use crate::model::{Report, ReportOutcome, Runtime, Status, StoredRequest, Timeouts, replace_nul};

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
    #[error("database file: {0}")]
    File(#[from] std::io::Error),
    #[error(
        "the database schema is version {found}, newer than this build of model-relay knows \
         (up to {known}): run the release that wrote it, or a newer one"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("schema migration {name}: {source}")]
    Migration {
        name: &'static str,
        source: Box<StoreError>,
    },
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error("the store is closed")]
    Closed,
    /// Only at opening: the database URL asks for something this build does not do.
    #[error("database URL: {0}")]
    Config(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The newest schema as one readable file. The engines build it from their numbered
/// migrations; a test holds the two equal.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// The schema version this build writes: the number of the last migration, the same for
/// every dialect.
pub const SCHEMA_VERSION: i64 = 7;

/// One numbered step of a dialect's schema, applied at most once, in order, in the
/// transaction that records its number.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// A dialect's migrations, from `migration/main/<name>.sql` beside the invoking module.
macro_rules! migrations {
    ($($version:literal $name:literal),* $(,)?) => {
        &[$($crate::store::Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("main/", $name, ".sql")),
        }),*]
    };
}
use migrations;

/// The migrations a database at version `found` still needs; a database newer than this
/// build is refused rather than run by code that does not know its schema.
fn migrations_after(migrations: &[Migration], found: i64) -> Result<&[Migration]> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(&migrations[migrations.partition_point(|m| m.version <= found)..])
}

/// How long a store call waits, by default, for a pooled connection, for SQLite's write
/// lock, or for a PostgreSQL statement, before it fails (and its caller gets 503).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// A runtime about to be created.
#[derive(Clone, Debug)]
pub struct NewRuntime {
    pub id: RuntimeId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub provider: String,
    pub daemon_token: TokenHash,
}

/// Where a page of runtimes starts: after the runtime with this `created_at` and `id`, in
/// the order `created_at, id` (the id breaks ties between runtimes made in the same
/// millisecond).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RuntimeCursor {
    pub created_at: Millis,
    pub id: RuntimeId,
}

impl RuntimeCursor {
    /// The cursor that continues after `runtime`.
    pub fn after(runtime: &Runtime) -> Self {
        RuntimeCursor {
            created_at: runtime.created_at,
            id: runtime.id,
        }
    }
}

/// A workspace as `workspace list` shows it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    pub created_at: Millis,
}

/// An API token as an operator sees it: never the token, nor its hash.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ApiToken {
    pub id: TokenId,
    pub created_at: Millis,
    /// At most [`API_TOKEN_USE_REFRESH`] older than its last use.
    pub last_used_at: Option<Millis>,
}

/// What an API token says about its caller, read in one query.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ApiTokenUse {
    pub workspace: WorkspaceId,
    pub last_used_at: Option<Millis>,
}

/// How stale an API token's `last_used_at` may get before a call writes it again: a write
/// per call would put every UI read in SQLite's one write queue (heartbeats' `last_seen_at`
/// follows the same rule).
pub const API_TOKEN_USE_REFRESH: Millis = 60_000;

impl ApiTokenUse {
    /// Whether a call at `now` should record its use ([`Storer::touch_api_token`]).
    pub fn touch_due(&self, now: Millis) -> bool {
        token_use_due(self.last_used_at, now)
    }
}

/// Whether a use at `now` is to be recorded over `last_used_at`: the rule of
/// [`ApiTokenUse::touch_due`], and the condition of the memory engine's compare-and-set
/// (the SQL engines write it in their `WHERE`).
fn token_use_due(last_used_at: Option<Millis>, now: Millis) -> bool {
    last_used_at.is_none_or(|used| used <= now - API_TOKEN_USE_REFRESH)
}

/// A request about to be created.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewRequest {
    pub id: RequestId,
    pub kind: Kind,
    /// The coalescing key (the value of the kind's key field), empty for kinds without one.
    pub key: String,
    /// The kind's input as a JSON object, `None` for none.
    pub input: Option<String>,
}

impl NewRequest {
    /// A request of a kind that takes no input.
    pub fn of(kind: Kind, id: RequestId) -> Self {
        NewRequest {
            id,
            kind,
            key: String::new(),
            input: None,
        }
    }
}

/// What a daemon token says about its runtime, read in one query so that an idle heartbeat
/// costs one round trip: which runtime it is, when it was last seen, and whether a request
/// waits for it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Daemon {
    pub runtime: RuntimeId,
    pub last_seen_at: Option<Millis>,
    /// Per kind, whether the runtime had a pending request (overdue ones included) when
    /// this was read.
    pub pending: PerKind<bool>,
    /// The runtime's running requests that have had no renewal since they were handed
    /// out: a heartbeat whose `working_on` does not list one hands it out again (its
    /// answer was lost).
    pub unrenewed: Vec<(Kind, RequestId)>,
}

impl Daemon {
    /// Whether the stored `last_seen_at` is recent enough that a heartbeat at `now` need
    /// not write it again (see [`Storer::heartbeat`]).
    fn seen_lately(&self, now: Millis, refresh_after: Millis) -> bool {
        refresh_after > 0
            && self
                .last_seen_at
                .is_some_and(|seen| seen >= now - refresh_after)
    }

    /// The requests a heartbeat holding `working_on` should be handed again: the runtime's
    /// unrenewed running requests that the daemon says it does not hold. Without
    /// `working_on` nothing is handed out twice.
    pub fn lost_hand_outs<'a>(
        &'a self,
        working_on: Option<&'a [RequestId]>,
    ) -> impl Iterator<Item = (Kind, RequestId)> + 'a {
        let held = working_on.unwrap_or_default();
        let asked = working_on.is_some();
        self.unrenewed
            .iter()
            .copied()
            .filter(move |(_, id)| asked && !held.contains(id))
    }

    /// Whether any request waits to be claimed.
    pub fn any_pending(&self) -> bool {
        Kind::ALL.into_iter().any(|kind| self.pending.of(kind))
    }

    /// Whether [`Storer::heartbeat`] at `now` writes anything: `last_seen_at` is due, a
    /// request waits to be claimed, or a lost hand-out is to be made again. When not, it
    /// makes no store call at all.
    pub fn heartbeat_writes(
        &self,
        now: Millis,
        refresh_after: Millis,
        working_on: Option<&[RequestId]>,
    ) -> bool {
        self.any_pending()
            || !self.seen_lately(now, refresh_after)
            || self.lost_hand_outs(working_on).next().is_some()
    }
}

/// What a web-UI call about one runtime's request finds, from the API token down, in one
/// query: each level is a different answer (401, 404 runtime, then the request or not).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Scoped<T> {
    /// No workspace has this API token.
    Unauthorized,
    /// The runtime does not exist in the token's workspace.
    NoRuntime,
    Found(T),
}

/// A request a heartbeat hands out: claimed by it, or handed out again.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Handed {
    pub id: RequestId,
    pub kind: Kind,
    /// The request's input (its hand-out carries some of its fields).
    pub input: Option<String>,
}

/// The answer to a heartbeat.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Heartbeat {
    /// The runtime does not exist (any more).
    UnknownRuntime,
    /// Recorded; the requests this heartbeat hands out, at most one of each kind (or a
    /// kind's batch, when the daemon takes batches).
    Alive(Vec<Handed>),
}

/// Requests that one call ended as `timeout`, by the phase whose deadline they missed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Expired {
    pub pending: u64,
    pub running: u64,
}

impl Expired {
    pub fn total(self) -> u64 {
        self.pending + self.running
    }

    /// One request, ended in `phase`.
    pub fn one(phase: Status) -> Self {
        Expired::default().plus(phase, 1)
    }

    pub fn plus(mut self, phase: Status, n: u64) -> Self {
        match phase {
            Status::Pending => self.pending += n,
            Status::Running => self.running += n,
            // Only an active request can miss a deadline.
            Status::Completed | Status::Failed | Status::Timeout => {}
        }
        self
    }
}

impl std::ops::AddAssign for Expired {
    fn add_assign(&mut self, other: Expired) {
        self.pending += other.pending;
        self.running += other.running;
    }
}

/// What `create_or_coalesce` did: the request to answer with (new, or the runtime's active
/// one), and the overdue request it ended on the way, if any.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Created {
    pub request: StoredRequest,
    pub expired: Expired,
}

/// What a write that may add a stored request did.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Added<T> {
    /// Done: `T` is the request added, or the one already stored that answers instead.
    Done(T),
    /// Nothing to do it on: the runtime, or the catalog young enough, is gone.
    Missing,
    /// The runtime's workspace already stores its most requests, and none stored answers.
    Full,
}

/// What [`Storer::ask_for_models`] is asked.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// The id of a new request, if one is made.
    pub id: RequestId,
    /// The id of an answer from the catalog, if one is made.
    pub cached: RequestId,
    /// An answer from the catalog that ended at or after this, from the same catalog and
    /// naming the same refresh, is handed out again instead of a copy: the HTTP layer
    /// passes half the retention ago, so that a record handed out stays readable for at
    /// least that long.
    pub reuse_after: Millis,
    /// The most requests the runtime's workspace may store (`--max-requests-per-workspace`).
    pub max_stored: u64,
    /// Skip the catalog (the page's "Refresh").
    pub refresh: bool,
    /// Whether the runtime is online: an offline one gets no new discovery.
    pub online: bool,
    /// A catalog younger than this is answered from without asking the daemon.
    pub fresh: Millis,
    /// A catalog younger than this is answered from while the daemon is asked again.
    pub serve: Millis,
}

/// What [`Storer::ask_for_models`] did.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Asked {
    /// Answered from the catalog, `stale` when no longer fresh; `refresh` is the discovery
    /// started beside it (new, or the runtime's active one).
    Cached {
        /// Boxed: a record is large beside the other answers.
        answer: Box<StoredRequest>,
        stale: bool,
        refresh: Option<Created>,
    },
    /// A new request, or the runtime's active one.
    Discovery(Created),
    /// No catalog to answer from, and the runtime is offline.
    Offline,
    /// Nothing stored answers, and the workspace stores its most requests already.
    Full,
    /// The runtime is gone.
    NoRuntime,
}

/// What `claim_next_pending` did: the request it claimed (and its input), and the overdue
/// pending ones it ended instead of claiming.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Claim {
    pub claimed: Option<RequestId>,
    pub input: Option<String>,
    pub expired: Expired,
}

/// Requests per stored status, and when the oldest pending one was created. As stored: a
/// request past its deadline that nobody has looked at yet still counts as active.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RequestCounts {
    pub pending: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub timeout: u64,
    pub oldest_pending_created_at: Option<Millis>,
}

impl RequestCounts {
    pub fn of(&self, status: Status) -> u64 {
        match status {
            Status::Pending => self.pending,
            Status::Running => self.running,
            Status::Completed => self.completed,
            Status::Failed => self.failed,
            Status::Timeout => self.timeout,
        }
    }
}

/// An active request as the instance's re-check of its waiting calls needs it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Active {
    pub id: RequestId,
    pub runtime_id: RuntimeId,
    /// `Pending` or `Running`, as stored (an overdue request still counts as active).
    pub status: Status,
    pub deadline_at: Millis,
}

/// A change that a [`Listener`] learned of, made through any handle of the store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Change {
    /// A request of this runtime became pending.
    Pending(RuntimeId),
    /// This request changed its status.
    Status(RequestId),
    /// Something changed, but the listener cannot tell what (SQLite, memory), or it may
    /// have missed notifications (a reconnect): every waiter must re-check.
    Unknown,
}

/// How an instance learns of changes made through other handles of the store: other
/// instances, other processes. Kept apart from the primitives (River's `Listener`): it owns
/// a connection of its own and lives on a thread of its own, never in the pool.
pub trait Listener: Send {
    /// Waits up to `timeout` for changes; empty when none came. An error means the
    /// listener is broken: the caller opens a new one (and re-checks every waiter, since
    /// changes may have been missed meanwhile).
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Change>>;
}

pub trait Storer: Send + Sync {
    // ---- primitives: one query or one short transaction each ----

    /// A cheap query that proves the database answers.
    fn ping(&self) -> Result<()>;

    /// The deadlines this store writes, per kind (and so the errors it gives requests that
    /// miss them: [`Kind::timeout_error`]).
    fn timeouts(&self) -> PerKind<Timeouts>;

    /// Whether the read-only primitives answer within the process in microseconds, never
    /// waiting for a lock or a pooled connection held by a writer: then the HTTP layer runs
    /// them on its async worker and skips the hand-off to the blocking pool, which cost
    /// more than the read. True for SQLite (WAL readers do not wait for the writer; its
    /// reads have a pool of their own) and the memory engine. PostgreSQL's reads are round
    /// trips over the network, and its client must not run on an async worker: false.
    fn reads_in_place(&self) -> bool {
        false
    }

    fn create_workspace(
        &self,
        id: WorkspaceId,
        name: &str,
        api_token: &TokenHash,
        now: Millis,
    ) -> Result<()>;

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>>;

    /// Stores `new` as it is, unless its workspace already has `max` runtimes: then `None`
    /// and nothing is written. The count and the insert are one step (one statement, or
    /// one transaction holding the workspace's row), so concurrent creates from any
    /// number of instances never pass `max` together. Callers go through
    /// [`Storer::create_runtime_within`].
    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>>;

    /// Every workspace, oldest first.
    fn list_workspaces(&self) -> Result<Vec<Workspace>>;

    /// Adds an API token to the workspace. False if the workspace does not exist.
    fn create_api_token(
        &self,
        workspace: WorkspaceId,
        token: &TokenHash,
        now: Millis,
    ) -> Result<bool>;

    /// The workspace's API tokens, oldest first.
    fn list_api_tokens(&self, workspace: WorkspaceId) -> Result<Vec<ApiToken>>;

    /// Deletes the workspace's API token `id`: from then on it is unknown to every handle.
    /// False if there was none (or it is another workspace's).
    fn revoke_api_token(&self, workspace: WorkspaceId, id: &TokenId) -> Result<bool>;

    /// The caller an API token names, with when it was last used. Read-only.
    fn api_token_use(&self, token: &TokenHash) -> Result<Option<ApiTokenUse>>;

    /// Compare-and-set: records a use at `now` if the stored `last_used_at` is at least
    /// [`API_TOKEN_USE_REFRESH`] older (or absent). False if it changed nothing.
    fn touch_api_token(&self, token: &TokenHash, now: Millis) -> Result<bool>;

    /// Replaces the daemon token of the workspace's runtime: the old one is unknown from
    /// then on; the runtime keeps its id and its requests. False if there is no such
    /// runtime in the workspace.
    fn rotate_daemon_token(
        &self,
        workspace: WorkspaceId,
        runtime: RuntimeId,
        token: &TokenHash,
    ) -> Result<bool>;

    /// One page of the workspace's runtimes in the order `created_at, id`: at most `limit`,
    /// those after `after` (from the first when `None`). Keyset pagination on
    /// `runtimes_by_workspace`, never an offset, so a page costs the same wherever it is.
    fn list_runtimes(
        &self,
        workspace: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>>;

    /// The runtime, if it exists and belongs to `workspace`.
    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>>;

    /// Deletes the runtime and its requests. False if it was not there (or not the
    /// workspace's).
    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool>;

    /// The runtime this daemon token belongs to, with what a heartbeat reads first.
    fn daemon_by_token(&self, token: &TokenHash) -> Result<Option<Daemon>>;

    /// Records that the runtime's daemon is alive. False if the runtime does not exist.
    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool>;

    /// The request as stored, if it belongs to `runtime`; no expiry applied.
    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>>;

    /// [`Storer::find_request`] for a web-UI caller: the API token's workspace, its runtime
    /// and the request, in one query (a poll is the UI's most frequent call).
    fn find_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>>;

    /// Atomically: ends the runtime's overdue active request of the same kind and key,
    /// then inserts `new` as pending unless the runtime still has an active one of that
    /// kind and key, which is returned instead. The insert counts against the workspace's
    /// stored requests: `Full` when it stores `max` already (and nothing is active).
    /// `Missing` if the runtime does not exist.
    fn create_or_coalesce_within(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>>;

    /// [`Storer::create_or_coalesce_within`] whatever the workspace stores: for tooling
    /// and tests. The server always passes its limit. `None` if the runtime does not exist.
    fn create_or_coalesce(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
    ) -> Result<Option<Created>> {
        match self.create_or_coalesce_within(runtime, new, now, u64::MAX)? {
            Added::Done(created) => Ok(Some(created)),
            Added::Missing => Ok(None),
            Added::Full => Err(StoreError::Corrupt(
                "a create without a limit was refused".to_owned(),
            )),
        }
    }

    /// How many requests the workspace stores, as counted with every insert and delete:
    /// what `--max-requests-per-workspace` bounds.
    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64>;

    /// Moves the runtime's oldest claimable pending request of `kind` to running, with a
    /// fresh lease. A pending request past its deadline is never claimed: it is ended as
    /// `timeout`.
    fn claim_next_pending(&self, runtime: RuntimeId, kind: Kind, now: Millis) -> Result<Claim>;

    /// Compare-and-set: applies `report` if the request is of `kind` and running, its lease
    /// unexpired. False if it changed nothing.
    fn apply_report(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<bool>;

    /// Compare-and-set: ends the request (of `kind`) as `timeout` if it is still in `phase`
    /// (pending or running) and its deadline has passed.
    fn expire_request(&self, id: RequestId, kind: Kind, phase: Status, now: Millis)
    -> Result<bool>;

    /// Ends at most `limit` active requests of `kind` whose deadline has passed, pending
    /// ones first, each phase oldest deadline first, each with a compare-and-set. Fewer
    /// than `limit` means none are left.
    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired>;

    /// Deletes at most `limit` requests of `kind` that ended before `cutoff`. Returns how
    /// many.
    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64>;

    /// Requests per status, from indexes: cheap enough to run on every metrics scrape.
    fn count_requests(&self) -> Result<RequestCounts>;

    /// Housekeeping the engine needs besides the sweep. SQLite: checkpoints the write-ahead
    /// log and truncates it, so that the file stays small under a steady write load. The
    /// other engines have nothing to do.
    fn checkpoint(&self) -> Result<()>;

    /// Compare-and-set: gives the running request `id` a fresh lease if it has had no
    /// renewal since it was handed out and its lease has not run out — a hand-out again,
    /// after the answer that carried the first one was lost.
    fn hand_out_again(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool>;

    /// Every active request, in one query: what the instance's re-check of all its waiting
    /// calls compares against.
    fn active_requests(&self) -> Result<Vec<Active>>;

    /// An answer from the runtime's catalog, if the catalog was reported after
    /// `reported_after`: a stored record that ended at or after `ask.reuse_after` with this
    /// very catalog (`cached_at` its report time, the same models and `supported`) and the
    /// same `refresh`, or else a new one, `ask.cached`: `completed`, with the catalog's
    /// models and `supported`, `cached_at` when the catalog was reported, and `refresh`
    /// (the discovery started beside it, if any), counted against the workspace's
    /// `ask.max_stored`. Each is one statement, so the answer is exactly one catalog as it
    /// stood. `Missing` when there is no such catalog (any more).
    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>>;

    /// Opens a listener for changes made through any handle of this store. Blocking (it
    /// may connect): the instance calls it on its wake-up thread.
    fn listen(&self) -> Result<Box<dyn Listener>>;

    /// Whether [`Storer::listen`] can work where this store is. False for PostgreSQL behind
    /// a transaction pooler, whose sessions do not outlive a transaction: the instance then
    /// does not listen, and its re-check wakes what its own writes do not. No default, so
    /// that a wrapper cannot forget to pass it on.
    fn listens(&self) -> bool;

    // ---- composites: written once, on the primitives ----

    /// The request with its deadline applied: an overdue one is ended first, so a reader
    /// never sees a request that should have timed out as still active.
    fn get_request(
        &self,
        runtime: RuntimeId,
        id: RequestId,
        now: Millis,
    ) -> Result<Option<StoredRequest>> {
        let found = self.find_request(runtime, id)?;
        with_deadline_applied(self, runtime, found, now)
    }

    /// [`Storer::get_request`] for a web-UI caller, from its API token.
    fn get_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
        now: Millis,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        Ok(match self.find_request_by_token(api_token, runtime, id)? {
            Scoped::Found(found) => {
                Scoped::Found(with_deadline_applied(self, runtime, found, now)?)
            }
            other => other,
        })
    }

    /// Creates a runtime, with NUL in its name and provider replaced by U+FFFD
    /// ([`replace_nul`]) so that every engine stores the same runtime: PostgreSQL would
    /// refuse NUL, SQLite and memory keep it. Replaced, not refused: the store has no
    /// answer for bad input (every [`StoreError`] is a 503, which is what this would be on
    /// PostgreSQL otherwise). The HTTP layer refuses control characters in names with a
    /// 400 first; this is for callers that skip it, so that no engine differs even then.
    fn create_runtime_within(
        &self,
        new: &NewRuntime,
        now: Millis,
        max: u64,
    ) -> Result<Option<Runtime>> {
        if !new.name.contains('\0') && !new.provider.contains('\0') {
            return self.insert_runtime(new, now, max);
        }
        let mut cleaned = new.clone();
        replace_nul(&mut cleaned.name);
        replace_nul(&mut cleaned.provider);
        self.insert_runtime(&cleaned, now, max)
    }

    /// [`Storer::create_runtime_within`] whatever the workspace's count: for tooling and
    /// tests, which make the runtimes they need. The server always passes its limit.
    fn create_runtime(&self, new: &NewRuntime, now: Millis) -> Result<Runtime> {
        self.create_runtime_within(new, now, u64::MAX)?
            .ok_or_else(|| StoreError::Corrupt("a create without a limit was refused".to_owned()))
    }

    /// Records a daemon's report. A report that finds the request not running is refused,
    /// unless it repeats exactly the report that ended it (a retry after a lost answer).
    /// NUL in the outcome's texts is replaced first ([`Outcome::replace_nul`](crate::model::Outcome::replace_nul)), here and not
    /// per engine: every engine then records the same text, and a replay is compared with
    /// what was recorded, cleaned alike, so a daemon's retry of a report whose stderr held
    /// a NUL is still a replay.
    fn report(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<ReportOutcome> {
        // A copy per report (one per discovery) is nothing beside the write it precedes.
        let cleaned;
        let report = match report {
            Report::Ended(outcome) => {
                let mut outcome = outcome.clone();
                outcome.replace_nul();
                cleaned = Report::Ended(outcome);
                &cleaned
            }
            Report::Running | Report::Progress(_) => report,
        };
        if self.apply_report(runtime, kind, id, report, now)? {
            return Ok(ReportOutcome::Recorded);
        }
        let found = self.get_request(runtime, id, now)?;
        let Some(request) = found.filter(|r| r.kind == kind) else {
            return Ok(ReportOutcome::NotFound);
        };
        Ok(match report {
            Report::Ended(outcome) if outcome.is_recorded_in(&request) => ReportOutcome::Replayed,
            _ => ReportOutcome::NotRunning(request.status),
        })
    }

    /// The UI's "list the models" for `runtime`, as read by [`Storer::find_runtime`]: an
    /// answer from its catalog when that is young enough (and a discovery in the background
    /// when it is no longer fresh), else a new request or the active one. Two steps at most,
    /// each atomic; a catalog that went away between them is not answered from.
    fn ask_for_models(&self, runtime: &Runtime, ask: &Ask, now: Millis) -> Result<Asked> {
        let catalog_age = runtime
            .catalog_at
            .filter(|_| !ask.refresh)
            .map(|at| now.saturating_sub(at));
        // Whether a step was refused for the workspace's stored requests: the answer then,
        // if nothing else answers, rather than "offline".
        let mut full = false;
        let mut created = None;
        let discovery = NewRequest::of(Kind::Models, ask.id);
        if catalog_age.is_some_and(|age| age < ask.fresh) {
            let after = now - ask.fresh;
            match self.answer_from_catalog(runtime.id, ask, None, after, now)? {
                Added::Done(answer) => {
                    return Ok(Asked::Cached {
                        answer: Box::new(answer),
                        stale: false,
                        refresh: None,
                    });
                }
                Added::Full => full = true,
                Added::Missing => {}
            }
        } else if catalog_age.is_some_and(|age| age < ask.serve) {
            // The background discovery's outcome, kept: when it was refused, the create
            // below would only be refused again.
            if ask.online {
                created = Some(self.create_or_coalesce_within(
                    runtime.id,
                    &discovery,
                    now,
                    ask.max_stored,
                )?);
            }
            let refresh = match &created {
                Some(Added::Done(created)) => Some(created.clone()),
                _ => None,
            };
            let refresh_id = refresh.as_ref().map(|r| r.request.id);
            let after = now - ask.serve;
            match self.answer_from_catalog(runtime.id, ask, refresh_id, after, now)? {
                Added::Done(answer) => {
                    return Ok(Asked::Cached {
                        answer: Box::new(answer),
                        stale: true,
                        refresh,
                    });
                }
                Added::Full => full = true,
                Added::Missing => {}
            }
            if let Some(created) = refresh {
                return Ok(Asked::Discovery(created));
            }
        }
        if !ask.online {
            return Ok(if full { Asked::Full } else { Asked::Offline });
        }
        let created = match created {
            Some(created) => created,
            None => self.create_or_coalesce_within(runtime.id, &discovery, now, ask.max_stored)?,
        };
        Ok(match created {
            Added::Done(created) => Asked::Discovery(created),
            Added::Full => Asked::Full,
            Added::Missing => Asked::NoRuntime,
        })
    }

    /// A daemon's heartbeat, after [`Storer::daemon_by_token`]: marks the runtime alive and
    /// hands out at most one request of each kind (a kind's batch when the daemon takes
    /// `batches`) — lost hand-outs again when `working_on` says the daemon does not hold
    /// them, then the oldest pending ones.
    ///
    /// `last_seen_at` is written only when the stored one is older than `refresh_after`, and
    /// the claim is tried only when a request was pending, so that the common heartbeat
    /// (nothing pending, seen a moment ago) is the one read that found the daemon: on SQLite
    /// it never queues for the one write lock. The stored time then lags the last heartbeat
    /// by less than `refresh_after`; the HTTP layer passes a tenth of `offline_after`. Zero
    /// writes on every heartbeat.
    fn heartbeat(
        &self,
        daemon: &Daemon,
        now: Millis,
        refresh_after: Millis,
        working_on: Option<&[RequestId]>,
        batches: bool,
    ) -> Result<Heartbeat> {
        let runtime = daemon.runtime;
        if !daemon.seen_lately(now, refresh_after) && !self.touch_runtime(runtime, now)? {
            return Ok(Heartbeat::UnknownRuntime);
        }
        let mut handed: Vec<Handed> = Vec::new();
        for (kind, lost) in daemon.lost_hand_outs(working_on) {
            if has_room(&handed, kind, batches) && self.hand_out_again(runtime, kind, lost, now)? {
                // The hand-out names some of the input: read it (a lost answer is rare).
                let input = match kind.spec().ack_fields {
                    [] => None,
                    _ => self.find_request(runtime, lost)?.and_then(|r| r.input),
                };
                handed.push(Handed {
                    id: lost,
                    kind,
                    input,
                });
            }
        }
        self.claim_pending(daemon, now, batches, &mut handed)?;
        Ok(Heartbeat::Alive(handed))
    }

    /// The claims of a heartbeat: for each kind [`Daemon::pending`] names, the oldest
    /// pending requests, until `handed` holds one of that kind (its batch, with `batches`)
    /// or none is left.
    fn claim_pending(
        &self,
        daemon: &Daemon,
        now: Millis,
        batches: bool,
        handed: &mut Vec<Handed>,
    ) -> Result<()> {
        for kind in Kind::ALL.into_iter().filter(|&k| daemon.pending.of(k)) {
            while has_room(handed, kind, batches) {
                let claim = self.claim_next_pending(daemon.runtime, kind, now)?;
                let Some(id) = claim.claimed else { break };
                handed.push(Handed {
                    id,
                    kind,
                    input: claim.input,
                });
            }
        }
        Ok(())
    }
}

/// Whether a heartbeat that has `handed` out these requests may hand out one more of
/// `kind`: one of each kind, or a kind's batch when the daemon takes batches.
fn has_room(handed: &[Handed], kind: Kind, batches: bool) -> bool {
    let most = if batches { kind.spec().batch } else { 1 };
    handed.iter().filter(|h| h.kind == kind).count() < most
}

/// `found`, as stored, with its deadline applied: an overdue request is ended (one
/// compare-and-set) and read again. The one place a read ends a request.
fn with_deadline_applied<S: Storer + ?Sized>(
    store: &S,
    runtime: RuntimeId,
    found: Option<StoredRequest>,
    now: Millis,
) -> Result<Option<StoredRequest>> {
    match found {
        Some(request) if request.is_overdue(now) => {
            store.expire_request(request.id, request.kind, request.status, now)?;
            store.find_request(runtime, request.id)
        }
        other => Ok(other),
    }
}

/// The columns' text form of a status, for the engines.
fn status_from_db(s: &str) -> Result<Status> {
    Status::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown status {s:?}")))
}

fn kind_from_db(s: &str) -> Result<Kind> {
    Kind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown request kind {s:?}")))
}

/// A runtime's kinds pending and its unrenewed running requests, as [`Daemon`] has them.
type DaemonLists = (PerKind<bool>, Vec<(Kind, RequestId)>);

/// What the SQL engines' `daemon_by_token` aggregates: the kinds pending (`kind,kind`) and
/// the unrenewed running requests (`kind id,kind id`), each `NULL` for none. Sorted, so
/// that every engine hands lost requests out again in one order.
fn daemon_lists_from_db(pending: Option<&str>, unrenewed: Option<&str>) -> Result<DaemonLists> {
    let mut kinds = PerKind::all(false);
    for kind in pending.into_iter().flat_map(|p| p.split(',')) {
        kinds.set(kind_from_db(kind)?, true);
    }
    let mut running = Vec::new();
    for pair in unrenewed.into_iter().flat_map(|u| u.split(',')) {
        let (kind, id) = pair
            .split_once(' ')
            .ok_or_else(|| StoreError::Corrupt(format!("unrenewed request {pair:?}")))?;
        running.push((kind_from_db(kind)?, request_id_from_db(id)?));
    }
    running.sort();
    Ok((kinds, running))
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

fn token_id_from_db(s: &str) -> Result<TokenId> {
    TokenId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad token id {s:?}")))
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

#[cfg(test)]
mod migration_tests {
    use std::path::Path;

    use super::{Migration, SCHEMA_VERSION};

    /// Each dialect's migrations and the directory they come from.
    fn dialects() -> [(&'static [Migration], &'static str); 2] {
        [
            (
                super::sqlite::migration::MIGRATIONS,
                "src/store/sqlite/migration/main",
            ),
            (
                super::postgres::migration::MIGRATIONS,
                "src/store/postgres/migration/main",
            ),
        ]
    }

    /// `migrations_after` skips by version, so a gap or a step out of order would be
    /// skipped or applied out of turn; and the last one must be the version this build
    /// records.
    #[test]
    fn versions_run_from_one_to_schema_version_in_order() {
        for (migrations, dir) in dialects() {
            let versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
            assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>(), "{dir}");
            for m in migrations {
                assert!(
                    m.name.starts_with(&format!("{:03}_", m.version)),
                    "{dir}: {} is listed as version {}",
                    m.name,
                    m.version
                );
            }
        }
    }

    /// A migration file added to `main/` but not listed would never run: every database
    /// would silently lack it.
    #[test]
    fn every_sql_file_in_main_is_listed() {
        for (migrations, dir) in dialects() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
                .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let mut listed: Vec<&str> = migrations.iter().map(|m| m.name).collect();
            listed.sort_unstable();
            assert_eq!(files, listed, "the .sql files of {}", dir.display());
        }
    }
}
