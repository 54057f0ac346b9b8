//! Text: what a report and a runtime may hold, read back the same on every engine.
//! PostgreSQL's text columns refuse NUL (SQLSTATE 22021) where SQLite and memory keep it,
//! so the store replaces NUL with U+FFFD before any engine sees it (DESIGN.md, "Tokens,
//! limits, operations"); everything else — newlines, tabs, 4-byte UTF-8, the longest
//! texts the parsers let through — is kept byte for byte.

use model_relay::ids::{RuntimeId, Token};
use model_relay::kind::Kind;
use model_relay::model::{
    MAX_CHOICE_TEXT, MAX_DESCRIPTION, ModelEntry, Outcome, Report, ReportOutcome, ServiceTier,
    Status, Thinking, ThinkingLevel,
};
use model_relay::store::NewRuntime;

use crate::common::{T0, TIMEOUTS, get, running, tenant, workspace};
use crate::support::engines::{Engine, engine_tests};

// Model lists only: the texts here are a model report's (entries, error) and a runtime's
// name; the other kinds' results are JSON their parsers wrote, held alike by every engine.
engine_tests!(
    with_pgbouncer TIMEOUTS;
    a_failed_report_keeps_its_error_byte_for_byte_but_for_nul,
    a_completed_report_keeps_its_model_texts_byte_for_byte_but_for_nul,
    an_exact_replay_of_a_report_with_nul_is_a_replay,
    a_replay_with_u_fffd_where_the_first_had_nul_is_the_same_report,
    runtime_names_of_four_byte_characters_at_the_maximum_round_trip,
    a_runtime_name_with_nul_is_stored_with_u_fffd,
);

/// A daemon's stderr as discovery commands print it: a NUL, line breaks, tabs, 4-byte
/// characters, and long (the daemon quotes up to 2,000 bytes of it, plus its own words).
fn awkward_error() -> String {
    let mut error = String::from("discovery command failed (exit status 1); stderr: a\0b\n");
    error.push_str("\tat line 2\r\n𝄞🙂 done\0");
    error.push_str(&"𝄞".repeat(1000));
    error
}

fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// A model entry with NUL, line breaks, tabs and 4-byte characters in every free text, each
/// at the longest the report parser allows (in characters, so four times that in bytes).
fn awkward_model(nul: &str) -> ModelEntry {
    let long = |max: usize, head: &str| {
        let head = head.replace("{NUL}", nul);
        let room = max - head.chars().count();
        format!("{head}{}", "𝄞".repeat(room))
    };
    ModelEntry {
        id: "gpt-5".into(),
        label: long(MAX_CHOICE_TEXT, "GPT{NUL}5\n\t🙂"),
        provider: Some(format!("open{nul}ai")),
        default: Some(true),
        thinking: Some(Thinking {
            supported_levels: vec![ThinkingLevel {
                value: "low".into(),
                label: long(MAX_CHOICE_TEXT, "Lo{NUL}w\t"),
                description: Some(long(MAX_DESCRIPTION, "line one{NUL}\nline two\t🙂")),
            }],
            default_level: Some("low".into()),
        }),
        service_tiers: Some(vec![ServiceTier {
            id: "flex".into(),
            name: long(MAX_CHOICE_TEXT, "Fl{NUL}ex\r\n"),
            description: Some(long(MAX_DESCRIPTION, "che{NUL}aper\n𝄞")),
        }]),
    }
}

fn failed_with(error: &str) -> Report {
    Report::Ended(Outcome {
        result: None,
        status: Status::Failed,
        models: Vec::new(),
        supported: true,
        error: Some(error.to_owned()),
        fallback: false,
    })
}

fn completed_with(model: ModelEntry) -> Report {
    Report::Ended(Outcome {
        result: None,
        status: Status::Completed,
        models: vec![model],
        supported: true,
        error: None,
        fallback: false,
    })
}

fn a_failed_report_keeps_its_error_byte_for_byte_but_for_nul(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let error = awkward_error();
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &failed_with(&error), T0 + 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(store.as_ref(), t.runtime, id, T0 + 2);
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.as_deref(), Some(without_nul(&error).as_str()));
    // A second handle reads it from the database, not from anything the first one kept.
    let other = engine.open();
    assert_eq!(get(other.as_ref(), t.runtime, id, T0 + 2), r);
}

fn a_completed_report_keeps_its_model_texts_byte_for_byte_but_for_nul(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    let report = completed_with(awkward_model("\0"));
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &report, T0 + 1)
            .unwrap(),
        ReportOutcome::Recorded
    );
    let r = get(engine.open().as_ref(), t.runtime, id, T0 + 2);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.models, vec![awkward_model("\u{FFFD}")]);
}

fn an_exact_replay_of_a_report_with_nul_is_a_replay(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    for report in [
        failed_with(&awkward_error()),
        completed_with(awkward_model("\0")),
    ] {
        let id = running(store.as_ref(), t.runtime, T0);
        store
            .report(t.runtime, Kind::Models, id, &report, T0 + 1)
            .unwrap();
        let before = get(store.as_ref(), t.runtime, id, T0 + 1);
        // The stored text has U+FFFD where the report has NUL: the replay is compared
        // once cleaned, as it was recorded, so the daemon's retry is not a 409.
        assert_eq!(
            store
                .report(t.runtime, Kind::Models, id, &report, T0 + 2)
                .unwrap(),
            ReportOutcome::Replayed,
            "{report:?}"
        );
        assert_eq!(get(store.as_ref(), t.runtime, id, T0 + 2), before);
    }
}

fn a_replay_with_u_fffd_where_the_first_had_nul_is_the_same_report(engine: &dyn Engine) {
    let store = engine.open();
    let t = tenant(store.as_ref());
    let id = running(store.as_ref(), t.runtime, T0);
    store
        .report(
            t.runtime,
            Kind::Models,
            id,
            &completed_with(awkward_model("\0")),
            T0 + 1,
        )
        .unwrap();
    // What was recorded, sent again: the same report, since NUL reads as U+FFFD.
    let cleaned = completed_with(awkward_model("\u{FFFD}"));
    assert_eq!(
        store
            .report(t.runtime, Kind::Models, id, &cleaned, T0 + 2)
            .unwrap(),
        ReportOutcome::Replayed
    );
}

fn new_runtime(workspace: model_relay::ids::WorkspaceId, name: &str, provider: &str) -> NewRuntime {
    NewRuntime {
        id: RuntimeId::random().unwrap(),
        workspace_id: workspace,
        name: name.to_owned(),
        provider: provider.to_owned(),
        daemon_token: Token::new_daemon().unwrap().hash(),
    }
}

fn runtime_names_of_four_byte_characters_at_the_maximum_round_trip(engine: &dyn Engine) {
    let store = engine.open();
    let (ws, _) = workspace(store.as_ref());
    // 200 and 100 characters: the HTTP parser's bounds, in 4-byte characters.
    let name = format!("🙂{}", "𝄞".repeat(199));
    let provider = "𝄞".repeat(100);
    let new = new_runtime(ws, &name, &provider);
    let created = store.create_runtime(&new, T0).unwrap();
    assert_eq!(
        (created.name.as_str(), created.provider.as_str()),
        (name.as_str(), provider.as_str())
    );
    let read = engine
        .open()
        .find_runtime(ws, new.id)
        .unwrap()
        .expect("stored");
    assert_eq!(read, created);
    assert_eq!(store.list_runtimes(ws, None, 10).unwrap(), vec![created]);
}

fn a_runtime_name_with_nul_is_stored_with_u_fffd(engine: &dyn Engine) {
    // The HTTP parser refuses it with 400 first; a caller that skips it (the demo, a tool
    // on the store) still gets the same runtime on every engine, never a store error.
    let store = engine.open();
    let (ws, _) = workspace(store.as_ref());
    let new = new_runtime(ws, "lap\0top", "cla\0ude");
    let created = store.create_runtime(&new, T0).unwrap();
    assert_eq!(
        (created.name.as_str(), created.provider.as_str()),
        ("lap\u{FFFD}top", "cla\u{FFFD}ude")
    );
    let read = engine
        .open()
        .find_runtime(ws, new.id)
        .unwrap()
        .expect("stored");
    assert_eq!(read, created);
}
