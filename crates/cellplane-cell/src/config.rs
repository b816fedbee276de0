//! A cell's definition (`cells/<name>.toml`) and one member's settings.
//!
//! ```toml
//! name = "default"
//!
//! [[members]]
//! id = 1
//! client = "127.0.0.1:2379"   # etcd-compatible API
//! peer = "127.0.0.1:2380"     # Raft between members
//! http = "127.0.0.1:2381"     # /metrics, /healthz, /readyz
//! ```
//!
//! Every tuning field has a default; unknown fields are refused, so a typo is an
//! error that names the field, not a setting silently ignored.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
}

/// Watch limits (see the `watch` module for what happens at each).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSettings {
    /// Revisions the in-memory event log keeps; a stream further behind cancels
    /// its watchers with the revision to resume from.
    pub event_log_revisions: usize,
    /// Responses buffered per watch stream; a client that lets it fill has its
    /// stream ended.
    pub stream_buffer: usize,
    /// Interval of progress notifications to watchers that asked for them.
    pub progress_notify_ms: u64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            event_log_revisions: 4096,
            stream_buffer: 128,
            progress_notify_ms: 600_000,
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
    pub client: SocketAddr,
    /// The member-to-member Raft address.
    pub peer: SocketAddr,
    /// The HTTP address for /metrics, /healthz and /readyz.
    pub http: SocketAddr,
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
            election_timeout_min_ms: 500,
            election_timeout_width_ms: 250,
            election_stagger_ms: 250,
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 1_000,
            max_entries_per_append: 128,
            max_peer_message_bytes: 256 << 20,
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
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_request_bytes: 3 * 512 * 1024,
            max_txn_ops: 128,
            request_timeout_ms: 5_000,
            max_inflight_requests: 10_000,
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
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<CellDef, ConfigError> {
        let def: CellDef = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        def.validate(path)?;
        Ok(def)
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
            for (f, a) in [("client", m.client), ("peer", m.peer), ("http", m.http)] {
                if !addrs.insert(a) {
                    return Err(bad(
                        format!("members[{i}].{f}"),
                        &format!("address {a} is used twice"),
                    ));
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
        if l.max_txn_ops == 0 {
            return Err(bad("limits.max_txn_ops".into(), "must be > 0"));
        }
        if l.request_timeout_ms == 0 {
            return Err(bad("limits.request_timeout_ms".into(), "must be > 0"));
        }
        let w = &self.watch;
        for (field, v) in [
            ("watch.event_log_revisions", w.event_log_revisions as u64),
            ("watch.stream_buffer", w.stream_buffer as u64),
            ("watch.progress_notify_ms", w.progress_notify_ms),
        ] {
            if v == 0 {
                return Err(bad(field.into(), "must be > 0"));
            }
        }
        if l.max_inflight_requests == 0 {
            return Err(bad("limits.max_inflight_requests".into(), "must be > 0"));
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
        assert_eq!(def.election_timeout(1), (500, 750));
        assert_eq!(def.election_timeout(2), (750, 1000));
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
        let e = err(&format!("{GOOD}\n[limits]\nmax_txn_opz = 3\n"));
        assert!(e.contains("max_txn_opz"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nmax_txn_ops = 0\n"));
        assert!(e.contains("limits.max_txn_ops"), "{e}");
    }
}
