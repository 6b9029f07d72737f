//! The admin API: which agents are connected, since when, from where, and what each one
//! carries, down to each stream's flow state; and disconnecting an agent or one session.
//!
//! | request | answer |
//! |---|---|
//! | `GET /admin/agents` | every agent with a session here, each session without its streams |
//! | `GET /admin/agents/{id}` | one agent, each session with its streams |
//! | `DELETE /admin/agents/{id}` | closes every session of the agent (`?session=KEY`: that one) |
//!
//! Answers are JSON (see docs/operations.md for the schema); errors are `{"error": "..."}`
//! with the status. Mount [`AdminApi::handle`] where the operator's routes are, behind the
//! same credentials as `/client`: it tells who is connected and can disconnect them.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rd_session::inspect::{self, SessionView, StreamView};
use serde::Serialize;

use crate::server::SessionRecord;
use crate::{Body, Server};

/// Serves `/admin/...` over a [`Server`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    server: Server,
}

/// `GET /admin/agents`.
#[derive(Debug, Serialize)]
struct AgentsDoc {
    /// This server's peer id (`null` without one).
    server_id: Option<String>,
    /// Whether this server drains (SIGTERM): its agents are moving elsewhere.
    draining: bool,
    agents: Vec<AgentDoc>,
    /// Other servers' peer links to this one (their sessions, keyed by their peer id).
    peer_links: Vec<SessionDoc>,
}

/// One agent: its client id and its sessions on this server.
#[derive(Debug, Serialize)]
struct AgentDoc {
    id: String,
    sessions: Vec<SessionDoc>,
}

/// One session: what its handle knows, and what the server learned at the upgrade.
#[derive(Debug, Serialize)]
struct SessionDoc {
    #[serde(flatten)]
    view: SessionView,
    /// The address the upgrade came from.
    remote: Option<String>,
    /// How the agent proved its id: `none` (taken as claimed), `agent-token`, `authorizer`.
    authenticated: &'static str,
    /// The id the agent was registered under (authenticated as `authenticated` says).
    identity: String,
    /// The server the session is on (this one).
    server_id: Option<String>,
    /// When the session was registered.
    since: String,
    uptime_seconds: f64,
    /// Payload bytes written into the session's streams (towards the agent).
    bytes_sent: u64,
    /// Payload bytes read from them.
    bytes_received: u64,
    /// The server drains, or this session was told it is going away.
    draining: bool,
    /// The drain has withdrawn it: new streams for the agent go elsewhere.
    withdrawn: bool,
    /// With `GET /admin/agents/{id}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    streams: Option<Vec<StreamView>>,
}

/// `DELETE /admin/agents/{id}`.
#[derive(Debug, Serialize)]
struct DisconnectDoc {
    agent: String,
    /// The session keys closed.
    closed: Vec<String>,
}

impl AdminApi {
    /// The admin API of `server`.
    pub fn new(server: Server) -> Self {
        Self { server }
    }

    /// Whether `path` is one of this API's (`/admin/...`).
    pub fn serves(path: &str) -> bool {
        path == "/admin" || path.starts_with("/admin/")
    }

    /// Answers an `/admin/...` request. `caller` names whoever asked (an admin credential,
    /// an address), for the log line of a disconnect.
    pub fn handle<B>(&self, req: &Request<B>, caller: &str) -> Response<Body> {
        let path = req.uri().path();
        let rest = path.strip_prefix("/admin/agents").unwrap_or("-");
        let agent = match rest {
            "" | "/" => None,
            r if r.starts_with('/') => Some(decode(&r[1..])),
            _ => return error(StatusCode::NOT_FOUND, "not found: see GET /admin/agents"),
        };
        match (req.method(), agent) {
            (&Method::GET, None) => json(StatusCode::OK, &self.agents()),
            (&Method::GET, Some(id)) => match self.agent(&id, true) {
                Some(doc) => json(StatusCode::OK, &doc),
                None => error(StatusCode::NOT_FOUND, &no_agent(&id)),
            },
            (&Method::DELETE, Some(id)) => {
                let session = query_param(req.uri().query(), "session");
                self.disconnect(&id, session.as_deref(), caller)
            }
            _ => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "GET /admin/agents, GET or DELETE /admin/agents/{id}",
                );
                r.headers_mut()
                    .insert(header::ALLOW, http::HeaderValue::from_static("GET, DELETE"));
                r
            }
        }
    }

    fn agents(&self) -> AgentsDoc {
        let mut ids = self.server.list_clients();
        ids.sort();
        let wall = SystemTime::now();
        let mut links: Vec<_> = self
            .server
            .records()
            .values()
            .filter(|r| r.peer)
            .cloned()
            .collect();
        links.sort_by(|a, b| a.handle.client_key().cmp(b.handle.client_key()));
        AgentsDoc {
            peer_links: links
                .iter()
                .map(|r| self.session_doc(r, wall, false))
                .collect(),
            server_id: self.server_id(),
            draining: self.server.is_draining(),
            agents: ids.iter().filter_map(|id| self.agent(id, false)).collect(),
        }
    }

    fn server_id(&self) -> Option<String> {
        self.server.peers().identity().map(|i| i.id.clone())
    }

    fn agent(&self, id: &str, with_streams: bool) -> Option<AgentDoc> {
        let handles = self.server.registry().sessions_of(id);
        if handles.is_empty() {
            return None;
        }
        let records = self.server.records();
        let wall = SystemTime::now();
        let sessions = handles
            .iter()
            .filter_map(|h| records.get(&h.session_key()).cloned())
            .collect::<Vec<_>>();
        drop(records);
        Some(AgentDoc {
            id: id.to_owned(),
            sessions: sessions
                .iter()
                .map(|r| self.session_doc(r, wall, with_streams))
                .collect(),
        })
    }

    fn session_doc(&self, r: &SessionRecord, wall: SystemTime, with_streams: bool) -> SessionDoc {
        let view = SessionView::of(&r.handle, wall);
        let uptime = wall.duration_since(r.since).unwrap_or_default();
        SessionDoc {
            draining: self.server.is_draining() || view.going_away,
            view,
            remote: r.remote.map(|a| a.to_string()),
            authenticated: r.auth,
            identity: r.handle.client_key().to_owned(),
            server_id: self.server_id(),
            since: inspect::rfc3339(r.since),
            uptime_seconds: inspect::seconds(uptime),
            bytes_sent: r.bytes.sent.load(std::sync::atomic::Ordering::Relaxed),
            bytes_received: r.bytes.received.load(std::sync::atomic::Ordering::Relaxed),
            withdrawn: self.server.peers().is_withdrawn(&r.handle),
            streams: with_streams.then(|| StreamView::all_of(&r.handle, wall)),
        }
    }

    fn disconnect(&self, id: &str, session: Option<&str>, caller: &str) -> Response<Body> {
        let handles = self.server.registry().sessions_of(id);
        if handles.is_empty() {
            return error(StatusCode::NOT_FOUND, &no_agent(id));
        }
        let chosen: Vec<_> = match session {
            None => handles,
            Some(key) => handles
                .into_iter()
                .filter(|h| h.session_key().to_string() == key)
                .collect(),
        };
        if chosen.is_empty() {
            let text = format!(
                "agent {} has no session {}",
                crate::short_id(id),
                crate::short_id(session.unwrap_or_default())
            );
            return error(StatusCode::NOT_FOUND, &text);
        }
        let closed: Vec<String> = chosen.iter().map(|h| h.session_key().to_string()).collect();
        tracing::info!(
            client = %crate::short_id(id),
            sessions = %closed.join(","),
            by = caller,
            "agent disconnected by an operator"
        );
        for h in &chosen {
            h.close();
        }
        json(
            StatusCode::OK,
            &DisconnectDoc {
                agent: id.to_owned(),
                closed,
            },
        )
    }
}

fn no_agent(id: &str) -> String {
    format!("no agent {} on this server", crate::short_id(id))
}

/// `%XX` escapes of a path segment decoded (ids with spaces or non-ASCII characters).
fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn json<T: Serialize>(status: StatusCode, doc: &T) -> Response<Body> {
    // Serializing these documents (strings, numbers, booleans) cannot fail.
    let mut text = serde_json::to_vec_pretty(doc).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// An error as the API answers it: `{"error": "..."}`.
pub fn error(status: StatusCode, text: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": text }))
}
