//! Proxy selection (Go's `http.ProxyFromEnvironment` rules) and HTTP `CONNECT` tunnelling.

use std::{fmt, net::IpAddr, str::FromStr};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{no_proxy::NoProxy, target::join_host_port, ConnectError};

/// Upper bound on the proxy's response head; a proxy that sends more is broken or hostile.
const MAX_PROXY_RESPONSE: usize = 16 * 1024;

/// Which proxy, if any, a connection goes through.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Read `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` from the process environment at each
    /// connection attempt and apply the rules of [`ProxyEnv`]. This is Go's default
    /// (`websocket.DefaultDialer` uses `http.ProxyFromEnvironment`), except that Go reads the
    /// environment only once per process.
    #[default]
    FromEnv,
    /// Apply the rules of [`ProxyEnv`] to the given values instead of the process environment.
    Env(ProxyEnv),
    /// Connect directly, whatever the environment says (Go peers dial this way).
    None,
    /// Always use this proxy, for every host including loopback (like Go's `http.ProxyURL`).
    Url(ProxyUrl),
}

impl ProxyMode {
    /// The proxy to use for a `ws` (`secure == false`) or `wss` URL with this host and port.
    ///
    /// `host` is the bare host name or IP literal, without IPv6 brackets.
    pub fn proxy_for(
        &self,
        secure: bool,
        host: &str,
        port: u16,
    ) -> Result<Option<ProxyUrl>, ConnectError> {
        match self {
            Self::FromEnv => Ok(ProxyEnv::from_process_env()
                .proxy_for(secure, host, port)?
                .cloned()),
            Self::Env(env) => Ok(env.proxy_for(secure, host, port)?.cloned()),
            Self::None => Ok(None),
            Self::Url(url) => Ok(Some(url.clone())),
        }
    }
}

/// The scheme of a proxy URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyScheme {
    /// Plain HTTP proxy, spoken to with `CONNECT`. The only kind supported so far.
    Http,
    /// HTTP proxy reached over TLS (not supported yet).
    Https,
    /// SOCKS5 proxy (not supported yet).
    Socks5,
}

impl ProxyScheme {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Socks5 => "socks5",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
            Self::Socks5 => 1080,
        }
    }
}

/// A parsed proxy URL such as `http://user:pass@proxy.example:3128`.
///
/// `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    scheme: ProxyScheme,
    host: String,
    port: u16,
    username: String,
    password: Option<String>,
}

impl ProxyUrl {
    /// Parses a proxy URL the way Go's `httpproxy` does: a value without a known scheme
    /// (`http`, `https`, `socks5`) is read as `http://<value>`, so `proxy:3128` works. The port
    /// defaults to 80, 443 or 1080 by scheme; user information is percent-decoded; any path is
    /// ignored.
    pub fn parse(value: &str) -> Result<Self, ConnectError> {
        let invalid = |reason| ConnectError::InvalidProxy {
            proxy: redact(value),
            reason,
        };
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(invalid("empty proxy url"));
        }
        let (scheme, rest) = match trimmed.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = match scheme.to_ascii_lowercase().as_str() {
                    "http" => ProxyScheme::Http,
                    "https" => ProxyScheme::Https,
                    "socks5" | "socks5h" => ProxyScheme::Socks5,
                    _ => return Err(invalid("scheme must be http, https or socks5")),
                };
                (scheme, rest)
            }
            None => (ProxyScheme::Http, trimmed),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let authority: http::uri::Authority = hostport
            .parse()
            .map_err(|_| invalid("invalid host or port"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let port = authority
            .port_u16()
            .unwrap_or_else(|| scheme.default_port());
        let (username, password) = match userinfo {
            None => (String::new(), None),
            Some(userinfo) => {
                let (user, pass) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                let decode = |s| percent_decode(s).ok_or_else(|| invalid("bad percent-encoding"));
                (decode(user)?, pass.map(decode).transpose()?)
            }
        };
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            username,
            password,
        })
    }

    /// The proxy's scheme.
    pub fn scheme(&self) -> ProxyScheme {
        self.scheme
    }

    /// The proxy's host, without IPv6 brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port (explicit or the scheme's default).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` of the proxy.
    pub fn host_port(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// The `Proxy-Authorization` value, present only when the URL has a password.
    ///
    /// Gorilla sends credentials only when a password is set (`user:@` counts as set, `user@`
    /// does not); this keeps that behaviour.
    fn basic_auth(&self) -> Option<String> {
        let password = self.password.as_deref()?;
        let credential = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{password}", self.username));
        Some(format!("Basic {credential}"))
    }
}

impl FromStr for ProxyUrl {
    type Err = ConnectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host_port())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("scheme", &self.scheme)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Removes user information from a proxy URL for error messages.
fn redact(value: &str) -> String {
    let (prefix, rest) = match value.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), value),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{prefix}<redacted>@{}", &rest[at + 1..]),
        None => value.to_owned(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Proxy settings in the form of the `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` variables,
/// applied with the rules of Go's `golang.org/x/net/http/httpproxy` (what
/// `http.ProxyFromEnvironment` uses):
///
/// * `ws://` URLs use `HTTP_PROXY`, `wss://` URLs use `HTTPS_PROXY` (gorilla maps ws to http and
///   wss to https before the lookup); there is no fallback from one to the other.
/// * The upper-case variable wins over the lower-case one when both are non-empty.
/// * **Requests to `localhost` and to loopback IP addresses (`127.0.0.0/8`, `::1`) never use a
///   proxy**, whatever `NO_PROXY` says. Use [`ProxyMode::Url`] to force a proxy for them.
/// * [`NoProxy`] lists hosts that are reached directly.
/// * An unparseable proxy value is ignored (Go does the same), with a warning.
/// * When `REQUEST_METHOD` is set (a CGI environment), where `HTTP_PROXY` may come from a
///   client's `Proxy:` header, using `HTTP_PROXY` is refused with an error, as in Go.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ProxyEnv {
    /// Proxy for `ws://` URLs.
    pub http_proxy: Option<ProxyUrl>,
    /// Proxy for `wss://` URLs.
    pub https_proxy: Option<ProxyUrl>,
    /// Hosts reached without a proxy.
    pub no_proxy: NoProxy,
    /// Whether this is a CGI environment (`REQUEST_METHOD` set).
    pub cgi: bool,
}

impl ProxyEnv {
    /// Reads the settings from the process environment.
    pub fn from_process_env() -> Self {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, which is given variable names such as
    /// `HTTPS_PROXY` and `https_proxy`. Tests use this instead of changing the process
    /// environment.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        Self::read(lookup, &mut |name, error| {
            tracing::warn!(variable = name, %error, "ignoring invalid proxy setting");
        })
    }

    /// Reads the settings from the process environment, failing on the first unparseable
    /// proxy value instead of ignoring it (Go's dial fails on one too): a program can check
    /// its environment once at start-up.
    pub fn try_from_process_env() -> Result<Self, InvalidProxySetting> {
        Self::try_from_lookup(&|name| std::env::var(name).ok())
    }

    /// [`try_from_process_env`](Self::try_from_process_env) through `lookup`.
    pub fn try_from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, InvalidProxySetting> {
        let mut first = None;
        let env = Self::read(lookup, &mut |name, error| {
            first.get_or_insert(InvalidProxySetting {
                variable: name,
                error: Box::new(error),
            });
        });
        first.map_or(Ok(env), Err)
    }

    fn read(
        lookup: &dyn Fn(&str) -> Option<String>,
        on_invalid: &mut dyn FnMut(&'static str, ConnectError),
    ) -> Self {
        let any = |names: [&str; 2]| {
            names
                .into_iter()
                .find_map(|name| lookup(name).filter(|v| !v.is_empty()))
        };
        let mut proxy = |names: [&'static str; 2]| {
            let value = any(names)?;
            match ProxyUrl::parse(&value) {
                Ok(url) => Some(url),
                Err(error) => {
                    on_invalid(names[0], error);
                    None
                }
            }
        };
        Self {
            http_proxy: proxy(["HTTP_PROXY", "http_proxy"]),
            https_proxy: proxy(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: NoProxy::parse(&any(["NO_PROXY", "no_proxy"]).unwrap_or_default()),
            cgi: lookup("REQUEST_METHOD").is_some_and(|v| !v.is_empty()),
        }
    }

    /// The proxy for a `ws` (`secure == false`) or `wss` URL with this host (no IPv6 brackets)
    /// and port, or `None` to connect directly.
    pub fn proxy_for(
        &self,
        secure: bool,
        host: &str,
        port: u16,
    ) -> Result<Option<&ProxyUrl>, ConnectError> {
        let proxy = if secure {
            self.https_proxy.as_ref()
        } else {
            match &self.http_proxy {
                Some(proxy) if self.cgi => {
                    return Err(ConnectError::InvalidProxy {
                        proxy: proxy.to_string(),
                        reason: "refusing to use HTTP_PROXY in a CGI environment",
                    })
                }
                other => other.as_ref(),
            }
        };
        let Some(proxy) = proxy else {
            return Ok(None);
        };
        if is_loopback_host(host) || self.no_proxy.matches(host, port) {
            return Ok(None);
        }
        Ok(Some(proxy))
    }
}

/// A proxy variable that does not parse (see [`ProxyEnv::try_from_process_env`]).
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {error}")]
pub struct InvalidProxySetting {
    /// The variable's upper-case name (`HTTP_PROXY`, `HTTPS_PROXY`).
    pub variable: &'static str,
    /// Why its value was refused (boxed: a `ConnectError` is large).
    pub error: Box<ConnectError>,
}

/// Go's `useProxy` checks the literal name `localhost` (case-sensitively) and loopback IPs,
/// including IPv4-mapped IPv6 forms of `127.0.0.0/8`.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Asks an HTTP proxy, over `stream`, to open a tunnel to `target` (`host:port`).
///
/// Reads the response head one byte at a time so that nothing the target may send after the
/// proxy's response is consumed here.
pub(crate) async fn connect_tunnel(
    stream: &mut TcpStream,
    proxy: &ProxyUrl,
    target: &str,
) -> Result<(), ConnectError> {
    let io_error = |source| ConnectError::ProxyIo {
        proxy: proxy.host_port(),
        source,
    };
    let protocol_error = |reason| ConnectError::ProxyProtocol {
        proxy: proxy.host_port(),
        reason,
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = proxy.basic_auth() {
        request.push_str("Proxy-Authorization: ");
        request.push_str(&auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_error)?;

    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_RESPONSE {
            return Err(protocol_error("response head exceeds 16 KiB"));
        }
        match stream.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(protocol_error(
                    "connection closed before the end of the response head",
                ))
            }
            Err(e) => return Err(io_error(e)),
        }
    }
    let (status, reason) =
        parse_status_line(&head).ok_or_else(|| protocol_error("invalid status line"))?;
    if !(200..300).contains(&status) {
        return Err(ConnectError::ProxyRefused {
            proxy: proxy.host_port(),
            target: target.to_owned(),
            status,
            reason,
        });
    }
    Ok(())
}

/// Parses `HTTP/1.x SSS reason` from the start of a response head.
fn parse_status_line(head: &[u8]) -> Option<(u16, String)> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !version.starts_with("HTTP/1.")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let reason = parts.next().unwrap_or_default().trim().to_owned();
    Some((code.parse().ok()?, reason))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(vars: &[(&str, &str)]) -> ProxyEnv {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ProxyEnv::from_lookup(&move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn env_selects_proxy_by_scheme() {
        let e = env(&[
            ("HTTP_PROXY", "http://plain:3128"),
            ("https_proxy", "secure:8080"),
            ("NO_PROXY", "internal.example"),
        ]);
        let p = e.proxy_for(false, "example.com", 80).unwrap().unwrap();
        assert_eq!(p.host_port(), "plain:3128");
        let p = e.proxy_for(true, "example.com", 443).unwrap().unwrap();
        assert_eq!(
            (p.scheme(), p.host_port().as_str()),
            (ProxyScheme::Http, "secure:8080")
        );
        assert!(e
            .proxy_for(true, "api.internal.example", 443)
            .unwrap()
            .is_none());
    }

    #[test]
    fn env_upper_case_wins_and_empty_is_unset() {
        let e = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
        ]);
        assert_eq!(e.https_proxy.unwrap().host(), "upper");
        let e = env(&[("HTTPS_PROXY", ""), ("https_proxy", "http://lower:2")]);
        assert_eq!(e.https_proxy.unwrap().host(), "lower");
    }

    #[test]
    fn env_no_fallback_between_schemes() {
        let e = env(&[("HTTP_PROXY", "http://plain:3128")]);
        assert!(e.proxy_for(true, "example.com", 443).unwrap().is_none());
    }

    #[test]
    fn env_never_proxies_loopback() {
        let e = env(&[("HTTP_PROXY", "http://p:1"), ("HTTPS_PROXY", "http://p:1")]);
        for host in [
            "localhost",
            "127.0.0.1",
            "127.9.8.7",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(e.proxy_for(true, host, 443).unwrap().is_none(), "{host}");
            assert!(e.proxy_for(false, host, 80).unwrap().is_none(), "{host}");
        }
        // Go compares the name `localhost` case-sensitively and does not resolve names.
        assert!(e.proxy_for(true, "LOCALHOST", 443).unwrap().is_some());
        assert!(e
            .proxy_for(true, "localhost.example", 443)
            .unwrap()
            .is_some());
    }

    #[test]
    fn env_cgi_refuses_http_proxy() {
        let e = env(&[
            ("HTTP_PROXY", "http://p:1"),
            ("HTTPS_PROXY", "http://s:1"),
            ("REQUEST_METHOD", "GET"),
        ]);
        assert!(matches!(
            e.proxy_for(false, "example.com", 80),
            Err(ConnectError::InvalidProxy { .. })
        ));
        assert!(e.proxy_for(true, "example.com", 443).unwrap().is_some());
    }

    #[test]
    fn env_strict_reading_names_the_invalid_variable() {
        let err = ProxyEnv::try_from_lookup(&|n| (n == "HTTPS_PROXY").then(|| "::bad".to_owned()))
            .expect_err("invalid");
        assert_eq!(err.variable, "HTTPS_PROXY");
        assert!(ProxyEnv::try_from_lookup(
            &|n| (n == "http_proxy").then(|| "http://p:3128".to_owned())
        )
        .expect("valid")
        .http_proxy
        .is_some());
    }

    #[test]
    fn env_ignores_invalid_proxy() {
        let e = env(&[("HTTPS_PROXY", "ftp://nope:21")]);
        assert!(e.https_proxy.is_none());
    }

    #[test]
    fn proxy_url_parsing() {
        let p = ProxyUrl::parse("http://us%40er:p%3Ass@proxy.example:3128/ignored").unwrap();
        assert_eq!(p.host_port(), "proxy.example:3128");
        assert_eq!(
            p.basic_auth().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("us@er:p:ss")
            )
        );
        assert!(!format!("{p:?} {p}").contains("p:ss"));

        let p = ProxyUrl::parse("10.0.0.1:8080").unwrap();
        assert_eq!(
            (p.scheme(), p.host_port().as_str()),
            (ProxyScheme::Http, "10.0.0.1:8080")
        );
        assert!(p.basic_auth().is_none());

        assert_eq!(ProxyUrl::parse("https://p").unwrap().port(), 443);
        assert_eq!(ProxyUrl::parse("socks5://p").unwrap().port(), 1080);
        assert_eq!(
            ProxyUrl::parse("http://[::1]").unwrap().host_port(),
            "[::1]:80"
        );
        // A user without a password sends no credentials, like gorilla.
        assert!(ProxyUrl::parse("http://user@p:1")
            .unwrap()
            .basic_auth()
            .is_none());
        assert!(ProxyUrl::parse("http://user:@p:1")
            .unwrap()
            .basic_auth()
            .is_some());

        let err = ProxyUrl::parse("ftp://user:secret@p").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(ProxyUrl::parse("").is_err());
    }

    #[test]
    fn status_line() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "Connection established".to_owned()))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 407\r\n\r\n"),
            Some((407, String::new()))
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
    }
}
