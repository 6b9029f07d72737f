//! One virtual connection's state inside a [`Session`](crate::Session).

use std::fmt;
use std::time::Instant;

use crate::config::Config;
use crate::recv::RecvHalf;
use crate::send::SendHalf;
use crate::target::Target;

/// Which side sent the Connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// We dialed it ([`Session::open_stream`](crate::Session::open_stream)).
    Local,
    /// The peer asked for it.
    Remote,
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The peer sent Error `EOF`: a clean end of stream.
    Finished,
    /// The peer sent an Error with this text (for example a dial error).
    PeerError(String),
    /// This side reset the stream for this reason; the peer was sent the same text.
    Reset(String),
    /// The peer's SyncConnections did not list the stream (Go's `sync from client`).
    Synced,
    /// The session ended (Go's `tunnel disconnect`).
    Disconnected,
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Finished => f.write_str("EOF"),
            Self::PeerError(text) | Self::Reset(text) => f.write_str(text),
            Self::Synced => f.write_str("sync from client"),
            Self::Disconnected => f.write_str("tunnel disconnect"),
        }
    }
}

/// Where a stream is in its life, as the websocket sees it. This is our writing side and the
/// stream's presence on the wire; the peer's writing side is [`Stream::peer_fin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// We may write.
    Open,
    /// The application finished (or released the stream): our end goes out once queued Data
    /// has. The end is Fin or Error `EOF`, as [`Stream::sends_fin`] says when it goes.
    Finishing,
    /// Error `EOF` sent: the connection is closed both ways (Go's semantics). We still take
    /// Data until the peer's Error arrives.
    EofSent,
    /// Fin sent (half-close extension): we write no more, the peer may until its own Fin.
    /// A stream never stays here once the peer's Fin has arrived: both ends done is `Gone`.
    FinSent,
    /// Gone from the wire; the entry only serves the application's last reads.
    Gone,
}

/// Per-stream state: a lifecycle, a receive half and a send half. [`crate::Session`] and
/// [`crate::streams::Streams`] keep them consistent.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) target: Target,
    pub(crate) origin: Origin,
    pub(crate) opened_at: Instant,
    pub(crate) life: Lifecycle,
    /// The half-close extension is in force (both ends negotiated it).
    pub(crate) half_close: bool,
    /// The peer sent Fin: it writes no more, and our reader sees EOF once the buffer is
    /// drained (half-close only).
    pub(crate) peer_fin: bool,
    /// We sent Fin. Usually `life == FinSent` says so, but a stream released after its Fin
    /// goes back to `Finishing` to send Error `EOF` (nobody reads the peer's direction), and
    /// must neither send a second Fin nor wait for that Error once the peer's Fin arrives.
    pub(crate) fin_sent: bool,
    pub(crate) end: Option<StreamEnd>,
    pub(crate) recv: RecvHalf,
    pub(crate) send: SendHalf,
    /// In the ready queue.
    pub(crate) scheduled: bool,
    /// The application dropped its handle.
    pub(crate) released: bool,
    /// Connect-ack extension: for a stream we opened, the peer said its dial succeeded; for
    /// one the peer opened, we said so.
    pub(crate) acknowledged: bool,
    /// Bytes the application wrote to the stream (queued for the peer).
    pub(crate) bytes_written: u64,
    /// Bytes the application read from the stream (received from the peer).
    pub(crate) bytes_read: u64,
}

/// One stream as [`Session::stream_infos`](crate::Session::stream_infos) lists it: what an
/// operator needs to know about a stream that is cut (by a drain, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream's id.
    pub id: crate::ConnId,
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
}

impl Stream {
    pub(crate) fn new(target: Target, origin: Origin, now: Instant, config: &Config) -> Self {
        Self {
            target,
            origin,
            opened_at: now,
            life: Lifecycle::Open,
            half_close: config.half_close,
            peer_fin: false,
            fin_sent: false,
            end: None,
            recv: RecvHalf::new(config),
            send: SendHalf::new(config.credit),
            scheduled: false,
            released: false,
            acknowledged: false,
            bytes_written: 0,
            bytes_read: 0,
        }
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

    /// How our writing ends: Fin (half-close) when the extension is in force, except for a
    /// stream the application released while the peer still writes. Nobody reads that one, so
    /// it closes both ways with Error `EOF`, as with Go, instead of letting the peer write
    /// into the void.
    pub(crate) fn sends_fin(&self) -> bool {
        self.half_close && !self.fin_sent && (self.peer_fin || !self.released)
    }

    /// Whether the scheduler has something to send for this stream right now: Data the
    /// flow control lets out, or the EOF once all Data has gone (held back by the peer's
    /// Pause as the Data is, but not by credit, which only counts Data).
    pub(crate) fn has_output(&self) -> bool {
        if self.send.is_empty() {
            self.life == Lifecycle::Finishing && (self.released || !self.send.paused_by_peer())
        } else {
            self.send.can_send(self.released)
        }
    }

    /// Whether the entry can be dropped: nothing left for the wire or the application.
    pub(crate) fn is_done(&self) -> bool {
        self.released && matches!(self.life, Lifecycle::Gone | Lifecycle::EofSent)
    }

    pub(crate) fn assert_invariants(&self) {
        if cfg!(debug_assertions) {
            self.send.assert_invariants();
            if self.life == Lifecycle::Gone {
                debug_assert!(self.send.is_empty(), "a stream off the wire sends nothing");
                debug_assert!(self.end.is_some(), "a stream off the wire has an end");
            }
            debug_assert!(
                !self.peer_fin || self.half_close,
                "a peer's Fin counts only with half-close"
            );
            if self.life == Lifecycle::FinSent {
                debug_assert!(self.fin_sent, "FinSent after a Fin");
                debug_assert!(self.half_close, "Fin is sent only with half-close");
                debug_assert!(self.send.is_empty(), "no Data after our Fin");
                debug_assert!(!self.peer_fin, "both Fins: the stream is off the wire");
            }
            if self.life == Lifecycle::EofSent {
                debug_assert!(self.send.is_empty(), "no Data after our EOF");
            }
        }
    }
}
