//! TLS to `https://` targets: one rustls client configuration per upstream, built from its
//! `tls` table each time a config is put into service (so a reload re-reads the files, and a
//! bad file refuses the reload), and the reasons a handshake fails, in words an operator
//! recognises (expired, unknown issuer, name mismatch).
//!
//! Roots: `tls.ca` when given, else the system's (the `rustls-native-certs` crate reads the
//! operating system's store, `/etc/ssl/certs` on Debian: a private CA added there the usual
//! way is trusted, and the roots follow the system's updates, which a list compiled into the
//! binary, as `webpki-roots` is, would not). Sessions are resumed on reconnect: each
//! configuration keeps rustls' in-memory session cache.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::policy::{Protocol, UpstreamTls};

/// Why an upstream's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("upstream \"{upstream}\": cannot read {what} {path}: {reason}")]
    File {
        upstream: String,
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("upstream \"{upstream}\": {reason}")]
    Config { upstream: String, reason: String },
}

/// The connectors of one upstream's `https://` targets: one offering what `protocol` asks in
/// ALPN, one offering only `http/1.1` (for protocol switches such as WebSocket, which HTTP/2
/// connections do not carry).
#[derive(Clone)]
pub struct Connectors {
    pub preferred: TlsConnector,
    pub http1: TlsConnector,
    /// Hash of everything the configuration was built from: a pool is kept across reloads
    /// only while it is unchanged.
    pub fingerprint: [u8; 32],
    pub server_name: Option<ServerName<'static>>,
}

/// Builds the connectors of upstream `name` from its `tls` table.
pub fn connectors(
    name: &str,
    tls: &UpstreamTls,
    protocol: Protocol,
) -> Result<Connectors, UpstreamTlsError> {
    let mut hash = blake3::Hasher::new();
    let file = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| UpstreamTlsError::File {
            upstream: name.to_string(),
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let bad = |what: &'static str, path: &Path, reason: String| UpstreamTlsError::File {
        upstream: name.to_string(),
        what,
        path: path.display().to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            let pem = file("tls.ca", path)?;
            hash.update(&pem);
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("tls.ca", path, e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("tls.ca", path, "no PEM certificate in the file".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad("tls.ca", path, e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store may hold a certificate rustls cannot parse: skip it, as
                // other clients do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(UpstreamTlsError::Config {
                    upstream: name.to_string(),
                    reason:
                        "no system root certificates found (install ca-certificates, or set tls.ca)"
                            .into(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamTlsError::Config {
            upstream: name.to_string(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let cert_pem = file("tls.cert", cert)?;
            let key_pem = file("tls.key", key)?;
            hash.update(&cert_pem);
            hash.update(&key_pem);
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("tls.cert", cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(bad(
                    "tls.cert",
                    cert,
                    "no PEM certificate in the file".into(),
                ));
            }
            let private = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| bad("tls.key", key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| UpstreamTlsError::Config {
                    upstream: name.to_string(),
                    reason: format!("tls.cert and tls.key do not form a usable pair: {e}"),
                })?
        }
    };
    let server_name = match &tls.server_name {
        Some(n) => {
            hash.update(n.as_bytes());
            Some(
                ServerName::try_from(n.clone()).map_err(|e| UpstreamTlsError::Config {
                    upstream: name.to_string(),
                    reason: format!("tls.server_name: {e}"),
                })?,
            )
        }
        None => None,
    };
    let mut preferred = config.clone();
    preferred.alpn_protocols = match protocol {
        Protocol::H2 => vec![b"h2".to_vec()],
        Protocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
    };
    let mut http1 = config;
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    hash.update(&[protocol as u8]);
    Ok(Connectors {
        preferred: TlsConnector::from(Arc::new(preferred)),
        http1: TlsConnector::from(Arc::new(http1)),
        fingerprint: *hash.finalize().as_bytes(),
        server_name,
    })
}

/// Why a handshake failed, for the log line of the 502: the certificate's fault in plain
/// words, else rustls' own.
pub fn reason(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not valid yet".into()
            }
            CertificateError::UnknownIssuer => {
                "certificate has an unknown issuer (not signed by a trusted root)".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("name mismatch: {c:?}")
            }
            other => format!("invalid certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!(
                "the target ended the handshake with alert {alert:?} (a client certificate it wants?)"
            )
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_in_plain_words() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            reason(&io(rustls::Error::InvalidCertificate(
                CertificateError::Expired
            ))),
            "certificate expired"
        );
        assert!(
            reason(&io(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )))
            .contains("unknown issuer")
        );
        assert!(
            reason(&io(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            )))
            .starts_with("name mismatch")
        );
        assert_eq!(reason(&std::io::Error::other("reset")), "reset");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = UpstreamTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..UpstreamTls::default()
        };
        let e = connectors("api", &tls, Protocol::Auto).err().unwrap();
        let text = e.to_string();
        assert!(
            text.contains("upstream \"api\"") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }
}
