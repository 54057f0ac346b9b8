//! Claims and heartbeats: a pending request is handed out once, with a lease; heartbeats
//! record when a daemon was last seen; a hand-out whose answer was lost is handed out again.

use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::ids::{RequestId, Token};
use model_relay::model::{Report, Status};
use model_relay::store::{Claim, Daemon, Expired, Heartbeat, Storer};

use crate::common::alive;
use crate::common::timeout_error;
use crate::common::{
    PENDING_MS, RUNNING_MS, T0, TIMEOUTS, Tenant, completed, create, failed, get, new_id, running,
    tenant,
};
use crate::common::{kind, kind_tests, set_kind};
use crate::support::engines::Engine;

kind_tests!(
    with_pgbouncer TIMEOUTS;
    claim_moves_the_pending_request_to_running_with_a_lease,
    claim_hands_out_a_request_at_most_once,
    concurrent_claims_from_two_handles_hand_out_one_request_once,
    claim_only_sees_its_own_runtime,
    expired_pending_request_is_never_claimed_and_becomes_timeout,
    heartbeat_writes_last_seen_only_when_older_than_refresh_after,
    heartbeat_of_a_runtime_deleted_since_its_token_was_read_is_unknown,
    daemon_by_token_tells_whether_a_request_is_pending,
    daemon_by_token_names_the_running_request_until_it_is_renewed,
    a_lost_hand_out_is_handed_out_again_only_when_working_on_omits_it,
    a_renewed_or_expired_request_is_never_handed_out_again,
);

/// What the store says of a tenant's daemon token.
fn daemon(store: &dyn Storer, t: &Tenant) -> Daemon {
    store
        .daemon_by_token(&t.daemon_token)
        .unwrap()
        .expect("the tenant's daemon token")
}

/// A heartbeat as the HTTP layer makes it: the token read, then the beat.
fn beat(store: &dyn Storer, t: &Tenant, now: i64, refresh_after: i64) -> Heartbeat {
    store
        .heartbeat(&daemon(store, t), now, refresh_after, None, false)
        .unwrap()
}

fn claim_moves_the_pending_request_to_running_with_a_lease(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let at = T0 + 5_000;
    assert_eq!(
        store
            .claim_next_pending(t.runtime, kind(), at)
            .unwrap()
            .claimed,
        Some(id)
    );
    let r = get(store.as_ref(), t.runtime, id, at);
    assert_eq!(r.status, Status::Running);
    assert_eq!(r.deadline_at, at + RUNNING_MS);
    assert_eq!(r.updated_at, at);
    assert_eq!(r.created_at, T0);
}

fn claim_hands_out_a_request_at_most_once(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    assert_eq!(
        beat(store.as_ref(), &t, T0, 0),
        alive(store.as_ref(), t.runtime, id)
    );
    assert_eq!(
        beat(store.as_ref(), &t, T0 + 1, 0),
        Heartbeat::Alive(vec![])
    );
    assert_eq!(
        store
            .claim_next_pending(t.runtime, kind(), T0 + 2)
            .unwrap()
            .claimed,
        None
    );
}

fn concurrent_claims_from_two_handles_hand_out_one_request_once(engine: &dyn Engine) {
    // Threads of their own start with the default kind: they are told this one.
    let case_kind = kind();
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let id = create(handles[0].as_ref(), t.runtime, now).id;
        let barrier = Arc::new(Barrier::new(2));
        let claims: Vec<Option<RequestId>> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        set_kind(case_kind);
                        barrier.wait();
                        store
                            .claim_next_pending(t.runtime, kind(), now)
                            .unwrap()
                            .claimed
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let handed: Vec<RequestId> = claims.into_iter().flatten().collect();
        assert_eq!(handed, vec![id], "round {round}: claimed exactly once");
        handles[1]
            .report(t.runtime, kind(), id, &failed("next round"), now)
            .unwrap();
    }
}

fn claim_only_sees_its_own_runtime(engine: &dyn Engine) {
    let store = engine.open();
    let a = tenant(store.as_ref());
    let b = tenant(store.as_ref());
    let id = create(store.as_ref(), a.runtime, T0).id;
    assert_eq!(
        store
            .claim_next_pending(b.runtime, kind(), T0)
            .unwrap()
            .claimed,
        None
    );
    assert_eq!(
        store
            .claim_next_pending(a.runtime, kind(), T0)
            .unwrap()
            .claimed,
        Some(id)
    );
}

fn expired_pending_request_is_never_claimed_and_becomes_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let deadline = T0 + PENDING_MS;
    assert_eq!(
        store
            .claim_next_pending(t.runtime, kind(), deadline)
            .unwrap(),
        Claim {
            claimed: None,
            input: None,
            expired: Expired::one(Status::Pending)
        },
        "it says what it ended"
    );
    let r = store.find_request(t.runtime, id).unwrap().unwrap();
    assert_eq!(r.status, Status::Timeout, "the claim ended it");
    assert_eq!(
        r.error.as_deref(),
        Some(timeout_error(Status::Pending).as_str())
    );
    assert_eq!((r.ended_at, r.updated_at), (Some(deadline), deadline));
}

fn heartbeat_writes_last_seen_only_when_older_than_refresh_after(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let seen = |s: &dyn Storer| {
        s.find_runtime(t.workspace, t.runtime)
            .unwrap()
            .unwrap()
            .last_seen_at
    };
    assert_eq!(daemon(store.as_ref(), &t).last_seen_at, None, "never seen");
    assert_eq!(beat(store.as_ref(), &t, T0, 1000), Heartbeat::Alive(vec![]));
    assert_eq!(seen(store.as_ref()), Some(T0), "first heartbeat is written");
    assert_eq!(daemon(store.as_ref(), &t).last_seen_at, Some(T0));
    beat(store.as_ref(), &t, T0 + 1000, 1000);
    assert_eq!(
        seen(store.as_ref()),
        Some(T0),
        "seen within refresh_after: not rewritten"
    );
    beat(store.as_ref(), &t, T0 + 1001, 1000);
    assert_eq!(
        seen(store.as_ref()),
        Some(T0 + 1001),
        "older than refresh_after: written"
    );
    // A skipped write still claims what is pending.
    let id = create(store.as_ref(), t.runtime, T0 + 1002).id;
    assert_eq!(
        beat(store.as_ref(), &t, T0 + 1003, 1000),
        alive(store.as_ref(), t.runtime, id)
    );
    assert_eq!(seen(store.as_ref()), Some(T0 + 1001));
}

fn heartbeat_of_a_runtime_deleted_since_its_token_was_read_is_unknown(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let found = daemon(store.as_ref(), &t);
    assert!(store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert_eq!(
        store.heartbeat(&found, T0, 1000, None, false).unwrap(),
        Heartbeat::UnknownRuntime
    );
}

fn daemon_by_token_tells_whether_a_request_is_pending(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let other = tenant(store.as_ref());
    let pending = |s: &dyn Storer| daemon(s, &t).any_pending();
    assert!(!pending(store.as_ref()), "nothing created");
    create(store.as_ref(), other.runtime, T0);
    assert!(!pending(store.as_ref()), "another runtime's request");
    let id = create(store.as_ref(), t.runtime, T0).id;
    assert!(pending(store.as_ref()));
    assert_eq!(
        store
            .claim_next_pending(t.runtime, kind(), T0 + 1)
            .unwrap()
            .claimed,
        Some(id)
    );
    assert!(!pending(store.as_ref()), "running is not pending");
    let stranger = Token::new_daemon().unwrap().hash();
    assert_eq!(store.daemon_by_token(&stranger).unwrap(), None);
}

/// A heartbeat as the HTTP layer makes it, with the daemon's `working_on`.
fn beat_holding(
    store: &dyn Storer,
    t: &Tenant,
    now: i64,
    working_on: Option<&[RequestId]>,
) -> Heartbeat {
    store
        .heartbeat(&daemon(store, t), now, 0, working_on, false)
        .unwrap()
}

fn daemon_by_token_names_the_running_request_until_it_is_renewed(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, vec![]);
    create(store.as_ref(), t.runtime, T0);
    assert_eq!(
        daemon(store.as_ref(), &t).unrenewed,
        vec![],
        "pending is not handed out"
    );
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, vec![(kind(), id)]);
    store
        .report(t.runtime, kind(), id, &Report::Running, T0 + 1)
        .unwrap();
    assert_eq!(daemon(store.as_ref(), &t).unrenewed, vec![], "renewed");
}

fn a_lost_hand_out_is_handed_out_again_only_when_working_on_omits_it(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let later = T0 + 1_000;
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, None),
        Heartbeat::Alive(vec![]),
        "without working_on nothing is handed out twice"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, Some(&[id])),
        Heartbeat::Alive(vec![]),
        "the daemon holds it"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, later, Some(&[new_id()])),
        alive(store.as_ref(), t.runtime, id),
        "the daemon does not hold it: its answer was lost"
    );
    let r = get(store.as_ref(), t.runtime, id, later);
    assert_eq!(r.status, Status::Running);
    assert_eq!(r.deadline_at, later + RUNNING_MS, "with a fresh lease");
}

fn a_renewed_or_expired_request_is_never_handed_out_again(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, kind(), id, &Report::Running, T0 + 1)
        .unwrap();
    assert!(
        !store.hand_out_again(t.runtime, kind(), id, T0 + 2).unwrap(),
        "renewed"
    );
    assert_eq!(
        beat_holding(store.as_ref(), &t, T0 + 2, Some(&[])),
        Heartbeat::Alive(vec![])
    );

    let other = tenant(store.as_ref());
    let lapsed = running(store.as_ref(), other.runtime, T0);
    assert!(
        !store
            .hand_out_again(other.runtime, kind(), lapsed, T0 + RUNNING_MS)
            .unwrap(),
        "its lease ran out"
    );
    assert!(
        !store
            .hand_out_again(t.runtime, kind(), lapsed, T0 + 1)
            .unwrap(),
        "another runtime's request"
    );
    store
        .report(other.runtime, kind(), lapsed, &completed(), T0 + 1)
        .ok();
    let third = tenant(store.as_ref());
    let pending = create(store.as_ref(), third.runtime, T0).id;
    assert!(
        !store
            .hand_out_again(third.runtime, kind(), pending, T0 + 1)
            .unwrap(),
        "pending"
    );
    assert_eq!(
        get(store.as_ref(), third.runtime, pending, T0 + 1).status,
        Status::Pending
    );
}
