//! [`Client`]: connect to a server, serve its Connects, and redial when the tunnel drops.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use rd_proto::{Config, SessionEnd, Target};
use rd_session::{
    Backoff, BoxFuture, BoxedIo, ConnectRefused, Extensions, SessionBuilder, SessionHandle,
    SessionObserver,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::allow::{ConnectAuthorizer, DenyAll};
use crate::dial::{LocalDialer, NetDialer, DEFAULT_DIAL_TIMEOUT};
use crate::failover::{self, Endpoint, Next, Rotation};
use crate::transport::{connect_websocket_negotiated, ConnectError, ConnectOptions};

/// An error a callback returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Called once per session with its handle (to dial towards the server, when the server
/// allows it) and a token cancelled when the session ends. An `Err` ends the session, as in Go.
pub type OnConnect =
    Arc<dyn Fn(SessionHandle, CancellationToken) -> BoxFuture<Result<(), BoxError>> + Send + Sync>;

/// Why one connection attempt ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The websocket could not be established (network, TLS, proxy, or the server refused
    /// the handshake: see [`ConnectError::is_auth_failure`]).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The on-connect callback failed.
    #[error("on-connect callback failed: {0}")]
    OnConnect(BoxError),
}

/// How one session ended, and whether the server said it was going away.
struct Ended {
    end: SessionEnd,
    going_away: bool,
}

/// Configures a [`Client`].
pub struct ClientBuilder {
    /// The servers, tried in this order; never empty.
    urls: Vec<String>,
    options: ConnectOptions,
    authorizer: Arc<dyn ConnectAuthorizer>,
    dialer: Arc<dyn LocalDialer>,
    dial_timeout: Duration,
    session_config: Config,
    on_connect: Option<OnConnect>,
    backoff: Backoff,
    observer: Option<Arc<dyn SessionObserver>>,
    state: Option<Arc<dyn StateObserver>>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A client of the server at `url` (`ws://`, `wss://`). Until [`allow`](Self::allow) says
    /// otherwise it refuses every target.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            // A Client runs its own session, so it can use whatever the server accepts.
            options: ConnectOptions::default().with_extensions(Extensions::SUPPORTED),
            authorizer: Arc::new(DenyAll),
            dialer: Arc::new(NetDialer),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            session_config: Config::default(),
            on_connect: None,
            backoff: Backoff::default(),
            observer: None,
            state: None,
        }
    }

    /// Adds another server (replicas of one service, say). [`Client::run`] stays on one
    /// server while it works; when that server goes away (a going-away close from a
    /// draining rd server, a lost link, a refused handshake) the client tries the next
    /// one at once, and backs off only after every server failed in a round. A URL whose
    /// host name has several addresses (a Kubernetes headless Service, say) counts as one
    /// server per address, reached with the URL's `Host` header and TLS name; names are
    /// resolved again at each round.
    pub fn server(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// The servers [`new`](Self::new) and [`server`](Self::server) gave, in order.
    pub fn servers(&self) -> &[String] {
        &self.urls
    }

    /// Adds a header to the upgrade request (for example `X-Tunnel-ID`).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.options.headers.append(name, value);
        self
    }

    /// TLS, proxy, handshake timeout and message size options for the websocket.
    /// The extensions offered stay those of [`extensions`](Self::extensions).
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        let headers = std::mem::take(&mut self.options.headers);
        let extensions = self.options.extensions;
        self.options = options;
        self.options.headers.extend(headers);
        self.options.extensions = extensions;
        self
    }

    /// rd protocol extensions to offer (default: all this build speaks; a Go server accepts
    /// none). [`Extensions::NONE`] keeps the plain Go protocol even with an rd server.
    pub fn extensions(mut self, extensions: Extensions) -> Self {
        self.options.extensions = extensions;
        self
    }

    /// Which targets the server may reach (default: none).
    pub fn allow(mut self, authorizer: impl ConnectAuthorizer) -> Self {
        self.authorizer = Arc::new(authorizer);
        self
    }

    /// How targets are dialed (default: the OS, for tcp/tcp4/tcp6/unix).
    pub fn local_dialer(mut self, dialer: impl LocalDialer) -> Self {
        self.dialer = Arc::new(dialer);
        self
    }

    /// Bound on each local dial (default 60 s, as Go).
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Session intervals, watermarks and caps.
    pub fn session_config(mut self, config: Config) -> Self {
        self.session_config = config;
        self
    }

    /// Runs `f` for every session.
    pub fn on_connect<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(SessionHandle, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |h, c| Box::pin(f(h, c))));
        self
    }

    /// Redial delays (default: 1 s doubling to 5 s, full jitter, reset after a healthy
    /// minute: back within 5 s of the server's return, a fleet spread over those 5 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Counts every session's streams and bytes (for example into metrics).
    pub fn observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Told when a session comes up, goes down and when the client redials.
    pub fn state_observer(mut self, observer: Arc<dyn StateObserver>) -> Self {
        self.state = Some(observer);
        self
    }

    /// Builds the client.
    pub fn build(self) -> Client {
        Client {
            inner: Arc::new(self),
            attempts: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// A tunnel client: [`connect`](Self::connect) for one session, [`run`](Self::run) to keep
/// one up.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientBuilder>,
    attempts: Arc<AtomicU64>,
}

/// What a [`Client`] tells about its connection state (see
/// [`ClientBuilder::state_observer`]); each method is called from the client's task and
/// must not block.
pub trait StateObserver: Send + Sync + 'static {
    /// A session is established.
    fn session_up(&self);
    /// The session ended (or the callback failed).
    fn session_down(&self);
    /// The client is about to wait and connect again.
    fn redialing(&self);
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.inner.urls)
            .finish()
    }
}

impl Client {
    /// A builder; see [`ClientBuilder`].
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    fn handler(
        &self,
    ) -> impl Fn(Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>> + Send + Sync + 'static {
        let inner = self.inner.clone();
        // The session runs Connects in tasks of their own, outside this attempt's span; its
        // lines (with the agent's id) are carried over explicitly.
        let span = tracing::Span::current();
        move |target: Target| {
            let inner = inner.clone();
            Box::pin(
                async move {
                    if !inner.authorizer.allow(&target) {
                        tracing::info!(%target, "refusing target not allowed by the allow rules");
                        return Err(ConnectRefused::not_allowed());
                    }
                    let dial = tokio::time::timeout(inner.dial_timeout, inner.dialer.dial(&target));
                    let refused = match dial.await {
                        Ok(Ok(io)) => return Ok(io),
                        Ok(Err(e)) => ConnectRefused::dial_failed(&target, &e),
                        Err(_) => ConnectRefused::dial_failed(
                            &target,
                            &std::io::Error::from(std::io::ErrorKind::TimedOut),
                        ),
                    };
                    tracing::info!(%target, reason = %refused, "target dial failed");
                    Err(refused)
                }
                .instrument(span.clone()),
            ) as BoxFuture<_>
        }
    }

    /// One attempt: connect, serve the session until it ends (or `cancel` fires), and say
    /// why it ended.
    ///
    /// Every line it logs is inside a `session{session=N}` span (N counts this client's
    /// attempts from 1), a child of the caller's span, so an agent's id set there is on
    /// every line, including those of the session's streams. The server's session key is
    /// not known on this side.
    ///
    /// This tries the first server only; [`run`](Self::run) moves between servers.
    pub async fn connect(&self, cancel: &CancellationToken) -> Result<SessionEnd, ClientError> {
        let first = Endpoint {
            url: self.inner.urls[0].clone(),
            addr: None,
        };
        self.connect_endpoint(&first, cancel)
            .await
            .map(|ended| ended.end)
    }

    async fn connect_endpoint(
        &self,
        endpoint: &Endpoint,
        cancel: &CancellationToken,
    ) -> Result<Ended, ClientError> {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("session", session = n);
        self.connect_once(endpoint, cancel).instrument(span).await
    }

    async fn connect_once(
        &self,
        endpoint: &Endpoint,
        cancel: &CancellationToken,
    ) -> Result<Ended, ClientError> {
        tracing::info!(server = %endpoint, "connecting to the tunnel server");
        let options = self.inner.options.clone().with_connect_to(endpoint.addr);
        let (ws, extensions) = tokio::select! {
            r = connect_websocket_negotiated(&endpoint.url, &options) => r?,
            () = cancel.cancelled() => return Ok(Ended { end: SessionEnd::Local, going_away: false }),
        };
        tracing::info!(
            server = %endpoint,
            flow_control = extensions.flow_control(),
            half_close = extensions.half_close,
            "connected to the tunnel server"
        );
        let mut builder = SessionBuilder::client()
            .config(self.inner.session_config.clone())
            .extensions(extensions)
            .connect_handler(self.handler());
        if let Some(observer) = &self.inner.observer {
            builder = builder.observer(observer.clone());
        }
        let (session, driver) = builder.start(ws);
        tokio::spawn(driver.instrument(tracing::Span::current()));
        if let Some(state) = &self.inner.state {
            state.session_up();
        }
        let session_cancel = cancel.child_token();
        let callback = self
            .inner
            .on_connect
            .as_ref()
            .map(|f| f(session.clone(), session_cancel.clone()));
        let callback = async move {
            match callback {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            end = session.closed() => Ok(end),
            () = cancel.cancelled() => {
                session.close();
                Ok(session.closed().await)
            }
            r = callback => match r {
                // Go changes nothing when the callback returns without error.
                Ok(()) => Ok(session.closed().await),
                Err(e) => {
                    session.close();
                    Err(ClientError::OnConnect(e))
                }
            },
        };
        session_cancel.cancel();
        if let Some(state) = &self.inner.state {
            state.session_down();
        }
        let going_away = session.peer_went_away();
        match &result {
            Ok(end) if going_away => {
                tracing::info!(reason = %end, "session ended: the server is going away (draining)")
            }
            Ok(end) => tracing::info!(reason = %end, "session ended"),
            Err(e) => tracing::info!(error = %e, "session ended"),
        }
        result.map(|end| Ended { end, going_away })
    }

    /// Keeps a session up until `cancel` fires. When the session ends or an attempt fails
    /// the client tries the next server at once (see [`ClientBuilder::server`]); with one
    /// server, or once every server failed in a round, it waits with capped exponential
    /// backoff and jitter, reset after a healthy session. A server going away (a drain)
    /// is left at once, whatever the count. A `503` with `Retry-After` keeps that server
    /// aside for at least that long.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut backoff = self.inner.backoff.clone();
        let mut rotation = Rotation::default();
        rotation.set_endpoints(failover::resolve(&self.inner.urls, &self.inner.options).await);
        while !cancel.is_cancelled() {
            let Some(endpoint) = rotation.current().cloned() else {
                break;
            };
            let started = Instant::now();
            let next = match self.connect_endpoint(&endpoint, &cancel).await {
                Ok(ended) => {
                    let uptime = started.elapsed();
                    backoff.session_ended(uptime);
                    if !cancel.is_cancelled() && !ended.going_away {
                        tracing::warn!(reason = %ended.end, server = %endpoint, "tunnel session lost");
                    }
                    rotation.session_ended(uptime, ended.going_away)
                }
                Err(e) => {
                    match &e {
                        ClientError::Connect(c) if c.is_auth_failure() => {
                            tracing::error!(error = %rd_session::error_chain(&e), server = %endpoint, "the server refused our credentials");
                        }
                        _ => {
                            tracing::warn!(error = %rd_session::error_chain(&e), server = %endpoint, "cannot reach the tunnel server")
                        }
                    }
                    let retry_after = match &e {
                        ClientError::Connect(c) => c.retry_after(),
                        ClientError::OnConnect(_) => None,
                    };
                    rotation.attempt_failed(tokio::time::Instant::now(), retry_after)
                }
            };
            if cancel.is_cancelled() {
                break;
            }
            if let Some(state) = &self.inner.state {
                state.redialing();
            }
            if next == Next::Now {
                if let Some(to) = rotation.current() {
                    tracing::info!(server = %to, "redialing at once");
                }
                continue;
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, servers = rotation.len(), "redialing");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => break,
            }
            rotation.set_endpoints(failover::resolve(&self.inner.urls, &self.inner.options).await);
            let wait = rotation.start_round(tokio::time::Instant::now());
            if !wait.is_zero() {
                tracing::info!(?wait, "waiting for the server's Retry-After");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => break,
                }
            }
        }
    }
}
