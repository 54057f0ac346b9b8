//! Waiting calls over the wire (DESIGN.md "Waiting calls"): held heartbeats, waiting reads,
//! and the wake-ups that cross instances. Each rule runs on two instances over one store of
//! every engine — memory (one process), SQLite (two handles on one file), PostgreSQL (two
//! handles on one schema) — so a change on one instance must wake a call held on the other.
//!
//! No test measures time. A call that should be woken but is not runs into the test
//! client's 10 s limit and fails; waits in these tests are kept well under that.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use model_relay::clock::FakeClock;
use model_relay::config::Settings;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use serde_json::{Value, json};
use support::engines::{Engine, PgBouncer, engine_tests};
use support::prom::Scrape;
use support::server::{Http, Instance, T0, clock, settings, workspace};

/// Settings where only a notification can wake a held call: the re-check is an hour
/// apart. Waits are held up to 8 s, under the client's 10 s.
fn notified_only() -> Settings {
    Settings {
        max_wait: Duration::from_secs(8),
        recheck_every: Duration::from_secs(3600),
        ..settings()
    }
}

/// Two instances over one store, a workspace and an online runtime.
struct Pair {
    http: Http,
    a: Instance,
    b: Instance,
    api: String,
    rt: String,
    daemon: String,
}

impl Pair {
    /// Two instances, each with a handle of its own on `engine`'s database.
    async fn start(engine: &dyn Engine, settings: Settings) -> Pair {
        // Outside the runtime: the PostgreSQL client blocks on a runtime of its own.
        let (a, b) = tokio::task::block_in_place(|| (engine.open(), engine.open()));
        Self::start_with(a, b, clock(), settings).await
    }

    async fn start_with(
        store_a: Arc<dyn Storer>,
        store_b: Arc<dyn Storer>,
        clock: Arc<FakeClock>,
        settings: Settings,
    ) -> Pair {
        let listens = settings.listen && store_a.listens() && store_b.listens();
        let (store_a, api) = tokio::task::spawn_blocking(move || {
            let (_, api) = workspace(store_a.as_ref(), T0);
            (store_a, api)
        })
        .await
        .unwrap();
        let a = Instance::start(store_a, clock.clone(), settings).await;
        let b = Instance::start(store_b, clock, settings).await;
        let http = Http::default();
        let created = http
            .post(
                &format!("{}/api/runtimes", a.base),
                &api,
                json!({"name": "laptop", "provider": "claude"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        let rt = created.json["id"].as_str().unwrap().to_owned();
        let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
        if listens {
            // Changes made before an instance listens are not notified (its first re-check
            // covers them): wait until both listen, so that only notifications can wake.
            for on in [&a, &b] {
                for _ in 0..1000 {
                    if scrape(&http, on)
                        .await
                        .value("model_relay_listener_up", &[])
                        == 1.0
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let pair = Pair {
            http,
            a,
            b,
            api,
            rt,
            daemon,
        };
        assert_eq!(pair.heartbeat(&pair.a, json!({})).await.0, StatusCode::OK);
        pair
    }

    async fn heartbeat(&self, on: &Instance, extra: Value) -> (StatusCode, Value) {
        let mut body = json!({"runtime_id": self.rt});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let answer = self
            .http
            .post(
                &format!("{}/api/daemon/heartbeat", on.base),
                &self.daemon,
                body,
            )
            .await;
        (answer.status, answer.json)
    }

    async fn create(&self, on: &Instance) -> String {
        let answer = self
            .http
            .post_empty(
                &format!("{}/api/runtimes/{}/models", on.base, self.rt),
                &self.api,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        answer.json["id"].as_str().unwrap().to_owned()
    }

    async fn read(&self, on: &Instance, id: &str, query: &str) -> (StatusCode, Value) {
        let answer = self
            .http
            .get(
                &format!("{}/api/runtimes/{}/models/{id}{query}", on.base, self.rt),
                &self.api,
            )
            .await;
        (answer.status, answer.json)
    }

    async fn report(&self, on: &Instance, id: &str, body: Value) -> StatusCode {
        self.http
            .post(
                &format!(
                    "{}/api/daemon/runtimes/{}/models/{id}/result",
                    on.base, self.rt
                ),
                &self.daemon,
                body,
            )
            .await
            .status
    }

    /// Waits until `on` holds `n` calls of `kind` (its metrics say so).
    async fn until_held(&self, on: &Instance, kind: &str, n: f64) {
        for _ in 0..500 {
            if held(&self.http, on, kind).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never held {n} {kind} calls", on.base);
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

async fn scrape(http: &Http, on: &Instance) -> Scrape {
    Scrape::parse(&http.get_text(&format!("{}/metrics", on.base)).await.text())
}

async fn held(http: &Http, on: &Instance, kind: &str) -> f64 {
    scrape(http, on)
        .await
        .value("model_relay_held_calls", &[("kind", kind)])
}

// ---- the rules, each for every engine ----

async fn a_create_on_one_instance_wakes_a_heartbeat_held_on_another(engine: &dyn Engine) {
    let pair = Pair::start(engine, notified_only()).await;
    let held = async { pair.heartbeat(&pair.a, json!({"wait_ms": 8000})).await };
    let create = async {
        pair.until_held(&pair.a, "heartbeat", 1.0).await;
        pair.create(&pair.b).await
    };
    let ((status, ack), id) = tokio::join!(held, create);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ack["pending_model_list"]["id"], id.as_str(), "{ack}");
    let (_, record) = pair.read(&pair.b, &id, "").await;
    assert_eq!(record["status"], "running");
    pair.stop().await;
}

async fn a_claim_and_a_report_on_one_instance_wake_a_read_waiting_on_another(engine: &dyn Engine) {
    let pair = Pair::start(engine, notified_only()).await;
    let id = pair.create(&pair.a).await;
    let query = "?wait_ms=8000";
    let read = async { pair.read(&pair.b, &id, query).await };
    let claim = async {
        pair.until_held(&pair.b, "read", 1.0).await;
        pair.heartbeat(&pair.a, json!({})).await
    };
    let ((status, record), (_, ack)) = tokio::join!(read, claim);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ack["pending_model_list"]["id"], id.as_str());
    assert_eq!(record["status"], "running", "woken by the claim: {record}");

    let read = async { pair.read(&pair.b, &id, query).await };
    let report = async {
        pair.until_held(&pair.b, "read", 1.0).await;
        pair.report(
            &pair.a,
            &id,
            json!({"status": "completed", "models": [{"id": "m", "label": "M"}]}),
        )
        .await
    };
    let ((_, record), reported) = tokio::join!(read, report);
    assert_eq!(reported, StatusCode::OK);
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(
        record["models"][0]["id"], "m",
        "the state it was woken by, or newer"
    );
    // A read whose wait ran out would show the same records: B made no write and its
    // re-check is an hour away, so only notifications can have answered it.
    let woken = scrape(&pair.http, &pair.b)
        .await
        .value("model_relay_wakeups_total", &[("source", "notification")]);
    assert!(woken >= 2.0, "woken {woken} times by notifications");
    pair.stop().await;
}

/// A held heartbeat tries a claim only when a request is pending: one claim for the one
/// request, none while it waits. (On PostgreSQL a read and the write that may follow go to
/// the blocking pool in one trip, so the write step must check the read's answer again.)
async fn a_held_heartbeat_tries_no_claim_while_nothing_is_pending(engine: &dyn Engine) {
    let pair = Pair::start(engine, notified_only()).await;
    // The series appears with the first claim: none yet is zero.
    let claims = |scrape: &Scrape| -> f64 {
        scrape
            .matching(
                "model_relay_store_operation_duration_seconds_count",
                &[("op", "claim_next_pending")],
            )
            .map(|s| s.value)
            .sum()
    };
    let before = claims(&scrape(&pair.http, &pair.a).await);
    let held = async { pair.heartbeat(&pair.a, json!({"wait_ms": 8000})).await };
    let create = async {
        pair.until_held(&pair.a, "heartbeat", 1.0).await;
        let parked = claims(&scrape(&pair.http, &pair.a).await);
        (parked, pair.create(&pair.b).await)
    };
    let ((_, ack), (parked, id)) = tokio::join!(held, create);
    assert_eq!(ack["pending_model_list"]["id"], id.as_str());
    assert_eq!(parked, before, "no claim before anything was pending");
    let after = claims(&scrape(&pair.http, &pair.a).await);
    assert_eq!(after, before + 1.0, "one claim for the one request");
    pair.stop().await;
}

/// Settings where no notification reaches another instance (no listener), and the
/// re-check runs every 200 ms: what a deployment behind a transaction-pooling proxy has.
fn recheck_only() -> Settings {
    Settings {
        max_wait: Duration::from_secs(8),
        recheck_every: Duration::from_millis(200),
        listen: false,
        ..settings()
    }
}

async fn with_every_notification_lost_the_recheck_wakes_a_heartbeat_held_on_another_instance(
    engine: &dyn Engine,
) {
    let pair = Pair::start(engine, recheck_only()).await;
    the_recheck_wakes_a_heartbeat_held_on_a(&pair).await;
    pair.stop().await;
}

/// A heartbeat held on `a`, a create on `b`: the heartbeat answers with the request, and
/// `a`'s re-check woke it. Returns `a`'s metrics.
async fn the_recheck_wakes_a_heartbeat_held_on_a(pair: &Pair) -> Scrape {
    let held = async { pair.heartbeat(&pair.a, json!({"wait_ms": 8000})).await };
    let create = async {
        pair.until_held(&pair.a, "heartbeat", 1.0).await;
        pair.create(&pair.b).await
    };
    let ((_, ack), id) = tokio::join!(held, create);
    assert_eq!(ack["pending_model_list"]["id"], id.as_str(), "{ack}");
    let woken = scrape(&pair.http, &pair.a).await;
    assert!(woken.value("model_relay_wakeups_total", &[("source", "recheck")]) >= 1.0);
    woken
}

/// Behind a transaction pooler (`pool_mode=transaction`) an instance does not listen, even
/// with listening on: a `LISTEN` would sit on a server session the proxy lends to others.
/// A create on one instance still wakes a heartbeat held on another, by the re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_the_recheck_wakes_a_heartbeat_held_on_another_instance() {
    let Some(engine) = PgBouncer::new("pooler_recheck_wakes", Timeouts::default()) else {
        return;
    };
    let settings = Settings {
        listen: true,
        ..recheck_only()
    };
    let pair = Pair::start(&engine, settings).await;
    let woken = the_recheck_wakes_a_heartbeat_held_on_a(&pair).await;
    assert_eq!(woken.value("model_relay_listener_up", &[]), 0.0);
    pair.stop().await;
}

engine_tests!(
    async Timeouts::default();
    a_create_on_one_instance_wakes_a_heartbeat_held_on_another,
    a_claim_and_a_report_on_one_instance_wake_a_read_waiting_on_another,
    a_held_heartbeat_tries_no_claim_while_nothing_is_pending,
    with_every_notification_lost_the_recheck_wakes_a_heartbeat_held_on_another_instance,
);

// ---- rules of one instance (memory) ----

/// Holds of up to a minute, longer than the test client waits (10 s): a call that is not
/// answered at once, or woken, fails the test.
fn long_holds() -> Settings {
    Settings {
        max_wait: Duration::from_secs(60),
        offline_after: Duration::from_secs(3600),
        ..settings()
    }
}

async fn one_instance(settings: Settings) -> Pair {
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
    Pair::start_with(store.clone(), store, clock(), settings).await
}

#[tokio::test]
async fn wait_ms_past_max_wait_is_clamped() {
    let pair = one_instance(Settings {
        max_wait: Duration::from_millis(300),
        ..settings()
    })
    .await;
    // An hour asked for; the client gives up after 10 s, so only a clamped hold answers.
    let (status, ack) = pair.heartbeat(&pair.a, json!({"wait_ms": 3_600_000})).await;
    assert_eq!((status, ack), (StatusCode::OK, json!({"status": "ok"})));
    let id = pair.create(&pair.a).await;
    pair.heartbeat(&pair.a, json!({})).await;
    let (status, record) = pair.read(&pair.a, &id, "?wait_ms=3600000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        record["status"], "running",
        "answered unchanged when the wait ended"
    );
    pair.stop().await;
}

#[tokio::test]
async fn a_held_heartbeat_ends_before_its_runtime_could_go_offline() {
    // --max-wait allows 25 s, but the runtime goes offline 2 s after its last heartbeat:
    // the hold stops short of that, so the daemon heartbeats again in time.
    let pair = one_instance(Settings {
        max_wait: Duration::from_secs(25),
        offline_after: Duration::from_secs(2),
        ..settings()
    })
    .await;
    let (status, _) = pair.heartbeat(&pair.a, json!({"wait_ms": 25_000})).await;
    assert_eq!(status, StatusCode::OK);
    pair.stop().await;
}

#[tokio::test]
async fn bad_wait_ms_is_400_with_a_message() {
    let pair = one_instance(settings()).await;
    for bad in [json!(-1), json!(1.5), json!("5"), json!(true)] {
        let (status, body) = pair.heartbeat(&pair.a, json!({"wait_ms": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            body["error"].as_str().unwrap().contains("wait_ms"),
            "{body}"
        );
    }
    let id = pair.create(&pair.a).await;
    for bad in ["?wait_ms=-1", "?wait_ms=abc", "?wait_ms=", "?wait_ms=1.5"] {
        let (status, body) = pair.read(&pair.a, &id, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            body["error"].as_str().unwrap().contains("wait_ms"),
            "{body}"
        );
    }
    pair.stop().await;
}

#[tokio::test]
async fn a_read_of_an_ended_request_answers_at_once_whatever_it_waits() {
    let pair = one_instance(long_holds()).await;
    let id = pair.create(&pair.a).await;
    pair.heartbeat(&pair.a, json!({})).await;
    let failed = json!({"status": "failed", "error": "boom"});
    assert_eq!(pair.report(&pair.a, &id, failed).await, StatusCode::OK);
    let (status, record) = pair.read(&pair.a, &id, "?wait_ms=60000").await;
    assert_eq!(
        (status, &record["status"]),
        (StatusCode::OK, &json!("failed"))
    );
    pair.stop().await;
}

#[tokio::test]
async fn calls_without_wait_ms_answer_at_once_as_in_v1() {
    let pair = one_instance(long_holds()).await;
    // Each would hold for a minute if it waited; the client gives up after 10 s.
    assert_eq!(
        pair.heartbeat(&pair.a, json!({})).await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let id = pair.create(&pair.a).await;
    let (_, record) = pair.read(&pair.a, &id, "").await;
    assert_eq!(record["status"], "pending");
    let (_, record) = pair.read(&pair.a, &id, "?wait_ms=0").await;
    assert_eq!(record["status"], "pending");
    pair.stop().await;
}

#[tokio::test]
async fn shutdown_answers_held_calls_at_once() {
    let pair = one_instance(Settings {
        drain_timeout: Duration::from_secs(60),
        ..long_holds()
    })
    .await;
    let Pair {
        http,
        mut a,
        b,
        api,
        rt,
        daemon,
    } = pair;
    let beat_url = format!("{}/api/daemon/heartbeat", a.base);
    let heartbeat = http.post(
        &beat_url,
        &daemon,
        json!({"runtime_id": rt, "wait_ms": 60_000}),
    );
    let other = Http::default();
    let created = other
        .post_empty(&format!("{}/api/runtimes/{rt}/models", b.base), &api)
        .await;
    let id = created.json["id"].as_str().unwrap().to_owned();
    // Claimed, so that the read below waits on a running request.
    let claimed = other
        .post(
            &format!("{}/api/daemon/heartbeat", b.base),
            &daemon,
            json!({"runtime_id": rt}),
        )
        .await;
    assert_eq!(claimed.json["pending_model_list"]["id"], id.as_str());
    let read_url = format!("{}/api/runtimes/{rt}/models/{id}?wait_ms=60000", a.base);
    let read = other.call(Method::GET, &read_url, Some(&api), None);
    let stop = async {
        for _ in 0..500 {
            let scrape = scrape(&Http::default(), &a).await;
            if scrape.value("model_relay_held_calls", &[("kind", "heartbeat")]) == 1.0
                && scrape.value("model_relay_held_calls", &[("kind", "read")]) == 1.0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.signal_stop();
    };
    let (beat, record, ()) = tokio::join!(heartbeat, read, stop);
    assert_eq!(
        (beat.status, beat.json),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    assert_eq!(record.status, StatusCode::OK);
    assert_eq!(record.json["status"], "running");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_lost_hand_out_is_offered_again_through_working_on() {
    let pair = one_instance(settings()).await;
    let id = pair.create(&pair.a).await;
    let (_, ack) = pair.heartbeat(&pair.a, json!({})).await;
    assert_eq!(ack["pending_model_list"]["id"], id.as_str());
    // The daemon never saw that answer; its next heartbeat says it holds nothing.
    assert_eq!(
        pair.heartbeat(&pair.a, json!({})).await.1,
        json!({"status": "ok"}),
        "without working_on, nothing is handed out twice"
    );
    let (_, again) = pair.heartbeat(&pair.b, json!({"working_on": []})).await;
    assert_eq!(again["pending_model_list"]["id"], id.as_str(), "{again}");
    let (_, held) = pair.heartbeat(&pair.a, json!({"working_on": [id]})).await;
    assert_eq!(held, json!({"status": "ok"}), "the daemon holds it now");
    assert_eq!(
        pair.report(&pair.a, &id, json!({"status": "running"}))
            .await,
        StatusCode::OK
    );
    let (_, renewed) = pair.heartbeat(&pair.a, json!({"working_on": []})).await;
    assert_eq!(renewed, json!({"status": "ok"}), "renewed: it was not lost");
    pair.stop().await;
}

#[tokio::test]
async fn metrics_count_held_calls_and_wakeups_by_source() {
    // No listener and no re-check: only the create's own wake-up can answer the heartbeat.
    let pair = one_instance(Settings {
        max_wait: Duration::from_secs(8),
        recheck_every: Duration::from_secs(3600),
        listen: false,
        ..settings()
    })
    .await;
    let held = async { pair.heartbeat(&pair.a, json!({"wait_ms": 8000})).await };
    let create = async {
        pair.until_held(&pair.a, "heartbeat", 1.0).await;
        // On the same instance: the create wakes the heartbeat itself.
        pair.create(&pair.a).await
    };
    let ((_, ack), id) = tokio::join!(held, create);
    assert_eq!(ack["pending_model_list"]["id"], id.as_str());
    let metrics = scrape(&pair.http, &pair.a).await;
    assert_eq!(
        metrics.value("model_relay_held_calls", &[("kind", "heartbeat")]),
        0.0
    );
    let woken = |source| metrics.value("model_relay_wakeups_total", &[("source", source)]);
    assert_eq!(
        (woken("local"), woken("notification"), woken("recheck")),
        (1.0, 0.0, 0.0)
    );
    pair.stop().await;
}

#[tokio::test]
async fn past_max_waiting_a_waiting_call_is_503_and_an_ordinary_one_is_served() {
    let pair = one_instance(Settings {
        max_waiting: 1,
        ..long_holds()
    })
    .await;
    let id = pair.create(&pair.a).await;
    let url = format!(
        "{}/api/runtimes/{}/models/{id}?wait_ms=60000",
        pair.a.base, pair.rt
    );
    let (http, api) = (pair.http.clone(), pair.api.clone());
    let first = tokio::spawn(async move { http.get(&url, &api).await });
    pair.until_held(&pair.a, "read", 1.0).await;
    let over = pair.read(&pair.a, &id, "?wait_ms=60000").await;
    assert_eq!(
        over,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many waiting calls"})
        )
    );
    let plain = pair.read(&pair.a, &id, "").await;
    assert_eq!(plain.0, StatusCode::OK, "ordinary calls are not capped");
    pair.stop().await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "answered at shutdown");
}
