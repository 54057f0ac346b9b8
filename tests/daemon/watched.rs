//! A store that counts what the daemon made the server do, and can be told to fail: the
//! server around it is real, so the daemon sees real 503s and 409s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use model_relay::clock::Millis;
use model_relay::ids::{RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use model_relay::kind::{Kind, PerKind};
use model_relay::model::{Report, Runtime, Status, StoredRequest, Timeouts};
use model_relay::store::memory::MemoryStore;
use model_relay::store::{
    Active, Added, ApiToken, ApiTokenUse, Ask, Claim, Created, Daemon, Expired, Listener,
    NewRequest, NewRuntime, RequestCounts, Result, RuntimeCursor, Scoped, StoreError, Storer,
    Workspace,
};

#[derive(Default)]
pub struct Knobs {
    /// Heartbeats that reached the store.
    pub heartbeats: AtomicU32,
    /// `{"status":"running"}` reports that reached the store.
    pub renewals: AtomicU32,
    /// Final (completed or failed) reports that reached the store.
    pub final_reports: AtomicU32,
    /// The next this-many heartbeats fail as a store outage (the server answers 503).
    pub fail_heartbeats: AtomicU32,
    /// The next this-many final reports fail as a store outage (503).
    pub fail_final_reports: AtomicU32,
    /// Every final report finds its request already timed out (the server answers 409).
    pub expire_before_final_report: AtomicBool,
}

pub struct WatchedStore {
    /// The engine underneath: memory, unless a test runs the daemon on every engine.
    inner: Arc<dyn Storer>,
    pub knobs: Arc<Knobs>,
}

impl WatchedStore {
    pub fn new() -> (Arc<Self>, Arc<Knobs>) {
        Self::on(Arc::new(MemoryStore::new(Timeouts::default())))
    }

    pub fn on(inner: Arc<dyn Storer>) -> (Arc<Self>, Arc<Knobs>) {
        let knobs = Arc::new(Knobs::default());
        let store = Arc::new(WatchedStore {
            inner,
            knobs: Arc::clone(&knobs),
        });
        (store, knobs)
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn outage<T>() -> Result<T> {
    Err(StoreError::Corrupt("injected outage".into()))
}

impl Storer for WatchedStore {
    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool> {
        if take_one(&self.knobs.fail_heartbeats) {
            return outage();
        }
        self.knobs.heartbeats.fetch_add(1, Ordering::SeqCst);
        self.inner.touch_runtime(id, now)
    }

    fn apply_report(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<bool> {
        if matches!(report, Report::Running | Report::Progress(_)) {
            self.knobs.renewals.fetch_add(1, Ordering::SeqCst);
            return self.inner.apply_report(runtime, kind, id, report, now);
        }
        self.knobs.final_reports.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.knobs.fail_final_reports) {
            return outage();
        }
        if self.knobs.expire_before_final_report.load(Ordering::SeqCst) {
            // As if the lease had run out just before the report arrived.
            self.inner
                .expire_request(id, kind, Status::Running, Millis::MAX)?;
        }
        self.inner.apply_report(runtime, kind, id, report, now)
    }

    // ---- the rest only delegates ----

    fn ping(&self) -> Result<()> {
        self.inner.ping()
    }
    fn timeouts(&self) -> PerKind<Timeouts> {
        self.inner.timeouts()
    }
    fn create_workspace(&self, id: WorkspaceId, n: &str, t: &TokenHash, now: Millis) -> Result<()> {
        self.inner.create_workspace(id, n, t, now)
    }
    fn workspace_by_api_token(&self, t: &TokenHash) -> Result<Option<WorkspaceId>> {
        self.inner.workspace_by_api_token(t)
    }
    fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        self.inner.list_workspaces()
    }
    fn create_api_token(&self, w: WorkspaceId, t: &TokenHash, now: Millis) -> Result<bool> {
        self.inner.create_api_token(w, t, now)
    }
    fn list_api_tokens(&self, w: WorkspaceId) -> Result<Vec<ApiToken>> {
        self.inner.list_api_tokens(w)
    }
    fn revoke_api_token(&self, w: WorkspaceId, id: &TokenId) -> Result<bool> {
        self.inner.revoke_api_token(w, id)
    }
    fn api_token_use(&self, t: &TokenHash) -> Result<Option<ApiTokenUse>> {
        self.inner.api_token_use(t)
    }
    fn touch_api_token(&self, t: &TokenHash, now: Millis) -> Result<bool> {
        self.inner.touch_api_token(t, now)
    }
    fn rotate_daemon_token(&self, w: WorkspaceId, rt: RuntimeId, t: &TokenHash) -> Result<bool> {
        self.inner.rotate_daemon_token(w, rt, t)
    }
    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>> {
        self.inner.insert_runtime(new, now, max)
    }
    fn list_runtimes(
        &self,
        w: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>> {
        self.inner.list_runtimes(w, after, limit)
    }
    fn find_runtime(&self, w: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>> {
        self.inner.find_runtime(w, id)
    }
    fn delete_runtime(&self, w: WorkspaceId, id: RuntimeId) -> Result<bool> {
        self.inner.delete_runtime(w, id)
    }
    fn daemon_by_token(&self, t: &TokenHash) -> Result<Option<Daemon>> {
        self.inner.daemon_by_token(t)
    }
    fn find_request(&self, rt: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>> {
        self.inner.find_request(rt, id)
    }
    fn find_request_by_token(
        &self,
        t: &TokenHash,
        rt: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        self.inner.find_request_by_token(t, rt, id)
    }
    fn create_or_coalesce_within(
        &self,
        rt: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>> {
        self.inner.create_or_coalesce_within(rt, new, now, max)
    }
    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64> {
        self.inner.stored_requests(workspace)
    }
    fn claim_next_pending(&self, rt: RuntimeId, kind: Kind, now: Millis) -> Result<Claim> {
        self.inner.claim_next_pending(rt, kind, now)
    }
    fn expire_request(
        &self,
        id: RequestId,
        kind: Kind,
        phase: Status,
        now: Millis,
    ) -> Result<bool> {
        self.inner.expire_request(id, kind, phase, now)
    }
    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired> {
        self.inner.expire_overdue(kind, now, limit)
    }
    fn count_requests(&self) -> Result<RequestCounts> {
        self.inner.count_requests()
    }
    fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint()
    }
    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64> {
        self.inner.delete_ended_before(kind, cutoff, limit)
    }
    fn hand_out_again(
        &self,
        rt: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool> {
        self.inner.hand_out_again(rt, kind, id, now)
    }
    fn active_requests(&self) -> Result<Vec<Active>> {
        self.inner.active_requests()
    }
    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>> {
        self.inner
            .answer_from_catalog(runtime, ask, refresh, reported_after, now)
    }
    fn listens(&self) -> bool {
        self.inner.listens()
    }
    fn listen(&self) -> Result<Box<dyn Listener>> {
        self.inner.listen()
    }
}
