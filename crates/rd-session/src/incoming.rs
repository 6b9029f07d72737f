//! Connects the peer asks for: the application's handler dials, the session pipes.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use futures_util::FutureExt;
use rd_proto::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::stream::TunnelStream;

/// A local connection the handler dialed: anything that reads and writes bytes.
pub trait LocalIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LocalIo for T {}

/// A boxed [`LocalIo`].
pub type BoxedIo = Box<dyn LocalIo>;

/// A boxed, sendable future, as handlers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a handler did not connect; the text goes to the peer as the stream's Error, so use
/// Go's wording where a Go peer would show it (`dial tcp 127.0.0.1:9: connect: connection
/// refused`, `connect not allowed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnectRefused(pub String);

impl ConnectRefused {
    /// Go's text for a denied target.
    pub fn not_allowed() -> Self {
        Self("connect not allowed".into())
    }

    /// Go's text for a failed dial: `dial <proto> <address>: <cause>`.
    pub fn dial_failed(target: &Target, cause: &io::Error) -> Self {
        Self(format!(
            "dial {} {}: {}",
            target.proto(),
            target.address(),
            go_io_text(cause)
        ))
    }
}

/// Go's `syscall` wording for the common dial failures, so Go tooling that matches on
/// error text keeps working.
fn go_io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect: connection refused".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        io::ErrorKind::NotFound => "connect: no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "connect: permission denied".into(),
        _ => e.to_string(),
    }
}

/// Decides what to do with a Connect from the peer.
///
/// Closures `Fn(Target) -> impl Future<Output = Result<BoxedIo, ConnectRefused>>` implement it.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Dial `target` locally, or refuse it.
    fn connect(&self, target: Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>>;
}

impl<F, Fut> ConnectHandler for F
where
    F: Fn(Target) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BoxedIo, ConnectRefused>> + Send + 'static,
{
    fn connect(&self, target: Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>> {
        Box::pin(self(target))
    }
}

/// A handler that refuses everything, as a Go server without `ClientConnectAuthorizer`
/// (but answering with an Error instead of ending the session).
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseAll;

impl ConnectHandler for RefuseAll {
    fn connect(&self, _target: Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>> {
        Box::pin(async { Err(ConnectRefused::not_allowed()) })
    }
}

/// Counts a dial in flight for as long as it lives.
pub(crate) struct PendingDial(pub(crate) std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PendingDial {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) async fn serve(
    handler: std::sync::Arc<dyn ConnectHandler>,
    stream: TunnelStream,
    cancel: CancellationToken,
    pending: PendingDial,
) {
    let target = stream.peer_addr().clone();
    let span = tracing::debug_span!("stream", id = %stream.id(), target = %target);
    async move {
        let dialed = tokio::select! {
            r = handler.connect(target) => r,
            () = cancel.cancelled() => return,
        };
        drop(pending);
        match dialed {
            Err(refused) => {
                tracing::debug!(reason = %refused, "connect refused");
                stream.reset(&refused.0);
            }
            Ok(local) => {
                tracing::debug!("connected");
                if let Err(e) = pipe(&stream, local).await {
                    tracing::debug!(error = %e, "pipe ended with an error");
                    stream.reset(&e.to_string());
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Copies both ways between the tunnel stream and a local connection.
///
/// With rd's half-close extension ([`TunnelStream::half_close`]) each direction is copied to
/// its end and then only the other side's write half is shut down, as TCP half-close does:
/// a client that writes its request, shuts down writing and reads the answer gets all of it.
/// The pipe is done once both directions are (or once the tunnel stream has ended and its
/// last received bytes are written). Without it, as Go's pipe does, it stops as soon as
/// either direction ends, and the caller closes both (the protocol has no half-close); a
/// clean end finishes the stream with EOF when it is dropped.
pub async fn pipe(
    tunnel: &TunnelStream,
    local: impl AsyncRead + AsyncWrite + Send,
) -> io::Result<()> {
    let (mut local_read, mut local_write) = tokio::io::split(local);
    let inbound = async {
        let mut chunks = Vec::new();
        while tunnel.read_chunks(256 * 1024, &mut chunks).await? > 0 {
            write_all_chunks(&mut local_write, &mut chunks).await?;
        }
        local_write.flush().await?;
        local_write.shutdown().await
    };
    if !tunnel.half_close() {
        tokio::select! {
            r = copy_out(tunnel, &mut local_read) => r,
            r = inbound => r,
        }
    } else {
        let outbound = async {
            tokio::select! {
                r = copy_out(tunnel, &mut local_read) => r?,
                // The peer reset or closed the stream: nothing more can go out, and a
                // local side that never writes again must not hold the pipe open.
                () = tunnel.closed() => return Ok(()),
            }
            // The local side shut down writing: so does the tunnel (Fin); reading goes on.
            tunnel.shutdown_shared().await
        };
        tokio::try_join!(outbound, inbound).map(|_| ())
    }
}

/// Copies the local connection into the tunnel until the local side's EOF.
async fn copy_out(
    tunnel: &TunnelStream,
    local_read: &mut (impl AsyncRead + Unpin),
) -> io::Result<()> {
    // Idle streams are the common case (thousands of kept-alive connections): start with a
    // small buffer and take a large one as soon as the stream carries data.
    let mut buf = vec![0u8; FIRST_READ];
    loop {
        let mut n = local_read.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() < PIPE_BUFFER {
            let mut big = vec![0u8; PIPE_BUFFER];
            big[..n].copy_from_slice(&buf[..n]);
            buf = big;
            // Whatever else has already arrived goes out in the same Data message, as Go's
            // 32 KiB copy would send it; a read that would wait is simply dropped.
            if n == FIRST_READ {
                if let Some(more) = local_read.read(&mut buf[n..]).now_or_never() {
                    n += more?;
                }
            }
        }
        let mut sent = 0;
        while sent < n {
            sent += tunnel.write_shared(&buf[sent..n]).await?;
        }
    }
}

/// Writes every chunk, vectored: one system call for all the messages that arrived together.
async fn write_all_chunks(
    w: &mut (impl AsyncWrite + Unpin),
    chunks: &mut Vec<bytes::Bytes>,
) -> io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[first];
            let step = n.min(c.len());
            c.advance(step);
            n -= step;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// First read buffer of a stream's local side: most streams sit idle, so they hold no more.
const FIRST_READ: usize = 128;

/// Read buffer of a busy stream's local side.
const PIPE_BUFFER: usize = 64 * 1024;

impl fmt::Debug for dyn ConnectHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectHandler")
    }
}
