//! A long link (issue 10): a relay that holds every chunk 25 ms in each direction, so what
//! crosses it sees a 50 ms round trip (this machine's kernel has no netem). One bulk
//! download through the tunnel whose websocket crosses it, with the credit extension and
//! with plain Pause/Resume, against a plain TCP relay chain through the same kind of relay.

use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::load::{self, BoxError, Path};
use crate::procs::Proc;
use crate::report::Row;

/// One-way delay of the relay.
pub const DELAY: Duration = Duration::from_millis(25);
/// Bytes the relay holds per direction: the link's window (a WAN's TCP window plays this
/// part). It bounds every path alike: at most this much per 25 ms, about 335 MB/s.
pub const IN_FLIGHT: usize = 8 << 20;

/// Copies `from` to `to`, delivering each chunk `DELAY` after it was read, with at most
/// `IN_FLIGHT` bytes on the way.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let writer_window = window.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            writer_window.add_permits(chunk.len());
        }
        to.shutdown().await.ok();
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(permit) = window.acquire_many(n as u32).await else {
            break;
        };
        permit.forget();
        if tx
            .send((Instant::now() + DELAY, buf[..n].to_vec()))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    writer.await.ok();
}

/// A relay to `upstream` whose every chunk arrives `DELAY` late, both ways.
pub async fn delaying_relay(listener: TcpListener, upstream: SocketAddr) {
    while let Ok((down, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            down.set_nodelay(true).ok();
            up.set_nodelay(true).ok();
            let (down_r, down_w) = down.into_split();
            let (up_r, up_w) = up.into_split();
            tokio::join!(delayed_copy(down_r, up_w), delayed_copy(up_r, down_w));
        });
    }
}

/// What one run measured (MB/s).
#[derive(Debug, Default, Clone, Copy)]
pub struct LongLinkResult {
    pub relay: f64,
    pub credit: f64,
    pub pause: f64,
    pub size: u64,
}

async fn spawn_relay(upstream: SocketAddr, delayed: bool) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    if delayed {
        tokio::spawn(delaying_relay(listener, upstream));
    } else {
        tokio::spawn(load::relay(listener, upstream));
    }
    Ok(addr)
}

/// Runs the scenario: `server` is rd-server's address, `dummy` rd-dummy's, `file` a file
/// of `size` bytes that rd-dummy serves.
pub async fn run(
    bin_dir: &FsPath,
    work_dir: &FsPath,
    server: SocketAddr,
    dummy: SocketAddr,
    file: &str,
    size: u64,
) -> Result<LongLinkResult, BoxError> {
    // The agents' websockets cross the long link.
    let link = spawn_relay(server, true).await?;
    let connect = format!("ws://{link}/connect");
    let client = bin_dir.join("rd-client");
    let mut agents = Vec::new();
    for (id, flow) in [("long-credit", "credit"), ("long-pause", "pause")] {
        agents.push(Proc::spawn(
            "rd-client",
            &client,
            &["--connect", &connect, "--id", id, "--flow-control", flow],
            work_dir,
            false,
        )?);
    }
    // The relay chain: the load generator -> relay -> long link -> rd-dummy.
    let far = spawn_relay(dummy, true).await?;
    let near = spawn_relay(far, false).await?;
    let paths = [
        Path {
            name: "relay",
            addr: near,
            prefix: String::new(),
            connect: None,
        },
        Path {
            name: "credit",
            addr: server,
            prefix: format!("/client/long-credit/http/{dummy}"),
            connect: None,
        },
        Path {
            name: "pause",
            addr: server,
            prefix: format!("/client/long-pause/http/{dummy}"),
            connect: None,
        },
    ];
    for p in &paths[1..] {
        let deadline = Instant::now() + Duration::from_secs(15);
        while load::fetch_once(p, "small.bin").await.is_err() {
            if Instant::now() > deadline {
                return Err(format!("{} never came up", p.name).into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut speeds = [0.0; 3];
    for (i, p) in paths.iter().enumerate() {
        let r = load::bulk(p, file, size, 1).await?;
        speeds[i] = if r.failed == 0 {
            r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9)
        } else {
            0.0
        };
        crate::say(format!(
            "  {:<6} {:>7.1} MB/s over a 50 ms round trip{}",
            p.name,
            speeds[i],
            if r.failed > 0 { " (failed)" } else { "" }
        ));
    }
    drop(agents);
    Ok(LongLinkResult {
        relay: speeds[0],
        credit: speeds[1],
        pause: speeds[2],
        size,
    })
}

/// The table rows.
pub fn rows(r: &LongLinkResult) -> Vec<Row> {
    let label = format!("long link 50 ms RTT, 1 x {} MiB", r.size >> 20);
    vec![
        Row::new(&label, "throughput, credit", "MB/s")
            .paths(0.0, r.relay, r.credit)
            .target(
                ">= 0.8 x relay, >= pause",
                r.credit >= 0.8 * r.relay && r.credit >= r.pause,
            )
            .note("the relay chain crosses the same delaying relay; direct is not measured"),
        Row::new(&label, "throughput, Pause/Resume", "MB/s")
            .paths(0.0, r.relay, r.pause)
            .target(">= 0.8 x relay", r.pause >= 0.8 * r.relay),
    ]
}
