//! `rd-bench --only rathole` (and a section of the full run): rathole 0.5 as an anchor on
//! the `--forward` rows (issue 26).
//!
//! rathole is a reverse tunnel for raw TCP like rd-server's `--forward`: its server binds
//! a service port, its client dials out to the server and connects each forwarded
//! connection to a local address. Here both run as child processes on loopback (TCP
//! transport, no encryption, configs written as TOML into the bench's temp dir), the
//! client forwarding to rd-dummy, so that the same load runs through `rd-server
//! --forward` + rd-client and through rathole's server + client, interleaved in the same
//! run, next to the direct and relay-chain paths for scale. rathole opens one TCP data
//! channel per forwarded connection (8 kept ready in advance); rd carries them all on one
//! websocket session.
//!
//! The binary is `$RD_BENCH_RATHOLE`, else `rathole` in `$CARGO_HOME/bin` (`~/.cargo/bin`)
//! or on `$PATH` (`cargo install rathole`); without it the section is one row saying so.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use rd_benches::{procfs, Latencies};

use crate::load::{self, BoxError, LoopResult, Path};
use crate::procs::{Meter, Proc};
use crate::quick::median;
use crate::report::{fmt_value, Row};
use crate::{mb_per_s, say, us, KIB, MIB};

const GIB: f64 = (1u64 << 30) as f64;

/// The paths of the section, in this order.
const DIRECT: usize = 0;
const RELAY: usize = 1;
const RD: usize = 2;
const RATHOLE: usize = 3;

/// The rathole binary, if installed: `$RD_BENCH_RATHOLE`, `$CARGO_HOME/bin/rathole`,
/// `~/.cargo/bin/rathole`, then `$PATH`.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RD_BENCH_RATHOLE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    cargo_home
        .map(|h| h.join("bin"))
        .into_iter()
        .chain(path_dirs)
        .map(|d| d.join("rathole"))
        .find(|p| p.is_file())
}

/// The version line of the binary (`rathole 0.5.0`), for the notes.
fn version(bin: &FsPath) -> String {
    std::process::Command::new(bin)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rathole (version unknown)".into())
}

/// A rathole server and client forwarding the server's service port to `local`.
#[derive(Debug)]
pub struct Rathole {
    pub server: Proc,
    pub client: Proc,
    /// The service port on the server: connections here reach `local` through the tunnel.
    pub addr: SocketAddr,
}

impl Rathole {
    /// Writes the two configs into `dir`, starts both ends and waits (15 s) until a 1 KiB
    /// `file` comes back through the service port.
    pub async fn start(
        bin: &FsPath,
        dir: &FsPath,
        local: SocketAddr,
        file: &str,
    ) -> Result<Self, BoxError> {
        // Ports that were free a moment ago (the bench is not a test).
        let free = || -> std::io::Result<SocketAddr> {
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
        };
        let control = free()?;
        let service = free()?;
        let server_toml = dir.join("rathole-server.toml");
        std::fs::write(
            &server_toml,
            format!(
                "[server]\nbind_addr = \"{control}\"\n\n[server.transport]\ntype = \"tcp\"\n\n\
                 [server.services.bench]\ntoken = \"rd-bench\"\nbind_addr = \"{service}\"\n"
            ),
        )?;
        let client_toml = dir.join("rathole-client.toml");
        std::fs::write(
            &client_toml,
            format!(
                "[client]\nremote_addr = \"{control}\"\n\n[client.transport]\ntype = \"tcp\"\n\n\
                 [client.services.bench]\ntoken = \"rd-bench\"\nlocal_addr = \"{local}\"\n"
            ),
        )?;
        let server_arg = server_toml.to_string_lossy().to_string();
        let client_arg = client_toml.to_string_lossy().to_string();
        let mut server = Proc::spawn(
            "rathole-server",
            bin,
            &["--server", &server_arg],
            dir,
            false,
        )?;
        let mut client = Proc::spawn(
            "rathole-client",
            bin,
            &["--client", &client_arg],
            dir,
            false,
        )?;
        // The server binds the service port once the client's control channel is up.
        let path = path(service);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match load::fetch_once(&path, file).await {
                Ok(n) if n == KIB => break,
                r if Instant::now() > deadline => {
                    return Err(format!("rathole never came up: {r:?}").into());
                }
                _ => {
                    if !server.alive() || !client.alive() {
                        return Err(format!(
                            "rathole exited (server alive: {}, client alive: {})",
                            server.alive(),
                            client.alive()
                        )
                        .into());
                    }
                    // Polling for readiness (the bench is not a test).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Ok(Self {
            server,
            client,
            addr: service,
        })
    }

    pub fn pids(&self) -> [u32; 2] {
        [self.server.pid(), self.client.pid()]
    }
}

fn path(addr: SocketAddr) -> Path {
    Path {
        name: "rathole",
        addr,
        prefix: String::new(),
        connect: None,
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rounds: usize,
    pub large: (&'static str, u64),
    pub medium: (&'static str, u64),
    pub small: &'static str,
    /// Closed-loop and fixed-rate time per path and round.
    pub duration: Duration,
    pub rate: u64,
    pub conns: usize,
    /// Fresh connections per path and round for the setup time.
    pub setup_conns: usize,
    /// Idle connections held for the memory figure.
    pub idle_conns: usize,
}

/// One round's figures for one path.
#[derive(Debug, Default, Clone, Copy)]
struct PathRound {
    bulk1: f64,
    bulk8: f64,
    small: f64,
    fixed_p50: f64,
    fixed_p99: f64,
    setup_p50: f64,
    setup_p99: f64,
    /// CPU seconds per GiB, server end then client end (tunnels only).
    cpu1: [f64; 2],
    cpu8: [f64; 2],
    /// Peak RSS (MiB) during the downloads (1 and 8 streams), server end then client end.
    peak: [f64; 2],
}

/// The section's figures for one metric: direct and relay for scale, rd and rathole.
#[derive(Debug, Clone)]
struct Pair {
    scenario: String,
    metric: String,
    unit: &'static str,
    context: Option<(f64, f64)>,
    rd: f64,
    rathole: f64,
}

/// Fresh connections, one after the other, each carrying one request for `file`: the
/// time from `connect` to the whole response.
async fn setup_round(path: &Path, file: &str, n: usize) -> Result<(f64, f64), BoxError> {
    let mut l = Latencies::new();
    for _ in 0..n {
        let t = Instant::now();
        load::fetch_once(path, file).await?;
        l.record(t.elapsed());
    }
    Ok((us(l.percentile(50.0)), us(l.percentile(99.0))))
}

/// RSS growth of `ends` (KiB per connection, summed over both ends) while `n` forwarded
/// connections that each carried one request for `file` are held open.
async fn idle_growth(path: &Path, ends: [u32; 2], file: &str, n: usize) -> Result<f64, BoxError> {
    let rss = || -> u64 {
        ends.iter()
            .map(|&p| procfs::status_kib(p, "VmRSS").unwrap_or(0))
            .sum()
    };
    let before = rss();
    let mut held = Vec::with_capacity(n);
    // 50 at a time.
    while held.len() < n {
        let batch = (n - held.len()).min(50);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let path = path.clone();
            let file = file.to_string();
            tasks.spawn(async move { load::open_after_one(&path, &file).await });
        }
        while let Some(t) = tasks.join_next().await {
            held.push(t??);
        }
    }
    let after = rss();
    drop(held);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Runs the section: `paths` are direct, relay and rd's `--forward`; `rd_ends` rd-server's
/// and rd-client's pids. Returns the rows and, for `--only rathole`, a side-by-side table.
pub async fn run(
    paths: [Path; 3],
    rd_ends: [u32; 2],
    dir: &FsPath,
    local: SocketAddr,
    plan: &Plan,
) -> Result<(Vec<Row>, String), BoxError> {
    let Some(bin) = find_binary() else {
        say("rathole: not installed (cargo install rathole); rows skipped");
        let row = Row::new("rathole 0.5 anchor", "skipped", "")
            .note("rathole not installed (cargo install rathole, or RD_BENCH_RATHOLE=PATH)");
        return Ok((vec![row], "rathole not installed: rows skipped\n".into()));
    };
    let version = version(&bin);
    let rathole = Rathole::start(&bin, dir, local, plan.small).await?;
    say(format!(
        "rathole: {version} ({}), service {}",
        bin.display(),
        rathole.addr
    ));
    let [direct, relay, forward] = paths;
    let paths = [direct, relay, forward, path(rathole.addr)];
    let ends: [Option<[u32; 2]>; 4] = [None, None, Some(rd_ends), Some(rathole.pids())];
    let n = paths.len();
    let order = |round: usize| (0..n).map(move |k| (round + k) % n);

    // Memory of idle forwarded connections first, on processes that have not yet moved
    // bulk data (whose freed buffers would otherwise absorb the growth).
    say(format!(
        "rathole: {} idle forwarded connections, one request each",
        plan.idle_conns
    ));
    let mut idle = [0.0; 4];
    for i in [RD, RATHOLE] {
        if let Some(e) = ends[i] {
            idle[i] = idle_growth(&paths[i], e, plan.small, plan.idle_conns).await?;
        }
    }
    say(format!(
        "  KiB per idle connection, both ends: rd {:.2}, rathole {:.2}",
        idle[RD], idle[RATHOLE]
    ));

    let clients: Vec<load::PoolClient> = (0..n).map(|_| load::pool_client()).collect();
    let mut rounds: Vec<[PathRound; 4]> = Vec::new();
    let mut small: [LoopResult; 4] = Default::default();
    let mut truncated = [0usize; 4];
    let mut errors = [0u64; 4];
    for round in 0..plan.rounds {
        let mut r = [PathRound::default(); 4];
        for i in order(round) {
            let pids = ends[i].map(Vec::from).unwrap_or_default();
            let meter = Meter::start(&pids);
            let b = load::bulk(&paths[i], plan.large.0, plan.large.1, 1).await?;
            let u1 = meter.stop();
            let meter = Meter::start(&pids);
            let b8 = load::bulk(&paths[i], plan.medium.0, plan.medium.1, 8).await?;
            let u8 = meter.stop();
            truncated[i] += b.failed + b8.failed;
            r[i].bulk1 = mb_per_s(b.bytes, b.elapsed);
            r[i].bulk8 = mb_per_s(b8.bytes, b8.elapsed);
            if ends[i].is_some() {
                for e in 0..2 {
                    r[i].cpu1[e] = u1[e].cpu_s / (b.bytes as f64 / GIB).max(1e-9);
                    r[i].cpu8[e] = u8[e].cpu_s / (b8.bytes as f64 / GIB).max(1e-9);
                    r[i].peak[e] = u1[e].peak_kib.max(u8[e].peak_kib) as f64 / 1024.0;
                }
            }
        }
        for i in order(round) {
            let l = load::closed_loop(&paths[i], plan.small, plan.conns, plan.duration).await?;
            r[i].small = l.rate();
            errors[i] += l.errors;
            small[i].merge(l);
        }
        for i in order(round) {
            let mut l =
                load::open_loop(&clients[i], &paths[i], plan.small, plan.rate, plan.duration)
                    .await?;
            r[i].fixed_p50 = us(l.latencies.percentile(50.0));
            r[i].fixed_p99 = us(l.latencies.percentile(99.0));
            errors[i] += l.errors;
        }
        for i in order(round) {
            (r[i].setup_p50, r[i].setup_p99) =
                setup_round(&paths[i], plan.small, plan.setup_conns).await?;
        }
        let f = |pick: fn(&PathRound) -> f64| {
            r.iter()
                .map(|x| format!("{:.0}", pick(x)))
                .collect::<Vec<_>>()
                .join("/")
        };
        say(format!(
            "  round {} (direct/relay/rd/rathole): bulk1 {} MB/s, bulk8 {} MB/s, small {} req/s, \
             fixed p50 {} p99 {} µs, setup p50 {} µs",
            round + 1,
            f(|x| x.bulk1),
            f(|x| x.bulk8),
            f(|x| x.small),
            f(|x| x.fixed_p50),
            f(|x| x.fixed_p99),
            f(|x| x.setup_p50),
        ));
        rounds.push(r);
    }

    let med = |i: usize, pick: &dyn Fn(&PathRound) -> f64| {
        median(rounds.iter().map(|r| pick(&r[i])).collect())
    };
    let mut pairs = Vec::new();
    let mut pair = |scenario: &str,
                    metric: &str,
                    unit: &'static str,
                    context: bool,
                    pick: &dyn Fn(usize) -> f64| {
        pairs.push(Pair {
            scenario: scenario.into(),
            metric: metric.into(),
            unit,
            context: context.then(|| (pick(DIRECT), pick(RELAY))),
            rd: pick(RD),
            rathole: pick(RATHOLE),
        });
    };
    let large = format!("bulk 1 x {} MiB", plan.large.1 / MIB);
    let medium = format!("bulk 8 x {} MiB", plan.medium.1 / MIB);
    pair(&large, "throughput", "MB/s", true, &|i| {
        med(i, &|r| r.bulk1)
    });
    pair(&medium, "throughput", "MB/s", true, &|i| {
        med(i, &|r| r.bulk8)
    });
    let small_label = format!("small 1 KiB, {} conns", plan.conns);
    pair(&small_label, "requests", "req/s", true, &|i| {
        med(i, &|r| r.small)
    });
    for (pct, name) in [(50.0, "latency p50"), (99.0, "latency p99")] {
        let v: Vec<f64> = small
            .iter_mut()
            .map(|l| us(l.latencies.percentile(pct)))
            .collect();
        pair(&small_label, name, "µs", true, &|i| v[i]);
    }
    let fixed_label = format!("fixed {} req/s 1 KiB (open loop)", plan.rate);
    pair(&fixed_label, "latency p50", "µs", true, &|i| {
        med(i, &|r| r.fixed_p50)
    });
    pair(&fixed_label, "latency p99", "µs", true, &|i| {
        med(i, &|r| r.fixed_p99)
    });
    let setup_label = "new connection + first 1 KiB request";
    pair(setup_label, "time p50", "µs", true, &|i| {
        med(i, &|r| r.setup_p50)
    });
    pair(setup_label, "time p99", "µs", true, &|i| {
        med(i, &|r| r.setup_p99)
    });
    for (e, end) in ["server end", "client end"].iter().enumerate() {
        pair(&large, &format!("CPU per GiB, {end}"), "s", false, &|i| {
            med(i, &|r| r.cpu1[e])
        });
        pair(&medium, &format!("CPU per GiB, {end}"), "s", false, &|i| {
            med(i, &|r| r.cpu8[e])
        });
    }
    for (e, end) in ["server end", "client end"].iter().enumerate() {
        pair(
            "bulk downloads (1 and 8 streams)",
            &format!("peak RSS, {end}"),
            "MiB",
            false,
            &|i| med(i, &|r| r.peak[e]),
        );
    }
    pair(
        &format!("{} idle forwarded connections", plan.idle_conns),
        "RSS growth per connection, both ends",
        "KiB",
        false,
        &|i| idle[i],
    );

    let note = format!(
        "{version}, TCP transport; median of {} interleaved rounds (latency percentiles of the \
         small rows over all rounds); direct and relay columns for scale; rathole sets \
         TCP_NODELAY on its tunnel connections only, not on the visitor and local sockets (its \
         per-service `nodelay` key is parsed but unused), which probably explains latency tails \
         near 40 ms (Nagle + delayed ACK)",
        plan.rounds
    );
    let failures = format!(
        "truncated downloads direct/relay/rd/rathole {}/{}/{}/{}, failed requests {}/{}/{}/{}",
        truncated[0],
        truncated[1],
        truncated[2],
        truncated[3],
        errors[0],
        errors[1],
        errors[2],
        errors[3]
    );
    let mut rows = Vec::new();
    for (k, p) in pairs.iter().enumerate() {
        for (who, v) in [("rd --forward", p.rd), ("rathole", p.rathole)] {
            let row = Row::new(
                &format!("anchor: {}", p.scenario),
                &format!("{}, {who}", p.metric),
                p.unit,
            );
            let mut row = match p.context {
                Some((d, r)) => row.paths(d, r, v),
                None => row.tunnel_only(v),
            };
            if k == 0 && who == "rathole" {
                row = row.note(format!("{note}; {failures}"));
            }
            rows.push(row);
        }
    }
    let table = side_by_side(&pairs, &format!("{note}\n{failures}"));
    drop(rathole);
    Ok((rows, table))
}

/// The pairs as one text table: direct, relay, rd `--forward`, rathole, rd/rathole.
fn side_by_side(pairs: &[Pair], note: &str) -> String {
    let headers = [
        "scenario",
        "metric",
        "direct",
        "relay",
        "rd --forward",
        "rathole",
        "rd/rathole",
    ];
    let cells: Vec<Vec<String>> = pairs
        .iter()
        .map(|p| {
            let ctx = |v: Option<f64>| v.map(fmt_value).unwrap_or_else(|| "-".into());
            vec![
                p.scenario.clone(),
                format!("{} ({})", p.metric, p.unit),
                ctx(p.context.map(|c| c.0)),
                ctx(p.context.map(|c| c.1)),
                fmt_value(p.rd),
                fmt_value(p.rathole),
                if p.rathole != 0.0 {
                    format!("{:.2}", p.rd / p.rathole)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        row.iter()
            .zip(&widths)
            .enumerate()
            .map(|(k, (c, w))| {
                let pad = w - c.chars().count();
                if k < 2 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&headers.map(String::from));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out.push_str(note);
    out.push('\n');
    out
}
