//! The HTTP headers of the handshakes: Go's peer headers and rd's own, in one place that
//! both the server and its peer links import.

/// Header a peer server sends its id in (Go's `remotedialer.ID`).
pub const PEER_ID_HEADER: &str = "X-API-Tunnel-ID";
/// Header a peer server sends the shared token in (Go's `remotedialer.Token`).
pub const PEER_TOKEN_HEADER: &str = "X-API-Tunnel-Token";
/// Header an rd server's outgoing peer link sends to ask the server it reaches for its id
/// (in [`SERVER_ID_HEADER`]). Go servers ignore it; Go peers never send it, so they never
/// get the answer.
pub const ASK_SERVER_ID_HEADER: &str = "X-Rd-Ask-Server-Id";
/// Header of an rd server's answer to a peer upgrade that sent [`ASK_SERVER_ID_HEADER`], or
/// to an agent that negotiated the replicas extension: its own peer id. With `409 Conflict`
/// it means "you reached yourself" (a peer link) or "you hold a session here already" (an
/// agent).
pub use rd_session::SERVER_ID_HEADER;
