//! `NO_PROXY` parsing and matching with the rules of Go's `golang.org/x/net/http/httpproxy`.

use std::net::IpAddr;

/// A parsed `NO_PROXY` list, matched like Go's `httpproxy`.
///
/// Entries are comma separated, trimmed and case-insensitive:
///
/// * `*` alone disables the proxy for every host;
/// * `10.0.0.0/8`, `fd00::/8`: IP addresses in the network;
/// * `10.1.2.3`, `::1`, `10.1.2.3:8080`, `[::1]:8080`: that IP (and port);
/// * `example.com`: that host and all its subdomains; `.example.com` and `*.example.com`: only
///   subdomains; either form may end in `:port` to match only that port.
///
/// Domain entries compare names only; an IP URL is matched only by IP and network entries
/// (and by a domain entry that spells the address as text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    networks: Vec<(IpAddr, u8)>,
    ips: Vec<(IpAddr, Option<String>)>,
    domains: Vec<DomainEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DomainEntry {
    /// Always starts with a dot.
    suffix: String,
    port: Option<String>,
    /// True when the entry had no leading dot, so the domain itself matches too.
    match_host: bool,
}

impl NoProxy {
    /// Parses a `NO_PROXY` value. Malformed entries are skipped, as in Go.
    pub fn parse(value: &str) -> Self {
        let mut list = Self::default();
        for entry in value.split(',') {
            let entry = entry.trim().to_ascii_lowercase();
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                return Self {
                    all: true,
                    ..Self::default()
                };
            }
            if let Some(network) = parse_cidr(&entry) {
                list.networks.push(network);
                continue;
            }
            let (host, port) = match split_host_port(&entry) {
                Some((host, port)) => {
                    if host.is_empty() {
                        continue;
                    }
                    let host = host
                        .strip_prefix('[')
                        .and_then(|h| h.strip_suffix(']'))
                        .unwrap_or(host);
                    (host, Some(port.to_owned()))
                }
                None => (entry.as_str(), None),
            };
            if let Ok(ip) = host.parse::<IpAddr>() {
                list.ips.push((ip.to_canonical(), port));
                continue;
            }
            if host.is_empty() {
                continue;
            }
            let host = host
                .strip_prefix('*')
                .filter(|h| h.starts_with('.'))
                .unwrap_or(host);
            let (suffix, match_host) = match host.strip_prefix('.') {
                Some(_) => (host.to_owned(), false),
                None => (format!(".{host}"), true),
            };
            list.domains.push(DomainEntry {
                suffix,
                port,
                match_host,
            });
        }
        list
    }

    /// Whether `host` (no IPv6 brackets) and `port` are listed, i.e. must be reached directly.
    ///
    /// This is only the list; the loopback rule of [`ProxyEnv`](super::ProxyEnv) is separate.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim().to_ascii_lowercase();
        let port = port.to_string();
        // Go keeps an empty port in an entry like `host:` and then matches only an empty
        // request port, i.e. never; `Some("")` reproduces that.
        let port_ok = |p: &Option<String>| p.as_deref().is_none_or(|p| p == port);
        if let Ok(ip) = host.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            if self
                .networks
                .iter()
                .any(|&(net, bits)| in_network(ip, net, bits))
            {
                return true;
            }
            if self.ips.iter().any(|(i, p)| *i == ip && port_ok(p)) {
                return true;
            }
        }
        self.domains.iter().any(|d| {
            (host.ends_with(&d.suffix) || (d.match_host && host == d.suffix[1..]))
                && port_ok(&d.port)
        })
    }
}

/// Go's `net.ParseCIDR`: an IP address, `/`, and a prefix length within the address size.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    if bits.is_empty() || !bits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = bits.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((addr.to_canonical(), bits))
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let prefix_eq = |a: u128, b: u128, width: u8| {
        let shift = u32::from(width - bits);
        // A shift by the full width would overflow; /0 matches everything.
        bits == 0 || (a >> shift) == (b >> shift)
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            prefix_eq(u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(u128::from(a), u128::from(b), 128),
        _ => false,
    }
}

/// Go's `net.SplitHostPort`, minus its error details: `host:port` or `[host]:port`, where the
/// port may be empty but must be present.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let port = s[end + 1..].strip_prefix(':')?;
        let host = &s[..=end];
        if host[1..host.len() - 1].contains(['[', ']']) || port.contains([':', '[', ']']) {
            return None;
        }
        Some((host, port))
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') || host.contains(['[', ']']) || port.contains(['[', ']']) {
            return None;
        }
        Some((host, port))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn direct(list: &str, host: &str, port: u16) -> bool {
        NoProxy::parse(list).matches(host, port)
    }

    #[test]
    fn no_proxy_star() {
        assert!(direct("*", "example.com", 443));
        assert!(direct("foo, *", "10.0.0.1", 80));
        assert!(!direct("", "example.com", 443));
    }

    #[test]
    fn no_proxy_domains() {
        // Without a leading dot: the domain and its subdomains.
        assert!(direct("example.com", "example.com", 443));
        assert!(direct("example.com", "a.b.example.com", 443));
        assert!(!direct("example.com", "badexample.com", 443));
        // With a leading dot or `*.`: subdomains only.
        assert!(!direct(".example.com", "example.com", 443));
        assert!(direct(".example.com", "www.example.com", 443));
        assert!(!direct("*.example.com", "example.com", 443));
        assert!(direct("*.example.com", "www.example.com", 443));
        // Case and whitespace do not matter.
        assert!(direct("  Example.COM  ,other", "WWW.example.com", 80));
    }

    #[test]
    fn no_proxy_ports() {
        assert!(direct("example.com:8443", "example.com", 8443));
        assert!(!direct("example.com:8443", "example.com", 443));
        assert!(direct(".example.com:80", "a.example.com", 80));
        assert!(direct("10.1.2.3:8080", "10.1.2.3", 8080));
        assert!(!direct("10.1.2.3:8080", "10.1.2.3", 80));
        assert!(direct("[fd00::1]:443", "fd00::1", 443));
        assert!(!direct("[fd00::1]:443", "fd00::1", 80));
        // `host:` keeps an empty port, which never equals a real one (as in Go).
        assert!(!direct("example.com:", "example.com", 80));
    }

    #[test]
    fn no_proxy_ips_and_networks() {
        assert!(direct("10.1.2.3", "10.1.2.3", 443));
        assert!(!direct("10.1.2.3", "10.1.2.4", 443));
        assert!(direct("fd00::1", "fd00::1", 443));
        assert!(direct("10.0.0.0/8", "10.200.3.4", 443));
        assert!(!direct("10.0.0.0/8", "11.0.0.1", 443));
        assert!(direct("fd00::/8", "fd12::5", 443));
        assert!(direct("0.0.0.0/0", "192.0.2.1", 443));
        // IPv4-mapped IPv6 addresses match IPv4 entries, as with Go's net.IP.Equal.
        assert!(direct("10.1.2.3", "::ffff:10.1.2.3", 443));
        // A network entry does not match names.
        assert!(!direct("10.0.0.0/8", "example.com", 443));
        // Invalid prefix lengths fall through to a (useless) domain entry rather than an error.
        assert!(!direct("10.0.0.0/33", "10.0.0.1", 443));
    }
}
