//! rd-client: the agent side of a Rancher remotedialer tunnel.
//!
//! A [`Client`] dials out to a server's websocket endpoint (`ws://` or `wss://`, through an
//! HTTP proxy from the environment when one is set), then lets the server open connections
//! to targets on this side, within the [`ConnectAuthorizer`] rules. [`Client::run`] keeps a
//! session up with each replica the servers count (one with a Go server), redialing with
//! capped exponential backoff and full jitter.
//!
//! ```no_run
//! use http::{HeaderName, HeaderValue};
//! use rd_client::{AllowRules, Client};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() {
//! let client = Client::builder("ws://localhost:8123/connect")
//!     .header(HeaderName::from_static("x-tunnel-id"), HeaderValue::from_static("foo"))
//!     .allow(AllowRules(vec!["tcp:127.0.0.1:*".parse().unwrap()]))
//!     .build();
//! client.run(CancellationToken::new()).await;
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod allow;
mod client;
mod dial;
mod failover;
mod fleet;
mod udp;

pub use allow::{AllowAll, AllowRule, AllowRuleError, AllowRules, ConnectAuthorizer, DenyAll};
pub use client::{BoxError, Client, ClientBuilder, ClientError, OnConnect, RunEnd, StateObserver};
pub use dial::{LocalDialer, NetDialer, DEFAULT_DIAL_TIMEOUT};
pub use fleet::{HeldSession, InvalidSessionCount, SessionCount};
/// The websocket transport now lives in rd-session, shared with rd-server's peer links;
/// re-exported here so `rd_client::transport::...` paths keep working.
pub use rd_session::transport;
pub use transport::{
    connect_websocket, connect_websocket_negotiated, ConnectError, ConnectOptions, ProxyMode,
    TlsOptions,
};
pub use udp::{dial_udp, UdpRelay};
