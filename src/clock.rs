//! The one clock. Every timestamp the service stores or compares comes from here, never
//! from the database's `now()`, so that deadlines mean the same on every engine and tests
//! can move time by hand.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as stored in the database.
pub type Millis = i64;

pub trait Clock: Send + Sync {
    fn now(&self) -> Millis;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        // A clock before 1970 is a broken machine; reading it as 0 keeps the service up
        // and makes every deadline already passed rather than never.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to. Shared by every instance in a test.
#[derive(Debug)]
pub struct FakeClock {
    now: AtomicI64,
}

impl FakeClock {
    pub fn new(start: Millis) -> Self {
        FakeClock {
            now: AtomicI64::new(start),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(millis(by), Ordering::SeqCst);
    }

    pub fn set(&self, to: Millis) {
        self.now.store(to, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }
}

/// A duration in stored units, saturating rather than wrapping for absurd inputs.
pub fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-05-01T09:19:21.123Z`.
pub fn rfc3339(at: Millis) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_milliseconds_and_zulu() {
        assert_eq!(rfc3339(1_777_627_161_123), "2026-05-01T09:19:21.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = FakeClock::new(1_000);
        assert_eq!(clock.now(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now(), 3_000);
        clock.set(5);
        assert_eq!(clock.now(), 5);
    }
}
