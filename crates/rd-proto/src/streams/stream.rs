//! One virtual connection: where it is in its life on the wire, and its two halves. Its
//! fields are its own; [`Streams`](super::Streams) changes it only through these methods,
//! and keeps the session's budget in step with what its receive half holds.

use std::time::Instant;

use bytes::Bytes;

use crate::config::Config;
use crate::error::{StreamEnd, StreamError};
use crate::ids::ConnId;
use crate::message::{Message, EOF_TEXT};
use crate::outbox::Outbox;
use crate::pool::SendPool;
use crate::target::Target;

use super::budget::{Held, Pressure};
use super::recv::{FlowSignal, Overflow, RecvHalf};
use super::send::SendHalf;

/// What a read produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes; empty only when the read asked for at most 0 bytes.
    Data(Bytes),
    /// A clean end of stream.
    Eof,
}

/// Which side sent the Connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// We dialed it ([`Session::open_stream`](crate::Session::open_stream)).
    Local,
    /// The peer asked for it.
    Remote,
}

/// One stream as [`Session::stream_infos`](crate::Session::stream_infos) lists it: what an
/// operator needs to know about a stream that is cut (by a drain, say), or one that sits idle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream's id.
    pub id: ConnId,
    /// What it was opened to.
    pub target: Target,
    /// Which side opened it.
    pub origin: Origin,
    /// When it was opened (the session's clock).
    pub opened_at: Instant,
    /// Bytes the application wrote to it.
    pub bytes_written: u64,
    /// Bytes the application read from it.
    pub bytes_read: u64,
    /// What the application said the stream is for
    /// ([`Session::set_stream_label`](crate::Session::set_stream_label)).
    pub label: Option<&'static str>,
    /// When the last frame for the stream came from the peer; `None` for a stream we
    /// opened means its dial is pending (the far side has not answered in any way yet).
    pub last_heard: Option<Instant>,
    /// When bytes last moved either way (or the stream opened).
    pub last_activity: Instant,
    /// Whether the stream is still on the wire (false once it ended, while the
    /// application may still read what it buffered).
    pub on_wire: bool,
    /// Whether our writing has ended (Fin or Error `EOF` queued or sent).
    pub finished: bool,
    /// Whether the peer's writing has ended (its Fin, half-close only).
    pub peer_finished: bool,
    /// Flow control and the bytes the stream holds.
    pub flow: StreamFlow,
}

/// One stream's flow control state, as [`StreamInfo::flow`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamFlow {
    /// Received bytes the application has not read yet.
    pub unread: usize,
    /// Bytes written and queued for the peer, not yet sent.
    pub send_queued: usize,
    /// Our flow control holds the peer back: our Pause is outstanding, or (credit) the peer
    /// used all the credit we granted.
    pub paused_by_us: bool,
    /// The peer's flow control holds us back: its Pause, or no credit left.
    pub paused_by_peer: bool,
    /// Credit mode: the receive window we aim to keep granted (`None` with Pause/Resume).
    pub recv_window: Option<usize>,
    /// Credit mode: bytes the peer may still send us.
    pub recv_credit: Option<usize>,
    /// Credit mode: bytes we may still send the peer.
    pub send_credit: Option<usize>,
}

/// Where a stream is in its life, as the websocket sees it: our writing side and the
/// stream's presence on the wire. The peer's writing side is [`Stream::peer_fin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// We may write.
    Open,
    /// The application finished (or released the stream): our end goes out once queued Data
    /// has. It is Fin with the half-close extension, except for a released stream whose peer
    /// still writes (nobody reads that direction), and Error `EOF` otherwise.
    Finishing,
    /// Fin sent (half-close): we write no more, the peer may until its own Fin. A stream
    /// never stays here once the peer's Fin has arrived: both ends done is `Gone`.
    FinSent,
    /// Fin sent, then the application released the stream while the peer still writes:
    /// Error `EOF` goes out to close both ways (nobody reads the peer's direction), unless
    /// the peer's Fin comes first, which ends the stream with no second Fin.
    EofAfterFin,
    /// Error `EOF` sent: the connection is closed both ways (Go's semantics). We still take
    /// Data until the peer's Error arrives.
    EofSent,
    /// Gone from the wire; the entry only serves the application's last reads.
    Gone,
}

/// What [`Stream::transmit`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// A Data message; more may follow. `writable`: a waiting writer has room again.
    Data { writable: bool },
    /// Our Fin; `both_done`: the peer's Fin was already in, so the stream has left the wire.
    Fin { both_done: bool },
    /// Error `EOF`.
    Eof,
}

/// What the peer's Fin did to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerFin {
    /// Our Fin was already out: both directions are done, the stream has left the wire.
    BothDone,
    /// Our side goes on; `reader_was_waiting`: the reader is to be told of its EOF.
    Open { reader_was_waiting: bool },
}

/// Per-stream state: a lifecycle, a receive half and a send half.
#[derive(Debug)]
pub(crate) struct Stream {
    target: Target,
    origin: Origin,
    opened_at: Instant,
    life: Lifecycle,
    /// The peer sent Fin: it writes no more, and our reader sees EOF once the buffer is
    /// drained (half-close only).
    peer_fin: bool,
    end: Option<StreamEnd>,
    recv: RecvHalf,
    send: SendHalf,
    /// In the stream table's ready queue.
    scheduled: bool,
    /// The application dropped its handle.
    released: bool,
    /// Connect-ack extension: for a stream we opened, the peer said its dial succeeded; for
    /// one the peer opened, we said so.
    acknowledged: bool,
    /// Bytes the application wrote to the stream (queued for the peer).
    bytes_written: u64,
    /// Bytes the application read from the stream (received from the peer).
    bytes_read: u64,
    /// What the application says the stream is for (see
    /// [`Session::set_stream_label`](crate::Session::set_stream_label)).
    label: Option<&'static str>,
    /// When the last frame for this stream came from the peer (`None`: none yet; for a
    /// stream we opened, the dial is still pending).
    last_heard: Option<Instant>,
    /// When bytes last moved on the stream, either way (the session's clock: its latest
    /// input, so an application write is dated at most a keepalive period early).
    last_activity: Instant,
}

impl Stream {
    pub(crate) fn new(target: Target, origin: Origin, now: Instant, config: &Config) -> Self {
        Self {
            target,
            origin,
            opened_at: now,
            life: Lifecycle::Open,
            peer_fin: false,
            end: None,
            recv: RecvHalf::new(config),
            send: SendHalf::new(config.credit),
            scheduled: false,
            released: false,
            acknowledged: false,
            bytes_written: 0,
            bytes_read: 0,
            label: None,
            last_heard: None,
            last_activity: now,
        }
    }

    /// The stream as [`Session::stream_infos`](crate::Session::stream_infos) lists it.
    pub(crate) fn info(&self, id: ConnId) -> StreamInfo {
        StreamInfo {
            id,
            target: self.target.clone(),
            origin: self.origin,
            opened_at: self.opened_at,
            bytes_written: self.bytes_written,
            bytes_read: self.bytes_read,
            label: self.label,
            last_heard: self.last_heard,
            last_activity: self.last_activity,
            on_wire: self.on_wire(),
            finished: self.life != Lifecycle::Open,
            peer_finished: self.peer_fin,
            flow: StreamFlow {
                unread: self.recv.held().unread,
                send_queued: self.send.queued(),
                paused_by_us: self.recv.holding_back(),
                paused_by_peer: self.send.held_back(),
                recv_window: self.recv.window(),
                recv_credit: self.recv.credit(),
                send_credit: self.send.credit(),
            },
        }
    }

    /// Labels the stream with what it is for.
    pub(crate) fn set_label(&mut self, label: &'static str) {
        self.label = Some(label);
    }

    /// A frame for this stream came from the peer at `now`: it answered (a dial is no
    /// longer pending), and the stream is active.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
        self.touch(now);
    }

    /// Bytes moved on the stream at `now`.
    fn touch(&mut self, now: Instant) {
        self.last_activity = self.last_activity.max(now);
    }

    /// Whether we opened the stream and the peer has not answered it in any way yet.
    pub(crate) fn dial_pending(&self) -> bool {
        self.origin == Origin::Local && self.last_heard.is_none() && self.on_wire()
    }

    /// Whether the peer acknowledged the dial of this stream, which we opened (connect-ack
    /// extension).
    pub(crate) fn is_acknowledged(&self) -> bool {
        self.origin == Origin::Local && self.acknowledged
    }

    /// We tell the peer that the dial of this stream, which it opened, succeeded
    /// (connect-ack extension); whether the ack is to go out: not for a stream we opened,
    /// one off the wire, or a second time.
    pub(crate) fn acknowledge(&mut self) -> bool {
        if self.origin != Origin::Remote || !self.on_wire() || self.acknowledged {
            return false;
        }
        self.acknowledged = true;
        true
    }

    /// The peer's ConnectAck: its dial of this stream, which we opened, succeeded; whether
    /// the application is to hear of it: not for a stream the peer opened, one off the
    /// wire, or a repeated ack.
    pub(crate) fn on_connect_ack(&mut self) -> bool {
        if self.origin != Origin::Local || !self.on_wire() || self.acknowledged {
            return false;
        }
        self.acknowledged = true;
        true
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// What the receive half holds against the session's budget.
    pub(crate) fn held(&self) -> Held {
        self.recv.held()
    }

    /// Whether our flow control holds the peer back (our Pause, or no credit left).
    pub(crate) fn holding_back(&self) -> bool {
        self.recv.holding_back()
    }

    /// Whether the peer's flow control holds us back (its Pause, or no credit left).
    pub(crate) fn held_back(&self) -> bool {
        self.send.held_back()
    }

    /// Bytes queued to send.
    pub(crate) fn queued(&self) -> usize {
        self.send.queued()
    }

    /// Bytes received since our outstanding Pause (0 without one).
    pub(crate) fn since_pause(&self) -> usize {
        self.recv.since_pause()
    }

    /// Whether the stream still exists for the peer: its Errors, Pause, Resume and Credit
    /// apply, and SyncConnections may close it.
    pub(crate) fn on_wire(&self) -> bool {
        self.life != Lifecycle::Gone
    }

    /// Whether Data from the peer is still expected: on the wire and no Fin from the peer.
    pub(crate) fn accepts_data(&self) -> bool {
        self.on_wire() && !self.peer_fin
    }

    /// Whether the peer sent Fin.
    pub(crate) fn peer_finished(&self) -> bool {
        self.peer_fin
    }

    pub(crate) fn is_released(&self) -> bool {
        self.released
    }

    /// Whether the peer should still know the stream (SyncConnections lists it, a local
    /// close tells it): a half-closed stream is live, one direction still carries Data.
    pub(crate) fn is_live(&self) -> bool {
        matches!(
            self.life,
            Lifecycle::Open | Lifecycle::Finishing | Lifecycle::FinSent | Lifecycle::EofAfterFin
        )
    }

    /// Whether our Error `EOF` went out: the peer has forgotten the stream, so neither its
    /// Error is echoed nor a reset sent.
    pub(crate) fn eof_sent(&self) -> bool {
        self.life == Lifecycle::EofSent
    }

    /// Whether SyncConnections may close the stream: on the wire, not listed by the peer,
    /// and (if we opened it) older than `grace`, since a Connect still in flight when the
    /// peer took its snapshot is not listed yet (rancher/rancher#54512).
    pub(crate) fn stale(&self, listed: bool, now: Instant, grace: std::time::Duration) -> bool {
        self.on_wire()
            && !listed
            && !(self.origin == Origin::Local
                && now.saturating_duration_since(self.opened_at) < grace)
    }

    /// Whether the entry can be dropped: nothing left for the wire or the application.
    pub(crate) fn is_done(&self) -> bool {
        self.released && matches!(self.life, Lifecycle::Gone | Lifecycle::EofSent)
    }

    /// Marks the stream as queued for the scheduler if it has output and is not queued yet;
    /// whether the caller must put it in the ready queue.
    pub(crate) fn schedule(&mut self) -> bool {
        if !self.scheduled && self.has_output() {
            self.scheduled = true;
            return true;
        }
        false
    }

    /// The stream left the ready queue.
    pub(crate) fn unschedule(&mut self) {
        self.scheduled = false;
    }

    /// Whether the scheduler has something to send for this stream right now: Data the
    /// flow control lets out, or the end once all Data has gone (held back by the peer's
    /// Pause as the Data is, but not by credit, which only counts Data).
    fn has_output(&self) -> bool {
        if self.send.is_empty() {
            matches!(self.life, Lifecycle::Finishing | Lifecycle::EofAfterFin)
                && (self.released || !self.send.paused_by_peer())
        } else {
            self.send.can_send(self.released)
        }
    }

    /// How our writing ends: Fin with the half-close extension, except for a stream the
    /// application released while the peer still writes. Nobody reads that one, so it closes
    /// both ways with Error `EOF`, as with Go, instead of letting the peer write into the void.
    fn sends_fin(&self, half_close: bool) -> bool {
        half_close && self.life == Lifecycle::Finishing && (self.peer_fin || !self.released)
    }

    /// Takes a payload from the peer: whether the reader was waiting, and the signal for
    /// the peer.
    pub(crate) fn on_data(
        &mut self,
        payload: Bytes,
        now: Instant,
        pressure: Pressure,
        config: &Config,
    ) -> Result<(bool, Option<FlowSignal>), Overflow> {
        self.recv.on_data(payload, now, pressure, config)
    }

    /// Reads up to `max` bytes (`now`: the session's clock), and the signal for the peer
    /// (none for a direction the peer has finished). After the buffer is drained: EOF for a
    /// clean end, the end for any other, else [`StreamError::Blocked`] (the reader now
    /// waits).
    pub(crate) fn read(
        &mut self,
        now: Instant,
        max: usize,
        pressure: Pressure,
        config: &Config,
    ) -> Result<(ReadOutcome, Option<FlowSignal>), StreamError> {
        let Some((chunk, signal)) = self.recv.read(max, pressure, config) else {
            let outcome = match &self.end {
                Some(StreamEnd::Finished) => ReadOutcome::Eof,
                Some(end) => {
                    self.recv.stop_waiting();
                    return Err(StreamError::Closed(end.clone()));
                }
                // Half-closed by the peer: its direction ended cleanly, ours may go on.
                None if self.peer_fin => ReadOutcome::Eof,
                None => return Err(StreamError::Blocked),
            };
            self.recv.stop_waiting();
            return Ok((outcome, None));
        };
        self.bytes_read += chunk.len() as u64;
        self.touch(now);
        let signal = signal.filter(|_| self.accepts_data());
        Ok((ReadOutcome::Data(chunk), signal))
    }

    /// Queues as much of `data` as the send buffer takes (`now`: the session's clock).
    pub(crate) fn write(
        &mut self,
        now: Instant,
        id: ConnId,
        data: &[u8],
        config: &Config,
        out: &mut Outbox,
        pool: &mut SendPool,
    ) -> Result<usize, StreamError> {
        match (self.life, &self.end) {
            (Lifecycle::Open, _) => {}
            (_, Some(end)) => return Err(StreamError::Closed(end.clone())),
            (_, None) => return Err(StreamError::Finished),
        }
        let room = self.send.room(config);
        if room == 0 {
            self.send.wait();
            return Err(StreamError::Blocked);
        }
        let taken = &data[..data.len().min(room)];
        self.bytes_written += taken.len() as u64;
        self.touch(now);
        self.send
            .push(id, taken, config.max_data_payload, out, pool);
        Ok(taken.len())
    }

    /// Whether everything written has been handed to the websocket.
    pub(crate) fn flush(&mut self) -> Result<(), StreamError> {
        if self.send.queued() == 0 || self.life == Lifecycle::Gone {
            return Ok(());
        }
        self.send.wait();
        Err(StreamError::Blocked)
    }

    /// The application finished writing; whether that changed anything.
    pub(crate) fn finish(&mut self) -> bool {
        if self.life != Lifecycle::Open {
            return false;
        }
        self.life = Lifecycle::Finishing;
        true
    }

    /// The application dropped its handle: nobody reads any more, and our end goes out
    /// (after a half-close, Error `EOF`: see [`Lifecycle::EofAfterFin`]).
    pub(crate) fn release(&mut self) {
        self.released = true;
        self.recv.discard();
        self.life = match self.life {
            Lifecycle::Open => Lifecycle::Finishing,
            Lifecycle::FinSent => Lifecycle::EofAfterFin,
            life => life,
        };
    }

    /// The peer paused (or resumed) our Data.
    pub(crate) fn on_pause(&mut self, paused: bool) {
        self.send.set_paused_by_peer(paused);
    }

    /// The peer granted credit; whether a waiting writer has room now.
    pub(crate) fn on_credit(&mut self, increment: u32, config: &Config) -> bool {
        self.send.add_credit(increment);
        self.send.take_writable(config)
    }

    /// The peer's Fin (half-close): it writes no more. The credit granted to it is void.
    pub(crate) fn on_peer_fin(&mut self) -> PeerFin {
        self.peer_fin = true;
        self.recv.void_credit();
        let reader_was_waiting = self.recv.take_waiting();
        if matches!(self.life, Lifecycle::FinSent | Lifecycle::EofAfterFin) {
            // Both directions are done. (A released stream waiting to send Error `EOF`
            // after its Fin no longer needs to: the peer has finished writing too.)
            self.leave_wire(StreamEnd::Finished);
            return PeerFin::BothDone;
        }
        PeerFin::Open { reader_was_waiting }
    }

    /// Nobody will read what is buffered (a reset).
    pub(crate) fn discard(&mut self) {
        self.recv.discard();
    }

    /// Takes the stream off the wire with `end` (the first end sticks): what it had queued
    /// to send and the credit it granted are dropped; unread bytes stay for the last reads.
    pub(crate) fn leave_wire(&mut self, end: StreamEnd) {
        self.life = Lifecycle::Gone;
        self.send.clear();
        self.end.get_or_insert(end);
        self.recv.stop_waiting();
        self.recv.void_credit();
    }

    /// The next message this stream sends, if it has one: Data, else its end (Fin or Error
    /// `EOF`) once all Data has gone.
    pub(crate) fn transmit(
        &mut self,
        id: ConnId,
        config: &Config,
        out: &mut Outbox,
        pool: &mut SendPool,
    ) -> Option<(Bytes, Sent)> {
        if !self.has_output() {
            return None;
        }
        if let Some((msg, _)) = self.send.pop(id, self.released, out, pool) {
            let writable = self.send.take_writable(config);
            return Some((msg, Sent::Data { writable }));
        }
        let message_id = out.message_id();
        if self.sends_fin(config.half_close) {
            // Only the Fin is left: it goes after all of the stream's Data. With the peer's
            // Fin already in, both directions are done.
            let fin = Message::Fin { conn_id: id }.to_bytes(message_id);
            let both_done = self.peer_fin;
            if both_done {
                self.leave_wire(StreamEnd::Finished);
            } else {
                self.life = Lifecycle::FinSent;
            }
            return Some((fin, Sent::Fin { both_done }));
        }
        // Only the EOF is left: it goes after all of the stream's Data.
        self.life = Lifecycle::EofSent;
        let eof = Message::Error {
            conn_id: id,
            text: EOF_TEXT.into(),
        };
        Some((eof.to_bytes(message_id), Sent::Eof))
    }

    /// Panics if an invariant is broken; for tests and debug builds.
    pub(crate) fn assert_invariants(&self, config: &Config) {
        if cfg!(debug_assertions) {
            self.send.assert_invariants();
            self.recv.assert_invariants(config);
            let half_close = config.half_close;
            debug_assert!(
                !self.peer_fin || half_close,
                "a peer's Fin counts only with half-close"
            );
            match self.life {
                Lifecycle::Gone => {
                    debug_assert!(self.send.is_empty(), "a stream off the wire sends nothing");
                    debug_assert!(self.end.is_some(), "a stream off the wire has an end");
                }
                Lifecycle::FinSent | Lifecycle::EofAfterFin => {
                    debug_assert!(half_close, "Fin is sent only with half-close");
                    debug_assert!(self.send.is_empty(), "no Data after our Fin");
                    debug_assert!(!self.peer_fin, "both Fins: the stream is off the wire");
                    debug_assert!(
                        self.life == Lifecycle::FinSent || self.released,
                        "only a release sends Error EOF after Fin"
                    );
                }
                Lifecycle::EofSent => {
                    debug_assert!(self.send.is_empty(), "no Data after our EOF");
                }
                Lifecycle::Open | Lifecycle::Finishing => {}
            }
        }
    }
}
