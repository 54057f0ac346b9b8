//! `model-relay daemon` and `model-relay demo` as users run them: the built binary, real
//! processes, SIGTERM to stop.

mod support;
#[path = "support/text.rs"]
mod text;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use serde_json::{Value, json};
use support::server::{Http, Instance, T0, clock, settings, workspace};

const BIN: &str = env!("CARGO_BIN_EXE_model-relay");
/// Only a broken binary makes a healthy wait take this long.
const DEADLINE: Duration = Duration::from_secs(30);

/// A child process whose stderr is collected on a thread (so it never blocks on a full
/// pipe), killed if the test fails before it is stopped.
struct Process {
    child: Child,
    stderr: Option<JoinHandle<String>>,
}

impl Process {
    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Process {
            child,
            stderr: Some(stderr),
        }
    }

    /// SIGTERM; then whether it exited with 0, and everything it logged.
    fn terminate(mut self) -> (bool, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        (status.success(), stderr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /api/runtimes/{rt}/models/{id}` until the request has ended.
async fn ended(http: &Http, base: &str, token: &str, rt: &str, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let url = format!("{base}/api/runtimes/{rt}/models/{id}");
        let answer = http.get(&url, token).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        if !matches!(answer.json["status"].as_str(), Some("pending" | "running")) {
            return answer.json;
        }
        assert!(start.elapsed() < DEADLINE, "never ended: {}", answer.json);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every runtime of the workspace is online; their records.
async fn all_online(http: &Http, base: &str, token: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let list = http.get(&format!("{base}/api/runtimes"), token).await;
        assert_eq!(list.status, StatusCode::OK, "{}", list.json);
        let runtimes = list.json["runtimes"].as_array().unwrap().clone();
        if !runtimes.is_empty() && runtimes.iter().all(|r| r["status"] == "online") {
            return runtimes;
        }
        assert!(start.elapsed() < DEADLINE, "not online: {}", list.json);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn discover(http: &Http, base: &str, token: &str, rt: &str) -> Value {
    let created = http
        .post_empty(&format!("{base}/api/runtimes/{rt}/models"), token)
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.json);
    let id = created.json["id"].as_str().unwrap();
    ended(http, base, token, rt, id).await
}

#[tokio::test]
async fn daemon_command_serves_its_runtime_and_stops_cleanly_on_sigterm() {
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
    let (_, api) = workspace(store.as_ref(), T0);
    let server = Instance::start(store, clock(), settings()).await;
    let http = Http::default();
    let created = http
        .post(
            &format!("{}/api/runtimes", server.base),
            &api,
            json!({"name": "box", "provider": "claude"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let token = created.json["daemon_token"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.json");
    std::fs::write(&models, r#"[{"id":"m1","label":"Model one"}]"#).unwrap();

    let daemon = Process::spawn(
        Command::new(BIN)
            .args(["daemon", "--server", &server.base, "--runtime-id", &rt])
            .arg("--models-file")
            .arg(&models)
            .args(["--heartbeat-interval", "100ms"])
            .env("MODEL_RELAY_DAEMON_TOKEN", &token)
            .env("RUST_LOG", "info"),
    );
    all_online(&http, &server.base, &api).await;
    let ended = discover(&http, &server.base, &api, &rt).await;
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["models"], json!([{"id": "m1", "label": "Model one"}]));

    let (exited_ok, log) = daemon.terminate();
    assert!(exited_ok, "SIGTERM ends the daemon with status 0:\n{log}");
    for said in [
        "daemon started",
        "claimed a request; working on it",
        "kind=\"models\"",
        "report delivered",
    ] {
        assert!(log.contains(said), "the log says {said:?}:\n{log}");
    }
    assert!(
        log.contains("SIGTERM; stopping") && log.contains("daemon stopped"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token is never logged");
    assert!(
        !log.contains("travels in clear"),
        "no warning for a server on this machine:\n{log}"
    );
}

#[test]
fn a_daemon_warns_at_start_that_its_token_travels_in_clear_to_a_remote_http_server() {
    // 192.0.2.1 is TEST-NET-1: never reached, and the warning does not wait for it.
    let mut daemon = Command::new(BIN)
        .args(["daemon", "--server", "http://192.0.2.1:9"])
        .args(["--runtime-id", "f40ded99-5e02-4ce0-95b4-efd3589327d8"])
        .args(["--discover-cmd", "true"])
        .env("MODEL_RELAY_DAEMON_TOKEN", "mrd_x")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = daemon.stderr.take().unwrap();
    let mut said = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let started = line.contains("daemon started");
        said.push(line);
        if started {
            break;
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        said.iter()
            .any(|line| line.contains("the daemon token travels in clear")),
        "{said:#?}"
    );
}

#[test]
fn daemon_command_refuses_bad_arguments_with_a_message() {
    let rt = "f40ded99-5e02-4ce0-95b4-efd3589327d8";
    let refused = |args: &[&str], expected: &str| {
        let out = Command::new(BIN)
            .arg("daemon")
            .args(args)
            .env("MODEL_RELAY_DAEMON_TOKEN", "mrd_x")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    let server = ["--server", "http://127.0.0.1:9"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        [&server[..], &["--runtime-id", rt], extra].concat()
    };
    refused(&with(&[]), "--models-file");
    refused(
        &with(&["--models-file", "m.json", "--discover-cmd", "true"]),
        "cannot be used with",
    );
    refused(
        &[
            "--server",
            "http://h",
            "--runtime-id",
            "nope",
            "--discover-cmd",
            "true",
        ],
        "is not a UUID",
    );
    refused(
        &[
            "--server",
            "ftp://h",
            "--runtime-id",
            rt,
            "--discover-cmd",
            "true",
        ],
        "expected https://HOST[:PORT]",
    );
    refused(
        &with(&["--discover-cmd", "true", "--ca-cert", "ca.pem"]),
        "--ca-cert is for an https:// server",
    );
    refused(
        &[
            "--server",
            "https://127.0.0.1:9",
            "--runtime-id",
            rt,
            "--discover-cmd",
            "true",
            "--ca-cert",
            "/nonexistent/ca.pem",
        ],
        "/nonexistent/ca.pem",
    );
    refused(
        &with(&["--discover-cmd", "true", "--heartbeat-interval", "0s"]),
        "--heartbeat-interval",
    );
}

#[tokio::test]
async fn demo_serves_the_page_and_three_runtimes_that_end_three_ways() {
    let mut demo = Process::spawn(
        Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped()),
    );
    let stdout = demo.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map(Result::unwrap);
    let url = lines
        .find_map(|line| {
            line.trim()
                .starts_with("http://")
                .then(|| line.trim().to_owned())
        })
        .expect("the demo prints the page's URL");
    // Keep reading, as a terminal would, so the test never depends on what the demo does
    // with a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let (base, token) = url.split_once("/#token=").expect("token in the fragment");
    let http = Http::default();

    let page = text::fetch(hyper::Method::GET, &format!("{base}/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert!(page.body.contains("Discover models"), "{}", page.body);

    let runtimes = all_online(&http, base, token).await;
    let names: Vec<&str> = runtimes
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo-laptop", "empty-box", "broken-box"]);
    let id = |i: usize| runtimes[i]["id"].as_str().unwrap();

    let found = discover(&http, base, token, id(0)).await;
    assert_eq!(found["status"], "completed", "{found}");
    let models: Vec<&str> = found["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        models,
        ["claude-sonnet-4-6", "claude-opus-4-1", "claude-haiku-4-5"]
    );
    let none = discover(&http, base, token, id(1)).await;
    assert_eq!(
        (&none["status"], none.get("models")),
        (&json!("completed"), None)
    );
    let failed = discover(&http, base, token, id(2)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("exit status 2") && error.contains("not signed in"),
        "{error}"
    );

    let (exited_ok, log) = demo.terminate();
    assert!(exited_ok, "{log}");
    let database = log
        .split("database=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo logs where its data is");
    assert!(
        !std::path::Path::new(database).exists(),
        "{database} is deleted on exit"
    );
}
