//! Restart storm (`rd-bench --only restart-storm`): N real `rd_client::Client`s (the library,
//! `Client::run` with its default backoff) in one load process (`rd-bench
//! --restart-storm-child URL N`) attached to an `rd-server`; the server is killed (SIGKILL),
//! restarted on the same port after an outage, and the load process reports when each
//! client's session came back. Reports the time from the restart until all are back, the
//! comebacks per 0.5 s, the failed attempts after the restart and the server's 503s.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use rd_client::{Client, StateObserver};
use tokio_util::sync::CancellationToken;

use crate::load::BoxError;
use crate::procs::{Proc, TempDir};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the load process saw, as Unix times (seconds), shared by all clients.
#[derive(Debug, Default)]
struct Log {
    /// Each session that came up.
    ups: Vec<f64>,
    /// Each wait before a redial (after a lost session or a failed attempt).
    redials: Vec<f64>,
}

/// One client's observer: counts its sessions and logs into the shared [`Log`].
struct Observer {
    log: Arc<Mutex<Log>>,
    /// Clients whose session is up now.
    up_now: Arc<AtomicUsize>,
}

impl StateObserver for Observer {
    fn session_up(&self) {
        self.up_now.fetch_add(1, Ordering::Relaxed);
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ups
            .push(unix_now());
    }

    fn session_down(&self) {
        self.up_now.fetch_sub(1, Ordering::Relaxed);
    }

    fn redialing(&self) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .redials
            .push(unix_now());
    }
}

/// The load process: runs `n` clients against `url`. Prints `{"up":n}` once all are up,
/// then, after the parent writes a line (the server was killed), waits until all are up
/// again and prints every comeback and redial as Unix times; exits when stdin closes.
pub fn child_main(url: &str, n: usize) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let log = Arc::new(Mutex::new(Log::default()));
        let up_now = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        for i in 0..n {
            let id = HeaderValue::from_str(&format!("restart-{i}"))?;
            let client = Client::builder(url)
                .header(HeaderName::from_static("x-tunnel-id"), id)
                .state_observer(Arc::new(Observer {
                    log: log.clone(),
                    up_now: up_now.clone(),
                }))
                .build();
            let cancel = cancel.clone();
            tokio::spawn(async move { client.run(cancel).await });
        }
        let wait_all_up = |limit: Duration| {
            let up_now = up_now.clone();
            async move {
                let deadline = Instant::now() + limit;
                while up_now.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                up_now.load(Ordering::Relaxed)
            }
        };
        let up = wait_all_up(Duration::from_secs(60)).await;
        println!("{}", serde_json::json!({ "up": up }));
        // The parent kills the server, then says so.
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await??;
        let killed_at: f64 = line.trim().parse().unwrap_or_else(|_| unix_now());
        // All down first (the kill reaches every client), then all up again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while up_now.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let back = wait_all_up(Duration::from_secs(120)).await;
        let (ups, redials) = {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            let after = |v: &Vec<f64>| v.iter().copied().filter(|t| *t > killed_at).collect();
            (after(&log.ups), after(&log.redials))
        };
        let ups: Vec<f64> = ups;
        let redials: Vec<f64> = redials;
        println!(
            "{}",
            serde_json::json!({ "back": back, "ups": ups, "redials": redials })
        );
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).ok();
        })
        .await
        .ok();
        cancel.cancel();
        Ok::<(), BoxError>(())
    })
}

/// What one restart storm measured.
#[derive(Debug, Clone, Default)]
pub struct RestartResult {
    pub clients: usize,
    pub outage_s: f64,
    /// Clients back after the restart.
    pub back: usize,
    /// From the restart (the new server listening) until the last client was back.
    pub all_back_s: f64,
    /// Comebacks per 0.5 s after the restart.
    pub histogram: Vec<usize>,
    /// Redials that followed a failed attempt made after the restart.
    pub failed_after_restart: usize,
    /// Handshakes the restarted server answered 503 (admission).
    pub rejected_503: u64,
}

/// Kills `rd-server` under `n` attached library clients, restarts it after `outage` and
/// measures the comeback.
pub fn run(bin_dir: &Path, n: usize, outage: Duration) -> Result<RestartResult, BoxError> {
    let dir = TempDir::with_prefix("rd-restart")?;
    let server_bin = bin_dir.join("rd-server");
    let mut server = Proc::spawn(
        "rd-server",
        &server_bin,
        &["--listen", "127.0.0.1:0"],
        &dir.0,
        true,
    )?;
    let addr = server.addr.ok_or("rd-server printed no address")?;
    let exe = std::env::current_exe()?;
    let mut load = std::process::Command::new(exe)
        .args([
            "--restart-storm-child",
            &format!("ws://{addr}/connect"),
            &n.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let mut stdin = load.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(load.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("restart child said {line:?}: {e}"))?;
    if v["up"].as_u64() != Some(n as u64) {
        return Err(format!("only {} of {n} clients came up", v["up"]).into());
    }
    // Let the fleet settle (first pings), then kill and tell the load process when.
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = unix_now();
    server.kill();
    writeln!(stdin, "{killed_at}")?;
    std::thread::sleep(outage);
    let server = Proc::spawn(
        "rd-server",
        &server_bin,
        &["--listen", &addr.to_string()],
        &dir.0,
        true,
    )?;
    let restarted_at = unix_now();
    line.clear();
    stdout.read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("restart child said {line:?}: {e}"))?;
    let times = |key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_f64()).collect())
            .unwrap_or_default()
    };
    let ups: Vec<f64> = times("ups").iter().map(|t| t - restarted_at).collect();
    let redials = times("redials");
    let all_back_s = ups.iter().copied().fold(0.0, f64::max);
    let mut histogram = vec![0usize; (all_back_s / 0.5).floor() as usize + 1];
    for t in &ups {
        histogram[(t.max(0.0) / 0.5).floor() as usize] += 1;
    }
    let rejected_503 = scrape_overloaded(&server)?;
    writeln!(stdin).ok();
    drop(stdin);
    load.wait().ok();
    Ok(RestartResult {
        clients: n,
        outage_s: outage.as_secs_f64(),
        back: v["back"].as_u64().unwrap_or(0) as usize,
        all_back_s,
        histogram,
        failed_after_restart: redials.iter().filter(|t| **t > restarted_at).count(),
        rejected_503,
    })
}

/// `rd_handshake_rejects_total{reason="overloaded"}` from the server's /metrics.
fn scrape_overloaded(server: &Proc) -> Result<u64, BoxError> {
    use std::io::Read;
    let addr = server.addr.ok_or("no server address")?;
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("rd_handshake_rejects_total") && l.contains("overloaded"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
