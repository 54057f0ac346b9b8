//! A server for daemon tests (memory store behind [`WatchedStore`], fake clock), the
//! daemons running against it, and a discovery command the test opens when it chooses.

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use model_relay::clock::FakeClock;
use model_relay::daemon::{self, Config, DaemonError, Source};
use model_relay::ids::{RuntimeId, Token};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::support::engines::Engine;
use super::support::server::{Http, Instance, T0, settings, workspace};
use super::watched::{Knobs, WatchedStore};
use model_relay::config::Settings;

/// Long enough for any healthy wait on a loaded 2-core machine; only a broken daemon hits it.
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `condition` holds; fails the test, naming `what`, past [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < DEADLINE, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether process `pid` has ended (gone, or a zombie waiting to be reaped).
pub fn is_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name: `123 (sleep) S …`.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

pub struct Relay {
    pub http: Http,
    pub clock: Arc<FakeClock>,
    pub knobs: Arc<Knobs>,
    instance: Instance,
    pub api: String,
}

impl Relay {
    /// A server that holds heartbeats briefly (200 ms), so that a daemon's heartbeats keep
    /// coming while it exercises the held path.
    pub async fn start() -> Self {
        Self::start_with(Settings {
            max_wait: Duration::from_millis(200),
            ..settings()
        })
        .await
    }

    pub async fn start_with(settings: Settings) -> Self {
        let (store, knobs) = WatchedStore::new();
        let (_, api) = workspace(store.as_ref(), T0);
        Self::start_on(store, knobs, api, settings).await
    }

    /// [`Relay::start`] on `engine`'s store. On a multi-threaded runtime: the PostgreSQL
    /// client blocks, so the store is opened and the workspace made outside the workers.
    pub async fn start_on_engine(engine: &dyn Engine) -> Self {
        let (store, knobs, api) = tokio::task::block_in_place(|| {
            let (store, knobs) = WatchedStore::on(engine.open());
            let (_, api) = workspace(store.as_ref(), T0);
            (store, knobs, api)
        });
        let settings = Settings {
            max_wait: Duration::from_millis(200),
            ..settings()
        };
        Self::start_on(store, knobs, api, settings).await
    }

    async fn start_on(
        store: Arc<WatchedStore>,
        knobs: Arc<Knobs>,
        api: String,
        settings: Settings,
    ) -> Self {
        let clock = Arc::new(FakeClock::new(T0));
        let instance = Instance::start(store, clock.clone(), settings).await;
        Relay {
            http: Http::default(),
            clock,
            knobs,
            instance,
            api,
        }
    }

    pub fn base(&self) -> &str {
        &self.instance.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.instance.base)
    }

    /// A runtime made over the API: its id and daemon token.
    pub async fn runtime(&self, name: &str) -> (String, String) {
        let body = json!({"name": name, "provider": "test"});
        let created = self
            .http
            .post(&self.url("/api/runtimes"), &self.api, body)
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.json);
        let field = |name: &str| created.json[name].as_str().unwrap().to_owned();
        (field("id"), field("daemon_token"))
    }

    /// A daemon config with test timings: quick heartbeats and retries, a long stop grace.
    pub fn config(&self, rt: &str, token: &str, source: Source) -> Config {
        let rt = RuntimeId::parse(rt).unwrap();
        let mut config = Config::new(self.base(), rt, Token::from_header(token), source).unwrap();
        config.heartbeat_interval = Duration::from_millis(50);
        config.report_backoff = vec![
            Duration::ZERO,
            Duration::from_millis(10),
            Duration::from_millis(10),
            Duration::from_millis(10),
        ];
        config.call_timeout = Duration::from_secs(5);
        config.stop_grace = Duration::from_secs(10);
        config
    }

    /// Starts a daemon for runtime `rt` and waits until the runtime is online.
    pub async fn run(&self, config: Config, rt: &str) -> RunningDaemon {
        let daemon = RunningDaemon::spawn(config);
        eventually("the runtime comes online", || async {
            let list = self.http.get(&self.url("/api/runtimes"), &self.api).await;
            list.json["runtimes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == rt && r["status"] == "online")
        })
        .await;
        daemon
    }

    /// A new runtime with a running daemon that discovers from `source`.
    pub async fn daemon(&self, name: &str, source: Source) -> (String, RunningDaemon) {
        let (rt, token) = self.runtime(name).await;
        let config = self.config(&rt, &token, source);
        let daemon = self.run(config, &rt).await;
        (rt, daemon)
    }

    /// Creates a model-list request that the daemon answers, never the catalog: its id.
    pub async fn request(&self, rt: &str) -> String {
        let url = self.url(&format!("/api/runtimes/{rt}/models"));
        let created = self
            .http
            .post(&url, &self.api, serde_json::json!({"refresh": true}))
            .await;
        assert_eq!(created.status, StatusCode::OK, "{}", created.json);
        created.json["id"].as_str().unwrap().to_owned()
    }

    pub async fn poll(&self, rt: &str, id: &str) -> Value {
        let url = self.url(&format!("/api/runtimes/{rt}/models/{id}"));
        let answer = self.http.get(&url, &self.api).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        answer.json
    }

    /// Polls until the request has ended; its record.
    pub async fn wait_ended(&self, rt: &str, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let last = self.poll(rt, id).await;
            if !matches!(last["status"].as_str(), Some("pending" | "running")) {
                return last;
            }
            assert!(start.elapsed() < DEADLINE, "request never ended: {last}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Creates a request on `rt`'s route `path` (`local-skills`, `update`, …) with `body`:
    /// its id.
    pub async fn ask(&self, rt: &str, path: &str, body: Value) -> String {
        let url = self.url(&format!("/api/runtimes/{rt}/{path}"));
        let created = self.http.post(&url, &self.api, body).await;
        assert_eq!(created.status, StatusCode::OK, "{}", created.json);
        created.json["id"].as_str().unwrap().to_owned()
    }

    /// The record of request `id` on `rt`'s route `path`.
    pub async fn read(&self, rt: &str, path: &str, id: &str) -> Value {
        let url = self.url(&format!("/api/runtimes/{rt}/{path}/{id}"));
        let answer = self.http.get(&url, &self.api).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        answer.json
    }

    /// [`Relay::ask`], then polls until the request has ended; its record.
    pub async fn asked(&self, rt: &str, path: &str, body: Value) -> Value {
        let id = self.ask(rt, path, body).await;
        let start = Instant::now();
        loop {
            let last = self.read(rt, path, &id).await;
            if !matches!(last["status"].as_str(), Some("pending" | "running")) {
                return last;
            }
            assert!(start.elapsed() < DEADLINE, "request never ended: {last}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks runtime `rt` for its models, as the page does; the ended request.
    pub async fn discover(&self, rt: &str) -> Value {
        let id = self.request(rt).await;
        self.wait_ended(rt, &id).await
    }
}

pub struct RunningDaemon {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl RunningDaemon {
    /// Starts `daemon::run` in a task of its own.
    pub fn spawn(config: Config) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(config, async {
            let _ = stopped.await;
        }));
        RunningDaemon { stop, task }
    }

    /// Completes the daemon's shutdown future and waits for `run` to return.
    pub async fn stop(self) -> Result<(), DaemonError> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// A discovery command that blocks until the test opens the gate: `cat` on a FIFO, whose
/// output is whatever the test writes into it.
pub struct Gate {
    _dir: tempfile::TempDir,
    fifo: PathBuf,
    pid_file: PathBuf,
}

impl Gate {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("gate");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let pid_file = dir.path().join("pid");
        Gate {
            _dir: dir,
            fifo,
            pid_file,
        }
    }

    pub fn source(&self) -> Source {
        Source::Command(format!(
            "echo $$ > {}; exec cat {}",
            self.pid_file.display(),
            self.fifo.display()
        ))
    }

    /// The command's pid, once it has started.
    pub fn pid(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.pid_file).ok()?;
        text.ends_with('\n').then(|| text.trim().to_owned())
    }

    /// Lets the command print `output` and exit.
    pub async fn open(&self, output: &str) {
        let fifo = self.fifo.clone();
        let output = output.to_owned();
        // Opening a FIFO for writing blocks until its reader (the command) has it open.
        tokio::task::spawn_blocking(move || std::fs::write(fifo, output))
            .await
            .unwrap()
            .unwrap();
    }
}
