//! [`TunnelStream`]: one virtual connection as `AsyncRead + AsyncWrite`.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rd_proto::{ConnId, ReadOutcome, StreamError, Target};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::StreamClosed;
use crate::shared::Shared;

/// One virtual connection through the tunnel.
///
/// Reads return the peer's bytes, then `Ok(0)` when the peer closed cleanly (Error `EOF`, or
/// Fin with half-close) or an `io::Error` carrying the peer's text otherwise
/// ([`StreamClosed`] inside). Writes complete only once the bytes fit in the stream's send
/// buffer, so a paused peer slows the writer down.
///
/// `shutdown` ends this side's writing after the written bytes. When the session negotiated
/// rd's half-close extension ([`half_close`](Self::half_close)) that is all it does, as
/// TCP's `shutdown(Write)`: the peer reads EOF and may go on writing, and this side keeps
/// reading. Otherwise (any Go peer) it sends Error `EOF`, which closes both directions: the
/// Go protocol has no half-close. Dropping the stream closes it: after the written bytes,
/// Fin if the peer has finished too, else Error `EOF` (nobody reads any more).
pub struct TunnelStream {
    shared: Arc<Shared>,
    id: ConnId,
    target: Target,
}

impl fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.id)
            .field("target", &self.target.to_string())
            .finish()
    }
}

impl TunnelStream {
    pub(crate) fn new(shared: Arc<Shared>, id: ConnId, target: Target) -> Self {
        shared.observer.stream_opened(&target);
        Self { shared, id, target }
    }

    /// The connection id on the wire.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Where the stream was dialed (Go's `RemoteAddr`: network `tcp`, address `host:port`).
    pub fn peer_addr(&self) -> &Target {
        &self.target
    }

    /// Same as [`peer_addr`](Self::peer_addr): Go's virtual connection reports the target
    /// as both its local and its remote address.
    pub fn local_addr(&self) -> &Target {
        &self.target
    }

    /// Whether rd's half-close extension is in force on this stream's session: `shutdown`
    /// then ends only this side's writing (see the type's documentation).
    pub fn half_close(&self) -> bool {
        self.shared.lock().proto.config().half_close
    }

    /// `Ready` once the stream has left the wire: both directions finished, an Error either
    /// way, or the session ended. A half-closed stream is still open. Registers `cx` to be
    /// woken then (one waiting task per stream).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.shared.lock();
        if !inner.proto.is_stream_open(self.id) {
            return Poll::Ready(());
        }
        inner.register_closed(self.id, cx.waker());
        Poll::Pending
    }

    /// Async form of [`poll_closed`](Self::poll_closed).
    pub async fn closed(&self) {
        poll_fn(|cx| self.poll_closed(cx)).await;
    }

    /// The key of the session this stream runs on (0 on a client side).
    pub fn session_key(&self) -> i64 {
        self.shared.session_key
    }

    /// The client key of the session this stream runs on.
    pub fn client_key(&self) -> &str {
        &self.shared.client_key
    }

    /// Labels the stream with what it is for (an origin such as `connect`), as listed by
    /// [`SessionHandle::streams`](crate::SessionHandle::streams).
    pub fn set_label(&self, label: &'static str) {
        self.shared.lock().proto.set_stream_label(self.id, label);
    }

    /// Closes the stream now, sending `reason` to the peer as the Error text. Buffered
    /// outgoing bytes are dropped.
    pub fn reset(&self, reason: &str) {
        let mut inner = self.shared.lock();
        inner.proto.reset(self.id, reason).ok();
        inner.wake_driver();
        drop(inner);
        self.shared.observer.reset(reason);
    }

    /// Reads the next chunk of received bytes, up to `max`, without copying them;
    /// `Ok(None)` at a clean end of stream.
    pub fn poll_read_chunk(
        &self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let mut inner = self.shared.lock();
        match inner.proto.read(self.id, max) {
            Ok(ReadOutcome::Data(bytes)) => {
                // A read may have queued a Resume for the peer.
                inner.wake_driver();
                drop(inner);
                self.shared.observer.received(bytes.len());
                Poll::Ready(Ok(Some(bytes)))
            }
            Ok(ReadOutcome::Eof) => Poll::Ready(Ok(None)),
            Err(StreamError::Blocked) => {
                inner.register(self.id, cx.waker(), true);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }

    /// Like [`poll_read_chunk`](Self::poll_read_chunk), but after the first chunk also takes
    /// every further chunk already received, up to `max` bytes in all, into `chunks`
    /// (for one vectored write). `Ok(0)` is a clean end of stream.
    pub fn poll_read_chunks(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        chunks: &mut Vec<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let first = match self.poll_read_chunk(cx, max) {
            Poll::Ready(Ok(Some(bytes))) => bytes,
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(0)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let first_len = first.len();
        chunks.push(first);
        let more = self.take_received(max - first_len, |bytes| chunks.push(bytes));
        Poll::Ready(Ok(first_len + more))
    }

    /// Hands every further chunk already received, up to `max` bytes in all, to `take`, under
    /// one lock; returns how many bytes. Stops at an end or error: the next read reports it.
    fn take_received(&self, max: usize, mut take: impl FnMut(Bytes)) -> usize {
        let mut total = 0;
        let mut inner = self.shared.lock();
        while total < max {
            match inner.proto.read(self.id, max - total) {
                Ok(ReadOutcome::Data(bytes)) => {
                    total += bytes.len();
                    take(bytes);
                }
                _ => break,
            }
        }
        if total > 0 {
            // Reading may have queued a Resume for the peer.
            inner.wake_driver();
            drop(inner);
            self.shared.observer.received(total);
        }
        total
    }

    /// Async form of [`poll_read_chunks`](Self::poll_read_chunks).
    pub async fn read_chunks(&self, max: usize, chunks: &mut Vec<Bytes>) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read_chunks(cx, max, chunks)).await
    }

    /// Async form of [`poll_read_chunk`](Self::poll_read_chunk).
    pub async fn read_chunk(&self, max: usize) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_read_chunk(cx, max)).await
    }

    /// Writes through a shared reference, so one task can read and write at once.
    pub fn poll_write_shared(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        match inner.proto.write(self.id, buf) {
            Ok(n) => {
                inner.wake_driver();
                drop(inner);
                self.shared.observer.transmitted(n);
                Poll::Ready(Ok(n))
            }
            Err(StreamError::Blocked) => {
                inner.register(self.id, cx.waker(), false);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }

    /// Async form of [`poll_write_shared`](Self::poll_write_shared).
    pub async fn write_shared(&self, buf: &[u8]) -> io::Result<usize> {
        poll_fn(|cx| self.poll_write_shared(cx, buf)).await
    }

    fn poll_flush_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        match inner.proto.flush(self.id) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(StreamError::Blocked) => {
                inner.register(self.id, cx.waker(), false);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

fn to_io(e: StreamError) -> io::Error {
    match e {
        StreamError::Closed(end) => StreamClosed { end }.into(),
        StreamError::Finished => {
            io::Error::new(io::ErrorKind::BrokenPipe, "stream already shut down")
        }
        StreamError::Unknown(_) => io::Error::new(io::ErrorKind::NotConnected, "tunnel disconnect"),
        other => io::Error::other(other),
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let first = match self.poll_read_chunk(cx, buf.remaining()) {
            Poll::Ready(Ok(Some(bytes))) => bytes,
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        buf.put_slice(&first);
        // Fill the rest of the caller's buffer with whatever else has arrived, under one
        // lock: a reader such as hyper then handles (and writes on) one large chunk instead
        // of one per 32 KiB message. An end or error found here waits for the next call.
        let room = buf.remaining();
        self.take_received(room, |bytes| buf.put_slice(&bytes));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_shared(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_shared(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_shutdown_shared(cx)
    }
}

impl TunnelStream {
    /// `AsyncWrite::poll_shutdown` through a shared reference: ends this side's writing
    /// (Fin with half-close, else Error `EOF`) once the written bytes have gone out.
    pub fn poll_shutdown_shared(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut inner = self.shared.lock();
            if let Err(e) = inner.proto.finish(self.id) {
                return Poll::Ready(Err(to_io(e)));
            }
            inner.wake_driver();
        }
        match self.poll_flush_shared(cx) {
            // The stream ended while its EOF waited: the peer knows it is closed.
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    /// Async form of [`poll_shutdown_shared`](Self::poll_shutdown_shared).
    pub async fn shutdown_shared(&self) -> io::Result<()> {
        poll_fn(|cx| self.poll_shutdown_shared(cx)).await
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.proto.release(self.id);
        inner.streams.remove(&self.id);
        inner.wake_driver();
        drop(inner);
        self.shared.observer.stream_closed(&self.target);
    }
}
