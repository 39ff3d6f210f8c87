//! A token bucket fed by the caller's clock, for budgets such as cheap control frames.

use std::time::{Duration, Instant};

/// A token bucket: holds at most `burst` tokens and refills `rate` tokens per second.
///
/// Time comes in as an argument; an instant earlier than the last one seen (a clock that went
/// backwards) refills nothing and never panics.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    burst: u64,
    rate: u64,
    /// Tokens scaled by `SCALE`, so refills below one token per call are not lost.
    tokens: u64,
    last: Instant,
}

/// Fixed-point scale of stored tokens.
const SCALE: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket of `burst` tokens refilling `rate` per second.
    pub fn new(burst: u32, rate: u32, now: Instant) -> Self {
        Self {
            burst: u64::from(burst),
            rate: u64::from(rate),
            tokens: u64::from(burst) * SCALE,
            last: now,
        }
    }

    /// Takes one token; `false` when the bucket is empty.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= SCALE {
            self.tokens -= SCALE;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens / SCALE
    }

    fn refill(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last) else {
            // The clock went backwards: keep `last`, add nothing.
            return;
        };
        // Cap the interval so the multiplication cannot overflow: a full refill never needs
        // more than burst / rate seconds, and a day is far beyond any sane setting.
        let elapsed = elapsed.min(Duration::from_secs(86_400));
        let add = u64::try_from(elapsed.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_mul(self.rate)
            / (1_000_000_000 / SCALE);
        self.tokens = self.tokens.saturating_add(add).min(self.burst * SCALE);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_spends_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 10, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        // 10 per second: one token after 100 ms, not before.
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        // Never more than the burst, however long the pause.
        assert_eq!(b.available(t0 + Duration::from_secs(1_000_000)), 3);
    }

    #[test]
    fn bucket_does_not_panic_or_refill_when_time_goes_backwards() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1, 1, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 - Duration::from_secs(5)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        assert!(b.try_take(t0 + Duration::from_millis(1000)));
    }

    #[test]
    fn zero_rate_bucket_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 0, t0);
        assert!(b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_secs(3600)));
    }
}
