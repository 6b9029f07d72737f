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
    /// 1 if the stream's credit window grew past the initial one, else 0: the streams that
    /// share the budget beyond their initial windows.
    pub(crate) grown: usize,
}

impl Held {
    fn plus(self, other: Self) -> Self {
        Self {
            unread: self.unread.saturating_add(other.unread),
            committed: self.committed.saturating_add(other.committed),
            grown: self.grown.saturating_add(other.grown),
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

    /// Streams whose credit window grew past the initial one.
    pub(crate) fn grown(&self) -> usize {
        self.total.grown
    }

    /// One stream went from holding `before` to holding `after`.
    pub(crate) fn apply(&mut self, before: Held, after: Held) {
        self.total.unread = adjust(self.total.unread, before.unread, after.unread);
        self.total.committed = adjust(self.total.committed, before.committed, after.committed);
        self.total.grown = adjust(self.total.grown, before.grown, after.grown);
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
    /// The stream's fair share of the budget: the budget over the streams whose windows
    /// grew, this one counted (credit mode).
    pub(crate) fair_share: usize,
    /// The link's round trip, the smallest the session measured (`None`: none yet).
    pub(crate) rtt: Option<Duration>,
    /// The time of the session's latest input: reads carry no clock of their own, and a
    /// reader that starves consumes what just arrived.
    pub(crate) now: Option<Instant>,
}
