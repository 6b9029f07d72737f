//! One virtual connection's state inside a [`Session`](crate::Session).

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use bytes::Bytes;

use crate::flow::RecvFlow;
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

/// What the websocket knows of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// Both directions open.
    Open,
    /// The application finished: Error `EOF` goes out once queued Data has.
    FinQueued,
    /// Error `EOF` sent; we still take Data until the peer's Error arrives.
    FinSent,
    /// Gone from the wire; the entry only serves the application's last reads.
    Gone,
}

/// Per-stream state. Fields are crate-visible; [`crate::Session`] keeps them consistent.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) target: Target,
    pub(crate) origin: Origin,
    pub(crate) opened_at: Instant,
    pub(crate) wire: Wire,
    pub(crate) end: Option<StreamEnd>,
    pub(crate) recv: VecDeque<Bytes>,
    pub(crate) flow: RecvFlow,
    /// Encoded Data messages with their payload lengths.
    pub(crate) send: VecDeque<(Bytes, usize)>,
    pub(crate) send_queued: usize,
    pub(crate) paused_by_peer: bool,
    pub(crate) scheduled: bool,
    pub(crate) reader_waiting: bool,
    pub(crate) writer_waiting: bool,
    pub(crate) released: bool,
}

impl Stream {
    pub(crate) fn new(target: Target, origin: Origin, now: Instant) -> Self {
        Self {
            target,
            origin,
            opened_at: now,
            wire: Wire::Open,
            end: None,
            recv: VecDeque::new(),
            flow: RecvFlow::default(),
            send: VecDeque::new(),
            send_queued: 0,
            paused_by_peer: false,
            scheduled: false,
            reader_waiting: false,
            writer_waiting: false,
            released: false,
        }
    }

    /// Whether Data from the peer is still expected.
    pub(crate) fn receiving(&self) -> bool {
        self.wire != Wire::Gone
    }

    /// Whether the scheduler has something to send for this stream right now. A released
    /// stream ignores the peer's Pause: like Go's `Close`, which sends its Error whatever the
    /// pause state, it must get its EOF out (after at most a send buffer of Data the writer
    /// was already told was written), or two ends that paused each other never close.
    pub(crate) fn has_output(&self) -> bool {
        (!self.paused_by_peer || self.released)
            && (!self.send.is_empty() || self.wire == Wire::FinQueued)
    }

    /// Whether the entry can be dropped: nothing left for the wire or the application.
    pub(crate) fn is_done(&self) -> bool {
        self.released && matches!(self.wire, Wire::Gone | Wire::FinSent)
    }
}
