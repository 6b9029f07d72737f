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
/// `tcp` also covers `tcp4` and `tcp6`. Examples: `tcp:127.0.0.1:*`, `tcp:*:443`,
/// `unix:/var/run/docker.sock`, `*:*` (everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    proto: String,
    address: String,
}

/// An allow rule that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow rule {0:?}: want proto:address, e.g. tcp:127.0.0.1:* or unix:/var/run/docker.sock")]
pub struct AllowRuleError(String);

impl FromStr for AllowRule {
    type Err = AllowRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((proto, address)) if !proto.is_empty() && !address.is_empty() => Ok(Self {
                proto: proto.to_owned(),
                address: address.to_owned(),
            }),
            _ => Err(AllowRuleError(s.to_owned())),
        }
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
        proto_ok && glob(self.address.as_bytes(), target.address().as_bytes())
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
    fn glob_backtracks() {
        assert!(glob(b"a*b*c", b"aXbYbZc"));
        assert!(!glob(b"a*b", b"aXc"));
        assert!(glob(b"*", b""));
    }
}
