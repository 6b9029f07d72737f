//! Serving https/wss with rustls, optionally asking agents for client certificates
//! (`--agent-ca`), with the files reloaded while the server runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// What a listener's TLS is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `--tls-cert`: the server's PEM certificate chain.
    pub cert: PathBuf,
    /// `--tls-key`: its PEM key.
    pub key: PathBuf,
    /// `--agent-ca`: PEM CA certificates that sign agents' client certificates.
    pub agent_ca: Option<PathBuf>,
    /// Whether a connection without a client certificate completes the handshake (the
    /// authorizer then decides per request). Only with `agent_ca`.
    pub cert_optional: bool,
}

impl TlsFiles {
    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.agent_ca.clone());
        paths
    }

    /// The same certificate without asking for client certificates (the admin listener).
    pub fn without_client_auth(&self) -> Self {
        Self {
            agent_ca: None,
            ..self.clone()
        }
    }
}

fn certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

/// A TLS acceptor from the files; the error names the flag at fault.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let chain = certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.agent_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("--agent-ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("--agent-ca {}: {e}", ca.display()))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if files.cert_optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| format!("--agent-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener's TLS: the acceptor in force, replaced by [`reload`](Self::reload) for the
/// connections accepted after it (those in progress keep theirs). Cheap to clone; clones
/// share the acceptor.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the files.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let acceptor = acceptor(&files)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(acceptor)),
        })
    }

    /// The files it is built from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again; on an error the acceptor in force is kept.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = acceptor(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Reloads when the files change or on SIGHUP (see `file_watch`), until dropped.
    pub async fn watch(self) {
        crate::file_watch::watch(self.files.paths(), |trigger| match self.reload() {
            Ok(()) => tracing::info!(
                trigger,
                agent_ca = self
                    .files
                    .agent_ca
                    .as_deref()
                    .map(|p| p.display().to_string()),
                "TLS certificates reloaded; new connections use them"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                trigger,
                "TLS certificates not reloaded; the previous ones stay in force"
            ),
        })
        .await;
    }
}

/// The verified client certificate of a connection, if it presented one.
pub fn peer_certificate<S>(stream: &TlsStream<S>) -> Option<rd_server::PeerCertificate> {
    let end_entity = stream.get_ref().1.peer_certificates()?.first()?;
    Some(rd_server::PeerCertificate::new(
        end_entity.clone().into_owned(),
    ))
}

/// Refused client certificates logged at INFO: the first, then one in a hundred (an
/// outsider sets the pace).
static REFUSED_CERTIFICATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs a failed TLS handshake: at INFO (rate-limited) when a client certificate was refused
/// or missing, so an operator sees agents turned away by `--agent-ca`; at DEBUG otherwise
/// (scanners, clients that do not trust this server).
pub fn handshake_failed(remote: std::net::SocketAddr, error: &std::io::Error) {
    let rustls_error = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let certificate = matches!(
        rustls_error,
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    );
    if !certificate {
        tracing::debug!(%remote, error = %error, "TLS handshake failed");
        return;
    }
    let n = REFUSED_CERTIFICATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n % 100 == 0 {
        tracing::info!(
            %remote,
            error = %error,
            refused_so_far = n + 1,
            "TLS handshake failed: client certificate refused (see --agent-ca)"
        );
    } else {
        tracing::debug!(%remote, error = %error, "TLS handshake failed");
    }
}
