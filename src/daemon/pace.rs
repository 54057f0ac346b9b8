//! When the daemon heartbeats next. At once after a held heartbeat or a claim, so the daemon
//! is nearly always waiting at the server; an interval later after an answer that shows the
//! server does not hold (an old server, or one shutting down), so it never spins; and after a
//! capped, jittered, growing backoff when a heartbeat fails.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first retry of a failed heartbeat waits at most this long; each further one doubles.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);

/// An empty answer faster than `min(wait / 2, HELD_AT_LEAST)` was not held. A holding server
/// answers an empty heartbeat only when the wait has ended (slow) or when it shuts down; a
/// server that ignores `wait_ms` answers in milliseconds. The second cap keeps the test fair
/// for long waits: a server that held for a full second did hold.
pub const HELD_AT_LEAST: Duration = Duration::from_secs(1);

/// The heartbeat timings of one daemon.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// What each heartbeat asks the server to hold it for; zero asks for no hold.
    pub wait: Duration,
    /// The pause between heartbeats when the server does not hold them.
    pub interval: Duration,
}

impl Pace {
    /// How long after an answer the next heartbeat goes: `claimed` is whether the answer
    /// handed out a request, `took` how long the call took.
    pub fn after_answer(&self, claimed: bool, took: Duration) -> Duration {
        // Without a wait the daemon polls, as v1 daemons did, whatever the answer said.
        if self.wait.is_zero() {
            return self.interval;
        }
        // A claim may be one of several pending requests: ask for the next one at once.
        if claimed || took >= self.held_at_least() {
            Duration::ZERO
        } else {
            self.interval
        }
    }

    fn held_at_least(&self) -> Duration {
        (self.wait / 2).min(HELD_AT_LEAST)
    }
}

/// Waits before retrying failed heartbeats: the n-th failure in a row waits between half and
/// all of `min(FIRST_RETRY × 2ⁿ, cap)` ("equal jitter"). The jitter spreads the daemons of a
/// fleet that all lost the server at once; the half that is not random keeps the waits
/// growing.
#[derive(Debug)]
pub struct Backoff {
    /// The longest wait: the heartbeat interval, so a failing daemon never heartbeats less
    /// often than a healthy one that polls.
    cap: Duration,
    /// Failures since the last success.
    failures: u32,
    random: XorShift,
}

impl Backoff {
    pub fn new(cap: Duration, seed: u64) -> Self {
        Backoff {
            cap,
            failures: 0,
            random: XorShift::new(seed),
        }
    }

    /// The wait before retrying after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = ceiling(self.failures, self.cap);
        self.failures = self.failures.saturating_add(1);
        equal_jitter(ceiling, self.random.next())
    }

    /// A heartbeat got an answer: the next failure starts the schedule again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `FIRST_RETRY` doubled `failures` times, at most `cap`.
fn ceiling(failures: u32, cap: Duration) -> Duration {
    FIRST_RETRY
        .checked_mul(2u32.saturating_pow(failures))
        .unwrap_or(cap)
        .min(cap)
}

/// Half of `ceiling`, plus `random`'s share of the other half.
fn equal_jitter(ceiling: Duration, random: u64) -> Duration {
    let half = ceiling / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % spread.saturating_add(1))
}

/// A seed for the jitter: the operating system's randomness, else the clock. Jitter needs
/// daemons to differ, not secrecy.
pub fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos().into())
    })
}

/// Marsaglia's xorshift64: enough randomness for jitter, and no crate for it.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is the one state xorshift never leaves.
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn heartbeat_retries_wait_half_to_all_of_a_doubling_capped_ceiling() {
        let cap = Duration::from_secs(15);
        let mut backoff = Backoff::new(cap, 42);
        let ceilings = [500, 1000, 2000, 4000, 8000, 15_000, 15_000, 15_000].map(MS);
        let delays: Vec<Duration> = ceilings.iter().map(|_| backoff.next_delay()).collect();
        for (delay, ceiling) in delays.iter().zip(ceilings) {
            assert!(
                ceiling / 2 <= *delay && *delay <= ceiling,
                "{delay:?} not in [{:?}, {ceiling:?}]; all: {delays:?}",
                ceiling / 2
            );
        }
        // The jitter is real: the capped waits are not all the same.
        assert!(delays[5..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
        for _ in 0..100 {
            assert!(backoff.next_delay() <= cap, "capped forever");
        }
    }

    #[test]
    fn a_success_starts_the_backoff_again() {
        let mut backoff = Backoff::new(Duration::from_secs(15), 7);
        for _ in 0..6 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST_RETRY);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let schedule = |seed| {
            let mut backoff = Backoff::new(Duration::from_secs(15), seed);
            (0..8).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(schedule(42), schedule(42));
        assert_ne!(schedule(42), schedule(43));
        // Seed zero would stick at zero; it is replaced, so it still jitters.
        assert_ne!(schedule(0)[6], schedule(0)[7]);
    }

    #[test]
    fn ceilings_double_from_half_a_second_and_never_overflow() {
        let cap = Duration::from_secs(15);
        assert_eq!(ceiling(0, cap), MS(500));
        assert_eq!(ceiling(3, cap), MS(4000));
        assert_eq!(ceiling(5, cap), cap);
        assert_eq!(ceiling(u32::MAX, cap), cap);
        // A test interval below the first retry caps even that.
        assert_eq!(ceiling(0, MS(50)), MS(50));
    }

    #[test]
    fn a_claim_or_a_held_answer_is_followed_at_once() {
        let pace = Pace {
            wait: Duration::from_secs(25),
            interval: Duration::from_secs(15),
        };
        assert_eq!(pace.after_answer(true, MS(3)), Duration::ZERO);
        assert_eq!(
            pace.after_answer(false, Duration::from_secs(25)),
            Duration::ZERO
        );
        assert_eq!(pace.after_answer(false, HELD_AT_LEAST), Duration::ZERO);
    }

    #[test]
    fn a_quick_empty_answer_means_no_hold_and_the_interval_follows() {
        let pace = Pace {
            wait: Duration::from_secs(25),
            interval: Duration::from_secs(15),
        };
        assert_eq!(pace.after_answer(false, MS(3)), pace.interval);
        assert_eq!(pace.after_answer(false, MS(999)), pace.interval);
        // A short wait: half of it is the bar.
        let short = Pace {
            wait: MS(400),
            ..pace
        };
        assert_eq!(short.after_answer(false, MS(199)), pace.interval);
        assert_eq!(short.after_answer(false, MS(200)), Duration::ZERO);
    }

    #[test]
    fn without_a_wait_every_heartbeat_is_an_interval_after_the_last() {
        let pace = Pace {
            wait: Duration::ZERO,
            interval: Duration::from_secs(15),
        };
        assert_eq!(pace.after_answer(true, MS(3)), pace.interval);
        assert_eq!(pace.after_answer(false, MS(3)), pace.interval);
        assert_eq!(
            pace.after_answer(false, Duration::from_secs(20)),
            pace.interval
        );
    }
}
