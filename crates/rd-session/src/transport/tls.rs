//! TLS client configuration for `wss://` connections.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::sync::OnceCell;

use super::ConnectError;

/// How the server's certificate is checked on `wss://` connections.
///
/// The default trusts the operating system's roots (falling back to the bundled Mozilla roots
/// from `webpki-roots` when the system has none), like Go's default `tls.Config`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsOptions {
    /// Trust the system's root certificates (default `true`).
    pub system_roots: bool,
    /// PEM files whose certificates are trusted in addition to the system roots.
    pub ca_files: Vec<PathBuf>,
    /// Certificates trusted in addition to the system roots.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// **Dangerous:** accept any server certificate, for any name, from any issuer.
    ///
    /// The connection is still encrypted and the server must still prove it holds the key of
    /// the certificate it presents, but nothing stops an active attacker from presenting their
    /// own certificate. This exists because Go remotedialer peers dial each other with
    /// `InsecureSkipVerify: true`, and because test setups and Rancher's "agent-tls-mode:
    /// system-store off" installs use self-signed certificates. Prefer
    /// [`ca_files`](Self::ca_files).
    pub insecure_skip_verify: bool,
    /// A complete rustls configuration to use as is; all other fields are then ignored.
    ///
    /// Building a configuration loads certificates from disk, so callers that connect
    /// repeatedly can build one with [`build_client_config`] and put it here.
    pub client_config: Option<Arc<ClientConfig>>,
    /// A client certificate to present (mTLS): its PEM chain (end-entity first) and PEM
    /// private key, read at every connection attempt, so a renewed certificate is used
    /// from the next dial on without a restart. Set both with
    /// [`with_client_cert`](TlsOptions::with_client_cert).
    pub client_cert: Option<ClientCertFiles>,
}

/// The files of a client certificate (see [`TlsOptions::client_cert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientCertFiles {
    /// PEM certificate chain, the end-entity certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the end-entity certificate.
    pub key: PathBuf,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self {
            system_roots: true,
            ca_files: Vec::new(),
            ca_certs: Vec::new(),
            insecure_skip_verify: false,
            client_config: None,
            client_cert: None,
        }
    }
}

impl TlsOptions {
    /// Adds a PEM file of trusted CA certificates.
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_files.push(path.into());
        self
    }

    /// Sets [`system_roots`](Self::system_roots).
    #[must_use]
    pub fn with_system_roots(mut self, enabled: bool) -> Self {
        self.system_roots = enabled;
        self
    }

    /// Presents the client certificate in `cert` (PEM chain) with the key in `key` (PEM);
    /// both files are read again at every connection attempt.
    #[must_use]
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(ClientCertFiles {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// Sets [`insecure_skip_verify`](Self::insecure_skip_verify). Read its warning first.
    #[must_use]
    pub fn with_insecure_skip_verify(mut self, enabled: bool) -> Self {
        self.insecure_skip_verify = enabled;
        self
    }
}

/// The crypto provider is named explicitly so that a second provider compiled into the final
/// binary (e.g. aws-lc-rs via another dependency) cannot make rustls' process default ambiguous.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration described by `opts`.
///
/// The system roots are loaded once per process (Go's `x509.SystemCertPool` also caches);
/// certificates the platform store holds but rustls cannot parse are skipped. CA files and
/// the client certificate's files are read on every call.
pub async fn build_client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, ConnectError> {
    if let Some(config) = &opts.client_config {
        return Ok(Arc::clone(config));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|_| ConnectError::TlsConfig {
            reason: "the ring provider supports no default protocol version",
        })?;
    let builder = if opts.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert {
                algorithms: provider().signature_verification_algorithms,
            }))
    } else {
        let mut roots = if opts.system_roots {
            RootCertStore::clone(system_roots().await?)
        } else {
            RootCertStore::empty()
        };
        for path in &opts.ca_files {
            add_ca_file(&mut roots, path).await?;
        }
        for cert in &opts.ca_certs {
            roots
                .add(cert.clone())
                .map_err(|_| ConnectError::TlsConfig {
                    reason: "a configured ca certificate cannot be parsed",
                })?;
        }
        if roots.is_empty() {
            return Err(ConnectError::TlsConfig {
                reason: "no trusted root certificates",
            });
        }
        builder.with_root_certificates(roots)
    };
    let config = match &opts.client_cert {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let (chain, key) = load_client_cert(files).await?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConnectError::ClientCert {
                    path: files.key.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the key does not fit the certificate ({e})"),
                    ),
                })?
        }
    };
    Ok(Arc::new(config))
}

async fn system_roots() -> Result<&'static RootCertStore, ConnectError> {
    static ROOTS: OnceCell<RootCertStore> = OnceCell::const_new();
    ROOTS
        .get_or_try_init(|| async {
            // Reading the platform store does blocking file I/O.
            tokio::task::spawn_blocking(load_system_roots)
                .await
                .map_err(|_| ConnectError::TlsConfig {
                    reason: "loading the system root certificates panicked",
                })
        })
        .await
}

fn load_system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping unreadable system certificate source");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "loaded system root certificates");
    if roots.is_empty() {
        // Minimal containers often ship without a CA bundle; the bundled Mozilla roots keep
        // public endpoints reachable there.
        tracing::debug!("no system root certificates, using the bundled webpki roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

async fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), ConnectError> {
    let ca_error = |source| ConnectError::CaFile {
        path: path.to_path_buf(),
        source,
    };
    let pem = tokio::fs::read(path).await.map_err(ca_error)?;
    let mut found = 0_usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ca_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        roots.add(cert).map_err(|e| {
            ca_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unusable certificate: {e}"),
            ))
        })?;
        found += 1;
    }
    if found == 0 {
        // An empty or mistyped file would otherwise silently fall back to the system roots.
        return Err(ca_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "no PEM certificate found",
        )));
    }
    Ok(())
}

/// Reads a client certificate chain and its key.
async fn load_client_cert(
    files: &ClientCertFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConnectError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConnectError::ClientCert { path, source }
    };
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let pem = tokio::fs::read(&files.cert)
        .await
        .map_err(error(&files.cert))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&files.cert)(invalid(e.to_string())))?;
    if chain.is_empty() {
        return Err(error(&files.cert)(invalid(
            "no PEM certificate found".into(),
        )));
    }
    let pem = tokio::fs::read(&files.key)
        .await
        .map_err(error(&files.key))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| error(&files.key)(invalid(format!("no usable PEM private key: {e}"))))?;
    Ok((chain, key))
}

/// The server name rustls checks the certificate against, and sends as SNI for DNS names.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ConnectError> {
    ServerName::try_from(host.to_owned()).map_err(|_| ConnectError::TlsConfig {
        reason: "the url host is not a valid tls server name",
    })
}

/// Certificate "verifier" for [`TlsOptions::insecure_skip_verify`].
///
/// Like Go's `InsecureSkipVerify`, it accepts any chain and name but still checks the
/// handshake signatures, so the server must hold the private key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
