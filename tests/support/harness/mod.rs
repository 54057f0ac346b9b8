//! The multi-instance harness: UI pollers and daemons call random instances of one cluster
//! concurrently, every call is recorded, and `check` judges the history against DESIGN.md's
//! invariants. proptest chooses the [`Schedule`]; the cluster may be in-process instances
//! over one database, per-instance memory stores (the original design, which must fail),
//! or separate `serve` processes.

mod actors;
pub mod check;
pub mod cluster;
pub mod schedule;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use model_relay::clock::{Clock, SystemClock};
use model_relay::http::Route;
use model_relay::kind::Kind;
use serde_json::{Value, json};

use super::server::Http;
use actors::{daemon, poller};
use check::Limits;
use cluster::Cluster;
use schedule::{Dice, Schedule};

/// What a call was, for the checker.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Heartbeat,
    Create,
    Poll,
    /// A read of a request through a runtime it does not belong to: must be 404.
    ForeignRead,
    /// A daemon's report, with the body it sent.
    Report(Value),
    /// The read of every created id from every instance once the run is over.
    FinalRead,
    /// Not a call: instance `instance` was stopped and started again in this span. Calls
    /// held on it then were answered early, at its shutdown.
    Restart,
}

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Call {
    pub actor: String,
    pub op: Op,
    /// The kind of request whose route it called (none for a heartbeat).
    pub kind: Option<Kind>,
    pub instance: usize,
    /// The runtime whose path or token the call used.
    pub runtime: String,
    pub request: Option<String>,
    /// Wall-clock milliseconds, the same clock the instances use.
    pub invoked: i64,
    pub completed: i64,
    /// Status and JSON body, or why no answer came.
    pub outcome: Result<(u16, Value), String>,
    /// How long a waiting call asked to be held (0: not a waiting call).
    pub wait_ms: u64,
    /// A heartbeat's `working_on`, when it sent one.
    pub working_on: Option<Vec<String>>,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match &self.outcome {
            Ok((status, json)) => format!("{status} {json}"),
            Err(e) => format!("no answer: {e}"),
        };
        let op = match &self.op {
            Op::Report(body) => format!("Report({body})"),
            other => format!("{other:?}"),
        };
        write!(
            f,
            "[{} {op} @{} req={} t={}..{}] {outcome}",
            self.actor,
            self.instance,
            self.request.as_deref().unwrap_or("-"),
            self.invoked,
            self.completed
        )
    }
}

/// The ids a heartbeat's answer hands out, of every kind (each kind's field, and a batch).
pub fn handed_out(answer: &Value) -> Vec<String> {
    hand_outs(answer).into_iter().map(|(_, id)| id).collect()
}

/// The requests, by kind, a heartbeat's answer hands out, read as the daemon reads them.
pub fn hand_outs(answer: &Value) -> Vec<(Kind, String)> {
    model_relay::daemon::hand_outs(answer)
        .expect("a heartbeat's answer names its requests by valid ids")
        .into_iter()
        .map(|h| (h.kind, h.id.to_string()))
        .collect()
}

/// The kind of request whose route `path` is.
fn kind_of(path: &str) -> Option<Kind> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    match Route::resolve(path)? {
        Route::Create(_, kind) | Route::Read(_, kind, _) | Route::Result(_, kind, _) => Some(kind),
        _ => None,
    }
}

/// The workspace and runtimes a run uses.
#[derive(Clone, Debug)]
pub struct Tenancy {
    pub api: String,
    /// (runtime id, daemon token)
    pub runtimes: Vec<(String, String)>,
}
/// What every actor of one run shares.
struct Run<C> {
    cluster: Arc<C>,
    http: Http,
    calls: Mutex<Vec<Call>>,
    schedule: Schedule,
    limits: Limits,
    /// Set when the pollers are done: daemons stop heartbeating.
    stop: AtomicBool,
    /// The same, for a daemon to drop a held heartbeat at once.
    stopping: tokio::sync::watch::Sender<bool>,
    started: i64,
}

impl<C: Cluster> Run<C> {
    /// Makes one call and records it; `None` when no answer came.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        actor: &str,
        op: Op,
        instance: usize,
        runtime: &str,
        request: Option<&str>,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        let url = format!("{}{path}", self.cluster.base(instance));
        let bytes = body.map(|b| b.to_string().into_bytes());
        let wait_ms = match body {
            Some(body) => body["wait_ms"].as_u64().unwrap_or(0),
            None => path
                .split_once("?wait_ms=")
                .and_then(|(_, ms)| ms.parse().ok())
                .unwrap_or(0),
        };
        let working_on = body
            .and_then(|b| b.get("working_on"))
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            });
        let invoked = SystemClock.now();
        let answer = self.http.try_call(method, &url, Some(token), bytes).await;
        let completed = SystemClock.now();
        let outcome = answer.map(|a| (a.status.as_u16(), a.json));
        let request = request
            .map(str::to_owned)
            .or_else(|| match (&op, &outcome) {
                (Op::Heartbeat, Ok((_, json))) => handed_out(json).into_iter().next(),
                (Op::Create, Ok((_, json))) => json["id"].as_str().map(str::to_owned),
                _ => None,
            });
        let answered = outcome.clone().ok();
        self.calls.lock().unwrap().push(Call {
            actor: actor.to_owned(),
            op,
            kind: kind_of(path),
            instance,
            runtime: runtime.to_owned(),
            request,
            invoked,
            completed,
            outcome,
            wait_ms,
            working_on,
        });
        answered
    }

    /// Records that a call was made and dropped before its answer (a connection the client
    /// closed): whatever the server did with it is unseen.
    fn dropped(&self, actor: &str, op: Op, instance: usize, runtime: &str, invoked: i64) {
        self.calls.lock().unwrap().push(Call {
            actor: actor.to_owned(),
            op,
            kind: None,
            instance,
            runtime: runtime.to_owned(),
            request: None,
            invoked,
            completed: SystemClock.now(),
            outcome: Err("dropped by the client".to_owned()),
            wait_ms: 0,
            working_on: None,
        });
    }

    /// A heartbeat; held up to `wait_ms` when that is not 0, with `working_on` when given.
    async fn heartbeat(
        &self,
        actor: &str,
        instance: usize,
        rt: &str,
        token: &str,
        wait_ms: u64,
        working_on: Option<Vec<String>>,
    ) -> Option<(u16, Value)> {
        let mut beat = json!({"runtime_id": rt});
        if wait_ms > 0 {
            beat["wait_ms"] = json!(wait_ms);
        }
        if let Some(held) = working_on {
            beat["working_on"] = json!(held);
        }
        self.call(
            actor,
            Op::Heartbeat,
            instance,
            rt,
            None,
            Method::POST,
            "/api/daemon/heartbeat",
            token,
            Some(&beat),
        )
        .await
    }

    /// A report on a request of `kind`, retried on other instances while there is no
    /// answer or a 5xx.
    #[allow(clippy::too_many_arguments)]
    async fn report(
        &self,
        actor: &str,
        dice: &mut Dice,
        rt: &str,
        kind: Kind,
        token: &str,
        id: &str,
        body: &Value,
    ) {
        let path = format!("/api/daemon/runtimes/{rt}/{}/{id}/result", kind.spec().path);
        for _ in 0..6 {
            let instance = dice.below(self.cluster.size());
            let op = Op::Report(body.clone());
            match self
                .call(
                    actor,
                    op,
                    instance,
                    rt,
                    Some(id),
                    Method::POST,
                    &path,
                    token,
                    Some(body),
                )
                .await
            {
                Some((status, _)) if status < 500 => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn pause(&self, ms: u64) -> tokio::time::Sleep {
        tokio::time::sleep(Duration::from_millis(ms))
    }
}

/// Runs one schedule against `cluster` and returns every call made, the final reads of
/// every created id from every instance included.
pub async fn drive<C: Cluster>(
    cluster: Arc<C>,
    tenancy: Tenancy,
    schedule: Schedule,
    limits: Limits,
) -> Vec<Call> {
    let tenancy = Arc::new(tenancy);
    let run = Arc::new(Run {
        cluster: cluster.clone(),
        http: Http::default(),
        calls: Mutex::new(Vec::new()),
        schedule: schedule.clone(),
        limits,
        stop: AtomicBool::new(false),
        stopping: tokio::sync::watch::Sender::new(false),
        started: SystemClock.now(),
    });
    let n = cluster.size();
    let runtimes = &tenancy.runtimes[..schedule.runtimes.min(tenancy.runtimes.len())];
    // Every runtime is online before the first create.
    for (i, (rt, token)) in runtimes.iter().enumerate() {
        let mut tries = 0;
        while run
            .heartbeat("setup", (i + tries) % n, rt, token, 0, None)
            .await
            .is_none()
            && tries < 20
        {
            tries += 1;
        }
    }
    let daemons: Vec<_> = runtimes
        .iter()
        .enumerate()
        .map(|(k, (rt, token))| tokio::spawn(daemon(run.clone(), k, rt.clone(), token.clone())))
        .collect();
    let restart = schedule.restart.map(|(i, after)| {
        let run = run.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let i = i % run.cluster.size();
            let invoked = SystemClock.now();
            run.cluster.restart(i).await;
            run.calls.lock().unwrap().push(Call {
                actor: "restart".to_owned(),
                op: Op::Restart,
                kind: None,
                instance: i,
                runtime: String::new(),
                request: None,
                invoked,
                completed: SystemClock.now(),
                outcome: Ok((200, Value::Null)),
                wait_ms: 0,
                working_on: None,
            });
        })
    });
    let pollers: Vec<_> = (0..schedule.pollers)
        .map(|p| tokio::spawn(poller(run.clone(), p, tenancy.clone())))
        .collect();
    for poller in pollers {
        poller.await.expect("poller task");
    }
    run.stop.store(true, Ordering::SeqCst);
    run.stopping.send_replace(true);
    for daemon in daemons {
        daemon.await.expect("daemon task");
    }
    if let Some(restart) = restart {
        restart.await.expect("restart task");
    }
    // 1. Every id a create returned, read from every instance.
    let created: Vec<(String, &'static str, String)> = {
        let calls = run.calls.lock().unwrap();
        let mut ids: Vec<(String, &'static str, String)> = calls
            .iter()
            .filter(|c| c.op == Op::Create)
            .filter_map(|c| match &c.outcome {
                Ok((200, json)) => Some((c, json)),
                _ => None,
            })
            // An answer from the catalog, and the discovery it started, if any.
            .flat_map(|(c, json)| {
                let path = c.kind.map_or("models", |k| k.spec().path);
                [&json["id"], &json["refresh_id"]]
                    .into_iter()
                    .filter_map(move |id| Some((c.runtime.clone(), path, id.as_str()?.to_owned())))
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    for (rt, kind_path, id) in &created {
        let path = format!("/api/runtimes/{rt}/{kind_path}/{id}");
        for i in 0..n {
            run.call(
                "final",
                Op::FinalRead,
                i,
                rt,
                Some(id),
                Method::GET,
                &path,
                &tenancy.api,
                None,
            )
            .await;
        }
    }
    std::mem::take(&mut *run.calls.lock().unwrap())
}

/// Counts of what a run did, for the test output and the soak report.
pub fn summary(history: &[Call]) -> String {
    use std::collections::BTreeMap;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for call in history {
        let op = match &call.op {
            Op::Report(body) => format!("report:{}", body["status"].as_str().unwrap_or("?")),
            other => format!("{other:?}").to_lowercase(),
        };
        let op = match call.kind {
            Some(kind) if kind != Kind::Models => format!("{}-{op}", kind.name()),
            _ => op,
        };
        let outcome = match &call.outcome {
            Ok((status, json)) => match json["status"].as_str() {
                Some(s) if matches!(call.op, Op::Poll | Op::FinalRead) => format!("{status}:{s}"),
                _ if json["refresh_id"].is_string() => format!("{status}:cached+refresh"),
                _ if json["cached"] == true => format!("{status}:cached"),
                _ if !handed_out(json).is_empty() => format!("{status}:claim"),
                _ => status.to_string(),
            },
            Err(_) => "no-answer".to_owned(),
        };
        let op = match call.wait_ms {
            0 => op,
            _ => format!("held-{op}"),
        };
        *counts.entry(format!("{op} {outcome}")).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
