//! Keepalive and the round trip: when to ping, when a silent peer is dead, and what the
//! answers to our pings measure. All of it runs on websocket pings and pongs, which every
//! websocket peer answers (docs/protocol.md, "Transport").

use std::time::{Duration, Instant};

use crate::config::{Config, Side};
use crate::error::SessionEnd;
use crate::timer::{Timer, TimerTable};

/// How often Data may trigger a ping that only measures the round trip (credit mode): the
/// smallest sample is kept, so later ones only help when the first crossed a busy queue.
/// yamux measures as often.
const RTT_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// What a tick of the timers decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Expired {
    /// The session is dead.
    pub(crate) end: Option<SessionEnd>,
    /// SyncConnections is due.
    pub(crate) sync: bool,
}

/// The keepalive state of one session and its timers.
#[derive(Debug)]
pub(crate) struct Keepalive {
    side: Side,
    timers: TimerTable,
    /// When the peer last sent a ping or a pong.
    last_keepalive: Instant,
    /// When anything (a message, ping or pong) last arrived.
    last_heard: Instant,
    /// The peer pinged us or answered a ping: it keeps the link busy, so its silence means
    /// the link is dead ([`Config::answer_timeout`]).
    peer_pings: bool,
    /// When the peer last sent anything but a pong (`None`: nothing yet). A server side
    /// skips each ping tick whose window holds such a message.
    last_talked: Option<Instant>,
    /// A client side's next ping; a server side's next ping tick, the end of the window that
    /// starts at `tick_from`.
    tick: Option<Instant>,
    /// Where the window of the tick at `tick` starts (the previous tick, or the start).
    tick_from: Instant,
    /// A ping waits to be sent.
    ping_due: bool,
    /// When our oldest unanswered ping was queued (`None`: none is out): its pong measures
    /// the round trip.
    ping_sent_at: Option<Instant>,
    /// The smallest round trip measured so far (queues on the path only add to it).
    rtt: Option<Duration>,
    /// When Data may next trigger a ping just to measure the round trip (credit mode).
    next_rtt_probe: Option<Instant>,
}

impl Keepalive {
    pub(crate) fn new(side: Side, config: &Config, now: Instant) -> Self {
        // With credit, measure the round trip right away, while the link is quiet: the
        // windows of the first streams need it (every rd peer answers pings).
        let rtt_probe = config.credit.then_some(now);
        let tick = match side {
            Side::Client => Some(now + config.ping_interval),
            // Half a period out of phase with a client that started with us and pings every
            // `server_ping_after`: each tick's window then holds exactly one of its pings even
            // with a few seconds of jitter, so no tick finds it silent.
            Side::Server => config.server_ping_after.map(|d| now + d + d / 2),
        };
        let mut timers = TimerTable::default();
        if side == Side::Client {
            timers.set(Timer::Sync, config.sync_interval.map(|i| now + i));
        }
        let mut keepalive = Self {
            side,
            timers,
            last_keepalive: now,
            last_heard: now,
            peer_pings: false,
            last_talked: None,
            tick,
            tick_from: now,
            ping_due: rtt_probe.is_some(),
            ping_sent_at: rtt_probe,
            rtt: None,
            next_rtt_probe: rtt_probe.map(|at| at + RTT_PROBE_INTERVAL),
        };
        keepalive.rearm(config);
        keepalive
    }

    /// The smallest round trip our pings measured (`None` before the first answer).
    pub(crate) fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// When anything (a message, ping or pong) last arrived from the peer.
    pub(crate) fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// Whether the peer takes part in keepalive (it pinged us or answered our ping).
    pub(crate) fn peer_pings(&self) -> bool {
        self.peer_pings
    }

    /// Whether a ping waits to be sent.
    pub(crate) fn ping_due(&self) -> bool {
        self.ping_due
    }

    /// Takes the waiting ping, if any.
    pub(crate) fn take_ping(&mut self) -> bool {
        std::mem::take(&mut self.ping_due)
    }

    /// The session ended: no more pings, no more deadlines.
    pub(crate) fn stop(&mut self) {
        self.ping_due = false;
        self.timers.clear();
    }

    /// Something arrived from the peer. A server side skips its next ping then: a peer that
    /// talks, or pings on its own, needs none from us. (The ticks stay on a fixed grid
    /// rather than `server_ping_after` after the last message: that would race the client's
    /// own 5 s pings.)
    pub(crate) fn on_frame(&mut self, now: Instant, config: &Config) {
        self.last_heard = now;
        self.last_talked = Some(now);
        self.rearm(config);
    }

    /// A websocket ping (or a pong, if the caller cannot tell them apart) arrived: the peer
    /// is alive, and takes part in keepalive.
    pub(crate) fn on_keepalive(&mut self, now: Instant, config: &Config) {
        self.last_keepalive = now;
        self.peer_pings = true;
        self.on_frame(now, config);
    }

    /// A websocket pong arrived: it measures the round trip of our oldest unanswered ping,
    /// and does not count as the peer talking on its own, so a server side keeps pinging a
    /// peer that only answers.
    pub(crate) fn on_pong(&mut self, now: Instant, config: &Config) {
        if let Some(sent) = self.ping_sent_at.take() {
            let sample = now.saturating_duration_since(sent);
            tracing::trace!(?sample, "round trip measured");
            self.rtt = Some(self.rtt.map_or(sample, |rtt| rtt.min(sample)));
        }
        let talked = self.last_talked;
        self.on_keepalive(now, config);
        self.last_talked = talked;
        self.rearm(config);
    }

    /// Data arrived (`n` bytes). With credit, it may send a ping that measures the round
    /// trip: credit windows are sized with it (every rd peer answers; Go peers never
    /// negotiate credit).
    pub(crate) fn on_data(&mut self, now: Instant, n: usize, config: &Config) {
        if config.credit
            && n > 0
            && self.ping_sent_at.is_none()
            && self.next_rtt_probe.is_none_or(|at| now >= at)
        {
            self.ping_due = true;
            self.ping_sent_at = Some(now);
            self.next_rtt_probe = Some(now + RTT_PROBE_INTERVAL);
        }
    }

    /// Runs the due timers. `stalled`: the session does not read its websocket because its
    /// own readers are behind.
    pub(crate) fn on_timeout(&mut self, now: Instant, stalled: bool, config: &Config) -> Expired {
        let mut expired = Expired::default();
        if stalled {
            // The peer's pings and pongs wait unread behind our readers, which says nothing
            // about the peer. Restart the clocks (they run again once we read), and ping so
            // that the peer, which cannot see our pongs meanwhile, does not take us for dead
            // (a client side pings on its own schedule anyway).
            self.last_keepalive = now;
            self.last_heard = now;
            if self.side == Side::Server {
                self.ping_due = true;
            }
            // Its pong waits unread behind our readers: no measure of the link.
            self.ping_sent_at = None;
            self.rearm(config);
        }
        if self.timers.is_expired(Timer::Keepalive, now) {
            expired.end = Some(SessionEnd::KeepaliveTimeout(config.keepalive_timeout));
            return expired;
        }
        if let Some(answer) = config.answer_timeout {
            if self.timers.is_expired(Timer::Answer, now) {
                expired.end = Some(SessionEnd::Unresponsive(answer));
                return expired;
            }
        }
        if let Some(at) = self.timers.get(Timer::Ping).filter(|at| now >= *at) {
            // A client pings on Go's schedule; a server at the first tick with nothing heard
            // in its window, and the grid moves on from there.
            let interval = match (self.side, config.server_ping_after) {
                (Side::Server, Some(after)) => after,
                _ => config.ping_interval,
            };
            self.ping_due = true;
            if !stalled {
                self.ping_sent_at.get_or_insert(now);
            }
            self.tick_from = at;
            self.tick = Some(next_after(at, interval, now));
            self.rearm(config);
        }
        if let (Some(at), Some(interval)) = (self.timers.get(Timer::Sync), config.sync_interval) {
            if now >= at {
                expired.sync = true;
                self.timers
                    .set(Timer::Sync, Some(next_after(at, interval, now)));
            }
        }
        expired
    }

    /// When [`on_timeout`](Self::on_timeout) is next due. While stalled by our readers the
    /// session ticks every ping interval (see `on_timeout`).
    pub(crate) fn poll_timeout(&self, stalled: bool, config: &Config) -> Option<Instant> {
        let stall_tick = stalled
            .then(|| self.last_keepalive + config.ping_interval.min(config.keepalive_timeout));
        [self.timers.next_timeout(), stall_tick]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sets the deadlines that follow from the state.
    fn rearm(&mut self, config: &Config) {
        self.timers.set(
            Timer::Keepalive,
            Some(self.last_keepalive + config.keepalive_timeout),
        );
        self.timers.set(
            Timer::Answer,
            config
                .answer_timeout
                .filter(|_| self.peer_pings)
                .map(|timeout| self.last_heard + timeout),
        );
        let ping = match (self.side, config.server_ping_after) {
            (Side::Server, Some(after)) => self.server_ping_at(after),
            _ => self.tick,
        };
        self.timers.set(Timer::Ping, ping);
    }

    /// A server side's next ping: the first tick on the grid whose window (since the tick
    /// before) holds nothing from the peer but pongs. It moves later with every message, so
    /// a runtime that re-arms its timer on every change (an in-place update in tokio) is
    /// not woken every tick of a peer that talks; the result is the same as checking each
    /// tick.
    fn server_ping_at(&self, after: Duration) -> Option<Instant> {
        let tick = self.tick?;
        match self.last_talked {
            Some(t) if t > self.tick_from => {
                // Ticks after `tick` are `tick + j * after`, each window starting one period
                // before: the first window that starts at or after `t`.
                let late = t.saturating_duration_since(tick).as_nanos();
                let periods = late.div_ceil(after.as_nanos().max(1));
                let periods = u32::try_from(periods).unwrap_or(u32::MAX - 1);
                tick.checked_add(after.saturating_mul(periods.saturating_add(1)))
            }
            _ => Some(tick),
        }
    }
}

fn next_after(at: Instant, interval: Duration, now: Instant) -> Instant {
    let next = at + interval;
    if next > now {
        next
    } else {
        now + interval
    }
}
