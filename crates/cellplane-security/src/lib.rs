//! Who a caller is and how that is proven: the security primitives every
//! cellplane process shares.
//!
//! - [`identity`]: [`Identity`] (anonymous, tenant, operator, router, member) and
//!   the `cellplane://` URIs certificates carry it in; tenant-name rules.
//! - [`tls`]: PEM files → tonic's server and client TLS settings (rustls with the
//!   ring provider); the identity a TLS peer proved.
//! - [`issue`]: a certificate authority (rcgen) for `cellplane certs`.
//! - [`credentials`]: tenants' and operators' argon2 password hashes.
//! - [`token`]: the HMAC-signed tokens of etcd's auth flow.
//!
//! Depends on no other cellplane crate. Writes no crypto of its own: TLS is
//! rustls, hashes are argon2 and HMAC-SHA256 from RustCrypto.

#![forbid(unsafe_code)]

pub mod credentials;
pub mod identity;
pub mod issue;
pub mod tls;
pub mod token;

pub use credentials::{AuthError, Credentials, Role};
pub use identity::{Identity, IdentityError, check_tenant_name};
pub use tls::{ClientAuth, TlsFiles, TlsMaterial, endpoint, peer_identity};
pub use token::{Claims, TokenError, TokenKeys};

use std::path::Path;

/// Writes a secret file atomically (temporary file, fsync, rename), readable by
/// its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
