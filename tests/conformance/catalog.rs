//! The model catalog: which reports write it, remove it or leave it; answers from it as
//! stored requests; the fresh and serve windows; a discovery in the background; offline
//! runtimes; `refresh`; and a deleted runtime's catalog going with it.

use model_relay::kind::Kind;
use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::model::{Outcome, Report, ReportOutcome, Runtime, Status, StoredRequest};
use model_relay::store::{Added, Ask, Asked, Storer};

use crate::common::{
    RUNNING_MS, T0, TIMEOUTS, Tenant, completed, create, failed, get, models, new_id, running,
    tenant,
};
use crate::support::engines::{Engine, engine_tests};

// Model lists only: the catalog is a `models` feature (DESIGN.md, "Request kinds").
engine_tests!(
    with_pgbouncer TIMEOUTS;
    a_completed_report_with_models_writes_the_catalog,
    a_completed_report_with_no_models_or_no_support_removes_the_catalog,
    failed_timed_out_and_fallback_reports_leave_the_catalog,
    a_fallback_report_is_stored_returned_and_replayed_exactly,
    a_fresh_catalog_answers_at_once_with_a_stored_completed_request,
    a_stale_catalog_answers_and_starts_one_discovery_in_the_background,
    an_offline_runtime_is_answered_from_its_catalog_without_a_discovery,
    a_catalog_past_the_serve_window_is_not_answered_from,
    refresh_skips_the_catalog,
    deleting_a_runtime_deletes_its_catalog,
    concurrent_asks_on_a_stale_catalog_from_two_handles_start_one_discovery,
);

const FRESH_MS: i64 = 60_000;
const SERVE_MS: i64 = 24 * 3_600_000;
/// Half the default retention: an answer that ended longer ago is not handed out again.
const REUSE_MS: i64 = 300_000;

fn runtime(store: &dyn Storer, t: &Tenant) -> Runtime {
    store
        .find_runtime(t.workspace, t.runtime)
        .unwrap()
        .expect("runtime exists")
}

fn ask_with(store: &dyn Storer, t: &Tenant, refresh: bool, online: bool, now: i64) -> Asked {
    let ask = Ask {
        id: new_id(),
        cached: new_id(),
        refresh,
        online,
        fresh: FRESH_MS,
        serve: SERVE_MS,
        reuse_after: now - REUSE_MS,
        max_stored: u64::MAX,
    };
    store.ask_for_models(&runtime(store, t), &ask, now).unwrap()
}

/// The page's open of the picker, the runtime online.
fn ask(store: &dyn Storer, t: &Tenant, now: i64) -> Asked {
    ask_with(store, t, false, true, now)
}

/// A discovery that ends with `report` at `now`.
fn discovered(store: &dyn Storer, t: &Tenant, report: &Report, now: i64) -> StoredRequest {
    let id = running(store, t.runtime, now);
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, report, now)
            .unwrap(),
        ReportOutcome::Recorded
    );
    get(store, t.runtime, id, now)
}

fn ended(status: Status, models: Vec<model_relay::model::ModelEntry>, supported: bool) -> Report {
    Report::Ended(Outcome {
        result: None,
        status,
        models,
        supported,
        error: None,
        fallback: false,
    })
}

fn stand_in() -> Report {
    let mut list = models();
    list.truncate(1);
    Report::Ended(Outcome {
        result: None,
        status: Status::Completed,
        models: list,
        supported: true,
        error: None,
        fallback: true,
    })
}

/// The answer of `asked`, which must have come from the catalog.
fn cached(asked: Asked) -> (StoredRequest, bool, Option<StoredRequest>) {
    match asked {
        Asked::Cached {
            answer,
            stale,
            refresh,
        } => (*answer, stale, refresh.map(|r| r.request)),
        other => panic!("expected an answer from the catalog, got {other:?}"),
    }
}

fn a_completed_report_with_models_writes_the_catalog(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    assert_eq!(runtime(store.as_ref(), &t).catalog_at, None);
    discovered(store.as_ref(), &t, &completed(), T0 + 10);
    assert_eq!(runtime(store.as_ref(), &t).catalog_at, Some(T0 + 10));
    // Another handle (another instance) answers from it with what was reported.
    let other = engine.open();
    let (answer, _, _) = cached(ask(other.as_ref(), &t, T0 + 20));
    assert_eq!(answer.models, models());
    assert!(answer.supported);
    assert_eq!(answer.cached_at, Some(T0 + 10));
}

fn a_completed_report_with_no_models_or_no_support_removes_the_catalog(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    for removing in [
        ended(Status::Completed, Vec::new(), true),
        ended(Status::Completed, models(), false),
    ] {
        discovered(store.as_ref(), &t, &completed(), T0);
        assert_eq!(runtime(store.as_ref(), &t).catalog_at, Some(T0));
        discovered(store.as_ref(), &t, &removing, T0 + 1);
        assert_eq!(runtime(store.as_ref(), &t).catalog_at, None, "{removing:?}");
        assert!(matches!(
            ask(store.as_ref(), &t, T0 + 2),
            Asked::Discovery(_)
        ));
        // End that discovery, so that the next round starts from nothing active.
        let active = create(store.as_ref(), t.runtime, T0 + 2).id;
        store
            .claim_next_pending(t.runtime, Kind::Models, T0 + 2)
            .unwrap();
        store
            .report(t.runtime, Kind::Models, active, &failed("gone"), T0 + 2)
            .unwrap();
    }
}

fn failed_timed_out_and_fallback_reports_leave_the_catalog(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    discovered(store.as_ref(), &t, &failed("no credentials"), T0 + 1);
    discovered(store.as_ref(), &t, &stand_in(), T0 + 2);
    // A running request whose lease runs out.
    let lost = running(store.as_ref(), t.runtime, T0 + 3);
    let later = T0 + 3 + RUNNING_MS;
    assert_eq!(
        get(store.as_ref(), t.runtime, lost, later).status,
        Status::Timeout
    );

    assert_eq!(runtime(store.as_ref(), &t).catalog_at, Some(T0));
    let (answer, _, _) = cached(ask_with(store.as_ref(), &t, false, false, later));
    assert_eq!(answer.models, models(), "the stand-in list is never cached");
    assert_eq!(answer.cached_at, Some(T0));
}

fn a_fallback_report_is_stored_returned_and_replayed_exactly(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let request = discovered(store.as_ref(), &t, &stand_in(), T0);
    assert!(request.fallback);
    assert_eq!(request.models.len(), 1);
    let id = request.id;
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &stand_in(), T0 + 1)
            .unwrap(),
        ReportOutcome::Replayed
    );
    let Report::Ended(mut real) = stand_in() else {
        unreachable!()
    };
    real.fallback = false;
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &Report::Ended(real), T0 + 1)
            .unwrap(),
        ReportOutcome::NotRunning(Status::Completed),
        "the same list, not a stand-in: a different report"
    );
    assert!(get(store.as_ref(), t.runtime, id, T0 + 2).fallback);
}

fn a_fresh_catalog_answers_at_once_with_a_stored_completed_request(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    let now = T0 + FRESH_MS - 1;
    let (answer, stale, refresh) = cached(ask(store.as_ref(), &t, now));
    assert!(!stale);
    assert_eq!(refresh, None);
    assert_eq!(answer.status, Status::Completed);
    assert_eq!(answer.runtime_id, t.runtime);
    assert_eq!((answer.created_at, answer.ended_at), (now, Some(now)));
    assert_eq!(answer.refresh_id, None);
    assert!(!answer.fallback && answer.error.is_none());
    // A real stored request: readable by id through another handle, as stored.
    let other = engine.open();
    assert_eq!(get(other.as_ref(), t.runtime, answer.id, now + 1), answer);
    // And no discovery was asked for.
    assert!(store.active_requests().unwrap().is_empty());
}

fn a_stale_catalog_answers_and_starts_one_discovery_in_the_background(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    let now = T0 + FRESH_MS;
    let (answer, stale, refresh) = cached(ask(store.as_ref(), &t, now));
    assert!(stale);
    let refresh = refresh.expect("a discovery in the background");
    assert_eq!(refresh.status, Status::Pending);
    assert_eq!(answer.refresh_id, Some(refresh.id));
    assert_eq!(answer.cached_at, Some(T0));
    assert_eq!(get(store.as_ref(), t.runtime, answer.id, now), answer);

    // Asked again while it runs: answered from the catalog, the same discovery named, by
    // the same record (it names the same catalog and the same refresh).
    let (again, _, same) = cached(ask(store.as_ref(), &t, now + 1));
    assert_eq!(again, answer);
    assert_eq!(same.map(|r| r.id), Some(refresh.id));
    assert_eq!(again.refresh_id, Some(refresh.id));
    assert_eq!(store.active_requests().unwrap().len(), 1);

    // When it ends with models, the catalog is the new list, fresh again.
    store
        .claim_next_pending(t.runtime, Kind::Models, now + 2)
        .unwrap();
    let mut newer = models();
    newer.reverse();
    let report = ended(Status::Completed, newer.clone(), true);
    store
        .report(t.runtime, Kind::Models, refresh.id, &report, now + 3)
        .unwrap();
    let (fresh, stale, none) = cached(ask(store.as_ref(), &t, now + 4));
    assert!(!stale && none.is_none());
    assert_eq!((fresh.models, fresh.cached_at), (newer, Some(now + 3)));
}

fn an_offline_runtime_is_answered_from_its_catalog_without_a_discovery(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    for now in [T0 + 1, T0 + FRESH_MS, T0 + SERVE_MS - 1] {
        let (answer, _, refresh) = cached(ask_with(store.as_ref(), &t, false, false, now));
        assert_eq!(refresh, None, "at {now}");
        assert_eq!(answer.refresh_id, None);
        assert_eq!(answer.models, models());
    }
    assert!(store.active_requests().unwrap().is_empty());
    assert_eq!(
        ask_with(store.as_ref(), &t, false, false, T0 + SERVE_MS),
        Asked::Offline
    );
    assert_eq!(
        ask_with(store.as_ref(), &t, true, false, T0 + 1),
        Asked::Offline,
        "refresh skips the catalog: an offline runtime cannot answer"
    );
}

fn a_catalog_past_the_serve_window_is_not_answered_from(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    let now = T0 + SERVE_MS;
    let Asked::Discovery(created) = ask(store.as_ref(), &t, now) else {
        panic!("expected a discovery")
    };
    assert_eq!(created.request.status, Status::Pending);
    assert_eq!(created.request.cached_at, None);
}

fn refresh_skips_the_catalog(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    let Asked::Discovery(created) = ask_with(store.as_ref(), &t, true, true, T0 + 1) else {
        panic!("expected a discovery")
    };
    assert_eq!(created.request.status, Status::Pending);
    // The catalog is still there for the next open.
    assert!(matches!(
        ask(store.as_ref(), &t, T0 + 2),
        Asked::Cached { stale: false, .. }
    ));
}

fn deleting_a_runtime_deletes_its_catalog(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    discovered(store.as_ref(), &t, &completed(), T0);
    assert!(store.delete_runtime(t.workspace, t.runtime).unwrap());
    // Were the catalog left behind, the SQL engines would fail this insert on the
    // runtime's foreign key rather than find nothing.
    assert_eq!(
        store
            .answer_from_catalog(
                t.runtime,
                &crate::stored::ask_at(T0, u64::MAX),
                None,
                T0 - 1,
                T0 + 1
            )
            .unwrap(),
        Added::Missing
    );
}

fn concurrent_asks_on_a_stale_catalog_from_two_handles_start_one_discovery(engine: &dyn Engine) {
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    discovered(handles[0].as_ref(), &t, &completed(), T0);
    for round in 0..10 {
        let now = T0 + FRESH_MS + round * 100_000;
        let barrier = Arc::new(Barrier::new(2));
        let answers: Vec<(StoredRequest, Option<StoredRequest>)> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    let t = &t;
                    s.spawn(move || {
                        barrier.wait();
                        let (answer, _, refresh) = cached(ask(store.as_ref(), t, now));
                        (answer, refresh)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let refreshes: Vec<_> = answers.iter().map(|(a, _)| a.refresh_id).collect();
        assert!(
            refreshes[0].is_some() && refreshes[0] == refreshes[1],
            "{answers:?}"
        );
        // One record or two (both may look for one to hand out before either stores it),
        // each the same catalog.
        assert_eq!(answers[0].0.models, answers[1].0.models);
        assert_eq!(answers[0].0.cached_at, Some(T0));
        assert_eq!(handles[0].active_requests().unwrap().len(), 1);
        // End it as timed out, so that the next round starts a discovery of its own.
        let id = refreshes[0].unwrap();
        handles[0]
            .expire_request(id, Kind::Models, Status::Pending, now + 31_000)
            .unwrap();
    }
}
