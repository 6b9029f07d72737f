//! `rd-rolling` (`make rolling`): the scale check of a rolling restart (issue 13).
//!
//! Five rd-server replicas on 127.0.0.11.. share one port and find each other through a real
//! DNS server (dnsmasq on loopback, as a headless Service would list them); 2,000 rd-client
//! library clients in this process, each given every replica (rotated, so they spread); a
//! workload of small requests entering random ready replicas for random clients, and 16 MiB
//! downloads whose bodies are hashed. Then each replica in turn is drained (SIGTERM, taken
//! out of the workload at once as Kubernetes takes it out of the Service's endpoints),
//! waited for, started again and waited for until ready.
//!
//! It reports the success rate (failures inside a move window, from the SIGTERM until every
//! client answers again through the other replicas, and outside one), cut transfers, how long
//! every client took to be reachable again after each drain and through the restarted
//! replica, and the peer-link count. Exits non-zero on a cut transfer or a failure outside
//! the move windows.

mod fetch;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fetch::{Failed, Got};
use rd_benches::dns::Dnsmasq;
use rd_benches::metrics::metrics;
use rd_benches::process::{generate_file, Proc, TempDir};
use rd_benches::{BoxError, Rng};
use rd_client::{AllowAll, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NAME: &str = "rd-rolling.test";
const TOKEN: &str = "rolling-peer-token";
const SMALL: u64 = 1024;
const LARGE: u64 = 16 << 20;
/// Each small-request worker's pace: with 16 workers, about 800 requests/s in all.
const SMALL_PACE: Duration = Duration::from_millis(20);
/// Parallel GETs of a sweep (one request per client).
const SWEEP_CONCURRENCY: usize = 64;
/// Bound on anything the harness waits for.
const BOUND: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Options {
    bins: PathBuf,
    servers: usize,
    clients: usize,
    grace: String,
    out: PathBuf,
}

fn parse_options() -> Result<Options, BoxError> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut o = Options {
        bins: root.join("target/release"),
        servers: 5,
        clients: 2000,
        grace: "30s".into(),
        out: root.join("target/rolling"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bin-dir" => o.bins = PathBuf::from(value()?),
            "--servers" => o.servers = value()?.parse()?,
            "--clients" => o.clients = value()?.parse()?,
            "--grace-period" => o.grace = value()?,
            "--out" => o.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!(
                    "rd-rolling [--bin-dir DIR] [--servers N (5, at most 200)] [--clients N (2000)] \
                     [--grace-period DURATION (30s)] [--out DIR (target/rolling)]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    if o.servers < 2 || o.servers > 200 || o.clients == 0 {
        return Err("--servers must be 2..=200 and --clients at least 1".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let result = parse_options().and_then(|o| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(o))
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rd-rolling: {e}");
            ExitCode::from(2)
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[rd-rolling] {}", msg.as_ref());
}

/// One replica: its address, its process while it runs, whether the workload may use it.
struct Replica {
    addr: SocketAddr,
    proc: Option<Proc>,
}

struct Fleet {
    bins: PathBuf,
    logs: PathBuf,
    dns: SocketAddr,
    grace: String,
    replicas: Vec<Replica>,
    /// Which replicas the workload sends to (the Service's ready endpoints).
    ready: Arc<Vec<AtomicBool>>,
}

impl Fleet {
    fn start_replica(&mut self, i: usize) -> Result<(), BoxError> {
        let addr = self.replicas[i].addr;
        let args = [
            "--listen".to_owned(),
            addr.to_string(),
            "--id".to_owned(),
            format!("replica-{i}"),
            "--token".to_owned(),
            TOKEN.to_owned(),
            "--peers-dns".to_owned(),
            format!("{NAME}:{}", addr.port()),
            "--peers-dns-interval".to_owned(),
            "1s".to_owned(),
            "--dns-server".to_owned(),
            self.dns.to_string(),
            "--grace-period".to_owned(),
            self.grace.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = format!("rd-server-{i}");
        let proc = Proc::spawn(&name, &self.bins.join("rd-server"), &args, &self.logs, true)?;
        self.replicas[i].proc = Some(proc);
        Ok(())
    }
}

/// What the workload saw.
#[derive(Default)]
struct Outcomes {
    small_ok: AtomicU64,
    large_ok: AtomicU64,
    /// (when, what) of every refused request (small or large).
    refused: Mutex<Vec<(Instant, String)>>,
    /// Transfers broken after their 200: what must never happen.
    cut: Mutex<Vec<(Instant, String)>>,
}

struct Files {
    dummy: SocketAddr,
    small_hash: u64,
    large_hash: u64,
}

fn path(client: usize, dummy: SocketAddr, file: &str) -> String {
    format!("/client/c{client}/http/{dummy}/{file}")
}

fn pick(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// One load: GETs of `file` (`len` bytes, `hash`) through a random ready replica for a random
/// client, checked byte-exact; `pace` apart, or back to back when `None` (16 MiB downloads:
/// transfers in flight whenever a replica drains).
struct Load {
    seed: u64,
    file: &'static str,
    len: u64,
    hash: u64,
    pace: Option<Duration>,
}

async fn worker(
    load: Load,
    ready: Arc<Vec<AtomicBool>>,
    addrs: Arc<Vec<SocketAddr>>,
    clients: usize,
    dummy: SocketAddr,
    out: Arc<Outcomes>,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(load.seed);
    let mut tick = tokio::time::interval(load.pace.unwrap_or(SMALL_PACE));
    let ok = if load.len == LARGE {
        &out.large_ok
    } else {
        &out.small_ok
    };
    while !stop.is_cancelled() {
        if load.pace.is_some() {
            tick.tick().await;
        }
        let Some(server) = pick_ready(&mut rng, &ready, &addrs) else {
            tick.tick().await;
            continue;
        };
        let p = path(pick(&mut rng, clients), dummy, load.file);
        record(&out, get_checked(server, &p, load.len, load.hash).await, ok);
    }
}

/// The replicas the workload may use now (the Service's ready endpoints).
fn ready_among(ready: &[AtomicBool], addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    addrs
        .iter()
        .zip(ready)
        .filter(|(_, r)| r.load(Ordering::SeqCst))
        .map(|(a, _)| *a)
        .collect()
}

fn pick_ready(rng: &mut Rng, ready: &[AtomicBool], addrs: &[SocketAddr]) -> Option<SocketAddr> {
    let live = ready_among(ready, addrs);
    (!live.is_empty()).then(|| live[pick(rng, live.len())])
}

async fn get_checked(server: SocketAddr, p: &str, len: u64, hash: u64) -> Result<(), Failed> {
    match fetch::get(server, p, BOUND).await? {
        Got { len: l, hash: h } if l == len && h == hash => Ok(()),
        Got { len: l, .. } => Err(Failed::Cut(format!(
            "{l} bytes, want {len}, or a wrong hash"
        ))),
    }
}

fn record(out: &Outcomes, r: Result<(), Failed>, ok: &AtomicU64) {
    let now = Instant::now();
    match r {
        Ok(()) => {
            ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(Failed::Refused(why)) => lock(&out.refused).push((now, why)),
        Err(Failed::Cut(why)) => lock(&out.cut).push((now, why)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One small GET per client, spread over `servers`; how many failed.
async fn sweep(servers: &[SocketAddr], clients: usize, files: &Arc<Files>) -> usize {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SWEEP_CONCURRENCY.min(clients) {
        let (next, failed, files, servers) = (
            next.clone(),
            failed.clone(),
            files.clone(),
            servers.to_vec(),
        );
        tasks.spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed) as usize;
                if c >= clients {
                    return;
                }
                let server = servers[c % servers.len()];
                let p = path(c, files.dummy, "small.bin");
                if get_checked(server, &p, SMALL, files.small_hash)
                    .await
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    failed.load(Ordering::Relaxed) as usize
}

/// Sweeps until one finds every client; returns when that sweep began... and ended.
async fn until_all_reachable(
    servers: &[SocketAddr],
    clients: usize,
    files: &Arc<Files>,
) -> Result<Instant, BoxError> {
    let start = Instant::now();
    loop {
        let failed = sweep(servers, clients, files).await;
        if failed == 0 {
            return Ok(Instant::now());
        }
        if start.elapsed() > BOUND {
            return Err(format!("{failed} clients still unreachable after {BOUND:?}").into());
        }
    }
}

async fn wait_ready(addr: SocketAddr) -> Result<(), BoxError> {
    let start = Instant::now();
    loop {
        if fetch::get(addr, "/readyz", Duration::from_secs(2))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > BOUND {
            return Err(format!("{addr} not ready after {BOUND:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Outgoing peer links (`rd_peer_links`) summed over the running replicas.
async fn peer_links(addrs: &[SocketAddr]) -> f64 {
    let mut total = 0.0;
    for &a in addrs {
        if let Some(m) = metrics(a).await {
            total += m.get("rd_peer_links").copied().unwrap_or(0.0);
        }
    }
    total
}

/// What one drain-and-restart took.
struct Restart {
    replica: usize,
    /// SIGTERM until every client answered through the other replicas.
    moved: Duration,
    /// SIGTERM until the process exited.
    drained: Duration,
    drain_status: String,
    /// Start until /readyz answered 200.
    ready: Duration,
    /// Start until every client answered through the restarted replica.
    reachable_via_new: Duration,
    peer_links: f64,
}

async fn run(o: Options) -> Result<bool, BoxError> {
    let tmp = TempDir::with_prefix("rd-rolling")?;
    let logs = o.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let www = tmp.0.join("www");
    std::fs::create_dir_all(&www)?;
    let small_hash = generate_file(&www.join("small.bin"), SMALL, 1)?;
    let large_hash = generate_file(&www.join("large.bin"), LARGE, 2)?;
    let dummy = Proc::spawn(
        "rd-dummy",
        &o.bins.join("rd-dummy"),
        &["--listen", "127.0.0.1:0", "--dir", &www.to_string_lossy()],
        &logs,
        true,
    )?;
    let files = Arc::new(Files {
        dummy: dummy.addr.ok_or("rd-dummy printed no address")?,
        small_hash,
        large_hash,
    });

    // Every replica on its own loopback address, all on one port, as pods of a Service.
    let ips: Vec<Ipv4Addr> = (0..o.servers)
        .map(|i| Ipv4Addr::new(127, 0, 0, 11 + i as u8))
        .collect();
    let port = std::net::TcpListener::bind((ips[0], 0))?
        .local_addr()?
        .port();
    let dns = Dnsmasq::start(&tmp.0, NAME, &ips)?;
    let mut fleet = Fleet {
        bins: o.bins.clone(),
        logs: logs.clone(),
        dns: dns.addr,
        grace: o.grace.clone(),
        replicas: ips
            .iter()
            .map(|ip| Replica {
                addr: SocketAddr::from((*ip, port)),
                proc: None,
            })
            .collect(),
        ready: Arc::new((0..o.servers).map(|_| AtomicBool::new(false)).collect()),
    };
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(fleet.replicas.iter().map(|r| r.addr).collect());
    for i in 0..o.servers {
        fleet.start_replica(i)?;
    }
    for (i, &a) in addrs.iter().enumerate() {
        wait_ready(a).await?;
        fleet.ready[i].store(true, Ordering::SeqCst);
    }
    say(format!(
        "{} replicas ready on port {port}, DNS at {}",
        o.servers, dns.addr
    ));

    // The clients, each given every replica, the list rotated so that they spread.
    let stop_clients = CancellationToken::new();
    let started = Instant::now();
    for c in 0..o.clients {
        let urls: Vec<String> = (0..o.servers)
            .map(|k| format!("ws://{}/connect", addrs[(c + k) % o.servers]))
            .collect();
        let mut b = Client::builder(urls[0].clone())
            .header(
                http::HeaderName::from_static("x-tunnel-id"),
                http::HeaderValue::from_str(&format!("c{c}"))?,
            )
            .allow(AllowAll);
        for u in &urls[1..] {
            b = b.server(u.clone());
        }
        let client = b.build();
        let stop = stop_clients.clone();
        tokio::spawn(async move { client.run(stop).await });
    }
    let up = until_all_reachable(&addrs, o.clients, &files).await?;
    say(format!(
        "{} clients reachable through every replica after {:.1} s; {} peer links",
        o.clients,
        (up - started).as_secs_f64(),
        peer_links(&addrs).await
    ));

    let out = Arc::new(Outcomes::default());
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..20u64 {
        // Seeds 0..16 for the small loads, 100.. for the large ones.
        let seed = if w < 16 { w } else { 100 + w - 16 };
        let load = if w < 16 {
            Load {
                seed,
                file: "small.bin",
                len: SMALL,
                hash: files.small_hash,
                pace: Some(SMALL_PACE),
            }
        } else {
            Load {
                seed,
                file: "large.bin",
                len: LARGE,
                hash: files.large_hash,
                pace: None,
            }
        };
        workers.spawn(worker(
            load,
            fleet.ready.clone(),
            addrs.clone(),
            o.clients,
            files.dummy,
            out.clone(),
            stop.clone(),
        ));
    }
    // The workload runs a while on the whole fleet first.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut restarts = Vec::new();
    let mut windows = Vec::new();
    for i in 0..o.servers {
        // Out of the endpoints first, as the kubelet marks a terminating pod unready.
        fleet.ready[i].store(false, Ordering::SeqCst);
        let proc = fleet.replicas[i].proc.take().ok_or("replica not running")?;
        let term = Instant::now();
        proc.signal("TERM")?;
        let others = ready_among(&fleet.ready, &addrs);
        let exited = tokio::task::spawn_blocking(move || {
            let mut proc = proc;
            let status = proc.child.wait();
            (
                Instant::now(),
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
            )
        });
        let moved = until_all_reachable(&others, o.clients, &files).await?;
        windows.push((term, moved));
        let (exit_at, drain_status) = tokio::time::timeout(BOUND, exited)
            .await
            .map_err(|_| format!("replica {i} did not exit within {BOUND:?} of SIGTERM"))??;
        let start = Instant::now();
        fleet.start_replica(i)?;
        wait_ready(addrs[i]).await?;
        let ready_at = Instant::now();
        fleet.ready[i].store(true, Ordering::SeqCst);
        let via_new = until_all_reachable(&[addrs[i]], o.clients, &files).await?;
        let r = Restart {
            replica: i,
            moved: moved - term,
            drained: exit_at - term,
            drain_status,
            ready: ready_at - start,
            reachable_via_new: via_new - start,
            peer_links: peer_links(&addrs).await,
        };
        say(format!(
            "replica {i}: clients moved in {:.2} s, drained in {:.2} s ({}), ready {:.2} s after start, \
             every client through it {:.2} s after start, {} peer links",
            r.moved.as_secs_f64(),
            r.drained.as_secs_f64(),
            r.drain_status,
            r.ready.as_secs_f64(),
            r.reachable_via_new.as_secs_f64(),
            r.peer_links
        ));
        restarts.push(r);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.cancel();
    while workers.join_next().await.is_some() {}
    stop_clients.cancel();

    let refused = lock(&out.refused).clone();
    let cut = lock(&out.cut).clone();
    let in_window = |t: &Instant| windows.iter().any(|(a, b)| t >= a && t <= b);
    let outside: Vec<&(Instant, String)> = refused.iter().filter(|(t, _)| !in_window(t)).collect();
    let small_ok = out.small_ok.load(Ordering::Relaxed);
    let large_ok = out.large_ok.load(Ordering::Relaxed);
    let total = small_ok + large_ok + refused.len() as u64 + cut.len() as u64;
    let success = (small_ok + large_ok) as f64 / total.max(1) as f64;
    let expected_links = (o.servers * (o.servers - 1)) as f64;

    println!(
        "\n## Rolling restart: {} replicas, {} clients",
        o.servers, o.clients
    );
    println!(
        "requests {total}: {small_ok} small + {large_ok} x 16 MiB ok ({:.3} %); refused in a move window {}, \
         refused outside one {}, transfers cut {}",
        success * 100.0,
        refused.len() - outside.len(),
        outside.len(),
        cut.len()
    );
    println!("\n| replica | clients moved after SIGTERM | drain took | ready after start | every client via it | peer links after |");
    println!("|---|---|---|---|---|---|");
    for r in &restarts {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {} of {} |",
            r.replica,
            r.moved.as_secs_f64(),
            r.drained.as_secs_f64(),
            r.ready.as_secs_f64(),
            r.reachable_via_new.as_secs_f64(),
            r.peer_links,
            expected_links
        );
    }
    for (_, why) in outside.iter().take(10) {
        println!("refused outside a move window: {why}");
    }
    for (_, why) in cut.iter().take(10) {
        println!("cut: {why}");
    }
    let report = json!({
        "servers": o.servers,
        "clients": o.clients,
        "requests": total,
        "small_ok": small_ok,
        "large_ok": large_ok,
        "refused_in_move_window": refused.len() - outside.len(),
        "refused_outside": outside.len(),
        "cut": cut.len(),
        "restarts": restarts.iter().map(|r| json!({
            "replica": r.replica,
            "moved_s": r.moved.as_secs_f64(),
            "drained_s": r.drained.as_secs_f64(),
            "drain_status": r.drain_status,
            "ready_s": r.ready.as_secs_f64(),
            "reachable_via_new_s": r.reachable_via_new.as_secs_f64(),
            "peer_links": r.peer_links,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        o.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    drop(dns);
    Ok(outside.is_empty() && cut.is_empty())
}
