//! A cell's definition (`cells/<name>.toml`) and one member's settings.
//!
//! ```toml
//! name = "default"
//!
//! [tls]                       # TLS on the client and peer ports (see below)
//! ca = "secrets/ca.crt"
//!
//! [[members]]
//! id = 1
//! client = "127.0.0.1:2379"   # etcd-compatible API
//! peer = "127.0.0.1:2380"     # Raft between members
//! http = "127.0.0.1:2381"     # /metrics, /healthz, /readyz
//! cert = "secrets/default-1.crt"
//! key = "secrets/default-1.key"
//! ```
//!
//! With a `[tls]` section every member serves TLS on its client and peer ports and
//! requires a client certificate from the CA on both: the peer port accepts only
//! its own cell's members, the client port its members, routers and operators
//! (tenants reach a cell through a router). Paths are relative to the cell file.
//! `cellplane node --plaintext` ignores the section (the local environment).
//!
//! Addresses are `host:port`, the host an IP literal or a DNS name (in Kubernetes a
//! member is `alpha-0.alpha:2379`: pod IPs change, names do not); see [`HostPort`].
//!
//! Tables besides `[[members]]` and `[tls]`, all optional: `[raft]`, `[limits]`
//! (request and response sizes, deadlines, admission), `[watch]`,
//! `[maintenance]` (auto-compaction, the space quota, the corruption check:
//! [`MaintenanceSettings`]) and `[discovery]`.
//!
//! Every tuning field has a default; unknown fields are refused, so a typo is an
//! error that names the field, not a setting silently ignored.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A cell definition as written in `cells/<name>.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellDef {
    /// The cell's name; also the source of its etcd cluster id.
    pub name: String,
    /// The members, 1 (for local experiments), 3 or 5.
    pub members: Vec<MemberDef>,
    #[serde(default)]
    pub raft: RaftSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub watch: WatchSettings,
    /// Auto-compaction, the space quota and the corruption check.
    #[serde(default)]
    pub maintenance: MaintenanceSettings,
    /// Service discovery hosted by every member (watch buffers, TTL polling,
    /// health-check concurrency).
    #[serde(default)]
    pub discovery: cellplane_discovery::Settings,
    /// What the cell is for; decides what routers may ask of it once TLS is on.
    #[serde(default)]
    pub role: CellRole,
    /// TLS on every port but HTTP; absent: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<CellTls>,
    /// The folder the definition was read from: relative paths start there.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was read from (empty when parsed from text): membership
    /// changes read it again for a new member's addresses.
    #[serde(skip)]
    pub source: PathBuf,
}

/// What a cell is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellRole {
    /// Serves tenants, through routers.
    #[default]
    Tenants,
    /// Holds the cell map: routers may only read and watch it; only operators
    /// write it.
    Directory,
}

/// The cell's TLS settings: the CA every certificate chains to. Each member's
/// own certificate and key are fields of its `[[members]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellTls {
    pub ca: PathBuf,
}

/// Watch limits (see the `watch` module for what happens at each).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSettings {
    /// Revisions the in-memory event log keeps, and each watch stream's mailbox
    /// holds; a stream further behind cancels its watchers with the revision to
    /// resume from.
    pub event_log_revisions: usize,
    /// Responses buffered per watch stream; a client that lets it fill has its
    /// stream ended.
    pub stream_buffer: usize,
    /// Bytes of responses buffered per watch stream, whatever their number; a
    /// client that lets it fill has its stream ended. With `stream_buffer`, this
    /// bounds what a stalled client can make a member hold.
    pub stream_buffer_bytes: usize,
    /// A revision whose events are larger than this is kept in the event log
    /// without them; watchers read it from RocksDB. Bounds the event log's memory
    /// to `event_log_revisions` times this.
    pub event_log_max_revision_bytes: usize,
    /// Interval of progress notifications to watchers that asked for them.
    pub progress_notify_ms: u64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            event_log_revisions: 4096,
            stream_buffer: 128,
            stream_buffer_bytes: 4 << 20,
            event_log_max_revision_bytes: 64 << 10,
            progress_notify_ms: 600_000,
        }
    }
}

/// How a cell looks after itself (the `upkeep` module runs it, on the leader).
/// The names follow etcd's flags.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceSettings {
    /// etcd's `--auto-compaction-mode`: `periodic` keeps
    /// `auto_compaction_retention_secs` of history, `revision` keeps the newest
    /// `auto_compaction_retained_revisions` revisions, `off` keeps everything.
    pub auto_compaction_mode: AutoCompaction,
    pub auto_compaction_retention_secs: u64,
    pub auto_compaction_retained_revisions: u64,
    /// How often the leader considers compacting; 0: a tenth of the retention
    /// (at least 1 s) in `periodic` mode, 5 minutes in `revision` mode, as etcd.
    pub auto_compaction_interval_ms: u64,
    /// etcd's `--quota-backend-bytes`: past this size of the key-value state
    /// (versions, history, leases; not the Raft log) the cell raises NOSPACE and
    /// refuses writes that grow it. etcd's default, 2 GiB.
    pub quota_backend_bytes: u64,
    /// How often the leader compares its store's size with the quota.
    pub quota_check_ms: u64,
    /// etcd's `--experimental-corrupt-check-time`: how often the leader compares
    /// every member's HashKV at one revision; 0 turns the check off.
    pub corrupt_check_secs: u64,
}

/// etcd's auto-compaction modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoCompaction {
    Off,
    Periodic,
    Revision,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        MaintenanceSettings {
            auto_compaction_mode: AutoCompaction::Periodic,
            auto_compaction_retention_secs: 3600,
            auto_compaction_retained_revisions: 10_000,
            auto_compaction_interval_ms: 0,
            quota_backend_bytes: 2 << 30,
            quota_check_ms: 1000,
            corrupt_check_secs: 300,
        }
    }
}

impl MaintenanceSettings {
    /// How often the leader considers compacting.
    pub fn compaction_interval(&self) -> Duration {
        if self.auto_compaction_interval_ms > 0 {
            return Duration::from_millis(self.auto_compaction_interval_ms);
        }
        match self.auto_compaction_mode {
            AutoCompaction::Periodic => {
                Duration::from_secs((self.auto_compaction_retention_secs / 10).max(1))
            }
            AutoCompaction::Revision | AutoCompaction::Off => Duration::from_secs(300),
        }
    }
}

/// One member of a cell.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemberDef {
    /// Unique within the cell, never 0.
    pub id: u64,
    /// A display name; defaults to `<cell>-<id>`.
    #[serde(default)]
    pub name: Option<String>,
    /// The etcd-compatible client API address.
    pub client: HostPort,
    /// The member-to-member Raft address.
    pub peer: HostPort,
    /// The HTTP address for /metrics, /healthz and /readyz.
    pub http: HostPort,
    /// This member's TLS certificate (PEM), with `[tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM), with `[tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// A member address as the cell file writes it: `host:port`, where the host is an
/// IP literal (`127.0.0.1`, `[::1]`) or a DNS name (`alpha-0.alpha`). Peers and
/// clients dial it as written, so a name is resolved when connecting, not at load
/// (a pod's name resolves only once the pod exists). The port is required.
///
/// A member binds an IP literal as is, and a name as `0.0.0.0:port` (its own name
/// points at one of its interfaces, and resolving it at boot could race the DNS
/// record); `cellplane node --listen-*` overrides either.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    /// An IP literal (without brackets) or a DNS name.
    host: String,
    port: u16,
}

/// Why a string is not a `host:port` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a host:port address: {reason}")]
pub struct AddrError {
    value: String,
    reason: &'static str,
}

impl HostPort {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// Where a process listens for this address: an IP literal as is, a name on
    /// every IPv4 interface.
    pub fn bind_addr(&self) -> SocketAddr {
        self.socket_addr().unwrap_or(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            self.port,
        ))
    }

    /// `http://host:port`, for a gRPC channel.
    pub fn url(&self) -> String {
        format!("http://{self}")
    }
}

impl FromStr for HostPort {
    type Err = AddrError;

    fn from_str(value: &str) -> Result<HostPort, AddrError> {
        let bad = |reason| AddrError {
            value: value.to_string(),
            reason,
        };
        if let Ok(a) = value.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        let Some((host, port)) = value.rsplit_once(':') else {
            return Err(bad("the port is missing"));
        };
        if port.is_empty() {
            return Err(bad("the port is missing"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            // An IPv6 literal that SocketAddr refused: unbracketed or malformed.
            return Err(bad("write an IPv6 address in brackets: [::1]:2379"));
        }
        if !is_dns_name(host) {
            return Err(bad(
                "the host must be an IP address or a DNS name (letters, digits, '-' and '.')",
            ));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits or '-', not
/// starting or ending with '-'; at most 253 characters; a trailing dot allowed. The
/// last label is not all digits (RFC 3696), so `10.0.0:2379`, a mistyped IP, is
/// refused rather than looked up as a name.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl TryFrom<String> for HostPort {
    type Error = AddrError;

    fn try_from(value: String) -> Result<HostPort, AddrError> {
        value.parse()
    }
}

impl From<HostPort> for String {
    fn from(a: HostPort) -> String {
        a.to_string()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> HostPort {
        HostPort {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Raft timing and log retention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    /// Lower end of the election timeout of the first member (by id). Each further
    /// member's range starts `election_stagger_ms` higher, so no two members share
    /// a range and two survivors cannot split votes round after round.
    pub election_timeout_min_ms: u64,
    /// Width of each member's election timeout range.
    pub election_timeout_width_ms: u64,
    pub election_stagger_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, for followers slightly behind.
    pub keep_entries_after_snapshot: u64,
    /// Most entries in one AppendEntries message.
    pub max_entries_per_append: u64,
    /// Largest Raft message between members, in bytes.
    pub max_peer_message_bytes: usize,
    /// Bytes of a snapshot sent in one message. A snapshot is built, sent,
    /// received and installed through files, so a member holds about two
    /// chunks of it at a time (read and encoded), whatever its size.
    pub snapshot_chunk_bytes: usize,
    /// Timeout of one Raft RPC between members.
    pub peer_rpc_timeout_ms: u64,
    /// Write batches being replicated at once; while they are, new writes queue and
    /// form the next batch (one log entry, one fsync).
    pub proposal_batches_in_flight: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            // A follower campaigns once its leader lease (openraft 0.9: its
            // election timeout's upper end) and an election timeout have passed
            // without a heartbeat: 700–800 ms for the first member, 900–1000 and
            // 1100–1200 for the next (loadgen failover: docs/benchmarks.md).
            election_timeout_min_ms: 300,
            election_timeout_width_ms: 100,
            election_stagger_ms: 100,
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 1_000,
            max_entries_per_append: 128,
            max_peer_message_bytes: 256 << 20,
            snapshot_chunk_bytes: 4 << 20,
            peer_rpc_timeout_ms: 2_000,
            proposal_batches_in_flight: 2,
        }
    }
}

/// Limits on client requests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request, in bytes (etcd: 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most compares or ops per branch of a Txn (etcd: 128).
    pub max_txn_ops: usize,
    /// Deadline of one client request inside the member.
    pub request_timeout_ms: u64,
    /// Client requests in flight on one member; more are refused with UNAVAILABLE
    /// instead of queueing.
    pub max_inflight_requests: usize,
    /// Largest range answered, in key and value bytes (plus 48 per key): a
    /// larger one is refused before it is read, with RESOURCE_EXHAUSTED naming
    /// this field; clients page with `limit`. Routers' `max_response_bytes` must
    /// match. gRPC responses are capped at this plus 64 KiB.
    pub max_response_bytes: usize,
}

impl LimitSettings {
    /// The gRPC message limit for responses.
    pub fn max_response_message_bytes(&self) -> usize {
        self.max_response_bytes
            .saturating_add(cellplane_proto::RESPONSE_FRAME_BYTES)
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_request_bytes: 3 * 512 * 1024,
            max_txn_ops: 128,
            request_timeout_ms: 5_000,
            max_inflight_requests: 10_000,
            max_response_bytes: cellplane_proto::DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// A cell definition that could not be used; says which file and which field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl CellDef {
    /// Reads and validates a cell definition.
    pub fn load(path: &Path) -> Result<CellDef, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut def = Self::parse(&text, path)?;
        def.source = path.to_path_buf();
        Ok(def)
    }

    /// Parses and validates; `path` names the source in errors, and its folder is
    /// where relative paths (certificates) start.
    pub fn parse(text: &str, path: &Path) -> Result<CellDef, ConfigError> {
        let mut def: CellDef = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        def.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        def.validate(path)?;
        Ok(def)
    }

    /// The TLS files of member `id`, with paths resolved; `None` without `[tls]`.
    pub fn member_tls(&self, id: u64) -> Option<cellplane_security::TlsFiles> {
        let tls = self.tls.as_ref()?;
        let m = self.member(id)?;
        Some(
            cellplane_security::TlsFiles {
                ca: tls.ca.clone(),
                cert: m.cert.clone()?,
                key: m.key.clone()?,
            }
            .resolved(&self.base_dir),
        )
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: String, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message: message.to_string(),
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "name".into(),
                "must be non-empty: letters, digits, '-' or '_'",
            ));
        }
        if self.members.is_empty() {
            return Err(bad("members".into(), "a cell needs at least one member"));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.id == 0 {
                return Err(bad(format!("members[{i}].id"), "must not be 0"));
            }
            if !ids.insert(m.id) {
                return Err(bad(
                    format!("members[{i}].id"),
                    &format!("id {} is used twice", m.id),
                ));
            }
            for (f, a) in [("client", &m.client), ("peer", &m.peer), ("http", &m.http)] {
                if !addrs.insert(a) {
                    return Err(bad(
                        format!("members[{i}].{f}"),
                        &format!("address {a} is used twice"),
                    ));
                }
            }
            if self.tls.is_some() {
                for (f, v) in [("cert", &m.cert), ("key", &m.key)] {
                    if v.is_none() {
                        return Err(bad(
                            format!("members[{i}].{f}"),
                            "is required with [tls] (`cellplane certs generate` writes it)",
                        ));
                    }
                }
            }
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(bad("raft.heartbeat_ms".into(), "must be > 0"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return Err(bad(
                "raft.election_timeout_min_ms".into(),
                "must be more than twice raft.heartbeat_ms",
            ));
        }
        if r.election_timeout_width_ms == 0 {
            return Err(bad("raft.election_timeout_width_ms".into(), "must be > 0"));
        }
        if r.snapshot_every_entries == 0 {
            return Err(bad("raft.snapshot_every_entries".into(), "must be > 0"));
        }
        if r.proposal_batches_in_flight == 0 {
            return Err(bad("raft.proposal_batches_in_flight".into(), "must be > 0"));
        }
        if r.max_entries_per_append == 0 {
            return Err(bad("raft.max_entries_per_append".into(), "must be > 0"));
        }
        if r.peer_rpc_timeout_ms == 0 {
            return Err(bad("raft.peer_rpc_timeout_ms".into(), "must be > 0"));
        }
        let l = &self.limits;
        if l.max_request_bytes < 1024 {
            return Err(bad(
                "limits.max_request_bytes".into(),
                "must be at least 1024",
            ));
        }
        // One AppendEntries carries up to max_entries_per_append requests of up to
        // max_request_bytes each; a message over the peer limit could never be sent.
        if (r.max_peer_message_bytes as u64)
            < r.max_entries_per_append * (l.max_request_bytes as u64 + 1024)
        {
            return Err(bad(
                "raft.max_peer_message_bytes".into(),
                "must hold raft.max_entries_per_append requests of limits.max_request_bytes each",
            ));
        }
        if r.snapshot_chunk_bytes < 4096 || r.snapshot_chunk_bytes > r.max_peer_message_bytes / 2 {
            return Err(bad(
                "raft.snapshot_chunk_bytes".into(),
                "must be at least 4096 and at most half of raft.max_peer_message_bytes",
            ));
        }
        if l.max_response_bytes < 1 << 20 {
            return Err(bad(
                "limits.max_response_bytes".into(),
                "must be at least 1 MiB",
            ));
        }
        if l.max_txn_ops == 0 {
            return Err(bad("limits.max_txn_ops".into(), "must be > 0"));
        }
        if l.request_timeout_ms == 0 {
            return Err(bad("limits.request_timeout_ms".into(), "must be > 0"));
        }
        let m = &self.maintenance;
        for (field, v) in [
            (
                "maintenance.auto_compaction_retention_secs",
                m.auto_compaction_retention_secs,
            ),
            (
                "maintenance.auto_compaction_retained_revisions",
                m.auto_compaction_retained_revisions,
            ),
            ("maintenance.quota_backend_bytes", m.quota_backend_bytes),
            ("maintenance.quota_check_ms", m.quota_check_ms),
        ] {
            if v == 0 {
                return Err(bad(field.into(), "must be > 0"));
            }
        }
        let w = &self.watch;
        for (field, v) in [
            ("watch.event_log_revisions", w.event_log_revisions as u64),
            ("watch.stream_buffer", w.stream_buffer as u64),
            ("watch.stream_buffer_bytes", w.stream_buffer_bytes as u64),
            (
                "watch.event_log_max_revision_bytes",
                w.event_log_max_revision_bytes as u64,
            ),
            ("watch.progress_notify_ms", w.progress_notify_ms),
        ] {
            if v == 0 {
                return Err(bad(field.into(), "must be > 0"));
            }
        }
        if l.max_inflight_requests == 0 {
            return Err(bad("limits.max_inflight_requests".into(), "must be > 0"));
        }
        match self.discovery.validate() {
            Ok(()) => {}
            Err(cellplane_discovery::DiscoveryError::Invalid { field, reason }) => {
                return Err(bad(field, &reason));
            }
            Err(e) => return Err(bad("discovery".into(), &e.to_string())),
        }
        Ok(())
    }

    /// The member with this id.
    pub fn member(&self, id: u64) -> Option<&MemberDef> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The etcd cluster id of this cell: a stable hash (FNV-1a, 64 bit) of its name,
    /// so every member agrees on it without talking.
    pub fn cluster_id(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// The election timeout range of member `id`: ranges are disjoint, ordered by id.
    pub fn election_timeout(&self, id: u64) -> (u64, u64) {
        let rank = self.members.iter().filter(|m| m.id < id).count() as u64;
        let min = self.raft.election_timeout_min_ms + rank * self.raft.election_stagger_ms;
        (min, min + self.raft.election_timeout_width_ms)
    }
}

impl MemberDef {
    pub fn display_name(&self, cell: &str) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{cell}-{}", self.id))
    }
}

/// Everything one member process needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub cell: CellDef,
    pub id: u64,
    pub data_dir: PathBuf,
    /// This member's TLS material; `None`: plaintext on every port.
    pub tls: Option<cellplane_security::TlsMaterial>,
    /// Joining a running cell (`cellplane node --join`): never initialize one.
    pub join: bool,
}

impl NodeConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.cell.limits.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "a"
[[members]]
id = 1
client = "127.0.0.1:1"
peer = "127.0.0.1:2"
http = "127.0.0.1:3"
[[members]]
id = 2
client = "127.0.0.1:4"
peer = "127.0.0.1:5"
http = "127.0.0.1:6"
"#;

    fn err(text: &str) -> String {
        match CellDef::parse(text, Path::new("cells/a.toml")) {
            Ok(_) => panic!("accepted a bad definition"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_definition_parses_with_defaults() {
        let def = CellDef::parse(GOOD, Path::new("x")).unwrap();
        assert_eq!(def.members.len(), 2);
        assert_eq!(def.limits.max_txn_ops, 128);
        assert_eq!(def.election_timeout(1), (300, 400));
        assert_eq!(def.election_timeout(2), (400, 500));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = err(&GOOD.replace("id = 2", "id = 1"));
        assert!(
            e.contains("cells/a.toml") && e.contains("members[1].id"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:4", "127.0.0.1:1"));
        assert!(e.contains("members[1].client"), "{e}");
        let e = err(&GOOD.replace("peer = \"127.0.0.1:2\"", "peer = \"nowhere\""));
        assert!(e.contains("cells/a.toml") && e.contains("peer"), "{e}");
        let e = err(&GOOD.replace("peer = \"127.0.0.1:5\"", "peer = \"alpha-1.alpha\""));
        assert!(
            e.contains("peer = \"alpha-1.alpha\"") && e.contains("the port is missing"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:6", "alpha-1.alpha:"));
        assert!(
            e.contains("http = ") && e.contains("the port is missing"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:6", "alpha_1:2381"));
        assert!(e.contains("http = ") && e.contains("DNS name"), "{e}");
        let e = err(&GOOD
            .replace("127.0.0.1:4", "a:1")
            .replace("127.0.0.1:1", "A:1"));
        assert!(e.contains("members[1].client") && e.contains("a:1"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nmax_txn_opz = 3\n"));
        assert!(e.contains("max_txn_opz"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nmax_txn_ops = 0\n"));
        assert!(e.contains("limits.max_txn_ops"), "{e}");
    }

    #[test]
    fn members_may_be_named_by_dns() {
        let text = GOOD
            .replace("127.0.0.1:1", "alpha-0.alpha:2379")
            .replace(
                "127.0.0.1:2",
                "alpha-0.alpha.default.svc.cluster.local.:2380",
            )
            .replace("127.0.0.1:3", "[::1]:2381");
        let def = CellDef::parse(&text, Path::new("x")).unwrap();
        let m = def.member(1).unwrap();
        assert_eq!(m.client.to_string(), "alpha-0.alpha:2379");
        assert_eq!(m.client.url(), "http://alpha-0.alpha:2379");
        assert_eq!(m.client.socket_addr(), None);
        assert_eq!(m.client.bind_addr(), "0.0.0.0:2379".parse().unwrap());
        assert_eq!(m.peer.host(), "alpha-0.alpha.default.svc.cluster.local.");
        assert_eq!(m.http.to_string(), "[::1]:2381");
        assert_eq!(m.http.bind_addr(), "[::1]:2381".parse().unwrap());
        let two = def.member(2).unwrap();
        assert_eq!(two.client.bind_addr(), "127.0.0.1:4".parse().unwrap());
        // What is loaded is what is written back.
        let again = CellDef::parse(&toml::to_string(&def).unwrap(), Path::new("x")).unwrap();
        assert_eq!(again, def);
    }

    #[test]
    fn host_port_parsing() {
        let ok = |s: &str| s.parse::<HostPort>().map(|a| a.to_string());
        assert_eq!(ok("127.0.0.1:2379").unwrap(), "127.0.0.1:2379");
        assert_eq!(ok("Alpha-0.ALPHA:1").unwrap(), "alpha-0.alpha:1");
        assert_eq!(ok("localhost:65535").unwrap(), "localhost:65535");
        for bad in [
            "localhost",
            "localhost:",
            "localhost:65536",
            "localhost:x",
            ":2379",
            "::1:2379",
            "[::1:2379",
            "10.0.0:2379",
            "-a:1",
            "a..b:1",
            "a b:1",
            "http://a:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad} accepted");
        }
        let e = "nowhere".parse::<HostPort>().unwrap_err().to_string();
        assert_eq!(
            e,
            "`nowhere` is not a host:port address: the port is missing"
        );
    }
}
