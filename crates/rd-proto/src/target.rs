//! Typed dial targets: Connect's `proto/address` and the peer-routed `clientKey::proto/address`.

use std::fmt;

use crate::error::TargetError;

/// Largest Connect payload a Go receiver (v0.5+) reads; PR #127 sized it for a full DNS name.
pub const MAX_CONNECT_PAYLOAD: usize = 266;

/// Where a virtual connection should be dialed: `tcp` + `127.0.0.1:8125`, optionally routed
/// through a peer server on behalf of `client_key` (wire form `clientKey::tcp/127.0.0.1:8125`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    client_key: Option<String>,
    proto: String,
    address: String,
}

impl Target {
    /// A direct target such as `Target::new("tcp", "127.0.0.1:8125")`.
    pub fn new(proto: impl Into<String>, address: impl Into<String>) -> Result<Self, TargetError> {
        let target = Self {
            client_key: None,
            proto: proto.into(),
            address: address.into(),
        };
        target.validate()?;
        Ok(target)
    }

    /// The same target, routed through a peer server to the client `client_key`.
    pub fn routed_via(mut self, client_key: impl Into<String>) -> Result<Self, TargetError> {
        self.client_key = Some(client_key.into());
        self.validate()?;
        Ok(self)
    }

    /// The target without its peer route, as the final hop dials it.
    pub fn without_route(&self) -> Self {
        Self {
            client_key: None,
            ..self.clone()
        }
    }

    /// Parses a Connect payload as Go does: split at the first `/`, then the proto at `::`.
    pub fn parse(payload: &[u8]) -> Result<Self, TargetError> {
        if payload.len() > MAX_CONNECT_PAYLOAD {
            return Err(TargetError::TooLong {
                len: payload.len(),
                max: MAX_CONNECT_PAYLOAD,
            });
        }
        let text = std::str::from_utf8(payload).map_err(|_| TargetError::NotUtf8)?;
        let (proto, address) = text
            .split_once('/')
            .ok_or_else(|| TargetError::MissingSlash {
                payload: text.to_owned(),
            })?;
        let target = match proto.split_once("::") {
            Some((key, proto)) => Self {
                client_key: Some(key.to_owned()),
                proto: proto.to_owned(),
                address: address.to_owned(),
            },
            None => Self {
                client_key: None,
                proto: proto.to_owned(),
                address: address.to_owned(),
            },
        };
        target.validate()?;
        Ok(target)
    }

    /// The network, e.g. `tcp`, `tcp4`, `tcp6`, `unix`.
    pub fn proto(&self) -> &str {
        &self.proto
    }

    /// The address, e.g. `127.0.0.1:8125` or `/var/run/docker.sock`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The client this target is routed to through a peer, if any.
    pub fn client_key(&self) -> Option<&str> {
        self.client_key.as_deref()
    }

    /// The proto as written on the wire and shown by Go's `Addr.Network()`: `tcp` or `foo::tcp`.
    pub fn network(&self) -> String {
        match &self.client_key {
            Some(key) => format!("{key}::{}", self.proto),
            None => self.proto.clone(),
        }
    }

    /// Length of the Connect payload this target encodes to.
    pub fn wire_len(&self) -> usize {
        self.client_key.as_ref().map_or(0, |k| k.len() + 2)
            + self.proto.len()
            + 1
            + self.address.len()
    }

    fn validate(&self) -> Result<(), TargetError> {
        let empty = |part| TargetError::Empty {
            part,
            payload: self.to_string(),
        };
        if self.proto.is_empty() {
            return Err(empty("proto"));
        }
        if self.address.is_empty() {
            return Err(empty("address"));
        }
        if self.client_key.as_deref() == Some("") {
            return Err(empty("client key"));
        }
        if self.wire_len() > MAX_CONNECT_PAYLOAD {
            return Err(TargetError::TooLong {
                len: self.wire_len(),
                max: MAX_CONNECT_PAYLOAD,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(key) = &self.client_key {
            write!(f, "{key}::")?;
        }
        write!(f, "{}/{}", self.proto, self.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_direct_and_routed() {
        let t = Target::parse(b"tcp/127.0.0.1:8125").expect("valid");
        assert_eq!(
            (t.proto(), t.address(), t.client_key()),
            ("tcp", "127.0.0.1:8125", None)
        );
        let r = Target::parse(b"foo::tcp/127.0.0.1:8125").expect("valid");
        assert_eq!(r.client_key(), Some("foo"));
        assert_eq!(r.network(), "foo::tcp");
        assert_eq!(r.to_string(), "foo::tcp/127.0.0.1:8125");
        assert_eq!(r.without_route(), t);
        let unix = Target::parse(b"unix//var/run/docker.sock").expect("valid");
        assert_eq!(unix.address(), "/var/run/docker.sock");
    }

    #[test]
    fn go_limit_of_266_is_accepted() {
        // TestNewServerMessage_266: tcp/ + 255 x h + :65500 is 265 bytes.
        let payload = format!("tcp/{}:65500", "h".repeat(255));
        let t = Target::parse(payload.as_bytes()).expect("265 bytes fit");
        assert_eq!(t.address().len(), 261);
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        assert!(matches!(
            Target::parse(b"tcp"),
            Err(TargetError::MissingSlash { .. })
        ));
        assert!(matches!(
            Target::parse(&[b'a'; 300]),
            Err(TargetError::TooLong { len: 300, .. })
        ));
        assert!(matches!(
            Target::parse(b"/x"),
            Err(TargetError::Empty { part: "proto", .. })
        ));
        assert!(matches!(
            Target::parse(b"tcp/"),
            Err(TargetError::Empty {
                part: "address",
                ..
            })
        ));
        assert!(matches!(
            Target::parse(b"::tcp/x"),
            Err(TargetError::Empty {
                part: "client key",
                ..
            })
        ));
        assert_eq!(
            Target::parse(&[b't', b'/', 0xff]),
            Err(TargetError::NotUtf8)
        );
    }
}
