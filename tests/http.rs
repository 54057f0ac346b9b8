//! The HTTP contract of DESIGN.md, over the wire: real servers on `127.0.0.1:0` through the
//! `run` seam, a real HTTP client, a fake clock.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use model_relay::clock::{Clock, FakeClock, Millis, rfc3339};
use model_relay::config::Settings;
use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash, TokenId, WorkspaceId};
use model_relay::kind::Kind;
use model_relay::model::{Report, Runtime, Status, StoredRequest, Timeouts};
use model_relay::store::memory::MemoryStore;
use model_relay::store::{
    Active, Added, ApiToken, ApiTokenUse, Ask, Claim, Created, Daemon, Expired, Listener,
    NewRuntime, RequestCounts, Result as StoreResult, RuntimeCursor, Scoped, StoreError, Storer,
    Workspace,
};
use serde_json::{Value, json};
use support::engines::{Engine, engine_tests};
use support::server::{Http, Instance, T0, clock, settings, workspace};

/// One instance on a memory store, a workspace, and its API token.
struct World {
    http: Http,
    clock: Arc<FakeClock>,
    store: Arc<dyn Storer>,
    instance: Instance,
    api: String,
}

impl World {
    async fn new() -> Self {
        let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
        Self::on(store).await
    }

    async fn on(store: Arc<dyn Storer>) -> Self {
        Self::with(store, settings()).await
    }

    /// On a memory store, with these settings.
    async fn with_settings(settings: Settings) -> Self {
        Self::with(Arc::new(MemoryStore::new(Timeouts::default())), settings).await
    }

    async fn with(store: Arc<dyn Storer>, settings: Settings) -> Self {
        let clock = clock();
        let (_, api) = workspace(store.as_ref(), T0);
        let instance = Instance::start(store.clone(), clock.clone(), settings).await;
        World {
            http: Http::default(),
            clock,
            store,
            instance,
            api,
        }
    }

    /// [`World::on`] `engine`'s store, from a multi-threaded runtime: the PostgreSQL client
    /// blocks, so the store is opened and the workspace made outside the workers.
    async fn on_engine(engine: &dyn Engine) -> Self {
        let clock = clock();
        let (store, api) = tokio::task::block_in_place(|| {
            let store = engine.open();
            let (_, api) = workspace(store.as_ref(), T0);
            (store, api)
        });
        let instance = Instance::start(store.clone(), clock.clone(), settings()).await;
        World {
            http: Http::default(),
            clock,
            store,
            instance,
            api,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.instance.base)
    }

    /// A runtime created over the API: (id, daemon token).
    /// `POST /api/runtimes` with `body`, as the workspace.
    async fn create_runtime(&self, body: Value) -> support::server::Answer {
        self.http
            .post(&self.url("/api/runtimes"), &self.api, body)
            .await
    }

    async fn runtime(&self) -> (String, String) {
        let answer = self
            .create_runtime(json!({"name": "laptop", "provider": "claude"}))
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.json);
        (
            answer.json["id"].as_str().unwrap().to_owned(),
            answer.json["daemon_token"].as_str().unwrap().to_owned(),
        )
    }

    /// A runtime whose daemon has just heartbeated.
    async fn online_runtime(&self) -> (String, String) {
        let (rt, daemon) = self.runtime().await;
        assert_eq!(self.heartbeat(&rt, &daemon).await.status, StatusCode::OK);
        (rt, daemon)
    }

    async fn heartbeat(&self, rt: &str, daemon: &str) -> support::server::Answer {
        self.http
            .post(
                &self.url("/api/daemon/heartbeat"),
                daemon,
                json!({"runtime_id": rt}),
            )
            .await
    }

    async fn create_request(&self, rt: &str) -> support::server::Answer {
        self.http
            .post_empty(&self.url(&format!("/api/runtimes/{rt}/models")), &self.api)
            .await
    }

    async fn poll(&self, rt: &str, id: &str) -> support::server::Answer {
        self.http
            .get(
                &self.url(&format!("/api/runtimes/{rt}/models/{id}")),
                &self.api,
            )
            .await
    }

    async fn report(
        &self,
        rt: &str,
        id: &str,
        daemon: &str,
        body: Value,
    ) -> support::server::Answer {
        self.http
            .post(
                &self.url(&format!("/api/daemon/runtimes/{rt}/models/{id}/result")),
                daemon,
                body,
            )
            .await
    }

    /// A discovery that skips the catalog (the page's "Refresh").
    async fn refresh(&self, rt: &str) -> support::server::Answer {
        self.http
            .post(
                &self.url(&format!("/api/runtimes/{rt}/models")),
                &self.api,
                json!({"refresh": true}),
            )
            .await
    }

    /// A request that the runtime's daemon has claimed: its id.
    async fn claimed(&self, rt: &str, daemon: &str) -> String {
        let id = self.refresh(rt).await.json["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ack = self.heartbeat(rt, daemon).await;
        assert_eq!(ack.json["pending_model_list"]["id"], id.as_str());
        id
    }
}

fn sonnet() -> Value {
    json!({"id": "claude-sonnet-4-6", "label": "Claude Sonnet 4.6", "provider": "anthropic", "default": true})
}

#[tokio::test]
async fn full_cycle_answers_with_the_reference_shapes() {
    let w = World::new().await;
    let (rt, daemon) = w.runtime().await;
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.json,
        json!({"status": "ok"})
    );

    w.clock.advance(Duration::from_millis(123));
    let created = w.create_request(&rt).await;
    assert_eq!(created.status, StatusCode::OK);
    assert_eq!(created.content_type.as_deref(), Some("application/json"));
    let id = created.json["id"].as_str().unwrap().to_owned();
    assert!(RequestId::parse(&id).is_some(), "32 lowercase hex: {id}");
    assert_eq!(
        created.json,
        json!({"id": id, "runtime_id": rt, "kind": "models", "status": "pending", "supported": true,
               "created_at": "2026-05-01T09:19:21.123Z", "updated_at": "2026-05-01T09:19:21.123Z"})
    );

    let ack = w.heartbeat(&rt, &daemon).await;
    assert_eq!(
        ack.json,
        json!({"status": "ok", "pending_model_list": {"id": id}})
    );
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");

    w.clock.advance(Duration::from_secs(5));
    let report = json!({"status": "completed", "models": [sonnet(), {"id": "o", "label": "O", "extra": 1}], "unknown": true});
    let answer = w.report(&rt, &id, &daemon, report).await;
    assert_eq!(
        (answer.status, answer.json.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );

    let done = w.poll(&rt, &id).await;
    assert_eq!(
        done.json,
        json!({"id": id, "runtime_id": rt, "kind": "models", "status": "completed",
               "models": [sonnet(), {"id": "o", "label": "O"}], "supported": true,
               "created_at": "2026-05-01T09:19:21.123Z", "updated_at": "2026-05-01T09:19:26.123Z"})
    );
}

#[tokio::test]
async fn runtime_creation_shows_the_daemon_token_once_and_lists_online_status() {
    let w = World::new().await;
    let (rt, daemon) = w.runtime().await;
    assert!(daemon.len() >= 32);
    let list = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(
        list.json,
        json!({"runtimes": [{"id": rt, "name": "laptop", "provider": "claude", "status": "offline",
                             "created_at": "2026-05-01T09:19:21.000Z"}]})
    );
    w.heartbeat(&rt, &daemon).await;
    let runtime = &w.http.get(&w.url("/api/runtimes"), &w.api).await.json["runtimes"][0];
    assert_eq!(runtime["status"], "online");
    assert_eq!(runtime["last_seen_at"], "2026-05-01T09:19:21.000Z");
    assert!(runtime.get("daemon_token").is_none());

    w.clock.advance(Duration::from_secs(45));
    let runtime = &w.http.get(&w.url("/api/runtimes"), &w.api).await.json["runtimes"][0];
    assert_eq!(
        runtime["status"], "offline",
        "no heartbeat for offline_after"
    );
}

#[tokio::test]
async fn create_for_an_offline_runtime_is_503_runtime_is_offline() {
    let w = World::new().await;
    let (rt, daemon) = w.runtime().await;
    let never_seen = w.create_request(&rt).await;
    assert_eq!(never_seen.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(never_seen.json, json!({"error": "runtime is offline"}));

    w.heartbeat(&rt, &daemon).await;
    w.clock.advance(Duration::from_secs(45));
    assert_eq!(
        w.create_request(&rt).await.json,
        json!({"error": "runtime is offline"})
    );
}

#[tokio::test]
async fn create_returns_the_active_request_instead_of_a_new_one() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let first = w.create_request(&rt).await.json["id"].clone();
    assert_eq!(w.create_request(&rt).await.json["id"], first);
    w.heartbeat(&rt, &daemon).await;
    let running = w.create_request(&rt).await;
    assert_eq!(
        (running.json["id"].clone(), running.json["status"].clone()),
        (first, json!("running"))
    );
}

#[tokio::test]
async fn a_heartbeat_hands_out_a_request_once() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    w.claimed(&rt, &daemon).await;
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.json,
        json!({"status": "ok"})
    );
}

#[tokio::test]
async fn unknown_and_foreign_ids_are_the_same_404() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;

    // Another workspace's caller sees nothing of this one.
    let (_, stranger) = workspace(w.store.as_ref(), T0);
    let as_stranger = w
        .http
        .get(
            &w.url(&format!("/api/runtimes/{rt}/models/{id}")),
            &stranger,
        )
        .await;
    assert_eq!(as_stranger.status, StatusCode::NOT_FOUND);
    assert_eq!(as_stranger.json, json!({"error": "runtime not found"}));
    let models = format!("/api/runtimes/{rt}/models");
    assert_eq!(
        w.http.post_empty(&w.url(&models), &stranger).await.status,
        StatusCode::NOT_FOUND
    );
    let delete = w
        .http
        .call(
            Method::DELETE,
            &w.url(&format!("/api/runtimes/{rt}")),
            Some(&stranger),
            None,
        )
        .await;
    assert_eq!(delete.status, StatusCode::NOT_FOUND);

    // Another runtime's request, a missing one, and ids that cannot exist.
    let (other_rt, _) = w.online_runtime().await;
    let cases = [
        (other_rt.as_str(), id.as_str(), "request not found"),
        (
            rt.as_str(),
            "0123456789abcdef0123456789abcdef",
            "request not found",
        ),
        (rt.as_str(), "NOT-AN-ID", "request not found"),
        ("not-a-uuid", id.as_str(), "runtime not found"),
        (
            "7d0c5a3e-1111-4222-8333-944455556666",
            id.as_str(),
            "runtime not found",
        ),
    ];
    for (runtime, request, message) in cases {
        let answer = w.poll(runtime, request).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{runtime}/{request}");
        assert_eq!(
            answer.json,
            json!({"error": message}),
            "{runtime}/{request}"
        );
    }
    assert_eq!(w.poll(&rt, &id).await.status, StatusCode::OK, "still there");
}

#[tokio::test]
async fn a_daemon_token_acts_for_its_own_runtime_only() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let (other_rt, other_daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;

    let foreign_heartbeat = w.heartbeat(&rt, &other_daemon).await;
    assert_eq!(foreign_heartbeat.status, StatusCode::NOT_FOUND);
    assert_eq!(
        foreign_heartbeat.json,
        json!({"error": "runtime not found"})
    );

    let done = json!({"status": "completed", "models": [sonnet()]});
    let via_own_path = w.report(&other_rt, &id, &other_daemon, done.clone()).await;
    assert_eq!(via_own_path.status, StatusCode::NOT_FOUND);
    let via_foreign_path = w.report(&rt, &id, &other_daemon, done.clone()).await;
    assert_eq!(via_foreign_path.status, StatusCode::NOT_FOUND);
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");
    assert_eq!(
        w.report(&rt, &id, &daemon, done).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn missing_or_unknown_tokens_are_401() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let calls = [
        (Method::GET, "/api/runtimes".to_owned()),
        (Method::POST, format!("/api/runtimes/{rt}/models")),
        (Method::POST, format!("/api/runtimes/{rt}/daemon-token")),
        (Method::POST, "/api/daemon/heartbeat".to_owned()),
    ];
    for (method, path) in calls {
        for token in [None, Some("mra_nobody"), Some(daemon.as_str())]
            .into_iter()
            .filter(|t| !(path.contains("daemon") && *t == Some(daemon.as_str())))
        {
            let answer = w
                .http
                .call(method.clone(), &w.url(&path), token, None)
                .await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            assert_eq!(
                answer.json,
                json!({"error": "missing or invalid bearer token"})
            );
        }
    }
    // An API token is not a daemon token.
    let as_ui = w
        .http
        .post(
            &w.url("/api/daemon/heartbeat"),
            &w.api,
            json!({"runtime_id": rt}),
        )
        .await;
    assert_eq!(as_ui.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_bodies_are_400_with_a_message_and_change_nothing() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let result = w.url(&format!("/api/daemon/runtimes/{rt}/models/{id}/result"));
    let bodies: [&[u8]; 9] = [
        b"",
        b"{",
        b"[]",
        br#"{"status":"done"}"#,
        br#"{"status":"pending"}"#,
        br#"{"status":"completed","models":"all"}"#,
        br#"{"status":"completed","models":[{"id":"m"}]}"#,
        br#"{"status":"completed","supported":"yes"}"#,
        b"\xff\xfe",
    ];
    for body in bodies {
        let answer = w
            .http
            .call(Method::POST, &result, Some(&daemon), Some(body.to_vec()))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(body)
        );
        assert!(
            answer.json["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            answer.json
        );
    }
    assert_eq!(
        w.poll(&rt, &id).await.json["status"],
        "running",
        "nothing changed"
    );

    for body in [
        &b"{}"[..],
        br#"{"runtime_id":"nope"}"#,
        br#"{"runtime_id":7}"#,
    ] {
        let answer = w
            .http
            .call(
                Method::POST,
                &w.url("/api/daemon/heartbeat"),
                Some(&daemon),
                Some(body.to_vec()),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    }
    let bad_runtime = w
        .create_runtime(json!({"name": "", "provider": "claude"}))
        .await;
    assert_eq!(bad_runtime.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_runtime.json, json!({"error": "name must not be empty"}));
    let listed = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(listed.json["runtimes"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn control_characters_in_names_providers_and_model_ids_are_400_naming_the_field() {
    let w = World::new().await;
    for (name, provider, field) in [
        ("lap\u{0}top", "claude", "name"),
        ("lap\ttop", "claude", "name"),
        ("bell\u{7}", "claude", "name"),
        ("laptop", "cla\u{0}ude", "provider"),
        ("laptop", "claude\u{1f}x", "provider"),
        ("laptop", "cla\nude", "provider"),
    ] {
        let answer = w
            .create_runtime(json!({"name": name, "provider": provider}))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{name:?} {provider:?}"
        );
        assert_eq!(
            answer.json,
            json!({"error": format!("{field} must not contain control characters")})
        );
    }
    let listed = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(listed.json["runtimes"], json!([]), "nothing stored");

    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    for (i, bad) in ["gpt\u{0}5", "gpt\n5", "\u{1b}[31mgpt"]
        .into_iter()
        .enumerate()
    {
        let mut models = vec![json!({"id": "fine", "label": "Fine"}); i];
        models.push(json!({"id": bad, "label": "Bad"}));
        let report = json!({"status": "completed", "models": models});
        let answer = w.report(&rt, &id, &daemon, report).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(
            answer.json,
            json!({"error": format!("models[{i}].id must not contain control characters")})
        );
    }
    assert_eq!(
        w.poll(&rt, &id).await.json["status"],
        "running",
        "nothing stored"
    );
}

#[tokio::test]
async fn a_lone_surrogate_in_a_json_string_is_400() {
    // JSON may spell a UTF-16 surrogate that pairs with nothing; serde_json refuses it
    // (a Rust string cannot hold one), so it never reaches an engine.
    let w = World::new().await;
    let create = w.url("/api/runtimes");
    for body in [
        r#"{"name":"a\ud800b","provider":"p"}"#,
        r#"{"name":"a","provider":"\udc00"}"#,
        r#"{"name":"\ud800","provider":"p"}"#,
    ] {
        let answer = w
            .http
            .call(Method::POST, &create, Some(&w.api), Some(body.into()))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        // serde_json's words differ by where the surrogate stands ("lone leading
        // surrogate", "unexpected end of hex escape"); the parser's refusal is the point.
        let error = answer.json["error"].as_str().unwrap();
        assert!(error.starts_with("invalid JSON body: "), "{body}: {error}");
    }
    let listed = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(listed.json["runtimes"], json!([]), "nothing stored");

    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let result = w.url(&format!("/api/daemon/runtimes/{rt}/models/{id}/result"));
    for body in [
        r#"{"status":"failed","error":"\ud800"}"#,
        r#"{"status":"completed","models":[{"id":"m","label":"\ud834x"}]}"#,
    ] {
        let answer = w
            .http
            .call(Method::POST, &result, Some(&daemon), Some(body.into()))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        // serde_json's words differ by where the surrogate stands ("lone leading
        // surrogate", "unexpected end of hex escape"); the parser's refusal is the point.
        let error = answer.json["error"].as_str().unwrap();
        assert!(error.starts_with("invalid JSON body: "), "{body}: {error}");
    }
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");
    // A pair is one character (𝄞) and is taken.
    let paired = r#"{"status":"failed","error":"\ud834\udd1e"}"#;
    let answer = w
        .http
        .call(Method::POST, &result, Some(&daemon), Some(paired.into()))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(w.poll(&rt, &id).await.json["error"], "𝄞");
}

#[tokio::test]
async fn thinking_and_service_tiers_come_back_as_sent_and_blank_ids_are_dropped() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let gpt = json!({
        "id": "gpt-5", "label": "GPT-5", "provider": "openai",
        "thinking": {
            "supported_levels": [
                {"value": "low", "label": "Low"},
                {"value": "high", "label": "High", "description": "Slower"}
            ],
            "default_level": "low"
        },
        "service_tiers": [{"id": "flex", "name": "Flex", "description": "Cheaper"}]
    });
    let report = json!({
        "status": "completed",
        "models": [{"id": " ", "label": "blank"}, gpt, sonnet()]
    });
    assert_eq!(
        w.report(&rt, &id, &daemon, report.clone()).await.status,
        StatusCode::OK
    );
    let read = w.poll(&rt, &id).await;
    assert_eq!(read.json["models"], json!([gpt, sonnet()]));
    // The same report again is a replay of what was recorded, blank entry and all.
    assert_eq!(
        w.report(&rt, &id, &daemon, report).await.status,
        StatusCode::OK
    );

    let id = w.claimed(&rt, &daemon).await;
    let too_many = json!({
        "status": "completed",
        "models": [{"id": "m", "label": "M", "service_tiers": vec![json!({"id": "t", "name": "T"}); 33]}]
    });
    let refused = w.report(&rt, &id, &daemon, too_many).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.json,
        json!({"error": "models[0].service_tiers must list at most 32 tiers"})
    );
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");
}

#[tokio::test]
async fn the_next_ask_is_answered_from_the_catalog_and_refresh_asks_the_daemon() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let reported_at = w.clock.now();
    let body = json!({"status": "completed", "models": [sonnet()]});
    assert_eq!(
        w.report(&rt, &id, &daemon, body).await.status,
        StatusCode::OK
    );

    w.clock.advance(Duration::from_secs(1));
    let cached = w.create_request(&rt).await;
    assert_eq!(cached.status, StatusCode::OK);
    let cached = cached.json;
    assert_eq!(cached["status"], "completed");
    assert_eq!(cached["cached"], true);
    assert_eq!(cached["cached_at"], rfc3339(reported_at));
    assert_eq!(cached["models"], json!([sonnet()]));
    assert!(cached.get("refresh_id").is_none() && cached.get("fallback").is_none());
    assert_ne!(cached["id"], id.as_str());
    let read = w.poll(&rt, cached["id"].as_str().unwrap()).await;
    assert_eq!(read.json, cached, "a stored request, readable by id");
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.json,
        json!({"status": "ok"}),
        "the daemon was not asked"
    );

    let refreshed = w.refresh(&rt).await.json;
    assert_eq!(refreshed["status"], "pending");
    assert!(refreshed.get("cached").is_none());
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.json["pending_model_list"]["id"],
        refreshed["id"]
    );
}

#[tokio::test]
async fn a_stale_catalog_answers_and_names_the_discovery_it_started() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let body = json!({"status": "completed", "models": [sonnet()]});
    assert_eq!(
        w.report(&rt, &id, &daemon, body).await.status,
        StatusCode::OK
    );

    w.clock.advance(Duration::from_secs(61));
    w.heartbeat(&rt, &daemon).await;
    let stale = w.create_request(&rt).await.json;
    assert_eq!(stale["cached"], true);
    let refresh = stale["refresh_id"].as_str().expect("refresh_id").to_owned();
    assert_eq!(w.poll(&rt, &refresh).await.json["status"], "pending");
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.json["pending_model_list"]["id"],
        refresh.as_str()
    );
}

#[tokio::test]
async fn a_fallback_report_is_returned_and_never_answers_from_the_catalog() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let body = json!({"status": "completed", "models": [sonnet()], "fallback": true});
    assert_eq!(
        w.report(&rt, &id, &daemon, body).await.status,
        StatusCode::OK
    );
    assert_eq!(w.poll(&rt, &id).await.json["fallback"], true);
    let next = w.create_request(&rt).await.json;
    assert_eq!(next["status"], "pending", "{next}");
}

#[tokio::test]
async fn bad_ask_bodies_are_400_and_start_nothing() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let url = w.url(&format!("/api/runtimes/{rt}/models"));
    let bad = [&b"{"[..], b"[]", br#"{"refresh":"yes"}"#, b"null", b"\xff"];
    let good = [&b"{}"[..], br#"{"refresh":false,"extra":1}"#, b" "];
    let asks = bad.map(|b| (b, StatusCode::BAD_REQUEST));
    for (body, expected) in asks.into_iter().chain(good.map(|b| (b, StatusCode::OK))) {
        let answer = w
            .http
            .call(Method::POST, &url, Some(&w.api), Some(body.to_vec()))
            .await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(answer.status, expected, "{shown:?}: {}", answer.json);
        if expected == StatusCode::BAD_REQUEST {
            assert!(answer.json["error"].is_string(), "{}", answer.json);
            // Nothing was started: the daemon is handed nothing.
            assert_eq!(
                w.heartbeat(&rt, &daemon).await.json,
                json!({"status": "ok"})
            );
        }
    }
}

#[tokio::test]
async fn bodies_past_the_limit_are_413() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let padding = "x".repeat(1024 * 1024);
    let huge = json!({"status": "completed", "error": padding});
    let answer = w.report(&rt, &id, &daemon, huge).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answer.json,
        json!({"error": "body larger than 1048576 bytes"})
    );
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");
}

#[tokio::test]
async fn creating_a_runtime_past_the_workspace_limit_is_409_and_stores_nothing() {
    let w = World::with_settings(Settings {
        max_runtimes_per_workspace: 2,
        ..settings()
    })
    .await;
    w.runtime().await;
    w.runtime().await;
    let refused = w
        .create_runtime(json!({"name": "third", "provider": "claude"}))
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(
        refused.json,
        json!({"error": "this workspace has 2 runtimes, the most allowed: delete one first"})
    );
    let list = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(list.json["runtimes"].as_array().unwrap().len(), 2);
}

/// Opening the picker on one catalog hands out one stored record, again and again; past
/// `--max-requests-per-workspace` a call that would store one more is 429 and stores
/// nothing, while the stored answer is still handed out.
#[tokio::test]
async fn a_workspace_at_its_stored_request_limit_is_429_and_its_answer_still_opens() {
    let w = World::with_settings(Settings {
        max_requests_per_workspace: 2,
        ..settings()
    })
    .await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let done = w
        .report(
            &rt,
            &id,
            &daemon,
            json!({"status": "completed", "models": [sonnet()]}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.json);

    let first = w.create_request(&rt).await;
    assert_eq!(first.json["cached"], true, "{}", first.json);
    for _ in 0..5 {
        let again = w.create_request(&rt).await;
        assert_eq!((again.status, &again.json), (first.status, &first.json));
    }
    let workspace = w.store.list_workspaces().unwrap()[0].id;
    assert_eq!(w.store.stored_requests(workspace).unwrap(), 2);

    let refused = w.refresh(&rt).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.json,
        json!({"error": "this workspace stores 2 requests, the most allowed: try again once older ones have passed retention"})
    );
    let (other, other_daemon) = w.online_runtime().await;
    assert_eq!(
        w.create_request(&other).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let ack = w.heartbeat(&other, &other_daemon).await;
    assert!(ack.json["pending_model_list"].is_null(), "{}", ack.json);
    assert_eq!(w.store.stored_requests(workspace).unwrap(), 2);
    // The stored answer is still handed out, and readable by id.
    assert_eq!(w.create_request(&rt).await.json, first.json);
    let read = w.poll(&rt, first.json["id"].as_str().unwrap()).await;
    assert_eq!(read.status, StatusCode::OK);
}

#[tokio::test]
async fn a_report_past_the_models_limit_or_with_a_huge_entry_is_400_and_changes_nothing() {
    let w = World::with_settings(Settings {
        max_models_per_report: 3,
        ..settings()
    })
    .await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let model = |i: usize| json!({"id": format!("m{i}"), "label": format!("Model {i}")});

    let four: Vec<Value> = (0..4).map(model).collect();
    let answer = w
        .report(
            &rt,
            &id,
            &daemon,
            json!({"status": "completed", "models": four}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json,
        json!({"error": "models lists 4 entries; a report may list at most 3"})
    );

    // Within the field bounds, but 20,000 characters of label: the entry is named.
    let huge = json!({"id": "big", "label": "x".repeat(20_000)});
    let answer = w
        .report(
            &rt,
            &id,
            &daemon,
            json!({"status": "completed", "models": [model(0), huge]}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let error = answer.json["error"].as_str().unwrap();
    assert!(
        error.starts_with("models[1] (id \"big\") is 200") && error.ends_with("at most 16384"),
        "{error}"
    );
    assert_eq!(w.poll(&rt, &id).await.json["status"], "running");

    let three: Vec<Value> = (0..3).map(model).collect();
    let answer = w
        .report(
            &rt,
            &id,
            &daemon,
            json!({"status": "completed", "models": three}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(
        w.poll(&rt, &id).await.json["models"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn runtimes_are_listed_a_page_at_a_time_each_once_in_order() {
    let w = World::new().await;
    let mut created = Vec::new();
    // Runtimes 0–2 share a millisecond: a page may end between them.
    for i in 0..5 {
        if i >= 3 {
            w.clock.advance(Duration::from_millis(1));
        }
        created.push(w.runtime().await.0);
    }
    let whole = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    let ids = |page: &Value| -> Vec<String> {
        let list = page["runtimes"].as_array().unwrap();
        list.iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = ids(&whole.json);
    assert_eq!(all.len(), 5);
    assert_eq!(whole.json.get("next_cursor"), None, "one page holds them");
    let mut same_ms = created[..3].to_vec();
    same_ms.sort();
    assert_eq!(all[..3], same_ms[..], "ties in id order");
    assert_eq!(all[3..], created[3..], "then by created_at");

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut url = w.url("/api/runtimes?limit=2");
    loop {
        let page = w.http.get(&url, &w.api).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.json);
        pages += 1;
        let got = ids(&page.json);
        assert!(got.len() <= 2);
        seen.extend(got);
        let Some(cursor) = page.json["next_cursor"].as_str() else {
            break;
        };
        url = w.url(&format!("/api/runtimes?limit=2&cursor={cursor}"));
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, all, "pages cover every runtime once, in order");

    let exact = w.http.get(&w.url("/api/runtimes?limit=5"), &w.api).await;
    assert_eq!(ids(&exact.json), all);
    assert_eq!(
        exact.json.get("next_cursor"),
        None,
        "no empty page after a full one"
    );
}

#[tokio::test]
async fn a_bad_limit_or_cursor_is_400_and_needs_a_token_first() {
    let w = World::new().await;
    w.runtime().await;
    let limit_error = json!({"error": "limit must be a whole number from 1 to 1000"});
    for bad in [
        "0",
        "1001",
        "-1",
        "+5",
        "abc",
        "",
        "99999999999999999999999",
    ] {
        let answer = w
            .http
            .get(&w.url(&format!("/api/runtimes?limit={bad}")), &w.api)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "limit={bad}");
        assert_eq!(answer.json, limit_error, "limit={bad}");
    }
    let cursor_error = json!({"error": "cursor is malformed (pass next_cursor back as it is)"});
    // Not hex; odd length; hex of text without a dot; hex of "1.not-a-uuid"; empty.
    for bad in ["zz", "abc", "6162", "312e6e6f742d612d75756964", ""] {
        let answer = w
            .http
            .get(&w.url(&format!("/api/runtimes?cursor={bad}")), &w.api)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "cursor={bad}");
        assert_eq!(answer.json, cursor_error, "cursor={bad}");
    }
    let twice = w
        .http
        .get(&w.url("/api/runtimes?limit=5&limit=5"), &w.api)
        .await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert_eq!(twice.json, json!({"error": "limit given more than once"}));
    let unauthorized = w.http.get(&w.url("/api/runtimes?limit=0"), "nobody").await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn reports_that_find_the_request_not_running_are_409_but_an_exact_replay_is_200() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let pending = w.create_request(&rt).await.json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = json!({"status": "completed", "models": [sonnet()]});
    let early = w.report(&rt, &pending, &daemon, done.clone()).await;
    assert_eq!(early.status, StatusCode::CONFLICT);
    assert_eq!(
        early.json,
        json!({"error": "request is pending, not running"})
    );

    w.heartbeat(&rt, &daemon).await;
    assert_eq!(
        w.report(&rt, &pending, &daemon, done.clone()).await.status,
        StatusCode::OK
    );
    assert_eq!(
        w.report(&rt, &pending, &daemon, done).await.status,
        StatusCode::OK,
        "replay"
    );
    let changed = w
        .report(
            &rt,
            &pending,
            &daemon,
            json!({"status": "failed", "error": "x"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::CONFLICT);
    assert_eq!(
        changed.json,
        json!({"error": "request is completed, not running"})
    );
    let renew = w
        .report(&rt, &pending, &daemon, json!({"status": "running"}))
        .await;
    assert_eq!(renew.status, StatusCode::CONFLICT);
    let missing = w
        .report(
            &rt,
            "0123456789abcdef0123456789abcdef",
            &daemon,
            json!({"status": "running"}),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deadlines_end_requests_as_timeout_with_the_configured_seconds() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let unclaimed = w.create_request(&rt).await.json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    w.clock.advance(Duration::from_secs(30));
    let answer = w.poll(&rt, &unclaimed).await;
    assert_eq!(answer.json["status"], "timeout");
    assert_eq!(
        answer.json["error"],
        "daemon did not respond within 30 seconds"
    );
    assert_eq!(answer.json["updated_at"], "2026-05-01T09:19:51.000Z");

    w.heartbeat(&rt, &daemon).await;
    let id = w.claimed(&rt, &daemon).await;
    w.clock.advance(Duration::from_secs(59));
    let renewed = w
        .report(&rt, &id, &daemon, json!({"status": "running"}))
        .await;
    assert_eq!(renewed.status, StatusCode::OK);
    w.clock.advance(Duration::from_secs(59));
    assert_eq!(
        w.poll(&rt, &id).await.json["status"],
        "running",
        "the renewal holds"
    );
    w.clock.advance(Duration::from_secs(1));
    let ended = w.poll(&rt, &id).await;
    assert_eq!(ended.json["status"], "timeout");
    assert_eq!(
        ended.json["error"],
        "daemon did not finish within 60 seconds"
    );
    let late = w
        .report(
            &rt,
            &id,
            &daemon,
            json!({"status": "completed", "models": [sonnet()]}),
        )
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(
        late.json,
        json!({"error": "request is timeout, not running"})
    );
}

#[tokio::test]
async fn deleting_a_runtime_is_204_and_takes_its_requests() {
    let w = World::new().await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.claimed(&rt, &daemon).await;
    let path = w.url(&format!("/api/runtimes/{rt}"));
    let deleted = w.http.call(Method::DELETE, &path, Some(&w.api), None).await;
    assert_eq!(
        (deleted.status, deleted.json),
        (StatusCode::NO_CONTENT, Value::Null)
    );
    assert_eq!(w.poll(&rt, &id).await.status, StatusCode::NOT_FOUND);
    let again = w.http.call(Method::DELETE, &path, Some(&w.api), None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(
        w.heartbeat(&rt, &daemon).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let w = World::new().await;
    let nowhere = w
        .http
        .call(Method::GET, &w.url("/api/nowhere"), None, None)
        .await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    assert_eq!(nowhere.json, json!({"error": "route not found"}));
    let wrong = w
        .http
        .call(Method::PUT, &w.url("/api/runtimes"), None, None)
        .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.allow.as_deref(), Some("GET, HEAD, POST"));
    let health = w
        .http
        .call(Method::GET, &w.url("/healthz"), None, None)
        .await;
    assert_eq!(
        (health.status, health.json),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let ready = w
        .http
        .call(Method::GET, &w.url("/readyz"), None, None)
        .await;
    assert_eq!(ready.status, StatusCode::OK);
}

/// A store that is down: every call fails as a lost database connection would.
struct DownStore;

fn down<T>() -> StoreResult<T> {
    Err(StoreError::Corrupt("the database is down".into()))
}

impl Storer for DownStore {
    fn ping(&self) -> StoreResult<()> {
        down()
    }
    fn timeouts(&self) -> model_relay::kind::PerKind<Timeouts> {
        model_relay::kind::PerKind::defaults()
    }
    fn create_workspace(
        &self,
        _: WorkspaceId,
        _: &str,
        _: &TokenHash,
        _: Millis,
    ) -> StoreResult<()> {
        down()
    }
    fn workspace_by_api_token(&self, _: &TokenHash) -> StoreResult<Option<WorkspaceId>> {
        down()
    }
    fn list_workspaces(&self) -> StoreResult<Vec<Workspace>> {
        down()
    }
    fn create_api_token(&self, _: WorkspaceId, _: &TokenHash, _: Millis) -> StoreResult<bool> {
        down()
    }
    fn list_api_tokens(&self, _: WorkspaceId) -> StoreResult<Vec<ApiToken>> {
        down()
    }
    fn revoke_api_token(&self, _: WorkspaceId, _: &TokenId) -> StoreResult<bool> {
        down()
    }
    fn api_token_use(&self, _: &TokenHash) -> StoreResult<Option<ApiTokenUse>> {
        down()
    }
    fn touch_api_token(&self, _: &TokenHash, _: Millis) -> StoreResult<bool> {
        down()
    }
    fn rotate_daemon_token(
        &self,
        _: WorkspaceId,
        _: RuntimeId,
        _: &TokenHash,
    ) -> StoreResult<bool> {
        down()
    }
    fn insert_runtime(&self, _: &NewRuntime, _: Millis, _: u64) -> StoreResult<Option<Runtime>> {
        down()
    }
    fn list_runtimes(
        &self,
        _: WorkspaceId,
        _: Option<RuntimeCursor>,
        _: usize,
    ) -> StoreResult<Vec<Runtime>> {
        down()
    }
    fn find_runtime(&self, _: WorkspaceId, _: RuntimeId) -> StoreResult<Option<Runtime>> {
        down()
    }
    fn delete_runtime(&self, _: WorkspaceId, _: RuntimeId) -> StoreResult<bool> {
        down()
    }
    fn daemon_by_token(&self, _: &TokenHash) -> StoreResult<Option<Daemon>> {
        down()
    }
    fn find_request_by_token(
        &self,
        _: &TokenHash,
        _: RuntimeId,
        _: RequestId,
    ) -> StoreResult<Scoped<Option<StoredRequest>>> {
        down()
    }
    fn touch_runtime(&self, _: RuntimeId, _: Millis) -> StoreResult<bool> {
        down()
    }
    fn find_request(&self, _: RuntimeId, _: RequestId) -> StoreResult<Option<StoredRequest>> {
        down()
    }
    fn create_or_coalesce_within(
        &self,
        _: RuntimeId,
        _: &model_relay::store::NewRequest,
        _: Millis,
        _: u64,
    ) -> StoreResult<Added<Created>> {
        down()
    }
    fn stored_requests(&self, _: WorkspaceId) -> StoreResult<u64> {
        down()
    }
    fn claim_next_pending(&self, _: RuntimeId, _: Kind, _: Millis) -> StoreResult<Claim> {
        down()
    }
    fn apply_report(
        &self,
        _: RuntimeId,
        _: Kind,
        _: RequestId,
        _: &Report,
        _: Millis,
    ) -> StoreResult<bool> {
        down()
    }
    fn expire_request(&self, _: RequestId, _: Kind, _: Status, _: Millis) -> StoreResult<bool> {
        down()
    }
    fn expire_overdue(&self, _: Kind, _: Millis, _: u32) -> StoreResult<Expired> {
        down()
    }
    fn delete_ended_before(&self, _: Kind, _: Millis, _: u32) -> StoreResult<u64> {
        down()
    }
    fn count_requests(&self) -> StoreResult<RequestCounts> {
        down()
    }
    fn checkpoint(&self) -> StoreResult<()> {
        down()
    }
    fn hand_out_again(&self, _: RuntimeId, _: Kind, _: RequestId, _: Millis) -> StoreResult<bool> {
        down()
    }
    fn active_requests(&self) -> StoreResult<Vec<Active>> {
        down()
    }
    fn answer_from_catalog(
        &self,
        _: RuntimeId,
        _: &Ask,
        _: Option<RequestId>,
        _: i64,
        _: i64,
    ) -> StoreResult<Added<StoredRequest>> {
        down()
    }
    fn listens(&self) -> bool {
        true
    }
    fn listen(&self) -> StoreResult<Box<dyn Listener>> {
        down()
    }
}

#[tokio::test]
async fn a_store_failure_is_503_store_unavailable_never_404_or_200() {
    let instance = Instance::start(Arc::new(DownStore), clock(), settings()).await;
    let http = Http::default();
    let rt = "7d0c5a3e-1111-4222-8333-944455556666";
    let id = "0123456789abcdef0123456789abcdef";
    let calls = [
        (Method::GET, "/readyz".to_owned(), None),
        (Method::GET, "/api/runtimes".to_owned(), None),
        (
            Method::POST,
            "/api/runtimes".to_owned(),
            Some(json!({"name": "n", "provider": "p"})),
        ),
        (Method::DELETE, format!("/api/runtimes/{rt}"), None),
        (Method::POST, format!("/api/runtimes/{rt}/models"), None),
        (
            Method::POST,
            format!("/api/runtimes/{rt}/daemon-token"),
            None,
        ),
        (Method::GET, format!("/api/runtimes/{rt}/models/{id}"), None),
        (
            Method::POST,
            "/api/daemon/heartbeat".to_owned(),
            Some(json!({"runtime_id": rt})),
        ),
        (
            Method::POST,
            format!("/api/daemon/runtimes/{rt}/models/{id}/result"),
            Some(json!({"status": "running"})),
        ),
    ];
    for (method, path, body) in calls {
        let url = format!("{}{path}", instance.base);
        let body = body.map(|b| b.to_string().into_bytes());
        let answer = http.call(method.clone(), &url, Some("mra_any"), body).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}"
        );
        assert_eq!(
            answer.json,
            json!({"error": "store unavailable"}),
            "{method} {path}"
        );
    }
    let health = http
        .call(
            Method::GET,
            &format!("{}/healthz", instance.base),
            None,
            None,
        )
        .await;
    assert_eq!(health.status, StatusCode::OK, "the process is up");
    instance.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_run_returns() {
    let w = World::new().await;
    let base = w.instance.base.clone();
    let http = w.http.clone();
    assert_eq!(
        http.call(Method::GET, &format!("{base}/healthz"), None, None)
            .await
            .status,
        StatusCode::OK
    );
    w.instance.stop().await;
    let addr = base.trim_start_matches("http://");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

engine_tests!(
    async Timeouts::default();
    two_instances_answer_each_others_calls,
    creates_racing_on_two_instances_stop_at_the_limit,
    a_nul_in_a_report_is_200_and_reads_back_as_u_fffd_on_every_engine,
    revoked_and_rotated_tokens_are_refused_by_the_other_instance_at_once,
);

/// Issue 15: PostgreSQL answered 503 to a report whose error held a NUL, SQLite 200. Now
/// every engine answers 200 and reads back U+FFFD for the NUL (in model texts too), the
/// rest as sent; the daemon's retry of the same report is a replay.
async fn a_nul_in_a_report_is_200_and_reads_back_as_u_fffd_on_every_engine(engine: &dyn Engine) {
    let w = World::on_engine(engine).await;
    let (rt, daemon) = w.online_runtime().await;

    let id = w.claimed(&rt, &daemon).await;
    let failed = json!({"status": "failed", "error": "stderr: a\u{0}b\n\tc 𝄞🙂"});
    for attempt in ["first", "replay"] {
        let answer = w.report(&rt, &id, &daemon, failed.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{attempt}: {}", answer.json);
    }
    let read = w.poll(&rt, &id).await.json;
    assert_eq!(read["status"], "failed");
    assert_eq!(read["error"], "stderr: a\u{FFFD}b\n\tc 𝄞🙂");

    let id = w.claimed(&rt, &daemon).await;
    let model = |nul: &str| {
        json!({"id": "m", "label": format!("M{nul}1\t𝄞"), "thinking": {"supported_levels": [
            {"value": "low", "label": format!("Lo{nul}w"), "description": format!("a{nul}\nb")}
        ]}, "service_tiers": [{"id": "t", "name": format!("T{nul}"), "description": nul}]})
    };
    let completed = json!({"status": "completed", "models": [model("\u{0}")]});
    for attempt in ["first", "replay"] {
        let answer = w.report(&rt, &id, &daemon, completed.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{attempt}: {}", answer.json);
    }
    assert_eq!(
        w.poll(&rt, &id).await.json["models"],
        json!([model("\u{FFFD}")])
    );
}

/// Two instances, each with its own handle (its own pool) on one database: whatever one
/// instance creates, the other answers — the bug model-relay exists to fix.
async fn two_instances_answer_each_others_calls(engine: &dyn Engine) {
    // Outside the runtime: the PostgreSQL client blocks on a runtime of its own.
    let (a, b) = tokio::task::block_in_place(|| (engine.open(), engine.open()));
    let clock = clock();
    let (first, now) = (a.clone(), clock.now());
    let (_, api) = tokio::task::spawn_blocking(move || workspace(first.as_ref(), now))
        .await
        .unwrap();
    let one = Instance::start(a, clock.clone(), settings()).await;
    let two = Instance::start(b, clock.clone(), settings()).await;
    let http = Http::default();
    let bases = [one.base.clone(), two.base.clone()];
    let at = |i: usize, path: &str| format!("{}{path}", bases[i % 2]);

    let created = http
        .post(
            &at(0, "/api/runtimes"),
            &api,
            json!({"name": "n", "provider": "codex"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
    let beat = json!({"runtime_id": rt});
    for round in 0..4 {
        assert_eq!(
            http.post(
                &at(round + 1, "/api/daemon/heartbeat"),
                &daemon,
                beat.clone()
            )
            .await
            .status,
            StatusCode::OK
        );
        // Each round asks the daemon again, whatever the catalog holds.
        let request = http
            .post(
                &at(round, &format!("/api/runtimes/{rt}/models")),
                &api,
                json!({"refresh": true}),
            )
            .await;
        assert_eq!(request.status, StatusCode::OK, "{}", request.json);
        let id = request.json["id"].as_str().unwrap().to_owned();
        let poll = format!("/api/runtimes/{rt}/models/{id}");
        assert_eq!(
            http.get(&at(round + 1, &poll), &api).await.json["status"],
            "pending"
        );
        let ack = http
            .post(&at(round, "/api/daemon/heartbeat"), &daemon, beat.clone())
            .await;
        assert_eq!(ack.json["pending_model_list"]["id"], id.as_str());
        assert_eq!(
            http.get(&at(round + 1, &poll), &api).await.json["status"],
            "running"
        );
        let result = format!("/api/daemon/runtimes/{rt}/models/{id}/result");
        let report = json!({"status": "completed", "models": [sonnet()]});
        assert_eq!(
            http.post(&at(round + 1, &result), &daemon, report.clone())
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(
            http.post(&at(round, &result), &daemon, report).await.status,
            StatusCode::OK,
            "replay on the other"
        );
        for i in 0..2 {
            let done = http.get(&at(i, &poll), &api).await;
            assert_eq!(done.json["status"], "completed");
            assert_eq!(done.json["models"], json!([sonnet()]));
        }
    }
    one.stop().await;
    two.stop().await;
}

/// Two instances on one database, creates sent to both at once: exactly the limit is
/// answered 201, every other create 409, and the list (read a page at a time, pages from
/// either instance) holds exactly the runtimes answered 201.
async fn creates_racing_on_two_instances_stop_at_the_limit(engine: &dyn Engine) {
    const LIMIT: usize = 5;
    const CREATES: usize = 16;
    let (a, b) = tokio::task::block_in_place(|| (engine.open(), engine.open()));
    let clock = clock();
    let (first, now) = (a.clone(), clock.now());
    let (_, api) = tokio::task::spawn_blocking(move || workspace(first.as_ref(), now))
        .await
        .unwrap();
    let limited = Settings {
        max_runtimes_per_workspace: LIMIT as u64,
        ..settings()
    };
    let one = Instance::start(a, clock.clone(), limited).await;
    let two = Instance::start(b, clock.clone(), limited).await;
    let http = Http::default();
    let bases = [one.base.clone(), two.base.clone()];

    let creates: Vec<_> = (0..CREATES)
        .map(|i| {
            let (http, api) = (http.clone(), api.clone());
            let url = format!("{}/api/runtimes", bases[i % 2]);
            tokio::spawn(async move {
                let body = json!({"name": format!("rt {i}"), "provider": "codex"});
                http.post(&url, &api, body).await
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut refused = 0;
    for create in creates {
        let answer = create.await.unwrap();
        match answer.status {
            StatusCode::CREATED => created.push(answer.json["id"].as_str().unwrap().to_owned()),
            StatusCode::CONFLICT => refused += 1,
            other => panic!("{other}: {}", answer.json),
        }
    }
    assert_eq!((created.len(), refused), (LIMIT, CREATES - LIMIT));

    let mut listed = Vec::new();
    let mut query = "limit=2".to_owned();
    for page in 0.. {
        let url = format!("{}/api/runtimes?{query}", bases[page % 2]);
        let answer = http.get(&url, &api).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        let runtimes = answer.json["runtimes"].as_array().unwrap();
        listed.extend(
            runtimes
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned()),
        );
        let Some(cursor) = answer.json["next_cursor"].as_str() else {
            break;
        };
        query = format!("limit=2&cursor={cursor}");
    }
    listed.sort();
    created.sort();
    assert_eq!(
        listed, created,
        "the list holds the runtimes answered 201, once each"
    );
    one.stop().await;
    two.stop().await;
}

/// An API token revoked through one instance's store handle, and a daemon token rotated on
/// one instance, are refused by the other at their next call: nothing caches a token.
async fn revoked_and_rotated_tokens_are_refused_by_the_other_instance_at_once(engine: &dyn Engine) {
    let (a, b) = tokio::task::block_in_place(|| (engine.open(), engine.open()));
    let clock = clock();
    let (first, now) = (a.clone(), clock.now());
    let second = Token::new_api().unwrap();
    let (second_hash, second_id) = (second.hash(), second.hash().id());
    let (ws, api) = tokio::task::spawn_blocking(move || {
        let (ws, api) = workspace(first.as_ref(), now);
        assert!(first.create_api_token(ws, &second_hash, now).unwrap());
        (ws, api)
    })
    .await
    .unwrap();
    let second = second.expose().to_owned();
    let one = Instance::start(a.clone(), clock.clone(), settings()).await;
    let two = Instance::start(b, clock.clone(), settings()).await;
    let http = Http::default();
    let on = |instance: &Instance, path: &str| format!("{}{path}", instance.base);

    let created = http
        .post(
            &on(&one, "/api/runtimes"),
            &api,
            json!({"name": "n", "provider": "codex"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let old = created.json["daemon_token"].as_str().unwrap().to_owned();
    let beat = json!({"runtime_id": rt});
    let heartbeat = on(&two, "/api/daemon/heartbeat");
    assert_eq!(
        http.post(&heartbeat, &old, beat.clone()).await.status,
        StatusCode::OK
    );
    let runtimes = on(&two, "/api/runtimes");
    assert_eq!(http.get(&runtimes, &second).await.status, StatusCode::OK);

    let revoked = tokio::task::spawn_blocking(move || a.revoke_api_token(ws, &second_id))
        .await
        .unwrap()
        .unwrap();
    assert!(revoked);
    assert_eq!(
        http.get(&runtimes, &second).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(http.get(&runtimes, &api).await.status, StatusCode::OK);

    let rotated = http
        .post_empty(&on(&one, &format!("/api/runtimes/{rt}/daemon-token")), &api)
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    let new = rotated.json["daemon_token"].as_str().unwrap().to_owned();
    assert_eq!(
        http.post(&heartbeat, &old, beat.clone()).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.post(&heartbeat, &new, beat.clone()).await.status,
        StatusCode::OK
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn rotating_a_daemon_token_shows_the_new_one_once_and_refuses_the_old() {
    let w = World::new().await;
    let (rt, old) = w.online_runtime().await;
    let pending = w.create_request(&rt).await.json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/runtimes/{rt}/daemon-token");

    let rotated = w.http.post_empty(&w.url(&path), &w.api).await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_eq!(rotated.cache_control.as_deref(), Some("no-store"));
    let fields: Vec<&String> = rotated.json.as_object().unwrap().keys().collect();
    assert_eq!(fields, ["daemon_token"]);
    let new = rotated.json["daemon_token"].as_str().unwrap().to_owned();
    assert!(new.starts_with("mrd_") && new.len() == 68, "{new}");
    assert_ne!(new, old);

    assert_eq!(
        w.heartbeat(&rt, &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The same runtime, its pending request kept: the new token's heartbeat claims it.
    let ack = w.heartbeat(&rt, &new).await;
    assert_eq!(ack.status, StatusCode::OK);
    assert_eq!(ack.json["pending_model_list"]["id"], pending.as_str());
    let listed = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(listed.json["runtimes"][0]["id"], rt.as_str());
    assert_eq!(listed.json["runtimes"].as_array().unwrap().len(), 1);

    // Another workspace's token, or an id that is no runtime: the same 404.
    let (_, stranger) = workspace(w.store.as_ref(), T0);
    let foreign = w.http.post_empty(&w.url(&path), &stranger).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    let missing = format!(
        "/api/runtimes/{}/daemon-token",
        RuntimeId::random().unwrap()
    );
    let unknown = w.http.post_empty(&w.url(&missing), &w.api).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(foreign.json, unknown.json);
    // Neither changed the token.
    assert_eq!(w.heartbeat(&rt, &new).await.status, StatusCode::OK);

    let get = w
        .http
        .call(Method::GET, &w.url(&path), Some(&w.api), None)
        .await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.allow.as_deref(), Some("POST"));
}

#[tokio::test]
async fn a_revoked_api_token_is_401_at_once_and_the_others_still_work() {
    let w = World::new().await;
    let (rt, _) = w.online_runtime().await;
    let id = w.create_request(&rt).await.json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ws = w
        .store
        .workspace_by_api_token(&Token::from_header(&w.api).hash())
        .unwrap()
        .unwrap();
    let spare = Token::new_api().unwrap();
    assert!(w.store.create_api_token(ws, &spare.hash(), T0).unwrap());

    let revoked = Token::from_header(&w.api).hash().id();
    assert!(w.store.revoke_api_token(ws, &revoked).unwrap());
    for (method, path) in [
        (Method::GET, "/api/runtimes".to_owned()),
        (Method::POST, format!("/api/runtimes/{rt}/models")),
        (Method::GET, format!("/api/runtimes/{rt}/models/{id}")),
        (Method::POST, format!("/api/runtimes/{rt}/daemon-token")),
        (Method::DELETE, format!("/api/runtimes/{rt}")),
    ] {
        let answer = w
            .http
            .call(method.clone(), &w.url(&path), Some(&w.api), None)
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    let poll = w
        .http
        .get(
            &w.url(&format!("/api/runtimes/{rt}/models/{id}")),
            spare.expose(),
        )
        .await;
    assert_eq!(poll.status, StatusCode::OK, "the workspace's other token");
}

#[tokio::test]
async fn a_ui_call_records_its_token_use_at_most_once_a_minute() {
    let w = World::new().await;
    let hash = Token::from_header(&w.api).hash();
    let ws = w.store.workspace_by_api_token(&hash).unwrap().unwrap();
    let last_used = || w.store.list_api_tokens(ws).unwrap()[0].last_used_at;
    assert_eq!(last_used(), None);

    w.runtime().await;
    assert_eq!(last_used(), Some(T0), "creating the runtime used the token");
    w.clock.advance(Duration::from_secs(59));
    // An authenticated call (no such runtime: 404, after the token was read).
    let path = w.url(&format!("/api/runtimes/{}", RuntimeId::random().unwrap()));
    let wrong = w.http.call(Method::DELETE, &path, Some(&w.api), None).await;
    assert_eq!(wrong.status, StatusCode::NOT_FOUND);
    assert_eq!(last_used(), Some(T0), "within the minute: no write");
    w.clock.advance(Duration::from_secs(1));
    let list = w.http.get(&w.url("/api/runtimes"), &w.api).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(last_used(), Some(T0 + 60_000));
}

#[tokio::test]
async fn every_api_answer_says_no_store_success_or_error() {
    let w = World::new().await;
    let created = w
        .create_runtime(json!({"name": "laptop", "provider": "claude"}))
        .await;
    // The one answer that carries a daemon token above all.
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.cache_control.as_deref(), Some("no-store"));
    let rt = created.json["id"].as_str().unwrap();
    for (method, path, token) in [
        (
            Method::GET,
            "/api/runtimes".to_owned(),
            Some(w.api.as_str()),
        ),
        (Method::GET, "/api/runtimes".to_owned(), None),
        (
            Method::POST,
            format!("/api/runtimes/{rt}/models"),
            Some(w.api.as_str()),
        ),
        (Method::GET, "/api/nothing".to_owned(), Some(w.api.as_str())),
    ] {
        let answer = w
            .http
            .call(method.clone(), &w.url(&path), token, None)
            .await;
        assert_eq!(
            answer.cache_control.as_deref(),
            Some("no-store"),
            "{method} {path}: {}",
            answer.status
        );
    }
}

#[tokio::test]
async fn head_is_answered_wherever_get_is_with_no_body() {
    let w = World::new().await;
    for (path, token) in [
        ("/healthz", None),
        ("/", None),
        ("/api/runtimes", Some(w.api.as_str())),
    ] {
        let get = w
            .http
            .try_raw(Method::GET, &w.url(path), token, None)
            .await
            .unwrap();
        let head = w
            .http
            .try_raw(Method::HEAD, &w.url(path), token, None)
            .await
            .unwrap();
        assert_eq!(
            (head.status, &head.content_type),
            (get.status, &get.content_type),
            "{path}"
        );
        assert_eq!(get.status, StatusCode::OK, "{path}");
        assert!(head.body.is_empty(), "{path}: HEAD has no body");
    }
    // Where GET is not served, neither is HEAD.
    let head = w
        .http
        .try_raw(Method::HEAD, &w.url("/api/daemon/heartbeat"), None, None)
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(head.allow.as_deref(), Some("POST"));
}

/// A caller without a valid token cannot make the server wait for its body: every route
/// that takes a body checks the token first, and answers 401 with the body still unsent.
#[tokio::test]
async fn a_body_is_never_awaited_for_a_caller_without_a_valid_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new().await;
    let (rt, _) = w.online_runtime().await;
    let addr = w.instance.base.trim_start_matches("http://").to_owned();
    let paths = [
        "/api/runtimes".to_owned(),
        format!("/api/runtimes/{rt}/models"),
        "/api/daemon/heartbeat".to_owned(),
        format!("/api/daemon/runtimes/{rt}/models/0123456789abcdef0123456789abcdef/result"),
    ];
    for path in &paths {
        for auth in ["", "Authorization: Bearer mrd_not_a_token\r\n"] {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            // A megabyte announced, not a byte sent.
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = vec![0; 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("{path} ({auth:?}): waited for the body"))
                .unwrap();
            let answer = String::from_utf8_lossy(&answer[..read]);
            assert!(
                answer.starts_with("HTTP/1.1 401"),
                "{path} ({auth:?}): {answer}"
            );
        }
    }
}

/// CORS, for the UI routes only and only for listed origins (`--cors-origin`).
mod cors {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::{HeaderMap, Method, Request, StatusCode};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use model_relay::App;
    use model_relay::model::Timeouts;
    use model_relay::store::Storer;
    use model_relay::store::memory::MemoryStore;
    use serde_json::json;

    use super::support::server::{Instance, T0, clock, settings, workspace};

    const LISTED: &str = "https://ui.example.com";
    const OTHER: &str = "https://evil.example.com";

    /// One call with the headers given; the answer's status and headers.
    async fn call(
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> (StatusCode, HeaderMap) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut request = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let _ = response.into_body().collect().await;
        (status, headers)
    }

    #[tokio::test]
    async fn listed_origins_get_preflight_and_their_origin_echoed_on_ui_routes_only() {
        let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
        let (_, api) = workspace(store.as_ref(), T0);
        let app = App::new(store, clock(), settings()).with_cors_origins(vec![LISTED.into()]);
        let instance = Instance::start_app(app).await;
        let url = |path: &str| format!("{}{path}", instance.base);
        let bearer = format!("Bearer {api}");

        // Preflight from the listed origin: answered, with what its page may send.
        let (status, headers) = call(
            Method::OPTIONS,
            &url("/api/runtimes"),
            &[
                ("origin", LISTED),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(headers["access-control-allow-origin"], LISTED);
        assert_eq!(headers["access-control-allow-methods"], "GET, HEAD, POST");
        let allowed = headers["access-control-allow-headers"].to_str().unwrap();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"));

        // The call itself: its origin echoed; another origin gets none.
        let created = call(
            Method::POST,
            &url("/api/runtimes"),
            &[("origin", LISTED), ("authorization", &bearer)],
            Some(json!({"name": "laptop", "provider": "claude"}).to_string()),
        )
        .await;
        assert_eq!(created.0, StatusCode::CREATED);
        assert_eq!(created.1["access-control-allow-origin"], LISTED);
        assert_eq!(created.1["vary"], "Origin");
        let foreign = call(
            Method::GET,
            &url("/api/runtimes"),
            &[("origin", OTHER), ("authorization", &bearer)],
            None,
        )
        .await;
        assert_eq!(foreign.0, StatusCode::OK);
        assert!(!foreign.1.contains_key("access-control-allow-origin"));

        // A preflight from another origin is no preflight: OPTIONS is not served.
        let (status, headers) = call(
            Method::OPTIONS,
            &url("/api/runtimes"),
            &[("origin", OTHER), ("access-control-request-method", "GET")],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!headers.contains_key("access-control-allow-origin"));

        // The daemon's routes never answer CORS, whatever the origin.
        let (status, headers) = call(
            Method::OPTIONS,
            &url("/api/daemon/heartbeat"),
            &[
                ("origin", LISTED),
                ("access-control-request-method", "POST"),
            ],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!headers.contains_key("access-control-allow-origin"));
        let (_, headers) = call(
            Method::POST,
            &url("/api/daemon/heartbeat"),
            &[("origin", LISTED)],
            Some("{}".into()),
        )
        .await;
        assert!(!headers.contains_key("access-control-allow-origin"));
        instance.stop().await;
    }
}
