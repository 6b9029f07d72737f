//! `rd-bench --only quick`: the headline ratios in a few minutes, robust to a noisy machine.
//!
//! Several short rounds; in each, every path runs bulk (1 stream and 8 streams), small
//! closed-loop requests and the fixed-rate open loop, the paths in a rotating order so
//! none always runs first (or last, after the others warmed the caches). Each round
//! yields ratios within that round (tunnel vs relay chain); the report is the median of
//! the rounds' ratios, which a burst of other work on the machine moves much less than a
//! single long run. Meant for A/B comparisons of builds (`--bin-dir`).
//!
//! [`fixed_round`], [`order`] and [`median`] also serve the full run's fixed-rate and
//! head-of-line rows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::load::{self, BoxError, Path};
use crate::procs::Meter;
use crate::{mb_per_s, say, us, RELAY, TUNNEL};

const GIB: f64 = (1u64 << 30) as f64;

/// What to run each round.
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
    /// Which parts to run (`bulk1`, `bulk8`, `small`, `fixed`); all when empty.
    pub parts: Vec<String>,
}

impl Plan {
    fn runs(&self, part: &str) -> bool {
        self.parts.is_empty() || self.parts.iter().any(|p| p == part)
    }
}

/// One round's figures, per path (direct, relay, tunnel).
#[derive(Debug, Default, Clone)]
struct Round {
    bulk1: [f64; 3],
    bulk8: [f64; 3],
    small: [f64; 3],
    fixed_p50: [f64; 3],
    fixed_p99: [f64; 3],
    /// CPU seconds per GiB of the tunnel's 1-stream bulk: rd-server, rd-client.
    cpu_per_gib: [f64; 2],
    /// Peak RSS (MiB) during the tunnel's 1-stream bulk: rd-server, rd-client.
    peak_mib: [f64; 2],
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The order in which round `round` runs the three paths: rotating, so that none always
/// runs first (or last, after the others warmed the caches).
pub fn order(round: usize) -> [usize; 3] {
    [round % 3, (round + 1) % 3, (round + 2) % 3]
}

/// One round of the fixed-rate open loop on every path (direct, relay, tunnel).
#[derive(Debug, Default, Clone)]
pub struct FixedRound {
    pub p50: [f64; 3],
    pub p99: [f64; 3],
    /// Requests per second achieved.
    pub achieved: [f64; 3],
    pub errors: [u64; 3],
    /// How far behind schedule the sender fell at most (ms).
    pub max_lag_ms: [f64; 3],
    /// Bytes the bulk download alongside moved (head-of-line rounds only).
    pub bulk_bytes: [u64; 3],
}

/// Runs the fixed-rate open loop (`rate` requests per second of `file` for `duration`) on
/// each path in the order of `round`. With `alongside`, a download of that file loops on
/// the same path meanwhile (the head-of-line scenario), started 200 ms before the
/// measurement so that it runs at full speed.
pub async fn fixed_round(
    clients: &[load::PoolClient],
    paths: &[Path; 3],
    round: usize,
    file: &str,
    rate: u64,
    duration: Duration,
    alongside: Option<&str>,
) -> Result<FixedRound, BoxError> {
    let mut r = FixedRound::default();
    for i in order(round) {
        let stop = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));
        let bulk = alongside.map(|bulk_file| {
            tokio::spawn(load::background_bulk(
                paths[i].clone(),
                bulk_file.to_string(),
                stop.clone(),
                moved.clone(),
            ))
        });
        if bulk.is_some() {
            // A benchmark, not a test: the download needs a moment to reach full speed.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let l = load::open_loop(&clients[i], &paths[i], file, rate, duration).await;
        stop.store(true, Ordering::Relaxed);
        if let Some(bulk) = bulk {
            bulk.await.ok();
        }
        let mut l = l?;
        r.p50[i] = us(l.latencies.percentile(50.0));
        r.p99[i] = us(l.latencies.percentile(99.0));
        r.achieved[i] = l.rate();
        r.errors[i] = l.errors;
        r.max_lag_ms[i] = l.max_lag.as_secs_f64() * 1e3;
        r.bulk_bytes[i] = moved.load(Ordering::Relaxed);
    }
    Ok(r)
}

/// Runs the plan on `paths` (direct, relay, tunnel); `pids` are rd-server and rd-client.
pub async fn run(paths: &[Path; 3], pids: [u32; 2], plan: &Plan) -> Result<(), BoxError> {
    let clients: Vec<load::PoolClient> = (0..3).map(|_| load::pool_client()).collect();
    let mut rounds = Vec::new();
    for round in 0..plan.rounds {
        let mut r = Round::default();
        let order = order(round);
        for &i in order.iter().filter(|_| plan.runs("bulk1")) {
            let meter = Meter::start(&pids);
            let b = load::bulk(&paths[i], plan.large.0, plan.large.1, 1).await?;
            let usage = meter.stop();
            r.bulk1[i] = mb_per_s(b.bytes, b.elapsed);
            if i == TUNNEL {
                let gib = b.bytes as f64 / GIB;
                r.cpu_per_gib = [usage[0].cpu_s / gib, usage[1].cpu_s / gib];
                r.peak_mib = [
                    usage[0].peak_kib as f64 / 1024.0,
                    usage[1].peak_kib as f64 / 1024.0,
                ];
            }
        }
        for &i in order.iter().filter(|_| plan.runs("bulk8")) {
            let b = load::bulk(&paths[i], plan.medium.0, plan.medium.1, 8).await?;
            r.bulk8[i] = mb_per_s(b.bytes, b.elapsed);
        }
        for &i in order.iter().filter(|_| plan.runs("small")) {
            let l = load::closed_loop(&paths[i], plan.small, plan.conns, plan.duration).await?;
            r.small[i] = l.rate();
        }
        if plan.runs("fixed") {
            let f = fixed_round(
                &clients,
                paths,
                round,
                plan.small,
                plan.rate,
                plan.duration,
                None,
            )
            .await?;
            (r.fixed_p50, r.fixed_p99) = (f.p50, f.p99);
        }
        say(format!(
            "round {}: bulk1 {:.0}/{:.0}/{:.0} MB/s, bulk8 {:.0}/{:.0}/{:.0} MB/s, small {:.0}/{:.0}/{:.0} req/s, \
             fixed p50 {:.0}/{:.0}/{:.0} µs p99 {:.0}/{:.0}/{:.0} µs, CPU s/GiB server {:.2} client {:.2}",
            round + 1,
            r.bulk1[0], r.bulk1[1], r.bulk1[2],
            r.bulk8[0], r.bulk8[1], r.bulk8[2],
            r.small[0], r.small[1], r.small[2],
            r.fixed_p50[0], r.fixed_p50[1], r.fixed_p50[2],
            r.fixed_p99[0], r.fixed_p99[1], r.fixed_p99[2],
            r.cpu_per_gib[0], r.cpu_per_gib[1],
        ));
        rounds.push(r);
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let added = |v: &[f64; 3], i: usize| v[i] - v[0];
    println!(
        "quick ({} rounds, medians of per-round figures):",
        rounds.len()
    );
    println!(
        "  bulk 1 x {} MiB   tunnel/relay {:.2}  (tunnel {:.0} MB/s, relay {:.0}, direct {:.0})",
        plan.large.1 >> 20,
        med(&|r| r.bulk1[TUNNEL] / r.bulk1[RELAY]),
        med(&|r| r.bulk1[TUNNEL]),
        med(&|r| r.bulk1[RELAY]),
        med(&|r| r.bulk1[0]),
    );
    println!(
        "  bulk 8 x {} MiB    tunnel/relay {:.2}  (tunnel {:.0} MB/s, relay {:.0}, direct {:.0})",
        plan.medium.1 >> 20,
        med(&|r| r.bulk8[TUNNEL] / r.bulk8[RELAY]),
        med(&|r| r.bulk8[TUNNEL]),
        med(&|r| r.bulk8[RELAY]),
        med(&|r| r.bulk8[0]),
    );
    println!(
        "  small, {} conns   tunnel/relay {:.2}  (tunnel {:.0} req/s, relay {:.0}, direct {:.0})",
        plan.conns,
        med(&|r| r.small[TUNNEL] / r.small[RELAY]),
        med(&|r| r.small[TUNNEL]),
        med(&|r| r.small[RELAY]),
        med(&|r| r.small[0]),
    );
    for (name, pick) in [
        (
            "p50",
            &(|r: &Round| r.fixed_p50) as &dyn Fn(&Round) -> [f64; 3],
        ),
        ("p99", &|r: &Round| r.fixed_p99),
    ] {
        println!(
            "  fixed {} req/s added {name}: tunnel {:.0} µs, relay {:.0} µs, tunnel/relay {:.2}",
            plan.rate,
            med(&|r| added(&pick(r), TUNNEL)),
            med(&|r| added(&pick(r), RELAY)),
            med(&|r| added(&pick(r), TUNNEL) / added(&pick(r), RELAY).max(1.0)),
        );
    }
    println!(
        "  CPU per GiB (1 stream): rd-server {:.2} s, rd-client {:.2} s",
        med(&|r| r.cpu_per_gib[0]),
        med(&|r| r.cpu_per_gib[1]),
    );
    println!(
        "  peak RSS (1 stream): rd-server {:.1} MiB, rd-client {:.1} MiB",
        med(&|r| r.peak_mib[0]),
        med(&|r| r.peak_mib[1]),
    );
    Ok(())
}
