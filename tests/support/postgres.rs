//! A PostgreSQL for the integration tests, and one fresh schema per test.
//!
//! Where the server comes from is decided once per test process, in this order:
//! 1. `DATABASE_URL`, when it is a `postgres://` or `postgresql://` URL. It must connect: a
//!    wrong URL fails every test that asks for a schema, it never turns into a skip.
//! 2. With the cargo feature `testcontainers`: a `postgres` container, when a Docker engine
//!    answers. It lives as long as the test process.
//! 3. A throwaway cluster made from the local PostgreSQL binaries (`initdb`, `pg_ctl`,
//!    `postgres` on `PATH`, else the newest `/usr/lib/postgresql/*/bin`), in a temp dir, on a
//!    free port. A small watchdog shell, our child, owns it: it stops the server and removes
//!    the dir when its stdin reaches EOF, which happens when the test process exits however
//!    it exits (panic, `SIGKILL`, ...).
//!
//! When none of them works, [`fresh_schema`] returns `None` and says so loudly on stderr,
//! unless `REQUIRE_POSTGRES=1` (CI), where it panics with what was tried.
//!
//! The synchronous `postgres` client panics when it runs (connect, query, even drop) on a
//! thread that is inside a tokio runtime, and tests call [`fresh_schema`] from
//! `#[tokio::test]`s, so every client here lives and dies on a plain thread of its own.

use std::any::Any;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use postgres::{Config, NoTls};

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly started server (cluster or container) may take to accept connections.
pub(super) const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long dropping a schema may wait for a lock held by a connection a test left open.
const DROP_LOCK_TIMEOUT: &str = "10s";
/// Longest part of a schema name taken from the test's name.
const NAME_PART_MAX: usize = 30;

/// A fresh, empty schema in the test PostgreSQL, dropped again when this guard drops.
#[derive(Debug)]
pub struct PgSchema {
    name: String,
    /// Sessions of this config see only this schema.
    config: Config,
    url: String,
    /// The server's own config, without the schema: used to drop the schema.
    admin: Config,
}

impl PgSchema {
    /// Connection config whose sessions use only this schema (options `-c search_path=<schema>`).
    pub fn config(&self) -> postgres::Config {
        self.config.clone()
    }

    /// The same as a `postgres://` URL, for a child process (`model-relay serve --database URL`);
    /// the search path travels in the query (`?options=-c%20search_path%3D<schema>`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes every row the service wrote in this schema (the schema and its tables stay),
    /// so that one store can serve many generated cases: opening a store per case costs a
    /// schema, its tables and a pool of connections each time.
    pub fn empty_tables(&self) {
        let mut client = self
            .config
            .connect(NoTls)
            .expect("connect to the test schema");
        client
            .batch_execute("TRUNCATE catalogs, requests, runtimes, api_tokens, workspaces")
            .expect("empty the test schema");
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!(
            "SET lock_timeout = '{DROP_LOCK_TIMEOUT}'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.name
        );
        let outcome = off_runtime(move || -> Result<(), String> {
            let mut client = admin.connect(NoTls).map_err(|e| e.to_string())?;
            client.batch_execute(&sql).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test schema {}: {e}", self.name),
            Err(panic) => eprintln!(
                "warning: dropping test schema {} panicked: {panic}",
                self.name
            ),
        }
    }
}

/// The test server, or None (said on stderr) when there is none and `REQUIRE_POSTGRES` is
/// not "1"; panics as [`fresh_schema`] says.
fn found_server(test_name: &str) -> Option<&'static Server> {
    let server = match server() {
        Ok(Found::Server(server)) => server,
        Ok(Found::Missing(tried)) => {
            let tried = tried.join("\n  - ");
            if env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "{test_name}: REQUIRE_POSTGRES=1 but no PostgreSQL could be found. Tried:\n  - {tried}"
                );
            }
            // Straight to the process's stderr, past the test harness's output capture, so
            // that a skip is seen even when the test passes.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test_name}: no PostgreSQL (set DATABASE_URL or REQUIRE_POSTGRES=1). Tried:\n  - {tried}"
            );
            return None;
        }
        Err(e) => panic!("{test_name}: {e}"),
    };
    Some(server)
}

/// How to reach the test server itself (no schema chosen), for a test that needs its own
/// database or a proxy in front; None as [`fresh_schema`] says.
pub(super) fn server_config(test_name: &str) -> Option<Config> {
    found_server(test_name).map(|server| server.config.clone())
}

/// Some(fresh schema), or None when no PostgreSQL can be found and `REQUIRE_POSTGRES` is not
/// "1" (then a `SKIPPED` line goes to stderr). Panics when `REQUIRE_POSTGRES=1` and none can
/// be found, and when `DATABASE_URL` names a server that does not answer.
pub fn fresh_schema(test_name: &str) -> Option<PgSchema> {
    let server = found_server(test_name)?;

    let name = schema_name(test_name);
    let admin = server.config.clone();
    let create = format!("CREATE SCHEMA \"{name}\"");
    off_runtime(move || -> Result<(), String> {
        let mut client = admin.connect(NoTls).map_err(|e| e.to_string())?;
        client.batch_execute(&create).map_err(|e| e.to_string())
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| {
        panic!(
            "{test_name}: could not create schema {name} ({}): {e}",
            server.source
        )
    });

    let options = match server.config.get_options() {
        Some(existing) if !existing.trim().is_empty() => {
            format!("{existing} -c search_path={name}")
        }
        _ => format!("-c search_path={name}"),
    };
    let mut config = server.config.clone();
    config.options(&options);
    // `options` given last wins when the URL is parsed, so it also overrides any in the
    // server's URL (whose options are already folded into ours).
    let separator = if server.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{separator}options={}",
        server.url,
        percent_encode(&options)
    );
    Some(PgSchema {
        name,
        config,
        url,
        admin: server.config.clone(),
    })
}

/// What this process found, decided once.
enum Found {
    Server(Box<Server>),
    /// Nothing found; what was tried and why it did not work.
    Missing(Vec<String>),
}

struct Server {
    /// Connects to the server's default database, with no schema chosen.
    config: Config,
    /// The same as a URL.
    url: String,
    /// Where it came from, for messages.
    source: String,
    /// Whatever must live as long as the process for the server to stay up: the container,
    /// or the watchdog child (its stdin must stay open).
    _keep_alive: Option<Mutex<Box<dyn Any + Send>>>,
}

/// `Err` is a hard failure every test must see (a `DATABASE_URL` that does not connect).
fn server() -> &'static Result<Found, String> {
    static SERVER: OnceLock<Result<Found, String>> = OnceLock::new();
    SERVER.get_or_init(|| {
        // The container runner and the client both refuse to run inside a tokio runtime.
        off_runtime(|| discover(env::var("DATABASE_URL").ok()))
            .unwrap_or_else(|panic| Err(format!("finding a test PostgreSQL panicked: {panic}")))
    })
}

/// Finds a server, `database_url` first (the value of `DATABASE_URL`).
fn discover(database_url: Option<String>) -> Result<Found, String> {
    let mut tried = Vec::new();

    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let shown = redact(&url);
            let mut config: Config = url
                .parse()
                .map_err(|e| format!("DATABASE_URL={shown} does not parse: {e}"))?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(CONNECT_TIMEOUT);
            }
            let client = config
                .connect(NoTls)
                .map_err(|e| format!("DATABASE_URL={shown} does not connect: {e}"))?;
            drop(client);
            let source = format!("DATABASE_URL={shown}");
            eprintln!("test PostgreSQL: {source}");
            return Ok(Found::Server(Box::new(Server {
                config,
                url,
                source,
                _keep_alive: None,
            })));
        }
        Some(other) => tried.push(format!(
            "DATABASE_URL={} ignored: not a postgres:// or postgresql:// URL",
            redact(&other)
        )),
        None => tried.push("DATABASE_URL: not set".to_owned()),
    }

    #[cfg(feature = "testcontainers")]
    {
        let started = std::panic::catch_unwind(container::start)
            .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&*panic))));
        match started {
            Ok(server) => {
                eprintln!("test PostgreSQL: {}", server.source);
                return Ok(Found::Server(Box::new(server)));
            }
            Err(e) => tried.push(format!("testcontainers: {e}")),
        }
    }
    #[cfg(not(feature = "testcontainers"))]
    tried.push("testcontainers: cargo feature `testcontainers` not enabled".to_owned());

    match local_cluster() {
        Ok((server, _)) => {
            eprintln!("test PostgreSQL: {}", server.source);
            return Ok(Found::Server(Box::new(server)));
        }
        Err(e) => tried.push(format!("local PostgreSQL binaries: {e}")),
    }

    Ok(Found::Missing(tried))
}

#[cfg(feature = "testcontainers")]
mod container {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};
    use std::sync::Mutex;

    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::SyncRunner;

    use super::{
        CONNECT_TIMEOUT, READY_DEADLINE, Server, find_on_path, sh_quote, wait_until_accepting,
    };

    pub(super) fn start() -> Result<Server, String> {
        let container = Postgres::default().start().map_err(|e| e.to_string())?;
        let host = container.get_host().map_err(|e| e.to_string())?;
        let port = container
            .get_host_port_ipv4(5432)
            .map_err(|e| e.to_string())?;
        let url = format!("postgres://postgres:postgres@{host}:{port}/postgres");
        let mut config: postgres::Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        wait_until_accepting(&config, READY_DEADLINE)?;

        // The container lives in a static, and statics are never dropped, so its own drop
        // never removes it. A watchdog does, once the test process has gone (best effort:
        // only when the `docker` CLI is there).
        let watchdog = find_on_path("docker").and_then(|docker| {
            let script = format!(
                "exec >/dev/null 2>&1\nread _ || :\nexec {} rm -f -v {}\n",
                sh_quote(&docker.to_string_lossy()),
                sh_quote(container.id())
            );
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .ok()
        });

        Ok(Server {
            config,
            url,
            source: format!("testcontainers postgres container {}", container.id()),
            _keep_alive: Some(Mutex::new(Box::new((container, watchdog)))),
        })
    }
}

/// Runs `f` on a plain thread of its own and waits for it, so that the synchronous client
/// never finds itself inside the caller's tokio runtime. `Err` carries a panic's message.
pub(super) fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    thread::Builder::new()
        .name("test-postgres".into())
        .spawn(f)
        .map_err(|e| format!("could not spawn a thread: {e}"))?
        .join()
        .map_err(|panic| panic_message(&*panic))
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Polls until `config` connects, for at most `deadline`.
pub(super) fn wait_until_accepting(config: &Config, deadline: Duration) -> Result<(), String> {
    let until = Instant::now() + deadline;
    let mut config = config.clone();
    config.connect_timeout(Duration::from_secs(2));
    loop {
        match config.connect(NoTls) {
            Ok(client) => {
                drop(client);
                return Ok(());
            }
            Err(e) if Instant::now() >= until => {
                return Err(format!(
                    "server did not accept connections within {deadline:?}: {e}"
                ));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The throwaway local cluster.

/// How the PostgreSQL binaries are run: they refuse to run as root, so then as `postgres`.
pub(super) enum RunAs {
    Me,
    Runuser(PathBuf),
    Su(PathBuf),
}

impl RunAs {
    pub(super) fn detect() -> Result<RunAs, String> {
        if !running_as_root() {
            return Ok(RunAs::Me);
        }
        let user_exists = Command::new("id")
            .args(["-u", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !user_exists {
            return Err("running as root, and there is no `postgres` user to run them as".into());
        }
        if let Some(runuser) = find_on_path("runuser") {
            return Ok(RunAs::Runuser(runuser));
        }
        if let Some(su) = find_on_path("su") {
            return Ok(RunAs::Su(su));
        }
        Err("running as root, and neither `runuser` nor `su` is there to become `postgres`".into())
    }

    /// `sh -c script`, as the user that runs the PostgreSQL binaries.
    pub(super) fn shell(&self, script: &str) -> Command {
        match self {
            RunAs::Me => {
                let mut command = Command::new("sh");
                command.arg("-c").arg(script);
                command
            }
            RunAs::Runuser(runuser) => {
                let mut command = Command::new(runuser);
                command.args(["-u", "postgres", "--", "sh", "-c", script]);
                command
            }
            RunAs::Su(su) => {
                let mut command = Command::new(su);
                command.args(["postgres", "-s", "/bin/sh", "-c", script]);
                command
            }
        }
    }

    pub(super) fn take_ownership(&self, dir: &Path) -> Result<(), String> {
        if let RunAs::Me = self {
            return Ok(());
        }
        let output = Command::new("chown")
            .arg("postgres")
            .arg(dir)
            .output()
            .map_err(|e| format!("could not run chown: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "chown postgres {}: {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }
}

pub(super) fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:	real	effective	saved	fs"
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The support module's own checks, which need what every other test shares to be their
/// own: a discovery that is not cached, and a cluster they may let go of.
pub mod own {
    use std::path::PathBuf;
    use std::process::Child;

    use super::{Found, Server};

    /// What `fresh_schema` would find with `DATABASE_URL` set to `url`: `Ok(true)` for a
    /// server, `Ok(false)` for none, `Err` for the hard failure every test would see.
    pub fn discover_with(url: Option<&str>) -> Result<bool, String> {
        super::discover(url.map(str::to_owned)).map(|found| matches!(found, Found::Server(_)))
    }

    /// A throwaway cluster of the caller's own.
    pub struct Cluster {
        server: Server,
        pub dir: PathBuf,
    }

    impl Cluster {
        pub fn start() -> Result<Self, String> {
            let (server, dir) = super::local_cluster()?;
            Ok(Cluster { server, dir })
        }

        pub fn config(&self) -> postgres::Config {
            self.server.config.clone()
        }

        /// Stops the server (fast: open sessions are ended), keeping its data. The
        /// watchdog still cleans up at the end, stopped or started again.
        pub fn stop(&self) -> Result<(), String> {
            self.pg_ctl("-m fast -w -t 60 stop")
        }

        /// Starts the stopped server again, on the same port, and waits until it accepts
        /// connections.
        pub fn start_again(&self) -> Result<(), String> {
            let port = self.config().get_ports()[0];
            let log = super::sh_quote(&format!("{}/server.log", self.dir_str()?));
            self.pg_ctl(&format!("-l {log} -w -t 30 -o '-p {port}' start"))?;
            super::wait_until_accepting(&self.config(), super::READY_DEADLINE)
        }

        fn dir_str(&self) -> Result<&str, String> {
            self.dir
                .to_str()
                .ok_or_else(|| format!("{} is not UTF-8", self.dir.display()))
        }

        /// `pg_ctl -D <data> <args>`, as the user the cluster runs as.
        fn pg_ctl(&self, args: &str) -> Result<(), String> {
            let bin = super::find_pg_bin_dir().ok_or("no PostgreSQL binaries")?;
            let pg_ctl = super::sh_quote(&format!("{}/pg_ctl", bin.display()));
            let data = super::sh_quote(&format!("{}/data", self.dir_str()?));
            let output = super::RunAs::detect()?
                .shell(&format!("exec {pg_ctl} -D {data} {args}"))
                .current_dir(&self.dir)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("could not run pg_ctl: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "pg_ctl {args}: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            Ok(())
        }

        /// Closes the watchdog's stdin, as the death of this process would, and waits for
        /// the watchdog to finish its clean-up.
        pub fn abandon(self) {
            let keep_alive = self
                .server
                ._keep_alive
                .expect("a local cluster has a watchdog");
            let mut boxed = keep_alive.into_inner().expect("watchdog lock");
            let watchdog = boxed
                .downcast_mut::<Child>()
                .expect("the local cluster's keep-alive is its watchdog");
            drop(watchdog.stdin.take());
            watchdog.wait().expect("wait for the watchdog");
        }
    }
}

fn local_cluster() -> Result<(Server, PathBuf), String> {
    let bin = find_pg_bin_dir().ok_or(
        "no directory with initdb, pg_ctl and postgres on PATH or in /usr/lib/postgresql/*/bin",
    )?;
    let run_as = RunAs::detect()?;

    let mut temp = TempDir::new("model-relay-pg")?;
    let dir = temp.path.clone();
    Ok((start_cluster(&bin, &run_as, &mut temp)?, dir))
}

/// The cluster's dir: removed on drop until the watchdog takes it over.
pub(super) struct TempDir {
    pub(super) path: PathBuf,
    pub(super) ours: bool,
}

impl TempDir {
    /// A new dir `<prefix>-<pid>-<random>` under the system's temp dir.
    pub(super) fn new(prefix: &str) -> Result<Self, String> {
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).map_err(|e| format!("no randomness: {e}"))?;
        let path =
            env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), hex(&random)));
        fs::create_dir(&path).map_err(|e| format!("could not create {}: {e}", path.display()))?;
        Ok(TempDir { path, ours: true })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.ours {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn start_cluster(bin: &Path, run_as: &RunAs, temp: &mut TempDir) -> Result<Server, String> {
    let dir = temp.path.clone();
    let dir = dir.as_path();
    let dir_str = dir
        .to_str()
        .ok_or_else(|| format!("temp dir {} is not UTF-8", dir.display()))?;
    let bin_str = bin
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", bin.display()))?;
    let data = format!("{dir_str}/data");
    let log = format!("{dir_str}/server.log");
    let initdb = sh_quote(&format!("{bin_str}/initdb"));
    let pg_ctl = sh_quote(&format!("{bin_str}/pg_ctl"));

    run_as.take_ownership(dir)?;

    let output = run_as
        .shell(&format!(
            "exec {initdb} -A trust -U postgres --no-sync --no-locale -E UTF8 -D {}",
            sh_quote(&data)
        ))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run initdb: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}):\n{}{}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stdout), 20),
            tail(&String::from_utf8_lossy(&output.stderr), 20)
        ));
    }

    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(format!("{data}/postgresql.conf"))
        .map_err(|e| format!("could not open postgresql.conf: {e}"))?;
    write!(
        conf,
        "\n# model-relay tests\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{}'\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         max_connections = 300\n",
        dir_str.replace('\'', "''")
    )
    .map_err(|e| format!("could not write postgresql.conf: {e}"))?;
    drop(conf);

    // A port can be taken between our probe and the server's bind; then try another.
    let mut attempts = 0;
    let mut last_failure = String::new();
    for _ in 0..4 {
        let port = free_port()?;
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        // The watchdog: start the server, say whether it is up, then wait for EOF on stdin
        // (the test process is gone) and clean up. Its own process group keeps terminal and
        // group signals away, so that only that EOF ends it; `pg_ctl` puts the server in a
        // session of its own.
        let script = format!(
            "exec 2>&1\n\
             trap '' HUP INT QUIT TERM\n\
             if ! {pg_ctl} -D {data} -l {log} -w -t {secs} -o '-p {port}' start >/dev/null; then\n\
             \x20 {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1\n\
             \x20 echo failed\n\
             \x20 exit 1\n\
             fi\n\
             echo ready\n\
             exec >/dev/null 2>&1\n\
             read _ || :\n\
             {pg_ctl} -D {data} -m fast -w -t 60 stop || {pg_ctl} -D {data} -m immediate stop\n\
             rm -rf {dir}\n",
            data = sh_quote(&data),
            log = sh_quote(&log),
            dir = sh_quote(dir_str),
            secs = READY_DEADLINE.as_secs(),
        );
        let mut child = run_as
            .shell(&script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start the watchdog shell: {e}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);

        if first.trim() == "ready" {
            // The watchdog removes the dir from now on, also when we fail below.
            temp.ours = false;
            drop(stdout);
            drop(child.stderr.take());
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let mut config: Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
            config.connect_timeout(CONNECT_TIMEOUT);
            let server = Server {
                config: config.clone(),
                url,
                source: format!(
                    "throwaway cluster from {} in {dir_str} on 127.0.0.1:{port}",
                    bin.display()
                ),
                _keep_alive: Some(Mutex::new(Box::new(child))),
            };
            wait_until_accepting(&config, READY_DEADLINE)
                .map_err(|e| format!("{e}\nserver log:\n{}", log_tail(&log, log_start)))?;
            return Ok(server);
        }

        drop(child.stdin.take());
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let _ = child.wait();
        let server_log = log_tail(&log, log_start);
        let failure = format!(
            "server did not start on port {port}:\n{}{}{}server log:\n{server_log}",
            first,
            tail(&rest, 10),
            tail(&stderr, 10),
        );
        let port_taken = server_log.contains("could not bind")
            || server_log.contains("could not create any TCP/IP sockets")
            || server_log.contains("Address already in use");
        attempts += 1;
        last_failure = failure;
        if !port_taken {
            break;
        }
    }
    Err(format!("{last_failure}(attempts: {attempts})"))
}

/// A directory that has `initdb`, `pg_ctl` and `postgres`: the first on `PATH`, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
fn find_pg_bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| is_executable(&dir.join(b)))
    };
    if let Some(path) = env::var_os("PATH")
        && let Some(dir) = env::split_paths(&path).find(|d| complete(d))
    {
        return Some(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

pub(super) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(super) fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("could not probe for a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("could not probe for a port: {e}"))
}

pub(super) fn log_tail(log: &str, from: u64) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
            tail(&String::from_utf8_lossy(&bytes[from..]), 30)
        }
        Err(e) => format!("(could not read {log}: {e})\n"),
    }
}

/// The last `lines` lines of `text`, each ending in a newline.
pub(super) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for line in &all[all.len().saturating_sub(lines)..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// `t_<test name, sanitized, at most 30 chars>_<8 random hex digits>`: only `[a-z0-9_]`, so
/// it needs no quoting anywhere.
pub(super) fn schema_name(test_name: &str) -> String {
    let mut part = String::new();
    for c in test_name.chars() {
        if c.is_ascii_alphanumeric() {
            part.push(c.to_ascii_lowercase());
        } else if !part.is_empty() && !part.ends_with('_') {
            part.push('_');
        }
    }
    part.truncate(NAME_PART_MAX);
    let part = part.trim_end_matches('_');
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).expect("the OS gives no random bytes for a schema name");
    if part.is_empty() {
        format!("t_{}", hex(&random))
    } else {
        format!("t_{part}_{}", hex(&random))
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Single-quotes `s` for `sh`.
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The URL with any password replaced, for messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}
