//! The `/client/{id}/https/...` route: TLS to the target through the tunnel, with the target's
//! certificate verified (Go's example does this through `http.Transport`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{connected_agent, get_text, serve_with_proxy};
use http::StatusCode;
use rd_client::TlsOptions;
use rd_server::proxy::ClientProxy;
use rd_server::{Server, TunnelIdHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA certificate and a server config for `127.0.0.1` and `localhost` signed by it.
fn test_pki() -> (
    rustls_pki_types::CertificateDer<'static>,
    Arc<rustls::ServerConfig>,
) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rd test ca");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    (ca_cert.der().clone(), Arc::new(config))
}

/// An https server answering every request with `secret`.
async fn spawn_https(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let reply =
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret";
                tls.write_all(reply).await.ok();
                tls.shutdown().await.ok();
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_targets_are_reached_over_tls_and_verified() {
    let (ca, server_config) = test_pki();
    let target = spawn_https(server_config).await;

    // Trusting the test CA: the request goes through, TLS inside the tunnel.
    let server = Server::builder(TunnelIdHeader).build();
    let mut tls = TlsOptions::default().with_system_roots(false);
    tls.ca_certs.push(ca);
    let ts = serve_with_proxy(server.clone(), ClientProxy::new(server).tls_options(tls)).await;
    let _agent = connected_agent(&ts, "foo").await;
    let (status, body) = get_text(ts.addr, &format!("/client/foo/https/{target}/x")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "secret"));

    // Not trusting it: refused, with the certificate error in the answer.
    let server = Server::builder(TunnelIdHeader).build();
    let tls = TlsOptions::default().with_system_roots(false);
    let ts = serve_with_proxy(server.clone(), ClientProxy::new(server).tls_options(tls)).await;
    let _agent = connected_agent(&ts, "foo").await;
    let (status, body) = get_text(ts.addr, &format!("/client/foo/https/{target}/x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("certificate") || body.contains("UnknownIssuer"),
        "{body}"
    );
}
