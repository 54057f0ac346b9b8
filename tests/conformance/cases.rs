//! The bodies of the conformance suite. Each takes an [`Engine`] and asserts one rule of
//! DESIGN.md; the time is a fake clock's, passed to the store as `now`.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash, WorkspaceId};
use model_relay::model::{
    ModelEntry, ModelRequest, Outcome, Report, ReportOutcome, ServiceTier, Status, Thinking,
    ThinkingLevel, Timeouts,
};
use model_relay::store::{
    Active, Change, Claim, Daemon, Expired, Heartbeat, Listener, NewRuntime, RequestCounts, Scoped,
    Storer,
};
use model_relay::sweeper::{BATCH, sweep_once};

use super::Engine;

pub const TIMEOUTS: Timeouts = Timeouts {
    pending: Duration::from_secs(30),
    running: Duration::from_secs(60),
};
const PENDING_MS: i64 = 30_000;
const RUNNING_MS: i64 = 60_000;
/// A fixed start, so that every timestamp in a failure message is reproducible.
pub const T0: i64 = 1_777_627_161_000;

pub struct Tenant {
    workspace: WorkspaceId,
    pub runtime: RuntimeId,
    daemon_token: TokenHash,
}

fn workspace(store: &dyn Storer) -> (WorkspaceId, TokenHash) {
    let id = WorkspaceId::random().unwrap();
    let token = Token::new_api().unwrap().hash();
    store.create_workspace(id, "ws", &token, T0).unwrap();
    (id, token)
}

fn runtime_in(store: &dyn Storer, workspace: WorkspaceId, now: i64) -> (RuntimeId, TokenHash) {
    let id = RuntimeId::random().unwrap();
    let token = Token::new_daemon().unwrap().hash();
    store
        .create_runtime(
            &NewRuntime {
                id,
                workspace_id: workspace,
                name: "laptop".into(),
                provider: "claude".into(),
                daemon_token: token.clone(),
            },
            now,
        )
        .unwrap();
    (id, token)
}

pub fn tenant(store: &dyn Storer) -> Tenant {
    let (workspace, _) = workspace(store);
    let (runtime, daemon_token) = runtime_in(store, workspace, T0);
    Tenant {
        workspace,
        runtime,
        daemon_token,
    }
}

/// What the store says of a tenant's daemon token.
fn daemon(store: &dyn Storer, t: &Tenant) -> Daemon {
    store
        .daemon_by_token(&t.daemon_token)
        .unwrap()
        .expect("the tenant's daemon token")
}

fn daemon_runtime(store: &dyn Storer, token: &TokenHash) -> Option<RuntimeId> {
    store.daemon_by_token(token).unwrap().map(|d| d.runtime)
}

/// A heartbeat as the HTTP layer makes it: the token read, then the beat.
fn beat(store: &dyn Storer, t: &Tenant, now: i64, refresh_after: i64) -> Heartbeat {
    store
        .heartbeat(&daemon(store, t), now, refresh_after, None)
        .unwrap()
}

fn new_id() -> RequestId {
    RequestId::random().unwrap()
}

fn create(store: &dyn Storer, runtime: RuntimeId, now: i64) -> ModelRequest {
    store
        .create_or_coalesce(runtime, new_id(), now)
        .unwrap()
        .expect("runtime exists")
        .request
}

fn get(store: &dyn Storer, runtime: RuntimeId, id: RequestId, now: i64) -> ModelRequest {
    store
        .get_request(runtime, id, now)
        .unwrap()
        .expect("request exists")
}

/// A request that is running: created at `now`, claimed at `now`.
fn running(store: &dyn Storer, runtime: RuntimeId, now: i64) -> RequestId {
    let id = create(store, runtime, now).id;
    assert_eq!(
        store.claim_next_pending(runtime, now).unwrap().claimed,
        Some(id)
    );
    id
}

fn models() -> Vec<ModelEntry> {
    vec![
        ModelEntry {
            id: "claude-sonnet-4-6".into(),
            label: "Claude Sonnet 4.6".into(),
            provider: Some("anthropic".into()),
            default: Some(true),
            // The newest daemons' fields, stored and returned as sent by every engine.
            thinking: Some(Thinking {
                supported_levels: vec![
                    ThinkingLevel {
                        value: "low".into(),
                        label: "Low".into(),
                        description: None,
                    },
                    ThinkingLevel {
                        value: "high".into(),
                        label: "High".into(),
                        description: Some("Slower; for hard problems — 深く考える".into()),
                    },
                ],
                default_level: Some("low".into()),
            }),
            service_tiers: Some(vec![ServiceTier {
                id: "priority".into(),
                name: "Priority".into(),
                description: None,
            }]),
        },
        ModelEntry {
            id: "claude-opus-4-1".into(),
            label: "Claude Opus 4.1".into(),
            provider: None,
            default: None,
            thinking: None,
            service_tiers: None,
        },
    ]
}

fn completed() -> Report {
    Report::Ended(Outcome {
        status: Status::Completed,
        models: models(),
        supported: true,
        error: None,
        fallback: false,
    })
}

fn failed(error: &str) -> Report {
    Report::Ended(Outcome {
        status: Status::Failed,
        models: Vec::new(),
        supported: true,
        error: Some(error.into()),
        fallback: false,
    })
}

// ---- schema, tokens, runtimes ----

pub fn opening_twice_keeps_the_data(engine: &dyn Engine) {
    let first = engine.open();
    let t = tenant(first.as_ref());
    let id = create(first.as_ref(), t.runtime, T0).id;
    let second = engine.open();
    assert_eq!(
        get(second.as_ref(), t.runtime, id, T0).status,
        Status::Pending
    );
    assert_eq!(
        daemon_runtime(second.as_ref(), &t.daemon_token),
        Some(t.runtime)
    );
}

pub fn tokens_resolve_to_their_owner_only(engine: &dyn Engine) {
    let store = engine.open();
    let (ws_a, token_a) = workspace(store.as_ref());
    let (ws_b, token_b) = workspace(store.as_ref());
    assert_eq!(store.workspace_by_api_token(&token_a).unwrap(), Some(ws_a));
    assert_eq!(store.workspace_by_api_token(&token_b).unwrap(), Some(ws_b));
    let stranger = Token::new_api().unwrap().hash();
    assert_eq!(store.workspace_by_api_token(&stranger).unwrap(), None);

    let (rt, daemon) = runtime_in(store.as_ref(), ws_a, T0);
    assert_eq!(daemon_runtime(store.as_ref(), &daemon), Some(rt));
    // An API token is not a daemon token, and the other way round.
    assert_eq!(daemon_runtime(store.as_ref(), &token_a), None);
    assert_eq!(store.workspace_by_api_token(&daemon).unwrap(), None);
}

pub fn runtimes_are_scoped_to_their_workspace(engine: &dyn Engine) {
    let store = engine.open();
    let (ws_a, _) = workspace(store.as_ref());
    let (ws_b, _) = workspace(store.as_ref());
    let (first, _) = runtime_in(store.as_ref(), ws_a, T0);
    let (second, _) = runtime_in(store.as_ref(), ws_a, T0 + 1);
    let (other, _) = runtime_in(store.as_ref(), ws_b, T0);

    let listed: Vec<RuntimeId> = store
        .list_runtimes(ws_a)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![first, second], "the workspace's, oldest first");

    let found = store
        .find_runtime(ws_a, first)
        .unwrap()
        .expect("own runtime");
    assert_eq!(
        (found.name.as_str(), found.provider.as_str()),
        ("laptop", "claude")
    );
    assert_eq!((found.created_at, found.last_seen_at), (T0, None));
    assert_eq!(store.find_runtime(ws_a, other).unwrap(), None);
    assert!(!store.delete_runtime(ws_a, other).unwrap());
    assert!(store.find_runtime(ws_b, other).unwrap().is_some());
}

pub fn touch_records_last_seen_and_never_moves_it_back(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    assert!(store.touch_runtime(t.runtime, T0 + 500).unwrap());
    let seen = |s: &dyn Storer| {
        s.find_runtime(t.workspace, t.runtime)
            .unwrap()
            .unwrap()
            .last_seen_at
    };
    assert_eq!(seen(store.as_ref()), Some(T0 + 500));
    assert!(store.touch_runtime(t.runtime, T0 + 100).unwrap());
    assert_eq!(seen(store.as_ref()), Some(T0 + 500));
    assert!(store.touch_runtime(t.runtime, T0 + 900).unwrap());
    assert_eq!(seen(store.as_ref()), Some(T0 + 900));
    assert!(
        !store
            .touch_runtime(RuntimeId::random().unwrap(), T0)
            .unwrap()
    );
}

pub fn deleting_a_runtime_deletes_its_requests(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let keep = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let kept = create(store.as_ref(), keep.runtime, T0).id;
    assert!(store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert_eq!(store.find_request(t.runtime, id).unwrap(), None);
    assert_eq!(store.find_runtime(t.workspace, t.runtime).unwrap(), None);
    assert_eq!(daemon_runtime(store.as_ref(), &t.daemon_token), None);
    assert!(!store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert!(store.find_request(keep.runtime, kept).unwrap().is_some());
}

// ---- create and coalesce ----

pub fn create_makes_a_pending_request_with_a_claim_deadline(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = new_id();
    let created = store
        .create_or_coalesce(t.runtime, id, T0)
        .unwrap()
        .unwrap();
    assert_eq!(created.expired, Expired::default());
    let r = created.request;
    assert_eq!(r.id, id);
    assert_eq!(r.runtime_id, t.runtime);
    assert_eq!(r.status, Status::Pending);
    assert!(r.models.is_empty() && r.supported && r.error.is_none());
    assert_eq!((r.created_at, r.updated_at), (T0, T0));
    assert_eq!(r.deadline_at, T0 + PENDING_MS);
    assert_eq!(r.ended_at, None);
    assert_eq!(get(store.as_ref(), t.runtime, id, T0), r);
}

pub fn create_for_a_missing_runtime_is_none(engine: &dyn Engine) {
    let store = engine.open();
    let missing = RuntimeId::random().unwrap();
    assert_eq!(
        store.create_or_coalesce(missing, new_id(), T0).unwrap(),
        None
    );
}

pub fn create_coalesces_while_a_request_is_pending_or_running(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let first = create(store.as_ref(), t.runtime, T0);
    let again = create(store.as_ref(), t.runtime, T0 + 1_000);
    assert_eq!(again, first, "pending: the same request, unchanged");

    store.claim_next_pending(t.runtime, T0 + 2_000).unwrap();
    let while_running = create(store.as_ref(), t.runtime, T0 + 3_000);
    assert_eq!(while_running.id, first.id);
    assert_eq!(while_running.status, Status::Running);
}

pub fn create_after_the_active_request_ended_makes_a_new_one(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let first = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, first, &completed(), T0 + 1)
        .unwrap();
    let next = create(store.as_ref(), t.runtime, T0 + 2);
    assert_ne!(next.id, first);
    assert_eq!(next.status, Status::Pending);
    assert_eq!(
        get(store.as_ref(), t.runtime, first, T0 + 2).status,
        Status::Completed
    );
}

pub fn create_expires_an_overdue_active_request_and_makes_a_new_one(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let stale = create(store.as_ref(), t.runtime, T0).id;
    let later = T0 + PENDING_MS;
    let created = store
        .create_or_coalesce(t.runtime, new_id(), later)
        .unwrap()
        .unwrap();
    assert_eq!(
        created.expired,
        Expired::one(Status::Pending),
        "it says what it ended"
    );
    let fresh = created.request;
    assert_ne!(fresh.id, stale);
    let old = store.find_request(t.runtime, stale).unwrap().unwrap();
    assert_eq!(old.status, Status::Timeout);
    assert_eq!(
        old.error.as_deref(),
        Some("daemon did not respond within 30 seconds")
    );
}

pub fn concurrent_creates_from_two_handles_coalesce_to_one_request(engine: &dyn Engine) {
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let barrier = Arc::new(Barrier::new(2));
        let ids: Vec<RequestId> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        create(store.as_ref(), t.runtime, now).id
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(
            ids[0], ids[1],
            "round {round}: both creates got one request"
        );
        // End it, so the next round races to create a new one.
        let store = handles[0].as_ref();
        assert_eq!(
            store.claim_next_pending(t.runtime, now).unwrap().claimed,
            Some(ids[0])
        );
        assert_eq!(
            store.report(t.runtime, ids[0], &completed(), now).unwrap(),
            ReportOutcome::Recorded
        );
    }
}

// ---- claim ----

pub fn claim_moves_the_pending_request_to_running_with_a_lease(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let at = T0 + 5_000;
    assert_eq!(
        store.claim_next_pending(t.runtime, at).unwrap().claimed,
        Some(id)
    );
    let r = get(store.as_ref(), t.runtime, id, at);
    assert_eq!(r.status, Status::Running);
    assert_eq!(r.deadline_at, at + RUNNING_MS);
    assert_eq!(r.updated_at, at);
    assert_eq!(r.created_at, T0);
}

pub fn claim_hands_out_a_request_at_most_once(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    assert_eq!(beat(store.as_ref(), &t, T0, 0), Heartbeat::Alive(Some(id)));
    assert_eq!(beat(store.as_ref(), &t, T0 + 1, 0), Heartbeat::Alive(None));
    assert_eq!(
        store.claim_next_pending(t.runtime, T0 + 2).unwrap().claimed,
        None
    );
}

pub fn concurrent_claims_from_two_handles_hand_out_one_request_once(engine: &dyn Engine) {
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let id = create(handles[0].as_ref(), t.runtime, now).id;
        let barrier = Arc::new(Barrier::new(2));
        let claims: Vec<Option<RequestId>> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        store.claim_next_pending(t.runtime, now).unwrap().claimed
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let handed: Vec<RequestId> = claims.into_iter().flatten().collect();
        assert_eq!(handed, vec![id], "round {round}: claimed exactly once");
        handles[1]
            .report(t.runtime, id, &failed("next round"), now)
            .unwrap();
    }
}

pub fn claim_only_sees_its_own_runtime(engine: &dyn Engine) {
    let store = engine.open();
    let a = tenant(store.as_ref());
    let b = tenant(store.as_ref());
    let id = create(store.as_ref(), a.runtime, T0).id;
    assert_eq!(
        store.claim_next_pending(b.runtime, T0).unwrap().claimed,
        None
    );
    assert_eq!(
        store.claim_next_pending(a.runtime, T0).unwrap().claimed,
        Some(id)
    );
}

pub fn expired_pending_request_is_never_claimed_and_becomes_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let deadline = T0 + PENDING_MS;
    assert_eq!(
        store.claim_next_pending(t.runtime, deadline).unwrap(),
        Claim {
            claimed: None,
            expired: Expired::one(Status::Pending)
        },
        "it says what it ended"
    );
    let r = store.find_request(t.runtime, id).unwrap().unwrap();
    assert_eq!(r.status, Status::Timeout, "the claim ended it");
    assert_eq!(
        r.error.as_deref(),
        Some("daemon did not respond within 30 seconds")
    );
    assert_eq!((r.ended_at, r.updated_at), (Some(deadline), deadline));
}

// ---- reports ----

pub fn report_completed_records_the_models_and_ends_the_request(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let at = T0 + 7_000;
    assert_eq!(
        store.report(t.runtime, id, &completed(), at).unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, at + 1);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.models, models());
    assert!(r.supported);
    assert_eq!(r.error, None);
    assert_eq!((r.updated_at, r.ended_at), (at, Some(at)));
}

pub fn report_failed_records_the_error(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(
        store
            .report(t.runtime, id, &failed("claude: not logged in"), T0 + 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.as_deref(), Some("claude: not logged in"));
    assert!(r.models.is_empty());
}

pub fn report_without_models_reads_as_no_models(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let unsupported = Report::Ended(Outcome {
        status: Status::Completed,
        models: Vec::new(),
        supported: false,
        error: None,
        fallback: false,
    });
    store.report(t.runtime, id, &unsupported, T0 + 1).unwrap();
    let r = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert!(r.models.is_empty());
    assert!(!r.supported);
    assert_eq!(
        store.report(t.runtime, id, &unsupported, T0 + 2).unwrap(),
        ReportOutcome::Replayed,
        "an empty list replays as itself"
    );
}

pub fn report_on_a_pending_request_is_refused_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let before = create(store.as_ref(), t.runtime, T0);
    for report in [completed(), failed("x"), Report::Running] {
        assert_eq!(
            store.report(t.runtime, before.id, &report, T0 + 1).unwrap(),
            ReportOutcome::NotRunning(Status::Pending)
        );
    }
    assert_eq!(get(store.as_ref(), t.runtime, before.id, T0 + 1), before);
}

pub fn report_running_renews_the_lease(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let renew_at = T0 + RUNNING_MS - 1;
    assert_eq!(
        store
            .report(t.runtime, id, &Report::Running, renew_at)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, T0 + RUNNING_MS + 1);
    assert_eq!(r.status, Status::Running, "alive past the first lease");
    assert_eq!(r.deadline_at, renew_at + RUNNING_MS);
    assert_eq!(
        get(store.as_ref(), t.runtime, id, renew_at + RUNNING_MS).status,
        Status::Timeout,
        "and ends when the renewed lease does"
    );
}

pub fn report_running_on_an_ended_request_is_refused(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store.report(t.runtime, id, &completed(), T0 + 1).unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(
        store
            .report(t.runtime, id, &Report::Running, T0 + 2)
            .unwrap(),
        ReportOutcome::NotRunning(Status::Completed)
    );
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 2), before);
}

pub fn exact_replay_of_the_ending_report_is_accepted_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store.report(t.runtime, id, &completed(), T0 + 1).unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(
        store
            .report(t.runtime, id, &completed(), T0 + 5_000)
            .unwrap(),
        ReportOutcome::Replayed
    );
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 5_000), before);

    let other = tenant(store.as_ref());
    let fid = running(store.as_ref(), other.runtime, T0);
    store
        .report(other.runtime, fid, &failed("boom"), T0 + 1)
        .unwrap();
    assert_eq!(
        store
            .report(other.runtime, fid, &failed("boom"), T0 + 2)
            .unwrap(),
        ReportOutcome::Replayed
    );
}

pub fn a_different_report_after_the_end_is_refused_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store.report(t.runtime, id, &completed(), T0 + 1).unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    let mut fewer = models();
    fewer.pop();
    let different = [
        failed("late"),
        Report::Ended(Outcome {
            status: Status::Completed,
            models: fewer,
            supported: true,
            error: None,
            fallback: false,
        }),
        Report::Ended(Outcome {
            status: Status::Completed,
            models: models(),
            supported: false,
            error: None,
            fallback: false,
        }),
    ];
    for report in different {
        assert_eq!(
            store.report(t.runtime, id, &report, T0 + 2).unwrap(),
            ReportOutcome::NotRunning(Status::Completed)
        );
    }
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 2), before);
}

pub fn report_after_the_lease_ran_out_is_refused_and_reads_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let deadline = T0 + RUNNING_MS;
    assert_eq!(
        store.report(t.runtime, id, &completed(), deadline).unwrap(),
        ReportOutcome::NotRunning(Status::Timeout)
    );
    let r = get(store.as_ref(), t.runtime, id, deadline + 1);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some("daemon did not finish within 60 seconds")
    );
    assert!(r.models.is_empty(), "the late report left nothing behind");
}

pub fn report_one_millisecond_before_the_deadline_is_accepted(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(
        store
            .report(t.runtime, id, &completed(), T0 + RUNNING_MS - 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
    assert_eq!(
        get(store.as_ref(), t.runtime, id, T0 + RUNNING_MS * 10).status,
        Status::Completed
    );
}

pub fn report_for_another_runtime_is_not_found(engine: &dyn Engine) {
    let store = engine.open();
    let owner = tenant(store.as_ref());
    let intruder = tenant(store.as_ref());
    let id = running(store.as_ref(), owner.runtime, T0);
    assert_eq!(
        store
            .report(intruder.runtime, id, &completed(), T0 + 1)
            .unwrap(),
        ReportOutcome::NotFound
    );
    assert_eq!(
        store
            .report(owner.runtime, new_id(), &completed(), T0 + 1)
            .unwrap(),
        ReportOutcome::NotFound
    );
    assert_eq!(
        get(store.as_ref(), owner.runtime, id, T0 + 1).status,
        Status::Running
    );
}

pub fn concurrent_reports_from_two_handles_record_exactly_one(engine: &dyn Engine) {
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let id = running(handles[0].as_ref(), t.runtime, now);
        let reports = [completed(), failed("lost the race")];
        let barrier = Arc::new(Barrier::new(2));
        let outcomes: Vec<ReportOutcome> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .zip(&reports)
                .map(|(store, report)| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        store.report(t.runtime, id, report, now).unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let winner = outcomes
            .iter()
            .position(|o| *o == ReportOutcome::Recorded)
            .expect("one report is recorded");
        let loser = 1 - winner;
        let stored = get(handles[0].as_ref(), t.runtime, id, now);
        let Report::Ended(won) = &reports[winner] else {
            unreachable!()
        };
        assert_eq!(
            outcomes[loser],
            ReportOutcome::NotRunning(won.status),
            "round {round}"
        );
        assert!(
            won.is_recorded_in(&stored),
            "round {round}: the winner is stored"
        );
    }
}

// ---- reads, deadlines, finality ----

pub fn reads_end_an_overdue_running_request_as_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let deadline = T0 + RUNNING_MS;
    assert_eq!(
        get(store.as_ref(), t.runtime, id, deadline - 1).status,
        Status::Running
    );
    let r = get(store.as_ref(), t.runtime, id, deadline + 123);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some("daemon did not finish within 60 seconds")
    );
    assert_eq!(
        (r.ended_at, r.updated_at),
        (Some(deadline), deadline),
        "it ended at its deadline, not when someone looked"
    );
    assert_eq!(
        store.find_request(t.runtime, id).unwrap().unwrap(),
        r,
        "the read stored the timeout"
    );
}

pub fn reads_are_scoped_to_the_runtime(engine: &dyn Engine) {
    let store = engine.open();
    let owner = tenant(store.as_ref());
    let other = tenant(store.as_ref());
    let id = create(store.as_ref(), owner.runtime, T0).id;
    assert_eq!(store.get_request(other.runtime, id, T0).unwrap(), None);
    assert_eq!(
        store.get_request(owner.runtime, new_id(), T0).unwrap(),
        None
    );
}

pub fn terminal_status_is_final(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let ended = [
        {
            let id = running(store.as_ref(), t.runtime, T0);
            store.report(t.runtime, id, &completed(), T0).unwrap();
            id
        },
        {
            let id = running(store.as_ref(), t.runtime, T0);
            store.report(t.runtime, id, &failed("x"), T0).unwrap();
            id
        },
        {
            let id = create(store.as_ref(), t.runtime, T0).id;
            assert!(
                store
                    .expire_request(id, Status::Pending, T0 + PENDING_MS)
                    .unwrap()
            );
            id
        },
    ];
    let before: Vec<ModelRequest> = ended
        .iter()
        .map(|&id| get(store.as_ref(), t.runtime, id, T0 + PENDING_MS))
        .collect();
    let later = T0 + 10 * RUNNING_MS;
    for &id in &ended {
        for phase in [Status::Pending, Status::Running, Status::Timeout] {
            assert!(!store.expire_request(id, phase, later).unwrap());
        }
        for report in [completed(), failed("y"), Report::Running] {
            store.report(t.runtime, id, &report, later).unwrap();
        }
    }
    store.claim_next_pending(t.runtime, later).unwrap();
    assert_eq!(
        store.expire_overdue(later, 100).unwrap(),
        Expired::default()
    );
    let after: Vec<ModelRequest> = ended
        .iter()
        .map(|&id| get(store.as_ref(), t.runtime, id, later))
        .collect();
    assert_eq!(after, before);
}

pub fn expire_overdue_ends_only_overdue_active_requests(engine: &dyn Engine) {
    let store = engine.open();
    let (a, b, c, d) = (
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
    );
    let old_pending = create(store.as_ref(), a.runtime, T0).id;
    let old_running = running(store.as_ref(), b.runtime, T0);
    let fresh_pending = create(store.as_ref(), c.runtime, T0 + RUNNING_MS).id;
    let done = running(store.as_ref(), d.runtime, T0);
    store.report(d.runtime, done, &completed(), T0 + 1).unwrap();

    assert_eq!(
        store.expire_overdue(T0 + RUNNING_MS, 100).unwrap(),
        Expired {
            pending: 1,
            running: 1
        }
    );
    let status = |rt, id| store.find_request(rt, id).unwrap().unwrap().status;
    assert_eq!(status(a.runtime, old_pending), Status::Timeout);
    assert_eq!(status(b.runtime, old_running), Status::Timeout);
    assert_eq!(status(c.runtime, fresh_pending), Status::Pending);
    assert_eq!(status(d.runtime, done), Status::Completed);
    assert_eq!(
        store.expire_overdue(T0 + RUNNING_MS, 100).unwrap(),
        Expired::default(),
        "once only"
    );
    let pending_error = store
        .find_request(a.runtime, old_pending)
        .unwrap()
        .unwrap()
        .error;
    assert_eq!(
        pending_error.as_deref(),
        Some("daemon did not respond within 30 seconds")
    );
}

pub fn retention_deletes_only_requests_ended_before_the_cutoff_in_bounded_batches(
    engine: &dyn Engine,
) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    // Five requests, ended at T0+1 … T0+5, then one active.
    let ended: Vec<RequestId> = (1..=5)
        .map(|i| {
            let id = running(store.as_ref(), t.runtime, T0);
            store.report(t.runtime, id, &completed(), T0 + i).unwrap();
            id
        })
        .collect();
    let active = create(store.as_ref(), t.runtime, T0).id;
    let exists = |id| store.find_request(t.runtime, id).unwrap().is_some();

    // Cutoff T0+4: the three that ended at +1, +2, +3 go, two per batch at most.
    assert_eq!(store.delete_ended_before(T0 + 4, 2).unwrap(), 2);
    assert_eq!(store.delete_ended_before(T0 + 4, 2).unwrap(), 1);
    assert_eq!(store.delete_ended_before(T0 + 4, 2).unwrap(), 0);
    let left: Vec<bool> = ended.iter().map(|&id| exists(id)).collect();
    assert_eq!(left, vec![false, false, false, true, true]);
    assert_eq!(store.delete_ended_before(i64::MAX, 100).unwrap(), 2);
    assert!(exists(active), "an active request is never deleted");
}

pub fn sweep_expires_then_deletes_after_retention(engine: &dyn Engine) {
    let store = engine.open();
    let retention = Duration::from_secs(600);
    let many = tenant(store.as_ref());
    // More than one delete batch of ended requests.
    let batch = i64::from(BATCH);
    for i in 0..batch + 3 {
        let id = running(store.as_ref(), many.runtime, T0);
        store
            .report(many.runtime, id, &failed("x"), T0 + i % 7)
            .unwrap();
    }
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;

    let swept = sweep_once(store.as_ref(), T0 + PENDING_MS, retention).unwrap();
    assert_eq!((swept.expired, swept.deleted), (1, 0));
    let r = store.find_request(t.runtime, id).unwrap().unwrap();
    assert_eq!(r.status, Status::Timeout);

    // Readable until retention after it ended, gone after.
    let ended = T0 + PENDING_MS;
    let last_moment = ended + 600_000;
    let swept = sweep_once(store.as_ref(), last_moment, retention).unwrap();
    assert_eq!(
        swept.deleted,
        (batch + 3) as u64,
        "the old ones, over several batches"
    );
    assert!(
        store
            .get_request(t.runtime, id, last_moment)
            .unwrap()
            .is_some()
    );
    let swept = sweep_once(store.as_ref(), last_moment + 1, retention).unwrap();
    assert_eq!(swept.expired, 0);
    assert_eq!(swept.deleted, 1);
    assert_eq!(
        store.get_request(t.runtime, id, last_moment + 1).unwrap(),
        None
    );
}

pub fn heartbeat_writes_last_seen_only_when_older_than_refresh_after(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let seen = |s: &dyn Storer| {
        s.find_runtime(t.workspace, t.runtime)
            .unwrap()
            .unwrap()
            .last_seen_at
    };
    assert_eq!(daemon(store.as_ref(), &t).last_seen_at, None, "never seen");
    assert_eq!(beat(store.as_ref(), &t, T0, 1000), Heartbeat::Alive(None));
    assert_eq!(seen(store.as_ref()), Some(T0), "first heartbeat is written");
    assert_eq!(daemon(store.as_ref(), &t).last_seen_at, Some(T0));
    beat(store.as_ref(), &t, T0 + 1000, 1000);
    assert_eq!(
        seen(store.as_ref()),
        Some(T0),
        "seen within refresh_after: not rewritten"
    );
    beat(store.as_ref(), &t, T0 + 1001, 1000);
    assert_eq!(
        seen(store.as_ref()),
        Some(T0 + 1001),
        "older than refresh_after: written"
    );
    // A skipped write still claims what is pending.
    let id = create(store.as_ref(), t.runtime, T0 + 1002).id;
    assert_eq!(
        beat(store.as_ref(), &t, T0 + 1003, 1000),
        Heartbeat::Alive(Some(id))
    );
    assert_eq!(seen(store.as_ref()), Some(T0 + 1001));
}

pub fn heartbeat_of_a_runtime_deleted_since_its_token_was_read_is_unknown(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let found = daemon(store.as_ref(), &t);
    assert!(store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert_eq!(
        store.heartbeat(&found, T0, 1000, None).unwrap(),
        Heartbeat::UnknownRuntime
    );
}

pub fn daemon_by_token_tells_whether_a_request_is_pending(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let other = tenant(store.as_ref());
    let pending = |s: &dyn Storer| daemon(s, &t).pending;
    assert!(!pending(store.as_ref()), "nothing created");
    create(store.as_ref(), other.runtime, T0);
    assert!(!pending(store.as_ref()), "another runtime's request");
    let id = create(store.as_ref(), t.runtime, T0).id;
    assert!(pending(store.as_ref()));
    assert_eq!(
        store.claim_next_pending(t.runtime, T0 + 1).unwrap().claimed,
        Some(id)
    );
    assert!(!pending(store.as_ref()), "running is not pending");
    let stranger = Token::new_daemon().unwrap().hash();
    assert_eq!(store.daemon_by_token(&stranger).unwrap(), None);
}

pub fn find_request_by_token_answers_each_level_in_turn(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, api) = workspace(store.as_ref());
    let (rt, daemon_token) = runtime_in(store.as_ref(), ws, T0);
    let (sibling, _) = runtime_in(store.as_ref(), ws, T0);
    let (other_ws, other_api) = workspace(store.as_ref());
    let (foreign, _) = runtime_in(store.as_ref(), other_ws, T0);
    let id = create(store.as_ref(), rt, T0).id;
    let foreign_id = create(store.as_ref(), foreign, T0).id;
    let find = |token: &TokenHash, rt: RuntimeId, id: RequestId| {
        store.find_request_by_token(token, rt, id).unwrap()
    };

    let own = store.find_request(rt, id).unwrap();
    assert!(own.is_some());
    assert_eq!(find(&api, rt, id), Scoped::Found(own));
    assert_eq!(
        find(&api, rt, new_id()),
        Scoped::Found(None),
        "unknown request"
    );
    assert_eq!(
        find(&api, sibling, id),
        Scoped::Found(None),
        "another runtime's"
    );
    assert_eq!(
        find(&api, foreign, foreign_id),
        Scoped::NoRuntime,
        "another workspace's"
    );
    assert_eq!(
        find(&api, RuntimeId::random().unwrap(), id),
        Scoped::NoRuntime
    );
    assert!(matches!(
        find(&other_api, foreign, foreign_id),
        Scoped::Found(Some(_))
    ));
    let stranger = Token::new_api().unwrap().hash();
    assert_eq!(find(&stranger, rt, id), Scoped::Unauthorized);
    assert_eq!(
        find(&daemon_token, rt, id),
        Scoped::Unauthorized,
        "a daemon token"
    );
}

pub fn get_request_by_token_ends_an_overdue_request_first(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, api) = workspace(store.as_ref());
    let (rt, _) = runtime_in(store.as_ref(), ws, T0);
    let id = create(store.as_ref(), rt, T0).id;
    let read = |now| match store.get_request_by_token(&api, rt, id, now).unwrap() {
        Scoped::Found(Some(request)) => request,
        other => panic!("expected the request, got {other:?}"),
    };
    assert_eq!(read(T0 + PENDING_MS - 1).status, Status::Pending);
    let ended = read(T0 + PENDING_MS);
    assert_eq!(ended.status, Status::Timeout);
    assert_eq!(ended.ended_at, Some(T0 + PENDING_MS));
    assert_eq!(
        store.find_request(rt, id).unwrap().unwrap().status,
        Status::Timeout,
        "the expiry is stored, not only shown"
    );
}

// ---- sweeping, counting, housekeeping ----

pub fn expire_request_ends_only_the_phase_it_names(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let late = T0 + RUNNING_MS;
    assert!(
        !store.expire_request(id, Status::Pending, late).unwrap(),
        "it is running, not pending: the compare-and-set misses"
    );
    assert_eq!(
        get_raw(store.as_ref(), t.runtime, id).status,
        Status::Running
    );
    assert!(
        !store.expire_request(id, Status::Running, late - 1).unwrap(),
        "not yet overdue"
    );
    assert!(store.expire_request(id, Status::Running, late).unwrap());
    let r = get_raw(store.as_ref(), t.runtime, id);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some("daemon did not finish within 60 seconds")
    );
    assert_eq!(r.ended_at, Some(late));
}

/// The request as stored, no expiry applied.
fn get_raw(store: &dyn Storer, runtime: RuntimeId, id: RequestId) -> ModelRequest {
    store
        .find_request(runtime, id)
        .unwrap()
        .expect("request exists")
}

pub fn expire_overdue_works_in_bounded_batches_oldest_deadline_first(engine: &dyn Engine) {
    let store = engine.open();
    // Five overdue pending requests with deadlines one millisecond apart, oldest first,
    // and two overdue running ones.
    let pending: Vec<(RuntimeId, RequestId)> = (0..5)
        .map(|i| {
            let t = tenant(store.as_ref());
            (t.runtime, create(store.as_ref(), t.runtime, T0 + i).id)
        })
        .collect();
    let running_ones: Vec<(RuntimeId, RequestId)> = (0..2)
        .map(|_| {
            let t = tenant(store.as_ref());
            (t.runtime, running(store.as_ref(), t.runtime, T0))
        })
        .collect();
    let now = T0 + RUNNING_MS + 10;
    let status = |(rt, id): (RuntimeId, RequestId)| get_raw(store.as_ref(), rt, id).status;

    assert_eq!(
        store.expire_overdue(now, 3).unwrap(),
        Expired {
            pending: 3,
            running: 0
        },
        "pending first, at most the limit"
    );
    let ended: Vec<Status> = pending.iter().map(|&p| status(p)).collect();
    assert_eq!(
        ended,
        [
            Status::Timeout,
            Status::Timeout,
            Status::Timeout,
            Status::Pending,
            Status::Pending
        ],
        "the oldest deadlines first"
    );
    assert_eq!(
        store.expire_overdue(now, 3).unwrap(),
        Expired {
            pending: 2,
            running: 1
        }
    );
    assert_eq!(
        store.expire_overdue(now, 3).unwrap(),
        Expired {
            pending: 0,
            running: 1
        },
        "fewer than the limit: nothing is left"
    );
    assert_eq!(store.expire_overdue(now, 3).unwrap(), Expired::default());
    assert!(
        pending
            .iter()
            .chain(&running_ones)
            .all(|&r| status(r) == Status::Timeout)
    );
}

pub fn count_requests_counts_each_status_and_the_oldest_pending(engine: &dyn Engine) {
    let store = engine.open();
    assert_eq!(store.count_requests().unwrap(), RequestCounts::default());

    let t: Vec<Tenant> = (0..6).map(|_| tenant(store.as_ref())).collect();
    create(store.as_ref(), t[0].runtime, T0 + 20);
    create(store.as_ref(), t[1].runtime, T0 + 10);
    running(store.as_ref(), t[2].runtime, T0 + 5);
    let done = running(store.as_ref(), t[3].runtime, T0);
    store.report(t[3].runtime, done, &completed(), T0).unwrap();
    let broken = running(store.as_ref(), t[4].runtime, T0);
    store
        .report(t[4].runtime, broken, &failed("x"), T0)
        .unwrap();
    // Created first of all, but it timed out: no longer the oldest pending request.
    let stale = create(store.as_ref(), t[5].runtime, T0).id;
    assert!(
        store
            .expire_request(stale, Status::Pending, T0 + PENDING_MS)
            .unwrap()
    );

    let counts = store.count_requests().unwrap();
    assert_eq!(
        counts,
        RequestCounts {
            pending: 2,
            running: 1,
            completed: 1,
            failed: 1,
            timeout: 1,
            oldest_pending_created_at: Some(T0 + 10),
        }
    );
    assert_eq!(counts.of(Status::Failed), 1);

    assert!(
        store
            .claim_next_pending(t[1].runtime, T0 + 30)
            .unwrap()
            .claimed
            .is_some()
    );
    let counts = store.count_requests().unwrap();
    assert_eq!((counts.pending, counts.running), (1, 2));
    assert_eq!(counts.oldest_pending_created_at, Some(T0 + 20));
}

/// Several instances sweep at once: between them every overdue request is ended once and
/// every old one deleted once, and the counts they report add up to exactly that.
pub fn concurrent_sweeps_from_two_handles_end_and_delete_each_request_once(engine: &dyn Engine) {
    let handles = [engine.open(), engine.open()];
    let store = handles[0].as_ref();
    let overdue = i64::from(BATCH) + 7;
    let old = i64::from(BATCH) + 11;
    let t = tenant(store);
    // Old ended requests: ended at T0.
    for _ in 0..old {
        let id = running(store, t.runtime, T0);
        store.report(t.runtime, id, &completed(), T0).unwrap();
    }
    // Overdue pending requests, one per runtime (a runtime has one active request).
    for _ in 0..overdue {
        let other = tenant(store);
        create(store, other.runtime, T0);
    }
    let retention = Duration::from_secs(60);
    // Past retention for the old ones, not for requests that time out now (they end at
    // their deadline, T0 + 30 s).
    let now = T0 + RUNNING_MS + 1;
    let barrier = Arc::new(Barrier::new(2));
    let swept: Vec<(u64, u64)> = thread::scope(|s| {
        let workers: Vec<_> = handles
            .iter()
            .map(|store| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    let swept = sweep_once(store.as_ref(), now, retention).unwrap();
                    (swept.expired, swept.deleted)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let expired: u64 = swept.iter().map(|s| s.0).sum();
    let deleted: u64 = swept.iter().map(|s| s.1).sum();
    assert_eq!(
        expired, overdue as u64,
        "each overdue request ended once: {swept:?}"
    );
    assert_eq!(
        deleted, old as u64,
        "each old request deleted once: {swept:?}"
    );
    let counts = store.count_requests().unwrap();
    assert_eq!(
        (counts.pending, counts.completed, counts.timeout),
        (0, 0, overdue as u64)
    );
}

pub fn checkpoint_keeps_every_request(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let ids: Vec<RequestId> = (0..20)
        .map(|i| {
            let id = running(store.as_ref(), t.runtime, T0 + i);
            store.report(t.runtime, id, &completed(), T0 + i).unwrap();
            id
        })
        .collect();
    store.checkpoint().unwrap();
    let other = engine.open();
    for id in ids {
        assert_eq!(
            get_raw(other.as_ref(), t.runtime, id).status,
            Status::Completed
        );
    }
}

// ---- waiting calls: hand-outs again, the re-check's query, the listener ----

/// A heartbeat as the HTTP layer makes it, with the daemon's `working_on`.
fn beat_holding(
    store: &dyn Storer,
    t: &Tenant,
    now: i64,
    working_on: Option<&[RequestId]>,
) -> Heartbeat {
    store
        .heartbeat(&daemon(store, t), now, 0, working_on)
        .unwrap()
}

pub fn daemon_by_token_names_the_running_request_until_it_is_renewed(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, None);
    create(store.as_ref(), t.runtime, T0);
    assert_eq!(
        daemon(store.as_ref(), &t).unrenewed,
        None,
        "pending is not handed out"
    );
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, Some(id));
    store
        .report(t.runtime, id, &Report::Running, T0 + 1)
        .unwrap();
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, None, "renewed");
}

pub fn a_lost_hand_out_is_handed_out_again_only_when_working_on_omits_it(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let later = T0 + 1_000;
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, None),
        Heartbeat::Alive(None),
        "without working_on nothing is handed out twice"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, Some(&[id])),
        Heartbeat::Alive(None),
        "the daemon holds it"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, Some(&[new_id()])),
        Heartbeat::Alive(Some(id)),
        "the daemon does not hold it: its answer was lost"
    );
    let r = get(store.as_ref(), t.runtime, id, later);
    assert_eq!(r.status, Status::Running);
    assert_eq!(r.deadline_at, later + RUNNING_MS, "with a fresh lease");
}

pub fn a_renewed_or_expired_request_is_never_handed_out_again(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, id, &Report::Running, T0 + 1)
        .unwrap();
    assert!(
        !store.hand_out_again(t.runtime, id, T0 + 2).unwrap(),
        "renewed"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, T0 + 2, Some(&[])),
        Heartbeat::Alive(None)
    );

    let other = tenant(store.as_ref());
    let lapsed = running(store.as_ref(), other.runtime, T0);
    assert!(
        !store
            .hand_out_again(other.runtime, lapsed, T0 + RUNNING_MS)
            .unwrap(),
        "its lease ran out"
    );
    assert!(
        !store.hand_out_again(t.runtime, lapsed, T0 + 1).unwrap(),
        "another runtime's request"
    );
    store
        .report(other.runtime, lapsed, &completed(), T0 + 1)
        .ok();
    let third = tenant(store.as_ref());
    let pending = create(store.as_ref(), third.runtime, T0).id;
    assert!(
        !store
            .hand_out_again(third.runtime, pending, T0 + 1)
            .unwrap(),
        "pending"
    );
    assert_eq!(
        get(store.as_ref(), third.runtime, pending, T0 + 1).status,
        Status::Pending
    );
}

pub fn active_requests_lists_pending_and_running_requests_only(engine: &dyn Engine) {
    let store = engine.open();
    let (a, b, c) = (
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
    );
    let pending = create(store.as_ref(), a.runtime, T0);
    let run = running(store.as_ref(), b.runtime, T0);
    let ended = running(store.as_ref(), c.runtime, T0);
    store
        .report(c.runtime, ended, &completed(), T0 + 1)
        .unwrap();
    let mut active = store.active_requests().unwrap();
    active.sort_by_key(|a| a.status.as_str());
    assert_eq!(
        active,
        vec![
            Active {
                id: pending.id,
                runtime_id: a.runtime,
                status: Status::Pending,
                deadline_at: T0 + PENDING_MS,
            },
            Active {
                id: run,
                runtime_id: b.runtime,
                status: Status::Running,
                deadline_at: T0 + RUNNING_MS,
            },
        ]
    );
}

/// Waits on `listener` until a change that concerns `wanted` (or an unknown change) comes,
/// or 10 s pass: whether one came.
fn listener_hears(listener: &mut dyn Listener, wanted: Change) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let changes = listener.wait(Duration::from_millis(200)).unwrap();
        if changes
            .iter()
            .any(|c| *c == wanted || *c == Change::Unknown)
        {
            return true;
        }
    }
    false
}

pub fn a_create_through_one_handle_wakes_the_listener_of_another(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let mut listener = reader.listen().unwrap();
    create(writer.as_ref(), t.runtime, T0);
    assert!(listener_hears(
        listener.as_mut(),
        Change::Pending(t.runtime)
    ));
}

pub fn a_claim_and_a_report_through_one_handle_wake_the_listener_of_another(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let id = create(writer.as_ref(), t.runtime, T0).id;
    let mut listener = reader.listen().unwrap();
    writer.claim_next_pending(t.runtime, T0).unwrap();
    assert!(
        listener_hears(listener.as_mut(), Change::Status(id)),
        "claimed"
    );
    writer.report(t.runtime, id, &completed(), T0 + 1).unwrap();
    assert!(
        listener_hears(listener.as_mut(), Change::Status(id)),
        "reported"
    );
}

pub fn an_expiry_by_the_sweeper_wakes_the_listener_of_another_handle(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let id = create(writer.as_ref(), t.runtime, T0).id;
    let mut listener = reader.listen().unwrap();
    writer.expire_overdue(T0 + PENDING_MS, BATCH).unwrap();
    assert!(listener_hears(listener.as_mut(), Change::Status(id)));
}
