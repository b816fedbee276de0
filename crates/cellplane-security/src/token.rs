//! The tokens a router returns from etcd's `Auth/Authenticate` and accepts in the
//! `token` metadata that etcd clients send with every later request.
//!
//! Format: `cp1.<payload>.<mac>`, both parts base64url without padding; the
//! payload is JSON claims, the MAC HMAC-SHA256 over `cp1.<payload>` with the
//! environment's token key. Every router of an environment holds the same key
//! file, so a client may reconnect to any router with its token. The file holds
//! one key per line (64 hex digits): the first signs, every one verifies, so a key
//! is rotated by putting a new one first and removing the old one a token
//! lifetime later.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::credentials::Role;

const PREFIX: &str = "cp1.";
/// Longest token looked at; anything longer is refused unread.
pub const MAX_TOKEN_BYTES: usize = 2048;
/// Most keys a key file may hold.
const MAX_KEYS: usize = 16;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The user name.
    pub sub: String,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The credential's fingerprint when the token was issued.
    pub fp: String,
}

/// Why a token is not accepted. etcd clients re-authenticate on exactly etcd's
/// message, so both cases use it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("etcdserver: invalid auth token")]
    Invalid,
    #[error("etcdserver: invalid auth token")]
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

/// The token keys of an environment.
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKeys({} key(s))", self.keys.len())
    }
}

fn hex_key(line: &str) -> Option<[u8; 32]> {
    if line.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(line.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// A fresh key as the key file writes it (64 hex digits and a newline).
pub fn new_key_line() -> String {
    let key: [u8; 32] = rand::random();
    let mut s: String = key.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

impl TokenKeys {
    /// Reads a key file: one key per line, blank lines and `#` comments skipped.
    pub fn load(path: &Path) -> Result<TokenKeys, KeyFileError> {
        let bytes = crate::tls::read_bounded(path).map_err(|e| match e {
            crate::tls::TlsError::Read { path, source } => KeyFileError::Read { path, source },
            crate::tls::TlsError::Invalid { path, message } => {
                KeyFileError::Invalid { path, message }
            }
        })?;
        let invalid = |message: String| KeyFileError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = hex_key(line)
                .ok_or_else(|| invalid(format!("line {}: a key is 64 hex digits", n + 1)))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(invalid("holds no key".into()));
        }
        if keys.len() > MAX_KEYS {
            return Err(invalid(format!("holds more than {MAX_KEYS} keys")));
        }
        Ok(TokenKeys { keys })
    }

    /// Keys from raw bytes (tests).
    pub fn from_keys(keys: Vec<[u8; 32]>) -> TokenKeys {
        TokenKeys { keys }
    }

    fn mac(key: &[u8; 32], signed: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(signed.as_bytes());
        mac
    }

    /// A signed token carrying `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("{PREFIX}{payload}");
        let tag = Self::mac(&self.keys[0], &signed).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims of a token signed by one of the keys and not expired at `now`
    /// (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES || !token.starts_with(PREFIX) {
            return Err(TokenError::Invalid);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Invalid)?;
        // Constant-time comparison, against every key.
        if !self
            .keys
            .iter()
            .any(|k| Self::mac(k, signed).verify_slice(&tag).is_ok())
        {
            return Err(TokenError::Invalid);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| TokenError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Invalid)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "acme".into(),
            role: Role::Tenant,
            exp,
            fp: "00ff".into(),
        }
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let keys = TokenKeys::from_keys(vec![[7; 32]]);
        let t = keys.issue(&claims(100));
        assert_eq!(keys.verify(&t, 99), Ok(claims(100)));
        assert_eq!(keys.verify(&t, 100), Err(TokenError::Expired));
    }

    #[test]
    fn forged_or_foreign_tokens_are_refused() {
        let keys = TokenKeys::from_keys(vec![[7; 32]]);
        let other = TokenKeys::from_keys(vec![[8; 32]]);
        let t = other.issue(&claims(100));
        assert_eq!(keys.verify(&t, 1), Err(TokenError::Invalid));
        // A changed payload with the old MAC.
        let good = keys.issue(&claims(100));
        let (signed, tag) = good.rsplit_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                role: Role::Operator,
                ..claims(100)
            })
            .unwrap(),
        );
        let forged = format!("{PREFIX}{forged_payload}.{tag}");
        assert_ne!(signed, &forged[..forged.len() - tag.len() - 1]);
        assert_eq!(keys.verify(&forged, 1), Err(TokenError::Invalid));
        for junk in ["", "cp1.", "cp1..", "x.y.z", &"a".repeat(5000)] {
            assert_eq!(keys.verify(junk, 1), Err(TokenError::Invalid), "{junk}");
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_the_old_key_is_listed() {
        let old = TokenKeys::from_keys(vec![[1; 32]]);
        let t = old.issue(&claims(100));
        let rotated = TokenKeys::from_keys(vec![[2; 32], [1; 32]]);
        assert!(rotated.verify(&t, 1).is_ok());
        let new_only = TokenKeys::from_keys(vec![[2; 32]]);
        assert_eq!(new_only.verify(&t, 1), Err(TokenError::Invalid));
    }

    #[test]
    fn key_files_parse_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token.key");
        std::fs::write(
            &p,
            format!("# comment\n{}{}", new_key_line(), new_key_line()),
        )
        .unwrap();
        assert_eq!(TokenKeys::load(&p).unwrap().keys.len(), 2);
        std::fs::write(&p, "abc\n").unwrap();
        assert!(
            TokenKeys::load(&p)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        std::fs::write(&p, "").unwrap();
        assert!(TokenKeys::load(&p).is_err());
    }
}
