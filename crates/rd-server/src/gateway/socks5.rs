//! SOCKS5 through an agent: `curl --socks5-hostname foo:PASSWORD@rd-server:8123 ...`,
//! `ALL_PROXY=socks5h://foo:PASSWORD@rd-server:8123`, kubectl's `proxy-url: socks5://...`.
//! The twin of [`crate::connect`] for clients that speak SOCKS5 rather than HTTP CONNECT.
//!
//! RFC 1928's CONNECT command with RFC 1929's username/password authentication: the user
//! name is the agent's client key, and the password is checked exactly as CONNECT's proxy
//! password ([`ConnectProxy::credentials`]; any password without it). Username/password is
//! the only method offered, also without credentials: it is how the client names the agent.
//! Domain names (`socks5h://`, `--socks5-hostname`) are not resolved here: the agent
//! resolves them, so names of the agent's network work. The agent's allow rules decide as
//! for any dial, and the success reply comes only once the agent's dial succeeded (with a
//! Go agent: after [`ConnectProxy::connect_wait`] without a refusal, as CONNECT's `200`).
//!
//! Replies carry the reason CONNECT would give, as SOCKS5 codes:
//!
//! | reason | code |
//! | --- | --- |
//! | no session for the agent here or at a peer (unknown agent) | `0x03` network unreachable |
//! | the agent's allow rules refused the target (`connect not allowed`) | `0x02` not allowed by ruleset |
//! | the target refused the connection at the agent | `0x05` connection refused |
//! | no verdict within [`ConnectProxy::dial_timeout`], or the agent's dial timed out | `0x06` TTL expired |
//! | the agent could not resolve the name or reach the host | `0x04` host unreachable |
//! | the agent's network is unreachable from the agent | `0x03` network unreachable |
//! | a command other than CONNECT (BIND, UDP ASSOCIATE) | `0x07` command not supported |
//! | an address type other than IPv4, domain name, IPv6 | `0x08` address type not supported |
//! | anything else (server draining, session full, bad target) | `0x01` general failure |
//!
//! A wrong password is answered with RFC 1929's failure status and the connection closed.
//! The unknown agent is `0x03` rather than `0x04`: the agent *is* the network the target is
//! in, and without it no host of that network is reachable.
//!
//! Each use is logged and counted like CONNECT's (`tunnel connection` lines and
//! `rd_tunnel_uses_total` with `origin="socks5"`; `status` is the SOCKS5 reply code).

pub mod codec;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connect::{ConnectError, ConnectProxy};
use super::proxy_protocol::ProxiedAddrs;
use super::splice::splice;
use super::tunnel_use::TunnelUse;
use crate::DialError;
use codec::{DecodeError, MAX_MESSAGE};

/// Default of [`Socks5Proxy::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// SOCKS5 reply codes (RFC 1928, section 6).
pub mod reply {
    /// Succeeded.
    pub const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired (used for timeouts).
    pub const TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Why a SOCKS5 connection was not tunnelled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    /// The connection closed before its first byte (a port probe).
    #[error("connection closed before the SOCKS5 greeting")]
    Empty,
    /// The connection closed in the middle of the handshake.
    #[error("connection closed in the SOCKS5 handshake")]
    Closed,
    /// The handshake took longer than [`Socks5Proxy::handshake_timeout`].
    #[error("SOCKS5 handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// Bytes that are not the SOCKS5 message expected.
    #[error("SOCKS5 handshake: {0}")]
    Malformed(#[from] DecodeError),
    /// The client offers no username/password authentication, which names the agent.
    #[error(
        "SOCKS5 client offers no username/password authentication (methods {0:02x?}); the \
         user name is the agent's client key (curl --socks5-hostname CLIENT:PASSWORD@host:port)"
    )]
    NoUserPassword(Vec<u8>),
    /// A command other than CONNECT.
    #[error("SOCKS5 command {0:#04x} not supported (only CONNECT, 0x01)")]
    Command(u8),
    /// Authentication or the dial failed, for the reason CONNECT gives.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Reading or writing the client's connection failed.
    #[error("SOCKS5 handshake: {0}")]
    Io(#[from] io::Error),
}

impl Socks5Error {
    /// The reply code a request failing this way is answered with; `None` when the
    /// handshake never reached a request (or failed at authentication).
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            Self::Connect(ConnectError::NoCredentials | ConnectError::BadPassword(_))
            | Self::Empty
            | Self::Closed
            | Self::HandshakeTimeout(_)
            | Self::NoUserPassword(_)
            | Self::Io(_)
            | Self::Malformed(DecodeError::Version(_))
            | Self::Malformed(DecodeError::NoMethods)
            | Self::Malformed(DecodeError::AuthVersion(_)) => None,
            Self::Malformed(DecodeError::AddressType(_)) => Some(reply::ADDRESS_TYPE_NOT_SUPPORTED),
            Self::Malformed(DecodeError::Domain) => Some(reply::GENERAL_FAILURE),
            Self::Command(_) => Some(reply::COMMAND_NOT_SUPPORTED),
            Self::Connect(e) => Some(connect_reply_code(e)),
        }
    }
}

/// The SOCKS5 reply code for a reason CONNECT gives (see the module documentation).
pub fn connect_reply_code(error: &ConnectError) -> u8 {
    match error {
        ConnectError::Dial(DialError::NoSession(_)) => reply::NETWORK_UNREACHABLE,
        ConnectError::Timeout(_) => reply::TTL_EXPIRED,
        ConnectError::Refused(text) => refusal_code(text),
        _ => reply::GENERAL_FAILURE,
    }
}

/// The code for an agent's refusal or failed dial, from its text: the Go protocol carries
/// only the text (`connect not allowed`, `dial tcp 10.0.0.1:22: connect: connection
/// refused`, ...).
fn refusal_code(text: &str) -> u8 {
    let t = text.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| t.contains(n));
    if has(&["not allowed"]) {
        reply::NOT_ALLOWED
    } else if has(&["connection refused"]) {
        reply::CONNECTION_REFUSED
    } else if has(&["timed out", "timeout"]) {
        reply::TTL_EXPIRED
    } else if has(&["network is unreachable"]) {
        reply::NETWORK_UNREACHABLE
    } else if has(&[
        "no route to host",
        "host is unreachable",
        "no such host",
        "not known",
        "failed to lookup",
        "no suitable address",
    ]) {
        reply::HOST_UNREACHABLE
    } else {
        reply::GENERAL_FAILURE
    }
}

/// Whether a plain connection speaks SOCKS5: its first byte is SOCKS5's version (5), which
/// no HTTP request or TLS handshake starts with. Peeks (the byte stays for whoever serves
/// the connection) for up to `wait`; a connection that closes first is not SOCKS5.
pub async fn is_socks5(tcp: &TcpStream, wait: Duration) -> io::Result<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(_)) => Ok(first[0] == codec::VERSION),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no first byte within {wait:?}"),
        )),
    }
}

/// Serves SOCKS5 connections by tunnelling them through the agent named in the user name.
/// It shares a [`ConnectProxy`]'s password check, connect wait and dial timeout.
#[derive(Debug, Clone)]
pub struct Socks5Proxy {
    connect: ConnectProxy,
    handshake_timeout: Duration,
}

/// What a finished handshake asks for.
struct Handshake {
    client: String,
    target: String,
    /// Bytes the client sent after its request without waiting for the reply.
    early: Vec<u8>,
}

impl Socks5Proxy {
    /// A SOCKS5 proxy that authenticates and dials as `connect` does.
    pub fn new(connect: ConnectProxy) -> Self {
        Self {
            connect,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// How long a client may take from its first byte to a complete request (default
    /// 10 s, as the HTTP listener's bound on a request head); then the connection closes.
    /// The dial after it is bounded by the [`ConnectProxy`]'s dial timeout.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Serves one SOCKS5 connection from `remote` that reached `local` (the listener's
    /// address, or what a trusted front's PROXY header named): the handshake, the dial
    /// through the agent, the reply, a PROXY header to the target when the
    /// [`ConnectProxy`] sends one ([`ConnectProxy::proxy_protocol`]), then the copy both
    /// ways until both directions end. Failures are answered as the protocol allows,
    /// logged and counted; the connection is closed.
    pub async fn serve<S>(&self, mut io: S, remote: Option<SocketAddr>, local: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let server = self.connect.server();
        let mut used = TunnelUse::start(server.metrics(), "socks5", "", String::new(), remote);
        let handshake =
            tokio::time::timeout(self.handshake_timeout, self.handshake(&mut io, &mut used))
                .await
                .unwrap_or(Err(Socks5Error::HandshakeTimeout(self.handshake_timeout)));
        let handshake = match handshake {
            Ok(h) => h,
            Err(Socks5Error::Empty) => {
                tracing::debug!(
                    remote = remote.map(tracing::field::display),
                    "SOCKS5 connection closed before a byte"
                );
                return;
            }
            Err(e) => return self.fail(io, used, &e).await,
        };
        let Handshake {
            client,
            target,
            early,
        } = handshake;
        let mut tunnel = match self.connect.dial_for(&client, &target, "socks5").await {
            Ok(tunnel) => tunnel,
            Err(e) => return self.fail(io, used, &Socks5Error::Connect(e)).await,
        };
        used.carried_by(tunnel.session_key(), tunnel.id().0);
        used.answered(u16::from(reply::SUCCEEDED));
        if let Err(e) = io.write_all(&codec::reply(reply::SUCCEEDED)).await {
            return used.ended("cut", &format!("writing the SOCKS5 reply: {e}"));
        }
        if let Some(version) = self.connect.proxy_protocol_version() {
            let addresses = remote.zip(local).map(|(source, destination)| ProxiedAddrs {
                source,
                destination,
            });
            let sent = super::proxy_protocol::write_header(&mut tunnel, version, addresses);
            if let Err(e) = sent.await {
                return used.ended("cut", &format!("sending the PROXY header: {e}"));
            }
        }
        if !early.is_empty() {
            if let Err(e) = tunnel.write_all(&early).await {
                return used.ended("cut", &rd_session::error_chain(&e));
            }
        }
        tracing::debug!(client = %crate::short_id(&client), %target, "SOCKS5 tunnel open");
        let result = splice(tunnel, used.count(io)).await;
        used.finished(&result);
    }

    /// Answers `error` as far as the protocol has a reply for it (the authentication
    /// failure was answered where it happened), closes, logs and counts.
    async fn fail<S>(&self, mut io: S, mut used: TunnelUse, error: &Socks5Error)
    where
        S: AsyncWrite + Unpin,
    {
        if let Some(code) = error.reply_code() {
            used.answered(u16::from(code));
            io.write_all(&codec::reply(code)).await.ok();
        }
        io.shutdown().await.ok();
        let outcome = match error {
            Socks5Error::Connect(ConnectError::Dial(_) | ConnectError::Refused(_))
            | Socks5Error::Connect(ConnectError::Timeout(_)) => "refused",
            _ => "rejected",
        };
        used.ended(outcome, &error.to_string());
    }

    /// Greeting, username/password, request, and the replies to the first two (a request
    /// that cannot be served is answered by [`fail`](Self::fail)).
    async fn handshake<S>(&self, io: &mut S, used: &mut TunnelUse) -> Result<Handshake, Socks5Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = Vec::with_capacity(MAX_MESSAGE);
        let greeting = match read_message(io, &mut buf, codec::decode_greeting).await {
            Err(Socks5Error::Closed) if buf.is_empty() => return Err(Socks5Error::Empty),
            other => other?,
        };
        if !greeting.methods.contains(&codec::METHOD_USER_PASSWORD) {
            io.write_all(&codec::method_reply(codec::METHOD_UNACCEPTABLE))
                .await?;
            return Err(Socks5Error::NoUserPassword(greeting.methods));
        }
        io.write_all(&codec::method_reply(codec::METHOD_USER_PASSWORD))
            .await?;
        let credentials = match read_message(io, &mut buf, codec::decode_user_password).await {
            Err(e @ Socks5Error::Malformed(_)) => {
                io.write_all(&codec::auth_reply(false)).await.ok();
                return Err(e);
            }
            other => other?,
        };
        used.named(&credentials.user);
        if let Err(e) = self
            .connect
            .authorize(&credentials.user, &credentials.password)
        {
            io.write_all(&codec::auth_reply(false)).await.ok();
            return Err(e.into());
        }
        io.write_all(&codec::auth_reply(true)).await?;
        let request = match read_message(io, &mut buf, codec::decode_request).await {
            Err(e @ Socks5Error::Malformed(DecodeError::AddressType(_) | DecodeError::Domain)) => {
                return Err(e)
            }
            other => other?,
        };
        let target = request.target();
        used.aimed_at(target.clone());
        if request.command != codec::CMD_CONNECT {
            return Err(Socks5Error::Command(request.command));
        }
        Ok(Handshake {
            client: credentials.user,
            target,
            early: buf,
        })
    }
}

/// Reads until `decode` finds a whole message at the start of `buf`; leaves what follows
/// it in `buf`. Never holds more than [`MAX_MESSAGE`] bytes.
async fn read_message<S, T>(
    io: &mut S,
    buf: &mut Vec<u8>,
    decode: fn(&[u8]) -> codec::Decoded<T>,
) -> Result<T, Socks5Error>
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0u8; MAX_MESSAGE];
    loop {
        if let Some((message, used)) = decode(buf)? {
            buf.drain(..used);
            return Ok(message);
        }
        // The codec decides within MAX_MESSAGE bytes (its tests check), so this is a bound
        // that never bites.
        let room = MAX_MESSAGE.saturating_sub(buf.len());
        if room == 0 {
            return Err(
                io::Error::new(io::ErrorKind::InvalidData, "SOCKS5 message too long").into(),
            );
        }
        let n = io.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(Socks5Error::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_reply_codes() {
        let code = |e: ConnectError| Socks5Error::Connect(e).reply_code();
        assert_eq!(
            code(ConnectError::Dial(DialError::NoSession("bar".into()))),
            Some(reply::NETWORK_UNREACHABLE)
        );
        assert_eq!(
            code(ConnectError::Dial(DialError::Draining)),
            Some(reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(ConnectError::Refused("connect not allowed".into())),
            Some(reply::NOT_ALLOWED)
        );
        assert_eq!(
            code(ConnectError::Refused(
                "dial tcp 127.0.0.1:9: connect: connection refused".into()
            )),
            Some(reply::CONNECTION_REFUSED)
        );
        assert_eq!(
            code(ConnectError::Refused(
                "dial tcp 10.0.0.1:22: i/o timeout".into()
            )),
            Some(reply::TTL_EXPIRED)
        );
        assert_eq!(
            code(ConnectError::Refused(
                "failed to lookup address information: Name or service not known".into()
            )),
            Some(reply::HOST_UNREACHABLE)
        );
        assert_eq!(
            code(ConnectError::Refused("something else".into())),
            Some(reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(ConnectError::Timeout(Duration::from_secs(1))),
            Some(reply::TTL_EXPIRED)
        );
        assert_eq!(code(ConnectError::BadPassword("foo".into())), None);
        assert_eq!(
            Socks5Error::Command(2).reply_code(),
            Some(reply::COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(
            Socks5Error::Malformed(DecodeError::AddressType(9)).reply_code(),
            Some(reply::ADDRESS_TYPE_NOT_SUPPORTED)
        );
    }
}
