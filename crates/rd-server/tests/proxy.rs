//! The example's `/client/{id}/{scheme}/{host}/{path}` proxy route over a real tunnel:
//! large bodies both ways, query strings, and its error answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use rd_server::{Server, TunnelIdHeader};

/// Large transfers get a longer bound than [`BOUND`]: debug builds on a busy machine.
const TRANSFER_BOUND: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_64_mib_is_byte_exact() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = spawn_http_service().await;
    const LEN: u64 = 64 << 20;

    let fetch = async {
        let response = request(
            ts.addr,
            "GET",
            &format!("/client/foo/http/{service}/big/{LEN}"),
            empty(),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers().get("content-length").unwrap(),
            &LEN.to_string()
        );
        hash_body(response.into_body()).await
    };
    let got = tokio::time::timeout(TRANSFER_BOUND, fetch).await.unwrap();
    assert_eq!(got, PatternBody::digest(LEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_16_mib_post_reaches_the_service_intact() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = spawn_http_service().await;
    const LEN: u64 = 16 << 20;

    let post = async {
        let response = request(
            ts.addr,
            "POST",
            &format!("/client/foo/http/{service}/hash"),
            PatternBody::new(LEN).boxed(),
        )
        .await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = tokio::time::timeout(TRANSFER_BOUND, post).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (len, sha) = PatternBody::digest(LEN);
    assert_eq!(body, format!("{len} {sha}"));
}

#[tokio::test]
async fn query_string_passes_through_without_timeout() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = spawn_http_service().await;

    let (status, body) = get_text(
        ts.addr,
        &format!("/client/foo/http/{service}/q/x?a=1&timeout=5&b=two%20words"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, "GET /q/x query=a=1&b=two%20words");

    let (status, body) = get_text(ts.addr, &format!("/client/foo/http/{service}?timeout=3")).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "GET / query="));

    let (status, body) = get_text(
        ts.addr,
        &format!("/client/foo/http/{service}/?timeout=soon"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn unknown_client_is_500_failed_to_find_session() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let (status, body) = get_text(ts.addr, "/client/nobody/http/127.0.0.1:8125/x").await;
    assert_eq!(status, 500);
    assert_eq!(body, "failed to find Session for client nobody\n");
}

#[tokio::test]
async fn refused_target_is_502_connection_refused() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let port = closed_port();
    let (status, body) = get_text(ts.addr, &format!("/client/foo/http/127.0.0.1:{port}/x")).await;
    assert_eq!(status, 502, "{body}");
    // Go's dial error alone, one line: no hyper layers in front of it.
    assert_eq!(
        body,
        format!("dial tcp 127.0.0.1:{port}: connect: connection refused\n")
    );
    // The tunnel is unharmed.
    let service = spawn_http_service().await;
    let (status, _) = get_text(ts.addr, &format!("/client/foo/http/{service}/ok")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn pooled_connections_do_not_outlive_a_reconnect() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let service = spawn_http_service().await;
    let path = format!("/client/foo/http/{service}/again");
    // Leaves an idle keep-alive connection through the first session in the proxy's pool.
    assert_eq!(get_text(ts.addr, &path).await.0, 200);

    assert_eq!(ts.server.disconnect("foo"), 1);
    let server = ts.server.clone();
    wait_until("the client's second session", || {
        server.metrics().sessions.get() == 1
            && sample(
                &server.encode_metrics(),
                "session_server_total_add_websocket_session{clientkey=\"foo\",peer=\"false\"}",
            ) == Some(2.0)
    })
    .await;
    // The very first request after the reconnect must not land on the dead pooled stream.
    let (status, body) = get_text(ts.addr, &path).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "GET /again query="));
}

#[tokio::test]
async fn timeout_bounds_the_wait_for_response_headers() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    // Accepts, reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let started = std::time::Instant::now();
    let (status, body) = get_text(ts.addr, &format!("/client/foo/http/{silent}/x?timeout=1")).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("no response"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// `rd_dial_seconds` runs until the far side answers: a target whose dial takes 300 ms on
/// the client's side is seen as taking at least that (it used to time only queuing the
/// Connect, well under a millisecond whatever the target did).
#[tokio::test]
async fn dial_latency_histogram_sees_a_slow_target_as_slow() {
    const SLOW: Duration = Duration::from_millis(300);
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let service = spawn_http_service().await;
    let slow_dialer = |target: &rd_proto::Target| {
        let address = target.address().to_owned();
        async move {
            // The injected fault: a slow network on the client's side.
            tokio::time::sleep(SLOW).await;
            let stream = tokio::net::TcpStream::connect(address).await?;
            Ok(Box::new(stream) as rd_session::BoxedIo)
        }
    };
    let client = agent(&ts.ws_url(), "slow")
        .local_dialer(slow_dialer)
        .build();
    let _running = RunningClient::spawn(client);
    let server = ts.server.clone();
    wait_until("the client's session", || server.has_session("slow")).await;
    let (status, body) = get_text(ts.addr, &format!("/client/slow/http/{service}/ok")).await;
    assert_eq!(status, 200, "{body}");
    let metrics = ts.server.encode_metrics();
    assert_eq!(
        sample(&metrics, "rd_dial_seconds_count"),
        Some(1.0),
        "{metrics}"
    );
    let sum = sample(&metrics, "rd_dial_seconds_sum").unwrap();
    assert!(
        sum >= SLOW.as_secs_f64(),
        "dial seen as {sum} s:\n{metrics}"
    );
}
