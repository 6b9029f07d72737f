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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rd_session::transport::TlsOptions;

use super::proxy_connector::{ProxyConnector, TlsSettings};
use crate::log_limit::{rejection, LogLimit};
use crate::{text_response, Body, BoxError, Server, ServerEvents, TunnelInfo};

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
    clients: Arc<Pools>,
}

/// One pooled HTTP client per client key.
type Pools = Mutex<HashMap<String, PooledClient>>;

type PooledClient = Client<ProxyConnector, Body>;

/// Drops pools on the server's events (see [`ClientProxy::new`]). Weak: the server keeps
/// its subscribers for its life, the pools live as long as the proxy.
struct PoolDropper(Weak<Pools>);

impl PoolDropper {
    /// Takes the pools to drop out of the lock: dropping a pool closes its connections.
    fn drop_where(
        &self,
        take: impl FnOnce(&mut HashMap<String, PooledClient>) -> Vec<PooledClient>,
    ) {
        if let Some(pools) = self.0.upgrade() {
            let dropped = take(&mut pools.lock().unwrap_or_else(|p| p.into_inner()));
            drop(dropped);
        }
    }
}

impl ServerEvents for PoolDropper {
    fn draining(&self) {
        self.drop_where(|pools| pools.drain().map(|(_, c)| c).collect());
    }
    fn session_added(&self, client_key: &str) {
        self.drop_where(|pools| pools.remove(client_key).into_iter().collect());
    }
    fn peer_withdrew(&self, client_key: &str) {
        self.drop_where(|pools| pools.remove(client_key).into_iter().collect());
    }
}

/// Largest read or write buffer of each HTTP connection on either side of the proxy.
pub const PROXY_BUFFER: usize = 64 * 1024;

impl ClientProxy {
    /// A proxy over `server`'s tunnels.
    ///
    /// When the server begins to drain, the proxy drops its pools: idle pooled tunnel
    /// streams would otherwise count as streams in flight and hold the drain for the
    /// pool's idle timeout. For the same reason it drops a client's pool when a peer
    /// withdraws a session of that client (the peer drains, or the session closed): a
    /// pooled stream through that peer would keep the draining session busy. And it drops
    /// a client's pool when a session of that client registers here: pooled streams made
    /// through a peer while the agent had no session here would go on taking the hop.
    ///
    /// A draining server still serves the requests that reach it (a load balancer learns of
    /// the drain only at its next readiness probe): its dialer sends them to a replica that
    /// holds the agent when there is one, without pooling.
    pub fn new(server: Server) -> Self {
        let clients: Arc<Pools> = Arc::default();
        server.subscribe(PoolDropper(Arc::downgrade(&clients)));
        Self {
            server,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            tls: Arc::new(TlsSettings::new(TlsOptions::default())),
            clients,
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
        let build = || {
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
                    dialer: self.server.dialer(key).labeled("/client"),
                    tls: self.tls.clone(),
                })
        };
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if self.server.is_draining() {
            // Nothing is pooled while draining (see `new`): a request that reaches a
            // draining server gets a client of its own, whose connection is dropped with it
            // (a pooled stream would keep the session we hand over busy).
            return build();
        }
        clients.entry(key.to_owned()).or_insert_with(build).clone()
    }

    /// Handles a request whose path was `/client/{rest}`.
    ///
    /// Logs one line per request when it is over (`tunnel request`, target `rd_server::proxy`):
    /// client, session and stream, method, url, status, bytes each way, duration and how
    /// it ended: `completed`, `cut` (either side stopped in the middle), `refused` (the dial
    /// or the target failed: the reason is the 502 body), `timeout`, or `rejected` (the
    /// request itself was wrong or named an unknown client; rate-limited, an outsider
    /// chooses how many). Error bodies are one line ending in a newline.
    pub async fn handle<B>(&self, req: Request<B>, rest: &str) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let mut log = RequestLog {
            client: String::new(),
            method: req.method().clone(),
            target: rest.to_owned(),
            status: 0,
            started: Instant::now(),
            info: None,
            sent: Arc::new(AtomicU64::new(0)),
            metrics: self.server.metrics().clone(),
        };
        let Some(target) = ProxyPath::parse(rest) else {
            return log.reject(
                StatusCode::NOT_FOUND,
                "want /client/{id}/{scheme}/{host}/{path}".into(),
            );
        };
        log.client = crate::short_id(&target.client).into_owned();
        log.target = format!("{}://{}{}", target.scheme, target.host, target.path);
        if target.scheme != "http" && target.scheme != "https" {
            return log.reject(
                StatusCode::BAD_REQUEST,
                format!("unsupported scheme {:?}: want http or https", target.scheme),
            );
        }
        let (query, timeout) = split_timeout(req.uri().query());
        let timeout = match timeout {
            Ok(t) => t,
            Err(text) => return log.reject(StatusCode::BAD_REQUEST, text),
        };
        if !self.server.has_session(&target.client) {
            return log.reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                crate::DialError::NoSession(target.client.clone()).to_string(),
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
            Err(e) => return log.reject(StatusCode::BAD_REQUEST, format!("invalid target: {e}")),
        };
        if super::proxy_upgrade::wants_upgrade(req.headers()) {
            let started = std::time::Instant::now();
            let method = req.method().clone();
            let connector = ProxyConnector {
                dialer: self.server.dialer(&target.client).labeled("/client"),
                tls: self.tls.clone(),
            };
            let response =
                super::proxy_upgrade::forward(connector, req, uri, &target.host, timeout).await;
            // Counted when answered: the upgraded connection is spliced on its own.
            let outcome = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                "upgraded"
            } else {
                "refused"
            };
            self.server
                .metrics()
                .tunnel_used("client", outcome, started.elapsed().as_secs_f64());
            tracing::info!(
                client = %crate::short_id(&target.client),
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
        let body: Body = CountedBody {
            inner: body.map_err(Into::into).boxed(),
            count: log.sent.clone(),
        }
        .boxed();
        let request = Request::from_parts(parts, body);
        let result =
            tokio::time::timeout(timeout, self.client(&target.client).request(request)).await;
        match result {
            Err(_) => {
                let text = format!("no response from {} within {timeout:?}", target.host);
                log.status = StatusCode::GATEWAY_TIMEOUT.as_u16();
                log.emit("timeout", Some(&text), 0);
                line_response(StatusCode::GATEWAY_TIMEOUT, text)
            }
            Ok(Err(e)) => {
                // Go's example answers with the dial or target error alone; hyper's layers
                // ("client error (SendRequest): connection error: ...") say nothing more
                // and change between versions.
                let text = innermost_error(&e);
                log.status = StatusCode::BAD_GATEWAY.as_u16();
                log.emit("refused", Some(&text), 0);
                line_response(StatusCode::BAD_GATEWAY, text)
            }
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                for h in &HOP_BY_HOP {
                    parts.headers.remove(h);
                }
                log.status = parts.status.as_u16();
                log.info = parts.extensions.get::<TunnelInfo>().copied();
                let body = LoggedBody {
                    inner: body.map_err(|e| Box::new(e) as BoxError).boxed(),
                    log: Some(log),
                    received: 0,
                };
                Response::from_parts(parts, body.boxed())
            }
        }
    }
}

/// Requests to the `/client` route refused before any dial, logged at most
/// [`log_limit`](crate::log_limit) lines a second.
static REJECTED: LogLimit = LogLimit::new();

/// What the completion line of one proxied request says.
#[derive(Debug)]
struct RequestLog {
    client: String,
    method: http::Method,
    target: String,
    status: u16,
    started: Instant,
    info: Option<TunnelInfo>,
    /// Request body bytes sent towards the target.
    sent: Arc<AtomicU64>,
    /// Where the request is counted (`rd_tunnel_uses{origin="client"}`).
    metrics: crate::Metrics,
}

impl RequestLog {
    fn emit(&self, outcome: &'static str, reason: Option<&str>, received: u64) {
        let session = self.info.map(|i| i.session_key);
        let stream = self.info.map(|i| i.stream_id);
        let sent = self.sent.load(Ordering::Relaxed);
        let took = self.started.elapsed();
        self.metrics
            .tunnel_used("client", outcome, took.as_secs_f64());
        let duration_ms = crate::duration_ms(took);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    client = %self.client,
                    session,
                    stream,
                    method = %self.method,
                    url = %self.target,
                    status = self.status,
                    bytes_sent = sent,
                    bytes_received = received,
                    duration_ms,
                    outcome,
                    reason,
                    "tunnel request"
                )
            };
        }
        if outcome == "completed" {
            line!(info);
        } else {
            line!(warn);
        }
    }

    /// Logs a rejected request (rate-limited) and answers it.
    fn reject(mut self, status: StatusCode, text: String) -> Response<Body> {
        self.status = status.as_u16();
        self.metrics
            .tunnel_used("client", "rejected", self.started.elapsed().as_secs_f64());
        rejection!(
            REJECTED,
            client = %self.client,
            method = %self.method,
            url = %self.target,
            status = self.status,
            outcome = "rejected",
            reason = %text,
            "tunnel request"
        );
        line_response(status, text)
    }
}

/// A plain-text error body: one line ending in a newline, as Go's `http.Error` writes.
fn line_response(status: StatusCode, mut text: String) -> Response<Body> {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text_response(status, text)
}

/// The text of the last error in `e`'s source chain: the one that says what happened.
fn innermost_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// A request body counting the bytes it yields.
struct CountedBody {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that logs the request's completion line when it ends: at its end
/// (`completed`), at an error from the target's side (`cut`, with the reason) or when the
/// caller drops it before the end (`cut`: the caller went away).
struct LoggedBody {
    inner: Body,
    log: Option<RequestLog>,
    received: u64,
}

impl LoggedBody {
    fn finish(&mut self, outcome: &'static str, reason: Option<&str>) {
        if let Some(log) = self.log.take() {
            log.emit(outcome, reason, self.received);
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = innermost_error(e.as_ref());
                this.finish("cut", Some(&reason));
            }
            Poll::Ready(None) => this.finish("completed", None),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.inner) {
            // hyper need not poll a body that says it has ended (a known length reached).
            self.finish("completed", None);
        } else {
            self.finish("cut", Some("the caller went away before the end"));
        }
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
