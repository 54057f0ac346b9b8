//! What every topic of the conformance suite shares: the timeouts and the clock's start, a
//! tenant (a workspace and a runtime), and short ways to create, claim and end a request.

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::cell::Cell;
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

pub fn new_id() -> RequestId {
    RequestId::random().unwrap()
}

thread_local! {
    /// The kind the running case is about: set by [`kind_tests!`] before the case starts,
    /// on the case's own thread. Every helper here makes requests of this kind.
    static KIND: Cell<Kind> = const { Cell::new(Kind::Models) };
}

/// The kind of request the running case is about.
pub fn kind() -> Kind {
    KIND.with(Cell::get)
}

pub fn set_kind(kind: Kind) {
    KIND.with(|k| k.set(kind));
}

/// `kind_tests!(…; case, …)`: [`engine_tests!`] once per kind, in a module named after
/// the kind (`<topic>::<kind>::<engine>::<case>`), each case run with [`kind`] set. A case
/// that does not apply to every kind is listed in an `engine_tests!` of its own, with the
/// reason.
macro_rules! kind_tests {
    (with_pgbouncer $timeouts:expr; $($case:ident),* $(,)?) => {
        kind_tests!(@each [with_pgbouncer] $timeouts; $($case),*);
    };
    ($timeouts:expr; $($case:ident),* $(,)?) => {
        kind_tests!(@each [] $timeouts; $($case),*);
    };
    (@each [$($how:tt)*] $timeouts:expr; $($case:ident),*) => {
        kind_tests!(@kind models Models [$($how)*] $timeouts; $($case),*);
        kind_tests!(@kind local_skills LocalSkills [$($how)*] $timeouts; $($case),*);
        kind_tests!(@kind skill_import SkillImport [$($how)*] $timeouts; $($case),*);
        kind_tests!(@kind update Update [$($how)*] $timeouts; $($case),*);
    };
    (@kind $module:ident $kind:ident [$($how:tt)*] $timeouts:expr; $($case:ident),*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(fn $case(engine: &dyn $crate::support::engines::Engine) {
                $crate::common::set_kind(::model_relay::kind::Kind::$kind);
                super::$case(engine)
            })*
            $crate::support::engines::engine_tests!($($how)* $timeouts; $($case),*);
        }
    };
}
pub(crate) use kind_tests;

/// A new request of the running case's kind: a skill import of one key, an update to one
/// version, so that two of them coalesce (or, for updates, the second is refused) as a
/// model list's do.
pub fn new_request(id: RequestId) -> NewRequest {
    let kind = kind();
    match kind {
        Kind::SkillImport => NewRequest {
            id,
            kind,
            key: "claude:review".into(),
            input: Some(r#"{"skill_key":"claude:review"}"#.into()),
        },
        Kind::Update => NewRequest {
            id,
            kind,
            key: String::new(),
            input: Some(r#"{"target_version":"2.1.0"}"#.into()),
        },
        Kind::Models | Kind::LocalSkills => NewRequest::of(kind, id),
    }
}

pub fn create(store: &dyn Storer, runtime: RuntimeId, now: i64) -> StoredRequest {
    store
        .create_or_coalesce(runtime, &new_request(new_id()), now)
        .unwrap()
        .expect("runtime exists")
        .request
}

/// The error a request of the running case's kind gets when it times out in `phase`.
pub fn timeout_error(phase: Status) -> String {
    kind().timeout_error(&TIMEOUTS, phase)
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
            .claim_next_pending(runtime, kind(), now)
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

/// A completed report of the running case's kind, with a result of that kind.
pub fn completed() -> Report {
    let result = match kind() {
        Kind::Models => None,
        Kind::LocalSkills => Some(
            r#"{"skills":[{"key":"claude:review","name":"Review","source_path":"/s","provider":"claude","file_count":1}],"supported":true}"#,
        ),
        Kind::SkillImport => Some(
            r##"{"skill":{"key":"claude:review","name":"Review","content":"# Review","source_path":"/s","provider":"claude","files":[]}}"##,
        ),
        Kind::Update => Some(r#"{"output":"installed 2.1.0"}"#),
    };
    Report::Ended(Outcome {
        result: result.map(str::to_owned),
        status: Status::Completed,
        models: if kind() == Kind::Models {
            models()
        } else {
            Vec::new()
        },
        supported: true,
        error: None,
        fallback: false,
    })
}

/// Whether `request` holds what [`completed`] reported.
pub fn holds_completed(request: &StoredRequest) -> bool {
    matches!(completed(), Report::Ended(outcome) if outcome.is_recorded_in(request))
}

/// A heartbeat's answer that hands out `id`, of the running case's kind, and nothing else.
pub fn alive(store: &dyn Storer, runtime: RuntimeId, id: RequestId) -> Heartbeat {
    let input = store
        .find_request(runtime, id)
        .unwrap()
        .and_then(|r| r.input);
    Heartbeat::Alive(vec![Handed {
        id,
        kind: kind(),
        input,
    }])
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
