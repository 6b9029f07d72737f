//! Connects the peer asks for: the application's handler dials, the session pipes.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use rd_proto::Target;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::splice::{splice, SpliceError};
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

    /// Like [`connect`](Self::connect), for a handler whose connection may be handed back
    /// before it is known to be established, and say when it is. The session starts
    /// copying at once and tells the peer that the dial succeeded (connect-ack extension)
    /// only when [`Dialed::established`] says so, or resets the stream with its text. A
    /// server that routes a peer's Connect through another tunnel does this: the request
    /// flows at once, and the peer learns the far agent's verdict, not the hop's. By
    /// default the connection is established when `connect` returns it.
    fn connect_deferred(&self, target: Target) -> BoxFuture<Result<Dialed, ConnectRefused>> {
        let dialing = self.connect(target);
        Box::pin(async move { dialing.await.map(Dialed::new) })
    }
}

/// A connection from [`ConnectHandler::connect_deferred`]: the local side, and when it is
/// not established yet, the future that says whether it will be.
pub struct Dialed {
    /// The local connection.
    pub io: BoxedIo,
    /// Resolves once the connection is established (`Ok`) or failed (the text goes to the
    /// peer); `None`: established already.
    pub established: Option<BoxFuture<Result<(), ConnectRefused>>>,
}

impl Dialed {
    /// A connection established already.
    pub fn new(io: BoxedIo) -> Self {
        Self {
            io,
            established: None,
        }
    }
}

impl fmt::Debug for Dialed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialed")
            .field("established", &self.established.is_none())
            .finish()
    }
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
            r = handler.connect_deferred(target) => r,
            () = cancel.cancelled() => return,
        };
        drop(pending);
        let Dialed { io, established } = match dialed {
            Ok(dialed) => dialed,
            Err(refused) => {
                tracing::debug!(reason = %refused, "connect refused");
                stream.reset(&refused.0);
                return;
            }
        };
        tracing::debug!("connected");
        // The peer learns the dial succeeded as soon as it did (connect-ack extension), so
        // its CONNECT answers now instead of after a fixed wait.
        let splice = splice(&stream, io);
        tokio::pin!(splice);
        let spliced = match established {
            None => {
                stream.acknowledge();
                splice.await
            }
            Some(established) => tokio::select! {
                // Over before the verdict: nothing left to acknowledge.
                r = &mut splice => r,
                verdict = established => {
                    match verdict {
                        Ok(()) => stream.acknowledge(),
                        Err(refused) => {
                            tracing::debug!(reason = %refused, "connect failed after all");
                            stream.reset(&refused.0);
                        }
                    }
                    splice.await
                }
            },
        };
        match spliced {
            Ok(_) => {}
            Err(e @ SpliceError::Local(_)) => {
                tracing::debug!(error = %e, "pipe ended with an error");
            }
            Err(e @ SpliceError::Tunnel(_)) => {
                tracing::debug!(error = %e, "pipe ended with an error");
                stream.reset(&e.to_string());
            }
        }
    }
    .instrument(span)
    .await;
}

/// Copies both ways between the tunnel stream and a local connection: [`splice`] with an
/// `io::Result`.
///
/// Each direction is copied to its end and then only the other side's write half is shut
/// down, as TCP half-close does. With rd's half-close extension
/// ([`TunnelStream::half_close`]) a client that writes its request, shuts down writing and
/// reads the answer gets all of it; with the Go protocol the first end closes the stream
/// both ways (its EOF is an Error `EOF`), and the pipe is done once the stream has left
/// the wire and its last received bytes are written. A local failure resets the stream
/// with the error's text.
pub async fn pipe(
    tunnel: &TunnelStream,
    local: impl AsyncRead + AsyncWrite + Send,
) -> io::Result<()> {
    match splice(tunnel, Box::pin(local)).await {
        Ok(_) => Ok(()),
        Err(SpliceError::Tunnel(e) | SpliceError::Local(e)) => Err(e),
    }
}

impl fmt::Debug for dyn ConnectHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectHandler")
    }
}
