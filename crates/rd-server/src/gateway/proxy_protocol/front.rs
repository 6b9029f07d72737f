//! Who may send a PROXY header (`--proxy-protocol-from`), and the accept-time check that
//! takes a trusted front's header and refuses everyone else's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{looks_like_header, read_header, ProxiedAddrs, ProxyHeaderError};
use crate::log_limit::LogLimit;

/// Default of [`ProxyProtocolAcceptor::timeout`]: a front sends its header at once, with or
/// before the client's first bytes.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses trusted to send a PROXY header (`--proxy-protocol-from`): CIDR blocks
/// and plain addresses, IPv4 and IPv6, separated by commas (`10.0.0.0/8,fd00::/8,192.0.2.1`).
/// An IPv4 block also matches IPv4 peers of a dual-stack listener (`::ffff:10.1.2.3`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

/// A `--proxy-protocol-from` entry that is neither an address nor a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted front {0:?}: want an IP address or a CIDR block (10.0.0.0/8, fd00::/8)")]
pub struct InvalidTrustedProxy(pub String);

impl FromStr for TrustedProxies {
    type Err = InvalidTrustedProxy;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<ipnet::IpNet>() {
                Ok(net) => net.trunc(),
                Err(_) => entry
                    .parse::<IpAddr>()
                    .map(ipnet::IpNet::from)
                    .map_err(|_| InvalidTrustedProxy(entry.to_owned()))?,
            };
            nets.push(net);
        }
        if nets.is_empty() {
            return Err(InvalidTrustedProxy(list.to_owned()));
        }
        Ok(Self(nets))
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for net in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

impl TrustedProxies {
    /// Whether `ip` may send a header.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Refused connections (headers from untrusted addresses, trusted ones without a valid
/// header), logged at most a few lines a second: an outsider sets the pace.
static REFUSED: LogLimit = LogLimit::new();

/// Takes the PROXY header from connections of trusted fronts, before anything else reads
/// them (a listener's accept loop calls [`accept`](Self::accept) first):
/// - from a [trusted](TrustedProxies) address, a valid v1 or v2 header must come first,
///   within [`timeout`](Self::timeout); the addresses in it are the connection's from then
///   on. A front configured to send headers sends one on every connection, so a connection
///   without one is refused: it is not the front's, or the front is misconfigured, and
///   serving it under the front's address would hide the user's.
/// - from any other address, a connection whose first bytes are a PROXY header is refused
///   (someone tries to choose the address they are logged and judged by, or a front that is
///   missing from the trusted set); any other connection is served as it is.
///
/// Each refusal is logged at warn with the TCP peer address and the reason.
#[derive(Debug, Clone)]
pub struct ProxyProtocolAcceptor {
    trusted: TrustedProxies,
    timeout: Duration,
}

impl ProxyProtocolAcceptor {
    /// Accepts headers from `trusted`.
    pub fn new(trusted: TrustedProxies) -> Self {
        Self {
            trusted,
            timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }

    /// How long a trusted front may take to send its header, and an untrusted connection to
    /// send its first bytes before it is served without a look at them (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The trusted addresses.
    pub fn trusted(&self) -> &TrustedProxies {
        &self.trusted
    }

    /// The addresses a connection accepted from `peer` on `local` is to be known by: those
    /// of a trusted front's header (the user's, and the address the user connected to), or
    /// `peer` and `local` themselves; `Err` when the connection is to be closed (already
    /// logged).
    pub async fn accept(
        &self,
        tcp: &mut TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ProxiedAddrs, ProxyHeaderError> {
        let own = ProxiedAddrs {
            source: peer,
            destination: local,
        };
        let result = if self.trusted.contains(peer.ip()) {
            read_header(tcp, self.timeout)
                .await
                .map(|header| header.addresses.unwrap_or(own))
        } else {
            // Peeked, not read: these bytes are the client's TLS or HTTP.
            let mut first = [0u8; 16];
            match tokio::time::timeout(self.timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if looks_like_header(&first[..n]) => {
                    Err(ProxyHeaderError::Untrusted(peer))
                }
                _ => Ok(own),
            }
        };
        if let Err(e) = &result {
            if let Some(suppressed) = REFUSED.allow() {
                let suppressed = (suppressed > 0).then_some(suppressed);
                tracing::warn!(
                    %peer,
                    error = %e,
                    suppressed,
                    "connection refused: PROXY protocol"
                );
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::{encode, ProxyProtocolVersion};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// A connection to `listener` from `from`, and the accepted end with its peer.
    async fn pair(
        listener: &tokio::net::TcpListener,
        from: &str,
    ) -> (TcpStream, TcpStream, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(addr(from)).expect("bind");
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().expect("addr")),
            listener.accept()
        );
        let (server, peer) = accepted.expect("accept");
        (client.expect("connect"), server, peer)
    }

    #[tokio::test]
    async fn the_acceptor_trusts_only_its_fronts_and_takes_the_header_exactly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let local = listener.local_addr().expect("addr");
        let acceptor = ProxyProtocolAcceptor::new("127.0.0.2".parse().expect("valid"))
            .timeout(Duration::from_secs(5));
        let claimed = ProxiedAddrs {
            source: addr("203.0.113.7:4444"),
            destination: addr("192.0.2.1:443"),
        };

        // A trusted front: the header's addresses, and the bytes after it left unread.
        let (mut front, mut tcp, peer) = pair(&listener, "127.0.0.2:0").await;
        let mut wire = encode(
            ProxyProtocolVersion::V2,
            claimed.source,
            claimed.destination,
        )
        .to_vec();
        wire.extend_from_slice(b"\x16\x03\x01 TLS follows");
        front.write_all(&wire).await.expect("write");
        assert_eq!(
            acceptor
                .accept(&mut tcp, peer, local)
                .await
                .expect("trusted"),
            claimed
        );
        let mut rest = [0u8; 15];
        tcp.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"\x16\x03\x01 TLS follows");

        // The front without a header: refused.
        let (mut front, mut tcp, peer) = pair(&listener, "127.0.0.2:0").await;
        front
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(matches!(
            acceptor.accept(&mut tcp, peer, local).await,
            Err(ProxyHeaderError::Missing(_))
        ));

        // Anyone else with a header: refused; without one: their own addresses, and
        // nothing read.
        let (mut other, mut tcp, peer) = pair(&listener, "127.0.0.1:0").await;
        other
            .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 4444 443\r\n")
            .await
            .expect("write");
        assert!(matches!(
            acceptor.accept(&mut tcp, peer, local).await,
            Err(ProxyHeaderError::Untrusted(p)) if p == peer
        ));
        let (mut other, mut tcp, peer) = pair(&listener, "127.0.0.1:0").await;
        other.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let own = acceptor
            .accept(&mut tcp, peer, local)
            .await
            .expect("served");
        assert_eq!(
            own,
            ProxiedAddrs {
                source: peer,
                destination: local
            }
        );
        let mut first = [0u8; 3];
        tcp.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"GET");
    }

    #[test]
    fn trusted_sets_parse_addresses_and_blocks() {
        let t: TrustedProxies = "127.0.0.2, 10.0.0.0/8,fd00::/8".parse().expect("valid");
        assert!(t.contains("127.0.0.2".parse().expect("ip")));
        assert!(!t.contains("127.0.0.1".parse().expect("ip")));
        assert!(t.contains("10.200.1.1".parse().expect("ip")));
        assert!(t.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(t.contains("fd00::1".parse().expect("ip")));
        assert!(!t.contains("fe80::1".parse().expect("ip")));
        assert_eq!(t.to_string(), "127.0.0.2/32,10.0.0.0/8,fd00::/8");
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0.1,nope"] {
            assert!(bad.parse::<TrustedProxies>().is_err(), "{bad:?}");
        }
    }
}
