//! [`ServerEvents`]: what a gateway built on a [`Server`](crate::Server) hears about the
//! server's life, through [`Server::subscribe`](crate::Server::subscribe).
//!
//! rd's own gateway (the `/client` proxy, CONNECT, SOCKS5, forwards) uses nothing else, so
//! a library user's gateway can do all it does: the `/client` proxy drops its pooled
//! streams when the server begins to drain, when an agent's session registers here, and
//! when a peer withdraws an agent's session; forwards stop with
//! [`Server::shutdown_token`](crate::Server::shutdown_token).

/// Callbacks a gateway registers with [`Server::subscribe`](crate::Server::subscribe).
///
/// They run synchronously on the task that caused the event (a drain, a handshake, a
/// peer link's reader), so they must be quick and must not block: take a lock, drop
/// something, notify a task. Every method has an empty default.
pub trait ServerEvents: Send + Sync + 'static {
    /// The server began to drain ([`Server::begin_drain`](crate::Server::begin_drain)):
    /// new sessions are refused and new streams go to a peer where one holds the agent.
    /// Called once; at once, on the subscribing task, when the drain began before.
    fn draining(&self) {}

    /// A session of `client_key` registered here (a new or reconnected agent).
    fn session_added(&self, _client_key: &str) {}

    /// A peer withdrew its session of `client_key` (the agent left it, or the peer drains).
    fn peer_withdrew(&self, _client_key: &str) {}

    /// The server began to shut down ([`Server::shutdown`](crate::Server::shutdown)).
    /// Called once; at once when the shutdown began before.
    fn shutting_down(&self) {}
}
