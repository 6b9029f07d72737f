//! The session's timers as a table, as quinn-proto keeps them: one deadline per kind, the
//! next timeout is the earliest, and whoever owns a deadline sets or clears it.

use std::time::Instant;

/// The kinds of deadline a session keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// No ping or pong for the keepalive timeout: the session is dead.
    Keepalive,
    /// Nothing at all from a peer that takes part in keepalive for the answer timeout.
    Answer,
    /// The next ping: a client's on Go's schedule, a server's first tick that can be silent.
    Ping,
    /// The next SyncConnections (client side).
    Sync,
}

impl Timer {
    const COUNT: usize = 4;

    fn index(self) -> usize {
        match self {
            Self::Keepalive => 0,
            Self::Answer => 1,
            Self::Ping => 2,
            Self::Sync => 3,
        }
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TimerTable {
    data: [Option<Instant>; Timer::COUNT],
}

impl TimerTable {
    /// Sets `timer` to `at`, or clears it with `None`.
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.data[timer.index()] = at;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer.index()]
    }

    /// Whether `timer` is set and due at `now`.
    pub(crate) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// The earliest deadline.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_next_timeout_is_the_earliest_set() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::Sync, Some(t0 + Duration::from_secs(60)));
        table.set(Timer::Ping, Some(t0 + Duration::from_secs(5)));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(5)));
        assert!(!table.is_expired(Timer::Ping, t0));
        assert!(table.is_expired(Timer::Ping, t0 + Duration::from_secs(5)));
        assert!(!table.is_expired(Timer::Answer, t0 + Duration::from_secs(3600)));
        table.set(Timer::Ping, None);
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_secs(60)));
        table.clear();
        assert_eq!(table.next_timeout(), None);
    }
}
