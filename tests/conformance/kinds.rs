//! Kinds side by side on one runtime: each kind's requests are claimed, coalesced,
//! reported, expired and deleted apart from the others', and the daemon's first read says
//! which kinds wait. (Every other request case runs once per kind, alone: see `kind_tests!`.)

use model_relay::kind::{Kind, PerKind};
use model_relay::model::{Report, ReportOutcome, Status};
use model_relay::store::{NewRequest, Storer};

use crate::common::{
    PENDING_MS, RUNNING_MS, T0, TIMEOUTS, Tenant, completed, new_id, set_kind, tenant,
};
use crate::support::engines::{Engine, engine_tests};

engine_tests!(
    with_pgbouncer TIMEOUTS;
    each_kind_is_claimed_and_coalesced_apart,
    a_report_or_a_hand_out_of_another_kind_changes_nothing,
    each_kind_times_out_in_its_own_words_and_is_deleted_after_its_own_retention,
    imports_of_different_keys_are_active_together,
);

/// A new request of `kind` (a skill import of `key`), created at `now`.
fn create_of(store: &dyn Storer, t: &Tenant, kind: Kind, key: &str, now: i64) -> NewRequest {
    let new = NewRequest {
        id: new_id(),
        kind,
        key: key.to_owned(),
        input: (!key.is_empty()).then(|| format!(r#"{{"skill_key":"{key}"}}"#)),
    };
    let created = store.create_or_coalesce(t.runtime, &new, now).unwrap();
    assert_eq!(
        created.unwrap().request.id,
        new.id,
        "{kind:?} {key:?} is new"
    );
    new
}

fn pending(store: &dyn Storer, t: &Tenant) -> PerKind<bool> {
    store
        .daemon_by_token(&t.daemon_token)
        .unwrap()
        .unwrap()
        .pending
}

fn each_kind_is_claimed_and_coalesced_apart(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let mut made = Vec::new();
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        assert_eq!(
            pending(store.as_ref(), &t),
            PerKind::from_fn(|k| Kind::ALL[..i].contains(&k)),
            "before {kind:?}"
        );
        let key = if kind == Kind::SkillImport { "k" } else { "" };
        made.push(create_of(store.as_ref(), &t, kind, key, T0));
    }
    // A second create of each kind joins that kind's active request, not another's.
    for new in &made {
        let again = NewRequest {
            id: new_id(),
            ..new.clone()
        };
        let joined = store.create_or_coalesce(t.runtime, &again, T0 + 1).unwrap();
        assert_eq!(joined.unwrap().request.id, new.id, "{:?}", new.kind);
    }
    // Claims of one kind take that kind's request only, with its input.
    for new in made.iter().rev() {
        let claim = store
            .claim_next_pending(t.runtime, new.kind, T0 + 2)
            .unwrap();
        assert_eq!(claim.claimed, Some(new.id), "{:?}", new.kind);
        assert_eq!(claim.input, new.input, "{:?}", new.kind);
        let again = store
            .claim_next_pending(t.runtime, new.kind, T0 + 2)
            .unwrap();
        assert_eq!(again.claimed, None, "{:?} is claimed once", new.kind);
    }
    assert_eq!(pending(store.as_ref(), &t), PerKind::all(false));
    let mut unrenewed: Vec<_> = made.iter().map(|n| (n.kind, n.id)).collect();
    unrenewed.sort();
    let daemon = store.daemon_by_token(&t.daemon_token).unwrap().unwrap();
    assert_eq!(daemon.unrenewed, unrenewed, "every kind's, in one order");
}

fn a_report_or_a_hand_out_of_another_kind_changes_nothing(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let list = create_of(store.as_ref(), &t, Kind::LocalSkills, "", T0);
    store
        .claim_next_pending(t.runtime, Kind::LocalSkills, T0)
        .unwrap();
    set_kind(Kind::Update);
    for kind in [Kind::Models, Kind::Update, Kind::SkillImport] {
        assert_eq!(
            store
                .report(t.runtime, kind, list.id, &completed(), T0 + 1)
                .unwrap(),
            ReportOutcome::NotFound,
            "{kind:?}"
        );
        assert!(
            !store
                .hand_out_again(t.runtime, kind, list.id, T0 + 1)
                .unwrap()
        );
        assert!(
            !store
                .apply_report(t.runtime, kind, list.id, &Report::Running, T0 + 1)
                .unwrap()
        );
    }
    let r = store.find_request(t.runtime, list.id).unwrap().unwrap();
    assert_eq!(
        (r.status, r.updated_at, r.result),
        (Status::Running, T0, None)
    );
    set_kind(Kind::LocalSkills);
    assert_eq!(
        store
            .report(t.runtime, Kind::LocalSkills, list.id, &completed(), T0 + 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
}

fn each_kind_times_out_in_its_own_words_and_is_deleted_after_its_own_retention(
    engine: &dyn Engine,
) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let made: Vec<NewRequest> = Kind::ALL
        .into_iter()
        .map(|kind| {
            let key = if kind == Kind::SkillImport { "k" } else { "" };
            create_of(store.as_ref(), &t, kind, key, T0)
        })
        .collect();
    // The claimed ones miss their running deadline, the others their pending one.
    for new in &made[2..] {
        store.claim_next_pending(t.runtime, new.kind, T0).unwrap();
    }
    // One kind at a time: each ends its own request only.
    for (i, new) in made.iter().enumerate() {
        let ended = store
            .expire_overdue(new.kind, T0 + RUNNING_MS, 100)
            .unwrap();
        let pending = u64::from(i < 2);
        assert_eq!(
            (ended.pending, ended.running),
            (pending, 1 - pending),
            "{:?}",
            new.kind
        );
    }
    for (i, new) in made.iter().enumerate() {
        let phase = if i < 2 {
            Status::Pending
        } else {
            Status::Running
        };
        let r = store.find_request(t.runtime, new.id).unwrap().unwrap();
        assert_eq!(r.status, Status::Timeout);
        assert_eq!(
            r.error,
            Some(new.kind.timeout_error(&TIMEOUTS, phase)),
            "{:?}",
            new.kind
        );
        let deadline = if i < 2 {
            T0 + PENDING_MS
        } else {
            T0 + RUNNING_MS
        };
        assert_eq!(r.ended_at, Some(deadline));
    }
    // Deleting one kind's ended requests leaves the others'.
    let after = T0 + RUNNING_MS + 1;
    for (i, new) in made.iter().enumerate() {
        assert_eq!(
            store.delete_ended_before(new.kind, after, 100).unwrap(),
            1,
            "{:?}",
            new.kind
        );
        for (j, other) in made.iter().enumerate() {
            let found = store.find_request(t.runtime, other.id).unwrap();
            assert_eq!(
                found.is_some(),
                j > i,
                "{:?} after {:?}",
                other.kind,
                new.kind
            );
        }
    }
    assert_eq!(store.stored_requests(t.workspace).unwrap(), 0);
}

fn imports_of_different_keys_are_active_together(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let a = create_of(store.as_ref(), &t, Kind::SkillImport, "claude:a", T0);
    let b = create_of(store.as_ref(), &t, Kind::SkillImport, "claude:b", T0 + 1);
    let first = store
        .claim_next_pending(t.runtime, Kind::SkillImport, T0 + 2)
        .unwrap();
    let second = store
        .claim_next_pending(t.runtime, Kind::SkillImport, T0 + 2)
        .unwrap();
    assert_eq!(
        (first.claimed, second.claimed),
        (Some(a.id), Some(b.id)),
        "oldest first"
    );
    assert_eq!(store.stored_requests(t.workspace).unwrap(), 2);
}
