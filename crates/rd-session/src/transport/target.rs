//! Parsing the websocket URL into what the connect steps need.

use http::Uri;

use super::ConnectError;

/// Where a connection attempt goes, derived from the caller's URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `wss`/`https` (TLS to the server) versus `ws`/`http`.
    pub(crate) secure: bool,
    /// The host without IPv6 brackets, as used for DNS, SNI and proxy rules.
    pub(crate) host: String,
    /// The explicit port, or 80/443.
    pub(crate) port: u16,
    /// The URL with its scheme normalised to `ws`/`wss`, because tungstenite accepts nothing else.
    pub(crate) request_uri: Uri,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, ConnectError> {
        let invalid = |reason| ConnectError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a valid uri"))?;
        let scheme = uri.scheme_str().ok_or_else(|| invalid("missing scheme"))?;
        let (secure, ws_scheme) = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => (false, "ws"),
            "wss" | "https" => (true, "wss"),
            _ => return Err(invalid("scheme must be ws, wss, http or https")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
        // Gorilla refuses credentials in websocket URLs; sending them in the Host header would
        // leak them, so refuse too.
        if authority.as_str().contains('@') {
            return Err(invalid("user information is not allowed"));
        }
        let raw_host = authority.host();
        if raw_host.is_empty() {
            return Err(invalid("missing host"));
        }
        let host = raw_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(raw_host)
            .to_owned();
        let port = match authority.port() {
            Some(p) => p.as_u16(),
            None if secure => 443,
            None => 80,
        };
        let path_and_query = uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let request_uri = Uri::builder()
            .scheme(ws_scheme)
            .authority(authority.clone())
            .path_and_query(if path_and_query.is_empty() {
                "/".to_owned()
            } else {
                path_and_query
            })
            .build()
            .map_err(|_| invalid("not a valid uri"))?;
        Ok(Self {
            secure,
            host,
            port,
            request_uri,
        })
    }

    /// `host:port` with IPv6 brackets, as used in `CONNECT` and in error messages.
    pub(crate) fn host_port(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

/// Formats `host:port`, bracketing IPv6 literals like Go's `net.JoinHostPort`.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn schemes_and_default_ports() {
        let t = Target::parse("ws://example.com/connect").unwrap();
        assert!(!t.secure);
        assert_eq!((t.host.as_str(), t.port), ("example.com", 80));
        assert_eq!(t.request_uri.to_string(), "ws://example.com/connect");

        let t = Target::parse("https://example.com").unwrap();
        assert!(t.secure);
        assert_eq!(t.port, 443);
        assert_eq!(t.request_uri.to_string(), "wss://example.com/");

        let t = Target::parse("WSS://[::1]:8443/v3/connect?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8443));
        assert_eq!(t.host_port(), "[::1]:8443");
        assert_eq!(t.request_uri.to_string(), "wss://[::1]:8443/v3/connect?x=1");
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "example.com/connect",
            "ftp://example.com/",
            "ws://user:pw@example.com/",
            "/connect",
            "ws://",
        ] {
            assert!(
                matches!(Target::parse(url), Err(ConnectError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }
}
