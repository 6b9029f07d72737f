//! The processes under test, the faults injected into them, and their resources.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use rd_benches::metrics::metrics;
use rd_benches::process::Proc;
use rd_benches::{procfs, BoxError};
use serde_json::{json, Value};

/// The client key every rd-client uses.
pub const CLIENT_ID: &str = "soak";

/// rd-server's and rd-client's current pids, for the sampler.
pub type Pids = Arc<Mutex<[u32; 2]>>;

/// rd-dummy, rd-server and rd-client, restartable on the same addresses.
#[derive(Debug)]
pub struct Cluster {
    bins: PathBuf,
    logs: PathBuf,
    pub dummy: Proc,
    pub server: Proc,
    pub client: Proc,
    pub server_addr: SocketAddr,
    pub pids: Pids,
    pub server_starts: u32,
    pub client_starts: u32,
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl Cluster {
    pub fn start(bins: &Path, logs: &Path, files: &Path) -> Result<Self, BoxError> {
        let files = files.to_string_lossy().to_string();
        let dummy = Proc::spawn(
            "rd-dummy",
            &bins.join("rd-dummy"),
            &["--listen", "127.0.0.1:0", "--dir", &files],
            logs,
            true,
        )?;
        let server = Proc::spawn(
            "rd-server",
            &bins.join("rd-server"),
            &["--listen", "127.0.0.1:0"],
            logs,
            true,
        )?;
        let server_addr = server.addr.ok_or("no server address")?;
        let client = spawn_client(bins, logs, "rd-client", server_addr)?;
        let pids = Arc::new(Mutex::new([server.pid(), client.pid()]));
        Ok(Self {
            bins: bins.to_path_buf(),
            logs: logs.to_path_buf(),
            dummy,
            server,
            client,
            server_addr,
            pids,
            server_starts: 1,
            client_starts: 1,
        })
    }

    pub fn dummy_addr(&self) -> Result<SocketAddr, BoxError> {
        Ok(self.dummy.addr.ok_or("no dummy address")?)
    }

    fn set_pids(&self) {
        *self.pids.lock().unwrap_or_else(|p| p.into_inner()) =
            [self.server.pid(), self.client.pid()];
    }

    /// Which of the three have exited on their own.
    pub fn dead(&mut self) -> Vec<&'static str> {
        let mut d = Vec::new();
        if !self.dummy.alive() {
            d.push("rd-dummy");
        }
        if !self.server.alive() {
            d.push("rd-server");
        }
        if !self.client.alive() {
            d.push("rd-client");
        }
        d
    }

    /// SIGKILL rd-client, wait `down`, start a new one.
    pub async fn kill_client(&mut self, down: Duration) -> Result<String, BoxError> {
        let old = self.client.pid();
        block(|| self.client.kill());
        tokio::time::sleep(down).await;
        self.client =
            block(|| spawn_client(&self.bins, &self.logs, "rd-client", self.server_addr))?;
        self.client_starts += 1;
        self.set_pids();
        Ok(format!(
            "SIGKILL rd-client pid {old}, new pid {} after {down:?}",
            self.client.pid()
        ))
    }

    /// SIGKILL rd-server, wait `down`, start a new one on the same port.
    pub async fn kill_server(&mut self, down: Duration) -> Result<String, BoxError> {
        let old = self.server.pid();
        block(|| self.server.kill());
        tokio::time::sleep(down).await;
        let listen = self.server_addr.to_string();
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            let r = block(|| {
                Proc::spawn(
                    "rd-server",
                    &self.bins.join("rd-server"),
                    &["--listen", &listen],
                    &self.logs,
                    true,
                )
            });
            match r {
                Ok(s) => break s,
                Err(e) if attempt >= 20 => {
                    return Err(format!("rd-server did not restart on {listen}: {e}").into())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        if server.addr != Some(self.server_addr) {
            return Err(format!(
                "rd-server restarted on {:?}, not {}",
                server.addr, self.server_addr
            )
            .into());
        }
        self.server = server;
        self.server_starts += 1;
        self.set_pids();
        Ok(format!(
            "SIGKILL rd-server pid {old}, new pid {} on {} after {down:?} ({attempt} bind attempts)",
            self.server.pid(),
            self.server_addr
        ))
    }

    /// A second rd-client with the same id connects, stays `hold`, and goes away (SIGTERM
    /// or SIGKILL). Returns what happened and the most sessions the server reported.
    pub async fn duplicate_client(
        &mut self,
        hold: Duration,
        graceful: bool,
    ) -> Result<(String, Option<f64>), BoxError> {
        let start = Instant::now();
        let mut dup =
            block(|| spawn_client(&self.bins, &self.logs, "rd-client-dup", self.server_addr))?;
        let mut max_sessions: Option<f64> = None;
        while start.elapsed() < hold {
            if let Some(m) = metrics(self.server_addr).await {
                if let Some(&s) = m.get("rd_sessions") {
                    max_sessions = Some(max_sessions.map_or(s, |x: f64| x.max(s)));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let pid = dup.pid();
        if graceful {
            dup.signal("TERM")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while dup.alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let exited_by_itself = !dup.alive();
        block(|| dup.kill());
        Ok((
            format!(
                "second rd-client pid {pid} (same id) for {hold:?}, then {}{}",
                if graceful { "SIGTERM" } else { "SIGKILL" },
                if graceful && !exited_by_itself {
                    " (did not exit within 10 s: SIGKILL)"
                } else {
                    ""
                }
            ),
            max_sessions,
        ))
    }
}

fn spawn_client(
    bins: &Path,
    logs: &Path,
    name: &str,
    server: SocketAddr,
) -> Result<Proc, BoxError> {
    let connect = format!("ws://{server}/connect");
    Proc::spawn(
        name,
        &bins.join("rd-client"),
        &["--connect", &connect, "--id", CLIENT_ID],
        logs,
        false,
    )
}

/// A process's resources at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSnap {
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

impl ProcSnap {
    pub fn take(pid: u32) -> Self {
        Self {
            pid,
            rss_kib: procfs::status_kib(pid, "VmRSS").unwrap_or(0),
            fds: procfs::fd_count(pid).unwrap_or(0),
            threads: procfs::status_count(pid, "Threads").unwrap_or(0),
        }
    }

    pub fn to_json(self) -> Value {
        json!({"pid": self.pid, "rss_kib": self.rss_kib, "fds": self.fds, "threads": self.threads})
    }
}

/// Opened minus closed minus the gauge `name` (`rd_sessions`, `rd_streams`); `None` when the
/// server does not export the counters.
fn drift(m: &std::collections::BTreeMap<String, f64>, name: &str) -> Option<f64> {
    let opened = m.get(&format!("{name}_opened_total"))?;
    let closed = m.get(&format!("{name}_closed_total"))?;
    Some(opened - closed - m.get(name)?)
}

/// rd-server's and rd-client's resources plus the server's gauges.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub at_s: f64,
    pub server: ProcSnap,
    pub client: ProcSnap,
    pub sessions: Option<f64>,
    pub streams: Option<f64>,
    pub tasks: Option<f64>,
    /// `rd_sessions_opened_total - rd_sessions_closed_total - rd_sessions` (0 when the
    /// counters reconcile with the gauge).
    pub sessions_drift: Option<f64>,
    /// The same for streams.
    pub streams_drift: Option<f64>,
}

impl Snapshot {
    pub async fn take(pids: &Pids, server: SocketAddr, since: Instant) -> Self {
        let [s, c] = *pids.lock().unwrap_or_else(|p| p.into_inner());
        let m = metrics(server).await.unwrap_or_default();
        Self {
            at_s: since.elapsed().as_secs_f64(),
            server: ProcSnap::take(s),
            client: ProcSnap::take(c),
            sessions: m.get("rd_sessions").copied(),
            streams: m.get("rd_streams").copied(),
            tasks: m.get("rd_runtime_alive_tasks").copied(),
            sessions_drift: drift(&m, "rd_sessions"),
            streams_drift: drift(&m, "rd_streams"),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "t_s": (self.at_s * 10.0).round() / 10.0,
            "rd_server": self.server.to_json(),
            "rd_client": self.client.to_json(),
            "rd_sessions": self.sessions,
            "rd_streams": self.streams,
            "rd_runtime_alive_tasks": self.tasks,
            "rd_sessions_drift": self.sessions_drift,
            "rd_streams_drift": self.streams_drift,
        })
    }
}

/// Lines in `log` that look like a crash (`panicked at`), with a few for evidence.
pub fn panics_in(log: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains("panicked at"))
        .map(str::to_string)
        .collect();
    let n = lines.len();
    (n, lines.into_iter().take(3).collect())
}
