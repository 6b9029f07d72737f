//! `rd-bench`: the end-to-end benchmark (`make bench`).
//!
//! Starts release builds of rd-dummy, rd-server and rd-client on loopback, plus two ideal TCP
//! relays in this process, and measures three paths to rd-dummy, interleaved: direct, the
//! relay chain (the same three TCP hops as the tunnel, no framing) and the tunnel; bulk and
//! small requests also through the server's `--forward` listener, HTTP CONNECT and SOCKS5
//! (`--only raw`: those rows alone). Then
//! library-level scale measurements in child processes, and rathole 0.5 (when installed)
//! as an anchor on the `--forward` rows (`rathole.rs`). Prints the table, writes
//! `target/bench/report.json` and, for full-scale runs, `docs/benchmarks.md`.
//!
//! Options: `--bin-dir DIR` (default `target/release`), `--out FILE`, `--docs FILE`
//! (`--no-docs` to skip). `RD_BENCH_SCALE` (default 1) scales sizes and durations.
//! Exits 0 whatever the numbers; non-zero only when something breaks.

mod isolation;
mod load;
mod longlink;
mod procs;
mod quick;
mod rathole;
mod report;
mod restart_storm;
mod scale;
mod slow_streams;
mod storm;
mod udp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rd_benches::scaled_duration;
use serde_json::json;
use tokio::net::TcpListener;

use crate::load::{BoxError, LoopResult, Path};
use crate::procs::{accumulate, Meter, Proc, TempDir, Usage};
use crate::report::Row;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

#[derive(Debug)]
struct Options {
    bin_dir: PathBuf,
    out: PathBuf,
    docs: Option<PathBuf>,
    scale: f64,
    /// Run only this scenario (`isolation`); the table is printed, nothing is written.
    only: Option<String>,
    /// Start rd-server without `--forward` and skip the raw-TCP paths, so binaries older
    /// than the forwarding work can run (A/B comparisons with `--only bulk|quick`).
    no_forward: bool,
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn parse_options() -> Result<Options, BoxError> {
    let root = workspace_root();
    let scale = rd_benches::scale();
    let mut o = Options {
        bin_dir: root.join("target/release"),
        out: root.join("target/bench/report.json"),
        docs: (scale == 1.0).then(|| root.join("docs/benchmarks.md")),
        scale,
        only: None,
        no_forward: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bin-dir" => o.bin_dir = PathBuf::from(value()?),
            "--out" => o.out = PathBuf::from(value()?),
            "--docs" => o.docs = Some(PathBuf::from(value()?)),
            "--no-docs" => o.docs = None,
            "--only" => o.only = Some(value()?),
            "--no-forward" => o.no_forward = true,
            "-h" | "--help" => {
                println!(
                    "usage: rd-bench [--bin-dir DIR] [--out FILE] [--docs FILE | --no-docs] [--only isolation|longlink|slow-streams|storm|restart-storm|bulk|quick|rathole|udp] [--no-forward]\n\
                          env: RD_BENCH_SCALE (default 1; 0.1 for a quick run); RD_BENCH_RATHOLE (the rathole binary for the anchor rows,\n\
                          default: cargo's bin dir, then PATH)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--scale-child") {
        let kind = args.get(2).cloned().unwrap_or_default();
        let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1000);
        return match scale::child_main(&kind, n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rd-bench scale child {kind}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).map(String::as_str) == Some("--pong-floor") {
        return match storm::floor_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rd-bench pong floor: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).map(String::as_str) == Some("--storm-child") {
        let addr = args.get(2).cloned().unwrap_or_default();
        let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        return match storm::child_main(&addr, n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rd-bench storm child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.get(1).map(String::as_str) == Some("--restart-storm-child") {
        let url = args.get(2).cloned().unwrap_or_default();
        let n = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(2_000);
        return match restart_storm::child_main(&url, n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rd-bench restart-storm child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = parse_options().and_then(|o| {
        if o.only.as_deref() == Some("restart-storm") {
            // Its own processes only, like storm.
            let env = |name: &str, default: f64| {
                std::env::var(name)
                    .ok()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(default)
            };
            let n = env("RD_RESTART_CLIENTS", 2_000.0) as usize;
            let outage = Duration::from_secs_f64(env("RD_RESTART_OUTAGE_S", 5.0));
            let r = restart_storm::run(&o.bin_dir, n, outage)?;
            println!(
                "restart storm: {} of {} library clients back {:.2} s after rd-server restarted \
                 ({:.1} s outage); {} failed attempts after the restart, {} handshakes answered 503",
                r.back, r.clients, r.all_back_s, r.outage_s, r.failed_after_restart, r.rejected_503
            );
            let bins: Vec<String> = r
                .histogram
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{:.1}-{:.1}s:{c}", i as f64 * 0.5, (i + 1) as f64 * 0.5))
                .collect();
            println!("comebacks per 0.5 s after the restart: {}", bins.join(" "));
            return Ok(());
        }
        if o.only.as_deref() == Some("storm") {
            // Its own processes only: nothing else of the bench is started.
            let n = std::env::var("RD_STORM_SESSIONS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(10_000);
            // Dial latency to a random session with 100 and with n sessions (in-process
            // server, agents in a storm load process): O(1) lookup means the same figures.
            for sessions in [100, n] {
                let r = scale::run_child("dial", sessions)?;
                println!(
                    "dial to a random one of {} sessions: p50 {:.1} us, p99 {:.1} us",
                    r.live, r.dial_p50_us, r.dial_p99_us
                );
            }
            let f = storm::run_floor(n)?;
            println!(
                "floor (bare tokio pong server, same pings): idle CPU {:.1} % of a core \
                 (spread; {:.1} % paired)",
                f.idle_cpu_pct, f.idle_cpu_paired_pct
            );
            // The defaults, then the previous defaults (16 KiB read buffer, no bursts).
            let previous = ["--ws-read-buffer", "16384", "--ws-read-burst", "0"];
            for args in [&[][..], &previous[..]] {
                let r = storm::run(&o.bin_dir, n, args)?;
                println!(
                    "rd-server {args:?}: {} of {} sessions up in {:.2} s, {} failed handshakes \
                     (first error: {}), {:.1} KiB RSS per session, idle CPU {:.1} % of a core \
                     (pings spread like independent agents; {:.1} % with pings paired per ms)",
                    r.up,
                    r.sessions,
                    r.all_up_s,
                    r.failed,
                    r.first_error.as_deref().unwrap_or("none"),
                    r.kib_per_session,
                    r.idle_cpu_pct,
                    r.idle_cpu_paired_pct
                );
            }
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        if o.only.as_deref() == Some("udp") {
            // Its own processes only: a UDP forward to an echo in this process.
            let tmp = TempDir::new()?;
            let rows = rt.block_on(udp::run(&o.bin_dir, &tmp.0, o.scale))?;
            println!("\n{}", report::text_table(&rows));
            return Ok(());
        }
        rt.block_on(run(o))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The three paths, the tunnel processes' pids, and what the files are.
struct Bench {
    paths: [Path; 3],
    /// Raw TCP through the tunnel: `--forward`, CONNECT and SOCKS5, each in the tunnel
    /// column of its own rows, next to the same direct and relay figures.
    raw_paths: [Path; 3],
    /// rd-server, rd-client, rd-dummy.
    pids: [u32; 3],
    small: &'static str,
    medium: (&'static str, u64),
    large: (&'static str, u64),
    duration: Duration,
    rate: u64,
    conns: usize,
    rounds: u32,
    /// Interleaved rounds of the fixed-rate and head-of-line rows (medians).
    latency_rounds: usize,
}

const DIRECT: usize = 0;
const RELAY: usize = 1;
const TUNNEL: usize = 2;
const PROC_NAMES: [&str; 3] = ["rd-server", "rd-client", "rd-dummy"];

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(crate) fn say(msg: impl AsRef<str>) {
    eprintln!("[rd-bench] {}", msg.as_ref());
}

async fn run(o: Options) -> Result<(), BoxError> {
    let started = Instant::now();
    let s = o.scale;
    for b in ["rd-server", "rd-client", "rd-dummy"] {
        if !o.bin_dir.join(b).is_file() {
            return Err(format!(
                "{} is missing: build with `cargo build --release --bins -p rd-server-bin -p rd-client-bin -p rd-dummy-bin`",
                o.bin_dir.join(b).display()
            )
            .into());
        }
    }
    let tmp = TempDir::new()?;
    let files = tmp.0.join("files");
    std::fs::create_dir_all(&files)?;
    let medium_size = ((256 * MIB) as f64 * s) as u64;
    let large_size = (GIB as f64 * s) as u64;
    say(format!(
        "scale {s}: generating files (1 KiB, {} MiB, {} MiB) in {}",
        medium_size / MIB,
        large_size / MIB,
        files.display()
    ));
    let t = Instant::now();
    procs::generate_file(&files.join("small.bin"), KIB, 1)?;
    procs::generate_file(&files.join("medium.bin"), medium_size, 2)?;
    procs::generate_file(&files.join("large.bin"), large_size, 3)?;
    say(format!("generated in {:.1} s", t.elapsed().as_secs_f64()));

    let bin = |b: &str| o.bin_dir.join(b);
    let files_arg = files.to_string_lossy().to_string();
    let dummy = Proc::spawn(
        "rd-dummy",
        &bin("rd-dummy"),
        &["--listen", "127.0.0.1:0", "--dir", &files_arg],
        &tmp.0,
        true,
    )?;
    let dummy_addr = dummy.addr.ok_or("no dummy address")?;
    // A port for `--forward` that was free a moment ago (the bench is not a test).
    let forward_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let forward = format!("{forward_addr}=bench:tcp/{dummy_addr}");
    let server_args: &[&str] = if o.no_forward {
        &["--listen", "127.0.0.1:0"]
    } else {
        &["--listen", "127.0.0.1:0", "--forward", &forward]
    };
    let server = Proc::spawn("rd-server", &bin("rd-server"), server_args, &tmp.0, true)?;
    let server_addr = server.addr.ok_or("no server address")?;
    let connect = format!("ws://{server_addr}/connect");
    // RD_BENCH_CLIENT_ARGS: extra rd-client flags, e.g. `--flow-control pause` to compare.
    let extra = std::env::var("RD_BENCH_CLIENT_ARGS").unwrap_or_default();
    let mut client_args = vec!["--connect", connect.as_str(), "--id", "bench"];
    client_args.extend(extra.split_whitespace());
    let mut client = Proc::spawn("rd-client", &bin("rd-client"), &client_args, &tmp.0, false)?;

    // The relay chain: this process, two hops of plain TCP in front of rd-dummy.
    let r2 = TcpListener::bind("127.0.0.1:0").await?;
    let r2_addr = r2.local_addr()?;
    tokio::spawn(load::relay(r2, dummy_addr));
    let r1 = TcpListener::bind("127.0.0.1:0").await?;
    let r1_addr = r1.local_addr()?;
    tokio::spawn(load::relay(r1, r2_addr));

    let paths = [
        Path {
            name: "direct",
            addr: dummy_addr,
            prefix: String::new(),
            connect: None,
        },
        Path {
            name: "relay",
            addr: r1_addr,
            prefix: String::new(),
            connect: None,
        },
        Path {
            name: "tunnel",
            addr: server_addr,
            prefix: format!("/client/bench/http/{dummy_addr}"),
            connect: None,
        },
    ];
    let raw_paths = [
        Path {
            name: "forward",
            addr: forward_addr,
            prefix: String::new(),
            connect: None,
        },
        Path {
            name: "connect",
            addr: server_addr,
            prefix: String::new(),
            connect: Some(load::Tunnel::Connect(dummy_addr)),
        },
        Path {
            name: "socks5",
            addr: server_addr,
            prefix: String::new(),
            connect: Some(load::Tunnel::Socks5(dummy_addr)),
        },
    ];

    // The client connects asynchronously: wait until the tunnel answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match load::fetch_once(&paths[TUNNEL], "small.bin").await {
            Ok(n) if n == KIB => break,
            r if Instant::now() > deadline => {
                return Err(format!(
                    "the tunnel never came up: {r:?}; logs in {}",
                    tmp.0.display()
                )
                .into());
            }
            _ => {
                if !client.alive() {
                    return Err("rd-client exited".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let raw_count = if o.no_forward { 0 } else { raw_paths.len() };
    for p in paths.iter().chain(&raw_paths[..raw_count]) {
        load::fetch_once(p, "small.bin")
            .await
            .map_err(|e| format!("{}: {e}", p.name))?;
    }
    say(format!(
        "dummy {dummy_addr}, server {server_addr}, relays {r1_addr} -> {r2_addr}; up in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    match o.only.as_deref() {
        None => {}
        Some("isolation") => {
            let r = isolation::run(&paths[TUNNEL], &files, 400, Some(server.pid()), s).await?;
            let relay = isolation::run(&paths[RELAY], &files, 400, None, s).await?;
            println!("\n{}", report::text_table(&isolation::rows(&r, &relay)));
            return Ok(());
        }
        Some("longlink") => {
            let size = medium_size;
            let r = longlink::run(
                &o.bin_dir,
                &tmp.0,
                server_addr,
                dummy_addr,
                "medium.bin",
                size,
            )
            .await?;
            println!("\n{}", report::text_table(&longlink::rows(&r)));
            return Ok(());
        }
        Some("bulk") => {
            // One 1 GiB download per path, for quick A/B comparisons.
            for p in &paths[..3] {
                let r = load::bulk(p, "large.bin", large_size, 1).await?;
                say(format!(
                    "  {:<6} {:>8.1} MB/s ({} failed)",
                    p.name,
                    mb_per_s(r.bytes, r.elapsed),
                    r.failed
                ));
            }
            return Ok(());
        }
        Some("quick") => {
            let rounds = std::env::var("RD_BENCH_ROUNDS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(3);
            let plan = quick::Plan {
                rounds,
                large: ("large.bin", large_size),
                medium: ("medium.bin", medium_size),
                small: "small.bin",
                duration: scaled_duration(8.0, s),
                rate: 1000,
                conns: 50,
                parts: std::env::var("RD_BENCH_PARTS")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            };
            quick::run(&paths, [server.pid(), client.pid()], &plan).await?;
            return Ok(());
        }
        Some("slow-streams") => {
            println!("\n{}", report::text_table(&slow_stream_rows(10_000)?));
            return Ok(());
        }
        Some("rathole") => {
            if o.no_forward {
                return Err("--only rathole compares with --forward: drop --no-forward".into());
            }
            let rounds = std::env::var("RD_BENCH_ROUNDS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(3);
            let plan = rathole_plan(rounds, medium_size, large_size, s);
            let [direct, relay, _] = paths;
            let (_, table) = rathole::run(
                [direct, relay, raw_paths[0].clone()],
                [server.pid(), client.pid()],
                &tmp.0,
                dummy_addr,
                &plan,
            )
            .await?;
            println!("\n{table}");
            return Ok(());
        }
        // The raw-TCP rows alone, after the Bench is built below.
        Some("raw") if !o.no_forward => {}
        Some(other) => {
            return Err(format!(
                "unknown scenario {other} (known: isolation, longlink, slow-streams, storm, restart-storm, bulk, quick, rathole, raw, udp)"
            )
            .into())
        }
    }

    let bench = Bench {
        paths,
        raw_paths,
        pids: [server.pid(), client.pid(), dummy.pid()],
        small: "small.bin",
        medium: ("medium.bin", medium_size),
        large: ("large.bin", large_size),
        duration: scaled_duration(10.0, s),
        rate: 1000,
        conns: 50,
        rounds: 2,
        latency_rounds: 5,
    };
    let mut rows = Vec::new();
    if o.only.as_deref() == Some("raw") {
        bench.raw_only(&mut rows).await?;
        println!("\n{}", report::text_table(&rows));
        return Ok(());
    }
    bench.run_all(&mut rows, s).await?;

    say("isolation: 400 stalled readers of 4 MiB on one session");
    let r = isolation::run(&bench.paths[TUNNEL], &files, 400, Some(server.pid()), s).await?;
    say("isolation, relay chain: 400 stalled readers of 4 MiB");
    let relay = isolation::run(&bench.paths[RELAY], &files, 400, None, s).await?;
    rows.extend(isolation::rows(&r, &relay));

    say("long links: bulk downloads over 50 and 200 ms round trips at 100 MB/s, credit vs Pause/Resume vs relay");
    let r = longlink::run(
        &o.bin_dir,
        &tmp.0,
        server_addr,
        dummy_addr,
        "medium.bin",
        medium_size,
    )
    .await?;
    rows.extend(longlink::rows(&r));

    let rss_streams = 10_000usize;
    let rss_sessions = 2_000usize;
    say(format!(
        "scale: {rss_streams} idle streams, {rss_sessions} idle sessions"
    ));
    scale_rows(&mut rows, rss_streams, rss_sessions)?;
    say("slow streams: 10000 streams moving data slowly on one session (library level)");
    rows.extend(slow_stream_rows(10_000)?);

    if !o.no_forward {
        say("rathole 0.5 as an anchor on the --forward rows (interleaved with rd's --forward)");
        let plan = rathole_plan(2, medium_size, large_size, s);
        let [direct, relay, _] = bench.paths.clone();
        let (rathole_rows, _) = rathole::run(
            [direct, relay, bench.raw_paths[0].clone()],
            [server.pid(), client.pid()],
            &tmp.0,
            dummy_addr,
            &plan,
        )
        .await?;
        rows.extend(rathole_rows);
        say("udp: 512 B datagrams paced at 20k/s and 50k/s, direct and through a UDP forward");
        rows.extend(udp::run(&o.bin_dir, &tmp.0, s).await?);
    }

    drop((client, server, dummy));
    let elapsed = started.elapsed();
    let table = report::text_table(&rows);
    println!("\n{table}");
    let machine = report::machine();
    let date = report::command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = report::command_output(
        "git",
        &[
            "-C",
            &workspace_root().to_string_lossy(),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .unwrap_or_default();
    let json = json!({
        "date": date,
        "commit": commit,
        "scale": s,
        "machine": machine,
        "elapsed_s": elapsed.as_secs_f64(),
        "config": {
            "small_bytes": KIB, "medium_bytes": medium_size, "large_bytes": large_size,
            "duration_s": bench.duration.as_secs_f64(), "rate_per_s": bench.rate,
            "closed_loop_connections": bench.conns, "rounds": bench.rounds,
            "latency_rounds": bench.latency_rounds,
        },
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&json)?)?;
    say(format!("wrote {}", o.out.display()));
    if let Some(docs) = &o.docs {
        let criterion = report::criterion_markdown(&workspace_root().join("target/criterion"));
        let mut markdown = docs_markdown(&json, &rows, criterion.as_deref());
        // Hand-written history and `make soak`'s section follow the generated part; keep them.
        if let Ok(old) = std::fs::read_to_string(docs) {
            let kept = ["\n## Changes that mattered", "\n## Soak"]
                .iter()
                .filter_map(|marker| old.find(marker))
                .min();
            if let Some(i) = kept {
                markdown.push_str(&old[i..]);
            }
        }
        std::fs::write(docs, markdown)?;
        say(format!("wrote {}", docs.display()));
    }
    say(format!("done in {:.0} s", elapsed.as_secs_f64()));
    Ok(())
}

impl Bench {
    async fn run_all(&self, rows: &mut Vec<Row>, s: f64) -> Result<(), BoxError> {
        let large_label = format!("{} MiB", self.large.1 / MIB);
        let medium_label = format!("{} MiB", self.medium.1 / MIB);
        let tunnel_pids = self.pids;

        // 1. Bulk.
        say(format!("bulk: 1 x {large_label}"));
        let mut single = [0.0; 3];
        let mut single_usage = [Usage::default(); 3];
        let mut single_bytes = 0;
        let mut single_failed = [0usize; 3];
        for (i, p) in self.paths.iter().enumerate() {
            // A truncated download is retried (twice); failures are reported in the table.
            for _attempt in 0..3 {
                let meter = Meter::start(&tunnel_pids);
                let r = load::bulk(p, self.large.0, self.large.1, 1).await?;
                let usage = meter.stop();
                single[i] = mb_per_s(r.bytes, r.elapsed);
                if i == TUNNEL {
                    single_usage = [Usage::default(); 3];
                    accumulate(&mut single_usage, &usage);
                    single_bytes = r.bytes;
                }
                single_failed[i] += r.failed;
                if r.failed == 0 {
                    break;
                }
            }
            say(format!(
                "  {:<6} {:>8.1} MB/s ({} failed attempts)",
                p.name, single[i], single_failed[i]
            ));
        }
        let mut row = Row::new(&format!("bulk 1 x {large_label}"), "throughput", "MB/s")
            .paths(single[0], single[1], single[2])
            .target(">= 0.75 x relay", single[2] >= 0.75 * single[1]);
        if single_failed.iter().any(|f| *f > 0) {
            let incomplete: Vec<&str> = (0..3)
                .filter(|&i| single_failed[i] == 3)
                .map(|i| self.paths[i].name)
                .collect();
            let mut note = format!(
                "truncated downloads (up to 3 attempts) direct/relay/tunnel: {}/{}/{}",
                single_failed[0], single_failed[1], single_failed[2]
            );
            if !incomplete.is_empty() {
                note.push_str(&format!(
                    "; no attempt completed on {}: the figure is bytes received before the cut / time",
                    incomplete.join(", ")
                ));
            }
            row = row.note(note);
        }
        rows.push(row);

        say(format!("bulk: 8 x {medium_label}"));
        let mut multi = [0.0; 3];
        let mut multi_usage = [Usage::default(); 3];
        let mut multi_bytes = 0;
        let mut multi_failed = [0usize; 3];
        for (i, p) in self.paths.iter().enumerate() {
            let meter = Meter::start(&tunnel_pids);
            let r = load::bulk(p, self.medium.0, self.medium.1, 8).await?;
            let usage = meter.stop();
            multi[i] = mb_per_s(r.bytes, r.elapsed);
            multi_failed[i] = r.failed;
            say(format!(
                "  {:<6} {:>8.1} MB/s ({} of 8 truncated)",
                p.name, multi[i], r.failed
            ));
            if i == TUNNEL {
                accumulate(&mut multi_usage, &usage);
                multi_bytes = r.bytes;
            }
        }
        let mut row = Row::new(&format!("bulk 8 x {medium_label}"), "throughput", "MB/s")
            .paths(multi[0], multi[1], multi[2])
            .target(">= 0.75 x relay", multi[2] >= 0.75 * multi[1]);
        if multi_failed.iter().any(|f| *f > 0) {
            row = row.note(format!(
                "downloads truncated (of 8; bytes received still count) direct/relay/tunnel: {}/{}/{}",
                multi_failed[0], multi_failed[1], multi_failed[2]
            ));
        }
        rows.push(row);

        // 2. Small requests, closed loop.
        say(format!(
            "small requests: {} keep-alive connections, {} rounds of {:.1} s per path",
            self.conns,
            self.rounds,
            self.duration.as_secs_f64() / f64::from(self.rounds)
        ));
        let mut small: [LoopResult; 3] = Default::default();
        let mut small_usage = [Usage::default(); 3];
        for _ in 0..self.rounds {
            for (i, p) in self.paths.iter().enumerate() {
                let meter = Meter::start(&tunnel_pids);
                let r = load::closed_loop(p, self.small, self.conns, self.duration / self.rounds)
                    .await?;
                let usage = meter.stop();
                if i == TUNNEL {
                    accumulate(&mut small_usage, &usage);
                }
                small[i].merge(r);
            }
        }
        for (i, p) in self.paths.iter().enumerate() {
            say(format!(
                "  {:<6} {:>8.0} req/s ({} errors)",
                p.name,
                small[i].rate(),
                small[i].errors
            ));
        }
        let rates: Vec<f64> = small.iter().map(LoopResult::rate).collect();
        rows.push(
            Row::new("small 1 KiB, 50 conns", "requests", "req/s")
                .paths(rates[0], rates[1], rates[2])
                .target(">= 0.4 x direct", rates[2] >= 0.4 * rates[0]),
        );
        for (pct, name) in [(50.0, "p50"), (99.0, "p99"), (99.9, "p99.9")] {
            let v: Vec<f64> = small
                .iter_mut()
                .map(|r| us(r.latencies.percentile(pct)))
                .collect();
            rows.push(
                Row::new("small 1 KiB, 50 conns", &format!("latency {name}"), "µs")
                    .paths(v[0], v[1], v[2]),
            );
        }
        let errors: u64 = small.iter().map(|r| r.errors).sum();
        if errors > 0 {
            if let Some(last) = rows.last_mut() {
                *last = last.clone().note(format!("{errors} failed requests"));
            }
        }
        self.raw_tcp_rows(rows, &single, &multi, &mut small).await?;

        // 3 and 4. Fixed rate, open loop, alone and beside a bulk download on the same path
        // (head-of-line): short rounds, each running every path in a rotating order, fixed
        // rate then head-of-line; each row is the median of the per-round figures, which a
        // burst of other work on a noisy machine moves much less than one long run.
        let rounds = self.latency_rounds;
        let per_round = self.duration / rounds as u32;
        say(format!(
            "fixed rate: {} req/s alone and beside a {large_label} download looping on the same path, {rounds} interleaved rounds of {:.1} s per path",
            self.rate,
            per_round.as_secs_f64()
        ));
        let clients: Vec<load::PoolClient> = (0..3).map(|_| load::pool_client()).collect();
        let mut fixed = Vec::new();
        let mut hol = Vec::new();
        for round in 0..rounds {
            // Alone, then beside a large download.
            let round_beside = |large| {
                quick::fixed_round(
                    &clients,
                    &self.paths,
                    round,
                    self.small,
                    self.rate,
                    per_round,
                    large,
                )
            };
            let f = round_beside(None).await?;
            let h = round_beside(Some(self.large.0)).await?;
            say(format!(
                "  round {}: p50 {:.0}/{:.0}/{:.0} µs p99 {:.0}/{:.0}/{:.0} µs; beside bulk p99 {:.0}/{:.0}/{:.0} µs (direct/relay/tunnel)",
                round + 1,
                f.p50[0], f.p50[1], f.p50[2],
                f.p99[0], f.p99[1], f.p99[2],
                h.p99[0], h.p99[1], h.p99[2],
            ));
            fixed.push(f);
            hol.push(h);
        }
        let med = |rs: &[quick::FixedRound], pick: &dyn Fn(&quick::FixedRound) -> f64| {
            quick::median(rs.iter().map(pick).collect())
        };
        let by_path = |rs: &[quick::FixedRound], pick: fn(&quick::FixedRound) -> [f64; 3]| {
            [0, 1, 2].map(|i| med(rs, &|r| pick(r)[i]))
        };
        let fixed_p50 = by_path(&fixed, |r| r.p50);
        let fixed_p99 = by_path(&fixed, |r| r.p99);
        let achieved = by_path(&fixed, |r| r.achieved);
        let fixed_errors: u64 = fixed.iter().map(|r| r.errors.iter().sum::<u64>()).sum();
        let fixed_label = format!("fixed {} req/s 1 KiB", self.rate);
        let median_note = format!("median of {rounds} interleaved rounds");
        let note = match fixed_errors {
            0 => median_note.clone(),
            n => format!("{median_note}; {n} failed requests"),
        };
        rows.push(
            Row::new(&fixed_label, "achieved", "req/s")
                .paths(achieved[0], achieved[1], achieved[2])
                .note(note),
        );
        rows.push(Row::new(&fixed_label, "latency p50", "µs").paths(
            fixed_p50[0],
            fixed_p50[1],
            fixed_p50[2],
        ));
        rows.push(Row::new(&fixed_label, "latency p99", "µs").paths(
            fixed_p99[0],
            fixed_p99[1],
            fixed_p99[2],
        ));
        // Latency added over direct, per round; the target compares it with what the relay
        // chain adds in the same round (at least 1 µs: the relay chain's added latency is
        // within noise of zero on some rounds).
        for (name, pick) in [
            (
                "p50",
                (|r: &quick::FixedRound| r.p50) as fn(&quick::FixedRound) -> [f64; 3],
            ),
            ("p99", |r: &quick::FixedRound| r.p99),
        ] {
            let added = |i: usize| med(&fixed, &|r| pick(r)[i] - pick(r)[DIRECT]);
            let ratio = med(&fixed, &|r| {
                (pick(r)[TUNNEL] - pick(r)[DIRECT]) / (pick(r)[RELAY] - pick(r)[DIRECT]).max(1.0)
            });
            rows.push(
                Row::new(&fixed_label, &format!("added {name} over direct"), "µs")
                    .paths(0.0, added(RELAY), added(TUNNEL))
                    .target("<= 1.5 x relay's", ratio <= 1.5)
                    .note(format!("tunnel/relay, {median_note}: {ratio:.2}")),
            );
        }

        let hol_p50 = by_path(&hol, |r| r.p50);
        let hol_p99 = by_path(&hol, |r| r.p99);
        // Inflation of a round: its head-of-line p99 over its fixed-rate p99.
        let inflation = [0, 1, 2].map(|i| {
            quick::median(
                fixed
                    .iter()
                    .zip(&hol)
                    .map(|(f, h)| h.p99[i] / f.p99[i].max(1e-9))
                    .collect(),
            )
        });
        let hol_ratio = quick::median(
            fixed
                .iter()
                .zip(&hol)
                .map(|(f, h)| {
                    (h.p99[TUNNEL] / f.p99[TUNNEL].max(1e-9))
                        / (h.p99[RELAY] / f.p99[RELAY].max(1e-9)).max(1e-9)
                })
                .collect(),
        );
        let bulk_seconds = per_round.as_secs_f64() + 0.2;
        for (i, p) in self.paths.iter().enumerate() {
            say(format!(
                "  {:<6} p50 {:>7.0} µs  p99 {:>7.0} µs  beside bulk p99 {:>7.0} µs  inflation x{:.2}  (bulk alongside {:.0} MB/s, max lag {:.1} ms)",
                p.name,
                fixed_p50[i],
                fixed_p99[i],
                hol_p99[i],
                inflation[i],
                med(&hol, &|r| r.bulk_bytes[i] as f64) / 1e6 / bulk_seconds,
                fixed.iter().chain(&hol).map(|r| r.max_lag_ms[i]).fold(0.0, f64::max),
            ));
        }
        let hol_label = "fixed rate + bulk download";
        rows.push(
            Row::new(hol_label, "latency p50", "µs").paths(hol_p50[0], hol_p50[1], hol_p50[2]),
        );
        rows.push(
            Row::new(hol_label, "latency p99", "µs").paths(hol_p99[0], hol_p99[1], hol_p99[2]),
        );
        rows.push(
            Row::new(hol_label, "p99 inflation vs fixed rate", "x")
                .paths(inflation[0], inflation[1], inflation[2])
                .target("tunnel <= relay's", hol_ratio <= 1.0)
                .note(format!(
                    "{median_note}; tunnel/relay inflation {hol_ratio:.2}; the direct column shows how much of it is CPU contention on this machine"
                )),
        );

        // 5. Resources of the tunnel processes.
        let gib = |bytes: u64| bytes as f64 / GIB as f64;
        let peak_target = 16.0;
        for (j, name) in PROC_NAMES.iter().enumerate().take(2) {
            let peak = single_usage[j].peak_kib as f64 / 1024.0;
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    &format!("peak RSS, bulk 1 x {large_label}"),
                    "MiB",
                )
                .tunnel_only(peak)
                .target(format!("<= {peak_target} MiB"), peak <= peak_target),
            );
            let peak8 = multi_usage[j].peak_kib as f64 / 1024.0;
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    &format!("peak RSS, bulk 8 x {medium_label}"),
                    "MiB",
                )
                .tunnel_only(peak8),
            );
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    "CPU per GiB (bulk 1 stream)",
                    "s",
                )
                .tunnel_only(single_usage[j].cpu_s / gib(single_bytes).max(1e-9)),
            );
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    "CPU per GiB (bulk 8 streams)",
                    "s",
                )
                .tunnel_only(multi_usage[j].cpu_s / gib(multi_bytes).max(1e-9)),
            );
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    "CPU per 100k requests (small)",
                    "s",
                )
                .tunnel_only(small_usage[j].cpu_s / (small[TUNNEL].ok as f64 / 1e5).max(1e-9)),
            );
            rows.push(
                Row::new(
                    &format!("resources {name}"),
                    "peak RSS, small requests",
                    "MiB",
                )
                .tunnel_only(small_usage[j].peak_kib as f64 / 1024.0),
            );
        }
        // rd-dummy's CPU for the same work, as a yardstick.
        rows.push(
            Row::new("resources rd-dummy", "CPU per GiB (bulk 1 stream)", "s")
                .tunnel_only(single_usage[2].cpu_s / gib(single_bytes).max(1e-9)),
        );
        rows.push(
            Row::new("resources rd-dummy", "CPU per 100k requests (small)", "s")
                .tunnel_only(small_usage[2].cpu_s / (small[TUNNEL].ok as f64 / 1e5).max(1e-9)),
        );
        if s != 1.0 {
            if let Some(r) = rows.iter_mut().find(|r| r.scenario.starts_with("bulk 1")) {
                r.note = Some(format!(
                    "RD_BENCH_SCALE={s}: sizes and durations scaled down"
                ));
            }
        }
        Ok(())
    }
}

impl Bench {
    /// `--only raw`: the direct and relay figures, then the raw-TCP rows
    /// (`--forward`, CONNECT, SOCKS5) beside them.
    async fn raw_only(&self, rows: &mut Vec<Row>) -> Result<(), BoxError> {
        let mut single = [0.0; 3];
        let mut multi = [0.0; 3];
        let mut small: [LoopResult; 3] = Default::default();
        for i in [DIRECT, RELAY] {
            let p = &self.paths[i];
            let one = load::bulk(p, self.large.0, self.large.1, 1).await?;
            single[i] = mb_per_s(one.bytes, one.elapsed);
            let eight = load::bulk(p, self.medium.0, self.medium.1, 8).await?;
            multi[i] = mb_per_s(eight.bytes, eight.elapsed);
            for _ in 0..self.rounds {
                small[i].merge(
                    load::closed_loop(p, self.small, self.conns, self.duration / self.rounds)
                        .await?,
                );
            }
            say(format!(
                "  {:<7} bulk {:>8.1} MB/s, 8 x {:>8.1} MB/s, small {:>8.0} req/s",
                p.name,
                single[i],
                multi[i],
                small[i].rate()
            ));
        }
        self.raw_tcp_rows(rows, &single, &multi, &mut small).await
    }

    /// Bulk and small-request rows through `--forward`, CONNECT and SOCKS5: the tunnel column is
    /// the raw path, the direct and relay columns the figures measured for `/client`.
    async fn raw_tcp_rows(
        &self,
        rows: &mut Vec<Row>,
        single: &[f64; 3],
        multi: &[f64; 3],
        small: &mut [LoopResult; 3],
    ) -> Result<(), BoxError> {
        let large_label = format!("{} MiB", self.large.1 / MIB);
        let medium_label = format!("{} MiB", self.medium.1 / MIB);
        let small_p50 = us(small[DIRECT].latencies.percentile(50.0));
        let small_p99 = us(small[DIRECT].latencies.percentile(99.0));
        let relay_p50 = us(small[RELAY].latencies.percentile(50.0));
        let relay_p99 = us(small[RELAY].latencies.percentile(99.0));
        for p in &self.raw_paths {
            let via = match p.name {
                "forward" => "--forward",
                "socks5" => "SOCKS5",
                _ => "CONNECT",
            };
            let one = load::bulk(p, self.large.0, self.large.1, 1).await?;
            let one_rate = mb_per_s(one.bytes, one.elapsed);
            let eight = load::bulk(p, self.medium.0, self.medium.1, 8).await?;
            let eight_rate = mb_per_s(eight.bytes, eight.elapsed);
            let mut looped = LoopResult::default();
            for _ in 0..self.rounds {
                looped.merge(
                    load::closed_loop(p, self.small, self.conns, self.duration / self.rounds)
                        .await?,
                );
            }
            say(format!(
                "  {:<7} bulk {:>8.1} MB/s, 8 x {:>8.1} MB/s ({} + {} truncated), small {:>8.0} req/s ({} errors)",
                p.name,
                one_rate,
                eight_rate,
                one.failed,
                eight.failed,
                looped.rate(),
                looped.errors
            ));
            let mut row = Row::new(
                &format!("bulk 1 x {large_label} via {via}"),
                "throughput",
                "MB/s",
            )
            .paths(single[DIRECT], single[RELAY], one_rate)
            .target(">= 0.75 x relay", one_rate >= 0.75 * single[RELAY]);
            if one.failed > 0 {
                row = row.note("the download was truncated");
            }
            rows.push(row);
            rows.push(
                Row::new(
                    &format!("bulk 8 x {medium_label} via {via}"),
                    "throughput",
                    "MB/s",
                )
                .paths(multi[DIRECT], multi[RELAY], eight_rate)
                .target(">= 0.75 x relay", eight_rate >= 0.75 * multi[RELAY]),
            );
            let label = format!("small 1 KiB, 50 conns via {via}");
            let mut row = Row::new(&label, "requests", "req/s")
                .paths(small[DIRECT].rate(), small[RELAY].rate(), looped.rate())
                .target(
                    ">= 0.4 x direct",
                    looped.rate() >= 0.4 * small[DIRECT].rate(),
                );
            if looped.errors > 0 {
                row = row.note(format!("{} failed requests", looped.errors));
            }
            rows.push(row);
            rows.push(Row::new(&label, "latency p50", "µs").paths(
                small_p50,
                relay_p50,
                us(looped.latencies.percentile(50.0)),
            ));
            rows.push(Row::new(&label, "latency p99", "µs").paths(
                small_p99,
                relay_p99,
                us(looped.latencies.percentile(99.0)),
            ));
        }
        Ok(())
    }
}

/// The rathole section's plan: the full run's sizes, shorter loops.
fn rathole_plan(rounds: usize, medium_size: u64, large_size: u64, s: f64) -> rathole::Plan {
    rathole::Plan {
        rounds,
        large: ("large.bin", large_size),
        medium: ("medium.bin", medium_size),
        small: "small.bin",
        duration: scaled_duration(4.0, s),
        rate: 1000,
        conns: 50,
        setup_conns: 200,
        idle_conns: 1000,
    }
}

/// The `slow-streams` child's rows.
fn slow_stream_rows(n: usize) -> Result<Vec<Row>, BoxError> {
    let v = scale::child_json("slow-streams", n)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    say(format!(
        "  echo p50/p99 {:.0}/{:.0} µs alone, {:.0}/{:.0} µs beside ({} failed); 64 MiB {:.0} MB/s alone, {:.0} beside; RSS +{:.0} MiB, {:.1} MiB held",
        f("base_p50_us"), f("base_p99_us"), f("p50_us"), f("p99_us"), f("failed"),
        f("solo_mb_s"), f("beside_mb_s"), f("rss_growth_mib"), f("held_mib")
    ));
    let label = format!("{n} slow streams, one session (library)");
    let p99_ok = f("failed") == 0.0 && f("p99_us") <= 2.0 * f("base_p99_us").max(1.0);
    Ok(vec![
        Row::new(&label, "echo 1 KiB p99, alone / beside", "µs")
            .paths(f("base_p99_us"), 0.0, f("p99_us"))
            .target("<= 2x alone, no failure", p99_ok),
        Row::new(&label, "64 MiB download, alone / beside", "MB/s")
            .paths(f("solo_mb_s"), 0.0, f("beside_mb_s"))
            .target(
                ">= 0.5x alone",
                f("beside_mb_s") >= 0.5 * f("solo_mb_s") && f("solo_mb_s") > 0.0,
            ),
        Row::new(&label, "RSS growth, both ends in one process", "MiB")
            .tunnel_only(f("rss_growth_mib"))
            .target("<= 128 MiB", f("rss_growth_mib") <= 128.0),
    ])
}

fn scale_rows(rows: &mut Vec<Row>, streams: usize, sessions: usize) -> Result<(), BoxError> {
    let server = scale::run_child("streams-server", streams)?;
    let client = scale::run_child("streams-client", streams)?;
    let both = server.bytes_per_item + client.bytes_per_item;
    say(format!(
        "  idle stream: server side {:.0} B, client side {:.0} B ({} / {} live)",
        server.bytes_per_item, client.bytes_per_item, server.live, client.live
    ));
    let label = format!("scale {streams} idle streams");
    rows.push(
        Row::new(&label, "RSS per stream, server side", "KiB")
            .tunnel_only(server.bytes_per_item / 1024.0)
            .target("<= 2 KiB", server.bytes_per_item <= 2048.0),
    );
    rows.push(
        Row::new(&label, "RSS per stream, client side", "KiB")
            .tunnel_only(client.bytes_per_item / 1024.0)
            .target("<= 2 KiB", client.bytes_per_item <= 2048.0)
            .note("client side includes the pipe task to an idle local connection"),
    );
    rows.push(Row::new(&label, "RSS per stream, both ends", "KiB").tunnel_only(both / 1024.0));
    rows.push(
        Row::new(&label, "time to open all, server side", "ms").tunnel_only(server.open_s * 1e3),
    );
    rows.push(
        Row::new(&label, "time to open all, client side", "ms").tunnel_only(client.open_s * 1e3),
    );
    let sess = scale::run_child("sessions", sessions)?;
    say(format!(
        "  idle session: {:.0} B on the server ({} live), opened in {:.0} ms",
        sess.bytes_per_item,
        sess.live,
        sess.open_s * 1e3
    ));
    let label = format!("scale {sessions} idle sessions");
    rows.push(
        Row::new(&label, "server RSS per session", "KiB")
            .tunnel_only(sess.bytes_per_item / 1024.0)
            .target("<= 32 KiB", sess.bytes_per_item <= 32.0 * 1024.0)
            .note("includes the test's own idle client socket per session (a tokio TcpStream)"),
    );
    rows.push(
        Row::new(&label, "time to open all (sequential handshakes)", "ms")
            .tunnel_only(sess.open_s * 1e3),
    );
    Ok(())
}

fn docs_markdown(json: &serde_json::Value, rows: &[Row], criterion: Option<&str>) -> String {
    let m = &json["machine"];
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "Generated by `make bench` (`benches/`): criterion micro benchmarks of the codec and the \
         session state machine, then `rd-bench`, which runs release builds of rd-dummy, rd-server \
         and rd-client on loopback and measures three paths to rd-dummy, interleaved:\n\n\
         - **direct**: the load generator talks to rd-dummy;\n\
         - **relay**: two plain TCP relays in a row in the bench process (accept, connect, \
         `copy_bidirectional_with_sizes` with 256 KiB buffers): the same three TCP hops as the \
         tunnel, without framing;\n\
         - **tunnel**: `http://SERVER/client/bench/http/DUMMY/FILE` through rd-server, one \
         websocket session and rd-client.\n\n\
         The `anchor:` rows, when rathole is installed (`cargo install rathole`), run the same \
         load through rd-server's `--forward` listener + rd-client and through rathole 0.5 \
         (server + client, TCP transport) forwarding to the same rd-dummy, interleaved in the \
         same run (`rd-bench --only rathole` for that section alone).\n\n\
         Benchmarks never fail on numbers; the table marks each target met or not.\n\n",
    );
    out.push_str(&format!(
        "## Latest run\n\n- date: {}\n- commit: `{}`\n- machine: {} CPUs ({}), {} GiB RAM, Linux {}\n\
         - scale: {} (RD_BENCH_SCALE), rd-bench took {:.0} s\n\n",
        json["date"].as_str().unwrap_or("?"),
        json["commit"].as_str().unwrap_or("?"),
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["mem_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        json["scale"],
        json["elapsed_s"].as_f64().unwrap_or(0.0),
    ));
    out.push_str(&report::markdown_table(rows));
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.note
                .as_ref()
                .map(|n| format!("- {} / {}: {n}", r.scenario, r.metric))
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out.push_str(
        "\nAll processes share the machine's CPUs with the load generator, so on a small machine the \
         tunnel (two more processes on the path) also pays for CPU contention. Peak RSS is `VmHWM`, \
         reset through `/proc/PID/clear_refs` before each measured phase; CPU is utime+stime from \
         `/proc/PID/stat`. The scale rows run in fresh child processes: idle streams are measured \
         one side at a time against a raw websocket peer, idle sessions against bare upgraded TCP \
         connections, as the growth of the process's VmRSS.\n",
    );
    if let Some(c) = criterion {
        out.push_str("\n## Micro benchmarks (criterion)\n\n");
        out.push_str(c);
    }
    out.push_str(
        "\n## Reproduce\n\n```sh\nmake bench                      # release builds, criterion, then rd-bench (< 10 min on 2 cores)\n\
         RD_BENCH_SCALE=0.1 make bench   # quick run: sizes and durations x 0.1 (docs are not rewritten)\n\
         cargo run --release -p rd-benches --bin rd-bench -- --help\n```\n\n\
         Results: printed, and written to `target/bench/report.json` (every row, with ratios and \
         targets); criterion's own output is in `target/criterion/`.\n",
    );
    out
}
