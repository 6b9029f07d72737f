//! A read buffer that exists only while data arrives in bursts.
//!
//! tungstenite allocates its read buffer up front for every websocket and zero-fills it on
//! the first read (and the unread part again on every read), so its size is resident for
//! the whole life of a session: most of an idle session's memory on a server with thousands
//! of agents, and a memset per wake-up. The same size is also the most one read syscall
//! takes, which bulk transfers want large. [`BurstReader`] separates the two: tungstenite
//! gets a small buffer (what an idle session keeps), and this reader, under it, fetches
//! bursts of up to [`DEFAULT_BURST`] bytes with one syscall into a buffer of its own that it
//! allocates when a read fills the caller's buffer and frees once the burst is over.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default size of one burst read: 64 KiB, a few websocket Data messages.
pub const DEFAULT_BURST: usize = 64 * 1024;

/// Wraps a connection's read half with a buffer that is allocated when data arrives faster
/// than the caller reads it, and released when the burst ends: a session that only
/// exchanges pings holds no buffer here. Writes pass straight through.
///
/// Policy: while no buffer is held, a read goes straight into the caller's buffer. A read
/// that fills the caller's buffer means more is likely waiting, so the next reads fetch up
/// to `burst` bytes into a buffer of this reader's and hand them out from it. Once a read
/// brings no more than the caller could have taken directly and the connection then has
/// nothing more (the read is pending), the burst is over and the buffer is freed.
#[derive(Debug)]
pub struct BurstReader<S> {
    io: S,
    buf: BytesMut,
    burst: usize,
    /// A read filled the caller's buffer and the burst has not ended yet.
    in_burst: bool,
    /// The last read from `io` brought at most what the caller's buffer could take.
    last_read_small: bool,
}

impl<S> BurstReader<S> {
    /// Wraps `io` with bursts of [`DEFAULT_BURST`] bytes.
    pub fn new(io: S) -> Self {
        Self::with_burst(io, DEFAULT_BURST)
    }

    /// Wraps `io` with bursts of `burst` bytes (at least 1 KiB).
    pub fn with_burst(io: S, burst: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            burst: burst.max(1024),
            in_burst: false,
            last_read_small: true,
        }
    }

    /// Bytes of buffer held right now (0 between bursts).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Hands out buffered bytes; the buffer stays allocated for the rest of the burst.
    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.buf.len());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BurstReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buf.is_empty() {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        let wanted = out.remaining();
        if !this.in_burst {
            // Between bursts: straight into the caller's buffer, no copy, no buffer here.
            let before = out.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
            let n = out.filled().len() - before;
            if n == wanted && wanted > 0 {
                // The caller's buffer was too small for what was waiting: a burst.
                this.in_burst = true;
                this.last_read_small = false;
            }
            return Poll::Ready(Ok(()));
        }
        // In a burst: one syscall for up to `burst` bytes. `reserve` reclaims the space of
        // bytes already handed out, so this does not allocate again.
        this.buf.reserve(this.burst);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
            Poll::Pending => {
                if this.last_read_small {
                    // The last read fitted the caller's buffer and nothing followed: the
                    // burst is over. Free the buffer; the next burst allocates again.
                    this.in_burst = false;
                    this.buf = BytesMut::new();
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => {
                this.last_read_small = n <= wanted;
                this.hand_out(out);
                if n == 0 {
                    // End of stream: nothing will arrive to fill the buffer again.
                    this.in_burst = false;
                    this.buf = BytesMut::new();
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BurstReader<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::poll_fn;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// One read with a caller buffer of `len` bytes; `None` if it would wait.
    fn try_read<S: AsyncRead + Unpin>(r: &mut BurstReader<S>, len: usize) -> Option<Vec<u8>> {
        let mut space = vec![0u8; len];
        let mut out = ReadBuf::new(&mut space);
        let waker = futures_util::task::noop_waker();
        match Pin::new(r).poll_read(&mut Context::from_waker(&waker), &mut out) {
            Poll::Ready(r) => {
                r.unwrap();
                Some(out.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn small_reads_hold_no_buffer() {
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        let mut r = BurstReader::new(io);
        for _ in 0..3 {
            peer.write_all(b"ping!!").await.unwrap();
            assert_eq!(try_read(&mut r, 4096).unwrap(), b"ping!!");
            assert_eq!(r.buffer_capacity(), 0);
            assert!(try_read(&mut r, 4096).is_none());
            assert_eq!(r.buffer_capacity(), 0);
        }
    }

    #[tokio::test]
    async fn a_burst_is_buffered_in_order_and_released_after() {
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        let mut r = BurstReader::with_burst(io, 64 * 1024);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut max_capacity = 0;
        while let Some(chunk) = try_read(&mut r, 4096) {
            assert!(!chunk.is_empty());
            got.extend_from_slice(&chunk);
            max_capacity = max_capacity.max(r.buffer_capacity());
        }
        assert_eq!(got, sent);
        assert!(max_capacity > 8192, "the burst used a buffer of its own");
        // The burst ended with a big read: the buffer is kept until a small one.
        peer.write_all(b"tail").await.unwrap();
        assert_eq!(try_read(&mut r, 4096).unwrap(), b"tail");
        assert!(try_read(&mut r, 4096).is_none());
        assert_eq!(r.buffer_capacity(), 0, "released once the burst is over");
    }

    #[tokio::test]
    async fn end_of_stream_and_writes_pass_through() {
        let (mut peer, io) = tokio::io::duplex(1 << 16);
        let mut r = BurstReader::new(io);
        peer.write_all(&[7u8; 10_000]).await.unwrap();
        drop(peer);
        let mut got = 0;
        loop {
            let chunk = try_read(&mut r, 1024).unwrap();
            if chunk.is_empty() {
                break;
            }
            got += chunk.len();
        }
        assert_eq!(got, 10_000);
        assert_eq!(r.buffer_capacity(), 0);
        let err = poll_fn(|cx| Pin::new(&mut r).poll_write(cx, b"x")).await;
        assert!(err.is_err(), "the peer is gone: {err:?}");
    }
}
