//! The SOCKS5 wire format the proxy speaks (RFC 1928's greeting, CONNECT request and
//! reply; RFC 1929's username/password exchange), as pure functions over bytes.
//!
//! Each `decode_*` takes the bytes read so far and returns `Ok(None)` while a message is
//! incomplete, `Ok(Some((message, used)))` once it is whole, or why it can never be. Every
//! message is at most [`MAX_MESSAGE`] bytes, so a reader needs no more buffer than that.
//!
//! Hand-written rather than taken from a crate: the three messages are ~100 lines; the
//! server crates with wire types (socks5-server, socks5-impl) are GPL, and the MIT/Apache ones
//! (fast-socks5, async-socks5) come with their own server loop and I/O, which this proxy
//! replaces with the tunnel's dial.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The protocol version byte of RFC 1928.
pub const VERSION: u8 = 0x05;
/// The version byte of RFC 1929's username/password subnegotiation.
pub const AUTH_VERSION: u8 = 0x01;
/// Method: no authentication.
pub const METHOD_NONE: u8 = 0x00;
/// Method: username/password (RFC 1929).
pub const METHOD_USER_PASSWORD: u8 = 0x02;
/// Method reply: none of the offered methods is acceptable.
pub const METHOD_UNACCEPTABLE: u8 = 0xFF;
/// Command: CONNECT (the only one served).
pub const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// The longest message of the handshake: RFC 1929's request with a 255-byte user name and
/// a 255-byte password.
pub const MAX_MESSAGE: usize = 1 + 1 + 255 + 1 + 255;

/// Why bytes are not a valid SOCKS5 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first byte of a greeting or request is not 5.
    #[error("not SOCKS5: version byte {0:#04x}")]
    Version(u8),
    /// A greeting offering no method at all.
    #[error("SOCKS5 greeting offers no authentication method")]
    NoMethods,
    /// The username/password request's version byte is not 1.
    #[error("username/password request with version {0:#04x} (RFC 1929 wants 0x01)")]
    AuthVersion(u8),
    /// A request's address type is none of IPv4 (1), domain name (3), IPv6 (4).
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("domain name is empty or not UTF-8")]
    Domain,
}

/// A client's greeting: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The method codes, in the client's order.
    pub methods: Vec<u8>,
}

/// RFC 1929's username/password request.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPassword {
    /// The user name, lossily decoded as UTF-8.
    pub user: String,
    /// The password, lossily decoded as UTF-8.
    pub password: String,
}

impl std::fmt::Debug for UserPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPassword")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Where a request wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A domain name, resolved by whoever dials (here: the agent).
    Domain(String),
}

/// A client's request: its command and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command code (1 CONNECT, 2 BIND, 3 UDP ASSOCIATE).
    pub command: u8,
    /// The destination address.
    pub address: Address,
    /// The destination port.
    pub port: u16,
}

impl Request {
    /// The target as a dialer takes it: `host:port`, `ip:port` or `[v6]:port`.
    pub fn target(&self) -> String {
        match &self.address {
            Address::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            Address::Ip(ip) => format!("{ip}:{}", self.port),
            // Some clients send IP literals as names; an IPv6 one needs its brackets.
            Address::Domain(name) => match name.parse::<Ipv6Addr>() {
                Ok(ip) => format!("[{ip}]:{}", self.port),
                Err(_) => format!("{name}:{}", self.port),
            },
        }
    }
}

/// Decoded message and the number of bytes it took, or `None` while incomplete.
pub type Decoded<T> = Result<Option<(T, usize)>, DecodeError>;

/// `VER NMETHODS METHODS...`.
pub fn decode_greeting(buf: &[u8]) -> Decoded<Greeting> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(DecodeError::NoMethods);
    }
    let end = 2 + usize::from(n);
    Ok(buf.get(2..end).map(|methods| {
        (
            Greeting {
                methods: methods.to_vec(),
            },
            end,
        )
    }))
}

/// `VER ULEN UNAME PLEN PASSWD` (RFC 1929).
pub fn decode_user_password(buf: &[u8]) -> Decoded<UserPassword> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != AUTH_VERSION {
        return Err(DecodeError::AuthVersion(version));
    }
    let Some((user, at)) = length_prefixed(buf, 1) else {
        return Ok(None);
    };
    let Some((password, end)) = length_prefixed(buf, at) else {
        return Ok(None);
    };
    Ok(Some((
        UserPassword {
            user: String::from_utf8_lossy(user).into_owned(),
            password: String::from_utf8_lossy(password).into_owned(),
        },
        end,
    )))
}

/// `VER CMD RSV ATYP DST.ADDR DST.PORT`. The command is returned whatever it is: the
/// caller answers an unsupported one with its reply code.
pub fn decode_request(buf: &[u8]) -> Decoded<Request> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let Some(&[command, _reserved, atyp]) = buf.get(1..4) else {
        return Ok(None);
    };
    let (address, at) = match atyp {
        // `get` yields exactly the slice's length, so the conversions fail only while the
        // address is incomplete.
        ATYP_IPV4 => match buf.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            Some(octets) => (Address::Ip(Ipv4Addr::from(octets).into()), 8),
            None => return Ok(None),
        },
        ATYP_IPV6 => match buf.get(4..20).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
            Some(octets) => (Address::Ip(Ipv6Addr::from(octets).into()), 20),
            None => return Ok(None),
        },
        ATYP_DOMAIN => match length_prefixed(buf, 4) {
            Some((name, at)) => {
                let name = std::str::from_utf8(name).map_err(|_| DecodeError::Domain)?;
                if name.is_empty() {
                    return Err(DecodeError::Domain);
                }
                (Address::Domain(name.to_owned()), at)
            }
            None => return Ok(None),
        },
        other => return Err(DecodeError::AddressType(other)),
    };
    let Some(&[hi, lo]) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    Ok(Some((
        Request {
            command,
            address,
            port: u16::from_be_bytes([hi, lo]),
        },
        at + 2,
    )))
}

/// The bytes after a length byte at `at`, and where they end; `None` while incomplete.
fn length_prefixed(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let n = usize::from(*buf.get(at)?);
    let end = at + 1 + n;
    Some((buf.get(at + 1..end)?, end))
}

/// The method choice: `VER METHOD`.
pub fn method_reply(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// RFC 1929's status reply: `VER STATUS` (0 success, anything else failure).
pub fn auth_reply(success: bool) -> [u8; 2] {
    [AUTH_VERSION, u8::from(!success)]
}

/// A reply to a request with code `reply` and the bound address 0.0.0.0:0 (the agent's
/// local address is not known here, and clients doing CONNECT ignore it).
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greetings_decode_and_wait_for_their_methods() {
        assert_eq!(decode_greeting(&[]), Ok(None));
        assert_eq!(decode_greeting(&[5]), Ok(None));
        assert_eq!(decode_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(
            decode_greeting(&[5, 2, 0, 2, 9]),
            Ok(Some((
                Greeting {
                    methods: vec![0, 2]
                },
                4
            )))
        );
        assert_eq!(decode_greeting(&[4, 1, 0]), Err(DecodeError::Version(4)));
        assert_eq!(
            decode_greeting(b"GET / HTTP/1.1"),
            Err(DecodeError::Version(b'G'))
        );
        assert_eq!(decode_greeting(&[5, 0]), Err(DecodeError::NoMethods));
    }

    #[test]
    fn user_password_requests_decode() {
        let msg = [1, 3, b'f', b'o', b'o', 2, b'p', b'w'];
        for cut in 0..msg.len() {
            assert_eq!(decode_user_password(&msg[..cut]), Ok(None), "cut at {cut}");
        }
        let (up, used) = decode_user_password(&msg).unwrap().unwrap();
        assert_eq!(
            (up.user.as_str(), up.password.as_str(), used),
            ("foo", "pw", 8)
        );
        // An empty password is allowed (with no credentials configured, any is accepted).
        let (up, _) = decode_user_password(&[1, 1, b'a', 0]).unwrap().unwrap();
        assert_eq!((up.user.as_str(), up.password.as_str()), ("a", ""));
        assert_eq!(
            decode_user_password(&[5, 1, b'a', 0]),
            Err(DecodeError::AuthVersion(5))
        );
        // The password never shows in debug output (log lines).
        assert!(!format!("{up:?}").contains("password: "));
    }

    #[test]
    fn requests_decode_each_address_type() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        let (r, used) = decode_request(&v4).unwrap().unwrap();
        assert_eq!(
            (r.target(), r.command, used),
            ("127.0.0.1:8080".into(), 1, 10)
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(decode_request(&v6).unwrap().unwrap().0.target(), "[::1]:80");
        let mut name = vec![5, 1, 0, 3, 9];
        name.extend_from_slice(b"localhost");
        name.extend_from_slice(&[0, 22]);
        let (r, used) = decode_request(&name).unwrap().unwrap();
        assert_eq!((r.target(), used), ("localhost:22".into(), name.len()));
        for cut in 0..name.len() {
            assert_eq!(decode_request(&name[..cut]), Ok(None), "cut at {cut}");
        }
        let mut literal = vec![5, 1, 0, 3, 3];
        literal.extend_from_slice(b"::1");
        literal.extend_from_slice(&[0, 22]);
        assert_eq!(
            decode_request(&literal).unwrap().unwrap().0.target(),
            "[::1]:22"
        );
        // BIND is decoded: the caller refuses it with reply 7.
        let bind = [5, 2, 0, 1, 127, 0, 0, 1, 0, 1];
        assert_eq!(decode_request(&bind).unwrap().unwrap().0.command, 2);
        assert_eq!(
            decode_request(&[5, 1, 0, 9, 1, 2]),
            Err(DecodeError::AddressType(9))
        );
        assert_eq!(
            decode_request(&[5, 1, 0, 3, 0, 0, 1]),
            Err(DecodeError::Domain)
        );
        assert_eq!(
            decode_request(&[5, 1, 0, 3, 1, 0xff, 0, 1]),
            Err(DecodeError::Domain)
        );
        assert_eq!(decode_request(&[1, 1, 0, 1]), Err(DecodeError::Version(1)));
    }

    #[test]
    fn replies_encode() {
        assert_eq!(method_reply(METHOD_USER_PASSWORD), [5, 2]);
        assert_eq!(auth_reply(true), [1, 0]);
        assert_eq!(auth_reply(false), [1, 1]);
        assert_eq!(reply(0), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    proptest! {
        /// Any bytes: no panic, a whole message never claims more bytes than given or
        /// more than MAX_MESSAGE, and a prefix of a whole message is incomplete or the
        /// same error.
        #[test]
        fn arbitrary_bytes_never_panic(
            // Mostly valid version bytes and address types, so the fields behind them are
            // reached and not only the first check.
            head in (
                prop_oneof![Just(VERSION), Just(AUTH_VERSION), any::<u8>()],
                any::<u8>(),
                any::<u8>(),
                prop_oneof![Just(ATYP_IPV4), Just(ATYP_DOMAIN), Just(ATYP_IPV6), any::<u8>()],
            ),
            tail in proptest::collection::vec(any::<u8>(), 0..600),
            cut in 1usize..=4,
        ) {
            let mut buf = vec![head.0, head.1, head.2, head.3];
            buf.truncate(cut);
            buf.extend_from_slice(&tail);
            fn check<T: std::fmt::Debug>(buf: &[u8], d: impl Fn(&[u8]) -> Decoded<T>) -> Result<(), TestCaseError> {
                match d(buf) {
                    Ok(Some((_, used))) => {
                        prop_assert!(used <= buf.len() && used <= MAX_MESSAGE);
                        for cut in 0..used {
                            prop_assert!(matches!(d(&buf[..cut]), Ok(None)), "cut {}", cut);
                        }
                    }
                    Ok(None) => prop_assert!(buf.len() < MAX_MESSAGE),
                    Err(_) => {}
                }
                Ok(())
            }
            check(&buf, decode_greeting)?;
            check(&buf, decode_user_password)?;
            check(&buf, decode_request)?;
        }

        /// Well-formed requests for any domain name and port round-trip.
        #[test]
        fn domain_requests_round_trip(name in "[a-z0-9.-]{1,255}", port in any::<u16>()) {
            let mut buf = vec![5, 1, 0, 3, name.len() as u8];
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(&port.to_be_bytes());
            let (r, used) = decode_request(&buf).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(r.address, Address::Domain(name));
            prop_assert_eq!(r.port, port);
        }
    }
}
