//! What one tenant may hold: a workspace's runtimes stop at the limit whatever the number
//! of handles creating at once, and its runtimes are read a page at a time, in the order
//! `created_at, id`, each exactly once.

use std::sync::{Arc, Barrier};
use std::thread;

use model_relay::ids::{RuntimeId, Token, WorkspaceId};
use model_relay::store::{NewRuntime, RuntimeCursor, Storer};

use crate::common::{T0, TIMEOUTS, runtime_in, workspace};
use crate::support::engines::{Engine, engine_tests};

// No request kind: runtimes per workspace and their pages.
engine_tests!(
    with_pgbouncer TIMEOUTS;
    a_create_past_the_limit_writes_nothing,
    concurrent_creates_from_two_handles_never_pass_the_limit,
    pages_cover_every_runtime_once_in_order,
);

fn new_runtime(workspace: WorkspaceId) -> NewRuntime {
    NewRuntime {
        id: RuntimeId::random().unwrap(),
        workspace_id: workspace,
        name: "laptop".into(),
        provider: "claude".into(),
        daemon_token: Token::new_daemon().unwrap().hash(),
    }
}

/// Every runtime of the workspace, read in one page larger than any test makes.
fn all_ids(store: &dyn Storer, workspace: WorkspaceId) -> Vec<RuntimeId> {
    let list = store.list_runtimes(workspace, None, 1_000).unwrap();
    list.iter().map(|r| r.id).collect()
}

fn a_create_past_the_limit_writes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, _) = workspace(store.as_ref());
    let (other, _) = workspace(store.as_ref());
    for i in 0..3 {
        let new = new_runtime(ws);
        let created = store.create_runtime_within(&new, T0 + i, 3).unwrap();
        assert_eq!(
            created.map(|r| r.id),
            Some(new.id),
            "runtime {i} is within 3"
        );
    }
    let refused = new_runtime(ws);
    assert_eq!(
        store.create_runtime_within(&refused, T0 + 3, 3).unwrap(),
        None,
        "the fourth is past 3"
    );
    assert_eq!(all_ids(store.as_ref(), ws).len(), 3);
    assert!(
        store
            .daemon_by_token(&refused.daemon_token)
            .unwrap()
            .is_none(),
        "the refused runtime's token opens nothing"
    );

    // The limit is per workspace: another one still creates.
    let elsewhere = store
        .create_runtime_within(&new_runtime(other), T0, 3)
        .unwrap();
    assert!(elsewhere.is_some(), "another workspace is not counted");

    // A deleted runtime frees its place.
    let first = all_ids(store.as_ref(), ws)[0];
    assert!(store.delete_runtime(ws, first).unwrap());
    let again = store
        .create_runtime_within(&new_runtime(ws), T0 + 4, 3)
        .unwrap();
    assert!(again.is_some(), "one deleted, one more fits");
    assert_eq!(all_ids(store.as_ref(), ws).len(), 3);
}

fn concurrent_creates_from_two_handles_never_pass_the_limit(engine: &dyn Engine) {
    const LIMIT: u64 = 4;
    // Each handle alone would create the whole limit and more.
    const TRIES: u64 = 6;
    let handles = [engine.open(), engine.open()];
    for round in 0..10 {
        let (ws, _) = workspace(handles[0].as_ref());
        let barrier = Arc::new(Barrier::new(2));
        let created: u64 = thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|store| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        (0..TRIES)
                            .filter(|&i| {
                                let new = new_runtime(ws);
                                let now = T0 + round * 100 + i as i64;
                                store
                                    .create_runtime_within(&new, now, LIMIT)
                                    .unwrap()
                                    .is_some()
                            })
                            .count() as u64
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(created, LIMIT, "round {round}: creates answered");
        assert_eq!(
            all_ids(handles[1].as_ref(), ws).len() as u64,
            LIMIT,
            "round {round}: runtimes stored"
        );
    }
}

fn pages_cover_every_runtime_once_in_order(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, _) = workspace(store.as_ref());
    let (other, _) = workspace(store.as_ref());
    runtime_in(store.as_ref(), other, T0);
    // Several runtimes share a `created_at`: the id orders them, and a page may end
    // between two of them.
    let times = [
        T0,
        T0,
        T0,
        T0 + 1,
        T0 + 1,
        T0 + 2,
        T0 + 2,
        T0 + 2,
        T0 + 2,
        T0 + 5,
    ];
    let mut expected: Vec<(i64, String)> = times
        .iter()
        .map(|&at| (at, runtime_in(store.as_ref(), ws, at).0.to_string()))
        .collect();
    // The text of the id: the order every engine keeps, whatever it stores.
    expected.sort();

    for limit in [1, 2, 3, 4, 10, 11] {
        let mut seen = Vec::new();
        let mut after: Option<RuntimeCursor> = None;
        loop {
            let page = store.list_runtimes(ws, after, limit).unwrap();
            assert!(
                page.len() <= limit,
                "limit {limit}: a page of {}",
                page.len()
            );
            let Some(last) = page.last() else { break };
            after = Some(RuntimeCursor::after(last));
            seen.extend(page.iter().map(|r| (r.created_at, r.id.to_string())));
            assert!(
                seen.len() <= times.len(),
                "limit {limit}: more than there are"
            );
        }
        assert_eq!(
            seen, expected,
            "limit {limit}: every runtime once, in order"
        );
    }
}
