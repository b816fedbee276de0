//! Who is calling the router: a client certificate's identity, or a token from
//! etcd's auth flow (`Auth/Authenticate` with a tenant's or an operator's
//! password, then the `token` metadata etcd clients send with every request).
//!
//! With auth on, a request that proves nothing is refused with UNAUTHENTICATED.
//! With auth off (the local default) it is anonymous, and its tenant is the one
//! its metadata or its keys name; a client certificate still proves who it is.
//!
//! Password checks are argon2 hashes: deliberately costly, so at most
//! `max_concurrent_logins` run at once, on blocking threads, and a burst of logins
//! beyond that waits briefly and is then refused (RESOURCE_EXHAUSTED) rather than
//! queue without bound. The credentials and token-key files are read again when
//! they change, so `cellplane tenant add|remove` takes effect on running routers;
//! a file that no longer parses is reported and the last good one kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellplane_security::credentials::Credentials;
use cellplane_security::{Claims, Identity, TokenKeys};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codegen::http::Extensions;
use tonic::metadata::MetadataMap;

/// The metadata etcd clients carry their token in.
pub const TOKEN_METADATA: &str = "token";

/// How long a login waits for a free slot before it is refused.
const LOGIN_WAIT: Duration = Duration::from_secs(2);

/// The `[auth]` section of `cells/routers.toml` (paths relative to that file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Every request must prove an identity (a client certificate or a token).
    pub enabled: bool,
    /// The credentials file (`cellplane tenant add` writes it).
    pub credentials: PathBuf,
    /// The token key file: one 64-hex-digit key per line, the first signs.
    pub token_key: PathBuf,
    /// How long a token from `Authenticate` is valid.
    pub token_ttl_secs: u64,
    /// Password checks running at once (each costs an argon2 hash).
    pub max_concurrent_logins: usize,
    /// How often the credentials and key files are checked for changes.
    pub reload_ms: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            enabled: false,
            credentials: PathBuf::from("secrets/credentials.toml"),
            token_key: PathBuf::from("secrets/token.key"),
            token_ttl_secs: 600,
            max_concurrent_logins: 2,
            reload_ms: 2_000,
        }
    }
}

impl AuthSettings {
    /// Refuses values that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("auth.token_ttl_secs", self.token_ttl_secs),
            (
                "auth.max_concurrent_logins",
                self.max_concurrent_logins as u64,
            ),
            ("auth.reload_ms", self.reload_ms),
        ] {
            if v == 0 {
                return Err(format!("field `{field}`: must be > 0"));
            }
        }
        if self.token_ttl_secs > 7 * 86_400 {
            return Err("field `auth.token_ttl_secs`: at most 604800 (a week)".into());
        }
        if self.max_concurrent_logins > 64 {
            return Err("field `auth.max_concurrent_logins`: at most 64".into());
        }
        Ok(())
    }

    /// The same settings with relative paths taken from `base`.
    pub fn resolved(&self, base: &Path) -> AuthSettings {
        AuthSettings {
            credentials: base.join(&self.credentials),
            token_key: base.join(&self.token_key),
            ..self.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Credentials(#[from] cellplane_security::credentials::CredentialError),
    #[error(transparent)]
    Keys(#[from] cellplane_security::token::KeyFileError),
}

/// The files in force, and when they were read.
struct Loaded {
    credentials: Arc<Credentials>,
    keys: Arc<TokenKeys>,
    /// (modified, length) of each file when read, to notice changes cheaply.
    stamps: [Option<(SystemTime, u64)>; 2],
}

/// Counters for `/metrics` and `status`.
#[derive(Default)]
pub struct AuthStats {
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub logins_refused_busy: AtomicU64,
    pub reload_errors: AtomicU64,
}

pub struct Authenticator {
    settings: AuthSettings,
    loaded: Option<RwLock<Loaded>>,
    logins: Semaphore,
    pub stats: AuthStats,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authenticator {
    /// Auth off: every caller without a certificate is anonymous.
    pub fn disabled() -> Authenticator {
        Authenticator {
            settings: AuthSettings::default(),
            loaded: None,
            logins: Semaphore::new(1),
            stats: AuthStats::default(),
        }
    }

    /// Auth as configured: with `enabled`, the credentials and key files must load.
    pub fn new(settings: AuthSettings) -> Result<Authenticator, AuthSetupError> {
        if !settings.enabled {
            return Ok(Authenticator::disabled());
        }
        let loaded = Loaded {
            credentials: Arc::new(Credentials::load(&settings.credentials)?),
            keys: Arc::new(TokenKeys::load(&settings.token_key)?),
            stamps: [stamp(&settings.credentials), stamp(&settings.token_key)],
        };
        Ok(Authenticator {
            logins: Semaphore::new(settings.max_concurrent_logins),
            settings,
            loaded: Some(RwLock::new(loaded)),
            stats: AuthStats::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.loaded.is_some()
    }

    fn current(&self) -> Option<(Arc<Credentials>, Arc<TokenKeys>)> {
        let l = self
            .loaded
            .as_ref()?
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Some((l.credentials.clone(), l.keys.clone()))
    }

    /// etcd's `Authenticate`: a token for a correct password.
    pub async fn login(&self, name: &str, password: &str) -> Result<String, Status> {
        let Some((creds, keys)) = self.current() else {
            return Err(Status::failed_precondition(
                "etcdserver: authentication is not enabled",
            ));
        };
        let permit = match tokio::time::timeout(LOGIN_WAIT, self.logins.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                self.stats
                    .logins_refused_busy
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Status::resource_exhausted(
                    "too many logins at once on this router: retry shortly (each password \
                     check is deliberately costly)",
                ));
            }
        };
        let (name, password) = (name.to_string(), password.to_string());
        let checked = tokio::task::spawn_blocking(move || {
            creds
                .verify(&name, &password)
                .map(|u| (u.name.clone(), u.role, u.fingerprint()))
        })
        .await
        .map_err(|e| Status::internal(format!("password check failed: {e}")))?;
        drop(permit);
        match checked {
            Ok((sub, role, fp)) => {
                self.stats.logins_ok.fetch_add(1, Ordering::Relaxed);
                Ok(keys.issue(&Claims {
                    sub,
                    role,
                    exp: now_secs() + self.settings.token_ttl_secs,
                    fp,
                }))
            }
            Err(e) => {
                self.stats.logins_failed.fetch_add(1, Ordering::Relaxed);
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }

    /// The identity a request proves: its client certificate's, else its token's;
    /// anonymous with auth off. Refuses a request that proves nothing with auth
    /// on, and a bad certificate or token always.
    pub fn identify(&self, ext: &Extensions, meta: &MetadataMap) -> Result<Identity, Status> {
        if let Some(proven) = cellplane_security::peer_identity(ext) {
            return proven.map_err(|e| Status::permission_denied(e.to_string()));
        }
        let Some((creds, keys)) = self.current() else {
            return Ok(Identity::Anonymous);
        };
        let Some(token) = meta.get(TOKEN_METADATA) else {
            return Err(Status::unauthenticated(
                "authentication is required: present a client certificate, or log in with a \
                 password (etcdctl --user <tenant>:<password>)",
            ));
        };
        let invalid = || Status::unauthenticated("etcdserver: invalid auth token");
        let token = token.to_str().map_err(|_| invalid())?;
        let claims = keys.verify(token, now_secs()).map_err(|_| invalid())?;
        // Still a user, with the same password and role as when the token was
        // issued: removing a user or changing a password revokes its tokens.
        let user = creds.get(&claims.sub).ok_or_else(invalid)?;
        if user.fingerprint() != claims.fp || user.role != claims.role {
            return Err(invalid());
        }
        user.identity().map_err(|_| invalid())
    }

    /// Reads the credentials and key files again whenever they change, until
    /// `shutdown`. A file that no longer loads is logged and counted; the last
    /// good one stays in force.
    pub async fn reload_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(loaded) = &self.loaded else { return };
        let mut tick = tokio::time::interval(Duration::from_millis(self.settings.reload_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let stamps = [
                stamp(&self.settings.credentials),
                stamp(&self.settings.token_key),
            ];
            let before = loaded.read().unwrap_or_else(|p| p.into_inner()).stamps;
            if stamps == before {
                continue;
            }
            let fresh = Credentials::load(&self.settings.credentials)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    TokenKeys::load(&self.settings.token_key)
                        .map(|k| (c, k))
                        .map_err(|e| e.to_string())
                });
            let mut l = loaded.write().unwrap_or_else(|p| p.into_inner());
            l.stamps = stamps;
            match fresh {
                Ok((c, k)) => {
                    tracing::info!(
                        users = c.users.len(),
                        "reloaded the credentials and token keys"
                    );
                    l.credentials = Arc::new(c);
                    l.keys = Arc::new(k);
                }
                Err(e) => {
                    self.stats.reload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "cannot reload credentials: keeping the last good ones");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_security::Role;

    fn setup(dir: &Path) -> AuthSettings {
        let settings = AuthSettings {
            enabled: true,
            reload_ms: 10,
            ..AuthSettings::default()
        }
        .resolved(dir);
        std::fs::create_dir_all(settings.credentials.parent().unwrap()).unwrap();
        let mut c = Credentials::default();
        c.add("acme", Role::Tenant, "pw", false).unwrap();
        c.add("ops", Role::Operator, "root", false).unwrap();
        c.save(&settings.credentials).unwrap();
        std::fs::write(
            &settings.token_key,
            cellplane_security::token::new_key_line(),
        )
        .unwrap();
        settings
    }

    fn with_token(t: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(TOKEN_METADATA, t.parse().unwrap());
        m
    }

    #[tokio::test]
    async fn tokens_prove_identities_until_their_user_changes() {
        let dir = tempfile::tempdir().unwrap();
        let settings = setup(dir.path());
        let auth = Arc::new(Authenticator::new(settings.clone()).unwrap());
        let ext = Extensions::new();

        let e = auth.identify(&ext, &MetadataMap::new()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth.login("acme", "nope").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let t = auth.login("acme", "pw").await.unwrap();
        assert_eq!(
            auth.identify(&ext, &with_token(&t)).unwrap(),
            Identity::Tenant("acme".into())
        );
        let o = auth.login("ops", "root").await.unwrap();
        assert_eq!(
            auth.identify(&ext, &with_token(&o)).unwrap(),
            Identity::Operator("ops".into())
        );
        let forged = format!("{}x", &t[..t.len() - 1]);
        assert_eq!(
            auth.identify(&ext, &with_token(&forged))
                .unwrap_err()
                .message(),
            "etcdserver: invalid auth token"
        );

        // A password change, picked up by the reload, revokes the old token.
        let stop = CancellationToken::new();
        tokio::spawn(auth.clone().reload_loop(stop.clone()));
        let mut c = Credentials::load(&settings.credentials).unwrap();
        c.add("acme", Role::Tenant, "pw2", true).unwrap();
        // A later modification time than the first write's, whatever the clock.
        std::thread::sleep(Duration::from_millis(20));
        c.save(&settings.credentials).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while auth.identify(&ext, &with_token(&t)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "old token still valid"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn auth_off_is_anonymous_and_refuses_logins() {
        let auth = Authenticator::disabled();
        assert_eq!(
            auth.identify(&Extensions::new(), &with_token("cp1.x.y"))
                .unwrap(),
            Identity::Anonymous
        );
        assert_eq!(
            auth.login("a", "b").await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }
}
