//! Creating a request: a pending request with a claim deadline, coalescing onto the active
//! one, and a new one once that has ended or run out of time.

use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::ids::{RequestId, RuntimeId};
use model_relay::model::{ReportOutcome, Status};
use model_relay::store::Expired;

use crate::common::new_request;
use crate::common::timeout_error;
use crate::common::{PENDING_MS, T0, TIMEOUTS, completed, create, get, new_id, running, tenant};
use crate::common::{kind, kind_tests, set_kind};
use crate::support::engines::{Engine, Postgres};

kind_tests!(
    with_pgbouncer TIMEOUTS;
    create_makes_a_pending_request_with_a_claim_deadline,
    create_for_a_missing_runtime_is_none,
    create_coalesces_while_a_request_is_pending_or_running,
    create_after_the_active_request_ended_makes_a_new_one,
    create_expires_an_overdue_active_request_and_makes_a_new_one,
    concurrent_creates_from_two_handles_coalesce_to_one_request,
);

fn create_makes_a_pending_request_with_a_claim_deadline(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = new_id();
    let created = store
        .create_or_coalesce(t.runtime, &new_request(id), T0)
        .unwrap()
        .unwrap();
    assert_eq!(created.expired, Expired::default());
    let r = created.request;
    assert_eq!(r.id, id);
    assert_eq!(r.runtime_id, t.runtime);
    assert_eq!(r.status, Status::Pending);
    assert!(r.models.is_empty() && r.supported && r.error.is_none());
    assert_eq!((r.created_at, r.updated_at), (T0, T0));
    assert_eq!(r.deadline_at, T0 + PENDING_MS);
    assert_eq!(r.ended_at, None);
    assert_eq!(get(store.as_ref(), t.runtime, id, T0), r);
}

fn create_for_a_missing_runtime_is_none(engine: &dyn Engine) {
    let store = engine.open();
    let missing = RuntimeId::random().unwrap();
    assert_eq!(
        store
            .create_or_coalesce(missing, &new_request(new_id()), T0)
            .unwrap(),
        None
    );
}

fn create_coalesces_while_a_request_is_pending_or_running(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let first = create(store.as_ref(), t.runtime, T0);
    let again = create(store.as_ref(), t.runtime, T0 + 1_000);
    assert_eq!(again, first, "pending: the same request, unchanged");

    store
        .claim_next_pending(t.runtime, kind(), T0 + 2_000)
        .unwrap();
    let while_running = create(store.as_ref(), t.runtime, T0 + 3_000);
    assert_eq!(while_running.id, first.id);
    assert_eq!(while_running.status, Status::Running);
}

fn create_after_the_active_request_ended_makes_a_new_one(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let first = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, kind(), first, &completed(), T0 + 1)
        .unwrap();
    let next = create(store.as_ref(), t.runtime, T0 + 2);
    assert_ne!(next.id, first);
    assert_eq!(next.status, Status::Pending);
    assert_eq!(
        get(store.as_ref(), t.runtime, first, T0 + 2).status,
        Status::Completed
    );
}

fn create_expires_an_overdue_active_request_and_makes_a_new_one(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let stale = create(store.as_ref(), t.runtime, T0).id;
    let later = T0 + PENDING_MS;
    let created = store
        .create_or_coalesce(t.runtime, &new_request(new_id()), later)
        .unwrap()
        .unwrap();
    assert_eq!(
        created.expired,
        Expired::one(Status::Pending),
        "it says what it ended"
    );
    let fresh = created.request;
    assert_ne!(fresh.id, stale);
    let old = store.find_request(t.runtime, stale).unwrap().unwrap();
    assert_eq!(old.status, Status::Timeout);
    assert_eq!(
        old.error.as_deref(),
        Some(timeout_error(Status::Pending).as_str())
    );
}

fn concurrent_creates_from_two_handles_coalesce_to_one_request(engine: &dyn Engine) {
    // Threads of their own start with the default kind: they are told this one.
    let case_kind = kind();
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let barrier = Arc::new(Barrier::new(2));
        let ids: Vec<RequestId> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        set_kind(case_kind);
                        barrier.wait();
                        create(store.as_ref(), t.runtime, now).id
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert_eq!(
            ids[0], ids[1],
            "round {round}: both creates got one request"
        );
        // End it, so the next round races to create a new one.
        let store = handles[0].as_ref();
        assert_eq!(
            store
                .claim_next_pending(t.runtime, kind(), now)
                .unwrap()
                .claimed,
            Some(ids[0])
        );
        assert_eq!(
            store
                .report(t.runtime, kind(), ids[0], &completed(), now)
                .unwrap(),
            ReportOutcome::Recorded
        );
    }
}

/// PostgreSQL only, because only there can a create see a runtime that a concurrent delete
/// is removing: the create's insert checks its foreign key under a lock, so it waits for
/// the uncommitted delete, and once that commits the answer is "no such runtime" — `None`,
/// as for any missing runtime, not a store error (which would be a 503).
#[test]
fn postgres_create_racing_an_uncommitted_delete_of_its_runtime_is_none() {
    // Threads of their own start with the default kind: they are told this one.
    let case_kind = kind();
    let Some(engine) = Postgres::new("create_racing_a_delete", TIMEOUTS) else {
        return;
    };
    let store = engine.open();
    let runtime = tenant(store.as_ref()).runtime;
    let config = engine.schema.config();
    let mut deleter = config.connect(::postgres::NoTls).expect("connect");
    let mut watcher = config.connect(::postgres::NoTls).expect("connect");
    let mut delete = deleter.transaction().expect("begin");
    delete
        .execute(
            "DELETE FROM runtimes WHERE id = $1",
            &[&runtime.to_string()],
        )
        .expect("delete");
    let xid: String = delete
        .query_one("SELECT txid_current()::text", &[])
        .expect("txid")
        .get(0);

    let creating = std::thread::spawn(move || {
        set_kind(case_kind);
        store.create_or_coalesce(runtime, &new_request(RequestId::random().unwrap()), T0)
    });
    // The create waits on the delete's transaction: its row lock, or its uncommitted
    // delete seen by the foreign key's check.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks
                  WHERE locktype = 'transactionid' AND NOT granted AND transactionid::text = $1",
                &[&xid],
            )
            .expect("pg_locks")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the create never waited on the delete"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    delete.commit().expect("commit");
    let created = creating.join().expect("create panicked");
    assert!(matches!(created, Ok(None)), "{created:?}");
}
