//! The `/client` proxy's connector: a tunnel stream for `http`, TLS over it for `https`
//! (Go's example gets that from `http.Transport`, verifying the target's certificate).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rd_session::transport::TlsOptions;
use rustls_pki_types::ServerName;
use tokio::sync::OnceCell;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{Dialer, TimedStream, TunnelConnection, TunnelInfo};

/// Dials the URI's host through the tunnel, adding TLS for `https` URIs.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConnector {
    pub(crate) dialer: Dialer,
    pub(crate) tls: Arc<TlsSettings>,
}

/// The TLS client configuration, built on first use (loading system roots takes a moment).
#[derive(Debug)]
pub(crate) struct TlsSettings {
    options: TlsOptions,
    config: OnceCell<Arc<rustls::ClientConfig>>,
}

impl TlsSettings {
    pub(crate) fn new(options: TlsOptions) -> Self {
        Self {
            options,
            config: OnceCell::new(),
        }
    }

    async fn connector(&self) -> io::Result<TlsConnector> {
        let config = self
            .config
            .get_or_try_init(|| async {
                let config = rd_session::transport::build_client_config(&self.options)
                    .await
                    .map_err(|e| io::Error::other(rd_session::error_chain(&e)))?;
                // hyper's client here speaks HTTP/1.1 only.
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Ok::<_, io::Error>(Arc::new(config))
            })
            .await?;
        Ok(TlsConnector::from(config.clone()))
    }
}

/// A proxied connection: plain or TLS over a tunnel stream.
#[derive(Debug)]
pub(crate) enum ProxyConnection {
    Plain(TunnelConnection),
    Tls(Box<TokioIo<TlsStream<TimedStream>>>, TunnelInfo),
}

impl Connection for ProxyConnection {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(c) => c.connected(),
            Self::Tls(_, info) => Connected::new().extra(*info),
        }
    }
}

impl hyper::rt::Read for ProxyConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Self::Tls(c, _) => Pin::new(c.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ProxyConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Self::Tls(c, _) => Pin::new(c.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_flush(cx),
            Self::Tls(c, _) => Pin::new(c.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Self::Tls(c, _) => Pin::new(c.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = ProxyConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ProxyConnection>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut dialer = self.dialer.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let plain = tower_service::Service::call(&mut dialer, uri).await?;
            if !https {
                return Ok(ProxyConnection::Plain(plain));
            }
            let name = ServerName::try_from(host.clone()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid TLS name {host:?}"),
                )
            })?;
            let info = plain.info();
            let stream = tls
                .connector()
                .await?
                .connect(name, plain.into_timed())
                .await?;
            Ok(ProxyConnection::Tls(Box::new(TokioIo::new(stream)), info))
        })
    }
}
