//! `rd-soak`: a bounded mixed workload with periodic faults against real processes
//! (`make soak`).
//!
//! Starts release builds of rd-dummy, rd-server and rd-client on loopback (plus an upload
//! sink in this process, reached through the tunnel like rd-dummy) and, through
//! `http://SERVER/client/soak/http/TARGET/...`, runs: small GETs on keep-alive connections,
//! medium (1-16 MiB) and large (64/256 MiB) downloads and streamed 1-16 MiB POST uploads,
//! checking every body's size and hash. Every `--fault-interval` seconds it injects the next
//! fault in turn: SIGKILL + restart rd-client, SIGKILL + restart rd-server on the same port,
//! a second rd-client with the same id that connects and leaves.
//!
//! Phases: warm-up load, quiet, baseline snapshot; load with faults; quiet, final snapshot.
//! The report (printed, `target/soak/report.json`, `target/soak/report.md`) has requests,
//! bytes, errors by kind (split into those overlapping a fault and the rest) and rd-server's
//! and rd-client's RSS, fds, threads and tasks at baseline and at the end.
//!
//! Exit code 1 on: a hash mismatch, a resource not back to its baseline (within the stated
//! slack), errors outside fault windows, a fault the tunnel did not recover from, a process
//! that died by itself or a panic in a log. Errors caused by the faults do not count.
//!
//! Options: `--seconds N` (or `SOAK_SECONDS`, default 300, everything included),
//! `--fault-interval N` (`SOAK_FAULT_INTERVAL`, default 30), `--bin-dir DIR`, `--out DIR`
//! (default `target/soak`), `--no-uploads`.

mod cluster;
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rd_benches::process::{generate_file, TempDir};
use rd_benches::BoxError;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::cluster::{Cluster, Snapshot, CLIENT_ID};
use crate::workload::{FileInfo, Shape, Stats, Target, Work};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[derive(Debug)]
struct Options {
    bin_dir: PathBuf,
    out_dir: PathBuf,
    seconds: u64,
    fault_interval: u64,
    uploads: bool,
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn parse_options() -> Result<Options, BoxError> {
    let root = workspace_root();
    let mut o = Options {
        bin_dir: root.join("target/release"),
        out_dir: root.join("target/soak"),
        seconds: env_u64("SOAK_SECONDS").unwrap_or(300),
        fault_interval: env_u64("SOAK_FAULT_INTERVAL").unwrap_or(30),
        uploads: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bin-dir" => o.bin_dir = PathBuf::from(value()?),
            "--out" => o.out_dir = PathBuf::from(value()?),
            "--seconds" => o.seconds = value()?.parse()?,
            "--fault-interval" => o.fault_interval = value()?.parse()?,
            "--no-uploads" => o.uploads = false,
            "-h" | "--help" => {
                println!(
                    "usage: rd-soak [--seconds N] [--fault-interval N] [--bin-dir DIR] [--out DIR] [--no-uploads]\n\
                     env: SOAK_SECONDS (default 300), SOAK_FAULT_INTERVAL (default 30)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if o.seconds < 60 {
        return Err("--seconds must be at least 60".into());
    }
    if o.fault_interval < 10 {
        return Err("--fault-interval must be at least 10".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let result = parse_options().and_then(|o| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(run(o))
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rd-soak: {e}");
            ExitCode::from(2)
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[rd-soak] {}", msg.as_ref());
}

/// The injected faults, in rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    KillClient,
    KillServer,
    DuplicateClient,
}

impl FaultKind {
    const ROTATION: [FaultKind; 3] = [
        FaultKind::KillClient,
        FaultKind::KillServer,
        FaultKind::DuplicateClient,
    ];

    fn name(self) -> &'static str {
        match self {
            FaultKind::KillClient => "kill rd-client",
            FaultKind::KillServer => "kill rd-server",
            FaultKind::DuplicateClient => "duplicate rd-client",
        }
    }
}

/// One injected fault and the window its errors are attributed to.
#[derive(Debug)]
struct Fault {
    kind: FaultKind,
    start: Instant,
    /// When probing started: the fault's start, or for a duplicate client when it left.
    probe_from: Instant,
    /// When a fresh request through the tunnel first succeeded again.
    recovered: Option<Instant>,
    /// Errors of requests overlapping `[start, window_end]` are the fault's.
    window_end: Instant,
    action: String,
    max_sessions: Option<f64>,
}

/// After recovery, errors still count as the fault's for this long (requests that were
/// already failing, keep-alive connections being replaced).
const FAULT_GRACE: Duration = Duration::from_secs(3);
/// Processes stay down this long before their restart.
const DOWNTIME: Duration = Duration::from_secs(1);

async fn wait_recovered(target: &Target, start: Instant) -> Option<Instant> {
    while start.elapsed() < Duration::from_secs(60) {
        if workload::probe(target, Duration::from_secs(2))
            .await
            .is_ok()
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn inject(
    cluster: &mut Cluster,
    target: &Target,
    stats: &Stats,
    kind: FaultKind,
    graceful_dup: bool,
    hold: Duration,
) -> Result<Fault, BoxError> {
    let mut max_sessions = None;
    // Kill while a bulk transfer is under way (if one starts within 5 s), so in-flight
    // bodies are cut and counted, not only small requests.
    let mut bulk = 0;
    if kind != FaultKind::DuplicateClient {
        let wait = Instant::now();
        while wait.elapsed() < Duration::from_secs(5) {
            bulk = stats.bulk_in_flight.load(Ordering::Relaxed);
            if bulk > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let start = Instant::now();
    let action = match kind {
        FaultKind::KillClient => cluster.kill_client(DOWNTIME).await?,
        FaultKind::KillServer => cluster.kill_server(DOWNTIME).await?,
        FaultKind::DuplicateClient => {
            let (a, s) = cluster.duplicate_client(hold, graceful_dup).await?;
            max_sessions = s;
            a
        }
    };
    // A duplicate client should cause no outage: probe from when it is gone.
    let probe_from = if kind == FaultKind::DuplicateClient {
        Instant::now()
    } else {
        start
    };
    let recovered = wait_recovered(target, probe_from).await;
    let action = if kind == FaultKind::DuplicateClient {
        action
    } else {
        format!("{action}; {bulk} bulk transfers were in flight")
    };
    let window_end = recovered.unwrap_or_else(Instant::now) + FAULT_GRACE;
    Ok(Fault {
        kind,
        start,
        probe_from,
        recovered,
        window_end,
        action,
        max_sessions,
    })
}

/// Generates the files rd-dummy serves; returns (small, medium, large).
fn generate(dir: &Path) -> Result<(FileInfo, Vec<FileInfo>, Vec<FileInfo>), BoxError> {
    let gen = |name: &str, size: u64, seed: u64| -> Result<FileInfo, BoxError> {
        let hash = generate_file(&dir.join(name), size, seed)?;
        Ok(FileInfo {
            name: name.to_string(),
            size,
            hash,
        })
    };
    let small = gen("small.bin", KIB, 1)?;
    let medium = vec![
        gen("m1.bin", MIB + 1, 11)?,
        gen("m3.bin", 3 * MIB - 7, 12)?,
        gen("m8.bin", 8 * MIB, 13)?,
        gen("m16.bin", 16 * MIB, 14)?,
    ];
    let large = vec![
        gen("l64.bin", 64 * MIB + 5, 21)?,
        gen("l256.bin", 256 * MIB, 22)?,
    ];
    Ok((small, medium, large))
}

/// Allowed growth from baseline to final, and whether `final_` is within it.
#[derive(Debug)]
struct Check {
    process: &'static str,
    resource: &'static str,
    baseline: Option<f64>,
    final_: Option<f64>,
    slack: String,
    ok: Option<bool>,
}

impl Check {
    fn new(
        process: &'static str,
        resource: &'static str,
        baseline: Option<f64>,
        final_: Option<f64>,
        slack: String,
        limit: impl Fn(f64) -> f64,
    ) -> Self {
        let ok = match (baseline, final_) {
            (Some(b), Some(f)) => Some(f <= limit(b)),
            _ => None,
        };
        Self {
            process,
            resource,
            baseline,
            final_,
            slack,
            ok,
        }
    }

    fn verdict(&self) -> &'static str {
        match self.ok {
            Some(true) => "returned",
            Some(false) => "NOT RETURNED",
            None => "n/a",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "process": self.process, "resource": self.resource, "baseline": self.baseline,
            "final": self.final_, "slack": self.slack, "returned": self.ok,
        })
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.0}"))
}

fn checks(base: &Snapshot, fin: &Snapshot, stream_bound: f64) -> Vec<Check> {
    let mut c = Vec::new();
    for (name, b, f) in [
        ("rd-server", base.server, fin.server),
        ("rd-client", base.client, fin.client),
    ] {
        c.push(Check::new(
            name,
            "VmRSS (KiB)",
            Some(b.rss_kib as f64),
            Some(f.rss_kib as f64),
            "+max(50%, 16 MiB)".into(),
            |b| b + (b * 0.5).max(16.0 * 1024.0),
        ));
        c.push(Check::new(
            name,
            "threads",
            Some(b.threads as f64),
            Some(f.threads as f64),
            "+2".into(),
            |b| b + 2.0,
        ));
    }
    c.push(Check::new(
        "rd-server",
        "open fds",
        Some(base.server.fds as f64),
        Some(fin.server.fds as f64),
        "+2".into(),
        |b| b + 2.0,
    ));
    // rd-client holds one socket per tunnel stream; rd-server's proxy pool may keep idle
    // streams open, so compare the fds that are not streams.
    match (base.streams, fin.streams) {
        (Some(sb), Some(sf)) => {
            c.push(Check::new(
                "rd-client",
                "open fds minus rd_streams",
                Some(base.client.fds as f64 - sb),
                Some(fin.client.fds as f64 - sf),
                "+2".into(),
                |b| b + 2.0,
            ));
        }
        _ => c.push(Check::new(
            "rd-client",
            "open fds",
            Some(base.client.fds as f64),
            Some(fin.client.fds as f64),
            format!("+{stream_bound} (pooled streams)"),
            |b| b + stream_bound,
        )),
    }
    c.push(Check::new(
        "rd-server",
        "rd_streams (live tunnel connections)",
        base.streams,
        fin.streams,
        format!("<= {stream_bound} (the proxy's idle pool, at most the workload's concurrency)"),
        |_| stream_bound,
    ));
    c.push(Check::new(
        "rd-server",
        "rd_sessions",
        base.sessions,
        fin.sessions,
        "= 1".into(),
        |_| 1.0,
    ));
    // Counters that reconcile (issue 27): opened minus closed is the gauge, at both scrapes.
    for (resource, b, f) in [
        (
            "rd_sessions_opened - closed - rd_sessions",
            base.sessions_drift,
            fin.sessions_drift,
        ),
        (
            "rd_streams_opened - closed - rd_streams",
            base.streams_drift,
            fin.streams_drift,
        ),
    ] {
        // Compared as distances from zero: the check passes when the final one is 0.
        c.push(Check::new(
            "rd-server",
            resource,
            b.map(f64::abs),
            f.map(f64::abs),
            "= 0".into(),
            |_| 0.0,
        ));
    }
    let tb = base.tasks;
    let extra = fin.streams.unwrap_or(0.0) - base.streams.unwrap_or(0.0);
    c.push(Check::new(
        "rd-server",
        "tokio tasks (rd_runtime_alive_tasks)",
        tb,
        fin.tasks,
        "+16 + 4 per extra stream".into(),
        move |b| b + 16.0 + 4.0 * extra.max(0.0),
    ));
    c.push(Check::new(
        "rd-client",
        "tokio tasks",
        None,
        None,
        "not exposed".into(),
        |b| b,
    ));
    c
}

async fn run(o: Options) -> Result<bool, BoxError> {
    let started = Instant::now();
    for b in ["rd-server", "rd-client", "rd-dummy"] {
        if !o.bin_dir.join(b).is_file() {
            return Err(format!(
                "{} is missing: build with `cargo build --release --bins -p rd-server-bin -p rd-client-bin -p rd-dummy-bin`",
                o.bin_dir.join(b).display()
            )
            .into());
        }
    }
    let logs = o.out_dir.join("logs");
    std::fs::remove_dir_all(&logs).ok();
    std::fs::create_dir_all(&logs)?;

    // Phases: warm-up, quiet + baseline, faulted load, quiet + final; `seconds` in all.
    let quiet = Duration::from_secs(15);
    let warmup = Duration::from_secs((o.seconds / 15).clamp(5, 20));
    let load = Duration::from_secs(o.seconds)
        .saturating_sub(warmup + 2 * quiet)
        .max(Duration::from_secs(20));
    let interval = Duration::from_secs(o.fault_interval);

    let tmp = TempDir::with_prefix("rd-soak")?;
    let t = Instant::now();
    let (small, medium, large) = generate(&tmp.0)?;
    say(format!(
        "generated {} files in {} in {:.1} s",
        2 + medium.len() + large.len(),
        tmp.0.display(),
        t.elapsed().as_secs_f64()
    ));

    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    tokio::spawn(workload::sink(sink));

    let mut cluster = Cluster::start(&o.bin_dir, &logs, &tmp.0)?;
    let dummy_addr = cluster.dummy_addr()?;
    let server_addr = cluster.server_addr;
    let target = Arc::new(Target {
        server: Mutex::new(server_addr),
        dummy_prefix: format!("/client/{CLIENT_ID}/http/{dummy_addr}"),
        sink_prefix: format!("/client/{CLIENT_ID}/http/{sink_addr}"),
        small,
        medium,
        large,
    });
    if wait_recovered(&target, Instant::now()).await.is_none() {
        return Err(format!("the tunnel never came up; logs in {}", logs.display()).into());
    }
    say(format!(
        "dummy {dummy_addr}, upload sink {sink_addr}, server {server_addr}; tunnel up after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let tasks_metric = cluster::metrics(server_addr)
        .await
        .is_some_and(|m| m.contains_key("rd_runtime_alive_tasks"));

    let shape = Shape {
        small_conns: 20,
        small_rate: 20.0,
        medium_workers: 2,
        medium_pause: Duration::from_millis(250),
        large_every: Duration::from_secs(15),
        uploads: o.uploads,
        upload_pause: Duration::from_millis(500),
    };
    let stream_bound = (shape.small_conns + shape.medium_workers + 2) as f64;
    let stats = Arc::new(Stats::default());

    // Timeline: a snapshot every 5 s.
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pids, tl, stop) = (cluster.pids.clone(), timeline.clone(), stop_sampler.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = Snapshot::take(&pids, server_addr, started).await;
                tl.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };

    say(format!(
        "warm-up {} s, quiet {} s, load with a fault every {} s for {} s, quiet {} s",
        warmup.as_secs(),
        quiet.as_secs(),
        interval.as_secs(),
        load.as_secs(),
        quiet.as_secs()
    ));
    let warm_until = Instant::now() + warmup;
    let cut_warm = workload::run(
        target.clone(),
        stats.clone(),
        shape.clone(),
        warm_until,
        Duration::from_secs(30),
    )
    .await;
    let warm_end = Instant::now();
    tokio::time::sleep(quiet).await;
    let baseline = Snapshot::take(&cluster.pids, server_addr, started).await;
    say(format!(
        "baseline: rd-server {:?}, rd-client {:?}, sessions {}, streams {}, tasks {}",
        baseline.server,
        baseline.client,
        fmt_opt(baseline.sessions),
        fmt_opt(baseline.streams),
        fmt_opt(baseline.tasks)
    ));

    let load_start = Instant::now();
    let load_until = load_start + load;
    let workload = tokio::spawn(workload::run(
        target.clone(),
        stats.clone(),
        shape.clone(),
        load_until,
        Duration::from_secs(30),
    ));
    let mut faults: Vec<Fault> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut next_fault = load_start + interval;
    let mut k = 0usize;
    let hold = (interval / 3).min(Duration::from_secs(10));
    while Instant::now() < load_until {
        let dead = cluster.dead();
        if !dead.is_empty() {
            let msg = format!(
                "{} exited on its own at t={:.0} s",
                dead.join(", "),
                started.elapsed().as_secs_f64()
            );
            say(&msg);
            problems.push(msg);
            break;
        }
        if Instant::now() >= next_fault && next_fault + interval <= load_until {
            let kind = FaultKind::ROTATION[k % 3];
            // Alternate how the duplicate client leaves: SIGTERM, then SIGKILL.
            let graceful = (k / 3) % 2 == 0;
            k += 1;
            say(format!(
                "t={:.0} s: fault {k}: {}",
                started.elapsed().as_secs_f64(),
                kind.name()
            ));
            let f = inject(&mut cluster, &target, &stats, kind, graceful, hold).await?;
            say(format!(
                "  {}; {}",
                f.action,
                match f.recovered {
                    Some(r) => format!(
                        "tunnel answering again after {:.2} s",
                        (r - f.probe_from).as_secs_f64()
                    ),
                    None => "NOT RECOVERED within 60 s".into(),
                }
            ));
            if f.recovered.is_none() {
                problems.push(format!("fault {k} ({}): no recovery in 60 s", kind.name()));
            }
            faults.push(f);
            next_fault += interval;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cut_load = workload.await.unwrap_or(0);
    let load_end = Instant::now();
    say(format!(
        "load done at t={:.0} s; quiet {} s",
        started.elapsed().as_secs_f64(),
        quiet.as_secs()
    ));
    tokio::time::sleep(quiet).await;
    let final_ = Snapshot::take(&cluster.pids, server_addr, started).await;
    stop_sampler.store(true, Ordering::Relaxed);
    sampler.await.ok();
    let dead = cluster.dead();
    if !dead.is_empty() && problems.iter().all(|p| !p.contains("on its own")) {
        problems.push(format!("{} exited on their own", dead.join(", ")));
    }

    // Errors: a failure whose request overlapped a fault window is that fault's.
    let failures = stats.failures();
    let mut fault_failures: Vec<Vec<&workload::Failure>> = vec![Vec::new(); faults.len()];
    let mut steady: Vec<&workload::Failure> = Vec::new();
    for f in &failures {
        match faults
            .iter()
            .position(|w| f.start <= w.window_end && f.end >= w.start)
        {
            Some(i) => fault_failures[i].push(f),
            None => steady.push(f),
        }
    }
    let all_kinds = workload::by_kind(failures.iter());
    let steady_kinds = workload::by_kind(steady.iter().copied());
    let hash_mismatches = all_kinds.get("hash mismatch").copied().unwrap_or(0);

    let checks = checks(&baseline, &final_, stream_bound);
    let mut panics = BTreeMap::new();
    for log in ["rd-server", "rd-client", "rd-client-dup", "rd-dummy"] {
        let (n, lines) = cluster::panics_in(&logs.join(format!("{log}.log")));
        if n > 0 {
            problems.push(format!("{n} panics in {log}.log: {}", lines.join(" | ")));
        }
        panics.insert(log, n);
    }
    if hash_mismatches > 0 {
        problems.push(format!("{hash_mismatches} hash mismatches"));
    }
    if !steady.is_empty() {
        problems.push(format!(
            "{} errors outside fault windows: {:?}",
            steady.len(),
            steady_kinds
        ));
    }
    for c in &checks {
        if c.ok == Some(false) {
            problems.push(format!(
                "{} {}: {} -> {} (slack {})",
                c.process,
                c.resource,
                fmt_opt(c.baseline),
                fmt_opt(c.final_),
                c.slack
            ));
        }
    }
    let passed = problems.is_empty();

    // Report.
    let elapsed = started.elapsed();
    let total_ok: u64 = Work::ALL.iter().map(|w| stats.ok(*w)).sum();
    let total_bytes: u64 = Work::ALL.iter().map(|w| stats.bytes(*w)).sum();
    let load_s = (load_end - load_start).as_secs_f64();
    let ctx = ReportCtx {
        o: &o,
        elapsed,
        warmup,
        quiet,
        load_s,
        interval,
        shape: &shape,
        stats: &stats,
        total_ok,
        total_bytes,
        all_kinds: &all_kinds,
        steady: &steady,
        faults: &faults,
        fault_failures: &fault_failures,
        started,
        baseline: &baseline,
        final_: &final_,
        checks: &checks,
        tasks_metric,
        problems: &problems,
        cut: cut_warm + cut_load,
        cluster: &cluster,
    };
    let text = ctx.text();
    println!("\n{text}");
    let md = ctx.markdown();
    let json = ctx.json(
        &timeline.lock().unwrap_or_else(|p| p.into_inner()),
        warm_end - started,
        &panics,
    );
    std::fs::create_dir_all(&o.out_dir)?;
    let json_path = o.out_dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    std::fs::write(o.out_dir.join("report.md"), md)?;
    say(format!(
        "wrote {} and report.md; logs in {}",
        json_path.display(),
        logs.display()
    ));
    say(if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

struct ReportCtx<'a> {
    o: &'a Options,
    elapsed: Duration,
    warmup: Duration,
    quiet: Duration,
    load_s: f64,
    interval: Duration,
    shape: &'a Shape,
    stats: &'a Stats,
    total_ok: u64,
    total_bytes: u64,
    all_kinds: &'a BTreeMap<String, u64>,
    steady: &'a [&'a workload::Failure],
    faults: &'a [Fault],
    fault_failures: &'a [Vec<&'a workload::Failure>],
    started: Instant,
    baseline: &'a Snapshot,
    final_: &'a Snapshot,
    checks: &'a [Check],
    tasks_metric: bool,
    problems: &'a [String],
    cut: u64,
    cluster: &'a Cluster,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn kinds_str(k: &BTreeMap<String, u64>) -> String {
    if k.is_empty() {
        return "none".into();
    }
    k.iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ReportCtx<'_> {
    fn t(&self, i: Instant) -> f64 {
        (i - self.started).as_secs_f64()
    }

    fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "rd-soak: {:.0} s in all (warm-up {} s, quiet {} s, faulted load {:.0} s, quiet {} s), fault every {} s",
            self.elapsed.as_secs_f64(),
            self.warmup.as_secs(),
            self.quiet.as_secs(),
            self.load_s,
            self.quiet.as_secs(),
            self.interval.as_secs()
        );
        let _ = writeln!(
            s,
            "requests done: {} ok, {:.2} GiB verified; errors {} ({} during faults, {} outside); {} cut off at the end",
            self.total_ok,
            gib(self.total_bytes),
            self.all_kinds.values().sum::<u64>(),
            self.all_kinds.values().sum::<u64>() - self.steady.len() as u64,
            self.steady.len(),
            self.cut
        );
        for w in Work::ALL {
            if w == Work::Upload && !self.shape.uploads {
                continue;
            }
            let _ = writeln!(
                s,
                "  {:<7} {:>8} ok {:>10.3} GiB   (+{:.3} GiB in failed requests)",
                w.name(),
                self.stats.ok(w),
                gib(self.stats.bytes(w)),
                gib(self.stats.partial_bytes(w))
            );
        }
        let _ = writeln!(s, "errors by kind: {}", kinds_str(self.all_kinds));
        let _ = writeln!(
            s,
            "errors outside fault windows: {}",
            kinds_str(&workload::by_kind(self.steady.iter().copied()))
        );
        let _ = writeln!(s, "faults:");
        for (i, f) in self.faults.iter().enumerate() {
            let _ = writeln!(
                s,
                "  {:>2}. t={:>4.0} s {:<20} recovered {:>6}  sessions max {}  errors: {}",
                i + 1,
                self.t(f.start),
                f.kind.name(),
                f.recovered.map_or("never".into(), |r| format!(
                    "{:.2}s",
                    (r - f.probe_from).as_secs_f64()
                )),
                fmt_opt(f.max_sessions),
                kinds_str(&workload::by_work_kind(
                    self.fault_failures[i].iter().copied()
                ))
            );
        }
        let _ = writeln!(
            s,
            "resources (baseline at t={:.0} s after warm-up + quiet; final at t={:.0} s after quiet):",
            self.baseline.at_s, self.final_.at_s
        );
        let _ = writeln!(
            s,
            "  rd-server pid {} -> {} ({} starts), rd-client pid {} -> {} ({} starts)",
            self.baseline.server.pid,
            self.final_.server.pid,
            self.cluster.server_starts,
            self.baseline.client.pid,
            self.final_.client.pid,
            self.cluster.client_starts
        );
        for c in self.checks {
            let _ = writeln!(
                s,
                "  {:<9} {:<40} {:>8} -> {:>8}  slack {:<24} {}",
                c.process,
                c.resource,
                fmt_opt(c.baseline),
                fmt_opt(c.final_),
                c.slack,
                c.verdict()
            );
        }
        if !self.tasks_metric {
            let _ = writeln!(
                s,
                "  (rd-server's /metrics has no rd_runtime_alive_tasks: tokio tasks n/a)"
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "result: PASS");
        } else {
            let _ = writeln!(s, "result: FAIL");
            for p in self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
        let commit = command_output(
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
        let _ = writeln!(
            s,
            "Run {date}, commit `{commit}`, {} CPUs: `--seconds {}` ({:.0} s in all: warm-up {} s, quiet {} s, faulted load {:.0} s, quiet {} s), a fault every {} s.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.o.seconds,
            self.elapsed.as_secs_f64(),
            self.warmup.as_secs(),
            self.quiet.as_secs(),
            self.load_s,
            self.quiet.as_secs(),
            self.interval.as_secs()
        );
        let _ = writeln!(
            s,
            "Workload: {} keep-alive connections x {} GET/s of 1 KiB, {} workers downloading 1-16 MiB files \
             ({} ms apart), one 64 or 256 MiB download every {} s{}. Every body is checked for size and hash.\n",
            self.shape.small_conns,
            self.shape.small_rate,
            self.shape.medium_workers,
            self.shape.medium_pause.as_millis(),
            self.shape.large_every.as_secs(),
            if self.shape.uploads {
                format!(
                    ", streamed chunked POST uploads of 1-16 MiB ({} ms apart) to a sink in rd-soak that \
                     answers each with the body's length and hash (rd-dummy serves GET/HEAD only)",
                    self.shape.upload_pause.as_millis()
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(s, "| work | ok | verified GiB | GiB in failed requests |");
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for w in Work::ALL {
            if w == Work::Upload && !self.shape.uploads {
                continue;
            }
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} |",
                w.name(),
                self.stats.ok(w),
                gib(self.stats.bytes(w)),
                gib(self.stats.partial_bytes(w))
            );
        }
        let _ = writeln!(
            s,
            "| **total** | {} | {:.3} | |\n",
            self.total_ok,
            gib(self.total_bytes)
        );
        let _ = writeln!(
            s,
            "Errors by kind: {}. Outside fault windows: {}. Requests cut off at the end: {}.\n",
            kinds_str(self.all_kinds),
            kinds_str(&workload::by_kind(self.steady.iter().copied())),
            self.cut
        );
        let _ = writeln!(
            s,
            "| # | t (s) | fault | tunnel back after (duplicate: after it left) | max sessions | errors it caused |"
        );
        let _ = writeln!(s, "|---:|---:|---|---:|---:|---|");
        for (i, f) in self.faults.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {} | {} |",
                i + 1,
                self.t(f.start),
                f.action,
                f.recovered.map_or("never".into(), |r| format!(
                    "{:.2} s",
                    (r - f.probe_from).as_secs_f64()
                )),
                fmt_opt(f.max_sessions),
                kinds_str(&workload::by_work_kind(
                    self.fault_failures[i].iter().copied()
                ))
            );
        }
        let _ = writeln!(
            s,
            "\nResources: baseline at t={:.0} s (after warm-up and {} s quiet), final at t={:.0} s (after {} s quiet); \
             rd-server pid {} -> {} ({} starts), rd-client pid {} -> {} ({} starts).\n",
            self.baseline.at_s,
            self.quiet.as_secs(),
            self.final_.at_s,
            self.quiet.as_secs(),
            self.baseline.server.pid,
            self.final_.server.pid,
            self.cluster.server_starts,
            self.baseline.client.pid,
            self.final_.client.pid,
            self.cluster.client_starts
        );
        let _ = writeln!(s, "| process | resource | baseline | final | slack | |");
        let _ = writeln!(s, "|---|---|---:|---:|---|---|");
        for c in self.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                c.process,
                c.resource,
                fmt_opt(c.baseline),
                fmt_opt(c.final_),
                c.slack,
                c.verdict()
            );
        }
        let _ = writeln!(
            s,
            "\nResult: **{}**{}",
            if self.problems.is_empty() {
                "PASS"
            } else {
                "FAIL"
            },
            if self.problems.is_empty() {
                String::new()
            } else {
                format!(
                    "\n\n{}",
                    self.problems
                        .iter()
                        .map(|p| format!("- {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            }
        );
        s
    }

    fn json(
        &self,
        timeline: &[Snapshot],
        warm_end: Duration,
        panics: &BTreeMap<&str, usize>,
    ) -> Value {
        let work: BTreeMap<&str, Value> = Work::ALL
            .iter()
            .map(|w| {
                (
                    w.name(),
                    json!({"ok": self.stats.ok(*w), "verified_bytes": self.stats.bytes(*w),
                           "bytes_in_failed_requests": self.stats.partial_bytes(*w)}),
                )
            })
            .collect();
        let failure_json = |f: &workload::Failure| {
            json!({"work": f.work.name(), "kind": f.kind, "detail": f.detail,
                   "start_s": self.t(f.start), "end_s": self.t(f.end)})
        };
        json!({
            "passed": self.problems.is_empty(),
            "problems": self.problems,
            "config": {
                "seconds": self.o.seconds, "fault_interval_s": self.interval.as_secs(),
                "warmup_s": self.warmup.as_secs(), "quiet_s": self.quiet.as_secs(),
                "load_s": self.load_s, "warmup_end_s": warm_end.as_secs_f64(),
                "small_conns": self.shape.small_conns, "small_rate_per_conn": self.shape.small_rate,
                "medium_workers": self.shape.medium_workers, "uploads": self.shape.uploads,
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_ok": self.total_ok,
            "verified_bytes": self.total_bytes,
            "work": work,
            "errors_by_kind": self.all_kinds,
            "errors_outside_faults": self.steady.iter().map(|f| failure_json(f)).collect::<Vec<_>>(),
            "cut_off_at_end": self.cut,
            "faults": self.faults.iter().enumerate().map(|(i, f)| json!({
                "kind": f.kind.name(), "action": f.action, "start_s": self.t(f.start),
                "recovered_after_s": f.recovered.map(|r| (r - f.probe_from).as_secs_f64()),
                "window_end_s": self.t(f.window_end), "max_sessions": f.max_sessions,
                "errors_by_kind": workload::by_kind(self.fault_failures[i].iter().copied()),
                "errors_by_work_and_kind": workload::by_work_kind(self.fault_failures[i].iter().copied()),
                "error_samples": self.fault_failures[i].iter().take(5).map(|f| failure_json(f)).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "baseline": self.baseline.to_json(),
            "final": self.final_.to_json(),
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
            "tokio_tasks_metric": self.tasks_metric,
            "panics_in_logs": panics,
            "timeline": timeline.iter().map(Snapshot::to_json).collect::<Vec<_>>(),
            "server_addr": SocketAddr::to_string(&self.cluster.server_addr),
        })
    }
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
