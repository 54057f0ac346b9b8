//! The calls held on this instance, by what they wait for: heartbeats by runtime (waiting
//! for a request to become pending), reads by request (waiting for its status to change).
//!
//! A waiter holds no store connection and no thread: it is an async task parked on a
//! [`Notify`]. Whoever learns of a change wakes the waiters of its key — a handler of this
//! instance right after its write ([`Source::Local`]), the store's listener
//! ([`Source::Notification`]), or the re-check of every waiter against one query
//! ([`Source::Recheck`]). A woken waiter reads the store again and goes back to waiting if
//! nothing it cares about changed, so a spurious wake costs one read, never a wrong answer.
//!
//! A waiter registers *before* it first reads the store: a change between that read and
//! its wait then still wakes it (`Notify::notify_waiters` reaches every `Notified` made
//! before the call, polled or not).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::clock::Millis;
use crate::ids::{RequestId, RuntimeId, WorkspaceId};
use crate::metrics::Metrics;
use crate::model::Status;
use crate::store::Active;

/// Who woke a waiter, for the metrics.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// A write of this instance.
    Local,
    /// The store's listener: a notification from another instance or process.
    Notification,
    /// The periodic re-check of every waiter against the store.
    Recheck,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Notification => "notification",
            Source::Recheck => "recheck",
        }
    }
}

/// What a kind of held call is called in the metrics.
const HEARTBEAT: &str = "heartbeat";
const READ: &str = "read";

/// The waiters of one key.
struct Entry {
    notify: Arc<Notify>,
    /// Calls held on this key now; the entry goes when the last one does.
    holders: usize,
    /// Reads only: how many of the holders wait for a change from pending, and from
    /// running. The re-check wakes the key when the stored status differs from either.
    from_pending: usize,
    from_running: usize,
}

impl Entry {
    fn new() -> Self {
        Entry {
            notify: Arc::new(Notify::new()),
            holders: 0,
            from_pending: 0,
            from_running: 0,
        }
    }
}

pub struct Waiters {
    heartbeats: Mutex<HashMap<RuntimeId, Entry>>,
    reads: Mutex<HashMap<RequestId, Entry>>,
    /// Waiting reads held now, by workspace (a read is keyed by request, and one
    /// workspace's reads may wait on many).
    reading: Mutex<HashMap<WorkspaceId, usize>>,
    metrics: Arc<Metrics>,
    /// Calls registered now, of both kinds: held calls then never take every connection
    /// and thread from ordinary ones.
    registered: AtomicUsize,
    caps: Caps,
}

/// The most held calls there may be, in all and per tenant: with shares, one tenant's
/// flood takes its own share, never another's place.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Of both kinds together (`--max-waiting`).
    pub total: usize,
    /// Heartbeats held for one runtime (`--max-waiting-per-runtime`): its daemon needs one,
    /// two while a lost call's connection lingers.
    pub per_runtime: usize,
    /// Waiting reads of one workspace (`--max-waiting-per-workspace`).
    pub per_workspace: usize,
}

/// Registering one more held call would pass a cap.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TooManyWaiting {
    /// `--max-waiting`: the instance holds as many calls as it may.
    Total,
    /// The runtime's share of held heartbeats is taken.
    Runtime,
    /// The workspace's share of waiting reads is taken.
    Workspace,
}

fn lock<T>(map: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change to a map is whole before its guard drops: a poisoned map is consistent.
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Waiters {
    /// A registry that holds calls up to `caps`.
    pub fn new(metrics: Arc<Metrics>, caps: Caps) -> Self {
        Waiters {
            heartbeats: Mutex::default(),
            reads: Mutex::default(),
            reading: Mutex::default(),
            metrics,
            registered: AtomicUsize::new(0),
            caps,
        }
    }

    /// Registers a heartbeat held for `runtime` until the guard drops.
    pub fn hold_heartbeat(
        &self,
        runtime: RuntimeId,
    ) -> Result<Held<'_, RuntimeId>, TooManyWaiting> {
        // The share is checked and taken under the map's lock: two heartbeats of one
        // runtime arriving together cannot both take its last place.
        let notify = {
            let mut map = lock(&self.heartbeats);
            let holders = map.get(&runtime).map_or(0, |entry| entry.holders);
            if holders >= self.caps.per_runtime {
                return Err(TooManyWaiting::Runtime);
            }
            self.reserve()?;
            register(&mut map, runtime)
        };
        Ok(Held::new(
            self,
            &self.heartbeats,
            runtime,
            HEARTBEAT,
            notify,
            None,
        ))
    }

    /// Registers a read of `workspace` waiting on request `id` until the guard drops.
    pub fn hold_read(
        &self,
        id: RequestId,
        workspace: WorkspaceId,
    ) -> Result<Held<'_, RequestId>, TooManyWaiting> {
        {
            let mut reading = lock(&self.reading);
            let count = reading.entry(workspace).or_insert(0);
            if *count >= self.caps.per_workspace {
                return Err(TooManyWaiting::Workspace);
            }
            if let Err(e) = self.reserve() {
                if *count == 0 {
                    reading.remove(&workspace);
                }
                return Err(e);
            }
            *count += 1;
        }
        let notify = register(&mut lock(&self.reads), id);
        Ok(Held::new(
            self,
            &self.reads,
            id,
            READ,
            notify,
            Some(workspace),
        ))
    }

    /// Takes one place among `--max-waiting`, or says there is none.
    fn reserve(&self) -> Result<(), TooManyWaiting> {
        self.registered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.caps.total).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| TooManyWaiting::Total)
    }

    /// Wakes the heartbeats held for `runtime`: a request of it became pending.
    pub fn wake_runtime(&self, runtime: RuntimeId, source: Source) {
        wake(&self.heartbeats, &runtime, source, &self.metrics);
    }

    /// Wakes the reads waiting on `id`: its status changed.
    pub fn wake_request(&self, id: RequestId, source: Source) {
        wake(&self.reads, &id, source, &self.metrics);
    }

    /// Whether any call is held: the re-check has nothing to do otherwise.
    pub fn is_empty(&self) -> bool {
        lock(&self.heartbeats).is_empty() && lock(&self.reads).is_empty()
    }

    /// Compares every waiter with the store's active requests (read in one query) and
    /// wakes those the store has moved past: a held heartbeat whose runtime has a pending
    /// request; a read whose request is no longer in the status it waits to leave, has
    /// ended (it is not active any more), or is overdue (the read will end it).
    pub fn recheck(&self, active: &[Active], now: Millis, source: Source) {
        let pending: HashSet<RuntimeId> = active
            .iter()
            .filter(|a| a.status == Status::Pending)
            .map(|a| a.runtime_id)
            .collect();
        let woken: Vec<Arc<Notify>> = lock(&self.heartbeats)
            .iter()
            .filter(|(runtime, _)| pending.contains(runtime))
            .map(|(_, entry)| Arc::clone(&entry.notify))
            .collect();
        self.notify_all(woken, source);

        let by_id: HashMap<RequestId, &Active> = active.iter().map(|a| (a.id, a)).collect();
        let woken: Vec<Arc<Notify>> = lock(&self.reads)
            .iter()
            .filter(|(id, entry)| match by_id.get(id) {
                None => true,
                Some(a) => {
                    a.deadline_at <= now
                        || (entry.from_pending > 0 && a.status != Status::Pending)
                        || (entry.from_running > 0 && a.status != Status::Running)
                }
            })
            .map(|(_, entry)| Arc::clone(&entry.notify))
            .collect();
        self.notify_all(woken, source);
    }

    fn notify_all(&self, woken: Vec<Arc<Notify>>, source: Source) {
        // Counted first: a woken call may answer (and its caller read the metrics) before
        // this thread runs again.
        for notify in woken {
            self.metrics.woke(source.label());
            notify.notify_waiters();
        }
    }
}

/// Counts one more holder of `key`, and gives what it waits on.
fn register<K: Eq + Hash>(map: &mut HashMap<K, Entry>, key: K) -> Arc<Notify> {
    let entry = map.entry(key).or_insert_with(Entry::new);
    entry.holders += 1;
    Arc::clone(&entry.notify)
}

fn wake<K: Eq + Hash>(map: &Mutex<HashMap<K, Entry>>, key: &K, source: Source, metrics: &Metrics) {
    let notify = lock(map).get(key).map(|entry| Arc::clone(&entry.notify));
    if let Some(notify) = notify {
        metrics.woke(source.label());
        notify.notify_waiters();
    }
}

/// One held call's registration; it ends when the guard drops.
pub struct Held<'a, K: Eq + Hash + Copy> {
    waiters: &'a Waiters,
    map: &'a Mutex<HashMap<K, Entry>>,
    key: K,
    kind: &'static str,
    /// What the waiter parks on.
    notify: Arc<Notify>,
    /// A read's workspace, whose share it takes.
    workspace: Option<WorkspaceId>,
    /// The status a read waits to leave, once it has read it.
    baseline: Option<Status>,
    /// Whether the call is counted as held in the metrics: from its first wait on.
    counted: bool,
}

impl<'a, K: Eq + Hash + Copy> Held<'a, K> {
    /// The guard of a call already registered (and counted in its shares).
    fn new(
        waiters: &'a Waiters,
        map: &'a Mutex<HashMap<K, Entry>>,
        key: K,
        kind: &'static str,
        notify: Arc<Notify>,
        workspace: Option<WorkspaceId>,
    ) -> Self {
        Held {
            waiters,
            map,
            key,
            kind,
            notify,
            workspace,
            baseline: None,
            counted: false,
        }
    }

    /// The call has read the store once since registering and now parks: from here on it
    /// counts as held (`model_relay_held_calls`). Only a wake-up can answer it sooner than
    /// its wait.
    pub fn parked(&mut self) {
        if !self.counted {
            self.counted = true;
            self.waiters.metrics.held(self.kind, 1);
        }
    }

    /// What to wait on. Take a fresh one before each read of the store, so that a change
    /// made during the read wakes it.
    pub fn notify(&self) -> Arc<Notify> {
        Arc::clone(&self.notify)
    }
}

impl Held<'_, RequestId> {
    /// Records the status this read waits to leave (pending or running), for the re-check.
    pub fn waits_to_leave(&mut self, status: Status) {
        let mut map = lock(self.map);
        if let Some(entry) = map.get_mut(&self.key) {
            if let Some(old) = self.baseline.take() {
                count_for(entry, old, false);
            }
            count_for(entry, status, true);
            self.baseline = Some(status);
        }
    }
}

fn count_for(entry: &mut Entry, status: Status, add: bool) {
    let counter = match status {
        Status::Pending => &mut entry.from_pending,
        Status::Running => &mut entry.from_running,
        // A read never waits on an ended request.
        Status::Completed | Status::Failed | Status::Timeout => return,
    };
    if add {
        *counter += 1;
    } else {
        *counter = counter.saturating_sub(1);
    }
}

impl<K: Eq + Hash + Copy> Drop for Held<'_, K> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        if let Some(entry) = map.get_mut(&self.key) {
            if let Some(old) = self.baseline {
                count_for(entry, old, false);
            }
            entry.holders -= 1;
            if entry.holders == 0 {
                map.remove(&self.key);
            }
        }
        drop(map);
        if let Some(workspace) = self.workspace {
            let mut reading = lock(&self.waiters.reading);
            if let Some(count) = reading.get_mut(&workspace) {
                *count -= 1;
                if *count == 0 {
                    reading.remove(&workspace);
                }
            }
        }
        self.waiters.registered.fetch_sub(1, Ordering::AcqRel);
        if self.counted {
            self.waiters.metrics.held(self.kind, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(id: RequestId, runtime: RuntimeId, status: Status, deadline_at: Millis) -> Active {
        Active {
            id,
            runtime_id: runtime,
            status,
            deadline_at,
        }
    }

    fn caps(total: usize) -> Caps {
        Caps {
            total,
            per_runtime: total,
            per_workspace: total,
        }
    }

    fn workspace() -> WorkspaceId {
        WorkspaceId::random().unwrap()
    }

    /// Whether `notify` was woken since `notified` was made.
    fn woken(notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        matches!(notified.poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn recheck_wakes_a_heartbeat_only_when_its_runtime_has_a_pending_request() {
        let waiters = Waiters::new(Arc::new(Metrics::new()), caps(100));
        let (rt, other) = (RuntimeId::random().unwrap(), RuntimeId::random().unwrap());
        let held = waiters.hold_heartbeat(rt).unwrap();
        let notify = held.notify();
        let mut notified = std::pin::pin!(notify.notified());
        let id = RequestId::random().unwrap();
        waiters.recheck(
            &[active(id, other, Status::Pending, 10)],
            0,
            Source::Recheck,
        );
        waiters.recheck(&[active(id, rt, Status::Running, 10)], 0, Source::Recheck);
        assert!(!woken(notified.as_mut()));
        waiters.recheck(&[active(id, rt, Status::Pending, 10)], 0, Source::Recheck);
        assert!(woken(notified.as_mut()));
    }

    #[test]
    fn recheck_wakes_a_read_when_its_request_left_the_status_it_waits_on() {
        let waiters = Waiters::new(Arc::new(Metrics::new()), caps(100));
        let rt = RuntimeId::random().unwrap();
        let id = RequestId::random().unwrap();
        let mut held = waiters.hold_read(id, workspace()).unwrap();
        held.waits_to_leave(Status::Pending);
        let notify = held.notify();
        let mut notified = std::pin::pin!(notify.notified());
        waiters.recheck(&[active(id, rt, Status::Pending, 10)], 0, Source::Recheck);
        assert!(!woken(notified.as_mut()), "unchanged");
        waiters.recheck(&[active(id, rt, Status::Running, 10)], 0, Source::Recheck);
        assert!(woken(notified.as_mut()), "claimed");

        let mut notified = std::pin::pin!(notify.notified());
        waiters.recheck(&[active(id, rt, Status::Pending, 10)], 10, Source::Recheck);
        assert!(woken(notified.as_mut()), "overdue: the read will end it");

        let mut notified = std::pin::pin!(notify.notified());
        waiters.recheck(&[], 0, Source::Recheck);
        assert!(woken(notified.as_mut()), "ended: no longer active");
    }

    #[test]
    fn a_read_registered_from_pending_is_woken_even_after_another_waits_from_running() {
        // Two reads of one request that arrived at different times: the older one waits
        // to leave pending, the newer one to leave running. Once running, the older must
        // be woken by a re-check although the newer's baseline matches.
        let waiters = Waiters::new(Arc::new(Metrics::new()), caps(100));
        let rt = RuntimeId::random().unwrap();
        let id = RequestId::random().unwrap();
        let mut older = waiters.hold_read(id, workspace()).unwrap();
        older.waits_to_leave(Status::Pending);
        let mut newer = waiters.hold_read(id, workspace()).unwrap();
        newer.waits_to_leave(Status::Running);
        let notify = older.notify();
        let mut notified = std::pin::pin!(notify.notified());
        waiters.recheck(&[active(id, rt, Status::Running, 10)], 0, Source::Recheck);
        assert!(woken(notified.as_mut()));
        drop(older);
        let mut notified = std::pin::pin!(notify.notified());
        waiters.recheck(&[active(id, rt, Status::Running, 10)], 0, Source::Recheck);
        assert!(
            !woken(notified.as_mut()),
            "only the newer is left, and nothing changed"
        );
    }

    #[test]
    fn past_max_waiting_no_call_is_registered_until_one_ends() {
        let waiters = Waiters::new(Arc::new(Metrics::new()), caps(2));
        let (rt, other) = (RuntimeId::random().unwrap(), RuntimeId::random().unwrap());
        let id = RequestId::random().unwrap();
        let a = waiters.hold_heartbeat(rt).unwrap();
        let _b = waiters.hold_read(id, workspace()).unwrap();
        let total = Some(TooManyWaiting::Total);
        assert_eq!(waiters.hold_heartbeat(other).err(), total);
        assert_eq!(waiters.hold_read(id, workspace()).err(), total);
        drop(a);
        assert!(waiters.hold_heartbeat(other).is_ok());
    }

    #[test]
    fn a_runtime_holds_its_share_of_heartbeats_and_no_more() {
        let waiters = Waiters::new(
            Arc::new(Metrics::new()),
            Caps {
                per_runtime: 2,
                ..caps(100)
            },
        );
        let (rt, other) = (RuntimeId::random().unwrap(), RuntimeId::random().unwrap());
        let first = waiters.hold_heartbeat(rt).unwrap();
        let _second = waiters.hold_heartbeat(rt).unwrap();
        let over = waiters.hold_heartbeat(rt).err();
        assert_eq!(over, Some(TooManyWaiting::Runtime));
        assert!(
            waiters.hold_heartbeat(other).is_ok(),
            "another runtime's share"
        );
        drop(first);
        assert!(waiters.hold_heartbeat(rt).is_ok(), "a place freed");
    }

    #[test]
    fn a_workspace_holds_its_share_of_reads_over_all_its_requests_and_no_more() {
        let waiters = Waiters::new(
            Arc::new(Metrics::new()),
            Caps {
                per_workspace: 2,
                ..caps(100)
            },
        );
        let (flooder, other) = (workspace(), workspace());
        let [a, b, c] = [(); 3].map(|()| RequestId::random().unwrap());
        let first = waiters.hold_read(a, flooder).unwrap();
        let _second = waiters.hold_read(b, flooder).unwrap();
        let over = waiters.hold_read(c, flooder).err();
        assert_eq!(over, Some(TooManyWaiting::Workspace));
        assert!(
            waiters.hold_read(a, other).is_ok(),
            "another workspace's share"
        );
        drop(first);
        assert!(waiters.hold_read(c, flooder).is_ok(), "a place freed");
    }

    #[test]
    fn a_read_refused_by_the_total_takes_no_share_of_its_workspace() {
        let waiters = Waiters::new(
            Arc::new(Metrics::new()),
            Caps {
                per_workspace: 1,
                ..caps(1)
            },
        );
        let (ws, other) = (workspace(), workspace());
        let id = RequestId::random().unwrap();
        let held = waiters.hold_read(id, other).unwrap();
        let over = waiters.hold_read(id, ws).err();
        assert_eq!(over, Some(TooManyWaiting::Total));
        drop(held);
        assert!(waiters.hold_read(id, ws).is_ok(), "its share is whole");
    }

    #[test]
    fn the_last_guard_to_drop_removes_the_key() {
        let waiters = Waiters::new(Arc::new(Metrics::new()), caps(100));
        let rt = RuntimeId::random().unwrap();
        let a = waiters.hold_heartbeat(rt).unwrap();
        let b = waiters.hold_heartbeat(rt).unwrap();
        drop(a);
        assert!(!waiters.is_empty());
        drop(b);
        assert!(waiters.is_empty());
    }
}
