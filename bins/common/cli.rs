//! What every rd binary does the same way: logging, Go-style listen addresses, signals.

use std::io;

use tokio::net::TcpListener;

/// Logs to stderr at info (debug with `debug`); `RUST_LOG` overrides. The wire dump of every
/// message (target `rd_proto::wire`) is on with `debug` or `CATTLE_TUNNEL_DATA_DEBUG=true`,
/// as Go's `PrintTunnelData`.
pub fn init_tracing(debug: bool) {
    let wire = debug || std::env::var("CATTLE_TUNNEL_DATA_DEBUG").is_ok_and(|v| v == "true");
    let base = if debug { "debug" } else { "info" };
    let default = if wire {
        format!("{base},rd_proto::wire=trace")
    } else {
        base.to_owned()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
}

/// Binds a listen address the way Go's `net.Listen` reads it: `:8123` is every interface
/// (IPv6 and IPv4 where the system allows both), `host:port` that host.
pub async fn bind(listen: &str) -> io::Result<TcpListener> {
    match listen.strip_prefix(':') {
        Some(port) => {
            let port: u16 = port.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid port in {listen:?}"),
                )
            })?;
            match listen_on((std::net::Ipv6Addr::UNSPECIFIED, port).into()) {
                Ok(l) => Ok(l),
                Err(_) => listen_on((std::net::Ipv4Addr::UNSPECIFIED, port).into()),
            }
        }
        None => match tokio::net::lookup_host(listen).await {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => listen_on(addr),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "address resolves to nothing",
                )),
            },
            Err(e) => Err(e),
        },
    }
    .map_err(|e| io::Error::new(e.kind(), format!("listen on {listen}: {e}")))
}

/// Accept backlog: tokio's default of 1024 overflows when thousands of agents reconnect at
/// once (a server restart), and each overflow costs that agent a SYN retransmit (1 s, then
/// 2 s, ...). The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

fn listen_on(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    // As std's and tokio's bind: restart on a port with connections in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM. A signal whose handler cannot be installed is simply not
/// awaited, rather than being mistaken for a shutdown request.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("interrupted"),
        () = terminate => tracing::info!("terminated"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn port_zero_binds_an_ephemeral_port() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        assert_ne!(listener.local_addr().unwrap().port(), 0);
    }

    #[tokio::test]
    async fn go_style_port_only_binds_every_interface() {
        let listener = bind(":0").await.unwrap();
        assert!(listener.local_addr().unwrap().ip().is_unspecified());
    }

    #[tokio::test]
    async fn bad_ports_are_refused_with_the_address() {
        for bad in [":http", ":70000"] {
            let err = bind(bad).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
