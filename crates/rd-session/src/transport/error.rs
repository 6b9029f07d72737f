//! The error type of a connection attempt.

use std::{fmt, io, path::PathBuf, time::Duration};

use http::{HeaderMap, StatusCode};

/// The step of a connection attempt that was running when the handshake timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStage {
    /// Resolving the server's or the proxy's host name.
    Resolve,
    /// Opening the TCP connection to the server or the proxy.
    Tcp,
    /// Exchanging the `CONNECT` request and response with an HTTP proxy.
    Proxy,
    /// The TLS handshake with the server.
    Tls,
    /// The HTTP upgrade request and response.
    WebSocket,
}

impl fmt::Display for ConnectStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Resolve => "name resolution",
            Self::Tcp => "tcp connect",
            Self::Proxy => "proxy connect",
            Self::Tls => "tls handshake",
            Self::WebSocket => "websocket handshake",
        })
    }
}

/// Why [`connect_websocket`](super::connect_websocket) failed.
///
/// Variants that wrap a lower-level error return it from [`std::error::Error::source`] and do
/// not repeat its text in `Display`; log the whole chain to see it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not an absolute `ws`, `wss`, `http` or `https` URL with a host.
    #[error("invalid websocket url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A caller-supplied header cannot be sent on the upgrade request.
    #[error("header {name} cannot be set by the caller: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// The configured proxy cannot be used (bad URL, unsupported scheme, CGI environment).
    #[error("cannot use proxy {proxy:?}: {reason}")]
    InvalidProxy {
        /// The proxy as configured (credentials removed).
        proxy: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The host name of the server or of the proxy could not be resolved.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The `host:port` that was looked up.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },

    /// No TCP connection could be opened to the server or the proxy.
    #[error("tcp connect to {addr} failed")]
    Tcp {
        /// The last socket address tried (or `host:port` if it resolved to nothing).
        addr: String,
        /// The error of the last attempt.
        #[source]
        source: io::Error,
    },

    /// Reading from or writing to the proxy failed during the `CONNECT` exchange.
    #[error("i/o error talking to proxy {proxy}")]
    ProxyIo {
        /// The proxy's `host:port`.
        proxy: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The proxy's answer to `CONNECT` was not a well-formed HTTP response.
    #[error("malformed response from proxy {proxy}: {reason}")]
    ProxyProtocol {
        /// The proxy's `host:port`.
        proxy: String,
        /// What was wrong with the response.
        reason: &'static str,
    },

    /// The proxy answered `CONNECT` with a non-2xx status.
    #[error("proxy {proxy} refused to connect to {target}: {status} {reason}")]
    ProxyRefused {
        /// The proxy's `host:port`.
        proxy: String,
        /// The `host:port` we asked the proxy to connect to.
        target: String,
        /// The status code of the proxy's response.
        status: u16,
        /// The reason phrase of the proxy's response.
        reason: String,
    },

    /// The TLS client configuration could not be built.
    #[error("invalid tls configuration: {reason}")]
    TlsConfig {
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An extra CA file could not be read or holds no usable certificate.
    #[error("cannot load ca certificates from {}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The read or parse error.
        #[source]
        source: io::Error,
    },

    /// The client certificate or its key could not be read, hold nothing usable, or do not
    /// belong together.
    #[error("cannot load the client certificate from {}", path.display())]
    ClientCert {
        /// The file at fault (the key file when the two do not match).
        path: PathBuf,
        /// The read or parse error.
        #[source]
        source: io::Error,
    },

    /// The TLS handshake with the server failed (for example the certificate was not trusted).
    #[error("tls handshake with {server} failed")]
    Tls {
        /// The name the certificate was checked against.
        server: String,
        /// The error from rustls, wrapped in `io::Error` by tokio-rustls.
        #[source]
        source: io::Error,
    },

    /// The whole attempt took longer than the handshake timeout.
    #[error("connect timed out after {timeout:?} during {stage}")]
    Timeout {
        /// What was running when time ran out.
        stage: ConnectStage,
        /// The configured handshake timeout.
        timeout: Duration,
    },

    /// The server answered the upgrade request with an HTTP status other than 101.
    ///
    /// Go's client logs this case as "Failed to connect to proxy. Response status: ...
    /// Response body: ...". remotedialer servers answer `401` with body
    /// `failed authentication` when the authorizer refuses the client.
    #[error("websocket handshake rejected: response status {status}, response body {body:?}")]
    Rejected {
        /// The response status.
        status: StatusCode,
        /// The response headers.
        headers: HeaderMap,
        /// The start of the response body (at most 1024 bytes, like gorilla), lossily decoded
        /// as UTF-8. Only the part that arrived together with the headers is available.
        body: String,
    },

    /// The websocket handshake failed for another reason (I/O error, invalid 101 response).
    #[error("websocket handshake failed")]
    Handshake {
        /// The error from tungstenite.
        #[source]
        source: tungstenite::Error,
    },
}

impl ConnectError {
    /// True when the server refused the client's credentials (HTTP 401 or 403).
    ///
    /// Retrying with the same credentials is pointless; callers may want a longer delay or to
    /// give up.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Self::Rejected { status, .. }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN
        )
    }

    /// The `Retry-After` of a rejected upgrade, in delta-seconds (what rd-server sends with
    /// `503` when its handshake admission is full); `None` without one or with an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected { headers, .. } => headers
                .get(http::header::RETRY_AFTER)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs),
            _ => None,
        }
    }

    /// The HTTP status with which the server rejected the upgrade, if that is what happened.
    pub fn rejected_status(&self) -> Option<StatusCode> {
        match self {
            Self::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}
