//! Time, passed in: every time-based decision (expiry, destruction, rotation periods,
//! approvals, audit timestamps) reads a [`Clock`] given at start-up. Production uses
//! [`SystemClock`]; tests pass their own and move it.

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Now, in Unix milliseconds.
    fn now_millis(&self) -> i64;

    /// Now, in Unix seconds.
    fn now(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
    }
}
