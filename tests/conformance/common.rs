//! What every topic of the conformance suite shares: the timeouts and the clock's start, a
//! tenant (a workspace and a runtime), and short ways to create, claim and end a request.

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::time::Duration;

use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash, WorkspaceId};
use model_relay::model::{
    ModelEntry, Outcome, Report, ServiceTier, Status, StoredRequest, Thinking, ThinkingLevel,
    Timeouts,
};
use model_relay::store::{Handed, Heartbeat, NewRuntime, Storer};

pub const TIMEOUTS: Timeouts = Timeouts {
    pending: Duration::from_secs(30),
    running: Duration::from_secs(60),
};

pub const PENDING_MS: i64 = 30_000;
pub const RUNNING_MS: i64 = 60_000;

/// A fixed start, so that every timestamp in a failure message is reproducible.
pub const T0: i64 = 1_777_627_161_000;

pub struct Tenant {
    pub workspace: WorkspaceId,
    pub runtime: RuntimeId,
    pub daemon_token: TokenHash,
}

pub fn workspace(store: &dyn Storer) -> (WorkspaceId, TokenHash) {
    let id = WorkspaceId::random().unwrap();
    let token = Token::new_api().unwrap().hash();
    store.create_workspace(id, "ws", &token, T0).unwrap();
    (id, token)
}

pub fn runtime_in(store: &dyn Storer, workspace: WorkspaceId, now: i64) -> (RuntimeId, TokenHash) {
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

/// A heartbeat's answer that hands out `id` and nothing else.
pub fn alive(id: RequestId) -> Heartbeat {
    Heartbeat::Alive(vec![Handed {
        id,
        kind: Kind::Models,
        input: None,
    }])
}

pub fn new_id() -> RequestId {
    RequestId::random().unwrap()
}

pub fn create(store: &dyn Storer, runtime: RuntimeId, now: i64) -> StoredRequest {
    store
        .create_or_coalesce(runtime, &NewRequest::of(Kind::Models, new_id()), now)
        .unwrap()
        .expect("runtime exists")
        .request
}

pub fn get(store: &dyn Storer, runtime: RuntimeId, id: RequestId, now: i64) -> StoredRequest {
    store
        .get_request(runtime, id, now)
        .unwrap()
        .expect("request exists")
}

/// A request that is running: created at `now`, claimed at `now`.
pub fn running(store: &dyn Storer, runtime: RuntimeId, now: i64) -> RequestId {
    let id = create(store, runtime, now).id;
    assert_eq!(
        store
            .claim_next_pending(runtime, Kind::Models, now)
            .unwrap()
            .claimed,
        Some(id)
    );
    id
}

pub fn models() -> Vec<ModelEntry> {
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
            ..Default::default()
        },
    ]
}

pub fn completed() -> Report {
    Report::Ended(Outcome {
        result: None,
        status: Status::Completed,
        models: models(),
        supported: true,
        error: None,
        fallback: false,
    })
}

pub fn failed(error: &str) -> Report {
    Report::Ended(Outcome {
        result: None,
        status: Status::Failed,
        models: Vec::new(),
        supported: true,
        error: Some(error.into()),
        fallback: false,
    })
}
