//! End-to-end test helpers: finding the built binaries, running them as guarded child
//! processes, reading their `listening on` line, temporary directories and a small HTTP
//! client.
#![allow(clippy::unwrap_used)]

mod raw;
pub use raw::{curl, echo_round, pattern, spawn_echo, start_client};

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// How long a binary may take to print its `listening on` line.
pub const START_BOUND: Duration = Duration::from_secs(15);

/// The directory the binaries were built into: the test executable lives in
/// `target/<profile>/deps`, the binaries one level up.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    deps.parent().expect("deps has a parent").to_path_buf()
}

/// The path of binary `name`; panics with the build command when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests \
         (`make unit` does)",
        path.display()
    );
    path
}

/// The workspace root (the e2e package lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The URL of a `listening on URL` line, or of its `--log-format json` form
/// (`{"message":"listening on","url":"URL",...}`).
pub fn listening_url(line: &str) -> Option<String> {
    if let Some(url) = line.strip_prefix("listening on ") {
        return Some(url.trim().to_owned());
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["message"] == "listening on")
        .then(|| v["url"].as_str().map(str::to_owned))
        .flatten()
}

/// A child process, killed when dropped. Its stderr is collected (and printed if the test
/// is failing when the guard drops); stdout is scanned for the `listening on` line.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<Vec<String>>>,
    listening: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts binary `name` with `args`, without waiting for anything. Proxy variables are
    /// removed from its environment.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with(name, args, &[], false)
    }

    /// Like [`start`](Self::start), with extra environment variables; with `drop_stderr` the
    /// read end of its stderr pipe is closed at once (a log reader that went away), so every
    /// write to stderr fails with a broken pipe.
    pub fn start_with(name: &str, args: &[&str], env: &[(&str, &str)], drop_stderr: bool) -> Self {
        let mut cmd = Command::new(bin(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let (tx, listening) = mpsc::channel();
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let lines_sink = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                lines_sink.lock().unwrap().push(line.clone());
                if let Some(url) = listening_url(&line) {
                    tx.send(url).ok();
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        if drop_stderr {
            drop(stderr_pipe);
        } else {
            Self::collect(stderr_pipe, sink);
        }
        Self {
            name: name.to_owned(),
            child,
            stderr,
            stdout: stdout_lines,
            listening,
        }
    }

    fn collect(stderr_pipe: std::process::ChildStderr, sink: Arc<Mutex<String>>) {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
    }

    /// Starts binary `name` and waits for its `listening on URL` line; returns the process
    /// and the address from the URL.
    pub fn start_listening(name: &str, args: &[&str]) -> (Self, SocketAddr) {
        let mut p = Self::start(name, args);
        let addr = p.wait_listening();
        (p, addr)
    }

    /// Waits for the `listening on` line (or the process's exit) and parses the address.
    pub fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + START_BOUND;
        loop {
            match self.listening.recv_timeout(Duration::from_millis(50)) {
                Ok(url) => {
                    let hostport = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"))
                        .unwrap_or(&url);
                    return hostport.parse().unwrap_or_else(|e| {
                        panic!("{}: bad listening url {url:?}: {e}", self.name)
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed without the line: the process is exiting.
                    let status = self.wait_exit(Duration::from_secs(5));
                    panic!(
                        "{} exited ({status:?}) before listening; stderr:\n{}",
                        self.name,
                        self.stderr()
                    );
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before listening; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no `listening on` line within {START_BOUND:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Every line the process wrote to stdout so far. Lines before the `listening on` line
    /// are all here once [`wait_listening`](Self::wait_listening) has returned.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// Waits up to `bound` for the process to exit on its own.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `SIGTERM` (with the system's `kill`, to keep this crate free of `unsafe`).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many file descriptors the process has open (Linux: `/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap_or_else(|e| panic!("reading /proc/{}/fd: {e}", self.pid()))
            .count()
    }

    /// The process's resident set size in KiB (Linux: `VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("reading /proc/{}/status: {e}", self.pid()));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} stderr -----\n{}", self.name, self.stderr());
        }
    }
}

/// Runs binary `name` to completion, killing it after `bound`; returns its status, stdout
/// and stderr.
pub fn run_to_end(name: &str, args: &[&str], bound: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).ok();
            text
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("{name} {args:?} did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, empty directory.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rd-e2e-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts rd-client as `id` against the tunnel endpoint `url`, with its metrics listener
/// (`/metrics`, the probes, `/admin/streams`) on 127.0.0.1:0; returns the process and that
/// listener's address.
pub fn start_agent_with_metrics(url: &str, id: &str) -> (Proc, SocketAddr) {
    Proc::start_listening(
        "rd-client",
        &[
            "-connect",
            url,
            "-id",
            id,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}

/// Starts rd-dummy serving `dir` on 127.0.0.1:0.
pub fn start_dummy(dir: &Path) -> (Proc, SocketAddr) {
    Proc::start_listening(
        "rd-dummy",
        &["-listen", "127.0.0.1:0", "-dir", dir.to_str().unwrap()],
    )
}

/// A response: status and the whole body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on a fresh connection to `addr`, bounded by `bound`; errors (refused
/// connection, timeout, broken response) are returned as text, for polling.
pub async fn try_get(addr: SocketAddr, path: &str, bound: Duration) -> Result<Reply, String> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply { status, body })
    };
    tokio::time::timeout(bound, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {bound:?}")))
}

/// Polls `GET path` every 50 ms until `accept` says yes; panics with the last reply after
/// `bound`.
pub async fn poll_get(
    addr: SocketAddr,
    path: &str,
    bound: Duration,
    accept: impl Fn(&Reply) -> bool,
) -> Reply {
    let deadline = Instant::now() + bound;
    loop {
        let last = try_get(addr, path, Duration::from_secs(5)).await;
        if let Ok(reply) = &last {
            if accept(reply) {
                return reply.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "GET http://{addr}{path}: not accepted within {bound:?}; last: {:?}",
            last.map(|r| (r.status, r.text()))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a blocking condition every 20 ms; panics after `bound`.
pub fn wait_until(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` over TLS (trusting only `ca_pem`, checking the name `server_name`) on a fresh
/// connection to `addr`, bounded by `bound`.
pub async fn try_get_tls(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    path: &str,
    bound: Duration,
) -> Result<Reply, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, format!("{server_name}:{}", addr.port()))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply { status, body })
    };
    tokio::time::timeout(bound, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {bound:?}")))
}

/// Sha256 (hex) of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The value of the metric sample whose line starts with `prefix` (name and labels).
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l[prefix.len()..].trim().parse().ok())
}
