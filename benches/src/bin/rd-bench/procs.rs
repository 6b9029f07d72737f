//! The processes under test (rd-dummy, rd-server, rd-client), the files rd-dummy serves,
//! and per-process resource accounting from /proc.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rd_benches::{procfs, Rng};

use crate::load::BoxError;

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// The address from its `listening on http://ADDR` line, if it prints one.
    pub addr: Option<SocketAddr>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Spawns `bin args`; with `wait_listen`, waits (10 s) for `listening on http://ADDR`.
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[&str],
        log_dir: &Path,
        wait_listen: bool,
    ) -> Result<Self, BoxError> {
        let log = File::create(log_dir.join(format!("{name}.log")))?;
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    if let Some(tx) = tx.take() {
                        tx.send(addr.trim().to_owned()).ok();
                    }
                }
            }
        });
        let mut proc = Self { child, addr: None };
        if wait_listen {
            let addr = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
                format!(
                    "{name} did not print its listening address; see {}",
                    log_dir.join(format!("{name}.log")).display()
                )
            })?;
            proc.addr = Some(
                addr.parse()
                    .map_err(|e| format!("{name} address {addr}: {e}"))?,
            );
        }
        Ok(proc)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Writes `size` bytes of PRNG output to `path`.
pub fn generate_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> std::io::Result<Self> {
        let base = std::env::var_os("RD_BENCH_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("rd-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// CPU seconds and peak RSS of a process over one measured phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_s: f64,
    pub peak_kib: u64,
}

/// Starts measuring `pids`: resets their peak RSS and notes their CPU time.
#[derive(Debug)]
pub struct Meter {
    pids: Vec<u32>,
    cpu0: Vec<f64>,
}

impl Meter {
    pub fn start(pids: &[u32]) -> Self {
        for &pid in pids {
            procfs::reset_peak(pid);
        }
        Self {
            pids: pids.to_vec(),
            cpu0: pids
                .iter()
                .map(|&p| procfs::cpu_seconds(p).unwrap_or(0.0))
                .collect(),
        }
    }

    /// CPU used since `start` and the peak RSS since then, per pid.
    pub fn stop(self) -> Vec<Usage> {
        self.pids
            .iter()
            .zip(self.cpu0)
            .map(|(&pid, c0)| Usage {
                cpu_s: procfs::cpu_seconds(pid).unwrap_or(0.0) - c0,
                peak_kib: procfs::status_kib(pid, "VmHWM").unwrap_or(0),
            })
            .collect()
    }
}

/// Adds a phase's usage to a running total (CPU adds up, the peak is the maximum).
pub fn accumulate(total: &mut [Usage], phase: &[Usage]) {
    for (t, p) in total.iter_mut().zip(phase) {
        t.cpu_s += p.cpu_s;
        t.peak_kib = t.peak_kib.max(p.peak_kib);
    }
}
