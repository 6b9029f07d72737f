//! The sans-IO session: websocket messages, timer ticks and application calls in, messages
//! and events out. This file is the dispatch and the `poll_*` surface; the streams
//! ([`Streams`]), keepalive and the round trip ([`Keepalive`]) and what waits to go out
//! ([`Outbox`]) each live in a module of their own.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::decode;
use crate::config::{Config, Identity, Side};
use crate::error::{DecodeError, OpenError, ProtocolError, SessionEnd, StreamError};
use crate::event::Event;
use crate::ids::{ClientSession, ConnId};
use crate::keepalive::Keepalive;
use crate::message::{Message, MAX_ERROR_TEXT};
use crate::outbox::{Outbox, Transmit};
use crate::streams::{Link, ReadOutcome, StreamInfo, Streams};
use crate::target::Target;

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
    out: Outbox,
    streams: Streams,
    keepalive: Keepalive,
    /// The time of the latest input, for decisions on reads (which carry no clock).
    clock: Instant,
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
        Self {
            side,
            keepalive: Keepalive::new(side, &config, now),
            streams: Streams::new(side),
            out: Outbox::new(first_message_id),
            config,
            identity,
            clock: now,
            going_away: false,
            peer_going_away: None,
            ended: None,
        }
    }

    // ----- getters --------------------------------------------------------------------------

    /// The link's round trip: the smallest time a ping of ours took to be answered (`None`
    /// before the first answer).
    pub fn rtt(&self) -> Option<Duration> {
        self.keepalive.rtt()
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
        self.out.queued_control() < self.config.max_queued_control
            && !self.streams.input_stalled(&self.config)
    }

    /// Whether a ping or a control message (Pause, Resume, Error, ...) waits to be sent. A
    /// caller reading a batch of messages should send these before reading on: a Pause
    /// that waits behind megabytes of further reads lets the peer send those megabytes too.
    pub fn has_control_queued(&self) -> bool {
        self.keepalive.ping_due() || self.out.queued_control() > 0
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has something to hand out: a ping, a
    /// control message, or a stream in the send queue (which may turn out to have nothing
    /// it may send yet). A runtime that drains `poll_transmit` whenever it is woken need
    /// only be woken by a call that turned this from false to true: while it is true, the
    /// runtime has not finished draining, and will come back by itself.
    pub fn has_output(&self) -> bool {
        self.has_control_queued() || (self.ended.is_none() && self.streams.has_ready())
    }

    /// Whether [`poll_event`](Self::poll_event) has something: an application call can
    /// queue events too (a reset ends the stream), which the runtime must hand out.
    pub fn has_events(&self) -> bool {
        self.out.has_events()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> SessionStats {
        let t = self.streams.totals();
        SessionStats {
            streams: t.streams,
            paused_by_us: t.holding_back,
            paused_by_peer: t.held_back,
            receive_buffered: t.unread,
            receive_committed: t.committed,
            send_buffered: t.queued,
            keepalive_seen: self.keepalive.peer_pings(),
        }
    }

    /// Received bytes of a stream not yet read.
    pub fn unread(&self, id: ConnId) -> Option<usize> {
        self.streams.unread(id)
    }

    /// Whether stream `id` is still on the wire: false once it has ended (both directions
    /// finished, an Error either way, SyncConnections, the session's end) and for unknown
    /// ids. A half-closed stream is open.
    pub fn is_stream_open(&self, id: ConnId) -> bool {
        self.streams.is_open(id)
    }

    /// The target a stream was opened for.
    pub fn target(&self, id: ConnId) -> Option<&Target> {
        self.streams.target(id)
    }

    /// Every stream in the table (unordered), with its target, the bytes moved so far, when
    /// it last heard from the peer or moved bytes, and its flow control state.
    pub fn stream_infos(&self) -> Vec<StreamInfo> {
        self.streams.infos()
    }

    /// Labels stream `id` with what it is for (an origin such as `connect`), for
    /// [`stream_infos`](Self::stream_infos); unknown ids are ignored.
    pub fn set_stream_label(&mut self, id: ConnId, label: &'static str) {
        self.streams.set_label(id, label, &self.config);
    }

    /// Streams we opened that the peer has not answered in any way yet (no Data, Error,
    /// Fin, Pause, Resume or Credit): their dials are pending.
    pub fn pending_dials(&self) -> usize {
        self.streams.pending_dials()
    }

    /// When anything (a message, ping or pong) last arrived from the peer.
    pub fn last_heard(&self) -> Instant {
        self.keepalive.last_heard()
    }

    /// The ids the peer should still know, ascending as signed integers.
    pub fn live_ids(&self) -> Vec<i64> {
        self.streams.live_ids()
    }

    /// What stream flow control needs to know of the link now.
    fn link(&self) -> Link {
        Link {
            rtt: self.keepalive.rtt(),
            now: self.clock,
        }
    }

    // ----- input: the websocket -------------------------------------------------------------

    /// Handles one binary websocket message. A session-level protocol error ends the
    /// session (and is returned); a malformed Connect only refuses that connection.
    pub fn handle_message(&mut self, now: Instant, raw: Bytes) -> Result<(), ProtocolError> {
        if self.ended.is_some() {
            return Ok(());
        }
        self.clock = self.clock.max(now);
        self.keepalive.on_frame(now, &self.config);
        let frame = match decode(raw) {
            Ok(frame) => frame,
            Err(err) => {
                if let Some(conn_id) = err.conn_id() {
                    tracing::debug!(%conn_id, error = %err, "refusing malformed connect");
                    self.out.send(&Message::Error {
                        conn_id,
                        text: err.to_string(),
                    });
                    return Ok(());
                }
                if !self.negotiated(&err) {
                    // A type of an extension this session did not negotiate is unknown to
                    // it, whatever its payload: ignored, as Go ignores unknown types.
                    tracing::debug!(error = %err, "ignoring malformed message of an extension not negotiated");
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
        self.streams
            .heard(frame.message.conn_id(), now, &self.config);
        let config = &self.config;
        let out = &mut self.out;
        match frame.message {
            Message::Data { conn_id, payload } => {
                self.keepalive.on_data(now, payload.len(), config);
                let link = Link {
                    rtt: self.keepalive.rtt(),
                    now: self.clock,
                };
                if self
                    .streams
                    .on_data(now, conn_id, payload, link, config, out)
                    .is_err()
                {
                    let text = format!(
                        "connection not found {}/{}/{}",
                        self.identity.client_key, self.identity.session_key, conn_id
                    );
                    out.send(&Message::Error { conn_id, text });
                }
            }
            Message::Connect { conn_id, target } => {
                self.streams.on_connect(now, conn_id, target, config, out);
            }
            Message::Error { conn_id, text } => self.streams.on_error(conn_id, text, config, out),
            Message::Pause { conn_id } => self.streams.on_pause(conn_id, true, config),
            Message::Resume { conn_id } => self.streams.on_pause(conn_id, false, config),
            // The extensions' messages count only once negotiated; otherwise they are
            // ignored, as Go ignores types it does not know.
            Message::Credit { conn_id, increment } if config.credit => {
                self.streams.on_credit(conn_id, increment, config, out);
            }
            Message::Fin { conn_id } if config.half_close => {
                self.streams.on_fin(conn_id, config, out);
            }
            Message::ConnectAck { conn_id } if config.connect_ack => {
                self.streams.on_connect_ack(conn_id, config, out);
            }
            Message::SyncConnections { ids } => self.streams.on_sync(now, &ids, config, out),
            Message::AddClient(c) if self.side == Side::Server => {
                out.event(Event::ClientAdded(c));
            }
            Message::RemoveClient(c) if self.side == Side::Server => {
                out.event(Event::ClientRemoved(c));
            }
            Message::GoAway { reason } if config.replicas => {
                if self.peer_going_away.is_none() {
                    self.peer_going_away = Some(reason.clone());
                    out.event(Event::PeerGoingAway { reason });
                }
            }
            // Only a server counts replicas for its agents.
            Message::Replicas { count } if config.replicas && self.side == Side::Client => {
                out.event(Event::ReplicasAnnounced(count));
            }
            other => {
                tracing::debug!(message = ?other, "ignoring a message this session does not take");
            }
        }
        Ok(())
    }

    /// Whether a decode error concerns a message this session speaks: false for the types of
    /// extensions it did not negotiate.
    fn negotiated(&self, err: &DecodeError) -> bool {
        match err {
            DecodeError::BadCredit { .. } => self.config.credit,
            DecodeError::BadReplicas { .. } => self.config.replicas,
            _ => true,
        }
    }

    /// A websocket ping (or a pong, if the caller cannot tell them apart) arrived: the peer
    /// is alive, and takes part in keepalive.
    pub fn handle_keepalive(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        self.keepalive.on_keepalive(now, &self.config);
    }

    /// A websocket pong arrived: as [`handle_keepalive`](Self::handle_keepalive), except
    /// that an answer to our own ping does not count as the peer talking on its own, so a
    /// server side keeps pinging a peer that only answers every tick. It also measures the
    /// round trip of our oldest unanswered ping.
    pub fn handle_pong(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        self.keepalive.on_pong(now, &self.config);
    }

    // ----- input: timers --------------------------------------------------------------------

    /// Runs due timers: keepalive deadline, ping and SyncConnections. Spurious calls are fine.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        self.clock = self.clock.max(now);
        let stalled = self.streams.input_stalled(&self.config);
        let expired = self.keepalive.on_timeout(now, stalled, &self.config);
        if let Some(end) = expired.end {
            self.close(end);
            return;
        }
        if expired.sync {
            let ids = self.streams.live_ids();
            self.out.send(&Message::SyncConnections { ids });
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let stalled = self.streams.input_stalled(&self.config);
        self.keepalive.poll_timeout(stalled, &self.config)
    }

    // ----- output ---------------------------------------------------------------------------

    /// Hands back the buffer of a message from [`poll_transmit`](Self::poll_transmit) once
    /// it has been written (the runtime got it back from the `Bytes` it was given, as the
    /// only owner): the next Data message is encoded into it instead of a fresh allocation.
    /// A few are kept; see [`trim_buffers`](Self::trim_buffers).
    pub fn recycle(&mut self, buf: BytesMut) {
        self.streams.recycle(buf);
    }

    /// Frees the recycled buffers unless a Data message was encoded since the last call;
    /// the runtime calls it every few seconds, so an idle session holds none.
    pub fn trim_buffers(&mut self) {
        self.streams.trim_buffers();
    }

    /// The next thing to send: pings, then control messages (Connect, Error, Pause, Resume,
    /// Credit, sync, announcements), then Data one message per stream in turn.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.keepalive.take_ping() {
            return Some(Transmit::Ping);
        }
        if let Some(msg) = self.out.pop_control() {
            return Some(Transmit::Message(msg));
        }
        if self.ended.is_some() {
            return None;
        }
        self.streams
            .poll_transmit(&self.config, &mut self.out)
            .map(Transmit::Message)
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_event()
    }

    // ----- input: the application -----------------------------------------------------------

    /// Opens a stream to `target`: allocates an id and queues Connect. There is no
    /// acknowledgement in the protocol; a failed remote dial arrives later as the stream's end.
    /// (With the connect-ack extension a successful one arrives as
    /// [`Event::StreamAcknowledged`].)
    pub fn open_stream(&mut self, now: Instant, target: Target) -> Result<ConnId, OpenError> {
        if let Some(end) = &self.ended {
            return Err(OpenError::SessionClosed(end.clone()));
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(OpenError::TooManyStreams(self.config.max_streams));
        }
        // An agent opens nothing more towards a server that is leaving. A server side only
        // takes note: a draining peer server that says GoAway on a peer link still serves
        // the agents it alone holds through that link, so the streams routed to it must open.
        if let (Some(reason), Side::Client) = (&self.peer_going_away, self.side) {
            return Err(OpenError::PeerGoingAway(reason.clone()));
        }
        // Counting walks the table: only once it is large enough to hold that many.
        if self.streams.len() >= self.config.max_pending_dials
            && self.streams.pending_dials() >= self.config.max_pending_dials
        {
            return Err(OpenError::TooManyPendingDials(
                self.config.max_pending_dials,
            ));
        }
        Ok(self.streams.open(now, target, &self.config, &mut self.out))
    }

    /// Tells the peer that the dial of stream `id`, which it opened, succeeded (connect-ack
    /// extension): queues ConnectAck, which goes out before any Data of the stream. Returns
    /// whether it was queued: not without the extension, for a stream we opened, a stream
    /// off the wire, or a second time. A failed dial is answered with
    /// [`reset`](Self::reset) and the dial's text, as with Go.
    pub fn acknowledge(&mut self, id: ConnId) -> bool {
        self.config.connect_ack && self.streams.acknowledge(id, &self.config, &mut self.out)
    }

    /// Whether the peer acknowledged the dial of stream `id`, which we opened
    /// ([`Event::StreamAcknowledged`]; connect-ack extension only).
    pub fn is_acknowledged(&self, id: ConnId) -> bool {
        self.streams.is_acknowledged(id)
    }

    /// Queues `data` (or as much as fits in the stream's send buffer) and returns how many
    /// bytes were taken. [`StreamError::Blocked`] means the buffer is full.
    pub fn write(&mut self, id: ConnId, data: &[u8]) -> Result<usize, StreamError> {
        self.streams
            .write(self.clock, id, data, &self.config, &mut self.out)
    }

    /// Whether everything written to the stream has been handed to the websocket.
    /// [`StreamError::Blocked`] means not yet; wait for [`Event::StreamWritable`].
    pub fn flush(&mut self, id: ConnId) -> Result<(), StreamError> {
        self.streams.flush(id, &self.config)
    }

    /// Takes up to `max` buffered bytes. After the buffer is drained: [`ReadOutcome::Eof`]
    /// for a clean end, [`StreamError::Closed`] for any other end, else
    /// [`StreamError::Blocked`].
    pub fn read(&mut self, id: ConnId, max: usize) -> Result<ReadOutcome, StreamError> {
        let link = self.link();
        self.streams
            .read(id, max, link, &self.config, &mut self.out)
    }

    /// Ends the application's writing; the end goes out after the queued Data.
    ///
    /// With [`Config::half_close`] that end is Fin: the peer's reader sees EOF and its writer
    /// goes on, and the stream leaves the wire once both sides have sent Fin (or either sent
    /// an Error). Without it, as with Go, it is Error `EOF`, which closes both directions:
    /// reading goes on only until the peer's Error arrives.
    pub fn finish(&mut self, id: ConnId) -> Result<(), StreamError> {
        self.streams.finish(id, &self.config)
    }

    /// Closes the stream now with `reason`, sent to the peer as its Error text; queued Data is
    /// dropped. Also how an incoming stream is refused.
    pub fn reset(&mut self, id: ConnId, reason: &str) -> Result<(), StreamError> {
        self.streams.reset(id, reason, &self.config, &mut self.out)
    }

    /// The application dropped its handle: finish the stream if it is still open and forget
    /// it once nothing is left to send.
    pub fn release(&mut self, id: ConnId) {
        self.streams.release(id, &self.config);
    }

    /// Queues an AddClient (`added`) or RemoveClient announcement, for peer links.
    pub fn announce(&mut self, client: ClientSession, added: bool) {
        let msg = if added {
            Message::AddClient(client)
        } else {
            Message::RemoveClient(client)
        };
        self.out.send(&msg);
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
        let mut end = reason.len().min(MAX_ERROR_TEXT);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.out.send(&Message::GoAway {
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
            self.out.send(&Message::Replicas {
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
        self.streams
            .close(end == SessionEnd::Local, &self.config, &mut self.out);
        self.keepalive.stop();
        self.out.close();
        self.ended = Some(end.clone());
        self.out.event(Event::SessionClosed(end));
    }

    /// Panics if the session's totals disagree with its streams; for tests and fuzzing.
    pub fn assert_invariants(&self) {
        self.streams.assert_budget();
    }
}
