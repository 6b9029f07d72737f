//! rd's protocol extensions, negotiated at the websocket upgrade.
//!
//! The dialing side lists what it speaks in an `X-Rd-Extensions` request header; an rd
//! server answers with the subset it accepts in the same header on its `101` response. A Go
//! server ignores the request header and never sends the response header, and a Go client
//! never sends the request header, so Go peers always get the plain protocol, byte for byte.
//! An extension is in force only when both ends named it. See docs/protocol.md.

use rd_proto::Config;
use tungstenite::http::{HeaderMap, HeaderValue};

/// The header that carries the extension list, in requests and `101` responses.
pub const EXTENSIONS_HEADER: &str = "x-rd-extensions";

/// The token for per-stream credit flow control ([`Config::credit`]).
pub const CREDIT: &str = "credit";

/// The token for half-close ([`Config::half_close`]): a stream's shutdown ends only its
/// sender's direction.
pub const HALF_CLOSE: &str = "half-close";

/// The token for connect-ack ([`Config::connect_ack`]): the side that receives a Connect
/// says when its dial succeeded (ConnectAck), so the dialer answers a CONNECT at once.
pub const CONNECT_ACK: &str = "connect-ack";

/// The token for udp ([`Config::udp`]): streams may be dialed to `udp` targets and carry
/// datagrams, each framed as a 2-byte big-endian length and its payload
/// ([`DatagramStream`](crate::DatagramStream)).
pub const UDP: &str = "udp";

/// The token for replicas ([`Config::replicas`]): an rd server tells its agent its id and how
/// many replicas it counts, and that a session is going away (a drain); the agent holds a
/// session with each replica. See [`REPLICAS_HEADER`].
pub const REPLICAS: &str = "replicas";

/// Response header of an rd server with a peer id: that id. On a `101` to an rd peer link
/// that asked for it, or to an agent that negotiated [`REPLICAS`]; on a `409 Conflict` to a
/// peer link that reached the server that sent it, or to an agent that holds a session with
/// this server already ([`HELD_SERVERS_HEADER`]).
pub const SERVER_ID_HEADER: &str = "x-rd-server-id";

/// Response header of an rd server to an agent that negotiated [`REPLICAS`] (on the `101`,
/// and on the `409` of [`HELD_SERVERS_HEADER`]): how many replicas it counts, itself
/// included (the rd servers it has a live peer link with, draining ones left out). The
/// agent holds a session with that many distinct [server ids](SERVER_ID_HEADER).
pub const REPLICAS_HEADER: &str = "x-rd-replicas";

/// Request header of an agent that offers [`REPLICAS`]: the ids of the servers it holds a
/// session with already, comma-separated. A server that finds its own id there answers
/// `409 Conflict` with its id and count instead of starting a second session, so that an
/// agent filling its sessions through a load balancer costs the fleet no session churn.
pub const HELD_SERVERS_HEADER: &str = "x-rd-held-servers";

/// A set of rd protocol extensions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Per-stream credit instead of Pause/Resume.
    pub credit: bool,
    /// Half-close: Fin ends one direction of a stream, where Go's Error `EOF` ends both.
    pub half_close: bool,
    /// Replicas: the server's id and replica count at the upgrade, GoAway and Replicas
    /// messages in the session.
    pub replicas: bool,
    /// Connect-ack: the receiver of a Connect says when its dial succeeded.
    pub connect_ack: bool,
    /// Udp: streams to `udp` targets, datagrams framed with a 2-byte length.
    pub udp: bool,
}

impl Extensions {
    /// Everything this build speaks.
    pub const SUPPORTED: Self = Self {
        credit: true,
        half_close: true,
        replicas: true,
        connect_ack: true,
        udp: true,
    };

    /// None: the plain Go protocol.
    pub const NONE: Self = Self {
        credit: false,
        half_close: false,
        replicas: false,
        connect_ack: false,
        udp: false,
    };

    /// The header value naming these extensions, `None` for the empty set (no header).
    pub fn header_value(self) -> Option<HeaderValue> {
        let tokens: Vec<&str> = [
            (self.credit, CREDIT),
            (self.half_close, HALF_CLOSE),
            (self.replicas, REPLICAS),
            (self.connect_ack, CONNECT_ACK),
            (self.udp, UDP),
        ]
        .into_iter()
        .filter_map(|(on, token)| on.then_some(token))
        .collect();
        if tokens.is_empty() {
            return None;
        }
        // Tokens are ASCII constants, so the value is always valid.
        HeaderValue::from_str(&tokens.join(", ")).ok()
    }

    /// The extensions named in `headers` (comma-separated tokens, unknown ones ignored).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut found = Self::NONE;
        for value in headers.get_all(EXTENSIONS_HEADER) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case(CREDIT) {
                    found.credit = true;
                } else if token.eq_ignore_ascii_case(HALF_CLOSE) {
                    found.half_close = true;
                } else if token.eq_ignore_ascii_case(REPLICAS) {
                    found.replicas = true;
                } else if token.eq_ignore_ascii_case(CONNECT_ACK) {
                    found.connect_ack = true;
                } else if token.eq_ignore_ascii_case(UDP) {
                    found.udp = true;
                }
            }
        }
        found
    }

    /// What both sets contain.
    pub fn intersect(self, other: Self) -> Self {
        Self {
            credit: self.credit && other.credit,
            half_close: self.half_close && other.half_close,
            replicas: self.replicas && other.replicas,
            connect_ack: self.connect_ack && other.connect_ack,
            udp: self.udp && other.udp,
        }
    }

    /// How a session with these extensions does flow control, for logs.
    pub fn flow_control(self) -> &'static str {
        if self.credit {
            "credit"
        } else {
            "pause/resume"
        }
    }

    /// Sets the session config to what was negotiated.
    pub fn apply(self, config: &mut Config) {
        config.credit = self.credit;
        config.half_close = self.half_close;
        config.replicas = self.replicas;
        config.connect_ack = self.connect_ack;
        config.udp = self.udp;
    }

    /// The extensions a session's config says are in force.
    pub fn of_config(config: &Config) -> Self {
        Self {
            credit: config.credit,
            half_close: config.half_close,
            replicas: config.replicas,
            connect_ack: config.connect_ack,
            udp: config.udp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_unknown_tokens() {
        let mut headers = HeaderMap::new();
        assert_eq!(Extensions::from_headers(&headers), Extensions::NONE);
        assert_eq!(Extensions::NONE.header_value(), None);
        headers.insert(
            EXTENSIONS_HEADER,
            Extensions::SUPPORTED
                .header_value()
                .expect("supported is not empty"),
        );
        assert_eq!(Extensions::from_headers(&headers), Extensions::SUPPORTED);
        assert_eq!(
            Extensions::SUPPORTED.header_value().expect("not empty"),
            "credit, half-close, replicas, connect-ack, udp"
        );
        headers.insert(
            EXTENSIONS_HEADER,
            HeaderValue::from_static("future-thing, Half-Close"),
        );
        assert_eq!(
            Extensions::from_headers(&headers),
            Extensions {
                half_close: true,
                ..Extensions::NONE
            }
        );
        headers.insert(
            EXTENSIONS_HEADER,
            HeaderValue::from_static("half-close, Credit,REPLICAS, Connect-Ack, UDP"),
        );
        assert_eq!(Extensions::from_headers(&headers), Extensions::SUPPORTED);
        let credit_only = Extensions {
            credit: true,
            ..Extensions::NONE
        };
        assert_eq!(credit_only.header_value().expect("not empty"), "credit");
        assert_eq!(Extensions::SUPPORTED.intersect(credit_only), credit_only);
        let mut config = Config::default();
        Extensions::SUPPORTED.apply(&mut config);
        assert!(
            config.credit
                && config.half_close
                && config.replicas
                && config.connect_ack
                && config.udp
        );
        assert_eq!(Extensions::of_config(&config), Extensions::SUPPORTED);
        Extensions::NONE.apply(&mut config);
        assert!(
            !config.credit
                && !config.half_close
                && !config.replicas
                && !config.connect_ack
                && !config.udp
        );
        headers.insert(
            EXTENSIONS_HEADER,
            HeaderValue::from_static("something-else"),
        );
        assert_eq!(Extensions::from_headers(&headers), Extensions::NONE);
        assert_eq!(
            Extensions::SUPPORTED.intersect(Extensions::NONE),
            Extensions::NONE
        );
    }
}
