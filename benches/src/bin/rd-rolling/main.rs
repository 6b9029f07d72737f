//! `rd-rolling` (`make rolling`): the scale check of a rolling restart (issues 13 and 23).
//!
//! Five rd-server replicas on 127.0.0.11.. share one port and find each other through a real
//! DNS server (dnsmasq on loopback, as a headless Service would list them), behind a
//! round-robin TCP front (as the Service itself). 2,000 rd-client library agents in this
//! process are each given only the front's URL; with the replicas extension each holds a
//! session with every replica (`--sessions 1` keeps the old single session). A tenth of
//! them hold a long-lived idle stream (a CONNECT tunnel through a random replica, opened
//! again elsewhere when a drain deadline cuts it), while a workload of about 800 small
//! requests a second and back-to-back 16 MiB downloads (bodies hashed) enters random ready
//! replicas for random agents. Then each replica in turn is drained (SIGTERM, taken out of
//! the workload at once as Kubernetes takes it out of the Service's endpoints), waited for,
//! started again and waited for until ready and until it holds every agent again.
//!
//! It reports every failed request (there is no excused window: an agent that moves must
//! stay reachable), cut transfers, the peer hops taken in the steady state (before the
//! first restart and after the last), how long each restarted replica took to hold every
//! agent again, and the replicas' RSS. Exits non-zero on a failed request, a cut transfer
//! or a peer hop in the steady state.

mod fetch;
mod hold;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fetch::{Failed, Got};
use rd_benches::dns::Dnsmasq;
use rd_benches::front::Front;
use rd_benches::metrics::{metrics, metrics_text, series};
use rd_benches::process::{generate_file, Proc, TempDir};
use rd_benches::{procfs, BoxError, Rng};
use rd_client::{AllowAll, Client, SessionCount};
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
const BOUND: Duration = Duration::from_secs(120);
/// How long the steady state is watched for peer hops, before the first restart and after
/// the last.
const STEADY: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Options {
    bins: PathBuf,
    servers: usize,
    clients: usize,
    grace: String,
    sessions: SessionCount,
    /// Share of the agents that hold a long-lived idle stream.
    held: f64,
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
        sessions: SessionCount::All,
        held: 0.1,
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
            "--sessions" => o.sessions = value()?.parse()?,
            "--held" => o.held = value()?.parse()?,
            "--out" => o.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!(
                    "rd-rolling [--bin-dir DIR] [--servers N (5, at most 200)] [--clients N (2000)] \
                     [--grace-period DURATION (30s)] [--sessions all|N (all)] \
                     [--held SHARE (0.1: agents with a long-lived idle stream)] [--out DIR (target/rolling)]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    if o.servers < 2 || o.servers > 200 || o.clients == 0 || !(0.0..=1.0).contains(&o.held) {
        return Err("--servers must be 2..=200, --clients at least 1, --held within 0..1".into());
    }
    Ok(o)
}

/// Front processes sharing the front's address: each holds two descriptors per agent
/// session through it, and one process may open 20,000 here (10,000 sessions need 20,000).
const FRONTS: usize = 3;

/// Processes the agents run in: each agent holds a descriptor per session and one per
/// target connection the replicas' pools keep open (up to one per replica), and one
/// process may open 20,000 here.
const AGENT_PROCESSES: usize = 4;

/// `rd-rolling agents URL FIRST COUNT SESSIONS`: agents `cFIRST..` of one agent process,
/// each given only `URL`, until killed.
fn agents_main(args: &[String]) -> Result<bool, BoxError> {
    let [url, first, count, sessions] = args else {
        return Err("agents: URL FIRST COUNT SESSIONS".into());
    };
    let (first, count): (usize, usize) = (first.parse()?, count.parse()?);
    let sessions: SessionCount = sessions.parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let stop = CancellationToken::new();
            for c in first..first + count {
                let client = Client::builder(url.clone())
                    .header(
                        http::HeaderName::from_static("x-tunnel-id"),
                        http::HeaderValue::from_str(&format!("c{c}"))?,
                    )
                    .allow(AllowAll)
                    .sessions(sessions)
                    .build();
                let stop = stop.clone();
                tokio::spawn(async move { client.run(stop).await });
            }
            std::future::pending::<()>().await;
            Ok(true)
        })
}

/// The `main` of a child process: a front or agents.
type Role = fn(&[String]) -> Result<bool, BoxError>;

/// `rd-rolling front LISTEN BACKEND...`: one front process (see [`FRONTS`]).
fn front_main(args: &[String]) -> Result<bool, BoxError> {
    let (listen, backends) = args.split_first().ok_or("front: LISTEN BACKEND...")?;
    let listen: SocketAddr = listen.parse()?;
    let backends = backends
        .iter()
        .map(|b| b.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let front = Front::start_shared(listen, backends)?;
            println!("listening on http://{}", front.addr);
            std::future::pending::<()>().await;
            Ok(true)
        })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role: Option<Role> = match args.first().map(String::as_str) {
        Some("front") => Some(front_main),
        Some("agents") => Some(agents_main),
        _ => None,
    };
    if let Some(role) = role {
        return match role(&args[1..]) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rd-rolling {}: {e}", args[0]);
                ExitCode::from(2)
            }
        };
    }
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

/// One replica: its address and its process while it runs.
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

    /// Resident KiB of each running replica.
    fn rss_kib(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .filter_map(|r| r.proc.as_ref())
            .filter_map(|p| procfs::status_kib(p.pid(), "VmRSS"))
            .collect()
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
        let result = get_checked(server, &p, load.len, load.hash).await;
        let failed = result.is_err();
        record(&out, result, ok);
        if failed && load.pace.is_none() {
            // A back-to-back worker must not spin on a failure that comes at once.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

/// Sweeps until one finds every client; returns when that sweep ended.
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

/// Waits until `server` holds a session of every one of `clients` agents (`rd_agents`);
/// `None` if it does not say (an older server without the gauge).
async fn until_held(server: SocketAddr, clients: usize) -> Result<Option<Instant>, BoxError> {
    let start = Instant::now();
    loop {
        match metrics(server).await.map(|m| m.get("rd_agents").copied()) {
            Some(None) => return Ok(None),
            Some(Some(n)) if n as usize >= clients => return Ok(Some(Instant::now())),
            _ => {}
        }
        if start.elapsed() > BOUND {
            return Err(format!("{server} does not hold every agent after {BOUND:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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

/// A metric summed over the running replicas.
async fn total(addrs: &[SocketAddr], name: &str) -> f64 {
    let mut sum = 0.0;
    for &a in addrs {
        if let Some(m) = metrics(a).await {
            sum += m.get(name).copied().unwrap_or(0.0);
        }
    }
    sum
}

/// Peer hops (`rd_dials{route="peer"}`) taken by the running replicas so far; `None` if
/// the servers do not count them (builds before issue 23).
async fn peer_hops(addrs: &[SocketAddr]) -> Option<f64> {
    let mut sum = None;
    for &a in addrs {
        if let Some(text) = metrics_text(a).await {
            if text.contains("# TYPE rd_dials ") {
                *sum.get_or_insert(0.0) += series(&text, "rd_dials{route=\"peer\"}").unwrap_or(0.0);
            }
        }
    }
    sum
}

/// Hops taken over `STEADY` of the workload, with every agent filled.
async fn steady_hops(addrs: &[SocketAddr]) -> Option<f64> {
    let before = peer_hops(addrs).await;
    tokio::time::sleep(STEADY).await;
    Some(peer_hops(addrs).await? - before?)
}

fn show(hops: Option<f64>) -> String {
    hops.map_or("(not counted by these servers)".into(), |h| h.to_string())
}

/// What one drain-and-restart took.
struct Restart {
    replica: usize,
    /// SIGTERM until the process exited.
    drained: Duration,
    drain_status: String,
    /// Start until /readyz answered 200.
    ready: Duration,
    /// Start until it held a session of every agent (`None`: the server does not say).
    held_all: Option<Duration>,
    /// Start until every agent answered through it.
    reachable_via_new: Duration,
    peer_links: f64,
    rss_kib: Vec<u64>,
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
    let sink = hold::sink().await?;

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
    // The Service: one address in front of every replica, served by a few processes.
    let front_addr =
        std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 10), 0))?.local_addr()?;
    let mut front_args = vec!["front".to_owned(), front_addr.to_string()];
    front_args.extend(addrs.iter().map(ToString::to_string));
    let front_args: Vec<&str> = front_args.iter().map(String::as_str).collect();
    let me = std::env::current_exe()?;
    let fronts = (0..FRONTS)
        .map(|k| Proc::spawn(&format!("front-{k}"), &me, &front_args, &logs, true))
        .collect::<Result<Vec<Proc>, BoxError>>()?;
    say(format!(
        "{} replicas ready on port {port}, DNS at {}, front at {front_addr} ({FRONTS} processes)",
        o.servers, dns.addr
    ));

    // The agents, each given only the front's URL, in a few processes of their own.
    let started = Instant::now();
    let url = format!("ws://{front_addr}/connect");
    let sessions = o.sessions.to_string();
    let mut agent_procs = Vec::new();
    for k in 0..AGENT_PROCESSES {
        let first = k * o.clients / AGENT_PROCESSES;
        let count = (k + 1) * o.clients / AGENT_PROCESSES - first;
        let args = [
            "agents",
            &url,
            &first.to_string(),
            &count.to_string(),
            &sessions,
        ];
        agent_procs.push(Proc::spawn(
            &format!("agents-{k}"),
            &me,
            &args,
            &logs,
            false,
        )?);
    }
    let up = until_all_reachable(&addrs, o.clients, &files).await?;
    let mut held_by_all = None;
    if o.sessions == SessionCount::All {
        for &a in addrs.iter() {
            held_by_all = until_held(a, o.clients).await?.map(|t| t - started);
        }
    }
    say(format!(
        "{} agents reachable through every replica after {:.1} s, held by every replica after {}; {} peer links",
        o.clients,
        (up - started).as_secs_f64(),
        held_by_all.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        total(&addrs, "rd_peer_links").await
    ));

    // A tenth of the agents hold a long-lived idle stream through a random replica.
    let holds = Arc::new(hold::Holds::default());
    let stop_holds = CancellationToken::new();
    let held = (o.clients as f64 * o.held).round() as usize;
    for k in 0..held {
        let client = format!("c{}", k * o.clients / held.max(1));
        tokio::spawn(hold::hold(
            client,
            sink,
            Rng::new(1000 + k as u64),
            fleet.ready.clone(),
            addrs.clone(),
            holds.clone(),
            stop_holds.clone(),
        ));
    }
    holds.wait_open(held, BOUND).await?;
    say(format!("{held} long-lived streams open"));

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
    // The workload runs a while on the whole fleet first: the steady state.
    let hops_before = steady_hops(&addrs).await;
    let rss_before = fleet.rss_kib();
    say(format!(
        "steady state: {} peer hops in {STEADY:?}; replicas' RSS {rss_before:?} KiB",
        show(hops_before)
    ));

    let mut restarts = Vec::new();
    for i in 0..o.servers {
        // Out of the endpoints first, as the kubelet marks a terminating pod unready.
        fleet.ready[i].store(false, Ordering::SeqCst);
        let proc = fleet.replicas[i].proc.take().ok_or("replica not running")?;
        let term = Instant::now();
        proc.signal("TERM")?;
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
        let (exit_at, drain_status) = tokio::time::timeout(BOUND, exited)
            .await
            .map_err(|_| format!("replica {i} did not exit within {BOUND:?} of SIGTERM"))??;
        let start = Instant::now();
        fleet.start_replica(i)?;
        wait_ready(addrs[i]).await?;
        let ready_at = Instant::now();
        fleet.ready[i].store(true, Ordering::SeqCst);
        let held_all = if o.sessions == SessionCount::All {
            until_held(addrs[i], o.clients).await?.map(|t| t - start)
        } else {
            None
        };
        let via_new = until_all_reachable(&[addrs[i]], o.clients, &files).await?;
        let r = Restart {
            replica: i,
            drained: exit_at - term,
            drain_status,
            ready: ready_at - start,
            held_all,
            reachable_via_new: via_new - start,
            peer_links: total(&addrs, "rd_peer_links").await,
            rss_kib: fleet.rss_kib(),
        };
        say(format!(
            "replica {i}: drained in {:.2} s ({}), ready {:.2} s after start, holding every agent {} after start, \
             every agent through it {:.2} s after start, {} peer links, RSS {:?} KiB",
            r.drained.as_secs_f64(),
            r.drain_status,
            r.ready.as_secs_f64(),
            r.held_all.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            r.reachable_via_new.as_secs_f64(),
            r.peer_links,
            r.rss_kib,
        ));
        restarts.push(r);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let hops_after = steady_hops(&addrs).await;
    let rss_after = fleet.rss_kib();
    stop.cancel();
    while workers.join_next().await.is_some() {}
    stop_holds.cancel();
    drop(agent_procs);

    let refused = lock(&out.refused).clone();
    let cut = lock(&out.cut).clone();
    let small_ok = out.small_ok.load(Ordering::Relaxed);
    let large_ok = out.large_ok.load(Ordering::Relaxed);
    let total_requests = small_ok + large_ok + refused.len() as u64 + cut.len() as u64;
    let success = (small_ok + large_ok) as f64 / total_requests.max(1) as f64;
    let expected_links = (o.servers * (o.servers - 1)) as f64;
    let hold_stats = holds.stats();

    println!(
        "\n## Rolling restart: {} replicas behind one front, {} agents ({} sessions each), {} long-lived streams, grace {}",
        o.servers, o.clients, o.sessions, held, o.grace
    );
    println!(
        "requests {total_requests}: {small_ok} small + {large_ok} x 16 MiB ok ({:.3} %); failed {}, transfers cut {}",
        success * 100.0,
        refused.len(),
        cut.len()
    );
    println!(
        "peer hops in the steady state: {} in {STEADY:?} before the first restart, {} after the last",
        show(hops_before),
        show(hops_after)
    );
    println!(
        "long-lived streams: {} opened, {} cut by a drain deadline and opened again elsewhere, {} refused",
        hold_stats.opened, hold_stats.ended, hold_stats.refused
    );
    println!("replicas' RSS (KiB): {rss_before:?} before, {rss_after:?} after");
    println!("\n| replica | drain took | ready after start | holding every agent after start | every agent via it | peer links after | RSS after (KiB) |");
    println!("|---|---|---|---|---|---|---|");
    for r in &restarts {
        println!(
            "| {} | {:.2} s | {:.2} s | {} | {:.2} s | {} of {} | {:?} |",
            r.replica,
            r.drained.as_secs_f64(),
            r.ready.as_secs_f64(),
            r.held_all
                .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            r.reachable_via_new.as_secs_f64(),
            r.peer_links,
            expected_links,
            r.rss_kib,
        );
    }
    let t0 = started;
    for (t, why) in refused.iter().take(10) {
        println!("failed at +{:.2} s: {why}", (*t - t0).as_secs_f64());
    }
    for (t, why) in cut.iter().take(10) {
        println!("cut at +{:.2} s: {why}", (*t - t0).as_secs_f64());
    }
    let report = json!({
        "servers": o.servers,
        "clients": o.clients,
        "sessions": o.sessions.to_string(),
        "grace": o.grace,
        "long_lived_streams": held,
        "requests": total_requests,
        "small_ok": small_ok,
        "large_ok": large_ok,
        "failed": refused.len(),
        "cut": cut.len(),
        "steady_hops_before": hops_before,
        "steady_hops_after": hops_after,
        "held_by_every_replica_s": held_by_all.map(|d| d.as_secs_f64()),
        "long_lived_opened": hold_stats.opened,
        "long_lived_cut_at_deadline": hold_stats.ended,
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "restarts": restarts.iter().map(|r| json!({
            "replica": r.replica,
            "drained_s": r.drained.as_secs_f64(),
            "drain_status": r.drain_status,
            "ready_s": r.ready.as_secs_f64(),
            "held_all_s": r.held_all.map(|d| d.as_secs_f64()),
            "reachable_via_new_s": r.reachable_via_new.as_secs_f64(),
            "peer_links": r.peer_links,
            "rss_kib": r.rss_kib,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        o.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    drop(fronts);
    drop(dns);
    Ok(refused.is_empty() && cut.is_empty() && hops_before == Some(0.0) && hops_after == Some(0.0))
}
