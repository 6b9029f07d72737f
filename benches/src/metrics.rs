//! rd-server's `/metrics` as the harnesses read it: each series name summed over its labels.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// rd-server's `/metrics`, each series name summed over its labels; `None` if unreachable.
pub async fn metrics(server: SocketAddr) -> Option<BTreeMap<String, f64>> {
    Some(parse_metrics(&metrics_text(server).await?))
}

/// rd-server's `/metrics` as it came; `None` if unreachable.
pub async fn metrics_text(server: SocketAddr) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(3), async {
        let tcp = TcpStream::connect(server).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(async move {
            conn.await.ok();
        });
        let req = Request::get("/metrics")
            .header(HOST, server.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .ok()?
}

/// One series with its labels exactly as written (`rd_dials{route="peer"}`) in a metrics
/// text; `None` if absent.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Each series name of an OpenMetrics text, summed over its labels (comments skipped).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if let Ok(v) = value.trim().parse::<f64>() {
            *m.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_over_labels() {
        let m = parse_metrics(
            "# HELP x\nrd_sessions 2\nsession_server_total_add_connections{clientkey=\"a\"} 3\nsession_server_total_add_connections{clientkey=\"b\"} 4\n# EOF\n",
        );
        assert_eq!(m.get("rd_sessions"), Some(&2.0));
        assert_eq!(m.get("session_server_total_add_connections"), Some(&7.0));
    }
}
