//! The real binaries on loopback: rd-client through rd-server to rd-dummy, server restarts,
//! allow rules, wss, and the `make run` demo script.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a freshly started client may take to register (normally milliseconds).
const CONNECT_BOUND: Duration = Duration::from_secs(15);

const HELLO: &str = "hello through the tunnel\n";

/// A temp dir with `hello.txt` and a 4 MiB `blob.bin`; returns it and the blob's sha256.
fn content() -> (TempDir, String) {
    let dir = TempDir::new("content");
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("blob.bin"), &blob).unwrap();
    (dir, sha256_hex(&blob))
}

fn client_path(id: &str, target: SocketAddr, file: &str) -> String {
    format!("/client/{id}/http/{target}/{file}")
}

/// Starts rd-server on `listen`, retrying a few times while the port is still held (a
/// restart on the same port).
fn start_server(listen: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["-listen", listen];
    args.extend_from_slice(extra);
    for attempt in 0.. {
        let mut p = Proc::start("rd-server", &args);
        // Bind failures exit at once; success prints the line.
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.wait_listening()));
        match started {
            Ok(addr) => return (p, addr),
            Err(e) if attempt >= 3 => std::panic::resume_unwind(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    unreachable!()
}

/// A target on the client's side that answers one request with headers announcing a 1 GiB
/// body, sends 256 KiB of it and then holds the connection open. Says `Streaming` once the
/// data is written and `Closed` (with the time) when the client side closes the connection.
async fn spawn_holder() -> (SocketAddr, mpsc::UnboundedReceiver<Holder>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n";
                if tcp.write_all(answer).await.is_err()
                    || tcp.write_all(&[b'x'; 256 * 1024]).await.is_err()
                {
                    return;
                }
                tx.send(Holder::Streaming).ok();
                // Nothing more to send or to read: wait for the close.
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                tx.send(Holder::Closed(Instant::now())).ok();
            });
        }
    });
    (addr, rx)
}

#[derive(Debug, PartialEq, Eq)]
enum Holder {
    Streaming,
    Closed(Instant),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_get_survives_a_server_restart() {
    let (dir, blob_sha) = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (mut server, addr) = start_server("127.0.0.1:0", &[]);
    let mut client = Proc::start(
        "rd-client",
        &["-connect", &format!("ws://{addr}/connect"), "-id", "foo"],
    );

    let hello = client_path("foo", dummy, "hello.txt");
    let reply = poll_get(addr, &hello, CONNECT_BOUND, |r| r.status == 200).await;
    assert_eq!(reply.text(), HELLO);
    let blob = try_get(
        addr,
        &client_path("foo", dummy, "blob.bin"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!((blob.status, blob.body.len()), (200, 4 << 20));
    assert_eq!(sha256_hex(&blob.body), blob_sha);

    // A download in progress when the server dies: the client's end of the stream (its
    // connection to the target) is closed promptly, not left hanging, and the download
    // fails rather than ending as if complete.
    let (holder, mut holder_events) = spawn_holder().await;
    let held = client_path("foo", holder, "held");
    let download = tokio::spawn(async move { try_get(addr, &held, Duration::from_secs(30)).await });
    let streaming = tokio::time::timeout(CONNECT_BOUND, holder_events.recv()).await;
    assert_eq!(streaming.ok().flatten(), Some(Holder::Streaming));

    // Restart the server on the same port: the client redials within its backoff (1 s
    // doubling, full jitter; 30 s is the ceiling of a single delay).
    let killed = Instant::now();
    server.kill();
    let closed = tokio::time::timeout(Duration::from_secs(2), holder_events.recv())
        .await
        .expect("the client must close its end of the stream within 2 s of the server's death");
    assert!(
        matches!(closed, Some(Holder::Closed(at)) if at >= killed),
        "{closed:?}"
    );
    let outcome = tokio::time::timeout(Duration::from_secs(2), download)
        .await
        .expect("the download must fail within 2 s of the server's death")
        .unwrap();
    assert!(outcome.is_err(), "{:?}", outcome.map(|r| r.status));
    let (_server, addr2) = start_server(&addr.to_string(), &[]);
    assert_eq!(addr2, addr);
    let reply = poll_get(addr, &hello, Duration::from_secs(35), |r| r.status == 200).await;
    assert_eq!(reply.text(), HELLO);
    assert!(client.is_running(), "the client must redial, not exit");
    assert!(
        client.stderr().contains("redialing"),
        "client log:\n{}",
        client.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_rules_refuse_other_targets_and_keep_the_session() {
    let (dir, _) = content();
    let (_allowed_dummy, allowed) = start_dummy(dir.path());
    let (_other_dummy, other) = start_dummy(dir.path());
    let (_server, addr) = start_server("127.0.0.1:0", &[]);
    let rule = format!("tcp:127.0.0.1:{}", allowed.port());
    let mut client = Proc::start(
        "rd-client",
        &[
            "-connect",
            &format!("ws://{addr}/connect"),
            "-id",
            "foo",
            "--allow",
            &rule,
        ],
    );

    let ok = client_path("foo", allowed, "hello.txt");
    let reply = poll_get(addr, &ok, CONNECT_BOUND, |r| r.status == 200).await;
    assert_eq!(reply.text(), HELLO);

    let denied = try_get(
        addr,
        &client_path("foo", other, "hello.txt"),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(denied.status, 502, "{}", denied.text());
    assert!(
        denied.text().contains("connect not allowed"),
        "{}",
        denied.text()
    );

    // Same session, still serving.
    let reply = try_get(addr, &ok, Duration::from_secs(20)).await.unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, HELLO));
    assert!(client.is_running());
    let metrics = try_get(addr, "/metrics", Duration::from_secs(5))
        .await
        .unwrap()
        .text();
    assert_eq!(
        sample(
            &metrics,
            "session_server_total_add_websocket_session{clientkey=\"foo\",peer=\"false\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A CA and a leaf for `localhost` and 127.0.0.1 it signed, as PEM files in `dir`; returns
/// (cert, key, ca) paths and the CA PEM.
fn write_pki(dir: &std::path::Path) -> (String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rd e2e test ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("key.pem"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    (path("cert.pem"), path("key.pem"), path("ca.pem"), ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_client_needs_the_ca() {
    let pki_dir = TempDir::new("pki");
    let (cert, key, ca_file, ca_pem) = write_pki(pki_dir.path());
    let (dir, _) = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (_server, addr) = start_server("127.0.0.1:0", &["--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("wss://127.0.0.1:{}/connect", addr.port());
    let get = |path: String| {
        let ca_pem = ca_pem.clone();
        async move { try_get_tls(addr, "localhost", &ca_pem, &path, Duration::from_secs(10)).await }
    };

    // Trusting the CA: connects, and requests over https go through.
    let _trusting = Proc::start(
        "rd-client",
        &["-connect", &url, "-id", "foo", "--ca-cert", &ca_file],
    );
    let hello = client_path("foo", dummy, "hello.txt");
    let deadline = std::time::Instant::now() + CONNECT_BOUND;
    loop {
        match get(hello.clone()).await {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.text(), HELLO);
                break;
            }
            last => assert!(
                std::time::Instant::now() < deadline,
                "no tunnel over wss: {last:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without the CA: the handshake fails on the certificate, the client says so and keeps
    // retrying, and the server never registers it.
    let untrusting = Proc::start("rd-client", &["-connect", &url, "-id", "bar"]);
    wait_until("the untrusting client's TLS error", CONNECT_BOUND, || {
        let log = untrusting.stderr().to_lowercase();
        log.contains("tls") && log.contains("certificate")
    });
    let reply = get(client_path("bar", dummy, "hello.txt")).await.unwrap();
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert_eq!(reply.text(), "failed to find Session for client bar\n");
    let metrics = get("/metrics".to_owned()).await.unwrap().text();
    assert!(
        !metrics.contains("clientkey=\"bar\""),
        "bar must never register:\n{metrics}"
    );
}

#[test]
fn make_run_demo_script_fetches_through_the_tunnel() {
    let root = workspace_root();
    // Make sure the binaries exist with a clear message if not.
    for b in ["rd-server", "rd-client", "rd-dummy"] {
        bin(b);
    }
    let mut child = std::process::Command::new("bash")
        .arg("tests/demo.sh")
        .current_dir(&root)
        .env("RD_BIN_DIR", bin_dir())
        .env("RD_DEMO_ONESHOT", "1")
        .env("RD_DEMO_SERVER", "127.0.0.1:0")
        .env("RD_DEMO_DUMMY", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("demo.sh did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "demo.sh failed ({status}):\n{out}\n{err}");
    assert!(
        out.contains("hello from the far side"),
        "demo output:\n{out}\n{err}"
    );
    // One-shot mode must not leave its servers running: their ports close.
    for name in ["rd-server", "rd-dummy"] {
        let addr: SocketAddr = out
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|url| url.strip_prefix("http://"))
            .unwrap_or_else(|| panic!("no {name} address in the demo output:\n{out}"))
            .parse()
            .unwrap();
        wait_until(
            &format!("{name} at {addr} to exit after the demo"),
            Duration::from_secs(10),
            || std::net::TcpStream::connect(addr).is_err(),
        );
    }
}

/// `rd_sessions` from the server's /metrics.
async fn sessions(addr: SocketAddr) -> Option<f64> {
    let metrics = try_get(addr, "/metrics", Duration::from_secs(5))
        .await
        .ok()?;
    sample(&metrics.text(), "rd_sessions")
}

async fn wait_sessions(addr: SocketAddr, n: f64) {
    let deadline = std::time::Instant::now() + CONNECT_BOUND;
    while sessions(addr).await != Some(n) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never had {n} sessions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_server_and_clients_cleanly() {
    let (mut server, addr) = start_server("127.0.0.1:0", &[]);
    let url = format!("ws://{addr}/connect");
    let mut redialing = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    let mut once = Proc::start("rd-client", &["-connect", &url, "-id", "bar", "--once"]);
    wait_sessions(addr, 2.0).await;

    // A redialing client stops on SIGTERM, and its session goes away.
    redialing.terminate();
    let status = redialing.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    wait_sessions(addr, 1.0).await;

    // The server shuts down on SIGTERM, closing the remaining session: the --once client
    // exits after its session ends, as Go's example client does.
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let status = once.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
