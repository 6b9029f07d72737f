//! The replicas extension between rd-server and rd-client in one process: an agent given
//! the URLs of peered servers holds a session with each and fills again when a replica
//! joins (the count is pushed in the session); servers that give no count (a Go server,
//! or an rd server that does not speak the extension) keep it at one session; a server it
//! holds already answers a second attempt with 409 and its id.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use rd_client::{HeldSession, SessionCount, StateObserver};
use rd_server::{Server, TunnelIdHeader};
use rd_session::transport::{
    connect_websocket_with_headers, ConnectError, ConnectOptions, ProxyMode,
};
use rd_session::{Extensions, HELD_SERVERS_HEADER, REPLICAS_HEADER, SERVER_ID_HEADER};

/// The server ids the client holds, as its state observer last heard.
#[derive(Default)]
struct Held(Mutex<Vec<HeldSession>>);

impl StateObserver for Held {
    fn session_up(&self) {}
    fn session_down(&self) {}
    fn redialing(&self) {}
    fn sessions(&self, held: &[HeldSession]) {
        *self.0.lock().unwrap() = held.to_vec();
    }
}

impl Held {
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| !s.going_away)
            .map(|s| s.server_id.clone().unwrap_or_default())
            .collect();
        ids.sort();
        ids
    }
}

fn local_sessions(server: &Server, id: &str) -> bool {
    server.list_clients().iter().any(|c| c == id)
}

#[tokio::test]
async fn an_agent_holds_each_peered_server_and_fills_when_one_joins() {
    let (a, b) = peered_pair(|b| b.build()).await;
    let c = serve(
        Server::builder(TunnelIdHeader)
            .peer_identity("c", "tok")
            .build(),
    )
    .await;
    wait_until("a and b count each other", || {
        a.server.replica_count() == 2 && b.server.replica_count() == 2
    })
    .await;
    let held = Arc::new(Held::default());
    let client = agent(&a.ws_url(), "foo")
        .server(b.ws_url())
        .server(c.ws_url())
        .state_observer(held.clone())
        .build();
    let _running = RunningClient::spawn(client);
    wait_until("a session with a and with b", || held.ids() == ["a", "b"]).await;
    assert!(local_sessions(&a.server, "foo") && local_sessions(&b.server, "foo"));
    assert!(
        !local_sessions(&c.server, "foo"),
        "c is not a replica of a and b yet"
    );

    // c joins: a and b count three and tell the agent in its sessions; it fills c.
    for (x, y, id) in [(&a, &c, "c"), (&b, &c, "c"), (&c, &a, "a"), (&c, &b, "b")] {
        x.server.add_peer(y.ws_url(), id, "tok");
    }
    wait_until("the agent holds a, b and c", || {
        held.ids() == ["a", "b", "c"]
    })
    .await;
    assert!(local_sessions(&c.server, "foo"));
}

#[tokio::test]
async fn servers_that_give_no_count_keep_the_agent_at_one_session() {
    let go_like = Extensions {
        replicas: false,
        ..Extensions::SUPPORTED
    };
    let (a, b) = peered_pair(|builder| builder.extensions(go_like).build()).await;
    let held = Arc::new(Held::default());
    let client = agent(&a.ws_url(), "foo")
        .server(b.ws_url())
        .state_observer(held.clone())
        .build();
    let _running = RunningClient::spawn(client);
    wait_until("one session", || held.ids() == [""]).await;
    // Requests through both servers: one of them hops to the other. Had the agent gone on
    // dialing, its second session would be up by the time both answered.
    for ts in [&a, &b] {
        let (status, _) = get_text(ts.addr, "/client/foo/http/127.0.0.1:1/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "the agent answered");
    }
    assert_eq!(held.ids(), [""]);
    assert!(local_sessions(&a.server, "foo") != local_sessions(&b.server, "foo"));

    // And an agent limited to one keeps one with rd servers that count two.
    let (c, d) = peered_pair(|builder| builder.build()).await;
    let one = Arc::new(Held::default());
    let client = agent(&c.ws_url(), "bar")
        .server(d.ws_url())
        .sessions(SessionCount::ONE)
        .state_observer(one.clone())
        .build();
    let _one = RunningClient::spawn(client);
    wait_until("bar's session", || one.ids().len() == 1).await;
    for ts in [&c, &d] {
        let (status, _) = get_text(ts.addr, "/client/bar/http/127.0.0.1:1/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "the agent answered");
    }
    assert_eq!(one.ids().len(), 1);
}

#[tokio::test]
async fn an_agent_only_a_draining_server_holds_stays_reachable_through_its_peer() {
    let (a, b) = peered_pair(|b| b.build()).await;
    wait_until("a and b count each other", || {
        a.server.replica_count() == 2 && b.server.replica_count() == 2
    })
    .await;
    // An agent that knows only a (its own address, one session): it cannot move.
    let client = agent(&a.ws_url(), "foo")
        .sessions(SessionCount::ONE)
        .build();
    let _running = RunningClient::spawn(client);
    let server_b = b.server.clone();
    wait_until("b routes foo through a", || server_b.has_session("foo")).await;

    let drain = tokio::spawn({
        let server = a.server.clone();
        async move { server.drain(std::time::Duration::from_secs(3)).await }
    });
    wait_until("a drains", || a.server.is_draining()).await;
    // Make-before-break: a keeps foo announced (nobody else holds it) and serves what b
    // routes to it, although it said GoAway on the link. The agent answers (no target
    // listens on port 1): 502 with its dial error, not 500 or 503.
    for _ in 0..3 {
        let (status, body) = get_text(b.addr, "/client/foo/http/127.0.0.1:1/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(
            body.contains("connection refused"),
            "not the agent's answer: {body}"
        );
    }
    let report = bounded("the drain", drain).await.unwrap();
    assert!(
        !report.finished_in_time,
        "foo was never held elsewhere: {report:?}"
    );
}

#[tokio::test]
async fn sessions_that_die_after_their_upgrade_are_redialed_with_backoff() {
    let (a, b) = peered_pair(|b| b.build()).await;
    wait_until("a counts b", || a.server.replica_count() == 2).await;
    // A callback that fails at once ends every session right after its upgrade.
    let client = agent(&a.ws_url(), "foo")
        .server(b.ws_url())
        .on_connect(|_, _| async { Err::<(), rd_client::BoxError>("refuse".into()) })
        .build();
    let _running = RunningClient::spawn(client);
    let sessions = || {
        [&a, &b]
            .iter()
            .map(|ts| {
                sample(
                    &ts.server.encode_metrics(),
                    "session_server_total_add_websocket_session{clientkey=\"foo\",peer=\"false\"}",
                )
                .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    wait_until("a first session", || sessions() >= 1.0).await;
    // The agent's backoff is 20 ms doubling to 200 ms: a second holds a few dozen
    // attempts at most. A client redialing at once after each short session makes
    // hundreds (each a session and an AddClient/RemoveClient on every peer link).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let n = sessions();
    assert!(n < 60.0, "{n} sessions in about a second");
}

#[tokio::test]
async fn a_server_held_already_answers_409_with_its_id_and_count() {
    let (a, _b) = peered_pair(|b| b.build()).await;
    wait_until("a counts b", || a.server.replica_count() == 2).await;
    let offer = |held: &str| {
        let mut o = ConnectOptions::default()
            .with_proxy(ProxyMode::None)
            .with_extensions(Extensions::SUPPORTED);
        o.headers
            .insert("x-tunnel-id", http::HeaderValue::from_static("foo"));
        if !held.is_empty() {
            o.headers.insert(HELD_SERVERS_HEADER, held.parse().unwrap());
        }
        o
    };
    let (_ws, ext, headers) = connect_websocket_with_headers(&a.ws_url(), &offer(""))
        .await
        .unwrap();
    assert!(ext.replicas);
    assert_eq!(headers[SERVER_ID_HEADER], "a");
    assert_eq!(headers[REPLICAS_HEADER], "2");
    let refused = connect_websocket_with_headers(&a.ws_url(), &offer("x, a"))
        .await
        .map(|_| ())
        .unwrap_err();
    let ConnectError::Rejected {
        status, headers, ..
    } = refused
    else {
        panic!("{refused:?}")
    };
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers[SERVER_ID_HEADER], "a");
    assert_eq!(headers[REPLICAS_HEADER], "2");
    // Another server's id is no reason to refuse.
    connect_websocket_with_headers(&a.ws_url(), &offer("b"))
        .await
        .unwrap();
    // Nor the header from a client that does not offer the extension.
    let mut plain = offer("a");
    plain.extensions = Extensions::NONE;
    let (_ws, ext, headers) = connect_websocket_with_headers(&a.ws_url(), &plain)
        .await
        .unwrap();
    assert!(!ext.replicas);
    assert!(headers.get(SERVER_ID_HEADER).is_none() && headers.get(REPLICAS_HEADER).is_none());
}
