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

/// A set of rd protocol extensions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Per-stream credit instead of Pause/Resume.
    pub credit: bool,
}

impl Extensions {
    /// Everything this build speaks.
    pub const SUPPORTED: Self = Self { credit: true };

    /// None: the plain Go protocol.
    pub const NONE: Self = Self { credit: false };

    /// The header value naming these extensions, `None` for the empty set (no header).
    pub fn header_value(self) -> Option<HeaderValue> {
        self.credit.then(|| HeaderValue::from_static(CREDIT))
    }

    /// The extensions named in `headers` (comma-separated tokens, unknown ones ignored).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut found = Self::NONE;
        for value in headers.get_all(EXTENSIONS_HEADER) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case(CREDIT) {
                    found.credit = true;
                }
            }
        }
        found
    }

    /// What both sets contain.
    pub fn intersect(self, other: Self) -> Self {
        Self {
            credit: self.credit && other.credit,
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
        headers.insert(
            EXTENSIONS_HEADER,
            HeaderValue::from_static("half-close, Credit"),
        );
        assert!(Extensions::from_headers(&headers).credit);
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
