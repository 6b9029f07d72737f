//! Issue 27 through the real binaries: the admin API behind `--admin-auth` (agents and
//! their streams, a disconnect logged with who asked, a drain), rd-client's
//! `/admin/streams`, and the operator's rough edges: JSON lines with unique keys on both
//! streams, a completion line and counters per CONNECT and forward, start-up mistakes
//! refused with a hint, Go's durations and 1/0/yes/no booleans, giving up after refused
//! handshakes, the helpful 407, long client ids cut short, and the open-listener warnings.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rd_e2e_tests::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(20);
const EXIT_BOUND: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cret-admin";

/// One request on a fresh connection: status and body text.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("an answer")
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn admin_get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, &[("authorization", &bearer())]).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Opens a CONNECT tunnel through agent `client` to `target`; returns the socket after the
/// 200 head.
async fn connect_tunnel(proxy: SocketAddr, client: &str, target: SocketAddr) -> TcpStream {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{client}:{TOKEN}"));
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(BOUND, tcp.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp
}

/// The keys of one JSON object, in order, repeated ones included (serde_json's `Value`
/// keeps only the last of a repeated key, which is the bug this checks for).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Every line is one JSON object without a repeated key.
fn assert_json_lines(what: &str, text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Keys(keys) = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}): {line}"));
        let unique: HashSet<&String> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{what}: a key repeats: {line}");
    }
}

fn json_lines(text: &str, message: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// A TCP target that accepts and never reads: a tunnel to it stalls.
fn sink() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            held.push(c);
        }
    });
    addr
}

/// A TCP echo target.
fn echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                std::io::copy(&mut r, &mut w).ok();
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_admin_api_shows_agents_and_streams_and_disconnects_them() {
    let dir = TempDir::new("admin-api");
    let auth = dir.path().join("admin");
    std::fs::write(&auth, format!("bearer {TOKEN}\n")).unwrap();
    let admin_port = free_port();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin_listen,
            "--admin-auth",
            auth.to_str().unwrap(),
            "--log-format",
            "json",
            "--grace-period",
            "1m",
        ],
    );
    let admin: SocketAddr = admin_listen.parse().unwrap();
    let url = format!("ws://{addr}/connect");
    let (_client, client_metrics) = start_agent_with_metrics(&url, "foo");
    // Without credentials: 401, like /client.
    let (status, _) = http(admin, "GET", "/admin/agents", &[]).await;
    assert_eq!(status, 401);
    let doc = poll_doc(admin, "/admin/agents", |d| {
        d["agents"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let session = &doc["agents"][0]["sessions"][0];
    assert_eq!(doc["agents"][0]["id"], "foo");
    assert!(
        session["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{session}"
    );
    assert_eq!(session["authenticated"], "none");
    assert_eq!(session["flow_control"], "credit");

    // A flowing tunnel (echo) and a stalled one (the target never reads).
    let mut flowing = connect_tunnel(admin, "foo", echo()).await;
    flowing.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(BOUND, flowing.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let stalled_target = sink();
    let mut stalled = connect_tunnel(admin, "foo", stalled_target).await;
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        while stalled.write_all(&chunk).await.is_ok() {}
    });
    let doc = poll_doc(admin, "/admin/agents/foo", |d| {
        streams(d).iter().any(|s| {
            s["target"] == format!("tcp/{stalled_target}") && s["flow"]["paused_by_peer"] == true
        })
    })
    .await;
    let all = streams(&doc);
    assert_eq!(all.len(), 2, "{doc}");
    assert!(all.iter().all(|s| s["origin"] == "connect"), "{doc}");
    let flowing_view = all
        .iter()
        .find(|s| s["state"] == "open" && s["bytes_received"] == 4);
    assert!(flowing_view.is_some(), "{doc}");

    // The agent lists the same streams, from its side.
    let (status, body) = http(client_metrics, "GET", "/admin/streams", &[]).await;
    assert_eq!(status, 200, "{body}");
    let agent: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(agent["client_id"], "foo");
    assert_eq!(
        agent["sessions"][0]["streams"].as_array().unwrap().len(),
        2,
        "{agent}"
    );
    assert_eq!(agent["sessions"][0]["streams"][0]["origin"], "remote");

    // The operator disconnects the agent's session: its tunnels end, each with its line.
    let key = doc["sessions"][0]["id"].as_str().unwrap().to_owned();
    let (status, body) = http(
        admin,
        "DELETE",
        &format!("/admin/agents/foo?session={key}"),
        &[("authorization", &bearer())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_until("the disconnect line", BOUND, || {
        !json_lines(&server.stderr(), "agent disconnected by an operator").is_empty()
    });
    let line = &json_lines(&server.stderr(), "agent disconnected by an operator")[0];
    assert_eq!(line["client"], "foo");
    assert_eq!(line["sessions"], key.as_str());
    assert!(
        line["by"]
            .as_str()
            .unwrap()
            .starts_with("bearer #1 from 127.0.0.1:"),
        "{line}"
    );
    writer.abort();
    wait_until("the CONNECT completion lines", BOUND, || {
        json_lines(&server.stderr(), "tunnel connection").len() >= 2
    });
    for line in json_lines(&server.stderr(), "tunnel connection") {
        assert_eq!(line["origin"], "connect", "{line}");
        assert_eq!(line["client"], "foo", "{line}");
        assert_ne!(
            line["outcome"], "completed",
            "cut by the disconnect: {line}"
        );
    }

    // The agent comes back; with a tunnel held, the drain shows in the API.
    poll_doc(admin, "/admin/agents", |d| {
        d["agents"][0]["sessions"][0]["id"]
            .as_str()
            .is_some_and(|id| id != key)
    })
    .await;
    let _held = connect_tunnel(admin, "foo", sink()).await;
    server.terminate();
    let doc = poll_doc(admin, "/admin/agents", |d| d["draining"] == true).await;
    assert_eq!(doc["agents"][0]["sessions"][0]["draining"], true, "{doc}");
    assert_json_lines("rd-server stderr", &server.stderr());
    assert_json_lines("rd-server stdout", &server.stdout_lines().join("\n"));
}

fn streams(doc: &serde_json::Value) -> Vec<serde_json::Value> {
    doc["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["streams"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Polls an admin document until `accept` says yes.
async fn poll_doc(
    admin: SocketAddr,
    path: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let doc = admin_get(admin, path).await;
        if accept(&doc) {
            return doc;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path}: not accepted within {BOUND:?}: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A forwarded connection and a CONNECT each make one completion line at info (client,
/// target, origin, bytes each way, duration, outcome) and count in rd_tunnel_uses and the
/// duration histogram; every line on both streams is JSON with unique keys, the module
/// path is `module` and the dial target `target`.
#[tokio::test]
async fn forwards_and_connects_make_one_completion_line_and_count() {
    let target = echo();
    let forward = format!("127.0.0.1:0=foo:tcp/{target}");
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--forward",
            &forward,
            "--log-format",
            "json",
        ],
    );
    let forwarded = server
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "forwarding")
        .unwrap();
    let listen: SocketAddr = forwarded["listen"].as_str().unwrap().parse().unwrap();
    let url = format!("ws://{addr}/connect");
    let _client = Proc::start(
        "rd-client",
        &["-connect", &url, "-id", "foo", "--log-format", "json"],
    );
    // Until the agent is there a forwarded connection is refused (and logged as such).
    let echoed = tokio::time::timeout(BOUND, async {
        loop {
            let mut tcp = TcpStream::connect(listen).await.unwrap();
            tcp.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            if tcp.read_exact(&mut buf).await.is_ok() {
                tcp.shutdown().await.unwrap();
                let mut rest = Vec::new();
                tcp.read_to_end(&mut rest).await.ok();
                return buf;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(&echoed, b"hello");
    wait_until("the forward's completion line", BOUND, || {
        json_lines(&server.stderr(), "tunnel connection")
            .iter()
            .any(|l| l["outcome"] == "completed")
    });
    let line = json_lines(&server.stderr(), "tunnel connection")
        .into_iter()
        .find(|l| l["outcome"] == "completed")
        .unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["origin"], "forward");
    assert_eq!(line["client"], "foo");
    assert_eq!(line["target"], format!("tcp/{target}"));
    assert_eq!(line["module"], "rd_server::gateway::tunnel_use");
    assert_eq!(
        (line["bytes_sent"].as_u64(), line["bytes_received"].as_u64()),
        (Some(5), Some(5))
    );
    let ms = line["duration_ms"].as_f64().unwrap();
    assert_eq!(
        (ms * 1000.0).round() / 1000.0,
        ms,
        "at most three decimals: {ms}"
    );
    let metrics = try_get(addr, "/metrics", BOUND).await.unwrap().text();
    assert_eq!(
        sample(
            &metrics,
            "rd_tunnel_uses_total{origin=\"forward\",outcome=\"completed\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "rd_tunnel_use_seconds_count{origin=\"forward\",outcome=\"completed\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_json_lines("rd-server stderr", &server.stderr());
    assert_json_lines("rd-server stdout", &server.stdout_lines().join("\n"));
}

/// Each start-up mistake stops the binary with status 2 and a line that says what to do,
/// before any `listening on` line.
#[test]
fn start_up_mistakes_are_refused_with_a_hint() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--forward",
                "2222=foo:tcp/127.0.0.1:22",
            ],
            "did you mean \":2222\"?",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--forward",
                "127.0.0.1:0=foo:udp/127.0.0.1",
            ],
            "a tcp or udp address needs host:port",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:8123",
                "--admin-listen",
                "127.0.0.1:8123",
            ],
            "the same address as --listen",
        ),
        (
            "rd-client",
            &["--allow", "tcp:127.0.0.1"],
            "would never match",
        ),
        (
            "rd-client",
            &["--allow", "tcp:127.0.0.0/33:*"],
            "not a CIDR block",
        ),
        (
            "rd-server",
            &["--connect-wait", "soon"],
            "invalid duration \"soon\"",
        ),
        (
            "rd-client",
            &["--ping-interval=-1s"],
            "invalid duration \"-1s\"",
        ),
    ];
    for (bin, args, want) in cases {
        let (status, out, err) = run_to_end(bin, args, EXIT_BOUND);
        assert_eq!(status.code(), Some(2), "{bin} {args:?}:\n{err}");
        assert!(
            err.contains(want),
            "{bin} {args:?}: want {want:?} in:\n{err}"
        );
        assert!(!out.contains("listening on"), "{bin} {args:?}:\n{out}");
    }
    // The admin address taken by another spelling of the same port: a bind error, and
    // still no `listening on` line first.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (status, out, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &format!("127.0.0.1:{port}"),
        ],
        EXIT_BOUND,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--admin-listen"), "{err}");
    assert!(!out.contains("listening on"), "{out}");
}

/// Port 0 on both listeners asks for two free ports: they never clash, and both serve (the
/// container image test starts the server this way).
#[tokio::test]
async fn port_zero_for_both_listeners_gives_two_ports() {
    let (mut server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
    );
    let mut admin = None;
    wait_until("the admin listening line", Duration::from_secs(10), || {
        admin = server.stdout_lines().iter().find_map(|l| {
            l.strip_prefix("admin listening on http://")
                .map(String::from)
        });
        admin.is_some()
    });
    let admin: SocketAddr = admin.unwrap().parse().unwrap();
    assert_ne!(admin.port(), addr.port());
    let reply = try_get(admin, "/healthz", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    server.kill();
}

/// Go's duration forms and 1/0/yes/no booleans, on the command line and in the
/// environment, for both binaries; a CIDR allow rule admits the targets in its block.
#[tokio::test]
async fn go_durations_booleans_and_cidr_rules_are_taken() {
    let mut server = Proc::start_with(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--connect-wait",
            "1m30s",
            "--grace-period",
            "1.5s",
        ],
        &[
            ("RD_DEBUG", "1"),
            ("RD_METRICS", "yes"),
            ("RD_STREAM_IDLE_TIMEOUT", "1h"),
        ],
        false,
    );
    let addr = server.wait_listening();
    let metrics = try_get(addr, "/metrics", BOUND).await.unwrap();
    assert_eq!(metrics.status, 200, "RD_METRICS=yes serves /metrics");
    let dir = TempDir::new("cidr");
    std::fs::write(dir.path().join("a.txt"), "cidr\n").unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let url = format!("ws://{addr}/connect");
    let _client = Proc::start_with(
        "rd-client",
        &[
            "-connect",
            &url,
            "-id",
            "foo",
            "--allow",
            "tcp:127.0.0.0/8:*",
            "--backoff-max",
            "1m30s",
        ],
        &[("RD_DEBUG", "no"), ("RD_NO_HALF_CLOSE", "0")],
        false,
    );
    let reply = poll_get(
        addr,
        &format!("/client/foo/http/{target}/a.txt"),
        BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(reply.text(), "cidr\n");
    assert!(server.is_running());
    // RD_DEBUG=1 turned debug logging on (lines reach stderr through the log thread).
    wait_until("a DEBUG line", BOUND, || server.stderr().contains("DEBUG"));
}

/// `--max-auth-refusals N`: a wrong token is not retried forever; the agent exits with
/// status 3 and a line saying what to check.
#[test]
fn an_agent_gives_up_after_refused_handshakes() {
    let dir = TempDir::new("auth-refusals");
    let tokens = dir.path().join("agents");
    std::fs::write(&tokens, "foo right-token\n").unwrap();
    let (_server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--agent-tokens",
            tokens.to_str().unwrap(),
        ],
    );
    let url = format!("ws://{addr}/connect");
    let (status, _, err) = run_to_end(
        "rd-client",
        &[
            "-connect",
            &url,
            "-id",
            "foo",
            "--token",
            "wrong",
            "--max-auth-refusals",
            "2",
            "--backoff-initial",
            "10ms",
            "--backoff-max",
            "20ms",
        ],
        BOUND,
    );
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("giving up"), "{err}");
    assert!(err.contains("--agent-tokens"), "{err}");
}

/// Help and answers that said less than they should: `--admin-auth --help` names CONNECT,
/// a proxy request without a user gets CONNECT's helpful 407 (not a bare 404), a 10 KB
/// client id is cut short in the 500 body, and a non-loopback listener without
/// credentials, or a forward on one, is warned about.
#[tokio::test]
async fn help_answers_and_warnings_say_what_the_binary_does() {
    let (_, help, _) = run_to_end("rd-server", &["--help"], EXIT_BOUND);
    let admin_auth = help
        .split("--admin-auth")
        .nth(1)
        .unwrap()
        .split("\n      --")
        .next()
        .unwrap()
        .to_owned();
    assert!(
        admin_auth.contains("CONNECT") && admin_auth.contains("/admin"),
        "{admin_auth}"
    );
    for flag in [
        "--stream-idle-timeout",
        "--pending-dial-timeout",
        "--max-pending-dials",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
    let (_, help, _) = run_to_end("rd-client", &["--help"], EXIT_BOUND);
    assert!(help.contains("--max-auth-refusals") && help.contains("/admin/streams"));

    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "0.0.0.0:0",
            "--forward",
            "0.0.0.0:0=foo:tcp/127.0.0.1:22",
        ],
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", addr.port()).parse().unwrap();
    // Logged before the `listening on` line, through the log writer's own thread.
    wait_until("the forward's warning", BOUND, || {
        server.stderr().contains("this forward is open to anyone")
    });
    let err = server.stderr();
    assert!(err.contains("agents are not authenticated"), "{err}");
    assert!(
        err.contains(
            "/client, /admin, CONNECT, SOCKS5 and plain-HTTP proxy requests are open to anyone"
        ),
        "{err}"
    );
    assert!(err.contains("this forward is open to anyone"), "{err}");

    // `curl -x http://server http://host/` without a user.
    let (status, body) = http(addr, "GET", "http://127.0.0.1:9/x", &[]).await;
    assert_eq!(status, 407, "{body}");
    assert!(
        body.contains("the proxy user name is the agent's client key"),
        "{body}"
    );

    let long = "x".repeat(10_000);
    let (status, body) = http(
        addr,
        "GET",
        &format!("/client/{long}/http/127.0.0.1:9/"),
        &[],
    )
    .await;
    assert_eq!(status, 500);
    assert!(body.len() < 300, "{} bytes", body.len());
    assert!(body.contains("(10000 bytes in all)"), "{body}");
}
