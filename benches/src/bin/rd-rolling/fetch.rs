//! One GET on a fresh connection, its body hashed: what a user's request through a
//! replica looks like to the harness.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use rd_benches::StreamHash;
use tokio::net::TcpStream;

/// A body that arrived whole.
#[derive(Debug, Clone, Copy)]
pub struct Got {
    pub len: u64,
    pub hash: u64,
}

/// Why a GET failed: `Refused` before any byte of a 200 (the request was turned away),
/// `Cut` after the 200 began (a transfer broken in flight).
#[derive(Debug, Clone)]
pub enum Failed {
    Refused(String),
    Cut(String),
}

/// GETs `path` from `server` (whole request bounded by `limit`).
pub async fn get(server: SocketAddr, path: &str, limit: Duration) -> Result<Got, Failed> {
    match tokio::time::timeout(limit, get_inner(server, path)).await {
        Ok(r) => r,
        Err(_) => Err(Failed::Cut(format!("no complete answer within {limit:?}"))),
    }
}

async fn get_inner(server: SocketAddr, path: &str) -> Result<Got, Failed> {
    let refused = |what: &str, e: &dyn std::fmt::Display| Failed::Refused(format!("{what}: {e}"));
    let tcp = TcpStream::connect(server)
        .await
        .map_err(|e| refused("connect", &e))?;
    tcp.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| refused("handshake", &e))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, server.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| refused("request", &e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| refused("no response", &e))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(Failed::Refused(format!("{} {text}", status.as_u16())));
    }
    let mut hash = StreamHash::new();
    while !body.is_end_stream() {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    hash.update(data);
                }
            }
            Some(Err(e)) => {
                return Err(Failed::Cut(format!(
                    "body broken after {} bytes: {e}",
                    hash.len()
                )))
            }
            None => break,
        }
    }
    Ok(Got {
        len: hash.len(),
        hash: hash.finish(),
    })
}
