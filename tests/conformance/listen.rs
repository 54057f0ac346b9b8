//! Wake-ups across handles: a write through one handle is heard by another's listener, and
//! the re-check's query lists what is still active.

use std::time::Duration;

use model_relay::model::Status;
use model_relay::store::{Active, Change, Listener};
use model_relay::sweeper::BATCH;

use crate::common::{PENDING_MS, RUNNING_MS, T0, TIMEOUTS, completed, create, running, tenant};
use crate::common::{kind, kind_tests};
use crate::support::engines::Engine;

kind_tests!(
    TIMEOUTS;
    active_requests_lists_pending_and_running_requests_only,
    a_create_through_one_handle_wakes_the_listener_of_another,
    a_claim_and_a_report_through_one_handle_wake_the_listener_of_another,
    an_expiry_by_the_sweeper_wakes_the_listener_of_another_handle,
);

fn active_requests_lists_pending_and_running_requests_only(engine: &dyn Engine) {
    let store = engine.open();
    let (a, b, c) = (
        tenant(store.as_ref()),
        tenant(store.as_ref()),
        tenant(store.as_ref()),
    );
    let pending = create(store.as_ref(), a.runtime, T0);
    let run = running(store.as_ref(), b.runtime, T0);
    let ended = running(store.as_ref(), c.runtime, T0);
    store
        .report(c.runtime, kind(), ended, &completed(), T0 + 1)
        .unwrap();
    let mut active = store.active_requests().unwrap();
    active.sort_by_key(|a| a.status.as_str());
    assert_eq!(
        active,
        vec![
            Active {
                id: pending.id,
                runtime_id: a.runtime,
                status: Status::Pending,
                deadline_at: T0 + PENDING_MS,
            },
            Active {
                id: run,
                runtime_id: b.runtime,
                status: Status::Running,
                deadline_at: T0 + RUNNING_MS,
            },
        ]
    );
}

/// Waits on `listener` until a change that concerns `wanted` (or an unknown change) comes,
/// or 10 s pass: whether one came.
fn listener_hears(listener: &mut dyn Listener, wanted: Change) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let changes = listener.wait(Duration::from_millis(200)).unwrap();
        if changes
            .iter()
            .any(|c| *c == wanted || *c == Change::Unknown)
        {
            return true;
        }
    }
    false
}

fn a_create_through_one_handle_wakes_the_listener_of_another(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let mut listener = reader.listen().unwrap();
    create(writer.as_ref(), t.runtime, T0);
    assert!(listener_hears(
        listener.as_mut(),
        Change::Pending(t.runtime)
    ));
}

fn a_claim_and_a_report_through_one_handle_wake_the_listener_of_another(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let id = create(writer.as_ref(), t.runtime, T0).id;
    let mut listener = reader.listen().unwrap();
    writer.claim_next_pending(t.runtime, kind(), T0).unwrap();
    assert!(
        listener_hears(listener.as_mut(), Change::Status(id)),
        "claimed"
    );
    writer
        .report(t.runtime, kind(), id, &completed(), T0 + 1)
        .unwrap();
    assert!(
        listener_hears(listener.as_mut(), Change::Status(id)),
        "reported"
    );
}

fn an_expiry_by_the_sweeper_wakes_the_listener_of_another_handle(engine: &dyn Engine) {
    let writer = engine.open();
    let reader = engine.open();
    let t = tenant(writer.as_ref());
    let id = create(writer.as_ref(), t.runtime, T0).id;
    let mut listener = reader.listen().unwrap();
    writer
        .expire_overdue(kind(), T0 + PENDING_MS, BATCH)
        .unwrap();
    assert!(listener_hears(listener.as_mut(), Change::Status(id)));
}
