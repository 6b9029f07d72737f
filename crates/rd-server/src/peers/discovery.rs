//! DNS peer discovery: resolve a name (e.g. a Kubernetes headless Service) every interval
//! and keep one link per address, through [`PeerSet::set_discovered`].

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tokio::time::MissedTickBehavior;

use super::PeerSet;

/// Default of [`PeerDiscovery::interval`]: 10 s.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// A lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The name has no addresses (NXDOMAIN or no A/AAAA records): a round that found no
    /// peers, for example the first replica of a headless Service.
    #[error("no addresses for {0}")]
    NotFound(String),
    /// The lookup itself failed (no answer, SERVFAIL, bad configuration); the links stay
    /// as they are until a round succeeds.
    #[error("lookup of {name} failed: {reason}")]
    Failed {
        /// The name looked up.
        name: String,
        /// The resolver's error.
        reason: String,
    },
}

/// The future of a [`Resolve::resolve`].
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Looks up the addresses of a name. [`DnsResolver`] is the real one; tests use fakes.
pub trait Resolve: Send + Sync + 'static {
    /// The name's current addresses.
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a>;
}

/// A DNS stub resolver (hickory): the system's configuration (`/etc/resolv.conf`, with its
/// search domains, as Kubernetes sets them up), or one given server.
///
/// Its cache is cleared before each lookup: the discovery interval, not the records' TTL,
/// says how fresh the peer list is.
#[derive(Clone)]
pub struct DnsResolver(Arc<TokioResolver>);

impl fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DnsResolver").finish_non_exhaustive()
    }
}

impl DnsResolver {
    /// The system's resolver configuration.
    pub fn system() -> Result<Self, ResolveError> {
        let builder = TokioResolver::builder_tokio().map_err(|e| ResolveError::Failed {
            name: "/etc/resolv.conf".into(),
            reason: e.to_string(),
        })?;
        Ok(Self(Arc::new(builder.build())))
    }

    /// Asks only `server` (UDP, then TCP for truncated answers), with no search domains.
    pub fn with_server(server: SocketAddr) -> Self {
        let group = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
        let config = ResolverConfig::from_parts(None, vec![], group);
        let builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        Self(Arc::new(builder.build()))
    }
}

impl Resolve for DnsResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            self.0.clear_cache();
            match self.0.lookup_ip(name).await {
                Ok(found) => Ok(found.iter().collect()),
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                    Err(ResolveError::NotFound(name.to_owned()))
                }
                Err(e) => Err(ResolveError::Failed {
                    name: name.to_owned(),
                    reason: e.to_string(),
                }),
            }
        })
    }
}

/// A `--peers-dns` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer discovery name {spec:?}: {reason}")]
pub struct InvalidDiscovery {
    spec: String,
    reason: &'static str,
}

/// Peer discovery through DNS: which name, how to reach each address, how often.
#[derive(Clone)]
pub struct PeerDiscovery {
    name: String,
    port: u16,
    scheme: &'static str,
    path: String,
    interval: Duration,
    resolver: Option<Arc<dyn Resolve>>,
}

impl fmt::Debug for PeerDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerDiscovery")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("scheme", &self.scheme)
            .field("path", &self.path)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for PeerDiscovery {
    type Err = InvalidDiscovery;

    /// `NAME:PORT` (peers at `ws://ADDRESS:PORT/connect`) or a URL such as
    /// `wss://NAME:PORT/v3/connect` (scheme and path for every peer).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidDiscovery {
            spec: spec.to_owned(),
            reason,
        };
        let (scheme, rest) = match spec.split_once("://") {
            Some(("ws" | "http", rest)) => ("ws", rest),
            Some(("wss" | "https", rest)) => ("wss", rest),
            Some(_) => return Err(invalid("the scheme must be ws, wss, http or https")),
            None => ("ws", spec),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/connect"),
        };
        let (name, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected NAME:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port is not a number"))?;
        if name.is_empty() || name.contains(['[', ']', '@']) {
            return Err(invalid("expected a DNS name before the port"));
        }
        Ok(Self {
            name: name.to_owned(),
            port,
            scheme,
            path: path.to_owned(),
            interval: DEFAULT_DISCOVERY_INTERVAL,
            resolver: None,
        })
    }
}

impl PeerDiscovery {
    /// The name resolved each round.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interval set with [`interval`](Self::interval).
    pub(crate) fn period(&self) -> Duration {
        self.interval
    }

    /// How often the name is resolved (default 10 s, at least 10 ms).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Resolves with `resolver` instead of the system's DNS configuration.
    #[must_use]
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self
    }

    /// The URL of the peer at `addr`.
    fn url_for(&self, addr: SocketAddr) -> String {
        format!("{}://{addr}{}", self.scheme, self.path)
    }
}

/// Resolves every interval until shutdown; a failed round leaves the links as they are.
pub(super) async fn run(set: PeerSet, discovery: PeerDiscovery) {
    let resolver: Arc<dyn Resolve> = match discovery.resolver.clone() {
        Some(r) => r,
        None => match DnsResolver::system() {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::error!(error = %e, "no DNS configuration: peer discovery stopped");
                return;
            }
        },
    };
    let shutdown = set.0.lifecycle.stopped().clone();
    let metrics = set.0.metrics.clone();
    let mut tick = tokio::time::interval(discovery.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let found = tokio::select! {
            r = resolver.resolve(&discovery.name) => r,
            () = shutdown.cancelled() => return,
        };
        let addresses: HashSet<SocketAddr> = match found {
            Ok(ips) => ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, discovery.port))
                .collect(),
            Err(ResolveError::NotFound(_)) => HashSet::new(),
            Err(e) => {
                metrics.peer_discovery_round(false);
                tracing::warn!(error = %e, "peer discovery round failed; links unchanged");
                continue;
            }
        };
        tracing::debug!(peers = addresses.len(), "peer discovery round");
        set.set_discovered(&addresses, |addr| discovery.url_for(addr));
        metrics.peer_discovery_round(true);
        set.discovery_round_done();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs() {
        let d: PeerDiscovery = "rd-server-headless.ns.svc:8123".parse().unwrap();
        assert_eq!(d.name(), "rd-server-headless.ns.svc");
        assert_eq!(
            d.url_for("10.0.0.5:8123".parse().unwrap()),
            "ws://10.0.0.5:8123/connect"
        );
        let d: PeerDiscovery = "wss://peers.example:443/v3/connect".parse().unwrap();
        assert_eq!(
            d.url_for("[fd00::1]:443".parse().unwrap()),
            "wss://[fd00::1]:443/v3/connect"
        );
        for bad in ["name", "name:port", ":8123", "ftp://name:1", "[::1]:8123"] {
            assert!(bad.parse::<PeerDiscovery>().is_err(), "{bad}");
        }
    }
}
