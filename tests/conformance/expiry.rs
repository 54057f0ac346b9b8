//! Deadlines and housekeeping: overdue requests end as timeouts wherever they are seen, an
//! ended request never changes again, and the sweeper ends, counts and deletes in batches.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use model_relay::ids::{RequestId, RuntimeId};
use model_relay::model::{Report, Status, StoredRequest};
use model_relay::store::{Expired, RequestCounts, Scoped, Storer};
use model_relay::sweeper::{BATCH, sweep_once};

use crate::common::timeout_error;
use crate::common::{
    PENDING_MS, RUNNING_MS, T0, TIMEOUTS, Tenant, completed, create, failed, get, running,
    runtime_in, tenant, workspace,
};
use crate::common::{kind, kind_tests, set_kind};
use crate::support::engines::Engine;

kind_tests!(
    with_pgbouncer TIMEOUTS;
    reads_end_an_overdue_running_request_as_timeout,
    get_request_by_token_ends_an_overdue_request_first,
    terminal_status_is_final,
    expire_request_ends_only_the_phase_it_names,
    expire_overdue_ends_only_overdue_active_requests,
    expire_overdue_works_in_bounded_batches_oldest_deadline_first,
    retention_deletes_only_requests_ended_before_the_cutoff_in_bounded_batches,
    sweep_expires_then_deletes_after_retention,
    concurrent_sweeps_from_two_handles_end_and_delete_each_request_once,
    count_requests_counts_each_status_and_the_oldest_pending,
    checkpoint_keeps_every_request,
);

fn reads_end_an_overdue_running_request_as_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let deadline = T0 + RUNNING_MS;
    assert_eq!(
        get(store.as_ref(), t.runtime, id, deadline - 1).status,
        Status::Running
    );
    let r = get(store.as_ref(), t.runtime, id, deadline + 123);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some(timeout_error(Status::Running).as_str())
    );
    assert_eq!(
        (r.ended_at, r.updated_at),
        (Some(deadline), deadline),
        "it ended at its deadline, not when someone looked"
    );
    assert_eq!(
        store.find_request(t.runtime, id).unwrap().unwrap(),
        r,
        "the read stored the timeout"
    );
}

fn get_request_by_token_ends_an_overdue_request_first(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, api) = workspace(store.as_ref());
    let (rt, _) = runtime_in(store.as_ref(), ws, T0);
    let id = create(store.as_ref(), rt, T0).id;
    let read = |now| match store.get_request_by_token(&api, rt, id, now).unwrap() {
        Scoped::Found(Some(request)) => request,
        other => panic!("expected the request, got {other:?}"),
    };
    assert_eq!(read(T0 + PENDING_MS - 1).status, Status::Pending);
    let ended = read(T0 + PENDING_MS);
    assert_eq!(ended.status, Status::Timeout);
    assert_eq!(ended.ended_at, Some(T0 + PENDING_MS));
    assert_eq!(
        store.find_request(rt, id).unwrap().unwrap().status,
        Status::Timeout,
        "the expiry is stored, not only shown"
    );
}

fn terminal_status_is_final(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let ended = [
        {
            let id = running(store.as_ref(), t.runtime, T0);
            store
                .report(t.runtime, kind(), id, &completed(), T0)
                .unwrap();
            id
        },
        {
            let id = running(store.as_ref(), t.runtime, T0);
            store
                .report(t.runtime, kind(), id, &failed("x"), T0)
                .unwrap();
            id
        },
        {
            let id = create(store.as_ref(), t.runtime, T0).id;
            assert!(
                store
                    .expire_request(id, kind(), Status::Pending, T0 + PENDING_MS)
                    .unwrap()
            );
            id
        },
    ];
    let before: Vec<StoredRequest> = ended
        .iter()
        .map(|&id| get(store.as_ref(), t.runtime, id, T0 + PENDING_MS))
        .collect();
    let later = T0 + 10 * RUNNING_MS;
    for &id in &ended {
        for phase in [Status::Pending, Status::Running, Status::Timeout] {
            assert!(!store.expire_request(id, kind(), phase, later).unwrap());
        }
        for report in [completed(), failed("y"), Report::Running] {
            store.report(t.runtime, kind(), id, &report, later).unwrap();
        }
    }
    store.claim_next_pending(t.runtime, kind(), later).unwrap();
    assert_eq!(
        store.expire_overdue(kind(), later, 100).unwrap(),
        Expired::default()
    );
    let after: Vec<StoredRequest> = ended
        .iter()
        .map(|&id| get(store.as_ref(), t.runtime, id, later))
        .collect();
    assert_eq!(after, before);
}

fn expire_request_ends_only_the_phase_it_names(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let late = T0 + RUNNING_MS;
    assert!(
        !store
            .expire_request(id, kind(), Status::Pending, late)
            .unwrap(),
        "it is running, not pending: the compare-and-set misses"
    );
    assert_eq!(
        get_raw(store.as_ref(), t.runtime, id).status,
        Status::Running
    );
    assert!(
        !store
            .expire_request(id, kind(), Status::Running, late - 1)
            .unwrap(),
        "not yet overdue"
    );
    assert!(
        store
            .expire_request(id, kind(), Status::Running, late)
            .unwrap()
    );
    let r = get_raw(store.as_ref(), t.runtime, id);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some(timeout_error(Status::Running).as_str())
    );
    assert_eq!(r.ended_at, Some(late));
}

/// The request as stored, no expiry applied.
fn get_raw(store: &dyn Storer, runtime: RuntimeId, id: RequestId) -> StoredRequest {
    store
        .find_request(runtime, id)
        .unwrap()
        .expect("request exists")
}

fn expire_overdue_ends_only_overdue_active_requests(engine: &dyn Engine) {
    let store = engine.open();
    let (a, b, c, d) = (
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
    );
    let old_pending = create(store.as_ref(), a.runtime, T0).id;
    let old_running = running(store.as_ref(), b.runtime, T0);
    let fresh_pending = create(store.as_ref(), c.runtime, T0 + RUNNING_MS).id;
    let done = running(store.as_ref(), d.runtime, T0);
    store
        .report(d.runtime, kind(), done, &completed(), T0 + 1)
        .unwrap();

    assert_eq!(
        store.expire_overdue(kind(), T0 + RUNNING_MS, 100).unwrap(),
        Expired {
            pending: 1,
            running: 1
        }
    );
    let status = |rt, id| store.find_request(rt, id).unwrap().unwrap().status;
    assert_eq!(status(a.runtime, old_pending), Status::Timeout);
    assert_eq!(status(b.runtime, old_running), Status::Timeout);
    assert_eq!(status(c.runtime, fresh_pending), Status::Pending);
    assert_eq!(status(d.runtime, done), Status::Completed);
    assert_eq!(
        store.expire_overdue(kind(), T0 + RUNNING_MS, 100).unwrap(),
        Expired::default(),
        "once only"
    );
    let pending_error = store
        .find_request(a.runtime, old_pending)
        .unwrap()
        .unwrap()
        .error;
    assert_eq!(
        pending_error.as_deref(),
        Some(timeout_error(Status::Pending).as_str())
    );
}

fn expire_overdue_works_in_bounded_batches_oldest_deadline_first(engine: &dyn Engine) {
    let store = engine.open();
    // Five overdue pending requests with deadlines one millisecond apart, oldest first,
    // and two overdue running ones.
    let pending: Vec<(RuntimeId, RequestId)> = (0..5)
        .map(|i| {
            let t = tenant(store.as_ref());
            (t.runtime, create(store.as_ref(), t.runtime, T0 + i).id)
        })
        .collect();
    let running_ones: Vec<(RuntimeId, RequestId)> = (0..2)
        .map(|_| {
            let t = tenant(store.as_ref());
            (t.runtime, running(store.as_ref(), t.runtime, T0))
        })
        .collect();
    let now = T0 + RUNNING_MS + 10;
    let status = |(rt, id): (RuntimeId, RequestId)| get_raw(store.as_ref(), rt, id).status;

    assert_eq!(
        store.expire_overdue(kind(), now, 3).unwrap(),
        Expired {
            pending: 3,
            running: 0
        },
        "pending first, at most the limit"
    );
    let ended: Vec<Status> = pending.iter().map(|&p| status(p)).collect();
    assert_eq!(
        ended,
        [
            Status::Timeout,
            Status::Timeout,
            Status::Timeout,
            Status::Pending,
            Status::Pending
        ],
        "the oldest deadlines first"
    );
    assert_eq!(
        store.expire_overdue(kind(), now, 3).unwrap(),
        Expired {
            pending: 2,
            running: 1
        }
    );
    assert_eq!(
        store.expire_overdue(kind(), now, 3).unwrap(),
        Expired {
            pending: 0,
            running: 1
        },
        "fewer than the limit: nothing is left"
    );
    assert_eq!(
        store.expire_overdue(kind(), now, 3).unwrap(),
        Expired::default()
    );
    assert!(
        pending
            .iter()
            .chain(&running_ones)
            .all(|&r| status(r) == Status::Timeout)
    );
}

fn retention_deletes_only_requests_ended_before_the_cutoff_in_bounded_batches(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    // Five requests, ended at T0+1 … T0+5, then one active.
    let ended: Vec<RequestId> = (1..=5)
        .map(|i| {
            let id = running(store.as_ref(), t.runtime, T0);
            store
                .report(t.runtime, kind(), id, &completed(), T0 + i)
                .unwrap();
            id
        })
        .collect();
    let active = create(store.as_ref(), t.runtime, T0).id;
    let exists = |id| store.find_request(t.runtime, id).unwrap().is_some();

    // Cutoff T0+4: the three that ended at +1, +2, +3 go, two per batch at most.
    assert_eq!(store.delete_ended_before(kind(), T0 + 4, 2).unwrap(), 2);
    assert_eq!(store.delete_ended_before(kind(), T0 + 4, 2).unwrap(), 1);
    assert_eq!(store.delete_ended_before(kind(), T0 + 4, 2).unwrap(), 0);
    let left: Vec<bool> = ended.iter().map(|&id| exists(id)).collect();
    assert_eq!(left, vec![false, false, false, true, true]);
    assert_eq!(store.delete_ended_before(kind(), i64::MAX, 100).unwrap(), 2);
    assert!(exists(active), "an active request is never deleted");
}

fn sweep_expires_then_deletes_after_retention(engine: &dyn Engine) {
    let store = engine.open();
    let retention = Duration::from_secs(600);
    let many = tenant(store.as_ref());
    // More than one delete batch of ended requests.
    let batch = i64::from(BATCH);
    for i in 0..batch + 3 {
        let id = running(store.as_ref(), many.runtime, T0);
        store
            .report(many.runtime, kind(), id, &failed("x"), T0 + i % 7)
            .unwrap();
    }
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;

    let swept = sweep_once(store.as_ref(), T0 + PENDING_MS, retention).unwrap();
    assert_eq!((swept.expired, swept.deleted), (1, 0));
    let r = store.find_request(t.runtime, id).unwrap().unwrap();
    assert_eq!(r.status, Status::Timeout);

    // Readable until retention after it ended, gone after.
    let ended = T0 + PENDING_MS;
    let last_moment = ended + 600_000;
    let swept = sweep_once(store.as_ref(), last_moment, retention).unwrap();
    assert_eq!(
        swept.deleted,
        (batch + 3) as u64,
        "the old ones, over several batches"
    );
    assert!(
        store
            .get_request(t.runtime, id, last_moment)
            .unwrap()
            .is_some()
    );
    let swept = sweep_once(store.as_ref(), last_moment + 1, retention).unwrap();
    assert_eq!(swept.expired, 0);
    assert_eq!(swept.deleted, 1);
    assert_eq!(
        store.get_request(t.runtime, id, last_moment + 1).unwrap(),
        None
    );
}

/// Several instances sweep at once: between them every overdue request is ended once and
/// every old one deleted once, and the counts they report add up to exactly that.
fn concurrent_sweeps_from_two_handles_end_and_delete_each_request_once(engine: &dyn Engine) {
    // Threads of their own start with the default kind: they are told this one.
    let case_kind = kind();
    let handles = [engine.open(), engine.open()];
    let store = handles[0].as_ref();
    let overdue = i64::from(BATCH) + 7;
    let old = i64::from(BATCH) + 11;
    let t = tenant(store);
    // Old ended requests: ended at T0.
    for _ in 0..old {
        let id = running(store, t.runtime, T0);
        store
            .report(t.runtime, kind(), id, &completed(), T0)
            .unwrap();
    }
    // Overdue pending requests, one per runtime (a runtime has one active request).
    for _ in 0..overdue {
        let other = tenant(store);
        create(store, other.runtime, T0);
    }
    let retention = Duration::from_secs(60);
    // Past retention for the old ones, not for requests that time out now (they end at
    // their deadline, T0 + 30 s).
    let now = T0 + RUNNING_MS + 1;
    let barrier = Arc::new(Barrier::new(2));
    let swept: Vec<(u64, u64)> = thread::scope(|s| {
        let workers: Vec<_> = handles
            .iter()
            .map(|store| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    set_kind(case_kind);
                    barrier.wait();
                    let swept = sweep_once(store.as_ref(), now, retention).unwrap();
                    (swept.expired, swept.deleted)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let expired: u64 = swept.iter().map(|s| s.0).sum();
    let deleted: u64 = swept.iter().map(|s| s.1).sum();
    assert_eq!(
        expired, overdue as u64,
        "each overdue request ended once: {swept:?}"
    );
    assert_eq!(
        deleted, old as u64,
        "each old request deleted once: {swept:?}"
    );
    let counts = store.count_requests().unwrap();
    assert_eq!(
        (counts.pending, counts.completed, counts.timeout),
        (0, 0, overdue as u64)
    );
}

fn count_requests_counts_each_status_and_the_oldest_pending(engine: &dyn Engine) {
    let store = engine.open();
    assert_eq!(store.count_requests().unwrap(), RequestCounts::default());

    let t: Vec<Tenant> = (0..6).map(|_| tenant(store.as_ref())).collect();
    create(store.as_ref(), t[0].runtime, T0 + 20);
    create(store.as_ref(), t[1].runtime, T0 + 10);
    running(store.as_ref(), t[2].runtime, T0 + 5);
    let done = running(store.as_ref(), t[3].runtime, T0);
    store
        .report(t[3].runtime, kind(), done, &completed(), T0)
        .unwrap();
    let broken = running(store.as_ref(), t[4].runtime, T0);
    store
        .report(t[4].runtime, kind(), broken, &failed("x"), T0)
        .unwrap();
    // Created first of all, but it timed out: no longer the oldest pending request.
    let stale = create(store.as_ref(), t[5].runtime, T0).id;
    assert!(
        store
            .expire_request(stale, kind(), Status::Pending, T0 + PENDING_MS)
            .unwrap()
    );

    let counts = store.count_requests().unwrap();
    assert_eq!(
        counts,
        RequestCounts {
            pending: 2,
            running: 1,
            completed: 1,
            failed: 1,
            timeout: 1,
            oldest_pending_created_at: Some(T0 + 10),
        }
    );
    assert_eq!(counts.of(Status::Failed), 1);

    assert!(
        store
            .claim_next_pending(t[1].runtime, kind(), T0 + 30)
            .unwrap()
            .claimed
            .is_some()
    );
    let counts = store.count_requests().unwrap();
    assert_eq!((counts.pending, counts.running), (1, 2));
    assert_eq!(counts.oldest_pending_created_at, Some(T0 + 20));
}

fn checkpoint_keeps_every_request(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let ids: Vec<RequestId> = (0..20)
        .map(|i| {
            let id = running(store.as_ref(), t.runtime, T0 + i);
            store
                .report(t.runtime, kind(), id, &completed(), T0 + i)
                .unwrap();
            id
        })
        .collect();
    store.checkpoint().unwrap();
    let other = engine.open();
    for id in ids {
        assert_eq!(
            get_raw(other.as_ref(), t.runtime, id).status,
            Status::Completed
        );
    }
}
