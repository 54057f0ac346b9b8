//! `model-relay demo`: the whole flow on one machine, with nothing to set up. A server on
//! SQLite in a temp dir, a workspace, three runtimes whose in-process daemons answer the
//! three ways a discovery can end (models, none, failure), and the page's URL to open.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use crate::clock::{Clock, SystemClock};
use crate::config::{DatabaseUrl, Settings};
use crate::daemon::command::{init_logging, stop_requested};
use crate::daemon::{self, Discovery, Source};
use crate::errors::error_chain;
use crate::ids::{RuntimeId, Token, WorkspaceId};
use crate::instance::App;
use crate::model::ModelEntry;
use crate::store::sqlite::Synchronous;
use crate::store::{NewRuntime, Storer};

#[derive(Args)]
pub struct DemoArgs {
    /// Address to listen on; 127.0.0.1:0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

/// The demo daemons heartbeat this often, so a discovery ends a moment after it is asked for.
const DEMO_HEARTBEAT: Duration = Duration::from_secs(1);

/// The built-in catalogue of the runtime whose discovery succeeds.
pub fn catalogue() -> Vec<ModelEntry> {
    let model = |id: &str, label: &str, default: bool| ModelEntry {
        id: id.to_owned(),
        label: label.to_owned(),
        provider: Some("anthropic".to_owned()),
        default: default.then_some(true),
        ..Default::default()
    };
    vec![
        model("claude-sonnet-4-6", "Claude Sonnet 4.6", true),
        model("claude-opus-4-1", "Claude Opus 4.1", false),
        model("claude-haiku-4-5", "Claude Haiku 4.5", false),
    ]
}

/// The demo's runtimes: name, provider, and how its daemon answers.
fn runtimes() -> [(&'static str, &'static str, Source); 3] {
    [
        (
            "demo-laptop",
            "claude",
            Source::Fixed(Discovery::Found {
                models: catalogue(),
                supported: true,
                fallback: false,
            }),
        ),
        (
            "empty-box",
            "codex",
            Source::Fixed(Discovery::Found {
                models: Vec::new(),
                supported: true,
                fallback: false,
            }),
        ),
        (
            "broken-box",
            "codex",
            // A real command, so the page shows what a failing one looks like.
            Source::Command("echo 'codex: not signed in; run codex login' >&2; exit 2".into()),
        ),
    ]
}

pub fn demo(args: DemoArgs) -> Result<(), String> {
    init_logging();
    let dir = tempfile::Builder::new()
        .prefix("model-relay-demo-")
        .tempdir()
        .map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let path = dir.path().join("relay.db");
    let settings = Settings::default();
    let url = DatabaseUrl::Sqlite {
        path: path.clone(),
        synchronous: Synchronous::Normal,
    };
    let store = url
        .open(settings.timeouts)
        .map_err(|e| format!("cannot open {}: {}", path.display(), error_chain(&e)))?;
    tracing::info!(database = %path.display(), "demo data (deleted when the demo stops)");
    let (api_token, daemons) = seed(store.as_ref()).map_err(|e| format!("cannot set up: {e}"))?;
    let app = Arc::new(App::new(store, Arc::new(SystemClock), settings));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let ran = runtime.block_on(serve(args.listen, Arc::clone(&app), &api_token, daemons));
    drop(runtime);
    drop(app);
    // Deleted here rather than on drop so that a failure to delete is said.
    dir.close()
        .map_err(|e| format!("cannot delete the demo's temp dir: {e}"))?;
    ran
}

/// What a demo daemon needs besides the server's URL, which is known only once we listen.
struct SeededRuntime {
    id: RuntimeId,
    token: Token,
    source: Source,
}

/// A workspace and the demo's runtimes, straight in the store: the API token, and each
/// runtime's daemon settings.
fn seed(store: &dyn Storer) -> Result<(Token, Vec<SeededRuntime>), String> {
    let now = SystemClock.now();
    let workspace = WorkspaceId::random().map_err(|e| e.to_string())?;
    let api_token = Token::new_api().map_err(|e| e.to_string())?;
    store
        .create_workspace(workspace, "demo", &api_token.hash(), now)
        .map_err(|e| error_chain(&e))?;
    let mut daemons = Vec::new();
    // A millisecond apart, so the list (oldest first) shows them in this order.
    for ((name, provider, source), at) in runtimes().into_iter().zip(now..) {
        let id = RuntimeId::random().map_err(|e| e.to_string())?;
        let token = Token::new_daemon().map_err(|e| e.to_string())?;
        let new = NewRuntime {
            id,
            workspace_id: workspace,
            name: name.to_owned(),
            provider: provider.to_owned(),
            daemon_token: token.hash(),
        };
        store
            .create_runtime(&new, at)
            .map_err(|e| error_chain(&e))?;
        daemons.push(SeededRuntime { id, token, source });
    }
    Ok((api_token, daemons))
}

async fn serve(
    listen: SocketAddr,
    app: Arc<App>,
    api_token: &Token,
    daemons: Vec<SeededRuntime>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e} (try --listen 127.0.0.1:0)"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let server_url = format!("http://{local}");
    // Daemons stop first, so that their last reports still find the server up.
    let (stop_daemons, daemons_stopped) = watch::channel(false);
    let (stop_server, server_stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(crate::run(
        listener,
        Arc::clone(&app),
        until_stopped(server_stopped),
    ));
    let mut running = Vec::new();
    for seeded in daemons {
        let mut config = daemon::Config::new(&server_url, seeded.id, seeded.token, seeded.source)?;
        config.heartbeat_interval = DEMO_HEARTBEAT;
        running.push(tokio::spawn(daemon::run(
            config,
            until_stopped(daemons_stopped.clone()),
        )));
    }
    // The token goes in the fragment: browsers never send it to the server, so it stays out
    // of any log of requested URLs.
    let banner = format!(
        "model-relay demo is running. Open this page:\n\n    {server_url}/#token={}\n\n\
         Three runtimes wait there: demo-laptop finds models, empty-box finds none,\n\
         and broken-box fails. Press Ctrl-C to stop; the demo's data is deleted then.",
        api_token.expose()
    );
    // Not println!: it panics when stdout is closed (`demo | head -3`), and the demo should
    // go on serving regardless.
    let _ = writeln!(std::io::stdout().lock(), "{banner}");
    stop_requested().await;
    let _ = stop_daemons.send(true);
    for daemon in running {
        match daemon.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "a demo daemon stopped on its own"),
            Err(e) => tracing::error!(error = %e, "a demo daemon panicked"),
        }
    }
    let _ = stop_server.send(true);
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("server failed: {e}")),
        Err(e) => Err(format!("server task failed: {e}")),
    }
}
