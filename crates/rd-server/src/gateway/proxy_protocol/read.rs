//! Reading a PROXY header from the start of a connection: exactly the header's bytes,
//! bounded in length and time.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::Command;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{ProxiedAddrs, ProxyHeader, ProxyProtocolVersion};

/// Longest v1 header, `\r\n` included (the specification's bound).
pub const V1_MAX_LENGTH: usize = 107;

/// Longest v2 header [`read_header`] takes, the 16 fixed bytes included. Addresses take at
/// most 216 bytes (unix); the rest is room for a front's TLVs (AWS and Azure send an
/// endpoint id, a few dozen bytes), which are read and ignored. The format allows 64 KiB;
/// a longer header is refused rather than buffered.
pub const V2_MAX_LENGTH: usize = 4096;

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The first 6 bytes of every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

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

#[cfg(test)]
mod tests {
    use super::super::encode;
    use super::*;
    use ppp::v2::{Builder, Protocol, Version};
    use tokio::io::AsyncWriteExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    async fn read(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
        let mut io = bytes;
        read_header(&mut io, Duration::from_secs(5)).await
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
