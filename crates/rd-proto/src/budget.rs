//! The session's receive budget: what all streams hold, kept in step with each stream.

use crate::recv::Held;

/// Totals over every stream's receive half. Each change to a stream's receive half is
/// applied here as the difference of what it held before and after, so the totals cannot
/// drift from the streams.
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
