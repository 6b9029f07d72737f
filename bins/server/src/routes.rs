//! The example server's routes: /connect, /client/..., /metrics, /healthz, /livez, /readyz,
//! and HTTP CONNECT and SOCKS5 through an agent.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rd_server::admin::AdminApi;
use rd_server::connect::{ConnectError, ConnectProxy};
use rd_server::proxy::ClientProxy;
use rd_server::proxy_protocol::{ProxiedAddrs, ProxyProtocolAcceptor, ProxyProtocolVersion};
use rd_server::socks5::Socks5Proxy;
use rd_server::{text_response, Body, LocalAddr, RemoteAddr, Server};

use crate::admin_auth::AdminAuth;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The HTTP connections of every listener: tracked so a drain can wait for the last bytes
/// of each response to leave, and told to finish when the drain begins (hyper's graceful
/// shutdown: the request in progress completes, then the connection closes).
#[derive(Debug, Clone, Default)]
pub struct Front {
    /// Cancelled when the drain begins.
    pub drain: CancellationToken,
    /// One task per connection (not per upgraded tunnel: that leaves hyper at the upgrade).
    pub connections: TaskTracker,
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything on one listener (the default, as Go's example).
    All,
    /// Only the tunnel endpoint `/connect`: the port agents reach.
    Agents,
    /// `/client`, `/metrics` and `/healthz`, not `/connect` (`--admin-listen`).
    Admin,
    /// SOCKS5 only (`--socks-listen`).
    Socks5,
}

/// What the routes need.
pub struct App {
    server: Server,
    proxy: Arc<ClientProxy>,
    connect: ConnectProxy,
    socks5: Socks5Proxy,
    metrics: bool,
    role: Role,
    admin_auth: Option<Arc<AdminAuth>>,
    front: Front,
    api: AdminApi,
    proxy_protocol: Option<Arc<ProxyProtocolAcceptor>>,
}

/// The CONNECT proxy; with `--admin-auth`, its proxy password is checked against the file.
fn connect_proxy(server: &Server, auth: Option<&Arc<AdminAuth>>) -> ConnectProxy {
    let proxy = ConnectProxy::new(server.clone());
    match auth {
        Some(auth) => {
            let auth = auth.clone();
            proxy.credentials(move |client_key: &str, password: &str| {
                auth.allows_proxy(client_key, password)
            })
        }
        None => proxy,
    }
}

/// Refused `/client` and `/admin` requests without credentials, logged at most a few a second.
static UNAUTHENTICATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl App {
    pub fn new(
        server: Server,
        proxy: Arc<ClientProxy>,
        metrics: bool,
        role: Role,
        admin_auth: Option<Arc<AdminAuth>>,
    ) -> Self {
        let connect = connect_proxy(&server, admin_auth.as_ref());
        Self {
            proxy,
            socks5: Socks5Proxy::new(connect.clone()),
            connect,
            api: AdminApi::new(server.clone()),
            server,
            metrics,
            role,
            admin_auth,
            front: Front::default(),
            proxy_protocol: None,
        }
    }

    /// The connection set this app's listeners share with the drain.
    pub fn front(mut self, front: Front) -> Self {
        self.front = front;
        self
    }

    /// Takes the PROXY header of trusted fronts' connections (`--proxy-protocol-from`).
    pub fn accept_proxy_protocol(mut self, acceptor: Option<Arc<ProxyProtocolAcceptor>>) -> Self {
        self.proxy_protocol = acceptor;
        self
    }

    /// The PROXY header CONNECT sends its targets (`--connect-proxy-protocol`).
    pub fn connect_proxy_protocol(self, version: Option<ProxyProtocolVersion>) -> Self {
        self.with_connect(|c| c.proxy_protocol(version))
    }

    /// How long CONNECT waits for the agent's refusal before answering 200.
    pub fn connect_wait(self, wait: std::time::Duration) -> Self {
        self.with_connect(|c| c.connect_wait(wait))
    }

    /// Changes CONNECT's settings, which SOCKS5 shares (its proxy is built from CONNECT's).
    fn with_connect(mut self, change: impl FnOnce(ConnectProxy) -> ConnectProxy) -> Self {
        self.connect = change(self.connect);
        self.socks5 = Socks5Proxy::new(self.connect.clone());
        self
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let (tunnel, admin) = match self.role {
            Role::All => (true, true),
            Role::Agents => (true, false),
            Role::Admin => (false, true),
            // Its connections never reach HTTP (see serve_plain).
            Role::Socks5 => (false, false),
        };
        // CONNECT and proxy-style requests reach agents' networks: operator side only.
        if admin && req.method() == http::Method::CONNECT {
            return self.connect.handle(req).await;
        }
        // `curl -x http://foo@rd-server:8123 http://...`: plain HTTP through agent foo.
        if let Some(route) = admin
            .then(|| self.connect.absolute_form_route(&req))
            .flatten()
        {
            return match route {
                Ok(rest) => self.proxy.handle(req, &rest).await,
                Err(e) => ConnectProxy::error_response(&e),
            };
        }
        let path = req.uri().path().to_owned();
        let absolute = req.uri().scheme().is_some();
        if path == "/connect" && tunnel {
            return self.server.handle(req).await;
        }
        // Probes on every listener: the kubelet reaches whichever port the pod names, and
        // they tell nothing an outsider could use.
        match path.as_str() {
            "/livez" => return live().await,
            "/readyz" => return ready(&self.server),
            _ => {}
        }
        if !admin {
            return text_response(StatusCode::NOT_FOUND, "404 page not found\n".into());
        }
        if let Some(rest) = path.strip_prefix("/client/") {
            if let Err(refused) = self.caller(&req) {
                return *refused;
            }
            return self.proxy.handle(req, rest).await;
        }
        if AdminApi::serves(&path) {
            return match self.caller(&req) {
                Ok(who) => self.api.handle(&req, &who),
                Err(refused) => *refused,
            };
        }
        match path.as_str() {
            "/healthz" => health(&self.server).await,
            "/metrics" if self.metrics => {
                let mut r = Response::new(
                    Full::new(Bytes::from(self.server.encode_metrics()))
                        .map_err(|n| match n {})
                        .boxed(),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            // `curl -x http://rd-server:8123 http://host/...` without a user: CONNECT would
            // ask for one, so does this (a bare 404 said nothing about the missing user).
            _ if absolute => ConnectProxy::error_response(&ConnectError::NoCredentials),
            _ => text_response(StatusCode::NOT_FOUND, "404 page not found\n".into()),
        }
    }

    /// Who is asking, for the operator routes (`/client`, `/admin`): the admin credential's
    /// name and the address, or the refusal to send (401) when `--admin-auth` wants
    /// credentials the request does not carry.
    fn caller<B>(&self, req: &Request<B>) -> Result<String, Box<Response<Body>>> {
        let remote = req.extensions().get::<RemoteAddr>().map(|r| r.0);
        let from = remote.map_or_else(String::new, |r| format!(" from {r}"));
        let Some(auth) = &self.admin_auth else {
            return Ok(format!("unauthenticated caller{from}"));
        };
        let given = req.headers().get(http::header::AUTHORIZATION);
        if let Some(who) = auth.who(given.map(|v| v.as_bytes())) {
            return Ok(format!("{who}{from}"));
        }
        let n = UNAUTHENTICATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The first refusal, then one in a hundred: an outsider sets the pace.
        if n % 100 == 0 {
            tracing::info!(
                remote = remote.map(tracing::field::display),
                path = req.uri().path(),
                credentials = given.is_some(),
                refused_so_far = n + 1,
                "operator request rejected: no valid admin credentials"
            );
        }
        let mut r = text_response(StatusCode::UNAUTHORIZED, "unauthorized\n".into());
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer, Basic realm=\"rd\""),
        );
        Err(Box::new(r))
    }
}

/// How long the runtime may take to run a fresh task before /healthz calls it stuck.
const RUNTIME_BOUND: std::time::Duration = std::time::Duration::from_secs(1);

/// `/healthz`: 200 `ok` when this request came through the listener (so it accepts and
/// serves), the runtime runs a freshly spawned task within a second (no worker starved by a
/// blocking call) and the server is not shutting down; 503 with the reason otherwise.
async fn health(server: &Server) -> Response<Body> {
    if !server.is_accepting() {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    live().await
}

/// Whether a freshly spawned task runs within [`RUNTIME_BOUND`].
async fn runtime_responsive() -> bool {
    matches!(
        tokio::time::timeout(RUNTIME_BOUND, tokio::spawn(async {})).await,
        Ok(Ok(()))
    )
}

/// `/livez` (liveness): 200 while the process serves requests and its runtime runs new
/// tasks, also while it shuts down or drains (restarting it then would cut transfers);
/// 503 when the runtime is stuck.
async fn live() -> Response<Body> {
    if runtime_responsive().await {
        text_response(StatusCode::OK, "ok\n".into())
    } else {
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "runtime unresponsive: a new task did not run within 1s\n".into(),
        )
    }
}

/// `/readyz` (readiness): 200 only while the server accepts tunnels, is not draining and,
/// with DNS peer discovery, has finished its first discovery round; 503 with the reason
/// otherwise.
fn ready(server: &Server) -> Response<Body> {
    let unready = if !server.is_accepting() {
        Some("shutting down\n")
    } else if server.is_draining() {
        Some("draining\n")
    } else if !server.peers_discovered() {
        Some("peer discovery: first round not done, or discovered peers not linked back yet\n")
    } else {
        None
    };
    match unready {
        None => text_response(StatusCode::OK, "ok\n".into()),
        Some(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, why.into()),
    }
}

/// Accepts connections until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Option<crate::tls::Tls>,
    app: Arc<App>,
) -> std::io::Result<()> {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Every connection may become a tunnel; HTTP requests do not mind the bounded buffers.
        // (Tunnels also get a bound on unsent bytes, at their upgrade.)
        rd_session::tune_accepted_socket(&tcp).ok();
        let app = app.clone();
        let tls = tls.clone();
        let tracker = app.front.connections.clone();
        tracker.spawn(async move {
            let mut tcp = tcp;
            let mut addrs = ProxiedAddrs {
                source: remote,
                destination: tcp.local_addr().unwrap_or(remote),
            };
            // A trusted front's PROXY header comes before anything else (TLS included).
            if let Some(front) = &app.proxy_protocol {
                match front.accept(&mut tcp, remote, addrs.destination).await {
                    Ok(real) => addrs = real,
                    Err(_logged) => return,
                }
            }
            match tls {
                None => serve_plain(tcp, addrs, app).await,
                Some(tls) => match tls.acceptor().accept(tcp).await {
                    Ok(stream) => {
                        // An agent's verified client certificate (--agent-ca): its id.
                        let cert = crate::tls::peer_certificate(&stream);
                        serve_connection(stream, addrs, cert, app).await
                    }
                    Err(e) => crate::tls::handshake_failed(addrs.source, &e),
                },
            }
        });
    }
}

/// How long a plain connection on an operator listener may take to send its first byte,
/// which tells SOCKS5 from HTTP (as long as hyper gives a request head).
const FIRST_BYTE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A plain (non-TLS) connection: SOCKS5 where the operator's routes are served and its first
/// byte says so (CONNECT's twin, same switch), or on `--socks-listen`; HTTP otherwise.
async fn serve_plain(tcp: tokio::net::TcpStream, addrs: ProxiedAddrs, app: Arc<App>) {
    let remote = addrs.source;
    let socks5 = match app.role {
        Role::Socks5 => true,
        Role::Agents => false,
        Role::All | Role::Admin => {
            match rd_server::socks5::is_socks5(&tcp, FIRST_BYTE_WAIT).await {
                Ok(socks5) => socks5,
                Err(e) => {
                    return tracing::debug!(%remote, error = %e, "connection dropped before its first byte")
                }
            }
        }
    };
    if socks5 {
        app.socks5
            .serve(tcp, Some(addrs.source), Some(addrs.destination))
            .await;
    } else {
        serve_connection(tcp, addrs, None, app).await;
    }
}

async fn serve_connection<S>(
    io: S,
    addrs: ProxiedAddrs,
    cert: Option<rd_server::PeerCertificate>,
    app: Arc<App>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = app.front.drain.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(RemoteAddr(addrs.source));
        req.extensions_mut().insert(LocalAddr(addrs.destination));
        if let Some(cert) = &cert {
            req.extensions_mut().insert(cert.clone());
        }
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(app.route(req).await) }
    });
    // A connection opened during the drain is served one request, then closed (a
    // graceful shutdown now would close it before it is read).
    let draining = drain.is_cancelled();
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(!draining)
        // Bounds a slow client that never finishes its request head (slowloris).
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
        // A slow downloader holds at most this much of its response here (see PROXY_BUFFER).
        .max_buf_size(rd_server::proxy::PROXY_BUFFER)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.cancelled(), if !draining => {
            // The request in progress (a download, say) completes; then the connection
            // closes instead of waiting for another.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
