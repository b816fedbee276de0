//! The routers of an environment, as defined in `cells/routers.toml`.
//!
//! ```toml
//! directory = "directory"      # the cell (cells/directory.toml) holding the live map
//! static_map = "routing.toml"  # relative to this file
//!
//! [tls]                        # TLS on the client and admin ports, and toward cells
//! ca = "secrets/ca.crt"
//!
//! [auth]                       # every request proves an identity (see `auth`)
//! enabled = true
//! credentials = "secrets/credentials.toml"
//! token_key = "secrets/token.key"
//!
//! [[routers]]
//! id = 1
//! client = "127.0.0.1:2379"    # the etcd API, forwarded to cells
//! admin = "127.0.0.1:2378"     # cellplane.router.v1.RouterAdmin
//! http = "127.0.0.1:2377"      # /metrics, /healthz, /readyz
//! cert = "secrets/router-1.crt"
//! key = "secrets/router-1.key"
//! ```
//!
//! With `[tls]` the client port serves TLS and checks a client certificate when one
//! is sent (tenants and operators may use one instead of a password); the admin
//! port requires an operator's; the router dials cells and the directory with its
//! own certificate. Paths are relative to this file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::AuthSettings;
use crate::cell_client::PoolSettings;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutersDef {
    /// The name of the cell that holds the live map (its definition is
    /// `<name>.toml` beside this file).
    pub directory: String,
    /// The static map, relative to this file.
    #[serde(default = "default_static_map")]
    pub static_map: PathBuf,
    pub routers: Vec<RouterDef>,
    #[serde(default)]
    pub settings: RouterSettings,
    /// TLS on every gRPC port of every router; absent: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RouterTls>,
    #[serde(default)]
    pub auth: AuthSettings,
    /// The folder the definition was read from: relative paths start there.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// The routers' TLS settings: the CA every certificate chains to. Each router's
/// own certificate and key are fields of its `[[routers]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterTls {
    pub ca: PathBuf,
}

fn default_static_map() -> PathBuf {
    PathBuf::from("routing.toml")
}

/// One router. Its addresses are only where it listens (nothing dials a router by
/// this file, unlike a cell member, which peers find by its `host:port`), so they
/// are IP socket addresses: `0.0.0.0:2379` in a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterDef {
    pub id: u64,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub http: SocketAddr,
    /// This router's TLS certificate (PEM), with `[tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM), with `[tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Tuning shared by every router.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSettings {
    pub pool: PoolSettings,
    /// How often the directory is read again while its map cannot be watched
    /// (the directory is down or the watch broke).
    pub directory_poll_ms: u64,
    /// Deadline of one directory read (also bounds the wait at boot).
    pub directory_timeout_ms: u64,
    /// Largest request accepted, in bytes (a cell refuses more than 1.5 MiB anyway).
    pub max_request_bytes: usize,
    /// Largest range answered, as the cells count it: set it to the cells'
    /// `limits.max_response_bytes` (both default to 64 MiB). The router accepts
    /// and sends gRPC responses up to this plus a frame allowance; a cell's
    /// larger answer fails with RESOURCE_EXHAUSTED naming the limit.
    pub max_response_bytes: usize,
}

impl RouterSettings {
    /// gRPC message limits for requests and responses, towards cells and clients.
    pub fn message_limits(&self) -> crate::cell_client::MessageLimits {
        crate::cell_client::MessageLimits {
            request: self.max_request_bytes,
            response: self
                .max_response_bytes
                .saturating_add(cellplane_proto::RESPONSE_FRAME_BYTES),
        }
    }
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            pool: PoolSettings::default(),
            directory_poll_ms: 1_000,
            directory_timeout_ms: 1_000,
            max_request_bytes: 2 << 20,
            max_response_bytes: cellplane_proto::DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutersError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl RoutersDef {
    pub fn load(path: &Path) -> Result<RoutersDef, RoutersError> {
        let text = std::fs::read_to_string(path).map_err(|source| RoutersError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| RoutersError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut def: RoutersDef = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        def.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if def.routers.is_empty() {
            return Err(invalid(
                "field `routers`: at least one router is needed".into(),
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, r) in def.routers.iter().enumerate() {
            if !ids.insert(r.id) {
                return Err(invalid(format!(
                    "field `routers[{i}].id`: id {} is used twice",
                    r.id
                )));
            }
            if def.tls.is_some() {
                for (f, v) in [("cert", &r.cert), ("key", &r.key)] {
                    if v.is_none() {
                        return Err(invalid(format!(
                            "field `routers[{i}].{f}`: is required with [tls] (`cellplane certs \
                             generate` writes it)"
                        )));
                    }
                }
            }
        }
        let s = &def.settings;
        s.pool.validate("settings.pool").map_err(invalid)?;
        for (field, v) in [
            ("settings.directory_poll_ms", s.directory_poll_ms),
            ("settings.directory_timeout_ms", s.directory_timeout_ms),
            ("settings.max_request_bytes", s.max_request_bytes as u64),
            ("settings.max_response_bytes", s.max_response_bytes as u64),
        ] {
            if v == 0 {
                return Err(invalid(format!("field `{field}`: must be > 0")));
            }
        }
        def.auth.validate().map_err(invalid)?;
        Ok(def)
    }

    /// The TLS files of router `id`, with paths resolved; `None` without `[tls]`.
    pub fn router_tls(&self, id: u64) -> Option<cellplane_security::TlsFiles> {
        let tls = self.tls.as_ref()?;
        let r = self.router(id)?;
        Some(
            cellplane_security::TlsFiles {
                ca: tls.ca.clone(),
                cert: r.cert.clone()?,
                key: r.key.clone()?,
            }
            .resolved(&self.base_dir),
        )
    }

    pub fn router(&self, id: u64) -> Option<&RouterDef> {
        self.routers.iter().find(|r| r.id == id)
    }
}

/// Everything one router process needs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub id: u64,
    pub state_dir: PathBuf,
    pub static_map: PathBuf,
    pub directory_endpoints: Vec<String>,
    pub settings: RouterSettings,
    /// This router's TLS material; `None`: plaintext on every port.
    pub tls: Option<cellplane_security::TlsMaterial>,
    /// Authentication; paths resolved.
    pub auth: AuthSettings,
}
