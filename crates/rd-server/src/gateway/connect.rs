//! HTTP `CONNECT` through an agent: `curl -p -x http://foo@rd-server:8123 ...` or
//! `https_proxy=http://foo@rd-server:8123`. The proxy user name is the agent's client key;
//! the target (`host:port`) is dialed over `tcp` on the agent's side, through a peer server
//! if the agent is connected to another replica, and the agent's allow rules decide as for
//! any dial.
//!
//! The proxy answers once the agent's dial has succeeded (`200`) or failed (`502` with the
//! agent's text). An rd agent says so at once (the connect-ack extension): the answer
//! comes one round trip to the agent plus its dial after the request, bounded by
//! [`ConnectProxy::dial_timeout`] (`504`). The Go protocol has no "connected" reply: with a
//! Go agent the proxy waits up to [`ConnectProxy::connect_wait`] for the stream's first
//! event: an Error is answered `502`, data or the wait running out `200`, and a failure
//! that arrives later closes the tunnelled connection instead (and is logged).
//!
//! With [`ConnectProxy::proxy_protocol`] the target first receives a PROXY protocol header
//! naming the user ([`RemoteAddr`](crate::RemoteAddr)) and the address the user connected
//! to ([`LocalAddr`](crate::LocalAddr)).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rd_session::TunnelStream;

use super::proxy_protocol::{ProxiedAddrs, ProxyProtocolVersion};
use super::splice::splice;
use super::tunnel_use::TunnelUse;
use crate::{Body, DialError, Server};

/// Default of [`ConnectProxy::connect_wait`] (the server core waits as long for a Connect a
/// peer routed to a Go agent here).
pub use crate::DEFAULT_CONNECT_WAIT;

/// Default of [`ConnectProxy::dial_timeout`] (Go's example's default `timeout`).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks a CONNECT's proxy password for a client key (see [`ConnectProxy::credentials`]).
/// Closures `Fn(&str, &str) -> bool` (client key, password) implement it.
pub trait ProxyCredentials: Send + Sync + 'static {
    /// Whether `password` admits the caller to client `client_key`.
    fn check(&self, client_key: &str, password: &str) -> bool;
}

impl<F> ProxyCredentials for F
where
    F: Fn(&str, &str) -> bool + Send + Sync + 'static,
{
    fn check(&self, client_key: &str, password: &str) -> bool {
        self(client_key, password)
    }
}

/// Why a CONNECT was not tunnelled; its `Display` is the one-line response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The request target is not `host:port`.
    #[error("CONNECT needs host:port, got {0:?}")]
    BadTarget(String),
    /// No usable `Proxy-Authorization: Basic` naming the agent.
    #[error(
        "proxy authentication required: the proxy user name is the agent's client key \
         (curl -x http://CLIENT@host:port)"
    )]
    NoCredentials,
    /// The password check said no.
    #[error("proxy authentication failed for client {0}")]
    BadPassword(String),
    /// The dial could not start: no session for the agent here or at a peer, or the
    /// session refused it.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The agent refused or failed the dial (its text, such as `connect not allowed` or
    /// `dial tcp 127.0.0.1:9: connect: connection refused`).
    #[error("{0}")]
    Refused(String),
    /// An rd agent gave no verdict on the dial within [`ConnectProxy::dial_timeout`].
    #[error("no answer from the agent's dial within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// The response status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadTarget(_) | Self::Dial(DialError::InvalidTarget(_)) => StatusCode::BAD_REQUEST,
            Self::NoCredentials | Self::BadPassword(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::Dial(DialError::Draining) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Dial(_) | Self::Refused(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// Serves HTTP `CONNECT` requests by tunnelling them through the agent named in the proxy
/// credentials. Mount it on the listener that serves the `/client` route: its callers are the
/// same operators.
#[derive(Clone)]
pub struct ConnectProxy {
    server: Server,
    connect_wait: Duration,
    dial_timeout: Duration,
    credentials: Option<Arc<dyn ProxyCredentials>>,
    proxy_protocol: Option<ProxyProtocolVersion>,
}

impl fmt::Debug for ConnectProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectProxy")
            .field("connect_wait", &self.connect_wait)
            .field("dial_timeout", &self.dial_timeout)
            .field("credentials", &self.credentials.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

impl ConnectProxy {
    /// A CONNECT proxy over `server`'s tunnels. Any password is accepted until
    /// [`credentials`](Self::credentials) sets a check.
    pub fn new(server: Server) -> Self {
        Self {
            server,
            connect_wait: DEFAULT_CONNECT_WAIT,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            credentials: None,
            proxy_protocol: None,
        }
    }

    /// Sends each target a PROXY protocol header of `version` before the user's first
    /// byte: source the request's [`RemoteAddr`](crate::RemoteAddr), destination its
    /// [`LocalAddr`](crate::LocalAddr) (a header without addresses when the server loop
    /// inserted neither). It travels as tunnel payload, so any agent carries it; the
    /// target must expect it. `None` (the default) sends none.
    pub fn proxy_protocol(mut self, version: Option<ProxyProtocolVersion>) -> Self {
        self.proxy_protocol = version;
        self
    }

    /// The PROXY protocol version sent to targets, if any (for gateways sharing this
    /// proxy's settings, such as SOCKS5).
    pub fn proxy_protocol_version(&self) -> Option<ProxyProtocolVersion> {
        self.proxy_protocol
    }

    /// With a Go agent (no connect-ack), how long to wait for the agent to refuse or fail
    /// the dial before answering `200` (default 100 ms). Longer reports more failures as
    /// `502`s (a refusal takes one round trip to the agent, a failed dial as long as the
    /// agent's dial) but delays every connection to a target that waits for its client to
    /// speak first, such as HTTP or TLS. Zero answers `200` at once. rd agents say when
    /// their dial succeeded, so this never delays them.
    pub fn connect_wait(mut self, wait: Duration) -> Self {
        self.connect_wait = wait;
        self
    }

    /// With an rd agent, how long to wait for its verdict on the dial before answering
    /// `504` (default 15 s).
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Checks the password of `Proxy-Authorization: Basic` against the client key in its
    /// user name; a refusal is answered `407`.
    pub fn credentials(mut self, check: impl ProxyCredentials) -> Self {
        self.credentials = Some(Arc::new(check));
        self
    }

    /// Handles a `CONNECT` request: answers `200` and splices the upgraded connection to the
    /// tunnel stream, or answers the error as one line of text.
    pub async fn handle<B: Send + 'static>(&self, mut req: Request<B>) -> Response<Body> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let client = basic_user_password(req.headers())
            .map(|(user, _)| user)
            .unwrap_or_default();
        let remote = req.extensions().get::<crate::RemoteAddr>().map(|r| r.0);
        let local = req.extensions().get::<crate::LocalAddr>().map(|l| l.0);
        let proxy_header = self.proxy_protocol.map(|version| {
            let addresses = remote.zip(local).map(|(source, destination)| ProxiedAddrs {
                source,
                destination,
            });
            (version, addresses)
        });
        let mut used = TunnelUse::start(
            self.server.metrics(),
            "connect",
            &client,
            authority.clone(),
            remote,
        );
        match self.open(&req, &authority).await {
            Ok(mut tunnel) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                used.carried_by(tunnel.session_key(), tunnel.id().0);
                used.answered(200);
                tracing::debug!(client = %crate::short_id(&client), target = %authority, "CONNECT tunnel open");
                tokio::spawn(async move {
                    if let Some((version, addresses)) = proxy_header {
                        let sent =
                            super::proxy_protocol::write_header(&mut tunnel, version, addresses);
                        if let Err(e) = sent.await {
                            return used.ended("cut", &format!("sending the PROXY header: {e}"));
                        }
                    }
                    let upgraded = match on_upgrade.await {
                        Ok(upgraded) => upgraded,
                        Err(e) => return used.ended("cut", &format!("upgrade failed: {e}")),
                    };
                    let local = used.count(TokioIo::new(upgraded));
                    let result = splice(tunnel, local).await;
                    used.finished(&result);
                });
                let mut response = Response::new(empty());
                *response.status_mut() = StatusCode::OK;
                response
            }
            Err(e) => {
                let status = e.status();
                used.answered(status.as_u16());
                let outcome = if status.is_client_error() {
                    "rejected"
                } else {
                    "refused"
                };
                used.ended(outcome, &e.to_string());
                Self::error_response(&e)
            }
        }
    }

    /// For a plain-HTTP proxy request (absolute form, `GET http://host:port/path`, as sent
    /// by `curl -x http://foo@rd-server:8123 http://...` or `http_proxy=...`) carrying proxy
    /// credentials: the `/client/{rest}` route that serves it (`foo/http/host:port/path`), or
    /// why not (bad credentials). `None` for any other request, to be routed as usual; so
    /// absolute-form requests without credentials still reach the server's own routes.
    pub fn absolute_form_route<B>(&self, req: &Request<B>) -> Option<Result<String, ConnectError>> {
        let uri = req.uri();
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?.as_str().to_owned();
        let (client, password) = basic_user_password(req.headers())?;
        if client.is_empty() || client.contains('/') {
            return Some(Err(ConnectError::NoCredentials));
        }
        if let Some(check) = &self.credentials {
            if !check.check(&client, &password) {
                return Some(Err(ConnectError::BadPassword(client)));
            }
        }
        Some(Ok(format!("{client}/http/{authority}{}", uri.path())))
    }

    /// The one-line answer for `error`, with a `Proxy-Authenticate` challenge on `407`.
    pub fn error_response(error: &ConnectError) -> Response<Body> {
        let status = error.status();
        let mut response = crate::text_response(status, format!("{error}\n"));
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            response.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rd\""),
            );
        }
        response
    }

    /// Checks the request, dials, and waits for the dial's outcome (see the module
    /// documentation); the target's first bytes, if any came, stay in the stream.
    async fn open<B>(
        &self,
        req: &Request<B>,
        authority: &str,
    ) -> Result<TunnelStream, ConnectError> {
        let has_port = req.uri().authority().and_then(|a| a.port_u16()).is_some();
        if authority.is_empty() || !has_port {
            return Err(ConnectError::BadTarget(authority.to_owned()));
        }
        let (client, password) =
            basic_user_password(req.headers()).ok_or(ConnectError::NoCredentials)?;
        self.authorize(&client, &password)?;
        self.dial_for(&client, authority, "connect").await
    }

    /// Whether `password` admits the caller to agent `client` (any password does without
    /// [`credentials`](Self::credentials)); an empty client key never does. CONNECT and
    /// SOCKS5 ask the same question.
    pub(crate) fn authorize(&self, client: &str, password: &str) -> Result<(), ConnectError> {
        if client.is_empty() {
            return Err(ConnectError::NoCredentials);
        }
        if let Some(check) = &self.credentials {
            if !check.check(client, password) {
                return Err(ConnectError::BadPassword(client.to_owned()));
            }
        }
        Ok(())
    }

    /// Dials `target` (`host:port`) over `tcp` through agent `client`, labelling the stream
    /// `label`, and waits for the dial's outcome: the path CONNECT and SOCKS5 share.
    pub(crate) async fn dial_for(
        &self,
        client: &str,
        target: &str,
        label: &'static str,
    ) -> Result<TunnelStream, ConnectError> {
        // Brackets of an IPv6 literal stay: the agent's Go-style dialer expects them.
        let tunnel = self
            .server
            .dialer(client)
            .labeled(label)
            .dial("tcp", target)
            .await?;
        // With a Go agent no news within connect_wait is good news (most targets wait for
        // the client to speak); an rd agent says, within the dial timeout.
        let outcome = tunnel.established(self.connect_wait);
        match tokio::time::timeout(self.dial_timeout, outcome).await {
            Ok(Ok(())) => Ok(tunnel),
            Ok(Err(e)) => Err(ConnectError::Refused(rd_session::error_chain(&e))),
            Err(_elapsed) => Err(ConnectError::Timeout(self.dial_timeout)),
        }
    }

    /// The server whose tunnels this proxy uses.
    pub(crate) fn server(&self) -> &Server {
        &self.server
    }
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// User name and password of `Proxy-Authorization: Basic`.
fn basic_user_password(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_str(value).expect("valid header"),
        );
        h
    }

    #[test]
    fn basic_credentials_are_decoded() {
        // curl -x http://foo@host sends "foo:".
        assert_eq!(
            basic_user_password(&headers("Basic Zm9vOg==")),
            Some(("foo".into(), String::new()))
        );
        assert_eq!(
            basic_user_password(&headers("basic Zm9vOmE6Yg==")),
            Some(("foo".into(), "a:b".into()))
        );
        assert_eq!(basic_user_password(&headers("Bearer Zm9vOg==")), None);
        assert_eq!(basic_user_password(&headers("Basic !!!")), None);
        assert_eq!(basic_user_password(&http::HeaderMap::new()), None);
    }

    #[test]
    fn absolute_form_requests_with_credentials_map_to_the_client_route() {
        let proxy = ConnectProxy::new(crate::Server::builder(crate::TunnelIdHeader).build());
        let req = |uri: &str, auth: Option<&str>| {
            let mut b = Request::get(uri);
            if let Some(a) = auth {
                b = b.header(header::PROXY_AUTHORIZATION, a);
            }
            b.body(()).expect("valid request")
        };
        let route = proxy.absolute_form_route(&req(
            "http://127.0.0.1:8125/a/b.txt?x=1",
            Some("Basic Zm9vOg=="),
        ));
        assert_eq!(route, Some(Ok("foo/http/127.0.0.1:8125/a/b.txt".into())));
        // Without credentials, or in origin form, the server's own routes answer.
        assert_eq!(
            proxy.absolute_form_route(&req("http://127.0.0.1:8123/metrics", None)),
            None
        );
        assert_eq!(
            proxy.absolute_form_route(&req("/metrics", Some("Basic Zm9vOg=="))),
            None
        );
        let checked = proxy.credentials(|_: &str, p: &str| p == "s");
        assert_eq!(
            checked.absolute_form_route(&req("http://h:1/", Some("Basic Zm9vOg=="))),
            Some(Err(ConnectError::BadPassword("foo".into())))
        );
    }

    #[test]
    fn errors_map_to_statuses_and_one_line() {
        assert_eq!(
            ConnectError::Dial(DialError::NoSession("foo".into())).to_string(),
            "failed to find Session for client foo"
        );
        assert_eq!(
            ConnectError::Dial(DialError::NoSession("foo".into())).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ConnectError::NoCredentials.status(),
            StatusCode::PROXY_AUTHENTICATION_REQUIRED
        );
        assert!(!ConnectError::NoCredentials.to_string().contains('\n'));
    }
}
