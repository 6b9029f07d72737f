//! `rd-bench --only udp` (and a section of the full run): datagrams through a UDP forward
//! (issue 25) against a direct UDP path to the same echo.
//!
//! A UDP echo runs in this process; rd-server forwards a UDP port to it through rd-client
//! (`--forward ADDR=bench:udp/ECHO`, both release binaries as child processes). For each
//! rate, a fresh client socket sends 512-byte datagrams paced at that rate for 2 s
//! (scaled), each numbered, first straight to the echo, then through the forward, and
//! counts the distinct replies until 500 ms after the last send. The rows give the replies
//! per second and the share lost. UDP has no retransmission: what the forward cannot carry
//! (its flow's queue full while the tunnel is busy, a socket buffer overflowing) is lost,
//! not delayed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::load::BoxError;
use crate::procs::Proc;
use crate::report::Row;
use crate::say;

/// Payload of every datagram.
const SIZE: usize = 512;

/// The paced rates, datagrams per second.
const RATES: [u64; 2] = [20_000, 50_000];

/// What one paced run delivered.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    sent: u64,
    received: u64,
    seconds: f64,
}

impl Outcome {
    fn per_second(&self) -> f64 {
        self.received as f64 / self.seconds.max(1e-9)
    }

    fn loss_pct(&self) -> f64 {
        100.0 * (self.sent.saturating_sub(self.received)) as f64 / (self.sent.max(1)) as f64
    }
}

/// A UDP echo on 127.0.0.1:0 in this process.
async fn spawn_echo() -> Result<SocketAddr, BoxError> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    big_buffers(&socket);
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            socket.send_to(&buf[..n], from).await.ok();
        }
    });
    Ok(addr)
}

/// 4 MiB socket buffers (as far as the kernel allows): the bench measures the paths, not
/// the default buffers of its own sockets.
fn big_buffers(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    s.set_recv_buffer_size(4 << 20).ok();
    s.set_send_buffer_size(4 << 20).ok();
}

/// Sends numbered datagrams to `to` at `rate` per second for `duration` from a fresh
/// socket (a fresh flow) and counts the distinct replies.
async fn run_rate(to: SocketAddr, rate: u64, duration: Duration) -> Result<Outcome, BoxError> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    big_buffers(&socket);
    socket.connect(to).await?;
    let socket = Arc::new(socket);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut buf = vec![0u8; 2048];
            loop {
                tokio::select! {
                    r = socket.recv(&mut buf) => match r {
                        Ok(n) if n == SIZE => {
                            seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()));
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                    _ = &mut stop_rx => break,
                }
            }
            seen.len() as u64
        })
    };
    let mut datagram = vec![0x5a_u8; SIZE];
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < duration {
        tick.tick().await;
        // Catch up to where the rate says we should be (ticks may come late).
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            datagram[..8].copy_from_slice(&sent.to_be_bytes());
            // A full send buffer is a loss like any other.
            socket.send(&datagram).await.ok();
            sent += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Replies still in flight get half a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(()).ok();
    let received = receiver.await.map_err(|e| format!("receiver: {e}"))?;
    Ok(Outcome {
        sent,
        received,
        seconds,
    })
}

/// rd-server's drop counters by reason (`congested=12 max_flows=0 ...`), for the notes.
async fn drops(server: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(server).await?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(5), fetch).await else {
        return "unknown".into();
    };
    let found: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("rd_udp_datagrams_dropped_total{reason=\""))
        .map(|l| l.replacen("\"} ", "=", 1))
        .collect();
    if found.is_empty() {
        "none".into()
    } else {
        found.join(" ")
    }
}

/// Starts rd-server with a UDP forward to an echo here and rd-client, measures each rate
/// direct and through the forward, and returns the rows.
pub async fn run(bin_dir: &FsPath, dir: &FsPath, scale: f64) -> Result<Vec<Row>, BoxError> {
    let echo = spawn_echo().await?;
    // A port that was free a moment ago (the bench is not a test).
    let forward_addr = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let forward = format!("{forward_addr}=bench:udp/{echo}");
    let server = Proc::spawn(
        "rd-server-udp",
        &bin_dir.join("rd-server"),
        &["--listen", "127.0.0.1:0", "--forward", &forward],
        dir,
        true,
    )?;
    let server_addr = server.addr.ok_or("no server address")?;
    let connect = format!("ws://{server_addr}/connect");
    let mut client = Proc::spawn(
        "rd-client-udp",
        &bin_dir.join("rd-client"),
        &["--connect", &connect, "--id", "bench"],
        dir,
        false,
    )?;
    // Up once a datagram comes back through the forward.
    let probe = UdpSocket::bind("127.0.0.1:0").await?;
    probe.connect(forward_addr).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    loop {
        probe.send(b"up?").await?;
        match tokio::time::timeout(Duration::from_millis(100), probe.recv(&mut buf)).await {
            Ok(Ok(3)) => break,
            _ if Instant::now() > deadline => {
                return Err(
                    format!("the UDP forward never answered; logs in {}", dir.display()).into(),
                )
            }
            _ if !client.alive() => return Err("rd-client exited".into()),
            _ => {}
        }
    }
    let duration = rd_benches::scaled_duration(2.0, scale);
    let mut rows = Vec::new();
    for rate in RATES {
        let direct = run_rate(echo, rate, duration).await?;
        let tunnel = run_rate(forward_addr, rate, duration).await?;
        let dropped = drops(server_addr).await;
        say(format!(
            "udp {SIZE} B at {rate}/s: direct {} of {} back, forward {} of {} back; \
             rd-server's drops so far: {dropped}",
            direct.received, direct.sent, tunnel.received, tunnel.sent
        ));
        let label = format!("udp {SIZE} B paced at {}k/s", rate / 1000);
        let mut delivered = Row::new(&label, "delivered", "datagrams/s");
        delivered.direct = Some(direct.per_second());
        delivered.tunnel = Some(tunnel.per_second());
        let mut loss = Row::new(&label, "loss", "%");
        loss.direct = Some(direct.loss_pct());
        loss.tunnel = Some(tunnel.loss_pct());
        rows.push(delivered.note("tunnel column: rd-server --forward ...=bench:udp/ECHO"));
        rows.push(loss);
    }
    drop(server);
    Ok(rows)
}
