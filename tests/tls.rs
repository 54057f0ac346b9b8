//! HTTPS end to end, with certificates made in the test (a throwaway CA): the reference
//! daemon against `serve --tls-cert/--tls-key`, refusing a server it cannot verify before it
//! sends anything; HTTP/2 and HTTP/1.1 by ALPN over TLS 1.2 and 1.3; a SIGHUP reload seen by
//! the next handshake while an open connection goes on; and the read timeout holding for
//! TLS handshakes and idle HTTP/2 connections.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use model_relay::App;
use model_relay::config::Settings;
use model_relay::store::memory::MemoryStore;
use model_relay::tls::ServerCertificate;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::process::{BIN, Serve, workspace_create};
use support::server::{Http, Instance, T0, clock, settings, workspace};
use support::tls::Ca;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Only a broken build makes a healthy wait take this long.
const DEADLINE: Duration = Duration::from_secs(30);

/// A directory with a SQLite database, a CA, and a server certificate it signed.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    database: String,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite:{}", dir.path().join("relay.db").display());
        Setup {
            dir,
            ca: Ca::new("model-relay test CA"),
            database,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `serve --tls-cert --tls-key` with a certificate of serial `serial` from the CA.
    fn serve(&self, serial: u64) -> (Serve, Vec<u8>) {
        let issued = self.ca.issue(serial);
        let (cert, key) = issued.write(self.path());
        let args = [
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        let serve = Serve::start(&self.database, &args);
        assert!(serve.base.starts_with("https://"), "{}", serve.base);
        (serve, issued.der)
    }
}

/// A workspace and a runtime in it, made over HTTPS, and a client that trusts the CA.
struct World {
    http: Http,
    api: String,
    rt: String,
    token: String,
}

impl Setup {
    /// `serve` over HTTPS (serial 1) with a workspace and a runtime; the CA's file.
    async fn serve_a_runtime(&self) -> (Serve, std::path::PathBuf, World) {
        let api = api_token(&self.database);
        let (serve, _) = self.serve(1);
        let ca = self.ca.write(self.path(), "ca.pem");
        let http = Http::trusting(&ca);
        let (rt, token) = runtime(&http, &serve.base, &api).await;
        (
            serve,
            ca,
            World {
                http,
                api,
                rt,
                token,
            },
        )
    }
}

/// A process whose stderr is read on a thread; killed if the test ends first.
struct Daemon {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    fn spawn(base: &str, rt: &str, token: &str, models: &Path, ca_cert: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["daemon", "--server", base, "--runtime-id", rt])
            .arg("--models-file")
            .arg(models)
            .env("MODEL_RELAY_DAEMON_TOKEN", token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(ca) = ca_cert {
            command.arg("--ca-cert").arg(ca);
        }
        let mut child = command.spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Daemon {
            child,
            stderr: Some(stderr),
        }
    }

    /// Waits for the daemon to exit on its own (within the deadline); whether it exited
    /// with 0, and its log.
    fn exited(mut self) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let log = self.stderr.take().unwrap().join().unwrap();
                panic!("the daemon did not stop on its own:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status.success(),
            self.stderr.take().unwrap().join().unwrap(),
        )
    }

    /// SIGTERM; whether it exited with 0, and its log.
    fn terminate(self) -> (bool, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.exited()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runtime made over HTTPS; its id and daemon token.
async fn runtime(http: &Http, base: &str, api: &str) -> (String, String) {
    let created = http
        .post(
            &format!("{base}/api/runtimes"),
            api,
            json!({"name": "laptop", "provider": "claude"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.json);
    (
        created.json["id"].as_str().unwrap().to_owned(),
        created.json["daemon_token"].as_str().unwrap().to_owned(),
    )
}

fn api_token(database: &str) -> String {
    workspace_create(database)["api_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_discovers_models_from_serve_over_https_with_a_private_ca() {
    let setup = Setup::new();
    let (serve, ca, world) = setup.serve_a_runtime().await;
    let World {
        http,
        api,
        rt,
        token,
    } = world;
    let models = setup.path().join("models.json");
    std::fs::write(&models, r#"[{"id":"m1","label":"Model one"}]"#).unwrap();
    let daemon = Daemon::spawn(&serve.base, &rt, &token, &models, Some(&ca));
    let start = Instant::now();
    while http
        .get(&format!("{}/api/runtimes", serve.base), &api)
        .await
        .json["runtimes"][0]["status"]
        != "online"
    {
        assert!(start.elapsed() < DEADLINE, "the daemon never came online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let created = http
        .post_empty(&format!("{}/api/runtimes/{rt}/models", serve.base), &api)
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.json);
    let id = created.json["id"].as_str().unwrap();
    let read = format!("{}/api/runtimes/{rt}/models/{id}?wait_ms=20000", serve.base);
    let start = Instant::now();
    let ended = loop {
        let answer = http.get(&read, &api).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        if !matches!(answer.json["status"].as_str(), Some("pending" | "running")) {
            break answer.json;
        }
        assert!(start.elapsed() < DEADLINE, "never ended: {}", answer.json);
    };
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["models"], json!([{"id": "m1", "label": "Model one"}]));

    let (exited_ok, log) = daemon.terminate();
    assert!(exited_ok, "{log}");
    assert!(log.contains("report delivered"), "{log}");
    assert!(
        !log.contains("travels in clear"),
        "no clear-text warning over https:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stops_before_sending_anything_to_a_server_it_cannot_verify() {
    let setup = Setup::new();
    let (serve, _, world) = setup.serve_a_runtime().await;
    let World {
        http,
        api,
        rt,
        token,
    } = world;
    let models = setup.path().join("models.json");
    std::fs::write(&models, "[]").unwrap();
    let other_ca = Ca::new("someone else").write(setup.path(), "other-ca.pem");

    // Trusting another CA, then only the system's roots: neither signed this certificate.
    for ca_cert in [Some(other_ca.as_path()), None] {
        let daemon = Daemon::spawn(&serve.base, &rt, &token, &models, ca_cert);
        let (exited_ok, log) = daemon.exited();
        assert!(!exited_ok, "{log}");
        assert!(
            log.contains("certificate does not verify") && log.contains("nothing was sent"),
            "{log}"
        );
    }

    let metrics = http.get_text(&format!("{}/metrics", serve.base)).await;
    let metrics = metrics.text();
    assert!(
        metrics.contains("model_relay_http_requests_total{"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"route="/api/daemon/heartbeat""#),
        "the server saw no heartbeat:\n{metrics}"
    );
    let runtimes = http
        .get(&format!("{}/api/runtimes", serve.base), &api)
        .await;
    assert_eq!(runtimes.json["runtimes"][0]["status"], "offline");
}

/// A client configuration trusting `ca` only, for `versions`, offering `alpn`.
fn client_config(
    ca: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every handshake a full one: a resumed session shows the certificate of the session
    // it resumes, not the one the server has now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A TLS connection to `base` (`https://127.0.0.1:PORT`).
async fn handshake(base: &str, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let addr = base.trim_start_matches("https://");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

/// The certificate the server presented on `tls`, as DER.
fn presented(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

type Http1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Speaks HTTP/1.1 on `tls`; the sender for its requests.
async fn http1_over(tls: TlsStream<TcpStream>) -> Http1Sender {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn healthz(sender: &mut Http1Sender) -> StatusCode {
    let request = Request::get("/healthz")
        .header(hyper::header::HOST, "localhost")
        .body(Empty::new())
        .unwrap();
    sender.send_request(request).await.unwrap().status()
}

/// A TLS instance in this process, over the library's certificate loading.
async fn tls_instance(ca: &Ca, dir: &Path, settings: Settings) -> Instance {
    let (cert, key) = ca.issue(7).write(dir);
    let certificate = ServerCertificate::load(&cert, &key).unwrap();
    let store = Arc::new(MemoryStore::new(settings.timeouts));
    let app = App::new(store, clock(), settings);
    Instance::start_tls(app, certificate.server_config().unwrap()).await
}

#[tokio::test]
async fn http2_and_http1_are_chosen_by_alpn_over_tls_1_3_and_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = tls_instance(&ca, dir.path(), settings()).await;
    let tls13 = &[&rustls::version::TLS13][..];
    let tls12 = &[&rustls::version::TLS12][..];

    for versions in [tls13, tls12] {
        let h2 = client_config(&ca.pem(), versions, &[b"h2", b"http/1.1"]);
        let tls = handshake(&server.base, h2).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(versions[0].version)
        );
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::get(format!("{}/healthz", server.base))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let answer = sender.send_request(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.version(), Version::HTTP_2);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"status":"ok"}"#);

        // No ALPN at all, or HTTP/1.1 only: HTTP/1.1.
        for alpn in [&[][..], &[&b"http/1.1"[..]][..]] {
            let h1 = client_config(&ca.pem(), versions, alpn);
            let tls = handshake(&server.base, h1).await;
            assert_ne!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut sender = http1_over(tls).await;
            assert_eq!(healthz(&mut sender).await, StatusCode::OK);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_silent_tls_client_and_an_idle_http2_connection_are_closed_after_the_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let settings = Settings {
        read_timeout: Duration::from_millis(300),
        ..settings()
    };
    let server = tls_instance(&ca, dir.path(), settings).await;
    let addr = server.base.trim_start_matches("https://").to_owned();

    // Connects and never says hello: closed, not kept.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut byte))
        .await
        .expect("a silent client is cut off");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // HTTP/2: one request, then nothing. The server ends the connection.
    let config = client_config(&ca.pem(), &[&rustls::version::TLS13], &[b"h2"]);
    let tls = handshake(&server.base, config).await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get(format!("{}/healthz", server.base))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        sender.send_request(request).await.unwrap().status(),
        StatusCode::OK
    );
    let ended = tokio::time::timeout(DEADLINE, connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is closed");
    server.stop().await;
}

#[tokio::test]
async fn a_call_held_on_http2_outlasts_the_idle_close() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.issue(7).write(dir.path());
    let certificate = ServerCertificate::load(&cert, &key).unwrap();
    let settings = Settings {
        read_timeout: Duration::from_secs(1),
        ..settings()
    };
    let store = Arc::new(MemoryStore::new(settings.timeouts));
    let (_, api) = workspace(store.as_ref(), T0);
    let app = App::new(store, clock(), settings);
    let server = Instance::start_tls(app, certificate.server_config().unwrap()).await;

    let config = client_config(&ca.pem(), &[&rustls::version::TLS13], &[b"h2"]);
    let tls = handshake(&server.base, config).await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut post = async |path: &str, token: &str, body: serde_json::Value| {
        let request = Request::post(format!("{}{path}", server.base))
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let answer = sender.send_request(request).await.unwrap();
        let status = answer.status();
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        )
    };
    let (status, runtime) = post(
        "/api/runtimes",
        &api,
        json!({"name": "laptop", "provider": "claude"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{runtime}");
    // Held for three read timeouts, with nothing else on the connection: the connection is
    // not idle meanwhile, so it is still open for the next call when the answer comes.
    let beat = json!({"runtime_id": runtime["id"], "wait_ms": 3000});
    let token = runtime["daemon_token"].as_str().unwrap();
    let (status, ack) = post("/api/daemon/heartbeat", token, beat.clone()).await;
    assert_eq!((status, ack), (StatusCode::OK, json!({"status": "ok"})));
    let beat = json!({"runtime_id": runtime["id"]});
    let (status, ack) = post("/api/daemon/heartbeat", token, beat).await;
    assert_eq!((status, ack), (StatusCode::OK, json!({"status": "ok"})));
    server.stop().await;
}

/// Waits until the server has logged a line containing `said`.
fn wait_for_log(serve: &Serve, said: &str) {
    wait_for_logs(serve, said, 1);
}

/// Waits until the server has logged `times` lines containing `said`.
fn wait_for_logs(serve: &Serve, said: &str, times: usize) {
    let start = Instant::now();
    let count = || {
        let logs = serve.logs_so_far();
        logs.iter().filter(|line| line.contains(said)).count()
    };
    while count() < times {
        assert!(
            start.elapsed() < DEADLINE,
            "never logged {said:?}: {:#?}",
            serve.logs_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_handshakes_and_keeps_open_connections() {
    let setup = Setup::new();
    let (serve, first) = setup.serve(1);
    let config = client_config(&setup.ca.pem(), &[&rustls::version::TLS13], &[]);

    let tls = handshake(&serve.base, Arc::clone(&config)).await;
    assert_eq!(presented(&tls), first);
    let mut open = http1_over(tls).await;
    assert_eq!(healthz(&mut open).await, StatusCode::OK);

    // A new pair in the files, then SIGHUP: the next handshake presents it.
    let second = setup.ca.issue(2);
    second.write(setup.path());
    serve.send("HUP");
    wait_for_log(&serve, "certificate reloaded");
    let tls = handshake(&serve.base, Arc::clone(&config)).await;
    assert_eq!(presented(&tls), second.der);
    assert_ne!(second.der, first);
    // The connection made before the reload goes on.
    assert_eq!(healthz(&mut open).await, StatusCode::OK);

    // A bad pair (a key that belongs to another certificate): the one in force stays.
    let third = setup.ca.issue(3);
    std::fs::write(setup.path().join("key.pem"), &third.key_pem).unwrap();
    serve.send("HUP");
    wait_for_log(&serve, "certificate not reloaded");
    let tls = handshake(&serve.base, config).await;
    assert_eq!(presented(&tls), second.der);
    assert_eq!(healthz(&mut open).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_path_that_would_block_or_flood_is_refused_and_serving_goes_on() {
    let setup = Setup::new();
    let (serve, first) = setup.serve(1);
    let config = client_config(&setup.ca.pem(), &[&rustls::version::TLS13], &[]);
    let cert = setup.path().join("cert.pem");
    let mut open = http1_over(handshake(&serve.base, Arc::clone(&config)).await).await;

    // A FIFO with no writer: opening it to read would wait for one, forever.
    std::fs::remove_file(&cert).unwrap();
    let fifo = Command::new("mkfifo").arg(&cert).status().unwrap();
    assert!(fifo.success());
    serve.send("HUP");
    wait_for_log(&serve, "not a regular file");
    // A later SIGHUP is not stuck behind it, and serving never was.
    let tls = handshake(&serve.base, Arc::clone(&config)).await;
    assert_eq!(presented(&tls), first);
    assert_eq!(healthz(&mut open).await, StatusCode::OK);

    // A symlink to an endless device, and a file far larger than any chain.
    std::fs::remove_file(&cert).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &cert).unwrap();
    serve.send("HUP");
    wait_for_logs(&serve, "not a regular file", 2);
    std::fs::remove_file(&cert).unwrap();
    let large = std::fs::File::create(&cert).unwrap();
    large.set_len(model_relay::tls::MAX_PEM_BYTES + 1).unwrap();
    serve.send("HUP");
    wait_for_log(&serve, "not a certificate chain or a key");
    let tls = handshake(&serve.base, Arc::clone(&config)).await;
    assert_eq!(presented(&tls), first);
    assert_eq!(healthz(&mut open).await, StatusCode::OK);

    // Good files again: the next SIGHUP reloads them.
    std::fs::remove_file(&cert).unwrap();
    let second = setup.ca.issue(2);
    second.write(setup.path());
    serve.send("HUP");
    wait_for_log(&serve, "certificate reloaded");
    let tls = handshake(&serve.base, config).await;
    assert_eq!(presented(&tls), second.der);

    // And SIGTERM still stops it, promptly.
    let status = serve
        .terminate_within(DEADLINE)
        .expect("serve stopped on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_refuses_at_start_a_certificate_that_is_not_a_regular_file_or_too_large() {
    let setup = Setup::new();
    let (cert, key) = setup.ca.issue(1).write(setup.path());
    let large = setup.path().join("large.pem");
    std::fs::File::create(&large)
        .unwrap()
        .set_len(model_relay::tls::MAX_PEM_BYTES + 1)
        .unwrap();
    let fifo = setup.path().join("fifo.pem");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let cases = [
        (Path::new("/dev/zero"), key.as_path(), "not a regular file"),
        (fifo.as_path(), key.as_path(), "not a regular file"),
        (
            large.as_path(),
            key.as_path(),
            "not a certificate chain or a key",
        ),
        (cert.as_path(), fifo.as_path(), "not a regular file"),
    ];
    for (cert, key, said) in cases {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                &setup.database,
            ])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cert:?}: {stderr}");
        assert!(stderr.contains(said), "{cert:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_is_logged_and_changes_nothing() {
    let setup = Setup::new();
    let serve = Serve::start(&setup.database, &[]);
    serve.send("HUP");
    wait_for_log(&serve, "nothing to reload");
    let answer = Http::default()
        .get_text(&format!("{}/healthz", serve.base))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let status = serve
        .terminate_within(DEADLINE)
        .expect("serve stopped on SIGTERM");
    assert!(status.success(), "{status:?}");
}
