//! TLS for network destinations (`tls:HOST:PORT`), with rustls and the `ring` provider.
//!
//! The server's certificate is always verified: against the CA file given with
//! `--tls-ca` when there is one (it then is the only trust anchor, as a fleet with its
//! own CA wants), else against the system's store (`/etc/ssl/certs`). There is no way to
//! turn verification off. A client certificate is sent when `--tls-cert` and
//! `--tls-key` are given. Handshake failures become one line that says what to do.

use std::{
    io,
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The files `--tls-ca`, `--tls-cert` and `--tls-key` name.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// The client configuration every TLS destination shares; read once at start so a bad
/// file fails then, not at the first connection.
pub fn client_config(files: &TlsFiles) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            let certs = read_certs(path, "--tls-ca")?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "--tls-ca {}: no usable CA certificate in it; give the PEM file of the CA \
                     that signed the server's certificate",
                    path.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no CA certificates in the system store (install the ca-certificates \
                     package), or give the CA of your relay with --tls-ca FILE"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "--tls-cert")?;
            if chain.is_empty() {
                bail!(
                    "--tls-cert {}: no certificate in it; give the client certificate as PEM",
                    cert.display()
                );
            }
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                anyhow::anyhow!(
                    "--tls-key {}: no private key read ({e}); give the client key as PEM \
                     (PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                )
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                anyhow::anyhow!(
                    "--tls-cert {} and --tls-key {} do not go together ({e}); give the key \
                         of that certificate",
                    cert.display(),
                    key.display()
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => bail!("--tls-cert needs --tls-key (the certificate's private key)"),
        (None, Some(_)) => bail!("--tls-key needs --tls-cert (the client certificate)"),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: cannot read it ({e}); give a PEM file",
            path.display()
        )
    })?;
    iter.collect::<Result<Vec<_>, _>>().map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: not a PEM certificate file ({e}); give a PEM file",
            path.display()
        )
    })
}

/// Why a TLS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server's certificate, or ours, was refused: a configuration mistake that
    /// retrying does not mend.
    #[error("{0}")]
    Certificate(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Complete a TLS handshake on `tcp` with the server `addr` (`HOST:PORT`, the name
/// checked against the certificate is HOST).
pub fn handshake(
    tcp: TcpStream,
    addr: &str,
    config: &Arc<ClientConfig>,
) -> Result<TlsStream, TlsError> {
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_owned()).map_err(|_| {
        TlsError::Certificate(format!(
            "tls:{addr}: `{host}` is neither a DNS name nor an IP address; use the name the \
             server's certificate was issued for"
        ))
    })?;
    let mut conn = ClientConnection::new(config.clone(), name)
        .map_err(|e| TlsError::Io(io::Error::other(format!("tls:{addr}: setting up TLS: {e}"))))?;
    let mut tcp = tcp;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Err(explain(addr, e));
        }
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// One line for a failed handshake, saying what to do.
fn explain(addr: &str, e: io::Error) -> TlsError {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let host = host_of(addr);
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return TlsError::Io(io::Error::new(
            e.kind(),
            format!("tls:{addr}: TLS handshake failed: {e}"),
        ));
    };
    let msg = match tls {
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "tls:{addr}: the server's certificate is not signed by a CA portwatch trusts; \
             give the CA that signed it with --tls-ca FILE (PEM)"
        ),
        // A trusted CA of the same name that did not sign it (another CA, or re-keyed).
        E::InvalidCertificate(C::BadSignature) => format!(
            "tls:{addr}: the server's certificate is not signed by a CA portwatch trusts (a \
             trusted CA has the issuer's name but not its key); give the CA that signed it \
             with --tls-ca FILE (PEM)"
        ),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "tls:{addr}: the server's certificate is not valid for the name `{host}`; connect \
             with a name the certificate lists (subjectAltName), or reissue it for `{host}`"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("tls:{addr}: the server's certificate has expired; renew it on the server")
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => format!(
            "tls:{addr}: the server's certificate is not valid yet; check the clocks of both \
             hosts"
        ),
        E::InvalidCertificate(other) => format!(
            "tls:{addr}: the server's certificate was refused ({other:?}); inspect it with \
             `openssl s_client -connect {addr}`"
        ),
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::AccessDenied),
        ) => format!(
            "tls:{addr}: the server refused our client certificate ({a:?}); give one it \
             trusts with --tls-cert FILE and --tls-key FILE"
        ),
        other => {
            return TlsError::Io(io::Error::other(format!(
                "tls:{addr}: TLS handshake failed: {other}"
            )));
        }
    };
    TlsError::Certificate(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("relay.example:6514"), "relay.example");
        assert_eq!(host_of("[::1]:6514"), "::1");
        assert_eq!(host_of("127.0.0.1:6514"), "127.0.0.1");
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        for files in [
            TlsFiles {
                ca: Some(junk.clone()),
                ..TlsFiles::default()
            },
            TlsFiles {
                ca: Some(dir.path().join("missing.pem")),
                ..TlsFiles::default()
            },
            TlsFiles {
                cert: Some(junk.clone()),
                ..TlsFiles::default()
            },
        ] {
            let e = format!("{:#}", client_config(&files).err().unwrap());
            assert!(!e.contains('\n') && e.contains("--tls-"), "{e}");
        }
    }
}
