//! Password credentials of tenants and operators: a TOML file of argon2id hashes
//! (never passwords), named by `cells/routers.toml` and managed with
//! `cellplane tenant add|remove|list`.
//!
//! ```toml
//! [[users]]
//! name = "acme"
//! role = "tenant"
//! hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! ```
//!
//! Checking a password costs an argon2 hash (tens of milliseconds of CPU and
//! 19 MiB, by design); callers bound how many run at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::identity::{Identity, IdentityError, check_tenant_name};

/// Most users one file may hold.
pub const MAX_USERS: usize = 100_000;
/// Largest credentials file read.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Longest password accepted (argon2 takes any length; this bounds the work a
/// request can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// What a password proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Tenant,
    Operator,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Tenant => "tenant",
            Role::Operator => "operator",
        })
    }
}

/// One user of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub role: Role,
    /// The argon2 hash in PHC string form.
    pub hash: String,
}

impl Credential {
    /// The identity this credential proves.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        match self.role {
            Role::Tenant => Identity::tenant(&self.name),
            Role::Operator => Identity::operator(&self.name),
        }
    }

    /// A short digest of the hash: changes whenever the password does, so a token
    /// issued before a password change (or a removal) is no longer accepted.
    pub fn fingerprint(&self) -> String {
        let d = sha2::Sha256::digest(self.hash.as_bytes());
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The credentials file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[serde(default)]
    pub users: Vec<Credential>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
}

/// Why a password was not accepted. One message for an unknown user and a wrong
/// password, as etcd: which one it was is nobody's business.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    Failed,
}

fn hasher() -> Argon2<'static> {
    Argon2::default()
}

/// A hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, CredentialError> {
    if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
        return Err(CredentialError::Refused(format!(
            "a password must be 1 to {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| CredentialError::Refused(format!("cannot make a salt: {e}")))?;
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CredentialError::Refused(format!("cannot hash the password: {e}")))
}

impl Credentials {
    /// Reads and checks a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, CredentialError> {
        use std::io::Read;
        let read = |source| CredentialError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        let invalid = |message: String| CredentialError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(invalid(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let creds: Credentials = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        creds.check().map_err(invalid)?;
        Ok(creds)
    }

    /// Reads the file, or an empty set when it does not exist yet.
    pub fn load_or_empty(path: &Path) -> Result<Credentials, CredentialError> {
        if path.exists() {
            Credentials::load(path)
        } else {
            Ok(Credentials::default())
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.users.len() > MAX_USERS {
            return Err(format!("more than {MAX_USERS} users"));
        }
        let mut names = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            u.identity()
                .map_err(|e| format!("field `users[{i}].name`: {e}"))?;
            if !names.insert(u.name.as_str()) {
                return Err(format!(
                    "field `users[{i}].name`: {:?} is listed twice",
                    u.name
                ));
            }
            PasswordHash::new(&u.hash)
                .map_err(|e| format!("field `users[{i}].hash`: not an argon2 hash: {e}"))?;
        }
        Ok(())
    }

    /// Writes the file atomically (temporary file, fsync, rename), readable by its
    /// owner only.
    pub fn save(&self, path: &Path) -> Result<(), CredentialError> {
        let write = |source| CredentialError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text = format!(
            "# cellplane credentials: managed by `cellplane tenant add|remove|list`.\n\
             # argon2id hashes, never passwords. Routers reload this file when it changes.\n{}",
            toml::to_string_pretty(self).map_err(|e| CredentialError::Refused(e.to_string()))?
        );
        crate::write_private(path, text.as_bytes()).map_err(write)
    }

    /// Adds a user, or replaces its password and role when `replace`.
    pub fn add(
        &mut self,
        name: &str,
        role: Role,
        password: &str,
        replace: bool,
    ) -> Result<(), CredentialError> {
        let user = Credential {
            name: name.to_string(),
            role,
            hash: String::new(),
        };
        user.identity()
            .map_err(|e| CredentialError::Refused(e.to_string()))?;
        let hash = hash_password(password)?;
        let count = self.users.len();
        match self.users.iter_mut().find(|u| u.name == name) {
            Some(_) if !replace => Err(CredentialError::Refused(format!(
                "user {name:?} exists: use --replace to change its password"
            ))),
            Some(u) => {
                u.role = role;
                u.hash = hash;
                Ok(())
            }
            None if count >= MAX_USERS => Err(CredentialError::Refused(format!(
                "the file already holds {MAX_USERS} users"
            ))),
            None => {
                self.users.push(Credential { hash, ..user });
                Ok(())
            }
        }
    }

    /// Removes a user; whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.users.len();
        self.users.retain(|u| u.name != name);
        self.users.len() != before
    }

    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Checks a password. Costs one argon2 hash whether or not the user exists,
    /// so timing does not tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> Result<&Credential, AuthError> {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthError::Failed);
        }
        let user = self.get(name);
        let hash = match user {
            Some(u) => u.hash.as_str(),
            None => DUMMY
                .get_or_init(|| hash_password("not a password").unwrap_or_default())
                .as_str(),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| hasher().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        match user {
            Some(u) if ok => Ok(u),
            _ => Err(AuthError::Failed),
        }
    }
}

/// Check that `name` could be a tenant (used by the CLI before hashing).
pub fn check_user_name(role: Role, name: &str) -> Result<(), IdentityError> {
    match role {
        Role::Tenant => check_tenant_name(name),
        Role::Operator => Identity::operator(name).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_remove_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let mut c = Credentials::load_or_empty(&path).unwrap();
        c.add("acme", Role::Tenant, "s3cret", false).unwrap();
        c.add("alice", Role::Operator, "root-pw", false).unwrap();
        assert!(c.add("acme", Role::Tenant, "x", false).is_err());
        assert!(c.add("_sys", Role::Tenant, "x", false).is_err());
        c.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cret"), "a password was written: {text}");

        let c = Credentials::load(&path).unwrap();
        let u = c.verify("acme", "s3cret").unwrap();
        assert_eq!(u.identity(), Ok(Identity::Tenant("acme".into())));
        assert_eq!(c.verify("acme", "wrong"), Err(AuthError::Failed));
        assert_eq!(c.verify("nobody", "s3cret"), Err(AuthError::Failed));
        assert_eq!(
            c.verify("alice", "root-pw").unwrap().identity(),
            Ok(Identity::Operator("alice".into()))
        );

        let mut c = c;
        let before = c.get("acme").unwrap().fingerprint();
        c.add("acme", Role::Tenant, "new", true).unwrap();
        assert_ne!(c.get("acme").unwrap().fingerprint(), before);
        assert!(c.remove("acme"));
        assert!(!c.remove("acme"));
    }

    #[test]
    fn a_bad_file_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[users]]\nname = \"a\"\nrole = \"tenant\"\nhash = \"plain\"\n",
        )
        .unwrap();
        let e = Credentials::load(&path).unwrap_err().to_string();
        assert!(e.contains("users[0].hash"), "{e}");
        std::fs::write(
            &path,
            "[[users]]\nname = \"a b\"\nrole = \"tenant\"\nhash = \"x\"\n",
        )
        .unwrap();
        let e = Credentials::load(&path).unwrap_err().to_string();
        assert!(e.contains("users[0].name"), "{e}");
    }
}
