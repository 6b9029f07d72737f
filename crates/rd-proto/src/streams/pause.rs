//! Pause/Resume flow control of one stream's receiver, the only kind a Go peer speaks: the
//! wire has XON/XOFF, so the "window" is a pause mark. The mark adapts: a stream gets Go's
//! 2 MiB while the session has memory to spare or while its reader drains that much within
//! [`Config::receive_horizon`]; a stream whose reader does not keep up is paused earlier as
//! the other streams' unread bytes approach half the session budget, down to
//! [`Config::pause_floor`]. A Go sender notices Pause only at its next write, so some
//! overshoot is normal; past the hard cap the peer is ignoring us and the stream is reset
//! (by [`RecvHalf`](super::recv::RecvHalf)).

use std::time::{Duration, Instant};

use crate::config::Config;

use super::budget::Pressure;

/// Bytes a stream's reader consumed per [`Config::receive_horizon`], measured from reads
/// (which carry no clock) and the data arrivals that sample them (which do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ReadMeter {
    since: Option<Instant>,
    consumed: usize,
    per_horizon: usize,
}

impl ReadMeter {
    fn recent(&mut self, now: Instant, horizon: Duration) -> usize {
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= horizon && !elapsed.is_zero() {
            let scaled = self.consumed as u128 * horizon.as_nanos() / elapsed.as_nanos();
            self.per_horizon = usize::try_from(scaled).unwrap_or(usize::MAX);
            self.consumed = 0;
            self.since = Some(now);
        }
        self.per_horizon.max(self.consumed)
    }
}

/// Pause/Resume state of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PauseFlow {
    pause_sent: bool,
    resume_below: usize,
    /// Bytes received since our outstanding Pause was queued.
    since_pause: usize,
    meter: ReadMeter,
}

impl PauseFlow {
    /// Whether a Pause is outstanding (sent and not yet followed by Resume).
    pub(crate) fn pause_sent(&self) -> bool {
        self.pause_sent
    }

    /// Bytes received since our outstanding Pause was queued (0 without one): more than the
    /// link can hold in flight means the peer ignores Pause.
    pub(crate) fn since_pause(&self) -> usize {
        if self.pause_sent {
            self.since_pause
        } else {
            0
        }
    }

    /// `n` bytes arrived and the stream now holds `buffered` unread; whether to send Pause.
    #[must_use = "a Pause must be sent to the peer"]
    pub(crate) fn on_data(
        &mut self,
        n: usize,
        buffered: usize,
        now: Instant,
        pressure: Pressure,
        config: &Config,
    ) -> bool {
        if self.pause_sent {
            self.since_pause = self.since_pause.saturating_add(n);
            return false;
        }
        let mark = self.mark(now, pressure, config);
        if buffered > mark {
            self.pause_sent = true;
            self.since_pause = 0;
            self.resume_below = (mark / 8).min(config.low_watermark).max(1);
            return true;
        }
        false
    }

    /// The reader took `n` bytes, leaving `unread`; whether to send Resume.
    #[must_use = "a Resume must be sent to the peer"]
    pub(crate) fn on_consumed(&mut self, n: usize, unread: usize) -> bool {
        self.meter.consumed = self.meter.consumed.saturating_add(n);
        if self.pause_sent && unread < self.resume_below {
            self.pause_sent = false;
            return true;
        }
        false
    }

    /// The pause mark for this stream now.
    fn mark(&mut self, now: Instant, pressure: Pressure, config: &Config) -> usize {
        let recent = self.meter.recent(now, config.receive_horizon);
        // Memory to spare: every stream gets Go's mark. As the others' unread bytes approach
        // half the budget the allowance falls to zero, leaving only what the reader earns.
        let half = (config.session_receive_budget / 2).max(1);
        let spare = half.saturating_sub(pressure.others_unread);
        let allowance = (config.high_watermark as u128 * spare as u128 / half as u128) as usize;
        recent
            .max(allowance)
            .clamp(config.pause_floor, config.high_watermark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Pressure {
        Pressure::default()
    }

    #[test]
    fn pause_once_above_high_resume_once_below_low_without_pressure() {
        let c = Config::default();
        let now = Instant::now();
        let mut f = PauseFlow::default();
        assert!(
            !f.on_data(c.high_watermark, c.high_watermark, now, quiet(), &c),
            "at the mark is not above it"
        );
        let mut unread = c.high_watermark + 1;
        assert!(f.on_data(1, unread, now, quiet(), &c));
        unread += 1000;
        assert!(
            !f.on_data(1000, unread, now, quiet(), &c),
            "only one Pause outstanding"
        );
        assert_eq!(f.since_pause(), 1000);
        unread -= 1001;
        assert!(!f.on_consumed(1001, unread));
        let n = c.high_watermark - c.low_watermark;
        unread -= n;
        assert!(!f.on_consumed(n, unread), "at low is not below");
        unread -= 1;
        assert!(f.on_consumed(1, unread));
        assert!(!f.on_consumed(1, unread - 1), "only one Resume");
        assert_eq!(f.since_pause(), 0);
    }

    #[test]
    fn a_stream_that_is_not_read_is_paused_at_the_floor_under_pressure() {
        let c = Config::default();
        let now = Instant::now();
        let mut f = PauseFlow::default();
        let pressure = Pressure {
            others_unread: c.session_receive_budget / 2,
            ..Pressure::default()
        };
        assert!(!f.on_data(c.pause_floor, c.pause_floor, now, pressure, &c));
        assert!(f.on_data(1, c.pause_floor + 1, now, pressure, &c));
        // Half way to the pressure point the mark is half of Go's.
        let mut g = PauseFlow::default();
        let halfway = Pressure {
            others_unread: c.session_receive_budget / 4,
            ..Pressure::default()
        };
        let half_mark = c.high_watermark / 2;
        assert!(!g.on_data(half_mark, half_mark, now, halfway, &c));
        assert!(g.on_data(1, half_mark + 1, now, halfway, &c));
    }

    #[test]
    fn a_fast_reader_keeps_the_high_mark_under_pressure() {
        let c = Config::default();
        let pressure = Pressure {
            others_unread: c.session_receive_budget,
            ..Pressure::default()
        };
        let mut f = PauseFlow::default();
        // The reader drains 8 MiB within one horizon.
        let mut now = Instant::now();
        for _ in 0..256 {
            assert!(!f.on_data(32 * 1024, 32 * 1024, now, pressure, &c));
            assert!(!f.on_consumed(32 * 1024, 0));
            now += c.receive_horizon / 256;
        }
        // Next horizon: it may hold up to Go's mark.
        now += c.receive_horizon;
        assert!(!f.on_data(c.high_watermark, c.high_watermark, now, pressure, &c));
    }
}
