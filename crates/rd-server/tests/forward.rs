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
    tcp.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    bounded("the echo", tcp.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"ping");
}
