//! Errors of the runtime layer and their `io::Error` forms.

use std::io;

use rd_proto::{OpenError, SessionEnd, StreamEnd, TargetError};

/// A stream ended other than cleanly; carried inside the `io::Error`s a
/// [`TunnelStream`](crate::TunnelStream) returns (use `get_ref().downcast_ref()`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{end}")]
pub struct StreamClosed {
    /// How the stream ended.
    pub end: StreamEnd,
}

impl StreamClosed {
    /// The `io::ErrorKind` for an end: refused dials and timeouts keep their meaning so
    /// callers (hyper, retries) can act on them.
    pub fn kind(&self) -> io::ErrorKind {
        match &self.end {
            StreamEnd::PeerError(text) => kind_of_text(text),
            StreamEnd::Finished => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::ConnectionReset,
        }
    }
}

fn kind_of_text(text: &str) -> io::ErrorKind {
    if text.contains("connection refused") {
        io::ErrorKind::ConnectionRefused
    } else if text.contains("timeout")
        || text.contains("timed out")
        || text.contains("deadline exceeded")
    {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::ConnectionReset
    }
}

impl From<StreamClosed> for io::Error {
    fn from(e: StreamClosed) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// An error and its causes as one line, `outer: inner: innermost`, skipping a cause whose
/// text the outer one already contains. Logs and HTTP error bodies need the innermost
/// reason (`dial tcp 127.0.0.1:9: connect: connection refused`, `invalid peer certificate:
/// UnknownIssuer`), which many errors keep in `source()` rather than in their `Display`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// [`SessionHandle::dial`](crate::SessionHandle::dial) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The session has ended.
    #[error("tunnel disconnect: {0}")]
    SessionClosed(SessionEnd),
    /// The session has as many streams as it allows.
    #[error("too many streams on this session: limit {0}")]
    TooManyStreams(usize),
    /// The target cannot be encoded.
    #[error(transparent)]
    InvalidTarget(#[from] TargetError),
    /// The peer said it is going away (replicas extension): open the stream on another
    /// session.
    #[error("the peer is going away: {0}")]
    PeerGoingAway(String),
    /// [`Config::max_pending_dials`](rd_proto::Config::max_pending_dials) dials through the
    /// session still wait for the peer's first answer: the peer is slow or stuck.
    #[error("too many dials pending through this session: {0} wait for the agent's answer")]
    TooManyPendingDials(usize),
    /// A `udp` target on a session without rd's udp extension
    /// ([`Extensions::udp`](crate::Extensions::udp)): the peer is a Go peer or an older rd,
    /// which would dial udp and lose the datagrams' boundaries. Nothing was sent.
    #[error("the peer does not speak rd's udp extension (a Go peer or an older rd): udp cannot be carried through it")]
    UdpNotNegotiated,
}

impl From<OpenError> for DialError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::TooManyStreams(n) => Self::TooManyStreams(n),
            OpenError::SessionClosed(end) => Self::SessionClosed(end),
            OpenError::PeerGoingAway(reason) => Self::PeerGoingAway(reason),
            OpenError::TooManyPendingDials(n) => Self::TooManyPendingDials(n),
            // OpenError is non_exhaustive; anything new means the session cannot dial.
            _ => Self::SessionClosed(SessionEnd::Local),
        }
    }
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        let kind = match e {
            DialError::InvalidTarget(_) => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_peer_text() {
        let k = |text: &str| {
            StreamClosed {
                end: StreamEnd::PeerError(text.into()),
            }
            .kind()
        };
        assert_eq!(
            k("dial tcp 127.0.0.1:9: connect: connection refused"),
            io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            k("dial tcp 10.0.0.1:80: i/o timeout"),
            io::ErrorKind::TimedOut
        );
        assert_eq!(k("context deadline exceeded"), io::ErrorKind::TimedOut);
        assert_eq!(k("boom"), io::ErrorKind::ConnectionReset);
        let gone = io::Error::from(StreamClosed {
            end: StreamEnd::Disconnected,
        });
        assert_eq!(gone.to_string(), "tunnel disconnect");
        assert_eq!(gone.kind(), io::ErrorKind::ConnectionReset);
    }
}
