//! Every kind of request over the wire (DESIGN.md, "Request kinds"): the routes, records,
//! hand-outs, reports and bounds of local-skill lists, skill imports and updates, on real
//! servers with a fake clock. The state machine they share is the conformance suite's.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use model_relay::clock::FakeClock;
use model_relay::config::Settings;
use model_relay::kind::{Kind, PerKind};
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use serde_json::{Value, json};
use support::server::{Answer, Http, Instance, T0, clock, settings, workspace};

/// One instance on a memory store with every kind's default deadlines, a workspace, and one
/// runtime whose daemon has heartbeated.
struct World {
    http: Http,
    clock: Arc<FakeClock>,
    instance: Instance,
    api: String,
    rt: String,
    daemon: String,
}

impl World {
    async fn new() -> Self {
        Self::with(settings()).await
    }

    async fn with(settings: Settings) -> Self {
        let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(PerKind::defaults()));
        let clock = clock();
        let (_, api) = workspace(store.as_ref(), T0);
        let instance = Instance::start(store, clock.clone(), settings).await;
        let http = Http::default();
        let created = http
            .post(
                &format!("{}/api/runtimes", instance.base),
                &api,
                json!({"name": "laptop", "provider": "claude"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.json);
        let rt = created.json["id"].as_str().unwrap().to_owned();
        let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
        let w = World {
            http,
            clock,
            instance,
            api,
            rt,
            daemon,
        };
        assert_eq!(w.beat(json!({})).await.status, StatusCode::OK);
        w
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.instance.base)
    }

    /// `POST /api/runtimes/{rt}/<path>` with `body` (`Null`: none).
    async fn create(&self, path: &str, body: Value) -> Answer {
        let url = self.url(&format!("/api/runtimes/{}/{path}", self.rt));
        match body {
            Value::Null => self.http.post_empty(&url, &self.api).await,
            body => self.http.post(&url, &self.api, body).await,
        }
    }

    /// The id of a new request, checked to be 200.
    async fn created(&self, path: &str, body: Value) -> String {
        let answer = self.create(path, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.json);
        answer.json["id"].as_str().unwrap().to_owned()
    }

    async fn read(&self, path: &str, id: &str) -> Answer {
        let url = self.url(&format!("/api/runtimes/{}/{path}/{id}", self.rt));
        self.http.get(&url, &self.api).await
    }

    /// A heartbeat with `extra` fields besides `runtime_id`.
    async fn beat(&self, extra: Value) -> Answer {
        let mut body = json!({"runtime_id": self.rt});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        let url = self.url("/api/daemon/heartbeat");
        self.http.post(&url, &self.daemon, body).await
    }

    async fn report(&self, path: &str, id: &str, body: Value) -> Answer {
        let url = self.url(&format!(
            "/api/daemon/runtimes/{}/{path}/{id}/result",
            self.rt
        ));
        self.http.post(&url, &self.daemon, body).await
    }

    async fn report_bytes(&self, path: &str, id: &str, body: Vec<u8>) -> Answer {
        let url = self.url(&format!(
            "/api/daemon/runtimes/{}/{path}/{id}/result",
            self.rt
        ));
        self.http
            .call(hyper::Method::POST, &url, Some(&self.daemon), Some(body))
            .await
    }
}

/// A record without its timestamps, which the tests check apart.
fn untimed(mut record: Value) -> Value {
    if let Some(fields) = record.as_object_mut() {
        assert!(fields.remove("created_at").is_some(), "created_at");
        assert!(fields.remove("updated_at").is_some(), "updated_at");
    }
    record
}

fn skill(key: &str) -> Value {
    json!({"key": key, "name": "Review", "description": "Reviews a change",
           "source_path": "/home/u/.claude/skills/review", "provider": "claude", "file_count": 2})
}

#[tokio::test]
async fn a_skill_list_goes_from_create_to_its_skills() {
    let w = World::new().await;
    let id = w.created("local-skills", Value::Null).await;
    assert_eq!(
        untimed(w.read("local-skills", &id).await.json),
        json!({"id": id, "runtime_id": w.rt, "kind": "local_skills", "status": "pending"})
    );
    let ack = w.beat(json!({})).await.json;
    assert_eq!(
        ack,
        json!({"status": "ok", "pending_local_skills": {"id": id}})
    );
    let list = json!({"status": "completed", "skills": [skill("claude:review")],
                      "mcp_servers": [{"name": "github", "anything": [1]}], "mcp_supported": true,
                      "unknown": "dropped"});
    let answer = w.report("local-skills", &id, list.clone()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(
        untimed(w.read("local-skills", &id).await.json),
        json!({"id": id, "runtime_id": w.rt, "kind": "local_skills", "status": "completed",
               "skills": [skill("claude:review")], "supported": true,
               "mcp_servers": [{"name": "github", "anything": [1]}], "mcp_supported": true})
    );
    // The same report again is a replay; another is a conflict.
    assert_eq!(
        w.report("local-skills", &id, list).await.status,
        StatusCode::OK
    );
    let other = json!({"status": "completed", "skills": []});
    assert_eq!(
        w.report("local-skills", &id, other).await.status,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn a_skill_import_hands_out_its_key_and_keeps_the_files() {
    let w = World::new().await;
    let input = json!({"skill_key": "claude:review", "name": "Review"});
    let id = w.created("local-skills/import", input).await;
    assert_eq!(
        untimed(w.read("local-skills/import", &id).await.json),
        json!({"id": id, "runtime_id": w.rt, "kind": "local_skill_import", "status": "pending",
               "skill_key": "claude:review", "name": "Review"})
    );
    assert_eq!(
        w.beat(json!({})).await.json,
        json!({"status": "ok",
               "pending_local_skill_import": {"id": id, "skill_key": "claude:review"}})
    );
    let imported = json!({"key": "claude:review", "name": "Review", "content": "# Review\n",
                          "source_path": "/home/u/.claude/skills/review", "provider": "claude",
                          "files": [{"path": "checklist.md", "content": "- tests\n"}]});
    let report = json!({"status": "completed", "skill": imported});
    assert_eq!(
        w.report("local-skills/import", &id, report).await.status,
        StatusCode::OK
    );
    let done = w.read("local-skills/import", &id).await.json;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["skill"], imported);
    assert_eq!(done["skill_key"], "claude:review", "the input stays");
}

#[tokio::test]
async fn an_update_reports_progress_that_renews_its_lease_then_its_outcome() {
    let w = World::new().await;
    let id = w
        .created("update", json!({"target_version": "2.1.0"}))
        .await;
    assert_eq!(
        w.beat(json!({})).await.json,
        json!({"status": "ok", "pending_update": {"id": id, "target_version": "2.1.0"}})
    );
    // 150 s to finish: progress at 100 s renews the lease past the first 150.
    w.clock.advance(Duration::from_secs(100));
    let progress = json!({"status": "running", "output": "downloading\n"});
    assert_eq!(
        w.report("update", &id, progress).await.status,
        StatusCode::OK
    );
    w.clock.advance(Duration::from_secs(100));
    let running = w.read("update", &id).await.json;
    assert_eq!(
        (&running["status"], &running["output"]),
        (&json!("running"), &json!("downloading\n"))
    );
    let done = json!({"status": "completed", "output": "downloading\ninstalled 2.1.0\n"});
    assert_eq!(w.report("update", &id, done).await.status, StatusCode::OK);
    assert_eq!(
        untimed(w.read("update", &id).await.json),
        json!({"id": id, "runtime_id": w.rt, "kind": "update", "status": "completed",
               "target_version": "2.1.0", "output": "downloading\ninstalled 2.1.0\n"})
    );
}

#[tokio::test]
async fn a_second_update_while_one_is_active_is_refused_with_409() {
    let w = World::new().await;
    let first = w
        .created("update", json!({"target_version": "2.1.0"}))
        .await;
    let second = w.create("update", json!({"target_version": "2.2.0"})).await;
    assert_eq!(
        (second.status, second.json),
        (
            StatusCode::CONFLICT,
            json!({"error": "an update is already in progress for this runtime"})
        )
    );
    // Still refused while it runs; a new one once it has ended.
    w.beat(json!({})).await;
    let running = w.create("update", json!({"target_version": "2.2.0"})).await;
    assert_eq!(running.status, StatusCode::CONFLICT);
    let failed = json!({"status": "failed", "error": "no network", "output": "curl: (6)\n"});
    assert_eq!(
        w.report("update", &first, failed).await.status,
        StatusCode::OK
    );
    let ended = w.read("update", &first).await.json;
    assert_eq!(
        (&ended["status"], &ended["error"], &ended["output"]),
        (
            &json!("failed"),
            &json!("no network"),
            &json!("curl: (6)\n")
        )
    );
    let next = w
        .created("update", json!({"target_version": "2.2.0"}))
        .await;
    assert_ne!(next, first);
}

#[tokio::test]
async fn imports_coalesce_per_skill_key_and_lists_per_runtime() {
    let w = World::new().await;
    let a = w
        .created("local-skills/import", json!({"skill_key": "claude:a"}))
        .await;
    let again = w
        .created("local-skills/import", json!({"skill_key": "claude:a"}))
        .await;
    let b = w
        .created("local-skills/import", json!({"skill_key": "claude:b"}))
        .await;
    assert_eq!(again, a, "the same key joins the active import");
    assert_ne!(b, a, "another key is another import");
    let list = w.created("local-skills", Value::Null).await;
    assert_eq!(w.created("local-skills", json!({})).await, list);
}

#[tokio::test]
async fn one_heartbeat_hands_out_one_request_of_each_kind_or_a_batch_of_imports() {
    let w = World::new().await;
    let models = w.created("models", Value::Null).await;
    let list = w.created("local-skills", Value::Null).await;
    let update = w.created("update", json!({"target_version": "3"})).await;
    let mut imports = Vec::new();
    for key in ["k:1", "k:2", "k:3"] {
        w.clock.advance(Duration::from_millis(1));
        imports.push(
            w.created("local-skills/import", json!({"skill_key": key}))
                .await,
        );
    }
    assert_eq!(
        w.beat(json!({})).await.json,
        json!({"status": "ok",
               "pending_model_list": {"id": models},
               "pending_local_skills": {"id": list},
               "pending_local_skill_import": {"id": imports[0], "skill_key": "k:1"},
               "pending_update": {"id": update, "target_version": "3"}})
    );
    // A daemon that takes batches gets the other imports at once, oldest first.
    assert_eq!(
        w.beat(json!({"supports_batch_import": true})).await.json,
        json!({"status": "ok", "pending_local_skill_imports": [
            {"id": imports[1], "skill_key": "k:2"},
            {"id": imports[2], "skill_key": "k:3"}]})
    );
    assert_eq!(w.beat(json!({})).await.json, json!({"status": "ok"}));
    // Lost hand-outs of every kind come back when `working_on` omits them.
    let again = w
        .beat(json!({"working_on": [models, imports[1]]}))
        .await
        .json;
    assert_eq!(again["pending_local_skills"]["id"], json!(list));
    assert_eq!(again["pending_update"]["id"], json!(update));
    let lost = [json!(imports[0]), json!(imports[2])];
    assert!(
        lost.contains(&again["pending_local_skill_import"]["id"]),
        "one of the imports it does not hold, one per heartbeat without batches: {again}"
    );
    assert!(again.get("pending_model_list").is_none(), "{again}");
    // Each claim counted under its kind (a hand-out again is no claim).
    let text = w.http.get_text(&w.url("/metrics")).await.text();
    let scrape = support::prom::Scrape::parse(&text);
    let claims = |kind| scrape.value("model_relay_claims_total", &[("kind", kind)]);
    assert_eq!(
        Kind::ALL.map(|k| claims(k.name())),
        [1.0, 1.0, 3.0, 1.0],
        "models, local_skills, local_skill_import, update"
    );
}

#[tokio::test]
async fn an_id_is_found_only_on_its_own_kinds_routes() {
    let w = World::new().await;
    let models = w.created("models", Value::Null).await;
    let list = w.created("local-skills", Value::Null).await;
    assert_eq!(
        w.read("local-skills", &models).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(w.read("models", &list).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        w.read("local-skills/import", &list).await.status,
        StatusCode::NOT_FOUND
    );
    w.beat(json!({})).await;
    let report = json!({"status": "completed", "output": "x"});
    assert_eq!(
        w.report("update", &list, report).await.status,
        StatusCode::NOT_FOUND
    );
    // Still running, untouched by the report on the wrong route.
    assert_eq!(
        w.read("local-skills", &list).await.json["status"],
        "running"
    );
}

#[tokio::test]
async fn each_kind_times_out_with_its_own_words_and_numbers() {
    let w = World::new().await;
    let list = w.created("local-skills", Value::Null).await;
    let update = w.created("update", json!({"target_version": "3"})).await;
    w.clock.advance(Duration::from_secs(180));
    let ended = w.read("local-skills", &list).await.json;
    assert_eq!(
        (&ended["status"], &ended["error"]),
        (
            &json!("timeout"),
            &json!("daemon did not respond within 3 minutes")
        )
    );
    assert_eq!(
        w.read("update", &update).await.json["error"],
        "daemon did not respond within 120 seconds"
    );
    w.beat(json!({})).await;
    let update = w.created("update", json!({"target_version": "4"})).await;
    w.beat(json!({})).await;
    w.clock.advance(Duration::from_secs(150));
    assert_eq!(
        w.read("update", &update).await.json["error"],
        "update did not complete within 150 seconds"
    );
}

#[tokio::test]
async fn bad_input_of_every_kind_is_a_400_that_names_the_field() {
    let w = World::new().await;
    for (path, body, error) in [
        (
            "local-skills/import",
            json!({"skill_key": " "}),
            "skill_key must not be empty",
        ),
        (
            "local-skills/import",
            json!({"skill_key": "a\u{1b}b"}),
            "skill_key must not contain control characters",
        ),
        (
            "update",
            json!({"target_version": "x".repeat(1001)}),
            "target_version must be at most 1000 characters",
        ),
    ] {
        let answer = w.create(path, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(answer.json["error"], error, "{path}");
    }
    let missing = w.create("update", json!({})).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(
        missing.json["error"]
            .as_str()
            .unwrap()
            .contains("target_version"),
        "{}",
        missing.json
    );

    let list = w.created("local-skills", Value::Null).await;
    let import = w
        .created("local-skills/import", json!({"skill_key": "k"}))
        .await;
    w.beat(json!({})).await;
    let too_many: Vec<Value> = (0..1001).map(|i| skill(&format!("k{i}"))).collect();
    for (path, id, body, error) in [
        (
            "local-skills",
            &list,
            json!({"status": "completed", "skills": too_many}),
            "skills lists 1001 entries; a list may carry at most 1000",
        ),
        (
            "local-skills",
            &list,
            json!({"status": "completed", "skills": [skill("a\nb")]}),
            "skills[0].key must not contain control characters",
        ),
        (
            "local-skills/import",
            &import,
            json!({"status": "completed", "skill": {"key": "k", "name": "n", "content": "c",
                   "source_path": "/s", "provider": "claude",
                   "files": [{"path": "../../etc/passwd", "content": ""}]}}),
            "skill.files[0].path must be a path inside the skill's directory",
        ),
        (
            "local-skills/import",
            &import,
            json!({"status": "done"}),
            "status must be \"completed\", \"failed\" or \"running\"",
        ),
    ] {
        let answer = w.report(path, id, body).await;
        assert_eq!(
            (answer.status, &answer.json["error"]),
            (StatusCode::BAD_REQUEST, &json!(error)),
            "{path}"
        );
    }
    // Nothing was recorded: both still run.
    assert_eq!(
        w.read("local-skills", &list).await.json["status"],
        "running"
    );
    assert_eq!(
        w.read("local-skills/import", &import).await.json["status"],
        "running"
    );
}

#[tokio::test]
async fn only_an_import_report_may_pass_the_body_limit_up_to_max_import_bytes() {
    let w = World::with(Settings {
        max_import_bytes: 3 * 1024 * 1024,
        ..settings()
    })
    .await;
    let import = w
        .created("local-skills/import", json!({"skill_key": "k"}))
        .await;
    let update = w.created("update", json!({"target_version": "3"})).await;
    w.beat(json!({})).await;
    let files = |bytes: usize| {
        json!({"status": "completed", "skill": {"key": "k", "name": "n", "content": "c",
               "source_path": "/s", "provider": "claude",
               "files": [{"path": "big.txt", "content": "x".repeat(bytes)}]}})
        .to_string()
        .into_bytes()
    };
    let two_mib = 2 * 1024 * 1024;
    let big = json!({"status": "completed", "output": "x".repeat(two_mib)});
    let refused = w
        .report_bytes("update", &update, big.to_string().into_bytes())
        .await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    let too_big = w
        .report_bytes("local-skills/import", &import, files(4 * 1024 * 1024))
        .await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    let answer = w
        .report_bytes("local-skills/import", &import, files(two_mib))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let done = w.read("local-skills/import", &import).await.json;
    assert_eq!(
        done["skill"]["files"][0]["content"].as_str().map(str::len),
        Some(two_mib)
    );
}

#[tokio::test]
async fn an_offline_runtime_gets_503_for_every_kind() {
    let w = World::new().await;
    w.clock.advance(Duration::from_secs(45));
    for (path, body) in [
        ("local-skills", Value::Null),
        ("local-skills/import", json!({"skill_key": "k"})),
        ("update", json!({"target_version": "3"})),
    ] {
        let answer = w.create(path, body).await;
        assert_eq!(
            (answer.status, answer.json),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "runtime is offline"})
            ),
            "{path}"
        );
    }
}
