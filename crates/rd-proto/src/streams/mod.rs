//! The streams of a session, the way quinn-proto keeps its `StreamsState`: the table of
//! streams by id with id allocation, the ready queue of streams with something to send, the
//! send buffers they encode into, and the session's receive budget.
//!
//! [`Streams`] is the only owner of the budget: every change to a stream goes through one
//! method (`update`), which applies what the stream's receive half held before and after
//! to the totals, and ends (in debug builds) with the stream's own checks and a check that
//! the totals are the sum over the streams. Each
//! message from the peer and each application call about streams is one method here, which
//! also queues what it has to say (Errors, flow signals, events) in the session's
//! [`Outbox`].
//!
//! - `stream.rs`: one stream, a lifecycle and two halves;
//! - `recv.rs`, `send.rs`: the halves;
//! - `pause.rs`, `credit.rs`: the two kinds of receive flow control;
//! - `budget.rs`: the totals, and what a stream's flow control sees of the rest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::config::{Config, Side};
use crate::error::{StreamEnd, StreamError};
use crate::event::{Event, Limit};
use crate::ids::ConnId;
use crate::message::{Message, EOF_TEXT};
use crate::outbox::Outbox;
use crate::pool::SendPool;
use crate::target::Target;

mod budget;
mod credit;
mod pause;
mod recv;
mod send;
mod stream;
#[cfg(test)]
mod tests;

use budget::{Held, Pressure, ReceiveBudget};
use recv::FlowSignal;
use stream::{PeerFin, Sent, Stream};

pub use stream::{Origin, ReadOutcome, StreamFlow, StreamInfo};

/// How often (in changes) the budget of a table larger than this is summed in debug builds.
const FULL_CHECK_EVERY: usize = 64;

/// Error text for Data that arrives after the peer's Fin.
const DATA_AFTER_FIN: &str = "data after fin";

/// Data arrived for a stream that is not on the wire; the session answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotFound;

/// What the session knows of the link when a stream's flow control decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    /// The smallest round trip measured (`None`: none yet).
    pub(crate) rtt: Option<Duration>,
    /// The time of the session's latest input.
    pub(crate) now: Instant,
}

/// Totals for [`SessionStats`](crate::SessionStats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) streams: usize,
    pub(crate) holding_back: usize,
    pub(crate) held_back: usize,
    pub(crate) unread: usize,
    pub(crate) committed: usize,
    pub(crate) queued: usize,
}

#[derive(Debug)]
pub(crate) struct Streams {
    map: HashMap<ConnId, Stream>,
    /// Streams with output, each at most once (its `scheduled` flag), served round-robin.
    ready: VecDeque<ConnId>,
    last_id: i64,
    budget: ReceiveBudget,
    /// Buffers of sent Data messages, reused for the next ones.
    pool: SendPool,
    /// The ceiling was reached and input stopped; reported once per episode.
    stalled: bool,
    /// Changes to the budget so far (debug builds: when to sum it).
    changes: usize,
}

impl Streams {
    pub(crate) fn new(side: Side) -> Self {
        Self {
            map: HashMap::new(),
            ready: VecDeque::new(),
            // Go's client numbers its connections from 1, its server from 2.
            last_id: if side == Side::Client { 0 } else { 1 },
            budget: ReceiveBudget::default(),
            pool: SendPool::default(),
            stalled: false,
            changes: 0,
        }
    }

    // ----- queries --------------------------------------------------------------------------

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals {
            streams: self.map.len(),
            unread: self.budget.unread(),
            committed: self.budget.committed(),
            ..Totals::default()
        };
        for s in self.map.values() {
            t.holding_back += usize::from(s.holding_back());
            t.held_back += usize::from(s.held_back());
            t.queued += s.queued();
        }
        t
    }

    /// What stream `id`'s receive half holds.
    #[cfg(test)]
    fn held(&self, id: ConnId) -> Option<Held> {
        self.map.get(&id).map(Stream::held)
    }

    pub(crate) fn unread(&self, id: ConnId) -> Option<usize> {
        self.map.get(&id).map(|s| s.held().unread)
    }

    pub(crate) fn is_open(&self, id: ConnId) -> bool {
        self.map.get(&id).is_some_and(Stream::on_wire)
    }

    pub(crate) fn target(&self, id: ConnId) -> Option<&Target> {
        self.map.get(&id).map(Stream::target)
    }

    pub(crate) fn infos(&self) -> Vec<StreamInfo> {
        self.map.iter().map(|(id, s)| s.info(*id)).collect()
    }

    /// Streams we opened that the peer has not answered in any way yet.
    pub(crate) fn pending_dials(&self) -> usize {
        self.map.values().filter(|s| s.dial_pending()).count()
    }

    /// Whether the peer acknowledged the dial of stream `id`, which we opened (connect-ack
    /// extension).
    pub(crate) fn is_acknowledged(&self, id: ConnId) -> bool {
        self.map.get(&id).is_some_and(Stream::is_acknowledged)
    }

    /// Whether any stream waits in the ready queue (it may turn out to have nothing it may
    /// send yet).
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The ids the peer should still know, ascending as signed integers.
    pub(crate) fn live_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .map
            .iter()
            .filter(|(_, s)| s.is_live())
            .map(|(id, _)| id.0)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether the streams' unread bytes are at the ceiling, where the session stops reading
    /// the websocket: our own readers, not the peer, are why. Never with credit: every
    /// unread byte was granted (a stream sent more is reset), so what the session holds is
    /// what it chose to grant, and stopping would only stall honest streams.
    pub(crate) fn input_stalled(&self, config: &Config) -> bool {
        !config.credit && self.budget.unread() >= config.session_receive_ceiling
    }

    // ----- the budget -----------------------------------------------------------------------

    /// Runs `f` on stream `id` and applies what its receive half held before and after to
    /// the budget: the one way a stream is changed. Ends (in debug builds) with the
    /// stream's own checks and, if the budget moved, the check of the totals.
    fn update<R>(
        &mut self,
        id: ConnId,
        config: &Config,
        f: impl FnOnce(&mut Stream, &mut SendPool) -> R,
    ) -> Option<R> {
        let s = self.map.get_mut(&id)?;
        let before = s.held();
        let result = f(s, &mut self.pool);
        let after = s.held();
        s.assert_invariants(config);
        if before != after {
            self.budget.apply(before, after);
            self.check_budget();
        }
        Some(result)
    }

    fn insert(&mut self, id: ConnId, stream: Stream) {
        self.budget.apply(Held::default(), stream.held());
        self.map.insert(id, stream);
        self.check_budget();
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(s) = self.map.remove(&id) {
            self.budget.apply(s.held(), Held::default());
            self.check_budget();
        }
    }

    /// In debug builds: the totals are the sum over the streams. Summing costs a pass over
    /// the table, so a large table is summed every [`FULL_CHECK_EVERY`] changes (a drift
    /// still shows within that many), a small one every time.
    fn check_budget(&mut self) {
        if cfg!(debug_assertions) {
            self.changes = self.changes.wrapping_add(1);
            if self.map.len() <= FULL_CHECK_EVERY || self.changes % FULL_CHECK_EVERY == 0 {
                self.assert_budget();
            }
        }
    }

    /// Panics unless the totals are the sum over the streams and no stream is over its cap.
    pub(crate) fn assert_budget(&self) {
        self.budget.assert_sum(self.map.values().map(Stream::held));
    }

    /// What the rest of the session holds, seen from stream `id`.
    fn pressure(&self, id: ConnId, link: Link, config: &Config) -> Pressure {
        let own = self.map.get(&id).map(Stream::held).unwrap_or_default();
        // Counting this stream, which may be about to grow.
        let sharing = self.budget.grown() - own.grown + 1;
        Pressure {
            others_unread: self.budget.unread().saturating_sub(own.unread),
            others_committed: self.budget.committed().saturating_sub(own.committed),
            fair_share: config.session_receive_budget / sharing,
            rtt: link.rtt,
            now: Some(link.now),
        }
    }

    // ----- the ready queue ------------------------------------------------------------------

    /// Puts the stream in the ready queue if it has output and is not there yet. Every
    /// change that can give a stream output ends with this call.
    fn schedule(&mut self, id: ConnId) {
        if self.map.get_mut(&id).is_some_and(Stream::schedule) {
            self.ready.push_back(id);
        }
    }

    /// The next message from the streams in turn, one per stream per turn: Data, or a
    /// stream's end once its Data has gone.
    pub(crate) fn poll_transmit(&mut self, config: &Config, out: &mut Outbox) -> Option<Bytes> {
        while let Some(id) = self.ready.pop_front() {
            let sent = self.update(id, config, |s, pool| {
                s.unschedule();
                s.transmit(id, config, out, pool)
            });
            let Some(Some((msg, sent))) = sent else {
                continue;
            };
            match sent {
                Sent::Data { writable } => {
                    if writable {
                        out.event(Event::StreamWritable { id });
                    }
                    self.schedule(id);
                }
                Sent::Fin { both_done: true } => self.left_wire(id, StreamEnd::Finished, out),
                Sent::Fin { both_done: false } => {}
                Sent::Eof => {
                    if self.map.get(&id).is_some_and(Stream::is_done) {
                        self.remove(id);
                    }
                }
            }
            return Some(msg);
        }
        None
    }

    /// Hands back a sent message's buffer for the next Data message.
    pub(crate) fn recycle(&mut self, buf: BytesMut) {
        self.pool.give(buf);
    }

    /// Frees the recycled buffers unless one was used since the last call.
    pub(crate) fn trim_buffers(&mut self) {
        self.pool.trim();
    }

    // ----- input: the peer's messages -------------------------------------------------------

    /// A frame for stream `id` came from the peer at `now` (before it is dispatched): the
    /// stream has heard from the peer, and is active. Unknown ids are ignored.
    pub(crate) fn heard(&mut self, id: ConnId, now: Instant, config: &Config) {
        self.update(id, config, |s, _| s.heard(now));
    }

    /// Data from the peer. `Err` for a stream not on the wire: the session answers it.
    pub(crate) fn on_data(
        &mut self,
        now: Instant,
        id: ConnId,
        payload: Bytes,
        link: Link,
        config: &Config,
        out: &mut Outbox,
    ) -> Result<(), NotFound> {
        let n = payload.len();
        let s = self.map.get(&id).filter(|s| s.on_wire()).ok_or(NotFound)?;
        if s.peer_finished() {
            // The peer said it writes no more: it broke the extension's contract (an ordered
            // websocket cannot bring Data from before its Fin after it).
            self.reset(id, DATA_AFTER_FIN, config, out).ok();
            return Ok(());
        }
        if s.is_released() {
            // Nobody will read it; the stream is only waiting for its end to go out.
            return Ok(());
        }
        if self.budget.unread().saturating_add(n) > config.session_receive_cap {
            let text = format!(
                "session receive buffer of {} bytes exceeded",
                config.session_receive_cap
            );
            self.reset(id, &text, config, out).ok();
            out.event(Event::LimitExceeded(Limit::SessionReceiveCap));
            return Ok(());
        }
        let pressure = Pressure {
            now: Some(now),
            ..self.pressure(id, link, config)
        };
        match self.update(id, config, |s, _| s.on_data(payload, now, pressure, config)) {
            Some(Err(overflow)) => {
                let text = format!(
                    "receive buffer limit of {} bytes exceeded: the peer ignored flow control",
                    overflow.cap
                );
                self.reset(id, &text, config, out).ok();
                out.event(Event::LimitExceeded(Limit::StreamReceiveCap));
            }
            Some(Ok((reader_was_waiting, signal))) => {
                if reader_was_waiting {
                    out.event(Event::StreamReadable { id });
                }
                send_signal(id, signal, out);
                if self.input_stalled(config) {
                    self.shed_pause_ignorers(config, out);
                }
                if self.input_stalled(config) && !self.stalled {
                    self.stalled = true;
                    // The runtime warns about it with the session's identity (the event).
                    tracing::debug!(
                        unread = self.budget.unread(),
                        ceiling = config.session_receive_ceiling,
                        "session stops reading until its readers catch up: the peer sends on \
                         many streams beyond flow control"
                    );
                    out.event(Event::LimitExceeded(Limit::SessionStall));
                }
            }
            None => {}
        }
        Ok(())
    }

    /// At the ceiling: if the streams together received more after their Pause than a link
    /// holds in flight (half the stream cap), the peer ignores Pause somewhere. Reset the
    /// streams that received most after their Pause, worst first, until the session is below
    /// the ceiling or the rest is within that allowance. Only if honest streams alone fill
    /// the ceiling does the session stop reading.
    fn shed_pause_ignorers(&mut self, config: &Config, out: &mut Outbox) {
        let allowance = config.stream_receive_cap / 2;
        let mut ignorers: Vec<(usize, ConnId)> = self
            .map
            .iter()
            .filter(|(_, s)| s.accepts_data() && s.since_pause() > 0)
            .map(|(id, s)| (s.since_pause(), *id))
            .collect();
        let mut total: usize = ignorers.iter().map(|(n, _)| n).sum();
        ignorers.sort_unstable_by(|a, b| b.cmp(a));
        for (since_pause, id) in ignorers {
            if !self.input_stalled(config) || total <= allowance {
                break;
            }
            total -= since_pause;
            tracing::debug!(conn_id = %id, since_pause, "resetting a stream whose peer ignores Pause");
            let text =
                format!("received {since_pause} bytes after Pause: the peer ignored flow control");
            self.reset(id, &text, config, out).ok();
            out.event(Event::LimitExceeded(Limit::StreamReceiveCap));
        }
    }

    /// The peer's Connect.
    pub(crate) fn on_connect(
        &mut self,
        now: Instant,
        id: ConnId,
        target: Target,
        config: &Config,
        out: &mut Outbox,
    ) {
        if let Some(s) = self.map.get(&id) {
            const IN_USE: &str = "connection id already in use";
            if s.on_wire() {
                // Go would silently replace the live connection; refusing keeps both ends sane.
                self.reset(id, IN_USE, config, out).ok();
            } else {
                // Off the wire, but its handle may still read what it buffered: replacing the
                // entry would hand that handle the new stream and leak the buffered count.
                out.send(&Message::Error {
                    conn_id: id,
                    text: IN_USE.into(),
                });
            }
            return;
        }
        if self.map.len() >= config.max_streams {
            let text = format!("too many connections: limit {}", config.max_streams);
            out.send(&Message::Error { conn_id: id, text });
            out.event(Event::LimitExceeded(Limit::MaxStreams));
            return;
        }
        self.insert(id, Stream::new(target.clone(), Origin::Remote, now, config));
        out.event(Event::StreamRequested { id, target });
    }

    /// The peer's Error: the stream ends (answered with the same Error, as Go does).
    pub(crate) fn on_error(&mut self, id: ConnId, text: String, config: &Config, out: &mut Outbox) {
        let Some(s) = self.map.get(&id).filter(|s| s.on_wire()) else {
            return;
        };
        let end = if text == EOF_TEXT {
            StreamEnd::Finished
        } else {
            StreamEnd::PeerError(text.clone())
        };
        // Go's close path always writes an Error back; Go peers ignore it as an unknown id.
        if !s.eof_sent() {
            out.send(&Message::Error { conn_id: id, text });
        }
        self.leave_wire(id, end, config, out);
    }

    /// The peer's Pause (`paused`) or Resume.
    pub(crate) fn on_pause(&mut self, id: ConnId, paused: bool, config: &Config) {
        if self.map.get(&id).is_some_and(Stream::on_wire) {
            self.update(id, config, |s, _| s.on_pause(paused));
            self.schedule(id);
        }
    }

    /// The peer's Credit.
    pub(crate) fn on_credit(
        &mut self,
        id: ConnId,
        increment: u32,
        config: &Config,
        out: &mut Outbox,
    ) {
        if !self.map.get(&id).is_some_and(Stream::on_wire) {
            return;
        }
        if self.update(id, config, |s, _| s.on_credit(increment, config)) == Some(true) {
            out.event(Event::StreamWritable { id });
        }
        self.schedule(id);
    }

    /// The peer's Fin (half-close): it writes no more on `id`. Our reader sees EOF once the
    /// buffer is drained; our writer goes on. With our own Fin already sent, both
    /// directions are done and the stream leaves the wire. Fin for an unknown or closed
    /// stream and a second Fin are ignored.
    pub(crate) fn on_fin(&mut self, id: ConnId, config: &Config, out: &mut Outbox) {
        if !self.map.get(&id).is_some_and(Stream::accepts_data) {
            return;
        }
        match self.update(id, config, |s, _| s.on_peer_fin()) {
            Some(PeerFin::BothDone) => self.left_wire(id, StreamEnd::Finished, out),
            Some(PeerFin::Open { reader_was_waiting }) => {
                // A stream the application released waits for a Fin (rather than its Error
                // `EOF`) now that the peer is done too.
                self.schedule(id);
                if reader_was_waiting {
                    out.event(Event::StreamReadable { id });
                }
            }
            None => {}
        }
    }

    /// The peer's ConnectAck (connect-ack extension): its dial of a stream we opened
    /// succeeded. Ignored for streams the peer opened, streams off the wire, unknown ids and
    /// when repeated.
    pub(crate) fn on_connect_ack(&mut self, id: ConnId, config: &Config, out: &mut Outbox) {
        if self.update(id, config, |s, _| s.on_connect_ack()) == Some(true) {
            out.event(Event::StreamAcknowledged { id });
        }
    }

    /// The peer's SyncConnections: streams it no longer lists leave the wire.
    pub(crate) fn on_sync(&mut self, now: Instant, ids: &[i64], config: &Config, out: &mut Outbox) {
        let grace = config.sync_interval.unwrap_or(Duration::from_secs(60));
        let listed: HashSet<i64> = ids.iter().copied().collect();
        let stale: Vec<ConnId> = self
            .map
            .iter()
            .filter(|(id, s)| s.stale(listed.contains(&id.0), now, grace))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            tracing::debug!(conn_id = %id, "closing stream the peer no longer lists");
            self.leave_wire(id, StreamEnd::Synced, config, out);
        }
    }

    /// Takes a stream off the wire with `end` and tells the application. Sends nothing.
    fn leave_wire(&mut self, id: ConnId, end: StreamEnd, config: &Config, out: &mut Outbox) {
        if self
            .update(id, config, |s, _| s.leave_wire(end.clone()))
            .is_some()
        {
            self.left_wire(id, end, out);
        }
    }

    /// Stream `id` has left the wire with `end`: the application hears of it, and a released
    /// stream is forgotten.
    fn left_wire(&mut self, id: ConnId, end: StreamEnd, out: &mut Outbox) {
        if self.map.get(&id).is_some_and(Stream::is_released) {
            self.remove(id);
        }
        out.event(Event::StreamClosed { id, end });
    }

    // ----- input: the application -----------------------------------------------------------

    /// Opens a stream to `target` under a fresh id and queues its Connect.
    pub(crate) fn open(
        &mut self,
        now: Instant,
        target: Target,
        config: &Config,
        out: &mut Outbox,
    ) -> ConnId {
        let id = self.allocate_id();
        out.send(&Message::Connect {
            conn_id: id,
            target: target.clone(),
        });
        self.insert(id, Stream::new(target, Origin::Local, now, config));
        id
    }

    /// The next free id after the last one handed out, skipping live ones.
    fn allocate_id(&mut self) -> ConnId {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            let id = ConnId(self.last_id);
            if !self.map.contains_key(&id) {
                return id;
            }
        }
    }

    /// Tells the peer that its dial of stream `id` succeeded (connect-ack extension): queues
    /// ConnectAck, which as a control message goes out before any Data of the stream.
    /// Whether it was queued.
    pub(crate) fn acknowledge(&mut self, id: ConnId, config: &Config, out: &mut Outbox) -> bool {
        if self.update(id, config, |s, _| s.acknowledge()) != Some(true) {
            return false;
        }
        out.send(&Message::ConnectAck { conn_id: id });
        true
    }

    /// Labels stream `id` with what it is for; unknown ids are ignored.
    pub(crate) fn set_label(&mut self, id: ConnId, label: &'static str, config: &Config) {
        self.update(id, config, |s, _| s.set_label(label));
    }

    /// Queues what the send buffer takes of `data` (`now`: the session's clock).
    pub(crate) fn write(
        &mut self,
        now: Instant,
        id: ConnId,
        data: &[u8],
        config: &Config,
        out: &mut Outbox,
    ) -> Result<usize, StreamError> {
        let written = self
            .update(id, config, |s, pool| {
                s.write(now, id, data, config, out, pool)
            })
            .ok_or(StreamError::Unknown(id))??;
        self.schedule(id);
        Ok(written)
    }

    pub(crate) fn flush(&mut self, id: ConnId, config: &Config) -> Result<(), StreamError> {
        self.update(id, config, |s, _| s.flush())
            .ok_or(StreamError::Unknown(id))?
    }

    pub(crate) fn read(
        &mut self,
        id: ConnId,
        max: usize,
        link: Link,
        config: &Config,
        out: &mut Outbox,
    ) -> Result<ReadOutcome, StreamError> {
        let pressure = self.pressure(id, link, config);
        let (outcome, signal) = self
            .update(id, config, |s, _| s.read(link.now, max, pressure, config))
            .ok_or(StreamError::Unknown(id))??;
        send_signal(id, signal, out);
        if self.stalled && !self.input_stalled(config) {
            self.stalled = false;
            out.event(Event::ReadingResumed);
        }
        Ok(outcome)
    }

    pub(crate) fn finish(&mut self, id: ConnId, config: &Config) -> Result<(), StreamError> {
        let finished = self
            .update(id, config, |s, _| s.finish())
            .ok_or(StreamError::Unknown(id))?;
        if finished {
            self.schedule(id);
        }
        Ok(())
    }

    pub(crate) fn reset(
        &mut self,
        id: ConnId,
        reason: &str,
        config: &Config,
        out: &mut Outbox,
    ) -> Result<(), StreamError> {
        let s = self.map.get(&id).ok_or(StreamError::Unknown(id))?;
        if !s.on_wire() {
            return Ok(());
        }
        // After our Error `EOF` the peer has forgotten the stream; after a Fin it has not.
        if !s.eof_sent() {
            out.send(&Message::Error {
                conn_id: id,
                text: reason.to_owned(),
            });
        }
        self.update(id, config, |s, _| s.discard());
        self.leave_wire(id, StreamEnd::Reset(reason.to_owned()), config, out);
        Ok(())
    }

    /// The application dropped its handle: finish the stream if it is still open and forget
    /// it once nothing is left to send.
    pub(crate) fn release(&mut self, id: ConnId, config: &Config) {
        if self.update(id, config, |s, _| s.release()).is_none() {
            return;
        }
        if self.map.get(&id).is_some_and(Stream::is_done) {
            self.remove(id);
        } else {
            // Its end goes out now (held back by the peer's flow control no longer: that
            // does not apply to a released stream).
            self.schedule(id);
        }
    }

    /// The session ends: every stream still on the wire leaves it with `tunnel disconnect`.
    /// `notify_peer`: queue an Error for each live stream first, so a peer still listening
    /// can clean up at once.
    pub(crate) fn close(&mut self, notify_peer: bool, config: &Config, out: &mut Outbox) {
        let ids: Vec<ConnId> = self.map.keys().copied().collect();
        for id in ids {
            let Some(s) = self.map.get(&id) else {
                continue;
            };
            if notify_peer && s.is_live() {
                out.send(&Message::Error {
                    conn_id: id,
                    text: StreamEnd::Disconnected.to_string(),
                });
            }
            if s.on_wire() {
                self.leave_wire(id, StreamEnd::Disconnected, config, out);
            }
        }
        for id in self.ready.drain(..) {
            if let Some(s) = self.map.get_mut(&id) {
                s.unschedule();
            }
        }
    }
}

fn send_signal(conn_id: ConnId, signal: Option<FlowSignal>, out: &mut Outbox) {
    let msg = match signal {
        None => return,
        Some(FlowSignal::Pause) => Message::Pause { conn_id },
        Some(FlowSignal::Resume) => Message::Resume { conn_id },
        Some(FlowSignal::Credit(increment)) => Message::Credit { conn_id, increment },
    };
    out.send(&msg);
}
