//! Store outages, for real: a PostgreSQL cluster of the test's own, stopped and started
//! again; an SQLite file whose write lock another connection holds. Every store-backed
//! route answers 503 `store unavailable` within a few seconds, `/readyz` 503, `/healthz`
//! 200; once the store is back, the same process answers again, without a restart.

mod support;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::postgres::{Options as PgOptions, PostgresStore};
use model_relay::store::sqlite::{self, SqliteStore};
use serde_json::{Value, json};
use support::postgres::own::Cluster;
use support::prom::Scrape;
use support::server::{Answer, Http, Instance, T0, clock, settings, workspace};

/// The store calls of these tests wait at most this long; an answer that takes much longer
/// than that is a request hanging on the store.
const WAIT: Duration = Duration::from_millis(500);

fn pg_options() -> PgOptions {
    PgOptions {
        wait: WAIT,
        ..PgOptions::default()
    }
}
const HANG: Duration = Duration::from_secs(15);

struct World {
    http: Http,
    instance: Instance,
    api: String,
    rt: String,
    daemon: String,
    /// A pending request made before the outage.
    request: String,
}

impl World {
    /// The stored requests counted for the metrics now, as the sweeper does after a pass.
    async fn count_as_a_sweep_does(&self) {
        let app = Arc::clone(&self.instance.app);
        tokio::task::spawn_blocking(move || app.count_requests())
            .await
            .unwrap();
    }

    async fn new(store: Arc<dyn Storer>) -> Self {
        let clock = clock();
        let (_, api) = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || workspace(store.as_ref(), T0))
                .await
                .unwrap()
        };
        let instance = Instance::start(store, clock, settings()).await;
        let http = Http::default();
        let url = |path: &str| format!("{}{path}", instance.base);
        let created = http
            .post(
                &url("/api/runtimes"),
                &api,
                json!({"name": "n", "provider": "p"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        let rt = created.json["id"].as_str().unwrap().to_owned();
        let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
        let beat = http
            .post(
                &url("/api/daemon/heartbeat"),
                &daemon,
                json!({"runtime_id": rt}),
            )
            .await;
        assert_eq!(beat.status, StatusCode::OK);
        let request = http
            .post_empty(&url(&format!("/api/runtimes/{rt}/models")), &api)
            .await;
        assert_eq!(request.status, StatusCode::OK);
        let request = request.json["id"].as_str().unwrap().to_owned();
        World {
            http,
            instance,
            api,
            rt,
            daemon,
            request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.instance.base)
    }

    /// A call that must answer before `HANG`.
    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Answer {
        let started = Instant::now();
        let body = body.map(|b| b.to_string().into_bytes());
        let answer = tokio::time::timeout(
            HANG,
            self.http
                .call(method.clone(), &self.url(path), Some(token), body),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path} hung for {HANG:?}"));
        eprintln!(
            "{method} {path}: {} in {:?}",
            answer.status,
            started.elapsed()
        );
        answer
    }

    /// Every route that writes: (method, path, token, body).
    fn writes(&self) -> Vec<(Method, String, String, Option<Value>)> {
        let (rt, id) = (&self.rt, &self.request);
        vec![
            (
                Method::POST,
                "/api/runtimes".into(),
                self.api.clone(),
                Some(json!({"name": "m", "provider": "p"})),
            ),
            (
                Method::POST,
                format!("/api/runtimes/{rt}/models"),
                self.api.clone(),
                None,
            ),
            (
                Method::POST,
                "/api/daemon/heartbeat".into(),
                self.daemon.clone(),
                Some(json!({"runtime_id": rt})),
            ),
            (
                Method::POST,
                format!("/api/daemon/runtimes/{rt}/models/{id}/result"),
                self.daemon.clone(),
                Some(json!({"status": "running"})),
            ),
            (
                Method::DELETE,
                format!("/api/runtimes/{}", uuid_of_nothing()),
                self.api.clone(),
                None,
            ),
        ]
    }

    /// The routes that only read.
    fn reads(&self) -> Vec<(Method, String, String, Option<Value>)> {
        let (rt, id) = (&self.rt, &self.request);
        vec![
            (Method::GET, "/api/runtimes".into(), self.api.clone(), None),
            (
                Method::GET,
                format!("/api/runtimes/{rt}/models/{id}"),
                self.api.clone(),
                None,
            ),
        ]
    }

    async fn all_answer_503(&self, calls: Vec<(Method, String, String, Option<Value>)>) {
        for (method, path, token, body) in calls {
            let answer = self.call(method.clone(), &path, &token, body).await;
            assert_eq!(
                (answer.status, answer.json),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "store unavailable"})
                ),
                "{method} {path}"
            );
        }
    }

    async fn probes(&self) -> (StatusCode, StatusCode) {
        let health = self.call(Method::GET, "/healthz", "", None).await.status;
        let ready = self.call(Method::GET, "/readyz", "", None).await.status;
        (health, ready)
    }

    /// Polls `/readyz` until it is 200, for at most thirty seconds.
    /// Waits (up to 20 s: the listener retries with a backoff of up to 5 s) until the
    /// instance's wake-up listener is up, or down.
    async fn until_listener_up(&self, up: bool) {
        let want = if up { 1.0 } else { 0.0 };
        for _ in 0..200 {
            let metrics = self.http.get_text(&self.url("/metrics")).await.text();
            if Scrape::parse(&metrics).value("model_relay_listener_up", &[]) == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the listener never went {}", if up { "up" } else { "down" });
    }

    async fn until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.probes().await.1 != StatusCode::OK {
            assert!(Instant::now() < deadline, "the store never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The request made before the outage still goes its whole way.
    async fn finish_the_request(&self) {
        let (rt, id) = (&self.rt, &self.request);
        let ack = self
            .call(
                Method::POST,
                "/api/daemon/heartbeat",
                &self.daemon,
                Some(json!({"runtime_id": rt})),
            )
            .await;
        assert_eq!(ack.json["pending_model_list"]["id"], id.as_str());
        let report = self
            .call(
                Method::POST,
                &format!("/api/daemon/runtimes/{rt}/models/{id}/result"),
                &self.daemon,
                Some(json!({"status": "completed", "models": [{"id": "m", "label": "M"}]})),
            )
            .await;
        assert_eq!(report.status, StatusCode::OK);
        let done = self
            .call(
                Method::GET,
                &format!("/api/runtimes/{rt}/models/{id}"),
                &self.api,
                None,
            )
            .await;
        assert_eq!(done.json["status"], "completed");
    }
}

fn uuid_of_nothing() -> &'static str {
    "7d0c5a3e-1111-4222-8333-944455556666"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_is_503_quickly_and_the_same_process_recovers() {
    // The cluster checks it accepts connections with the synchronous client: off the runtime.
    let cluster = match tokio::task::spawn_blocking(Cluster::start).await.unwrap() {
        Ok(cluster) => Arc::new(cluster),
        Err(e) if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("REQUIRE_POSTGRES=1 but no PostgreSQL cluster of our own: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED postgres_stopped_is_503_quickly_and_the_same_process_recovers: {e}");
            return;
        }
    };
    let config = cluster.config();
    let store: Arc<dyn Storer> = tokio::task::spawn_blocking(move || {
        Arc::new(PostgresStore::open_with(config, Timeouts::default(), pg_options()).unwrap())
            as Arc<dyn Storer>
    })
    .await
    .unwrap();
    let w = World::new(store).await;
    assert_eq!(w.probes().await, (StatusCode::OK, StatusCode::OK));
    w.until_listener_up(true).await;

    let down = cluster.clone();
    tokio::task::spawn_blocking(move || down.stop())
        .await
        .unwrap()
        .unwrap();
    w.all_answer_503(w.writes()).await;
    w.all_answer_503(w.reads()).await;
    assert_eq!(
        w.probes().await,
        (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE)
    );
    // The wake-up listener's connection went with the server.
    w.until_listener_up(false).await;
    // The metrics still answer, and say what failed; once a sweep has failed to count, the
    // store's gauges are left out.
    w.count_as_a_sweep_does().await;
    let metrics = w.http.get_text(&w.url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let m = Scrape::parse(&metrics.text());
    assert!(!m.has("model_relay_requests"));
    assert!(m.value("model_relay_store_errors_total", &[("op", "ping")]) >= 1.0);

    let up = cluster.clone();
    tokio::task::spawn_blocking(move || up.start_again())
        .await
        .unwrap()
        .unwrap();
    w.until_ready().await;
    // It listens again, by itself (and re-checks every held call as it does).
    w.until_listener_up(true).await;
    w.finish_the_request().await;
    w.count_as_a_sweep_does().await;
    let metrics = w.http.get_text(&w.url("/metrics")).await;
    let m = Scrape::parse(&metrics.text());
    assert_eq!(
        m.value("model_relay_requests", &[("status", "completed")]),
        1.0
    );
    w.instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_lock_held_elsewhere_is_503_then_the_same_process_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let options = sqlite::Options {
        wait: WAIT,
        ..sqlite::Options::default()
    };
    let store = Arc::new(SqliteStore::open_with(&path, Timeouts::default(), options).unwrap());
    let w = World::new(store).await;

    // Another connection — as another process would — takes the write lock and keeps it.
    let (release, released) = mpsc::channel::<()>();
    let (locked, is_locked) = mpsc::channel::<()>();
    let locker = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        conn.execute_batch("ROLLBACK").unwrap();
    });
    is_locked.recv().unwrap();

    w.all_answer_503(w.writes()).await;
    assert_eq!(
        w.probes().await,
        (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE)
    );
    // In WAL mode readers never wait for the writer: reads still answer, truthfully.
    for (method, path, token, body) in w.reads() {
        let answer = w.call(method.clone(), &path, &token, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{method} {path}");
    }

    release.send(()).unwrap();
    locker.join().unwrap();
    w.until_ready().await;
    w.finish_the_request().await;
    w.instance.stop().await;
}

/// A server that answers but whose tables are locked by another session: each statement is
/// cancelled by the server after the store's wait (`statement_timeout`), so the routes
/// answer 503 instead of hanging; `/readyz` (the server answers) stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_locked_elsewhere_are_503_by_statement_timeout_then_recover() {
    let Some(schema) = support::postgres::fresh_schema("tables_locked_elsewhere") else {
        return;
    };
    let config = schema.config();
    let store: Arc<dyn Storer> = tokio::task::spawn_blocking(move || {
        Arc::new(PostgresStore::open_with(config, Timeouts::default(), pg_options()).unwrap())
            as Arc<dyn Storer>
    })
    .await
    .unwrap();
    let w = World::new(store).await;

    let (release, released) = mpsc::channel::<()>();
    let (locked, is_locked) = mpsc::channel::<()>();
    let config = schema.config();
    let locker = std::thread::spawn(move || {
        let mut client = config.connect(postgres::NoTls).unwrap();
        let mut tx = client.transaction().unwrap();
        tx.batch_execute("LOCK TABLE api_tokens, runtimes IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        tx.rollback().unwrap();
    });
    is_locked.recv().unwrap();

    w.all_answer_503(w.writes()).await;
    w.all_answer_503(w.reads()).await;
    assert_eq!(w.probes().await, (StatusCode::OK, StatusCode::OK));

    release.send(()).unwrap();
    locker.join().unwrap();
    w.finish_the_request().await;
    w.instance.stop().await;
    drop(schema);
}
