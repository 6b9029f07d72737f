//! [`splice`]: the one copy loop between a tunnel stream and a local connection, for every
//! origin: the agent's side of each stream ([`pipe`](crate::pipe)), and rd-server's HTTP
//! CONNECT, port forwards and upgraded `/client` requests.
//!
//! Each direction is copied until its source ends, and then only the *write* side of its
//! destination is shut down, as TCP half-close does: the other direction keeps flowing.
//! With rd's half-close extension that is what the far end sees too: a client that shuts
//! down writing gets the whole answer. With the Go protocol a tunnel stream has no
//! half-close (an EOF either way closes it in both directions), so once the tunnel stream
//! has ended (left the wire) and its last bytes are delivered, the splice ends at once
//! instead of waiting for the local side to close too; the same holds for a half-closed
//! stream the peer resets later.
//!
//! Memory: a connection holds no buffer while it waits. Local bytes are read into a
//! buffer only while they arrive (the first read of a burst is a 128-byte read on the
//! stack; a buffer is allocated, without zeroing, only when that read filled up, and is
//! freed when the socket runs dry after a short read); bytes from the tunnel are the
//! received messages themselves, written to the local side with one vectored write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::TunnelStream;

/// The first read of a burst: most connections are idle most of the time, and a read
/// that waits holds nothing but this, on the stack.
const FIRST_READ: usize = 128;
/// Read buffer of a busy local side: one Data message per read.
const LOCAL_READ: usize = 64 * 1024;
/// Most bytes taken from the tunnel for one vectored write to the local side.
const TUNNEL_READ: usize = 256 * 1024;
/// Most received chunks kept between two writes: a vector that grew larger for a burst
/// is let go once it is empty again.
const KEPT_CHUNKS: usize = 16;

/// Bytes a finished [`splice`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From the local side into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the local side.
    pub from_tunnel: u64,
}

/// Which side of a [`splice`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpliceError {
    /// The tunnel stream ended with an error: the peer's dial failed or was refused (the
    /// peer's text, such as `connect not allowed`), the peer reset it, or the session ended.
    #[error("tunnel: {0}")]
    Tunnel(#[source] io::Error),
    /// Reading or writing the local connection failed.
    #[error("local connection: {0}")]
    Local(#[source] io::Error),
}

/// Copies `local` to `tunnel` and `tunnel` to `local` until both directions have ended (or
/// the tunnel stream has ended and delivered its last bytes, which with the Go protocol is
/// at its EOF). A local failure resets the tunnel stream with the error's text, so the far
/// end drops its connection at once; a tunnel failure is returned for the caller to log,
/// and the local connection is closed when the caller drops it.
pub async fn splice<L>(tunnel: &TunnelStream, local: L) -> Result<Spliced, SpliceError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let result = Splice::new(tunnel, local).await;
    if let Err(SpliceError::Local(e)) = &result {
        tunnel.reset(&e.to_string());
    }
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Copying,
    ShuttingDown,
    Done,
}

struct Splice<'a, L> {
    tunnel: &'a TunnelStream,
    local: L,
    /// Local bytes read and not yet taken by the tunnel stream (empty, and without a
    /// buffer, while the local side has nothing).
    out_buf: BytesMut,
    /// The last read filled its buffer: read straight into a large buffer again.
    out_burst: bool,
    out: Direction,
    in_chunks: Vec<Bytes>,
    inbound: Direction,
    moved: Spliced,
}

impl<'a, L: AsyncRead + AsyncWrite + Unpin> Splice<'a, L> {
    fn new(tunnel: &'a TunnelStream, local: L) -> Self {
        Self {
            tunnel,
            local,
            out_buf: BytesMut::new(),
            out_burst: false,
            out: Direction::Copying,
            in_chunks: Vec::new(),
            inbound: Direction::Copying,
            moved: Spliced::default(),
        }
    }

    /// Local to tunnel; `Ready(Ok)` once the tunnel's write side is shut down.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceError>> {
        loop {
            match self.out {
                Direction::Done => return Poll::Ready(Ok(())),
                Direction::ShuttingDown => {
                    // An error here means the stream already ended; the inbound side
                    // reports how.
                    let _ = ready!(self.tunnel.poll_shutdown_shared(cx));
                    self.out = Direction::Done;
                }
                Direction::Copying if !self.out_buf.is_empty() => {
                    let n = ready!(self.tunnel.poll_write_shared(cx, &self.out_buf))
                        .map_err(SpliceError::Tunnel)?;
                    self.out_buf.advance(n);
                    self.moved.to_tunnel += n as u64;
                }
                Direction::Copying => {
                    if ready!(self.read_local(cx))? == 0 {
                        self.out = Direction::ShuttingDown;
                    }
                }
            }
        }
    }

    /// One read of the local side into `out_buf` (empty on entry); `Ready(Ok(0))` at its
    /// end. Between bursts the read goes to a small array on the stack, so a connection
    /// that waits holds no buffer; a read that fills it means more is waiting, and the
    /// reads of the burst go straight into a large buffer until one comes back short.
    fn read_local(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, SpliceError>> {
        if !self.out_burst {
            let mut first = [0u8; FIRST_READ];
            let mut buf = ReadBuf::new(&mut first);
            if Pin::new(&mut self.local)
                .poll_read(cx, &mut buf)
                .map_err(SpliceError::Local)?
                .is_pending()
            {
                // A burst that ended on a short read left its buffer's spare capacity
                // here: an idle connection holds none.
                if self.out_buf.is_empty() && self.out_buf.capacity() > 0 {
                    self.out_buf = BytesMut::new();
                }
                return Poll::Pending;
            }
            let n = buf.filled().len();
            if n == FIRST_READ {
                self.out_burst = true;
                self.out_buf.reserve(LOCAL_READ);
            }
            self.out_buf.extend_from_slice(buf.filled());
            if n < FIRST_READ {
                return Poll::Ready(Ok(n));
            }
            // Whatever else already arrived goes out in the same Data message.
        }
        self.out_buf.reserve(LOCAL_READ - self.out_buf.len());
        let before = self.out_buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.local), cx, &mut self.out_buf) {
            Poll::Ready(Ok(n)) => {
                // A read that did not fill half its buffer ends the burst.
                self.out_burst = n >= LOCAL_READ / 2;
                Poll::Ready(Ok(before + n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(SpliceError::Local(e))),
            Poll::Pending if before > 0 => Poll::Ready(Ok(before)),
            Poll::Pending => {
                // The socket ran dry: give the buffer back while it waits.
                self.out_burst = false;
                self.out_buf = BytesMut::new();
                Poll::Pending
            }
        }
    }

    /// Tunnel to local; `Ready(Ok)` once the local write side is shut down.
    fn poll_in(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceError>> {
        loop {
            match self.inbound {
                Direction::Done => return Poll::Ready(Ok(())),
                Direction::ShuttingDown => {
                    let local = Pin::new(&mut self.local);
                    // The local peer may be gone already; nothing is lost either way.
                    let _ = ready!(local.poll_shutdown(cx));
                    self.inbound = Direction::Done;
                }
                Direction::Copying if !self.in_chunks.is_empty() => {
                    let slices: Vec<io::IoSlice<'_>> =
                        self.in_chunks.iter().map(|c| io::IoSlice::new(c)).collect();
                    let local = Pin::new(&mut self.local);
                    let mut n = ready!(local.poll_write_vectored(cx, &slices))
                        .map_err(SpliceError::Local)?;
                    if n == 0 {
                        return Poll::Ready(Err(SpliceError::Local(
                            io::ErrorKind::WriteZero.into(),
                        )));
                    }
                    self.moved.from_tunnel += n as u64;
                    let mut done = 0;
                    for chunk in &mut self.in_chunks {
                        let step = n.min(chunk.len());
                        chunk.advance(step);
                        n -= step;
                        if !chunk.is_empty() {
                            break;
                        }
                        done += 1;
                    }
                    self.in_chunks.drain(..done);
                    if self.in_chunks.is_empty() && self.in_chunks.capacity() > KEPT_CHUNKS {
                        self.in_chunks = Vec::new();
                    }
                }
                Direction::Copying => {
                    let read = self
                        .tunnel
                        .poll_read_chunks(cx, TUNNEL_READ, &mut self.in_chunks);
                    if ready!(read).map_err(SpliceError::Tunnel)? == 0 {
                        self.inbound = Direction::ShuttingDown;
                    }
                }
            }
        }
    }
}

impl<L: AsyncRead + AsyncWrite + Unpin> Future for Splice<'_, L> {
    type Output = Result<Spliced, SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let out = this.poll_out(cx)?;
        let inbound = this.poll_in(cx)?;
        match (out, inbound) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(this.moved)),
            (Poll::Pending, Poll::Ready(())) if this.tunnel.poll_closed(cx).is_ready() => {
                // The far end closed the connection both ways (or reset it after its half
                // close); a local side that keeps its half open would otherwise hold this
                // task and its socket forever.
                Poll::Ready(Ok(this.moved))
            }
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{BoxedIo, ConnectRefused, SessionBuilder};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    /// A splice that moved a burst of bytes holds no buffer once its local side has nothing
    /// more: an idle forwarded connection that carried data costs what a never-used one does.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_after_a_burst() {
        // The burst's last read fills at least half the buffer: the burst ends when the
        // socket runs dry.
        idle_after_burst(300_000).await;
    }

    /// The burst's last read is short: the burst ends on it, and the next read (from the
    /// stack) finds the socket dry.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_after_a_burst_ending_short() {
        idle_after_burst(4 * LOCAL_READ + 1000).await;
    }

    async fn idle_after_burst(len: usize) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let _client = SessionBuilder::client()
            .connect_handler(|_target: rd_proto::Target| async {
                // A sink: whatever arrives is read and dropped.
                let (mut service, io) = tokio::io::duplex(1 << 20);
                tokio::spawn(async move {
                    let mut sink = tokio::io::sink();
                    tokio::io::copy(&mut service, &mut sink).await.ok();
                });
                Ok::<BoxedIo, ConnectRefused>(Box::new(io))
            })
            .spawn(client_ws);
        let server = SessionBuilder::server("foo", 1).spawn(server_ws);
        let tunnel = server.dial_addr("tcp", "127.0.0.1:7").unwrap();
        let (mut user, local) = tokio::io::duplex(1 << 20);
        let mut splice = Splice::new(&tunnel, local);
        let burst = vec![5u8; len];
        user.write_all(&burst).await.unwrap();
        let mut held = 0;
        // Poll until the burst has gone into the tunnel and the local side ran dry.
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut splice).poll(cx);
            held = held.max(splice.out_buf.capacity());
            if splice.moved.to_tunnel == burst.len() as u64 && splice.out_buf.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert!(held >= LOCAL_READ / 2, "the burst used a large buffer");
        let waker = futures_util::task::noop_waker();
        assert!(Pin::new(&mut splice)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(
            splice.out_buf.capacity(),
            0,
            "released once the socket ran dry"
        );
        assert!(splice.in_chunks.capacity() <= KEPT_CHUNKS);
        assert!(!splice.out_burst);
        drop(user);
    }
}
