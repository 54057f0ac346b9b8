//! Fair shares of held calls, over real sockets (DESIGN.md "Version 3: proof, faults and fair
//! shares"): one tenant's flood of held heartbeats and waiting reads takes its own share of
//! `--max-waiting`, answered 429 past it, and another tenant's held calls are still held and
//! woken.
//!
//! No test measures time: a call that should be woken but is not runs into the test
//! client's 10 s limit and fails.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use model_relay::config::Settings;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use serde_json::{Value, json};
use support::prom::Scrape;
use support::server::{Answer, Http, Instance, T0, clock, settings, workspace};
use tokio::sync::mpsc;

/// A workspace with one online runtime, and the tokens of both.
struct Tenant {
    api: String,
    rt: String,
    daemon: String,
}

impl Tenant {
    async fn new(http: &Http, store: &Arc<dyn Storer>, on: &Instance) -> Tenant {
        let store = Arc::clone(store);
        let (_, api) = tokio::task::spawn_blocking(move || workspace(store.as_ref(), T0))
            .await
            .unwrap();
        let created = http
            .post(
                &format!("{}/api/runtimes", on.base),
                &api,
                json!({"name": "laptop", "provider": "claude"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        let tenant = Tenant {
            api,
            rt: created.json["id"].as_str().unwrap().to_owned(),
            daemon: created.json["daemon_token"].as_str().unwrap().to_owned(),
        };
        // Online from here on: the fake clock stands still.
        assert_eq!(tenant.heartbeat(http, on, 0).await.status, StatusCode::OK);
        tenant
    }

    fn heartbeat(&self, http: &Http, on: &Instance, wait_ms: u64) -> Call {
        let url = format!("{}/api/daemon/heartbeat", on.base);
        let body = json!({"runtime_id": self.rt, "wait_ms": wait_ms}).to_string();
        let (http, token) = (http.clone(), self.daemon.clone());
        Box::pin(async move {
            http.call(Method::POST, &url, Some(&token), Some(body.into_bytes()))
                .await
        })
    }

    fn read(&self, http: &Http, on: &Instance, id: &str, wait_ms: u64) -> Call {
        let url = format!(
            "{}/api/runtimes/{}/models/{id}?wait_ms={wait_ms}",
            on.base, self.rt
        );
        let (http, token) = (http.clone(), self.api.clone());
        Box::pin(async move { http.get(&url, &token).await })
    }

    async fn create(&self, http: &Http, on: &Instance) -> String {
        let url = format!("{}/api/runtimes/{}/models", on.base, self.rt);
        let answer = http.post_empty(&url, &self.api).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        answer.json["id"].as_str().unwrap().to_owned()
    }

    async fn report(&self, http: &Http, on: &Instance, id: &str) {
        let url = format!(
            "{}/api/daemon/runtimes/{}/models/{id}/result",
            on.base, self.rt
        );
        let report = json!({"status": "completed", "supported": true,
                            "models": [{"id": "m", "label": "M"}]});
        let answer = http.post(&url, &self.daemon, report).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    }
}

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;

async fn held(http: &Http, on: &Instance, kind: &str) -> f64 {
    let text = http.get_text(&format!("{}/metrics", on.base)).await.text();
    Scrape::parse(&text).value("model_relay_held_calls", &[("kind", kind)])
}

async fn until_held(http: &Http, on: &Instance, kind: &str, n: f64) {
    for _ in 0..500 {
        if held(http, on, kind).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never held {n} {kind} calls");
}

/// Starts `calls` at once; each answer goes to the receiver as it comes.
fn start_all(calls: Vec<Call>) -> mpsc::UnboundedReceiver<Answer> {
    let (tx, rx) = mpsc::unbounded_channel();
    for call in calls {
        let tx = tx.clone();
        tokio::spawn(async move { drop(tx.send(call.await)) });
    }
    rx
}

async fn next(answers: &mut mpsc::UnboundedReceiver<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await
        .expect("an answer within 10 s")
        .expect("a call still running")
}

fn refusal(answer: &Answer) -> (StatusCode, Value) {
    (answer.status, answer.json.clone())
}

#[tokio::test]
async fn one_workspace_flooding_held_calls_leaves_another_held_and_woken() {
    // The reported case: `--max-waiting 40`, and one workspace sends 60 waiting reads and
    // 60 held heartbeats of one daemon token. Before shares, those took all 40 places and
    // the other workspace's held calls were answered 503 at once.
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
    let on = Instance::start(
        Arc::clone(&store),
        clock(),
        Settings {
            max_waiting: 40,
            max_waiting_per_runtime: 2,
            max_waiting_per_workspace: 10,
            max_wait: Duration::from_secs(60),
            offline_after: Duration::from_secs(3600),
            ..settings()
        },
    )
    .await;
    let http = Http::default();
    let (flooder, other) = (
        Tenant::new(&http, &store, &on).await,
        Tenant::new(&http, &store, &on).await,
    );

    // The flooder's request is claimed (running), so that its reads wait and its
    // heartbeats find nothing to claim.
    let id = flooder.create(&http, &on).await;
    let claimed = flooder.heartbeat(&http, &on, 0).await;
    assert_eq!(claimed.json["pending_model_list"]["id"], id.as_str());
    let mut flood: Vec<Call> = (0..60)
        .map(|_| flooder.read(&http, &on, &id, 60_000))
        .collect();
    flood.extend((0..60).map(|_| flooder.heartbeat(&http, &on, 60_000)));
    let mut answers = start_all(flood);
    let (mut over_reads, mut over_beats) = (0, 0);
    for _ in 0..(60 - 10) + (60 - 2) {
        let answer = next(&mut answers).await;
        match refusal(&answer) {
            (StatusCode::TOO_MANY_REQUESTS, body)
                if body == json!({"error": "too many waiting calls for this workspace"}) =>
            {
                over_reads += 1
            }
            (StatusCode::TOO_MANY_REQUESTS, body)
                if body == json!({"error": "too many waiting calls for this runtime"}) =>
            {
                over_beats += 1
            }
            other => panic!("a flooding call answered {other:?}"),
        }
    }
    assert_eq!((over_reads, over_beats), (50, 58));
    until_held(&http, &on, "read", 10.0).await;
    until_held(&http, &on, "heartbeat", 2.0).await;

    // The other workspace: its heartbeat is held, then woken by its own request…
    let beat = tokio::spawn(other.heartbeat(&http, &on, 60_000));
    until_held(&http, &on, "heartbeat", 3.0).await;
    let mine = other.create(&http, &on).await;
    let beat = beat.await.unwrap();
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json);
    assert_eq!(beat.json["pending_model_list"]["id"], mine.as_str());
    // …and its read is held, then woken by the report.
    let read = tokio::spawn(other.read(&http, &on, &mine, 60_000));
    until_held(&http, &on, "read", 11.0).await;
    other.report(&http, &on, &mine).await;
    let read = read.await.unwrap();
    assert_eq!(read.status, StatusCode::OK, "{}", read.json);
    assert_eq!(read.json["status"], "completed");

    // The flood's held calls are still held; shutdown answers them.
    assert!(answers.try_recv().is_err(), "a flooding held call answered");
    on.stop().await;
    for _ in 0..12 {
        assert_eq!(next(&mut answers).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn past_the_total_every_tenant_is_refused_with_503() {
    // Shares bound each tenant; the total still bounds them all.
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
    let on = Instance::start(
        Arc::clone(&store),
        clock(),
        Settings {
            max_waiting: 2,
            max_waiting_per_runtime: 2,
            max_waiting_per_workspace: 2,
            max_wait: Duration::from_secs(60),
            offline_after: Duration::from_secs(3600),
            ..settings()
        },
    )
    .await;
    let http = Http::default();
    let (a, b) = (
        Tenant::new(&http, &store, &on).await,
        Tenant::new(&http, &store, &on).await,
    );
    let mut answers = start_all(vec![a.heartbeat(&http, &on, 60_000)]);
    until_held(&http, &on, "heartbeat", 1.0).await;
    let mut more = start_all(vec![b.heartbeat(&http, &on, 60_000)]);
    until_held(&http, &on, "heartbeat", 2.0).await;
    let id = b.create(&http, &on).await;
    // b's heartbeat claims it: one place is free for a moment, then taken again below.
    assert_eq!(
        next(&mut more).await.json["pending_model_list"]["id"],
        id.as_str()
    );
    let mut reads = start_all(vec![b.read(&http, &on, &id, 60_000)]);
    until_held(&http, &on, "read", 1.0).await;
    let over = b.heartbeat(&http, &on, 60_000).await;
    assert_eq!(
        refusal(&over),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many waiting calls"})
        )
    );
    on.stop().await;
    assert_eq!(next(&mut answers).await.status, StatusCode::OK);
    assert_eq!(next(&mut reads).await.status, StatusCode::OK);
}
