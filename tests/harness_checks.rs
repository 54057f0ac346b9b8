//! The harness's checker, on hand-made histories: each invariant's check fires on a history
//! that breaks it, and stays quiet on one that keeps it. (The live runs in
//! `multi_instance.rs` prove the harness sees a real 404; these prove every other check
//! can fail too.)

mod support;

use model_relay::kind::Kind;
use serde_json::{Value, json};
use support::harness::check::{Invariant, Limits, check};
use support::harness::{Call, Op};

const LIMITS: Limits = Limits {
    pending_ms: 400,
    running_ms: 500,
};
const RT: &str = "7d0c5a3e-1111-4222-8333-944455556666";
const OTHER_RT: &str = "0b8e2f71-2222-4333-8444-955566667777";
const ID: &str = "0123456789abcdef0123456789abcdef";
/// 2026-05-01T09:19:21.000Z
const T: i64 = 1_777_627_161_000;

fn at(ms: i64) -> String {
    model_relay::clock::rfc3339(ms)
}

fn record(status: &str, created: i64, updated: i64) -> Value {
    json!({"id": ID, "runtime_id": RT, "kind": "models", "status": status, "supported": true,
           "created_at": at(created), "updated_at": at(updated)})
}

fn call(actor: &str, op: Op, t: i64, status: u16, body: Value) -> Call {
    // Every route but the heartbeat's is a model list's here.
    let kind = (!matches!(op, Op::Heartbeat | Op::Restart)).then_some(Kind::Models);
    Call {
        actor: actor.into(),
        op,
        kind,
        instance: 0,
        runtime: RT.into(),
        request: Some(ID.into()),
        invoked: t,
        completed: t + 1,
        outcome: Ok((status, body)),
        wait_ms: 0,
        working_on: None,
    }
}

/// `call`, as a waiting call that asked for `wait_ms` and was answered at `completed`.
fn held(mut call: Call, wait_ms: u64, completed: i64) -> Call {
    call.wait_ms = wait_ms;
    call.completed = completed;
    call
}

fn ack() -> Value {
    json!({"status": "ok", "pending_model_list": {"id": ID}})
}

fn done() -> Value {
    json!({"status": "completed", "models": [{"id": "m", "label": "M"}], "supported": true})
}

fn completed_record(updated: i64) -> Value {
    let mut r = record("completed", T, updated);
    r["models"] = json!([{"id": "m", "label": "M"}]);
    r
}

/// A run that keeps every invariant: create, claim, running, report, completed everywhere.
fn good() -> Vec<Call> {
    vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call("p", Op::Poll, T + 10, 200, record("pending", T, T)),
        call(
            "d",
            Op::Heartbeat,
            T + 20,
            200,
            json!({"status": "ok", "pending_model_list": {"id": ID}}),
        ),
        call("p", Op::Poll, T + 30, 200, record("running", T, T + 20)),
        call(
            "d",
            Op::Report(done()),
            T + 40,
            200,
            json!({"status": "ok"}),
        ),
        call(
            "d",
            Op::Report(done()),
            T + 50,
            200,
            json!({"status": "ok"}),
        ),
        call(
            "d",
            Op::Report(json!({"status": "failed", "error": "x"})),
            T + 55,
            409,
            json!({}),
        ),
        call("p", Op::Poll, T + 60, 200, completed_record(T + 40)),
        call(
            "final",
            Op::FinalRead,
            T + 900,
            200,
            completed_record(T + 40),
        ),
    ]
}

fn fired(history: &[Call]) -> Vec<Invariant> {
    let mut kinds: Vec<Invariant> = check(history, LIMITS).iter().map(|v| v.invariant).collect();
    kinds.dedup();
    kinds
}

#[test]
fn a_history_that_keeps_every_invariant_passes() {
    assert_eq!(
        check(&good(), LIMITS).len(),
        0,
        "{:?}",
        check(&good(), LIMITS)
    );
}

#[test]
fn a_404_for_a_created_request_is_caught() {
    let mut h = good();
    h.push(call(
        "final",
        Op::FinalRead,
        T + 901,
        404,
        json!({"error": "request not found"}),
    ));
    assert_eq!(fired(&h), vec![Invariant::Readable404]);
}

#[test]
fn a_request_in_two_heartbeat_acks_is_caught() {
    let mut h = good();
    h.push(call(
        "d",
        Op::Heartbeat,
        T + 25,
        200,
        json!({"status": "ok", "pending_model_list": {"id": ID}}),
    ));
    assert_eq!(fired(&h), vec![Invariant::HandedOutTwice]);
}

#[test]
fn statuses_going_backwards_for_a_poller_are_caught() {
    let mut h = good();
    h.insert(4, call("p", Op::Poll, T + 35, 200, record("pending", T, T)));
    assert!(
        fired(&h).contains(&Invariant::WentBackwards),
        "{:?}",
        fired(&h)
    );
}

#[test]
fn a_terminal_record_that_changes_is_caught() {
    let mut h = good();
    let mut changed = completed_record(T + 40);
    changed["models"] = json!([]);
    h.push(call("final", Op::FinalRead, T + 950, 200, changed));
    assert!(
        fired(&h).contains(&Invariant::TerminalChanged),
        "{:?}",
        fired(&h)
    );
}

#[test]
fn a_report_answered_200_that_later_reads_do_not_show_is_caught() {
    let mut h = good();
    h.insert(
        6,
        call(
            "d",
            Op::Report(json!({"status": "failed", "supported": true, "error": "x"})),
            T + 52,
            200,
            json!({}),
        ),
    );
    assert!(
        fired(&h).contains(&Invariant::ReportNotShown),
        "{:?}",
        fired(&h)
    );
}

#[test]
fn a_report_answered_409_that_shows_up_anyway_is_caught() {
    let failed = json!({"status": "failed", "supported": true, "error": "x"});
    let mut failed_record = record("failed", T, T + 45);
    failed_record["error"] = json!("x");
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call(
            "d",
            Op::Heartbeat,
            T + 20,
            200,
            json!({"status": "ok", "pending_model_list": {"id": ID}}),
        ),
        call("d", Op::Report(failed), T + 40, 409, json!({})),
        call("final", Op::FinalRead, T + 900, 200, failed_record),
    ];
    assert_eq!(fired(&h), vec![Invariant::ConflictChangedState]);
}

#[test]
fn a_pending_read_past_the_claim_deadline_is_caught() {
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call("p", Op::Poll, T + 400, 200, record("pending", T, T)),
    ];
    assert_eq!(fired(&h), vec![Invariant::DeadlineMissed]);
    let in_time = vec![
        h[0].clone(),
        call("p", Op::Poll, T + 398, 200, record("pending", T, T)),
    ];
    assert_eq!(fired(&in_time), vec![]);
}

#[test]
fn a_running_read_past_the_lease_is_caught() {
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call("p", Op::Poll, T + 520, 200, record("running", T, T + 20)),
    ];
    assert_eq!(fired(&h), vec![Invariant::DeadlineMissed]);
}

#[test]
fn a_pending_timeout_of_a_claimed_request_is_caught() {
    let mut timed_out = record("timeout", T, T + 400);
    timed_out["error"] = json!("daemon did not respond within 400 milliseconds");
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call(
            "d",
            Op::Heartbeat,
            T + 20,
            200,
            json!({"status": "ok", "pending_model_list": {"id": ID}}),
        ),
        call("p", Op::Poll, T + 600, 200, timed_out),
    ];
    assert_eq!(fired(&h), vec![Invariant::DeadlineMissed]);
}

#[test]
fn a_running_timeout_before_the_renewed_lease_ends_is_caught() {
    let mut timed_out = record("timeout", T, T + 520);
    timed_out["error"] = json!("daemon did not finish within 500 milliseconds");
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call(
            "d",
            Op::Heartbeat,
            T + 20,
            200,
            json!({"status": "ok", "pending_model_list": {"id": ID}}),
        ),
        call(
            "d",
            Op::Report(json!({"status": "running"})),
            T + 300,
            200,
            json!({"status": "ok"}),
        ),
        call("p", Op::Poll, T + 900, 200, timed_out),
    ];
    assert_eq!(fired(&h), vec![Invariant::DeadlineMissed]);
}

#[test]
fn crossing_a_runtime_boundary_is_caught() {
    let mut foreign = call("p", Op::ForeignRead, T + 5, 200, record("pending", T, T));
    foreign.runtime = OTHER_RT.into();
    let mut h = good();
    h.push(foreign);
    assert_eq!(fired(&h), vec![Invariant::CrossedBoundary]);

    let mut wrong_owner = good();
    wrong_owner[1].outcome = Ok((200, {
        let mut r = record("pending", T, T);
        r["runtime_id"] = json!(OTHER_RT);
        r
    }));
    assert_eq!(fired(&wrong_owner), vec![Invariant::CrossedBoundary]);
}

#[test]
fn a_5xx_other_than_runtime_offline_on_create_is_caught() {
    let mut h = good();
    h.push(call(
        "p",
        Op::Create,
        T + 70,
        503,
        json!({"error": "runtime is offline"}),
    ));
    assert_eq!(fired(&h), vec![], "offline on create is expected");
    h.push(call(
        "p",
        Op::Poll,
        T + 80,
        503,
        json!({"error": "store unavailable"}),
    ));
    assert_eq!(fired(&h), vec![Invariant::Unexpected5xx]);
}

#[test]
fn a_4xx_on_a_valid_call_is_caught() {
    let mut h = good();
    h.push(call(
        "d",
        Op::Heartbeat,
        T + 70,
        401,
        json!({"error": "missing or invalid bearer token"}),
    ));
    assert_eq!(fired(&h), vec![Invariant::UnexpectedStatus]);
}

#[test]
fn a_hand_out_again_is_allowed_only_to_a_heartbeat_whose_working_on_leaves_it_out() {
    let again = |working_on: Option<Vec<String>>| {
        let mut h = good();
        let mut beat = call("d", Op::Heartbeat, T + 25, 200, ack());
        beat.working_on = working_on;
        h.push(beat);
        fired(&h)
    };
    assert_eq!(
        again(Some(vec![])),
        vec![],
        "the daemon said it does not hold it"
    );
    assert_eq!(
        again(Some(vec![ID.to_owned()])),
        vec![Invariant::HandedOutTwice],
        "the daemon said it holds it"
    );
    assert_eq!(
        again(None),
        vec![Invariant::HandedOutTwice],
        "no working_on: v1"
    );
}

#[test]
fn a_waiting_read_answered_early_with_nothing_changed_is_caught() {
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        held(
            call("p", Op::Poll, T + 10, 200, record("pending", T, T)),
            3000,
            T + 200,
        ),
    ];
    assert_eq!(fired(&h), vec![Invariant::AnsweredUnchanged]);
    // Answered early with a change, or unchanged when its wait ended: both fine.
    let changed = vec![
        h[0].clone(),
        held(
            call("p", Op::Poll, T + 10, 200, record("running", T, T + 150)),
            3000,
            T + 200,
        ),
    ];
    assert_eq!(fired(&changed), vec![]);
    let waited = vec![
        h[0].clone(),
        held(
            call("p", Op::Poll, T + 10, 200, record("pending", T, T)),
            300,
            T + 310,
        ),
    ];
    assert_eq!(fired(&waited), vec![]);
    // A read of an ended request is answered at once: an answer from the catalog is
    // completed from the start.
    let cached = completed_record(T);
    let ended = vec![
        call("p", Op::Create, T, 200, cached.clone()),
        held(call("p", Op::Poll, T + 10, 200, cached), 3000, T + 12),
    ];
    assert_eq!(fired(&ended), vec![]);
}

/// An answer from the catalog, asked for at `t`, whose catalog was reported at `cached_at`.
fn cached_answer(t: i64, cached_at: i64) -> Call {
    let mut answer = completed_record(t);
    answer["id"] = json!("fedcba9876543210fedcba9876543210");
    answer["cached"] = json!(true);
    answer["cached_at"] = json!(at(cached_at));
    let mut create = call("p2", Op::Create, t, 200, answer);
    create.request = Some("fedcba9876543210fedcba9876543210".into());
    create
}

#[test]
fn an_answer_from_the_catalog_older_than_a_report_already_answered_is_caught() {
    // The report of `good` was sent at T + 40 and answered at T + 41.
    let mut h = good();
    h.push(cached_answer(T + 100, T + 30));
    assert_eq!(fired(&h), vec![Invariant::CachedTooOld]);
    // The catalog that report wrote, or a newer one: fine.
    let mut h = good();
    h.push(cached_answer(T + 100, T + 40));
    assert_eq!(fired(&h), vec![]);
    // Asked for before the report was answered: an older catalog may still answer.
    let mut h = good();
    h.push(cached_answer(T + 40, T + 30));
    assert_eq!(fired(&h), vec![]);
    // Another runtime's reports say nothing of this one's catalog.
    let mut h = good();
    let mut other = cached_answer(T + 100, T + 30);
    other.runtime = OTHER_RT.into();
    if let Ok((_, record)) = &mut other.outcome {
        record["runtime_id"] = json!(OTHER_RT);
    }
    h.push(other);
    assert_eq!(fired(&h), vec![]);
}

#[test]
fn a_held_heartbeat_answered_early_without_a_claim_is_caught_unless_its_instance_restarted() {
    let beat = held(
        call("d", Op::Heartbeat, T, 200, json!({"status": "ok"})),
        3000,
        T + 500,
    );
    assert_eq!(
        fired(std::slice::from_ref(&beat)),
        vec![Invariant::AnsweredUnchanged]
    );
    let mut restart = call("restart", Op::Restart, T + 400, 200, Value::Null);
    restart.completed = T + 600;
    assert_eq!(fired(&[beat, restart]), vec![]);
}

#[test]
fn a_waiting_read_held_long_past_a_change_of_its_request_is_caught() {
    // Claimed at T + 21; the read, waiting from T + 10, is answered only at T + 3,500.
    let h = vec![
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call("d", Op::Heartbeat, T + 20, 200, ack()),
        held(
            call("p", Op::Poll, T + 10, 200, record("running", T, T + 20)),
            5000,
            T + 3_500,
        ),
    ];
    assert_eq!(fired(&h), vec![Invariant::NotWoken]);
    let woken = vec![
        h[0].clone(),
        h[1].clone(),
        held(
            call("p", Op::Poll, T + 10, 200, record("running", T, T + 20)),
            4000,
            T + 25,
        ),
    ];
    assert_eq!(fired(&woken), vec![]);
}

#[test]
fn a_held_heartbeat_that_let_a_new_request_go_unclaimed_is_caught() {
    // Held from T - 100 to its end at T + 3,900; a request made at T was never handed out.
    let h = vec![
        held(
            call("d", Op::Heartbeat, T - 100, 200, json!({"status": "ok"})),
            4000,
            T + 3_900,
        ),
        call("p", Op::Create, T, 200, record("pending", T, T)),
        call("p", Op::FinalRead, T + 4_000, 200, {
            let mut r = record("timeout", T, T + 400);
            r["error"] = json!("daemon did not respond within 0 seconds");
            r
        }),
    ];
    assert_eq!(fired(&h), vec![Invariant::NotWoken]);
    // Unless a dropped heartbeat of the runtime may have been handed it unseen.
    let mut dropped = call("d", Op::Heartbeat, T - 50, 200, json!({}));
    dropped.outcome = Err("dropped by the client".into());
    let mut unseen = h.clone();
    unseen.push(dropped);
    assert_eq!(fired(&unseen), vec![]);
}
