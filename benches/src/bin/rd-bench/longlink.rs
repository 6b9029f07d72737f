//! Long links (issues 10 and 24): a relay that holds every chunk half a round trip in each
//! direction and paces what crosses it to a set rate, as a WAN link would (this machine's
//! kernel has no netem). Bulk downloads through a tunnel whose websocket crosses such a
//! link, with the credit extension and with plain Pause/Resume, against a plain TCP relay
//! chain through a link of the same kind; at two round trips, one stream and eight.

use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::load::{self, BoxError, Path};
use crate::procs::Proc;
use crate::report::Row;

/// The link's rate, each direction: 100 MB/s, 0.8 Gbit/s.
pub const RATE: u64 = 100_000_000;
/// Bytes the link holds per direction, queued or on the wire (a router's buffer plus what
/// propagates). 64 MiB is more than the bandwidth-delay product of either round trip
/// (5 MB at 50 ms, 20 MB at 200 ms), so it never limits a sender that keeps it busy.
pub const BUFFER: usize = 64 << 20;
/// The round trips measured (`RD_LONGLINK_RTTS`, milliseconds, to change them).
pub const RTTS_MS: [u64; 2] = [50, 200];
/// Streams at once (`RD_LONGLINK_STREAMS` to change them).
pub const STREAMS: [usize; 2] = [1, 8];

/// One direction of a link, shared by every connection that crosses it: the bytes it may
/// still take, and when its serializer is next free.
#[derive(Debug)]
struct Direction {
    room: Semaphore,
    next_free: Mutex<Instant>,
}

impl Direction {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            room: Semaphore::new(BUFFER),
            next_free: Mutex::new(Instant::now()),
        })
    }

    /// When a chunk of `len` bytes that entered now has crossed the serializer: after
    /// everything before it, at `RATE`.
    fn serialize(&self, len: usize) -> Instant {
        let mut next = self.next_free.lock().expect("link lock");
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(len as f64 / RATE as f64);
        *next
    }
}

/// Copies `from` to `to` across `dir`: each chunk leaves the serializer at the link's rate
/// and arrives `delay` later; the link holds at most `BUFFER` bytes.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Arc<Direction>,
    delay: Duration,
) {
    // Unbounded: the link's room (a semaphore of BUFFER bytes) bounds what it holds.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer_dir = dir.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            writer_dir.room.add_permits(chunk.len());
        }
        to.shutdown().await.ok();
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(permit) = dir.room.acquire_many(n as u32).await else {
            break;
        };
        permit.forget();
        let due = dir.serialize(n) + delay;
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    writer.await.ok();
}

/// A relay to `upstream` across one emulated link of round trip `rtt`: every connection
/// through it shares the link's rate and buffer, each direction on its own.
pub async fn delaying_relay(listener: TcpListener, upstream: SocketAddr, rtt: Duration) {
    let (up_dir, down_dir) = (Direction::new(), Direction::new());
    while let Ok((down, _)) = listener.accept().await {
        let (up_dir, down_dir) = (up_dir.clone(), down_dir.clone());
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            down.set_nodelay(true).ok();
            up.set_nodelay(true).ok();
            let (down_r, down_w) = down.into_split();
            let (up_r, up_w) = up.into_split();
            tokio::join!(
                delayed_copy(down_r, up_w, up_dir, rtt / 2),
                delayed_copy(up_r, down_w, down_dir, rtt / 2)
            );
        });
    }
}

/// What one round trip and stream count measured (MB/s, all streams together).
#[derive(Debug, Default, Clone, Copy)]
pub struct LongLinkResult {
    pub rtt_ms: u64,
    pub streams: usize,
    pub relay: f64,
    pub credit: f64,
    pub pause: f64,
    /// Bytes per stream.
    pub size: u64,
}

async fn spawn_relay(upstream: SocketAddr, rtt: Option<Duration>) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    match rtt {
        Some(rtt) => tokio::spawn(delaying_relay(listener, upstream, rtt)),
        None => tokio::spawn(load::relay(listener, upstream)),
    };
    Ok(addr)
}

fn list_from_env<T: std::str::FromStr + Copy>(name: &str, default: &[T]) -> Vec<T> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<T>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
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
) -> Result<Vec<LongLinkResult>, BoxError> {
    let mut results = Vec::new();
    for rtt_ms in list_from_env("RD_LONGLINK_RTTS", &RTTS_MS) {
        let rtt = Duration::from_millis(rtt_ms);
        // The agents' websockets cross one link; the relay chain crosses another like it.
        let link = spawn_relay(server, Some(rtt)).await?;
        let connect = format!("ws://{link}/connect");
        let client = bin_dir.join("rd-client");
        let (credit_id, pause_id) = (
            format!("long-credit-{rtt_ms}"),
            format!("long-pause-{rtt_ms}"),
        );
        let mut agents = Vec::new();
        for (id, flow) in [(&credit_id, "credit"), (&pause_id, "pause")] {
            agents.push(Proc::spawn(
                "rd-client",
                &client,
                &["--connect", &connect, "--id", id, "--flow-control", flow],
                work_dir,
                false,
            )?);
        }
        // The relay chain: the load generator -> relay -> long link -> rd-dummy.
        let far = spawn_relay(dummy, Some(rtt)).await?;
        let near = spawn_relay(far, None).await?;
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
                prefix: format!("/client/{credit_id}/http/{dummy}"),
                connect: None,
            },
            Path {
                name: "pause",
                addr: server,
                prefix: format!("/client/{pause_id}/http/{dummy}"),
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
        for streams in list_from_env("RD_LONGLINK_STREAMS", &STREAMS) {
            let mut speeds = [0.0; 3];
            for (i, p) in paths.iter().enumerate() {
                let r = load::bulk(p, file, size, streams).await?;
                speeds[i] = if r.failed == 0 {
                    r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9)
                } else {
                    0.0
                };
                crate::say(format!(
                    "  {:<6} {:>7.1} MB/s, {streams} x {} MiB over a {rtt_ms} ms round trip{}",
                    p.name,
                    speeds[i],
                    size >> 20,
                    if r.failed > 0 { " (failed)" } else { "" }
                ));
            }
            results.push(LongLinkResult {
                rtt_ms,
                streams,
                relay: speeds[0],
                credit: speeds[1],
                pause: speeds[2],
                size,
            });
        }
        drop(agents);
    }
    Ok(results)
}

/// The table rows.
pub fn rows(results: &[LongLinkResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in results {
        let label = format!(
            "long link {} ms RTT, {} MB/s, {} x {} MiB",
            r.rtt_ms,
            RATE / 1_000_000,
            r.streams,
            r.size >> 20
        );
        rows.push(
            Row::new(&label, "throughput, credit", "MB/s")
                .paths(0.0, r.relay, r.credit)
                .target(
                    ">= 0.95 x relay, >= pause",
                    r.credit >= 0.95 * r.relay && r.credit >= r.pause,
                )
                .note(
                    "the relay chain crosses a link like the tunnel's (same delay, rate and \
                     buffer); direct is not measured",
                ),
        );
        rows.push(
            Row::new(&label, "throughput, Pause/Resume", "MB/s")
                .paths(0.0, r.relay, r.pause)
                .target(">= 0.8 x relay", r.pause >= 0.8 * r.relay),
        );
    }
    rows
}
