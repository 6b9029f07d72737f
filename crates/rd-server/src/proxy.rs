//! The example server's `/client/{id}/{scheme}/{host}/{path...}` route: an HTTP request
//! through the tunnel to a service on the client's side.
//!
//! Go's example only proxies GET and buffers nothing but also copies nothing of the request;
//! this one proxies every method, streams both bodies, forwards end-to-end headers and the
//! query string (minus `timeout`). `timeout` (seconds, default 15 as Go) bounds the dial and
//! the wait for response headers, not the body: Go's bound on the whole exchange would cut
//! large downloads. `https` targets get TLS inside the tunnel, their certificate verified
//! against the system's roots (or [`ClientProxy::tls_options`]), as Go's `http.Transport` does.
//! A request with `Connection: upgrade` keeps its upgrade headers and, once the target
//! answers `101`, both connections are spliced as raw bytes (websockets, `kubectl exec`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rd_client::TlsOptions;

use crate::auth::text_response;
use crate::proxy_connector::{ProxyConnector, TlsSettings};
use crate::{Body, BoxError, Server};

/// How long an idle pooled tunnel stream is kept for reuse (Go's `http.Transport` default).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Default of the `timeout` query parameter, as Go's example.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Headers that belong to one hop, not to the proxied exchange (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A parsed `/client/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPath {
    /// The client key.
    pub client: String,
    /// `http` or `https`.
    pub scheme: String,
    /// `host:port` on the client's side.
    pub host: String,
    /// The path to request, starting with `/`.
    pub path: String,
}

impl ProxyPath {
    /// Parses the part after `/client/`: `{id}/{scheme}/{host}` or `{id}/{scheme}/{host}/{path...}`.
    pub fn parse(rest: &str) -> Option<Self> {
        let mut parts = rest.splitn(4, '/');
        let client = parts.next().filter(|s| !s.is_empty())?;
        let scheme = parts.next().filter(|s| !s.is_empty())?;
        let host = parts.next().filter(|s| !s.is_empty())?;
        let path = parts.next().unwrap_or("");
        Some(Self {
            client: client.to_owned(),
            scheme: scheme.to_owned(),
            host: host.to_owned(),
            path: format!("/{path}"),
        })
    }
}

/// Splits `timeout` out of a query string; returns the rest and the timeout.
fn split_timeout(query: Option<&str>) -> (Option<String>, Result<Duration, String>) {
    let mut timeout = Ok(DEFAULT_TIMEOUT);
    let mut kept = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("timeout=") {
            Some(v) => {
                timeout = v
                    .parse::<u64>()
                    .map(Duration::from_secs)
                    .map_err(|_| format!("invalid timeout {v:?}: want whole seconds"));
            }
            None => kept.push(pair),
        }
    }
    let rest = (!kept.is_empty()).then(|| kept.join("&"));
    (rest, timeout)
}

/// Proxies requests through client tunnels, keeping one pooled HTTP client per client key.
#[derive(Debug)]
pub struct ClientProxy {
    server: Server,
    pool_idle_timeout: Duration,
    tls: Arc<TlsSettings>,
    clients: Mutex<HashMap<String, Client<ProxyConnector, Body>>>,
}

/// Largest read or write buffer of each HTTP connection on either side of the proxy.
pub const PROXY_BUFFER: usize = 64 * 1024;

impl ClientProxy {
    /// A proxy over `server`'s tunnels.
    pub fn new(server: Server) -> Self {
        Self {
            server,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            tls: Arc::new(TlsSettings::new(TlsOptions::default())),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// How `https` targets' certificates are verified (default: the system's roots, as Go).
    pub fn tls_options(mut self, options: TlsOptions) -> Self {
        self.tls = Arc::new(TlsSettings::new(options));
        self
    }

    /// How long an idle tunnel stream is kept for the next request (default 90 s).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    fn client(&self, key: &str) -> Client<ProxyConnector, Body> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(key.to_owned())
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    // hyper's buffers grow to ~400 KiB per connection by default, beyond the
                    // session's receive budget: a few hundred stalled downloads would hold
                    // hundreds of MiB there.
                    .http1_max_buf_size(PROXY_BUFFER)
                    // Without a timer hyper-util never expires idle pooled connections, so
                    // every idle tunnel stream (and the client's socket behind it) would live
                    // as long as the session.
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(self.pool_idle_timeout)
                    .build(ProxyConnector {
                        dialer: self.server.dialer(key),
                        tls: self.tls.clone(),
                    })
            })
            .clone()
    }

    /// Handles a request whose path was `/client/{rest}`.
    pub async fn handle<B>(&self, req: Request<B>, rest: &str) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(target) = ProxyPath::parse(rest) else {
            return text_response(
                StatusCode::NOT_FOUND,
                "want /client/{id}/{scheme}/{host}/{path}".into(),
            );
        };
        if target.scheme != "http" && target.scheme != "https" {
            return text_response(
                StatusCode::BAD_REQUEST,
                format!("unsupported scheme {:?}: want http or https", target.scheme),
            );
        }
        let (query, timeout) = split_timeout(req.uri().query());
        let timeout = match timeout {
            Ok(t) => t,
            Err(text) => return text_response(StatusCode::BAD_REQUEST, text),
        };
        if !self.server.has_session(&target.client) {
            return text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to find Session for client {}", target.client),
            );
        }
        let path_and_query = match query {
            Some(q) => format!("{}?{q}", target.path),
            None => target.path.clone(),
        };
        let uri = match Uri::builder()
            .scheme(target.scheme.as_str())
            .authority(target.host.as_str())
            .path_and_query(path_and_query)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => {
                return text_response(StatusCode::BAD_REQUEST, format!("invalid target: {e}"))
            }
        };
        if crate::proxy_upgrade::wants_upgrade(req.headers()) {
            let started = std::time::Instant::now();
            let method = req.method().clone();
            let connector = ProxyConnector {
                dialer: self.server.dialer(&target.client),
                tls: self.tls.clone(),
            };
            let response =
                crate::proxy_upgrade::forward(connector, req, uri, &target.host, timeout).await;
            tracing::info!(
                client = %target.client,
                %method,
                url = %format!("{}://{}{}", target.scheme, target.host, target.path),
                status = response.status().as_u16(),
                elapsed = ?started.elapsed(),
                "proxied upgrade request"
            );
            return response;
        }
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
        if let Ok(host) = HeaderValue::from_str(&target.host) {
            parts.headers.insert(header::HOST, host);
        }
        let body: Body = body.map_err(Into::into).boxed();
        let request = Request::from_parts(parts, body);
        let started = std::time::Instant::now();
        let method = request.method().clone();
        let result =
            tokio::time::timeout(timeout, self.client(&target.client).request(request)).await;
        let response = match result {
            Err(_) => text_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response from {} within {timeout:?}", target.host),
            ),
            Ok(Err(e)) => text_response(StatusCode::BAD_GATEWAY, rd_session::error_chain(&e)),
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                for h in &HOP_BY_HOP {
                    parts.headers.remove(h);
                }
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
        };
        tracing::info!(
            client = %target.client,
            %method,
            url = %format!("{}://{}{}", target.scheme, target.host, target.path),
            status = response.status().as_u16(),
            elapsed = ?started.elapsed(),
            "proxied request"
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_like_the_go_mux() {
        let p = ProxyPath::parse("foo/http/127.0.0.1:8125/a/b.txt").expect("valid");
        assert_eq!(
            (
                p.client.as_str(),
                p.scheme.as_str(),
                p.host.as_str(),
                p.path.as_str()
            ),
            ("foo", "http", "127.0.0.1:8125", "/a/b.txt")
        );
        assert_eq!(
            ProxyPath::parse("foo/http/127.0.0.1:8125")
                .expect("valid")
                .path,
            "/"
        );
        assert_eq!(
            ProxyPath::parse("foo/http/127.0.0.1:8125/")
                .expect("valid")
                .path,
            "/"
        );
        assert_eq!(ProxyPath::parse("foo/http"), None);
        assert_eq!(ProxyPath::parse("/http/x"), None);
    }

    #[test]
    fn timeout_is_taken_out_of_the_query() {
        let (rest, t) = split_timeout(Some("a=1&timeout=3&b=2"));
        assert_eq!(rest.as_deref(), Some("a=1&b=2"));
        assert_eq!(t, Ok(Duration::from_secs(3)));
        let (rest, t) = split_timeout(None);
        assert_eq!((rest, t), (None, Ok(DEFAULT_TIMEOUT)));
        assert!(split_timeout(Some("timeout=x")).1.is_err());
    }
}
