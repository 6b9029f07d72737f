//! One completion line and the counters per use of a raw tunnel (HTTP CONNECT, SOCKS5, a
//! forwarded connection): who, to what, how many bytes each way, how long, how it ended.
//! The `/client` route has its own line (`tunnel request`, see [`super::proxy`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::splice::SpliceError;
use crate::log_limit::LogLimit;
use crate::Metrics;

/// One use of the tunnel, logged and counted once when it is over.
#[derive(Debug)]
pub(crate) struct TunnelUse {
    metrics: Metrics,
    origin: &'static str,
    client: String,
    target: String,
    remote: Option<SocketAddr>,
    started: Instant,
    /// The stream's session and id, once dialed.
    stream: Option<(i64, i64)>,
    /// The status it was answered with (HTTP for CONNECT, the reply code for SOCKS5).
    status: Option<u16>,
    counts: Arc<Counts>,
}

/// Bytes moved through a [`Counted`] local connection.
#[derive(Debug, Default)]
struct Counts {
    /// Read from the local side: sent towards the target.
    sent: AtomicU64,
    /// Written to the local side: received from the target.
    received: AtomicU64,
}

impl TunnelUse {
    /// Starts timing a use of `origin` (`connect`, `socks5`, `forward`) by `remote` through client
    /// `client` to `target`.
    pub(crate) fn start(
        metrics: &Metrics,
        origin: &'static str,
        client: &str,
        target: String,
        remote: Option<SocketAddr>,
    ) -> Self {
        Self {
            metrics: metrics.clone(),
            origin,
            client: crate::short_id(client).into_owned(),
            target,
            remote,
            started: Instant::now(),
            stream: None,
            status: None,
            counts: Arc::default(),
        }
    }

    /// The stream that carries it (for the line).
    pub(crate) fn carried_by(&mut self, session_key: i64, stream_id: i64) {
        self.stream = Some((session_key, stream_id));
    }

    /// Who it is for, once a handshake told (SOCKS5 names the client after its greeting).
    pub(crate) fn named(&mut self, client: &str) {
        self.client = crate::short_id(client).into_owned();
    }

    /// Where it goes, once a handshake told.
    pub(crate) fn aimed_at(&mut self, target: String) {
        self.target = target;
    }

    /// The status it was answered with: HTTP for CONNECT, the reply code for SOCKS5.
    pub(crate) fn answered(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// `local`, counting the bytes each way for the line.
    pub(crate) fn count<L>(&self, local: L) -> Counted<L> {
        Counted {
            inner: local,
            counts: self.counts.clone(),
        }
    }

    /// The use is over: `completed` when both directions ended, `refused` when the agent
    /// refused or failed the dial (nothing came back), `cut` when either side failed in the
    /// middle.
    pub(crate) fn finished(self, result: &Result<super::splice::Spliced, SpliceError>) {
        match result {
            Ok(_) => self.emit("completed", None),
            Err(e @ SpliceError::Tunnel(_))
                if self.counts.received.load(Ordering::Relaxed) == 0 =>
            {
                self.emit("refused", Some(&rd_session::error_chain(e)))
            }
            Err(e) => self.emit("cut", Some(&rd_session::error_chain(e))),
        }
    }

    /// The use ended before any byte moved: `rejected` (the request was wrong),
    /// `refused` (no session, the agent said no) or `stopped` (the server stopped it).
    pub(crate) fn ended(self, outcome: &'static str, reason: &str) {
        self.emit(outcome, Some(reason));
    }

    fn emit(&self, outcome: &'static str, reason: Option<&str>) {
        let took = self.started.elapsed();
        self.metrics
            .tunnel_used(self.origin, outcome, took.as_secs_f64());
        let (session, stream) = match self.stream {
            Some((s, id)) => (Some(s), Some(id)),
            None => (None, None),
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    origin = self.origin,
                    client = %self.client,
                    target = %self.target,
                    remote = self.remote.map(tracing::field::display),
                    session,
                    stream,
                    status = self.status,
                    bytes_sent = self.counts.sent.load(Ordering::Relaxed),
                    bytes_received = self.counts.received.load(Ordering::Relaxed),
                    duration_ms = crate::duration_ms(took),
                    outcome,
                    reason,
                    "tunnel connection"
                )
            };
        }
        if outcome == "completed" || outcome == "stopped" {
            line!(info);
        } else if outcome == "rejected" {
            // Wrong passwords, malformed handshakes: an outsider chooses how many.
            if let Some(suppressed) = REJECTED.allow() {
                if suppressed > 0 {
                    tracing::warn!(suppressed, "tunnel connections rejected, lines left out");
                }
                line!(warn);
            }
        } else {
            line!(warn);
        }
    }
}

/// Rate limit of the `rejected` lines, for all the gateway's entries together.
static REJECTED: LogLimit = LogLimit::new();

/// A local connection whose bytes each way are counted into its [`TunnelUse`].
#[derive(Debug)]
pub(crate) struct Counted<L> {
    inner: L,
    counts: Arc<Counts>,
}

impl<L: AsyncRead + Unpin> AsyncRead for Counted<L> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<L: AsyncWrite + Unpin> AsyncWrite for Counted<L> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.add_written(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.add_written(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<L> Counted<L> {
    fn add_written(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.counts.received.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}
