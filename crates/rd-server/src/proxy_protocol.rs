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
//! from a socket (not one byte past the header: what follows is TLS or HTTP) and the trust.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::log_limit::LogLimit;

/// Longest v1 header, `\r\n` included (the specification's bound).
pub const V1_MAX_LENGTH: usize = 107;

/// Longest v2 header [`read_header`] takes, the 16 fixed bytes included. Addresses take at
/// most 216 bytes (unix); the rest is room for a front's TLVs (AWS and Azure send an
/// endpoint id, a few dozen bytes), which are read and ignored. The format allows 64 KiB;
/// a longer header is refused rather than buffered.
pub const V2_MAX_LENGTH: usize = 4096;

/// Default of [`ProxyProtocolAcceptor::timeout`]: a front sends its header at once, with or
/// before the client's first bytes.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The first 6 bytes of every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

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

/// Why no PROXY header was taken from a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The connection failed or ended before the header was complete.
    #[error("connection ended or failed before a complete PROXY header: {0}")]
    Io(#[from] io::Error),
    /// The header was not complete within the time allowed.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The first bytes are not a PROXY header (`PROXY ` or the v2 signature).
    #[error("no PROXY header: the connection starts with {0:?}")]
    Missing(String),
    /// Longer than this reader takes ([`V1_MAX_LENGTH`], [`V2_MAX_LENGTH`]).
    #[error("PROXY {version} header longer than {max} bytes")]
    TooLong {
        /// The header's version.
        version: ProxyProtocolVersion,
        /// The bound.
        max: usize,
    },
    /// A header that does not parse.
    #[error("invalid PROXY {version} header: {reason}")]
    Invalid {
        /// The header's version.
        version: ProxyProtocolVersion,
        /// What is wrong, in `ppp`'s words.
        reason: String,
    },
    /// A header from an address that may not send one.
    #[error("PROXY header from {0}, which is not a trusted front (--proxy-protocol-from)")]
    Untrusted(SocketAddr),
}

/// Reads one PROXY header (v1 or v2) from the start of `io`, and not one byte more: what
/// follows (TLS, HTTP) is left to read. Gives up after `timeout`; bounded in memory by
/// [`V2_MAX_LENGTH`]. A v1 header is read a byte at a time up to its `\r\n` (at most 107
/// reads; only trusted fronts are read from), a v2 one in three reads.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    tokio::time::timeout(timeout, read_untimed(io))
        .await
        .map_err(|_elapsed| ProxyHeaderError::Timeout(timeout))?
}

async fn read_untimed<S: AsyncRead + Unpin>(io: &mut S) -> Result<ProxyHeader, ProxyHeaderError> {
    // Six bytes decide the version: both kinds are at least 15 bytes long.
    let mut buf = vec![0u8; V1_PREFIX.len()];
    io.read_exact(&mut buf).await?;
    if buf == V1_PREFIX {
        while !buf.ends_with(b"\r\n") {
            if buf.len() == V1_MAX_LENGTH {
                return Err(ProxyHeaderError::TooLong {
                    version: ProxyProtocolVersion::V1,
                    max: V1_MAX_LENGTH,
                });
            }
            buf.push(io.read_u8().await?);
        }
        return parse_v1(&buf);
    }
    if buf != V2_SIGNATURE[..V1_PREFIX.len()] {
        return Err(ProxyHeaderError::Missing(
            String::from_utf8_lossy(&buf).into_owned(),
        ));
    }
    buf.resize(16, 0);
    io.read_exact(&mut buf[V1_PREFIX.len()..]).await?;
    if buf[..12] != V2_SIGNATURE[..] {
        return Err(ProxyHeaderError::Missing(
            String::from_utf8_lossy(&buf).into_owned(),
        ));
    }
    let length = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if length > V2_MAX_LENGTH {
        return Err(ProxyHeaderError::TooLong {
            version: ProxyProtocolVersion::V2,
            max: V2_MAX_LENGTH,
        });
    }
    buf.resize(length, 0);
    io.read_exact(&mut buf[16..]).await?;
    parse_v2(&buf)
}

fn parse_v1(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let header = ppp::v1::Header::try_from(bytes).map_err(|e| ProxyHeaderError::Invalid {
        version: ProxyProtocolVersion::V1,
        reason: e.to_string(),
    })?;
    let addresses = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(ProxiedAddrs {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(ProxiedAddrs {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(ProxyHeader {
        version: ProxyProtocolVersion::V1,
        addresses,
    })
}

fn parse_v2(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|e| ProxyHeaderError::Invalid {
        version: ProxyProtocolVersion::V2,
        reason: e.to_string(),
    })?;
    // LOCAL: the front speaking for itself (a health check); its addresses mean nothing.
    let addresses = match (header.command, header.addresses) {
        (Command::Local, _) => None,
        (Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some(ProxiedAddrs {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        (Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some(ProxiedAddrs {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        (Command::Proxy, ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_)) => None,
    };
    Ok(ProxyHeader {
        version: ProxyProtocolVersion::V2,
        addresses,
    })
}

/// Whether `bytes`, a connection's first bytes, start like a PROXY header.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        let n = bytes.len().min(prefix.len());
        n > 0 && bytes[..n] == prefix[..n]
    };
    // A lone `P` or `\r` could start anything; five bytes of either are a header.
    bytes.len() >= 5 && (starts(V1_PREFIX) || starts(V2_SIGNATURE))
}

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

/// The address a request's connection was made to: the listener's, or the destination in a
/// trusted front's PROXY header. A server loop inserts it into each request's extensions
/// beside [`RemoteAddr`](crate::RemoteAddr); the CONNECT proxy sends it onwards as the
/// destination of its own PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn malformed_truncated_and_oversized_headers_are_errors() {
        // Not a header at all: HTTP and TLS.
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n").await,
            Err(ProxyHeaderError::Missing(_))
        ));
        assert!(matches!(
            read(&[0x16, 3, 1, 0, 0xa5, 1, 0, 0]).await,
            Err(ProxyHeaderError::Missing(_))
        ));
        // Truncated: the connection ends inside the header.
        for cut in [
            b"PROX".as_slice(),
            b"PROXY TCP4 1.2.3.4",
            &V2_SIGNATURE[..10],
        ] {
            assert!(
                matches!(read(cut).await, Err(ProxyHeaderError::Io(_))),
                "{cut:?}"
            );
        }
        let v2 = encode(
            ProxyProtocolVersion::V2,
            addr("1.2.3.4:1"),
            addr("5.6.7.8:2"),
        );
        for cut in [14, 16, 27] {
            assert!(
                matches!(read(&v2[..cut]).await, Err(ProxyHeaderError::Io(_))),
                "{cut}"
            );
        }
        // Invalid.
        for bad in [
            b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n".as_slice(),
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY \xff\xfe\r\n",
        ] {
            assert!(
                matches!(read(bad).await, Err(ProxyHeaderError::Invalid { .. })),
                "{bad:?}"
            );
        }
        let mut version3 = v2.to_vec();
        version3[12] = 0x31;
        assert!(matches!(
            read(&version3).await,
            Err(ProxyHeaderError::Invalid { .. })
        ));
        // A v2 length too short for its addresses.
        let mut short = v2.to_vec();
        short[15] = 4;
        assert!(matches!(
            read(&short).await,
            Err(ProxyHeaderError::Invalid { .. })
        ));
        // Oversized: a v1 line without its end, a v2 length past the bound. Neither is
        // read to its end.
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            read(&long).await,
            Err(ProxyHeaderError::TooLong {
                version: ProxyProtocolVersion::V1,
                ..
            })
        ));
        let mut huge = v2.to_vec();
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            read(&huge).await,
            Err(ProxyHeaderError::TooLong {
                version: ProxyProtocolVersion::V2,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn v2_tlvs_are_read_and_ignored() {
        let with_tlv = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (addr("203.0.113.7:4444"), addr("10.0.0.1:443")),
        )
        .write_tlv(0xEA, &[7; 40])
        .expect("tlv")
        .build()
        .expect("header");
        let mut wire = with_tlv.clone();
        wire.push(b'!');
        let mut io = &wire[..];
        let header = read_header(&mut io, Duration::from_secs(5))
            .await
            .expect("valid");
        assert_eq!(
            header.addresses.expect("addresses").source,
            addr("203.0.113.7:4444")
        );
        assert_eq!(io, b"!");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs.write_all(b"PROXY TCP4 ").await.expect("write");
        let e = read_header(&mut ours, Duration::from_millis(50)).await;
        assert!(matches!(e, Err(ProxyHeaderError::Timeout(_))), "{e:?}");
        drop(theirs);
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

    #[test]
    fn versions_parse() {
        assert_eq!("v1".parse(), Ok(ProxyProtocolVersion::V1));
        assert_eq!("V2".parse(), Ok(ProxyProtocolVersion::V2));
        assert_eq!("2".parse(), Ok(ProxyProtocolVersion::V2));
        assert!("v3".parse::<ProxyProtocolVersion>().is_err());
    }

    #[test]
    fn first_bytes_that_look_like_headers() {
        assert!(looks_like_header(b"PROXY TCP4 1.2.3.4"));
        assert!(looks_like_header(b"PROXY"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(!looks_like_header(b"GET / HTTP/1.1"));
        assert!(!looks_like_header(b"PROX"));
        assert!(!looks_like_header(&[0x16, 3, 1, 0, 0xa5]));
        assert!(!looks_like_header(&[5, 1, 0]));
    }
}
