//! What the command line and the environment configure: the database and the durations.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::kind::PerKind;
use crate::model::Timeouts;
use crate::store::postgres::PoolMode;
use crate::store::sqlite::{self, Synchronous};
use crate::store::{self, DEFAULT_WAIT, Storer, postgres};

/// Where the requests live.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum DatabaseUrl {
    /// `sqlite:PATH[?synchronous=normal|full]` — a file, created if missing.
    Sqlite {
        path: PathBuf,
        synchronous: Synchronous,
    },
    /// `postgres://…` or `postgresql://…`, passed to the driver as written but for
    /// `pool_mode=session|transaction`, which is model-relay's own.
    Postgres { url: String, pool_mode: PoolMode },
}

impl DatabaseUrl {
    /// The default: an SQLite file in the working directory, so `serve` needs nothing installed.
    pub const DEFAULT: &'static str = "sqlite:model-relay.db";

    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err("sqlite: needs a file path, e.g. sqlite:model-relay.db".to_owned());
            }
            let synchronous = match query {
                "" | "synchronous=normal" => Synchronous::Normal,
                "synchronous=full" => Synchronous::Full,
                other => {
                    return Err(format!(
                        "unsupported sqlite option {other:?}: only synchronous=normal or synchronous=full"
                    ));
                }
            };
            Ok(DatabaseUrl::Sqlite {
                path: PathBuf::from(path),
                synchronous,
            })
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let (pool_mode, url) = PoolMode::from_url(s)?;
            Ok(DatabaseUrl::Postgres { url, pool_mode })
        } else {
            Err(format!(
                "unsupported database URL {:?}: use sqlite:PATH or postgres://…",
                redact(s)
            ))
        }
    }
}

impl DatabaseUrl {
    /// Opens the store this URL names, creating or upgrading its schema.
    pub fn open(&self, timeouts: impl Into<PerKind<Timeouts>>) -> store::Result<Arc<dyn Storer>> {
        self.open_with(timeouts, DEFAULT_WAIT)
    }

    /// [`open`](Self::open), with `wait` as the longest a store call waits for a
    /// connection, a lock or a statement before it fails.
    pub fn open_with(
        &self,
        timeouts: impl Into<PerKind<Timeouts>>,
        wait: Duration,
    ) -> store::Result<Arc<dyn Storer>> {
        let timeouts = timeouts.into();
        Ok(match self {
            DatabaseUrl::Sqlite { path, synchronous } => Arc::new(sqlite::SqliteStore::open_with(
                path,
                timeouts,
                sqlite::Options {
                    synchronous: *synchronous,
                    wait,
                },
            )?),
            DatabaseUrl::Postgres { url, pool_mode } => {
                Arc::new(postgres::PostgresStore::open_with(
                    url.parse()?,
                    timeouts,
                    postgres::Options {
                        wait,
                        pool_mode: *pool_mode,
                    },
                )?)
            }
        })
    }
}

/// The URL without a password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A duration as people write it: `30s`, `2m`, `1h 30m`, `500ms`. Zero is refused: a zero
/// timeout would end every request the moment it is made.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// [`parse_duration`] that also takes zero: for the catalog's windows, where zero turns
/// the window off.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// The service's timing rules. Defaults are those of DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Each kind's deadlines.
    pub timeouts: PerKind<Timeouts>,
    /// How long a terminal request of each kind stays readable before the sweeper deletes
    /// it.
    pub retention: PerKind<Duration>,
    /// A runtime with no heartbeat for this long is offline.
    pub offline_after: Duration,
    /// How often the sweeper runs.
    pub sweep_every: Duration,
    /// On shutdown, how long in-flight requests may take to finish before they are dropped.
    pub drain_timeout: Duration,
    /// Largest request body accepted; past it the answer is 413.
    pub body_limit: usize,
    /// The longest a waiting call (held heartbeat, waiting read) is held; longer waits are
    /// clamped to it. Keep it under the idle timeout of any proxy in front.
    pub max_wait: Duration,
    /// How often the instance re-checks every held call against the store, whatever its
    /// listener says: the bound on what a lost notification costs. Tests set it very long
    /// to show that notifications alone wake waiters.
    pub recheck_every: Duration,
    /// Whether the instance listens to the store for changes made elsewhere. Off, waiting
    /// calls are woken by this instance's own writes and by the re-check only (River's
    /// "poll only"), where notifications cannot pass.
    pub listen: bool,
    /// The most waiting calls held at once; past it a waiting call is answered 503 `too
    /// many waiting calls` at once, so that they never starve ordinary calls.
    pub max_waiting: usize,
    /// The most heartbeats held at once for one runtime; past it a held heartbeat answers
    /// 429, so that one daemon token cannot take the places of every other.
    pub max_waiting_per_runtime: usize,
    /// The most waiting reads held at once for one workspace; past it a waiting read
    /// answers 429.
    pub max_waiting_per_workspace: usize,
    /// The most HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: usize,
    /// The most connections open at once; past it a new one is closed as it is accepted.
    pub max_connections: usize,
    /// A request's headers (and the next request's, on an idle connection) must arrive
    /// within this; its body within this or 10 s of the headers, whichever is shorter.
    pub read_timeout: Duration,
    /// A catalog younger than this is answered from without asking the daemon.
    pub catalog_fresh: Duration,
    /// A catalog younger than this (and older than `catalog_fresh`) is answered from while
    /// a discovery runs in the background.
    pub catalog_serve: Duration,
    /// The most runtimes a workspace may have: past it a create answers 409.
    pub max_runtimes_per_workspace: u64,
    /// The most requests a workspace may store (active, and ended within retention): past
    /// it a call that would store one more answers 429.
    pub max_requests_per_workspace: u64,
    /// The most model entries one report may carry: past it the report answers 400.
    pub max_models_per_report: usize,
    /// The largest body of a skill import's report (its files): the one body allowed past
    /// `body_limit`; past it the answer is 413.
    pub max_import_bytes: usize,
    /// The most bytes of answers one connection may hold that its client has not taken
    /// yet (an answer alone may be larger); past it a large answer is refused with 503.
    pub answer_bytes_per_connection: usize,
    /// The same over all connections together.
    pub answer_bytes_total: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeouts: PerKind::defaults(),
            retention: PerKind::retentions(),
            offline_after: Duration::from_secs(45),
            sweep_every: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            body_limit: 1024 * 1024,
            max_wait: Duration::from_secs(25),
            recheck_every: Duration::from_secs(1),
            listen: true,
            max_waiting: 10_000,
            max_waiting_per_runtime: 2,
            max_waiting_per_workspace: 100,
            max_streams_per_connection: 100,
            max_connections: 8_192,
            read_timeout: Duration::from_secs(30),
            catalog_fresh: Duration::from_secs(60),
            catalog_serve: Duration::from_secs(24 * 3600),
            max_runtimes_per_workspace: 1_000,
            max_requests_per_workspace: 10_000,
            max_models_per_report: 500,
            max_import_bytes: 8 * 1024 * 1024,
            answer_bytes_per_connection: 4 * 1024 * 1024,
            answer_bytes_total: 256 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_name_their_engine() {
        let sqlite = |path: &str, synchronous| DatabaseUrl::Sqlite {
            path: path.into(),
            synchronous,
        };
        assert_eq!(
            DatabaseUrl::parse("sqlite:model-relay.db"),
            Ok(sqlite("model-relay.db", Synchronous::Normal))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/relay.db"),
            Ok(sqlite("/var/lib/relay.db", Synchronous::Normal))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:r.db?synchronous=full"),
            Ok(sqlite("r.db", Synchronous::Full))
        );
        assert!(DatabaseUrl::parse("sqlite:r.db?synchronous=off").is_err());
        assert!(DatabaseUrl::parse("sqlite:r.db?mode=ro").is_err());
        let postgres = |url: &str, pool_mode| DatabaseUrl::Postgres {
            url: url.to_owned(),
            pool_mode,
        };
        assert_eq!(
            DatabaseUrl::parse("postgres://u@h/db"),
            Ok(postgres("postgres://u@h/db", PoolMode::Session))
        );
        // model-relay's own parameter is taken out; the driver's stay, in order.
        assert_eq!(
            DatabaseUrl::parse("postgres://u@h:6432/db?pool_mode=transaction"),
            Ok(postgres("postgres://u@h:6432/db", PoolMode::Transaction))
        );
        assert_eq!(
            DatabaseUrl::parse(
                "postgres://h/db?sslmode=disable&pool_mode=session&application_name=r"
            ),
            Ok(postgres(
                "postgres://h/db?sslmode=disable&application_name=r",
                PoolMode::Session
            ))
        );
        let err = DatabaseUrl::parse("postgres://h/db?pool_mode=statement").unwrap_err();
        assert!(err.contains("session or transaction"), "{err}");
        assert!(DatabaseUrl::parse("postgresql://h/db").is_ok());
        assert!(DatabaseUrl::parse("sqlite:").is_err());
        assert!(DatabaseUrl::parse("mysql://h/db").is_err());
        assert!(DatabaseUrl::parse("").is_err());
    }

    #[test]
    fn unsupported_url_errors_do_not_show_the_password() {
        let err = DatabaseUrl::parse("mysql://admin:hunter2@db/x").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("admin:***@db/x"), "{err}");
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("30").is_err());
    }
}
