//! End-to-end checks against the real `rd-dummy` binary over loopback.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Upper bound for anything that would otherwise hang a broken test.
const BOUND: Duration = Duration::from_secs(20);

/// A running server over a fresh directory; kills the child and removes the
/// directory when dropped, even if the test panics.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rd-dummy-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(dir.join("big.bin"), big_data()).unwrap();
    std::fs::write(dir.join("sub/inner.json"), b"{}").unwrap();
    dir
}

/// Larger than several body chunks, with a pattern that exposes misordering.
fn big_data() -> Vec<u8> {
    (0..1_300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn start() -> Server {
    let dir = fixture_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rd-dummy"))
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut server = Server {
        child,
        port: 0,
        dir,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(BOUND).expect("server printed its address");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    server.port = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(server.port, 0);
    server
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(server: &Server) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream.set_write_timeout(Some(BOUND)).unwrap();
    BufReader::new(stream)
}

/// Sends one request on a kept-alive connection and reads exactly one response,
/// framed by Content-Length (the server never uses chunked encoding).
fn exchange(conn: &mut BufReader<TcpStream>, method: &str, target: &str, extra: &str) -> Reply {
    let request = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
    conn.get_mut().write_all(request.as_bytes()).unwrap();
    let mut status_line = String::new();
    conn.read_line(&mut status_line).unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if method != "HEAD" {
        let len: usize = reply.header("content-length").unwrap().parse().unwrap();
        reply.body.resize(len, 0);
        conn.read_exact(&mut reply.body).unwrap();
    }
    reply
}

fn get(server: &Server, target: &str, extra: &str) -> Reply {
    exchange(&mut connect(server), "GET", target, extra)
}

#[test]
fn get_returns_exact_bytes_with_metadata() {
    let server = start();
    let small = get(&server, "/hello.txt", "");
    assert_eq!(small.status, 200);
    assert_eq!(small.body, b"hello, world\n");
    assert_eq!(
        small.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(small.header("accept-ranges"), Some("bytes"));
    assert!(small.header("last-modified").unwrap().ends_with(" GMT"));

    let big = get(&server, "/big.bin", "");
    assert_eq!(big.status, 200);
    assert_eq!(big.header("content-type"), Some("application/octet-stream"));
    assert!(big.body == big_data(), "large body differs");
}

#[test]
fn head_has_length_but_no_body_and_connection_stays_usable() {
    let server = start();
    let mut conn = connect(&server);
    let head = exchange(&mut conn, "HEAD", "/big.bin", "");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1300000"));
    // If HEAD had leaked a body, this response would be parsed out of it.
    let next = exchange(&mut conn, "GET", "/hello.txt", "");
    assert_eq!(next.status, 200);
    assert_eq!(next.body, b"hello, world\n");
}

#[test]
fn ranges_return_exactly_the_requested_bytes() {
    let server = start();
    let data = big_data();
    let mut conn = connect(&server);

    let r = exchange(&mut conn, "GET", "/hello.txt", "Range: bytes=7-11\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 7-11/13"));
    assert_eq!(r.body, b"world");

    let r = exchange(
        &mut conn,
        "GET",
        "/big.bin",
        "Range: bytes=262000-800000\r\n",
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 262000-800000/1300000")
    );
    assert!(r.body == data[262_000..=800_000], "middle range differs");

    let r = exchange(&mut conn, "GET", "/big.bin", "Range: bytes=-1000\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 1299000-1299999/1300000")
    );
    assert!(r.body == data[1_299_000..], "suffix range differs");

    let r = exchange(&mut conn, "GET", "/hello.txt", "Range: bytes=13-\r\n");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */13"));
}

#[test]
fn escaping_the_directory_is_refused() {
    let server = start();
    for target in [
        "/../etc/passwd",
        "/%2e%2e/x",
        "/%2E%2E/%2e%2e/etc/passwd",
        "/sub/../../x",
        "/sub%2f..%2f..%2fx",
        "/..%5c..%5cx",
        "/a%00b",
    ] {
        let r = get(&server, target, "");
        assert!(
            matches!(r.status, 400 | 404),
            "{target} answered {}",
            r.status
        );
    }
}

#[test]
fn directories_list_redirect_and_refuse_other_methods() {
    let server = start();
    let root = get(&server, "/", "");
    assert_eq!(root.status, 200);
    assert_eq!(
        root.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(root.body).unwrap();
    assert!(
        html.contains("<a href=\"hello.txt\">hello.txt</a>"),
        "{html}"
    );
    assert!(html.contains("<a href=\"sub/\">sub/</a>"), "{html}");

    let redirect = get(&server, "/sub?x=1", "");
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.header("location"), Some("/sub/?x=1"));
    let sub = get(&server, "/sub/", "");
    assert!(String::from_utf8(sub.body).unwrap().contains("inner.json"));

    std::fs::write(server.dir.join("sub/index.html"), b"<p>index</p>").unwrap();
    let index = get(&server, "/sub/", "");
    assert_eq!(index.body, b"<p>index</p>");

    assert_eq!(get(&server, "/missing", "").status, 404);
    let post = exchange(
        &mut connect(&server),
        "POST",
        "/hello.txt",
        "Content-Length: 0\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}
