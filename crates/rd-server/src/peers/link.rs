//! One outgoing peer link: dial the peer as a client, announce our clients on it, serve the
//! Connects it routes to us, redial with backoff until cancelled.

use std::time::Instant;

use http::{HeaderMap, HeaderValue, StatusCode};
use rd_session::transport::{connect_websocket_with_headers, ConnectError};
use rd_session::{Backoff, SessionBuilder};
use tokio_util::sync::CancellationToken;

use super::{LinkKey, PeerSet};
use crate::headers::{ASK_SERVER_ID_HEADER, PEER_ID_HEADER, PEER_TOKEN_HEADER, SERVER_ID_HEADER};

/// The id an rd server gave in its handshake answer, if any.
fn server_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SERVER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

pub(super) async fn run(set: PeerSet, key: LinkKey, url: String, cancel: CancellationToken) {
    let Some(own) = set.identity().cloned() else {
        return;
    };
    let shared = &set.0;
    let metrics = shared.metrics.clone();
    let label = key.label();
    let mut options = shared.settings.connect.clone();
    let headers = [
        (PEER_ID_HEADER, own.id.as_str()),
        (PEER_TOKEN_HEADER, own.token.as_str()),
        // Asks an rd server for its id; a Go server ignores it.
        (ASK_SERVER_ID_HEADER, "1"),
    ];
    for (name, value) in headers {
        match HeaderValue::from_str(value) {
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
        metrics.peer_attempt(&label);
        let connected = tokio::select! {
            r = connect_websocket_with_headers(&url, &options) => r,
            () = cancel.cancelled() => break,
        };
        match connected {
            Ok((ws, extensions, headers)) => {
                let peer_id = server_id(&headers);
                set.learned(&key, peer_id.clone());
                metrics.peer_connected(&label);
                tracing::info!(
                    peer_id = peer_id.as_deref(),
                    flow_control = extensions.flow_control(),
                    half_close = extensions.half_close,
                    "connected to peer"
                );
                let started = Instant::now();
                let session = SessionBuilder::client()
                    .config(shared.settings.session.clone())
                    .extensions(extensions)
                    .connect_handler_arc((shared.settings.connects)(&extensions))
                    .spawn(ws);
                let live = set.link_up(&key, session.clone());
                let mut notices = session.notices();
                // A GoAway that came before we subscribed counts too.
                notices.mark_changed();
                let end = loop {
                    tokio::select! {
                        end = session.closed() => break Some(end),
                        () = cancel.cancelled() => break None,
                        // The peer said it is going away (it drains): it is no longer a
                        // replica our agents should hold a session with.
                        Ok(()) = notices.changed() => {
                            if notices.borrow_and_update().going_away.is_some() {
                                tracing::info!("peer is going away (draining)");
                                set.recount();
                            }
                        }
                    }
                };
                set.link_down(live);
                session.close();
                metrics.peer_disconnected(&label);
                match end {
                    Some(end) => tracing::warn!(reason = %end, "peer link ended"),
                    None => tracing::info!("peer link stopped"),
                }
                backoff.session_ended(started.elapsed());
            }
            Err(ConnectError::Rejected {
                status, headers, ..
            }) if status == StatusCode::CONFLICT
                && server_id(&headers).as_deref() == Some(own.id.as_str()) =>
            {
                tracing::info!("this address is this server: not peering with it");
                set.found_self(&key);
                return;
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
