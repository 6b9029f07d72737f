//! Credit flow control of one stream's receiver (rd's `credit` extension, docs/protocol.md):
//! how large a window to keep granted, and when to grant.
//!
//! The window is what the receiver keeps granted and not yet read. It aims at twice what
//! the stream's link holds, its bandwidth-delay product: the rate of the stream's arrivals
//! times the link's round trip (the smallest the session measured with pings, and at least
//! a millisecond, what the runtimes' turns add on a fast link), the way h2's adaptive window
//! and quinn's receive windows are sized. A stream whose reader keeps up
//! then never waits for credit, and one whose reader stops holds no more than its window.
//!
//! - **Growth**, only while the window is what limits the stream: Data found the reader
//!   waiting for it within the last round trip, the stream moved at least two thirds of
//!   the window within the
//!   last round trip (a window-limited stream moves its window once per round trip), and it
//!   used half the window since it last grew. A sender slower than the link (its own source
//!   sets the pace), a slow reader, or a link slower than the window moves less, and the
//!   window stays.
//! - **How much**: to twice the rate of the stream's latest burst of arrivals times the
//!   round trip (not at all if the window is that large already), at most eightfold in one
//!   step. A burst shorter than a sixteenth of the
//!   round trip (and than a millisecond: arrival times are a runtime's turns, which batch)
//!   is not timed; a window that arrived in such a burst is below the link's rate times
//!   that time, so it may grow by the factor that keeps it under twice the bandwidth-delay
//!   product: 32 on round trips of 16 ms and more, down to 2 on short ones. A 200 ms link at
//!   100 MB/s thus goes from 32 KiB to 1 MiB after the first round trip of Data and to its
//!   full window after the second.
//! - **Shrinking**: while the session holds more than half its budget, a window more than
//!   four times what its stream moved in the last round trip halves (not below twice that),
//!   a round trip after it last grew: budget goes back to the streams their windows limit.
//! - **Grants** top the window up once an eighth of it (a quarter below 512 KiB) was read,
//!   so the sender has at least 7/8 of the window to send while a grant crosses the link.
//! - **The budget** bounds grants, not only growth: beyond each stream's initial window, no
//!   grant takes what the session holds (unread plus credit) past
//!   [`Config::session_receive_budget`], and a window that does not fit shrinks to what does.
//! - Without a round trip (a peer that never answers pings), a starving reader grows its
//!   window fourfold per grant, to [`UNTIMED_MAX_WINDOW`] at most.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::message::CREDIT_INITIAL_WINDOW;

use super::budget::Pressure;

/// The largest window without a measured round trip: 256 KiB covers a gigabyte per second
/// over a quarter-millisecond round trip.
const UNTIMED_MAX_WINDOW: usize = 256 * 1024;

/// The largest factor a window grows by in one step when its stream's burst rate is known.
const TIMED_GROWTH: usize = 8;

/// Below this window a grant waits for a quarter of it to be read, above for an eighth:
/// small windows are granted in few messages, large ones early.
const EIGHTHS_FROM: usize = 512 * 1024;

/// The shortest round trip a window is sized for. A credit's way round is the link's round
/// trip plus the turns of the runtimes at both ends (the reader's task, the drivers, the
/// sender's task), which on a fast link are most of it: on loopback the pings measure
/// 0.1 ms, the credit loop takes about a millisecond.
const MIN_ROUND: Duration = Duration::from_millis(1);

/// The round trip windows are sized for: the link's, at least [`MIN_ROUND`].
fn round_trip(rtt: Duration) -> Duration {
    rtt.max(MIN_ROUND)
}

/// The shortest burst whose rate is believed: a sixteenth of the round trip, and at least a
/// millisecond (arrival times are those of a runtime's turns, which batch messages).
fn min_burst(rtt: Duration) -> Duration {
    (rtt / 16).max(Duration::from_millis(1))
}

/// How much a window may grow when its stream's bursts are too short to time: it is below
/// the link's rate times [`min_burst`], so this factor keeps it below twice the
/// bandwidth-delay product.
fn untimed_growth(rtt: Duration) -> usize {
    let factor = 2 * rtt.as_nanos() / min_burst(rtt).as_nanos().max(1);
    usize::try_from(factor).unwrap_or(usize::MAX).clamp(2, 32)
}

/// Bytes that arrive at `rate` bytes per second over `time`.
fn bytes_over(rate: u64, time: Duration) -> usize {
    usize::try_from(u128::from(rate) * time.as_nanos() / 1_000_000_000).unwrap_or(usize::MAX)
}

/// What a stream's arrivals say about its link: bytes per round trip, and the rate of its
/// bursts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RateMeter {
    /// The round trip in progress: when it started and the bytes since.
    round: Option<(Instant, usize)>,
    /// Bytes that arrived in the last whole round trip (scaled to one round trip).
    last_round: usize,
    /// The burst in progress: its first and latest arrival, and the bytes after the first
    /// message (which marks its start).
    burst: Option<(Instant, Instant, usize)>,
    /// Bytes per second of the latest burst long enough to time.
    rate: Option<u64>,
}

impl RateMeter {
    fn on_data(&mut self, n: usize, now: Instant, rtt: Duration) {
        match &mut self.round {
            Some((start, bytes)) if now.saturating_duration_since(*start) < rtt => *bytes += n,
            round => {
                if let Some((start, bytes)) = *round {
                    let took = now.saturating_duration_since(start).as_nanos().max(1);
                    let per_rtt = bytes as u128 * rtt.as_nanos() / took;
                    self.last_round = usize::try_from(per_rtt).unwrap_or(usize::MAX);
                }
                *round = Some((now, n));
            }
        }
        // A gap of an eighth of a round trip ends a burst: a window-limited stream's window
        // arrives in one, then nothing until its grant has crossed the link.
        match &mut self.burst {
            Some((_, last, bytes)) if now.saturating_duration_since(*last) <= rtt / 8 => {
                *last = now;
                *bytes += n;
            }
            burst => *burst = Some((now, now, 0)),
        }
        if let Some((first, last, bytes)) = self.burst {
            let took = last.saturating_duration_since(first);
            if took >= min_burst(rtt) {
                let rate = bytes as u128 * 1_000_000_000 / took.as_nanos();
                self.rate = Some(u64::try_from(rate).unwrap_or(u64::MAX));
            }
        }
    }

    /// Bytes the stream moved within about the last round trip: the last whole one, or the
    /// one in progress if it already holds more.
    fn moved(&self) -> usize {
        self.last_round
            .max(self.round.map_or(0, |(_, bytes)| bytes))
    }
}

/// Credit state of one stream's receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreditWindow {
    /// What the receiver aims to keep granted and unread.
    window: usize,
    /// Granted and not yet received: what the peer may still send.
    credit: usize,
    /// Bytes consumed since the window last grew (or the stream opened).
    since_growth: usize,
    /// What arrivals said so far; allocated with the first Data, so that the many streams
    /// that never carry any (idle ones) stay small.
    seen: Option<Box<Seen>>,
}

/// What a stream's arrivals told its receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    /// When Data last arrived for a reader that was waiting for it, since the window last
    /// grew: a reader that waits keeps up, so the window (or the sender) is what limits the
    /// stream. (The arrival times it, not the read: reads carry no clock.)
    starved: Option<Instant>,
    /// When the window last grew or shrank (`None`: never).
    changed_at: Option<Instant>,
    meter: RateMeter,
}

impl Default for CreditWindow {
    fn default() -> Self {
        Self {
            window: CREDIT_INITIAL_WINDOW as usize,
            credit: CREDIT_INITIAL_WINDOW as usize,
            since_growth: 0,
            seen: None,
        }
    }
}

impl CreditWindow {
    /// Bytes the peer may still send.
    pub(crate) fn credit(&self) -> usize {
        self.credit
    }

    /// Whether the window grew past the initial one: the stream shares the budget.
    pub(crate) fn grown(&self) -> bool {
        self.window > CREDIT_INITIAL_WINDOW as usize
    }

    /// The window the receiver currently aims to keep granted.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// `n` bytes arrived at `pressure.now`, for a reader that was waiting for them or not.
    /// False, and nothing changes, if they exceed the credit by more than `slack` (a
    /// released sender may send its queued data whatever the credit; more is a peer
    /// ignoring the credit it negotiated).
    #[must_use = "bytes beyond the credit must be refused"]
    pub(crate) fn on_data(
        &mut self,
        n: usize,
        reader_waiting: bool,
        slack: usize,
        pressure: Pressure,
    ) -> bool {
        if n > self.credit.saturating_add(slack) {
            return false;
        }
        self.credit = self.credit.saturating_sub(n);
        if let Some(now) = pressure.now {
            let seen = self.seen.get_or_insert_with(Box::default);
            if reader_waiting {
                seen.starved = Some(now);
            }
            if let Some(rtt) = pressure.rtt {
                seen.meter.on_data(n, now, round_trip(rtt));
            }
        }
        true
    }

    /// The reader took `n` bytes, leaving `unread`; the credit to grant, if any.
    #[must_use = "a grant must be sent to the peer"]
    pub(crate) fn on_consumed(
        &mut self,
        n: usize,
        unread: usize,
        pressure: Pressure,
        config: &Config,
    ) -> Option<u32> {
        let initial = CREDIT_INITIAL_WINDOW as usize;
        let budget = config.session_receive_budget;
        self.since_growth = self.since_growth.saturating_add(n);
        let outstanding = self.credit.saturating_add(unread);
        // The most this stream may hold beside the others, and its fair share of the
        // budget beside the other streams whose windows grew.
        let room = budget.saturating_sub(pressure.others_committed);
        let limit = room.min(pressure.fair_share);
        let moved = self.seen.as_ref().map_or(0, |s| s.meter.moved());
        if let Some(to) = self.growth(moved, limit, pressure, config) {
            tracing::trace!(from = self.window, to, moved, "credit window grows");
            self.window = to;
            self.since_growth = 0;
            if let Some(seen) = &mut self.seen {
                seen.starved = None;
                seen.changed_at = pressure.now;
            }
        } else if pressure.others_committed.saturating_add(outstanding) > budget / 2
            && moved.saturating_mul(4) < self.window
            && self.settled(pressure)
        {
            let to = moved.saturating_mul(2).max(self.window / 2).max(initial);
            tracing::trace!(from = self.window, to, moved, "credit window shrinks");
            self.window = to;
            if let Some(seen) = &mut self.seen {
                seen.changed_at = pressure.now;
            }
        }
        // Beyond the initial window, the budget and the fair share bound what is granted.
        self.window = self.window.min(limit.max(initial));
        let increment = self.window.saturating_sub(outstanding);
        let step = if self.window < EIGHTHS_FROM {
            self.window / 4
        } else {
            self.window / 8
        };
        if increment == 0 || increment < step {
            return None;
        }
        let increment = u32::try_from(increment).unwrap_or(u32::MAX);
        self.credit += increment as usize;
        Some(increment)
    }

    /// The window this stream should grow to now, if it should.
    fn growth(
        &self,
        moved: usize,
        limit: usize,
        pressure: Pressure,
        config: &Config,
    ) -> Option<usize> {
        let max = config
            .credit_max_window
            .min(config.stream_receive_cap)
            .min(limit);
        // The reader waited within the last round trip: it keeps up (a reader that fell
        // behind has bytes waiting, and a larger window would only hold more of them).
        let Some(seen) = &self.seen else {
            return None;
        };
        let starved = match (seen.starved, pressure.rtt, pressure.now) {
            (Some(at), Some(rtt), Some(now)) => {
                now.saturating_duration_since(at) <= round_trip(rtt)
            }
            (starved, ..) => starved.is_some(),
        };
        if !starved || self.since_growth < self.window / 2 || self.window >= max {
            return None;
        }
        let w = self.window;
        let to = match pressure.rtt.map(round_trip) {
            None => (4 * w).min(UNTIMED_MAX_WINDOW),
            Some(_) if moved.saturating_mul(3) < w.saturating_mul(2) => return None,
            Some(rtt) => match seen.meter.rate {
                Some(rate) => (TIMED_GROWTH * w).min(2 * bytes_over(rate, rtt)),
                None => w.saturating_mul(untimed_growth(rtt)),
            },
        };
        let to = to.min(max);
        (to > w).then_some(to)
    }

    /// Whether a round trip has passed since the window last changed: only then does what
    /// the stream moves show what the new window does.
    fn settled(&self, pressure: Pressure) -> bool {
        let changed_at = self.seen.as_ref().and_then(|s| s.changed_at);
        match (changed_at, pressure.rtt, pressure.now) {
            (Some(at), Some(rtt), Some(now)) => now >= at + round_trip(rtt),
            _ => true,
        }
    }

    /// Panics if an invariant is broken; for tests and debug builds.
    pub(crate) fn assert_invariants(&self, config: &Config) {
        let initial = CREDIT_INITIAL_WINDOW as usize;
        assert!(
            self.window >= initial,
            "a window never falls below the initial one"
        );
        assert!(
            self.window <= config.credit_max_window.max(initial),
            "a window stays within credit_max_window"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: usize = CREDIT_INITIAL_WINDOW as usize;

    fn credit() -> Config {
        Config {
            credit: true,
            ..Config::default()
        }
    }

    fn at(now: Instant, rtt: Option<Duration>) -> Pressure {
        Pressure {
            fair_share: Config::default().session_receive_budget,
            rtt,
            now: Some(now),
            ..Pressure::default()
        }
    }

    /// `len` bytes arrive in 64 KiB messages spread over `spread`, starting at `now`; the
    /// reader had been waiting and takes each at once. Returns the credit granted.
    fn round(
        w: &mut CreditWindow,
        now: Instant,
        len: usize,
        spread: Duration,
        rtt: Option<Duration>,
        config: &Config,
    ) -> usize {
        let messages = len.div_ceil(64 * 1024).max(1);
        let mut granted = 0;
        let mut left = len;
        for i in 0..messages {
            let n = left.min(64 * 1024);
            left -= n;
            let t = now + spread * i as u32 / messages as u32;
            assert!(w.on_data(n, true, 0, at(t, rtt)));
            granted += w.on_consumed(n, 0, at(t, rtt), config).unwrap_or(0) as usize;
        }
        granted
    }

    #[test]
    fn grants_top_the_window_up_in_quarters() {
        let c = credit();
        let now = Instant::now();
        let mut w = CreditWindow::default();
        assert!(w.on_data(W / 8, false, 0, at(now, None)));
        assert_eq!(
            w.on_consumed(W / 8, 0, at(now, None), &c),
            None,
            "an eighth: not yet"
        );
        assert!(w.on_data(W / 8, false, 0, at(now, None)));
        assert_eq!(
            w.on_consumed(W / 8, 0, at(now, None), &c),
            Some((W / 4) as u32),
            "a quarter of the window: granted back"
        );
        assert_eq!(w.credit(), W);
        assert_eq!(
            w.window(),
            W,
            "a reader that never waited does not grow the window"
        );
    }

    #[test]
    fn without_a_round_trip_windows_stop_at_the_untimed_maximum() {
        let c = credit();
        let now = Instant::now();
        let mut w = CreditWindow::default();
        let mut len = W;
        for _ in 0..6 {
            len = round(&mut w, now, len, Duration::ZERO, None, &c);
        }
        assert_eq!(w.window(), UNTIMED_MAX_WINDOW);
    }

    /// The window after a first round trip of Data (the initial window, in one message) and
    /// a second (what the first grant allowed, spread over 10 ms: 1 MiB at 100 MB/s).
    fn two_round_trips(rtt: Duration) -> (usize, usize) {
        let c = credit();
        let t0 = Instant::now();
        let mut w = CreditWindow::default();
        let granted = round(&mut w, t0, W, Duration::ZERO, Some(rtt), &c);
        let first = w.window();
        let spread = Duration::from_millis(10);
        round(&mut w, t0 + rtt, granted, spread, Some(rtt), &c);
        (first, w.window())
    }

    #[test]
    fn a_long_link_gets_its_window_in_two_round_trips() {
        // The first window arrives in one message: too short to time, grown 32-fold. Over
        // 200 ms, 1 MiB in 10 ms is under the 12.5 ms that can be timed: 32-fold again,
        // capped at the largest window.
        let (first, second) = two_round_trips(Duration::from_millis(200));
        assert_eq!(first, 32 * W);
        assert_eq!(second, credit().credit_max_window);
        // Over 50 ms the 1 MiB burst is timed (100 MB/s), and the window grows to twice the
        // 5 MB in flight, at most eightfold.
        let (first, second) = two_round_trips(Duration::from_millis(50));
        assert_eq!(first, 32 * W);
        assert_eq!(second, 8 * 32 * W);
    }

    #[test]
    fn a_window_the_stream_does_not_fill_stays() {
        let c = credit();
        let rtt = Duration::from_millis(200);
        let mut now = Instant::now();
        let mut w = CreditWindow::default();
        // The sender's source gives 4 KiB every 50 ms: half the window per round trip, and
        // the reader waits for each.
        for _ in 0..100 {
            round(&mut w, now, 4 * 1024, Duration::ZERO, Some(rtt), &c);
            now += Duration::from_millis(50);
        }
        assert_eq!(w.window(), W);
    }

    #[test]
    fn the_budget_bounds_grants_beyond_the_initial_window() {
        let c = credit();
        let rtt = Duration::from_millis(50);
        let t0 = Instant::now();
        let mut w = CreditWindow::default();
        let granted = round(&mut w, t0, W, Duration::ZERO, Some(rtt), &c);
        assert_eq!(w.window(), 32 * W);
        // The other streams now hold all but 100 KiB of the budget: the window shrinks to fit
        // and what is granted stays within it.
        let full = Pressure {
            others_committed: c.session_receive_budget - 100 * 1024,
            ..at(t0 + rtt, Some(rtt))
        };
        assert!(w.on_data(granted, false, 0, full));
        let grant = w.on_consumed(granted, 0, full, &c).unwrap_or(0) as usize;
        assert_eq!(w.window(), 100 * 1024);
        assert!(full.others_committed + w.credit() <= c.session_receive_budget);
        assert_eq!(grant, w.credit());
        // With the budget all taken, a stream still gets its initial window back.
        let taken = Pressure {
            others_committed: c.session_receive_budget,
            ..full
        };
        assert!(w.on_data(w.credit(), false, 0, taken));
        assert_eq!(w.on_consumed(grant, 0, taken, &c), Some(W as u32));
        assert_eq!(w.window(), W);
    }

    #[test]
    fn under_pressure_a_window_far_above_what_its_stream_moves_shrinks() {
        let c = credit();
        let rtt = Duration::from_millis(50);
        let t0 = Instant::now();
        let mut w = CreditWindow::default();
        let granted = round(&mut w, t0, W, Duration::ZERO, Some(rtt), &c);
        round(
            &mut w,
            t0 + rtt,
            granted,
            Duration::from_millis(10),
            Some(rtt),
            &c,
        );
        assert_eq!(w.window(), 8 * 32 * W);
        // Other streams took half the budget; this one now moves 256 KiB per round trip.
        let busy = |now| Pressure {
            others_committed: c.session_receive_budget / 2,
            ..at(now, Some(rtt))
        };
        let mut now = t0 + 3 * rtt;
        for _ in 0..3 {
            assert!(w.on_data(256 * 1024, false, 0, busy(now)));
            let _ = w.on_consumed(256 * 1024, 0, busy(now), &c);
            now += rtt;
        }
        assert!(w.window() <= 4 * 256 * 1024, "window {}", w.window());
        assert!(w.window() >= 2 * 256 * 1024, "window {}", w.window());
    }

    proptest! {
        #[test]
        fn random_sequences_keep_the_window_within_its_bounds_and_the_budget(
            ops in proptest::collection::vec((any::<bool>(), 0usize..3_000_000, 0usize..80_000_000, 0u64..300), 0..300),
            rtt_us in proptest::option::of(1u64..300_000),
        ) {
            let c = credit();
            let mut w = CreditWindow::default();
            let mut now = Instant::now();
            let mut unread = 0usize;
            for (is_data, n, others, ms) in ops {
                now += Duration::from_millis(ms);
                let pressure = Pressure {
                    others_committed: others,
                    fair_share: c.session_receive_budget / (1 + others % 8),
                    rtt: rtt_us.map(Duration::from_micros),
                    now: Some(now),
                    ..Pressure::default()
                };
                if is_data {
                    let n = n.min(w.credit());
                    prop_assert!(w.on_data(n, unread == 0, 0, pressure));
                    unread += n;
                } else if unread > 0 {
                    let n = n.min(unread);
                    unread -= n;
                    let before = w.credit() + unread;
                    if let Some(grant) = w.on_consumed(n, unread, pressure, &c) {
                        let held = w.credit() + unread;
                        prop_assert_eq!(held, before + grant as usize);
                        prop_assert!(
                            held <= CREDIT_INITIAL_WINDOW as usize
                                || others + held <= c.session_receive_budget,
                            "a grant beyond the initial window stays within the budget"
                        );
                    }
                }
                w.assert_invariants(&c);
            }
        }
    }
}
