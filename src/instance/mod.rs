//! One instance of the service: its store, clock, settings and metrics, the calls held on
//! it ([`Waiters`]), and the background work that belongs to them — the sweeper and the
//! wake-up thread — started by [`App::start_background`] and stopped when the
//! [`Background`] guard is stopped or dropped (mini-redis's `DbDropGuard`). The HTTP layer
//! only serves: it reads and writes through `App` and never starts a task of its own.

pub mod waiters;
mod wakeups;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use waiters::{Caps, Source, TooManyWaiting, Waiters};

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::metrics::metered::MeteredStore;
use crate::store::Storer;
use crate::sweeper;

/// Everything a request handler needs: shared by every connection of one instance.
pub struct App {
    /// The engine, wrapped so that every call is recorded in `metrics`.
    pub store: Arc<dyn Storer>,
    /// The one clock: every `now` a handler passes to the store comes from here.
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    /// This instance's metrics, served at `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// The waiting calls held on this instance, by what they wait for.
    pub waiters: Waiters,
    /// True once shutdown has begun: held calls answer at once, so that draining does not
    /// wait for them.
    stopping: watch::Sender<bool>,
    /// Origins whose pages may call the UI routes from a browser (`--cors-origin`).
    pub cors_origins: Vec<String>,
    /// The bearer token `/metrics` requires, if any (`--metrics-token`).
    pub metrics_token: Option<String>,
    /// `/metrics` is served on a listener of its own (`--metrics-listen`), not here.
    pub metrics_elsewhere: bool,
}

impl App {
    /// An instance over `store`, with metrics of its own that every store call records in.
    pub fn new(store: Arc<dyn Storer>, clock: Arc<dyn Clock>, settings: Settings) -> Self {
        let metrics = Arc::new(Metrics::new());
        App {
            store: Arc::new(MeteredStore::new(store, Arc::clone(&metrics))),
            clock,
            settings,
            waiters: Waiters::new(
                Arc::clone(&metrics),
                Caps {
                    total: settings.max_waiting,
                    per_runtime: settings.max_waiting_per_runtime,
                    per_workspace: settings.max_waiting_per_workspace,
                },
            ),
            metrics,
            stopping: watch::Sender::new(false),
            cors_origins: Vec::new(),
            metrics_token: None,
            metrics_elsewhere: false,
        }
    }

    /// The same instance, answering CORS for pages on `origins` (UI routes only).
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Counts the stored requests now, for the metrics, as the sweeper does after each
    /// sweep. Blocking (a store call).
    pub fn count_requests(&self) {
        self.metrics.set_counts(self.store.count_requests().ok());
    }

    /// The same instance, with `/metrics` behind `Authorization: Bearer <token>`.
    pub fn with_metrics_token(mut self, token: Option<String>) -> Self {
        self.metrics_token = token;
        self
    }

    /// Shutdown begins: every held call answers now, and no new call is held.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn shutdown_begun(&self) {
        let mut stopping = self.stopping.subscribe();
        // An error means the sender is gone, which only happens with `self`: not here.
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Starts the instance's background work: the sweeper (a task) and the wake-up thread
    /// (a thread, since it blocks on the store's listener). Must be called on a runtime.
    pub fn start_background(self: &Arc<Self>) -> Background {
        let (stop_sweeper, sweeper_stopped) = watch::channel(());
        let metrics = Arc::clone(&self.metrics);
        let sweeper = tokio::spawn(sweeper::run(
            Arc::clone(&self.store),
            Arc::clone(&self.clock),
            self.settings.sweep_every,
            self.settings.retention,
            sweeper_stopped,
            move |counts| metrics.set_counts(counts),
        ));
        let stop_wakeups = Arc::new(AtomicBool::new(false));
        let wakeups = {
            let app = Arc::clone(self);
            let stop = Arc::clone(&stop_wakeups);
            thread::Builder::new()
                .name("model-relay-wakeups".into())
                .spawn(move || wakeups::run(&app, &stop))
        };
        let wakeups = match wakeups {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread, held calls still end when their wait does: they are
                // answered late, never wrongly. Say so loudly.
                tracing::error!(error = %e, "cannot start the wake-up thread");
                None
            }
        };
        Background {
            stop_sweeper: Some(stop_sweeper),
            sweeper: Some(sweeper),
            stop_wakeups,
            wakeups,
        }
    }
}

/// The instance's background work. [`Background::stop`] stops it and waits for it; a drop
/// only tells it to stop.
pub struct Background {
    /// Dropping it tells the sweeper to stop.
    stop_sweeper: Option<watch::Sender<()>>,
    sweeper: Option<JoinHandle<()>>,
    /// Read by the wake-up thread between two waits on the listener.
    stop_wakeups: Arc<AtomicBool>,
    wakeups: Option<thread::JoinHandle<()>>,
}

/// The longest the wake-up thread blocks on its listener: how long a stop may take to be
/// noticed.
pub(crate) const WAKEUP_SLICE: Duration = Duration::from_millis(100);

impl Background {
    /// Stops the sweeper (after its current sweep) and the wake-up thread, and waits for
    /// both.
    pub async fn stop(mut self) {
        self.signal();
        if let Some(sweeper) = self.sweeper.take() {
            let _ = sweeper.await;
        }
        if let Some(wakeups) = self.wakeups.take() {
            // Joining blocks; the thread notices the flag within one slice.
            let _ = tokio::task::spawn_blocking(move || wakeups.join()).await;
        }
    }

    fn signal(&mut self) {
        self.stop_sweeper.take();
        self.stop_wakeups.store(true, Ordering::Relaxed);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.signal();
    }
}
