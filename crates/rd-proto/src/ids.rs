//! The identifiers on the wire: a virtual connection's id, and a client session as peer
//! servers announce it.

use std::fmt;

/// A virtual connection id, allocated by the side that sends Connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub i64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A client session announced over a peer link: `clientKey/sessionKey`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientSession {
    /// The client key (the example server's `X-Tunnel-ID`, Rancher's cluster name).
    pub client_key: String,
    /// The announcing server's key for that session, a non-negative 63-bit number in Go.
    pub session_key: i64,
}

impl fmt::Display for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.client_key, self.session_key)
    }
}
