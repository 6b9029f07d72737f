//! `--forward`: binding every forward's listener (a TCP listener, or a UDP socket for a
//! `udp` target) before the main listener, so a bad forward stops the server at start-up,
//! then starting them.

use std::io;
use std::time::Duration;

use rd_server::forward::{Forward, ForwardHandle, ForwardSpec};
use rd_server::forward_udp::UdpForward;
use rd_server::Server;
use tokio::net::{TcpListener, UdpSocket};

use crate::cli;

/// A forward's bound socket.
pub enum Bound {
    /// A stream forward's listener.
    Tcp(TcpListener),
    /// A datagram forward's socket.
    Udp(UdpSocket),
}

impl Bound {
    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr(),
            Self::Udp(s) => s.local_addr(),
        }
    }
}

/// How UDP forwards treat their flows (--udp-idle-timeout, --udp-max-flows).
#[derive(Debug, Clone, Copy)]
pub struct UdpOptions {
    pub idle_timeout: Duration,
    pub max_flows: usize,
}

/// Binds every forward's listener.
pub async fn bind(
    specs: &[ForwardSpec],
) -> Result<Vec<(ForwardSpec, Bound)>, Box<dyn std::error::Error>> {
    let mut listeners = Vec::with_capacity(specs.len());
    for spec in specs {
        let bound = if spec.is_udp() {
            bind_udp(&spec.listen).await.map(Bound::Udp)
        } else {
            cli::bind(&spec.listen).await.map(Bound::Tcp)
        };
        let bound = bound.map_err(|e| format!("--forward {spec}: {e}"))?;
        listeners.push((spec.clone(), bound));
    }
    Ok(listeners)
}

/// A UDP socket on `listen`, read as [`cli::bind`] reads it for TCP.
async fn bind_udp(listen: &str) -> io::Result<UdpSocket> {
    cli::bind_with(listen, |addr| {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    })
    .await
    .map_err(|e| io::Error::new(e.kind(), format!("listen on udp {listen}: {e}")))
}

/// Starts the bound forwards; prints `forwarding ADDR to CLIENT:PROTO/ADDRESS` on stdout
/// for each (the bound address, so `:0` is usable), and warns about a forward that anyone
/// can reach: forwards take no credentials.
pub fn start(
    server: &Server,
    listeners: Vec<(ForwardSpec, Bound)>,
    format: cli::LogFormat,
    udp: UdpOptions,
) -> Result<Vec<ForwardHandle>, Box<dyn std::error::Error>> {
    let mut handles = Vec::with_capacity(listeners.len());
    for (spec, listener) in listeners {
        let addr = listener.local_addr()?;
        let to = format!(
            "{}:{}/{}",
            spec.client_key,
            spec.target.proto(),
            spec.target.address()
        );
        cli::announce(
            format,
            &format!("forwarding {addr} to {to}"),
            "forwarding",
            &[("listen", addr.to_string()), ("to", to)],
        );
        tracing::info!(%addr, forward = %spec, "forward listening");
        if !addr.ip().is_loopback() {
            tracing::warn!(
                listen = %addr,
                forward = %spec,
                "this forward is open to anyone who reaches its address (forwards take no \
                 credentials): they reach its target on the agent's side; listen on \
                 127.0.0.1 or a private address"
            );
        }
        handles.push(match listener {
            Bound::Tcp(listener) => Forward::new(server.clone(), spec).spawn(listener),
            Bound::Udp(socket) => UdpForward::new(server.clone(), spec)
                .idle_timeout(udp.idle_timeout)
                .max_flows(udp.max_flows)
                .spawn(socket),
        });
    }
    Ok(handles)
}
