//! Storm scenario (`rd-bench --only storm`): an `rd-server` process and a separate load
//! process (`rd-bench --storm-child ADDR N`) that opens N websocket sessions at once, each an
//! upgraded `/connect` with its own `X-Tunnel-ID`, then idles and pings every 5 s like an
//! agent (pings spread over the period, then paired; see [`Pacing`]). Sessions come from
//! 127.0.0.2-127.0.0.51 so that 10,000 of them never run short of ephemeral ports. Reports
//! the time until all are up, failed handshakes, the server's RSS per session once settled,
//! and the server's CPU while idle under each pacing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rd_benches::procfs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::load::BoxError;
use crate::procs::{Proc, TempDir};

/// Source addresses the load spreads over.
const SOURCES: u8 = 50;

/// One agent-like session from one of the source addresses, upgraded.
async fn agent(addr: SocketAddr, i: usize) -> Result<TcpStream, BoxError> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES as usize) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let mut tcp = socket.connect(addr).await?;
    upgrade(&mut tcp, addr, &format!("storm-{i}")).await?;
    Ok(tcp)
}

/// A websocket upgrade of `tcp` to `/connect` as agent `key`, by hand (nodelay on): the
/// request, then the response head, which must be a 101.
pub async fn upgrade(tcp: &mut TcpStream, addr: SocketAddr, key: &str) -> Result<(), BoxError> {
    tcp.set_nodelay(true)?;
    let req = format!(
        "GET /connect HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-Tunnel-ID: {key}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 {
            return Err("server closed during the upgrade".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&head);
        return Err(format!("upgrade refused: {}", line.lines().next().unwrap_or("")).into());
    }
    Ok(())
}

/// A masked, empty ping frame, as a client must send it.
const PING: [u8; 6] = [0x89, 0x80, 1, 2, 3, 4];

/// Every agent pings once per period.
const PING_PERIOD: Duration = Duration::from_secs(5);

/// How the agents' pings fall within each 5 s period.
///
/// Real agents are separate processes whose pings land at independent, random instants
/// (`Spread`). A load process that pings from tokio timers instead fires them in whole
/// milliseconds, two agents per millisecond at 10,000 (`Paired`, how this benchmark pinged
/// until round 4): each wake-up of the server then finds two sessions ready, and its
/// runtime wakes a second thread for the second one. Both are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pacing {
    Spread,
    Paired,
}

/// Each agent's offset in the period under `pacing`, in order of time.
fn schedule(n: usize, pacing: Pacing) -> Vec<(Duration, usize)> {
    let mut rng = rd_benches::Rng::new(5);
    let period_us = PING_PERIOD.as_micros() as u64;
    let mut at: Vec<(Duration, usize)> = (0..n)
        .map(|i| match pacing {
            Pacing::Spread => Duration::from_micros(rng.next_u64() % period_us),
            Pacing::Paired => Duration::from_millis((i as u64 * 7919) % 5000),
        })
        .zip(0..n)
        .collect();
    at.sort();
    at
}

/// Sends every agent's ping on schedule, from one thread, until `stop`; switches pacing at
/// the start of a period when `paired` changes. Errors end only that agent's pings.
fn pinger(agents: Vec<Arc<TcpStream>>, paired: &AtomicBool, stop: &AtomicBool) {
    let spread = schedule(agents.len(), Pacing::Spread);
    let pairs = schedule(agents.len(), Pacing::Paired);
    let mut dead = vec![false; agents.len()];
    let mut period_start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let plan = if paired.load(Ordering::Relaxed) {
            &pairs
        } else {
            &spread
        };
        for &(offset, i) in plan {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let at = period_start + offset;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Six bytes always fit an idle socket's buffer (a non-blocking write that
            // needs no runtime); a failed or short write means the server closed it.
            if !dead[i] && !matches!(agents[i].try_write(&PING), Ok(6)) {
                dead[i] = true;
            }
        }
        period_start += PING_PERIOD;
    }
}

/// Drains the server's pongs until the connection ends. Shares the socket with the pinger
/// (one descriptor per agent, so 10,000 fit a 20,000 limit).
async fn drain(tcp: Arc<TcpStream>) {
    let mut buf = [0u8; 256];
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        match tcp.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// The load process: opens `n` sessions at once against `addr`, prints one JSON line when all
/// handshakes are done, then keeps them idle and pinging (spread) until stdin closes; a line
/// `paired` on stdin switches to paired pacing.
pub fn child_main(addr: &str, n: usize) -> Result<(), BoxError> {
    let addr: SocketAddr = addr.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let up = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let up = up.clone();
            tasks.spawn(async move {
                let tcp = agent(addr, i).await.map_err(|e| e.to_string())?;
                up.fetch_add(1, Ordering::Relaxed);
                Ok::<_, String>(tcp)
            });
        }
        let mut failed = 0usize;
        let mut first_error = None;
        let mut writers = Vec::with_capacity(n);
        let mut drains = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            let tcp = match r {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                    continue;
                }
            };
            let tcp = Arc::new(tcp);
            writers.push(tcp.clone());
            drains.push(tokio::spawn(drain(tcp)));
        }
        let all_up_s = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "up": up.load(Ordering::Relaxed), "failed": failed, "all_up_s": all_up_s,
                "first_error": first_error,
            })
        );
        let paired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let pings = {
            let (paired, stop) = (paired.clone(), stop.clone());
            std::thread::spawn(move || pinger(writers, &paired, &stop))
        };
        // Hold the sessions until the parent closes our stdin.
        tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lines() {
                match line {
                    Ok(l) if l.trim() == "paired" => paired.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
        .await
        .ok();
        stop.store(true, Ordering::Relaxed);
        pings.join().ok();
        for h in drains {
            h.abort();
        }
        Ok::<_, BoxError>(())
    })
}

/// What one storm measured.
#[derive(Debug, Clone, Default)]
pub struct StormResult {
    pub sessions: usize,
    pub up: usize,
    pub failed: usize,
    pub all_up_s: f64,
    pub kib_per_session: f64,
    /// Pings spread like independent agents'.
    pub idle_cpu_pct: f64,
    /// Pings fired two per millisecond (see `Pacing::Paired`).
    pub idle_cpu_paired_pct: f64,
    pub first_error: Option<String>,
}

/// Starts `bin_dir/rd-server`, storms it with `n` sessions from a load process, and measures.
pub fn run(bin_dir: &Path, n: usize, extra_args: &[&str]) -> Result<StormResult, BoxError> {
    let mut args = vec!["--listen", "127.0.0.1:0", "--metrics=false"];
    args.extend_from_slice(extra_args);
    storm(&bin_dir.join("rd-server"), &args, n)
}

/// The same storm against the floor (`rd-bench --pong-floor`): what the runtime and the
/// kernel alone cost for the same pings, to compare rd's idle CPU with in one run.
pub fn run_floor(n: usize) -> Result<StormResult, BoxError> {
    storm(&std::env::current_exe()?, &["--pong-floor"], n)
}

/// Starts a load process (`rd-bench --storm-child`) with `n` agents against `addr` and waits,
/// blocking, for its report once every handshake is done. Closing its stdin (dropping the
/// handle) ends it.
pub fn start_load(
    addr: SocketAddr,
    n: usize,
) -> Result<(std::process::Child, serde_json::Value), BoxError> {
    let mut load = std::process::Command::new(std::env::current_exe()?)
        .args(["--storm-child", &addr.to_string(), &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = load.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let v =
        serde_json::from_str(line.trim()).map_err(|e| format!("storm child said {line:?}: {e}"))?;
    Ok((load, v))
}

fn storm(bin: &Path, args: &[&str], n: usize) -> Result<StormResult, BoxError> {
    let dir = TempDir::with_prefix("rd-storm")?;
    let server = Proc::spawn("server", bin, args, &dir.0, true)?;
    let addr = server.addr.ok_or("the server printed no address")?;
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = procfs::status_kib(server.pid(), "VmRSS").unwrap_or(0);
    let (mut load, v) = start_load(addr, n)?;
    // Let the server settle (registrations, first pings), then measure memory and idle CPU.
    std::thread::sleep(Duration::from_secs(10));
    let rss1 = procfs::status_kib(server.pid(), "VmRSS").unwrap_or(0);
    let idle_cpu_pct = cpu_percent(server.pid(), Duration::from_secs(20));
    let mut stdin = load.stdin.take().ok_or("no stdin")?;
    std::io::Write::write_all(&mut stdin, b"paired\n")?;
    // The switch happens at the start of the next period.
    std::thread::sleep(PING_PERIOD + Duration::from_secs(1));
    let idle_cpu_paired_pct = cpu_percent(server.pid(), Duration::from_secs(20));
    drop(stdin);
    load.wait().ok();
    let up = v["up"].as_u64().unwrap_or(0) as usize;
    Ok(StormResult {
        sessions: n,
        up,
        failed: v["failed"].as_u64().unwrap_or(0) as usize,
        all_up_s: v["all_up_s"].as_f64().unwrap_or(0.0),
        kib_per_session: (rss1.saturating_sub(rss0)) as f64 / up.max(1) as f64,
        idle_cpu_pct,
        idle_cpu_paired_pct,
        first_error: v["first_error"].as_str().map(str::to_owned),
    })
}

/// A process's CPU use over `window`, in percent of one core.
fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let cpu0 = procfs::cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let cpu = procfs::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    100.0 * cpu / t0.elapsed().as_secs_f64()
}

/// The floor for idle CPU: a tokio server (default runtime, like rd-server's) that answers
/// the upgrade with a bare 101 and each read with an empty pong, with no websocket parsing,
/// no session state and no timers. Nothing real could answer the same pings for less.
pub fn floor_main() -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on http://{}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(pong_forever(tcp));
        }
    })
}

async fn pong_forever(mut tcp: TcpStream) {
    const PONG: [u8; 2] = [0x8a, 0];
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let ok =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    if tcp.write_all(ok).await.is_err() {
        return;
    }
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if tcp.write_all(&PONG).await.is_err() {
            return;
        }
    }
}
