//! `GET /metrics` over the wire, and the sweeper seen through it: a real instance on an
//! SQLite file, a fake clock, the Prometheus text parsed back.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use model_relay::App;
use model_relay::clock::FakeClock;
use model_relay::config::Settings;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use model_relay::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use support::prom::Scrape;
use support::server::{Http, Instance, T0, clock, settings, workspace};

struct World {
    http: Http,
    clock: Arc<FakeClock>,
    instance: Instance,
    api: String,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new(settings: Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Storer> =
            Arc::new(SqliteStore::open(&dir.path().join("relay.db"), Timeouts::default()).unwrap());
        let (_, api) = workspace(store.as_ref(), T0);
        let clock = clock();
        let instance = Instance::start(store, clock.clone(), settings).await;
        World {
            http: Http::default(),
            clock,
            instance,
            api,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.instance.base)
    }

    /// A runtime whose daemon has heartbeated: (id, daemon token).
    async fn online_runtime(&self) -> (String, String) {
        let created = self
            .http
            .post(
                &self.url("/api/runtimes"),
                &self.api,
                json!({"name": "laptop", "provider": "claude"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        let rt = created.json["id"].as_str().unwrap().to_owned();
        let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
        self.heartbeat(&rt, &daemon).await;
        (rt, daemon)
    }

    async fn heartbeat(&self, rt: &str, daemon: &str) -> Value {
        let ack = self
            .http
            .post(
                &self.url("/api/daemon/heartbeat"),
                daemon,
                json!({"runtime_id": rt}),
            )
            .await;
        assert_eq!(ack.status, StatusCode::OK);
        ack.json
    }

    /// A request for the daemon, never an answer from the catalog.
    async fn create_request(&self, rt: &str) -> String {
        self.ask(rt, true).await["id"].as_str().unwrap().to_owned()
    }

    /// The page's "list the models": the record answered.
    async fn ask(&self, rt: &str, refresh: bool) -> Value {
        let created = self
            .http
            .post(
                &self.url(&format!("/api/runtimes/{rt}/models")),
                &self.api,
                json!({ "refresh": refresh }),
            )
            .await;
        assert_eq!(created.status, StatusCode::OK, "{}", created.json);
        created.json
    }

    async fn poll(&self, rt: &str, id: &str) -> support::server::Answer {
        self.http
            .get(
                &self.url(&format!("/api/runtimes/{rt}/models/{id}")),
                &self.api,
            )
            .await
    }

    /// The requests counted now, as the sweeper counts them after a sweep, then a scrape.
    async fn scrape(&self) -> (String, Scrape) {
        let app = Arc::clone(&self.instance.app);
        tokio::task::spawn_blocking(move || app.count_requests())
            .await
            .unwrap();
        self.scrape_as_is().await
    }

    /// A scrape, with whatever the sweeper last counted.
    async fn scrape_as_is(&self) -> (String, Scrape) {
        let answer = self.http.get_text(&self.url("/metrics")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.content_type.as_deref(),
            Some("text/plain; version=0.0.4")
        );
        let text = answer.text();
        let scrape = Scrape::parse(&text);
        (text, scrape)
    }

    /// Scrapes until `done` holds, for at most ten seconds.
    async fn scrape_until(&self, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, scrape) = self.scrape_as_is().await;
            if done(&scrape) {
                return scrape;
            }
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const MODELS: &str = "/api/runtimes/{runtimeId}/models";
const MODEL: &str = "/api/runtimes/{runtimeId}/models/{requestId}";
const HEARTBEAT: &str = "/api/daemon/heartbeat";
const RESULT: &str = "/api/daemon/runtimes/{runtimeId}/models/{requestId}/result";

#[tokio::test]
async fn metrics_show_every_family_labelled_by_route_template() {
    let w = World::new(settings()).await;
    let (rt, daemon) = w.online_runtime().await;

    // 1: claimed and completed.
    let done = w.create_request(&rt).await;
    assert_eq!(
        w.heartbeat(&rt, &daemon).await["pending_model_list"]["id"],
        done
    );
    let report = w
        .http
        .post(
            &w.url(&format!("/api/daemon/runtimes/{rt}/models/{done}/result")),
            &daemon,
            json!({"status": "completed", "models": [{"id": "m", "label": "M"}]}),
        )
        .await;
    assert_eq!(report.status, StatusCode::OK);
    // 2: never claimed; the heartbeat after its deadline ends it (pending phase).
    let unclaimed = w.create_request(&rt).await;
    w.clock.advance(Duration::from_secs(30));
    assert_eq!(w.heartbeat(&rt, &daemon).await, json!({"status": "ok"}));
    // 3: claimed, never reported; a poll after the lease ends it (running phase).
    let abandoned = w.create_request(&rt).await;
    w.heartbeat(&rt, &daemon).await;
    w.clock.advance(Duration::from_secs(60));
    assert_eq!(w.poll(&rt, &abandoned).await.json["status"], "timeout");
    // 4: pending for five seconds now. (The runtime went offline during the minute above.)
    w.heartbeat(&rt, &daemon).await;
    let waiting = w.create_request(&rt).await;
    w.clock.advance(Duration::from_secs(5));
    // Noise: a path that is no route, a method nobody uses.
    let nope = w
        .http
        .call(Method::GET, &w.url("/nope/123"), None, None)
        .await;
    assert_eq!(nope.status, StatusCode::NOT_FOUND);
    let brew = Method::from_bytes(b"BREW").unwrap();
    let odd = w.http.call(brew, &w.url("/healthz"), None, None).await;
    assert_eq!(odd.status, StatusCode::METHOD_NOT_ALLOWED);

    let (text, m) = w.scrape().await;
    for family in [
        ("model_relay_http_requests_total", "counter"),
        ("model_relay_http_request_duration_seconds", "histogram"),
        ("model_relay_store_operation_duration_seconds", "histogram"),
        ("model_relay_requests", "gauge"),
        ("model_relay_claims_total", "counter"),
        ("model_relay_timeouts_total", "counter"),
        ("model_relay_oldest_pending_age_seconds", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family.0).map(String::as_str),
            Some(family.1),
            "{family:?} in:\n{text}"
        );
    }

    // Route labels are templates: no id the calls carried appears anywhere.
    for id in [&rt, &done, &unclaimed, &abandoned, &waiting] {
        assert!(!text.contains(id.as_str()), "{id} in:\n{text}");
    }
    let answered = |route, method, status| {
        m.value(
            "model_relay_http_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert_eq!(answered(MODELS, "POST", "200"), 4.0);
    assert_eq!(answered(HEARTBEAT, "POST", "200"), 5.0);
    assert_eq!(answered(RESULT, "POST", "200"), 1.0);
    assert_eq!(answered(MODEL, "GET", "200"), 1.0);
    assert_eq!(answered("/api/runtimes", "POST", "201"), 1.0);
    assert_eq!(answered("unmatched", "GET", "404"), 1.0);
    assert_eq!(answered("/healthz", "other", "405"), 1.0);
    let timed = |route| {
        m.value(
            "model_relay_http_request_duration_seconds_count",
            &[("route", route)],
        )
    };
    assert_eq!(timed(HEARTBEAT), 5.0);
    assert_eq!(timed(MODELS), 4.0);

    let store_calls = |op| {
        m.value(
            "model_relay_store_operation_duration_seconds_count",
            &[("op", op)],
        )
    };
    assert_eq!(
        store_calls("claim_next_pending"),
        3.0,
        "one per heartbeat that found a request pending"
    );
    assert_eq!(store_calls("create_or_coalesce"), 4.0);
    assert_eq!(
        store_calls("daemon_by_token"),
        6.0,
        "heartbeats and the report"
    );
    assert!(
        !m.has("model_relay_store_errors_total"),
        "no store call failed"
    );

    let rows = |status| m.value("model_relay_requests", &[("status", status)]);
    assert_eq!(
        [
            rows("pending"),
            rows("running"),
            rows("completed"),
            rows("failed"),
            rows("timeout")
        ],
        [1.0, 0.0, 1.0, 0.0, 2.0]
    );
    assert_eq!(
        m.value("model_relay_claims_total", &[("kind", "models")]),
        2.0
    );
    let timeouts = |phase| {
        m.value(
            "model_relay_timeouts_total",
            &[("phase", phase), ("kind", "models")],
        )
    };
    assert_eq!((timeouts("pending"), timeouts("running")), (1.0, 1.0));
    assert_eq!(m.value("model_relay_oldest_pending_age_seconds", &[]), 5.0);

    w.instance.stop().await;
}

#[tokio::test]
async fn answers_from_the_catalog_and_background_refreshes_are_counted() {
    let w = World::new(settings()).await;
    let (rt, daemon) = w.online_runtime().await;
    let id = w.create_request(&rt).await;
    w.heartbeat(&rt, &daemon).await;
    let report = w
        .http
        .post(
            &w.url(&format!("/api/daemon/runtimes/{rt}/models/{id}/result")),
            &daemon,
            json!({"status": "completed", "models": [{"id": "m", "label": "M"}]}),
        )
        .await;
    assert_eq!(report.status, StatusCode::OK);

    assert_eq!(w.ask(&rt, false).await["cached"], true);
    w.clock.advance(Duration::from_secs(61));
    w.heartbeat(&rt, &daemon).await;
    let stale = w.ask(&rt, false).await;
    assert!(stale["refresh_id"].is_string(), "{stale}");
    // The discovery it started is still pending: served stale again, nothing new started.
    let again = w.ask(&rt, false).await;
    assert_eq!(again["refresh_id"], stale["refresh_id"]);

    let (text, m) = w.scrape().await;
    let answers = |freshness| {
        m.value(
            "model_relay_catalog_answers_total",
            &[("freshness", freshness)],
        )
    };
    assert_eq!((answers("fresh"), answers("stale")), (1.0, 2.0), "{text}");
    assert_eq!(m.value("model_relay_catalog_refreshes_total", &[]), 1.0);
    w.instance.stop().await;
}

/// Gauges are what the sweeper last counted, served from memory: a flood of scrapes costs
/// the store nothing, and a change shows once the sweeper has counted again.
#[tokio::test]
async fn scrapes_never_reach_the_store_and_the_sweeper_counts_the_gauges() {
    let w = World::new(settings()).await;
    let count_calls = |m: &Scrape| {
        m.matching(
            "model_relay_store_operation_duration_seconds_count",
            &[("op", "count_requests")],
        )
        .next()
        .map_or(0.0, |sample| sample.value)
    };
    // The sweeper's first pass, at start, counts once.
    let first = w
        .scrape_until("the first sweep has counted", |m| {
            count_calls(m) == 1.0 && m.has("model_relay_requests")
        })
        .await;
    assert_eq!(
        first.value("model_relay_requests", &[("status", "pending")]),
        0.0
    );
    let (rt, _daemon) = w.online_runtime().await;
    w.create_request(&rt).await;
    for _ in 0..20 {
        let (_, m) = w.scrape_as_is().await;
        assert_eq!(count_calls(&m), 1.0, "a scrape counted in the store");
        assert_eq!(
            m.value("model_relay_requests", &[("status", "pending")]),
            0.0
        );
    }
    let (_, m) = w.scrape().await;
    assert_eq!(
        m.value("model_relay_requests", &[("status", "pending")]),
        1.0
    );
    w.instance.stop().await;
}

#[tokio::test]
async fn a_metrics_token_is_required_when_one_is_set() {
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
    let app = App::new(store, clock(), settings()).with_metrics_token(Some("s3cret".into()));
    let instance = Instance::start_app(app).await;
    let http = Http::default();
    let url = format!("{}/metrics", instance.base);
    let with = |token: Option<&'static str>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let answer = http.try_raw(Method::GET, &url, token, None).await;
            answer.unwrap().status
        }
    };
    assert_eq!(with(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(with(Some("s3cre")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(with(Some("s3cret!")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(with(Some("s3cret")).await, StatusCode::OK);
    instance.stop().await;
}

/// `--metrics-listen`: `/metrics` on its own address, and only there.
#[test]
fn metrics_listen_serves_metrics_apart_from_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (serve, metrics_at) = serve_with_metrics_listener(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = Http::default();
        let api = http.get_text(&format!("{}/metrics", serve.base)).await;
        assert_eq!(api.status, StatusCode::NOT_FOUND);
        let apart = http.get_text(&format!("http://{metrics_at}/metrics")).await;
        assert_eq!(apart.status, StatusCode::OK);
        assert!(apart.text().contains("model_relay_http_requests_total"));
        let other = http.get_text(&format!("http://{metrics_at}/healthz")).await;
        assert_eq!(other.status, StatusCode::NOT_FOUND);
        let healthz = http.get_text(&format!("{}/healthz", serve.base)).await;
        assert_eq!(healthz.status, StatusCode::OK);
    });
    serve.terminate();
}

/// A `serve` with `--metrics-listen` on a free port, and that port's address.
fn serve_with_metrics_listener(dir: &tempfile::TempDir) -> (support::process::Serve, String) {
    let database = format!("sqlite:{}", dir.path().join("relay.db").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_at = format!("127.0.0.1:{port}");
    let serve = support::process::Serve::start(&database, &["--metrics-listen", &metrics_at]);
    (serve, metrics_at)
}

/// One scrape on a connection of its own, by hand: the status line, or the error.
fn scrape_raw(at: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(at)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

/// Every slot of the metrics listener held by a socket that sends nothing: the scrape
/// that comes next takes the slot of one of them instead of being closed at once (which
/// is what it got while they waited out their header timeout).
#[test]
fn a_metrics_listener_full_of_idle_sockets_still_answers_a_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let (serve, metrics_at) = serve_with_metrics_listener(&dir);
    assert_eq!(scrape_raw(&metrics_at).unwrap(), "HTTP/1.1 200 OK");
    let idle: Vec<_> = (0..64)
        .map(|_| std::net::TcpStream::connect(&metrics_at).unwrap())
        .collect();
    for _ in 0..3 {
        assert_eq!(
            scrape_raw(&metrics_at).unwrap(),
            "HTTP/1.1 200 OK",
            "a scrape past 64 idle sockets"
        );
    }
    drop(idle);
    serve.terminate();
}

/// A socket that opens and sends nothing is closed by the metrics listener within its
/// short header timeout (2 s), not the API's read timeout (30 s here).
#[test]
fn the_metrics_listener_closes_a_silent_socket_within_seconds() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (serve, metrics_at) = serve_with_metrics_listener(&dir);
    let mut silent = std::net::TcpStream::connect(&metrics_at).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 64];
    let read = silent.read(&mut buf);
    assert!(
        matches!(read, Ok(0)),
        "closed by the server, not left open: {read:?}"
    );
    serve.terminate();
}

/// Nobody polls: the sweeper alone ends the request at its deadline, and deletes it once
/// retention has passed. `/metrics` only counts; it expires nothing.
#[tokio::test]
async fn the_sweeper_expires_and_then_deletes_a_request_nobody_polls() {
    let w = World::new(Settings {
        sweep_every: Duration::from_millis(10),
        ..settings()
    })
    .await;
    let (rt, _daemon) = w.online_runtime().await;
    let id = w.create_request(&rt).await;
    let (_, m) = w.scrape().await;
    assert_eq!(
        m.value("model_relay_requests", &[("status", "pending")]),
        1.0
    );

    w.clock.advance(Duration::from_secs(30));
    let m = w
        .scrape_until("the sweeper ends the request", |m| {
            m.value("model_relay_requests", &[("status", "timeout")]) == 1.0
        })
        .await;
    assert_eq!(
        m.value("model_relay_requests", &[("status", "pending")]),
        0.0
    );
    assert_eq!(
        m.value(
            "model_relay_timeouts_total",
            &[("phase", "pending"), ("kind", "models")]
        ),
        1.0
    );
    let ended = w.poll(&rt, &id).await;
    assert_eq!(ended.status, StatusCode::OK);
    assert_eq!(ended.json["status"], "timeout");
    assert_eq!(
        ended.json["error"],
        "daemon did not respond within 30 seconds"
    );
    assert_eq!(
        ended.json["updated_at"], "2026-05-01T09:19:51.000Z",
        "it ended at its deadline"
    );

    // Retention (10 minutes) counts from the deadline. At exactly that moment it is still
    // there, after a whole sweep that began after the clock moved.
    w.clock.advance(Duration::from_secs(600));
    let sweeps = |m: &Scrape| {
        m.value(
            "model_relay_store_operation_duration_seconds_count",
            &[("op", "delete_ended_before")],
        )
    };
    let (_, m) = w.scrape().await;
    let before = sweeps(&m);
    let m = w
        .scrape_until("a sweep after the clock moved", |m| {
            sweeps(m) >= before + 2.0
        })
        .await;
    assert_eq!(
        m.value("model_relay_requests", &[("status", "timeout")]),
        1.0
    );
    assert_eq!(w.poll(&rt, &id).await.status, StatusCode::OK);
    w.clock.advance(Duration::from_millis(1));
    w.scrape_until("the sweeper deletes the request", |m| {
        m.value("model_relay_requests", &[("status", "timeout")]) == 0.0
    })
    .await;
    assert_eq!(w.poll(&rt, &id).await.status, StatusCode::NOT_FOUND);
    w.instance.stop().await;
}
