//! What a session tells its application ([`Event`]) and which of its limits a peer hit
//! ([`Limit`]).

use crate::error::{SessionEnd, StreamEnd};
use crate::ids::{ClientSession, ConnId};
use crate::target::Target;

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer sent Connect; answer with [`Session::reset`](crate::Session::reset) to
    /// refuse, or start using the stream. Data that arrives meanwhile is buffered.
    StreamRequested {
        /// The new stream.
        id: ConnId,
        /// Where the peer wants it dialed.
        target: Target,
    },
    /// A reader that was told [`StreamError::Blocked`](crate::StreamError::Blocked) can read
    /// now.
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
    /// A writer that was told [`StreamError::Blocked`](crate::StreamError::Blocked) can write
    /// (or flush) now.
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

/// A [`Config`](crate::Config) limit that the peer hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`Config::stream_receive_cap`](crate::Config::stream_receive_cap): a stream was reset,
    /// the peer ignored Pause (or its credit).
    StreamReceiveCap,
    /// [`Config::session_receive_cap`](crate::Config::session_receive_cap): a stream was
    /// reset for the session's sake.
    SessionReceiveCap,
    /// [`Config::max_streams`](crate::Config::max_streams): a Connect was refused.
    MaxStreams,
    /// [`Config::session_receive_ceiling`](crate::Config::session_receive_ceiling): the
    /// session stopped reading the websocket until readers catch up (the last resort; every
    /// stream of the session waits).
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
