//! Isolation under stalled readers (issue 10): many downloads through one tunnel whose
//! readers stop (sockets with a 16 KiB receive buffer that are not read), then fresh small
//! requests and one large download through the same client beside them; finally the stalled
//! readers resume and every download must complete byte-exact.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rd_benches::{procfs as proc, Latencies, StreamHash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::load::{self, BoxError, Path};
use crate::report::Row;

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub struct IsolationResult {
    pub stalled: usize,
    /// Fresh 1 KiB requests without stalled readers: p50, p99 (µs), failures.
    pub base_p50_us: f64,
    pub base_p99_us: f64,
    pub base_failed: usize,
    /// The same beside the stalled readers.
    pub p50_us: f64,
    pub p99_us: f64,
    pub failed: usize,
    pub requests: usize,
    /// The large download alone and beside the stalled readers (MB/s); 0 if it failed.
    pub solo_mb_s: f64,
    pub beside_mb_s: f64,
    /// rd-server VmRSS growth while the readers were stalled (MiB).
    pub rss_growth_mib: f64,
    /// Stalled downloads that did not complete byte-exact after resuming.
    pub lost: usize,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Fresh requests, `workers` at a time, each on a new connection with a timeout.
async fn fresh_requests(
    path: &Path,
    file: &str,
    size: u64,
    total: usize,
    workers: usize,
) -> (Latencies, usize) {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let path = path.clone();
        let file = file.to_string();
        let n = total / workers + usize::from(w < total % workers);
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::new();
            let mut failed = 0;
            for _ in 0..n {
                let t = Instant::now();
                match tokio::time::timeout(REQUEST_TIMEOUT, load::fetch_once(&path, &file)).await {
                    Ok(Ok(len)) if len == size => lat.record(t.elapsed()),
                    _ => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Latencies::new();
    let mut failed = 0;
    for t in tasks {
        if let Ok((l, f)) = t.await {
            lat.merge(l);
            failed += f;
        }
    }
    (lat, failed)
}

/// A download whose reader stops at once: a socket with a small receive buffer that sends
/// the request and reads nothing until told to.
async fn stalled_download(server: SocketAddr, path: &str) -> Result<TcpStream, BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(16 * 1024)?;
    let mut stream = socket.connect(server).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    Ok(stream)
}

/// Reads a stalled download to its end; whether its body is the file, byte for byte.
async fn finish_download(mut stream: TcpStream, size: u64, hash: u64) -> bool {
    let mut buf = Vec::with_capacity(size as usize + 1024);
    let read = tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut buf)).await;
    if !matches!(read, Ok(Ok(_))) {
        return false;
    }
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    if !head.starts_with("HTTP/1.1 200") {
        return false;
    }
    let body = &buf[head_end + 4..];
    // rd-server streams the body; with `Connection: close` it may be chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        match dechunk(body) {
            Some(b) => b,
            None => return false,
        }
    } else {
        body.to_vec()
    };
    let mut h = StreamHash::new();
    h.update(&body);
    body.len() as u64 == size && h.finish() == hash
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn file_hash(path: &std::path::Path) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    let mut h = StreamHash::new();
    h.update(&bytes);
    Ok(h.finish())
}

/// The files this scenario needs, created in `dir`: (stalled file, its size, large file,
/// its size).
pub fn generate_files(dir: &std::path::Path, scale: f64) -> Result<(u64, u64), BoxError> {
    let stall_size = 4 << 20;
    let large_size = (((64u64 << 20) as f64 * scale.max(0.25)) as u64).max(1 << 20);
    crate::procs::generate_file(&dir.join("stall.bin"), stall_size, 4)?;
    crate::procs::generate_file(&dir.join("large64.bin"), large_size, 5)?;
    Ok((stall_size, large_size))
}

/// Runs the scenario on `path`: the tunnel (rd-server at `path.addr`, `server_pid`), or
/// the relay chain for comparison (`server_pid` `None`: no rd-server memory or metrics).
pub async fn run(
    path: &Path,
    files: &std::path::Path,
    stalled: usize,
    server_pid: Option<u32>,
    scale: f64,
) -> Result<IsolationResult, BoxError> {
    let (stall_size, large_size) = generate_files(files, scale)?;
    let stall_hash = file_hash(&files.join("stall.bin"))?;
    let requests = 100;
    let mut r = IsolationResult {
        stalled,
        requests,
        ..IsolationResult::default()
    };
    let mb_s = |bytes: u64, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);

    // Without stalled readers.
    let (mut lat, failed) = fresh_requests(path, "small.bin", 1024, requests, 10).await;
    r.base_p50_us = lat.percentile(50.0).as_secs_f64() * 1e6;
    r.base_p99_us = lat.percentile(99.0).as_secs_f64() * 1e6;
    r.base_failed = failed;
    let solo = load::bulk(path, "large64.bin", large_size, 1).await?;
    r.solo_mb_s = if solo.failed == 0 {
        mb_s(solo.bytes, solo.elapsed)
    } else {
        0.0
    };
    crate::say(format!(
        "  without stalled readers: p50 {:.0} µs p99 {:.0} µs, {} failed; {} MiB alone at {:.0} MB/s",
        r.base_p50_us,
        r.base_p99_us,
        r.base_failed,
        large_size >> 20,
        r.solo_mb_s
    ));

    // Stall the readers.
    let rss = || {
        server_pid
            .and_then(|pid| proc::status_kib(pid, "VmRSS"))
            .unwrap_or(0)
    };
    let rss_before = rss();
    let stall_path = path.path("stall.bin");
    let mut streams = Vec::new();
    for _ in 0..stalled {
        streams.push(stalled_download(path.addr, &stall_path).await?);
    }
    // Let the stalled downloads fill whatever buffers they are allowed to (a benchmark, not
    // a test: waiting is the point).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rss_peak = rss();
    if server_pid.is_some() {
        let held = load::metric(path.addr, "rd_buffered_bytes")
            .await
            .unwrap_or(0.0);
        let paused = load::metric(path.addr, "rd_streams_paused_by_us")
            .await
            .unwrap_or(0.0);
        crate::say(format!(
        "  {stalled} stalled readers; rd-server RSS {} -> {} MiB; the session holds {:.1} MiB unread, {paused} streams held back",
        rss_before >> 10,
        rss_peak >> 10,
        held / f64::from(1 << 20)
    ));
    }

    // Fresh requests and the large download beside them.
    let large_path = path.clone();
    let large = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(60),
            load::bulk(&large_path, "large64.bin", large_size, 1),
        )
        .await
    });
    let (mut lat, failed) = fresh_requests(path, "small.bin", 1024, requests, 10).await;
    r.p50_us = lat.percentile(50.0).as_secs_f64() * 1e6;
    r.p99_us = lat.percentile(99.0).as_secs_f64() * 1e6;
    r.failed = failed;
    r.beside_mb_s = match large.await {
        Ok(Ok(Ok(res))) if res.failed == 0 => mb_s(res.bytes, res.elapsed),
        _ => 0.0,
    };
    rss_peak = rss_peak.max(rss());
    r.rss_growth_mib = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    crate::say(format!(
        "  beside them: p50 {:.0} µs p99 {:.0} µs, {} of {} failed; {} MiB at {:.0} MB/s; RSS growth {:.0} MiB",
        r.p50_us,
        r.p99_us,
        r.failed,
        requests,
        large_size >> 20,
        r.beside_mb_s,
        r.rss_growth_mib
    ));

    // Resume: every stalled download must complete.
    let finished: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(finish_download(s, stall_size, stall_hash)))
        .collect();
    for f in finished {
        if !f.await.unwrap_or(false) {
            r.lost += 1;
        }
    }
    crate::say(format!(
        "  resumed: {} of {stalled} complete byte-exact",
        stalled - r.lost
    ));
    Ok(r)
}

/// The table rows for the tunnel's run `r`, with the relay chain's run of the same
/// scenario in the relay column.
pub fn rows(r: &IsolationResult, relay: &IsolationResult) -> Vec<Row> {
    let label = format!("{} stalled readers of 4 MiB", r.stalled);
    let p99_ok = r.failed == 0 && r.p99_us <= 2.0 * r.base_p99_us.max(1.0);
    vec![
        Row::new(&label, "fresh 1 KiB p50, unstalled / stalled", "µs")
            .paths(r.base_p50_us, relay.p50_us, r.p50_us)
            .note("direct column: the same requests through the tunnel before the readers stalled; relay column: through the relay chain beside as many stalled readers"),
        Row::new(&label, "fresh 1 KiB p99, unstalled / stalled", "µs")
            .paths(r.base_p99_us, relay.p99_us, r.p99_us)
            .target("<= 2x unstalled, no failure", p99_ok)
            .note(format!(
                "relay chain: {:.0} µs unstalled, {} of {} failed beside the stalled readers",
                relay.base_p99_us, relay.failed, relay.requests
            )),
        Row::new(
            &label,
            &format!("fresh requests failed (of {})", r.requests),
            "",
        )
        .tunnel_only(r.failed as f64)
        .target("0", r.failed == 0),
        Row::new(&label, "large download, alone / beside", "MB/s")
            .paths(r.solo_mb_s, relay.beside_mb_s, r.beside_mb_s)
            .target(
                ">= 0.5x alone",
                r.beside_mb_s >= 0.5 * r.solo_mb_s && r.solo_mb_s > 0.0,
            ),
        Row::new(&label, "rd-server RSS growth", "MiB")
            .tunnel_only(r.rss_growth_mib)
            .target("<= 128 MiB", r.rss_growth_mib <= 128.0),
        Row::new(&label, "stalled downloads lost after resuming", "")
            .tunnel_only(r.lost as f64)
            .target("0", r.lost == 0),
    ]
}
