//! 10,000 streams moving data slowly at once on one session (issue 10), library-level in a
//! child process (`rd-bench --scale-child slow-streams N`): an rd server session and an rd
//! client session with the credit extension over loopback TCP. Each slow stream's producer
//! (on the client side) writes 4 KiB per second and its reader (on the server side) wakes
//! once a second and reads what has arrived: 40 MB/s over all streams. Beside them:
//! fresh 1 KiB echo round trips and a 64 MiB download, against the same without the slow
//! streams. Prints one JSON line.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rd_benches::{procfs::self_rss, Latencies};
use rd_proto::Target;
use rd_session::{BoxedIo, ConnectRefused, Extensions, SessionBuilder, SessionHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::load::BoxError;

const LARGE: usize = 64 << 20;

/// The client side's local services, by target port: 1 echoes, 2 streams `LARGE` bytes,
/// anything else produces 4 KiB per second.
fn service(target: &Target) -> BoxedIo {
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let port = target.address().rsplit(':').next().unwrap_or("").to_owned();
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(mine);
        match port.as_str() {
            "1" => {
                tokio::io::copy(&mut r, &mut w).await.ok();
            }
            "2" => {
                let chunk = vec![7u8; 64 * 1024];
                let mut left = LARGE;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if w.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            }
            _ => {
                let chunk = vec![3u8; 4 * 1024];
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Box::new(theirs)
}

async fn session_pair() -> Result<SessionHandle, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client_tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (server_tcp, _) = accepted?;
    let client_tcp = client_tcp?;
    // As rd-server and rd-client set up their tunnel sockets.
    for tcp in [&server_tcp, &client_tcp] {
        rd_session::tune_tunnel_socket(tcp)?;
    }
    let server_ws = WebSocketStream::from_raw_socket(server_tcp, Role::Server, None).await;
    let client_ws = WebSocketStream::from_raw_socket(client_tcp, Role::Client, None).await;
    let _client = SessionBuilder::client()
        .extensions(Extensions::SUPPORTED)
        .connect_handler(
            |target: Target| async move { Ok::<BoxedIo, ConnectRefused>(service(&target)) },
        )
        .spawn(client_ws);
    Ok(SessionBuilder::server("slow", 1)
        .extensions(Extensions::SUPPORTED)
        .spawn(server_ws))
}

async fn echo_latencies(session: &SessionHandle, n: usize) -> Result<(Latencies, usize), BoxError> {
    let mut lat = Latencies::new();
    let mut failed = 0;
    let give_up = Instant::now() + Duration::from_secs(60);
    let payload = vec![1u8; 1024];
    for _ in 0..n {
        let t = Instant::now();
        let round_trip = async {
            let mut s = session.dial_addr("tcp", "127.0.0.1:1")?;
            s.write_all(&payload).await?;
            let mut back = vec![0u8; payload.len()];
            s.read_exact(&mut back).await?;
            Ok::<_, BoxError>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), round_trip).await {
            Ok(Ok(())) => lat.record(t.elapsed()),
            _ => failed += 1,
        }
        if Instant::now() > give_up {
            failed += n - lat.len() - failed;
            break;
        }
    }
    Ok((lat, failed))
}

async fn download(session: &SessionHandle) -> f64 {
    let t = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        let mut s = session.dial_addr("tcp", "127.0.0.1:2")?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            let k = s.read(&mut buf).await?;
            if k == 0 {
                return Ok::<_, BoxError>(n);
            }
            n += k;
        }
    })
    .await;
    match result {
        Ok(Ok(n)) if n == LARGE => n as f64 / 1e6 / t.elapsed().as_secs_f64(),
        _ => 0.0,
    }
}

/// The child's measurement.
pub async fn run(n: usize) -> Result<serde_json::Value, BoxError> {
    let session = session_pair().await?;
    let (mut base, base_failed) = echo_latencies(&session, 200).await?;
    let solo = download(&session).await;
    let before = self_rss();
    let read_total = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let mut s = session.dial_addr("tcp", &format!("127.0.0.1:{}", 1000 + i % 60000))?;
        let read_total = read_total.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        read_total.fetch_add(k, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let opened = start.elapsed();
    // Let every stream fall behind its producer (a benchmark: waiting is the point).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (mut beside, failed) = echo_latencies(&session, 200).await?;
    let beside_mb_s = download(&session).await;
    let after = self_rss();
    let stats = session.stats();
    for r in &readers {
        r.abort();
    }
    Ok(serde_json::json!({
        "streams": n,
        "open_s": opened.as_secs_f64(),
        "base_p50_us": base.percentile(50.0).as_secs_f64() * 1e6,
        "base_p99_us": base.percentile(99.0).as_secs_f64() * 1e6,
        "base_failed": base_failed,
        "p50_us": beside.percentile(50.0).as_secs_f64() * 1e6,
        "p99_us": beside.percentile(99.0).as_secs_f64() * 1e6,
        "failed": failed,
        "solo_mb_s": solo,
        "beside_mb_s": beside_mb_s,
        "rss_growth_mib": after.saturating_sub(before) as f64 / f64::from(1 << 20),
        "held_mib": stats.receive_buffered as f64 / f64::from(1 << 20),
        "read_mib": read_total.load(Ordering::Relaxed) as f64 / f64::from(1 << 20),
        "live": stats.streams,
    }))
}
