//! Opening the client websocket: URL handling, proxies, TLS and the HTTP upgrade.
//!
//! This is the equivalent of gorilla's `websocket.Dialer` as remotedialer's client uses it
//! (docs/protocol.md, "Transport"). [`connect_websocket`] makes one attempt and classifies
//! its failure in [`ConnectError`]; retrying is the caller's business.
//!
//! Proxies: [`ProxyMode::FromEnv`] follows Go's `http.ProxyFromEnvironment`, including its rule
//! that `localhost` and loopback addresses are never proxied. Only `http://` proxies are
//! supported (`CONNECT` with optional Basic credentials); `https://` and `socks5://` proxies
//! are refused with [`ConnectError::InvalidProxy`].

mod connect;
mod error;
mod no_proxy;
mod proxy;
mod stream;
mod target;
mod tls;

pub use connect::{
    connect_websocket, connect_websocket_negotiated, connect_websocket_with_headers,
    ClientWebSocket, ConnectOptions, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE,
};
pub use error::{ConnectError, ConnectStage};
pub use no_proxy::NoProxy;
pub use proxy::{InvalidProxySetting, ProxyEnv, ProxyMode, ProxyScheme, ProxyUrl};
pub use stream::TransportStream;
pub use tls::{build_client_config, ClientCertFiles, TlsOptions};

/// Checks a websocket URL the way [`connect_websocket`] reads it (scheme `ws`, `wss`, `http`
/// or `https`, a host, no user information) without connecting: for start-up checks.
pub fn validate_url(url: &str) -> Result<(), ConnectError> {
    target::Target::parse(url).map(|_| ())
}
