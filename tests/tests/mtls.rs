//! mTLS agent identity (issue 25): rd-server --agent-ca and rd-client --cert/--key.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use rd_e2e_tests::*;

const HELLO: &str = "hello through an mTLS tunnel\n";
const TOKEN: &str = "agent-token-for-bar-0451";
/// Long enough for a file change to be polled (every 2 s) and a backed-off agent to redial.
const RELOAD_BOUND: Duration = Duration::from_secs(30);

/// A CA that signs certificates.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf with subject CN `cn` (if any) and DNS SANs `dns`: (cert PEM, key PEM).
    fn leaf(&self, cn: Option<&str>, dns: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = dns.iter().map(|d| (*d).to_owned()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `text` to `path` at once (a rename), as a certificate manager does: a poll never
/// sees half a file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The test's PKI on disk: the server's certificate (for localhost) and its CA, and the
/// agent CA file the server trusts.
struct Setup {
    dir: TempDir,
    server_ca_pem: String,
    agent_ca: Ca,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let server_ca = Ca::new("rd test server ca");
        let (cert, key) = server_ca.leaf(None, &["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        std::fs::write(dir.path().join("server-ca.pem"), server_ca.cert.pem()).unwrap();
        let agent_ca = Ca::new("rd test agent ca");
        std::fs::write(dir.path().join("agent-ca.pem"), agent_ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
        Self {
            dir,
            server_ca_pem: server_ca.cert.pem(),
            agent_ca,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// rd-server with TLS and --agent-ca, plus `extra` flags.
    fn server(&self, extra: &[&str]) -> (Proc, SocketAddr) {
        let (cert, key, ca) = (
            self.arg("server.pem"),
            self.arg("server.key"),
            self.arg("agent-ca.pem"),
        );
        let mut args = vec![
            "-listen",
            "127.0.0.1:0",
            "-debug",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--agent-ca",
            &ca,
        ];
        args.extend_from_slice(extra);
        Proc::start_listening("rd-server", &args)
    }

    /// Writes a certificate and key for an agent as `<name>.pem` and `<name>.key`.
    fn write_agent_cert(&self, name: &str, (cert, key): (String, String)) {
        write_atomically(&self.path(&format!("{name}.key")), &key);
        write_atomically(&self.path(&format!("{name}.pem")), &cert);
    }

    /// rd-client as `id` dialing `addr` over wss, with the certificate files `<cert>.pem`
    /// and `<cert>.key` if given, and `extra` flags; it redials quickly.
    fn agent(&self, addr: SocketAddr, id: &str, cert: Option<&str>, extra: &[&str]) -> Proc {
        let url = format!("wss://127.0.0.1:{}/connect", addr.port());
        let ca = self.arg("server-ca.pem");
        let files = cert.map(|c| (self.arg(&format!("{c}.pem")), self.arg(&format!("{c}.key"))));
        let mut args = vec![
            "-connect",
            &url,
            "-id",
            id,
            "-debug",
            "--ca-cert",
            &ca,
            "--backoff-initial",
            "100ms",
            "--backoff-max",
            "500ms",
        ];
        if let Some((cert, key)) = &files {
            args.extend(["--cert", cert, "--key", key]);
        }
        args.extend_from_slice(extra);
        Proc::start("rd-client", &args)
    }

    /// GET `path` from the server over https (no client certificate: the operator's side).
    async fn get(&self, addr: SocketAddr, path: &str) -> Result<Reply, String> {
        try_get_tls(
            addr,
            "localhost",
            &self.server_ca_pem,
            path,
            Duration::from_secs(5),
        )
        .await
    }

    /// Waits until `hello.txt` comes through agent `id` from rd-dummy at `dummy`.
    async fn wait_served_by(&self, addr: SocketAddr, id: &str, dummy: SocketAddr, bound: Duration) {
        let path = format!("/client/{id}/http/{dummy}/hello.txt");
        let deadline = std::time::Instant::now() + bound;
        loop {
            let last = self.get(addr, &path).await;
            if matches!(&last, Ok(r) if r.status == 200) {
                assert_eq!(last.unwrap().text(), HELLO);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing through agent {id} within {bound:?}: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts that no session is registered for `id`.
    async fn assert_unknown(&self, addr: SocketAddr, id: &str) {
        let reply = self
            .get(addr, &format!("/client/{id}/http/127.0.0.1:1/"))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.text()),
            (500, format!("failed to find Session for client {id}\n"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_admits_its_id_and_only_it() {
    let pki = Setup::new("mtls-id");
    let (_dummy, dummy) = start_dummy(pki.dir.path());
    let (server, addr) = pki.server(&[]);

    // A certificate from the agent CA: admitted under the id in it (the CN), and a dial
    // through the agent works.
    pki.write_agent_cert("foo", pki.agent_ca.leaf(Some("foo"), &["ignored.example"]));
    let _foo = pki.agent(addr, "foo", Some("foo"), &[]);
    pki.wait_served_by(addr, "foo", dummy, START_BOUND).await;
    // Without a CN, the first DNS SAN is the id.
    pki.write_agent_cert("san", pki.agent_ca.leaf(None, &["san-agent", "second"]));
    let _san = pki.agent(addr, "san-agent", Some("san"), &[]);
    pki.wait_served_by(addr, "san-agent", dummy, START_BOUND)
        .await;

    // A certificate from another CA: the TLS handshake fails; never registered.
    let other_ca = Ca::new("not the agent ca");
    pki.write_agent_cert("evil", other_ca.leaf(Some("evil"), &[]));
    let evil = pki.agent(addr, "evil", Some("evil"), &[]);
    wait_until("the foreign certificate's refusal", START_BOUND, || {
        evil.stderr().contains("UnknownCA") && server.stderr().contains("UnknownIssuer")
    });
    pki.assert_unknown(addr, "evil").await;

    // A certificate for foo used to ask for bar: 403 with the reason, on both sides.
    let mut impostor = pki.agent(addr, "bar", Some("foo"), &[]);
    let reason = "certificate is for foo, agent asked for bar";
    wait_until("the impostor's refusal", START_BOUND, || {
        impostor.stderr().contains(reason) && server.stderr().contains(reason)
    });
    assert!(impostor.stderr().contains("403"), "{}", impostor.stderr());
    pki.assert_unknown(addr, "bar").await;
    impostor.kill();

    // No certificate and no token configured: refused (401) by /connect's authorizer.
    let anonymous = pki.agent(addr, "nocert", None, &[]);
    wait_until("the anonymous agent's refusal", START_BOUND, || {
        anonymous.stderr().contains("401")
    });
    pki.assert_unknown(addr, "nocert").await;

    // The admin API says how foo proved its id.
    let agents = pki.get(addr, "/admin/agents").await.unwrap();
    assert!(
        agents.text().contains("client-cert"),
        "{} {}",
        agents.status,
        agents.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_alongside_certificates_and_a_handshake_that_demands_one() {
    let pki = Setup::new("mtls-tokens");
    let (_dummy, dummy) = start_dummy(pki.dir.path());
    std::fs::write(pki.path("tokens"), format!("bar {TOKEN}\n")).unwrap();
    let tokens = pki.arg("tokens");
    let (_server, addr) = pki.server(&["--agent-tokens", &tokens]);

    pki.write_agent_cert("foo", pki.agent_ca.leaf(Some("foo"), &[]));
    let _foo = pki.agent(addr, "foo", Some("foo"), &[]);
    pki.wait_served_by(addr, "foo", dummy, START_BOUND).await;
    // No certificate, a token: still admitted.
    let _bar = pki.agent(addr, "bar", None, &["--token", TOKEN]);
    pki.wait_served_by(addr, "bar", dummy, START_BOUND).await;
    // Neither: refused.
    let anonymous = pki.agent(addr, "baz", None, &[]);
    wait_until("the anonymous agent's refusal", START_BOUND, || {
        anonymous.stderr().contains("401")
    });
    pki.assert_unknown(addr, "baz").await;

    // An agents-only listener (--admin-listen) without tokens or peer token: the TLS
    // handshake itself wants a certificate.
    let (strict, strict_addr) = pki.server(&["--admin-listen", "127.0.0.1:0"]);
    let _anonymous = pki.agent(strict_addr, "baz", None, &[]);
    wait_until("the handshake to want a certificate", START_BOUND, || {
        let log = strict.stderr();
        log.contains("TLS handshake failed") && log.contains("no certificates")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_and_a_rotated_ca_are_picked_up() {
    let pki = Setup::new("mtls-reload");
    let (_dummy, dummy) = start_dummy(pki.dir.path());
    let (server, addr) = pki.server(&[]);

    // The agent's certificate file: first from a CA the server does not trust, then
    // renewed (same id, new key and serial) by the right CA: the running agent uses it
    // at its next redial.
    let untrusted = Ca::new("untrusted");
    pki.write_agent_cert("renew", untrusted.leaf(Some("renew"), &[]));
    let renew = pki.agent(addr, "renew", Some("renew"), &[]);
    wait_until("the untrusted certificate's refusal", START_BOUND, || {
        renew.stderr().contains("UnknownCA")
    });
    pki.write_agent_cert("renew", pki.agent_ca.leaf(Some("renew"), &[]));
    pki.wait_served_by(addr, "renew", dummy, RELOAD_BOUND).await;

    // The server's CA file rotated to a new CA: agents with its certificates are admitted
    // from then on, new connections with the old CA's are refused.
    let new_ca = Ca::new("rd test agent ca 2");
    pki.write_agent_cert("fresh", new_ca.leaf(Some("fresh"), &[]));
    let fresh = pki.agent(addr, "fresh", Some("fresh"), &[]);
    wait_until(
        "the new CA's certificate refused before the rotation",
        START_BOUND,
        || fresh.stderr().contains("UnknownCA"),
    );
    write_atomically(&pki.path("agent-ca.pem"), &new_ca.cert.pem());
    wait_until("the CA file reloaded", RELOAD_BOUND, || {
        server.stderr().contains("TLS certificates reloaded")
    });
    pki.wait_served_by(addr, "fresh", dummy, RELOAD_BOUND).await;
    pki.write_agent_cert("old", pki.agent_ca.leaf(Some("old"), &[]));
    let old = pki.agent(addr, "old", Some("old"), &[]);
    wait_until("the old CA's certificate refused", START_BOUND, || {
        old.stderr().contains("UnknownCA")
    });
    pki.assert_unknown(addr, "old").await;

    // The server's own certificate renewed by another CA: new connections get it, and
    // the agent sessions set up before go on.
    let server_ca = Ca::new("rd test server ca 2");
    let (cert, key) = server_ca.leaf(None, &["localhost"]);
    write_atomically(&pki.path("server.key"), &key);
    write_atomically(&pki.path("server.pem"), &cert);
    let path = format!("/client/fresh/http/{dummy}/hello.txt");
    let deadline = std::time::Instant::now() + RELOAD_BOUND;
    loop {
        let last = try_get_tls(
            addr,
            "localhost",
            &server_ca.cert.pem(),
            &path,
            Duration::from_secs(5),
        )
        .await;
        if matches!(&last, Ok(r) if r.status == 200 && r.text() == HELLO) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed server certificate was not served: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_link_to_a_server_that_wants_agent_certificates() {
    let pki = Setup::new("mtls-peers");
    let (_dummy, dummy) = start_dummy(pki.dir.path());
    // The first server: agents-only listener with --agent-ca and the peer token; peers
    // dial it without a client certificate. Each names the other in --peers, so the
    // second's port is chosen first (again if it was taken meanwhile).
    let ca = pki.arg("server-ca.pem");
    let mut attempt = 0;
    let (_first, first, _second, second) = loop {
        attempt += 1;
        let port = free_port();
        let to_second = format!("second:aaa:ws://127.0.0.1:{port}/connect");
        let (first_proc, first) = pki.server(&[
            "--admin-listen",
            "127.0.0.1:0",
            "-id",
            "first",
            "-token",
            "aaa",
            "-peers",
            &to_second,
        ]);
        let listen = format!("127.0.0.1:{port}");
        let to_first = format!("first:aaa:wss://127.0.0.1:{}/connect", first.port());
        let mut second_proc = Proc::start(
            "rd-server",
            &[
                "-listen",
                &listen,
                "-id",
                "second",
                "-token",
                "aaa",
                "-peers",
                &to_first,
                "--peer-ca-cert",
                &ca,
            ],
        );
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            second_proc.wait_listening()
        })) {
            Ok(second) => break (first_proc, first, second_proc, second),
            Err(_) => assert!(attempt < 3, "could not start the second server"),
        }
    };
    pki.write_agent_cert("foo", pki.agent_ca.leaf(Some("foo"), &[]));
    let _foo = pki.agent(first, "foo", Some("foo"), &[]);
    // Through the second server's peer link to the first, and its certificate agent.
    let r = poll_get(
        second,
        &format!("/client/foo/http/{dummy}/hello.txt"),
        START_BOUND,
        |r| r.status == 200,
    )
    .await;
    assert_eq!(r.text(), HELLO);
    // An agent without certificate or token is still refused there.
    let anonymous = pki.agent(first, "baz", None, &[]);
    wait_until("the anonymous agent's refusal", START_BOUND, || {
        anonymous.stderr().contains("401")
    });
}

#[test]
fn bad_certificate_flags_stop_both_at_start() {
    let pki = Setup::new("mtls-flags");
    let bound = Duration::from_secs(15);
    std::fs::write(pki.path("garbage.pem"), "not a certificate\n").unwrap();
    let (cert, key, garbage) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("garbage.pem"),
    );

    // --agent-ca needs TLS to ask for certificates in.
    let (status, _, err) = run_to_end("rd-server", &["--agent-ca", &garbage], bound);
    assert!(!status.success());
    assert!(err.contains("--tls-cert"), "{err}");
    // A CA file without a certificate: exit 2 naming the flag, before listening.
    let (status, out, err) = run_to_end(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--agent-ca",
            &garbage,
        ],
        bound,
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--agent-ca"), "{err}");
    assert!(!out.contains("listening on"), "{out}");

    // rd-client: --cert needs --key, and both must load.
    let (status, _, err) = run_to_end("rd-client", &["--cert", &cert], bound);
    assert!(!status.success());
    assert!(err.contains("--key"), "{err}");
    let (status, _, err) = run_to_end("rd-client", &["--cert", &garbage, "--key", &key], bound);
    assert!(!status.success());
    assert!(
        err.contains("--cert/--key") && err.contains("garbage.pem"),
        "{err}"
    );
}
