//! The actors of a run: daemons (heartbeats, and a job per claimed request) and UI pollers.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hyper::Method;
use model_relay::clock::{Clock, SystemClock};
use model_relay::kind::Kind;
use serde_json::{Value, json};

use super::check;
use super::cluster::Cluster;
use super::schedule::{Dice, Plan};
use super::{Op, Run, Tenancy, hand_outs};

/// The end a daemon reports for a request of `kind` on `plan` (`second`: its second report).
fn report_body(kind: Kind, plan: Plan, second: bool) -> Value {
    if kind != Kind::Models {
        return kind_report_body(kind, plan, second);
    }
    let models = [
        json!([]),
        json!([{"id": "sonnet", "label": "Sonnet"}]),
        json!([{"id": "sonnet", "label": "Sonnet"}, {"id": "opus", "label": "Opus"}]),
    ];
    match (plan, second) {
        (Plan::Complete(m), _) => {
            json!({"status": "completed", "models": models[m % 3], "supported": true})
        }
        (Plan::Unsupported, _) => json!({"status": "completed", "supported": false}),
        (Plan::Fail, _) | (Plan::FailThenComplete, false) => {
            json!({"status": "failed", "supported": true, "error": "claude: not logged in"})
        }
        _ => json!({"status": "completed", "models": models[1], "supported": true}),
    }
}

/// [`report_body`] for the kinds other than `models`.
fn kind_report_body(kind: Kind, plan: Plan, second: bool) -> Value {
    let n = match plan {
        Plan::Complete(m) => m % 3,
        _ => 1,
    };
    let result = match kind {
        Kind::LocalSkills => {
            let skills: Vec<Value> = (0..n)
                .map(|i| {
                    json!({"key": format!("claude:s{i}"), "name": "S", "source_path": "/s",
                                "provider": "claude", "file_count": 1})
                })
                .collect();
            json!({"skills": skills, "supported": !matches!(plan, Plan::Unsupported)})
        }
        Kind::SkillImport => json!({"skill": {"key": "claude:s", "name": "S",
            "content": format!("# S{n}"), "source_path": "/s", "provider": "claude",
            "files": []}}),
        _ => json!({"output": format!("step {n}\n")}),
    };
    let mut body = match (plan, second) {
        (Plan::Fail, _) | (Plan::FailThenComplete, false) => {
            json!({"status": "failed", "error": "claude: not logged in"})
        }
        _ => json!({"status": "completed"}),
    };
    if (body["status"] == "completed" || kind == Kind::Update)
        && let (Some(body), Value::Object(result)) = (body.as_object_mut(), result)
    {
        body.extend(result);
    }
    body
}

/// A create's path and body for a request of `kind`; `n` picks an import's key and an
/// update's version.
fn create_of(kind: Kind, rt: &str, n: usize) -> (String, Option<Value>) {
    let path = format!("/api/runtimes/{rt}/{}", kind.spec().path);
    let body = match kind {
        Kind::SkillImport => Some(json!({"skill_key": format!("claude:s{}", n % 2)})),
        Kind::Update => Some(json!({"target_version": format!("2.{n}.0")})),
        Kind::Models | Kind::LocalSkills => None,
    };
    (path, body)
}

/// A daemon's work on one claimed request, beside its heartbeats. The request stays in
/// `held` (the daemon's `working_on`) until the job is over.
#[allow(clippy::too_many_arguments)]
async fn job<C: Cluster>(
    run: Arc<Run<C>>,
    actor: String,
    rt: String,
    token: String,
    (kind, id): (Kind, String),
    plan: Plan,
    seed: u64,
    held: Arc<Mutex<BTreeSet<String>>>,
) {
    work(&run, &actor, &rt, &token, kind, &id, plan, seed).await;
    held.lock().unwrap().remove(&id);
}

#[allow(clippy::too_many_arguments)]
async fn work<C: Cluster>(
    run: &Run<C>,
    actor: &str,
    rt: &str,
    token: &str,
    kind: Kind,
    id: &str,
    plan: Plan,
    seed: u64,
) {
    let mut dice = Dice::new(seed, 7);
    let delay = run.schedule.daemon_delay_ms;
    run.pause(delay).await;
    match plan {
        Plan::Abandon => return,
        Plan::RenewThenComplete => {
            let renewal = match kind {
                Kind::Update => json!({"status": "running", "output": "step 0\n"}),
                _ => json!({"status": "running"}),
            };
            run.report(actor, &mut dice, rt, kind, token, id, &renewal)
                .await;
            run.pause(delay).await;
        }
        _ => {}
    }
    let body = report_body(kind, plan, false);
    run.report(actor, &mut dice, rt, kind, token, id, &body)
        .await;
    match plan {
        Plan::CompleteTwice => {
            run.report(actor, &mut dice, rt, kind, token, id, &body)
                .await
        }
        Plan::FailThenComplete => {
            let second = report_body(kind, plan, true);
            run.report(actor, &mut dice, rt, kind, token, id, &second)
                .await;
        }
        _ => {}
    }
}

/// One heartbeat as this run's daemons send it: held for the schedule's wait, listing the
/// requests the daemon holds; dropped by the client partway through when `cut_after` says
/// so (a connection lost while held), or when the run stops.
async fn beat<C: Cluster>(
    run: &Run<C>,
    actor: &str,
    instance: usize,
    rt: &str,
    token: &str,
    held: &Mutex<BTreeSet<String>>,
    cut_after: Option<u64>,
) -> Option<(u16, Value)> {
    let s = &run.schedule;
    let working_on = (s.heartbeat_wait_ms > 0 || s.lose_answers)
        .then(|| held.lock().unwrap().iter().cloned().collect());
    let invoked = SystemClock.now();
    let call = run.heartbeat(actor, instance, rt, token, s.heartbeat_wait_ms, working_on);
    let mut stopping = run.stopping.subscribe();
    let cut = async {
        match cut_after {
            Some(ms) => run.pause(ms).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        answer = call => answer,
        _ = stopping.wait_for(|stop| *stop) => None,
        () = cut => {
            run.dropped(actor, Op::Heartbeat, instance, rt, invoked);
            None
        }
    }
}

/// Heartbeats until told to stop; hands each claimed request to a job.
pub(super) async fn daemon<C: Cluster>(run: Arc<Run<C>>, k: usize, rt: String, token: String) {
    let actor = format!("daemon{k}");
    let s = &run.schedule;
    let mut dice = Dice::new(s.seed, 1000 + k as u64);
    let mut jobs = Vec::new();
    let mut paused = false;
    let mut beats = 0u64;
    let mut claims = 0u64;
    let held: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    while !run.stop.load(Ordering::SeqCst) {
        if let Some((who, after)) = s.pause
            && who == k
            && !paused
            && SystemClock.now() - run.started >= after as i64
        {
            // Longer than the pending timeout: whatever waits for this daemon times out.
            paused = true;
            run.pause(run.limits.pending_ms as u64 + 100).await;
        }
        let n = run.cluster.size();
        let (first, second) = (dice.below(n), dice.below(n));
        beats += 1;
        // Now and then a held heartbeat's connection is cut while it is held.
        let cut_after = (s.cut_beats && s.heartbeat_wait_ms > 0 && dice.below(4) == 0)
            .then(|| dice.below(s.heartbeat_wait_ms as usize) as u64);
        let answers = if s.double_beats && beats.is_multiple_of(2) {
            let (a, b) = tokio::join!(
                beat(&run, &actor, first, &rt, &token, &held, cut_after),
                beat(&run, &actor, second, &rt, &token, &held, None)
            );
            vec![a, b]
        } else {
            vec![beat(&run, &actor, first, &rt, &token, &held, cut_after).await]
        };
        let claimed = answers
            .into_iter()
            .flatten()
            .flat_map(|(_, answer)| hand_outs(&answer));
        for (kind, id) in claimed {
            claims += 1;
            // Every third answer that hands out a request is "lost": the daemon never
            // learns of it, and its next heartbeat's working_on leaves it out.
            if s.lose_answers && claims % 3 == 1 {
                continue;
            }
            // Handed out again while the daemon holds it (two heartbeats at once, or a
            // lost answer made good): one job per request, as the reference daemon does.
            if !held.lock().unwrap().insert(id.clone()) {
                continue;
            }
            let plan = s.plans[jobs.len() % s.plans.len()];
            let seed = dice.below(usize::MAX) as u64;
            let job = job(
                run.clone(),
                actor.clone(),
                rt.clone(),
                token.clone(),
                (kind, id),
                plan,
                seed,
                held.clone(),
            );
            jobs.push(tokio::spawn(job));
        }
        run.pause(s.heartbeat_every_ms).await;
    }
    for job in jobs {
        let _ = job.await;
    }
}

/// Creates requests and polls each until it ends, on random instances.
pub(super) async fn poller<C: Cluster>(run: Arc<Run<C>>, p: usize, tenancy: Arc<Tenancy>) {
    let actor = format!("poller{p}");
    let s = &run.schedule;
    let n = run.cluster.size();
    let mut dice = Dice::new(s.seed, p as u64);
    let runtimes = s.runtimes.min(tenancy.runtimes.len());
    let api = tenancy.api.as_str();
    // Long enough for any request to end on its own: both timeouts and some slack.
    let patience = run.limits.pending_ms + run.limits.running_ms + 5_000;
    for _ in 0..s.rounds {
        let k = dice.below(runtimes);
        let rt = tenancy.runtimes[k].0.as_str();
        let kind = s.kinds[dice.below(s.kinds.len())];
        let (create, body) = create_of(kind, rt, dice.below(4));
        let path = kind.spec().path;
        let mut ids = Vec::new();
        for _ in 0..50 {
            let answer = run
                .call(
                    &actor,
                    Op::Create,
                    dice.below(n),
                    rt,
                    None,
                    Method::POST,
                    &create,
                    api,
                    body.as_ref(),
                )
                .await;
            match answer {
                // An answer from the catalog may name the discovery it started: the page
                // follows that one next.
                Some((200, json)) => {
                    ids.extend(
                        [&json["id"], &json["refresh_id"]]
                            .into_iter()
                            .filter_map(|id| id.as_str().map(str::to_owned)),
                    );
                    break;
                }
                // Offline (a paused daemon), or no answer (a stopped instance): try again.
                Some((503, _)) | None => run.pause(20).await,
                Some(_) => break,
            }
        }
        for id in ids {
            if runtimes > 1 {
                let other = tenancy.runtimes[(k + 1) % runtimes].0.as_str();
                let foreign = format!("/api/runtimes/{other}/{path}/{id}");
                run.call(
                    &actor,
                    Op::ForeignRead,
                    dice.below(n),
                    other,
                    Some(&id),
                    Method::GET,
                    &foreign,
                    api,
                    None,
                )
                .await;
            }
            let poll = match s.read_wait_ms {
                0 => format!("/api/runtimes/{rt}/{path}/{id}"),
                ms => format!("/api/runtimes/{rt}/{path}/{id}?wait_ms={ms}"),
            };
            let until = SystemClock.now() + patience;
            while SystemClock.now() < until {
                run.pause(s.poll_every_ms).await;
                let answer = run
                    .call(
                        &actor,
                        Op::Poll,
                        dice.below(n),
                        rt,
                        Some(&id),
                        Method::GET,
                        &poll,
                        api,
                        None,
                    )
                    .await;
                match answer {
                    Some((200, json))
                        if check::is_terminal(json["status"].as_str().unwrap_or("")) =>
                    {
                        break;
                    }
                    Some((200, _)) | None => {}
                    // Anything else is a violation already recorded; waiting would not help.
                    Some(_) => break,
                }
            }
        }
    }
}
