//! The actors of a run: daemons (heartbeats, and a job per claimed request) and UI pollers.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::Method;
use model_relay::clock::{Clock, SystemClock};
use serde_json::{Value, json};

use super::check;
use super::cluster::Cluster;
use super::schedule::{Dice, Plan};
use super::{Op, Run, Tenancy};

fn report_body(plan: Plan, second: bool) -> Value {
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

/// A daemon's work on one claimed request, beside its heartbeats.
async fn job<C: Cluster>(
    run: Arc<Run<C>>,
    actor: String,
    rt: String,
    token: String,
    id: String,
    plan: Plan,
    seed: u64,
) {
    let mut dice = Dice::new(seed, 7);
    let delay = run.schedule.daemon_delay_ms;
    run.pause(delay).await;
    match plan {
        Plan::Abandon => return,
        Plan::RenewThenComplete => {
            run.report(
                &actor,
                &mut dice,
                &rt,
                &token,
                &id,
                &json!({"status": "running"}),
            )
            .await;
            run.pause(delay).await;
        }
        _ => {}
    }
    let body = report_body(plan, false);
    run.report(&actor, &mut dice, &rt, &token, &id, &body).await;
    match plan {
        Plan::CompleteTwice => run.report(&actor, &mut dice, &rt, &token, &id, &body).await,
        Plan::FailThenComplete => {
            let second = report_body(plan, true);
            run.report(&actor, &mut dice, &rt, &token, &id, &second)
                .await;
        }
        _ => {}
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
        let answers = if s.double_beats && beats.is_multiple_of(2) {
            let (a, b) = tokio::join!(
                run.heartbeat(&actor, first, &rt, &token),
                run.heartbeat(&actor, second, &rt, &token)
            );
            vec![a, b]
        } else {
            vec![run.heartbeat(&actor, first, &rt, &token).await]
        };
        for answer in answers {
            let claimed =
                answer.and_then(|(_, j)| j["pending_model_list"]["id"].as_str().map(str::to_owned));
            if let Some(id) = claimed {
                let plan = s.plans[jobs.len() % s.plans.len()];
                let seed = dice.below(usize::MAX) as u64;
                let job = job(
                    run.clone(),
                    actor.clone(),
                    rt.clone(),
                    token.clone(),
                    id,
                    plan,
                    seed,
                );
                jobs.push(tokio::spawn(job));
            }
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
        let create = format!("/api/runtimes/{rt}/models");
        let mut id = None;
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
                    None,
                )
                .await;
            match answer {
                Some((200, json)) => {
                    id = json["id"].as_str().map(str::to_owned);
                    break;
                }
                // Offline (a paused daemon), or no answer (a stopped instance): try again.
                Some((503, _)) | None => run.pause(20).await,
                Some(_) => break,
            }
        }
        let Some(id) = id else { continue };
        if runtimes > 1 {
            let other = tenancy.runtimes[(k + 1) % runtimes].0.as_str();
            let path = format!("/api/runtimes/{other}/models/{id}");
            run.call(
                &actor,
                Op::ForeignRead,
                dice.below(n),
                other,
                Some(&id),
                Method::GET,
                &path,
                api,
                None,
            )
            .await;
        }
        let poll = format!("/api/runtimes/{rt}/models/{id}");
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
                Some((200, json)) if check::is_terminal(json["status"].as_str().unwrap_or("")) => {
                    break;
                }
                Some((200, _)) | None => {}
                // Anything else is a violation already recorded; waiting would not help.
                Some(_) => break,
            }
        }
    }
}
