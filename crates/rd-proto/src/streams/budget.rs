//! The session's receive budget: what all streams' receive halves hold, kept in step with
//! them by [`Streams`](super::Streams), which applies every change of a stream as the
//! difference of what it held before and after; and what a stream's flow control sees of
//! the rest of the session ([`Pressure`]).

use std::time::{Duration, Instant};

/// What a receive half holds against the session's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Held {
    /// Received and not yet read.
    pub(crate) unread: usize,
    /// Unread plus credit the peer may still use (equals `unread` in Pause mode).
    pub(crate) committed: usize,
}

impl Held {
    fn plus(self, other: Self) -> Self {
        Self {
            unread: self.unread.saturating_add(other.unread),
            committed: self.committed.saturating_add(other.committed),
        }
    }
}

/// Totals over every stream's receive half.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReceiveBudget {
    total: Held,
}

impl ReceiveBudget {
    pub(crate) fn unread(&self) -> usize {
        self.total.unread
    }

    pub(crate) fn committed(&self) -> usize {
        self.total.committed
    }

    /// One stream went from holding `before` to holding `after`.
    pub(crate) fn apply(&mut self, before: Held, after: Held) {
        self.total.unread = adjust(self.total.unread, before.unread, after.unread);
        self.total.committed = adjust(self.total.committed, before.committed, after.committed);
    }

    /// Panics unless the totals are the sum of `halves`.
    pub(crate) fn assert_sum(&self, halves: impl Iterator<Item = Held>) {
        let sum = halves.fold(Held::default(), Held::plus);
        assert_eq!(
            sum, self.total,
            "the session's totals are the sum of its streams'"
        );
    }
}

fn adjust(total: usize, before: usize, after: usize) -> usize {
    let without = total.checked_sub(before).unwrap_or_else(|| {
        debug_assert!(false, "a stream held more than the session total");
        0
    });
    without.checked_add(after).unwrap_or_else(|| {
        debug_assert!(false, "session total overflows");
        usize::MAX
    })
}

/// What a stream's receive flow control knows of the rest of the session and of the link
/// when it decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pressure {
    /// Unread bytes of every other stream.
    pub(crate) others_unread: usize,
    /// Unread bytes and unused credit of every other stream (credit mode).
    pub(crate) others_committed: usize,
    /// The link's round trip, the smallest the session measured (`None`: none yet).
    pub(crate) rtt: Option<Duration>,
    /// The time of the session's latest input: reads carry no clock of their own, and a
    /// reader that starves consumes what just arrived.
    pub(crate) now: Option<Instant>,
}
