//! The memory engine: one mutex over plain maps. It is the reference model the other
//! engines are checked against and the engine of unit tests. Its data dies with the
//! process, and two processes never share it, so it is never the engine of a deployment.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    Active, Added, ApiToken, ApiTokenUse, Ask, Change, Claim, Created, Daemon, Expired, Listener,
    NewRequest, NewRuntime, RequestCounts, Result, RuntimeCursor, Scoped, Storer, Workspace,
    token_use_due,
};
use crate::clock::Millis;
use crate::ids::{RequestId, RuntimeId, TokenHash, TokenId, WorkspaceId};
use crate::kind::{Kind, PerKind};
use crate::model::{CatalogChange, ModelEntry, Report, Runtime, Status, StoredRequest, Timeouts};

#[derive(Default)]
struct State {
    /// Present while the workspace exists.
    workspaces: HashMap<WorkspaceId, Workspace>,
    api_tokens: HashMap<TokenHash, StoredToken>,
    runtimes: HashMap<RuntimeId, Runtime>,
    daemon_tokens: HashMap<TokenHash, RuntimeId>,
    requests: HashMap<RequestId, StoredRequest>,
    /// Running requests renewed since they were handed out (the SQL engines' `renewed_at`).
    renewed: HashSet<RequestId>,
    catalogs: HashMap<RuntimeId, Catalog>,
}

/// An API token's row.
struct StoredToken {
    workspace: WorkspaceId,
    created_at: Millis,
    last_used_at: Option<Millis>,
}

/// A runtime's last good model list.
struct Catalog {
    models: Vec<ModelEntry>,
    supported: bool,
    reported_at: Millis,
}

impl StoredToken {
    fn new(workspace: WorkspaceId, now: Millis) -> Self {
        StoredToken {
            workspace,
            created_at: now,
            last_used_at: None,
        }
    }
}

impl State {
    /// How many requests the runtime's workspace stores: counted, where the SQL engines
    /// keep a count on the workspace's row. `None` if the runtime does not exist.
    fn stored_beside(&self, runtime: RuntimeId) -> Option<u64> {
        let workspace = self.runtimes.get(&runtime)?.workspace_id;
        Some(self.stored_in(workspace))
    }

    fn stored_in(&self, workspace: WorkspaceId) -> u64 {
        let count = self
            .requests
            .values()
            .filter(|r| {
                self.runtimes
                    .get(&r.runtime_id)
                    .is_some_and(|rt| rt.workspace_id == workspace)
            })
            .count();
        count as u64
    }

    /// The runtime as the SQL engines read it, joined with its catalog.
    fn runtime(&self, runtime: &Runtime) -> Runtime {
        Runtime {
            catalog_at: self.catalogs.get(&runtime.id).map(|c| c.reported_at),
            ..runtime.clone()
        }
    }
}

pub struct MemoryStore {
    timeouts: PerKind<Timeouts>,
    state: Mutex<State>,
    /// A count of writes, and the condition its listeners wait on.
    writes: Arc<(Mutex<u64>, Condvar)>,
}

/// The state, locked for a write: when it is released, listeners learn that something
/// changed. Every writing method takes it, so none can forget to tell them.
struct Writing<'a> {
    state: MutexGuard<'a, State>,
    writes: &'a (Mutex<u64>, Condvar),
}

impl Deref for Writing<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let (count, changed) = self.writes;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        changed.notify_all();
    }
}

/// A listener of the memory engine: wakes on any write through any handle of the store.
struct Writes {
    writes: Arc<(Mutex<u64>, Condvar)>,
    seen: u64,
}

impl Listener for Writes {
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Change>> {
        let (count, changed) = &*self.writes;
        let count = count.lock().unwrap_or_else(|p| p.into_inner());
        let (count, _) = changed
            .wait_timeout_while(count, timeout, |n| *n == self.seen)
            .unwrap_or_else(|p| p.into_inner());
        if *count == self.seen {
            return Ok(Vec::new());
        }
        self.seen = *count;
        Ok(vec![Change::Unknown])
    }
}

impl MemoryStore {
    pub fn new(timeouts: impl Into<PerKind<Timeouts>>) -> Self {
        MemoryStore {
            timeouts: timeouts.into(),
            state: Mutex::new(State::default()),
            writes: Arc::default(),
        }
    }

    fn writing(&self) -> Writing<'_> {
        Writing {
            state: self.state(),
            writes: &self.writes,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change below is made whole before the guard drops, so a panic elsewhere
        // cannot leave half a change behind: the poisoned state is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ends `request` as `timeout` if it is overdue: what it ended, if anything. The one place
/// the memory engine expires.
fn expire(timeouts: &PerKind<Timeouts>, request: &mut StoredRequest, now: Millis) -> Expired {
    if !request.is_overdue(now) {
        return Expired::default();
    }
    let phase = request.status;
    let kind = request.kind;
    request.error = Some(kind.timeout_error(&timeouts.of(kind), phase));
    request.status = Status::Timeout;
    request.updated_at = request.deadline_at;
    request.ended_at = Some(request.deadline_at);
    Expired::one(phase)
}

impl Storer for MemoryStore {
    fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn timeouts(&self) -> PerKind<Timeouts> {
        self.timeouts
    }

    /// A mutex held for the length of a map lookup.
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
        let mut state = self.state();
        let workspace = Workspace {
            id,
            name: name.to_owned(),
            created_at: now,
        };
        state.workspaces.insert(id, workspace);
        state
            .api_tokens
            .insert(api_token.clone(), StoredToken::new(id, now));
        Ok(())
    }

    fn workspace_by_api_token(&self, token: &TokenHash) -> Result<Option<WorkspaceId>> {
        Ok(self.state().api_tokens.get(token).map(|t| t.workspace))
    }

    fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        let mut list: Vec<Workspace> = self.state().workspaces.values().cloned().collect();
        list.sort_by_key(|w| (w.created_at, w.id));
        Ok(list)
    }

    fn create_api_token(
        &self,
        workspace: WorkspaceId,
        token: &TokenHash,
        now: Millis,
    ) -> Result<bool> {
        let mut state = self.state();
        if !state.workspaces.contains_key(&workspace) {
            return Ok(false);
        }
        state
            .api_tokens
            .insert(token.clone(), StoredToken::new(workspace, now));
        Ok(true)
    }

    fn list_api_tokens(&self, workspace: WorkspaceId) -> Result<Vec<ApiToken>> {
        let mut list: Vec<ApiToken> = self
            .state()
            .api_tokens
            .iter()
            .filter(|(_, t)| t.workspace == workspace)
            .map(|(hash, t)| ApiToken {
                id: hash.id(),
                created_at: t.created_at,
                last_used_at: t.last_used_at,
            })
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(list)
    }

    fn revoke_api_token(&self, workspace: WorkspaceId, id: &TokenId) -> Result<bool> {
        let mut state = self.state();
        let before = state.api_tokens.len();
        state
            .api_tokens
            .retain(|hash, t| !(t.workspace == workspace && hash.id() == *id));
        Ok(state.api_tokens.len() < before)
    }

    fn api_token_use(&self, token: &TokenHash) -> Result<Option<ApiTokenUse>> {
        Ok(self.state().api_tokens.get(token).map(|t| ApiTokenUse {
            workspace: t.workspace,
            last_used_at: t.last_used_at,
        }))
    }

    fn touch_api_token(&self, token: &TokenHash, now: Millis) -> Result<bool> {
        let mut state = self.state();
        let Some(stored) = state
            .api_tokens
            .get_mut(token)
            .filter(|t| token_use_due(t.last_used_at, now))
        else {
            return Ok(false);
        };
        stored.last_used_at = Some(now);
        Ok(true)
    }

    fn rotate_daemon_token(
        &self,
        workspace: WorkspaceId,
        runtime: RuntimeId,
        token: &TokenHash,
    ) -> Result<bool> {
        let mut state = self.state();
        if state
            .runtimes
            .get(&runtime)
            .is_none_or(|r| r.workspace_id != workspace)
        {
            return Ok(false);
        }
        state.daemon_tokens.retain(|_, rt| *rt != runtime);
        state.daemon_tokens.insert(token.clone(), runtime);
        Ok(true)
    }

    fn insert_runtime(&self, new: &NewRuntime, now: Millis, max: u64) -> Result<Option<Runtime>> {
        let mut state = self.state();
        // Counted and inserted under the one lock: no other create comes between.
        let count = state
            .runtimes
            .values()
            .filter(|r| r.workspace_id == new.workspace_id)
            .count();
        if u64::try_from(count).unwrap_or(u64::MAX) >= max {
            return Ok(None);
        }
        let runtime = Runtime {
            id: new.id,
            workspace_id: new.workspace_id,
            name: new.name.clone(),
            provider: new.provider.clone(),
            last_seen_at: None,
            created_at: now,
            catalog_at: None,
        };
        state.runtimes.insert(new.id, runtime.clone());
        state.daemon_tokens.insert(new.daemon_token.clone(), new.id);
        Ok(Some(runtime))
    }

    fn list_runtimes(
        &self,
        workspace: WorkspaceId,
        after: Option<RuntimeCursor>,
        limit: usize,
    ) -> Result<Vec<Runtime>> {
        let state = self.state();
        // `RuntimeId` orders as the SQL engines order its text (lowercase hex UUIDs).
        let after = after.map(|c| (c.created_at, c.id));
        let mut list: Vec<Runtime> = state
            .runtimes
            .values()
            .filter(|r| r.workspace_id == workspace)
            .filter(|r| after.is_none_or(|a| (r.created_at, r.id) > a))
            .map(|r| state.runtime(r))
            .collect();
        list.sort_by_key(|r| (r.created_at, r.id));
        list.truncate(limit);
        Ok(list)
    }

    fn find_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<Option<Runtime>> {
        let state = self.state();
        Ok(state
            .runtimes
            .get(&id)
            .filter(|r| r.workspace_id == workspace)
            .map(|r| state.runtime(r)))
    }

    fn delete_runtime(&self, workspace: WorkspaceId, id: RuntimeId) -> Result<bool> {
        let mut state = self.writing();
        if state
            .runtimes
            .get(&id)
            .is_none_or(|r| r.workspace_id != workspace)
        {
            return Ok(false);
        }
        state.runtimes.remove(&id);
        state.catalogs.remove(&id);
        state.daemon_tokens.retain(|_, rt| *rt != id);
        let State {
            requests, renewed, ..
        } = &mut *state;
        requests.retain(|_, r| r.runtime_id != id);
        renewed.retain(|r| requests.contains_key(r));
        Ok(true)
    }

    fn daemon_by_token(&self, token: &TokenHash) -> Result<Option<Daemon>> {
        let state = self.state();
        let Some(runtime) = state
            .daemon_tokens
            .get(token)
            .and_then(|id| state.runtimes.get(id))
        else {
            return Ok(None);
        };
        let mut pending = PerKind::all(false);
        let mut unrenewed = Vec::new();
        for r in state
            .requests
            .values()
            .filter(|r| r.runtime_id == runtime.id)
        {
            match r.status {
                Status::Pending => pending.set(r.kind, true),
                Status::Running if !state.renewed.contains(&r.id) => {
                    unrenewed.push((r.kind, r.id));
                }
                _ => {}
            }
        }
        // As the SQL engines list them.
        unrenewed.sort();
        Ok(Some(Daemon {
            runtime: runtime.id,
            last_seen_at: runtime.last_seen_at,
            pending,
            unrenewed,
        }))
    }

    fn touch_runtime(&self, id: RuntimeId, now: Millis) -> Result<bool> {
        Ok(match self.state().runtimes.get_mut(&id) {
            Some(runtime) => {
                runtime.last_seen_at = Some(runtime.last_seen_at.map_or(now, |seen| seen.max(now)));
                true
            }
            None => false,
        })
    }

    fn find_request(&self, runtime: RuntimeId, id: RequestId) -> Result<Option<StoredRequest>> {
        Ok(self
            .state()
            .requests
            .get(&id)
            .filter(|r| r.runtime_id == runtime)
            .cloned())
    }

    fn find_request_by_token(
        &self,
        api_token: &TokenHash,
        runtime: RuntimeId,
        id: RequestId,
    ) -> Result<Scoped<Option<StoredRequest>>> {
        let state = self.state();
        let Some(workspace) = state.api_tokens.get(api_token).map(|t| t.workspace) else {
            return Ok(Scoped::Unauthorized);
        };
        if state
            .runtimes
            .get(&runtime)
            .is_none_or(|r| r.workspace_id != workspace)
        {
            return Ok(Scoped::NoRuntime);
        }
        Ok(Scoped::Found(
            state
                .requests
                .get(&id)
                .filter(|r| r.runtime_id == runtime)
                .cloned(),
        ))
    }

    fn create_or_coalesce_within(
        &self,
        runtime: RuntimeId,
        new: &NewRequest,
        now: Millis,
        max: u64,
    ) -> Result<Added<Created>> {
        let mut state = self.writing();
        let Some(stored) = state.stored_beside(runtime) else {
            return Ok(Added::Missing);
        };
        let timeouts = self.timeouts;
        let mut active = None;
        let mut expired = Expired::default();
        for request in state.requests.values_mut() {
            if request.runtime_id == runtime
                && request.kind == new.kind
                && request.key == new.key
                && !request.status.is_terminal()
            {
                expired += expire(&timeouts, request, now);
                if !request.status.is_terminal() {
                    active = Some(request.clone());
                }
            }
        }
        if let Some(request) = active {
            return Ok(Added::Done(Created { request, expired }));
        }
        if stored >= max {
            return Ok(Added::Full);
        }
        let request = StoredRequest {
            id: new.id,
            runtime_id: runtime,
            kind: new.kind,
            key: new.key.clone(),
            input: new.input.clone(),
            result: None,
            status: Status::Pending,
            models: Vec::new(),
            supported: true,
            error: None,
            created_at: now,
            updated_at: now,
            deadline_at: timeouts.of(new.kind).pending_deadline(now),
            ended_at: None,
            fallback: false,
            cached_at: None,
            refresh_id: None,
        };
        state.requests.insert(new.id, request.clone());
        Ok(Added::Done(Created { request, expired }))
    }

    fn stored_requests(&self, workspace: WorkspaceId) -> Result<u64> {
        Ok(self.state().stored_in(workspace))
    }

    fn claim_next_pending(&self, runtime: RuntimeId, kind: Kind, now: Millis) -> Result<Claim> {
        let mut state = self.writing();
        let timeouts = self.timeouts;
        let mut next: Option<&mut StoredRequest> = None;
        let mut expired = Expired::default();
        for request in state.requests.values_mut() {
            if request.runtime_id != runtime
                || request.kind != kind
                || request.status != Status::Pending
            {
                continue;
            }
            let ended = expire(&timeouts, request, now);
            if ended.total() > 0 {
                expired += ended;
                continue;
            }
            if next
                .as_ref()
                .is_none_or(|n| (request.created_at, request.id) < (n.created_at, n.id))
            {
                next = Some(request);
            }
        }
        let (claimed, input) = match next {
            Some(request) => {
                request.status = Status::Running;
                request.deadline_at = timeouts.of(kind).running_deadline(now);
                request.updated_at = now;
                (Some(request.id), request.input.clone())
            }
            None => (None, None),
        };
        Ok(Claim {
            claimed,
            input,
            expired,
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
        let mut state = self.writing();
        let Some(request) = state.requests.get_mut(&id) else {
            return Ok(false);
        };
        if request.runtime_id != runtime
            || request.kind != kind
            || request.status != Status::Running
            || request.deadline_at <= now
        {
            return Ok(false);
        }
        request.updated_at = now;
        match report {
            Report::Running | Report::Progress(_) => {
                request.deadline_at = self.timeouts.of(kind).running_deadline(now);
                if let Report::Progress(result) = report {
                    request.result = Some(result.clone());
                }
                state.renewed.insert(id);
            }
            Report::Ended(outcome) => {
                request.status = outcome.status;
                request.models = outcome.models.clone();
                request.supported = outcome.supported;
                request.error = outcome.error.clone();
                request.fallback = outcome.fallback;
                request.result = outcome.result.clone();
                request.ended_at = Some(now);
                state.renewed.remove(&id);
                let catalog = match kind {
                    Kind::Models => outcome.catalog(),
                    _ => CatalogChange::Keep,
                };
                match catalog {
                    CatalogChange::Keep => {}
                    CatalogChange::Write => {
                        let catalog = Catalog {
                            models: outcome.models.clone(),
                            supported: outcome.supported,
                            reported_at: now,
                        };
                        state.catalogs.insert(runtime, catalog);
                    }
                    CatalogChange::Remove => {
                        state.catalogs.remove(&runtime);
                    }
                }
            }
        }
        Ok(true)
    }

    fn expire_request(
        &self,
        id: RequestId,
        kind: Kind,
        phase: Status,
        now: Millis,
    ) -> Result<bool> {
        let mut state = self.writing();
        Ok(state
            .requests
            .get_mut(&id)
            .filter(|r| r.kind == kind && r.status == phase)
            .is_some_and(|r| expire(&self.timeouts, r, now).total() == 1))
    }

    fn expire_overdue(&self, kind: Kind, now: Millis, limit: u32) -> Result<Expired> {
        let mut state = self.writing();
        let timeouts = self.timeouts;
        let mut expired = Expired::default();
        // As the SQL engines do: pending first, then running, each oldest deadline first.
        for phase in [Status::Pending, Status::Running] {
            let mut overdue: Vec<&mut StoredRequest> = state
                .requests
                .values_mut()
                .filter(|r| r.kind == kind && r.status == phase && r.is_overdue(now))
                .collect();
            overdue.sort_by_key(|r| (r.deadline_at, r.id));
            for request in overdue {
                if expired.total() >= u64::from(limit) {
                    return Ok(expired);
                }
                expired += expire(&timeouts, request, now);
            }
        }
        Ok(expired)
    }

    fn delete_ended_before(&self, kind: Kind, cutoff: Millis, limit: u32) -> Result<u64> {
        let mut state = self.writing();
        let mut doomed: Vec<(Millis, RequestId)> = state
            .requests
            .values()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.ended_at.filter(|&e| e < cutoff).map(|e| (e, r.id)))
            .collect();
        doomed.sort();
        doomed.truncate(limit as usize);
        for (_, id) in &doomed {
            state.requests.remove(id);
            state.renewed.remove(id);
        }
        Ok(doomed.len() as u64)
    }

    fn count_requests(&self) -> Result<RequestCounts> {
        let state = self.state();
        let mut counts = RequestCounts::default();
        for request in state.requests.values() {
            match request.status {
                Status::Pending => {
                    counts.pending += 1;
                    counts.oldest_pending_created_at = Some(
                        counts
                            .oldest_pending_created_at
                            .map_or(request.created_at, |t| t.min(request.created_at)),
                    );
                }
                Status::Running => counts.running += 1,
                Status::Completed => counts.completed += 1,
                Status::Failed => counts.failed += 1,
                Status::Timeout => counts.timeout += 1,
            }
        }
        Ok(counts)
    }

    fn checkpoint(&self) -> Result<()> {
        Ok(())
    }

    fn hand_out_again(
        &self,
        runtime: RuntimeId,
        kind: Kind,
        id: RequestId,
        now: Millis,
    ) -> Result<bool> {
        let mut state = self.writing();
        let renewed = state.renewed.contains(&id);
        let Some(request) = state.requests.get_mut(&id) else {
            return Ok(false);
        };
        if request.runtime_id != runtime
            || request.kind != kind
            || request.status != Status::Running
            || renewed
            || request.deadline_at <= now
        {
            return Ok(false);
        }
        request.deadline_at = self.timeouts.of(kind).running_deadline(now);
        request.updated_at = now;
        Ok(true)
    }

    fn active_requests(&self) -> Result<Vec<Active>> {
        Ok(self
            .state()
            .requests
            .values()
            .filter(|r| !r.status.is_terminal())
            .map(|r| Active {
                id: r.id,
                runtime_id: r.runtime_id,
                status: r.status,
                deadline_at: r.deadline_at,
            })
            .collect())
    }

    fn answer_from_catalog(
        &self,
        runtime: RuntimeId,
        ask: &Ask,
        refresh: Option<RequestId>,
        reported_after: Millis,
        now: Millis,
    ) -> Result<Added<StoredRequest>> {
        let mut state = self.writing();
        let Some(catalog) = state
            .catalogs
            .get(&runtime)
            .filter(|c| c.reported_at > reported_after)
        else {
            return Ok(Added::Missing);
        };
        let reused = state
            .requests
            .values()
            .filter(|r| {
                r.runtime_id == runtime
                    && r.kind == Kind::Models
                    && r.status == Status::Completed
                    && r.cached_at == Some(catalog.reported_at)
                    && r.refresh_id == refresh
                    && r.ended_at.is_some_and(|at| at >= ask.reuse_after)
                    && r.supported == catalog.supported
                    && r.models == catalog.models
            })
            .max_by_key(|r| (r.ended_at, r.id));
        if let Some(reused) = reused {
            return Ok(Added::Done(reused.clone()));
        }
        if state
            .stored_beside(runtime)
            .is_none_or(|n| n >= ask.max_stored)
        {
            return Ok(Added::Full);
        }
        let id = ask.cached;
        let answer = StoredRequest {
            id,
            runtime_id: runtime,
            kind: Kind::Models,
            key: String::new(),
            input: None,
            result: None,
            status: Status::Completed,
            models: catalog.models.clone(),
            supported: catalog.supported,
            error: None,
            created_at: now,
            updated_at: now,
            deadline_at: now,
            ended_at: Some(now),
            fallback: false,
            cached_at: Some(catalog.reported_at),
            refresh_id: refresh,
        };
        state.requests.insert(id, answer.clone());
        Ok(Added::Done(answer))
    }

    fn listens(&self) -> bool {
        true
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        let seen = *self.writes.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Box::new(Writes {
            writes: Arc::clone(&self.writes),
            seen,
        }))
    }
}
