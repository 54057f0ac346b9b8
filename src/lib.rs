//! model-relay: a durable broker for model-list discovery between a web UI and agent
//! daemons that sit behind NAT.
//!
//! The UI creates a *request*; the runtime's daemon claims it on its next heartbeat, runs
//! discovery and reports; the UI polls until the request ends. Every request lives in a
//! shared store, so any instance behind a load balancer answers any call.
//!
//! Module map:
//! - [`clock`]: the one source of time (milliseconds since the epoch); a fake for tests.
//! - [`ids`]: typed ids and tokens, parsed at the edge, random from the OS.
//! - [`kind`]: the kinds of request (models, local skills, a skill import, an update):
//!   the one table of what differs between them.
//! - [`model`]: the domain: request and runtime records, statuses, reports, deadlines.
//! - [`store`]: the `Storer` trait and its engines (memory, SQLite, PostgreSQL). Only
//!   these modules know SQL.
//! - [`http`]: the hyper server: routing, JSON wire shapes, waiting calls, the mapping of
//!   outcomes to status codes. [`run`] is the seam that starts an instance and serves it.
//! - [`instance`]: one instance: store, clock, settings, metrics, the registry of waiting
//!   calls, and the background work (sweeper, wake-up thread) started and stopped with it.
//! - [`sweeper`]: the background task that ends overdue requests and deletes old ones.
//! - [`metrics`]: the Prometheus registry of an instance and its text rendering.
//! - [`config`]: durations and database URLs as the command line gives them.
//! - [`cli`]: the `model-relay` command line.
//! - [`errors`]: the one-line cause chain every layer logs.
//! - [`tls`]: rustls at both ends: the server's reloadable certificate, the daemon's roots.
//! - [`daemon`]: the reference daemon: heartbeats, discovery, lease renewal, reports.
//! - [`demo`]: `model-relay demo`, the whole flow in one process.
//! - [`web`]: the page at `GET /`, embedded in the binary.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod errors;
pub mod http;
pub mod ids;
pub mod instance;
pub mod kind;
pub mod metrics;
pub mod model;
pub mod store;
pub mod sweeper;
pub mod tls;
pub mod web;

pub use instance::App;

use std::future::Future;
use std::sync::Arc;

/// Runs one instance on `listener` (a `TcpListener` for plain HTTP, or an
/// [`http::Listener::tls`]) until `shutdown` completes: its background work (the
/// sweeper, the wake-up thread) and the HTTP server. On shutdown, held calls are answered
/// at once, in-flight requests drain (up to a bound), then the background work stops.
pub async fn run(
    listener: impl Into<http::Listener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let background = app.start_background();
    let served = http::serve(listener.into(), app, shutdown).await;
    background.stop().await;
    served
}
