//! `--metrics-listen`: `/metrics` alone on an address of its own, for scrapers. Its
//! answers come from memory, so it needs no store and no connection slot of the API's.
//!
//! Scrapers are few and quick, so the listener keeps few connections and gives each little
//! time: headers within [`HEADER_TIMEOUT`], and when every slot is taken, a newcomer takes
//! the slot of the longest-open connection that is not being answered, so that sockets
//! left open (or trickling headers) never lock a scraper out.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use super::routes;
use crate::instance::App;

/// The most connections open at once.
const CONNECTIONS: usize = 64;

/// A scrape's headers must arrive within this (or `--read-timeout`, if shorter), and so
/// must the next ones on a kept-alive connection: a scraper sends them at once.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a newcomer waits for the slot an evicted connection gives back.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Open {
    /// A scrape is being answered: not to be evicted.
    answering: AtomicBool,
    /// Told to close, to make room.
    evict: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    next: u64,
    open: BTreeMap<u64, Arc<Open>>,
}

impl Registry {
    fn add(registry: &Mutex<Self>) -> (u64, Arc<Open>) {
        let mut r = registry.lock().unwrap_or_else(PoisonError::into_inner);
        let key = r.next;
        r.next += 1;
        let open = Arc::new(Open::default());
        r.open.insert(key, Arc::clone(&open));
        (key, open)
    }

    fn remove(registry: &Mutex<Self>, key: u64) {
        let mut r = registry.lock().unwrap_or_else(PoisonError::into_inner);
        r.open.remove(&key);
    }

    /// Tells the oldest connection that is not answering to close. False if every one is.
    fn evict_one(registry: &Mutex<Self>) -> bool {
        let mut r = registry.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = r
            .open
            .iter()
            .find(|(_, open)| !open.answering.load(Ordering::Acquire))
            .map(|(key, _)| *key);
        match idle.and_then(|key| r.open.remove(&key)) {
            Some(open) => {
                open.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `/metrics` alone on `tcp` until `shutdown` completes: HTTP/1.1, at most
/// [`CONNECTIONS`] connections, evicting an idle one for a newcomer when all are taken
/// (and closing the newcomer when none is idle).
pub async fn serve_metrics(
    tcp: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if Registry::evict_one(&registry) => None,
            Err(_) => continue,
        };
        // Registered here, not in the task: a task not yet run must already count as an
        // open connection the next newcomer can evict, or that newcomer finds no one to
        // evict and is closed.
        let (key, open) = Registry::add(&registry);
        let (app, slots, registry) = (Arc::clone(&app), Arc::clone(&slots), Arc::clone(&registry));
        tokio::spawn(async move {
            let slot = match slot {
                Some(slot) => Some(slot),
                // The evicted connection gives its slot back as soon as its task sees the
                // notice; another newcomer may take it first, and then this one closes.
                None => tokio::select! {
                    acquired = tokio::time::timeout(EVICTION_WAIT, slots.acquire_owned()) => {
                        acquired.ok().and_then(Result::ok)
                    }
                    () = open.evict.notified() => None,
                },
            };
            if let Some(_slot) = slot {
                serve_one(app, &open, stream).await;
            }
            Registry::remove(&registry, key);
        });
    }
}

async fn serve_one(app: Arc<App>, open: &Arc<Open>, stream: TcpStream) {
    let header_timeout = HEADER_TIMEOUT.min(app.settings.read_timeout);
    let answering = Arc::clone(open);
    let service = service_fn(move |request| {
        let app = Arc::clone(&app);
        let answering = Arc::clone(&answering);
        async move {
            answering.answering.store(true, Ordering::Release);
            let response = routes::metrics_only(app, request).await;
            answering.answering.store(false, Ordering::Release);
            Ok::<_, Infallible>(response.map(Full::new))
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        () = open.evict.notified() => {}
    }
}
