//! Rate limits for log lines an outsider can trigger at will (rejected requests, refused
//! agents): a flood must not become a flood of log lines, yet the first lines of a burst
//! and the number left out must show.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window, per limiter.
const LINES_PER_WINDOW: u32 = 20;
/// The window.
const WINDOW: Duration = Duration::from_secs(1);

/// A fixed-window line budget. A `std` mutex held for a few arithmetic operations only.
#[derive(Debug)]
pub(crate) struct LogLimit {
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) const fn new() -> Self {
        Self {
            state: Mutex::new(Window {
                started: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now; `Some(n)` with the number of lines left out since
    /// the last one that was, to be logged with it.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.started.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            w.started = Some(now);
            w.used = 0;
        }
        if w.used < LINES_PER_WINDOW {
            w.used += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Logs a rejection at info through `limit`, with `suppressed` = lines left out before it.
macro_rules! rejection {
    ($limit:expr, $($field:tt)*) => {
        if let Some(suppressed) = $limit.allow() {
            // Only when lines were left out; `None` is not recorded.
            let suppressed = (suppressed > 0).then_some(suppressed);
            tracing::info!(suppressed, $($field)*);
        }
    };
}
pub(crate) use rejection;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_counted() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow_at(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.allow_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(limit.allow_at(t0 + WINDOW), Some(5));
        assert_eq!(limit.allow_at(t0 + WINDOW), Some(0));
    }
}
