//! Who a session is ([`Side`], [`Identity`]) and every interval, watermark and cap it keeps
//! ([`Config`]), with Go's values as defaults.

use std::time::Duration;

use crate::error::ConfigError;
use crate::message::CREDIT_INITIAL_WINDOW;

/// Which end of the websocket a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Dialed the websocket: pings, sends SyncConnections, allocates ids from 1.
    Client,
    /// Accepted the websocket: answers pings, allocates ids from 2 (as Go's server).
    Server,
}

/// Who is on the other end, for `connection not found <clientKey>/<sessionKey>/<id>` texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The client key (Go's client side says `client`).
    pub client_key: String,
    /// The session key (Go's client side says `0`).
    pub session_key: i64,
}

impl Identity {
    /// What a Go client session calls itself.
    pub fn client() -> Self {
        Self {
            client_key: "client".into(),
            session_key: 0,
        }
    }
}

/// Session tuning. `Default` gives the Go implementation's behaviour (docs/protocol.md,
/// "Transport" and "Connections")
/// plus the hard caps Go lacks, and faster dead-link detection
/// ([`server_ping_after`](Self::server_ping_after), [`answer_timeout`](Self::answer_timeout)),
/// which uses only websocket pings and pongs, which every websocket peer answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How often a client-side session sends a websocket ping. Go: 5 s.
    pub ping_interval: Duration,
    /// A session that has seen no ping or pong for this long is dead. Go: 60 s.
    /// Data does not count, as in Go.
    pub keepalive_timeout: Duration,
    /// A server-side session pings the peer once it has heard nothing from it (no frame of
    /// any kind) for this long; `None` never pings, as Go's server. rd: 5 s. A client that
    /// pings on its own every 5 s (Go's and rd's do) keeps these pings from going out at all,
    /// so they cost nothing in the common case and find a silent link in the rare one.
    pub server_ping_after: Option<Duration>,
    /// Once the peer has shown that it takes part in keepalive (it sent a ping, or answered
    /// one of ours with a pong), a session that hears nothing at all from it for this long
    /// is dead ([`SessionEnd::Unresponsive`](crate::SessionEnd::Unresponsive)). Until then
    /// only [`keepalive_timeout`](Self::keepalive_timeout) applies, so a peer that never
    /// pings or pongs is not dropped early. `None`: only `keepalive_timeout`. rd: 15 s.
    pub answer_timeout: Option<Duration>,
    /// How often a client-side session sends SyncConnections; `None` never sends it.
    /// Go: 60 s, first one after one interval.
    pub sync_interval: Option<Duration>,
    /// The largest pause mark: a stream whose reader keeps up (or any stream while the session
    /// has memory to spare) is paused when its unread bytes exceed this. Go: 2 MiB
    /// (`MaxBuffer`). Used with peers that only speak Pause/Resume.
    pub high_watermark: usize,
    /// Send Resume when a paused stream's unread bytes fall below this, or below an eighth of
    /// the mark it was paused at if that is smaller. Go: 256 KiB.
    pub low_watermark: usize,
    /// The smallest pause mark: under memory pressure a stream whose reader does not keep up
    /// is paused once it holds this much.
    pub pause_floor: usize,
    /// How much reading a stream's unread bytes may cover when the session is under pressure:
    /// a stream whose reader consumed `r` bytes per `receive_horizon` keeps a pause mark of
    /// about `r` (between [`pause_floor`](Self::pause_floor) and
    /// [`high_watermark`](Self::high_watermark)).
    pub receive_horizon: Duration,
    /// A stream whose unread bytes exceed this is reset: the peer ignored Pause (or sent
    /// beyond its credit). Go has no cap. What arrives after our Pause is whatever was in
    /// flight: the sender's queue and both kernels' socket buffers (a Go sender on loopback
    /// overshot by 2.7 MB; Linux autotuning can hold more), so this sits far above the high
    /// watermark.
    pub stream_receive_cap: usize,
    /// The session's receive budget: unread bytes (with Pause/Resume peers) or bytes granted
    /// and unread (with credit) that the session aims to stay within. Pause marks shrink as
    /// the session approaches it; the websocket keeps being read. rd: 64 MiB.
    ///
    /// With credit it is a hard bound on what is granted beyond each stream's initial
    /// window, and what decides the longest link a session fills. A stream's window aims at
    /// twice the bytes its link holds (its measured rate times the round trip), and a grant
    /// tops a large window up whenever an eighth of it has been read, so the sender always
    /// has at least 7/8 of the window to send. A budget `B` therefore moves any link whose
    /// bandwidth-delay product is at most `B / 2` with room to spare, and up to `7B / 8` at
    /// full speed still; beyond that a session moves about `B` per round trip. The default
    /// 64 MiB serves 33.5 MB in flight with room (100 MB/s over 335 ms, 1 Gbit/s over 268 ms)
    /// and 58.7 MB at the edge. Streams that carry data at once share it: each window is at
    /// most the budget over the streams whose windows grew, and one is also held to
    /// [`credit_max_window`](Self::credit_max_window). It costs memory only when readers stop
    /// reading: a stalled stream holds its window.
    pub session_receive_budget: usize,
    /// Unread bytes over all streams above which the session stops reading the websocket
    /// ([`Session::wants_input`](crate::Session::wants_input)) until readers catch up: the
    /// last resort against a peer that floods many streams at once. Counted as
    /// [`Limit::SessionStall`](crate::Limit::SessionStall).
    pub session_receive_ceiling: usize,
    /// Unread bytes over all streams beyond which Data is refused by resetting the stream it
    /// was for. Only a caller that ignores `wants_input` can get here.
    pub session_receive_cap: usize,
    /// Use rd's credit extension instead of Pause/Resume (both ends must have negotiated it
    /// at the upgrade; see docs/protocol.md). Off by default: Go peers never speak it.
    pub credit: bool,
    /// Use rd's half-close extension (both ends must have negotiated it at the upgrade; see
    /// docs/protocol.md): [`Session::finish`](crate::Session::finish) sends Fin, which ends
    /// only this side's writing, instead of Error `EOF`, which closes both directions. Off by
    /// default: Go peers never speak it.
    pub half_close: bool,
    /// Use rd's replicas extension (both ends must have negotiated it at the upgrade; see
    /// docs/protocol.md): a server may tell its agent how many replicas it counts
    /// ([`Session::announce_replicas`](crate::Session::announce_replicas)) and either side
    /// that it is going away ([`Session::go_away`](crate::Session::go_away)). Off by
    /// default: Go peers never speak it.
    pub replicas: bool,
    /// Use rd's connect-ack extension (both ends must have negotiated it at the upgrade; see
    /// docs/protocol.md): the side that receives a Connect answers ConnectAck once its dial
    /// succeeded ([`Session::acknowledge`](crate::Session::acknowledge)), so the dialing side
    /// knows the outcome at once instead of waiting for data or an Error. Off by default:
    /// Go peers never speak it.
    pub connect_ack: bool,
    /// rd's udp extension is in force (both ends must have negotiated it at the upgrade; see
    /// docs/protocol.md): a stream may be opened to a `udp` target, and carries datagrams,
    /// each a 2-byte big-endian length and its payload, in its ordinary bytes. The protocol
    /// itself does not change: this flag only tells the runtime that the peer frames
    /// datagrams so (a Go peer would dial `udp` and write the stream's bytes as they come,
    /// boundaries lost). Off by default: Go peers never speak it.
    pub udp: bool,
    /// The largest credit window a stream's receiver auto-tunes to; at most
    /// [`stream_receive_cap`](Self::stream_receive_cap). rd: 32 MiB, which one stream fills
    /// a link with up to 29 MB in flight with (7/8 of it: 100 MB/s over 290 ms).
    pub credit_max_window: usize,
    /// Bytes a stream's writer may queue before its writes wait for the websocket.
    pub stream_send_buffer: usize,
    /// Largest Data payload this side sends in one message, so streams interleave fairly.
    /// rd: 64 KiB (Go reads messages of any size: it sets no read limit). With credit, a
    /// stream queues a message larger than 32 KiB only when its credit covers it.
    pub max_data_payload: usize,
    /// Live streams per session; a Connect beyond it is answered with an Error.
    pub max_streams: usize,
    /// Control messages (Error replies, echoes, Pause, Resume) queued but not yet sent above
    /// which [`Session::wants_input`](crate::Session::wants_input) turns false: a peer that
    /// floods us without reading our replies is not read either, instead of growing the queue.
    pub max_queued_control: usize,
    /// Incoming Connects whose local dial has not finished yet; one more is answered with an
    /// Error (`too many connects in flight`). Used by the runtime, which does the dialing.
    pub max_pending_connects: usize,
    /// Streams this side opened whose peer has not answered them in any way yet (no Data,
    /// Error, Fin, Pause, Resume or Credit): dials pending through the session. One more
    /// [`open_stream`](crate::Session::open_stream) is refused with
    /// [`OpenError::TooManyPendingDials`](crate::OpenError::TooManyPendingDials), so a
    /// peer that stopped answering cannot pile up dials without bound. Go has no limit.
    pub max_pending_dials: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(60),
            server_ping_after: Some(Duration::from_secs(5)),
            answer_timeout: Some(Duration::from_secs(15)),
            sync_interval: Some(Duration::from_secs(60)),
            high_watermark: 2 * 1024 * 1024,
            low_watermark: 256 * 1024,
            pause_floor: 32 * 1024,
            receive_horizon: Duration::from_millis(250),
            stream_receive_cap: 32 * 1024 * 1024,
            session_receive_budget: 64 * 1024 * 1024,
            session_receive_ceiling: 192 * 1024 * 1024,
            session_receive_cap: 256 * 1024 * 1024,
            credit: false,
            half_close: false,
            replicas: false,
            connect_ack: false,
            udp: false,
            credit_max_window: 32 * 1024 * 1024,
            stream_send_buffer: 256 * 1024,
            max_data_payload: 64 * 1024,
            max_streams: 65_536,
            max_queued_control: 4096,
            max_pending_connects: 16_384,
            max_pending_dials: 4096,
        }
    }
}

impl Config {
    /// Sets [`session_receive_budget`](Self::session_receive_budget), raising
    /// [`session_receive_ceiling`](Self::session_receive_ceiling) and
    /// [`session_receive_cap`](Self::session_receive_cap) when a larger budget needs them
    /// (to three times the budget, and that plus the budget, as the defaults are), so the
    /// result validates whatever the budget. A smaller budget leaves them as they are.
    #[must_use]
    pub fn with_session_receive_budget(mut self, budget: usize) -> Self {
        self.session_receive_budget = budget;
        self.session_receive_ceiling = self.session_receive_ceiling.max(budget.saturating_mul(3));
        self.session_receive_cap = self
            .session_receive_cap
            .max(self.session_receive_ceiling.saturating_add(budget));
        self
    }

    /// Checks the relations between the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.low_watermark >= self.high_watermark {
            return Err(ConfigError("low_watermark must be below high_watermark"));
        }
        if self.stream_receive_cap < self.high_watermark {
            return Err(ConfigError(
                "stream_receive_cap must be at least high_watermark",
            ));
        }
        if self.pause_floor == 0 || self.pause_floor > self.high_watermark {
            return Err(ConfigError(
                "pause_floor must be positive and at most high_watermark",
            ));
        }
        if self.session_receive_budget > self.session_receive_ceiling
            || self.session_receive_ceiling > self.session_receive_cap
        {
            return Err(ConfigError(
                "need session_receive_budget <= session_receive_ceiling <= session_receive_cap",
            ));
        }
        // A credit peer may fill the whole window before our reader reads: the cap that
        // resets a stream for ignoring flow control must not be below it.
        if self.credit
            && (self.credit_max_window < CREDIT_INITIAL_WINDOW as usize
                || self.credit_max_window > self.stream_receive_cap)
        {
            return Err(ConfigError(
                "credit_max_window must be between the initial credit window and stream_receive_cap",
            ));
        }
        if self.session_receive_cap < self.stream_receive_cap {
            return Err(ConfigError(
                "session_receive_cap must be at least stream_receive_cap",
            ));
        }
        if self.max_pending_dials == 0 {
            return Err(ConfigError("max_pending_dials must be positive"));
        }
        if self.max_data_payload == 0 || self.stream_send_buffer == 0 {
            return Err(ConfigError(
                "max_data_payload and stream_send_buffer must be positive",
            ));
        }
        if self.ping_interval.is_zero() || self.keepalive_timeout.is_zero() {
            return Err(ConfigError(
                "ping_interval and keepalive_timeout must be positive",
            ));
        }
        if self.server_ping_after.is_some_and(|d| d.is_zero())
            || self.answer_timeout.is_some_and(|d| d.is_zero())
        {
            return Err(ConfigError(
                "server_ping_after and answer_timeout must be positive when set",
            ));
        }
        if let Some(answer) = self.answer_timeout {
            // The peer must get a chance to answer at least one ping before we give up.
            let ping = self.server_ping_after.unwrap_or(self.ping_interval);
            if answer <= ping.max(self.ping_interval) {
                return Err(ConfigError(
                    "answer_timeout must exceed the ping interval (and server_ping_after)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_of_any_size_validates() {
        for budget in [0, 8 << 20, 64 << 20, 512 << 20, 4 << 30] {
            let c = Config::default().with_session_receive_budget(budget);
            assert_eq!(c.session_receive_budget, budget);
            assert!(c.validate().is_ok(), "budget {budget}");
        }
        let small = Config::default().with_session_receive_budget(8 << 20);
        assert_eq!(
            small.session_receive_ceiling,
            Config::default().session_receive_ceiling,
            "a smaller budget keeps the ceiling"
        );
    }

    #[test]
    fn defaults_are_gos_and_valid() {
        let c = Config::default();
        assert_eq!(c.high_watermark, 1 << 21);
        assert_eq!(c.low_watermark, (1 << 21) / 8);
        assert_eq!(c.ping_interval, Duration::from_secs(5));
        assert_eq!(c.keepalive_timeout, Duration::from_secs(60));
        assert_eq!(c.validate(), Ok(()));
        let bad = Config {
            low_watermark: c.high_watermark,
            ..c
        };
        assert!(bad.validate().is_err());
    }
}
