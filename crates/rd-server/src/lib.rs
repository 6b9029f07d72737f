//! rd-server: the server side of a Rancher remotedialer tunnel.
//!
//! A [`Server`] accepts websocket tunnels from clients ([`Server::handle`], a plain async
//! function from `http::Request` to `http::Response`, so it mounts in hyper, axum or any
//! tower stack), keeps the sessions by client key, and dials *through* them with
//! [`Server::dialer`]. Servers can peer with each other (Go-compatible HA), and count
//! what they do in Prometheus [`Metrics`].
//!
//! ```no_run
//! use rd_server::{Server, TunnelIdHeader};
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder(TunnelIdHeader).build();
//! // ... serve `server.handle(request)` at /connect with hyper ...
//! let mut stream = server.dialer("foo").dial("tcp", "127.0.0.1:8125").await?;
//! stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
mod agent_auth;
mod auth;
mod cert_auth;
mod dialer;
mod drain;
mod events;
pub mod gateway;
mod guards;
mod headers;
mod lifecycle;
mod log_limit;
mod metrics;
mod metrics_udp;
mod peers;
mod registry;
mod server;
mod upgrade;

// The gateway's modules at the paths they had before they moved under `gateway`.
pub use gateway::{connect, forward, forward_udp, proxy, proxy_protocol, socks5, splice};

pub use agent_auth::{AgentTokens, TokenFileError, AGENT_TOKEN_HEADER};
pub use auth::{
    text_response, Authorization, Authorizer, ErrorWriter, PlainTextErrors, TunnelIdHeader,
};
pub use cert_auth::{
    certificate_agent_id, CertificateIdError, ClientCertificates, PeerCertificate,
};
pub use dialer::{
    DialError, Dialer, TimedStream, TunnelConnection, TunnelInfo, DEFAULT_CONNECT_WAIT,
};
pub use drain::DrainReport;
pub use events::ServerEvents;
pub use gateway::proxy_protocol::LocalAddr;
pub use headers::{ASK_SERVER_ID_HEADER, PEER_ID_HEADER, PEER_TOKEN_HEADER, SERVER_ID_HEADER};
pub use metrics::{GoCounter, Metrics};
pub use metrics_udp::UdpMetrics;
pub use peers::{
    DnsResolver, InvalidDiscovery, PeerDiscovery, PeerLinkInfo, Resolve, ResolveError,
    ResolveFuture, DEFAULT_DISCOVERY_INTERVAL,
};
pub use server::{
    RemoteAddr, Server, ServerBuilder, DEFAULT_HANDSHAKE_RETRY_AFTER,
    DEFAULT_MAX_PENDING_HANDSHAKES, DEFAULT_MAX_SESSIONS_PER_CLIENT, DEFAULT_WS_READ_BUFFER,
    DEFAULT_WS_READ_BURST,
};

/// Longest client id quoted whole in error bodies and log lines.
const SHORT_ID: usize = 128;

/// A client id as error bodies and log lines quote it: whole up to 128 bytes, else its
/// start and how much was left out. Whoever sends a request chooses the id, and a 10 KB id
/// echoed whole makes every error body and log line 10 KB.
pub fn short_id(id: &str) -> std::borrow::Cow<'_, str> {
    if id.len() <= SHORT_ID {
        return id.into();
    }
    let mut end = SHORT_ID;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &id[..end], id.len()).into()
}

/// A duration in milliseconds with at most three decimals, for log lines
/// (`duration_ms=1.906`, not `1.9066459999999998`).
pub(crate) fn duration_ms(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Errors inside response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every handler here.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
