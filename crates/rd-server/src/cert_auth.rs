//! [`ClientCertificates`]: agents that prove their id with a TLS client certificate (mTLS).
//!
//! The TLS layer (rustls' `WebPkiClientVerifier` in rd-server's binary) checks that the
//! certificate chains to a trusted agent CA, is within its validity period and, when it
//! carries an extended key usage, allows client authentication. What is left for the
//! authorizer is the *name*: which agent id the certificate stands for, and whether that is
//! the id the agent asks for.
//!
//! # The id rule
//!
//! The agent id of a certificate is its subject's common name (CN) when it has one, else
//! its first DNS subject alternative name. A certificate with neither names no agent and is
//! refused. cert-manager (`commonName:` or `dnsNames:`), cfssl (`"CN"` or `"hosts"`) and
//! `openssl req -subj /CN=ID` all issue such certificates directly.

use std::sync::Arc;

use http::request::Parts;
use rd_session::BoxFuture;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::auth::{Authorization, Authorizer};
use crate::short_id;

/// The client certificate a connection presented and the TLS layer verified (its end-entity
/// certificate). A server loop that terminates TLS with client authentication inserts it
/// into each request's extensions, as it does [`RemoteAddr`](crate::RemoteAddr), so that
/// [`ClientCertificates`] can read the agent id from it. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(Arc<CertificateDer<'static>>);

impl PeerCertificate {
    /// Wraps a verified end-entity certificate. Only insert one the TLS layer verified
    /// against the agent CAs: [`ClientCertificates`] trusts it as is.
    pub fn new(der: CertificateDer<'static>) -> Self {
        Self(Arc::new(der))
    }

    /// The certificate, DER-encoded.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.0
    }

    /// The agent id the certificate stands for (see [`certificate_agent_id`]).
    pub fn agent_id(&self) -> Result<String, CertificateIdError> {
        certificate_agent_id(&self.0)
    }
}

/// Why no agent id could be read from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateIdError {
    /// The certificate is not well-formed X.509 DER.
    #[error("client certificate cannot be parsed: {0}")]
    Parse(String),
    /// The certificate has neither a subject CN nor a DNS subject alternative name.
    #[error("client certificate names no agent: it has neither a subject CN nor a DNS SAN")]
    NoName,
    /// The CN or the SAN extension is there but unreadable (not a string, malformed).
    #[error("client certificate's {0} cannot be read as text")]
    Unreadable(&'static str),
}

/// The agent id of a DER certificate: its subject's first common name (CN) if it has one,
/// else its first DNS subject alternative name (SAN). Empty names count as absent.
pub fn certificate_agent_id(der: &[u8]) -> Result<String, CertificateIdError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateIdError::Parse(e.to_string()))?;
    if let Some(cn) = cert.subject().iter_common_name().next() {
        let cn = cn
            .as_str()
            .map_err(|_| CertificateIdError::Unreadable("subject CN"))?;
        if !cn.is_empty() {
            return Ok(cn.to_owned());
        }
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertificateIdError::Unreadable("subject alternative name"))?;
    san.into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::DNSName(dns) if !dns.is_empty() => Some((*dns).to_owned()),
            _ => None,
        })
        .ok_or(CertificateIdError::NoName)
}

/// Accepts an agent by its verified client certificate ([`PeerCertificate`] in the request's
/// extensions): the client key is the certificate's id ([`certificate_agent_id`]). The id the
/// agent asks for (`X-Tunnel-ID`) must be that id, or be left out; another one is refused
/// with 403 and a body naming both ("certificate is for X, agent asked for Y").
///
/// A request without a certificate goes to the authorizer given to
/// [`or_else`](Self::or_else) (e.g. [`AgentTokens`](crate::AgentTokens), for agents not
/// yet moved to certificates), or is refused with 401 without one. A request with a
/// certificate never falls back: a certificate that names no agent, or another agent, is
/// refused even if a token would pass.
pub struct ClientCertificates {
    otherwise: Option<Box<dyn Authorizer>>,
}

impl std::fmt::Debug for ClientCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificates")
            .field("otherwise", &self.otherwise.as_ref().map(|a| a.method()))
            .finish()
    }
}

impl Default for ClientCertificates {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCertificates {
    /// Certificates only: a request without one is refused.
    pub fn new() -> Self {
        Self { otherwise: None }
    }

    /// Judges requests without a client certificate by `authorizer` instead of refusing them.
    #[must_use]
    pub fn or_else(mut self, authorizer: impl Authorizer) -> Self {
        self.otherwise = Some(Box::new(authorizer));
        self
    }

    /// The verdict on a request that carries `cert`.
    fn judge(cert: &PeerCertificate, request: &Parts) -> Authorization {
        let id = match cert.agent_id() {
            Ok(id) => id,
            Err(e) => return Authorization::Forbidden(e.to_string()),
        };
        let asked = request
            .headers
            .get("x-tunnel-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        match asked {
            Some(asked) if asked != id => Authorization::Forbidden(format!(
                "certificate is for {}, agent asked for {}",
                short_id(&id),
                short_id(&asked)
            )),
            _ => Authorization::Client(id),
        }
    }
}

impl Authorizer for ClientCertificates {
    fn authorize(&self, request: &Parts) -> BoxFuture<Authorization> {
        if let Some(cert) = request.extensions.get::<PeerCertificate>() {
            let verdict = Self::judge(cert, request);
            return Box::pin(async move { verdict });
        }
        match &self.otherwise {
            Some(otherwise) => otherwise.authorize(request),
            None => Box::pin(async { Authorization::Unauthorized }),
        }
    }

    fn method(&self) -> &'static str {
        "client-cert"
    }

    fn method_for(&self, request: &Parts) -> &'static str {
        match &self.otherwise {
            Some(otherwise) if request.extensions.get::<PeerCertificate>().is_none() => {
                otherwise.method_for(request)
            }
            _ => self.method(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AGENT_TOKEN_HEADER;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert(cn: Option<&str>, dns: &[&str]) -> PeerCertificate {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().expect("key");
        PeerCertificate::new(params.self_signed(&key).expect("cert").der().clone())
    }

    fn parts(cert: Option<&PeerCertificate>, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri("/connect");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut parts = b.body(()).expect("request").into_parts().0;
        if let Some(c) = cert {
            parts.extensions.insert(c.clone());
        }
        parts
    }

    #[test]
    fn the_id_is_the_cn_else_the_first_dns_san() {
        let id = |c: PeerCertificate| c.agent_id();
        assert_eq!(id(cert(Some("foo"), &["bar.example"])), Ok("foo".into()));
        assert_eq!(
            id(cert(None, &["bar.example", "baz"])),
            Ok("bar.example".into())
        );
        assert_eq!(id(cert(None, &[])), Err(CertificateIdError::NoName));
        assert!(matches!(
            certificate_agent_id(b"not a certificate"),
            Err(CertificateIdError::Parse(_))
        ));
    }

    #[tokio::test]
    async fn certificate_wins_and_must_match_the_asked_id() {
        let auth = ClientCertificates::new();
        let foo = cert(Some("foo"), &[]);
        let verdict =
            |c: Option<&PeerCertificate>, h: &[(&str, &str)]| auth.authorize(&parts(c, h));
        assert_eq!(
            verdict(Some(&foo), &[("x-tunnel-id", "foo")]).await,
            Authorization::Client("foo".into())
        );
        assert_eq!(
            verdict(Some(&foo), &[]).await,
            Authorization::Client("foo".into())
        );
        assert_eq!(
            verdict(Some(&foo), &[("x-tunnel-id", "bar")]).await,
            Authorization::Forbidden("certificate is for foo, agent asked for bar".into())
        );
        assert!(matches!(
            verdict(Some(&cert(None, &[])), &[("x-tunnel-id", "foo")]).await,
            Authorization::Forbidden(_)
        ));
        assert_eq!(
            verdict(None, &[("x-tunnel-id", "foo")]).await,
            Authorization::Unauthorized
        );
    }

    #[tokio::test]
    async fn without_a_certificate_the_fallback_decides_and_names_its_method() {
        let token = |p: &Parts| {
            let ok = p
                .headers
                .get(AGENT_TOKEN_HEADER)
                .is_some_and(|t| t == "tok");
            async move {
                if ok {
                    Authorization::Client("bar".into())
                } else {
                    Authorization::Unauthorized
                }
            }
        };
        let auth = ClientCertificates::new().or_else(token);
        let with_token = parts(None, &[("x-tunnel-id", "bar"), (AGENT_TOKEN_HEADER, "tok")]);
        assert_eq!(
            auth.authorize(&with_token).await,
            Authorization::Client("bar".into())
        );
        assert_eq!(auth.method_for(&with_token), "authorizer");
        // A certificate for another id is refused, though the token would pass.
        let foo = cert(Some("foo"), &[]);
        let both = parts(
            Some(&foo),
            &[("x-tunnel-id", "bar"), (AGENT_TOKEN_HEADER, "tok")],
        );
        assert!(matches!(
            auth.authorize(&both).await,
            Authorization::Forbidden(_)
        ));
        assert_eq!(auth.method_for(&both), "client-cert");
    }
}
