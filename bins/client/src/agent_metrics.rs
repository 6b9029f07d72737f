//! rd-client's `--metrics-listen`: Prometheus metrics of the agent's sessions, liveness
//! (`/livez`), readiness (`/readyz`, `/healthz`: at least one session is up) and the
//! agent's sessions and streams as JSON (`/admin/streams`, the same views as rd-server's
//! admin API).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rd_client::{HeldSession, StateObserver};
use rd_proto::Target;
use rd_session::inspect::{self, SessionView, StreamView};
use rd_session::{SessionHandle, SessionObserver};
use serde::Serialize;
use tokio::net::TcpListener;

/// One session the agent holds, for `/admin/streams`.
#[derive(Debug)]
struct Held {
    handle: SessionHandle,
    url: String,
    server_id: Option<String>,
    since: std::time::SystemTime,
}

/// `GET /admin/streams`.
#[derive(Debug, Serialize)]
struct StreamsDoc<'a> {
    client_id: &'a str,
    sessions: Vec<HeldDoc>,
}

/// One session: the server it is with, and its streams.
#[derive(Debug, Serialize)]
struct HeldDoc {
    /// The server's peer id (`null` for a Go server or one without an id).
    server_id: Option<String>,
    /// The URL it was reached through.
    url: String,
    since: String,
    #[serde(flatten)]
    view: SessionView,
    streams: Vec<StreamView>,
}

/// The agent's metrics; shared by the client (as observer) and the HTTP endpoint.
#[derive(Debug)]
pub struct AgentMetrics {
    client_id: String,
    /// The sessions held now (the `/admin/streams` view).
    live: Mutex<Vec<Held>>,
    registry: Registry,
    /// Sessions up now.
    up: AtomicI64,
    session_up: Gauge,
    /// Sessions held now, by the server's id (`""` for a Go server).
    held: Family<Vec<(&'static str, String)>, Gauge>,
    /// The server ids in `held` now, to remove the series of servers gone (a replica
    /// replaced by one with a new id must not leave its series behind for good).
    held_ids: Mutex<Vec<String>>,
    sessions: Counter,
    redials: Counter,
    streams: Gauge,
    streams_opened: Counter,
    transmit_bytes: Counter,
    receive_bytes: Counter,
}

impl AgentMetrics {
    /// Every metric registered, with the process metrics and build info, for the agent
    /// `client_id`.
    pub fn new(client_id: &str) -> Self {
        let mut m = Self {
            client_id: client_id.to_owned(),
            live: Mutex::new(Vec::new()),
            registry: Registry::default(),
            up: AtomicI64::new(0),
            session_up: Gauge::default(),
            held: Family::default(),
            held_ids: Mutex::new(Vec::new()),
            sessions: Counter::default(),
            redials: Counter::default(),
            streams: Gauge::default(),
            streams_opened: Counter::default(),
            transmit_bytes: Counter::default(),
            receive_bytes: Counter::default(),
        };
        let r = &mut m.registry;
        crate::process_metrics::register(r, env!("CARGO_PKG_VERSION"), env!("RD_COMMIT"));
        let rd = r.sub_registry_with_prefix("rd_client");
        rd.register(
            "session_up",
            "1 while at least one session with a tunnel server is established, else 0",
            m.session_up.clone(),
        );
        rd.register(
            "server_sessions",
            "Sessions held now, by the server's id (empty for a Go server); going_away=true while a draining server still serves its streams",
            m.held.clone(),
        );
        rd.register(
            "sessions",
            "Sessions established since start",
            m.sessions.clone(),
        );
        rd.register(
            "reconnects",
            "Times the agent waited to connect again after a failed attempt or a lost session",
            m.redials.clone(),
        );
        rd.register(
            "streams",
            "Connections the server opened through this agent that are open now",
            m.streams.clone(),
        );
        rd.register(
            "streams_opened",
            "Connections the server opened through this agent since start",
            m.streams_opened.clone(),
        );
        rd.register(
            "transmit_bytes",
            "Payload bytes sent to the tunnel server",
            m.transmit_bytes.clone(),
        );
        rd.register(
            "receive_bytes",
            "Payload bytes received from the tunnel server",
            m.receive_bytes.clone(),
        );
        m
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `/admin/streams` document.
    fn streams(&self) -> String {
        let wall = std::time::SystemTime::now();
        let sessions = self
            .live()
            .iter()
            .map(|h| HeldDoc {
                server_id: h.server_id.clone(),
                url: h.url.clone(),
                since: inspect::rfc3339(h.since),
                view: SessionView::of(&h.handle, wall),
                streams: StreamView::all_of(&h.handle, wall),
            })
            .collect();
        let doc = StreamsDoc {
            client_id: &self.client_id,
            sessions,
        };
        // Strings, numbers and booleans: serializing cannot fail.
        let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        text.push('\n');
        text
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).ok();
        out
    }
}

impl SessionObserver for AgentMetrics {
    fn stream_opened(&self, _target: &Target) {
        self.streams.inc();
        self.streams_opened.inc();
    }
    fn stream_closed(&self, _target: &Target) {
        self.streams.dec();
    }
    fn transmitted(&self, bytes: usize) {
        self.transmit_bytes.inc_by(bytes as u64);
    }
    fn received(&self, bytes: usize) {
        self.receive_bytes.inc_by(bytes as u64);
    }
}

impl StateObserver for AgentMetrics {
    fn session_up(&self) {
        let up = self.up.fetch_add(1, Ordering::Relaxed) + 1;
        self.session_up.set(i64::from(up > 0));
        self.sessions.inc();
    }
    fn session_down(&self) {
        let up = self.up.fetch_sub(1, Ordering::Relaxed) - 1;
        self.session_up.set(i64::from(up > 0));
    }
    fn redialing(&self) {
        self.redials.inc();
    }
    fn session_started(&self, session: &SessionHandle, url: &str, server_id: Option<&str>) {
        self.live().push(Held {
            handle: session.clone(),
            url: url.to_owned(),
            server_id: server_id.map(str::to_owned),
            since: std::time::SystemTime::now(),
        });
    }
    fn session_ended(&self, session: &SessionHandle) {
        self.live().retain(|h| !h.handle.same_session(session));
    }
    fn sessions(&self, held: &[HeldSession]) {
        let mut ids = self.held_ids.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids.drain(..) {
            for going_away in ["false", "true"] {
                self.held.remove(&vec![
                    ("server_id", id.clone()),
                    ("going_away", going_away.into()),
                ]);
            }
        }
        for s in held {
            let id = s.server_id.clone().unwrap_or_default();
            self.held
                .get_or_create(&vec![
                    ("server_id", id.clone()),
                    ("going_away", s.going_away.to_string()),
                ])
                .inc();
            ids.push(id);
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn route(metrics: &AgentMetrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/admin/streams" => response(StatusCode::OK, "application/json", metrics.streams()),
        // The process answers: restarting it would not help.
        "/livez" => response(StatusCode::OK, TEXT, "ok\n".into()),
        // Ready means useful: the agent serves the servers only while a session is up.
        "/readyz" | "/healthz" => match metrics.up.load(Ordering::Relaxed) {
            n if n > 0 => response(StatusCode::OK, TEXT, format!("ok: {n} session(s) up\n")),
            _ => response(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "no session with a tunnel server\n".into(),
            ),
        },
        _ => response(StatusCode::NOT_FOUND, TEXT, "404 page not found\n".into()),
    }
}

/// Serves /metrics, /livez, /readyz and /healthz on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let r = route(&metrics, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// The address the metrics listener is bound to, for the `listening on` line.
pub fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
