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
//! - [`export_snapshot`] and [`import_snapshot`]: operator snapshots, streamed in
//!   chunks in a checksummed format of our own. Raft's own snapshots use the
//!   same format, as files ([`SnapshotFile`]): built, sent, received and
//!   installed in bounded pieces, never whole in memory.
//! - [`Ownership`]: which tenants the cell serves — the cell map it learned
//!   through Raft, and the tenants moving out (fenced) or in — checked at apply.
//! - [`HistoryCompactor`]: removes, in the background and in steps, the versions
//!   an applied compaction hid (applying `Compact` itself changes one number).
//!
//! This is the only crate that depends on RocksDB. It depends on `cellplane-proto`
//! for the etcd message types and on openraft for the storage traits; it knows
//! nothing about the network.

#![forbid(unsafe_code)]
// openraft's `StorageError` is the error type its storage traits require; it is
// large, and it is not ours to shrink.
#![allow(clippy::result_large_err)]

mod alarm;
mod codec;
mod compactor;
mod db;
mod error;
mod events;
mod export;
mod lease;
mod log_store;
mod log_tail;
mod mvcc;
mod ownership;
mod snapshot_file;
mod state_machine;
mod types;

pub use alarm::{AlarmSet, Raised};
pub use compactor::{CompactCursor, CompactStep, HistoryCompactor};
pub use db::{Store, open};
pub use error::{KvError, OpenError};
pub use events::{HistoryPage, RevisionEvents};
pub use export::{
    SnapshotError, SnapshotSummary, export as export_snapshot, import as import_snapshot,
};
pub use lease::{LeaseRecord, MAX_LEASE_TTL};
pub use log_store::{LogStore, SyncLatency, SyncStats};
pub use mvcc::{DEFAULT_MAX_RESPONSE_BYTES, KeyRange, KvHash, KvReader, Limits};
pub use ownership::{Destination, Ownership};
pub use snapshot_file::SnapshotFile;
pub use state_machine::{
    AppliedState, DEFAULT_EVENT_LOG_REVISIONS, EventLogLimits, MAX_APPLY_SCAN_BYTES, StateMachine,
};
pub use types::{Batch, BatchResponse, Command, CommandResponse, Member, NodeId, TypeConfig};

/// Checks of requests made before they are served or proposed.
pub mod mvcc_check {
    pub use crate::mvcc::{
        check_delete as delete, check_put as put, check_range as range, check_txn as txn,
    };
}

/// Fault injection for tests of the corruption check: damages a stopped member's
/// store the way a bad disk or a bug would. Never called by cellplane itself.
pub mod fault {
    use std::path::Path;

    use crate::codec::Rev;
    use crate::db::{CF_KV, CF_REV};
    use crate::error::KvError;
    use crate::mvcc::{KvRecord, RevRecord, decode_record};

    /// Rewrites the value of `key`'s newest version in the store at `dir` (the
    /// member must be stopped), in both the current state and the history, so
    /// reads and HashKV see it while the Raft log and revisions say nothing
    /// changed. Errors when the key does not exist.
    pub fn rewrite_value(dir: &Path, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let store = crate::open(dir).map_err(|e| KvError::Storage(e.to_string()))?;
        let raw = store
            .db
            .get_cf(store.cf(CF_KV), key)?
            .ok_or(KvError::KeyNotFound)?;
        let mut rec: KvRecord = decode_record(&raw)?;
        rec.value = value.to_vec();
        // The version's history entry: the one of its revision that names the key.
        let from = Rev {
            main: rec.mod_revision,
            sub: 0,
        }
        .encode();
        let mut rev_key = None;
        for item in store.db.iterator_cf(
            store.cf(CF_REV),
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            match Rev::decode(&k) {
                Some(r) if r.main == rec.mod_revision => {
                    let h: RevRecord = decode_record(&v)?;
                    if h.key == key {
                        rev_key = Some(k.to_vec());
                        break;
                    }
                }
                _ => break,
            }
        }
        let rev_key = rev_key.ok_or_else(|| KvError::Storage("no history entry".into()))?;
        let hist = RevRecord {
            key: key.to_vec(),
            kv: Some(rec.clone()),
        };
        let to = |e: postcard::Error| KvError::Storage(e.to_string());
        store
            .db
            .put_cf(store.cf(CF_KV), key, postcard::to_stdvec(&rec).map_err(to)?)?;
        store.db.put_cf(
            store.cf(CF_REV),
            rev_key,
            postcard::to_stdvec(&hist).map_err(to)?,
        )?;
        Ok(())
    }
}
