//! Dialing targets on the client's side (Go's `net.Dialer` in `clientDial`).

use std::io;
use std::time::Duration;

use rd_proto::Target;
use rd_session::{BoxFuture, BoxedIo};
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
                    Ok(Box::new(stream) as BoxedIo)
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
    let addrs = tokio::net::lookup_host(address)
        .await?
        .filter(|a| match proto {
            "tcp4" => a.is_ipv4(),
            "tcp6" => a.is_ipv6(),
            _ => true,
        });
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no suitable address found")))
}
