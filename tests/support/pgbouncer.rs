//! PgBouncer in transaction-pooling mode in front of the test PostgreSQL, and one fresh
//! database behind it per test.
//!
//! One PgBouncer per test process, started on first use from Debian's `pgbouncer` (on
//! `PATH` or in `/usr/sbin`), on a free port, with a pool of [`SERVER_SESSIONS`] server
//! sessions per database: fewer than a store's pooled connections, so that the store's
//! connections take turns on the same server sessions, which is what breaks a client that
//! keeps anything in a session. Like the throwaway cluster, a watchdog shell owns it and
//! stops it when the test process has gone.
//!
//! Each test gets a database of its own rather than a schema: PgBouncer 1.18 refuses the
//! `options` startup parameter that chooses a schema, and a `SET search_path` would not
//! outlive a transaction there. The bouncer's `*` entry routes any database name through.
//!
//! Without PostgreSQL or PgBouncer, [`fresh_database`] returns `None` and says so on stderr,
//! unless `REQUIRE_POSTGRES=1`, which then fails the test.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::{env, fs};

use postgres::config::Host;
use postgres::{Config, NoTls};

use super::postgres::{
    CONNECT_TIMEOUT, READY_DEADLINE, RunAs, TempDir, find_on_path, free_port, log_tail,
    off_runtime, schema_name, server_config, sh_quote, wait_until_accepting,
};

/// Server sessions per database: enough for a test that holds a transaction open on a raw
/// connection while the store works, far fewer than the store's pool of 16.
const SERVER_SESSIONS: u32 = 3;

/// A fresh, empty database reached through the test PgBouncer; dropped again with the guard.
pub struct PgBouncerDatabase {
    name: String,
    /// Through the bouncer, to this database.
    config: Config,
    /// Straight to the server: creates and drops the database.
    admin: Config,
}

impl PgBouncerDatabase {
    /// Connects through PgBouncer (transaction pooling) to this database.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// The same as a URL with model-relay's `pool_mode=transaction`, for `serve --database`.
    pub fn url(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(6432);
        let user = self.config.get_user().unwrap_or("postgres");
        format!(
            "postgres://{user}@{host}:{port}/{}?pool_mode=transaction",
            self.name
        )
    }
}

impl Drop for PgBouncerDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        // FORCE ends the bouncer's server sessions on it, which it reopens on demand.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let outcome = off_runtime(move || -> Result<(), String> {
            let mut client = admin.connect(NoTls).map_err(|e| e.to_string())?;
            client.batch_execute(&sql).map_err(|e| e.to_string())
        });
        if let Ok(Err(e)) | Err(e) = outcome {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}

/// A new database behind the test PgBouncer, or None (said on stderr) when there is no
/// PostgreSQL or no PgBouncer and `REQUIRE_POSTGRES` is not "1".
pub fn fresh_database(test_name: &str) -> Option<PgBouncerDatabase> {
    let admin = server_config(test_name)?;
    let bouncer = match bouncer(&admin) {
        Ok(bouncer) => bouncer,
        Err(e) if env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("{test_name}: REQUIRE_POSTGRES=1 but PgBouncer could not start: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test_name}: no PgBouncer ({e})");
            return None;
        }
    };
    let name = schema_name(test_name);
    let create = format!("CREATE DATABASE \"{name}\"");
    let server = admin.clone();
    off_runtime(move || -> Result<(), String> {
        let mut client = server.connect(NoTls).map_err(|e| e.to_string())?;
        client.batch_execute(&create).map_err(|e| e.to_string())
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("{test_name}: could not create database {name}: {e}"));

    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(bouncer.port)
        .user(admin.get_user().unwrap_or("postgres"))
        .dbname(&name)
        .connect_timeout(CONNECT_TIMEOUT);
    Some(PgBouncerDatabase {
        name,
        config,
        admin,
    })
}

struct Bouncer {
    port: u16,
    /// The watchdog: it stops PgBouncer when its stdin closes, with this process.
    _watchdog: Mutex<Child>,
}

fn bouncer(server: &Config) -> Result<&'static Bouncer, String> {
    static BOUNCER: OnceLock<Result<Bouncer, String>> = OnceLock::new();
    BOUNCER
        .get_or_init(|| start(server))
        .as_ref()
        .map_err(Clone::clone)
}

fn start(server: &Config) -> Result<Bouncer, String> {
    let binary = find_on_path("pgbouncer")
        .or_else(|| {
            let sbin = PathBuf::from("/usr/sbin/pgbouncer");
            sbin.exists().then_some(sbin)
        })
        .ok_or("no pgbouncer on PATH or in /usr/sbin (Debian's package `pgbouncer`)")?;
    // It refuses to run as root, as PostgreSQL does.
    let run_as = RunAs::detect()?;

    let mut temp = TempDir::new("model-relay-pgbouncer")?;
    let dir = temp.path.clone();
    let dir_str = dir
        .to_str()
        .ok_or_else(|| format!("temp dir {} is not UTF-8", dir.display()))?
        .to_owned();
    run_as.take_ownership(&dir)?;

    let mut target = String::new();
    match server.get_hosts().first() {
        Some(Host::Tcp(host)) => write!(target, "host={host}"),
        Some(Host::Unix(path)) => write!(target, "host={}", path.display()),
        None => write!(target, "host=127.0.0.1"),
    }
    .map_err(|e| e.to_string())?;
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let _ = write!(
        target,
        " port={port} user={}",
        server.get_user().unwrap_or("postgres")
    );
    if let Some(password) = server.get_password() {
        let _ = write!(target, " password={}", String::from_utf8_lossy(password));
    }

    let port = free_port()?;
    let log = format!("{dir_str}/pgbouncer.log");
    let ini = format!("{dir_str}/pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            "[databases]\n\
             * = {target}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_SESSIONS}\n\
             max_client_conn = 5000\n\
             logfile = {log}\n\
             pidfile = {dir_str}/pgbouncer.pid\n"
        ),
    )
    .map_err(|e| format!("could not write {ini}: {e}"))?;
    let _ = fs::set_permissions(&ini, std::os::unix::fs::PermissionsExt::from_mode(0o644));

    // The watchdog: start PgBouncer, say so, then wait for EOF on stdin (the test process
    // is gone) and stop it. Its own process group keeps group signals away.
    let script = format!(
        "exec 2>&1\n\
         trap '' HUP INT QUIT TERM\n\
         {binary} {ini} </dev/null >/dev/null 2>&1 &\n\
         pid=$!\n\
         echo started\n\
         exec >/dev/null 2>&1\n\
         read _ || :\n\
         kill $pid\n\
         wait $pid\n\
         rm -rf {dir}\n",
        binary = sh_quote(&binary.to_string_lossy()),
        ini = sh_quote(&ini),
        dir = sh_quote(&dir_str),
    );
    let mut child = run_as
        .shell(&script)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start the watchdog shell: {e}"))?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("stdout is piped")?);
    let mut first = String::new();
    let _ = stdout.read_line(&mut first);
    if first.trim() != "started" {
        return Err(format!("the watchdog did not start PgBouncer: {first}"));
    }
    // From now on the watchdog removes the dir.
    temp.ours = false;

    let mut probe = Config::new();
    probe
        .host("127.0.0.1")
        .port(port)
        .user(server.get_user().unwrap_or("postgres"))
        .dbname(server.get_dbname().unwrap_or("postgres"));
    let ready = off_runtime(move || wait_until_accepting(&probe, READY_DEADLINE))
        .and_then(|r| r)
        .map_err(|e| format!("{e}\npgbouncer log:\n{}", log_tail(&log, 0)));
    if let Err(e) = ready {
        drop(child.stdin.take());
        let _ = child.wait();
        return Err(e);
    }
    eprintln!("test PgBouncer: {} on 127.0.0.1:{port}", binary.display());
    Ok(Bouncer {
        port,
        _watchdog: Mutex::new(child),
    })
}
