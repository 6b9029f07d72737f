//! Raw TCP through the tunnel: an rd-client as agent, a loopback echo, deterministic data,
//! one echo round, and curl run without the environment's proxy settings.

use std::net::SocketAddr;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Proc;

/// rd-client as agent `id` of the rd-server at `server`, with `extra` flags.
pub fn start_client(server: SocketAddr, id: &str, extra: &[&str]) -> Proc {
    let url = format!("ws://{server}/connect");
    let mut args = vec!["-connect", url.as_str(), "-id", id];
    args.extend_from_slice(extra);
    Proc::start("rd-client", &args)
}

/// A TCP echo on 127.0.0.1:0: each connection gets its bytes back until it ends.
pub async fn spawn_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                tokio::io::copy(&mut r, &mut w).await.ok();
            });
        }
    });
    addr
}

/// `len` bytes that differ with `seed` and along the buffer, so a lost, doubled or
/// misplaced chunk shows.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// Writes `data` to an echo on `tcp` while reading as many bytes back; returns them.
pub async fn echo_round(tcp: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tcp.split();
    let mut got = vec![0u8; data.len()];
    let (written, read) = tokio::join!(w.write_all(data), r.read_exact(&mut got));
    written.unwrap();
    read.unwrap();
    got
}

/// Runs curl (no proxy variables from the environment); returns success, stdout, stderr.
pub async fn curl(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20"]).args(&args);
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.output().expect("running curl (needed by these tests)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}
