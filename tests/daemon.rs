//! The reference daemon against a real server on `127.0.0.1:0`: discovery from a file and a
//! command, failure reports, lease renewal while discovery runs, retries, and stopping. Held
//! heartbeats are tested against a scripted fake server, in `daemon/held.rs`.
//!
//! Nothing here sleeps and hopes: each wait is for a condition the server can show (a
//! status, a counter in the store), with a generous deadline that only a broken daemon hits.

#[path = "daemon/fake.rs"]
mod fake;
#[path = "daemon/held.rs"]
mod held;
mod support;
#[path = "daemon/watched.rs"]
mod watched;
#[path = "daemon/world.rs"]
mod world;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use model_relay::daemon::{self, Discovery, Source};
use model_relay::model::Timeouts;
use serde_json::json;
use support::engines::{Engine, engine_tests};
use world::{Gate, Relay, eventually, is_gone};

/// A skills directory as Claude Code keeps one: `review` (front matter, a file beside it)
/// and `deploy`.
fn skills_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let review = dir.path().join("review");
    std::fs::create_dir_all(review.join("refs")).unwrap();
    std::fs::write(
        review.join("SKILL.md"),
        "---\nname: Review\ndescription: Reviews a change\n---\nRead the diff.\n",
    )
    .unwrap();
    std::fs::write(review.join("refs/checklist.md"), "- tests\n").unwrap();
    let deploy = dir.path().join("deploy");
    std::fs::create_dir_all(&deploy).unwrap();
    std::fs::write(deploy.join("SKILL.md"), "# Deploy\n").unwrap();
    dir
}

#[tokio::test]
async fn a_daemon_lists_and_imports_the_skills_of_its_skills_dirs() {
    let relay = Relay::start().await;
    let skills = skills_dir();
    let (rt, token) = relay.runtime("skills").await;
    let mut config = relay.config(&rt, &token, Source::Fixed(fixed()));
    config.skills_dirs =
        vec![daemon::SkillsDir::parse(&skills.path().display().to_string()).unwrap()];
    let daemon = relay.run(config, &rt).await;

    let list = relay.asked(&rt, "local-skills", json!({})).await;
    assert_eq!(list["status"], "completed", "{list}");
    assert_eq!(list["supported"], true);
    let at = |name: &str| skills.path().join(name).display().to_string();
    assert_eq!(
        list["skills"],
        json!([
            {"key": "claude:deploy", "name": "deploy", "source_path": at("deploy"),
             "provider": "claude", "file_count": 1},
            {"key": "claude:review", "name": "Review", "description": "Reviews a change",
             "source_path": at("review"), "provider": "claude", "file_count": 2},
        ])
    );

    let import = json!({"skill_key": "claude:review"});
    let imported = relay.asked(&rt, "local-skills/import", import).await;
    assert_eq!(imported["status"], "completed", "{imported}");
    assert_eq!(
        imported["skill"],
        json!({"key": "claude:review", "name": "Review", "description": "Reviews a change",
               "content": "---\nname: Review\ndescription: Reviews a change\n---\nRead the diff.\n",
               "source_path": at("review"), "provider": "claude",
               "files": [{"path": "refs/checklist.md", "content": "- tests\n"}]})
    );
    let missing = relay
        .asked(
            &rt,
            "local-skills/import",
            json!({"skill_key": "claude:gone"}),
        )
        .await;
    assert_eq!(
        (&missing["status"], &missing["error"]),
        (
            &json!("failed"),
            &json!("no skill \"claude:gone\" on this machine")
        )
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_daemon_without_skills_dirs_or_update_cmd_says_so() {
    let relay = Relay::start().await;
    let (rt, daemon) = relay.daemon("bare", Source::Fixed(fixed())).await;
    let list = relay.asked(&rt, "local-skills", json!({})).await;
    assert_eq!(
        (&list["status"], &list["supported"], &list["skills"]),
        (&json!("completed"), &json!(false), &json!([]))
    );
    let update = relay
        .asked(&rt, "update", json!({"target_version": "2.1.0"}))
        .await;
    assert_eq!(
        (&update["status"], &update["error"]),
        (&json!("failed"), &json!("this daemon cannot update itself"))
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn an_update_runs_its_command_reports_progress_and_then_its_outcome() {
    let relay = Relay::start().await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let (rt, token) = relay.runtime("updating").await;
    let mut config = relay.config(&rt, &token, Source::Fixed(fixed()));
    config.update_cmd = Some(format!(
        "echo \"updating to $MODEL_RELAY_TARGET_VERSION\"; \
         while [ ! -e {} ]; do sleep 0.02; done; echo installed >&2",
        open.display()
    ));
    let daemon = relay.run(config, &rt).await;
    let id = relay
        .ask(&rt, "update", json!({"target_version": "2.1.0"}))
        .await;
    // The command waits for the gate: meanwhile its output so far comes as progress.
    eventually("the update's progress is shown", || async {
        let record = relay.read(&rt, "update", &id).await;
        record["status"] == "running" && record["output"] == "updating to 2.1.0\n"
    })
    .await;
    std::fs::write(&open, "").unwrap();
    let done = loop {
        let record = relay.read(&rt, "update", &id).await;
        if record["status"] != "running" {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["output"], "updating to 2.1.0\ninstalled\n");

    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_update_command_fails_the_update_with_its_output() {
    let relay = Relay::start().await;
    let (rt, token) = relay.runtime("broken").await;
    let mut config = relay.config(&rt, &token, Source::Fixed(fixed()));
    config.update_cmd = Some("echo 'no network' >&2; exit 7".into());
    let daemon = relay.run(config, &rt).await;
    let failed = relay
        .asked(&rt, "update", json!({"target_version": "2.1.0"}))
        .await;
    assert_eq!(
        (&failed["status"], &failed["error"], &failed["output"]),
        (
            &json!("failed"),
            &json!("update command failed (exit status 7)"),
            &json!("no network\n")
        )
    );
    daemon.stop().await.unwrap();
}

/// A fixed model list, for daemons whose tests are about the other kinds.
fn fixed() -> Discovery {
    Discovery::Found {
        models: Vec::new(),
        supported: false,
        fallback: false,
    }
}

#[tokio::test]
async fn models_file_is_read_afresh_for_every_request() {
    let relay = Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models.json");
    std::fs::write(&file, r#"[{"id":"a","label":"A","default":true}]"#).unwrap();
    let (rt, daemon) = relay.daemon("file", Source::ModelsFile(file.clone())).await;

    let first = relay.discover(&rt).await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(
        first["models"],
        json!([{"id": "a", "label": "A", "default": true}])
    );

    std::fs::write(
        &file,
        r#"{"models":[{"id":"b","label":"B"}],"supported":true}"#,
    )
    .unwrap();
    let second = relay.discover(&rt).await;
    assert_eq!(second["models"], json!([{"id": "b", "label": "B"}]));

    std::fs::remove_file(&file).unwrap();
    let gone = relay.discover(&rt).await;
    assert_eq!(gone["status"], "failed");
    assert!(
        gone["error"]
            .as_str()
            .unwrap()
            .contains("cannot read models file"),
        "{gone}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn discover_cmd_stdout_is_the_models_document() {
    let relay = Relay::start().await;
    let cmd = r#"echo '{"models":[],"supported":false}'"#;
    let (rt, daemon) = relay.daemon("cmd", Source::Command(cmd.into())).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["supported"], false);
    assert!(ended.get("models").is_none(), "{ended}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_stand_in_list_from_discover_cmd_is_reported_as_fallback_and_never_cached() {
    let relay = Relay::start().await;
    let cmd = r#"echo '{"models":[{"id":"m","label":"M","thinking":{"supported_levels":[{"value":"low","label":"Low"}]}}],"fallback":true}'"#;
    let (rt, daemon) = relay.daemon("cmd", Source::Command(cmd.into())).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["fallback"], true);
    assert_eq!(
        ended["models"][0]["thinking"]["supported_levels"][0]["value"],
        "low"
    );
    let url = format!("{}/api/runtimes/{rt}/models", relay.base());
    let next = relay.http.post_empty(&url, &relay.api).await;
    assert_eq!(next.json["status"], "pending", "{}", next.json);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_discover_cmd_is_reported_with_its_exit_status_and_stderr_tail() {
    let relay = Relay::start().await;
    let cmd = "echo 'starting' >&2; echo 'fatal: no credentials' >&2; exit 3";
    let (rt, daemon) = relay.daemon("cmd", Source::Command(cmd.into())).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap();
    assert!(error.contains("exit status 3"), "{error}");
    assert!(error.ends_with("fatal: no credentials"), "{error}");
    daemon.stop().await.unwrap();
}

engine_tests!(async Timeouts::default(); a_discover_cmd_printing_nul_on_stderr_ends_failed_with_u_fffd);

/// Issue 15: a discovery command that printed a NUL on stderr made PostgreSQL refuse the
/// failed report (503, retried, given up), and the request ended as `timeout` instead of
/// `failed`. On every engine it must end `failed`, at the first report, its error the
/// stderr tail with U+FFFD for the NUL and the rest as printed.
async fn a_discover_cmd_printing_nul_on_stderr_ends_failed_with_u_fffd(engine: &dyn Engine) {
    let relay = Relay::start_on_engine(engine).await;
    let cmd = r"printf 'fatal: bad\000byte\n\tdetail \360\235\204\236\n' >&2; exit 1";
    let (rt, daemon) = relay.daemon("cmd", Source::Command(cmd.into())).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap();
    assert!(error.contains("exit status 1"), "{error}");
    assert!(
        error.ends_with("fatal: bad\u{FFFD}byte\n\tdetail 𝄞"),
        "{error:?}"
    );
    assert_eq!(
        relay.knobs.final_reports.load(SeqCst),
        1,
        "delivered at once, never retried"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_discover_cmd_printing_bad_json_is_reported_failed() {
    let relay = Relay::start().await;
    let cmd = r#"echo 'Models: a, b'; echo 'warning: old config' >&2"#;
    let (rt, daemon) = relay.daemon("cmd", Source::Command(cmd.into())).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap();
    assert!(error.contains("invalid JSON"), "{error}");
    assert!(error.contains("exit status 0"), "{error}");
    assert!(error.contains("warning: old config"), "{error}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_discover_cmd_past_its_timeout_is_killed_with_its_children_and_reported_failed() {
    let relay = Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sleeper.pid");
    // A grandchild that would outlive the shell if only the shell were killed.
    let cmd = format!(
        "echo 'looking…' >&2; sleep 60 & echo $! > {}; wait",
        pid_file.display()
    );
    let (rt, token) = relay.runtime("slow").await;
    let mut config = relay.config(&rt, &token, Source::Command(cmd));
    config.discover_timeout = Duration::from_millis(300);
    let daemon = relay.run(config, &rt).await;

    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap();
    assert!(error.contains("timed out after 300ms"), "{error}");
    assert!(error.contains("looking…"), "{error}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    eventually("the grandchild is killed", || async { is_gone(pid.trim()) }).await;
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn heartbeats_go_on_and_the_lease_is_renewed_while_discovery_runs() {
    // A server that answers heartbeats at once: the daemon then heartbeats every interval,
    // and each heartbeat after the clock moves shows as a touch of `last_seen_at`.
    let relay = Relay::start_with(model_relay::config::Settings {
        max_wait: Duration::ZERO,
        ..support::server::settings()
    })
    .await;
    let gate = Gate::new();
    let (rt, daemon) = relay.daemon("slow", gate.source()).await;
    let id = relay.request(&rt).await;
    eventually("the daemon claims the request", || async {
        relay.poll(&rt, &id).await["status"] == "running"
    })
    .await;
    let beats_at_claim = relay.knobs.heartbeats.load(SeqCst);

    // Three renewals, 40 s of server time after each: 120 s in all, twice the 60 s lease.
    for _ in 0..3 {
        let before = relay.knobs.renewals.load(SeqCst);
        eventually("a lease renewal", || async {
            relay.knobs.renewals.load(SeqCst) > before
        })
        .await;
        relay.clock.advance(Duration::from_secs(40));
    }
    assert_eq!(relay.poll(&rt, &id).await["status"], "running", "renewed");
    eventually("heartbeats while discovering", || async {
        relay.knobs.heartbeats.load(SeqCst) >= beats_at_claim + 2
    })
    .await;

    gate.open(r#"[{"id":"slow-model","label":"Slow"}]"#).await;
    let ended = relay.wait_ended(&rt, &id).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(
        ended["models"],
        json!([{"id": "slow-model", "label": "Slow"}])
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_report_answered_503_is_retried_until_it_is_delivered() {
    let relay = Relay::start().await;
    relay.knobs.fail_final_reports.store(2, SeqCst);
    let (rt, daemon) = relay.daemon("flaky", found("m")).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["models"], json!([{"id": "m", "label": "M"}]));
    assert_eq!(
        relay.knobs.final_reports.load(SeqCst),
        3,
        "two 503s, then 200"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_report_answered_409_is_not_retried() {
    let relay = Relay::start().await;
    relay.knobs.expire_before_final_report.store(true, SeqCst);
    let (rt, daemon) = relay.daemon("late", found("m")).await;
    let ended = relay.discover(&rt).await;
    assert_eq!(ended["status"], "timeout", "{ended}");
    // `stop` returns once the request's task has finished, retries included: every report
    // the daemon was going to send has reached the store by then.
    daemon.stop().await.unwrap();
    assert_eq!(relay.knobs.final_reports.load(SeqCst), 1);
}

#[tokio::test]
async fn heartbeats_answered_503_do_not_stop_the_daemon() {
    let relay = Relay::start().await;
    relay.knobs.fail_heartbeats.store(3, SeqCst);
    let (rt, daemon) = relay.daemon("patient", found("m")).await;
    // `daemon` waited for the runtime to come online: past the three failures.
    assert_eq!(relay.knobs.fail_heartbeats.load(SeqCst), 0);
    assert_eq!(relay.discover(&rt).await["status"], "completed");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_heartbeat_answered_401_stops_the_daemon_with_an_error() {
    let relay = Relay::start().await;
    let (rt, _) = relay.runtime("wrong token").await;
    let config = relay.config(&rt, "mrd_not-the-token", found("m"));
    let never = std::future::pending::<()>();
    let error = tokio::time::timeout(Duration::from_secs(10), daemon::run(config, never))
        .await
        .expect("the daemon stops by itself")
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("401"), "{message}");
    assert!(
        message.contains("missing or invalid bearer token"),
        "{message}"
    );
}

#[tokio::test]
async fn stopping_kills_a_running_discovery_and_reports_it_failed() {
    let relay = Relay::start().await;
    let gate = Gate::new();
    let (rt, daemon) = relay.daemon("stopping", gate.source()).await;
    let id = relay.request(&rt).await;
    eventually("the command is running", || async { gate.pid().is_some() }).await;
    let pid = gate.pid().unwrap();

    daemon.stop().await.unwrap();
    let ended = relay.poll(&rt, &id).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(
        ended["error"],
        "the daemon stopped before discovery finished"
    );
    eventually("the discovery command is killed", || async {
        is_gone(&pid)
    })
    .await;
}

fn found(id: &str) -> Source {
    Source::Fixed(Discovery::Found {
        models: vec![model_relay::model::ModelEntry {
            id: id.to_owned(),
            label: id.to_uppercase(),
            ..Default::default()
        }],
        supported: true,
        fallback: false,
    })
}

/// The whole point of held heartbeats: with heartbeats an hour apart and each held for
/// 36 s (0.8 × the 45 s offline_after), longer than the test waits for the end, a
/// discovery is only served in time if the server wakes the held heartbeat when the
/// request is made.
#[tokio::test]
async fn a_held_heartbeat_serves_a_request_without_waiting_for_the_interval() {
    let relay = Relay::start_with(model_relay::config::Settings {
        max_wait: Duration::from_secs(60),
        ..support::server::settings()
    })
    .await;
    let (rt, token) = relay.runtime("held").await;
    let mut config = relay.config(&rt, &token, found("m"));
    config.heartbeat_interval = Duration::from_secs(3600);
    config.heartbeat_wait = Duration::from_secs(60);
    let daemon = relay.run(config, &rt).await;
    let id = relay.request(&rt).await;
    let ended = relay.wait_ended(&rt, &id).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    daemon.stop().await.unwrap();
}
