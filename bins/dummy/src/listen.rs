//! Go-style listen addresses: `:8125` means every interface, as in `net.Listen`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Binds the first address `listen` resolves to that accepts the bind.
pub async fn bind(listen: &str) -> io::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = match literal(listen)? {
        Some(addrs) => addrs,
        None => tokio::net::lookup_host(listen).await?.collect(),
    };
    let mut last_err = io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{listen}: no addresses"),
    );
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Addresses that need no name lookup; `Ok(None)` means "try resolving it".
fn literal(listen: &str) -> io::Result<Option<Vec<SocketAddr>>> {
    if let Some(port) = listen.strip_prefix(':') {
        let port = port.parse::<u16>().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid port in listen address {listen:?}"),
            )
        })?;
        // Go opens a dual-stack socket: `[::]` takes IPv4 too where the system allows, so
        // `localhost` works whichever family it resolves to; IPv4-any is the fallback.
        return Ok(Some(vec![
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ]));
    }
    Ok(listen.parse().ok().map(|a| vec![a]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn go_style_port_only_means_all_interfaces() {
        assert_eq!(
            literal(":8125").unwrap(),
            Some(vec![
                "[::]:8125".parse().unwrap(),
                "0.0.0.0:8125".parse().unwrap()
            ])
        );
        assert!(literal(":http").is_err());
        assert!(literal(":70000").is_err());
    }

    #[test]
    fn socket_addresses_pass_through() {
        assert_eq!(
            literal("127.0.0.1:0").unwrap(),
            Some(vec!["127.0.0.1:0".parse().unwrap()])
        );
        assert_eq!(
            literal("[::1]:80").unwrap(),
            Some(vec!["[::1]:80".parse().unwrap()])
        );
        assert_eq!(literal("localhost:80").unwrap(), None);
    }

    #[tokio::test]
    async fn port_zero_binds_an_ephemeral_port() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        assert_ne!(listener.local_addr().unwrap().port(), 0);
    }
}
