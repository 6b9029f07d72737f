//! Port forwards and the CONNECT proxy as a library: stopping a forward leaves nothing
//! behind, the password check, and bytes a target sends before the `200`.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use common::*;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rd_server::connect::ConnectProxy;
use rd_server::forward::{Forward, ForwardSpec};
use rd_server::{text_response, Server, TunnelIdHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether the connection ends (EOF or error) within [`BOUND`].
async fn ends(tcp: &mut TcpStream) -> bool {
    let drain = async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(BOUND, drain).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_forward_closes_its_listener_and_connections_and_ends_its_tasks() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_echo(b"").await;
    let spec: ForwardSpec = format!("127.0.0.1:0=foo:tcp/{echo}").parse().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = Forward::new(ts.server.clone(), spec).spawn(listener);
    let addr = forward.local_addr().unwrap();

    let mut conns = Vec::new();
    for i in 0..5u8 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[i; 3]).await.unwrap();
        let mut got = [0u8; 3];
        bounded("an echo through the forward", tcp.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(got, [i; 3]);
        conns.push(tcp);
    }
    // The accept loop and one task per connection.
    assert_eq!(forward.tasks(), 6);

    bounded("stop() to return once every task has ended", forward.stop()).await;
    for (i, tcp) in conns.iter_mut().enumerate() {
        assert!(
            ends(tcp).await,
            "connection {i} survived the forward's stop"
        );
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener must be closed"
    );
    // The tunnel streams went with them.
    let server = ts.server.clone();
    wait_until("the session's streams to close", || {
        sample(&server.encode_metrics(), "rd_streams") == Some(0.0)
    })
    .await;
}

/// Serves `proxy` for CONNECT requests on 127.0.0.1:0.
async fn serve_connect(proxy: ConnectProxy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move {
                        Ok::<_, Infallible>(if req.method() == http::Method::CONNECT {
                            proxy.handle(req).await
                        } else {
                            text_response(StatusCode::NOT_FOUND, "not found\n".into())
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Sends `CONNECT target` with `auth`; returns the stream and the answer's head.
async fn connect(proxy: SocketAddr, target: SocketAddr, auth: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // Byte by byte, so nothing behind the head is consumed.
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = bounded("the CONNECT answer", tcp.read(&mut b))
            .await
            .unwrap();
        assert_eq!(n, 1, "closed in the head: {answer:?}");
        answer.push(b[0]);
    }
    (tcp, String::from_utf8(answer).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_checks_the_password_and_passes_on_what_the_target_says_first() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_echo(b"greetings\n").await;
    let proxy = serve_connect(
        ConnectProxy::new(ts.server.clone())
            .connect_wait(BOUND)
            .credentials(|key: &str, password: &str| key == "foo" && password == "secret"),
    )
    .await;

    // foo:wrong
    let (_tcp, head) = connect(proxy, echo, "Basic Zm9vOndyb25n").await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        head.to_lowercase().contains("proxy-authenticate: basic"),
        "{head}"
    );

    // foo:secret. The greeting ends the wait for the agent and arrives first.
    let (mut tcp, head) = connect(proxy, echo, "Basic Zm9vOnNlY3JldA==").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = [0u8; 10];
    bounded("the greeting", tcp.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"greetings\n");
    echo_ping(&mut tcp).await;
}

/// Sends `ping` through a tunnel to an echo target and reads it back.
async fn echo_ping(tcp: &mut TcpStream) {
    tcp.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    bounded("the echo", tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"ping");
}

/// A CONNECT through an rd agent is answered as soon as the agent's dial succeeded or
/// failed (connect-ack), whatever the wait for Go agents: here that wait is longer than the
/// test's bound, so a test that passes never waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_answers_when_an_rd_agent_has_dialed_not_after_the_wait() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    // The target waits for its client to speak, as HTTP and TLS servers do.
    let echo = spawn_echo(b"").await;
    let proxy = serve_connect(ConnectProxy::new(ts.server.clone()).connect_wait(BOUND * 10)).await;
    let (mut tcp, head) = connect(proxy, echo, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_ping(&mut tcp).await;

    // A refused dial is a 502 with the agent's text, as soon as the agent knows.
    let closed: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
    let (_tcp, head) = connect(proxy, closed, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

/// A Go-style agent (no connect-ack) keeps the configured wait: no answer before it runs
/// out unless the target speaks first, and a refusal within it is still a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_go_style_agent_keeps_the_wait() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let go_style = rd_session::Extensions {
        connect_ack: false,
        ..rd_session::Extensions::SUPPORTED
    };
    let _agent = RunningClient::spawn(agent(&ts.ws_url(), "foo").extensions(go_style).build());
    let server = ts.server.clone();
    wait_until("the client's session", || server.has_session("foo")).await;
    let proxy = serve_connect(ConnectProxy::new(ts.server.clone()).connect_wait(BOUND * 10)).await;

    // Silent target: the answer waits for the wait (beyond the bound here).
    let silent = spawn_echo(b"").await;
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "CONNECT {silent} HTTP/1.1\r\nHost: {silent}\r\nProxy-Authorization: Basic Zm9vOg==\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), tcp.read(&mut b)).await;
    assert!(
        early.is_err(),
        "answered before the wait ran out: {early:?}"
    );

    // A target that speaks first ends the wait; a refusal is a 502.
    let greeter = spawn_echo(b"hi\n").await;
    let (_tcp, head) = connect(proxy, greeter, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let closed: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
    let (_tcp, head) = connect(proxy, closed, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

/// Through a peer hop the answer is the far agent's verdict: the hop hands its stream back
/// at once and acknowledges only when the agent did, or passes on the agent's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_peer_answers_with_the_agents_verdict() {
    let (a, b) = peered_pair(|builder| builder.build()).await;
    let _agent = connected_agent(&b, "foo").await;
    let server = a.server.clone();
    wait_until("a to learn of foo through b", || server.has_session("foo")).await;
    let proxy = serve_connect(ConnectProxy::new(a.server.clone()).connect_wait(BOUND * 10)).await;
    let echo = spawn_echo(b"").await;
    let (mut tcp, head) = connect(proxy, echo, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_ping(&mut tcp).await;
    let closed: SocketAddr = format!("127.0.0.1:{}", closed_port()).parse().unwrap();
    let (mut tcp, head) = connect(proxy, closed, "Basic Zm9vOg==").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    // The one-line body (the connection stays open: HTTP/1.1 keep-alive).
    let mut body = Vec::new();
    while !body.ends_with(b"\n") {
        let mut b = [0u8; 1];
        bounded("the 502 body", tcp.read_exact(&mut b))
            .await
            .unwrap();
        body.push(b[0]);
    }
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("connection refused"),
        "the agent's text: {body}"
    );
}
