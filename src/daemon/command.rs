//! `model-relay daemon`: its arguments, and the glue from them to [`super::run`]. Also the
//! logging set-up and stop signal that `model-relay demo` shares.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{Config, SkillsDir, Source};
use crate::config::parse_duration;
use crate::ids::{RuntimeId, Token};

#[derive(Args)]
pub struct DaemonArgs {
    /// The relay's base URL, e.g. https://relay.example.com or http://127.0.0.1:8080.
    #[arg(long, env = "MODEL_RELAY_SERVER")]
    server: String,
    /// A PEM file of CA certificates to trust for an https:// server, besides the
    /// system's (a private CA).
    #[arg(long, value_name = "FILE", env = "MODEL_RELAY_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The runtime this daemon serves (its id from `POST /api/runtimes`).
    #[arg(long)]
    runtime_id: String,
    /// The runtime's daemon token. Prefer the environment variable: arguments are visible
    /// to other users of the machine.
    #[arg(long, env = "MODEL_RELAY_DAEMON_TOKEN", hide_env_values = true)]
    token: String,
    #[command(flatten)]
    source: SourceArgs,
    /// How often to renew the lease while discovery runs; also how long to pause between
    /// heartbeats when the server does not hold them, and the longest retry backoff.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    heartbeat_interval: Duration,
    /// How long each heartbeat asks the server to hold it until a request comes (the server
    /// clamps it to its --max-wait). 0s: no hold, a heartbeat every --heartbeat-interval.
    #[arg(long, value_parser = parse_wait, default_value = "25s")]
    heartbeat_wait: Duration,
    /// How long discovery may take before it is reported as failed.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    discover_timeout: Duration,
    /// A directory of skills, one subdirectory with a SKILL.md per skill, as Claude Code
    /// keeps them in ~/.claude/skills; PROVIDER=DIR names the provider (default claude).
    /// Repeatable. Without it, a skill list reports that skills are not supported.
    #[arg(long, value_name = "[PROVIDER=]DIR", value_parser = SkillsDir::parse)]
    skills_dir: Vec<SkillsDir>,
    /// The command that updates the runtime's CLI, run with `sh -c` and
    /// MODEL_RELAY_TARGET_VERSION set; its exit status decides the outcome. Without it, an
    /// update fails with "this daemon cannot update itself".
    #[arg(long, value_name = "CMD")]
    update_cmd: Option<String>,
    /// How long the update command may run before it is killed and the update fails.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    update_timeout: Duration,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct SourceArgs {
    /// A JSON file: an array of {"id","label","provider"?,"default"?}, or
    /// {"models": [...], "supported": bool}. Read afresh for every request.
    #[arg(long)]
    models_file: Option<PathBuf>,
    /// A command, run with `sh -c`, that prints the same JSON on stdout.
    #[arg(long)]
    discover_cmd: Option<String>,
}

impl DaemonArgs {
    fn config(self) -> Result<Config, String> {
        let runtime_id = RuntimeId::parse(&self.runtime_id)
            .ok_or_else(|| format!("--runtime-id {:?} is not a UUID", self.runtime_id))?;
        let token = self.token.trim();
        if token.is_empty() {
            return Err("the daemon token is empty".to_owned());
        }
        let source = match (self.source.models_file, self.source.discover_cmd) {
            (Some(path), _) => Source::ModelsFile(path),
            (None, Some(command)) => Source::Command(command),
            // clap's group makes one of them required; this is only a clear answer if not.
            (None, None) => return Err("give --models-file or --discover-cmd".to_owned()),
        };
        let mut config = Config::new(&self.server, runtime_id, Token::from_header(token), source)?;
        if self.ca_cert.is_some() && !config.server.starts_with("https://") {
            return Err("--ca-cert is for an https:// server".to_owned());
        }
        config.ca_cert = self.ca_cert;
        config.heartbeat_interval = self.heartbeat_interval;
        config.heartbeat_wait = self.heartbeat_wait;
        config.discover_timeout = self.discover_timeout;
        config.skills_dirs = self.skills_dir;
        config.update_cmd = self.update_cmd;
        config.update_timeout = self.update_timeout;
        Ok(config)
    }
}

/// A duration as `--heartbeat-interval` takes it, or zero: `0s` is how to turn holding off.
fn parse_wait(s: &str) -> Result<Duration, String> {
    parse_duration(s).or_else(|refused| {
        humantime::parse_duration(s.trim())
            .ok()
            .filter(Duration::is_zero)
            .ok_or(refused)
    })
}

/// `model-relay daemon`: runs until SIGTERM or Ctrl-C, or until the server refuses it.
pub fn daemon(args: DaemonArgs) -> Result<(), String> {
    init_logging();
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime
        .block_on(super::run(config, stop_requested()))
        .map_err(|e| e.to_string())
}

/// Logs to stderr at `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second set-up (only possible in-process) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init();
}

/// Completes on Ctrl-C or SIGTERM. (`serve` has its own in `cli`; this one is kept apart so
/// the daemon does not depend on how the server's shutdown evolves.)
pub async fn stop_requested() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => tracing::info!("interrupted; stopping"),
        () = terminate => tracing::info!("SIGTERM; stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_wait_takes_a_duration_or_zero() {
        assert_eq!(parse_wait("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_wait(" 0s "), Ok(Duration::ZERO));
        assert_eq!(parse_wait("0ms"), Ok(Duration::ZERO));
        assert!(parse_wait("soon").is_err());
        assert!(parse_wait("-1s").is_err());
        assert!(
            parse_duration("0s").is_err(),
            "the interval still refuses zero"
        );
    }
}
