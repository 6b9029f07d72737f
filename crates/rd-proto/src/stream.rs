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

/// Where a stream is in its life, as the websocket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Both directions open.
    Open,
    /// The application finished: Error `EOF` goes out once queued Data has.
    Finishing,
    /// Error `EOF` sent; we still take Data until the peer's Error arrives.
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
    pub(crate) end: Option<StreamEnd>,
    pub(crate) recv: RecvHalf,
    pub(crate) send: SendHalf,
    /// In the ready queue.
    pub(crate) scheduled: bool,
    /// The application dropped its handle.
    pub(crate) released: bool,
}

impl Stream {
    pub(crate) fn new(target: Target, origin: Origin, now: Instant, config: &Config) -> Self {
        Self {
            target,
            origin,
            opened_at: now,
            life: Lifecycle::Open,
            end: None,
            recv: RecvHalf::new(config),
            send: SendHalf::new(config.credit),
            scheduled: false,
            released: false,
        }
    }

    /// Whether Data from the peer is still expected.
    pub(crate) fn receiving(&self) -> bool {
        self.life != Lifecycle::Gone
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
        self.released && matches!(self.life, Lifecycle::Gone | Lifecycle::FinSent)
    }

    pub(crate) fn assert_invariants(&self) {
        if cfg!(debug_assertions) {
            self.send.assert_invariants();
            if self.life == Lifecycle::Gone {
                debug_assert!(self.send.is_empty(), "a stream off the wire sends nothing");
                debug_assert!(self.end.is_some(), "a stream off the wire has an end");
            }
        }
    }
}
