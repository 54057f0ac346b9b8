//! The `model-relay` command line: `serve`, `workspace` (create, list, tokens), `backup`,
//! `daemon` and `demo`.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clock::{Clock, SystemClock, rfc3339};
use crate::config::{DatabaseUrl, Settings, parse_duration, parse_window, redact};
use crate::errors::error_chain;
use crate::http::Listener;
use crate::ids::{Token, TokenId, WorkspaceId};
use crate::instance::App;
use crate::kind::{Kind, PerKind};
use crate::model::Timeouts;
use crate::store::Storer;
use crate::tls::ServerCertificate;

#[derive(Parser)]
#[command(
    name = "model-relay",
    version,
    about = "A durable broker for model-list discovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(Box<ServeArgs>),
    /// Manage workspaces.
    Workspace {
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Copy an SQLite database to a new file, consistent while `serve` runs on it.
    Backup(BackupArgs),
    /// Run a daemon for one runtime: heartbeat, discover models, report.
    Daemon(crate::daemon::command::DaemonArgs),
    /// Server, workspace and simulated runtimes in one process; prints the page's URL.
    Demo(crate::demo::DemoArgs),
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Create a workspace and print its id and API token (shown once).
    Create {
        name: String,
        #[command(flatten)]
        database: DatabaseArg,
        /// Print one JSON object {"workspace_id", "token_id", "api_token"} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the workspaces.
    List {
        #[command(flatten)]
        database: DatabaseArg,
        /// Print a JSON array of {"workspace_id", "name", "created_at"} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Manage a workspace's API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Add an API token to the workspace and print it (shown once) with its id.
    Create {
        workspace_id: String,
        #[command(flatten)]
        database: DatabaseArg,
        /// Print one JSON object {"token_id", "api_token"} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the workspace's API tokens: ids, creation and last use, never a token.
    List {
        workspace_id: String,
        #[command(flatten)]
        database: DatabaseArg,
        /// Print a JSON array of {"token_id", "created_at", "last_used_at"?} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token: every call with it is refused (401) from now on.
    Revoke {
        workspace_id: String,
        token_id: String,
        #[command(flatten)]
        database: DatabaseArg,
    },
}

#[derive(Args)]
struct BackupArgs {
    #[command(flatten)]
    database: DatabaseArg,
    /// The file to write. It must not exist: a backup never overwrites a file.
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
}

#[derive(Args)]
struct DatabaseArg {
    /// sqlite:PATH or postgres://… [default: $DATABASE_URL, else sqlite:model-relay.db]
    #[arg(long, env = "MODEL_RELAY_DATABASE", hide_env_values = true)]
    database: Option<String>,
}

impl DatabaseArg {
    fn resolve(&self) -> Result<DatabaseUrl, String> {
        let url = self
            .database
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| DatabaseUrl::DEFAULT.to_owned());
        DatabaseUrl::parse(&url)
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "MODEL_RELAY_LISTEN")]
    listen: SocketAddr,
    #[command(flatten)]
    database: DatabaseArg,
    /// How long a request waits for a daemon to claim it.
    #[arg(long, value_parser = parse_duration, default_value = "30s", env = "MODEL_RELAY_PENDING_TIMEOUT")]
    pending_timeout: Duration,
    /// How long a claimed request may run without a report or renewal.
    #[arg(long, value_parser = parse_duration, default_value = "60s", env = "MODEL_RELAY_RUNNING_TIMEOUT")]
    running_timeout: Duration,
    /// How long an ended request stays readable.
    #[arg(long, value_parser = parse_duration, default_value = "10m", env = "MODEL_RELAY_RETENTION")]
    retention: Duration,
    /// A runtime with no heartbeat for this long is offline.
    #[arg(long, value_parser = parse_duration, default_value = "45s", env = "MODEL_RELAY_OFFLINE_AFTER")]
    offline_after: Duration,
    /// The longest a waiting call (a held heartbeat, a read with wait_ms) is held; longer
    /// waits are clamped. Keep it under the idle timeout of any proxy in front.
    #[arg(long, value_parser = parse_duration, default_value = "25s", env = "MODEL_RELAY_MAX_WAIT")]
    max_wait: Duration,
    /// A runtime's last good model list (its catalog) younger than this answers the
    /// picker at once, without asking the daemon (0s: never).
    #[arg(long, value_parser = parse_window, default_value = "60s", env = "MODEL_RELAY_CATALOG_FRESH")]
    catalog_fresh: Duration,
    /// A catalog older than --catalog-fresh but younger than this still answers at once,
    /// while the daemon is asked again in the background, or while it is offline (0s:
    /// never).
    #[arg(long, value_parser = parse_window, default_value = "24h", env = "MODEL_RELAY_CATALOG_SERVE")]
    catalog_serve: Duration,
    /// The most waiting calls held at once; past it a waiting call is answered 503 "too
    /// many waiting calls".
    #[arg(long, default_value_t = 10_000, env = "MODEL_RELAY_MAX_WAITING")]
    max_waiting: usize,
    /// The most heartbeats held at once for one runtime; past it a held heartbeat answers
    /// 429, so that one daemon token cannot take every place of --max-waiting.
    #[arg(long, default_value_t = 2, value_parser = parse_at_least_one, env = "MODEL_RELAY_MAX_WAITING_PER_RUNTIME")]
    max_waiting_per_runtime: usize,
    /// The most waiting reads held at once for one workspace; past it a waiting read
    /// answers 429, so that one tenant cannot take every place of --max-waiting [default:
    /// a quarter of --max-waiting, at most 100].
    #[arg(long, value_parser = parse_at_least_one, env = "MODEL_RELAY_MAX_WAITING_PER_WORKSPACE")]
    max_waiting_per_workspace: Option<usize>,
    /// The most HTTP/2 streams one connection may have open at once.
    #[arg(long, default_value_t = 100, value_parser = parse_at_least_one, env = "MODEL_RELAY_MAX_STREAMS_PER_CONNECTION")]
    max_streams_per_connection: usize,
    /// The most runtimes one workspace may have; past it creating a runtime answers 409, so
    /// that one tenant cannot fill the store for every other.
    #[arg(
        long,
        default_value_t = 1_000,
        env = "MODEL_RELAY_MAX_RUNTIMES_PER_WORKSPACE"
    )]
    max_runtimes_per_workspace: u64,
    /// The most requests one workspace may store (active ones, and ended ones until
    /// retention deletes them); past it a call that would store one more answers 429, so
    /// that one tenant's churn cannot fill the disk. Answers already stored are still
    /// handed out.
    #[arg(
        long,
        default_value_t = 10_000,
        env = "MODEL_RELAY_MAX_REQUESTS_PER_WORKSPACE"
    )]
    max_requests_per_workspace: u64,
    /// The most model entries one report may carry; past it the report answers 400.
    #[arg(long, default_value_t = 500, env = "MODEL_RELAY_MAX_MODELS_PER_REPORT")]
    max_models_per_report: usize,
    /// The largest report of a skill import (its files), in bytes: the one body allowed
    /// past the 1 MiB limit; past it the report answers 413.
    #[arg(long, default_value_t = 8 * 1024 * 1024, env = "MODEL_RELAY_MAX_IMPORT_BYTES")]
    max_import_bytes: usize,
    /// How long a skill list waits to be claimed [default: 3m].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_LOCAL_SKILLS_PENDING_TIMEOUT")]
    local_skills_pending_timeout: Option<Duration>,
    /// How long a claimed skill list may run without a report or renewal [default: 60s].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_LOCAL_SKILLS_RUNNING_TIMEOUT")]
    local_skills_running_timeout: Option<Duration>,
    /// How long a skill import waits to be claimed [default: 3m].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_SKILL_IMPORT_PENDING_TIMEOUT")]
    skill_import_pending_timeout: Option<Duration>,
    /// How long a claimed skill import may run without a report or renewal [default: 60s].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_SKILL_IMPORT_RUNNING_TIMEOUT")]
    skill_import_running_timeout: Option<Duration>,
    /// How long an update waits to be claimed [default: 120s].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_UPDATE_PENDING_TIMEOUT")]
    update_pending_timeout: Option<Duration>,
    /// How long a claimed update may run without a report or renewal [default: 150s].
    #[arg(long, value_parser = parse_duration, env = "MODEL_RELAY_UPDATE_RUNNING_TIMEOUT")]
    update_running_timeout: Option<Duration>,
    /// The most connections open at once; past it a new connection is closed as soon as it
    /// is accepted.
    #[arg(long, default_value_t = 8_192, value_parser = parse_at_least_one, env = "MODEL_RELAY_MAX_CONNECTIONS")]
    max_connections: usize,
    /// A request's headers, and the next ones on an idle connection, must arrive within
    /// this; its body within this or 10 s of the headers, whichever is shorter.
    #[arg(long, value_parser = parse_duration, default_value = "30s", env = "MODEL_RELAY_READ_TIMEOUT")]
    read_timeout: Duration,
    /// An origin whose pages may call the UI routes from a browser, e.g.
    /// https://app.example.com (repeatable). The daemon's routes never answer CORS.
    /// In the environment: several origins separated by commas.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        value_parser = parse_origin,
        env = "MODEL_RELAY_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); with --tls-key. SIGHUP
    /// reads both files again.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        env = "MODEL_RELAY_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "MODEL_RELAY_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// Serve /metrics on this address instead of --listen (e.g. 127.0.0.1:9090), for
    /// scrapers only; the API's address then answers /metrics 404.
    #[arg(long, value_name = "ADDR", env = "MODEL_RELAY_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` on /metrics (the counts are every tenant's).
    #[arg(
        long,
        value_name = "TOKEN",
        value_parser = parse_metrics_token,
        env = "MODEL_RELAY_METRICS_TOKEN",
        hide_env_values = true
    )]
    metrics_token: Option<String>,
    /// How often every held call is re-checked against the store (one query for all), the
    /// bound on what a lost wake-up notification costs.
    #[arg(long, value_parser = parse_duration, default_value = "1s", env = "MODEL_RELAY_RECHECK_EVERY")]
    recheck_every: Duration,
    /// How often this instance's sweeper runs.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "MODEL_RELAY_SWEEP_EVERY")]
    sweep_every: Duration,
    /// The longest a store call waits for a connection, a lock or a statement; past it the
    /// caller gets 503 store unavailable.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "MODEL_RELAY_STORE_TIMEOUT")]
    store_timeout: Duration,
    /// Log lines as text or as one JSON object each. The level comes from RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MODEL_RELAY_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Workspace { command } => workspace(command),
        Command::Backup(args) => backup(&args),
        Command::Daemon(args) => crate::daemon::command::daemon(args),
        Command::Demo(args) => crate::demo::demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn open_store(url: &DatabaseUrl, timeouts: PerKind<Timeouts>) -> Result<Arc<dyn Storer>, String> {
    url.open(timeouts)
        .map_err(|e| format!("cannot open {}: {}", shown_url(url), error_chain(&e)))
}

fn workspace(command: WorkspaceCommand) -> Result<(), String> {
    match command {
        WorkspaceCommand::Create {
            name,
            database,
            json,
        } => create_workspace(&name, &database, json),
        WorkspaceCommand::List { database, json } => list_workspaces(&database, json),
        WorkspaceCommand::Token { command } => match command {
            TokenCommand::Create {
                workspace_id,
                database,
                json,
            } => create_token(&workspace_id, &database, json),
            TokenCommand::List {
                workspace_id,
                database,
                json,
            } => list_tokens(&workspace_id, &database, json),
            TokenCommand::Revoke {
                workspace_id,
                token_id,
                database,
            } => revoke_token(&workspace_id, &token_id, &database),
        },
    }
}

fn parse_workspace_id(s: &str) -> Result<WorkspaceId, String> {
    WorkspaceId::parse(s).ok_or_else(|| format!("{s:?} is not a workspace id (a UUID)"))
}

fn store_failed(what: &str) -> impl Fn(crate::store::StoreError) -> String + '_ {
    move |e| format!("cannot {what}: {}", error_chain(&e))
}

fn list_workspaces(database: &DatabaseArg, json: bool) -> Result<(), String> {
    let store = open_store(&database.resolve()?, PerKind::defaults())?;
    let list = store
        .list_workspaces()
        .map_err(store_failed("list the workspaces"))?;
    if json {
        let list: Vec<_> = list
            .iter()
            .map(|w| {
                serde_json::json!({
                    "workspace_id": w.id.to_string(),
                    "name": w.name,
                    "created_at": rfc3339(w.created_at),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for w in &list {
            println!("{}  {}  {}", w.id, rfc3339(w.created_at), w.name);
        }
    }
    Ok(())
}

fn create_token(workspace: &str, database: &DatabaseArg, json: bool) -> Result<(), String> {
    let workspace = parse_workspace_id(workspace)?;
    let store = open_store(&database.resolve()?, PerKind::defaults())?;
    let token = Token::new_api().map_err(|e| e.to_string())?;
    let hash = token.hash();
    let created = store
        .create_api_token(workspace, &hash, SystemClock.now())
        .map_err(store_failed("create the token"))?;
    if !created {
        return Err(format!("no workspace {workspace}"));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"token_id": hash.id().to_string(), "api_token": token.expose()})
        );
    } else {
        println!("token id   {}", hash.id());
        println!("api token  {}", token.expose());
        println!("(the token is shown only now; keep it)");
    }
    Ok(())
}

fn list_tokens(workspace: &str, database: &DatabaseArg, json: bool) -> Result<(), String> {
    let workspace = parse_workspace_id(workspace)?;
    let store = open_store(&database.resolve()?, PerKind::defaults())?;
    let list = store
        .list_api_tokens(workspace)
        .map_err(store_failed("list the tokens"))?;
    if json {
        let list: Vec<_> = list
            .iter()
            .map(|t| {
                let mut entry = serde_json::json!({
                    "token_id": t.id.to_string(),
                    "created_at": rfc3339(t.created_at),
                });
                if let Some(used) = t.last_used_at {
                    entry["last_used_at"] = rfc3339(used).into();
                }
                entry
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for t in &list {
            let used = t.last_used_at.map_or_else(
                || "never used".to_owned(),
                |u| format!("last used {}", rfc3339(u)),
            );
            println!("{}  created {}  {used}", t.id, rfc3339(t.created_at));
        }
    }
    Ok(())
}

fn revoke_token(workspace: &str, token_id: &str, database: &DatabaseArg) -> Result<(), String> {
    let workspace = parse_workspace_id(workspace)?;
    let id = TokenId::parse(token_id)
        .ok_or_else(|| format!("{token_id:?} is not a token id (16 lowercase hex digits)"))?;
    let store = open_store(&database.resolve()?, PerKind::defaults())?;
    let revoked = store
        .revoke_api_token(workspace, &id)
        .map_err(store_failed("revoke the token"))?;
    if !revoked {
        return Err(format!("no token {id} in workspace {workspace}"));
    }
    println!("revoked token {id}");
    Ok(())
}

fn create_workspace(name: &str, database: &DatabaseArg, json: bool) -> Result<(), String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("the workspace name must not be empty".to_owned());
    }
    let store = open_store(&database.resolve()?, PerKind::defaults())?;
    let id = WorkspaceId::random().map_err(|e| e.to_string())?;
    let token = Token::new_api().map_err(|e| e.to_string())?;
    store
        .create_workspace(id, name, &token.hash(), SystemClock.now())
        .map_err(|e| format!("cannot create the workspace: {}", error_chain(&e)))?;
    let token_id = token.hash().id();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "workspace_id": id.to_string(),
                "token_id": token_id.to_string(),
                "api_token": token.expose(),
            })
        );
    } else {
        println!("workspace  {id}");
        println!("token id   {token_id}");
        println!("api token  {}", token.expose());
        println!("(the token is shown only now; keep it)");
    }
    Ok(())
}

/// `backup`: SQLite through the store's online copy. PostgreSQL has its own tools, which
/// know its roles, sequences and versions better than a copy made here could.
fn backup(args: &BackupArgs) -> Result<(), String> {
    let url = args.database.resolve()?;
    let path = match &url {
        DatabaseUrl::Sqlite { path, .. } => path,
        DatabaseUrl::Postgres { .. } => {
            return Err(format!(
                "backup copies SQLite databases only; back up PostgreSQL ({}) with pg_dump, \
                 e.g. pg_dump --format=custom --file=model-relay.dump \"$DATABASE_URL\", and \
                 restore it with pg_restore",
                shown_url(&url)
            ));
        }
    };
    let copied = crate::store::sqlite::backup(path, &args.to).map_err(|e| {
        format!(
            "cannot back up {} to {}: {}",
            shown_url(&url),
            args.to.display(),
            error_chain(&e)
        )
    })?;
    println!(
        "backed up {} to {} ({} pages, {} bytes)",
        shown_url(&url),
        args.to.display(),
        copied.pages,
        copied.bytes
    );
    Ok(())
}

/// Logs to stderr, at the level `RUST_LOG` names (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_format);
    match raise_open_files_limit() {
        Ok(limit) => tracing::info!(open_files = limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let mut timeouts = PerKind::defaults();
    let mut set = |kind: Kind, pending: Option<Duration>, running: Option<Duration>| {
        let default = timeouts.of(kind);
        let pending = pending.unwrap_or(default.pending);
        let running = running.unwrap_or(default.running);
        timeouts.set(kind, Timeouts { pending, running });
    };
    set(
        Kind::Models,
        Some(args.pending_timeout),
        Some(args.running_timeout),
    );
    set(
        Kind::LocalSkills,
        args.local_skills_pending_timeout,
        args.local_skills_running_timeout,
    );
    set(
        Kind::SkillImport,
        args.skill_import_pending_timeout,
        args.skill_import_running_timeout,
    );
    set(
        Kind::Update,
        args.update_pending_timeout,
        args.update_running_timeout,
    );
    let mut retention = PerKind::retentions();
    retention.set(Kind::Models, args.retention);
    let settings = Settings {
        timeouts,
        retention,
        offline_after: args.offline_after,
        sweep_every: args.sweep_every,
        max_wait: args.max_wait,
        recheck_every: args.recheck_every,
        max_waiting: args.max_waiting,
        max_waiting_per_runtime: args.max_waiting_per_runtime,
        max_waiting_per_workspace: args
            .max_waiting_per_workspace
            .unwrap_or_else(|| workspace_share(args.max_waiting)),
        max_streams_per_connection: args.max_streams_per_connection,
        max_connections: args.max_connections,
        max_runtimes_per_workspace: args.max_runtimes_per_workspace,
        max_requests_per_workspace: args.max_requests_per_workspace,
        max_models_per_report: args.max_models_per_report,
        max_import_bytes: args.max_import_bytes,
        read_timeout: args.read_timeout,
        catalog_fresh: args.catalog_fresh,
        catalog_serve: args.catalog_serve,
        ..Settings::default()
    };
    let url = args.database.resolve()?;
    let certificate = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            ServerCertificate::load(cert, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?,
        ),
        _ => None,
    };
    // Opened before the async runtime starts: the PostgreSQL client must not block on one.
    let store = url
        .open_with(settings.timeouts, args.store_timeout)
        .map_err(|e| format!("cannot open {}: {}", shown_url(&url), error_chain(&e)))?;
    let mut app = App::new(store, Arc::new(SystemClock), settings)
        .with_cors_origins(args.cors_origins)
        .with_metrics_token(args.metrics_token);
    app.metrics_elsewhere = args.metrics_listen.is_some();
    let app = Arc::new(app);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let served = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let tcp = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let local = tcp.local_addr().map_err(|e| e.to_string())?;
        let listener = match &certificate {
            None => Listener::from(tcp),
            Some(certificate) => {
                let config = certificate.server_config().map_err(|e| e.to_string())?;
                Listener::tls(tcp, config)
            }
        };
        tokio::spawn(reload_on_hangup(certificate.clone()));
        let scheme = if certificate.is_some() {
            "https"
        } else {
            "http"
        };
        if let Some(addr) = args.metrics_listen {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--metrics-listen): {e}"))?;
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                let stop = Arc::clone(&app);
                let served = crate::http::serve_metrics(tcp, app, stop.shutdown_begun()).await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            });
            tracing::info!(address = %addr, "metrics served on an address of their own");
        }
        tracing::info!(listen = %local, scheme, database = %shown_url(&url), "model-relay serving");
        crate::run(listener, Arc::clone(&app), shutdown)
            .await
            .map_err(|e| format!("server failed: {e}"))
    });
    // The runtime goes first, so the store's last handle drops here, off the runtime, and
    // its pool closes its connections before the process exits. A store call still running
    // (a request past the drain bound) ends within the store's own timeout; the runtime
    // waits that long for it, not forever.
    runtime.shutdown_timeout(args.store_timeout);
    drop(app);
    tracing::info!("model-relay stopped");
    served
}

/// An origin as a browser sends it, which is what `Origin` is compared with byte for byte:
/// `http://` or `https://`, a host, maybe a port, nothing after (no path, no trailing
/// slash). Written the way a browser writes it: lower case, and without the scheme's
/// default port (`https://x:443` is sent as `https://x`), else it could never match.
fn parse_origin(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let (scheme, rest, default_port) = if let Some(rest) = lower.strip_prefix("https://") {
        ("https", rest, 443)
    } else if let Some(rest) = lower.strip_prefix("http://") {
        ("http", rest, 80)
    } else {
        return Err(format!("{s:?}: an origin starts with http:// or https://"));
    };
    let shape =
        || format!("{s:?}: an origin is scheme://host[:port], with no path or trailing slash");
    if rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(shape());
    }
    // An IPv6 host is bracketed and holds colons of its own.
    let host_end = match rest.starts_with('[') {
        true => rest.find(']').map(|i| i + 1).ok_or_else(shape)?,
        false => rest.find(':').unwrap_or(rest.len()),
    };
    let (host, port) = rest.split_at(host_end);
    if host.is_empty() || host == "[]" {
        return Err(shape());
    }
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => None,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Some(
            digits
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: the port is past 65535"))?,
        ),
        _ => return Err(shape()),
    };
    Ok(match port {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// `--metrics-token`: an empty one would leave `/metrics` open while the operator thinks
/// it closed, and one with white space could never arrive (a header value loses its outer
/// white space, a bearer token has none inside), so both are refused at start.
fn parse_metrics_token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(
            "the metrics token is empty (leave it unset to serve /metrics openly)".to_owned(),
        );
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the metrics token holds white space or a control character, which no client can send in a bearer token".to_owned());
    }
    Ok(s.to_owned())
}

/// A count that must be at least one: `--max-connections 0` would serve nothing at all.
/// The default of `--max-waiting-per-workspace`: a quarter of `--max-waiting`, so that one
/// tenant's flood leaves three quarters to the others, and at most 100.
fn workspace_share(max_waiting: usize) -> usize {
    (max_waiting / 4).clamp(1, 100)
}

fn parse_at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Raises this process's soft limit on open files to its hard limit, and answers the
/// limit now in force. Every connection is a file: the soft limit (often 1,024) would cap
/// the server far below what the system allows it.
#[cfg(unix)]
fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    // `rlim_t` is u64 here but not on every Unix.
    #[allow(clippy::useless_conversion)]
    Ok(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
}

#[cfg(not(unix))]
fn raise_open_files_limit() -> std::io::Result<u64> {
    Err(std::io::Error::other("not supported on this system"))
}

fn shown_url(url: &DatabaseUrl) -> String {
    match url {
        DatabaseUrl::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
        DatabaseUrl::Postgres { url, .. } => redact(url),
    }
}

/// Reloads the certificate (if any) on every SIGHUP. Registers for the signal before it
/// returns: until then SIGHUP's default action would end the process, and a `systemctl
/// reload` of a server without TLS must not stop it. Each reload reads the files on the
/// blocking pool, so a path that blocks (a FIFO, a slow disk) holds up neither serving nor
/// shutdown; a SIGHUP that comes while a reload still runs is logged and skipped.
fn reload_on_hangup(certificate: Option<Arc<ServerCertificate>>) -> impl Future<Output = ()> {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hangups = match hangups {
                Ok(hangups) => hangups,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP");
                    return;
                }
            };
            let mut running: Option<tokio::task::JoinHandle<()>> = None;
            while hangups.recv().await.is_some() {
                let Some(certificate) = &certificate else {
                    tracing::info!("SIGHUP: nothing to reload (no --tls-cert)");
                    continue;
                };
                if running.as_ref().is_some_and(|r| !r.is_finished()) {
                    tracing::warn!("SIGHUP: the last reload has not finished; skipped");
                    continue;
                }
                let certificate = Arc::clone(certificate);
                running = Some(tokio::task::spawn_blocking(move || {
                    match certificate.reload() {
                        Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                        Err(e) => tracing::error!(
                            error = %e,
                            "SIGHUP: certificate not reloaded; keeping the one in force"
                        ),
                    }
                }));
            }
        }
        #[cfg(not(unix))]
        drop(certificate);
    }
}

/// Ctrl-C or SIGTERM. Registers for both before it returns, so that a signal that comes
/// once `serve` has said it is serving is a graceful shutdown, never the default action
/// (the end of the process).
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        [SignalKind::terminate(), SignalKind::interrupt()].map(|kind| signal(kind).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let [terminate, interrupt] = signals;
            let received = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = received(terminate) => {}
                () = received(interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutting down");
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{Cli, parse_at_least_one, parse_metrics_token, parse_origin, workspace_share};

    #[test]
    fn every_serve_flag_can_come_from_the_environment() {
        let cli = Cli::command();
        let serve = cli
            .get_subcommands()
            .find(|c| c.get_name() == "serve")
            .expect("a serve subcommand");
        let flags: Vec<_> = serve
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help"))
            .collect();
        assert!(flags.len() > 10, "{} flags", flags.len());
        for flag in flags {
            let long = flag.get_long().unwrap_or_default();
            let env = flag.get_env().and_then(|e| e.to_str());
            let expected = format!("MODEL_RELAY_{}", long.to_uppercase().replace('-', "_"));
            assert!(
                env.is_some_and(|e| e == expected || e == format!("{expected}S")),
                "--{long} reads {env:?}, not {expected}"
            );
        }
    }

    #[test]
    fn cors_origins_are_scheme_host_and_port_only() {
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert_eq!(parse_origin(good).as_deref(), Ok(good));
        }
        for bad in [
            "app.example.com",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/ui",
            "https://app.example.com:",
            "https://app.example.com:x",
            "https://app.example.com:70000",
            "https://user@app.example.com",
            "https://[::1",
            "ftp://x",
            "*",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cors_origins_are_written_as_a_browser_sends_them() {
        for (given, sent) in [
            ("https://x.example:443", "https://x.example"),
            ("http://x.example:80", "http://x.example"),
            ("HTTPS://App.Example.COM", "https://app.example.com"),
            ("https://x.example:0443", "https://x.example"),
            ("https://x.example:80", "https://x.example:80"),
            ("http://x.example:443", "http://x.example:443"),
        ] {
            assert_eq!(parse_origin(given).as_deref(), Ok(sent), "{given}");
        }
    }

    #[test]
    fn a_metrics_token_must_be_one_a_client_can_send() {
        assert_eq!(
            parse_metrics_token("s3cret-token").as_deref(),
            Ok("s3cret-token")
        );
        for bad in [
            "",
            " ",
            "   ",
            "\t",
            " token",
            "token ",
            "to ken",
            "tok\u{7}en",
        ] {
            assert!(parse_metrics_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn max_connections_is_at_least_one() {
        assert_eq!(parse_at_least_one("1"), Ok(1));
        assert!(parse_at_least_one("0").is_err());
        assert!(parse_at_least_one("-1").is_err());
    }

    #[test]
    fn a_workspace_may_hold_a_quarter_of_the_waiting_calls_by_default() {
        assert_eq!(workspace_share(40), 10);
        assert_eq!(workspace_share(10_000), 100, "at most 100");
        assert_eq!(workspace_share(3), 1, "at least one");
    }
}
