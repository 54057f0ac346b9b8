//! `model-relay backup` as users run it: the built binary copying the file of a `serve`
//! process that keeps writing, and a new `serve` on the copy.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::StatusCode;
use serde_json::json;
use support::process::{BIN, Serve, workspace_create};
use support::server::Http;

/// `model-relay backup --database DATABASE --to TO`, with no database from the environment.
fn backup(database: &str, to: &Path) -> Output {
    Command::new(BIN)
        .args(["backup", "--database", database, "--to"])
        .arg(to)
        .env_remove("MODEL_RELAY_DATABASE")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run model-relay backup")
}

/// What the writer did: the runtimes whose create was answered, in order, and every answer
/// that was not the one expected.
#[derive(Default)]
struct Written {
    runtimes: Vec<String>,
    failures: Vec<String>,
}

/// Until `stop`: creates a runtime, brings it online with a heartbeat and asks it for its
/// models, over and over. Each runtime is recorded once its create has been answered, and
/// `created` is told the new count.
async fn write_until(
    http: Http,
    base: String,
    api: String,
    stop: Arc<AtomicBool>,
    written: Arc<std::sync::Mutex<Written>>,
    created: tokio::sync::watch::Sender<usize>,
) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let answer = http
            .post(
                &format!("{base}/api/runtimes"),
                &api,
                json!({"name": format!("box {n}"), "provider": "claude"}),
            )
            .await;
        if answer.status != StatusCode::CREATED {
            written
                .lock()
                .unwrap()
                .failures
                .push(format!("create: {} {}", answer.status, answer.json));
            continue;
        }
        let rt = answer.json["id"].as_str().unwrap().to_owned();
        let daemon = answer.json["daemon_token"].as_str().unwrap().to_owned();
        let count = {
            let mut written = written.lock().unwrap();
            written.runtimes.push(rt.clone());
            written.runtimes.len()
        };
        created.send_replace(count);
        let beat = http
            .post(
                &format!("{base}/api/daemon/heartbeat"),
                &daemon,
                json!({"runtime_id": rt}),
            )
            .await;
        let ask = http
            .post_empty(&format!("{base}/api/runtimes/{rt}/models"), &api)
            .await;
        for (what, status, body) in [
            ("heartbeat", beat.status, beat.json),
            ("models", ask.status, ask.json),
        ] {
            if status != StatusCode::OK {
                written
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("{what}: {status} {body}"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serve_writes_restores_every_runtime_created_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let live = format!("sqlite:{}", dir.path().join("live.db").display());
    let copy = dir.path().join("copy.db");
    let api = workspace_create(&live)["api_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // The writer creates runtimes for as long as the backup takes: no limit stops it.
    let serve = Serve::start(&live, &["--max-runtimes-per-workspace", "1000000"]);
    let http = Http::default();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(std::sync::Mutex::new(Written::default()));
    let (created, mut count) = tokio::sync::watch::channel(0);
    let writer = tokio::spawn(write_until(
        http.clone(),
        serve.base.clone(),
        api.clone(),
        stop.clone(),
        written.clone(),
        created,
    ));

    // Some writing first, so the copy has rows, and their requests, to carry.
    count.wait_for(|n| *n >= 20).await.unwrap();
    // Every runtime answered by now was committed before the backup starts.
    let before: Vec<String> = written.lock().unwrap().runtimes.clone();
    let copied = {
        let (live, copy) = (live.clone(), copy.clone());
        tokio::task::spawn_blocking(move || backup(&live, &copy))
            .await
            .unwrap()
    };
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(
        String::from_utf8_lossy(&copied.stdout).contains("backed up"),
        "{}",
        String::from_utf8_lossy(&copied.stdout)
    );
    // The server still writes after the backup: a few more runtimes, then stop.
    let after_backup = written.lock().unwrap().runtimes.len();
    count.wait_for(|n| *n >= after_backup + 5).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let failures = std::mem::take(&mut written.lock().unwrap().failures);
    assert!(
        failures.is_empty(),
        "answers while backing up: {failures:?}"
    );
    assert!(serve.terminate().success());

    // The copy on its own: a whole database, private, no log beside it.
    {
        let conn = rusqlite::Connection::open_with_flags(
            &copy,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let requests: i64 = conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert!(requests >= 1, "{requests} requests in the copy");
    }
    assert!(!dir.path().join("copy.db-wal").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    // Restored: a new server on the copy knows the same workspace token and every runtime
    // that existed before the backup began.
    let restored = Serve::start(&format!("sqlite:{}", copy.display()), &[]);
    // The list comes a page at a time: every page, however many the writer made.
    let mut present: HashSet<String> = HashSet::new();
    let mut url = format!("{}/api/runtimes?limit=1000", restored.base);
    loop {
        let listed = http.get(&url, &api).await;
        assert_eq!(listed.status, StatusCode::OK, "{}", listed.json);
        let page = listed.json["runtimes"].as_array().unwrap();
        present.extend(page.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        let Some(cursor) = listed.json["next_cursor"].as_str() else {
            break;
        };
        url = format!("{}/api/runtimes?limit=1000&cursor={cursor}", restored.base);
    }
    let missing: Vec<&String> = before
        .iter()
        .filter(|id| !present.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} missing: {missing:?}",
        missing.len(),
        before.len()
    );
    // One snapshot: the writer made its runtimes one after another, so the copy holds the
    // first of them, however many, and none made after a missing one.
    let all = std::mem::take(&mut written.lock().unwrap().runtimes);
    let prefix: HashSet<String> = all[..present.len()].iter().cloned().collect();
    assert_eq!(present, prefix, "the copy is not one moment of the writes");
    eprintln!(
        "runtimes answered before the backup: {}, in the copy: {}, in all: {}",
        before.len(),
        present.len(),
        all.len()
    );
    assert!(restored.terminate().success());
}

#[test]
fn backup_never_overwrites_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let live = format!("sqlite:{}", dir.path().join("live.db").display());
    workspace_create(&live);
    let copy = dir.path().join("copy.db");
    std::fs::write(&copy, "keep me").unwrap();
    let refused = backup(&live, &copy);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "keep me");
}

#[test]
fn backup_of_postgres_is_refused_with_a_pointer_to_pg_dump() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    // Nothing listens there: the refusal comes before any connection.
    let refused = backup("postgres://relay:s3cret@127.0.0.1:1/relay", &copy);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert!(stderr.contains("pg_restore"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the password shows: {stderr}");
    assert!(!copy.exists());
}
