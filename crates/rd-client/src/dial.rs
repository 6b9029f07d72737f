//! Dialing targets on the client's side (Go's `net.Dialer` in `clientDial`).

use std::io;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use rd_proto::Target;
use rd_session::{BoxFuture, BoxedIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Go's local dial timeout for targets.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens local connections for Connects the server sends (Go's
/// `ConnectToProxyWithDialer`): replace it to route targets to an in-process service.
pub trait LocalDialer: Send + Sync + 'static {
    /// Connects to `target`.
    fn dial(&self, target: &Target) -> BoxFuture<io::Result<BoxedIo>>;
}

impl<F, Fut> LocalDialer for F
where
    F: Fn(&Target) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = io::Result<BoxedIo>> + Send + 'static,
{
    fn dial(&self, target: &Target) -> BoxFuture<io::Result<BoxedIo>> {
        Box::pin(self(target))
    }
}

/// Dials `tcp`, `tcp4`, `tcp6` (TCP_NODELAY on) and `unix` targets with the OS.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetDialer;

impl LocalDialer for NetDialer {
    fn dial(&self, target: &Target) -> BoxFuture<io::Result<BoxedIo>> {
        let proto = target.proto().to_owned();
        let address = target.address().to_owned();
        Box::pin(async move {
            match proto.as_str() {
                "tcp" | "tcp4" | "tcp6" => {
                    let stream = dial_tcp(&proto, &address).await?;
                    stream.set_nodelay(true)?;
                    let op = GoOp::new("tcp", stream.local_addr()?, stream.peer_addr()?);
                    Ok(Box::new(GoErrors { io: stream, op }) as BoxedIo)
                }
                #[cfg(unix)]
                "unix" => Ok(Box::new(tokio::net::UnixStream::connect(&address).await?) as BoxedIo),
                other => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("unknown network {other}"),
                )),
            }
        })
    }
}

async fn dial_tcp(proto: &str, address: &str) -> io::Result<TcpStream> {
    first_reachable(proto, address, TcpStream::connect).await
}

/// Resolves `address` (`host:port`) and returns what `connect` makes of the first address
/// it succeeds with, in the resolver's order, as Go's dialer does; the last error when none
/// does. A network ending in `4` or `6` (`tcp4`, `udp6`) keeps to that family.
pub(crate) async fn first_reachable<T, F, Fut>(
    proto: &str,
    address: &str,
    mut connect: F,
) -> io::Result<T>
where
    F: FnMut(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    let addrs = tokio::net::lookup_host(address).await?.filter(|a| {
        if proto.ends_with('4') {
            a.is_ipv4()
        } else if proto.ends_with('6') {
            a.is_ipv6()
        } else {
            true
        }
    });
    let mut last = None;
    for addr in addrs {
        match connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no suitable address found")))
}

/// The `net` and addresses of a connection, for Go's error wording.
#[derive(Debug, Clone)]
struct GoOp {
    /// `tcp ` plus `local->remote`, as Go's `net.OpError` prints them.
    prefix: String,
}

impl GoOp {
    fn new(net: &str, local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Self {
        Self {
            prefix: format!("{net} {local}->{remote}"),
        }
    }

    /// `read tcp 127.0.0.1:5678->127.0.0.1:8125: read: connection reset by peer`.
    fn error(&self, op: &str, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!("{op} {}: {op}: {}", self.prefix, go_errno_text(&e)),
        )
    }
}

/// An OS error as Go's `syscall.Errno` prints it: the C library's text in lower case,
/// without Rust's ` (os error N)` suffix. Other errors keep their own text.
fn go_errno_text(e: &io::Error) -> String {
    let text = e.to_string();
    let Some(code) = e.raw_os_error() else {
        return text;
    };
    let text = text
        .strip_suffix(&format!(" (os error {code})"))
        .unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

/// A local connection whose read and write errors read as Go's: after a successful dial the
/// text goes to the server as the stream's Error, where a Go peer (or a person comparing
/// with Go's logs) expects `read tcp A->B: read: connection reset by peer`.
struct GoErrors<S> {
    io: S,
    op: GoOp,
}

impl<S: AsyncRead + Unpin> AsyncRead for GoErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Pin::new(&mut this.io)
            .poll_read(cx, buf)
            .map_err(|e| this.op.error("read", e))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GoErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        Pin::new(&mut this.io)
            .poll_write(cx, buf)
            .map_err(|e| this.op.error("write", e))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        Pin::new(&mut this.io)
            .poll_write_vectored(cx, bufs)
            .map_err(|e| this.op.error("write", e))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Pin::new(&mut this.io)
            .poll_flush(cx)
            .map_err(|e| this.op.error("write", e))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Pin::new(&mut this.io)
            .poll_shutdown(cx)
            .map_err(|e| this.op.error("shutdown", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_as_go_prints_them() {
        let op = GoOp::new(
            "tcp",
            "127.0.0.1:5678".parse().expect("addr"),
            "127.0.0.1:8125".parse().expect("addr"),
        );
        let reset = io::Error::from_raw_os_error(104);
        assert_eq!(
            op.error("read", reset).to_string(),
            "read tcp 127.0.0.1:5678->127.0.0.1:8125: read: connection reset by peer"
        );
        let pipe = io::Error::from_raw_os_error(32);
        assert_eq!(
            op.error("write", pipe).to_string(),
            "write tcp 127.0.0.1:5678->127.0.0.1:8125: write: broken pipe"
        );
        let other = io::Error::other("custom");
        assert_eq!(go_errno_text(&other), "custom");
    }

    /// A peer that resets the connection: the error the pipe sends on the wire.
    #[tokio::test]
    async fn a_reset_connection_reads_as_go() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dial = NetDialer.dial(&Target::new("tcp", addr.to_string()).expect("target"));
        let (mut local, accepted) = tokio::join!(dial, listener.accept());
        let (peer, _) = accepted.expect("accept");
        // SO_LINGER 0: close sends RST instead of FIN.
        socket2::SockRef::from(&peer)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(peer);
        let local = local.as_mut().expect("dialed");
        let mut buf = [0u8; 16];
        let err = local.read(&mut buf).await.expect_err("reset");
        let text = err.to_string();
        assert!(
            text.starts_with("read tcp 127.0.0.1:")
                && text.ends_with(&format!("->{addr}: read: connection reset by peer")),
            "{text}"
        );
    }
}
