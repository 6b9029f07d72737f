//! The server library on loopback: authorizer and peer authentication, bad upgrades,
//! several sessions per client key, the session API, metrics and client-initiated Connects.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use http::{HeaderMap, HeaderValue};
use rd_client::{connect_websocket, BoxError, ConnectError, ConnectOptions, ProxyMode};
use rd_proto::Target;
use rd_server::{
    Authorization, Server, ServerBuilder, TunnelIdHeader, PEER_ID_HEADER, PEER_TOKEN_HEADER,
};
use rd_session::BoxedIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn options(headers: &[(&'static str, &str)]) -> ConnectOptions {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    ConnectOptions::default()
        .with_headers(map)
        .with_proxy(ProxyMode::None)
        .with_handshake_timeout(BOUND)
}

/// Authorizer of these tests: `x-auth: ok` is client `foo`, `x-auth: err` makes the
/// authorizer fail, `x-auth: other` is forbidden, anything else is refused.
async fn auth_server() -> TestServer {
    let server = Server::builder(|parts: &http::request::Parts| {
        let auth = parts
            .headers
            .get("x-auth")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        async move {
            match auth.as_deref() {
                Some("ok") => Authorization::Client("foo".into()),
                Some("err") => Authorization::Error("token lookup failed: backend down".into()),
                Some("other") => {
                    Authorization::Forbidden("certificate is for foo, agent asked for bar".into())
                }
                _ => Authorization::Unauthorized,
            }
        }
    })
    .build();
    serve(server).await
}

#[tokio::test]
async fn unauthorized_is_401_failed_authentication() {
    let ts = auth_server().await;
    for headers in [&[][..], &[("x-auth", "nope")][..]] {
        let err = connect_websocket(&ts.ws_url(), &options(headers))
            .await
            .unwrap_err();
        match &err {
            ConnectError::Rejected { status, body, .. } => {
                assert_eq!(status.as_u16(), 401);
                assert_eq!(body, "failed authentication");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.is_auth_failure());
    }
    assert!(ts.server.list_clients().is_empty());
    let metrics = ts.server.encode_metrics();
    assert_eq!(
        sample(&metrics, "rd_handshake_rejects{reason=\"unauthorized\"}"),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn authorizer_error_is_400_with_its_text() {
    let ts = auth_server().await;
    let err = connect_websocket(&ts.ws_url(), &options(&[("x-auth", "err")]))
        .await
        .unwrap_err();
    match &err {
        ConnectError::Rejected { status, body, .. } => {
            assert_eq!(status.as_u16(), 400);
            assert_eq!(body, "token lookup failed: backend down");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(!err.is_auth_failure());
    assert!(!ts.server.has_session("foo"));
}

#[tokio::test]
async fn forbidden_is_403_with_its_text_and_an_auth_failure() {
    let ts = auth_server().await;
    let err = connect_websocket(&ts.ws_url(), &options(&[("x-auth", "other")]))
        .await
        .unwrap_err();
    match &err {
        ConnectError::Rejected { status, body, .. } => {
            assert_eq!(status.as_u16(), 403);
            assert_eq!(body, "certificate is for foo, agent asked for bar");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.is_auth_failure());
    assert!(ts.server.list_clients().is_empty());
    let metrics = ts.server.encode_metrics();
    assert_eq!(
        sample(&metrics, "rd_handshake_rejects{reason=\"forbidden\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn authorized_client_gets_a_session_under_its_key() {
    let ts = auth_server().await;
    let _ws = connect_websocket(&ts.ws_url(), &options(&[("x-auth", "ok")]))
        .await
        .unwrap();
    let server = ts.server.clone();
    wait_until("session foo", || server.has_session("foo")).await;
    assert_eq!(ts.server.list_clients(), vec!["foo".to_owned()]);
    assert!(!ts.server.has_session("bar"));
}

#[tokio::test]
async fn bad_upgrade_is_a_4xx_naming_the_client() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    // A plain GET with valid credentials: authorized, but not a websocket handshake.
    let tcp = tokio::net::TcpStream::connect(ts.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/connect")
        .header("host", ts.addr.to_string())
        .header("x-tunnel-id", "foo")
        .body(empty())
        .unwrap();
    let response = bounded("bad upgrade", sender.send_request(req))
        .await
        .unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(status.is_client_error(), "status {status}");
    assert!(
        body.contains("Error during upgrade for host [foo]"),
        "body {body:?}"
    );
    assert!(!ts.server.has_session("foo"));
}

/// A server with peer identity `me`/`tok` that knows peer `other` with token `sekrit` (its
/// link to `other` points at a closed port and just keeps retrying).
async fn peering_server() -> TestServer {
    let server = Server::builder(TunnelIdHeader)
        .peer_identity("me", "tok")
        .build();
    server.add_peer(
        format!("ws://127.0.0.1:{}/connect", closed_port()),
        "other",
        "sekrit",
    );
    serve(server).await
}

#[tokio::test]
async fn peer_with_the_right_token_is_accepted_as_a_peer() {
    let ts = peering_server().await;
    let _ws = connect_websocket(
        &ts.ws_url(),
        &options(&[(PEER_ID_HEADER, "other"), (PEER_TOKEN_HEADER, "sekrit")]),
    )
    .await
    .unwrap();
    let server = ts.server.clone();
    let peer_sample =
        "session_server_total_add_websocket_session{clientkey=\"other\",peer=\"true\"}";
    wait_until("the peer session", || {
        sample(&server.encode_metrics(), peer_sample) == Some(1.0)
    })
    .await;
    // A peer is not a client.
    assert!(ts.server.list_clients().is_empty());
    assert!(!ts.server.has_session("other"));
}

#[tokio::test]
async fn wrong_peer_token_falls_through_to_the_authorizer() {
    let ts = peering_server().await;
    // No X-Tunnel-ID: the example authorizer refuses.
    let err = connect_websocket(
        &ts.ws_url(),
        &options(&[(PEER_ID_HEADER, "other"), (PEER_TOKEN_HEADER, "wrong")]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.rejected_status().map(|s| s.as_u16()),
        Some(401),
        "{err:?}"
    );
    // With X-Tunnel-ID the authorizer accepts it, as a client.
    let _ws = connect_websocket(
        &ts.ws_url(),
        &options(&[
            (PEER_ID_HEADER, "other"),
            (PEER_TOKEN_HEADER, "wrong"),
            ("x-tunnel-id", "agent"),
        ]),
    )
    .await
    .unwrap();
    let server = ts.server.clone();
    wait_until("client agent", || server.has_session("agent")).await;
    let metrics = ts.server.encode_metrics();
    assert!(
        !metrics.contains("peer=\"true\""),
        "no peer session expected: {metrics}"
    );
}

#[tokio::test]
async fn unknown_peer_id_is_not_a_peer() {
    let ts = peering_server().await;
    let err = connect_websocket(
        &ts.ws_url(),
        &options(&[(PEER_ID_HEADER, "stranger"), (PEER_TOKEN_HEADER, "sekrit")]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.rejected_status().map(|s| s.as_u16()),
        Some(401),
        "{err:?}"
    );
    // A server without a peer identity accepts no peers at all.
    let plain = serve(Server::builder(TunnelIdHeader).build()).await;
    plain
        .server
        .add_peer("ws://127.0.0.1:1/connect", "other", "sekrit");
    let err = connect_websocket(
        &plain.ws_url(),
        &options(&[(PEER_ID_HEADER, "other"), (PEER_TOKEN_HEADER, "sekrit")]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.rejected_status().map(|s| s.as_u16()),
        Some(401),
        "{err:?}"
    );
}

/// A client whose every Connect reaches an in-memory service that writes `name`.
fn named_agent(ts: &TestServer, name: &'static str, connects: Arc<AtomicUsize>) -> RunningClient {
    let client = agent(&ts.ws_url(), "foo")
        .local_dialer(move |_target: &Target| {
            connects.fetch_add(1, Ordering::SeqCst);
            async move {
                let (mut service, io) = tokio::io::duplex(1024);
                tokio::spawn(async move { service.write_all(name.as_bytes()).await });
                Ok::<BoxedIo, io::Error>(Box::new(io))
            }
        })
        .build();
    RunningClient::spawn(client)
}

async fn who_serves(server: &Server) -> String {
    let mut stream = server
        .dialer("foo")
        .dial("tcp", "127.0.0.1:9")
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    bounded("first byte", stream.read_exact(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn oldest_session_serves_until_it_drops() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let (a_count, b_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = named_agent(&ts, "A", a_count.clone());
    let server = ts.server.clone();
    wait_until("first session", || server.has_session("foo")).await;
    let _b = named_agent(&ts, "B", b_count.clone());
    wait_until("second session", || server.metrics().sessions.get() == 2).await;
    assert_eq!(ts.server.list_clients(), vec!["foo".to_owned()]);

    for _ in 0..3 {
        assert_eq!(who_serves(&ts.server).await, "A");
    }
    assert_eq!(
        (
            a_count.load(Ordering::SeqCst),
            b_count.load(Ordering::SeqCst)
        ),
        (3, 0)
    );

    a.stop().await;
    wait_until("first session gone", || {
        server.metrics().sessions.get() == 1
    })
    .await;
    assert!(ts.server.has_session("foo"));
    assert_eq!(who_serves(&ts.server).await, "B");
    assert_eq!(b_count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn disconnect_ends_the_clients_session() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let client = agent(&ts.ws_url(), "foo").build();
    // One attempt, no redial: the task ends when the session does.
    let attempt = tokio::spawn(async move { client.connect(&CancellationToken::new()).await });
    let server = ts.server.clone();
    wait_until("session foo", || server.has_session("foo")).await;
    assert_eq!(ts.server.list_clients(), vec!["foo".to_owned()]);
    assert_eq!(ts.server.disconnect("nobody"), 0);

    assert_eq!(ts.server.disconnect("foo"), 1);
    let end = bounded("client session end", attempt).await.unwrap();
    assert!(end.is_ok(), "{end:?}");
    wait_until("session foo removed", || !server.has_session("foo")).await;
    assert!(ts.server.list_clients().is_empty());
    let err = ts
        .server
        .dialer("foo")
        .dial("tcp", "127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "failed to find Session for client foo");
}

#[tokio::test]
async fn metrics_count_sessions_connections_and_bytes() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = spawn_http_service().await;
    let (status, body) = get_text(ts.addr, &format!("/client/foo/http/{service}/hello")).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "GET /hello query="));

    let m = ts.server.encode_metrics();
    let expect = |prefix: &str| sample(&m, prefix).unwrap_or_else(|| panic!("no {prefix} in\n{m}"));
    assert_eq!(
        expect("session_server_total_add_websocket_session{clientkey=\"foo\",peer=\"false\"}"),
        1.0
    );
    // Go's label names; the address is left out by default (an outsider chooses it).
    assert_eq!(
        expect("session_server_total_add_connections{clientkey=\"foo\",proto=\"tcp\",addr=\"\"}"),
        1.0
    );
    assert!(!m.contains(&service.to_string()), "{m}");
    assert_eq!(expect("rd_sessions"), 1.0);
    assert!(expect("session_server_total_transmit_bytes{clientkey=\"foo\"}") > 0.0);
    assert!(expect("session_server_total_receive_bytes{clientkey=\"foo\"}") > 0.0);
}

/// Go's protocol acknowledges no Connect: a target that fails shows only as the stream's
/// error, which may come after hyper took the connection as ready and before it sent the
/// request (a loaded machine). hyper then reads the error on what it sees as an idle
/// connection, drops it, and would fail the request with a bare "connection was not ready";
/// the `/client` proxy put that in its 502. The request must fail with the target's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_error_between_ready_and_the_request_is_the_requests_error() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri: http::Uri = format!("http://{}/", target.local_addr().unwrap())
        .parse()
        .unwrap();
    let mut dialer = ts.server.dialer("foo");
    let conn = bounded("the dial", tower_service::Service::call(&mut dialer, uri))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(conn).await.unwrap();
    tokio::spawn(connection);
    bounded("the connection to be ready", sender.ready())
        .await
        .unwrap();

    // Now the target fails: accepted, then reset.
    let (accepted, _) = bounded("the client's dial", target.accept()).await.unwrap();
    accepted.set_zero_linger().unwrap();
    drop(accepted);
    let server = ts.server.clone();
    wait_until("the error to reach the server's stream", || {
        sample(&server.encode_metrics(), "rd_dial_seconds_count") == Some(1.0)
    })
    .await;

    let request = http::Request::get("/")
        .header("host", "target")
        .body(empty())
        .unwrap();
    let err = bounded("the request to fail", sender.send_request(request))
        .await
        .expect_err("the target reset the connection");
    let chain = rd_session::error_chain(&err);
    assert!(chain.contains("reset"), "{chain}");
}

#[tokio::test]
async fn client_initiated_connect_is_refused_and_the_session_survives() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let (tx, mut rx) = mpsc::unbounded_channel::<io::Result<Vec<u8>>>();
    let client = agent(&ts.ws_url(), "foo")
        .on_connect(move |session, _ended| {
            let tx = tx.clone();
            async move {
                let mut stream = session.dial_addr("tcp", "127.0.0.1:9")?;
                let mut buf = Vec::new();
                let read = stream.read_to_end(&mut buf).await.map(|_| buf);
                tx.send(read).ok();
                Ok::<(), BoxError>(())
            }
        })
        .build();
    let _running = RunningClient::spawn(client);

    let read = bounded("the refused dial's result", rx.recv())
        .await
        .unwrap();
    let err = read.expect_err("the server must refuse client-initiated connects");
    assert!(err.to_string().contains("connect not allowed"), "{err}");

    // The session is still up and serves the server's dials.
    let echo = spawn_echo(b"hi:").await;
    let server = ts.server.clone();
    wait_until("session foo", || server.has_session("foo")).await;
    assert_eq!(echo_through(&ts.server, "foo", echo, 3).await, "hi:ping");
    assert_eq!(ts.server.metrics().sessions.get(), 1);
    assert!(
        rx.try_recv().is_err(),
        "the client must not have reconnected"
    );
}

#[tokio::test]
async fn client_initiated_connect_is_served_when_the_server_allows_it() {
    let echo = spawn_echo(b"server side:").await;
    let server = Server::builder(TunnelIdHeader)
        .client_connect(move |target: Target| async move {
            if target.address() != echo.to_string() {
                return Err(rd_session::ConnectRefused::not_allowed());
            }
            let tcp = tokio::net::TcpStream::connect(echo)
                .await
                .map_err(|e| rd_session::ConnectRefused::dial_failed(&target, &e))?;
            Ok::<BoxedIo, rd_session::ConnectRefused>(Box::new(tcp))
        })
        .build();
    let ts = serve(server).await;
    let (tx, mut rx) = mpsc::unbounded_channel::<io::Result<Vec<u8>>>();
    let client = agent(&ts.ws_url(), "foo")
        .on_connect(move |session, _ended| {
            let tx = tx.clone();
            async move {
                let mut stream = session.dial_addr("tcp", &echo.to_string())?;
                stream.write_all(b"ping").await?;
                let mut buf = vec![0u8; 16];
                let read = stream.read_exact(&mut buf).await.map(|_| buf);
                tx.send(read).ok();
                Ok::<(), BoxError>(())
            }
        })
        .build();
    let _running = RunningClient::spawn(client);
    let got = bounded("the client's dial", rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"server side:ping");
}

#[tokio::test]
async fn shutdown_closes_sessions_and_refuses_new_tunnels() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let client = agent(&ts.ws_url(), "foo").build();
    let attempt = tokio::spawn(async move { client.connect(&CancellationToken::new()).await });
    let server = ts.server.clone();
    wait_until("session foo", || server.has_session("foo")).await;

    bounded("shutdown", ts.server.shutdown(BOUND)).await;
    assert!(ts.server.is_idle());
    assert!(!ts.server.has_session("foo"));
    let end = bounded("the client's session end", attempt).await.unwrap();
    assert!(end.is_ok(), "{end:?}");

    let err = connect_websocket(&ts.ws_url(), &options(&[("x-tunnel-id", "late")]))
        .await
        .unwrap_err();
    assert_eq!(
        err.rejected_status().map(|s| s.as_u16()),
        Some(503),
        "{err:?}"
    );
}

#[tokio::test]
async fn peers_route_each_others_clients_until_the_link_is_removed() {
    let (a, b) = peered_pair(ServerBuilder::build).await;
    let _agent = connected_agent(&a, "foo").await;

    let server_b = b.server.clone();
    wait_until("b to learn foo from a", || server_b.has_session("foo")).await;
    assert!(b.server.list_clients().is_empty(), "foo is a's client");
    let echo = spawn_echo(b"hi:").await;
    assert_eq!(echo_through(&b.server, "foo", echo, 3).await, "hi:ping");
    // A failed dial at the far end reaches b's caller with its text, across both tunnels.
    let mut refused = b
        .server
        .dialer("foo")
        .dial("tcp", &format!("127.0.0.1:{}", closed_port()))
        .await
        .unwrap();
    let err = bounded(
        "refused dial via the peer",
        refused.read_to_end(&mut Vec::new()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    let m = a.server.encode_metrics();
    assert_eq!(
        sample(
            &m,
            "session_server_total_add_websocket_session{clientkey=\"b\",peer=\"true\"}"
        ),
        Some(1.0),
        "{m}"
    );

    // a stops its link to b: b forgets a's clients.
    a.server.remove_peer("b");
    wait_until("b to forget foo", || !server_b.has_session("foo")).await;
    let err = b
        .server
        .dialer("foo")
        .dial("tcp", "127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "failed to find Session for client foo");
    // a itself still serves foo.
    assert_eq!(echo_through(&a.server, "foo", echo, 3).await, "hi:ping");
}
