//! [`Client`]: connect to the servers, serve their Connects, hold a session with each
//! replica, and redial when one drops.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rand::Rng;
use rd_proto::{Config, SessionEnd, Target};
use rd_session::transport::ClientWebSocket;
use rd_session::{
    Backoff, BoxFuture, BoxedIo, ConnectRefused, Extensions, PeerNotices, SessionBuilder,
    SessionHandle, SessionObserver, HELD_SERVERS_HEADER,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::allow::{ConnectAuthorizer, DenyAll};
use crate::dial::{LocalDialer, NetDialer, DEFAULT_DIAL_TIMEOUT};
use crate::failover::{self, Endpoint, Next, Rotation};
use crate::fleet::{Fleet, HeldSession, ServerInfo, SessionCount};
use crate::transport::{connect_websocket_with_headers, ConnectError, ConnectOptions};

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

/// What a session running in a task of its own tells [`Client::run`].
enum SessionEvent {
    /// The server said something about itself (it is going away, it counts more replicas).
    Notice { slot: u64, notices: PeerNotices },
    /// The session is over.
    Ended {
        slot: u64,
        result: Result<Ended, ClientError>,
        uptime: Duration,
        endpoint: Endpoint,
    },
}

/// How one attempt of [`Client::run`] ended.
enum Attempt {
    /// A new session, running in a task of its own.
    Joined { slot: u64, server: ServerInfo },
    /// The server is one the client holds a session with already (its `409`, or its id in
    /// the `101`: `held`), or it is leaving (a draining server's `503`): try again
    /// elsewhere.
    Elsewhere { server: ServerInfo, held: bool },
    /// The attempt failed.
    Failed(ClientError),
}

/// A connected websocket, and what the server said in its `101`.
struct Established {
    ws: ClientWebSocket,
    extensions: Extensions,
    server: ServerInfo,
}

/// After this many attempts in a row that reached a server already held, the client waits
/// (with the fill backoff) before it tries again. Through a load balancer that spreads
/// connections evenly, each attempt finds a given missing replica with a chance of one in
/// the count; this many per replica counted leaves a few percent of agents waiting.
const ELSEWHERE_PER_REPLICA: usize = 3;

/// An attempt that reached a server held already is made again within a random delay of up
/// to this.
const ELSEWHERE_JITTER: Duration = Duration::from_millis(50);

/// For this long after the count grew, the fill backoff is at most [`FILL_EAGER_MAX`]: a new
/// replica behind a load balancer is reachable once it is ready, seconds after its peers
/// count it.
const FILL_EAGER: Duration = Duration::from_secs(30);
/// See [`FILL_EAGER`].
const FILL_EAGER_MAX: Duration = Duration::from_secs(2);

/// A count that grew is answered within a random delay of up to this: a whole fleet learns
/// of a new replica at once, and must not dial the load balancer at once.
const FILL_SPREAD: Duration = Duration::from_secs(1);
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
    sessions: SessionCount,
    /// Handshakes refused for credentials in a row after which `run` gives up (0: never).
    max_auth_refusals: u32,
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
            sessions: SessionCount::All,
            max_auth_refusals: 0,
        }
    }

    /// Adds another server (replicas of one service, say). [`Client::run`] dials them in
    /// turn: with one session ([`sessions`](Self::sessions)) it stays on one server while
    /// it works; when that server goes away (a drain, a lost link, a refused handshake) the
    /// client tries the next one at once, and backs off only after every server failed in a
    /// round. A URL whose host name has several addresses (a Kubernetes headless Service,
    /// say) counts as one server per address, reached with the URL's `Host` header and TLS
    /// name; names are resolved again at each round.
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

    /// How targets are dialed (default: the OS, for tcp/tcp4/tcp6/unix). `udp` targets
    /// (rd's udp extension) always go to the OS through [`dial_udp`](crate::dial_udp),
    /// after the allow rules.
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

    /// How many sessions [`Client::run`] holds (default: [`SessionCount::All`], one with
    /// each replica the servers count).
    ///
    /// An rd server with a peer id tells the agent its id and how many replicas it counts
    /// (replicas extension); the client keeps dialing its URL(s), through a load balancer
    /// or not, until it holds a session with that many distinct servers, and fills again
    /// when the count grows, a server goes away or a session ends. Each replica then
    /// reaches the agent through its own session: no peer hop, and no moment in which a
    /// drain, a restart or a crash of one replica leaves the agent unreachable (a draining
    /// server says so, and the client makes the replacement while the old session still
    /// serves its streams). Against a Go server (no count) it holds one, as with
    /// [`SessionCount::ONE`], the behaviour of earlier versions.
    pub fn sessions(mut self, count: SessionCount) -> Self {
        self.sessions = count;
        self
    }

    /// Gives up after `n` handshakes in a row refused for the agent's credentials (401 or
    /// 403): [`run`](Client::run) returns [`RunEnd::CredentialsRefused`] instead of
    /// retrying forever (frp's `loginFailExit`). 0, the default, retries forever: a token
    /// being rolled out may be accepted later. A session in between starts the count again.
    pub fn max_auth_refusals(mut self, n: u32) -> Self {
        self.max_auth_refusals = n;
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

/// Why [`Client::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunEnd {
    /// The cancellation token fired.
    Cancelled,
    /// [`ClientBuilder::max_auth_refusals`] handshakes in a row were refused for the
    /// agent's credentials.
    CredentialsRefused(u32),
}

/// A tunnel client: [`connect`](Self::connect) for one session, [`run`](Self::run) to keep
/// one up with each replica.
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
    /// A session ended (or its callback failed).
    fn session_down(&self);
    /// The client is about to wait and connect again.
    fn redialing(&self);
    /// The sessions held changed (one came, went, or its server said it is going away).
    fn sessions(&self, held: &[HeldSession]) {
        let _ = held;
    }
    /// A session started with the server at `url` (whose peer id is `server_id`, if it
    /// gave one): its handle, to list its streams (an admin endpoint).
    fn session_started(&self, session: &SessionHandle, url: &str, server_id: Option<&str>) {
        let _ = (session, url, server_id);
    }
    /// That session ended.
    fn session_ended(&self, session: &SessionHandle) {
        let _ = session;
    }
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

    /// The session's Connect handler. `udp`: the session negotiated rd's udp extension, so
    /// `udp` targets are relayed as datagrams (without it the server cannot frame them, and
    /// a `udp` Connect is refused as Go's agent would not, but as it should).
    fn handler(
        &self,
        udp: bool,
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
                    let dial = async {
                        if !rd_session::is_udp(target.proto()) {
                            return inner.dialer.dial(&target).await;
                        }
                        if !udp {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::Unsupported,
                                format!(
                                    "unknown network {} (the server did not negotiate rd's udp extension)",
                                    target.proto()
                                ),
                            ));
                        }
                        // Datagrams go to the OS, not the LocalDialer: its connections
                        // are byte streams, and this socket frames datagrams.
                        crate::udp::dial_udp(&target)
                            .await
                            .map(|relay| Box::new(relay) as BoxedIo)
                    };
                    let dial = tokio::time::timeout(inner.dial_timeout, dial);
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
    /// This tries the first server only, for one session; [`run`](Self::run) moves between
    /// servers and holds one session per replica.
    pub async fn connect(&self, cancel: &CancellationToken) -> Result<SessionEnd, ClientError> {
        let first = Endpoint {
            url: self.inner.urls[0].clone(),
            addr: None,
        };
        let span = self.next_span();
        async {
            let Some(established) = self.establish(&first, &[], cancel, true).await? else {
                return Ok(SessionEnd::Local);
            };
            let session = self.start_session(established.ws, established.extensions);
            if let Some(state) = &self.inner.state {
                let id = established.server.id.as_deref();
                state.session_started(&session, &first.url, id);
            }
            self.serve(session, 0, cancel, None)
                .await
                .map(|ended| ended.end)
        }
        .instrument(span)
        .await
    }

    fn next_span(&self) -> tracing::Span {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info_span!("session", session = n)
    }

    /// Connects the websocket; `Ok(None)` if `cancel` fired first. `held` are the ids of
    /// the servers held already (sent to rd servers, which answer `409` if theirs is
    /// among them).
    async fn establish(
        &self,
        endpoint: &Endpoint,
        held: &[&str],
        cancel: &CancellationToken,
        first: bool,
    ) -> Result<Option<Established>, ClientError> {
        if first {
            tracing::info!(server = %endpoint, "connecting to the tunnel server");
        } else {
            tracing::debug!(server = %endpoint, "connecting to the tunnel server");
        }
        let mut options = self.inner.options.clone().with_connect_to(endpoint.addr);
        if options.extensions.replicas && !held.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&held.join(",")) {
                options.headers.insert(HELD_SERVERS_HEADER, v);
            }
        }
        let (ws, extensions, headers) = tokio::select! {
            r = connect_websocket_with_headers(&endpoint.url, &options) => r?,
            () = cancel.cancelled() => return Ok(None),
        };
        let server = if extensions.replicas {
            ServerInfo::from_headers(&headers)
        } else {
            ServerInfo::default()
        };
        Ok(Some(Established {
            ws,
            extensions,
            server,
        }))
    }

    fn start_session(&self, ws: ClientWebSocket, extensions: Extensions) -> SessionHandle {
        let mut builder = SessionBuilder::client()
            .config(self.inner.session_config.clone())
            .extensions(extensions)
            .connect_handler(self.handler(extensions.udp));
        if let Some(observer) = &self.inner.observer {
            builder = builder.observer(observer.clone());
        }
        let (session, driver) = builder.start(ws);
        tokio::spawn(driver.instrument(tracing::Span::current()));
        if let Some(state) = &self.inner.state {
            state.session_up();
        }
        session
    }

    /// Serves a session until it ends (or `cancel` fires), passing what the server says
    /// about itself on to `notices`, and says why it ended.
    async fn serve(
        &self,
        session: SessionHandle,
        slot: u64,
        cancel: &CancellationToken,
        notices: Option<&mpsc::UnboundedSender<SessionEvent>>,
    ) -> Result<Ended, ClientError> {
        let session_cancel = cancel.child_token();
        let mut callback = self
            .inner
            .on_connect
            .as_ref()
            .map(|f| f(session.clone(), session_cancel.clone()));
        let mut watch = session.notices();
        // What the server said before we subscribed counts too (a GoAway or a new count
        // right after the upgrade): the first `changed` returns it.
        watch.mark_changed();
        let result = loop {
            tokio::select! {
                end = session.closed() => break Ok(end),
                () = cancel.cancelled() => {
                    session.close();
                    break Ok(session.closed().await);
                }
                r = async { callback.as_mut().expect("guarded").await }, if callback.is_some() => {
                    callback = None;
                    match r {
                        // Go changes nothing when the callback returns without error.
                        Ok(()) => {}
                        Err(e) => {
                            session.close();
                            break Err(ClientError::OnConnect(e));
                        }
                    }
                }
                changed = watch.changed() => {
                    if changed.is_err() {
                        // The session is gone; `closed` says why.
                        break Ok(session.closed().await);
                    }
                    let now = watch.borrow_and_update().clone();
                    if let Some(tx) = notices {
                        tx.send(SessionEvent::Notice { slot, notices: now }).ok();
                    }
                }
            }
        };
        session_cancel.cancel();
        if let Some(state) = &self.inner.state {
            state.session_down();
            state.session_ended(&session);
        }
        let going_away = session.peer_went_away() || session.peer_going_away().is_some();
        match &result {
            Ok(end) if going_away => {
                tracing::info!(reason = %end, "session ended: the server is going away (draining)")
            }
            Ok(end) => tracing::info!(reason = %end, "session ended"),
            Err(e) => tracing::info!(error = %e, "session ended"),
        }
        result.map(|end| Ended { end, going_away })
    }

    /// One attempt of [`run`](Self::run): connect to `endpoint` and, if the server is one
    /// the client does not hold yet, run the session in a task of its own.
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        fleet: &Fleet,
        slot: u64,
        cancel: &CancellationToken,
        tasks: &mut JoinSet<()>,
        events: &mpsc::UnboundedSender<SessionEvent>,
    ) -> Option<Attempt> {
        let span = self.next_span();
        let first = fleet.len() == 0;
        let established = match self
            .establish(endpoint, &fleet.held_ids(), cancel, first)
            .instrument(span.clone())
            .await
        {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(ClientError::Connect(e)) => {
                return Some(match elsewhere(&e) {
                    Some((server, held)) => Attempt::Elsewhere { server, held },
                    None => Attempt::Failed(ClientError::Connect(e)),
                })
            }
            Err(e) => return Some(Attempt::Failed(e)),
        };
        let Established {
            ws,
            extensions,
            server,
        } = established;
        if server.id.as_deref().is_some_and(|id| fleet.holds(id)) {
            // A server that ignores the held list (or raced us): not a second session.
            let _span = span.enter();
            tracing::debug!(
                server_id = server.id.as_deref(),
                "a server held already: closing"
            );
            let close = async move {
                let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
                ws.into_websocket_stream(role).await.close(None).await
            };
            tokio::time::timeout(Duration::from_secs(1), close)
                .await
                .ok();
            return Some(Attempt::Elsewhere { server, held: true });
        }
        let session = {
            let _span = span.enter();
            tracing::info!(
                server = %endpoint,
                server_id = server.id.as_deref(),
                replicas = server.replicas,
                flow_control = extensions.flow_control(),
                half_close = extensions.half_close,
                "connected to the tunnel server"
            );
            self.start_session(ws, extensions)
        };
        if let Some(state) = &self.inner.state {
            state.session_started(&session, &endpoint.url, server.id.as_deref());
        }
        let client = self.clone();
        let cancel = cancel.clone();
        let events = events.clone();
        let endpoint = endpoint.clone();
        tasks.spawn(
            async move {
                let started = Instant::now();
                let result = client.serve(session, slot, &cancel, Some(&events)).await;
                events
                    .send(SessionEvent::Ended {
                        slot,
                        result,
                        uptime: started.elapsed(),
                        endpoint,
                    })
                    .ok();
            }
            .instrument(span),
        );
        Some(Attempt::Joined { slot, server })
    }

    /// Keeps sessions up until `cancel` fires: one with each replica the servers count (see
    /// [`ClientBuilder::sessions`]), each in a task of its own.
    ///
    /// When a session ends or an attempt fails the client tries the next server at once
    /// (see [`ClientBuilder::server`]); with one server, or once every server failed in a
    /// round, it waits with capped exponential backoff and jitter, reset after a healthy
    /// session. A server going away (a drain) is left at once, whatever the count. A `503`
    /// with `Retry-After` keeps that server aside for at least that long. An attempt that
    /// reaches a server held already is tried again at once, and after a few in a row with
    /// a backoff of its own (1 s doubling to 30 s): the agent is reachable meanwhile.
    pub async fn run(&self, cancel: CancellationToken) -> RunEnd {
        let mut run = Run {
            backoff: self.inner.backoff.clone(),
            fill_backoff: Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_secs(60),
            ),
            rotation: Rotation::default(),
            fleet: Fleet::new(self.inner.sessions),
            next_dial: Some(tokio::time::Instant::now()),
            new_round: false,
            elsewhere: 0,
            elsewhere_ids: Vec::new(),
            fill_eager_until: None,
            next_slot: 0,
            auth_refusals: 0,
        };
        let mut end = RunEnd::Cancelled;
        run.rotation
            .set_endpoints(failover::resolve(&self.inner.urls, &self.inner.options).await);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let sessions_cancel = cancel.child_token();
        loop {
            let dial_at = run.next_dial;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(event) = rx.recv() => self.on_event(&mut run, event, &cancel),
                () = async { tokio::time::sleep_until(dial_at.expect("guarded")).await }, if dial_at.is_some() => {
                    run.next_dial = None;
                    if run.new_round {
                        run.new_round = false;
                        run.rotation.set_endpoints(
                            failover::resolve(&self.inner.urls, &self.inner.options).await,
                        );
                        let wait = run.rotation.start_round(tokio::time::Instant::now());
                        if !wait.is_zero() {
                            tracing::info!(?wait, "waiting for the server's Retry-After");
                            run.next_dial = Some(tokio::time::Instant::now() + wait);
                            continue;
                        }
                    }
                    let Some(endpoint) = run.rotation.current().cloned() else {
                        break;
                    };
                    run.next_slot += 1;
                    let slot = run.next_slot;
                    let attempt = self
                        .attempt(&endpoint, &run.fleet, slot, &sessions_cancel, &mut tasks, &tx)
                        .await;
                    match attempt {
                        Some(attempt) => self.on_attempt(&mut run, &endpoint, attempt),
                        None => break,
                    }
                    let max = self.inner.max_auth_refusals;
                    if max > 0 && run.auth_refusals >= max {
                        tracing::error!(
                            refusals = run.auth_refusals,
                            "giving up: the server refused this agent's credentials {} times \
                             in a row. Check that --id (X-Tunnel-ID) and the token \
                             (--token-file, RD_CLIENT_TOKEN or --token) match a line of the \
                             server's --agent-tokens file (or, with a client certificate, \
                             that --id is the certificate's id: the server's refusal above \
                             names both), then start the agent again",
                            run.auth_refusals
                        );
                        end = RunEnd::CredentialsRefused(run.auth_refusals);
                        break;
                    }
                }
            }
            // Reap finished session tasks (their outcome came as an event).
            while tasks.try_join_next().is_some() {}
        }
        // Every session closes with a close frame; wait for them (each within the
        // session's close bound).
        sessions_cancel.cancel();
        while tasks.join_next().await.is_some() {}
        end
    }

    fn report(&self, run: &Run) {
        if let Some(state) = &self.inner.state {
            state.sessions(&run.fleet.held());
        }
    }

    fn on_attempt(&self, run: &mut Run, endpoint: &Endpoint, attempt: Attempt) {
        let now = tokio::time::Instant::now();
        match attempt {
            Attempt::Joined { slot, server } => {
                run.auth_refusals = 0;
                run.fleet.add(slot, server);
                run.elsewhere = 0;
                run.elsewhere_ids.clear();
                run.fill_backoff.reset();
                self.report(run);
                if run.fleet.target() > 1 {
                    tracing::info!(
                        sessions = run.fleet.live_count(),
                        replicas = run.fleet.target(),
                        "holding sessions with {} of {} replicas",
                        run.fleet.live_count(),
                        run.fleet.target()
                    );
                }
                if run.fleet.wants_more() {
                    // The next replica is more likely behind the next endpoint.
                    run.rotation.advance(now);
                    run.next_dial = Some(now);
                }
            }
            Attempt::Elsewhere { server, held } => {
                if let (true, Some(id), Some(n)) = (held, server.id.as_deref(), server.replicas) {
                    // A draining process's count may not be its successor's (a replica
                    // restarted under the same id): only a held server's is taken.
                    run.fleet.replicas_of(id, n);
                }
                if !run.fleet.wants_more() {
                    return;
                }
                run.elsewhere += 1;
                if let Some(id) = server.id {
                    if !run.elsewhere_ids.contains(&id) {
                        run.elsewhere_ids.push(id);
                    }
                }
                let several = run.rotation.len() > 1;
                // One pass over the endpoints when there are several (each may be another
                // replica); else a few attempts per replica counted through the one URL,
                // unless they all reach the same server (a replica's own address, not a
                // balancer: more attempts would only reach it again).
                let round = if several {
                    run.rotation.len()
                } else if run.elsewhere >= 3 && run.elsewhere_ids.len() == 1 {
                    run.elsewhere
                } else {
                    ELSEWHERE_PER_REPLICA * run.fleet.target()
                };
                if run.elsewhere < round {
                    run.rotation.advance(now);
                    // Not at once: agents that retry in lockstep through a round-robin
                    // balancer can meet the same replica every time (2,000 agents and five
                    // replicas did, in rd-rolling).
                    let jitter = ELSEWHERE_JITTER.mul_f64(rand::rng().random_range(0.0..=1.0));
                    run.next_dial = Some(now + jitter);
                } else {
                    run.elsewhere = 0;
                    run.elsewhere_ids.clear();
                    let mut delay = run.fill_backoff.next_delay();
                    if run.fill_eager_until.is_some_and(|t| now < t) {
                        delay = delay.min(FILL_EAGER_MAX);
                    }
                    tracing::info!(
                        ?delay,
                        sessions = run.fleet.live_count(),
                        replicas = run.fleet.target(),
                        "every attempt reached a replica held already: trying again later"
                    );
                    // Names are resolved again: a replaced pod has a new address.
                    run.new_round = true;
                    run.next_dial = Some(now + delay);
                }
            }
            Attempt::Failed(e) => {
                match &e {
                    ClientError::Connect(c) if c.is_auth_failure() => {
                        run.auth_refusals += 1;
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
                let next = run.rotation.attempt_failed(now, retry_after);
                self.schedule(run, next);
            }
        }
    }

    fn on_event(&self, run: &mut Run, event: SessionEvent, cancel: &CancellationToken) {
        let now = tokio::time::Instant::now();
        match event {
            SessionEvent::Notice { slot, notices } => {
                let target = run.fleet.target();
                let left = notices.going_away.is_some() && run.fleet.going_away(slot);
                if let Some(n) = notices.replicas {
                    run.fleet.replicas(slot, n);
                }
                self.report(run);
                if !run.fleet.wants_more() {
                    return;
                }
                if left {
                    // Make-before-break: the replacement, while the old session still serves.
                    tracing::info!(
                        reason = notices.going_away.as_deref(),
                        "a server is going away: making the replacement session"
                    );
                    run.elsewhere = 0;
                    run.elsewhere_ids.clear();
                    run.new_round = true;
                    run.next_dial = Some(now);
                } else if run.fleet.target() > target {
                    run.fill_backoff.reset();
                    run.elsewhere = 0;
                    run.elsewhere_ids.clear();
                    // The new replica may take a few seconds to be ready behind a balancer:
                    // keep looking for it often meanwhile.
                    run.fill_eager_until = Some(now + FILL_EAGER);
                    run.new_round = true;
                    let spread = FILL_SPREAD.mul_f64(rand::rng().random_range(0.0..=1.0));
                    tracing::info!(
                        replicas = run.fleet.target(),
                        "the servers count more replicas: filling"
                    );
                    let at = now + spread;
                    run.next_dial = Some(run.next_dial.map_or(at, |t| t.min(at)));
                }
            }
            SessionEvent::Ended {
                slot,
                result,
                uptime,
                endpoint,
            } => {
                run.fleet.remove(slot);
                self.report(run);
                run.backoff.session_ended(uptime);
                if cancel.is_cancelled() {
                    return;
                }
                let going_away = match &result {
                    Ok(ended) => {
                        if !ended.going_away {
                            tracing::warn!(reason = %ended.end, server = %endpoint, "tunnel session lost");
                        }
                        ended.going_away
                    }
                    Err(e) => {
                        tracing::warn!(error = %rd_session::error_chain(e), server = %endpoint, "tunnel session lost");
                        false
                    }
                };
                if !run.fleet.wants_more() {
                    return;
                }
                let next = run.rotation.session_ended(&endpoint, uptime, going_away);
                self.schedule(run, next);
            }
        }
    }

    /// Plans the next attempt after a failure or a lost session: at once, or after the
    /// backoff and a new round. A plan already made (the fill's next attempt) is kept when
    /// it comes later than "at once", and put back when it comes sooner than the backoff:
    /// a lost session is not left waiting behind a long fill backoff, and sessions that die
    /// right after their upgrade do not make the client redial in a tight loop.
    fn schedule(&self, run: &mut Run, next: Next) {
        if !run.fleet.wants_more() {
            return;
        }
        if let Some(state) = &self.inner.state {
            state.redialing();
        }
        let now = tokio::time::Instant::now();
        let at = if next == Next::Now {
            if let Some(to) = run.rotation.current() {
                tracing::info!(server = %to, "redialing at once");
            }
            now
        } else {
            let delay = run.backoff.next_delay();
            tracing::info!(?delay, servers = run.rotation.len(), "redialing");
            run.new_round = true;
            now + delay
        };
        run.next_dial = Some(match (run.next_dial, next) {
            (Some(planned), Next::Now) => planned.min(at),
            (Some(planned), Next::Backoff) => planned.max(at),
            (None, _) => at,
        });
    }
}

/// What [`Client::run`] keeps between attempts.
struct Run {
    backoff: Backoff,
    /// Between rounds of attempts that all reached servers held already.
    fill_backoff: Backoff,
    rotation: Rotation,
    fleet: Fleet,
    /// When to make the next attempt (`None`: none is wanted now).
    next_dial: Option<tokio::time::Instant>,
    /// The next attempt starts a round: resolve the names again, honour Retry-After.
    new_round: bool,
    /// Attempts in a row that reached a server held already.
    elsewhere: usize,
    /// The servers those attempts reached.
    elsewhere_ids: Vec<String>,
    /// Until then (after the count grew) the fill backoff stays short.
    fill_eager_until: Option<tokio::time::Instant>,
    next_slot: u64,
    /// Handshakes refused for our credentials since the last session.
    auth_refusals: u32,
}

/// The server of a refused upgrade, if the refusal means "not here, try another replica":
/// a `409` from a server the client holds already (`true`), or a draining server's `503`
/// (`false`), each with the server's id (an rd server answering an agent that offered the
/// replicas extension).
fn elsewhere(e: &ConnectError) -> Option<(ServerInfo, bool)> {
    let ConnectError::Rejected {
        status, headers, ..
    } = e
    else {
        return None;
    };
    let info = ServerInfo::from_headers(headers);
    let held = *status == StatusCode::CONFLICT;
    let leaving = *status == StatusCode::SERVICE_UNAVAILABLE && !has_retry_after(headers);
    ((held || leaving) && info.id.is_some()).then_some((info, held))
}

fn has_retry_after(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::RETRY_AFTER)
}
