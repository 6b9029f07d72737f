//! Who may open a tunnel: the application's authorizer and the error writer.

use std::future::Future;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rd_session::BoxFuture;

use crate::Body;

/// The authorizer's verdict on an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Accept, registering the session under this client key.
    Client(String),
    /// Refuse: answered `401 failed authentication`.
    Unauthorized,
    /// Refuse credentials that are valid but not for what the client asks (a client
    /// certificate for another id): answered `403` with this text, which names the mismatch
    /// and never a secret.
    Forbidden(String),
    /// The authorizer failed: answered `400` with this text.
    Error(String),
}

/// Decides whether a websocket may connect and under which client key (Go's `Authorizer`).
/// Closures `Fn(&Parts) -> impl Future<Output = Authorization>` implement it; copy what you
/// need out of the request head before the `async` block.
pub trait Authorizer: Send + Sync + 'static {
    /// Judges the request head.
    fn authorize(&self, request: &Parts) -> BoxFuture<Authorization>;

    /// How an accepted client proved its key, as the admin API shows it: `none` (the key
    /// is taken as claimed), `agent-token`, `client-cert`, or `authorizer` (the application's own check,
    /// the default).
    fn method(&self) -> &'static str {
        "authorizer"
    }

    /// How this accepted request's client proved its key: [`method`](Self::method), unless
    /// the authorizer combines several (a client certificate, else a token).
    fn method_for(&self, request: &Parts) -> &'static str {
        let _ = request;
        self.method()
    }
}

impl<F, Fut> Authorizer for F
where
    F: Fn(&Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Authorization> + Send + 'static,
{
    fn authorize(&self, request: &Parts) -> BoxFuture<Authorization> {
        Box::pin(self(request))
    }
}

/// The example server's authorizer: the client key is the `X-Tunnel-ID` header; any
/// non-empty value is accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelIdHeader;

impl Authorizer for TunnelIdHeader {
    fn authorize(&self, request: &Parts) -> BoxFuture<Authorization> {
        let id = request
            .headers
            .get("x-tunnel-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        Box::pin(async move { id.map_or(Authorization::Unauthorized, Authorization::Client) })
    }

    fn method(&self) -> &'static str {
        "none"
    }
}

/// Writes a handshake failure (Go's `ErrorWriter`).
pub trait ErrorWriter: Send + Sync + 'static {
    /// The response for `status` with message `text`.
    fn write_error(&self, status: StatusCode, text: &str) -> Response<Body>;
}

/// Go's `DefaultErrorWriter`: the status, and the text as a plain body.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTextErrors;

impl ErrorWriter for PlainTextErrors {
    fn write_error(&self, status: StatusCode, text: &str) -> Response<Body> {
        text_response(status, text.to_owned())
    }
}

/// A plain-text response.
pub fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"aaa", b"aaa"));
        assert!(!constant_time_eq(b"aaa", b"aab"));
        assert!(!constant_time_eq(b"aaa", b"aa"));
    }
}
