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

    /// Whether rd's connect-ack extension is in force on this stream's session: the peer
    /// says when its dial succeeded ([`poll_established`](Self::poll_established)).
    pub fn connect_ack(&self) -> bool {
        self.shared.lock().proto.config().connect_ack
    }

    /// Tells the peer that the dial of this stream, which it opened, succeeded (with the
    /// connect-ack extension; nothing otherwise).
    pub(crate) fn acknowledge(&self) {
        let mut inner = self.shared.lock();
        inner.call(|p| p.acknowledge(self.id));
    }

    /// Whether the peer's dial of this stream (which we opened) is known to have
    /// succeeded: `Ready(Ok)` once the peer acknowledged it (connect-ack extension), or
    /// once data or a clean end arrived; `Ready(Err)` with the peer's text if the stream
    /// ended otherwise first (a refused or failed dial). Nothing is read: the data stays
    /// for the reader. One task may wait on it (besides the reader and the writer).
    ///
    /// Without the extension (a Go peer) success has no message of its own: this stays
    /// `Pending` until data or an end arrives, so bound the wait
    /// ([`established`](Self::established)).
    pub fn poll_established(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_established(&self.shared, self.id, cx)
    }

    /// Waits until the peer's dial is known to have succeeded or failed (see
    /// [`poll_established`](Self::poll_established)). Without the connect-ack extension
    /// (a Go peer) no news within `go_wait` counts as success, as a Go dialer must assume.
    pub async fn established(&self, go_wait: std::time::Duration) -> io::Result<()> {
        Established::of(self, go_wait).wait().await
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
        inner.call(|p| p.reset(self.id, reason)).ok();
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
        // A read may queue a grant (Credit, Resume) for the peer; most queue nothing.
        match inner.call(|p| p.read(self.id, max)) {
            Ok(ReadOutcome::Data(bytes)) => {
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
        inner.call(|p| {
            while total < max {
                match p.read(self.id, max - total) {
                    Ok(ReadOutcome::Data(bytes)) => {
                        total += bytes.len();
                        take(bytes);
                    }
                    _ => break,
                }
            }
        });
        drop(inner);
        if total > 0 {
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
        match inner.call(|p| p.write(self.id, buf)) {
            Ok(n) => {
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

fn poll_established(shared: &Shared, id: ConnId, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut inner = shared.lock();
    if inner.proto.is_acknowledged(id) || inner.proto.unread(id).unwrap_or(0) > 0 {
        return Poll::Ready(Ok(()));
    }
    // Nothing buffered: a read of nothing reports the end, or marks the reader as waiting,
    // so that the first data is announced (and wakes this task with the reader).
    match inner.proto.read(id, 0) {
        Ok(_) => Poll::Ready(Ok(())),
        Err(StreamError::Blocked) => {
            inner.register_established(id, cx.waker());
            Poll::Pending
        }
        Err(e) => Poll::Ready(Err(to_io(e))),
    }
}

/// The outcome of the peer's dial of a stream, awaitable apart from the stream (which a
/// splice may own meanwhile): see [`TunnelStream::established`].
pub struct Established {
    shared: Arc<Shared>,
    id: ConnId,
    /// `None` with the connect-ack extension: the peer says.
    go_wait: Option<std::time::Duration>,
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established").field("id", &self.id).finish()
    }
}

impl Established {
    /// The outcome of `stream`'s dial; without the connect-ack extension, no news within
    /// `go_wait` counts as success.
    pub fn of(stream: &TunnelStream, go_wait: std::time::Duration) -> Self {
        Self {
            shared: stream.shared.clone(),
            id: stream.id,
            go_wait: (!stream.connect_ack()).then_some(go_wait),
        }
    }

    /// Waits for it: `Err` with the peer's text if the dial failed.
    pub async fn wait(self) -> io::Result<()> {
        let wait = poll_fn(|cx| poll_established(&self.shared, self.id, cx));
        match self.go_wait {
            None => wait.await,
            Some(go_wait) => tokio::time::timeout(go_wait, wait).await.unwrap_or(Ok(())),
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
            if let Err(e) = inner.call(|p| p.finish(self.id)) {
                return Poll::Ready(Err(to_io(e)));
            }
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
        inner.call(|p| p.release(self.id));
        if let Some(wakers) = inner.streams.remove(&self.id) {
            // A task waiting apart from the handle (for the dial's outcome) learns that
            // the stream is gone.
            for waker in [wakers.established, wakers.closed].into_iter().flatten() {
                waker.wake();
            }
        }
        drop(inner);
        self.shared.observer.stream_closed(&self.target);
    }
}
