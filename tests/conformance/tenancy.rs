//! Workspaces, runtimes and tokens: data survives a new handle, tokens resolve to their
//! owner only, everything is scoped to its workspace and runtime, and deleting a runtime
//! deletes its requests.

use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash};
use model_relay::model::Status;
use model_relay::store::sqlite::SqliteStore;
use model_relay::store::{Scoped, Storer};

use crate::common::kind_tests;
use crate::common::{T0, TIMEOUTS, create, get, new_id, runtime_in, tenant, workspace};
use crate::support::engines::Engine;

kind_tests!(
    with_pgbouncer TIMEOUTS;
    opening_twice_keeps_the_data,
    tokens_resolve_to_their_owner_only,
    runtimes_are_scoped_to_their_workspace,
    touch_records_last_seen_and_never_moves_it_back,
    deleting_a_runtime_deletes_its_requests,
    reads_are_scoped_to_the_runtime,
    find_request_by_token_answers_each_level_in_turn,
);

fn daemon_runtime(store: &dyn Storer, token: &TokenHash) -> Option<RuntimeId> {
    store.daemon_by_token(token).unwrap().map(|d| d.runtime)
}

fn opening_twice_keeps_the_data(engine: &dyn Engine) {
    let first = engine.open();
    let t = tenant(first.as_ref());
    let id = create(first.as_ref(), t.runtime, T0).id;
    let second = engine.open();
    assert_eq!(
        get(second.as_ref(), t.runtime, id, T0).status,
        Status::Pending
    );
    assert_eq!(
        daemon_runtime(second.as_ref(), &t.daemon_token),
        Some(t.runtime)
    );
}

fn tokens_resolve_to_their_owner_only(engine: &dyn Engine) {
    let store = engine.open();
    let (ws_a, token_a) = workspace(store.as_ref());
    let (ws_b, token_b) = workspace(store.as_ref());
    assert_eq!(store.workspace_by_api_token(&token_a).unwrap(), Some(ws_a));
    assert_eq!(store.workspace_by_api_token(&token_b).unwrap(), Some(ws_b));
    let stranger = Token::new_api().unwrap().hash();
    assert_eq!(store.workspace_by_api_token(&stranger).unwrap(), None);

    let (rt, daemon) = runtime_in(store.as_ref(), ws_a, T0);
    assert_eq!(daemon_runtime(store.as_ref(), &daemon), Some(rt));
    // An API token is not a daemon token, and the other way round.
    assert_eq!(daemon_runtime(store.as_ref(), &token_a), None);
    assert_eq!(store.workspace_by_api_token(&daemon).unwrap(), None);
}

fn runtimes_are_scoped_to_their_workspace(engine: &dyn Engine) {
    let store = engine.open();
    let (ws_a, _) = workspace(store.as_ref());
    let (ws_b, _) = workspace(store.as_ref());
    let (first, _) = runtime_in(store.as_ref(), ws_a, T0);
    let (second, _) = runtime_in(store.as_ref(), ws_a, T0 + 1);
    let (other, _) = runtime_in(store.as_ref(), ws_b, T0);

    let listed: Vec<RuntimeId> = store
        .list_runtimes(ws_a, None, 100)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![first, second], "the workspace's, oldest first");

    let found = store
        .find_runtime(ws_a, first)
        .unwrap()
        .expect("own runtime");
    assert_eq!(
        (found.name.as_str(), found.provider.as_str()),
        ("laptop", "claude")
    );
    assert_eq!((found.created_at, found.last_seen_at), (T0, None));
    assert_eq!(store.find_runtime(ws_a, other).unwrap(), None);
    assert!(!store.delete_runtime(ws_a, other).unwrap());
    assert!(store.find_runtime(ws_b, other).unwrap().is_some());
}

fn touch_records_last_seen_and_never_moves_it_back(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    assert!(store.touch_runtime(t.runtime, T0 + 500).unwrap());
    let seen = |s: &dyn Storer| {
        s.find_runtime(t.workspace, t.runtime)
            .unwrap()
            .unwrap()
            .last_seen_at
    };
    assert_eq!(seen(store.as_ref()), Some(T0 + 500));
    assert!(store.touch_runtime(t.runtime, T0 + 100).unwrap());
    assert_eq!(seen(store.as_ref()), Some(T0 + 500));
    assert!(store.touch_runtime(t.runtime, T0 + 900).unwrap());
    assert_eq!(seen(store.as_ref()), Some(T0 + 900));
    assert!(
        !store
            .touch_runtime(RuntimeId::random().unwrap(), T0)
            .unwrap()
    );
}

fn deleting_a_runtime_deletes_its_requests(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let keep = tenant(store.as_ref());
    let id = create(store.as_ref(), t.runtime, T0).id;
    let kept = create(store.as_ref(), keep.runtime, T0).id;
    assert!(store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert_eq!(store.find_request(t.runtime, id).unwrap(), None);
    assert_eq!(store.find_runtime(t.workspace, t.runtime).unwrap(), None);
    assert_eq!(daemon_runtime(store.as_ref(), &t.daemon_token), None);
    assert!(!store.delete_runtime(t.workspace, t.runtime).unwrap());
    assert!(store.find_request(keep.runtime, kept).unwrap().is_some());
}

fn reads_are_scoped_to_the_runtime(engine: &dyn Engine) {
    let store = engine.open();
    let owner = tenant(store.as_ref());
    let other = tenant(store.as_ref());
    let id = create(store.as_ref(), owner.runtime, T0).id;
    assert_eq!(store.get_request(other.runtime, id, T0).unwrap(), None);
    assert_eq!(
        store.get_request(owner.runtime, new_id(), T0).unwrap(),
        None
    );
}

fn find_request_by_token_answers_each_level_in_turn(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, api) = workspace(store.as_ref());
    let (rt, daemon_token) = runtime_in(store.as_ref(), ws, T0);
    let (sibling, _) = runtime_in(store.as_ref(), ws, T0);
    let (other_ws, other_api) = workspace(store.as_ref());
    let (foreign, _) = runtime_in(store.as_ref(), other_ws, T0);
    let id = create(store.as_ref(), rt, T0).id;
    let foreign_id = create(store.as_ref(), foreign, T0).id;
    let find = |token: &TokenHash, rt: RuntimeId, id: RequestId| {
        store.find_request_by_token(token, rt, id).unwrap()
    };

    let own = store.find_request(rt, id).unwrap();
    assert!(own.is_some());
    assert_eq!(find(&api, rt, id), Scoped::Found(own));
    assert_eq!(
        find(&api, rt, new_id()),
        Scoped::Found(None),
        "unknown request"
    );
    assert_eq!(
        find(&api, sibling, id),
        Scoped::Found(None),
        "another runtime's"
    );
    assert_eq!(
        find(&api, foreign, foreign_id),
        Scoped::NoRuntime,
        "another workspace's"
    );
    assert_eq!(
        find(&api, RuntimeId::random().unwrap(), id),
        Scoped::NoRuntime
    );
    assert!(matches!(
        find(&other_api, foreign, foreign_id),
        Scoped::Found(Some(_))
    ));
    let stranger = Token::new_api().unwrap().hash();
    assert_eq!(find(&stranger, rt, id), Scoped::Unauthorized);
    assert_eq!(
        find(&daemon_token, rt, id),
        Scoped::Unauthorized,
        "a daemon token"
    );
}

/// SQLite only: a new database file is its owner's alone (it holds token hashes and every
/// tenant's requests), and so are the write-ahead log and its index, which SQLite makes
/// with the database file's permissions.
#[cfg(unix)]
#[test]
fn sqlite_files_are_created_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = SqliteStore::open(&path, TIMEOUTS).unwrap();
    tenant(&store);
    for file in ["relay.db", "relay.db-wal", "relay.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
    }
}
