//! What proptest chooses about a run, and the dice that pick an instance per call.

use model_relay::kind::Kind;
use proptest::prelude::*;

/// What a daemon does with a request it claimed.
#[derive(Clone, Copy, Debug)]
pub enum Plan {
    Complete(usize),
    Unsupported,
    Fail,
    RenewThenComplete,
    /// Never reports: the lease runs out.
    Abandon,
    /// Reports, then retries the same report on another instance (a lost answer).
    CompleteTwice,
    /// Reports a failure, then a different end: the second must be 409.
    FailThenComplete,
}

/// Everything proptest chooses about one run.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub runtimes: usize,
    pub pollers: usize,
    pub rounds: usize,
    pub seed: u64,
    pub plans: Vec<Plan>,
    pub heartbeat_every_ms: u64,
    pub poll_every_ms: u64,
    pub daemon_delay_ms: u64,
    /// One daemon stops heartbeating for longer than the pending timeout, this long in.
    pub pause: Option<(usize, u64)>,
    /// One instance is stopped and started again, this long in.
    pub restart: Option<(usize, u64)>,
    /// Every other beat a daemon sends two heartbeats at once to two instances, as a client
    /// that gave up on a slow answer and retried elsewhere would.
    pub double_beats: bool,
    /// How long daemons ask for their heartbeats to be held (0: answered at once, as v1).
    pub heartbeat_wait_ms: u64,
    /// How long pollers ask for their reads to wait for a change (0: plain polls).
    pub read_wait_ms: u64,
    /// Every third answer that hands a daemon a request is lost on its way: the daemon's
    /// `working_on` must get it handed out again.
    pub lose_answers: bool,
    /// A quarter of held heartbeats have their connection cut by the client while held.
    pub cut_beats: bool,
    /// The kinds of request the pollers ask for, one picked per round: every kind, unless
    /// a test narrows it.
    pub kinds: Vec<Kind>,
}

pub fn schedule() -> impl Strategy<Value = Schedule> {
    let plan = prop_oneof![
        3 => (0..3usize).prop_map(Plan::Complete),
        1 => Just(Plan::Unsupported),
        2 => Just(Plan::Fail),
        2 => Just(Plan::RenewThenComplete),
        1 => Just(Plan::Abandon),
        2 => Just(Plan::CompleteTwice),
        1 => Just(Plan::FailThenComplete),
    ];
    (
        (1..=3usize, 1..=5usize, 1..=3usize, any::<u64>()),
        prop::collection::vec(plan, 1..6),
        (2..30u64, 2..30u64, 0..60u64),
        prop::option::of((0..3usize, 0..400u64)),
        prop::option::of((0..8usize, 0..600u64)),
        any::<bool>(),
        (wait(), wait(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (runtimes, pollers, rounds, seed),
                plans,
                (heartbeat_every_ms, poll_every_ms, daemon_delay_ms),
                pause,
                restart,
                double_beats,
                (heartbeat_wait_ms, read_wait_ms, lose_answers, cut_beats),
            )| Schedule {
                runtimes,
                pollers,
                rounds,
                seed,
                plans,
                heartbeat_every_ms,
                poll_every_ms,
                daemon_delay_ms,
                pause,
                restart,
                double_beats,
                heartbeat_wait_ms,
                read_wait_ms,
                lose_answers,
                cut_beats,
                kinds: Kind::ALL.to_vec(),
            },
        )
}

/// A waiting call's wait: none (v1); short, so that runs see holds end with nothing
/// changed; or long enough that a call held past a change it should have been woken by
/// shows (see `check::LATE_MS`).
fn wait() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 1 => 150..1_000u64, 1 => 3_500..5_000u64]
}

/// A small deterministic generator per actor: which instance each call goes to.
pub struct Dice(u64);

impl Dice {
    pub fn new(seed: u64, actor: u64) -> Self {
        Dice(seed ^ actor.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}
