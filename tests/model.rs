//! The sequential model test: proptest generates sequences of store operations — create,
//! read, claim, report, move the clock, sweep, delete a runtime — runs each against an
//! engine and against a plain model of DESIGN.md's state machine written here, and requires
//! the same answer every step. A failure shrinks to a shortest sequence.
//!
//! Cases per engine: `PROPTEST_CASES` (default 64; see TESTING.md for the long soak).

mod support;

use std::time::Duration;

use model_relay::clock::Millis;
use model_relay::ids::{RequestId, RuntimeId, Token, TokenHash, WorkspaceId};
use model_relay::kind::Kind;
use model_relay::model::{
    ModelEntry, Outcome, Report, ReportOutcome, Status, StoredRequest, Timeouts,
};
use model_relay::store::{Created, Expired, Handed, Heartbeat, NewRequest, NewRuntime, Storer};
use model_relay::sweeper::{Swept, sweep_once};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::engines::{Engine, engine_tests};

const TIMEOUTS: Timeouts = Timeouts {
    pending: Duration::from_secs(30),
    running: Duration::from_secs(60),
};
const RETENTION: Duration = Duration::from_secs(600);
const RUNTIMES: usize = 3;
const T0: Millis = 1_777_627_161_000;

#[derive(Clone, Debug)]
enum Op {
    Create {
        rt: usize,
    },
    /// Reads the `req`-th request created so far (modulo), through runtime `rt`.
    Get {
        rt: usize,
        req: usize,
    },
    Heartbeat {
        rt: usize,
    },
    Report {
        rt: usize,
        req: usize,
        report: Report,
    },
    Advance {
        ms: Millis,
    },
    Sweep,
    DeleteRuntime {
        rt: usize,
    },
}

fn model_lists() -> [Vec<ModelEntry>; 3] {
    let entry = |id: &str, default: bool| ModelEntry {
        id: id.into(),
        label: id.to_uppercase(),
        provider: default.then(|| "anthropic".to_owned()),
        default: default.then_some(true),
        ..Default::default()
    };
    [
        Vec::new(),
        vec![entry("sonnet", true)],
        vec![entry("sonnet", true), entry("opus", false)],
    ]
}

fn report() -> impl Strategy<Value = Report> {
    prop_oneof![
        3 => (0..3usize, any::<bool>()).prop_map(|(models, supported)| Report::Ended(Outcome { result: None,
            status: Status::Completed,
            models: model_lists()[models].clone(),
            supported,
            error: None,
            fallback: false,
        })),
        2 => prop::sample::select(vec!["not logged in", "timed out locally"]).prop_map(|e| {
            Report::Ended(Outcome { result: None,
                status: Status::Failed,
                models: Vec::new(),
                supported: true,
                error: Some(e.to_owned()),
                fallback: false,
            })
        }),
        2 => Just(Report::Running),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let rt = 0..RUNTIMES;
    prop_oneof![
        4 => rt.clone().prop_map(|rt| Op::Create { rt }),
        4 => (rt.clone(), any::<usize>()).prop_map(|(rt, req)| Op::Get { rt, req }),
        4 => rt.clone().prop_map(|rt| Op::Heartbeat { rt }),
        5 => (rt.clone(), any::<usize>(), report()).prop_map(|(rt, req, report)| Op::Report { rt, req, report }),
        // Steps around every deadline: just before, at, and past the timeouts and retention.
        4 => prop::sample::select(vec![1, 999, 29_999, 30_000, 59_999, 60_000, 600_000, 600_001])
            .prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
        1 => rt.prop_map(|rt| Op::DeleteRuntime { rt }),
    ]
}

/// DESIGN.md's state machine, as plainly as it can be written.
struct Model {
    now: Millis,
    /// Per runtime slot: false once deleted.
    alive: [bool; RUNTIMES],
    /// Every request still stored, oldest first, with the slot of its runtime.
    requests: Vec<(usize, StoredRequest)>,
}

impl Model {
    fn expire(r: &mut StoredRequest, now: Millis) -> bool {
        if r.status.is_terminal() || r.deadline_at > now {
            return false;
        }
        r.error = Some(Kind::Models.timeout_error(&TIMEOUTS, r.status));
        r.status = Status::Timeout;
        r.updated_at = r.deadline_at;
        r.ended_at = Some(r.deadline_at);
        true
    }

    fn create(&mut self, rt: usize, id: RequestId, runtime: RuntimeId) -> Option<Created> {
        if !self.alive[rt] {
            return None;
        }
        let now = self.now;
        let mut expired = Expired::default();
        for (slot, r) in &mut self.requests {
            if *slot == rt {
                let phase = r.status;
                if Self::expire(r, now) {
                    match phase {
                        Status::Pending => expired.pending += 1,
                        _ => expired.running += 1,
                    }
                }
                if !r.status.is_terminal() {
                    return Some(Created {
                        request: r.clone(),
                        expired,
                    });
                }
            }
        }
        let r = StoredRequest {
            kind: Kind::Models,
            key: String::new(),
            input: None,
            result: None,
            id,
            runtime_id: runtime,
            status: Status::Pending,
            models: Vec::new(),
            supported: true,
            error: None,
            created_at: now,
            updated_at: now,
            deadline_at: now + 30_000,
            ended_at: None,
            fallback: false,
            cached_at: None,
            refresh_id: None,
        };
        self.requests.push((rt, r.clone()));
        Some(Created {
            request: r,
            expired,
        })
    }

    fn find(&mut self, rt: usize, id: RequestId) -> Option<&mut StoredRequest> {
        self.requests
            .iter_mut()
            .find(|(slot, r)| *slot == rt && r.id == id)
            .map(|(_, r)| r)
    }

    fn get(&mut self, rt: usize, id: RequestId) -> Option<StoredRequest> {
        let now = self.now;
        let r = self.find(rt, id)?;
        Self::expire(r, now);
        Some(r.clone())
    }

    fn heartbeat(&mut self, rt: usize) -> Heartbeat {
        if !self.alive[rt] {
            return Heartbeat::UnknownRuntime;
        }
        let now = self.now;
        let mut claimed = None;
        for (slot, r) in &mut self.requests {
            if *slot != rt || r.status != Status::Pending || Self::expire(r, now) {
                continue;
            }
            if claimed.is_none() {
                r.status = Status::Running;
                r.deadline_at = now + 60_000;
                r.updated_at = now;
                claimed = Some(r.id);
            }
        }
        let handed = claimed.map(|id| Handed {
            id,
            kind: Kind::Models,
            input: None,
        });
        Heartbeat::Alive(handed.into_iter().collect())
    }

    fn report(&mut self, rt: usize, id: RequestId, report: &Report) -> ReportOutcome {
        let now = self.now;
        let Some(r) = self.find(rt, id) else {
            return ReportOutcome::NotFound;
        };
        if r.status == Status::Running && r.deadline_at > now {
            r.updated_at = now;
            match report {
                Report::Running | Report::Progress(_) => r.deadline_at = now + 60_000,
                Report::Ended(o) => {
                    r.status = o.status;
                    r.models = o.models.clone();
                    r.supported = o.supported;
                    r.error = o.error.clone();
                    r.fallback = o.fallback;
                    r.ended_at = Some(now);
                }
            }
            return ReportOutcome::Recorded;
        }
        Self::expire(r, now);
        match report {
            Report::Ended(o) if o.is_recorded_in(r) => ReportOutcome::Replayed,
            _ => ReportOutcome::NotRunning(r.status),
        }
    }

    fn sweep(&mut self) -> Swept {
        let now = self.now;
        let expired = self
            .requests
            .iter_mut()
            .filter(|(_, r)| !r.status.is_terminal())
            .map(|(_, r)| Self::expire(r, now))
            .filter(|&e| e)
            .count() as u64;
        let cutoff = now - RETENTION.as_millis() as Millis;
        let before = self.requests.len();
        self.requests
            .retain(|(_, r)| r.ended_at.is_none_or(|ended| ended >= cutoff));
        Swept {
            expired,
            deleted: (before - self.requests.len()) as u64,
        }
    }

    fn delete_runtime(&mut self, rt: usize) -> bool {
        let was = std::mem::replace(&mut self.alive[rt], false);
        self.requests.retain(|(slot, _)| *slot != rt);
        was
    }
}

/// Runs `ops` on `store` and on the model side by side; the first difference fails.
fn check(store: &dyn Storer, ops: &[Op]) -> Result<(), TestCaseError> {
    let workspace = WorkspaceId::random().unwrap();
    store
        .create_workspace(workspace, "model", &Token::new_api().unwrap().hash(), T0)
        .unwrap();
    let (runtimes, tokens): (Vec<RuntimeId>, Vec<TokenHash>) = (0..RUNTIMES)
        .map(|_| {
            let id = RuntimeId::random().unwrap();
            let new = NewRuntime {
                id,
                workspace_id: workspace,
                name: "rt".into(),
                provider: "claude".into(),
                daemon_token: Token::new_daemon().unwrap().hash(),
            };
            store.create_runtime(&new, T0).unwrap();
            (id, new.daemon_token)
        })
        .unzip();
    let mut model = Model {
        now: T0,
        alive: [true; RUNTIMES],
        requests: Vec::new(),
    };
    // Every id ever created, so that reads and reports also name deleted and foreign ones.
    let mut ids: Vec<RequestId> = Vec::new();
    let pick = |ids: &[RequestId], i: usize| ids.get(i % ids.len().max(1)).copied();

    for (step, op) in ops.iter().enumerate() {
        let now = model.now;
        match op {
            Op::Create { rt } => {
                let id = RequestId::random().unwrap();
                let got = store
                    .create_or_coalesce(runtimes[*rt], &NewRequest::of(Kind::Models, id), now)
                    .unwrap();
                let want = model.create(*rt, id, runtimes[*rt]);
                prop_assert_eq!(&got, &want, "step {}: {:?}", step, op);
                if got.as_ref().is_some_and(|c| c.request.id == id) {
                    ids.push(id);
                }
            }
            Op::Get { rt, req } => {
                let id = pick(&ids, *req).unwrap_or(RequestId::random().unwrap());
                let got = store.get_request(runtimes[*rt], id, now).unwrap();
                prop_assert_eq!(got, model.get(*rt, id), "step {}: {:?}", step, op);
            }
            Op::Heartbeat { rt } => {
                // As the HTTP layer does it: the token first; a deleted runtime's is gone.
                let got = match store.daemon_by_token(&tokens[*rt]).unwrap() {
                    Some(daemon) => store.heartbeat(&daemon, now, 0, None, false).unwrap(),
                    None => Heartbeat::UnknownRuntime,
                };
                prop_assert_eq!(got, model.heartbeat(*rt), "step {}: {:?}", step, op);
            }
            Op::Report { rt, req, report } => {
                let id = pick(&ids, *req).unwrap_or(RequestId::random().unwrap());
                let got = store
                    .report(runtimes[*rt], Kind::Models, id, report, now)
                    .unwrap();
                prop_assert_eq!(
                    got,
                    model.report(*rt, id, report),
                    "step {}: {:?}",
                    step,
                    op
                );
            }
            Op::Advance { ms } => model.now += ms,
            Op::Sweep => {
                let got = sweep_once(store, now, RETENTION).unwrap();
                prop_assert_eq!(got, model.sweep(), "step {}: {:?}", step, op);
            }
            Op::DeleteRuntime { rt } => {
                let got = store.delete_runtime(workspace, runtimes[*rt]).unwrap();
                prop_assert_eq!(got, model.delete_runtime(*rt), "step {}: {:?}", step, op);
            }
        }
    }
    // The end state, row by row, without the expiry a read would apply.
    for id in &ids {
        let want = model
            .requests
            .iter()
            .find(|(_, r)| r.id == *id)
            .map(|(_, r)| r.clone());
        let rt = want.as_ref().map_or(runtimes[0], |r| r.runtime_id);
        let got = store.find_request(rt, *id).unwrap();
        prop_assert_eq!(got, want, "end state of {}", id);
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64)
}

engine_tests!(TIMEOUTS; engine_matches_the_model);

/// Runs the model check on one store for the whole run: opening a store per case would cost
/// a PostgreSQL schema, its tables and a pool each time.
fn engine_matches_the_model(engine: &dyn Engine) {
    let store = engine.open();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        // Shrinking re-runs the engine; bound it so a real failure still reports promptly.
        max_shrink_iters: 2_000,
        // Cases are generated afresh each run; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let ops = prop::collection::vec(op(), 1..60);
    let outcome = runner.run(&ops, |ops| {
        // A sweep counts every request in the store, so each case starts with none: the
        // ones earlier cases left are ended and deleted.
        sweep_once(store.as_ref(), Millis::MAX, Duration::ZERO).unwrap();
        check(store.as_ref(), &ops)
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
