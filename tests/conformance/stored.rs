//! What a workspace stores: an answer from the catalog is one record per catalog version,
//! handed out again rather than copied; every insert and delete moves the workspace's count
//! of stored requests by exactly what it did; and past `--max-requests-per-workspace` a call
//! that would store one more is refused, whatever the number of handles at once, while what
//! is stored still answers.

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::ids::{RuntimeId, WorkspaceId};
use model_relay::model::{Outcome, Report, ReportOutcome, Status, StoredRequest};
use model_relay::store::{Added, Ask, Asked, Storer};

use crate::common::{
    PENDING_MS, T0, TIMEOUTS, Tenant, completed, create, get, models, new_id, running, runtime_in,
    tenant,
};
use crate::support::engines::{Engine, engine_tests};

// Model lists only: these cases count the catalog's answers beside discoveries; the count
// of every kind's inserts and deletes is the same code (create_or_coalesce_within, the
// sweeper, delete_runtime), run for every kind by `create` and `expiry`.
engine_tests!(
    with_pgbouncer TIMEOUTS;
    an_answer_from_the_catalog_is_handed_out_again_not_copied,
    a_newer_catalog_or_an_older_answer_is_stored_anew,
    the_stored_count_follows_every_insert_and_delete,
    a_full_workspace_stores_nothing_more_but_still_answers,
    concurrent_creates_from_many_handles_stop_at_the_limit,
);

const FRESH_MS: i64 = 60_000;
const SERVE_MS: i64 = 24 * 3_600_000;
/// Half the default retention, as the HTTP layer passes it.
const REUSE_MS: i64 = 300_000;

/// The picker's open at `now`, with the HTTP layer's windows.
pub fn ask_at(now: i64, max_stored: u64) -> Ask {
    Ask {
        id: new_id(),
        cached: new_id(),
        refresh: false,
        online: true,
        fresh: FRESH_MS,
        serve: SERVE_MS,
        reuse_after: now - REUSE_MS,
        max_stored,
    }
}

fn asked(store: &dyn Storer, t: &Tenant, now: i64, max_stored: u64) -> Asked {
    let runtime = store.find_runtime(t.workspace, t.runtime).unwrap().unwrap();
    store
        .ask_for_models(&runtime, &ask_at(now, max_stored), now)
        .unwrap()
}

/// The answer from the catalog an open of the picker got.
fn answer(store: &dyn Storer, t: &Tenant, now: i64) -> StoredRequest {
    match asked(store, t, now, u64::MAX) {
        Asked::Cached { answer, .. } => *answer,
        other => panic!("expected an answer from the catalog, got {other:?}"),
    }
}

/// A discovery that ends at `now` with `models`.
fn discovered_with(
    store: &dyn Storer,
    t: &Tenant,
    models: Vec<model_relay::model::ModelEntry>,
    now: i64,
) {
    let id = running(store, t.runtime, now);
    let report = Report::Ended(Outcome {
        result: None,
        status: Status::Completed,
        models,
        supported: true,
        error: None,
        fallback: false,
    });
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &report, now)
            .unwrap(),
        ReportOutcome::Recorded
    );
}

fn stored(store: &dyn Storer, workspace: WorkspaceId) -> u64 {
    store.stored_requests(workspace).unwrap()
}

/// Three hundred opens of the picker on one catalog store one record, not three hundred
/// copies of the list (issue 24: 300 opens of a 1 MB list grew the file by 289 MB).
fn an_answer_from_the_catalog_is_handed_out_again_not_copied(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered_with(store.as_ref(), &t, models(), T0);
    assert_eq!(stored(store.as_ref(), t.workspace), 1, "the discovery");
    let first = answer(store.as_ref(), &t, T0 + 1);
    assert_eq!(first.cached_at, Some(T0));
    let other = engine.open();
    for i in 0..300 {
        let handle = if i % 2 == 0 { &store } else { &other };
        assert_eq!(answer(handle.as_ref(), &t, T0 + 2 + i), first, "open {i}");
    }
    assert_eq!(
        stored(store.as_ref(), t.workspace),
        2,
        "the discovery and one answer"
    );
    // Still a real stored request, readable by id.
    assert_eq!(get(other.as_ref(), t.runtime, first.id, T0 + 400), first);
}

/// A record is handed out again only while it is the catalog as it stands and has ended
/// recently: a newer catalog (even one reported in the same millisecond, with other models)
/// and an answer older than the reuse window each get a record of their own.
fn a_newer_catalog_or_an_older_answer_is_stored_anew(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered_with(store.as_ref(), &t, models(), T0);
    let first = answer(store.as_ref(), &t, T0);

    // Another report in the same millisecond, with one model fewer: same `cached_at`.
    let fewer = models()[..1].to_vec();
    discovered_with(store.as_ref(), &t, fewer.clone(), T0);
    let second = answer(store.as_ref(), &t, T0 + 1);
    assert_ne!(second.id, first.id);
    assert_eq!((second.cached_at, &second.models), (Some(T0), &fewer));
    assert_eq!(answer(store.as_ref(), &t, T0 + 2), second);

    // A newer catalog.
    discovered_with(store.as_ref(), &t, models(), T0 + 10);
    let third = answer(store.as_ref(), &t, T0 + 11);
    assert_ne!(third.id, second.id);
    assert_eq!(third.cached_at, Some(T0 + 10));

    // The same catalog, its record ended longer ago than the window: readers of a record
    // handed out must find it for a while yet, so a new one is stored.
    let later = T0 + 11 + REUSE_MS + 1;
    let store_fresh = |now| {
        let runtime = store.find_runtime(t.workspace, t.runtime).unwrap().unwrap();
        let mut ask = ask_at(now, u64::MAX);
        ask.fresh = SERVE_MS; // still fresh, so no discovery is asked for
        store.ask_for_models(&runtime, &ask, now).unwrap()
    };
    let Asked::Cached { answer: fourth, .. } = store_fresh(later) else {
        panic!("expected an answer from the catalog");
    };
    assert_ne!(fourth.id, third.id);
    assert_eq!(fourth.cached_at, Some(T0 + 10));
    let Asked::Cached { answer: fifth, .. } = store_fresh(later + 1) else {
        panic!("expected an answer from the catalog");
    };
    assert_eq!(fifth, fourth);
}

/// The count the limit reads moves with each insert (a discovery, a stored answer) and
/// each delete (retention, a deleted runtime with its requests), and with nothing else:
/// coalescing, reuse, claims, reports and expiry store nothing new.
fn the_stored_count_follows_every_insert_and_delete(engine: &dyn Engine) {
    let store = engine.open();
    let s = store.as_ref();
    let t = tenant(s);
    let (other_runtime, _) = runtime_in(s, t.workspace, T0);
    let bystander = tenant(s);
    assert_eq!(stored(s, t.workspace), 0);

    let first = create(s, t.runtime, T0);
    assert_eq!(create(s, t.runtime, T0 + 1).id, first.id, "coalesced");
    assert_eq!(stored(s, t.workspace), 1);
    create(s, other_runtime, T0);
    create(s, bystander.runtime, T0);
    assert_eq!(stored(s, t.workspace), 2);
    assert_eq!(stored(s, bystander.workspace), 1);

    // Claimed and reported: the catalog is written, nothing new is stored.
    assert_eq!(
        s.claim_next_pending(t.runtime, Kind::Models, T0 + 2)
            .unwrap()
            .claimed,
        Some(first.id)
    );
    s.report(t.runtime, Kind::Models, first.id, &completed(), T0 + 3)
        .unwrap();
    assert_eq!(stored(s, t.workspace), 2);
    let cached = answer(s, &t, T0 + 4);
    answer(s, &t, T0 + 5);
    assert_eq!(stored(s, t.workspace), 3, "one answer, handed out twice");

    // Expiry ends the other runtime's request; it stays stored until retention.
    let ended = s
        .expire_overdue(Kind::Models, T0 + PENDING_MS + 1, 100)
        .unwrap();
    assert_eq!(ended.total(), 2, "the other runtime's and the bystander's");
    assert_eq!(stored(s, t.workspace), 3);

    // Retention deletes what ended before the cutoff: the discovery (ended T0 + 3) and the
    // answer (T0 + 4), not the expired request (ended at its deadline, T0 + PENDING_MS).
    assert_eq!(s.delete_ended_before(Kind::Models, T0 + 5, 100).unwrap(), 2);
    assert_eq!(stored(s, t.workspace), 1);
    assert!(s.find_request(t.runtime, cached.id).unwrap().is_none());
    assert_eq!(stored(s, bystander.workspace), 1);

    // A deleted runtime's requests go out of the count with it.
    create(s, t.runtime, T0 + 6);
    assert_eq!(stored(s, t.workspace), 2);
    assert!(s.delete_runtime(t.workspace, other_runtime).unwrap());
    assert_eq!(stored(s, t.workspace), 1);
    assert!(!s.delete_runtime(t.workspace, other_runtime).unwrap());
    assert!(
        !s.delete_runtime(bystander.workspace, t.runtime).unwrap(),
        "not its runtime"
    );
    assert_eq!(stored(s, t.workspace), 1);
    assert!(s.delete_runtime(t.workspace, t.runtime).unwrap());
    assert_eq!(stored(s, t.workspace), 0);
    assert_eq!(stored(s, bystander.workspace), 1);
}

/// At the limit nothing new is stored: a discovery is refused (`Full`) unless one is
/// active already (then it coalesces), and an answer from the catalog is refused unless a
/// stored one can be handed out again. Other workspaces are untouched, and a delete makes
/// room again.
fn a_full_workspace_stores_nothing_more_but_still_answers(engine: &dyn Engine) {
    let store = engine.open();
    let s = store.as_ref();
    let t = tenant(s);
    let (second, second_token) = runtime_in(s, t.workspace, T0);
    let bystander = tenant(s);
    const MAX: u64 = 3;

    discovered_with(s, &t, models(), T0);
    let cached = match asked(s, &t, T0 + 1, MAX) {
        Asked::Cached { answer, .. } => *answer,
        other => panic!("{other:?}"),
    };
    let active = s
        .create_or_coalesce_within(second, &NewRequest::of(Kind::Models, new_id()), T0 + 1, MAX)
        .unwrap();
    let Added::Done(active) = active else {
        panic!("the third request is within {MAX}: {active:?}");
    };
    assert_eq!(stored(s, t.workspace), MAX);

    // Full: the active request coalesces, the stored answer is handed out again...
    assert_eq!(
        s.create_or_coalesce_within(second, &NewRequest::of(Kind::Models, new_id()), T0 + 2, MAX)
            .unwrap(),
        Added::Done(active.clone())
    );
    assert!(matches!(
        asked(s, &t, T0 + 2, MAX),
        Asked::Cached { answer, .. } if *answer == cached
    ));
    // ...but a discovery with none active, or a refresh, is refused and writes nothing.
    let refused = new_id();
    assert_eq!(
        s.create_or_coalesce_within(
            t.runtime,
            &NewRequest::of(Kind::Models, refused),
            T0 + 3,
            MAX
        )
        .unwrap(),
        Added::Full
    );
    assert!(s.find_request(t.runtime, refused).unwrap().is_none());
    let runtime = s.find_runtime(t.workspace, t.runtime).unwrap().unwrap();
    let mut refresh = ask_at(T0 + 3, MAX);
    refresh.refresh = true;
    assert_eq!(
        s.ask_for_models(&runtime, &refresh, T0 + 3).unwrap(),
        Asked::Full
    );
    // A catalog with no record to hand out (the second runtime's, from its active
    // request) cannot be answered from: that would store one more.
    assert_eq!(
        s.claim_next_pending(second, Kind::Models, T0 + 3)
            .unwrap()
            .claimed,
        Some(active.request.id)
    );
    s.report(
        second,
        Kind::Models,
        active.request.id,
        &completed(),
        T0 + 3,
    )
    .unwrap();
    let second_tenant = Tenant {
        workspace: t.workspace,
        runtime: second,
        daemon_token: second_token,
    };
    assert_eq!(asked(s, &second_tenant, T0 + 3, MAX), Asked::Full);
    assert_eq!(stored(s, t.workspace), MAX);
    // Another workspace has room of its own.
    discovered_with(s, &bystander, models(), T0);
    assert_eq!(stored(s, bystander.workspace), 1);

    // A runtime that goes offline with a full workspace is told it is full, not offline,
    // when only the limit kept it from an answer.
    let mut offline = ask_at(T0 + 4, MAX);
    offline.online = false;
    offline.reuse_after = T0 + 4; // the stored answer is too old to hand out
    assert_eq!(
        s.ask_for_models(&runtime, &offline, T0 + 4).unwrap(),
        Asked::Full
    );

    // Room again once one goes.
    assert!(s.delete_runtime(t.workspace, second).unwrap());
    assert_eq!(stored(s, t.workspace), 2);
    assert!(matches!(
        s.create_or_coalesce_within(
            t.runtime,
            &NewRequest::of(Kind::Models, new_id()),
            T0 + 5,
            MAX
        )
        .unwrap(),
        Added::Done(_)
    ));
}

/// Creates on as many runtimes of one workspace as there are handles, all at once: exactly
/// `MAX` are stored and the others refused, on every engine (PostgreSQL's count is read
/// under the workspace's lock, not from a snapshot older than it).
fn concurrent_creates_from_many_handles_stop_at_the_limit(engine: &dyn Engine) {
    const CALLERS: usize = 8;
    const MAX: u64 = 3;
    // Two handles (two pools), four callers on each, each with a connection of its own.
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    let runtimes: Vec<RuntimeId> = (0..CALLERS)
        .map(|_| runtime_in(handles[0].as_ref(), t.workspace, T0).0)
        .collect();
    for round in 0..5 {
        let now = T0 + round * 1_000;
        let barrier = Arc::new(Barrier::new(CALLERS));
        let outcomes: Vec<Added<_>> = thread::scope(|s| {
            let workers: Vec<_> = runtimes
                .iter()
                .enumerate()
                .map(|(i, &rt)| {
                    let store = &handles[i % 2];
                    let barrier = Arc::clone(&barrier);
                    s.spawn(move || {
                        barrier.wait();
                        store
                            .create_or_coalesce_within(
                                rt,
                                &NewRequest::of(Kind::Models, new_id()),
                                now,
                                MAX,
                            )
                            .unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let made = outcomes
            .iter()
            .filter(|o| matches!(o, Added::Done(_)))
            .count();
        let full = outcomes.iter().filter(|o| matches!(o, Added::Full)).count();
        assert_eq!(
            (made, full),
            (MAX as usize, CALLERS - MAX as usize),
            "round {round}"
        );
        assert_eq!(stored(handles[0].as_ref(), t.workspace), MAX);
        // Delete them all for the next round.
        let ended = handles[0]
            .expire_overdue(Kind::Models, now + PENDING_MS + 1, 100)
            .unwrap();
        assert_eq!(ended.total(), MAX);
        handles[0]
            .delete_ended_before(Kind::Models, now + PENDING_MS + 1, 100)
            .unwrap();
        assert_eq!(stored(handles[0].as_ref(), t.workspace), 0);
    }
}
