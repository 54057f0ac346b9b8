//! Differential: one sequence of store operations, run on the memory engine and on the
//! SQLite engine side by side, must get the same answer from both at every step, and leave
//! the same rows behind. The clock is the `now` each call is given. Requests are of every
//! kind, mixed on one runtime.
#![no_main]

use model_relay::kind::Kind;
use model_relay::store::NewRequest;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use model_relay::clock::Millis;
use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash, WorkspaceId};
use model_relay::model::{ModelEntry, Outcome, Report, Status, Thinking, ThinkingLevel, Timeouts};
use model_relay::store::memory::MemoryStore;
use model_relay::store::sqlite::SqliteStore;
use model_relay::store::{Ask, NewRuntime, RequestCounts, Storer};
use model_relay::sweeper::sweep_once;

const TIMEOUTS: Timeouts = Timeouts {
    pending: Duration::from_secs(30),
    running: Duration::from_secs(60),
};
const RETENTION: Duration = Duration::from_secs(600);
const RETENTION_MS: Millis = 600_000;
const RUNTIMES: usize = 3;
const T0: Millis = 1_777_627_161_000;
/// Steps around every deadline: just before, at, and past the timeouts and retention.
const STEPS: [Millis; 8] = [1, 999, 29_999, 30_000, 59_999, 60_000, 600_000, 600_001];
/// The catalog's windows, short enough that the steps above cross them.
const CATALOG_FRESH: Millis = 60_000;
const CATALOG_SERVE: Millis = 600_000;
/// Few enough stored requests that inputs reach the workspace's limit, and cross it back
/// as the sweeper deletes.
const MAX_STORED: u64 = 6;
/// What the HTTP layer passes by default (a tenth of `offline_after`): heartbeats seen this
/// recently are answered with reads only, and both engines must agree on which those are.
const REFRESH_AFTER: Millis = 4_500;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A create of the kind `kind` picks ([`kind`]); an import of the key `key` picks.
    Create {
        rt: u8,
        kind: u8,
        key: u8,
    },
    /// The UI's create, through the catalog.
    Ask {
        rt: u8,
        refresh: bool,
        online: bool,
    },
    Get {
        rt: u8,
        req: u8,
    },
    /// `batches`: the daemon takes a batch of imports; `forget`: its `working_on` is empty,
    /// so every unrenewed running request is handed out again.
    Heartbeat {
        rt: u8,
        batches: bool,
        forget: bool,
    },
    /// A report on the route of the kind `kind` picks, whatever the request's kind is.
    Report {
        rt: u8,
        req: u8,
        kind: u8,
        report: ReportKind,
    },
    Step {
        step: u8,
    },
    Advance {
        ms: u16,
    },
    Sweep,
    DeleteRuntime {
        rt: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum ReportKind {
    Running,
    /// Progress with an output from [`awkward_text`] (an update's).
    Progress {
        text: u8,
    },
    /// `text` picks the models' label and description from [`awkward_text`].
    Completed {
        models: u8,
        supported: bool,
        fallback: bool,
        text: u8,
    },
    /// `error` picks the error from [`awkward_text`].
    Failed {
        error: Option<u8>,
    },
}

/// Text that engines have disagreed on (issue 15: PostgreSQL refused NUL where SQLite kept
/// it), picked by the input rather than generated: what matters is that each kind is
/// there, and a byte to choose it keeps the inputs small.
fn awkward_text(i: u8) -> String {
    match i % 8 {
        0 => String::new(),
        1 => "a\0b".to_owned(),
        2 => "tab\there".to_owned(),
        3 => "line\nbreak\r\n".to_owned(),
        4 => "𝄞🙂".to_owned(),
        5 => "\0".to_owned(),
        6 => "\u{FFFD}".to_owned(),
        // Longer than any bound the parsers set, in 4-byte characters, a NUL at the end.
        _ => format!("{}\0", "𝄞".repeat(1200)),
    }
}

/// The kind a byte picks.
fn kind(k: u8) -> Kind {
    Kind::ALL[usize::from(k) % Kind::ALL.len()]
}

/// A new request of `kind`: an import of one of two keys, an update with a version.
fn new_request(kind: Kind, id: RequestId, key: u8) -> NewRequest {
    match kind {
        Kind::SkillImport => {
            let key = format!("claude:s{}", key % 2);
            NewRequest {
                id,
                kind,
                input: Some(format!(r#"{{"skill_key":"{key}"}}"#)),
                key,
            }
        }
        Kind::Update => NewRequest {
            id,
            kind,
            key: String::new(),
            input: Some(r#"{"target_version":"2.1.0"}"#.to_owned()),
        },
        Kind::Models | Kind::LocalSkills => NewRequest::of(kind, id),
    }
}

impl ReportKind {
    fn report(&self, kind: Kind) -> Report {
        let entry = |id: &str, default: bool, text: &str| ModelEntry {
            id: id.into(),
            label: format!("{}{text}", id.to_uppercase()),
            provider: default.then(|| "anthropic".to_owned()),
            default: default.then_some(true),
            thinking: Some(Thinking {
                supported_levels: vec![ThinkingLevel {
                    value: "low".into(),
                    label: text.to_owned(),
                    description: Some(text.to_owned()),
                }],
                default_level: None,
            }),
            ..Default::default()
        };
        match *self {
            ReportKind::Running => Report::Running,
            ReportKind::Progress { text } => {
                Report::Progress(serde_json::json!({ "output": awkward_text(text) }).to_string())
            }
            // Another kind's result is the JSON its parser writes.
            ReportKind::Completed { text, .. } if kind != Kind::Models => {
                let result = serde_json::json!({ "output": awkward_text(text) });
                Report::Ended(Outcome {
                    result: Some(result.to_string()),
                    status: Status::Completed,
                    models: Vec::new(),
                    supported: true,
                    error: None,
                    fallback: false,
                })
            }
            ReportKind::Completed {
                models,
                supported,
                fallback,
                text,
            } => {
                let text = awkward_text(text);
                Report::Ended(Outcome {
                    result: None,
                    status: Status::Completed,
                    models: [entry("sonnet", true, &text), entry("opus", false, &text)]
                        .into_iter()
                        .take(usize::from(models % 3))
                        .collect(),
                    supported,
                    error: None,
                    fallback,
                })
            }
            ReportKind::Failed { error } => Report::Ended(Outcome {
                result: None,
                status: Status::Failed,
                models: Vec::new(),
                supported: true,
                error: error.map(awkward_text),
                fallback: false,
            }),
        }
    }
}

/// One SQLite store for the whole run, and the workspace every input's runtimes live in.
/// Opening a store per input (a file, a pool and its threads each time) made the resident
/// set grow by gigabytes within seconds under ASan; each input instead deletes its runtimes
/// at the end, which deletes their requests, and checks that nothing is left.
struct Shared {
    _dir: tempfile::TempDir,
    sqlite: SqliteStore,
    workspace: WorkspaceId,
    api: TokenHash,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sqlite =
            SqliteStore::open(&dir.path().join("fuzz.db"), TIMEOUTS).expect("sqlite store");
        let workspace = WorkspaceId::random().unwrap();
        let api = Token::new_api().unwrap().hash();
        sqlite
            .create_workspace(workspace, "fuzz", &api, T0)
            .unwrap();
        Shared {
            _dir: dir,
            sqlite,
            workspace,
            api,
        }
    })
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 64 {
        return;
    }
    let shared = shared();
    let workspace = shared.workspace;
    let memory = MemoryStore::new(TIMEOUTS);
    memory
        .create_workspace(workspace, "fuzz", &shared.api, T0)
        .unwrap();
    let engines: [&dyn Storer; 2] = [&memory, &shared.sqlite];
    // The store starts every input empty: what one input leaves cannot change another's.
    assert_eq!(
        shared.sqlite.count_requests().unwrap(),
        RequestCounts::default()
    );

    let runtimes: Vec<RuntimeId> = (0..RUNTIMES)
        .map(|_| RuntimeId::random().unwrap())
        .collect();
    let tokens: Vec<TokenHash> = (0..RUNTIMES)
        .map(|_| Token::new_daemon().unwrap().hash())
        .collect();
    for store in engines {
        for (i, (&id, token)) in runtimes.iter().zip(&tokens).enumerate() {
            let new = NewRuntime {
                id,
                workspace_id: workspace,
                // Awkward names too: the store replaces NUL alike on both engines.
                name: format!("rt{i}{}", awkward_text(2 * i as u8 + 1)),
                provider: "claude".into(),
                daemon_token: token.clone(),
            };
            store.create_runtime(&new, T0).unwrap();
        }
    }

    // Every id ever offered to a create, so reads and reports also name foreign, deleted
    // and never-created ones.
    let mut ids: Vec<RequestId> = Vec::new();
    let pick = |ids: &[RequestId], i: u8| ids.get(usize::from(i) % ids.len().max(1)).copied();
    let runtime = |rt: u8| runtimes[usize::from(rt) % RUNTIMES];
    let mut now = T0;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Create { rt, kind: k, key } => {
                let id = RequestId::random().unwrap();
                ids.push(id);
                let new = new_request(kind(k), id, key);
                let [a, b] = engines.map(|s| {
                    s.create_or_coalesce_within(runtime(rt), &new, now, MAX_STORED)
                        .unwrap()
                });
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::Ask {
                rt,
                refresh,
                online,
            } => {
                let ask = Ask {
                    id: RequestId::random().unwrap(),
                    cached: RequestId::random().unwrap(),
                    refresh,
                    online,
                    fresh: CATALOG_FRESH,
                    serve: CATALOG_SERVE,
                    reuse_after: now - RETENTION_MS / 2,
                    max_stored: MAX_STORED,
                };
                ids.extend([ask.id, ask.cached]);
                let [a, b] = engines.map(|s| {
                    let found = s.find_runtime(workspace, runtime(rt)).unwrap();
                    let asked = found
                        .as_ref()
                        .map(|r| s.ask_for_models(r, &ask, now).unwrap());
                    (found, asked)
                });
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::Get { rt, req } => {
                let Some(id) = pick(&ids, req) else { continue };
                let [a, b] = engines.map(|s| s.get_request(runtime(rt), id, now).unwrap());
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::Heartbeat {
                rt,
                batches,
                forget,
            } => {
                // As the HTTP layer does it: the token first; a deleted runtime's is gone.
                let token = &tokens[usize::from(rt) % RUNTIMES];
                let working_on = forget.then_some(&[][..]);
                let [a, b] = engines.map(|s| {
                    let daemon = s.daemon_by_token(token).unwrap();
                    let beat = daemon.as_ref().map(|d| {
                        s.heartbeat(d, now, REFRESH_AFTER, working_on, batches)
                            .unwrap()
                    });
                    (daemon, beat)
                });
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::Report {
                rt,
                req,
                kind: k,
                ref report,
            } => {
                let Some(id) = pick(&ids, req) else { continue };
                let report = report.report(kind(k));
                let [a, b] =
                    engines.map(|s| s.report(runtime(rt), kind(k), id, &report, now).unwrap());
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::Step { step } => now += STEPS[usize::from(step) % STEPS.len()],
            Op::Advance { ms } => now += Millis::from(ms),
            Op::Sweep => {
                let [a, b] = engines.map(|s| sweep_once(s, now, RETENTION).unwrap());
                assert_eq!(a, b, "step {step}: {op:?}");
            }
            Op::DeleteRuntime { rt } => {
                let [a, b] = engines.map(|s| s.delete_runtime(workspace, runtime(rt)).unwrap());
                assert_eq!(a, b, "step {step}: {op:?}");
            }
        }
        // The memory engine counts the workspace's requests; SQLite keeps a count that
        // every insert and delete must move by exactly what it did.
        let [a, b] = engines.map(|s| s.stored_requests(workspace).unwrap());
        assert_eq!(a, b, "stored requests after step {step}: {op:?}");
    }
    // The rows left behind, as stored (no expiry applied), and the counts per status.
    for id in &ids {
        for &rt in &runtimes {
            let [a, b] = engines.map(|s| s.find_request(rt, *id).unwrap());
            assert_eq!(a, b, "end state of {id}");
        }
    }
    let [a, b] = engines.map(|s| s.count_requests().unwrap());
    assert_eq!(a, b, "counts at the end");
    for &rt in &runtimes {
        let [a, b] = engines.map(|s| s.delete_runtime(workspace, rt).unwrap());
        assert_eq!(a, b, "deleting {rt} at the end");
    }
});
