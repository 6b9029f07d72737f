//! Receive-side flow control of one stream, in one of two modes.
//!
//! - **Pause/Resume** (every Go peer): the wire only has XON/XOFF, so the "window" is a pause
//!   mark. The mark adapts: a stream gets Go's 2 MiB while the session has memory to spare or
//!   while its reader drains that much within [`Config::receive_horizon`]; a stream whose
//!   reader does not keep up is paused earlier as the other streams' unread bytes approach
//!   half the session budget, down to [`Config::pause_floor`]. A Go sender notices Pause
//!   only at its next write, so some overshoot is normal; past the hard cap the peer is
//!   ignoring us and the stream is reset.
//! - **Credit** (rd peers that negotiated the extension): the sender may send only what the
//!   receiver granted. Both ends start each stream at [`CREDIT_INITIAL_WINDOW`]; the
//!   receiver grants more as its reader consumes (in quarters of the window) and doubles a
//!   stream's window while the reader finds its buffer empty (the window, not the reader,
//!   limits the stream), as long as the session's granted bytes stay within its budget (like
//!   yamux's and quinn's auto-tuning). Past [`CREDIT_UNGATED_WINDOW`] a window grows only
//!   when the bytes read since its last growth arrived within about a round trip of the
//!   link per window (yamux's rule, scaled to the bytes read): on a LAN the reader finds its
//!   buffer empty whenever the sender pauses, and without the round trip every such pause
//!   would grow the window towards the maximum, bytes a fast link never needed held in the
//!   receiver's memory.

use std::time::{Duration, Instant};

use crate::config::Config;

/// The credit each direction of a new stream starts with when the credit extension is on.
/// Fixed by the extension so neither end has to announce it.
pub const CREDIT_INITIAL_WINDOW: u32 = 32 * 1024;

/// Windows up to this size grow on a starving reader alone; larger ones also need the
/// reader to keep up with the link's round trip (see the module docs). 256 KiB covers a
/// gigabyte per second over a quarter-millisecond round trip.
pub const CREDIT_UNGATED_WINDOW: usize = 256 * 1024;

/// What the receiver must tell the peer after a change in buffered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSignal {
    /// Send Pause for this stream.
    Pause,
    /// Send Resume for this stream.
    Resume,
    /// Grant this many more bytes (credit extension).
    Credit(u32),
}

/// Data arrived beyond the stream's hard cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// Unread bytes the stream would hold.
    pub buffered: usize,
    /// The cap.
    pub cap: usize,
}

/// What flow control needs to know about the rest of the session, the link and the time to
/// decide about one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    /// Unread bytes of every other stream.
    pub others_unread: usize,
    /// Credit granted and not yet consumed, all streams (credit mode).
    pub committed: usize,
    /// The link's round trip, the smallest the session measured (`None`: none yet). Credit
    /// windows past [`CREDIT_UNGATED_WINDOW`] do not grow without it.
    pub rtt: Option<Duration>,
    /// The time of the session's latest input: reads carry no clock of their own, and a
    /// reader that starves consumes what just arrived.
    pub now: Option<Instant>,
}

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
pub struct PauseFlow {
    pause_sent: bool,
    resume_below: usize,
    /// Bytes received since our outstanding Pause was queued.
    since_pause: usize,
    meter: ReadMeter,
}

impl PauseFlow {
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

    /// Whether a Pause is outstanding (sent and not yet followed by Resume).
    pub fn pause_sent(&self) -> bool {
        self.pause_sent
    }
}

/// Credit state of one stream's receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditFlow {
    window: usize,
    credit: usize,
    starved: bool,
    /// Bytes consumed since the window last grew (or the stream opened).
    since_growth: usize,
    /// When the window last grew (`None`: never).
    grown_at: Option<Instant>,
}

impl Default for CreditFlow {
    fn default() -> Self {
        Self {
            window: CREDIT_INITIAL_WINDOW as usize,
            credit: CREDIT_INITIAL_WINDOW as usize,
            starved: false,
            since_growth: 0,
            grown_at: None,
        }
    }
}

impl CreditFlow {
    /// The window the receiver currently aims to keep granted.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Bytes the peer may still send.
    pub fn credit(&self) -> usize {
        self.credit
    }
}

/// Receive flow control of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvFlow {
    /// Go's Pause/Resume, with adaptive marks.
    Pause(PauseFlow),
    /// rd's credit extension.
    Credit(CreditFlow),
}

impl RecvFlow {
    /// The state a new stream starts in.
    pub fn new(config: &Config) -> Self {
        if config.credit {
            Self::Credit(CreditFlow::default())
        } else {
            Self::Pause(PauseFlow::default())
        }
    }

    /// Whether a Pause is outstanding.
    pub fn pause_sent(&self) -> bool {
        matches!(self, Self::Pause(p) if p.pause_sent)
    }

    /// Bytes received since our outstanding Pause was queued (0 without one, and always 0
    /// with credit): more than the link can hold in flight means the peer ignores Pause.
    pub fn since_pause(&self) -> usize {
        match self {
            Self::Pause(p) if p.pause_sent => p.since_pause,
            _ => 0,
        }
    }

    /// Credit granted to the peer and not yet used (0 in Pause mode).
    pub fn credit(&self) -> usize {
        match self {
            Self::Pause(_) => 0,
            Self::Credit(c) => c.credit,
        }
    }

    /// Accounts `n` received bytes, the stream holding `unread` unread bytes before them.
    /// Over the cap the bytes are refused and nothing changes.
    #[must_use = "a Pause signal must be sent to the peer"]
    pub fn on_data(
        &mut self,
        n: usize,
        unread: usize,
        now: Instant,
        pressure: Pressure,
        config: &Config,
    ) -> Result<Option<FlowSignal>, Overflow> {
        let buffered = unread.saturating_add(n);
        if buffered > config.stream_receive_cap {
            return Err(Overflow {
                buffered,
                cap: config.stream_receive_cap,
            });
        }
        match self {
            Self::Pause(p) => {
                if p.pause_sent {
                    p.since_pause = p.since_pause.saturating_add(n);
                    return Ok(None);
                }
                let mark = p.mark(now, pressure, config);
                if buffered > mark {
                    p.pause_sent = true;
                    p.since_pause = 0;
                    p.resume_below = (mark / 8).min(config.low_watermark).max(1);
                    return Ok(Some(FlowSignal::Pause));
                }
                Ok(None)
            }
            Self::Credit(c) => {
                // Beyond the credit only by a released sender's last bytes (it may send its
                // queued data, at most a send buffer, and EOF whatever the credit). More than
                // that is a peer ignoring the credit it negotiated.
                let allowed = c.credit.saturating_add(config.stream_send_buffer);
                if n > allowed {
                    return Err(Overflow {
                        buffered,
                        cap: unread.saturating_add(allowed),
                    });
                }
                c.credit = c.credit.saturating_sub(n);
                Ok(None)
            }
        }
    }

    /// The reader found nothing to read.
    pub fn on_starved(&mut self) {
        if let Self::Credit(c) = self {
            c.starved = true;
        }
    }

    /// Accounts `n` bytes handed to the reader, leaving `unread`.
    #[must_use = "a Resume or Credit signal must be sent to the peer"]
    pub fn on_consumed(
        &mut self,
        n: usize,
        unread: usize,
        pressure: Pressure,
        config: &Config,
    ) -> Option<FlowSignal> {
        match self {
            Self::Pause(p) => {
                p.meter.consumed = p.meter.consumed.saturating_add(n);
                if p.pause_sent && unread < p.resume_below {
                    p.pause_sent = false;
                    return Some(FlowSignal::Resume);
                }
                None
            }
            Self::Credit(c) => {
                let initial = CREDIT_INITIAL_WINDOW as usize;
                let budget = config.session_receive_budget;
                c.since_growth = c.since_growth.saturating_add(n);
                // While the session has credit to spare, a starving reader doubles its
                // window at every grant (slow start, so a long link fills quickly). Past
                // half the budget it must first keep up over two windows' worth: a
                // download whose socket absorbed a few hundred KiB and then stalled must
                // not keep a large window it never uses.
                let committed = pressure.committed;
                let proven = if committed.saturating_add(c.window) <= budget / 2 {
                    c.since_growth >= c.window / 2
                } else {
                    c.since_growth >= 2 * c.window
                };
                // With most of the budget free, quadruple: a long link reaches its
                // bandwidth-delay product in half the round trips.
                let factor = if committed.saturating_add(4 * c.window) <= budget / 4 {
                    4
                } else {
                    2
                };
                // A large window must also be what limits the stream. Limited by its window,
                // a stream moves a window per round trip, so the bytes consumed since the
                // last growth (or the last such check) arrived within a round trip per
                // window; allow one round trip more for the first of them to come. A sender
                // that pauses (its own source is slower) starves the reader too, but the
                // window then outgrows the bytes the link holds, and more would only be
                // held, not used. Within two thirds of that time the window clearly is the
                // limit and may quadruple (a long link ramps up in fewer round trips);
                // otherwise it only doubles, as the check passes up to a few times the bytes
                // the link holds.
                let link_factor = if c.window < CREDIT_UNGATED_WINDOW {
                    4
                } else {
                    match (pressure.rtt, pressure.now, c.grown_at) {
                        (Some(rtt), Some(now), Some(at)) => {
                            let rtt = rtt.as_nanos();
                            let windows = c.since_growth as u128;
                            let allowed = rtt + rtt * windows / c.window.max(1) as u128;
                            let took = now.saturating_duration_since(at).as_nanos();
                            if took * 3 <= allowed * 2 {
                                4
                            } else if took <= allowed {
                                2
                            } else {
                                0
                            }
                        }
                        _ => 0,
                    }
                };
                let max_window = config.credit_max_window.min(config.stream_receive_cap);
                let hungry = c.starved
                    && proven
                    && c.window < max_window
                    && committed.saturating_add(c.window) <= budget;
                if hungry {
                    if link_factor > 0 {
                        c.window = (c.window * factor.min(link_factor)).min(max_window);
                    }
                    // Grown or not, measure again from here (with the round trip known by
                    // then, if it was not yet).
                    c.since_growth = 0;
                    c.grown_at = pressure.now;
                } else if pressure.committed > budget && c.window > initial {
                    c.window = (c.window / 2).max(initial);
                }
                let outstanding = c.credit.saturating_add(unread);
                let increment = c.window.saturating_sub(outstanding);
                // Grant in quarters of the window, not after every read: the sender then has
                // at least three quarters of the window to send while a grant crosses the link.
                if increment == 0 || increment < c.window / 4 {
                    return None;
                }
                let increment = u32::try_from(increment).unwrap_or(u32::MAX);
                c.credit += increment as usize;
                c.starved = false;
                Some(FlowSignal::Credit(increment))
            }
        }
    }

    /// Panics if an invariant is broken; for tests and debug builds.
    pub fn assert_invariants(&self, unread: usize, config: &Config) {
        assert!(
            unread <= config.stream_receive_cap,
            "buffered over the hard cap"
        );
        if let Self::Credit(c) = self {
            assert!(c.window <= config.credit_max_window.max(CREDIT_INITIAL_WINDOW as usize));
            assert!(c.window >= CREDIT_INITIAL_WINDOW as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quiet() -> Pressure {
        Pressure::default()
    }

    #[test]
    fn pause_once_above_high_resume_once_below_low_without_pressure() {
        let c = Config::default();
        let now = Instant::now();
        let mut f = RecvFlow::new(&c);
        assert_eq!(
            f.on_data(c.high_watermark, 0, now, quiet(), &c),
            Ok(None),
            "at the mark is not above it"
        );
        let mut unread = c.high_watermark;
        assert_eq!(
            f.on_data(1, unread, now, quiet(), &c),
            Ok(Some(FlowSignal::Pause))
        );
        unread += 1;
        assert_eq!(
            f.on_data(1000, unread, now, quiet(), &c),
            Ok(None),
            "only one Pause outstanding"
        );
        unread += 1000;
        unread -= 1001;
        assert_eq!(f.on_consumed(1001, unread, quiet(), &c), None);
        let n = c.high_watermark - c.low_watermark;
        unread -= n;
        assert_eq!(
            f.on_consumed(n, unread, quiet(), &c),
            None,
            "at low is not below"
        );
        unread -= 1;
        assert_eq!(
            f.on_consumed(1, unread, quiet(), &c),
            Some(FlowSignal::Resume)
        );
        assert_eq!(
            f.on_consumed(1, unread - 1, quiet(), &c),
            None,
            "only one Resume"
        );
    }

    #[test]
    fn a_stream_that_is_not_read_is_paused_at_the_floor_under_pressure() {
        let c = Config::default();
        let now = Instant::now();
        let mut f = RecvFlow::new(&c);
        let pressure = Pressure {
            others_unread: c.session_receive_budget / 2,
            committed: 0,
            ..Pressure::default()
        };
        assert_eq!(f.on_data(c.pause_floor, 0, now, pressure, &c), Ok(None));
        assert_eq!(
            f.on_data(1, c.pause_floor, now, pressure, &c),
            Ok(Some(FlowSignal::Pause))
        );
        // Half way to the pressure point the mark is half of Go's.
        let mut g = RecvFlow::new(&c);
        let halfway = Pressure {
            others_unread: c.session_receive_budget / 4,
            committed: 0,
            ..Pressure::default()
        };
        let half_mark = c.high_watermark / 2;
        assert_eq!(g.on_data(half_mark, 0, now, halfway, &c), Ok(None));
        assert_eq!(
            g.on_data(1, half_mark, now, halfway, &c),
            Ok(Some(FlowSignal::Pause))
        );
    }

    #[test]
    fn a_fast_reader_keeps_the_high_mark_under_pressure() {
        let c = Config::default();
        let t0 = Instant::now();
        let pressure = Pressure {
            others_unread: c.session_receive_budget,
            committed: 0,
            ..Pressure::default()
        };
        let mut f = RecvFlow::new(&c);
        let mut unread = 0;
        // The reader drains 8 MiB within one horizon.
        let mut now = t0;
        for _ in 0..256 {
            assert_eq!(f.on_data(32 * 1024, unread, now, pressure, &c), Ok(None));
            unread += 32 * 1024;
            unread -= 32 * 1024;
            assert_eq!(f.on_consumed(32 * 1024, unread, pressure, &c), None);
            now += c.receive_horizon / 256;
        }
        // Next horizon: it may hold up to Go's mark.
        now += c.receive_horizon;
        assert_eq!(f.on_data(c.high_watermark, 0, now, pressure, &c), Ok(None));
    }

    #[test]
    fn overflow_is_refused_without_accounting() {
        let c = Config::default();
        let mut f = RecvFlow::new(&c);
        let now = Instant::now();
        assert_eq!(
            f.on_data(1, c.stream_receive_cap, now, quiet(), &c),
            Err(Overflow {
                buffered: c.stream_receive_cap + 1,
                cap: c.stream_receive_cap
            })
        );
    }

    #[test]
    fn credit_is_granted_in_halves_and_grows_while_the_reader_starves() {
        let c = Config {
            credit: true,
            ..Config::default()
        };
        let now = Instant::now();
        let w = CREDIT_INITIAL_WINDOW as usize;
        // Granted credit past half the budget: growth must be earned.
        let busy = Pressure {
            others_unread: 0,
            committed: c.session_receive_budget / 2,
            ..Pressure::default()
        };
        let mut f = RecvFlow::new(&c);
        // Hungry from the start, but nothing moved yet: no growth, and no grant for an
        // eighth of the window.
        f.on_starved();
        assert_eq!(f.on_data(w / 8, 0, now, busy, &c), Ok(None));
        assert_eq!(
            f.on_consumed(w / 8, 0, busy, &c),
            None,
            "an eighth: not yet"
        );
        assert_eq!(f.on_data(w / 8, 0, now, busy, &c), Ok(None));
        assert_eq!(
            f.on_consumed(w / 8, 0, busy, &c),
            Some(FlowSignal::Credit((w / 4) as u32)),
            "a quarter of the window: granted back"
        );
        assert_eq!(f.credit(), w);
        // Starving, but less than two windows moved so far: the window stays...
        f.on_starved();
        assert_eq!(f.on_data(w, 0, now, busy, &c), Ok(None));
        assert_eq!(
            f.on_consumed(w, 0, busy, &c),
            Some(FlowSignal::Credit(w as u32))
        );
        // ...and doubles once it has moved two windows.
        f.on_starved();
        assert_eq!(f.on_data(w, 0, now, busy, &c), Ok(None));
        assert_eq!(
            f.on_consumed(w, 0, busy, &c),
            Some(FlowSignal::Credit((2 * w) as u32))
        );
        assert_eq!(f.credit(), 2 * w);
        // Without pressure a starving reader quadruples its window at every grant.
        f.on_starved();
        assert_eq!(f.on_data(2 * w, 0, now, quiet(), &c), Ok(None));
        assert_eq!(
            f.on_consumed(2 * w, 0, quiet(), &c),
            Some(FlowSignal::Credit((8 * w) as u32))
        );
        // No growth past the budget.
        let full = Pressure {
            others_unread: 0,
            committed: c.session_receive_budget,
            ..Pressure::default()
        };
        f.on_starved();
        assert_eq!(f.on_data(8 * w, 0, now, full, &c), Ok(None));
        let RecvFlow::Credit(cf) = &f else { panic!() };
        let before = cf.window();
        let _ = f.on_consumed(8 * w, 0, full, &c);
        let RecvFlow::Credit(cf) = &f else { panic!() };
        assert!(
            cf.window() <= before,
            "an over-budget session does not grow windows"
        );
    }

    proptest! {
        #[test]
        fn random_sequences_keep_invariants(
            credit in any::<bool>(),
            ops in proptest::collection::vec((any::<bool>(), 0usize..3_000_000, 0usize..200_000_000, 0u64..1000), 0..200),
            rtt_us in 1u64..100_000,
        ) {
            let c = Config { credit, ..Config::default() };
            let mut f = RecvFlow::new(&c);
            let mut now = Instant::now();
            let mut unread = 0usize;
            let mut outstanding_pause = false;
            for (is_data, n, others, ms) in ops {
                now += Duration::from_millis(ms);
                let pressure = Pressure { others_unread: others, committed: others, rtt: Some(Duration::from_micros(rtt_us)), now: Some(now) };
                let signal = if is_data {
                    match f.on_data(n, unread, now, pressure, &c) {
                        Ok(s) => { unread += n; s }
                        Err(_) => None,
                    }
                } else {
                    let n = n.min(unread);
                    unread -= n;
                    f.on_consumed(n, unread, pressure, &c)
                };
                match signal {
                    Some(FlowSignal::Pause) => { prop_assert!(!outstanding_pause); outstanding_pause = true; }
                    Some(FlowSignal::Resume) => { prop_assert!(outstanding_pause); outstanding_pause = false; }
                    Some(FlowSignal::Credit(_)) => prop_assert!(credit),
                    None => {}
                }
                prop_assert_eq!(outstanding_pause, f.pause_sent());
                f.assert_invariants(unread, &c);
                if !credit && unread > c.high_watermark { prop_assert!(f.pause_sent()); }
            }
        }
    }
}
