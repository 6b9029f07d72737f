//! One websocket connection attempt: TCP, optional proxy tunnel, optional TLS, HTTP upgrade.

use std::{future::Future, time::Duration};

use crate::{Extensions, EXTENSIONS_HEADER};
use http::{header, HeaderMap, HeaderName};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::TlsConnector;
use tungstenite::{client::IntoClientRequest as _, handshake::client::Request};

use super::{
    proxy::{connect_tunnel, ProxyMode, ProxyScheme},
    target::{join_host_port, Target},
    tls::{build_client_config, server_name, TlsOptions},
    ConnectError, ConnectStage, TransportStream,
};

/// Go's `HandshakeTimeOut` for remotedialer clients and peers.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// tungstenite's default message limit. Go's remotedialer sets no limit, but its messages are
/// small (data chunks of a few KiB), so this only stops a misbehaving server.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Gorilla's cap on the rejected-handshake body it keeps for the error log.
const MAX_REJECTED_BODY: usize = 1024;

/// A client websocket as returned by [`connect_websocket`]: the connection after the
/// handshake, with the bytes the handshake read past the server's `101` head.
pub type ClientWebSocket = crate::WebSocketIo<TransportStream>;

/// How [`connect_websocket`] connects. The default matches Go's remotedialer client with a
/// `nil` dialer: proxy from the environment, system roots, 10 s handshake timeout.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Extra headers for the upgrade request, e.g. `X-Tunnel-ID` or `Authorization`.
    ///
    /// A `Host` value replaces the one derived from the URL; `Upgrade`, `Connection`,
    /// `Sec-WebSocket-Key`, `Sec-WebSocket-Version` and `Sec-WebSocket-Extensions` are refused,
    /// as gorilla refuses them.
    pub headers: HeaderMap,
    /// Certificate checking for `wss://`.
    pub tls: TlsOptions,
    /// Proxy selection.
    pub proxy: ProxyMode,
    /// Bound on the whole attempt: resolving, TCP, proxy, TLS and the upgrade (Go's dialer
    /// applies its `HandshakeTimeout` the same way).
    pub handshake_timeout: Duration,
    /// Largest websocket message (and frame) accepted from the server; `None` for no limit.
    pub max_message_size: Option<usize>,
    /// rd protocol extensions to offer (`X-Rd-Extensions`); in force only if the server
    /// accepts them, see [`connect_websocket_negotiated`]. None by default: a caller that
    /// runs its own session over the websocket must apply what was negotiated.
    pub extensions: Extensions,
    /// Connect to this address instead of resolving the URL's host (one of a name's several
    /// addresses, say); the `Host` header and the TLS server name stay the URL's. Ignored
    /// when a proxy is used (the proxy resolves the name).
    pub connect_to: Option<std::net::SocketAddr>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            headers: HeaderMap::new(),
            tls: TlsOptions::default(),
            proxy: ProxyMode::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_message_size: Some(DEFAULT_MAX_MESSAGE_SIZE),
            extensions: Extensions::NONE,
            connect_to: None,
        }
    }
}

impl ConnectOptions {
    /// Replaces [`headers`](Self::headers).
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Replaces [`tls`](Self::tls).
    #[must_use]
    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// Replaces [`proxy`](Self::proxy).
    #[must_use]
    pub fn with_proxy(mut self, proxy: ProxyMode) -> Self {
        self.proxy = proxy;
        self
    }

    /// Replaces [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Replaces [`max_message_size`](Self::max_message_size).
    #[must_use]
    pub fn with_max_message_size(mut self, limit: Option<usize>) -> Self {
        self.max_message_size = limit;
        self
    }

    /// Replaces [`connect_to`](Self::connect_to).
    #[must_use]
    pub fn with_connect_to(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.connect_to = addr;
        self
    }

    /// Replaces [`extensions`](Self::extensions).
    #[must_use]
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }
}

/// Opens a client websocket to `url` (`ws://`, `wss://`, or `http://`/`https://` as aliases).
///
/// The socket has `TCP_NODELAY` set, as Go sets it on every TCP connection. Dropping the
/// future abandons the attempt and closes whatever socket was open.
pub async fn connect_websocket(
    url: &str,
    opts: &ConnectOptions,
) -> Result<ClientWebSocket, ConnectError> {
    Ok(connect_websocket_negotiated(url, opts).await?.0)
}

/// [`connect_websocket`], offering [`ConnectOptions::extensions`]: returns the websocket and
/// the extensions the server accepted (none from a Go server), to give to the session
/// ([`SessionBuilder::extensions`](crate::SessionBuilder::extensions)).
pub async fn connect_websocket_negotiated(
    url: &str,
    opts: &ConnectOptions,
) -> Result<(ClientWebSocket, Extensions), ConnectError> {
    let (ws, extensions, _) = connect_websocket_with_headers(url, opts).await?;
    Ok((ws, extensions))
}

/// [`connect_websocket_negotiated`], also returning the headers of the server's `101`
/// response (rd-server's peer links read the peer's id from them).
pub async fn connect_websocket_with_headers(
    url: &str,
    opts: &ConnectOptions,
) -> Result<(ClientWebSocket, Extensions, HeaderMap), ConnectError> {
    let target = Target::parse(url)?;
    let mut request = build_request(&target, &opts.headers)?;
    if let Some(offer) = opts.extensions.header_value() {
        request.headers_mut().insert(EXTENSIONS_HEADER, offer);
    }
    let proxy = opts
        .proxy
        .proxy_for(target.secure, &target.host, target.port)?;
    if let Some(proxy) = &proxy {
        if proxy.scheme() != ProxyScheme::Http {
            return Err(ConnectError::InvalidProxy {
                proxy: proxy.to_string(),
                reason: "only http:// proxies are supported",
            });
        }
    }
    // Local configuration errors (an unreadable CA file) are reported before any network
    // traffic and do not count against the handshake timeout.
    let tls = if target.secure {
        Some((
            TlsConnector::from(build_client_config(&opts.tls).await?),
            server_name(&target.host)?,
        ))
    } else {
        None
    };

    let deadline = Bounds {
        deadline: Instant::now() + opts.handshake_timeout,
        timeout: opts.handshake_timeout,
    };
    tracing::debug!(%url, proxy = ?proxy.as_ref().map(ToString::to_string), "connecting websocket");

    let tcp = match &proxy {
        None => match opts.connect_to {
            // An IP literal: no lookup.
            Some(addr) => tcp_connect(&deadline, &addr.ip().to_string(), addr.port()).await?,
            None => tcp_connect(&deadline, &target.host, target.port).await?,
        },
        Some(proxy) => {
            let mut tcp = tcp_connect(&deadline, proxy.host(), proxy.port()).await?;
            deadline
                .run(
                    ConnectStage::Proxy,
                    connect_tunnel(&mut tcp, proxy, &target.host_port()),
                )
                .await?;
            tcp
        }
    };

    let stream = match tls {
        None => TransportStream::Plain(tcp),
        Some((connector, name)) => {
            let tls = deadline
                .run(ConnectStage::Tls, async {
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|source| ConnectError::Tls {
                            server: target.host.clone(),
                            source,
                        })
                })
                .await?;
            TransportStream::Tls(Box::new(tls))
        }
    };

    // The same buffers and limits as the server side's tunnel websockets.
    let max_message_size = opts.max_message_size.unwrap_or(usize::MAX);
    let config = crate::websocket_config(max_message_size);
    let (ws, response) = deadline
        .run(ConnectStage::WebSocket, async {
            let recorded = crate::websocket::Recorder::new(stream);
            tokio_tungstenite::client_async_with_config(request, recorded, Some(config))
                .await
                .map_err(handshake_error)
        })
        .await?;
    // The session reads the frames itself, starting with any the server sent right behind
    // its 101 (its first ping, say), which tungstenite read with the head.
    let (stream, read_ahead) = ws.into_inner().take();
    let ws = crate::WebSocketIo::new(stream)
        .read_ahead(read_ahead)
        .max_message_size(max_message_size);
    // Only what we offered counts, whatever the server claims.
    let extensions = opts
        .extensions
        .intersect(Extensions::from_headers(response.headers()));
    tracing::debug!(%url, ?extensions, "websocket connected");
    Ok((ws, extensions, response.into_parts().0.headers))
}

/// One deadline shared by all steps, so that the timeout bounds the whole attempt.
struct Bounds {
    deadline: Instant,
    timeout: Duration,
}

impl Bounds {
    async fn run<T>(
        &self,
        stage: ConnectStage,
        step: impl Future<Output = Result<T, ConnectError>>,
    ) -> Result<T, ConnectError> {
        tokio::time::timeout_at(self.deadline, step)
            .await
            .map_err(|_| ConnectError::Timeout {
                stage,
                timeout: self.timeout,
            })?
    }
}

/// Resolves `host` and tries its addresses in order, like Go's dialer without Happy Eyeballs.
async fn tcp_connect(bounds: &Bounds, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let host_port = join_host_port(host, port);
    let addrs: Vec<_> = bounds
        .run(ConnectStage::Resolve, async {
            tokio::net::lookup_host((host, port))
                .await
                .map(Iterator::collect)
                .map_err(|source| ConnectError::Resolve {
                    host: host_port.clone(),
                    source,
                })
        })
        .await?;
    bounds
        .run(ConnectStage::Tcp, async {
            let mut last = ConnectError::Resolve {
                host: host_port.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses found"),
            };
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        // No Nagle delay for small control messages (pings, Connect), and
                        // bounded kernel buffers so Pause takes effect promptly.
                        crate::tune_tunnel_socket(&stream).map_err(|source| ConnectError::Tcp {
                            addr: addr.to_string(),
                            source,
                        })?;
                        return Ok(stream);
                    }
                    Err(source) => {
                        tracing::debug!(%addr, error = %source, "tcp connect failed");
                        last = ConnectError::Tcp {
                            addr: addr.to_string(),
                            source,
                        };
                    }
                }
            }
            Err(last)
        })
        .await
}

/// The upgrade request: tungstenite's standard headers plus the caller's.
fn build_request(target: &Target, extra: &HeaderMap) -> Result<Request, ConnectError> {
    const RESERVED: [HeaderName; 5] = [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ];
    let mut request = target
        .request_uri
        .clone()
        .into_client_request()
        .map_err(|_| ConnectError::InvalidUrl {
            url: target.request_uri.to_string(),
            reason: "not accepted as a websocket request",
        })?;
    let headers = request.headers_mut();
    for name in extra.keys() {
        if RESERVED.contains(name) {
            return Err(ConnectError::InvalidHeader {
                name: name.to_string(),
                reason: "it is set by the websocket handshake",
            });
        }
        let mut values = extra.get_all(name).iter();
        if name == header::HOST {
            // Gorilla uses the first Host value as the request's host.
            if let Some(host) = values.next() {
                headers.insert(header::HOST, host.clone());
            }
        } else {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    Ok(request)
}

fn handshake_error(error: tungstenite::Error) -> ConnectError {
    match error {
        tungstenite::Error::Http(response) => {
            let (parts, body) = (*response).into_parts();
            let body = body
                .map(|raw| rejected_body(&parts.headers, &raw))
                .unwrap_or_default();
            ConnectError::Rejected {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        }
        source => ConnectError::Handshake { source },
    }
}

/// The readable start of a rejected upgrade's body.
///
/// tungstenite hands over the bytes that arrived with the response head, which may be the
/// start of the next message on a kept-alive connection or chunked framing; use
/// `Content-Length` to cut, and undo chunking when it is announced.
fn rejected_body(headers: &HeaderMap, raw: &[u8]) -> String {
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(raw)
    } else {
        let len = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(raw.len());
        raw[..len.min(raw.len())].to_vec()
    };
    let body = &body[..body.len().min(MAX_REJECTED_BODY)];
    String::from_utf8_lossy(body).into_owned()
}

/// Decodes as much chunked transfer coding as is present; stops at the last chunk or at the
/// first incomplete one.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|line| usize::from_str_radix(line.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        let data = &raw[line_end + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        if take < size || data.len() < size + 2 {
            break;
        }
        raw = &data[size + 2..];
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    #[test]
    fn request_headers() {
        let target = Target::parse("https://example.com:8443/connect").unwrap();
        let mut extra = HeaderMap::new();
        extra.insert("x-tunnel-id", HeaderValue::from_static("abc"));
        extra.append("x-multi", HeaderValue::from_static("1"));
        extra.append("x-multi", HeaderValue::from_static("2"));
        let req = build_request(&target, &extra).unwrap();
        assert_eq!(req.uri().to_string(), "wss://example.com:8443/connect");
        assert_eq!(req.headers()["host"], "example.com:8443");
        assert_eq!(req.headers()["x-tunnel-id"], "abc");
        assert_eq!(req.headers().get_all("x-multi").iter().count(), 2);

        extra.insert(header::HOST, HeaderValue::from_static("other.example"));
        let req = build_request(&target, &extra).unwrap();
        assert_eq!(req.headers().get_all(header::HOST).iter().count(), 1);
        assert_eq!(req.headers()["host"], "other.example");

        let mut bad = HeaderMap::new();
        bad.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("x"));
        assert!(matches!(
            build_request(&target, &bad),
            Err(ConnectError::InvalidHeader { .. })
        ));
    }

    #[test]
    fn rejected_body_is_cut_and_dechunked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(rejected_body(&h, b"failedHTTP/1.1 200"), "failed");

        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert_eq!(
            rejected_body(&h, b"6\r\nfailed\r\n5\r\n auth\r\n0\r\n\r\n"),
            "failed auth"
        );
        assert_eq!(rejected_body(&h, b"6\r\nfai"), "fai");

        let long = vec![b'x'; 5000];
        assert_eq!(
            rejected_body(&HeaderMap::new(), &long).len(),
            MAX_REJECTED_BODY
        );
    }
}
