//! Capped exponential backoff with jitter, for client and peer redial loops.

use std::time::Duration;

use rand::Rng;

/// Redial delays: each failure doubles the ceiling from `initial` up to `max`; the delay is
/// drawn uniformly between `(1 - jitter) * ceiling` and the ceiling (`jitter` 1 is full
/// jitter), so a fleet of clients does not reconnect in lockstep after a server restart. A
/// session that stayed up for `reset_after` starts the next round from `initial` again.
///
/// The cap bounds how long a client stays away once its server is back: with the default
/// 5 s cap (full jitter) a client that waited out an outage of any length is back within
/// 5 s of the server's return, and a fleet's reconnects spread evenly over those 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    jitter: f64,
    ceiling: Duration,
}

/// Default first ceiling of [`Backoff`].
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Default cap of [`Backoff`]: Go's fixed redial sleep, as a ceiling.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Default jitter of [`Backoff`]: full.
pub const DEFAULT_BACKOFF_JITTER: f64 = 1.0;

impl Default for Backoff {
    /// 1 s, doubling to 5 s, full jitter, reset after a healthy minute.
    fn default() -> Self {
        Self::new(
            DEFAULT_BACKOFF_INITIAL,
            DEFAULT_BACKOFF_MAX,
            Duration::from_secs(60),
        )
    }
}

impl Backoff {
    /// A backoff from `initial` to `max`, reset after `reset_after` of healthy uptime.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            reset_after,
            jitter: DEFAULT_BACKOFF_JITTER,
            ceiling: initial,
        }
    }

    /// The share of the ceiling drawn at random, from 0 (always the ceiling, as Go's fixed
    /// sleep) to 1 (anywhere below it, the default). Values outside 0..=1 (or NaN) are
    /// clamped (NaN to 1).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() {
            1.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// The configured jitter (0..=1).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The cap on the ceiling.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling the next delay is drawn below.
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// The delay before the next attempt; raises the ceiling for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // `jitter` is within 0..=1, so the floor is within 0..=nanos.
        let floor = (nanos as f64 * (1.0 - self.jitter)) as u64;
        Duration::from_nanos(rand::rng().random_range(floor.min(nanos)..=nanos))
    }

    /// Starts over from the first ceiling.
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }

    /// Call when a session ends after `uptime`; a long healthy session resets the ceiling.
    pub fn session_ended(&mut self, uptime: Duration) {
        if uptime >= self.reset_after {
            self.ceiling = self.initial;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_below_the_ceiling() {
        let mut b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_secs());
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.session_ended(Duration::from_secs(5));
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(30),
            "short sessions do not reset"
        );
        b.session_ended(Duration::from_secs(61));
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn default_comes_back_within_5_s_after_any_outage() {
        let mut b = Backoff::default();
        // However many attempts failed during the outage, the next delay is at most 5 s.
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(5));
    }

    #[test]
    fn jitter_bounds_the_delay_from_below() {
        let mut b = Backoff::new(
            Duration::from_secs(4),
            Duration::from_secs(4),
            Duration::from_secs(60),
        )
        .with_jitter(0.25);
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
        let mut fixed = b.clone().with_jitter(0.0);
        assert_eq!(
            fixed.next_delay(),
            Duration::from_secs(4),
            "Go's fixed sleep"
        );
        assert_eq!(b.clone().with_jitter(7.0).jitter(), 1.0);
        assert_eq!(b.clone().with_jitter(-1.0).jitter(), 0.0);
        assert_eq!(b.with_jitter(f64::NAN).jitter(), 1.0);
    }

    #[test]
    fn delays_are_spread() {
        let mut b = Backoff::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "full jitter spreads delays");
    }
}
