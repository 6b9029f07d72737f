//! Capped exponential backoff with full jitter, for client and peer redial loops.

use std::time::Duration;

use rand::Rng;

/// Redial delays: each failure doubles the ceiling from `initial` up to `max`; the delay is
/// drawn uniformly below the ceiling (full jitter), so a fleet of clients does not reconnect
/// in lockstep after a server restart. A session that stayed up for `reset_after` starts
/// the next round from `initial` again.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    ceiling: Duration,
}

impl Default for Backoff {
    /// 1 s, doubling to 30 s, reset after a healthy minute.
    fn default() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
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
            ceiling: initial,
        }
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
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
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
