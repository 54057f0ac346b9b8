//! API tokens and daemon tokens over their lifetime: several per workspace, listed by id
//! and never by token, revoked and rotated with effect at once through every handle (each
//! call looks its token up in the store), and the last use recorded at most once a minute.

use model_relay::ids::{Token, TokenHash, TokenId};
use model_relay::kind::Kind;
use model_relay::model::Status;
use model_relay::store::{API_TOKEN_USE_REFRESH, Storer};

use crate::common::{T0, TIMEOUTS, create, get, running, runtime_in, tenant, workspace};
use crate::support::engines::{Engine, engine_tests};

// No request kind: tokens and workspaces.
engine_tests!(
    with_pgbouncer TIMEOUTS;
    a_workspace_holds_several_api_tokens,
    a_token_for_an_unknown_workspace_is_not_made,
    revoking_makes_the_token_unknown_at_once_through_another_handle,
    revoking_an_unknown_or_foreign_token_changes_nothing,
    rotating_replaces_the_daemon_token_and_keeps_the_runtime,
    rotating_a_foreign_or_missing_runtime_changes_nothing,
    last_use_is_written_at_most_once_a_minute,
    workspaces_are_listed_oldest_first,
);

fn new_token() -> TokenHash {
    Token::new_api().unwrap().hash()
}

fn ids(store: &dyn Storer, workspace: model_relay::ids::WorkspaceId) -> Vec<TokenId> {
    let mut ids: Vec<TokenId> = store
        .list_api_tokens(workspace)
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<TokenId>) -> Vec<TokenId> {
    ids.sort();
    ids
}

fn a_workspace_holds_several_api_tokens(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, first) = workspace(store.as_ref());
    let (other_ws, other) = workspace(store.as_ref());
    let second = new_token();
    assert!(store.create_api_token(ws, &second, T0 + 5).unwrap());

    assert_eq!(store.workspace_by_api_token(&first).unwrap(), Some(ws));
    assert_eq!(store.workspace_by_api_token(&second).unwrap(), Some(ws));
    let listed = store.list_api_tokens(ws).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|t| (&t.id, t.created_at))
            .collect::<Vec<_>>(),
        vec![(&first.id(), T0), (&second.id(), T0 + 5)],
        "oldest first, by id"
    );
    assert!(listed.iter().all(|t| t.last_used_at.is_none()));
    assert_eq!(ids(store.as_ref(), other_ws), vec![other.id()]);
}

fn a_token_for_an_unknown_workspace_is_not_made(engine: &dyn Engine) {
    let store = engine.open();
    let nowhere = model_relay::ids::WorkspaceId::random().unwrap();
    let token = new_token();
    assert!(!store.create_api_token(nowhere, &token, T0).unwrap());
    assert_eq!(store.api_token_use(&token).unwrap(), None);
    assert!(store.list_api_tokens(nowhere).unwrap().is_empty());
}

fn revoking_makes_the_token_unknown_at_once_through_another_handle(engine: &dyn Engine) {
    let (one, other) = (engine.open(), engine.open());
    let (ws, first) = workspace(one.as_ref());
    let second = new_token();
    assert!(one.create_api_token(ws, &second, T0).unwrap());
    assert_eq!(other.workspace_by_api_token(&first).unwrap(), Some(ws));

    assert!(one.revoke_api_token(ws, &first.id()).unwrap());
    assert_eq!(other.workspace_by_api_token(&first).unwrap(), None);
    assert_eq!(other.api_token_use(&first).unwrap(), None);
    let (rt, _) = runtime_in(one.as_ref(), ws, T0);
    let id = create(one.as_ref(), rt, T0).id;
    assert_eq!(
        other.find_request_by_token(&first, rt, id).unwrap(),
        model_relay::store::Scoped::Unauthorized,
        "the poll's one query refuses it too"
    );
    // The workspace's other token still works, and is all that is listed.
    assert_eq!(other.workspace_by_api_token(&second).unwrap(), Some(ws));
    assert_eq!(ids(other.as_ref(), ws), vec![second.id()]);
    // A second revoke finds nothing.
    assert!(!other.revoke_api_token(ws, &first.id()).unwrap());
}

fn revoking_an_unknown_or_foreign_token_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, mine) = workspace(store.as_ref());
    let (foreign_ws, theirs) = workspace(store.as_ref());
    let unknown = new_token().id();
    assert!(!store.revoke_api_token(ws, &unknown).unwrap());
    assert!(
        !store.revoke_api_token(ws, &theirs.id()).unwrap(),
        "another workspace's token is not this workspace's to revoke"
    );
    assert_eq!(store.workspace_by_api_token(&mine).unwrap(), Some(ws));
    assert_eq!(
        store.workspace_by_api_token(&theirs).unwrap(),
        Some(foreign_ws)
    );
    assert_eq!(ids(store.as_ref(), ws), vec![mine.id()]);
    assert_eq!(ids(store.as_ref(), foreign_ws), vec![theirs.id()]);
}

fn rotating_replaces_the_daemon_token_and_keeps_the_runtime(engine: &dyn Engine) {
    let (one, other) = (engine.open(), engine.open());
    let t = tenant(one.as_ref());
    let running = running(one.as_ref(), t.runtime, T0);
    let fresh = Token::new_daemon().unwrap().hash();

    assert!(
        one.rotate_daemon_token(t.workspace, t.runtime, &fresh)
            .unwrap()
    );
    assert_eq!(other.daemon_by_token(&t.daemon_token).unwrap(), None);
    let daemon = other.daemon_by_token(&fresh).unwrap().expect("new token");
    assert_eq!(daemon.runtime, t.runtime, "same runtime id");
    assert_eq!(
        get(other.as_ref(), t.runtime, running, T0 + 2).status,
        Status::Running,
        "its requests are kept"
    );
    assert_eq!(daemon.unrenewed, vec![(Kind::Models, running)]);
    assert_eq!(
        other
            .list_runtimes(t.workspace, None, 100)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        vec![t.runtime]
    );
}

fn rotating_a_foreign_or_missing_runtime_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let (stranger, _) = workspace(store.as_ref());
    let fresh = Token::new_daemon().unwrap().hash();
    assert!(
        !store
            .rotate_daemon_token(stranger, t.runtime, &fresh)
            .unwrap()
    );
    let missing = model_relay::ids::RuntimeId::random().unwrap();
    assert!(
        !store
            .rotate_daemon_token(t.workspace, missing, &fresh)
            .unwrap()
    );
    assert_eq!(store.daemon_by_token(&fresh).unwrap(), None);
    assert_eq!(
        store
            .daemon_by_token(&t.daemon_token)
            .unwrap()
            .map(|d| d.runtime),
        Some(t.runtime)
    );
}

fn last_use_is_written_at_most_once_a_minute(engine: &dyn Engine) {
    let (one, other) = (engine.open(), engine.open());
    let (ws, token) = workspace(one.as_ref());
    let used = |store: &dyn Storer| store.api_token_use(&token).unwrap().unwrap();
    assert_eq!(used(one.as_ref()).last_used_at, None);
    assert!(used(one.as_ref()).touch_due(T0));

    assert!(one.touch_api_token(&token, T0 + 10).unwrap());
    assert_eq!(used(other.as_ref()).last_used_at, Some(T0 + 10));
    let within = T0 + 10 + API_TOKEN_USE_REFRESH - 1;
    assert!(!used(other.as_ref()).touch_due(within));
    assert!(
        !other.touch_api_token(&token, within).unwrap(),
        "a use within the minute writes nothing"
    );
    assert_eq!(used(one.as_ref()).last_used_at, Some(T0 + 10));

    let later = T0 + 10 + API_TOKEN_USE_REFRESH;
    assert!(used(other.as_ref()).touch_due(later));
    assert!(other.touch_api_token(&token, later).unwrap());
    assert_eq!(
        one.list_api_tokens(ws).unwrap()[0].last_used_at,
        Some(later)
    );
    // An unknown token records nothing.
    assert!(!one.touch_api_token(&new_token(), later).unwrap());
    assert_eq!(sorted(ids(one.as_ref(), ws)), vec![token.id()]);
}

fn workspaces_are_listed_oldest_first(engine: &dyn Engine) {
    let store = engine.open();
    let early = model_relay::ids::WorkspaceId::random().unwrap();
    let late = model_relay::ids::WorkspaceId::random().unwrap();
    store
        .create_workspace(late, "late", &new_token(), T0 + 1)
        .unwrap();
    store
        .create_workspace(early, "early", &new_token(), T0)
        .unwrap();
    let listed: Vec<_> = store
        .list_workspaces()
        .unwrap()
        .into_iter()
        .map(|w| (w.id, w.name, w.created_at))
        .collect();
    assert_eq!(
        listed,
        vec![
            (early, "early".to_owned(), T0),
            (late, "late".to_owned(), T0 + 1)
        ]
    );
}
