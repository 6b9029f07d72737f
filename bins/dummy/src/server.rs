//! The accept loop: one HTTP/1.1 keep-alive connection per task, and a graceful
//! stop that lets in-flight responses finish for a bounded time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access_log::{Logged, RequestInfo};
use crate::files::{FileServer, ResponseBody};

/// How long open connections may keep going after a shutdown signal, so a
/// stuck client cannot keep the process alive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

struct App {
    files: FileServer,
    requests: AtomicU64,
}

/// Serves `files` on `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, files: FileServer, shutdown: impl Future<Output = ()>) {
    let app = Arc::new(App {
        files,
        requests: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(connection(stream, Arc::clone(&app), stop_rx.clone()));
                }
                Err(e) => {
                    // Usually EMFILE; retrying at once would spin while nothing is freed.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    tracing::info!("shutting down, {} connection(s) open", connections.len());
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("closing {} connection(s) still busy", connections.len());
        connections.shutdown().await;
    }
}

async fn connection(stream: TcpStream, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    // Small responses (headers, listings) should not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(handle(&app, req).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // The `Ref` guard is dropped inside the async block: it is not `Send`.
        () = async { let _ = stop.wait_for(|stopped| *stopped).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection error: {e}");
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Logged<ResponseBody>> {
    let info = RequestInfo {
        id: app.requests.fetch_add(1, Ordering::Relaxed) + 1,
        method: req.method().clone(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        start: Instant::now(),
    };
    let resp = app.files.respond(&req).await;
    let status = resp.status();
    resp.map(|body| Logged::new(body, info, status))
}
