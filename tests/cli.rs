//! The command line as users run it: the built binary, real processes, real files.

mod support;

use std::process::Command;

use hyper::StatusCode;
use model_relay::ids::Token;
use serde_json::{Value, json};
use support::process::{BIN, Serve, workspace_create};
use support::server::Http;

/// A database URL of an SQLite file in a directory of its own, kept as long as the
/// directory is.
fn sqlite_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("relay.db").display());
    (dir, db)
}

/// The API token of a workspace made with `workspace create` on `db`.
fn api_token(db: &str) -> String {
    workspace_create(db)["api_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn workspace_create_json_prints_exactly_one_object_with_id_and_token() {
    let (_dir, db) = sqlite_file();
    let created = workspace_create(&db);
    let object = created.as_object().unwrap();
    assert_eq!(object.len(), 3, "{created}");
    assert!(object["workspace_id"].as_str().unwrap().len() == 36);
    let token = object["api_token"].as_str().unwrap();
    assert!(token.starts_with("mra_"));
    assert_eq!(object["token_id"].as_str().unwrap(), token_id_of(token));
    let other = workspace_create(&db);
    assert_ne!(other["api_token"], created["api_token"]);
}

/// The id `model-relay` names a token by.
fn token_id_of(token: &str) -> String {
    Token::from_header(token).hash().id().to_string()
}

/// `model-relay ARGS --database DB`: (success, stdout, stderr).
fn relay(db: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--database", db])
        .env_remove("MODEL_RELAY_DATABASE")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn relay_json(db: &str, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = relay(db, args);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[test]
fn workspace_list_json_shows_every_workspace_and_no_token() {
    let (_dir, db) = sqlite_file();
    assert_eq!(relay_json(&db, &["workspace", "list", "--json"]), json!([]));
    let created = workspace_create(&db);
    let listed = relay_json(&db, &["workspace", "list", "--json"]);
    let entries = listed.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listed}");
    let entry = entries[0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["created_at", "name", "workspace_id"]);
    assert_eq!(entry["workspace_id"], created["workspace_id"]);
    assert_eq!(entry["name"], "acme");
    assert!(entry["created_at"].as_str().unwrap().ends_with('Z'));
    let (ok, text, _) = relay(&db, &["workspace", "list"]);
    assert!(ok);
    assert!(text.contains(created["workspace_id"].as_str().unwrap()) && text.contains("acme"));
    assert!(!text.contains(created["api_token"].as_str().unwrap()));
}

/// create, list, use, revoke: a revoked token is refused by a running `serve` at its
/// next call, the others keep working, and no list ever prints a token or its hash.
#[tokio::test]
async fn api_tokens_are_created_listed_and_revoked_and_lists_never_show_a_token() {
    let (_dir, db) = sqlite_file();
    let created = workspace_create(&db);
    let ws = created["workspace_id"].as_str().unwrap().to_owned();
    let first = created["api_token"].as_str().unwrap().to_owned();

    let made = relay_json(&db, &["workspace", "token", "create", &ws, "--json"]);
    let made = made.as_object().unwrap();
    let mut keys: Vec<&str> = made.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["api_token", "token_id"]);
    let second = made["api_token"].as_str().unwrap().to_owned();
    assert!(second.starts_with("mra_"));
    assert_eq!(made["token_id"].as_str().unwrap(), token_id_of(&second));

    let serve = Serve::start(&db, &[]);
    let http = Http::default();
    let runtimes = format!("{}/api/runtimes", serve.base);
    assert_eq!(http.get(&runtimes, &second).await.status, StatusCode::OK);

    let listed = relay_json(&db, &["workspace", "token", "list", &ws, "--json"]);
    let entries = listed.as_array().unwrap();
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["token_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [token_id_of(&first), token_id_of(&second)],
        "oldest first"
    );
    assert!(
        entries[0].get("last_used_at").is_none(),
        "never used: left out"
    );
    assert!(entries[1]["last_used_at"].as_str().unwrap().ends_with('Z'));
    for entry in entries {
        assert!(entry.as_object().unwrap().len() <= 3, "{entry}");
    }
    let (ok, text, _) = relay(&db, &["workspace", "token", "list", &ws]);
    assert!(ok);
    for shown in [listed.to_string(), text] {
        for token in [&first, &second] {
            assert!(!shown.contains(token.as_str()), "a token in {shown}");
            let hash = Token::from_header(token).hash();
            assert!(!shown.contains(hash.as_str()), "a hash in {shown}");
        }
    }

    let (ok, out, err) = relay(
        &db,
        &["workspace", "token", "revoke", &ws, &token_id_of(&second)],
    );
    assert!(ok, "{err}");
    assert!(out.contains(&token_id_of(&second)), "{out}");
    assert_eq!(
        http.get(&runtimes, &second).await.status,
        StatusCode::UNAUTHORIZED,
        "refused by the running server at once"
    );
    assert_eq!(http.get(&runtimes, &first).await.status, StatusCode::OK);
    let listed = relay_json(&db, &["workspace", "token", "list", &ws, "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["token_id"].as_str().unwrap(), token_id_of(&first));

    // Revoking again, a malformed id, another workspace: refused, with a message.
    let (ok, _, err) = relay(
        &db,
        &["workspace", "token", "revoke", &ws, &token_id_of(&second)],
    );
    assert!(!ok && err.contains("no token"), "{err}");
    let (ok, _, err) = relay(&db, &["workspace", "token", "revoke", &ws, "nope"]);
    assert!(!ok && err.contains("not a token id"), "{err}");
    let other = workspace_create(&db)["workspace_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, _) = relay(
        &db,
        &["workspace", "token", "revoke", &other, &token_id_of(&first)],
    );
    assert!(!ok, "a token is revoked through its own workspace only");
    assert_eq!(http.get(&runtimes, &first).await.status, StatusCode::OK);
    let unknown = "7d0c5a3e-1111-4222-8333-944455556666";
    let (ok, _, err) = relay(&db, &["workspace", "token", "create", unknown]);
    assert!(!ok && err.contains("no workspace"), "{err}");
}

#[test]
fn bad_database_urls_and_durations_are_refused_with_a_message() {
    let out = Command::new(BIN)
        .args([
            "workspace",
            "create",
            "x",
            "--database",
            "mysql://u:secret@h/db",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unsupported database URL"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");

    let out = Command::new(BIN)
        .args(["serve", "--pending-timeout", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pending-timeout"));
}

/// Settings that could never work are refused before anything starts, each with a
/// message naming the flag: no connection slot at all, a metrics token that is empty
/// (which used to leave `/metrics` open) or that no client can send.
#[test]
fn serve_refuses_settings_that_could_never_work() {
    let (_dir, db) = sqlite_file();
    let refused = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(["serve", "--listen", "127.0.0.1:0", "--database", &db]);
        command.args(args).env_remove("MODEL_RELAY_METRICS_TOKEN");
        if let Some(value) = env {
            command.env("MODEL_RELAY_METRICS_TOKEN", value);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = refused(&["--max-connections", "0"], None);
    assert!(
        stderr.contains("--max-connections") && stderr.contains("at least 1"),
        "{stderr}"
    );
    for token in ["", " ", "\t"] {
        let stderr = refused(&[], Some(token));
        assert!(stderr.contains("--metrics-token"), "{token:?}: {stderr}");
    }
    for token in ["", "  ", "a b"] {
        let stderr = refused(&["--metrics-token", token], None);
        assert!(stderr.contains("--metrics-token"), "{token:?}: {stderr}");
    }
}

/// `--cors-origin HTTPS://UI.Example.com:443` is the origin a browser sends as
/// `https://ui.example.com`: its preflight is answered (it never matched before).
#[test]
fn a_cors_origin_with_its_default_port_matches_what_browsers_send() {
    use std::io::{Read, Write};
    let (_dir, db) = sqlite_file();
    let serve = Serve::start(&db, &["--cors-origin", "HTTPS://UI.Example.com:443"]);
    let at = serve.base.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&at).unwrap();
    stream
        .write_all(
            b"OPTIONS /api/runtimes HTTP/1.1\r\nHost: x\r\nOrigin: https://ui.example.com\r\n\
              Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: https://ui.example.com\r\n"),
        "{answer}"
    );
    serve.terminate();
}

/// Two `serve` processes on one database; every call alternates between them.
async fn two_processes_alternating(database: &str) {
    let api = workspace_create(database)["api_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let servers = [Serve::start(database, &[]), Serve::start(database, &[])];
    let at = |i: usize, path: &str| format!("{}{path}", servers[i % 2].base);
    let http = Http::default();

    let created = http
        .post(
            &at(0, "/api/runtimes"),
            &api,
            json!({"name": "box", "provider": "claude"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
    let beat = json!({"runtime_id": rt});
    assert_eq!(
        http.post(&at(1, "/api/daemon/heartbeat"), &daemon, beat.clone())
            .await
            .status,
        StatusCode::OK
    );
    let request = http
        .post_empty(&at(0, &format!("/api/runtimes/{rt}/models")), &api)
        .await;
    assert_eq!(request.status, StatusCode::OK, "{}", request.json);
    let id = request.json["id"].as_str().unwrap().to_owned();
    let poll = format!("/api/runtimes/{rt}/models/{id}");
    assert_eq!(
        http.get(&at(1, &poll), &api).await.json["status"],
        "pending"
    );
    let ack = http
        .post(&at(1, "/api/daemon/heartbeat"), &daemon, beat.clone())
        .await;
    assert_eq!(ack.json["pending_model_list"]["id"], id.as_str());
    let ack = http
        .post(&at(0, "/api/daemon/heartbeat"), &daemon, beat)
        .await;
    assert_eq!(
        ack.json,
        json!({"status": "ok"}),
        "handed out once across processes"
    );
    let result = format!("/api/daemon/runtimes/{rt}/models/{id}/result");
    let report = json!({"status": "completed", "models": [{"id": "m1", "label": "M1"}]});
    assert_eq!(
        http.post(&at(0, &result), &daemon, report).await.status,
        StatusCode::OK
    );
    for i in 0..2 {
        let done = http.get(&at(i, &poll), &api).await;
        assert_eq!(done.json["status"], "completed");
        assert_eq!(done.json["models"], json!([{"id": "m1", "label": "M1"}]));
    }
    for server in servers {
        assert!(
            server.terminate().success(),
            "SIGTERM ends serve with status 0"
        );
    }
}

#[tokio::test]
async fn two_serve_processes_on_one_sqlite_file_answer_each_others_calls() {
    let (_dir, db) = sqlite_file();
    two_processes_alternating(&db).await;
}

#[tokio::test]
async fn two_serve_processes_on_one_postgres_database_answer_each_others_calls() {
    let Some(schema) = support::postgres::fresh_schema("two_serve_processes") else {
        return;
    };
    two_processes_alternating(&schema.url()).await;
}

/// Through PgBouncer in transaction-pooling mode, with `?pool_mode=transaction` in the URL
/// the processes are given (the CLI's `workspace create` included).
#[tokio::test]
async fn two_serve_processes_through_pgbouncer_answer_each_others_calls() {
    let Some(database) = support::pgbouncer::fresh_database("two_serve_pgbouncer") else {
        return;
    };
    two_processes_alternating(&database.url()).await;
}

/// A create in one `serve` process wakes a heartbeat held in another process on the same
/// SQLite file, through SQLite alone (the watcher of `PRAGMA data_version`): the re-check
/// is an hour away, and the heartbeat would otherwise be held for a minute, past the test
/// client's 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_in_one_process_wakes_a_heartbeat_held_in_another() {
    let (_dir, db) = sqlite_file();
    let api = api_token(&db);
    let flags = [
        "--max-wait",
        "60s",
        "--offline-after",
        "1h",
        "--recheck-every",
        "1h",
    ];
    let holder = Serve::start(&db, &flags);
    let creator = Serve::start(&db, &flags);
    let http = Http::default();
    let created = http
        .post(
            &format!("{}/api/runtimes", creator.base),
            &api,
            json!({"name": "box", "provider": "claude"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
    let beat_url = format!("{}/api/daemon/heartbeat", holder.base);
    let online = http
        .post(&beat_url, &daemon, json!({"runtime_id": rt}))
        .await;
    assert_eq!(online.status, StatusCode::OK);
    let held = http.post(
        &beat_url,
        &daemon,
        json!({"runtime_id": rt, "wait_ms": 60_000}),
    );
    let create = async {
        let metrics = format!("{}/metrics", holder.base);
        for _ in 0..1000 {
            let scrape = support::prom::Scrape::parse(&http.get_text(&metrics).await.text());
            if scrape.value("model_relay_held_calls", &[("kind", "heartbeat")]) == 1.0
                && scrape.value("model_relay_listener_up", &[]) == 1.0
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        http.post_empty(&format!("{}/api/runtimes/{rt}/models", creator.base), &api)
            .await
    };
    let (ack, request) = tokio::join!(held, create);
    assert_eq!(ack.status, StatusCode::OK);
    assert_eq!(ack.json["pending_model_list"]["id"], request.json["id"]);
    for server in [holder, creator] {
        assert!(server.terminate().success());
    }
}

/// The soft limit on open files (often 1,024) would cap connections far below what the
/// system allows: `serve` raises it to the hard limit, and says so.
#[cfg(unix)]
#[test]
fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    let (_dir, db) = sqlite_file();
    let serve = Serve::start_with_open_files(&db, &[], 256, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serve.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let figures: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(figures, ["4096", "4096"], "{open_files}");
    assert!(
        serve
            .logs_so_far()
            .iter()
            .any(|l| l.contains("open files limit") && l.contains("4096")),
        "{:?}",
        serve.logs_so_far()
    );
    assert!(serve.terminate().success());
}

/// Out of file descriptors, `accept` fails at once, again and again: the server must
/// back off instead of spinning, say so at most once a second, and serve again as soon as
/// descriptors are free.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    let (_dir, db) = sqlite_file();
    let serve = Serve::start_with_open_files(&db, &[], 64, 64);
    let addr = serve.base.trim_start_matches("http://").to_owned();
    // More connections than it has descriptors left; each waits in the listen queue or
    // holds a descriptor.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let failing = || {
        serve
            .logs_so_far()
            .iter()
            .filter(|l| l.contains("accept failed"))
            .count()
    };
    for _ in 0..500 {
        if failing() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        failing() > 0,
        "accept never failed: {:?}",
        serve.logs_so_far()
    );
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|t| t.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let (logged, ticks) = (failing(), cpu(serve.pid()));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (logged_after, ticks_after) = (failing(), cpu(serve.pid()));
    assert!(
        logged_after - logged <= 4,
        "{} accept failures logged in 3 s",
        logged_after - logged
    );
    // A spinning accept loop burns the whole 3 s (300 ticks); backing off, a few.
    assert!(
        ticks_after - ticks < 100,
        "{} ticks of CPU in 3 s",
        ticks_after - ticks
    );
    drop(flood);
    let health = Http::default()
        .get_text(&format!("{}/healthz", serve.base))
        .await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(serve.terminate().success());
}

/// JSON logs at the most verbose level, over a whole cycle with good and bad calls: every
/// line is one JSON object, each request has its debug line by route template, the state
/// transitions are there at info, and no token — good, wrong or malformed — appears in any
/// line. Ctrl-C (SIGINT) ends it with status 0.
#[tokio::test]
async fn json_logs_carry_requests_and_transitions_but_never_a_token() {
    let (_dir, db) = sqlite_file();
    let api = api_token(&db);
    let mut serve = Serve::start_with(&db, &["--log-format", "json"], "trace");
    let url = |path: &str| format!("{}{path}", serve.base);
    let http = Http::default();

    let created = http
        .post(
            &url("/api/runtimes"),
            &api,
            json!({"name": "box", "provider": "claude"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
    let beat = json!({"runtime_id": rt});
    http.post(&url("/api/daemon/heartbeat"), &daemon, beat.clone())
        .await;
    let id = http
        .post_empty(&url(&format!("/api/runtimes/{rt}/models")), &api)
        .await
        .json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    http.post(&url("/api/daemon/heartbeat"), &daemon, beat.clone())
        .await;
    let result = format!("/api/daemon/runtimes/{rt}/models/{id}/result");
    let report = json!({"status": "completed", "models": [{"id": "m", "label": "M"}]});
    assert_eq!(
        http.post(&url(&result), &daemon, report).await.status,
        StatusCode::OK
    );
    // Wrong, foreign and malformed tokens; a bad body.
    let wrong = "mra_0123456789abcdef0123456789abcdef0123456789abcdef";
    let garbage = "not-a-token-but-secret-looking-xyzzy";
    for token in [wrong, garbage, daemon.as_str()] {
        let answer = http.get(&url("/api/runtimes"), token).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let bad = http
        .call(
            hyper::Method::POST,
            &url("/api/daemon/heartbeat"),
            Some(&daemon),
            Some(b"{not json".to_vec()),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    assert!(
        serve.signal("INT").success(),
        "Ctrl-C ends serve with status 0"
    );
    let logs = serve.all_logs();
    let lines: Vec<Value> = logs
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let message = |v: &Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    let at = |level: &str, what: &str| {
        lines
            .iter()
            .filter(|v| v["level"] == level && message(v) == what)
            .count()
    };
    assert_eq!(at("INFO", "request created"), 1, "{logs:#?}");
    assert_eq!(at("INFO", "request claimed"), 1, "{logs:#?}");
    assert_eq!(at("INFO", "report accepted"), 1, "{logs:#?}");
    assert!(
        lines.iter().any(|v| message(v) == "request"
            && v["level"] == "DEBUG"
            && v["fields"]["route"]
                == "/api/daemon/runtimes/{runtimeId}/models/{requestId}/result"
            && v["fields"]["status"] == 200),
        "{logs:#?}"
    );
    assert_eq!(at("DEBUG", "request"), 9, "one line per request: {logs:#?}");
    for secret in [api.as_str(), daemon.as_str(), wrong, garbage] {
        for line in &logs {
            assert!(!line.contains(secret), "a token in the log: {line}");
        }
    }
    for line in &logs {
        assert!(
            !line.contains("mra_") && !line.contains("mrd_"),
            "a token in the log: {line}"
        );
    }
}
