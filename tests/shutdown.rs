//! Graceful shutdown over the wire: requests in flight when shutdown begins are answered
//! in full, new connections are refused, and a request that outlasts the drain bound does
//! not keep the server from stopping.
//!
//! Requests are held in flight deterministically: a handler that goes to the blocking pool
//! reads the clock inside its store call there, and this clock blocks while its gate is
//! closed. (Heartbeats and polls read it on the async worker first, where blocking would
//! stall the server itself, so the calls held are lists and creates.)
//!
//! Each instance runs on a runtime of its own that is torn down as soon as `run` returns,
//! as `model-relay serve` does: a request that `run` did not wait for is cut off, so a
//! shutdown that did not drain would fail these tests.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use model_relay::clock::{Clock, FakeClock};
use model_relay::config::Settings;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use model_relay::{App, run};
use serde_json::json;
use support::prom::Scrape;
use support::server::{Http, T0, settings, workspace};
use tokio::sync::oneshot;

/// A server on a runtime of its own, on a thread of its own.
struct Instance {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

impl Instance {
    fn start(app: App) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let served = runtime.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                run(listener, Arc::new(app), async {
                    let _ = stopped.await;
                })
                .await
            });
            // Every task still running — a connection `run` gave up on — is dropped now.
            runtime.shutdown_background();
            served
        });
        Instance {
            base,
            stop: Some(stop),
            served,
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    fn has_stopped(&self) -> bool {
        self.served.is_finished()
    }

    async fn stop(mut self) {
        self.signal_stop();
        let served = tokio::task::spawn_blocking(move || self.served.join())
            .await
            .unwrap();
        served.unwrap().unwrap();
    }
}

/// A fake clock that, while closed, holds every caller until it opens.
struct GatedClock {
    time: FakeClock,
    closed: Mutex<bool>,
    opened: Condvar,
    /// Callers that found the gate closed.
    held: AtomicUsize,
}

impl GatedClock {
    fn new() -> Self {
        GatedClock {
            time: FakeClock::new(T0),
            closed: Mutex::new(false),
            opened: Condvar::new(),
            held: AtomicUsize::new(0),
        }
    }

    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }
}

impl Clock for GatedClock {
    fn now(&self) -> i64 {
        let mut closed = self.closed.lock().unwrap();
        if *closed {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
        }
        self.time.now()
    }
}

/// Polls `condition` until it holds, for at most ten seconds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct World {
    http: Http,
    clock: Arc<GatedClock>,
    instance: Instance,
    api: String,
    rt: String,
    daemon: String,
}

impl World {
    async fn new(settings: Settings) -> Self {
        let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Timeouts::default()));
        let (_, api) = workspace(store.as_ref(), T0);
        let clock = Arc::new(GatedClock::new());
        let app = App::new(store, clock.clone(), settings);
        let metrics = Arc::clone(&app.metrics);
        let instance = Instance::start(app);
        // The sweeper's first pass, at start, reads the clock too: let it finish before a
        // test closes the gate, or it would be one more caller held.
        eventually("the first sweep has run", || {
            let text = metrics.render(T0).unwrap();
            Scrape::parse(&text)
                .matching(
                    "model_relay_store_operation_duration_seconds_count",
                    &[("op", "expire_overdue")],
                )
                .any(|sample| sample.value >= 1.0)
        })
        .await;
        let http = Http::default();
        let created = http
            .post(
                &format!("{}/api/runtimes", instance.base),
                &api,
                json!({"name": "n", "provider": "p"}),
            )
            .await;
        let rt = created.json["id"].as_str().unwrap().to_owned();
        let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
        World {
            http,
            clock,
            instance,
            api,
            rt,
            daemon,
        }
    }

    /// The `i`-th call of a mixed load: list, heartbeat, create, poll of the active request.
    fn call(&self, i: usize) -> impl Future<Output = Result<StatusCode, String>> + use<> {
        let base = self.instance.base.clone();
        let (http, api, rt, daemon) = (
            self.http.clone(),
            self.api.clone(),
            self.rt.clone(),
            self.daemon.clone(),
        );
        async move {
            let (method, path, token, body) = match i % 3 {
                0 => (Method::GET, "/api/runtimes".to_owned(), api, None),
                1 => (
                    Method::POST,
                    "/api/daemon/heartbeat".to_owned(),
                    daemon,
                    Some(json!({"runtime_id": rt}).to_string().into_bytes()),
                ),
                _ => (
                    Method::POST,
                    format!("/api/runtimes/{rt}/models"),
                    api,
                    None,
                ),
            };
            let answer = http
                .try_raw(method, &format!("{base}{path}"), Some(&token), body)
                .await?;
            serde_json::from_slice::<serde_json::Value>(&answer.body)
                .map_err(|e| format!("{}: incomplete body: {e}", answer.status))?;
            Ok(answer.status)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_in_flight_requests_under_load_with_no_failed_responses() {
    let mut w = World::new(settings()).await;
    // The runtime is online for the creates.
    assert_eq!(w.call(1).await, Ok(StatusCode::OK));

    // Load: 16 clients, 30 calls each, all answered 200.
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let calls: Vec<_> = (0..30).map(|i| w.call(c + i)).collect();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for call in calls {
                    answers.push(call.await);
                }
                answers
            })
        })
        .collect();
    for client in clients {
        for answer in client.await.unwrap() {
            assert_eq!(answer, Ok(StatusCode::OK));
        }
    }

    // 48 calls in flight, lists and creates, held inside their store call.
    w.clock.close();
    let in_flight: Vec<_> = (0..48)
        .map(|i| tokio::spawn(w.call(if i % 2 == 0 { 0 } else { 2 })))
        .collect();
    eventually("every call is inside its store call", || {
        w.clock.held.load(Ordering::SeqCst) == in_flight.len()
    })
    .await;

    w.instance.signal_stop();
    let addr = w.instance.base.trim_start_matches("http://").to_owned();
    let refused = || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused().await {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        in_flight.iter().all(|call| !call.is_finished()),
        "shutdown began with every call still in flight"
    );
    assert!(!w.instance.has_stopped(), "run waits for them");

    w.clock.open();
    for call in in_flight {
        assert_eq!(call.await.unwrap(), Ok(StatusCode::OK), "answered in full");
    }
    w.instance.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_for_a_request_past_the_drain_bound() {
    let mut w = World::new(Settings {
        drain_timeout: Duration::from_millis(200),
        ..settings()
    })
    .await;
    w.clock.close();
    let stuck = tokio::spawn(w.call(0));
    eventually("the call is inside its store call", || {
        w.clock.held.load(Ordering::SeqCst) == 1
    })
    .await;
    w.instance.signal_stop();
    eventually("run returns although the call is stuck", || {
        w.instance.has_stopped()
    })
    .await;
    // Let the store call go, so its thread ends with the test; its connection is gone.
    w.clock.open();
    assert!(stuck.await.unwrap().is_err(), "cut off, not answered");
    w.instance.stop().await;
}
