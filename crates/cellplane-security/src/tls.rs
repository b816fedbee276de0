//! TLS material from PEM files, turned into tonic's server and client settings, and
//! the identity a TLS peer proved.
//!
//! Every process of an environment trusts one CA (`cellplane certs generate` makes
//! it). A process presents its own certificate both as a server and, when it dials
//! another process, as a client: members to their peers and to each other's client
//! ports, routers to cells and to the directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::codegen::http::Extensions;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};

use crate::identity::{Identity, IdentityError};

/// How long a TLS handshake may take before the connection is dropped (a client
/// that opens a socket and sends nothing holds no server task beyond this).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest PEM file read (a certificate chain or key is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Where a process's TLS files are, as written in `cells/*.toml` and
/// `cells/routers.toml` (paths relative to that file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA every certificate of the environment chains to.
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Loaded TLS material of one process.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("TlsMaterial { .. }")
    }
}

/// Whether a server requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a certificate from the CA (members' ports).
    Required,
    /// A certificate is checked when sent; clients may instead authenticate with
    /// a token (the router's client port).
    Optional,
}

pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(read)?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            message: format!("larger than {MAX_PEM_BYTES} bytes: not a PEM file"),
        });
    }
    Ok(buf)
}

fn check_pem(path: &Path, bytes: &[u8], label: &str) -> Result<(), TlsError> {
    let text = String::from_utf8_lossy(bytes);
    if !text.contains(&format!("-----BEGIN {label}")) {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            message: format!("holds no PEM `{label}` block"),
        });
    }
    Ok(())
}

impl TlsFiles {
    /// The same files with relative paths taken from `base` (the folder of the
    /// file that named them).
    pub fn resolved(&self, base: &Path) -> TlsFiles {
        TlsFiles {
            ca: base.join(&self.ca),
            cert: base.join(&self.cert),
            key: base.join(&self.key),
        }
    }

    /// Reads the three files and checks they hold what they should.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read_bounded(&self.ca)?;
        check_pem(&self.ca, &ca_pem, "CERTIFICATE")?;
        let cert_pem = read_bounded(&self.cert)?;
        check_pem(&self.cert, &cert_pem, "CERTIFICATE")?;
        let key_pem = read_bounded(&self.key)?;
        check_pem(&self.key, &key_pem, "PRIVATE KEY")?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }
}

impl TlsMaterial {
    /// Server settings: this process's certificate, the CA for client
    /// certificates, and whether one is required.
    pub fn server(&self, auth: ClientAuth) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(auth == ClientAuth::Optional)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Client settings: trust the CA, present this process's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The identity this process's own certificate names.
    pub fn own_identity(&self) -> Result<Identity, IdentityError> {
        let der = first_pem_block(&self.cert_pem)
            .ok_or_else(|| IdentityError::BadCertificate("no certificate in PEM".into()))?;
        Identity::from_certificate(&der)
    }
}

/// Client settings that trust `ca` and present no certificate (a tenant's or
/// etcdctl-like client that authenticates by password).
pub fn client_trusting(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .timeout(HANDSHAKE_TIMEOUT)
}

/// A gRPC endpoint for `addr` (`host:port`, or a URL whose scheme is replaced):
/// `https://` with `tls`, `http://` without. The one place an address becomes an
/// endpoint, so TLS cannot be forgotten on one path.
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let host_port = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{host_port}"))?.tls_config(tls.clone()),
        None => Endpoint::from_shared(format!("http://{host_port}")),
    }
}

/// The DER bytes of the first PEM block.
pub fn first_pem_block(pem: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")?;
    let body_start = start + text[start..].find('\n')? + 1;
    let body_end = body_start + text[body_start..].find("-----END ")?;
    let b64: String = text[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// What a peer proved over TLS: `None` on a plaintext connection or when it sent
/// no certificate; else the identity its certificate names, or why it names none.
pub fn peer_identity(ext: &Extensions) -> Option<Result<Identity, IdentityError>> {
    let certs = ext
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())?;
    let leaf = certs.first()?;
    Some(IdentityCache::global().identity(leaf.as_ref()))
}

/// Recently seen certificates and the identities they name, so a connection's
/// requests do not each parse its certificate again. Bounded: cleared when full.
struct IdentityCache {
    seen: Mutex<HashMap<Vec<u8>, Result<Identity, IdentityError>>>,
}

const IDENTITY_CACHE_ENTRIES: usize = 4096;

impl IdentityCache {
    fn global() -> &'static IdentityCache {
        static CACHE: std::sync::OnceLock<IdentityCache> = std::sync::OnceLock::new();
        CACHE.get_or_init(|| IdentityCache {
            seen: Mutex::new(HashMap::new()),
        })
    }

    fn identity(&self, der: &[u8]) -> Result<Identity, IdentityError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = seen.get(der) {
            return found.clone();
        }
        let id = Identity::from_certificate(der);
        if seen.len() >= IDENTITY_CACHE_ENTRIES {
            seen.clear();
        }
        seen.insert(der.to_vec(), id.clone());
        id
    }
}
