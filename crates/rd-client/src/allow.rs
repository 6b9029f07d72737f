//! Which targets the server may reach through this client (Go's `ConnectAuthorizer`).

use std::fmt;
use std::str::FromStr;

use rd_proto::Target;

/// Decides whether a Connect from the server may be dialed. Closures
/// `Fn(&Target) -> bool` implement it.
pub trait ConnectAuthorizer: Send + Sync + 'static {
    /// Whether `target` may be dialed.
    fn allow(&self, target: &Target) -> bool;
}

impl<F: Fn(&Target) -> bool + Send + Sync + 'static> ConnectAuthorizer for F {
    fn allow(&self, target: &Target) -> bool {
        self(target)
    }
}

/// Allows everything (what Go's example client does). Say so explicitly: the library's
/// default is [`DenyAll`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl ConnectAuthorizer for AllowAll {
    fn allow(&self, _target: &Target) -> bool {
        true
    }
}

/// Allows nothing; every Connect is answered `connect not allowed`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

impl ConnectAuthorizer for DenyAll {
    fn allow(&self, _target: &Target) -> bool {
        false
    }
}

/// One `proto:address` rule; `*` in the address matches any run of characters, and proto
/// `tcp` also covers `tcp4` and `tcp6`. A tcp or udp rule's host may be a CIDR block
/// (`tcp:127.0.0.0/8:*`, `tcp:[fd00::]/8:443`), which matches the IP addresses in it.
/// Examples: `tcp:127.0.0.1:*`, `tcp:*:443`, `tcp:10.0.0.0/8:22`,
/// `unix:/var/run/docker.sock`, `*:*` (everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    proto: String,
    address: String,
    /// The host as a CIDR block, and the port pattern after it.
    cidr: Option<(ipnet::IpNet, String)>,
}

/// An allow rule that does not parse, or that could never match a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllowRuleError {
    /// Not `proto:address`.
    #[error("invalid allow rule {0:?}: want proto:address, e.g. tcp:127.0.0.1:* or unix:/var/run/docker.sock")]
    Syntax(String),
    /// A tcp or udp rule without a port: targets are always `host:port`, so it would
    /// match nothing.
    #[error("invalid allow rule {0:?}: a {1} target is host:port, so this rule would never match; add the port, e.g. {0}:*")]
    NoPort(String, String),
    /// A host with a `/` that is not a CIDR block.
    #[error("invalid allow rule {rule:?}: {host:?} is not a CIDR block ({error}); e.g. 127.0.0.0/8 or [fd00::]/8")]
    Cidr {
        /// The rule.
        rule: String,
        /// Its host.
        host: String,
        /// Why the block does not parse.
        error: String,
    },
}

/// Whether a protocol's targets are `host:port`.
fn has_ports(proto: &str) -> bool {
    proto.starts_with("tcp") || proto.starts_with("udp")
}

impl FromStr for AllowRule {
    type Err = AllowRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((proto, address)) = s
            .split_once(':')
            .filter(|(p, a)| !p.is_empty() && !a.is_empty())
        else {
            return Err(AllowRuleError::Syntax(s.to_owned()));
        };
        let mut cidr = None;
        if has_ports(proto) {
            // `host:port`; a bracketed IPv6 host keeps its colons. A `*` can stand for the
            // port (`tcp:*` is every tcp target).
            let split = address
                .rsplit_once(':')
                .filter(|(h, p)| !h.is_empty() && !p.is_empty() && !p.ends_with(']'));
            let (host, port) = match split {
                Some(parts) => parts,
                None if address.contains('*') => (address, "*"),
                None => return Err(AllowRuleError::NoPort(s.to_owned(), proto.to_owned())),
            };
            if host.contains('/') {
                let bare = host.replace(['[', ']'], "");
                let net = bare
                    .parse::<ipnet::IpNet>()
                    .map_err(|e| AllowRuleError::Cidr {
                        rule: s.to_owned(),
                        host: host.to_owned(),
                        error: e.to_string(),
                    })?;
                cidr = Some((net, port.to_owned()));
            }
        }
        Ok(Self {
            proto: proto.to_owned(),
            address: address.to_owned(),
            cidr,
        })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.address)
    }
}

impl AllowRule {
    /// Whether the rule admits `target`.
    pub fn matches(&self, target: &Target) -> bool {
        let proto_ok = match self.proto.as_str() {
            "*" => true,
            "tcp" => matches!(target.proto(), "tcp" | "tcp4" | "tcp6"),
            p => p == target.proto(),
        };
        if !proto_ok {
            return false;
        }
        match &self.cidr {
            None => glob(self.address.as_bytes(), target.address().as_bytes()),
            Some((net, port)) => target
                .address()
                .rsplit_once(':')
                .and_then(|(host, p)| {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let ip = host.parse::<std::net::IpAddr>().ok()?;
                    Some(net.contains(&ip) && glob(port.as_bytes(), p.as_bytes()))
                })
                .unwrap_or(false),
        }
    }
}

/// A list of rules; a target is allowed if any rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowRules(pub Vec<AllowRule>);

impl ConnectAuthorizer for AllowRules {
    fn allow(&self, target: &Target) -> bool {
        self.0.iter().any(|r| r.matches(target))
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((bp, bt)) = backtrack {
            p = bp + 1;
            t = bt + 1;
            backtrack = Some((bp, bt + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(proto: &str, addr: &str) -> Target {
        Target::new(proto, addr).expect("valid")
    }

    #[test]
    fn rules_match_like_the_docs_say() {
        let rules = AllowRules(
            ["tcp:127.0.0.1:*", "unix:/var/run/docker.sock", "tcp:*:443"]
                .iter()
                .map(|r| r.parse().expect("valid rule"))
                .collect(),
        );
        assert!(rules.allow(&t("tcp", "127.0.0.1:8125")));
        assert!(rules.allow(&t("tcp4", "127.0.0.1:1")));
        assert!(rules.allow(&t("tcp", "example.com:443")));
        assert!(rules.allow(&t("unix", "/var/run/docker.sock")));
        assert!(!rules.allow(&t("tcp", "10.0.0.1:80")));
        assert!(!rules.allow(&t("unix", "/etc/passwd")));
        assert!(!rules.allow(&t("udp", "127.0.0.1:53")));
        assert!("*:*"
            .parse::<AllowRule>()
            .expect("valid")
            .matches(&t("udp", "x:1")));
        assert!("nocolon".parse::<AllowRule>().is_err());
    }

    #[test]
    fn cidr_blocks_match_addresses_in_them() {
        let rule = |r: &str| r.parse::<AllowRule>().expect("valid rule");
        let loopback = rule("tcp:127.0.0.0/8:*");
        assert!(loopback.matches(&t("tcp", "127.0.0.1:8125")));
        assert!(loopback.matches(&t("tcp4", "127.255.0.9:1")));
        assert!(!loopback.matches(&t("tcp", "10.0.0.1:80")));
        assert!(
            !loopback.matches(&t("tcp", "localhost:80")),
            "names are not in a block"
        );
        let ssh = rule("tcp:10.0.0.0/8:22");
        assert!(ssh.matches(&t("tcp", "10.1.2.3:22")));
        assert!(!ssh.matches(&t("tcp", "10.1.2.3:23")));
        let v6 = rule("tcp:[fd00::]/8:*");
        assert!(v6.matches(&t("tcp6", "[fd12::1]:443")));
        assert!(!v6.matches(&t("tcp6", "[::1]:443")));
    }

    #[test]
    fn rules_that_could_never_match_are_refused() {
        for (bad, want) in [
            ("tcp:127.0.0.1", "would never match"),
            ("udp:127.0.0.1", "would never match"),
            ("tcp:127.0.0.0/33:*", "not a CIDR block"),
            ("tcp:foo/8:*", "not a CIDR block"),
        ] {
            let err = bad.parse::<AllowRule>().expect_err(bad).to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        for good in [
            "tcp:127.0.0.1:*",
            "unix:/run/x.sock",
            "*:*",
            "tcp:[::1]:22",
            "tcp:*",
        ] {
            assert!(good.parse::<AllowRule>().is_ok(), "{good}");
        }
    }

    #[test]
    fn glob_backtracks() {
        assert!(glob(b"a*b*c", b"aXbYbZc"));
        assert!(!glob(b"a*b", b"aXc"));
        assert!(glob(b"*", b""));
    }
}
