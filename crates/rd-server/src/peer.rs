//! HA peering: a link to every other server, announcing our clients and serving theirs.

use std::time::Instant;

use http::HeaderValue;
use rd_proto::Target;
use rd_session::{Backoff, BoxFuture, BoxedIo, ConnectHandler, ConnectRefused, SessionBuilder};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::server::{Server, PEER_ID_HEADER, PEER_TOKEN_HEADER};

/// A registered peer and its running link.
#[derive(Debug)]
pub(crate) struct PeerLink {
    pub(crate) url: String,
    pub(crate) token: String,
    cancel: CancellationToken,
}

pub(crate) fn add(server: &Server, url: String, id: String, token: String) {
    let Some((own_id, own_token)) = server.inner.peer_identity.clone() else {
        tracing::warn!(peer = %id, "ignoring peer: this server has no peer id and token");
        return;
    };
    let mut peers = server.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = peers.get(&id) {
        if existing.url == url && existing.token == token {
            return;
        }
        existing.cancel.cancel();
    }
    let cancel = server.inner.shutdown.child_token();
    peers.insert(
        id.clone(),
        PeerLink {
            url: url.clone(),
            token,
            cancel: cancel.clone(),
        },
    );
    let span = tracing::info_span!(parent: None, "peer", peer = %id, %url);
    let link = run_link(server.clone(), url, id, own_id, own_token, cancel);
    tokio::spawn(link.instrument(span));
}

pub(crate) fn remove(server: &Server, id: &str) {
    let mut peers = server.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(link) = peers.remove(id) {
        link.cancel.cancel();
    }
}

/// Dials peer-routed Connects (`clientKey::proto/address`) through our own dialer.
struct PeerConnects(Server);

impl ConnectHandler for PeerConnects {
    fn connect(&self, target: Target) -> BoxFuture<Result<BoxedIo, ConnectRefused>> {
        let server = self.0.clone();
        Box::pin(async move {
            let Some(client_key) = target.client_key() else {
                return Err(ConnectRefused(format!(
                    "invalid clientKey/proto: {}",
                    target.network()
                )));
            };
            let stream = server
                .dialer(client_key)
                .dial_target(target.without_route())
                .await
                .map_err(|e| ConnectRefused(e.to_string()))?;
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

async fn run_link(
    server: Server,
    url: String,
    id: String,
    own_id: String,
    own_token: String,
    cancel: CancellationToken,
) {
    let metrics = server.metrics().clone();
    let mut options = server.inner.peer_connect.clone();
    let headers = [(PEER_ID_HEADER, own_id), (PEER_TOKEN_HEADER, own_token)];
    for (name, value) in headers {
        match HeaderValue::from_str(&value) {
            Ok(v) => {
                options.headers.insert(name, v);
            }
            Err(_) => {
                tracing::error!("peer id or token is not a valid header value; not peering");
                return;
            }
        }
    }
    let mut backoff = Backoff::default();
    while !cancel.is_cancelled() {
        metrics.peer_attempt(&id);
        let connected = tokio::select! {
            r = rd_session::transport::connect_websocket_negotiated(&url, &options) => r,
            () = cancel.cancelled() => break,
        };
        match connected {
            Ok((ws, extensions)) => {
                metrics.peer_connected(&id);
                tracing::info!(
                    flow_control = extensions.flow_control(),
                    half_close = extensions.half_close,
                    "connected to peer"
                );
                let started = Instant::now();
                let session = SessionBuilder::client()
                    .config(server.inner.session_config.clone())
                    .extensions(extensions)
                    .connect_handler(PeerConnects(server.clone()))
                    .spawn(ws);
                let listener = server.registry().add_listener(session.clone());
                let end = tokio::select! {
                    end = session.closed() => Some(end),
                    () = cancel.cancelled() => None,
                };
                server.registry().remove_listener(listener);
                session.close();
                metrics.peer_disconnected(&id);
                match end {
                    Some(end) => tracing::warn!(reason = %end, "peer link ended"),
                    None => tracing::info!("peer link stopped"),
                }
                backoff.session_ended(started.elapsed());
            }
            Err(e) => {
                tracing::warn!(error = %rd_session::error_chain(&e), "Failed to connect to peer {url}");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => break,
        }
    }
}
