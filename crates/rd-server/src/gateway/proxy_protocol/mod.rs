//! HAProxy's PROXY protocol, v1 (text) and v2 (binary): the header a proxy sends as the first
//! bytes of a TCP connection to say whose connection it is.
//!
//! rd uses it both ways:
//! - **Sending**: a forward ([`Forward::proxy_protocol`](crate::forward::Forward::proxy_protocol))
//!   or the CONNECT proxy ([`ConnectProxy::proxy_protocol`](crate::connect::ConnectProxy::proxy_protocol))
//!   writes a header into the tunnel stream before any byte of the user's, so the target
//!   behind the agent sees the user's address instead of the agent's. The header is payload
//!   to the tunnel: the agent needs no support for it (Go agents too).
//! - **Accepting**: a [`ProxyProtocolAcceptor`] reads the header a trusted front (a load
//!   balancer in front of rd-server) sends, so that the user's address, not the front's,
//!   is the [`RemoteAddr`](crate::RemoteAddr) logs, authorization and the headers sent
//!   onwards see. Only addresses in its [`TrustedProxies`] may send one: a header is a
//!   claim anyone can write, and believing it from anyone would let every client choose the
//!   address it is logged and judged by.
//!
//! The wire format is the `ppp` crate's; this module adds the exact, bounded, timed read
//! from a socket (not one byte past the header: what follows is TLS or HTTP; `read.rs`) and
//! the trust (`front.rs`).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use bytes::Bytes;
use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
use tokio::io::{AsyncWrite, AsyncWriteExt};

mod front;
mod read;

pub use front::{
    InvalidTrustedProxy, ProxyProtocolAcceptor, TrustedProxies, DEFAULT_HEADER_TIMEOUT,
};
pub use read::{looks_like_header, read_header, ProxyHeaderError, V1_MAX_LENGTH, V2_MAX_LENGTH};

/// Which PROXY protocol version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocolVersion {
    /// Text: `PROXY TCP4 203.0.113.7 10.0.0.5 4444 443\r\n`. Every PROXY-aware server
    /// reads it (nginx, HAProxy, Postfix, ...).
    V1,
    /// Binary, 28 bytes for IPv4 and 52 for IPv6; cheaper to parse, and what newer
    /// targets (and AWS/GCP load balancers) prefer.
    V2,
}

/// A protocol version that is neither `v1` nor `v2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown PROXY protocol version {0:?}: want v1 or v2")]
pub struct UnknownVersion(pub String);

impl FromStr for ProxyProtocolVersion {
    type Err = UnknownVersion;

    /// `v1` or `v2` (also `1`, `2`, any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(Self::V1),
            "v2" | "2" => Ok(Self::V2),
            _ => Err(UnknownVersion(s.to_owned())),
        }
    }
}

impl fmt::Display for ProxyProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// The two ends of a proxied connection: who connected (`source`) to which address
/// (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddrs {
    /// The user's address.
    pub source: SocketAddr,
    /// The address the user connected to.
    pub destination: SocketAddr,
}

/// A PROXY header, as read or to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Its version.
    pub version: ProxyProtocolVersion,
    /// The addresses it carries; `None` for a header without (v1 `UNKNOWN`, v2 `LOCAL`,
    /// which fronts send for their own health checks, or a unix-socket v2 header): the
    /// connection's own addresses then stand.
    pub addresses: Option<ProxiedAddrs>,
}

impl ProxyHeader {
    /// The header's bytes. Addresses of different families are both written as IPv6 (an
    /// IPv4 one mapped, `::ffff:a.b.c.d`): a header has one family.
    pub fn encode(&self) -> Bytes {
        let addresses = self.addresses.map(|a| same_family(a.source, a.destination));
        match self.version {
            ProxyProtocolVersion::V1 => {
                let text = match addresses {
                    Some(pair) => ppp::v1::Addresses::from(pair).to_string(),
                    None => ppp::v1::Addresses::Unknown.to_string(),
                };
                Bytes::from(text)
            }
            ProxyProtocolVersion::V2 => {
                let built = match addresses {
                    Some(pair) => Builder::with_addresses(
                        Version::Two | Command::Proxy,
                        Protocol::Stream,
                        pair,
                    )
                    .build(),
                    None => Builder::new(
                        Version::Two | Command::Local,
                        AddressFamily::Unspecified | Protocol::Unspecified,
                    )
                    .build(),
                };
                // ppp only fails a header whose payload exceeds 64 KiB; ours is at most 36
                // bytes of addresses.
                Bytes::from(built.expect("a v2 header of IP addresses fits its length field"))
            }
        }
    }
}

/// The bytes of a PROXY header of `version` saying that `source` connected to
/// `destination`.
pub fn encode(version: ProxyProtocolVersion, source: SocketAddr, destination: SocketAddr) -> Bytes {
    ProxyHeader {
        version,
        addresses: Some(ProxiedAddrs {
            source,
            destination,
        }),
    }
    .encode()
}

/// Writes a header of `version` as the first bytes of `stream` (a tunnel stream, before
/// it is spliced to the user's connection): `addresses` when known, else the header that
/// says "no addresses" (v1 `UNKNOWN`, v2 `LOCAL`). For SOCKS5 and other gateways that
/// carry a user's connection to a target, as [`Forward`](crate::forward::Forward) and
/// [`ConnectProxy`](crate::connect::ConnectProxy) do.
pub async fn write_header<W: AsyncWrite + Unpin>(
    stream: &mut W,
    version: ProxyProtocolVersion,
    addresses: Option<ProxiedAddrs>,
) -> io::Result<()> {
    let header = ProxyHeader { version, addresses }.encode();
    stream.write_all(&header).await?;
    stream.flush().await
}

/// Both addresses in one family: IPv6 (an IPv4 address mapped) when they differ.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// The address a request's connection was made to: the listener's, or the destination in a
/// trusted front's PROXY header. A server loop inserts it into each request's extensions
/// beside [`RemoteAddr`](crate::RemoteAddr); the CONNECT proxy sends it onwards as the
/// destination of its own PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    async fn read(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
        let mut io = bytes;
        read_header(&mut io, Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn encoded_headers_read_back_and_leave_the_payload() {
        for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
            for (src, dst) in [
                ("203.0.113.7:4444", "127.0.0.1:8123"),
                ("[2001:db8::7]:4444", "[::1]:8123"),
                // Mixed families become IPv6.
                ("203.0.113.7:4444", "[::1]:8123"),
            ] {
                let (src, dst) = (addr(src), addr(dst));
                let mut wire = encode(version, src, dst).to_vec();
                wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let mut io = &wire[..];
                let header = read_header(&mut io, Duration::from_secs(5))
                    .await
                    .expect("valid header");
                assert_eq!(header.version, version);
                let got = header.addresses.expect("addresses");
                assert_eq!(same_family(src, dst), (got.source, got.destination));
                assert_eq!(io, b"GET / HTTP/1.1\r\n", "{version}: read past the header");
            }
        }
    }

    #[test]
    fn v1_text_is_the_specifications() {
        let header = encode(
            ProxyProtocolVersion::V1,
            addr("203.0.113.7:4444"),
            addr("127.0.0.1:8123"),
        );
        assert_eq!(
            &header[..],
            b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 8123\r\n"
        );
        assert_eq!(
            encode(
                ProxyProtocolVersion::V2,
                addr("1.2.3.4:1"),
                addr("5.6.7.8:2")
            )
            .len(),
            28
        );
    }

    #[tokio::test]
    async fn headers_without_addresses_keep_the_connections() {
        let unknown = ProxyHeader {
            version: ProxyProtocolVersion::V1,
            addresses: None,
        };
        assert_eq!(&unknown.encode()[..], b"PROXY UNKNOWN\r\n");
        assert_eq!(read(b"PROXY UNKNOWN\r\n").await.expect("valid"), unknown);
        let local = ProxyHeader {
            version: ProxyProtocolVersion::V2,
            addresses: None,
        };
        assert_eq!(read(&local.encode()).await.expect("valid"), local);
    }

    #[test]
    fn versions_parse() {
        assert_eq!("v1".parse(), Ok(ProxyProtocolVersion::V1));
        assert_eq!("V2".parse(), Ok(ProxyProtocolVersion::V2));
        assert_eq!("2".parse(), Ok(ProxyProtocolVersion::V2));
        assert!("v3".parse::<ProxyProtocolVersion>().is_err());
    }
}
