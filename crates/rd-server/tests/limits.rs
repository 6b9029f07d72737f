//! Handshake-level limits: sessions per client key.
#![allow(clippy::unwrap_used)]

mod common;

use common::{agent, bounded, connected_agent, serve, wait_until};
use rd_client::ConnectError;
use rd_server::{Server, TunnelIdHeader};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn sessions_per_client_key_are_capped_with_429() {
    let ts = serve(
        Server::builder(TunnelIdHeader)
            .max_sessions_per_client(2)
            .build(),
    )
    .await;
    let _a = connected_agent(&ts, "foo").await;
    let _b = common::RunningClient::spawn(agent(&ts.ws_url(), "foo").build());
    let server = ts.server.clone();
    wait_until("two sessions for foo", || {
        rd_server_sessions(&server, "foo") == Some(2.0)
    })
    .await;

    // The third is refused at the handshake, with the reason and status a Go client logs.
    let third = agent(&ts.ws_url(), "foo").build();
    let err = bounded("third connect", third.connect(&CancellationToken::new()))
        .await
        .unwrap_err();
    let rd_client::ClientError::Connect(ConnectError::Rejected { status, body, .. }) = err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(status.as_u16(), 429);
    assert_eq!(body, "too many sessions for client foo: limit 2");
    assert!(ts
        .server
        .encode_metrics()
        .contains("rd_handshake_rejects{reason=\"too_many_sessions\"} 1"));

    // Other keys are not affected.
    let _other = connected_agent(&ts, "bar").await;
}

/// Sessions registered for `key`, from the Go counters (added minus removed).
fn rd_server_sessions(server: &Server, key: &str) -> Option<f64> {
    let text = server.encode_metrics();
    let added = common::sample(
        &text,
        &format!(
            "session_server_total_add_websocket_session{{clientkey=\"{key}\",peer=\"false\"}}"
        ),
    )?;
    let removed = common::sample(
        &text,
        &format!(
            "session_server_total_remove_websocket_session{{clientkey=\"{key}\",peer=\"false\"}}"
        ),
    )
    .unwrap_or(0.0);
    Some(added - removed)
}

/// Idle pooled tunnel streams of the `/client/` proxy are closed after the pool's idle
/// timeout (hyper-util needs an explicit timer for that; without it they lived as long as
/// the session, found by `make soak`).
#[tokio::test]
async fn idle_proxy_streams_are_released() {
    let server = Server::builder(TunnelIdHeader).build();
    let proxy = rd_server::proxy::ClientProxy::new(server.clone())
        .pool_idle_timeout(std::time::Duration::from_millis(200));
    let ts = common::serve_with_proxy(server, proxy).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = common::spawn_http_service().await;
    let (status, _) =
        common::get_text(ts.addr, &format!("/client/foo/http/{service}/big/10")).await;
    assert_eq!(status, 200);
    let server = ts.server.clone();
    let open = move || common::sample(&server.encode_metrics(), "rd_streams");
    assert_eq!(
        open(),
        Some(1.0),
        "the stream stays pooled right after the request"
    );
    wait_until("the idle pooled stream to be closed", || {
        open() == Some(0.0)
    })
    .await;
}

/// A websocket message above the server's limit ends that session with a precise reason and
/// is counted; the server keeps serving others.
#[tokio::test]
async fn oversize_message_ends_the_session_and_is_counted() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let ts = serve(
        Server::builder(TunnelIdHeader)
            .max_message_size(64 * 1024)
            .build(),
    )
    .await;
    let mut request = ts.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-tunnel-id", http::HeaderValue::from_static("big"));
    let (mut ws, _) = bounded("raw websocket", tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    let server = ts.server.clone();
    wait_until("the raw session", || server.has_session("big")).await;
    // Any payload: the size check comes before decoding.
    ws.send(Message::Binary(vec![0u8; 128 * 1024].into()))
        .await
        .ok();
    wait_until("the oversize session to end", || !server.has_session("big")).await;
    let text = ts.server.encode_metrics();
    assert!(
        text.contains("rd_limit_exceeded{limit=\"max_message_size\"} 1"),
        "{text}"
    );
    let _other = connected_agent(&ts, "foo").await;
}

/// Handshake admission: beyond `max_pending_handshakes` upgrades in progress, the server
/// answers 503 with Retry-After at once (and counts it), rather than queueing; a permit is
/// back once its session runs.
#[tokio::test]
async fn handshakes_beyond_the_admission_limit_get_503_with_retry_after() {
    let upgrade = http::Request::builder()
        .method("GET")
        .uri("/connect")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-tunnel-id", "a")
        .body(())
        .unwrap();
    // No room at all: every handshake is beyond the limit.
    let full = Server::builder(TunnelIdHeader)
        .max_pending_handshakes(0)
        .handshake_retry_after(std::time::Duration::from_millis(2500))
        .build();
    let refused = full.handle(upgrade).await;
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("3"),
        "whole seconds, rounded up"
    );
    let ts = serve(full).await;
    let err = bounded(
        "refused connect",
        agent(&ts.ws_url(), "b")
            .build()
            .connect(&CancellationToken::new()),
    )
    .await
    .unwrap_err();
    let rd_client::ClientError::Connect(ConnectError::Rejected { status, .. }) = err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(status.as_u16(), 503);
    assert!(ts
        .server
        .encode_metrics()
        .contains("rd_handshake_rejects{reason=\"overloaded\"} 2"));
    // One handshake at a time: sessions that finished their handshake do not hold a permit.
    let one = serve(
        Server::builder(TunnelIdHeader)
            .max_pending_handshakes(1)
            .build(),
    )
    .await;
    let _a = connected_agent(&one, "a").await;
    let _b = connected_agent(&one, "b").await;
    let _c = connected_agent(&one, "c").await;
    assert_eq!(one.server.list_clients().len(), 3);
}
