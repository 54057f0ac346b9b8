//! The service's Prometheus metrics: one registry per instance (so that several instances
//! in one test process keep apart), rendered in the text format by the `prometheus` crate.
//!
//! Counters and histograms are recorded as things happen: HTTP answers in the router,
//! store calls, claims and timeouts in [`MeteredStore`](metered::MeteredStore).
//! The gauges of stored requests are the sweeper's last count, kept here: a scrape never
//! reaches the store, and renderings are shared between scrapes ([`scrape`]).

pub mod metered;
pub mod scrape;

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use hyper::body::Bytes;

use crate::clock::Millis;
use crate::kind::Kind;
use crate::model::Status;
use crate::store::{Expired, RequestCounts};

/// Seconds; from a tenth of a millisecond (an SQLite read) to the store's longest wait.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

const STATUSES: [Status; 5] = [
    Status::Pending,
    Status::Running,
    Status::Completed,
    Status::Failed,
    Status::Timeout,
];

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

pub struct Metrics {
    registry: Registry,
    /// Answers by route template, method and status code.
    http_requests: IntCounterVec,
    /// Time from request head to response, by route template.
    http_duration: HistogramVec,
    /// Time of each store primitive, by operation, failures included.
    store_duration: HistogramVec,
    /// Store primitives that failed, by operation: the 503s' cause.
    store_errors: IntCounterVec,
    /// Requests handed to a daemon, by kind.
    claims: IntCounterVec,
    /// Requests ended as `timeout`, by the phase whose deadline they missed and kind.
    timeouts: IntCounterVec,
    /// Calls held on this instance now, by kind (heartbeat, read).
    held_calls: IntGaugeVec,
    /// 1 while the instance listens to the store for changes made elsewhere, else 0.
    listener_up: IntGauge,
    /// Keys whose waiters were woken, by who woke them (local, notification, recheck).
    wakeups: IntCounterVec,
    /// Answers from a runtime's catalog, by freshness (fresh, stale).
    catalog_answers: IntCounterVec,
    /// Discoveries started in the background because a stale catalog was answered from.
    catalog_refreshes: IntCounter,
    /// The stored requests per status as the sweeper last counted them; `None` before the
    /// first count, or when the last one failed. A scrape reads this and never the store,
    /// so a flood of scrapes costs the store nothing.
    counts: Mutex<Option<RequestCounts>>,
    scrapes: scrape::Scrapes,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "model_relay_http_requests_total",
                "HTTP requests answered, by route template, method and status code.",
            ),
            &["route", "method", "status"],
        );
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "model_relay_http_request_duration_seconds",
                "Time to answer an HTTP request, by route template.",
            ),
            &["route"],
        );
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "model_relay_store_operation_duration_seconds",
                "Time of one store operation, by operation.",
            )
            .buckets(STORE_BUCKETS.to_vec()),
            &["op"],
        );
        let store_errors = IntCounterVec::new(
            Opts::new(
                "model_relay_store_errors_total",
                "Store operations that failed, by operation.",
            ),
            &["op"],
        );
        let claims = IntCounterVec::new(
            Opts::new(
                "model_relay_claims_total",
                "Requests handed to a daemon by a heartbeat, by kind of request.",
            ),
            &["kind"],
        );
        let timeouts = IntCounterVec::new(
            Opts::new(
                "model_relay_timeouts_total",
                "Requests ended as timeout, by phase (pending: never claimed; running: no report in time) and kind of request.",
            ),
            &["phase", "kind"],
        );
        let held_calls = IntGaugeVec::new(
            Opts::new(
                "model_relay_held_calls",
                "Waiting calls held on this instance now, by kind (heartbeat, read).",
            ),
            &["kind"],
        );
        let listener_up = IntGauge::new(
            "model_relay_listener_up",
            "1 while this instance listens to the store for changes made by other instances, else 0 (waiting calls then rely on the once-a-second re-check).",
        );
        let wakeups = IntCounterVec::new(
            Opts::new(
                "model_relay_wakeups_total",
                "Held calls woken (per runtime or request woken), by source: local (a write of this instance), notification (the store's listener), recheck (the once-a-second re-check).",
            ),
            &["source"],
        );
        let catalog_answers = IntCounterVec::new(
            Opts::new(
                "model_relay_catalog_answers_total",
                "Model lists answered from a runtime's catalog without waiting for its daemon, by freshness (fresh: younger than --catalog-fresh; stale: older, served while a discovery runs).",
            ),
            &["freshness"],
        );
        let catalog_refreshes = IntCounter::new(
            "model_relay_catalog_refreshes_total",
            "Discoveries started in the background because a stale catalog was answered from.",
        );
        // The names and labels above are constants; they are valid and distinct, so
        // neither making nor registering them can fail (the tests render every family).
        let metrics = Metrics {
            http_requests: http_requests.expect("valid metric"),
            http_duration: http_duration.expect("valid metric"),
            store_duration: store_duration.expect("valid metric"),
            store_errors: store_errors.expect("valid metric"),
            claims: claims.expect("valid metric"),
            timeouts: timeouts.expect("valid metric"),
            held_calls: held_calls.expect("valid metric"),
            listener_up: listener_up.expect("valid metric"),
            wakeups: wakeups.expect("valid metric"),
            catalog_answers: catalog_answers.expect("valid metric"),
            catalog_refreshes: catalog_refreshes.expect("valid metric"),
            counts: Mutex::new(None),
            scrapes: scrape::Scrapes::default(),
            registry,
        };
        for collector in [
            Box::new(metrics.http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.http_duration.clone()),
            Box::new(metrics.store_duration.clone()),
            Box::new(metrics.store_errors.clone()),
            Box::new(metrics.claims.clone()),
            Box::new(metrics.timeouts.clone()),
            Box::new(metrics.held_calls.clone()),
            Box::new(metrics.listener_up.clone()),
            Box::new(metrics.wakeups.clone()),
            Box::new(metrics.catalog_answers.clone()),
            Box::new(metrics.catalog_refreshes.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("distinct metric names");
        }
        // Every phase and kind from the start, so a dashboard sees 0 rather than no series.
        for kind in Kind::ALL {
            metrics.claims.with_label_values(&[kind.name()]);
            for phase in [Status::Pending, Status::Running] {
                metrics
                    .timeouts
                    .with_label_values(&[phase.as_str(), kind.name()]);
            }
        }
        for kind in ["heartbeat", "read"] {
            metrics.held_calls.with_label_values(&[kind]);
        }
        for source in ["local", "notification", "recheck"] {
            metrics.wakeups.with_label_values(&[source]);
        }
        for freshness in ["fresh", "stale"] {
            metrics.catalog_answers.with_label_values(&[freshness]);
        }
        metrics
    }

    pub fn observe_http(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.http_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[route])
            .observe(took.as_secs_f64());
    }

    pub fn observe_store(&self, op: &str, took: Duration, ok: bool) {
        self.store_duration
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.with_label_values(&[op]).inc();
        }
    }

    /// A call of `kind` starts (`+1`) or stops (`-1`) being held.
    pub fn held(&self, kind: &str, delta: i64) {
        self.held_calls.with_label_values(&[kind]).add(delta);
    }

    /// The instance's listener opened (`true`) or failed (`false`).
    pub fn listening(&self, up: bool) {
        self.listener_up.set(i64::from(up));
    }

    /// The waiters of one key were woken by `source`.
    pub fn woke(&self, source: &str) {
        self.wakeups.with_label_values(&[source]).inc();
    }

    /// A model list answered from a catalog; `refreshed`: a discovery was started beside it.
    pub fn answered_from_catalog(&self, stale: bool, refreshed: bool) {
        let freshness = if stale { "stale" } else { "fresh" };
        self.catalog_answers.with_label_values(&[freshness]).inc();
        if refreshed {
            self.catalog_refreshes.inc();
        }
    }

    pub fn claimed(&self, kind: Kind) {
        self.claims.with_label_values(&[kind.name()]).inc();
    }

    pub fn expired(&self, kind: Kind, expired: Expired) {
        for (phase, n) in [
            (Status::Pending, expired.pending),
            (Status::Running, expired.running),
        ] {
            if n > 0 {
                let labels = [phase.as_str(), kind.name()];
                self.timeouts.with_label_values(&labels).inc_by(n);
            }
        }
    }

    /// The stored requests per status, as just counted (`None`: the count failed).
    pub fn set_counts(&self, counts: Option<RequestCounts>) {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    /// [`Metrics::render`] for a scrape: a rendering that started after this call, shared
    /// with the other scrapes waiting for it (see [`scrape`]).
    pub async fn scrape(&self, now: impl FnOnce() -> Millis) -> Result<Bytes, String> {
        self.scrapes.text(|| self.render(now())).await
    }

    /// Every family in the text format. The gauges of stored requests are there only when
    /// the sweeper's last count succeeded: when the store could not be read, they are left
    /// out rather than shown stale or as zero, and the rest still helps explain the outage.
    pub fn render(&self, now: Millis) -> Result<String, String> {
        let mut families = self.registry.gather();
        let counts = *self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counts) = &counts {
            families.extend(gauges(counts, now).map_err(|e| e.to_string())?);
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

/// The scrape-time gauges, in a registry of their own made for this scrape.
fn gauges(
    counts: &RequestCounts,
    now: Millis,
) -> prometheus::Result<Vec<prometheus::proto::MetricFamily>> {
    let registry = Registry::new();
    let requests = IntGaugeVec::new(
        Opts::new(
            "model_relay_requests",
            "Stored requests by status (the same figure on every instance of one store).",
        ),
        &["status"],
    )?;
    for status in STATUSES {
        let n = i64::try_from(counts.of(status)).unwrap_or(i64::MAX);
        requests.with_label_values(&[status.as_str()]).set(n);
    }
    let oldest = Gauge::new(
        "model_relay_oldest_pending_age_seconds",
        "Age of the oldest pending request; 0 when none is pending.",
    )?;
    let age = counts
        .oldest_pending_created_at
        .map_or(0, |created| now.saturating_sub(created).max(0));
    oldest.set(Duration::from_millis(age.unsigned_abs()).as_secs_f64());
    registry.register(Box::new(requests))?;
    registry.register(Box::new(oldest))?;
    Ok(registry.gather())
}
