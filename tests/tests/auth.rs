//! Agent authentication (issue 12): rd-server --agent-tokens and rd-client --token.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rd_e2e_tests::*;

const SECRET: &str = "s3cret-agent-token-4711";
const PEER_SECRET: &str = "peer-secret-0815";

/// Starts rd-server with `--agent-tokens FILE` (and a peer token, to check it stays secret).
fn server_with_tokens(file: &std::path::Path) -> (Proc, SocketAddr) {
    Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-debug",
            "--agent-tokens",
            file.to_str().unwrap(),
            "-id",
            "first",
            "--token",
            PEER_SECRET,
        ],
    )
}

fn agent(addr: SocketAddr, id: &str, token: Option<&str>) -> Proc {
    let url = format!("ws://{addr}/connect");
    let mut args = vec!["-connect", &url, "-id", id, "-debug"];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    Proc::start("rd-client", &args)
}

/// Until `id` is routable: a request to a closed port gets the agent's 502, not the 500.
async fn wait_routable(addr: SocketAddr, id: &str) {
    let closed = free_port();
    poll_get(
        addr,
        &format!("/client/{id}/http/127.0.0.1:{closed}/"),
        START_BOUND,
        |r| r.status == 502,
    )
    .await;
}

fn rejections(server: &Proc) -> Vec<String> {
    server
        .stderr()
        .lines()
        .filter(|l| l.contains("tunnel handshake rejected"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn tokens_right_wrong_missing_impostor_and_reload() {
    let dir = TempDir::new("auth");
    let file = dir.path().join("agents");
    std::fs::write(&file, format!("# id token\nfoo {SECRET}\n")).unwrap();
    let (mut server, addr) = server_with_tokens(&file);

    // Right token: routable.
    let mut good = agent(addr, "foo", Some(SECRET));
    wait_routable(addr, "foo").await;

    // Missing and wrong tokens: refused with 401, logged with the claimed id, never a token.
    let mut missing = agent(addr, "bar", None);
    let mut wrong = agent(addr, "baz", Some("not-the-token"));
    wait_until("two refusals", START_BOUND, || {
        rejections(&server).len() >= 2
    });
    for p in [&mut missing, &mut wrong] {
        wait_until("the refused agent to report 401", START_BOUND, || {
            p.stderr().contains("401")
        });
    }
    let lines = rejections(&server).join("\n");
    assert!(
        lines.contains("claimed_id=\"bar\"") && lines.contains("claimed_id=\"baz\""),
        "{lines}"
    );
    assert!(
        lines.contains("status=401") && lines.contains("remote=127.0.0.1:"),
        "{lines}"
    );

    // An impostor with a connected agent's id but a wrong token is refused, and the real
    // agent keeps its session.
    let mut impostor = agent(addr, "foo", Some("guess"));
    wait_until("the impostor's refusal", START_BOUND, || {
        rejections(&server)
            .iter()
            .any(|l| l.contains("claimed_id=\"foo\""))
    });
    impostor.kill();
    wait_routable(addr, "foo").await;
    assert!(good.is_running());

    // Reload on SIGHUP: bar's token becomes valid; bar (still redialing) gets in.
    std::fs::write(&file, format!("foo {SECRET}\nbar fresh-token\n")).unwrap();
    missing.kill();
    let _bar = agent(addr, "bar", Some("fresh-token"));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_routable(addr, "bar").await;
    assert!(server.is_running(), "SIGHUP must reload, not stop");

    // Secrets never appear in logs, even at debug level with the wire dump on.
    good.terminate();
    good.wait_exit(Duration::from_secs(5));
    wrong.kill();
    server.terminate();
    server.wait_exit(Duration::from_secs(10));
    for (name, text) in [
        ("rd-server", server.stderr()),
        ("rd-client", good.stderr()),
        ("rd-client (wrong)", wrong.stderr()),
    ] {
        for secret in [SECRET, PEER_SECRET, "fresh-token"] {
            assert!(!text.contains(secret), "{name} logged a secret:\n{text}");
        }
    }
}

/// Without --agent-tokens nothing changes: the seed's loopback walk-through works with no
/// flags (any X-Tunnel-ID is accepted) and no warning is given on loopback.
#[tokio::test]
async fn without_tokens_the_loopback_walkthrough_still_works() {
    let (server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = agent(addr, "foo", None);
    wait_routable(addr, "foo").await;
    assert!(
        !server.stderr().contains("not authenticated"),
        "{}",
        server.stderr()
    );
}

/// A malformed token file stops rd-server at start-up, naming the line and not the token.
#[test]
fn a_malformed_token_file_fails_at_start_up() {
    let dir = TempDir::new("auth-bad");
    let file = dir.path().join("agents");
    std::fs::write(&file, format!("foo {SECRET} extra\n")).unwrap();
    let (status, _, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--agent-tokens",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--agent-tokens") && err.contains("line 1"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");
}

/// The token file is also reloaded when it changes, without a signal.
#[tokio::test]
async fn a_changed_token_file_is_reloaded() {
    let dir = TempDir::new("auth-reload");
    let file = dir.path().join("agents");
    std::fs::write(&file, "# nobody yet\n").unwrap();
    let (server, addr) = server_with_tokens(&file);
    let _late = agent(addr, "late", Some("late-token"));
    wait_until("the first refusal", START_BOUND, || {
        !rejections(&server).is_empty()
    });
    std::fs::write(&file, "late late-token\n").unwrap();
    wait_routable(addr, "late").await;
    assert!(
        server.stderr().contains("agent tokens reloaded"),
        "{}",
        server.stderr()
    );
}

/// `GET path` over HTTP/1.0 with an optional `Authorization` value; status and body.
async fn raw_get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(START_BOUND, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `--admin-listen`: /client, /metrics and /healthz move to their own listener (and /client
/// wants the credentials of `--admin-auth`); the agents' port serves only /connect.
#[tokio::test]
async fn admin_listener_is_separate_and_guarded() {
    let dir = TempDir::new("auth-admin");
    std::fs::write(dir.path().join("a.txt"), "hello\n").unwrap();
    let creds = dir.path().join("admin");
    std::fs::write(&creds, "bearer adm1n-t0ken\n").unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin.to_string(),
            "--admin-auth",
            creds.to_str().unwrap(),
        ],
    );
    let _client = agent(addr, "foo", None);
    let path = format!("/client/foo/http/{target}/a.txt");
    // The agents' port: the tunnel works (the client registers), nothing else is served.
    wait_until("the agent's session", START_BOUND, || {
        server
            .stderr()
            .contains("Handling backend connection request [foo]")
    });
    for p in [path.as_str(), "/metrics", "/healthz"] {
        assert_eq!(
            raw_get(addr, p, Some("Bearer adm1n-t0ken")).await.0,
            404,
            "{p}"
        );
    }
    // The admin port: no tunnel endpoint, /client only with credentials.
    assert_eq!(raw_get(admin, "/connect", None).await.0, 404);
    assert_eq!(raw_get(admin, &path, None).await.0, 401);
    assert_eq!(raw_get(admin, &path, Some("Bearer wrong")).await.0, 401);
    let (status, body) = raw_get(admin, &path, Some("Bearer adm1n-t0ken")).await;
    assert_eq!((status, body.as_str()), (200, "hello\n"));
    assert_eq!(raw_get(admin, "/healthz", None).await.0, 200);
    assert_eq!(raw_get(admin, "/metrics", None).await.0, 200);
    assert!(!server.stderr().contains("adm1n-t0ken"));
}

/// Peered servers and an agent, all at `-debug` (wire dump on), moving a request whose
/// body holds a secret: neither the peer token nor the payload appears in any log.
#[tokio::test]
async fn peer_token_and_payloads_stay_out_of_debug_logs() {
    const PAYLOAD_SECRET: &str = "payload-secret-31337";
    let dir = TempDir::new("auth-peers");
    std::fs::write(dir.path().join("s.txt"), format!("{PAYLOAD_SECRET}\n")).unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let (p1, p2) = (free_port(), free_port());
    let peer = |id: &str, port: u16, other: &str, other_port: u16| {
        let listen = format!("127.0.0.1:{port}");
        let peers = format!("{other}:{PEER_SECRET}:ws://127.0.0.1:{other_port}/connect");
        Proc::start_listening(
            "rd-server",
            &[
                "-debug",
                "-listen",
                &listen,
                "-id",
                id,
                "-token",
                PEER_SECRET,
                "-peers",
                &peers,
            ],
        )
    };
    let (first, first_addr) = peer("first", p1, "second", p2);
    let (second, second_addr) = peer("second", p2, "first", p1);
    let client = agent(first_addr, "foo", None);
    // Through the peer link: both servers and the agent carry the request.
    let reply = poll_get(
        second_addr,
        &format!("/client/foo/http/{target}/s.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(reply.text(), format!("{PAYLOAD_SECRET}\n"));
    for (name, p) in [("first", &first), ("second", &second), ("agent", &client)] {
        let text = p.stderr();
        assert!(
            text.contains("rd_proto::wire"),
            "{name}: no wire dump:\n{text}"
        );
        for secret in [PEER_SECRET, PAYLOAD_SECRET] {
            assert!(!text.contains(secret), "{name} logged {secret}:\n{text}");
        }
    }
}

/// `RD_WIRE_PAYLOADS=true` beside `-debug` is the one way payloads reach a log: the agent
/// then logs the request and the answer byte for byte.
#[tokio::test]
async fn payloads_are_logged_only_with_the_explicit_switch() {
    const PAYLOAD_SECRET: &str = "payload-secret-4242";
    let dir = TempDir::new("auth-payloads");
    std::fs::write(dir.path().join("s.txt"), format!("{PAYLOAD_SECRET}\n")).unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let (_server, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let connect = format!("ws://{server}/connect");
    let client = Proc::start_with(
        "rd-client",
        &["-debug", "-connect", &connect, "-id", "foo"],
        &[("RD_WIRE_PAYLOADS", "true")],
        false,
    );
    let reply = poll_get(
        server,
        &format!("/client/foo/http/{target}/s.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(reply.text(), format!("{PAYLOAD_SECRET}\n"));
    let deadline = std::time::Instant::now() + START_BOUND;
    while !client.stderr().contains(PAYLOAD_SECRET) {
        assert!(
            std::time::Instant::now() < deadline,
            "RD_WIRE_PAYLOADS=true logged no payload:\n{}",
            client.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(client.stderr().contains("rd_proto::payload"));
}
