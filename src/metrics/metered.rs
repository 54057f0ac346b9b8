//! `MeteredStore`: any engine, with each primitive timed and counted into the instance's
//! [`Metrics`], and the transitions the store makes on its own (claims, timeouts) counted
//! and logged. It knows no SQL and changes no answer.
//!
//! Only the primitives are wrapped. The composites are the trait's default methods, so
//! they run here on the wrapped primitives and every store call they make is measured.

use std::sync::Arc;
use std::time::Instant;

use super::Metrics;
use crate::clock::Millis;
use crate::ids::{RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use crate::kind::{Kind, PerKind};
use crate::model::{Report, Runtime, Status, StoredRequest, Timeouts};
use crate::store::{
    Active, Added, ApiToken, ApiTokenUse, Ask, Claim, Created, Daemon, Expired, Listener,
    NewRequest, NewRuntime, RequestCounts, Result, RuntimeCursor, Scoped, Storer, Workspace,
};

pub struct MeteredStore {
    inner: Arc<dyn Storer>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Storer>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    /// Runs one primitive of the engine, timing it under `op`.
    fn timed<T>(&self, op: &'static str, call: impl FnOnce(&dyn Storer) -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let result = call(self.inner.as_ref());
        self.metrics
            .observe_store(op, started.elapsed(), result.is_ok());
        result
    }

    /// Counts and logs requests that a call ended as `timeout` on the way.
    fn expired_on_the_way(&self, runtime: RuntimeId, kind: Kind, expired: Expired) {
        if expired.total() > 0 {
            self.metrics.expired(kind, expired);
            let kind = kind.name();
            tracing::info!(%runtime, kind, expired.pending, expired.running, "request timed out");
        }
    }
}

impl Storer for MeteredStore {
    fn ping(&self) -> Result<()> {
        self.timed("ping", |s| s.ping())
    }

    fn timeouts(&self) -> PerKind<Timeouts> {
        self.inner.timeouts()
    }

    fn reads_in_place(&self) -> bool {
        self.inner.reads_in_place()
    }

    fn create_workspace(
        &self,
        id: WorkspaceId,
        name: &str,
        api_token: &TokenHash,
        now: Millis,
    ) -> Result<()> {
        self.timed("create_workspace", |s| {
            s.create_workspace(id, name, api_token, now)
        })
    }

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>> {
        self.timed("workspace_by_api_token", |s| {
            s.workspace_by_api_token(token)
        })
    }

    fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        self.timed("list_workspaces", |s| s.list_workspaces())
    }

    fn create_api_token(
        &self,
        workspace: WorkspaceId,
        token: &TokenHash,
        now: Millis,
    ) -> Result<bool> {
        self.timed("create_api_token", |s| {
            s.create_api_token(workspace, token, now)
        })
    }

    fn list_api_tokens(&self, workspace: WorkspaceId) -> Result<Vec<ApiToken>> {
        self.timed("list_api_tokens", |s| s.list_api_tokens(workspace))
    }

    fn revoke_api_token(&self, workspace: WorkspaceId, id: &TokenId) -> Result<bool> {
        self.timed("revoke_api_token", |s| s.revoke_api_token(workspace, id))
    }

    fn api_token_use(&self, token: &TokenHash) -> Result<Option<ApiTokenUse>> {
        self.timed("api_token_use", |s| s.api_token_use(token))
    }

    fn touch_api_token(&self, token: &TokenHash, now: Millis) -> Result<bool> {
        self.timed("touch_api_token", |s| s.touch_api_token(token, now))
    }

    fn rotate_daemon_token(
        &self,
        workspace: WorkspaceId,
        runtime: RuntimeId,
        token: &TokenHash,
    ) -> Result<bool> {
        self.timed("rotate_daemon_token", |s| {
            s.rotate_daemon_token(workspace, runtime, token)
        })
    }
    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>> {
        self.timed("create_runtime", |s| s.insert_runtime(new, now, max))
    }

    fn list_runtimes(
        &self,
        workspace: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>> {
        self.timed("list_runtimes", |s| {
            s.list_runtimes(workspace, after, limit)
        })
    }

    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>> {
        self.timed("find_runtime", |s| s.find_runtime(workspace, id))
    }

    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool> {
        self.timed("delete_runtime", |s| s.delete_runtime(workspace, id))
    }

    fn daemon_by_token(&self, token: &TokenHash) -> Result<Option<Daemon>> {
        self.timed("daemon_by_token", |s| s.daemon_by_token(token))
    }

    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool> {
        self.timed("touch_runtime", |s| s.touch_runtime(id, now))
    }

    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>> {
        self.timed("find_request", |s| s.find_request(runtime, id))
    }

    fn find_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        self.timed("find_request_by_token", |s| {
            s.find_request_by_token(api_token, runtime, id)
        })
    }

    fn create_or_coalesce_within(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>> {
        // Labelled by what it does, as before it had a limit: dashboards keep their series.
        let created = self.timed("create_or_coalesce", |s| {
            s.create_or_coalesce_within(runtime, new, now, max)
        })?;
        if let Added::Done(created) = &created {
            self.expired_on_the_way(runtime, new.kind, created.expired);
        }
        Ok(created)
    }

    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64> {
        self.timed("stored_requests", |s| s.stored_requests(workspace))
    }

    fn claim_next_pending(&self, runtime: RuntimeId, kind: Kind, now: Millis) -> Result<Claim> {
        let claim = self.timed("claim_next_pending", |s| {
            s.claim_next_pending(runtime, kind, now)
        })?;
        self.expired_on_the_way(runtime, kind, claim.expired);
        if claim.claimed.is_some() {
            self.metrics.claimed(kind);
        }
        Ok(claim)
    }

    fn apply_report(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        report: &Report,
        now: Millis,
    ) -> Result<bool> {
        self.timed("apply_report", |s| {
            s.apply_report(runtime, kind, id, report, now)
        })
    }

    fn expire_request(
        &self,
        id: RequestId,
        kind: Kind,
        phase: Status,
        now: Millis,
    ) -> Result<bool> {
        let ended = self.timed("expire_request", |s| s.expire_request(id, kind, phase, now))?;
        if ended {
            self.metrics.expired(kind, Expired::one(phase));
            let (kind, phase) = (kind.name(), phase.as_str());
            tracing::info!(request = %id, kind, phase, "request timed out");
        }
        Ok(ended)
    }

    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired> {
        // The sweeper logs what a whole sweep did; here it is only counted.
        let expired = self.timed("expire_overdue", |s| s.expire_overdue(kind, now, limit))?;
        self.metrics.expired(kind, expired);
        Ok(expired)
    }

    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64> {
        self.timed("delete_ended_before", |s| {
            s.delete_ended_before(kind, cutoff, limit)
        })
    }

    fn count_requests(&self) -> Result<RequestCounts> {
        self.timed("count_requests", |s| s.count_requests())
    }

    fn checkpoint(&self) -> Result<()> {
        self.timed("checkpoint", |s| s.checkpoint())
    }

    fn hand_out_again(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool> {
        self.timed("hand_out_again", |s| {
            s.hand_out_again(runtime, kind, id, now)
        })
    }

    fn active_requests(&self) -> Result<Vec<Active>> {
        self.timed("active_requests", |s| s.active_requests())
    }

    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>> {
        self.timed("answer_from_catalog", |s| {
            s.answer_from_catalog(runtime, ask, refresh, reported_after, now)
        })
    }

    fn listens(&self) -> bool {
        self.inner.listens()
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        self.timed("listen", |s| s.listen())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::MeteredStore;
    use crate::ids::{RequestId, RuntimeId};
    use crate::kind::{Kind, PerKind};
    use crate::metrics::Metrics;
    use crate::model::Timeouts;
    use crate::store::memory::MemoryStore;
    use crate::store::{Daemon, Storer};

    /// `heartbeat_writes` is what keeps a heartbeat on the async worker, so it must be
    /// exact: where it says no, the composite makes no store call at all; where it says
    /// yes, it does. The runtime does not exist, so every call the composite makes shows.
    #[test]
    fn heartbeat_writes_says_exactly_when_the_composite_calls_the_store() {
        let now = 1_000_000;
        let lost = RequestId::random().unwrap();
        let held: &[RequestId] = &[lost];
        let other: &[RequestId] = &[RequestId::random().unwrap()];
        for refresh_after in [0, 100] {
            for last_seen_at in [None, Some(now), Some(now - 100), Some(now - 101)] {
                for pending in [false, true] {
                    for unrenewed in [vec![], vec![(Kind::SkillImport, lost)]] {
                        for working_on in [None, Some(held), Some(other)] {
                            let metrics = Arc::new(Metrics::new());
                            let engine = Arc::new(MemoryStore::new(Timeouts::default()));
                            let store = MeteredStore::new(engine, Arc::clone(&metrics));
                            let daemon = Daemon {
                                runtime: RuntimeId::random().unwrap(),
                                last_seen_at,
                                pending: PerKind::from_fn(|k| pending && k == Kind::Update),
                                unrenewed: unrenewed.clone(),
                            };
                            store
                                .heartbeat(&daemon, now, refresh_after, working_on, true)
                                .unwrap();
                            let scraped = metrics.render(now).unwrap();
                            let called = scraped.lines().any(|l| {
                                l.starts_with("model_relay_store_operation_duration_seconds_count")
                            });
                            assert_eq!(
                                called,
                                daemon.heartbeat_writes(now, refresh_after, working_on),
                                "{daemon:?}, refresh_after {refresh_after}, {working_on:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
