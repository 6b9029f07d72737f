//! Command lines of the binaries: help, bad flags, bad peers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rd_e2e_tests::*;

const BOUND: Duration = Duration::from_secs(15);

#[test]
fn server_help_lists_the_flags() {
    let (status, out, err) = run_to_end("rd-server", &["--help"], BOUND);
    assert!(status.success(), "{status}\n{err}");
    for flag in [
        "--listen",
        "--id",
        "--token",
        "--peers",
        "--debug",
        "--tls-cert",
        "--tls-key",
        "--agent-ca",
        "--metrics",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
    // Go-style single-dash help works too.
    let (status, out, _) = run_to_end("rd-server", &["-help"], BOUND);
    assert!(status.success());
    assert!(out.contains("--listen"));
}

#[test]
fn client_help_lists_the_flags() {
    let (status, out, err) = run_to_end("rd-client", &["--help"], BOUND);
    assert!(status.success(), "{status}\n{err}");
    for flag in [
        "--connect",
        "--id",
        "--debug",
        "--once",
        "--header",
        "--allow",
        "--ca-cert",
        "--insecure-skip-verify",
        "--cert",
        "--key",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
}

#[test]
fn dummy_help_lists_the_flags() {
    let (status, out, err) = run_to_end("rd-dummy", &["--help"], BOUND);
    assert!(status.success(), "{status}\n{err}");
    assert!(out.contains("--listen") && out.contains("--dir"), "{out}");
}

#[test]
fn unknown_flags_fail_clearly() {
    for bin in ["rd-server", "rd-client", "rd-dummy"] {
        let (status, out, err) = run_to_end(bin, &["--bogus"], BOUND);
        assert!(!status.success(), "{bin} accepted --bogus:\n{out}");
        assert!(
            err.contains("unexpected argument '--bogus'"),
            "{bin} stderr:\n{err}"
        );
    }
    // A Go-style single-dash flag is rewritten, and still reported by name.
    let (status, _, err) = run_to_end("rd-server", &["-nosuchflag"], BOUND);
    assert!(!status.success());
    assert!(err.contains("--nosuchflag"), "{err}");
}

#[test]
fn bad_peers_fail_before_listening() {
    let (status, out, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-id",
            "a",
            "-token",
            "t",
            "-peers",
            "bad",
        ],
        BOUND,
    );
    assert!(!status.success(), "{out}");
    assert!(err.contains("--peers: entry 1"), "{err}");
    assert!(!out.contains("listening on"), "{out}");

    let (status, _, err) = run_to_end(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-peers", "bad"],
        BOUND,
    );
    assert!(!status.success());
    assert!(err.contains("--peers: entry 1"), "{err}");

    // Valid peers without an identity to peer with.
    let (status, _, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-peers",
            "b:t:ws://127.0.0.1:1/connect",
        ],
        BOUND,
    );
    assert!(!status.success());
    assert!(err.contains("--peers needs --id and --token"), "{err}");
}

#[test]
fn bad_client_arguments_fail_clearly() {
    let (status, _, err) = run_to_end("rd-client", &["--allow", "nocolon"], BOUND);
    assert!(!status.success());
    assert!(err.contains("invalid allow rule"), "{err}");

    let (status, _, err) = run_to_end("rd-client", &["--header", "novalue"], BOUND);
    assert!(!status.success());
    assert!(err.contains("--header \"novalue\""), "{err}");
}

#[test]
fn listen_address_in_use_fails() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, _, err) = run_to_end("rd-server", &["-listen", &addr], BOUND);
    assert!(!status.success());
    assert!(err.contains(&format!("listen on {addr}")), "{err}");
}

#[test]
fn client_once_says_why_it_could_not_connect() {
    let url = format!("ws://127.0.0.1:{}/connect", free_port());
    let (status, _, err) = run_to_end("rd-client", &["--once", "-connect", &url], BOUND);
    assert!(!status.success());
    // The cause, not just "tcp connect ... failed".
    assert!(
        err.contains("Connection refused") || err.contains("connection refused"),
        "{err}"
    );
}
