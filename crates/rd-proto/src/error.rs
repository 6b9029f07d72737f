//! Every error of the crate, by who caused it (h2's `Initiator`, quinn's per-operation
//! enums): a peer whose bytes do not decode ([`DecodeError`], [`TargetError`]) or that breaks
//! the protocol ([`ProtocolError`]); the application asking for what cannot be done
//! ([`StreamError`], [`OpenError`]); a [`Config`](crate::Config) that contradicts itself
//! ([`ConfigError`]). Beside them, how a stream and a session end ([`StreamEnd`],
//! [`SessionEnd`]): the reasons streams' reads and the runtime report.

use std::fmt;
use std::time::Duration;

use crate::ids::ConnId;

/// Which header field a decode error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderField {
    /// The message id.
    MessageId,
    /// The connection id.
    ConnId,
    /// The message type.
    Type,
    /// The legacy deadline of Data and Connect.
    Deadline,
    /// The increment of rd's Credit message.
    Credit,
    /// The count of rd's Replicas message.
    Replicas,
}

impl fmt::Display for HeaderField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MessageId => "message id",
            Self::ConnId => "connection id",
            Self::Type => "message type",
            Self::Deadline => "legacy deadline",
            Self::Credit => "credit increment",
            Self::Replicas => "replica count",
        })
    }
}

/// A message that cannot be decoded.
///
/// Only [`DecodeError::BadConnect`] concerns a single connection (see [`DecodeError::conn_id`]);
/// every other variant means the peer speaks something other than the protocol, and Go ends
/// the session for each of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended inside a header varint.
    #[error("truncated header: the {field} is missing or cut short")]
    Truncated {
        /// The field being read.
        field: HeaderField,
    },
    /// A header varint is longer than 10 bytes or does not fit in 64 bits.
    #[error("the {field} varint overflows 64 bits")]
    VarintOverflow {
        /// The field being read.
        field: HeaderField,
    },
    /// A Connect whose payload is not `proto/address`; the session answers with an Error.
    #[error("invalid connect for connection {conn_id}: {reason}")]
    BadConnect {
        /// The connection the peer tried to open.
        conn_id: ConnId,
        /// What is wrong with the payload.
        reason: TargetError,
    },
    /// AddClient/RemoveClient payload that is not `clientKey/sessionKey`.
    #[error("invalid remote session {payload:?}: {reason}")]
    BadClientSession {
        /// The (truncated) payload, lossily decoded.
        payload: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A SyncConnections payload whose length is not a multiple of 8.
    #[error(
        "incorrect data format: SyncConnections payload of {len} bytes is not a multiple of 8"
    )]
    BadSyncLength {
        /// The payload length.
        len: usize,
    },
    /// A Credit increment that is negative or does not fit in 32 bits.
    #[error("invalid credit increment {increment}")]
    BadCredit {
        /// The decoded value.
        increment: i64,
    },
    /// A Replicas count that is not between 1 and 2^32-1.
    #[error("invalid replica count {count}")]
    BadReplicas {
        /// The decoded value.
        count: i64,
    },
}

impl DecodeError {
    /// The connection a connection-level error is about; `None` for session-level errors.
    pub fn conn_id(&self) -> Option<ConnId> {
        match self {
            Self::BadConnect { conn_id, .. } => Some(*conn_id),
            _ => None,
        }
    }
}

/// Why a Connect payload is not a usable target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// No `/` separates proto from address.
    #[error("failed to parse connect address: no '/' in {payload:?}")]
    MissingSlash {
        /// The payload, lossily decoded.
        payload: String,
    },
    /// The payload is longer than receivers accept.
    #[error("connect address of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Payload length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not UTF-8.
    #[error("connect address is not valid UTF-8")]
    NotUtf8,
    /// The proto or the address is empty.
    #[error("connect address {payload:?} has an empty {part}")]
    Empty {
        /// Which part is empty: `proto`, `address` or `client key`.
        part: &'static str,
        /// The payload.
        payload: String,
    },
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
    /// nothing at all within [`Config::answer_timeout`](crate::Config::answer_timeout): the
    /// link is dead.
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

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The peer sent Error `EOF` (or, with half-close, both sides sent Fin): a clean end.
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

/// [`Session::open_stream`](crate::Session::open_stream) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The session has ended.
    #[error("session closed: {0}")]
    SessionClosed(SessionEnd),
    /// [`Config::max_streams`](crate::Config::max_streams) streams are live.
    #[error("too many streams: limit {0}")]
    TooManyStreams(usize),
    /// [`Config::max_pending_dials`](crate::Config::max_pending_dials) streams we opened
    /// wait for the peer's first answer.
    #[error("too many dials pending through this session: {0} wait for the peer's answer")]
    TooManyPendingDials(usize),
    /// The peer said it is going away ([`Event::PeerGoingAway`](crate::Event::PeerGoingAway)):
    /// new streams belong on another session.
    #[error("the peer is going away: {0}")]
    PeerGoingAway(String),
}

/// A [`Config`](crate::Config) whose values contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session config: {0}")]
pub struct ConfigError(pub(crate) &'static str);
