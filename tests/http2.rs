//! HTTP/2 back-pressure, attacked over TLS and real sockets with an HTTP/2 client (`h2`)
//! that does what a browser never would: keep its stream windows shut while it asks for a
//! large answer again and again, and open many bodies it never finishes. Each attack must
//! be bounded — by the answer budgets (per connection, per server), by cutting off answers
//! that make no progress, and by reading one body at a time per connection — while
//! `/healthz` and an honest client are answered.

mod support;

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use model_relay::App;
use model_relay::config::Settings;
use model_relay::ids::{RequestId, RuntimeId, Token};
use model_relay::model::{ModelEntry, Outcome, Report, Status};
use model_relay::store::memory::MemoryStore;
use model_relay::store::{NewRuntime, Storer};
use model_relay::tls::ServerCertificate;
use support::server::{Http, Instance, T0, clock, settings, workspace};
use support::tls::{Ca, client_config, connect};
use tokio::task::JoinHandle;

const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The most a cut may take before the test says it did not happen.
const BOUND: Duration = Duration::from_secs(20);
/// Model entries in the large answer, and each one's label: about 200 KB of JSON.
const MODELS: usize = 200;
const LABEL: usize = 1000;

/// A TLS instance whose one request has ended with a large model list.
struct Target {
    server: Instance,
    ca: Ca,
    ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
    api: String,
    /// The path of the large request.
    path: String,
    /// The length of its record.
    record: usize,
}

async fn target(settings: Settings) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (cert, key) = ca.issue(1).write(dir.path());
    let certificate = ServerCertificate::load(&cert, &key).unwrap();
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(settings.timeouts));
    let (workspace_id, api) = workspace(store.as_ref(), T0);
    let runtime = store
        .create_runtime(
            &NewRuntime {
                id: RuntimeId::random().unwrap(),
                workspace_id,
                name: "laptop".to_owned(),
                provider: "claude".to_owned(),
                daemon_token: Token::new_daemon().unwrap().hash(),
            },
            T0,
        )
        .unwrap();
    let id = RequestId::random().unwrap();
    store
        .create_or_coalesce(runtime.id, &NewRequest::of(Kind::Models, id), T0)
        .unwrap();
    assert_eq!(
        store
            .claim_next_pending(runtime.id, Kind::Models, T0)
            .unwrap()
            .claimed,
        Some(id)
    );
    let models = (0..MODELS)
        .map(|i| ModelEntry {
            id: format!("model-{i}"),
            label: "x".repeat(LABEL),
            ..ModelEntry::default()
        })
        .collect();
    let outcome = Outcome {
        result: None,
        status: Status::Completed,
        models,
        supported: true,
        error: None,
        fallback: false,
    };
    store
        .report(runtime.id, Kind::Models, id, &Report::Ended(outcome), T0)
        .unwrap();
    let app = App::new(store, clock(), settings);
    let server = Instance::start_tls(app, certificate.server_config().unwrap()).await;
    let mut t = Target {
        server,
        ca,
        ca_file,
        _dir: dir,
        api,
        path: format!("/api/runtimes/{}/models/{id}", runtime.id),
        record: 0,
    };
    let honest = t.honest_read().await;
    assert_eq!(honest.0, StatusCode::OK);
    t.record = honest.1;
    assert!(t.record > MODELS * LABEL, "{} bytes", t.record);
    t
}

impl Target {
    /// An HTTP/2 connection whose streams open with `window` bytes of receive window.
    async fn h2(&self, window: u32) -> (h2::client::SendRequest<Bytes>, JoinHandle<()>) {
        let tls = connect(&self.server.base, client_config(&self.ca, &[b"h2"])).await;
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake(tls)
            .await
            .unwrap();
        // Ends when the server closes the connection, with an error or without.
        let connection = tokio::spawn(async move { drop(connection.await) });
        (client, connection)
    }

    fn request(&self, method: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.api))
            .body(())
            .unwrap()
    }

    /// The large record, read whole by a client that reads what it is sent; its status and
    /// length.
    async fn honest_read(&self) -> (StatusCode, usize) {
        let url = format!("{}{}", self.server.base, self.path);
        let answer = Http::trusting(&self.ca_file)
            .try_raw(hyper::Method::GET, &url, Some(&self.api), None)
            .await
            .unwrap();
        (answer.status, answer.body.len())
    }

    async fn healthz(&self) -> StatusCode {
        let url = format!("{}/healthz", self.server.base);
        Http::trusting(&self.ca_file).get_text(&url).await.status
    }
}

/// Asks for the large record `n` times on `client` without reading any answer: the
/// statuses of the answers' heads (which need no window), `None` for a stream the server
/// cut before its head. The answers' streams are kept open, their windows shut.
async fn ask_without_reading(
    t: &Target,
    client: h2::client::SendRequest<Bytes>,
    n: usize,
) -> (Vec<Option<StatusCode>>, Vec<h2::RecvStream>) {
    let mut client = client;
    let mut pending = Vec::new();
    for _ in 0..n {
        client = client.ready().await.unwrap();
        let (answer, _) = client
            .send_request(t.request("GET", &t.path), true)
            .unwrap();
        pending.push(answer);
    }
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for answer in pending {
        match tokio::time::timeout(BOUND, answer).await {
            Ok(Ok(answer)) => {
                statuses.push(Some(answer.status()));
                open.push(answer.into_body());
            }
            Ok(Err(_)) => statuses.push(None),
            Err(_) => panic!("no answer head within {BOUND:?}"),
        }
    }
    (statuses, open)
}

fn count(statuses: &[Option<StatusCode>], status: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == Some(status)).count()
}

#[tokio::test]
async fn a_client_that_reads_nothing_holds_one_connection_budget_and_is_cut_off() {
    let per_connection = 1024 * 1024;
    let t = target(Settings {
        read_timeout: READ_TIMEOUT,
        answer_bytes_per_connection: per_connection,
        ..settings()
    })
    .await;
    let (client, connection) = t.h2(0).await;
    let (statuses, open) = ask_without_reading(&t, client.clone(), 20).await;
    // And keeps the connection busy, so it is never idle: only the answers that do not
    // move can tell the server to cut it.
    let busy = tokio::spawn(async move {
        loop {
            let Ok(mut ready) = client.clone().ready().await else {
                return;
            };
            let healthz = Request::get("https://localhost/healthz").body(()).unwrap();
            if ready.send_request(healthz, true).is_err() {
                return;
            }
            tokio::time::sleep(READ_TIMEOUT / 5).await;
        }
    });
    // As many answers as fit the connection's budget; the others refused at once rather
    // than kept (or cut with the connection, on a slow machine).
    let fit = per_connection / t.record;
    let sent = count(&statuses, StatusCode::OK);
    assert!(
        sent >= 1 && sent <= fit,
        "{sent} answers kept: {statuses:?}"
    );
    let refused = count(&statuses, StatusCode::SERVICE_UNAVAILABLE);
    let cut = statuses.iter().filter(|s| s.is_none()).count();
    assert_eq!(sent + refused + cut, 20, "{statuses:?}");
    assert!(refused > 0, "{statuses:?}");
    // Answered meanwhile, on connections of their own.
    assert_eq!(t.healthz().await, StatusCode::OK);
    assert_eq!(t.honest_read().await, (StatusCode::OK, t.record));
    // The answers make no progress: the connection is cut, not kept.
    let cut = tokio::time::timeout(BOUND, connection).await;
    assert!(
        cut.is_ok(),
        "a connection whose answers never move is kept open"
    );
    busy.abort();
    drop(open);
    assert_eq!(t.honest_read().await, (StatusCode::OK, t.record));
    t.server.stop().await;
}

#[tokio::test]
async fn answers_nobody_reads_fill_the_server_budget_only_until_they_are_cut_off() {
    let t0 = target(settings()).await;
    let record = t0.record;
    t0.server.stop().await;
    let t = target(Settings {
        read_timeout: READ_TIMEOUT,
        // Room for three large answers in all, and more than that per connection: the
        // server's budget is the one that fills.
        answer_bytes_total: 3 * record + record / 2,
        answer_bytes_per_connection: 64 * 1024 * 1024,
        ..settings()
    })
    .await;
    let (client, connection) = t.h2(0).await;
    let (statuses, open) = ask_without_reading(&t, client, 10).await;
    let sent = count(&statuses, StatusCode::OK);
    assert!((1..=3).contains(&sent), "{sent} answers kept: {statuses:?}");
    // Refused by the server's budget: the connection's has room for all ten.
    let refused = count(&statuses, StatusCode::SERVICE_UNAVAILABLE);
    let cut = statuses.iter().filter(|s| s.is_none()).count();
    assert_eq!(sent + refused + cut, 10, "{statuses:?}");
    assert!(refused > 0, "{statuses:?}");
    // While they are held, small answers still go out.
    assert_eq!(t.healthz().await, StatusCode::OK);
    let cut = tokio::time::timeout(BOUND, connection).await;
    assert!(
        cut.is_ok(),
        "a connection whose answers never move is kept open"
    );
    drop(open);
    // Cut off, its answers gave their bytes back.
    assert_eq!(t.honest_read().await, (StatusCode::OK, t.record));
    t.server.stop().await;
}

/// Opens a POST of `/api/runtimes` announcing `length` bytes and sends up to `upto` of
/// them as the server's windows allow, never the rest; adds what it sent to `sent`. The
/// answer's status, once the server gives up on the body.
async fn stalled_body(
    t: &Target,
    client: &mut h2::client::SendRequest<Bytes>,
    length: usize,
    upto: usize,
    sent: Arc<AtomicUsize>,
) -> JoinHandle<Option<StatusCode>> {
    let mut request = t.request("POST", "/api/runtimes");
    request
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length.into());
    let mut ready = client.clone().ready().await.unwrap();
    let (answer, mut body) = ready.send_request(request, false).unwrap();
    tokio::spawn(async move {
        let send = async {
            let mut mine = 0;
            while mine < upto {
                body.reserve_capacity(upto - mine);
                match poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => {
                        if body.send_data(Bytes::from(vec![b' '; n]), false).is_err() {
                            break;
                        }
                        mine += n;
                        sent.fetch_add(n, Ordering::SeqCst);
                    }
                    None | Some(Err(_)) => break,
                }
            }
            // All sent that it will ever send: wait for the answer.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            answer = answer => answer.ok().map(|a| a.status()),
            () = send => None,
        }
    })
}

#[tokio::test]
async fn bodies_that_never_finish_hold_at_most_one_body_per_http2_connection() {
    let t = target(Settings {
        read_timeout: Duration::from_secs(2),
        ..settings()
    })
    .await;
    let limit = settings().body_limit;
    let (mut client, _connection) = t.h2(65_535).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let streams = 16;
    let upto = limit * 8 / 10;
    let mut answers = Vec::new();
    for _ in 0..streams {
        answers.push(stalled_body(&t, &mut client, limit - 1, upto, Arc::clone(&sent)).await);
    }
    // Answered meanwhile: the page, and an honest client's body on its own connection.
    assert_eq!(t.healthz().await, StatusCode::OK);
    let honest = Http::trusting(&t.ca_file)
        .post(
            &format!("{}/api/runtimes", t.server.base),
            &t.api,
            serde_json::json!({"name": "desk", "provider": "codex"}),
        )
        .await;
    assert_eq!(honest.status, StatusCode::CREATED, "{:?}", honest.json);
    for answer in answers {
        let status = tokio::time::timeout(BOUND, answer)
            .await
            .expect("the server gives up on a body that never ends")
            .unwrap();
        assert_eq!(status, Some(StatusCode::REQUEST_TIMEOUT));
    }
    // The client could send no more than the connection's window (unread bodies wait in
    // it) and the one body being read: never the sixteen it opened.
    let sent = sent.load(Ordering::SeqCst);
    assert!(
        sent <= 2 * limit + limit / 2,
        "{sent} bytes taken of {} offered",
        streams * upto
    );
    t.server.stop().await;
}

#[tokio::test]
async fn a_connection_may_open_only_so_many_streams_at_once() {
    // Each stream may be a held call: the bound is what keeps one connection from holding
    // more than its share before `--max-waiting` is felt.
    let t = target(Settings {
        max_streams_per_connection: 7,
        ..settings()
    })
    .await;
    let (client, connection) = t.h2(65_535).await;
    let mut client = client.ready().await.unwrap();
    // The server's settings arrive with its first frames: one answer has come after them.
    let (answer, _) = client
        .send_request(t.request("GET", "/healthz"), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), StatusCode::OK);
    assert_eq!(client.current_max_send_streams(), 7);
    drop(client);
    connection.abort();
    t.server.stop().await;
}
