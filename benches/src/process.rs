//! Child processes under test (rd-dummy, rd-server, rd-client) and the files rd-dummy
//! serves: shared by `rd-bench` and `rd-soak`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{BoxError, Rng, StreamHash};

/// A child process, killed (SIGKILL) when dropped.
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

    /// Spawns `bin args`, stderr appended to `log_dir/NAME.log`; with `wait_listen`, waits
    /// (10 s) for `listening on http://ADDR`.
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[&str],
        log_dir: &Path,
        wait_listen: bool,
    ) -> Result<Self, BoxError> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
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
                    log_path.display()
                )
            })?;
            proc.addr = Some(
                addr.parse()
                    .map_err(|e| format!("{name} address {addr}: {e}"))?,
            );
        }
        Ok(proc)
    }

    /// Whether the process is still running (not exited, or exited but not reaped by us).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) to this process, by pid, with `kill(1)`.
    pub fn signal(&self, signal: &str) -> Result<(), BoxError> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -s {signal} {}: {status}", self.pid()).into())
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `size` bytes of PRNG output to `path`; returns their [`StreamHash`].
pub fn generate_file(path: &Path, size: u64, seed: u64) -> std::io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = Rng::new(seed);
    let mut hash = StreamHash::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(hash.finish())
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$RD_BENCH_TMP` (else the system temp dir) `/rd-bench-PID`.
    pub fn new() -> std::io::Result<Self> {
        Self::with_prefix("rd-bench")
    }

    /// `$RD_BENCH_TMP` (else the system temp dir) `/PREFIX-PID`.
    pub fn with_prefix(prefix: &str) -> std::io::Result<Self> {
        let base = std::env::var_os("RD_BENCH_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}
