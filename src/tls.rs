//! TLS at both ends, with rustls and its `ring` provider: the server's certificate and key,
//! read from PEM files and reloaded in place (SIGHUP), and the daemon's trust roots (the
//! operating system's, plus a private CA).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// TLS 1.3 and 1.2, at both ends: nothing older.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// What the server offers by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The largest PEM file read for a certificate chain or a key: a chain is a few KiB, so
/// anything near this is not one (a device, a log file), and reading it whole would stall.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Pem {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("{0}: larger than {MAX_PEM_BYTES} bytes, not a certificate chain or a key")]
    TooLarge(PathBuf),
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    #[error("the key does not go with the certificate, or is of a kind not supported: {0}")]
    Key(rustls::Error),
    #[error("{0}")]
    Config(rustls::Error),
}

/// The one provider both ends use, named rather than taken from the process default, which
/// another crate in the build could set differently.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate chain and key, from two PEM files; [`reload`](Self::reload)
/// reads them again. Every handshake takes the pair in force when it starts, so a reload
/// never touches a connection already up.
#[derive(Debug)]
pub struct ServerCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertificate {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let current = read_pair(cert_path, key_path)?;
        Ok(Arc::new(ServerCertificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(current)),
        }))
    }

    /// Reads both files again and, if they make a good pair, serves it from the next
    /// handshake on. A bad pair (unreadable, not PEM, a key for another certificate) changes
    /// nothing: the pair in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(read_pair(&self.cert_path, &self.key_path)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// A rustls server configuration that serves this certificate: TLS 1.2 and 1.3, HTTP/2
    /// and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// The chain in `cert_path` (leaf first) and the key in `key_path`, checked to match.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |error| TlsError::Pem { path, error }
    };
    let chain = CertificateDer::pem_slice_iter(&read_pem_file(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert_path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&read_pem_file(key_path)?).map_err(pem_error(key_path))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Key)
}

/// The bytes of a PEM file, never blocking on what is not one: opened without waiting (a
/// FIFO would block the open until a writer came), refused unless it is a regular file
/// (a FIFO, a device such as `/dev/zero` behind a symlink), and read to at most
/// [`MAX_PEM_BYTES`] (also if it grows while read).
fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read_error = |error| TlsError::Read {
        path: path.to_owned(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(TlsError::NotAFile(path.to_owned()));
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge(path.to_owned()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge(path.to_owned()));
    }
    Ok(bytes)
}

/// A client configuration for a connector that never makes a TLS connection.
pub fn client_config_trusting_nothing() -> Result<ClientConfig, TlsError> {
    client_trusting(RootCertStore::empty())
}

/// The daemon's client configuration: the operating system's roots plus every certificate
/// in `ca_cert`, TLS 1.2 and 1.3, no client certificate.
pub fn client_config(ca_cert: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "skipping a system root certificate store");
    }
    // A malformed system root is skipped, not fatal: the others still verify.
    let (_, skipped) = roots.add_parsable_certificates(native.certs);
    if skipped > 0 {
        tracing::debug!(skipped, "system root certificates rustls cannot use");
    }
    if let Some(path) = ca_cert {
        let pem_error = |error| TlsError::Pem {
            path: path.to_owned(),
            error,
        };
        let certs = CertificateDer::pem_slice_iter(&read_pem_file(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(path.to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(TlsError::Config)?;
        }
    }
    client_trusting(roots)
}

/// TLS 1.2 and 1.3, trusting `roots`, no client certificate.
fn client_trusting(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
