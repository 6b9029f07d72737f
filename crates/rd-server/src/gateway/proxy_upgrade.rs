//! Upgrades through the `/client` route: a request with `Connection: upgrade` (websockets,
//! `kubectl exec`/`port-forward`'s SPDY or websocket streams) is sent on its own tunnel
//! stream with its upgrade headers, and on `101 Switching Protocols` both connections are
//! spliced as raw bytes. Such connections are never pooled.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::proxy_connector::{ProxyConnection, ProxyConnector};
use super::splice::splice;
use crate::text_response;
use crate::{Body, BoxError};

/// Whether `headers` ask for a protocol switch: an `Upgrade` header and the `upgrade` token
/// in `Connection`.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Headers of one hop that are not part of the upgrade itself.
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Drops the hop-by-hop headers (and any the `Connection` header names) but keeps the
/// upgrade: `Connection: upgrade` and `Upgrade`.
fn keep_only_upgrade_hop_headers(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|h| h != header::UPGRADE)
        .collect();
    for h in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(h);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Sends `req` (whose upgrade headers are intact) to `uri` over a new tunnel stream and, on
/// `101`, splices the client's connection to it. `timeout` bounds the dial and the wait for
/// the response head, as for other requests.
pub(crate) async fn forward<B>(
    mut connector: ProxyConnector,
    mut req: Request<B>,
    uri: Uri,
    host: &str,
    timeout: Duration,
) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    // On its own connection the request goes out in origin form.
    parts.uri = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    parts.version = http::Version::HTTP_11;
    keep_only_upgrade_hop_headers(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, host);
    }
    let request = Request::from_parts(parts, body.map_err(Into::into).boxed());
    let exchange = async {
        let conn = tower_service::Service::call(&mut connector, uri)
            .await
            .map_err(|e| rd_session::error_chain(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(conn)
            .await
            .map_err(|e| rd_session::error_chain(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection ended with an error");
            }
        });
        sender
            .send_request(request)
            .await
            .map_err(|e| rd_session::error_chain(&e))
    };
    let mut response = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return text_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response from {host} within {timeout:?}"),
            )
        }
        Ok(Err(text)) => return text_response(StatusCode::BAD_GATEWAY, text),
        Ok(Ok(response)) => response,
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: an ordinary response, and the stream is closed once its body is read.
        let (mut parts, body) = response.into_parts();
        for h in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            parts.headers.remove(h);
        }
        return Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
    }
    let target_upgrade = hyper::upgrade::on(&mut response);
    let (mut parts, _empty) = response.into_parts();
    keep_only_upgrade_hop_headers(&mut parts.headers);
    let host = host.to_owned();
    tokio::spawn(async move {
        match tokio::try_join!(client_upgrade, target_upgrade) {
            Ok((client, target)) => match splice_upgraded(client, target).await {
                Ok(()) => tracing::debug!(%host, "upgraded connection closed"),
                Err(e) => tracing::info!(%host, error = %e, "upgraded connection failed"),
            },
            Err(e) => tracing::debug!(%host, error = %e, "upgrade did not complete"),
        }
    });
    Response::from_parts(
        parts,
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// Copies raw bytes both ways between the client's and the target's upgraded connections.
async fn splice_upgraded(client: Upgraded, target: Upgraded) -> io::Result<()> {
    let mut local = TokioIo::new(client);
    match target.downcast::<ProxyConnection>() {
        Ok(parts) => {
            // Bytes the target sent right behind its 101 head.
            if !parts.read_buf.is_empty() {
                local.write_all(&parts.read_buf).await?;
            }
            match parts.io {
                ProxyConnection::Plain(conn) => splice(conn.into_inner(), local)
                    .await
                    .map(drop)
                    .map_err(|e| io::Error::other(rd_session::error_chain(&e))),
                ProxyConnection::Tls(tls, _) => {
                    let mut tls = tls.into_inner();
                    tokio::io::copy_bidirectional(&mut local, &mut tls)
                        .await
                        .map(drop)
                }
            }
        }
        Err(target) => tokio::io::copy_bidirectional(&mut local, &mut TokioIo::new(target))
            .await
            .map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(
            !wants_upgrade(&h),
            "Upgrade alone is not a request to switch"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h));
        h.remove(header::UPGRADE);
        assert!(!wants_upgrade(&h));
    }

    #[test]
    fn upgrade_headers_stay_and_other_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        keep_only_upgrade_hop_headers(&mut h);
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert!(h.get("x-hop").is_none());
        assert!(h.get(header::PROXY_AUTHORIZATION).is_none());
        assert!(h.get("sec-websocket-key").is_some());
    }
}
