//! Operability of the binaries (issue 11): start-up checks, environment variables, a closed
//! stderr, and what the logs say.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rd_e2e_tests::*;

/// Bound for a process that should exit on its own: the checks take milliseconds, the bound
/// only separates "exited" from "kept retrying" on a loaded machine.
const EXIT_BOUND: Duration = Duration::from_secs(5);

/// A binary, its arguments, extra environment variables and what its one line must say.
type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// Each configuration mistake that cannot fix itself stops the binary with status 2 and one
/// line that names the flag (or variable) at fault, instead of a service retrying forever.
#[test]
fn configuration_mistakes_exit_at_once_naming_the_flag() {
    let dir = TempDir::new("ops-config");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let cases: &[Case<'_>] = &[
        (
            "rd-client",
            &["-connect", "localhost:8123/connect"],
            &[],
            "--connect",
        ),
        (
            "rd-client",
            &["-connect", "ftp://localhost:8123/connect"],
            &[],
            "--connect",
        ),
        (
            "rd-client",
            &["--ca-cert", "/nonexistent/ca.pem"],
            &[],
            "--ca-cert /nonexistent/ca.pem",
        ),
        ("rd-client", &["--ca-cert", not_pem], &[], "--ca-cert"),
        ("rd-client", &["-id", ""], &[], "--id"),
        ("rd-client", &["-id", "bad\nid"], &[], "--id"),
        ("rd-client", &[], &[("HTTP_PROXY", "::bad")], "HTTP_PROXY"),
        (
            "rd-client",
            &["--metrics-listen", "9100"],
            &[],
            "did you mean \":9100\"?",
        ),
        (
            "rd-server",
            &["-listen", "8123"],
            &[],
            "--listen \"8123\": not an address; did you mean \":8123\"?",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "-id",
                "a",
                "-token",
                "t",
                "-peers",
                "b:t:localhost:1/connect",
            ],
            &[],
            "--peers: peer \"b\"",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--peer-ca-cert",
                "/nonexistent/ca.pem",
            ],
            &[],
            "--peer-ca-cert",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ],
            &[],
            "--tls-cert",
        ),
        (
            "rd-server",
            &[],
            &[("RD_LISTEN", "8123")],
            "--listen \"8123\"",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--token-file",
                "/nonexistent/token",
            ],
            &[],
            "--token-file /nonexistent/token",
        ),
        (
            "rd-server",
            &[
                "-listen",
                "127.0.0.1:0",
                "--agent-tokens",
                "/nonexistent/agents",
            ],
            &[],
            "--agent-tokens",
        ),
        (
            "rd-client",
            &["--token-file", "/nonexistent/token"],
            &[],
            "--token-file /nonexistent/token",
        ),
    ];
    for (bin, args, env, want) in cases {
        let mut p = Proc::start_with(bin, args, env, false);
        let status = p.wait_exit(EXIT_BOUND);
        let err = p.stderr();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{bin} {args:?} {env:?} did not exit with 2 within {EXIT_BOUND:?}:\n{err}"
        );
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{bin} {args:?}: one line wanted:\n{err}");
        assert!(lines[0].starts_with(&format!("{bin}: ")), "{err}");
        assert!(
            lines[0].contains(want),
            "{bin} {args:?}: want {want:?} in:\n{err}"
        );
    }
}

#[test]
fn secrets_are_not_echoed_in_errors_or_help() {
    let (status, _, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-id",
            "a",
            "-token",
            "t",
            "-peers",
            "b:s3cret:nourl",
        ],
        EXIT_BOUND,
    );
    assert!(!status.success());
    assert!(!err.contains("s3cret"), "{err}");
    let mut p = Proc::start_with("rd-server", &["--help"], &[("RD_TOKEN", "s3cret")], false);
    assert!(p.wait_exit(EXIT_BOUND).is_some_and(|s| s.success()));
}

#[test]
fn flags_come_from_the_environment_and_version_names_the_commit() {
    let mut server = Proc::start_with("rd-server", &[], &[("RD_LISTEN", "127.0.0.1:0")], false);
    let addr = server.wait_listening();
    assert!(addr.ip().is_loopback());
    let (status, out, _) = run_to_end("rd-server", &["--version"], EXIT_BOUND);
    assert!(status.success());
    assert!(
        out.starts_with("rd-server 0.") && out.contains("(commit "),
        "{out}"
    );
    let (_, help, _) = run_to_end("rd-client", &["--help"], EXIT_BOUND);
    for var in [
        "RD_CONNECT",
        "RD_CLIENT_ID",
        "RD_LOG_FORMAT",
        "RD_METRICS_LISTEN",
    ] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    assert!(!help.contains("The rd-client binary"), "{help}");
    let dir = TempDir::new("ops-env-dummy");
    let mut dummy = Proc::start_with(
        "rd-dummy",
        &[],
        &[
            ("RD_DUMMY_LISTEN", "127.0.0.1:0"),
            ("RD_DUMMY_DIR", dir.path().to_str().unwrap()),
        ],
        false,
    );
    assert!(dummy.wait_listening().ip().is_loopback());
}

/// Waits until rd-server routes to client `foo`: a tunnel request to a closed port gets the
/// client's 502 instead of the server's 500 for an unknown client.
async fn wait_for_client(server: std::net::SocketAddr) {
    let closed = free_port();
    poll_get(
        server,
        &format!("/client/foo/http/127.0.0.1:{closed}/"),
        START_BOUND,
        |r| r.status == 502,
    )
    .await;
}

/// A log reader that goes away must not stop signals: rd-client still exits on SIGTERM.
#[tokio::test]
async fn client_with_a_closed_stderr_still_exits_on_sigterm() {
    let (_server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let url = format!("ws://{addr}/connect");
    let mut client = Proc::start_with("rd-client", &["-connect", &url, "-id", "foo"], &[], true);
    wait_for_client(addr).await;
    // More lines to write into the broken pipe: a refused dial logs on both sides.
    wait_for_client(addr).await;
    assert!(client.is_running(), "rd-client died with its stderr closed");
    client.terminate();
    let status = client.wait_exit(Duration::from_secs(2));
    assert!(
        status.is_some_and(|s| s.success()),
        "rd-client did not exit cleanly within 2 s of SIGTERM: {status:?}"
    );
}

/// rd-server whose log reader went away keeps registering sessions and serving requests.
#[tokio::test]
async fn server_with_a_closed_stderr_still_serves() {
    let dir = TempDir::new("ops-stderr");
    std::fs::write(dir.path().join("a.txt"), "hello\n").unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let mut server = Proc::start_with("rd-server", &["-listen", "127.0.0.1:0"], &[], true);
    let addr = server.wait_listening();
    let url = format!("ws://{addr}/connect");
    let _client = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    let reply = poll_get(
        addr,
        &format!("/client/foo/http/{target}/a.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(reply.text(), "hello\n");
    assert!(server.is_running());
}

/// The JSON log lines of rd-server's stderr whose `message` is `message`.
fn json_lines(stderr: &str, message: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .filter(|v| v["message"] == message)
        .collect()
}

/// Waits until `p`'s stderr has `n` JSON lines with `message`; returns them.
fn wait_json_lines(p: &Proc, message: &str, n: usize) -> Vec<serde_json::Value> {
    wait_until(&format!("{n} {message:?} lines"), START_BOUND, || {
        json_lines(&p.stderr(), message).len() >= n
    });
    json_lines(&p.stderr(), message)
}

/// With `--log-format json` every line parses, and the request lines carry their fields: a
/// refused target, an unknown client and a rejected agent each make exactly one line with
/// the reason; a completed transfer says so with its byte count. The 502 body is Go's text.
#[tokio::test]
async fn request_and_rejection_lines_in_json() {
    let dir = TempDir::new("ops-json");
    std::fs::write(dir.path().join("a.txt"), "hello\n").unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "--log-format", "json"],
    );
    let url = format!("ws://{addr}/connect");
    let _client = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    poll_get(
        addr,
        &format!("/client/foo/http/{target}/a.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    let ok = wait_until_outcome(&server, "completed");
    assert_eq!(ok["outcome"], "completed", "{ok}");
    assert_eq!(ok["client"], "foo");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["url"], format!("http://{target}/a.txt"));
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["bytes_received"], 6);
    assert_eq!(ok["bytes_sent"], 0);
    assert!(ok["session"].is_i64() && ok["stream"].is_i64(), "{ok}");
    assert!(ok["duration_ms"].is_f64(), "{ok}");
    assert!(ok["timestamp"].is_string() && ok["level"] == "INFO", "{ok}");

    // A refused target: 502 with Go's dial error, and one line saying why.
    let closed = free_port();
    let reply = try_get(
        addr,
        &format!("/client/foo/http/127.0.0.1:{closed}/"),
        START_BOUND,
    )
    .await
    .unwrap();
    let go_text = format!("dial tcp 127.0.0.1:{closed}: connect: connection refused\n");
    assert_eq!((reply.status, reply.text()), (502, go_text.clone()));
    wait_until_outcome(&server, "refused");
    let lines = json_lines(&server.stderr(), "tunnel request");
    let refused: Vec<_> = lines.iter().filter(|l| l["outcome"] == "refused").collect();
    assert_eq!(refused.len(), 1, "{lines:?}");
    assert_eq!(refused[0]["reason"], go_text.trim_end());
    assert_eq!(refused[0]["status"], 502);

    // An unknown client: 500, one line.
    let reply = try_get(addr, "/client/nobody/http/127.0.0.1:1/", START_BOUND)
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.text()),
        (500, "failed to find Session for client nobody\n".to_owned())
    );
    wait_until("the unknown client's line", START_BOUND, || {
        json_lines(&server.stderr(), "tunnel request")
            .iter()
            .any(|l| l["client"] == "nobody")
    });
    let lines = json_lines(&server.stderr(), "tunnel request");
    let rejected: Vec<_> = lines.iter().filter(|l| l["client"] == "nobody").collect();
    assert_eq!(rejected.len(), 1, "{lines:?}");
    assert_eq!(rejected[0]["outcome"], "rejected");
    assert_eq!(
        rejected[0]["reason"],
        "failed to find Session for client nobody"
    );

    // A rejected agent (no id): 401 on the wire, one line with the reason and address.
    let mut ws = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ws.write_all(
        b"GET /connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: 1z1yQIVmVC0jLv/0IZkOtg==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 12];
    ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    let rejected = wait_json_lines(&server, "tunnel handshake rejected", 1);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["status"], 401);
    assert_eq!(rejected[0]["reason"], "the authorizer refused the client");
    let local = ws.local_addr().unwrap().to_string();
    assert_eq!(rejected[0]["remote"], local);
    // The handshake refusal is not also counted as a tunnel request.
    assert_eq!(
        json_lines(&server.stderr(), "tunnel request").len(),
        lines.len()
    );
}

/// A transfer the client's side cuts in the middle is logged as cut, not completed.
#[tokio::test]
async fn a_cut_transfer_is_logged_as_cut() {
    // A target that promises 1 MiB, sends a little and then resets the connection.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in target.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ =
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\npartial body");
            let _ = conn.flush();
            // Dropping it mid-body: the server sees the stream end early.
        }
    });
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "--log-format", "json"],
    );
    let url = format!("ws://{addr}/connect");
    let _client = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    wait_for_client(addr).await;
    let r = try_get(
        addr,
        &format!("/client/foo/http/{target_addr}/big"),
        START_BOUND,
    )
    .await;
    assert!(r.is_err(), "a cut body must not read as complete: {r:?}");
    let lines = wait_until_outcome(&server, "cut");
    assert_eq!(lines["status"], 200);
    assert_eq!(lines["url"], format!("http://{target_addr}/big"));
    assert!(lines["reason"].is_string(), "{lines}");
}

fn wait_until_outcome(p: &Proc, outcome: &str) -> serde_json::Value {
    wait_until(&format!("a {outcome} line"), START_BOUND, || {
        json_lines(&p.stderr(), "tunnel request")
            .iter()
            .any(|l| l["outcome"] == outcome)
    });
    json_lines(&p.stderr(), "tunnel request")
        .into_iter()
        .find(|l| l["outcome"] == outcome)
        .unwrap()
}

/// rd-client's `--metrics-listen`: /readyz and /healthz follow the sessions (503 without one,
/// 200 with one), /livez answers all along, /metrics counts sessions, reconnects, streams and
/// bytes, and the sessions held by server id; both binaries export `process_*` and the build
/// info.
#[tokio::test]
async fn client_metrics_and_health_follow_the_session() {
    let dir = TempDir::new("ops-metrics");
    std::fs::write(dir.path().join("a.txt"), "hello\n").unwrap();
    let (_dummy, target) = start_dummy(dir.path());
    // The client starts first, against a server that is not there yet.
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/connect");
    let (_client, metrics) = start_agent_with_metrics(&url, "foo");
    let down = poll_get(metrics, "/healthz", START_BOUND, |_| true).await;
    assert_eq!(down.status, 503, "{}", down.text());
    let down = try_get(metrics, "/readyz", START_BOUND).await.unwrap();
    assert_eq!(down.status, 503, "{}", down.text());
    let live = try_get(metrics, "/livez", START_BOUND).await.unwrap();
    assert_eq!((live.status, live.text().as_str()), (200, "ok\n"));
    poll_get(metrics, "/metrics", START_BOUND, |r| {
        sample(&r.text(), "rd_client_reconnects_total").is_some_and(|n| n >= 1.0)
    })
    .await;

    let listen = format!("127.0.0.1:{port}");
    let (_server, addr) = Proc::start_listening("rd-server", &["-listen", &listen]);
    let up = poll_get(metrics, "/healthz", START_BOUND, |r| r.status == 200).await;
    assert_eq!(up.text(), "ok: 1 session(s) up\n");
    let up = try_get(metrics, "/readyz", START_BOUND).await.unwrap();
    assert_eq!(
        (up.status, up.text().as_str()),
        (200, "ok: 1 session(s) up\n")
    );
    let reply = poll_get(
        addr,
        &format!("/client/foo/http/{target}/a.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(reply.text(), "hello\n");
    let text = poll_get(metrics, "/metrics", START_BOUND, |r| {
        sample(&r.text(), "rd_client_streams_opened_total").is_some_and(|n| n >= 1.0)
    })
    .await
    .text();
    assert_eq!(sample(&text, "rd_client_session_up"), Some(1.0), "{text}");
    // A server without a peer id gives none: one session, under the empty id.
    assert_eq!(
        sample(
            &text,
            "rd_client_server_sessions{server_id=\"\",going_away=\"false\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rd_client_sessions_total"),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "rd_client_transmit_bytes_total").unwrap() > 6.0,
        "{text}"
    );
    assert!(
        sample(&text, "rd_client_receive_bytes_total").unwrap() > 0.0,
        "{text}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(sample(&text, name).is_some(), "{name} missing:\n{text}");
    }
    assert!(text.contains("rd_build_info{version=\""), "{text}");

    let server_text = try_get(addr, "/metrics", START_BOUND).await.unwrap().text();
    assert!(
        sample(&server_text, "process_resident_memory_bytes").is_some(),
        "{server_text}"
    );
    assert!(
        server_text.contains("rd_build_info{version=\""),
        "{server_text}"
    );
    let health = try_get(addr, "/healthz", START_BOUND).await.unwrap();
    assert_eq!((health.status, health.text()), (200, "ok\n".to_owned()));
}

/// rd-client's JSON lines parse and each carries the agent's id in its span list.
#[test]
fn client_json_lines_carry_the_agent_id() {
    let url = format!("ws://127.0.0.1:{}/connect", free_port());
    let client = Proc::start(
        "rd-client",
        &["-connect", &url, "-id", "agent-7", "--log-format", "json"],
    );
    let lines = wait_json_lines(&client, "redialing", 1);
    assert!(!lines.is_empty());
    for line in client.stderr().lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if v["module"]
            .as_str()
            .is_some_and(|t| t.starts_with("rd_client::client"))
        {
            let spans = v["spans"]
                .as_array()
                .unwrap_or_else(|| panic!("no spans: {line}"));
            assert_eq!(spans[0]["client_id"], "agent-7", "{line}");
        }
    }
}

/// Started with stderr closed outright (`2>&-`, no pipe at all): the first socket must not
/// become fd 2 and receive log lines; the client connects, serves and exits on SIGTERM.
#[tokio::test]
async fn client_started_with_fd_2_closed_works_and_exits_on_sigterm() {
    let (_server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let bin = bin("rd-client");
    let script = format!(
        "exec '{}' -connect ws://{addr}/connect -id foo 2>&-",
        bin.display()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_client(addr).await;
    wait_for_client(addr).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let exited = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() >= deadline {
            child.kill().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
}
