//! Start-up checks shared by rd-server and rd-client: files that must be readable now.

use std::path::Path;

/// Loads one PEM CA file the way the TLS client will, so a missing, unreadable or empty file
/// stops the program at start-up (naming `flag`) instead of failing every connection later.
pub async fn check_ca_file(flag: &str, path: &Path) -> Result<(), String> {
    let options = rd_session::transport::TlsOptions::default()
        .with_system_roots(false)
        .with_ca_file(path);
    rd_session::transport::build_client_config(&options)
        .await
        .map(|_| ())
        .map_err(|e| format!("{flag} {}: {}", path.display(), rd_session::error_chain(&e)))
}

/// Loads a client certificate and its key the way the TLS client will (see
/// [`check_ca_file`]), naming `--cert` or `--key` in the error.
#[allow(dead_code)] // rd-server shares this file and has no client certificate.
pub async fn check_client_cert(cert: &Path, key: &Path) -> Result<(), String> {
    // Only the client certificate is loaded: skipping verification needs no roots.
    let options = rd_session::transport::TlsOptions::default()
        .with_insecure_skip_verify(true)
        .with_client_cert(cert, key);
    rd_session::transport::build_client_config(&options)
        .await
        .map(|_| ())
        .map_err(|e| format!("--cert/--key: {}", rd_session::error_chain(&e)))
}
