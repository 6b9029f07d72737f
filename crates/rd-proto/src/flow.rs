//! Receive-side flow control of one stream: Go's Pause/Resume hysteresis plus a hard cap.
//!
//! The wire only has XON/XOFF (Pause/Resume), so the "window" is a watermark pair: above the
//! high mark we ask the peer to pause once, below the low mark we let it resume once. A Go
//! sender only notices Pause at its next write, so some overshoot is normal; past the hard cap
//! the peer is ignoring us and the stream is reset (Go would buffer without bound).

use crate::config::Config;

/// What the receiver must tell the peer after a change in buffered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSignal {
    /// Send Pause for this stream.
    Pause,
    /// Send Resume for this stream.
    Resume,
}

/// Data arrived beyond the stream's hard cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// Unread bytes the stream would hold.
    pub buffered: usize,
    /// The cap.
    pub cap: usize,
}

/// Bytes delivered to a stream and not yet read, and whether we asked the peer to pause.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecvFlow {
    buffered: usize,
    pause_sent: bool,
}

impl RecvFlow {
    /// Unread bytes.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Whether a Pause is outstanding (sent and not yet followed by Resume).
    pub fn pause_sent(&self) -> bool {
        self.pause_sent
    }

    /// Accounts `n` received bytes. Over the cap the bytes are refused and nothing changes.
    #[must_use = "a Pause signal must be sent to the peer"]
    pub fn on_data(&mut self, n: usize, config: &Config) -> Result<Option<FlowSignal>, Overflow> {
        let buffered = self.buffered.saturating_add(n);
        if buffered > config.stream_receive_cap {
            return Err(Overflow {
                buffered,
                cap: config.stream_receive_cap,
            });
        }
        self.buffered = buffered;
        if buffered > config.high_watermark && !self.pause_sent {
            self.pause_sent = true;
            return Ok(Some(FlowSignal::Pause));
        }
        Ok(None)
    }

    /// Accounts `n` bytes handed to the reader.
    #[must_use = "a Resume signal must be sent to the peer"]
    pub fn on_consumed(&mut self, n: usize, config: &Config) -> Option<FlowSignal> {
        debug_assert!(n <= self.buffered, "consumed more than buffered");
        self.buffered -= n.min(self.buffered);
        if self.pause_sent && self.buffered < config.low_watermark {
            self.pause_sent = false;
            return Some(FlowSignal::Resume);
        }
        None
    }

    /// Panics if an invariant is broken; for tests and debug builds.
    pub fn assert_invariants(&self, config: &Config) {
        assert!(
            self.buffered <= config.stream_receive_cap,
            "buffered over the hard cap"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pause_once_above_high_resume_once_below_low() {
        let c = Config::default();
        let mut f = RecvFlow::default();
        assert_eq!(
            f.on_data(c.high_watermark, &c),
            Ok(None),
            "at the mark is not above it"
        );
        assert_eq!(f.on_data(1, &c), Ok(Some(FlowSignal::Pause)));
        assert_eq!(f.on_data(1000, &c), Ok(None), "only one Pause outstanding");
        assert_eq!(f.on_consumed(1001, &c), None);
        assert_eq!(
            f.on_consumed(c.high_watermark - c.low_watermark, &c),
            None,
            "at low is not below"
        );
        assert_eq!(f.on_consumed(1, &c), Some(FlowSignal::Resume));
        assert_eq!(f.on_consumed(1, &c), None, "only one Resume");
    }

    #[test]
    fn overflow_is_refused_without_accounting() {
        let c = Config::default();
        let mut f = RecvFlow::default();
        assert!(f.on_data(c.stream_receive_cap, &c).is_ok());
        assert_eq!(
            f.on_data(1, &c),
            Err(Overflow {
                buffered: c.stream_receive_cap + 1,
                cap: c.stream_receive_cap
            })
        );
        assert_eq!(f.buffered(), c.stream_receive_cap);
    }

    proptest! {
        #[test]
        fn random_sequences_keep_invariants(ops in proptest::collection::vec((any::<bool>(), 0usize..3_000_000), 0..200)) {
            let c = Config::default();
            let mut f = RecvFlow::default();
            let mut outstanding_pause = false;
            for (is_data, n) in ops {
                let signal = if is_data {
                    f.on_data(n, &c).unwrap_or_default()
                } else {
                    let n = n.min(f.buffered());
                    f.on_consumed(n, &c)
                };
                match signal {
                    Some(FlowSignal::Pause) => { prop_assert!(!outstanding_pause); outstanding_pause = true; }
                    Some(FlowSignal::Resume) => { prop_assert!(outstanding_pause); outstanding_pause = false; }
                    None => {}
                }
                prop_assert_eq!(outstanding_pause, f.pause_sent());
                f.assert_invariants(&c);
                if f.buffered() > c.high_watermark { prop_assert!(f.pause_sent()); }
            }
        }
    }
}
