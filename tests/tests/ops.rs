//! Operability of the binaries (issue 11): start-up checks, environment variables, a closed
//! stderr, and what the logs say.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rd_e2e_tests::*;

/// Bound for a process that should exit on its own: the checks take milliseconds, the bound
/// only separates "exited" from "kept retrying" on a loaded machine.
const EXIT_BOUND: Duration = Duration::from_secs(5);

/// Each configuration mistake that cannot fix itself stops the binary with status 2 and one
/// line that names the flag (or variable) at fault, instead of a service retrying forever.
#[test]
fn configuration_mistakes_exit_at_once_naming_the_flag() {
    let dir = TempDir::new("ops-config");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let cases: &[(&str, &[&str], &[(&str, &str)], &str)] = &[
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
