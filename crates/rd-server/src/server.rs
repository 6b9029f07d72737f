//! [`Server`]: the upgrade endpoint, the session manager and the API around them.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rd_proto::{ClientSession, Config, Target};
use rd_session::{
    ConnectHandler, Extensions, RefuseAll, SessionBuilder, SessionHandle, SessionObserver,
    EXTENSIONS_HEADER, HELD_SERVERS_HEADER, REPLICAS_HEADER,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{text_response, Authorization, Authorizer, ErrorWriter, PlainTextErrors};
use crate::dialer::{Dialer, PeerConnects, Routing};
use crate::events::ServerEvents;
use crate::headers::{ASK_SERVER_ID_HEADER, PEER_ID_HEADER, PEER_TOKEN_HEADER, SERVER_ID_HEADER};
use crate::lifecycle::Lifecycle;
use crate::log_limit::{rejection, LogLimit};
use crate::metrics::{ByteCounters, Metrics};
use crate::peers::{Identity, LinkSettings, PeerCheck, PeerDiscovery, PeerLinkInfo, PeerSet};
use crate::registry::{self, Registry};
use crate::upgrade::accept_key;
use crate::Body;

/// Default of [`ServerBuilder::max_sessions_per_client`].
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: usize = 32;

/// Default of [`ServerBuilder::max_pending_handshakes`].
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;

/// Default `Retry-After` of a handshake refused by [`ServerBuilder::max_pending_handshakes`].
pub const DEFAULT_HANDSHAKE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Default of [`ServerBuilder::websocket_read_buffer`]: 4 KiB, the first read of small frames.
pub const DEFAULT_WS_READ_BUFFER: usize = 4 * 1024;

/// Default of [`ServerBuilder::websocket_read_burst`]: 64 KiB per read syscall in a burst.
pub const DEFAULT_WS_READ_BURST: usize = rd_session::DEFAULT_BURST;

pub(crate) struct Inner {
    pub(crate) authorizer: Box<dyn Authorizer>,
    pub(crate) error_writer: Box<dyn ErrorWriter>,
    pub(crate) client_connect: Arc<dyn ConnectHandler>,
    pub(crate) session_config: Config,
    pub(crate) extensions: Extensions,
    pub(crate) max_message_size: usize,
    pub(crate) max_sessions_per_client: usize,
    /// Permits for upgrades accepted but not yet running as sessions.
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    pub(crate) max_pending_handshakes: usize,
    pub(crate) retry_after: Duration,
    pub(crate) ws_read_buffer: usize,
    pub(crate) ws_read_burst: usize,
    /// Client sessions, peers and their routes: what dials use.
    pub(crate) routing: Arc<Routing>,
    pub(crate) metrics: Metrics,
    /// Running, draining or shutting down, and who is told (shared with `routing` and
    /// its peer set).
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// What the admin API tells about each running session (clients and incoming peer
    /// links), by session key.
    pub(crate) records: Mutex<HashMap<i64, Arc<SessionRecord>>>,
}

/// One running session as the admin API shows it, beyond what its handle knows.
#[derive(Debug)]
pub(crate) struct SessionRecord {
    pub(crate) handle: SessionHandle,
    pub(crate) peer: bool,
    /// Where the upgrade came from (when the serving loop said).
    pub(crate) remote: Option<std::net::SocketAddr>,
    /// How the client proved its key ([`Authorizer::method`]; `peer-token` for peers).
    pub(crate) auth: &'static str,
    /// When the session was registered.
    pub(crate) since: std::time::SystemTime,
    /// Payload bytes the session's streams moved.
    pub(crate) bytes: Arc<SessionBytes>,
}

/// A session's payload bytes each way, counted by its observer.
#[derive(Debug, Default)]
pub(crate) struct SessionBytes {
    /// Written into the session's streams (towards the agent).
    pub(crate) sent: std::sync::atomic::AtomicU64,
    /// Read from them (from the agent).
    pub(crate) received: std::sync::atomic::AtomicU64,
}

/// What [`Server::handle`] learned at the upgrade, for the session it starts.
struct SessionStart {
    client_key: String,
    session_key: i64,
    peer: bool,
    extensions: Extensions,
    /// The replica count the agent was told in the 101 (replicas extension only).
    told: Option<u32>,
    remote: Option<std::net::SocketAddr>,
    auth: &'static str,
}

/// The address a request came from. A server loop that knows it inserts it into the
/// request's extensions so that [`Server::handle`] can log it with a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub std::net::SocketAddr);

/// Refused handshakes, logged at most a few lines a second.
static REJECTED: LogLimit = LogLimit::new();

/// A remotedialer server. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Server {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field(
                "peer_id",
                &self.inner.routing.peers.identity().map(|i| &i.id),
            )
            .finish()
    }
}

/// Configures a [`Server`].
pub struct ServerBuilder {
    authorizer: Box<dyn Authorizer>,
    error_writer: Box<dyn ErrorWriter>,
    peer_identity: Option<(String, String)>,
    client_connect: Arc<dyn ConnectHandler>,
    session_config: Config,
    extensions: Extensions,
    max_message_size: usize,
    max_sessions_per_client: usize,
    max_pending_handshakes: usize,
    retry_after: Duration,
    ws_read_buffer: usize,
    ws_read_burst: usize,
    peer_connect: rd_session::transport::ConnectOptions,
    peer_discovery: Option<PeerDiscovery>,
    metrics: Metrics,
    guards: crate::guards::Guards,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder").finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// A server whose clients are judged by `authorizer`.
    pub fn new(authorizer: impl Authorizer) -> Self {
        Self {
            authorizer: Box::new(authorizer),
            error_writer: Box::new(PlainTextErrors),
            peer_identity: None,
            client_connect: Arc::new(RefuseAll),
            session_config: Config::default(),
            extensions: Extensions::SUPPORTED,
            max_message_size: rd_session::DEFAULT_MAX_MESSAGE_SIZE,
            max_sessions_per_client: DEFAULT_MAX_SESSIONS_PER_CLIENT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            retry_after: DEFAULT_HANDSHAKE_RETRY_AFTER,
            ws_read_buffer: DEFAULT_WS_READ_BUFFER,
            ws_read_burst: DEFAULT_WS_READ_BURST,
            peer_connect: rd_session::transport::ConnectOptions::default(),
            peer_discovery: None,
            metrics: Metrics::new(),
            guards: crate::guards::Guards::default(),
        }
    }

    /// Closes a tunnel stream that moved no byte either way for `timeout` (reset with
    /// `idle timeout: ...`, counted in `rd_streams_expired{guard="idle_timeout"}`). Off by
    /// default, as Go: a stream lives as long as both ends keep it. Streams stuck on a
    /// target or a client that went quiet otherwise live as long as their session.
    /// Checked a few times per timeout, so a stream may outlive it by a quarter of it.
    /// Needs a tokio runtime at [`build`](Self::build).
    pub fn stream_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.guards.idle_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Closes a stream this server dialed whose agent has not answered it at all within
    /// `timeout` (no data, error, credit or half-close: a dial stuck on the agent's side),
    /// reset with `dial timeout: ...` and counted in
    /// `rd_streams_expired{guard="pending_dial_timeout"}`. Off by default. A target that
    /// never speaks first and never reads enough to be granted credit (a one-way stream
    /// of a few KiB) counts as unanswered too with a Go agent, or one without the
    /// connect-ack extension: keep the timeout above such silences. rd agents acknowledge
    /// the dial as soon as it succeeded.
    pub fn pending_dial_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.guards.pending_dial_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Replaces Go's `DefaultErrorWriter` for handshake failures.
    pub fn error_writer(mut self, w: impl ErrorWriter) -> Self {
        self.error_writer = Box::new(w);
        self
    }

    /// This server's peer id and the token peers share (Go's `PeerID`/`PeerToken`); both are
    /// needed for HA peering.
    pub fn peer_identity(mut self, id: impl Into<String>, token: impl Into<String>) -> Self {
        self.peer_identity = Some((id.into(), token.into()));
        self
    }

    /// Serves Connects that clients send towards the server (Go's
    /// `ClientConnectAuthorizer` plus a dialer). Default: refuse each with an Error.
    pub fn client_connect(mut self, handler: impl ConnectHandler) -> Self {
        self.client_connect = Arc::new(handler);
        self
    }

    /// Session intervals, watermarks and caps.
    pub fn session_config(mut self, config: Config) -> Self {
        self.session_config = config;
        self
    }

    /// Sessions one client key may hold at once (default 32; Go has no limit). One more is
    /// refused at the handshake with `429 Too Many Requests`. Several sessions per key are
    /// normal while a client reconnects; dozens mean a client redialing in a loop.
    pub fn max_sessions_per_client(mut self, limit: usize) -> Self {
        self.max_sessions_per_client = limit;
        self
    }

    /// Upgrades in progress at once: accepted, but whose session is not running yet
    /// (default 1024). One more is answered `503 Service Unavailable` with
    /// [`Retry-After`](Self::handshake_retry_after) instead of queueing, so a reconnect storm
    /// meets a quick, cheap refusal rather than a server that slows down for everyone.
    pub fn max_pending_handshakes(mut self, limit: usize) -> Self {
        self.max_pending_handshakes = limit;
        self
    }

    /// The `Retry-After` sent with a 503 from [`max_pending_handshakes`](Self::max_pending_handshakes)
    /// (default 1 s; rounded up to whole seconds, at least 1).
    pub fn handshake_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = delay;
        self
    }

    /// How much one read of a session's small websocket frames (pings, requests, Go's
    /// 4 KiB fragments) takes at first (default 4 KiB, at least 1 KiB). The buffer exists
    /// only while frames arrive, so idle sessions hold none; a frame larger than this is
    /// read into a buffer of its own, without a copy (see [`rd_session::WebSocketIo`]).
    pub fn websocket_read_buffer(mut self, bytes: usize) -> Self {
        self.ws_read_buffer = bytes;
        self
    }

    /// The most one read of small frames takes while each read fills its buffer (a burst
    /// of many small messages; default 64 KiB; 0: reads stay at
    /// [`websocket_read_buffer`](Self::websocket_read_buffer)).
    pub fn websocket_read_burst(mut self, bytes: usize) -> Self {
        self.ws_read_burst = bytes;
        self
    }

    /// Largest websocket message accepted (default 64 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How outgoing peer links connect: TLS roots, CA files, and
    /// `insecure_skip_verify` for Go's behaviour (it never verifies peers). Proxies from the
    /// environment are not used for peers unless set here, as in Go.
    pub fn peer_connect_options(mut self, options: rd_session::transport::ConnectOptions) -> Self {
        self.peer_connect = options;
        self
    }

    /// Finds peers through DNS (see [`PeerDiscovery`]): a link to every address the name
    /// resolves to, except this server's own, kept up to date every interval. Needs a
    /// [peer identity](Self::peer_identity); incoming peers are then accepted by the shared
    /// token, whatever their id. [`build`](Self::build) starts it, so it must run inside a
    /// tokio runtime.
    pub fn peer_discovery(mut self, discovery: PeerDiscovery) -> Self {
        self.peer_discovery = Some(discovery);
        self
    }

    /// Uses an existing metrics set (for example one already registered elsewhere).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// rd protocol extensions this server accepts from rd clients and offers on its peer
    /// links (default: all this build speaks). Go peers never ask for any.
    pub fn extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }

    /// Builds the server.
    pub fn build(self) -> Server {
        let mut peer_connect = self.peer_connect;
        peer_connect.proxy = rd_session::transport::ProxyMode::None;
        peer_connect.extensions = self.extensions;
        let identity = self.peer_identity.map(|(id, token)| Identity { id, token });
        let lifecycle = Arc::new(Lifecycle::default());
        let discovering = self.peer_discovery.is_some() && identity.is_some();
        let clients = Arc::new(Mutex::new(Registry::default()));
        let routing = Arc::new_cyclic(|routing| Routing {
            clients: clients.clone(),
            peers: PeerSet::new(
                identity,
                LinkSettings {
                    connect: peer_connect,
                    session: self.session_config.clone(),
                    connects: {
                        let routing = routing.clone();
                        Arc::new(move |extensions: &Extensions| {
                            Arc::new(PeerConnects {
                                routing: routing.clone(),
                                link_udp: extensions.udp,
                            }) as Arc<dyn rd_session::ConnectHandler>
                        })
                    },
                },
                clients,
                self.metrics.clone(),
                lifecycle.clone(),
                discovering,
            ),
            dial_seconds: self.metrics.dial_seconds.clone(),
            metrics: self.metrics.clone(),
            lifecycle: lifecycle.clone(),
        });
        match self.peer_discovery {
            Some(discovery) if discovering => routing.peers.start_discovery(discovery),
            Some(_) => tracing::warn!("peer discovery needs a peer id and token; not discovering"),
            None => {}
        }
        let server = Server {
            inner: Arc::new(Inner {
                authorizer: self.authorizer,
                error_writer: self.error_writer,
                client_connect: self.client_connect,
                session_config: self.session_config,
                extensions: self.extensions,
                max_message_size: self.max_message_size,
                max_sessions_per_client: self.max_sessions_per_client,
                handshakes: Arc::new(tokio::sync::Semaphore::new(self.max_pending_handshakes)),
                max_pending_handshakes: self.max_pending_handshakes,
                retry_after: self.retry_after,
                ws_read_buffer: self.ws_read_buffer,
                ws_read_burst: self.ws_read_burst,
                routing,
                metrics: self.metrics,
                lifecycle,
                records: Mutex::new(HashMap::new()),
            }),
        };
        self.guards.start(&server);
        server
    }
}

/// Counts a session's streams and bytes into the server's metrics.
struct StreamMetrics {
    metrics: Metrics,
    client_key: String,
    bytes: ByteCounters,
    /// The same bytes for this session alone (the admin API).
    session_bytes: Arc<SessionBytes>,
    /// The server's [`Lifecycle::wake`].
    drain_wake: Arc<tokio::sync::Notify>,
}

impl SessionObserver for StreamMetrics {
    fn stream_opened(&self, target: &Target) {
        self.metrics
            .connection_added(&self.client_key, &target.network(), target.address());
    }
    fn stream_closed(&self, target: &Target) {
        self.metrics
            .connection_removed(&self.client_key, &target.network(), target.address());
        // Cheap when nobody waits (no drain running).
        self.drain_wake.notify_waiters();
    }
    fn transmitted(&self, bytes: usize) {
        self.bytes.transmit.inc_by(bytes as u64);
        self.session_bytes
            .sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn received(&self, bytes: usize) {
        self.bytes.receive.inc_by(bytes as u64);
        self.session_bytes
            .received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn reset(&self, text: &str) {
        self.bytes.transmit_error.inc_by(text.len() as u64);
    }
    fn limit_exceeded(&self, limit: rd_proto::Limit) {
        self.metrics.limit_hit(limit.name());
    }
}

impl Server {
    /// A builder; see [`ServerBuilder`].
    pub fn builder(authorizer: impl Authorizer) -> ServerBuilder {
        ServerBuilder::new(authorizer)
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        registry::lock(&self.inner.routing.clients)
    }

    pub(crate) fn peers(&self) -> &PeerSet {
        &self.inner.routing.peers
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Refreshes the gauges computed from session state, then encodes every metric.
    pub fn encode_metrics(&self) -> String {
        let agents = self.registry().client_keys().len();
        self.inner.metrics.agents.set(agents as i64);
        let mut sessions = self.registry().all_sessions();
        sessions.extend(self.peers().incoming_sessions());
        let (mut by_us, mut by_peer, mut buffered) = (0, 0, 0);
        for s in sessions {
            let stats = s.stats();
            by_us += stats.paused_by_us;
            by_peer += stats.paused_by_peer;
            buffered += stats.receive_buffered;
        }
        let m = &self.inner.metrics;
        m.reconcile();
        m.streams_paused_by_us.set(by_us as i64);
        m.streams_paused_by_peer.set(by_peer as i64);
        m.buffered_bytes.set(buffered as i64);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            m.runtime_alive_tasks
                .set(runtime.metrics().num_alive_tasks() as i64);
        }
        m.encode()
    }

    /// A dialer that opens streams through `client_key`'s session, found at dial time (local
    /// sessions first, then peers). It also works as a hyper-util client connector.
    pub fn dialer(&self, client_key: impl Into<String>) -> Dialer {
        Dialer::new(self.inner.routing.clone(), client_key.into())
    }

    /// Whether a dial for `client_key` would find a session, here or through a peer.
    pub fn has_session(&self, client_key: &str) -> bool {
        self.inner.routing.has_route(client_key)
    }

    /// Keys of the clients connected to this server (not via peers), unordered.
    pub fn list_clients(&self) -> Vec<String> {
        self.registry().client_keys()
    }

    /// Closes every session of `client_key` on this server; returns how many.
    pub fn disconnect(&self, client_key: &str) -> usize {
        let sessions = self.registry().sessions_of(client_key);
        for s in &sessions {
            s.close();
        }
        sessions.len()
    }

    /// Starts (or restarts, if its url or token changed) a link to peer server `id` at `url`.
    /// Does nothing unless this server has a [peer identity](ServerBuilder::peer_identity).
    pub fn add_peer(
        &self,
        url: impl Into<String>,
        id: impl Into<String>,
        token: impl Into<String>,
    ) {
        self.peers().add_static(url.into(), id.into(), token.into());
    }

    /// Stops the link to peer `id`.
    pub fn remove_peer(&self, id: &str) {
        self.peers().remove_static(id);
    }

    /// The outgoing peer links (static and discovered), ordered by URL.
    pub fn peer_links(&self) -> Vec<PeerLinkInfo> {
        self.peers().links()
    }

    /// Replicas this server counts, itself included: the rd peers it has a live link with,
    /// draining ones left out. rd agents are told it (in the `101`, and in the session when
    /// it changes) and hold a session with that many servers.
    pub fn replica_count(&self) -> u32 {
        self.peers().replica_count()
    }

    /// Whether the first round of [peer discovery](ServerBuilder::peer_discovery) is done
    /// (true without discovery).
    pub fn peers_discovered(&self) -> bool {
        self.peers().discovery_ready()
    }

    /// Readiness (`/readyz`): accepting tunnels, not draining, and, with peer discovery,
    /// past its first round (so that requests entering here can reach the other replicas'
    /// clients).
    pub fn is_ready(&self) -> bool {
        self.is_accepting() && !self.is_draining() && self.peers_discovered()
    }

    /// Stops accepting tunnels, stops peer links and closes every session; waits up to
    /// `grace` for them to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.lifecycle.begin_shutdown();
        let mut sessions = self.registry().all_sessions();
        sessions.extend(self.peers().incoming_sessions());
        for s in &sessions {
            s.close();
        }
        let all_closed = async {
            for s in &sessions {
                s.closed().await;
            }
        };
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            tracing::warn!("sessions still open after the shutdown grace period");
        }
    }

    /// Starts draining: new sessions are refused (503) and readiness probes fail; streams in
    /// flight go on. New streams go to a peer that holds the agent when there is one, else
    /// through the agent's session here unless it was withdrawn (then they fail with
    /// [`DialError::Draining`](crate::DialError::Draining)). [`drain`](Self::drain) does this
    /// first, then moves the agents and waits for the streams.
    pub fn begin_drain(&self) {
        self.inner.lifecycle.begin_drain();
    }

    /// Whether [`begin_drain`](Self::begin_drain) was called (it stays true through the
    /// shutdown that follows).
    pub fn is_draining(&self) -> bool {
        self.inner.lifecycle.is_draining()
    }

    /// Registers a gateway's [`ServerEvents`]: told when the drain and the shutdown begin,
    /// when a client's session registers here and when a peer withdraws one. The server
    /// keeps it for its whole life, so hold what it acts on through a `Weak` when that
    /// should end sooner.
    pub fn subscribe(&self, events: impl ServerEvents) {
        self.inner.lifecycle.subscribe(Arc::new(events));
    }

    /// A token cancelled when the [shutdown](Self::shutdown) begins: what a gateway's
    /// listeners and connection tasks stop on. A child token, so cancelling it stops only
    /// what hangs on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.lifecycle.stopped().child_token()
    }

    /// Whether the server still accepts tunnels (false once [`shutdown`](Self::shutdown) began).
    pub fn is_accepting(&self) -> bool {
        self.inner.lifecycle.is_accepting()
    }

    pub(crate) fn records(&self) -> MutexGuard<'_, HashMap<i64, Arc<SessionRecord>>> {
        self.inner.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_record(&self, record: Arc<SessionRecord>) {
        self.records().insert(record.handle.session_key(), record);
    }

    /// Whether the server has no sessions (used after shutdown).
    pub fn is_idle(&self) -> bool {
        self.registry().is_empty() && self.peers().incoming_sessions().is_empty()
    }

    /// Handles a tunnel upgrade request: authenticates a peer or a client, then switches to
    /// a websocket and runs the session until it ends. Mount it at any path.
    ///
    /// Every refusal is logged once (`tunnel handshake rejected`, rate-limited: an outsider
    /// chooses how many) with the status, the reason, the id the request claimed and the
    /// caller's address when the request carries a [`RemoteAddr`] extension.
    pub async fn handle<B: Send + 'static>(&self, mut req: Request<B>) -> Response<Body> {
        let inner = &self.inner;
        let remote = req.extensions().get::<RemoteAddr>().map(|r| r.0);
        let claimed = req
            .headers()
            .get("x-tunnel-id")
            .or_else(|| req.headers().get(PEER_ID_HEADER))
            .map(|v| crate::short_id(&String::from_utf8_lossy(v.as_bytes())).into_owned());
        let reject = |status: StatusCode, metric: &'static str, reason: &str| {
            inner.metrics.handshake_rejected(metric);
            rejection!(
                REJECTED,
                remote = remote.map(tracing::field::display),
                claimed_id = claimed.as_deref(),
                status = status.as_u16(),
                reason,
                "tunnel handshake rejected"
            );
            inner.error_writer.write_error(status, reason)
        };
        if !inner.lifecycle.is_accepting() {
            return reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "server shutting down",
            );
        }
        if self.is_draining() {
            // No Retry-After: the agent should go to another replica, not come back here.
            let mut response = reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "server draining: connect to another replica",
            );
            // An rd agent filling its sessions reads our id as "this one is leaving".
            if Extensions::from_headers(req.headers()).replicas {
                self.add_replica_headers(&mut response, self.peers().replica_count());
            }
            return response;
        }
        // Admission: cheap to refuse, before any work that costs more than this.
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            inner.metrics.handshake_rejected("overloaded");
            let text = format!(
                "too many handshakes in progress: limit {}",
                inner.max_pending_handshakes
            );
            let mut response = inner
                .error_writer
                .write_error(StatusCode::SERVICE_UNAVAILABLE, &text);
            let secs = inner.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = req.into_parts();
        let peer_check = self.peer_of(&parts);
        let asked_id = parts.headers.contains_key(ASK_SERVER_ID_HEADER);
        let mut auth = "peer-token";
        let (client_key, peer) = match peer_check {
            PeerCheck::Peer(id) => (id, true),
            PeerCheck::ItsMe => {
                inner.metrics.handshake_rejected("peer_is_self");
                let mut response = inner
                    .error_writer
                    .write_error(StatusCode::CONFLICT, "peer link to this server itself");
                self.add_server_id(&mut response, asked_id);
                return response;
            }
            PeerCheck::NotPeer | PeerCheck::Refused(_) => {
                match inner.authorizer.authorize(&parts).await {
                    Authorization::Client(key) => {
                        auth = inner.authorizer.method_for(&parts);
                        if let PeerCheck::Refused(why) = peer_check {
                            rejection!(
                                REJECTED,
                                remote = remote.map(tracing::field::display),
                                claimed_id = claimed.as_deref(),
                                reason = why,
                                "peer credentials refused; accepted as a client instead"
                            );
                        }
                        (key, false)
                    }
                    Authorization::Unauthorized => {
                        // Go's text on the wire; the log says what was wrong.
                        inner.metrics.handshake_rejected("unauthorized");
                        let reason = match peer_check {
                            PeerCheck::Refused(why) => why,
                            _ => "the authorizer refused the client",
                        };
                        rejection!(
                            REJECTED,
                            remote = remote.map(tracing::field::display),
                            claimed_id = claimed.as_deref(),
                            status = 401,
                            reason,
                            "tunnel handshake rejected"
                        );
                        return inner
                            .error_writer
                            .write_error(StatusCode::UNAUTHORIZED, "failed authentication");
                    }
                    Authorization::Forbidden(text) => {
                        return reject(StatusCode::FORBIDDEN, "forbidden", &text);
                    }
                    Authorization::Error(text) => {
                        return reject(StatusCode::BAD_REQUEST, "authorizer_error", &text);
                    }
                }
            }
        };
        if !peer && self.registry().sessions_of(&client_key).len() >= inner.max_sessions_per_client
        {
            let text = format!(
                "too many sessions for client {client_key}: limit {}",
                inner.max_sessions_per_client
            );
            return reject(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", &text);
        }
        let extensions = Extensions::from_headers(&parts.headers).intersect(inner.extensions);
        if !peer && extensions.replicas && self.holds_us_already(&parts) {
            // An agent filling one session per replica through a load balancer reached a
            // replica it holds already: no second session (and no AddClient/RemoveClient
            // churn across the peers), just our id and count so it tries again elsewhere.
            inner.metrics.handshake_rejected("already_held");
            let mut response = inner.error_writer.write_error(
                StatusCode::CONFLICT,
                "this agent holds a session with this server already",
            );
            self.add_replica_headers(&mut response, self.peers().replica_count());
            return response;
        }
        let accept = match accept_key(&parts) {
            Ok(accept) => accept,
            Err(bad) => {
                let text = format!(
                    "Error during upgrade for host [{client_key}]: {}",
                    bad.reason
                );
                return reject(bad.status, "bad_upgrade", &text);
            }
        };
        // What the agent is told at the upgrade; if it has changed by the time the session
        // is registered, the session is told again (see `run_session`).
        let told = (!peer && extensions.replicas).then(|| self.peers().replica_count());
        let session_key = rand::random::<i64>() & i64::MAX;
        // At debug level only: the subscriber holds about 2 KiB per live span and takes a
        // lock on each poll that enters it, which a server with 10,000 idle agents pays
        // 10,000 times over. What an operator must see at info names its session itself
        // (the driver's limit warnings, the start and end lines below).
        let span = tracing::debug_span!(parent: None, "session", side = "server", %client_key, session_key, peer);
        let server = self.clone();
        tokio::spawn(
            async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let start = SessionStart {
                            client_key,
                            session_key,
                            peer,
                            extensions,
                            told,
                            remote,
                            auth,
                        };
                        // A plain TCP connection served by hyper over tokio (rd-server's
                        // own listener): the session takes the socket itself, without
                        // hyper's boxed wrapper, and bounds its unsent bytes.
                        match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
                            Ok(parts) => {
                                let tcp = parts.io.into_inner();
                                rd_session::set_tunnel_send_queue(&tcp).ok();
                                let ws =
                                    rd_session::WebSocketIo::new(tcp).read_ahead(parts.read_buf);
                                server.run_session(ws, start, permit).await
                            }
                            Err(upgraded) => {
                                let ws = rd_session::WebSocketIo::new(TokioIo::new(upgraded));
                                server.run_session(ws, start, permit).await
                            }
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "websocket upgrade failed"),
                }
            }
            .instrument(span),
        );
        let mut response = text_response(StatusCode::SWITCHING_PROTOCOLS, String::new());
        let h = response.headers_mut();
        h.remove(header::CONTENT_TYPE);
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        // Only to a client that asked: a Go client sees Go's response, header for header.
        if let Some(v) = extensions.header_value() {
            h.insert(EXTENSIONS_HEADER, v);
        }
        if peer {
            self.add_server_id(&mut response, asked_id);
        } else if let Some(count) = told {
            self.add_replica_headers(&mut response, count);
        }
        response
    }

    /// Whether an agent's upgrade says it holds a session with this server already
    /// ([`HELD_SERVERS_HEADER`]).
    fn holds_us_already(&self, parts: &http::request::Parts) -> bool {
        let Some(own) = self.peers().identity() else {
            return false;
        };
        parts
            .headers
            .get_all(HELD_SERVERS_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|id| id.trim() == own.id)
    }

    /// Our id and `count`, the replica count, for an agent that negotiated the replicas
    /// extension (a server without a peer id is one replica with no id: the agent keeps one
    /// session).
    fn add_replica_headers(&self, response: &mut Response<Body>, count: u32) {
        let Some(own) = self.peers().identity() else {
            return;
        };
        let h = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&own.id) {
            h.insert(SERVER_ID_HEADER, v);
        }
        h.insert(REPLICAS_HEADER, HeaderValue::from(count));
    }

    /// Answers an rd peer that asked for our id (never a Go peer: it does not ask).
    fn add_server_id(&self, response: &mut Response<Body>, asked: bool) {
        let Some(own) = self.peers().identity().filter(|_| asked) else {
            return;
        };
        if let Ok(v) = HeaderValue::from_str(&own.id) {
            response.headers_mut().insert(SERVER_ID_HEADER, v);
        }
    }

    /// Whether the request carries a registered peer's id and token.
    fn peer_of(&self, parts: &http::request::Parts) -> PeerCheck {
        let get = |name| {
            parts
                .headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .filter(|v| !v.is_empty())
        };
        let (Some(id), Some(token)) = (get(PEER_ID_HEADER), get(PEER_TOKEN_HEADER)) else {
            return PeerCheck::NotPeer;
        };
        self.peers().check(id, token)
    }

    async fn run_session<S>(
        &self,
        ws: rd_session::WebSocketIo<S>,
        start: SessionStart,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let SessionStart {
            client_key,
            session_key,
            peer,
            extensions,
            told,
            remote,
            auth,
        } = start;
        let inner = &self.inner;
        let ws = ws
            .max_message_size(inner.max_message_size)
            .read_buffer(inner.ws_read_buffer)
            .read_burst(inner.ws_read_burst);
        // Counted before its byte counters are resolved: a key's series are removed only
        // while it has no session (`Metrics::transient_client_keys`).
        inner.metrics.session_added(&client_key, peer);
        let session_bytes = Arc::new(SessionBytes::default());
        let observer = Arc::new(StreamMetrics {
            metrics: inner.metrics.clone(),
            client_key: client_key.clone(),
            bytes: inner.metrics.byte_counters(&client_key),
            session_bytes: session_bytes.clone(),
            drain_wake: inner.lifecycle.wake.clone(),
        });
        let record = |handle: &SessionHandle| {
            Arc::new(SessionRecord {
                handle: handle.clone(),
                peer,
                remote,
                auth,
                since: std::time::SystemTime::now(),
                bytes: session_bytes.clone(),
            })
        };
        let mut builder = SessionBuilder::server(client_key.clone(), session_key)
            .config(inner.session_config.clone())
            .extensions(extensions)
            .observer(observer);
        if peer {
            let peers = self.peers().clone();
            let link = std::sync::OnceLock::<SessionHandle>::new();
            let link = Arc::new(link);
            let link2 = link.clone();
            builder = builder.on_announcement(move |client: ClientSession, added| {
                if let Some(h) = link2.get() {
                    peers.announced(h, client, added);
                }
            });
            let (handle, driver) = builder.start(ws);
            link.set(handle.clone()).ok();
            self.add_record(record(&handle));
            self.peers().incoming_added(handle.clone());
            drop(permit);
            self.serve_registered(handle, driver, &client_key, true)
                .await;
        } else {
            builder = builder.connect_handler_arc(inner.client_connect.clone());
            let (handle, driver) = builder.start(ws);
            self.add_record(record(&handle));
            {
                let mut registry = self.registry();
                registry.add_client(handle.clone());
                // Under the registry's lock: links see announcements in its order.
                self.peers().announce(&handle, true);
            }
            // A recount between the 101 and the registration told every session but this one.
            let count = self.peers().replica_count();
            if told.is_some_and(|t| t != count) {
                handle.announce_replicas(count);
            }
            self.inner.lifecycle.session_added(&client_key);
            // The handshake is over: the session runs, and counts no more against admission.
            drop(permit);
            self.serve_registered(handle, driver, &client_key, false)
                .await;
        }
    }

    async fn serve_registered<S>(
        &self,
        handle: SessionHandle,
        driver: rd_session::SessionDriver<S>,
        client_key: &str,
        peer: bool,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let metrics = &self.inner.metrics;
        // The session span is debug-only (see `handle`): these lines name the session.
        tracing::info!(
            session = handle.session_key(),
            peer,
            flow_control = handle.extensions().flow_control(),
            half_close = handle.extensions().half_close,
            "Handling backend connection request [{client_key}]"
        );
        let end = driver.await;
        if peer {
            self.peers().incoming_removed(&handle);
        } else {
            let mut registry = self.registry();
            registry.remove_client(&handle);
            self.peers().announce(&handle, false);
        }
        self.records().remove(&handle.session_key());
        metrics.session_removed(client_key, peer);
        metrics.session_ended(end.kind());
        self.inner.lifecycle.wake.notify_waiters();
        tracing::info!(session = handle.session_key(), peer, reason = %end, "session ended [{client_key}]");
    }
}
