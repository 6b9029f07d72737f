//! [`SessionHandle`] and [`SessionBuilder`]: how the rest of a program uses a session.

use std::fmt;
use std::sync::Arc;

use crate::extensions::Extensions;
use rd_proto::{ClientSession, Config, Identity, Session, SessionEnd, SessionStats, Side, Target};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::driver::{now, AnnouncementFn, SessionDriver};
use crate::error::DialError;
use crate::incoming::ConnectHandler;
use crate::observer::{NoObserver, SessionObserver};
use crate::shared::Shared;
use crate::stream::TunnelStream;
use crate::websocket::IntoWebSocketIo;

/// The websocket Close status "going away" (RFC 6455 section 7.4.1).
pub const GOING_AWAY: u16 = 1001;

/// What the peer said about itself during a session with the replicas extension (see
/// [`SessionHandle::notices`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerNotices {
    /// The reason of the peer's GoAway, once it sent one: open no new streams here.
    pub going_away: Option<String>,
    /// The replica count the peer announced last in the session (the upgrade's count until
    /// then is the caller's to keep).
    pub replicas: Option<u32>,
}

/// A cloneable handle to a running session.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("client_key", &self.shared.client_key)
            .field("session_key", &self.shared.session_key)
            .finish()
    }
}

impl SessionHandle {
    /// Opens a stream to `target` through the peer. Like Go's `Session.Dial` it returns at
    /// once: the protocol has no acknowledgement, so a refused remote dial shows up as the
    /// stream's first read error (with the peer's text, e.g. `connection refused`).
    ///
    /// A `udp`, `udp4` or `udp6` target needs rd's udp extension on this session: without
    /// it (a Go peer) the dial is refused with [`DialError::UdpNotNegotiated`] and nothing
    /// is sent. With it, wrap the stream in a [`DatagramStream`](crate::DatagramStream).
    pub fn dial(&self, target: Target) -> Result<TunnelStream, DialError> {
        let mut inner = self.shared.lock();
        if is_udp(target.proto()) && !inner.proto.config().udp {
            return Err(DialError::UdpNotNegotiated);
        }
        let id = inner.call(|p| p.open_stream(now(), target.clone()))?;
        drop(inner);
        Ok(TunnelStream::new(self.shared.clone(), id, target))
    }

    /// Convenience for [`dial`](Self::dial) with Go's `(network, address)` pair.
    pub fn dial_addr(&self, proto: &str, address: &str) -> Result<TunnelStream, DialError> {
        self.dial(Target::new(proto, address)?)
    }

    /// Queues an AddClient (`added`) or RemoveClient for the peer; used on peer links.
    pub fn announce(&self, client: ClientSession, added: bool) {
        let mut inner = self.shared.lock();
        inner.call(|p| p.announce(client, added));
    }

    /// Closes the session: streams end with `tunnel disconnect` and the peer is told.
    pub fn close(&self) {
        let mut inner = self.shared.lock();
        inner.proto.close(SessionEnd::Local);
        inner.wake_driver();
    }

    /// Closes the session like [`close`](Self::close), with a websocket Close frame of
    /// status 1001 (going away) and `reason`: the peer learns that this end is leaving (a
    /// server draining, say) rather than failing. An rd client redials at once, to another
    /// server if it has one; a Go client treats it as any close (it redials after 5 s).
    /// Plain websocket, so safe with every peer.
    pub fn close_going_away(&self, reason: &str) {
        let mut inner = self.shared.lock();
        if inner.proto.end().is_none() {
            // A Close frame's reason is at most 123 bytes; cut on a character boundary.
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            inner.going_away = Some(reason[..end].to_owned());
        }
        inner.proto.close(SessionEnd::Local);
        inner.wake_driver();
    }

    /// The status code of the websocket Close frame the peer sent, if it sent one with a
    /// code (1001 from a draining rd server: [`close_going_away`](Self::close_going_away)).
    pub fn peer_close_code(&self) -> Option<u16> {
        self.shared.lock().peer_close_code
    }

    /// Whether the peer closed the session saying it is going away (websocket status 1001).
    pub fn peer_went_away(&self) -> bool {
        self.peer_close_code() == Some(GOING_AWAY)
    }

    /// Every stream of the session with its target and the bytes moved so far (for logs).
    pub fn streams(&self) -> Vec<rd_proto::StreamInfo> {
        self.shared.lock().proto.stream_infos()
    }

    /// Closes stream `id` now with `reason` as its Error text (an operator's or a leak
    /// guard's decision; the application holding the stream sees it end). Returns whether
    /// the stream was still on the wire.
    pub fn reset_stream(&self, id: rd_proto::ConnId, reason: &str) -> bool {
        let mut inner = self.shared.lock();
        if !inner.proto.is_stream_open(id) {
            return false;
        }
        inner.proto.reset(id, reason).ok();
        inner.wake_driver();
        drop(inner);
        self.shared.observer.reset(reason);
        true
    }

    /// When anything (a message, ping or pong) last arrived from the peer.
    pub fn last_heard(&self) -> std::time::Instant {
        self.shared.lock().proto.last_heard()
    }

    /// The link's round trip as measured with pings (`None` before the first answer).
    pub fn rtt(&self) -> Option<std::time::Duration> {
        self.shared.lock().proto.rtt()
    }

    /// Dials pending through the session: streams opened here the peer has not answered.
    pub fn pending_dials(&self) -> usize {
        self.shared.lock().proto.pending_dials()
    }

    /// The session's clock now (tokio's, so paused-time tests see it move): what
    /// [`streams`](Self::streams) and [`last_heard`](Self::last_heard) are measured against.
    pub fn now(&self) -> std::time::Instant {
        now()
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> SessionEnd {
        let mut rx = self.shared.ended.subscribe();
        let end = match rx.wait_for(Option::is_some).await {
            Ok(end) => end.clone(),
            Err(_) => None,
        };
        end.unwrap_or(SessionEnd::Local)
    }

    /// Why the session ended, if it has.
    pub fn end(&self) -> Option<SessionEnd> {
        self.shared.lock().proto.end().cloned()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.end().is_some()
    }

    /// Times stream and session handles have woken this session's driver (each a hop to
    /// its task, often on another thread): for benchmarks and tests of the data path.
    pub fn driver_wakes(&self) -> u64 {
        self.shared.lock().wakes
    }

    /// Stream and buffer counters, for metrics.
    pub fn stats(&self) -> SessionStats {
        self.shared.lock().proto.stats()
    }

    /// The client key this session was registered under.
    pub fn client_key(&self) -> &str {
        &self.shared.client_key
    }

    /// The session key (a random non-negative 63-bit number on servers, 0 on clients).
    pub fn session_key(&self) -> i64 {
        self.shared.session_key
    }

    /// The rd extensions in force on this session (none with a Go peer).
    pub fn extensions(&self) -> Extensions {
        Extensions::of_config(self.shared.lock().proto.config())
    }

    /// Tells the peer that this end is going away (replicas extension; does nothing with a
    /// peer that did not negotiate it, a Go agent say): it opens no new streams here and
    /// makes its replacement elsewhere, while streams in flight go on, both ways. This end
    /// may still open streams. Returns whether the notice was sent (false: not negotiated,
    /// sent already, or the session ended).
    pub fn go_away(&self, reason: &str) -> bool {
        let mut inner = self.shared.lock();
        inner.call(|p| p.go_away(reason))
    }

    /// Whether [`go_away`](Self::go_away) was sent on this session.
    pub fn is_going_away(&self) -> bool {
        self.shared.lock().proto.is_going_away()
    }

    /// Tells the agent on the other end how many replicas this server counts, itself
    /// included (replicas extension, server side; nothing otherwise).
    pub fn announce_replicas(&self, count: u32) {
        let mut inner = self.shared.lock();
        if inner.proto.config().replicas {
            inner.call(|p| p.announce_replicas(count));
        }
    }

    /// What the peer said about itself in the session (replicas extension): whether it is
    /// going away, and the latest replica count it announced. The receiver sees each change.
    pub fn notices(&self) -> watch::Receiver<PeerNotices> {
        self.shared.notices().subscribe()
    }

    /// The peer's GoAway reason, if it said it is going away.
    pub fn peer_going_away(&self) -> Option<String> {
        self.shared
            .lock()
            .proto
            .peer_going_away()
            .map(str::to_owned)
    }

    /// Whether two handles are the same session.
    pub fn same_session(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Builds a session over an established websocket.
///
/// ```no_run
/// # async fn example(ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
/// use rd_session::SessionBuilder;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// // Server side: dial through the client on the other end of `ws`.
/// let session = SessionBuilder::server("foo", 42).spawn(ws);
/// let mut stream = session.dial_addr("tcp", "127.0.0.1:8125").unwrap();
/// stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
/// let mut response = Vec::new();
/// stream.read_to_end(&mut response).await.unwrap();
/// # }
/// ```
pub struct SessionBuilder {
    side: Side,
    config: Config,
    client_key: String,
    session_key: i64,
    handler: Option<Arc<dyn ConnectHandler>>,
    on_announcement: Option<AnnouncementFn>,
    observer: Arc<dyn SessionObserver>,
}

impl fmt::Debug for SessionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("side", &self.side)
            .field("client_key", &self.client_key)
            .field("session_key", &self.session_key)
            .finish()
    }
}

impl SessionBuilder {
    /// The websocket's client side (an agent, or a server's outgoing peer link): pings every
    /// 5 s and sends SyncConnections.
    pub fn client() -> Self {
        let id = Identity::client();
        Self::new(Side::Client, id.client_key, id.session_key)
    }

    /// The websocket's server side, registered under `client_key` / `session_key`.
    pub fn server(client_key: impl Into<String>, session_key: i64) -> Self {
        Self::new(Side::Server, client_key.into(), session_key)
    }

    fn new(side: Side, client_key: String, session_key: i64) -> Self {
        Self {
            side,
            config: Config::default(),
            client_key,
            session_key,
            handler: None,
            on_announcement: None,
            observer: Arc::new(NoObserver),
        }
    }

    /// Intervals, watermarks and caps; Go's values by default.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The rd extensions negotiated at the upgrade ([`Extensions::NONE`], the plain Go
    /// protocol, unless set).
    pub fn extensions(mut self, extensions: Extensions) -> Self {
        extensions.apply(&mut self.config);
        self
    }

    /// Who dials the targets of Connects from the peer. Without one, every Connect is
    /// answered with Error `connect not allowed` (the session stays up).
    pub fn connect_handler(mut self, handler: impl ConnectHandler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Same as [`connect_handler`](Self::connect_handler) for an already shared handler.
    pub fn connect_handler_arc(mut self, handler: Arc<dyn ConnectHandler>) -> Self {
        self.handler = Some(handler);
        self
    }

    /// Called for each AddClient (`true`) / RemoveClient (`false`) from a peer server.
    pub fn on_announcement(
        mut self,
        f: impl Fn(ClientSession, bool) + Send + Sync + 'static,
    ) -> Self {
        self.on_announcement = Some(Arc::new(f));
        self
    }

    /// Told about every stream, for metrics.
    pub fn observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Creates the session over an upgraded websocket (a [`WebSocketIo`](crate::WebSocketIo)
    /// or a tokio-tungstenite `WebSocketStream` that read nothing past its handshake); the
    /// caller drives it by awaiting (or spawning) the driver. A server builder's session is
    /// the websocket's server side, a client builder's its client side.
    pub fn start<W: IntoWebSocketIo>(self, ws: W) -> (SessionHandle, SessionDriver<W::Io>) {
        let identity = match self.side {
            Side::Client => Identity::client(),
            Side::Server => Identity {
                client_key: self.client_key.clone(),
                session_key: self.session_key,
            },
        };
        let first_message_id = rand::random::<i64>() & i64::MAX;
        let max_pending_connects = self.config.max_pending_connects;
        let proto = Session::new(self.side, self.config, identity, now(), first_message_id);
        let shared = Shared::new(proto, self.client_key, self.session_key, self.observer);
        let driver = SessionDriver::new(
            ws.into_websocket_io(),
            self.side == Side::Server,
            shared.clone(),
            self.handler,
            self.on_announcement,
            CancellationToken::new(),
            max_pending_connects,
        );
        (SessionHandle { shared }, driver)
    }

    /// Creates the session and spawns its driver on the current tokio runtime, inside a
    /// `session` tracing span.
    pub fn spawn<W: IntoWebSocketIo>(self, ws: W) -> SessionHandle {
        let span = tracing::info_span!(
            parent: None,
            "session",
            side = ?self.side,
            client_key = %self.client_key,
            session_key = self.session_key
        );
        let (handle, driver) = self.start(ws);
        tokio::spawn(driver.instrument(span));
        handle
    }
}

/// Whether `proto` names a datagram network (`udp`, `udp4`, `udp6`), which only rd's udp
/// extension carries.
pub fn is_udp(proto: &str) -> bool {
    matches!(proto, "udp" | "udp4" | "udp6")
}
