//! Reports: what a daemon's result records, what is refused, and what a replay changes
//! (nothing).

use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::model::{Outcome, Report, ReportOutcome, Status};

use crate::common::{
    RUNNING_MS, T0, TIMEOUTS, completed, create, failed, get, models, new_id, running, tenant,
};
use crate::common::{holds_completed, timeout_error};
use crate::common::{kind, kind_tests, set_kind};
use crate::support::engines::Engine;

kind_tests!(
    with_pgbouncer TIMEOUTS;
    report_completed_records_the_models_and_ends_the_request,
    report_failed_records_the_error,
    report_without_models_reads_as_no_models,
    report_on_a_pending_request_is_refused_and_changes_nothing,
    report_running_renews_the_lease,
    report_running_on_an_ended_request_is_refused,
    exact_replay_of_the_ending_report_is_accepted_and_changes_nothing,
    a_different_report_after_the_end_is_refused_and_changes_nothing,
    report_after_the_lease_ran_out_is_refused_and_reads_timeout,
    report_one_millisecond_before_the_deadline_is_accepted,
    report_for_another_runtime_is_not_found,
    concurrent_reports_from_two_handles_record_exactly_one,
);

fn report_completed_records_the_models_and_ends_the_request(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let at = T0 + 7_000;
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &completed(), at)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, at + 1);
    assert_eq!(r.status, Status::Completed);
    assert!(holds_completed(&r), "{r:?}");
    assert!(r.supported);
    assert_eq!(r.error, None);
    assert_eq!((r.updated_at, r.ended_at), (at, Some(at)));
}

fn report_failed_records_the_error(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(
        store
            .report(
                t.runtime,
                kind(),
                id,
                &failed("claude: not logged in"),
                T0 + 1
            )
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.as_deref(), Some("claude: not logged in"));
    assert!(r.models.is_empty());
}

fn report_without_models_reads_as_no_models(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let unsupported = Report::Ended(Outcome {
        result: None,
        status: Status::Completed,
        models: Vec::new(),
        supported: false,
        error: None,
        fallback: false,
    });
    store
        .report(t.runtime, kind(), id, &unsupported, T0 + 1)
        .unwrap();
    let r = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert!(r.models.is_empty());
    assert!(!r.supported);
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &unsupported, T0 + 2)
            .unwrap(),
        ReportOutcome::Replayed,
        "an empty list replays as itself"
    );
}

fn report_on_a_pending_request_is_refused_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let before = create(store.as_ref(), t.runtime, T0);
    for report in [completed(), failed("x"), Report::Running] {
        assert_eq!(
            store
                .report(t.runtime, kind(), before.id, &report, T0 + 1)
                .unwrap(),
            ReportOutcome::NotRunning(Status::Pending)
        );
    }
    assert_eq!(get(store.as_ref(), t.runtime, before.id, T0 + 1), before);
}

fn report_running_renews_the_lease(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let renew_at = T0 + RUNNING_MS - 1;
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &Report::Running, renew_at)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, T0 + RUNNING_MS + 1);
    assert_eq!(r.status, Status::Running, "alive past the first lease");
    assert_eq!(r.deadline_at, renew_at + RUNNING_MS);
    assert_eq!(
        get(store.as_ref(), t.runtime, id, renew_at + RUNNING_MS).status,
        Status::Timeout,
        "and ends when the renewed lease does"
    );
}

fn report_running_on_an_ended_request_is_refused(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, kind(), id, &completed(), T0 + 1)
        .unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &Report::Running, T0 + 2)
            .unwrap(),
        ReportOutcome::NotRunning(Status::Completed)
    );
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 2), before);
}

fn exact_replay_of_the_ending_report_is_accepted_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, kind(), id, &completed(), T0 + 1)
        .unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &completed(), T0 + 5_000)
            .unwrap(),
        ReportOutcome::Replayed
    );
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 5_000), before);

    let other = tenant(store.as_ref());
    let fid = running(store.as_ref(), other.runtime, T0);
    store
        .report(other.runtime, kind(), fid, &failed("boom"), T0 + 1)
        .unwrap();
    assert_eq!(
        store
            .report(other.runtime, kind(), fid, &failed("boom"), T0 + 2)
            .unwrap(),
        ReportOutcome::Replayed
    );
}

fn a_different_report_after_the_end_is_refused_and_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(t.runtime, kind(), id, &completed(), T0 + 1)
        .unwrap();
    let before = get(store.as_ref(), t.runtime, id, T0 + 1);
    let mut fewer = models();
    fewer.pop();
    let different = [
        failed("late"),
        Report::Ended(Outcome {
            result: None,
            status: Status::Completed,
            models: fewer,
            supported: true,
            error: None,
            fallback: false,
        }),
        Report::Ended(Outcome {
            result: None,
            status: Status::Completed,
            models: models(),
            supported: false,
            error: None,
            fallback: false,
        }),
    ];
    for report in different {
        assert_eq!(
            store
                .report(t.runtime, kind(), id, &report, T0 + 2)
                .unwrap(),
            ReportOutcome::NotRunning(Status::Completed)
        );
    }
    assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 2), before);
}

fn report_after_the_lease_ran_out_is_refused_and_reads_timeout(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let deadline = T0 + RUNNING_MS;
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &completed(), deadline)
            .unwrap(),
        ReportOutcome::NotRunning(Status::Timeout)
    );
    let r = get(store.as_ref(), t.runtime, id, deadline + 1);
    assert_eq!(r.status, Status::Timeout);
    assert_eq!(
        r.error.as_deref(),
        Some(timeout_error(Status::Running).as_str())
    );
    assert!(r.models.is_empty(), "the late report left nothing behind");
}

fn report_one_millisecond_before_the_deadline_is_accepted(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    assert_eq!(
        store
            .report(t.runtime, kind(), id, &completed(), T0 + RUNNING_MS - 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
    assert_eq!(
        get(store.as_ref(), t.runtime, id, T0 + RUNNING_MS * 10).status,
        Status::Completed
    );
}

fn report_for_another_runtime_is_not_found(engine: &dyn Engine) {
    let store = engine.open();
    let owner = tenant(store.as_ref());
    let intruder = tenant(store.as_ref());
    let id = running(store.as_ref(), owner.runtime, T0);
    assert_eq!(
        store
            .report(intruder.runtime, kind(), id, &completed(), T0 + 1)
            .unwrap(),
        ReportOutcome::NotFound
    );
    assert_eq!(
        store
            .report(owner.runtime, kind(), new_id(), &completed(), T0 + 1)
            .unwrap(),
        ReportOutcome::NotFound
    );
    assert_eq!(
        get(store.as_ref(), owner.runtime, id, T0 + 1).status,
        Status::Running
    );
}

fn concurrent_reports_from_two_handles_record_exactly_one(engine: &dyn Engine) {
    // Threads of their own start with the default kind: they are told this one.
    let case_kind = kind();
    let handles = [engine.open(), engine.open()];
    let t = tenant(handles[0].as_ref());
    for round in 0..20 {
        let now = T0 + round * 1_000;
        let id = running(handles[0].as_ref(), t.runtime, now);
        let reports = [completed(), failed("lost the race")];
        let barrier = Arc::new(Barrier::new(2));
        let outcomes: Vec<ReportOutcome> = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .zip(&reports)
                .map(|(store, report)| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        set_kind(case_kind);
                        barrier.wait();
                        store.report(t.runtime, kind(), id, report, now).unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let winner = outcomes
            .iter()
            .position(|o| *o == ReportOutcome::Recorded)
            .expect("one report is recorded");
        let loser = 1 - winner;
        let stored = get(handles[0].as_ref(), t.runtime, id, now);
        let Report::Ended(won) = &reports[winner] else {
            unreachable!()
        };
        assert_eq!(
            outcomes[loser],
            ReportOutcome::NotRunning(won.status),
            "round {round}"
        );
        assert!(
            won.is_recorded_in(&stored),
            "round {round}: the winner is stored"
        );
    }
}
