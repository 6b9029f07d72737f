//! Issue 27 at the library level: the admin API's documents and disconnects, the leak
//! guards (idle timeout, pending dial timeout, pending dial bound), the clientkey series of
//! anonymous agents, and counters that reconcile under churn.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use rd_proto::Config;
use rd_server::admin::AdminApi;
use rd_server::{Body, Server, TunnelIdHeader};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn call(api: &AdminApi, method: Method, uri: &str) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    let response: http::Response<Body> = api.handle(&req, "test");
    let status = response.status();
    let body: Bytes = response.into_body().collect().await.unwrap().to_bytes();
    let doc = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, doc)
}

/// A local dialer that never completes: every dial through the agent stays pending.
fn stuck_dialer(
) -> impl Fn(&rd_proto::Target) -> std::future::Pending<std::io::Result<rd_session::BoxedIo>>
       + Send
       + Sync
       + 'static {
    |_target: &rd_proto::Target| std::future::pending()
}

#[tokio::test]
async fn agents_sessions_and_streams_are_listed_and_an_agent_disconnected() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_echo(b"hi\n").await;
    let api = AdminApi::new(ts.server.clone());

    // A flowing stream: data both ways.
    let mut flowing = ts
        .server
        .dialer("foo")
        .dial("tcp", &echo.to_string())
        .await
        .unwrap();
    flowing.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 7];
    bounded("the echo", flowing.read_exact(&mut buf))
        .await
        .unwrap();

    let (status, doc) = call(&api, Method::GET, "/admin/agents").await;
    assert_eq!(status, StatusCode::OK);
    let agents = doc["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{doc}");
    assert_eq!(agents[0]["id"], "foo");
    let session = &agents[0]["sessions"][0];
    assert!(
        session["id"].as_str().unwrap().parse::<i64>().is_ok(),
        "{session}"
    );
    assert_eq!(session["authenticated"], "none");
    assert_eq!(session["identity"], "foo");
    assert_eq!(session["flow_control"], "credit");
    assert_eq!(session["extensions"]["half_close"], true);
    assert_eq!(session["streams_open"], 1);
    assert_eq!(session["draining"], false);
    assert!(session["bytes_sent"].as_u64().unwrap() >= 4, "{session}");
    assert!(
        session["bytes_received"].as_u64().unwrap() >= 7,
        "{session}"
    );
    assert!(session["since"].as_str().unwrap().ends_with('Z'));
    assert!(
        session.get("streams").is_none(),
        "the list leaves streams out"
    );

    let (status, doc) = call(&api, Method::GET, "/admin/agents/foo").await;
    assert_eq!(status, StatusCode::OK);
    let streams = doc["sessions"][0]["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{doc}");
    let s = &streams[0];
    assert_eq!(s["origin"], "library");
    assert_eq!(s["target"], format!("tcp/{echo}"));
    assert_eq!(s["state"], "open");
    assert_eq!(
        (s["bytes_sent"].as_u64(), s["bytes_received"].as_u64()),
        (Some(4), Some(7))
    );
    assert_eq!(s["flow"]["mode"], "credit");
    assert_eq!(s["flow"]["paused_by_peer"], false);
    assert!(s["last_heard_seconds_ago"].is_number(), "{s}");

    let (status, doc) = call(&api, Method::GET, "/admin/agents/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(doc["error"], "no agent nobody on this server");
    let (status, _) = call(&api, Method::DELETE, "/admin/agents/foo?session=1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no such session");
    let (status, _) = call(&api, Method::POST, "/admin/agents").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    let key = session["id"].as_str().unwrap().to_owned();
    let (status, doc) = call(
        &api,
        Method::DELETE,
        &format!("/admin/agents/foo?session={key}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["closed"][0], key);
    // The stream the session carried ends with it.
    let err = bounded("the stream ends", flowing.read(&mut buf)).await;
    assert!(err.is_err() || err.unwrap() == 0);
}

#[tokio::test]
async fn a_stalled_stream_shows_paused_and_a_pending_dial_shows_dialing() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    // Targets: one that accepts and never reads, and a dialer stuck on another.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = sink.accept().await {
            held.push(tcp);
        }
    });
    let stuck_port = closed_port();
    let agent = agent(&ts.ws_url(), "foo")
        .local_dialer(move |t: &rd_proto::Target| {
            let stuck = t.address().ends_with(&format!(":{stuck_port}"));
            let addr = t.address().to_owned();
            async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok(Box::new(tcp) as rd_session::BoxedIo)
            }
        })
        .build();
    let _agent = RunningClient::spawn(agent);
    let server = ts.server.clone();
    wait_until("the session", || server.has_session("foo")).await;
    let api = AdminApi::new(ts.server.clone());

    let _pending = ts
        .server
        .dialer("foo")
        .dial("tcp", &format!("127.0.0.1:{stuck_port}"))
        .await
        .unwrap();
    let mut stalled = ts
        .server
        .dialer("foo")
        .dial("tcp", &sink_addr.to_string())
        .await
        .unwrap();
    // Write until the agent stops granting credit (its target reads nothing).
    let chunk = vec![7u8; 64 * 1024];
    let writer = tokio::spawn(async move {
        loop {
            if stalled.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let paused = |doc: &Value| {
        doc["sessions"][0]["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["flow"]["paused_by_peer"] == true && s["target"] == format!("tcp/{sink_addr}")
            })
    };
    // Polled: the pause comes once the agent's socket buffers are full.
    let doc = bounded("the stalled stream to be paused by the peer", async {
        loop {
            let doc = call(&api, Method::GET, "/admin/agents/foo").await.1;
            if paused(&doc) {
                return doc;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let streams = doc["sessions"][0]["streams"].as_array().unwrap();
    let dialing = streams
        .iter()
        .find(|s| s["target"] == format!("tcp/127.0.0.1:{stuck_port}"))
        .unwrap();
    assert_eq!(dialing["state"], "dialing", "{dialing}");
    assert!(dialing["last_heard_seconds_ago"].is_null());
    assert_eq!(doc["sessions"][0]["pending_dials"], 1);
    let stalled = streams
        .iter()
        .find(|s| s["target"] == format!("tcp/{sink_addr}"))
        .unwrap();
    assert_eq!(stalled["flow"]["send_credit"], 0, "{stalled}");
    assert!(
        stalled["flow"]["queued_bytes"].as_u64().unwrap() > 0,
        "{stalled}"
    );
    writer.abort();
}

#[tokio::test]
async fn the_idle_timeout_closes_a_silent_stream_and_counts_it() {
    let server = Server::builder(TunnelIdHeader)
        .stream_idle_timeout(Some(Duration::from_millis(300)))
        .build();
    let ts = serve(server).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_echo(b"").await;
    let mut stream = ts
        .server
        .dialer("foo")
        .dial("tcp", &echo.to_string())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let err = bounded("the idle timeout", stream.read(&mut buf))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("idle timeout"), "{err}");
    let metrics = ts.server.encode_metrics();
    assert_eq!(
        sample(&metrics, "rd_streams_expired_total{guard=\"idle_timeout\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn pending_dials_are_bounded_and_timed_out() {
    let mut config = Config::default();
    config.max_pending_dials = 2;
    let server = Server::builder(TunnelIdHeader)
        .session_config(config)
        .pending_dial_timeout(Some(Duration::from_millis(300)))
        .build();
    let ts = serve(server).await;
    let _agent = RunningClient::spawn(
        agent(&ts.ws_url(), "foo")
            .local_dialer(stuck_dialer())
            .build(),
    );
    let s = ts.server.clone();
    wait_until("the session", || s.has_session("foo")).await;
    let dialer = ts.server.dialer("foo");
    let mut first = dialer.dial("tcp", "127.0.0.1:1").await.unwrap();
    let _second = dialer.dial("tcp", "127.0.0.1:2").await.unwrap();
    let refused = dialer.dial("tcp", "127.0.0.1:3").await.unwrap_err();
    assert!(
        refused.to_string().contains("too many dials pending"),
        "{refused}"
    );
    let mut buf = [0u8; 1];
    let err = bounded("the pending dial timeout", first.read(&mut buf))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("dial timeout"), "{err}");
    let metrics = ts.server.encode_metrics();
    assert_eq!(
        sample(
            &metrics,
            "rd_dials_refused_total{reason=\"max_pending_dials\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "rd_streams_expired_total{guard=\"pending_dial_timeout\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

/// Sessions and streams opened minus closed equal the gauges at every scrape while agents
/// come and go and streams open and close, and everything is back to zero after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_reconcile_under_churn_and_anonymous_series_go() {
    // As rd-server without --agent-tokens.
    let metrics = rd_server::Metrics::new().transient_client_keys(true);
    let ts = serve(Server::builder(TunnelIdHeader).metrics(metrics).build()).await;
    let echo = spawn_echo(b"").await;
    let check = |text: &str| {
        let get = |name: &str| sample(text, name).unwrap_or(0.0);
        assert_eq!(
            get("rd_sessions_opened_total") - get("rd_sessions_closed_total"),
            get("rd_sessions"),
            "{text}"
        );
        assert_eq!(
            get("rd_streams_opened_total") - get("rd_streams_closed_total"),
            get("rd_streams"),
            "{text}"
        );
    };
    for round in 0..10 {
        let id = format!("anon-{round}");
        let agent = connected_agent(&ts, &id).await;
        let dials = (0..5).map(|_| {
            let server = ts.server.clone();
            let id = id.clone();
            async move {
                let text = echo_through(&server, &id, echo, 0).await;
                assert_eq!(text, "ping");
            }
        });
        let scrapes = async {
            for _ in 0..5 {
                check(&ts.server.encode_metrics());
                tokio::task::yield_now().await;
            }
        };
        tokio::join!(futures_util::future::join_all(dials), scrapes);
        agent.stop().await;
    }
    let server = ts.server.clone();
    wait_until("every session and stream to end", || {
        let text = server.encode_metrics();
        sample(&text, "rd_sessions") == Some(0.0) && sample(&text, "rd_streams") == Some(0.0)
    })
    .await;
    let text = ts.server.encode_metrics();
    check(&text);
    assert_eq!(
        sample(&text, "rd_sessions_opened_total"),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rd_streams_opened_total"),
        Some(50.0),
        "{text}"
    );
    assert!(
        !text.contains("clientkey=\"anon-"),
        "the series of ended anonymous agents are gone:\n{text}"
    );
    let (_, doc) = call(
        &AdminApi::new(ts.server.clone()),
        Method::GET,
        "/admin/agents",
    )
    .await;
    assert_eq!(doc["agents"].as_array().unwrap().len(), 0, "{doc}");
}
