//! A real DNS server on loopback for the harnesses that find rd-server replicas through DNS:
//! dnsmasq serving one name from a hosts file that the harness rewrites (SIGHUP makes
//! dnsmasq read it again).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::BoxError;

/// dnsmasq answering `name` with A records, on 127.0.0.1 at a free UDP port; killed on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    name: String,
    hosts: PathBuf,
    /// Where it answers.
    pub addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `name` resolving to `addresses`, its hosts file in `dir`.
    pub fn start(dir: &Path, name: &str, addresses: &[Ipv4Addr]) -> Result<Self, BoxError> {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")?;
        let hosts = dir.join("dns-hosts");
        write_hosts(&hosts, name, addresses)?;
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new(binary)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
                "--local-ttl=0",
                &format!("--port={port}"),
                &format!("--addn-hosts={}", hosts.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {binary}: {e}"))?;
        let stderr = child.stderr.take().ok_or("dnsmasq: no stderr")?;
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut dns = Self {
            child,
            name: name.to_owned(),
            hosts,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        dns.wait_for_read()?;
        Ok(dns)
    }

    /// Serves `addresses` for the name from now on.
    pub fn set(&mut self, addresses: &[Ipv4Addr]) -> Result<(), BoxError> {
        write_hosts(&self.hosts, &self.name, addresses)?;
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            return Err("dnsmasq: SIGHUP failed".into());
        }
        self.wait_for_read()
    }

    /// dnsmasq reads the hosts file after binding its socket: once it says so, it answers.
    fn wait_for_read(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains("read ") && line.contains("dns-hosts") => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err("dnsmasq did not read its hosts file within 10 s".into()),
            }
        }
    }
}

/// Written then renamed, so dnsmasq never reads half a file.
fn write_hosts(path: &Path, name: &str, addresses: &[Ipv4Addr]) -> std::io::Result<()> {
    let text: String = addresses.iter().map(|a| format!("{a} {name}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
