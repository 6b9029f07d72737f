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

/// Configures a [`Client`].
pub struct ClientBuilder {
    url: String,
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
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A client of the server at `url` (`ws://`, `wss://`). Until [`allow`](Self::allow) says
    /// otherwise it refuses every target.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
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
            .field("url", &self.inner.url)
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
    pub async fn connect(&self, cancel: &CancellationToken) -> Result<SessionEnd, ClientError> {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!("session", session = n);
        self.connect_once(cancel).instrument(span).await
    }

    async fn connect_once(&self, cancel: &CancellationToken) -> Result<SessionEnd, ClientError> {
        tracing::info!(url = %self.inner.url, "connecting to the tunnel server");
        let (ws, extensions) = tokio::select! {
            r = connect_websocket_negotiated(&self.inner.url, &self.inner.options) => r?,
            () = cancel.cancelled() => return Ok(SessionEnd::Local),
        };
        tracing::info!(
            url = %self.inner.url,
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
        match &result {
            Ok(end) => tracing::info!(reason = %end, "session ended"),
            Err(e) => tracing::info!(error = %e, "session ended"),
        }
        result
    }

    /// Keeps a session up until `cancel` fires: redials with capped exponential backoff and
    /// full jitter, resetting after a healthy session.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut backoff = self.inner.backoff.clone();
        while !cancel.is_cancelled() {
            let started = Instant::now();
            match self.connect(&cancel).await {
                Ok(end) => {
                    backoff.session_ended(started.elapsed());
                    if !cancel.is_cancelled() {
                        tracing::warn!(reason = %end, "tunnel session lost");
                    }
                }
                Err(ClientError::Connect(e)) if e.is_auth_failure() => {
                    tracing::error!(error = %rd_session::error_chain(&e), "the server refused our credentials");
                }
                Err(e) => {
                    tracing::warn!(error = %rd_session::error_chain(&e), "cannot reach the tunnel server")
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            if let Some(state) = &self.inner.state {
                state.redialing();
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, "redialing");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => break,
            }
        }
    }
}
