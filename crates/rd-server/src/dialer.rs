//! [`Dialer`]: open streams to a client's network, directly or through a peer server.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rd_proto::{Target, TargetError};
use rd_session::TunnelStream;

use crate::registry::Route;
use crate::server::Server;

/// A dial through the tunnel failed before a stream existed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No session for the client, here or at a peer (Go's text).
    #[error("failed to find Session for client {0}")]
    NoSession(String),
    /// The target does not fit the protocol.
    #[error(transparent)]
    InvalidTarget(#[from] TargetError),
    /// The session refused (ended, or too many streams).
    #[error(transparent)]
    Session(#[from] rd_session::DialError),
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
    server: Server,
    client_key: String,
}

impl Dialer {
    pub(crate) fn new(server: Server, client_key: String) -> Self {
        Self { server, client_key }
    }

    /// The client this dialer reaches.
    pub fn client_key(&self) -> &str {
        &self.client_key
    }

    /// Opens a stream to `address` over `proto` (`tcp`, `unix`, ...) on the client's side.
    /// Returns at once, as Go: a remote dial failure is the stream's first read error.
    pub async fn dial(&self, proto: &str, address: &str) -> Result<TunnelStream, DialError> {
        self.dial_target(Target::new(proto, address)?).await
    }

    /// Same as [`dial`](Self::dial) with a parsed target.
    pub async fn dial_target(&self, target: Target) -> Result<TunnelStream, DialError> {
        let started = Instant::now();
        let route = self.server.registry().route(&self.client_key);
        let stream = match route {
            Some(Route::Local(session)) => session.dial(target)?,
            Some(Route::Peer(link)) => link.dial(target.routed_via(self.client_key.clone())?)?,
            None => return Err(DialError::NoSession(self.client_key.clone())),
        };
        self.server
            .metrics()
            .dial_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(stream)
    }
}

/// A tunnel stream as a hyper-util client connection.
#[derive(Debug)]
pub struct TunnelConnection {
    io: TokioIo<TunnelStream>,
}

impl TunnelConnection {
    /// The stream inside.
    pub fn into_inner(self) -> TunnelStream {
        self.io.into_inner()
    }
}

impl Connection for TunnelConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TunnelConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
            let stream = dialer.dial("tcp", &format!("{host}:{port}")).await?;
            Ok(TunnelConnection {
                io: TokioIo::new(stream),
            })
        })
    }
}
