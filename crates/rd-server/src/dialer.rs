//! [`Dialer`]: open streams to a client's network, directly or through a peer server.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::histogram::Histogram;
use rd_proto::{Target, TargetError};
use rd_session::{
    BoxFuture, BoxedIo, ConnectHandler, ConnectRefused, Dialed, Established, SessionHandle,
    TunnelStream,
};

use crate::peers::PeerSet;
use crate::registry::{self, SharedRegistry};

/// How long a dial to a Go agent (no connect-ack) waits for the stream's first event before
/// it counts as connected: the Go protocol has no "connected" reply, so a refusal shows
/// only as an early Error. What CONNECT answers after, and what a Connect a peer routed
/// here waits.
pub const DEFAULT_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// What a dial needs: this server's client sessions and its peers' announced routes.
pub(crate) struct Routing {
    pub(crate) clients: SharedRegistry,
    pub(crate) peers: PeerSet,
    pub(crate) dial_seconds: Histogram,
    /// Counts dials by route.
    pub(crate) metrics: crate::metrics::Metrics,
    /// The server's lifecycle: while draining, dials prefer the peers.
    pub(crate) lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").finish_non_exhaustive()
    }
}

/// Where a dial for a client key goes.
#[derive(Debug, Clone)]
enum Route {
    /// A session of the client on this server.
    Local(SessionHandle),
    /// A peer server's link that announced the client.
    Peer(SessionHandle),
}

impl Routing {
    /// Where a dial for `client_key` goes.
    ///
    /// Normally our own session first (the oldest live one, as Go), then the first peer that
    /// announced the key: the hop is only the fallback, for Go agents and rd agents still
    /// filling their sessions. While draining, the other way round: a peer that is staying
    /// first (so the session we hand over carries nothing new), then our own session unless
    /// it was withdrawn (make-before-break: an agent not yet reachable elsewhere is still
    /// served here), then a peer that is going away too. `serve_peer` is for Connects a peer
    /// routed to us: our session first, draining or not, since the peer chose us.
    ///
    /// The two locks are taken one after the other, never together.
    fn route(&self, client_key: &str, serve_peer: bool) -> Result<Route, DialError> {
        let local = registry::lock(&self.clients).route(client_key);
        let draining = self.lifecycle.is_draining();
        if !draining || serve_peer {
            if let Some(h) = local {
                return Ok(Route::Local(h));
            }
            return self
                .peers
                .route(client_key)
                .map(Route::Peer)
                .ok_or_else(|| DialError::NoSession(client_key.to_owned()));
        }
        let peer = self.peers.route(client_key);
        if let Some(link) = peer.as_ref().filter(|h| h.peer_going_away().is_none()) {
            return Ok(Route::Peer(link.clone()));
        }
        match local {
            Some(h) if !self.peers.is_withdrawn(&h) => Ok(Route::Local(h)),
            Some(_) if peer.is_none() => Err(DialError::Draining),
            _ => peer
                .map(Route::Peer)
                .ok_or_else(|| DialError::NoSession(client_key.to_owned())),
        }
    }

    pub(crate) fn has_route(&self, client_key: &str) -> bool {
        self.route(client_key, false).is_ok()
    }
}

/// Dials peer-routed Connects (`clientKey::proto/address`) arriving on one of our outgoing
/// peer links through our own dialer. Weak: the peer set that holds it is part of the
/// routing. One per link: whether the link carries datagrams is the link's own.
pub(crate) struct PeerConnects {
    pub(crate) routing: Weak<Routing>,
    /// The link negotiated rd's udp extension (an rd peer). A Go peer's `udp` stream is
    /// raw bytes, which no rd agent may take as framed datagrams.
    pub(crate) link_udp: bool,
}

impl ConnectHandler for PeerConnects {
    fn connect(&self, target: Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>> {
        let dialing = self.connect_deferred(target);
        Box::pin(async move { dialing.await.map(|dialed| dialed.io) })
    }

    /// The stream to the agent is handed back at once, so a peer's request flows without
    /// waiting; the peer is told the dial succeeded once the agent said so (connect-ack),
    /// or, for a Go agent, once [`DEFAULT_CONNECT_WAIT`](DEFAULT_CONNECT_WAIT)
    /// passed without a refusal, as a CONNECT here would wait.
    fn connect_deferred(&self, target: Target) -> BoxFuture<Result<Dialed, ConnectRefused>> {
        let routing = self.routing.upgrade();
        let link_udp = self.link_udp;
        Box::pin(async move {
            let Some(client_key) = target.client_key() else {
                return Err(ConnectRefused(format!(
                    "invalid clientKey/proto: {}",
                    target.network()
                )));
            };
            if rd_session::is_udp(target.proto()) && !link_udp {
                return Err(ConnectRefused(format!(
                    "{} for client {}: this peer link {UDP_NOT_SUPPORTED} (a Go server); \
                     udp needs rd's udp extension on the peer link and the agent",
                    target.network(),
                    crate::short_id(client_key)
                )));
            }
            let Some(routing) = routing else {
                return Err(ConnectRefused("server shut down".into()));
            };
            let (stream, _) = Dialer::new(routing, client_key.to_owned())
                .labeled("peer")
                .dial_routed(target.without_route(), true)
                .map_err(|e| ConnectRefused(e.to_string()))?;
            let established = Established::of(&stream, DEFAULT_CONNECT_WAIT);
            Ok(Dialed {
                io: Box::new(stream),
                established: Some(Box::pin(async move {
                    established
                        .wait()
                        .await
                        .map_err(|e| ConnectRefused(rd_session::error_chain(&e)))
                })),
            })
        })
    }
}

/// A dial through the tunnel failed before a stream existed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No session for the client, here or at a peer (Go's text).
    #[error("failed to find Session for client {}", crate::short_id(.0))]
    NoSession(String),
    /// The target does not fit the protocol.
    #[error(transparent)]
    InvalidTarget(#[from] TargetError),
    /// The session refused (ended, or too many streams).
    #[error(transparent)]
    Session(#[from] rd_session::DialError),
    /// This server is draining ([`Server::begin_drain`](crate::Server::begin_drain)) and
    /// has withdrawn the client's session (a Go agent, or one reachable elsewhere), and no
    /// peer announced the client: it opens no new streams to it.
    #[error("server draining: no new connections")]
    Draining,
    /// A `udp` dial to an agent whose session did not negotiate rd's udp extension (a Go
    /// agent, or an rd agent too old or run with `--no-udp`): it would lose the
    /// datagrams' boundaries, so nothing is sent to it.
    #[error("agent {} does not support udp (a Go agent, or an rd agent without the udp extension)", crate::short_id(.0))]
    // The text must contain UDP_NOT_SUPPORTED: a forward on a peer replica recognises it.
    UdpNotSupported(String),
}

/// What [`DialError::UdpNotSupported`]'s text contains, so that a UDP forward on another
/// replica recognises the refusal that reaches it as text through the peer link.
pub(crate) const UDP_NOT_SUPPORTED: &str = "does not support udp";

impl DialError {
    /// A stable name for the `rd_dials_refused{reason}` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSession(_) => "no_session",
            Self::InvalidTarget(_) | Self::Session(rd_session::DialError::InvalidTarget(_)) => {
                "invalid_target"
            }
            Self::Session(rd_session::DialError::TooManyPendingDials(_)) => "max_pending_dials",
            Self::UdpNotSupported(_) | Self::Session(rd_session::DialError::UdpNotNegotiated) => {
                "udp_not_supported"
            }
            Self::Session(_) => "session",
            Self::Draining => "draining",
        }
    }
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        let kind = match e {
            DialError::InvalidTarget(_) => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

/// Opens streams to one client's network (Go's `Server.Dialer(clientKey)`). The session is
/// looked up at each dial, so a dialer stays valid across client reconnects.
#[derive(Debug, Clone)]
pub struct Dialer {
    routing: Arc<Routing>,
    client_key: String,
    /// What the streams are for, as the admin API shows them (`None`: `library`).
    label: Option<&'static str>,
}

impl Dialer {
    pub(crate) fn new(routing: Arc<Routing>, client_key: String) -> Self {
        Self {
            routing,
            client_key,
            label: None,
        }
    }

    /// Labels every stream this dialer opens with its origin (`/client`, `connect`,
    /// `forward`, `peer`), for the admin API.
    pub(crate) fn labeled(mut self, label: &'static str) -> Self {
        self.label = Some(label);
        self
    }

    /// The client this dialer reaches.
    pub fn client_key(&self) -> &str {
        &self.client_key
    }

    /// Opens a stream to `address` over `proto` (`tcp`, `unix`, ...) on the client's side.
    /// Returns at once, as Go: a remote dial failure is the stream's first read error.
    ///
    /// `udp` (rd's udp extension) carries datagrams: wrap the stream in a
    /// [`DatagramStream`](rd_session::DatagramStream). An agent that did not negotiate the
    /// extension (a Go agent) is refused here with [`DialError::UdpNotSupported`]; through
    /// a peer server, the far server refuses and the stream's first read says so.
    pub async fn dial(&self, proto: &str, address: &str) -> Result<TunnelStream, DialError> {
        self.dial_target(Target::new(proto, address)?).await
    }

    /// Same as [`dial`](Self::dial) with a parsed target.
    pub async fn dial_target(&self, target: Target) -> Result<TunnelStream, DialError> {
        self.dial_routed(target, false).map(|(stream, _)| stream)
    }

    /// Dials and says through which session (for logs); see [`Routing::route`] for
    /// `serve_peer`.
    fn dial_routed(
        &self,
        target: Target,
        serve_peer: bool,
    ) -> Result<(TunnelStream, TunnelInfo), DialError> {
        let routed =
            self.routing
                .route(&self.client_key, serve_peer)
                .and_then(|route| match route {
                    Route::Local(session) => match session.dial(target) {
                        Ok(stream) => Ok((stream, session.session_key(), false)),
                        Err(rd_session::DialError::UdpNotNegotiated) => {
                            Err(DialError::UdpNotSupported(self.client_key.clone()))
                        }
                        Err(e) => Err(e.into()),
                    },
                    Route::Peer(link) => Ok((
                        link.dial(target.routed_via(self.client_key.clone())?)?,
                        link.session_key(),
                        true,
                    )),
                });
        let (stream, session_key, via_peer) = match routed {
            Ok(routed) => routed,
            Err(e) => {
                self.routing.metrics.dial_refused(e.reason());
                return Err(e);
            }
        };
        if let Some(label) = self.label {
            stream.set_label(label);
        }
        self.routing.metrics.dialed(via_peer);
        let info = TunnelInfo {
            session_key,
            stream_id: stream.id().0,
            via_peer,
        };
        Ok((stream, info))
    }

    /// Dials and returns the stream timed for `rd_dial_seconds` (see [`TimedStream`]).
    pub(crate) async fn dial_timed(
        &self,
        proto: &str,
        address: &str,
    ) -> Result<(TimedStream, TunnelInfo), DialError> {
        let started = Instant::now();
        let (stream, info) = self.dial_routed(Target::new(proto, address)?, false)?;
        Ok((
            TimedStream::new(stream, started, self.routing.dial_seconds.clone()),
            info,
        ))
    }
}

/// Which session and stream a proxied connection went through. The proxy's connections
/// carry it as hyper-util "extra" connection info, so responses have it in their extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The session's key (for a peer route, the peer link's session).
    pub session_key: i64,
    /// The stream's id in that session.
    pub stream_id: i64,
    /// Whether the stream goes through a peer server.
    pub via_peer: bool,
}

/// A tunnel stream that records in `rd_dial_seconds` how long the dial took to reach an
/// outcome the dialer can see: the first bytes or error from the far side (Go's protocol
/// acknowledges no Connect, so a refused target shows only as the first read's error), or
/// the connection being dropped before either (a timeout or a caller that gave up).
#[derive(Debug)]
pub struct TimedStream {
    stream: TunnelStream,
    timer: DialTimer,
}

/// The running dial timer; observes when dropped unless stopped before.
#[derive(Debug)]
struct DialTimer(Option<(Instant, Histogram)>);

impl DialTimer {
    fn observe(&mut self) {
        if let Some((started, histogram)) = self.0.take() {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for DialTimer {
    fn drop(&mut self) {
        self.observe();
    }
}

impl TimedStream {
    fn new(stream: TunnelStream, started: Instant, histogram: Histogram) -> Self {
        Self {
            stream,
            timer: DialTimer(Some((started, histogram))),
        }
    }

    /// The stream inside (not timed any more).
    pub fn into_inner(mut self) -> TunnelStream {
        self.timer.0 = None;
        self.stream
    }
}

impl tokio::io::AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if r.is_ready() {
            self.timer.observe();
        }
        r
    }
}

impl tokio::io::AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A tunnel stream as a hyper-util client connection.
///
/// Go's protocol acknowledges no Connect, so a refused target shows only as the stream's
/// error, which may arrive before hyper has sent its request. hyper reads an idle connection
/// to notice it closing, and would then drop the connection and fail the request with a bare
/// "connection was not ready". So an error read before anything was written is held and
/// returned by the first write instead: the request fails with the target's own reason.
#[derive(Debug)]
pub struct TunnelConnection {
    io: TokioIo<TimedStream>,
    info: TunnelInfo,
    /// Something was written: read errors are returned as they come.
    written: bool,
    /// A read error that came before anything was written, for the first write.
    early_error: Option<io::Error>,
}

impl TunnelConnection {
    pub(crate) fn new(stream: TimedStream, info: TunnelInfo) -> Self {
        Self {
            io: TokioIo::new(stream),
            info,
            written: false,
            early_error: None,
        }
    }

    /// The stream inside (an error held for the first write is dropped; the stream reports
    /// its end itself).
    pub fn into_inner(self) -> TunnelStream {
        self.io.into_inner().into_inner()
    }

    /// The stream inside, to wait on [`TunnelStream::closed`], say.
    pub fn get_ref(&self) -> &TunnelStream {
        &self.io.inner().stream
    }

    /// Which session and stream this connection uses.
    pub fn info(&self) -> TunnelInfo {
        self.info
    }

    pub(crate) fn into_timed(self) -> TimedStream {
        self.io.into_inner()
    }
}

impl Connection for TunnelConnection {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.info)
    }
}

impl hyper::rt::Read for TunnelConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if self.written {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        if self.early_error.is_some() {
            // The first write returns it; hyper polls again once it has a request.
            return Poll::Pending;
        }
        match ready!(Pin::new(&mut self.io).poll_read(cx, buf)) {
            Err(e) => {
                self.early_error = Some(e);
                Poll::Pending
            }
            Ok(()) => Poll::Ready(Ok(())),
        }
    }
}

impl hyper::rt::Write for TunnelConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.early_error.take() {
            self.written = true;
            return Poll::Ready(Err(e));
        }
        let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf));
        self.written |= matches!(written, Ok(n) if n > 0);
        Poll::Ready(written)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not the early error: hyper flushes an idle connection too.
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Makes the dialer a hyper-util connector (the Rust side of Go's
/// `http.Transport.DialContext`): `Client::builder(TokioExecutor::new()).build(dialer)`.
/// The URI's host and port (default 80 for http, 443 for https) are dialed over `tcp`.
impl tower_service::Service<Uri> for Dialer {
    type Response = TunnelConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TunnelConnection>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
            })?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let (stream, info) = dialer.dial_timed("tcp", &format!("{host}:{port}")).await?;
            Ok(TunnelConnection::new(stream, info))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Go peer's `udp` stream is raw bytes: it is refused before any agent is dialed,
    /// in words a forward on that side of the link would recognise.
    #[tokio::test]
    async fn a_peer_link_without_the_udp_extension_cannot_route_udp() {
        let target = |t: &str| Target::parse(t.as_bytes()).unwrap();
        let go_link = PeerConnects {
            routing: Weak::new(),
            link_udp: false,
        };
        let Err(refused) = go_link
            .connect_deferred(target("foo::udp/127.0.0.1:53"))
            .await
        else {
            panic!("a udp Connect over a Go peer link was accepted");
        };
        assert!(refused.0.contains(UDP_NOT_SUPPORTED), "{}", refused.0);
        // tcp goes on (to the dial, which finds no server here).
        let Err(refused) = go_link
            .connect_deferred(target("foo::tcp/127.0.0.1:80"))
            .await
        else {
            panic!("no routing, yet the dial succeeded");
        };
        assert_eq!(refused.0, "server shut down");
        let rd_link = PeerConnects {
            routing: Weak::new(),
            link_udp: true,
        };
        let Err(refused) = rd_link
            .connect_deferred(target("foo::udp/127.0.0.1:53"))
            .await
        else {
            panic!("no routing, yet the dial succeeded");
        };
        assert_eq!(refused.0, "server shut down");
    }

    #[test]
    fn the_udp_refusal_text_is_what_a_peer_replicas_forward_looks_for() {
        let text = DialError::UdpNotSupported("foo".into()).to_string();
        assert!(text.contains(UDP_NOT_SUPPORTED), "{text}");
    }
}
