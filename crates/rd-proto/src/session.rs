//! The sans-IO session: messages and application calls in, messages and events out.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::budget::ReceiveBudget;
use crate::codec::{decode, DecodeError};
use crate::config::Config;
use crate::flow::{FlowSignal, Pressure};
use crate::message::{ClientSession, ConnId, Message, EOF_TEXT};
use crate::pool::SendPool;
use crate::stream::{Lifecycle, Origin, Stream, StreamEnd, StreamInfo};
use crate::streams::Streams;
use crate::target::Target;

/// Which end of the websocket this session is.
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

/// Something the websocket must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// One binary websocket message holding one encoded remotedialer message.
    Message(Bytes),
    /// A websocket ping with an empty payload.
    Ping,
}

/// A peer broke the protocol, so the session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A message that cannot be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A text websocket frame (Go: `wrong websocket message type`).
    #[error("wrong websocket message type: text frame")]
    TextFrame,
    /// A websocket message above the configured limit.
    #[error("websocket message of {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionEnd {
    /// This side closed it.
    #[error("closed locally")]
    Local,
    /// The peer closed the websocket.
    #[error("peer closed the connection")]
    PeerClosed,
    /// No ping or pong within the keepalive timeout.
    #[error("no ping or pong for {0:?}")]
    KeepaliveTimeout(Duration),
    /// A peer that takes part in keepalive (it pinged us or answered our ping) sent
    /// nothing at all within [`Config::answer_timeout`]: the link is dead.
    #[error("peer silent for {0:?}")]
    Unresponsive(Duration),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(String),
}

impl SessionEnd {
    /// A short stable name for metrics labels: `local`, `peer_closed`, `keepalive_timeout`,
    /// `unresponsive`, `protocol` or `transport`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::PeerClosed => "peer_closed",
            Self::KeepaliveTimeout(_) => "keepalive_timeout",
            Self::Unresponsive(_) => "unresponsive",
            Self::Protocol(_) => "protocol",
            Self::Transport(_) => "transport",
        }
    }
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer sent Connect; answer with [`Session::reset`] to refuse, or start using the
    /// stream. Data that arrives meanwhile is buffered.
    StreamRequested {
        /// The new stream.
        id: ConnId,
        /// Where the peer wants it dialed.
        target: Target,
    },
    /// A reader that was told [`StreamError::Blocked`] can read now.
    StreamReadable {
        /// The stream.
        id: ConnId,
    },
    /// The peer dialed the target of a stream we opened (connect-ack extension): the dial
    /// succeeded. A failed dial ends the stream instead ([`Event::StreamClosed`]).
    StreamAcknowledged {
        /// The stream.
        id: ConnId,
    },
    /// A writer that was told [`StreamError::Blocked`] can write (or flush) now.
    StreamWritable {
        /// The stream.
        id: ConnId,
    },
    /// The stream left the wire; readers drain what is buffered, then see `end`.
    StreamClosed {
        /// The stream.
        id: ConnId,
        /// Why.
        end: StreamEnd,
    },
    /// A peer server announced a client session.
    ClientAdded(ClientSession),
    /// A peer server withdrew a client session.
    ClientRemoved(ClientSession),
    /// A configured limit refused something the peer sent (the stream or Connect concerned
    /// has been answered with an Error already); for metrics.
    LimitExceeded(Limit),
    /// The session reads the websocket again after [`Limit::SessionStall`]: its readers
    /// caught up.
    ReadingResumed,
    /// The peer is going away (a draining server, with the replicas extension): open no new
    /// streams here and make a replacement session elsewhere; the streams in flight go on.
    /// At most once per session.
    PeerGoingAway {
        /// The peer's reason, for logs.
        reason: String,
    },
    /// The peer server counts this many replicas, itself included (replicas extension): an
    /// agent holds a session with each. Sent when the session starts to differ from the
    /// upgrade's count, and on every change.
    ReplicasAnnounced(u32),
    /// The session ended; this is the last event.
    SessionClosed(SessionEnd),
}

/// A [`Config`] limit that the peer hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`Config::stream_receive_cap`]: a stream was reset, the peer ignored Pause.
    StreamReceiveCap,
    /// [`Config::session_receive_cap`]: a stream was reset for the session's sake.
    SessionReceiveCap,
    /// [`Config::max_streams`]: a Connect was refused.
    MaxStreams,
    /// [`Config::session_receive_ceiling`]: the session stopped reading the websocket until
    /// readers catch up (the last resort; every stream of the session waits).
    SessionStall,
    /// A websocket message above the runtime's size limit ended the session.
    MaxMessageSize,
    /// Too many incoming Connects were still dialing; one was refused.
    MaxPendingConnects,
}

impl Limit {
    /// A stable name for metrics labels (the `Config` field).
    pub fn name(self) -> &'static str {
        match self {
            Self::StreamReceiveCap => "stream_receive_cap",
            Self::SessionReceiveCap => "session_receive_cap",
            Self::MaxStreams => "max_streams",
            Self::SessionStall => "session_receive_ceiling",
            Self::MaxMessageSize => "max_message_size",
            Self::MaxPendingConnects => "max_pending_connects",
        }
    }
}

/// Why a stream call could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Nothing to read, or no room to write, yet: wait for the stream's next event.
    #[error("would block")]
    Blocked,
    /// No such stream (never opened, or released).
    #[error("unknown stream {0}")]
    Unknown(ConnId),
    /// The application already finished writing.
    #[error("stream already finished")]
    Finished,
    /// The stream ended.
    #[error("{0}")]
    Closed(StreamEnd),
}

/// [`Session::open_stream`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The session has ended.
    #[error("session closed: {0}")]
    SessionClosed(SessionEnd),
    /// [`Config::max_streams`] streams are live.
    #[error("too many streams: limit {0}")]
    TooManyStreams(usize),
    /// The peer said it is going away ([`Event::PeerGoingAway`]): new streams belong on
    /// another session.
    #[error("the peer is going away: {0}")]
    PeerGoingAway(String),
}

/// What a read produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes; empty only when the read asked for at most 0 bytes.
    Data(Bytes),
    /// A clean end of stream.
    Eof,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams in the table.
    pub streams: usize,
    /// Streams on which flow control holds the peer back: we sent Pause, or (credit) the
    /// peer has used all the credit we granted.
    pub paused_by_us: usize,
    /// Streams on which the peer's flow control holds us back: its Pause, or no credit left.
    pub paused_by_peer: usize,
    /// Received bytes not yet read, all streams.
    pub receive_buffered: usize,
    /// Received bytes not yet read plus credit granted and unused, all streams: what the
    /// peer may make this session hold (equals `receive_buffered` without credit).
    pub receive_committed: usize,
    /// Bytes queued to send, all streams.
    pub send_buffered: usize,
    /// The peer has pinged us or answered a ping of ours, so
    /// [`Config::answer_timeout`] applies to it.
    pub keepalive_seen: bool,
}

/// A remotedialer session without IO: feed it websocket messages, timer ticks and
/// application calls; drain [`poll_transmit`](Self::poll_transmit),
/// [`poll_timeout`](Self::poll_timeout) and [`poll_event`](Self::poll_event) after each.
#[derive(Debug)]
pub struct Session {
    side: Side,
    config: Config,
    identity: Identity,
    next_message_id: i64,
    /// Buffers of sent Data messages, reused for the next ones.
    send_pool: SendPool,
    streams: Streams,
    budget: ReceiveBudget,
    control: VecDeque<Bytes>,
    events: VecDeque<Event>,
    ping_due: bool,
    last_keepalive: Instant,
    /// When anything (a message, ping or pong) last arrived.
    last_heard: Instant,
    /// The peer pinged us or answered a ping: it keeps the link busy, so its silence means
    /// the link is dead ([`Config::answer_timeout`]).
    peer_pings: bool,
    /// When the peer last sent anything but a pong (`None`: nothing yet). A server side
    /// skips each ping tick whose window holds such a message.
    last_talked: Option<Instant>,
    /// A client side's next ping; a server side's next ping tick, the end of the window
    /// that starts at `tick_from`.
    next_ping: Option<Instant>,
    /// Where the window of the tick at `next_ping` starts (the previous tick, or the start).
    tick_from: Instant,
    next_sync: Option<Instant>,
    /// When our oldest unanswered ping was queued (`None`: none is out): its pong measures
    /// the round trip.
    ping_sent_at: Option<Instant>,
    /// The smallest round trip measured so far (queues on the path only add to it).
    rtt: Option<Duration>,
    /// When Data may next trigger a ping just to measure the round trip (credit mode).
    next_rtt_probe: Option<Instant>,
    /// The time of the latest input, for decisions on reads (which carry no clock).
    clock: Instant,
    /// The ceiling was reached and input stopped; reported once per episode.
    stalled: bool,
    /// We sent GoAway (replicas extension): at most once.
    going_away: bool,
    /// The peer's GoAway reason, once it sent one.
    peer_going_away: Option<String>,
    ended: Option<SessionEnd>,
}

impl Session {
    /// A new session started at `now`. `first_message_id` seeds the informational message
    /// counter (Go starts it at a random 63-bit value); `identity` names this session in
    /// `connection not found` replies.
    pub fn new(
        side: Side,
        config: Config,
        identity: Identity,
        now: Instant,
        first_message_id: i64,
    ) -> Self {
        let is_client = side == Side::Client;
        // With credit, measure the round trip right away, while the link is quiet: the
        // windows of the first streams need it (every rd peer answers pings).
        let rtt_probe = config.credit.then_some(now);
        Self {
            side,
            next_ping: if is_client {
                Some(now + config.ping_interval)
            } else {
                // Half a period out of phase with a client that started with us and pings
                // every `server_ping_after`: each tick's window then holds exactly one of its
                // pings even with a few seconds of jitter, so no tick finds it silent.
                config.server_ping_after.map(|d| now + d + d / 2)
            },
            next_sync: if is_client {
                config.sync_interval.map(|i| now + i)
            } else {
                None
            },
            config,
            identity,
            next_message_id: first_message_id,
            send_pool: SendPool::default(),
            streams: Streams::new(side),
            budget: ReceiveBudget::default(),
            control: VecDeque::new(),
            events: VecDeque::new(),
            ping_due: rtt_probe.is_some(),
            last_keepalive: now,
            last_heard: now,
            peer_pings: false,
            last_talked: None,
            tick_from: now,
            ping_sent_at: rtt_probe,
            rtt: None,
            next_rtt_probe: rtt_probe.map(|at| at + RTT_PROBE_INTERVAL),
            clock: now,
            stalled: false,
            going_away: false,
            peer_going_away: None,
            ended: None,
        }
    }

    /// The link's round trip: the smallest time a ping of ours took to be answered (`None`
    /// before the first answer).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// This session's side.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why the session ended, once it has.
    pub fn end(&self) -> Option<&SessionEnd> {
        self.ended.as_ref()
    }

    /// Whether the caller should read more websocket messages now. False while more than
    /// [`Config::max_queued_control`] replies wait to be sent (a peer that floods us and does
    /// not read cannot grow that queue without bound), and while the streams' unread bytes
    /// exceed [`Config::session_receive_ceiling`] (the last resort against a peer that floods
    /// many streams at once; honest peers are held back per stream long before). It turns
    /// true again as the caller drains [`poll_transmit`](Self::poll_transmit) and readers
    /// read.
    pub fn wants_input(&self) -> bool {
        self.control.len() < self.config.max_queued_control && !self.input_stalled_by_readers()
    }

    /// Whether a ping or a control message (Pause, Resume, Error, ...) waits to be sent. A
    /// caller reading a batch of messages should send these before reading on: a Pause
    /// that waits behind megabytes of further reads lets the peer send those megabytes too.
    pub fn has_control_queued(&self) -> bool {
        self.ping_due || !self.control.is_empty()
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has something to hand out: a ping, a
    /// control message, or a stream in the send queue (which may turn out to have nothing
    /// it may send yet). A runtime that drains `poll_transmit` whenever it is woken need
    /// only be woken by a call that turned this from false to true: while it is true, the
    /// runtime has not finished draining, and will come back by itself.
    pub fn has_output(&self) -> bool {
        (self.ended.is_none() || !self.control.is_empty())
            && (self.ping_due || !self.control.is_empty() || self.streams.has_ready())
    }

    /// Whether [`poll_event`](Self::poll_event) has something: an application call can
    /// queue events too (a reset ends the stream), which the runtime must hand out.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Whether the streams' unread bytes keep [`wants_input`](Self::wants_input) false: our
    /// own readers, not the peer, are why the websocket is not read. Never with credit: every
    /// unread byte was granted (a stream sent more is reset), so what the session holds is
    /// what it chose to grant, and stopping would only stall honest streams.
    fn input_stalled_by_readers(&self) -> bool {
        !self.config.credit && self.budget.unread() >= self.config.session_receive_ceiling
    }

    /// Counters for metrics.
    pub fn stats(&self) -> SessionStats {
        let mut stats = SessionStats {
            streams: self.streams.len(),
            receive_buffered: self.budget.unread(),
            receive_committed: self.budget.committed(),
            keepalive_seen: self.peer_pings,
            ..SessionStats::default()
        };
        for (_, s) in self.streams.iter() {
            stats.paused_by_us += usize::from(s.recv.holding_back());
            stats.paused_by_peer += usize::from(s.send.held_back());
            stats.send_buffered += s.send.queued();
        }
        stats
    }

    /// Received bytes of a stream not yet read.
    pub fn unread(&self, id: ConnId) -> Option<usize> {
        self.streams.get(id).map(|s| s.recv.held().unread)
    }

    /// Whether stream `id` is still on the wire: false once it has ended (both directions
    /// finished, an Error either way, SyncConnections, the session's end) and for unknown
    /// ids. A half-closed stream is open.
    pub fn is_stream_open(&self, id: ConnId) -> bool {
        self.streams.get(id).is_some_and(Stream::on_wire)
    }

    /// The target a stream was opened for.
    pub fn target(&self, id: ConnId) -> Option<&Target> {
        self.streams.get(id).map(|s| &s.target)
    }

    /// Every stream in the table (unordered), with its target and the bytes moved so far.
    pub fn stream_infos(&self) -> Vec<StreamInfo> {
        self.streams
            .iter()
            .map(|(id, s)| StreamInfo {
                id: *id,
                target: s.target.clone(),
                origin: s.origin,
                opened_at: s.opened_at,
                bytes_written: s.bytes_written,
                bytes_read: s.bytes_read,
            })
            .collect()
    }

    fn message_id(&mut self) -> i64 {
        let id = self.next_message_id;
        self.next_message_id = id.wrapping_add(1);
        id
    }

    fn queue_control(&mut self, msg: &Message) {
        if self.ended.is_some() {
            return;
        }
        let id = self.message_id();
        self.control.push_back(msg.to_bytes(id));
    }

    fn send_signal(&mut self, conn_id: ConnId, signal: Option<FlowSignal>) {
        let msg = match signal {
            None => return,
            Some(FlowSignal::Pause) => Message::Pause { conn_id },
            Some(FlowSignal::Resume) => Message::Resume { conn_id },
            Some(FlowSignal::Credit(increment)) => Message::Credit { conn_id, increment },
        };
        self.queue_control(&msg);
    }

    /// What the rest of the session holds, seen from stream `id`.
    fn pressure(&self, id: ConnId) -> Pressure {
        let own = self.streams.get(id).map_or(0, |s| s.recv.held().unread);
        Pressure {
            others_unread: self.budget.unread().saturating_sub(own),
            committed: self.budget.committed(),
            rtt: self.rtt,
            now: Some(self.clock),
        }
    }

    // ----- input: the websocket -----------------------------------------------------------

    /// Handles one binary websocket message. A session-level protocol error ends the
    /// session (and is returned); a malformed Connect only refuses that connection.
    pub fn handle_message(&mut self, now: Instant, raw: Bytes) -> Result<(), ProtocolError> {
        if self.ended.is_some() {
            return Ok(());
        }
        self.heard(now);
        let frame = match decode(raw) {
            Ok(frame) => frame,
            Err(err) => {
                if let Some(conn_id) = err.conn_id() {
                    tracing::debug!(%conn_id, error = %err, "refusing malformed connect");
                    self.queue_control(&Message::Error {
                        conn_id,
                        text: err.to_string(),
                    });
                    return Ok(());
                }
                let err = ProtocolError::Decode(err);
                self.close(SessionEnd::Protocol(err.clone()));
                return Err(err);
            }
        };
        tracing::trace!(target: "rd_proto::wire", message_id = frame.message_id, message = ?frame.message, "received");
        if let Message::Data { conn_id, payload } = &frame.message {
            // Application bytes (credentials, tokens) only on this separate target, which an
            // operator must turn on explicitly (RD_WIRE_PAYLOADS in the binaries).
            tracing::trace!(target: "rd_proto::payload", message_id = frame.message_id, %conn_id, ?payload, "received");
        }
        match frame.message {
            Message::Data { conn_id, payload } => self.on_data(now, conn_id, payload),
            Message::Connect { conn_id, target } => self.on_connect(now, conn_id, target),
            Message::Error { conn_id, text } => self.on_error(conn_id, text),
            Message::AddClient(c) => {
                if self.side == Side::Server {
                    self.events.push_back(Event::ClientAdded(c));
                }
            }
            Message::RemoveClient(c) => {
                if self.side == Side::Server {
                    self.events.push_back(Event::ClientRemoved(c));
                }
            }
            Message::Pause { conn_id } => self.on_pause(conn_id, true),
            Message::Resume { conn_id } => self.on_pause(conn_id, false),
            Message::Credit { conn_id, increment } => self.on_credit(conn_id, increment),
            Message::Fin { conn_id } => self.on_fin(conn_id),
            Message::ConnectAck { conn_id } => self.on_connect_ack(conn_id),
            Message::SyncConnections { ids } => self.on_sync(now, &ids),
            Message::GoAway { reason } => self.on_go_away(reason),
            Message::Replicas { count } => {
                // Only a server counts replicas for its agents; like Fin, ignored unless
                // negotiated.
                if self.config.replicas && self.side == Side::Client {
                    self.events.push_back(Event::ReplicasAnnounced(count));
                }
            }
            Message::Unknown { type_code, conn_id } => {
                tracing::debug!(type_code, %conn_id, "ignoring message of unknown type");
            }
        }
        Ok(())
    }

    /// A websocket ping (or a pong, if the caller cannot tell them apart) arrived: the peer
    /// is alive, and takes part in keepalive.
    pub fn handle_keepalive(&mut self, now: Instant) {
        self.last_keepalive = now;
        self.peer_pings = true;
        self.heard(now);
    }

    /// A websocket pong arrived: as [`handle_keepalive`](Self::handle_keepalive), except
    /// that an answer to our own ping does not count as the peer talking on its own, so a
    /// server side keeps pinging a peer that only answers every tick.
    pub fn handle_pong(&mut self, now: Instant) {
        if let Some(sent) = self.ping_sent_at.take() {
            let sample = now.saturating_duration_since(sent);
            tracing::trace!(?sample, "round trip measured");
            self.rtt = Some(self.rtt.map_or(sample, |rtt| rtt.min(sample)));
        }
        let talked = self.last_talked;
        self.handle_keepalive(now);
        self.last_talked = talked;
    }

    /// Something arrived from the peer. A server side skips its next ping then: a peer that
    /// talks, or pings on its own, needs none from us. (The ticks stay on a fixed grid
    /// rather than `server_ping_after` after the last message: that would race the client's
    /// own 5 s pings.)
    fn heard(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        self.last_heard = now;
        self.last_talked = Some(now);
    }

    /// A server side's next ping: the first tick on the grid whose window (since the tick
    /// before) holds nothing from the peer but pongs. It moves later with every message, so
    /// a runtime that re-arms its timer on every change (an in-place update in tokio) is
    /// not woken every tick of a peer that talks; the result is the same as checking each
    /// tick.
    fn server_ping_at(&self) -> Option<Instant> {
        let after = self.config.server_ping_after?;
        let tick = self.next_ping?;
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

    /// When the next ping goes out, on either side.
    fn ping_at(&self) -> Option<Instant> {
        match (self.side, self.config.server_ping_after) {
            (Side::Server, Some(_)) => self.server_ping_at(),
            _ => self.next_ping,
        }
    }

    /// When the peer is declared dead for silence, if it takes part in keepalive.
    fn answer_deadline(&self) -> Option<Instant> {
        let timeout = self.config.answer_timeout?;
        self.peer_pings.then(|| self.last_heard + timeout)
    }

    fn on_data(&mut self, now: Instant, conn_id: ConnId, payload: Bytes) {
        let n = payload.len();
        if self.config.credit
            && n > 0
            && self.ping_sent_at.is_none()
            && self.next_rtt_probe.is_none_or(|at| now >= at)
        {
            // Credit windows past the ungated size need the round trip: a ping measures it
            // (every rd peer answers; Go peers never negotiate credit).
            self.ping_due = true;
            self.ping_sent_at = Some(now);
            self.next_rtt_probe = Some(now + RTT_PROBE_INTERVAL);
        }
        let pressure = self.pressure(conn_id);
        let Some(s) = self.streams.get_mut(conn_id).filter(|s| s.on_wire()) else {
            let text = format!(
                "connection not found {}/{}/{}",
                self.identity.client_key, self.identity.session_key, conn_id
            );
            self.queue_control(&Message::Error { conn_id, text });
            return;
        };
        if s.peer_fin {
            // The peer said it writes no more: it broke the extension's contract (an ordered
            // websocket cannot bring Data from before its Fin after it).
            self.reset(conn_id, DATA_AFTER_FIN).ok();
            return;
        }
        if s.released {
            // Nobody will read it; the stream is only waiting for its EOF to go out.
            return;
        }
        if self.budget.unread().saturating_add(n) > self.config.session_receive_cap {
            let text = format!(
                "session receive buffer of {} bytes exceeded",
                self.config.session_receive_cap
            );
            self.reset(conn_id, &text).ok();
            self.events
                .push_back(Event::LimitExceeded(Limit::SessionReceiveCap));
            return;
        }
        let before = s.recv.held();
        match s.recv.on_data(payload, now, pressure, &self.config) {
            Err(overflow) => {
                let text = format!(
                    "receive buffer limit of {} bytes exceeded: the peer ignored flow control",
                    overflow.cap
                );
                self.reset(conn_id, &text).ok();
                self.events
                    .push_back(Event::LimitExceeded(Limit::StreamReceiveCap));
            }
            Ok((reader_was_waiting, signal)) => {
                self.budget.apply(before, s.recv.held());
                if reader_was_waiting {
                    self.events.push_back(Event::StreamReadable { id: conn_id });
                }
                self.send_signal(conn_id, signal);
                if self.input_stalled_by_readers() {
                    self.shed_pause_ignorers();
                }
                if self.input_stalled_by_readers() && !self.stalled {
                    self.stalled = true;
                    // The runtime warns about it with the session's identity (the event).
                    tracing::debug!(
                        unread = self.budget.unread(),
                        ceiling = self.config.session_receive_ceiling,
                        "session stops reading until its readers catch up: the peer sends on \
                         many streams beyond flow control"
                    );
                    self.events
                        .push_back(Event::LimitExceeded(Limit::SessionStall));
                }
            }
        }
    }

    /// At the ceiling: if the streams together received more after their Pause than a link
    /// holds in flight (half the stream cap), the peer ignores Pause somewhere. Reset the
    /// streams that received most after their Pause, worst first, until the session is below
    /// the ceiling or the rest is within that allowance. Only if honest streams alone fill
    /// the ceiling does the session stop reading.
    fn shed_pause_ignorers(&mut self) {
        let allowance = self.config.stream_receive_cap / 2;
        let mut ignorers: Vec<(usize, ConnId)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.accepts_data() && s.recv.since_pause() > 0)
            .map(|(id, s)| (s.recv.since_pause(), *id))
            .collect();
        let mut total: usize = ignorers.iter().map(|(n, _)| n).sum();
        ignorers.sort_unstable_by(|a, b| b.cmp(a));
        for (since_pause, id) in ignorers {
            if !self.input_stalled_by_readers() || total <= allowance {
                break;
            }
            total -= since_pause;
            tracing::debug!(conn_id = %id, since_pause, "resetting a stream whose peer ignores Pause");
            let text =
                format!("received {since_pause} bytes after Pause: the peer ignored flow control");
            self.reset(id, &text).ok();
            self.events
                .push_back(Event::LimitExceeded(Limit::StreamReceiveCap));
        }
    }

    fn on_connect(&mut self, now: Instant, conn_id: ConnId, target: Target) {
        if let Some(s) = self.streams.get(conn_id) {
            const IN_USE: &str = "connection id already in use";
            if s.on_wire() {
                // Go would silently replace the live connection; refusing keeps both ends sane.
                self.reset(conn_id, IN_USE).ok();
            } else {
                // Off the wire, but its handle may still read what it buffered: replacing the
                // entry would hand that handle the new stream and leak the buffered count.
                self.queue_control(&Message::Error {
                    conn_id,
                    text: IN_USE.into(),
                });
            }
            return;
        }
        if self.streams.len() >= self.config.max_streams {
            let text = format!("too many connections: limit {}", self.config.max_streams);
            self.queue_control(&Message::Error { conn_id, text });
            self.events
                .push_back(Event::LimitExceeded(Limit::MaxStreams));
            return;
        }
        self.insert_stream(conn_id, target.clone(), Origin::Remote, now);
        self.events.push_back(Event::StreamRequested {
            id: conn_id,
            target,
        });
    }

    fn insert_stream(&mut self, id: ConnId, target: Target, origin: Origin, now: Instant) {
        let stream = Stream::new(target, origin, now, &self.config);
        self.budget.apply(Default::default(), stream.recv.held());
        self.streams.insert(id, stream);
    }

    fn on_error(&mut self, conn_id: ConnId, text: String) {
        let Some(s) = self.streams.get(conn_id).filter(|s| s.on_wire()) else {
            return;
        };
        let end = if text == EOF_TEXT {
            StreamEnd::Finished
        } else {
            StreamEnd::PeerError(text.clone())
        };
        // Go's close path always writes an Error back; Go peers ignore it as an unknown id.
        if s.life != Lifecycle::EofSent {
            self.queue_control(&Message::Error { conn_id, text });
        }
        self.leave_wire(conn_id, end);
    }

    fn on_pause(&mut self, conn_id: ConnId, paused: bool) {
        let Some(s) = self.streams.get_mut(conn_id).filter(|s| s.on_wire()) else {
            return;
        };
        s.send.set_paused_by_peer(paused);
        self.streams.schedule(conn_id);
    }

    fn on_credit(&mut self, conn_id: ConnId, increment: u32) {
        if !self.config.credit {
            tracing::debug!(%conn_id, "ignoring credit: the extension was not negotiated");
            return;
        }
        let Some(s) = self.streams.get_mut(conn_id).filter(|s| s.on_wire()) else {
            return;
        };
        s.send.add_credit(increment);
        if s.send.take_writable(&self.config) {
            self.events.push_back(Event::StreamWritable { id: conn_id });
        }
        self.streams.schedule(conn_id);
    }

    /// The peer's Fin (half-close): it writes no more on `conn_id`. Our reader sees EOF once
    /// the buffer is drained; our writer goes on. With our own Fin already sent, both
    /// directions are done and the stream leaves the wire. Fin for an unknown or closed
    /// stream, a second Fin, and Fin on a session without the extension are ignored (the
    /// last as Go ignores types it does not know).
    fn on_go_away(&mut self, reason: String) {
        if !self.config.replicas || self.peer_going_away.is_some() {
            return;
        }
        self.peer_going_away = Some(reason.clone());
        self.events.push_back(Event::PeerGoingAway { reason });
    }

    /// The peer's ConnectAck (connect-ack extension): its dial of a stream we opened
    /// succeeded. Ignored without the extension (as Go ignores types it does not know), for
    /// streams the peer opened, for streams off the wire and when repeated.
    fn on_connect_ack(&mut self, conn_id: ConnId) {
        if !self.config.connect_ack {
            tracing::debug!(%conn_id, "ignoring connect ack: the extension was not negotiated");
            return;
        }
        let Some(s) = self
            .streams
            .get_mut(conn_id)
            .filter(|s| s.on_wire() && s.origin == Origin::Local && !s.acknowledged)
        else {
            return;
        };
        s.acknowledged = true;
        self.events
            .push_back(Event::StreamAcknowledged { id: conn_id });
    }

    fn on_fin(&mut self, conn_id: ConnId) {
        if !self.config.half_close {
            tracing::debug!(%conn_id, "ignoring fin: the extension was not negotiated");
            return;
        }
        let Some(s) = self.streams.get_mut(conn_id).filter(|s| s.accepts_data()) else {
            return;
        };
        s.peer_fin = true;
        // The peer sends no more Data, so the credit granted to it will never be used.
        let before = s.recv.held();
        s.recv.void_credit();
        let after = s.recv.held();
        let reader_was_waiting = s.recv.take_waiting();
        self.budget.apply(before, after);
        if s.fin_sent {
            // Both directions are done. (A released stream waiting to send Error `EOF` after
            // its Fin no longer needs to: the peer has finished writing too.)
            self.leave_wire(conn_id, StreamEnd::Finished);
            return;
        }
        if let Some(s) = self.streams.get(conn_id) {
            s.assert_invariants();
        }
        // A stream the application released waits for a Fin (rather than its Error `EOF`)
        // now that the peer is done too.
        self.streams.schedule(conn_id);
        if reader_was_waiting {
            self.events.push_back(Event::StreamReadable { id: conn_id });
        }
    }

    fn on_sync(&mut self, now: Instant, ids: &[i64]) {
        let listed: HashSet<i64> = ids.iter().copied().collect();
        let grace = self.config.sync_interval.unwrap_or(Duration::from_secs(60));
        let stale: Vec<ConnId> = self
            .streams
            .iter()
            .filter(|(id, s)| {
                s.on_wire()
                    && !listed.contains(&id.0)
                    // A Connect still in flight when the peer took its snapshot is not listed
                    // yet (rancher/rancher#54512); only streams older than a sync interval count.
                    && !(s.origin == Origin::Local && now.saturating_duration_since(s.opened_at) < grace)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            tracing::debug!(conn_id = %id, "closing stream the peer no longer lists");
            self.leave_wire(id, StreamEnd::Synced);
        }
    }

    /// Takes a stream off the wire with `end`, drops what it had queued to send (and any
    /// credit it granted) and tells the application. Sends nothing.
    fn leave_wire(&mut self, id: ConnId, end: StreamEnd) {
        let Some(s) = self.streams.get_mut(id) else {
            return;
        };
        s.life = Lifecycle::Gone;
        s.send.clear();
        s.end.get_or_insert(end.clone());
        s.recv.stop_waiting();
        let before = s.recv.held();
        // Unread bytes stay for the application's last reads; granted credit is void.
        let after = crate::recv::Held {
            unread: before.unread,
            committed: before.unread,
        };
        s.recv.void_credit();
        self.budget.apply(before, after);
        s.assert_invariants();
        if s.released {
            self.remove(id);
        }
        self.events.push_back(Event::StreamClosed { id, end });
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(s) = self.streams.remove(id) {
            self.budget.apply(s.recv.held(), Default::default());
        }
    }

    // ----- input: timers ------------------------------------------------------------------

    /// Runs due timers: keepalive deadline, ping and SyncConnections. Spurious calls are fine.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        self.clock = self.clock.max(now);
        if self.input_stalled_by_readers() {
            // We stopped reading the websocket because our own readers are behind: the
            // peer's pings and pongs wait unread, which says nothing about the peer. Restart
            // the clock (it runs again once we read), and ping so that the peer, which
            // cannot see our pongs meanwhile, does not take us for dead (a client side pings
            // on its own schedule anyway).
            self.last_keepalive = now;
            self.last_heard = now;
            if self.side == Side::Server {
                self.ping_due = true;
            }
            // Its pong waits unread behind our readers: no measure of the link.
            self.ping_sent_at = None;
        }
        if now.saturating_duration_since(self.last_keepalive) >= self.config.keepalive_timeout {
            self.close(SessionEnd::KeepaliveTimeout(self.config.keepalive_timeout));
            return;
        }
        if let (Some(at), Some(timeout)) = (self.answer_deadline(), self.config.answer_timeout) {
            if now >= at {
                self.close(SessionEnd::Unresponsive(timeout));
                return;
            }
        }
        if let Some(at) = self.ping_at().filter(|at| now >= *at) {
            // A client pings on Go's schedule; a server at the first tick with nothing heard
            // in its window, and the grid moves on from there.
            let interval = match (self.side, self.config.server_ping_after) {
                (Side::Server, Some(after)) => after,
                _ => self.config.ping_interval,
            };
            self.ping_due = true;
            if !self.input_stalled_by_readers() {
                self.ping_sent_at.get_or_insert(now);
            }
            self.tick_from = at;
            self.next_ping = Some(next_after(at, interval, now));
        }
        if let (Some(at), Some(interval)) = (self.next_sync, self.config.sync_interval) {
            if now >= at {
                let ids = self.live_ids();
                self.queue_control(&Message::SyncConnections { ids });
                self.next_sync = Some(next_after(at, interval, now));
            }
        }
    }

    /// The ids the peer should still know, ascending as signed integers.
    pub fn live_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .streams
            .iter()
            // A half-closed stream is live: one direction still carries Data.
            .filter(|(_, s)| {
                matches!(
                    s.life,
                    Lifecycle::Open | Lifecycle::Finishing | Lifecycle::FinSent
                )
            })
            .map(|(id, _)| id.0)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        // While stalled by our readers, tick every ping interval (see handle_timeout).
        let keepalive = if self.input_stalled_by_readers() {
            self.config.ping_interval.min(self.config.keepalive_timeout)
        } else {
            self.config.keepalive_timeout
        };
        [
            Some(self.last_keepalive + keepalive),
            self.answer_deadline(),
            self.ping_at(),
            self.next_sync,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- output ---------------------------------------------------------------------------

    /// Hands back the buffer of a message from [`poll_transmit`](Self::poll_transmit) once
    /// it has been written (the runtime got it back from the `Bytes` it was given, as the
    /// only owner): the next Data message is encoded into it instead of a fresh allocation.
    /// A few are kept; see [`trim_buffers`](Self::trim_buffers).
    pub fn recycle(&mut self, buf: BytesMut) {
        self.send_pool.give(buf);
    }

    /// Frees the recycled buffers unless a Data message was encoded since the last call;
    /// the runtime calls it every few seconds, so an idle session holds none.
    pub fn trim_buffers(&mut self) {
        self.send_pool.trim();
    }

    /// The next thing to send: pings, then control messages (Connect, Error, Pause, Resume,
    /// Credit, sync, announcements), then Data one message per stream in turn.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.ended.is_some() && self.control.is_empty() {
            return None;
        }
        if std::mem::take(&mut self.ping_due) {
            return Some(Transmit::Ping);
        }
        if let Some(msg) = self.control.pop_front() {
            return Some(Transmit::Message(msg));
        }
        while let Some(id) = self.streams.next_ready() {
            if let Some(msg) = self.next_data(id) {
                return Some(Transmit::Message(msg));
            }
        }
        None
    }

    fn next_data(&mut self, id: ConnId) -> Option<Bytes> {
        let s = self.streams.get_mut(id)?;
        if !s.has_output() {
            return None;
        }
        let msg = if let Some((msg, _)) = s.send.pop(
            id,
            s.released,
            &mut self.next_message_id,
            &mut self.send_pool,
        ) {
            if s.send.take_writable(&self.config) {
                self.events.push_back(Event::StreamWritable { id });
            }
            msg
        } else if s.sends_fin() {
            // Only the Fin is left: it goes after all of the stream's Data. With the peer's
            // Fin already in, both directions are done.
            let done = s.peer_fin;
            s.life = Lifecycle::FinSent;
            s.fin_sent = true;
            if !done {
                s.assert_invariants();
            }
            let message_id = self.message_id();
            let fin = Message::Fin { conn_id: id }.to_bytes(message_id);
            if done {
                self.leave_wire(id, StreamEnd::Finished);
            }
            return Some(fin);
        } else {
            // Only the EOF is left: it goes after all of the stream's Data.
            s.life = Lifecycle::EofSent;
            if s.is_done() {
                self.remove(id);
            }
            let message_id = self.message_id();
            return Some(
                Message::Error {
                    conn_id: id,
                    text: EOF_TEXT.into(),
                }
                .to_bytes(message_id),
            );
        };
        self.streams.schedule(id);
        Some(msg)
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- input: the application -------------------------------------------------------

    /// Opens a stream to `target`: allocates an id and queues Connect. There is no
    /// acknowledgement in the protocol; a failed remote dial arrives later as the stream's end.
    pub fn open_stream(&mut self, now: Instant, target: Target) -> Result<ConnId, OpenError> {
        if let Some(end) = &self.ended {
            return Err(OpenError::SessionClosed(end.clone()));
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(OpenError::TooManyStreams(self.config.max_streams));
        }
        if let Some(reason) = &self.peer_going_away {
            return Err(OpenError::PeerGoingAway(reason.clone()));
        }
        let id = self.streams.allocate_id();
        self.queue_control(&Message::Connect {
            conn_id: id,
            target: target.clone(),
        });
        self.insert_stream(id, target, Origin::Local, now);
        Ok(id)
    }

    /// Tells the peer that the dial of stream `id`, which it opened, succeeded (connect-ack
    /// extension): queues ConnectAck, which goes out before any Data of the stream. Returns
    /// whether it was queued: not without the extension, for a stream we opened, a stream
    /// off the wire, or a second time. A failed dial is answered with
    /// [`reset`](Self::reset) and the dial's text, as with Go.
    pub fn acknowledge(&mut self, id: ConnId) -> bool {
        if !self.config.connect_ack {
            return false;
        }
        let Some(s) = self
            .streams
            .get_mut(id)
            .filter(|s| s.on_wire() && s.origin == Origin::Remote && !s.acknowledged)
        else {
            return false;
        };
        s.acknowledged = true;
        self.queue_control(&Message::ConnectAck { conn_id: id });
        true
    }

    /// Whether the peer acknowledged the dial of stream `id`, which we opened
    /// ([`Event::StreamAcknowledged`]; connect-ack extension only).
    pub fn is_acknowledged(&self, id: ConnId) -> bool {
        self.streams
            .get(id)
            .is_some_and(|s| s.origin == Origin::Local && s.acknowledged)
    }

    /// Queues `data` (or as much as fits in the stream's send buffer) and returns how many
    /// bytes were taken. [`StreamError::Blocked`] means the buffer is full.
    pub fn write(&mut self, id: ConnId, data: &[u8]) -> Result<usize, StreamError> {
        let s = self.streams.get_mut(id).ok_or(StreamError::Unknown(id))?;
        match (s.life, &s.end) {
            (Lifecycle::Open, _) => {}
            (_, Some(end)) => return Err(StreamError::Closed(end.clone())),
            (_, None) => return Err(StreamError::Finished),
        }
        let room = s.send.room(&self.config);
        if room == 0 {
            s.send.writer_waiting = true;
            return Err(StreamError::Blocked);
        }
        let taken = &data[..data.len().min(room)];
        s.bytes_written += taken.len() as u64;
        s.send.push(
            id,
            taken,
            self.config.max_data_payload,
            &mut self.next_message_id,
            &mut self.send_pool,
        );
        s.assert_invariants();
        self.streams.schedule(id);
        Ok(taken.len())
    }

    /// Whether everything written to the stream has been handed to the websocket.
    /// [`StreamError::Blocked`] means not yet; wait for [`Event::StreamWritable`].
    pub fn flush(&mut self, id: ConnId) -> Result<(), StreamError> {
        let s = self.streams.get_mut(id).ok_or(StreamError::Unknown(id))?;
        if s.send.queued() == 0 || s.life == Lifecycle::Gone {
            return Ok(());
        }
        s.send.writer_waiting = true;
        Err(StreamError::Blocked)
    }

    /// Takes up to `max` buffered bytes. After the buffer is drained: [`ReadOutcome::Eof`]
    /// for a clean end, [`StreamError::Closed`] for any other end, else
    /// [`StreamError::Blocked`].
    pub fn read(&mut self, id: ConnId, max: usize) -> Result<ReadOutcome, StreamError> {
        let pressure = self.pressure(id);
        let s = self.streams.get_mut(id).ok_or(StreamError::Unknown(id))?;
        let before = s.recv.held();
        let Some((chunk, signal)) = s.recv.read(max, pressure, &self.config) else {
            let outcome = match &s.end {
                Some(StreamEnd::Finished) => Ok(ReadOutcome::Eof),
                Some(end) => Err(StreamError::Closed(end.clone())),
                // Half-closed by the peer: its direction ended cleanly, ours may go on.
                None if s.peer_fin => Ok(ReadOutcome::Eof),
                None => return Err(StreamError::Blocked),
            };
            s.recv.stop_waiting();
            return outcome;
        };
        // No Pause, Resume or Credit for a direction the peer has finished.
        let receiving = s.accepts_data();
        s.bytes_read += chunk.len() as u64;
        self.budget.apply(before, s.recv.held());
        if receiving {
            self.send_signal(id, signal);
        }
        if self.stalled && !self.input_stalled_by_readers() {
            self.stalled = false;
            self.events.push_back(Event::ReadingResumed);
        }
        Ok(ReadOutcome::Data(chunk))
    }

    /// Ends the application's writing; the end goes out after the queued Data.
    ///
    /// With [`Config::half_close`] that end is Fin: the peer's reader sees EOF and its writer
    /// goes on, and the stream leaves the wire once both sides have sent Fin (or either sent
    /// an Error). Without it, as with Go, it is Error `EOF`, which closes both directions:
    /// reading goes on only until the peer's Error arrives.
    pub fn finish(&mut self, id: ConnId) -> Result<(), StreamError> {
        let s = self.streams.get_mut(id).ok_or(StreamError::Unknown(id))?;
        if s.life != Lifecycle::Open {
            return Ok(());
        }
        s.life = Lifecycle::Finishing;
        self.streams.schedule(id);
        Ok(())
    }

    /// Closes the stream now with `reason`, sent to the peer as its Error text; queued Data is
    /// dropped. Also how an incoming stream is refused.
    pub fn reset(&mut self, id: ConnId, reason: &str) -> Result<(), StreamError> {
        let s = self.streams.get_mut(id).ok_or(StreamError::Unknown(id))?;
        if s.life == Lifecycle::Gone {
            return Ok(());
        }
        // After our Error `EOF` the peer has forgotten the stream; after a Fin it has not.
        let already_sent_eof = s.life == Lifecycle::EofSent;
        let before = s.recv.held();
        s.recv.discard();
        self.budget.apply(before, s.recv.held());
        if !already_sent_eof {
            self.queue_control(&Message::Error {
                conn_id: id,
                text: reason.to_owned(),
            });
        }
        self.leave_wire(id, StreamEnd::Reset(reason.to_owned()));
        Ok(())
    }

    /// The application dropped its handle: finish the stream if it is still open and forget
    /// it once nothing is left to send.
    pub fn release(&mut self, id: ConnId) {
        let Some(s) = self.streams.get_mut(id) else {
            return;
        };
        s.released = true;
        let before = s.recv.held();
        s.recv.discard();
        self.budget.apply(before, s.recv.held());
        if s.life == Lifecycle::Open {
            self.finish(id).ok();
        } else if s.life == Lifecycle::FinSent {
            // Half-closed, and the peer still writes to a reader that is gone: close both
            // ways with Error `EOF` (see `Stream::sends_fin`).
            s.life = Lifecycle::Finishing;
            self.streams.schedule(id);
        } else if s.is_done() {
            self.remove(id);
        } else {
            // Already finished but held back by the peer's flow control, which no longer
            // applies to a released stream.
            self.streams.schedule(id);
        }
    }

    /// Queues an AddClient (`added`) or RemoveClient announcement, for peer links.
    pub fn announce(&mut self, client: ClientSession, added: bool) {
        let msg = if added {
            Message::AddClient(client)
        } else {
            Message::RemoveClient(client)
        };
        self.queue_control(&msg);
    }

    /// Tells the peer that this side is going away (replicas extension; nothing without it):
    /// it opens no new streams here and makes its replacement elsewhere, while streams in
    /// flight go on. Sent at most once; this side may still open streams (a draining server
    /// serves requests for an agent until it is reachable elsewhere). Returns whether the
    /// message was queued (false if not negotiated, already sent, or the session ended).
    pub fn go_away(&mut self, reason: &str) -> bool {
        if !self.config.replicas || self.going_away || self.ended.is_some() {
            return false;
        }
        self.going_away = true;
        // Received texts are cut to 100 bytes (as Error's); cut here on a char boundary.
        let mut end = reason.len().min(crate::message::MAX_ERROR_TEXT);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.queue_control(&Message::GoAway {
            reason: reason[..end].to_owned(),
        });
        true
    }

    /// Whether [`go_away`](Self::go_away) was sent.
    pub fn is_going_away(&self) -> bool {
        self.going_away
    }

    /// The peer's GoAway reason, if it sent one ([`Event::PeerGoingAway`]).
    pub fn peer_going_away(&self) -> Option<&str> {
        self.peer_going_away.as_deref()
    }

    /// Tells the agent on the other end how many replicas this server counts, itself
    /// included (replicas extension, server side only; nothing otherwise). A count of 0 is
    /// sent as 1.
    pub fn announce_replicas(&mut self, count: u32) {
        if self.config.replicas && self.side == Side::Server {
            self.queue_control(&Message::Replicas {
                count: count.max(1),
            });
        }
    }

    /// Ends the session: every stream ends with `tunnel disconnect`. When `end` is
    /// [`SessionEnd::Local`] an Error for each live stream is queued first, so a peer still
    /// listening can clean up at once.
    pub fn close(&mut self, end: SessionEnd) {
        if self.ended.is_some() {
            return;
        }
        for id in self.streams.ids() {
            let notify_peer = end == SessionEnd::Local
                && self.streams.get(id).is_some_and(|s| {
                    matches!(
                        s.life,
                        Lifecycle::Open | Lifecycle::Finishing | Lifecycle::FinSent
                    )
                });
            if notify_peer {
                self.queue_control(&Message::Error {
                    conn_id: id,
                    text: StreamEnd::Disconnected.to_string(),
                });
            }
            if self.streams.get(id).is_some_and(|s| s.on_wire()) {
                self.leave_wire(id, StreamEnd::Disconnected);
            }
        }
        self.streams.clear_ready();
        self.ping_due = false;
        self.ended = Some(end.clone());
        self.events.push_back(Event::SessionClosed(end));
    }

    /// Panics if the session's totals disagree with its streams; for tests and fuzzing.
    pub fn assert_invariants(&self) {
        let mut unread = 0usize;
        let mut committed = 0usize;
        for (_, s) in self.streams.iter() {
            let held = s.recv.held();
            unread += held.unread;
            committed += held.committed;
            assert!(held.unread <= self.config.stream_receive_cap);
        }
        assert_eq!(unread, self.budget.unread(), "session unread total");
        assert_eq!(
            committed,
            self.budget.committed(),
            "session committed total"
        );
    }
}

/// Error text for Data that arrives after the peer's Fin.
const DATA_AFTER_FIN: &str = "data after fin";

/// How often Data may trigger a ping that only measures the round trip (credit mode): the
/// smallest sample is kept, so later ones only help when the first crossed a busy queue.
/// yamux measures as often.
const RTT_PROBE_INTERVAL: Duration = Duration::from_secs(10);

fn next_after(at: Instant, interval: Duration, now: Instant) -> Instant {
    let next = at + interval;
    if next > now {
        next
    } else {
        now + interval
    }
}
