//! Port forwards: a local listener whose every connection is dialed through an agent to a
//! fixed target, like `ssh -L` through the tunnel (`rd-server --forward
//! 127.0.0.1:2222=foo:tcp/127.0.0.1:22`).
//!
//! A forward can tell its target who connected, with a PROXY protocol header as the first
//! bytes of each connection (`...:tcp/127.0.0.1:22?proxy-protocol=v2`, or
//! [`Forward::proxy_protocol`]).
//!
//! A `udp` forward is served by
//! [`UdpForward`](super::forward_udp::UdpForward) instead.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use rd_proto::{Target, TargetError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::proxy_protocol::{ProxiedAddrs, ProxyProtocolVersion};
use super::splice::splice;
use super::tunnel_use::TunnelUse;
use crate::Server;

/// Default of [`Forward::max_connections`].
pub const DEFAULT_MAX_FORWARD_CONNECTIONS: usize = 1024;

/// A `--forward` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardSpecError {
    /// Not of the form `LISTEN=CLIENT:PROTO/ADDRESS`.
    #[error("invalid forward {0:?}: want LISTEN=CLIENT:PROTO/ADDRESS, e.g. 127.0.0.1:2222=foo:tcp/127.0.0.1:22")]
    Syntax(String),
    /// An option after `?` that is not `proxy-protocol=v1` or `proxy-protocol=v2`.
    #[error("invalid forward {spec:?}: unknown option {option:?}; the only option is proxy-protocol=v1 or proxy-protocol=v2 (after a `?`)")]
    Option {
        /// The whole value.
        spec: String,
        /// The option.
        option: String,
    },
    /// A `tcp` or `udp` target without a numeric port.
    #[error("invalid forward {0:?}: a tcp or udp address needs host:port")]
    NoPort(String),
    /// A protocol a forward cannot carry: only `tcp`, `tcp4`, `tcp6`, `unix` (stream
    /// forwards) and `udp`, `udp4`, `udp6` (datagram forwards) work.
    #[error(
        "invalid forward {spec:?}: {proto} forwards are not supported; forward tcp, unix or \
         udp targets"
    )]
    Unsupported {
        /// The whole value.
        spec: String,
        /// The protocol.
        proto: String,
    },
    /// The target does not fit the protocol.
    #[error("invalid forward {spec:?}: {error}")]
    Target {
        /// The whole value.
        spec: String,
        /// What is wrong with the target.
        error: TargetError,
    },
}

/// Where a forward listens and what it reaches: `LISTEN=CLIENT:PROTO/ADDRESS`, with options
/// after a `?`: `LISTEN=CLIENT:PROTO/ADDRESS?proxy-protocol=v1` (or `v2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The local listen address as written (`127.0.0.1:2222`, or `:2222` for every
    /// interface).
    pub listen: String,
    /// The agent's client key.
    pub client_key: String,
    /// The target on the agent's side.
    pub target: Target,
    /// The PROXY protocol header to send the target first, if any (`?proxy-protocol=v1`).
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

impl FromStr for ForwardSpec {
    type Err = ForwardSpecError;

    /// Parses `LISTEN=CLIENT:PROTO/ADDRESS[?OPTION&...]`; the address keeps any `:` and `/`
    /// of its own (`foo:unix//run/docker.sock`, `foo:tcp/[::1]:22`). Options start at the
    /// last `?` when what follows it holds a `=` (so a unix path may still contain `?`).
    fn from_str(whole: &str) -> Result<Self, Self::Err> {
        let spec = whole;
        let syntax = || ForwardSpecError::Syntax(spec.to_owned());
        let (spec_part, options) = match whole.rsplit_once('?') {
            Some((before, after)) if after.contains('=') => (before, Some(after)),
            _ => (whole, None),
        };
        let mut proxy_protocol = None;
        for option in options.into_iter().flat_map(|o| o.split('&')) {
            let bad = || ForwardSpecError::Option {
                spec: whole.to_owned(),
                option: option.to_owned(),
            };
            match option.split_once('=') {
                Some(("proxy-protocol", version)) => {
                    proxy_protocol = Some(version.parse().map_err(|_| bad())?);
                }
                _ => return Err(bad()),
            }
        }
        let (listen, rest) = spec_part.split_once('=').ok_or_else(syntax)?;
        let (client_key, rest) = rest.split_once(':').ok_or_else(syntax)?;
        let (proto, address) = rest.split_once('/').ok_or_else(syntax)?;
        if listen.is_empty() || client_key.is_empty() || proto.is_empty() || address.is_empty() {
            return Err(syntax());
        }
        let has_port = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !matches!(proto, "tcp" | "tcp4" | "tcp6" | "unix") && !rd_session::is_udp(proto) {
            return Err(ForwardSpecError::Unsupported {
                spec: spec.to_owned(),
                proto: proto.to_owned(),
            });
        }
        if (proto.starts_with("tcp") || rd_session::is_udp(proto)) && !has_port {
            // Caught here rather than as every connection's dial error on the agent.
            return Err(ForwardSpecError::NoPort(spec.to_owned()));
        }
        let target = Target::new(proto, address).map_err(|error| ForwardSpecError::Target {
            spec: spec.to_owned(),
            error,
        })?;
        Ok(Self {
            listen: listen.to_owned(),
            client_key: client_key.to_owned(),
            target,
            proxy_protocol,
        })
    }
}

impl ForwardSpec {
    /// Whether the target is `udp`, `udp4` or `udp6`: a datagram forward, served by
    /// [`UdpForward`](super::forward_udp::UdpForward) on a UDP socket.
    pub fn is_udp(&self) -> bool {
        rd_session::is_udp(self.target.proto())
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}:{}/{}",
            self.listen,
            self.client_key,
            self.target.proto(),
            self.target.address()
        )?;
        match self.proxy_protocol {
            Some(version) => write!(f, "?proxy-protocol={version}"),
            None => Ok(()),
        }
    }
}

/// A port forward to configure and [`spawn`](Self::spawn).
#[derive(Debug, Clone)]
pub struct Forward {
    server: Server,
    spec: ForwardSpec,
    max_connections: usize,
    proxy_protocol: Option<ProxyProtocolVersion>,
}

impl Forward {
    /// A forward of `spec` through `server`'s tunnels (with the spec's PROXY protocol
    /// option).
    pub fn new(server: Server, spec: ForwardSpec) -> Self {
        Self {
            server,
            proxy_protocol: spec.proxy_protocol,
            spec,
            max_connections: DEFAULT_MAX_FORWARD_CONNECTIONS,
        }
    }

    /// Sends each connection's target a PROXY protocol header of `version` before the
    /// user's first byte: source the user's address, destination the address the user
    /// connected to (the forward's listener). The header is the first payload of the tunnel
    /// stream, so any agent carries it (Go's too); the target must expect it, or it reads
    /// the header as the start of the user's data. `None` (the default) sends none.
    pub fn proxy_protocol(mut self, version: Option<ProxyProtocolVersion>) -> Self {
        self.proxy_protocol = version;
        self
    }

    /// Connections carried at once (default 1024); beyond it the listener stops accepting
    /// until one ends, so further connections wait in the kernel's backlog.
    pub fn max_connections(mut self, limit: usize) -> Self {
        self.max_connections = limit.max(1);
        self
    }

    /// Serves `listener` (bound to the spec's listen address by the caller) until the
    /// returned handle is stopped or dropped, or the server shuts down.
    pub fn spawn(self, listener: TcpListener) -> ForwardHandle {
        let cancel = self.server.shutdown_token();
        let tracker = TaskTracker::new();
        let local_addr = listener.local_addr().ok();
        let span = tracing::info_span!(parent: None, "forward", forward = %self.spec);
        tracker
            .spawn(accept_loop(self, listener, cancel.clone(), tracker.clone()).instrument(span));
        ForwardHandle {
            local_addr,
            cancel,
            tracker,
        }
    }
}

/// A running forward. Dropping it stops the forward as [`stop`](Self::stop) does, without
/// waiting.
#[derive(Debug)]
pub struct ForwardHandle {
    local_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ForwardHandle {
    /// A handle on a forward's tasks (the UDP forward's too).
    pub(crate) fn new(
        local_addr: Option<SocketAddr>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            local_addr,
            cancel,
            tracker,
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Tasks still running: the accept loop and one per carried connection.
    pub fn tasks(&self) -> usize {
        self.tracker.len()
    }

    /// Closes the listener and every connection it carries, and waits for their tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for ForwardHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

async fn accept_loop(
    forward: Forward,
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(forward.max_connections));
    let dialer = forward
        .server
        .dialer(&forward.spec.client_key)
        .labeled("forward");
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_closed) => return,
            },
            () = cancel.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = cancel.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: a pause, not a busy loop.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        };
        tcp.set_nodelay(true).ok();
        let (dialer, target, cancel) =
            (dialer.clone(), forward.spec.target.clone(), cancel.clone());
        let proxy_header = forward.proxy_protocol.map(|version| {
            let addresses = tcp.local_addr().ok().map(|local| ProxiedAddrs {
                source: peer,
                destination: local,
            });
            (version, addresses)
        });
        let used = TunnelUse::start(
            forward.server.metrics(),
            "forward",
            &forward.spec.client_key,
            format!("{}/{}", target.proto(), target.address()),
            Some(peer),
        );
        let span = tracing::debug_span!("connection", %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                let mut used = used;
                let mut tunnel = match dialer.dial_target(target).await {
                    Ok(tunnel) => tunnel,
                    // Dropping `tcp` closes the connection at once.
                    Err(e) => return used.ended("refused", &e.to_string()),
                };
                if let Some((version, addresses)) = proxy_header {
                    let sent = super::proxy_protocol::write_header(&mut tunnel, version, addresses);
                    if let Err(e) = sent.await {
                        return used.ended("cut", &format!("sending the PROXY header: {e}"));
                    }
                }
                used.carried_by(tunnel.session_key(), tunnel.id().0);
                tokio::select! {
                    r = splice(tunnel, used.count(tcp)) => used.finished(&r),
                    () = cancel.cancelled() => used.ended("stopped", "the forward stopped"),
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let spec: ForwardSpec = "127.0.0.1:2222=foo:tcp/127.0.0.1:22"
            .parse()
            .expect("valid");
        assert_eq!(spec.listen, "127.0.0.1:2222");
        assert_eq!(spec.client_key, "foo");
        assert_eq!(
            (spec.target.proto(), spec.target.address()),
            ("tcp", "127.0.0.1:22")
        );
        assert_eq!(spec.to_string(), "127.0.0.1:2222=foo:tcp/127.0.0.1:22");
        let unix: ForwardSpec = ":2375=bar:unix//var/run/docker.sock"
            .parse()
            .expect("valid");
        assert_eq!(unix.target.address(), "/var/run/docker.sock");
        let v6: ForwardSpec = "[::1]:2222=foo:tcp/[::1]:22".parse().expect("valid");
        assert_eq!(v6.listen, "[::1]:2222");
    }

    #[test]
    fn proxy_protocol_option_parses_and_prints_back() {
        let spec: ForwardSpec = "127.0.0.1:2222=foo:tcp/127.0.0.1:22?proxy-protocol=v2"
            .parse()
            .expect("valid");
        assert_eq!(spec.proxy_protocol, Some(ProxyProtocolVersion::V2));
        assert_eq!(spec.target.address(), "127.0.0.1:22");
        assert_eq!(
            spec.to_string(),
            "127.0.0.1:2222=foo:tcp/127.0.0.1:22?proxy-protocol=v2"
        );
        let plain: ForwardSpec = "127.0.0.1:2222=foo:tcp/127.0.0.1:22"
            .parse()
            .expect("valid");
        assert_eq!(plain.proxy_protocol, None);
        // A `?` without `=` after it belongs to a unix path.
        let unix: ForwardSpec = ":1=bar:unix//tmp/a?b".parse().expect("valid");
        assert_eq!(
            (unix.target.address(), unix.proxy_protocol),
            ("/tmp/a?b", None)
        );
        let unix: ForwardSpec = ":1=bar:unix//tmp/a?b?proxy-protocol=v1"
            .parse()
            .expect("valid");
        assert_eq!(
            (unix.target.address(), unix.proxy_protocol),
            ("/tmp/a?b", Some(ProxyProtocolVersion::V1))
        );
        for bad in [
            "127.0.0.1:2222=foo:tcp/127.0.0.1:22?proxy-protocol=v3",
            "127.0.0.1:2222=foo:tcp/127.0.0.1:22?proxy=v1",
            "127.0.0.1:2222=foo:tcp/127.0.0.1:22?proxy-protocol=v1&x=y",
        ] {
            let err = bad.parse::<ForwardSpec>().expect_err(bad);
            assert!(err.to_string().contains("proxy-protocol=v1"), "{err}");
        }
    }

    #[test]
    fn bad_specs_say_what_is_wanted() {
        for bad in [
            "127.0.0.1:2222",
            "127.0.0.1:2222=foo",
            "127.0.0.1:2222=foo:tcp",
            "=foo:tcp/127.0.0.1:22",
            "127.0.0.1:2222=:tcp/127.0.0.1:22",
            "127.0.0.1:2222=foo:/127.0.0.1:22",
        ] {
            let err = bad.parse::<ForwardSpec>().expect_err(bad);
            assert!(
                err.to_string().contains("LISTEN=CLIENT:PROTO/ADDRESS"),
                "{err}"
            );
        }
        let udp: ForwardSpec = "127.0.0.1:5353=foo:udp/127.0.0.1:53".parse().expect("udp");
        assert!(udp.is_udp());
        let no_port = "127.0.0.1:5353=foo:udp/127.0.0.1"
            .parse::<ForwardSpec>()
            .expect_err("udp needs a port");
        assert!(no_port.to_string().contains("needs host:port"), "{no_port}");
        let sctp = "127.0.0.1:5353=foo:sctp/127.0.0.1:53"
            .parse::<ForwardSpec>()
            .expect_err("sctp is refused at start-up");
        assert!(
            sctp.to_string().contains("sctp forwards are not supported"),
            "{sctp}"
        );
    }
}
