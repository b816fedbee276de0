//! A cell member's durable state, on one RocksDB instance per member.
//!
//! - [`LogStore`]: openraft's Raft log (vote, entries, committed and purged ids).
//!   Appends are group-committed: many appends share one WAL fsync, and openraft is
//!   told an entry is durable only after that fsync.
//! - [`StateMachine`]: the MVCC key-value store with etcd's semantics (one global
//!   revision; per-key create/mod revision, version and lease), applied from the log,
//!   and the leases with the keys attached to each.
//! - [`KvReader`]: the read path (ranges at the newest or a past revision), which
//!   never blocks the apply path: it reads from RocksDB snapshots.
//!
//! This is the only crate that depends on RocksDB. It depends on `cellplane-proto`
//! for the etcd message types and on openraft for the storage traits; it knows
//! nothing about the network.

#![forbid(unsafe_code)]
// openraft's `StorageError` is the error type its storage traits require; it is
// large, and it is not ours to shrink.
#![allow(clippy::result_large_err)]

mod codec;
mod db;
mod error;
mod events;
mod lease;
mod log_store;
mod mvcc;
mod state_machine;
mod types;

pub use db::{Store, open};
pub use error::{KvError, OpenError};
pub use events::RevisionEvents;
pub use lease::{LeaseRecord, MAX_LEASE_TTL};
pub use log_store::{LogStore, SyncStats};
pub use mvcc::{KeyRange, KvReader, Limits};
pub use state_machine::{AppliedState, DEFAULT_EVENT_LOG_REVISIONS, EventLogLimits, StateMachine};
pub use types::{Batch, BatchResponse, Command, CommandResponse, Member, NodeId, TypeConfig};

/// Checks of requests made before they are served or proposed.
pub mod mvcc_check {
    pub use crate::mvcc::{
        check_delete as delete, check_put as put, check_range as range, check_txn as txn,
    };
}
