//! Loopback tests of websocket connection establishment: plain, through an HTTP CONNECT proxy,
//! over TLS, and rejected upgrades.
#![allow(clippy::unwrap_used)]
// tungstenite's accept callback signature has a large error type that is not ours to shrink.
#![allow(clippy::result_large_err)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue};
use rd_session::transport::{
    connect_websocket, ConnectError, ConnectOptions, ConnectStage, ProxyEnv, ProxyMode, ProxyUrl,
    TlsOptions,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::{
    handshake::server::{Request, Response},
    protocol::Role,
    Message,
};

/// Bound for every test step; nothing here waits on it except on failure.
const BOUND: Duration = Duration::from_secs(10);

/// What the echo server saw in an upgrade request.
#[derive(Debug)]
struct SeenUpgrade {
    tunnel_id: Option<String>,
    host: Option<String>,
}

/// Accepts websockets (over whatever `wrap` turns the TCP stream into), reports each upgrade
/// request's headers, and echoes messages.
async fn spawn_echo_server<S, F, Fut>(wrap: F) -> (SocketAddr, mpsc::UnboundedReceiver<SeenUpgrade>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Some(stream) = wrap(tcp).await else {
                continue;
            };
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let header = |req: &Request, name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                };
                let callback = |req: &Request, resp: Response| {
                    let _ = seen_tx.send(SeenUpgrade {
                        tunnel_id: header(req, "x-tunnel-id"),
                        host: header(req, "host"),
                    });
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen_rx)
}

async fn spawn_plain_echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<SeenUpgrade>) {
    spawn_echo_server(|tcp| async move { Some(tcp) }).await
}

fn options_with_tunnel_id(id: &'static str) -> ConnectOptions {
    let mut headers = HeaderMap::new();
    headers.insert("x-tunnel-id", HeaderValue::from_static(id));
    ConnectOptions::default()
        .with_headers(headers)
        .with_proxy(ProxyMode::None)
        .with_handshake_timeout(BOUND)
}

async fn assert_echo<S>(ws: rd_session::WebSocketIo<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = ws.into_websocket_stream(Role::Client).await;
    ws.send(Message::text("hello")).await.unwrap();
    let reply = tokio::time::timeout(BOUND, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text("hello"));
}

#[tokio::test]
async fn plain_websocket_carries_headers_and_messages() {
    let (addr, mut seen) = spawn_plain_echo_server().await;
    let opts = options_with_tunnel_id("client-1");

    let ws = connect_websocket(&format!("ws://{addr}/connect"), &opts)
        .await
        .unwrap();
    assert!(ws.get_ref().tcp().nodelay().unwrap());
    assert_echo(ws).await;

    let upgrade = seen.recv().await.unwrap();
    assert_eq!(upgrade.tunnel_id.as_deref(), Some("client-1"));
    assert_eq!(upgrade.host, Some(addr.to_string()));

    // `http://` is accepted as an alias of `ws://`.
    let ws = connect_websocket(&format!("http://{addr}/connect"), &opts)
        .await
        .unwrap();
    assert_echo(ws).await;
}

/// What the test proxy saw.
#[derive(Debug)]
struct SeenConnect {
    request_line: String,
    host: Option<String>,
    proxy_authorization: Option<String>,
}

/// A minimal HTTP CONNECT proxy: whatever target is asked for, it connects to `upstream`
/// (so tests can use names that do not resolve), or refuses with `refuse_status`.
async fn spawn_connect_proxy(
    upstream: SocketAddr,
    refuse_status: Option<u16>,
) -> (SocketAddr, mpsc::UnboundedReceiver<SeenConnect>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut client).await;
                let mut lines = head.split("\r\n");
                let request_line = lines.next().unwrap().to_owned();
                let mut host = None;
                let mut proxy_authorization = None;
                for line in lines {
                    if let Some((name, value)) = line.split_once(':') {
                        let value = Some(value.trim().to_owned());
                        match name.to_ascii_lowercase().as_str() {
                            "host" => host = value,
                            "proxy-authorization" => proxy_authorization = value,
                            _ => {}
                        }
                    }
                }
                let _ = seen_tx.send(SeenConnect {
                    request_line,
                    host,
                    proxy_authorization,
                });
                if let Some(status) = refuse_status {
                    let response = format!(
                        "HTTP/1.1 {status} Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
                    );
                    let _ = client.write_all(response.as_bytes()).await;
                    return;
                }
                let mut server = TcpStream::connect(upstream).await.unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (addr, seen_rx)
}

/// Reads an HTTP request or response head, byte by byte so nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn fixed_proxy_url_tunnels_with_basic_auth() {
    let (echo, mut upgrades) = spawn_plain_echo_server().await;
    let (proxy, mut connects) = spawn_connect_proxy(echo, None).await;
    let proxy_url = ProxyUrl::parse(&format!("http://alice:s%3Acret@{proxy}")).unwrap();
    let opts = options_with_tunnel_id("via-proxy").with_proxy(ProxyMode::Url(proxy_url));

    // A fixed proxy URL applies even to loopback targets (Go's http.ProxyURL does too).
    let ws = connect_websocket(&format!("ws://{echo}/connect"), &opts)
        .await
        .unwrap();
    assert_echo(ws).await;

    let seen = connects.recv().await.unwrap();
    assert_eq!(seen.request_line, format!("CONNECT {echo} HTTP/1.1"));
    assert_eq!(seen.host, Some(echo.to_string()));
    // base64("alice:s:cret")
    assert_eq!(
        seen.proxy_authorization.as_deref(),
        Some("Basic YWxpY2U6czpjcmV0")
    );
    assert_eq!(
        upgrades.recv().await.unwrap().tunnel_id.as_deref(),
        Some("via-proxy")
    );
}

#[tokio::test]
async fn environment_proxy_is_used_for_remote_names() {
    let (echo, mut upgrades) = spawn_plain_echo_server().await;
    let (proxy, mut connects) = spawn_connect_proxy(echo, None).await;
    let proxy_value = format!("http://bob:pw@{proxy}");
    let env = ProxyEnv::from_lookup(&|name| match name {
        "HTTP_PROXY" => Some(proxy_value.clone()),
        "NO_PROXY" => Some("internal.example,10.0.0.0/8".to_owned()),
        _ => None,
    });
    let opts = options_with_tunnel_id("env").with_proxy(ProxyMode::Env(env));

    // The name is never resolved by the client: only the proxy sees it.
    let ws = connect_websocket("ws://tunnel.example/connect", &opts)
        .await
        .unwrap();
    assert_echo(ws).await;

    let seen = connects.recv().await.unwrap();
    assert_eq!(seen.request_line, "CONNECT tunnel.example:80 HTTP/1.1");
    assert_eq!(seen.proxy_authorization.as_deref(), Some("Basic Ym9iOnB3"));
    assert_eq!(
        upgrades.recv().await.unwrap().host.as_deref(),
        Some("tunnel.example")
    );

    // Loopback targets bypass the environment proxy, as in Go.
    let ws = connect_websocket(&format!("ws://{echo}/connect"), &opts)
        .await
        .unwrap();
    assert_echo(ws).await;
    assert!(connects.try_recv().is_err());
}

#[tokio::test]
async fn proxy_refusal_reports_status() {
    let (echo, _upgrades) = spawn_plain_echo_server().await;
    let (proxy, _connects) = spawn_connect_proxy(echo, Some(407)).await;
    let opts = options_with_tunnel_id("refused")
        .with_proxy(ProxyMode::Url(ProxyUrl::parse(&proxy.to_string()).unwrap()));

    let err = connect_websocket(&format!("ws://{echo}/connect"), &opts)
        .await
        .unwrap_err();
    match &err {
        ConnectError::ProxyRefused { status, target, .. } => {
            assert_eq!(*status, 407);
            assert_eq!(*target, echo.to_string());
        }
        other => panic!("unexpected error: {other:?}"),
    }
    assert!(err.to_string().contains("407"), "{err}");
}

/// A CA and a leaf certificate for `localhost` and `127.0.0.1` signed by it.
struct TestPki {
    ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rd test ca");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();

    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server_config: Arc::new(server_config),
    }
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rd-client-test-ca-{}-{:016x}.pem",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn wss_verifies_the_server_certificate() {
    let pki = test_pki();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&pki.server_config));
    let (addr, mut upgrades) = spawn_echo_server(move |tcp| {
        let acceptor = acceptor.clone();
        async move { acceptor.accept(tcp).await.ok() }
    })
    .await;
    let ca_file = TempFile::new(&pki.ca_pem);
    let port = addr.port();

    // Trusted through the extra CA file, by name and by IP address.
    let trusting =
        options_with_tunnel_id("tls").with_tls(TlsOptions::default().with_ca_file(&ca_file.0));
    for url in [
        format!("wss://localhost:{port}/connect"),
        format!("https://127.0.0.1:{port}/connect"),
    ] {
        let ws = connect_websocket(&url, &trusting).await.unwrap();
        assert!(matches!(
            ws.get_ref(),
            rd_session::transport::TransportStream::Tls(_)
        ));
        assert_echo(ws).await;
        assert_eq!(
            upgrades.recv().await.unwrap().tunnel_id.as_deref(),
            Some("tls")
        );
    }

    // Without the CA the certificate is not trusted.
    let default = options_with_tunnel_id("tls");
    let err = connect_websocket(&format!("wss://localhost:{port}/connect"), &default)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Tls { .. }),
        "unexpected error: {err:?}"
    );

    // Skipping verification accepts it.
    let insecure = options_with_tunnel_id("tls")
        .with_tls(TlsOptions::default().with_insecure_skip_verify(true));
    let ws = connect_websocket(&format!("wss://127.0.0.1:{port}/connect"), &insecure)
        .await
        .unwrap();
    assert_echo(ws).await;
}

#[tokio::test]
async fn unreadable_ca_file_is_reported_before_connecting() {
    let empty = TempFile::new("not a certificate\n");
    let opts = ConnectOptions::default()
        .with_proxy(ProxyMode::None)
        .with_tls(TlsOptions::default().with_ca_file(&empty.0));
    // Port 9 on loopback: never reached because the CA file is checked first.
    let err = connect_websocket("wss://127.0.0.1:9/", &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CaFile { .. }), "{err:?}");
}

/// Answers every request with `response`, written in one piece like Go's `http.Error`.
async fn spawn_http_responder(response: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_head(&mut tcp).await;
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn rejected_upgrade_reports_status_and_body() {
    let addr = spawn_http_responder(
        "HTTP/1.1 401 Unauthorized\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Content-Length: 21\r\n\r\n\
         failed authentication",
    )
    .await;
    let err = connect_websocket(
        &format!("ws://{addr}/connect"),
        &options_with_tunnel_id("bad"),
    )
    .await
    .unwrap_err();

    assert!(err.is_auth_failure(), "{err:?}");
    assert_eq!(err.rejected_status(), Some(http::StatusCode::UNAUTHORIZED));
    match &err {
        ConnectError::Rejected { body, .. } => assert_eq!(body, "failed authentication"),
        other => panic!("unexpected error: {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("401") && text.contains("failed authentication"),
        "{text}"
    );
}

#[tokio::test]
async fn other_rejections_are_not_auth_failures() {
    let addr =
        spawn_http_responder("HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad request")
            .await;
    let err = connect_websocket(&format!("ws://{addr}/"), &options_with_tunnel_id("x"))
        .await
        .unwrap_err();
    assert!(!err.is_auth_failure());
    assert_eq!(err.rejected_status(), Some(http::StatusCode::BAD_REQUEST));
}

#[tokio::test]
async fn silent_server_hits_the_handshake_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and hold the connection without ever answering.
    let holder = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(tcp);
    });
    let opts = options_with_tunnel_id("slow").with_handshake_timeout(Duration::from_millis(200));
    let err = connect_websocket(&format!("ws://{addr}/"), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Timeout {
                stage: ConnectStage::WebSocket,
                ..
            }
        ),
        "{err:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn closed_port_is_a_tcp_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = connect_websocket(&format!("ws://{addr}/"), &options_with_tunnel_id("x"))
        .await
        .unwrap_err();
    match err {
        ConnectError::Tcp { addr: tried, .. } => assert_eq!(tried, addr.to_string()),
        other => panic!("unexpected error: {other:?}"),
    }
}

#[tokio::test]
async fn invalid_urls_fail_early() {
    let opts = ConnectOptions::default().with_proxy(ProxyMode::None);
    for url in [
        "ftp://example.com/",
        "no scheme",
        "ws://user:pw@example.com/",
    ] {
        let err = connect_websocket(url, &opts).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::InvalidUrl { .. }),
            "{url}: {err:?}"
        );
    }
}

#[tokio::test]
async fn client_certificate_files_are_checked_before_connecting() {
    use rcgen::{CertificateParams, KeyPair};
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["agent".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_file = TempFile::new(&cert.pem());
    let other_key = TempFile::new(&KeyPair::generate().unwrap().serialize_pem());
    let not_pem = TempFile::new("not a certificate\n");
    let attempt = |cert: PathBuf, key: PathBuf| async move {
        let opts = ConnectOptions::default()
            .with_proxy(ProxyMode::None)
            .with_tls(TlsOptions::default().with_client_cert(cert, key));
        // Port 9 on loopback: never reached because the files are read first.
        connect_websocket("wss://127.0.0.1:9/", &opts)
            .await
            .unwrap_err()
    };
    for (cert, key, at_fault) in [
        (&not_pem.0, &other_key.0, &not_pem.0),
        (&cert_file.0, &not_pem.0, &not_pem.0),
        // A key that does not belong to the certificate.
        (&cert_file.0, &other_key.0, &other_key.0),
    ] {
        let err = attempt(cert.clone(), key.clone()).await;
        assert!(
            matches!(&err, ConnectError::ClientCert { path, .. } if path == at_fault),
            "{err:?}"
        );
    }
}
