//! Held heartbeats, against the scripted [`FakeRelay`]: what each heartbeat says, when the next
//! one goes, and what the daemon does with a request handed out twice.
//!
//! Timing is checked only from below: a gap between two heartbeats, measured where the fake
//! received them, is at least what the daemon must wait. A slow machine only makes gaps longer,
//! so these tests cannot fail for being slow; a daemon that spins fails them at once. Where a
//! test checks that the daemon does *not* wait, it sets an hour-long interval and waits for a
//! count with [`eventually`].

use std::time::Duration;

use hyper::StatusCode;
use model_relay::daemon::{Discovery, Source};
use model_relay::model::ModelEntry;

use super::fake::{FakeRelay, Reply, gaps, request_id};
use super::world::{Gate, RunningDaemon, eventually};

const HOUR: Duration = Duration::from_secs(3600);

fn found() -> Source {
    Source::Fixed(Discovery::Found {
        models: vec![ModelEntry {
            id: "m".into(),
            label: "M".into(),
            ..Default::default()
        }],
        supported: true,
        fallback: false,
    })
}

async fn heartbeats_at_least(fake: &FakeRelay, n: usize) {
    eventually(&format!("{n} heartbeats"), || async {
        fake.heartbeats().len() >= n
    })
    .await;
}

#[tokio::test]
async fn heartbeats_carry_the_wait_and_list_a_held_request_until_its_report_returns() {
    let id = request_id();
    let handed = id.clone();
    let fake = FakeRelay::start(move |n, _| match n {
        0 => Reply::claim(&handed),
        _ => Reply::at_once(),
    })
    .await;
    let gate = Gate::new();
    let daemon = RunningDaemon::spawn(fake.config(gate.source()));
    eventually("a heartbeat lists the request", || async {
        fake.heartbeats()
            .iter()
            .any(|b| b.working_on() == [id.as_str()])
    })
    .await;
    gate.open(r#"[{"id":"m","label":"M"}]"#).await;
    eventually("the report", || async { !fake.final_reports().is_empty() }).await;
    let report_at = fake.final_reports()[0].at;
    eventually(
        "a heartbeat that lists nothing after the report",
        || async {
            let beats = fake.heartbeats();
            beats
                .iter()
                .any(|b| b.at > report_at && b.working_on().is_empty())
        },
    )
    .await;
    daemon.stop().await.unwrap();

    let beats = fake.heartbeats();
    assert!(
        beats.iter().all(|b| b.body["wait_ms"] == 25_000),
        "{beats:?}"
    );
    assert!(beats[0].working_on().is_empty(), "nothing held yet");
    // Every heartbeat between the hand-out and the report was sent while the request was
    // held; once one after the report lists nothing, none lists it again.
    let (during, after): (Vec<_>, Vec<_>) = beats[1..].iter().partition(|b| b.at < report_at);
    assert!(!during.is_empty());
    for beat in during {
        assert_eq!(beat.working_on(), [id.as_str()], "{:?}", beat.body);
    }
    let let_go = after
        .iter()
        .position(|b| b.working_on().is_empty())
        .unwrap();
    assert!(
        after[let_go..].iter().all(|b| b.working_on().is_empty()),
        "{after:?}"
    );
    assert_eq!(fake.final_reports()[0].body["status"], "completed");
}

#[tokio::test]
async fn with_heartbeat_wait_0_heartbeats_ask_no_wait_and_come_an_interval_apart() {
    let id = request_id();
    let handed = id.clone();
    // A holding server: it holds for what `wait_ms` asks, here nothing. The claim shows that
    // even a hand-out is followed by the interval, as in v1.
    let fake = FakeRelay::start(move |n, body| match n {
        1 => Reply::claim(&handed),
        _ => Reply::held(body),
    })
    .await;
    let mut config = fake.config(found());
    config.heartbeat_wait = Duration::ZERO;
    config.heartbeat_interval = Duration::from_millis(200);
    let daemon = RunningDaemon::spawn(config);
    heartbeats_at_least(&fake, 5).await;
    daemon.stop().await.unwrap();

    let beats = fake.heartbeats();
    for beat in &beats {
        assert!(beat.body.get("wait_ms").is_none(), "{:?}", beat.body);
    }
    for gap in gaps(&beats) {
        assert!(gap >= Duration::from_millis(200), "{:?}", gaps(&beats));
    }
    assert_eq!(fake.final_reports()[0].report_of(), Some(id.as_str()));
}

#[tokio::test]
async fn against_a_server_that_answers_at_once_heartbeats_fall_back_to_the_interval() {
    let fake = FakeRelay::start(|_, _| Reply::at_once()).await;
    let mut config = fake.config(found());
    config.heartbeat_interval = Duration::from_millis(200);
    let daemon = RunningDaemon::spawn(config);
    heartbeats_at_least(&fake, 5).await;
    daemon.stop().await.unwrap();

    let beats = fake.heartbeats();
    assert!(
        beats.iter().all(|b| b.body["wait_ms"] == 25_000),
        "it keeps asking, so a server that starts to hold is used at once"
    );
    for gap in gaps(&beats) {
        assert!(gap >= Duration::from_millis(200), "{:?}", gaps(&beats));
    }
}

#[tokio::test]
async fn a_held_heartbeat_and_a_claim_are_each_followed_by_the_next_at_once() {
    let id = request_id();
    let handed = id.clone();
    let fake = FakeRelay::start(move |n, body| match n {
        2 => Reply::claim(&handed),
        _ => Reply::held(body),
    })
    .await;
    let mut config = fake.config(found());
    config.heartbeat_wait = Duration::from_millis(300);
    // Any wait for the interval would stall this test for an hour.
    config.heartbeat_interval = HOUR;
    let daemon = RunningDaemon::spawn(config);
    heartbeats_at_least(&fake, 6).await;
    eventually("the report", || async { !fake.final_reports().is_empty() }).await;
    daemon.stop().await.unwrap();
    assert_eq!(fake.final_reports()[0].report_of(), Some(id.as_str()));
}

#[tokio::test]
async fn a_held_heartbeat_is_not_cut_short_by_the_call_timeout() {
    let id = request_id();
    let handed = id.clone();
    // The hand-out comes 600 ms into the hold; the call timeout is 100 ms. Were the call
    // given up at 100 ms, the hand-out would be lost and no report would ever come.
    let fake = FakeRelay::start(move |n, body| match n {
        0 => Reply::claim(&handed).after(Duration::from_millis(600)),
        _ => Reply::held(body),
    })
    .await;
    let mut config = fake.config(found());
    config.heartbeat_wait = Duration::from_secs(1);
    config.call_timeout = Duration::from_millis(100);
    let daemon = RunningDaemon::spawn(config);
    eventually("the report", || async { !fake.final_reports().is_empty() }).await;
    daemon.stop().await.unwrap();
    assert_eq!(fake.final_reports()[0].report_of(), Some(id.as_str()));
    assert_eq!(fake.heartbeats()[0].body["wait_ms"], 1000);
}

#[tokio::test]
async fn a_request_handed_out_again_while_held_is_not_discovered_twice() {
    let id = request_id();
    let handed = id.clone();
    // As if the server thought the first two hand-outs were lost.
    let fake = FakeRelay::start(move |n, _| match n {
        0..=2 => Reply::claim(&handed),
        _ => Reply::at_once(),
    })
    .await;
    let gate = Gate::new();
    let daemon = RunningDaemon::spawn(fake.config(gate.source()));
    // The fourth heartbeat goes after the daemon has read the answers to the second and third.
    heartbeats_at_least(&fake, 4).await;
    for beat in &fake.heartbeats()[1..4] {
        assert_eq!(beat.working_on(), [id.as_str()], "{:?}", beat.body);
    }
    gate.open(r#"[{"id":"m","label":"M"}]"#).await;
    eventually("the report", || async { !fake.final_reports().is_empty() }).await;
    // Stopping waits for every request task; a second discovery, had one started, would be
    // killed and reported as failed by now.
    daemon.stop().await.unwrap();
    let reports = fake.final_reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].body["status"], "completed", "{reports:?}");
}

#[tokio::test]
async fn lease_renewals_go_on_while_a_heartbeat_is_held() {
    let id = request_id();
    let handed = id.clone();
    let fake = FakeRelay::start(move |n, body| match n {
        0 => Reply::claim(&handed),
        _ => Reply::held(body),
    })
    .await;
    let gate = Gate::new();
    let mut config = fake.config(gate.source());
    config.heartbeat_wait = HOUR;
    let daemon = RunningDaemon::spawn(config);
    eventually("three renewals", || async { fake.renewals_of(&id) >= 3 }).await;
    assert_eq!(
        fake.heartbeats().len(),
        2,
        "the hand-out, and one held since"
    );
    gate.open(r#"[{"id":"m","label":"M"}]"#).await;
    eventually("the report", || async { !fake.final_reports().is_empty() }).await;
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_does_not_wait_for_a_held_heartbeat() {
    let fake = FakeRelay::start(|_, body| Reply::held(body)).await;
    let mut config = fake.config(found());
    config.heartbeat_wait = HOUR;
    let daemon = RunningDaemon::spawn(config);
    heartbeats_at_least(&fake, 1).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), daemon.stop()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stopped while the heartbeat was held"
    );
}

#[tokio::test]
async fn heartbeat_errors_are_retried_after_growing_waits() {
    let fake = FakeRelay::start(|n, _| match n {
        0..=3 => Reply::status(StatusCode::SERVICE_UNAVAILABLE),
        _ => Reply::at_once(),
    })
    .await;
    let mut config = fake.config(found());
    // The backoff's cap is the interval: an hour leaves the schedule 0.5, 1, 2, 4 s uncut.
    config.heartbeat_interval = HOUR;
    let daemon = RunningDaemon::spawn(config);
    heartbeats_at_least(&fake, 5).await;
    daemon.stop().await.unwrap();

    let gaps = gaps(&fake.heartbeats());
    // Equal jitter: the k-th retry waits at least half of 0.5 s × 2^k.
    for (k, gap) in gaps.iter().take(4).enumerate() {
        let floor = Duration::from_millis(250) * 2u32.pow(k as u32);
        assert!(*gap >= floor, "retry {k} after {gap:?}; all: {gaps:?}");
    }
    assert_eq!(fake.heartbeats().len(), 5, "a success ends the retries");
}
