//! Errors of the storage layer.

use serde::{Deserialize, Serialize};

/// A key-value request that the store refuses, with etcd's meaning and message.
///
/// Messages of the `etcdserver:` errors are etcd's, byte for byte: etcd's Go client
/// recognises its typed errors by their text.
///
/// These are deterministic: every member reaches the same error for the same log
/// entry, so they travel inside [`crate::CommandResponse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KvError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compacted: i64 },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision { current: i64 },
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps { max: usize },
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge { max: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The local store failed; not the request's fault.
    #[error("storage error: {0}")]
    Storage(String),
    /// A put attaches a tenant's lease to a key outside that tenant's namespace.
    /// New variants go last, so that the ones before keep their encoding in
    /// responses.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// A NOSPACE alarm is raised: the write would grow the store.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is raised: no write until an operator disarms it.
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// A range would answer more than the cell's response limit.
    #[error(
        "etcdserver: range response larger than the cell's limits.max_response_bytes ({max} \
         bytes): read it in pages (`limit`, then from the key after the last one returned)"
    )]
    ResponseTooLarge { max: usize },
    /// The member is installing a snapshot from its leader; its state is
    /// incomplete until that is done.
    #[error("member is installing a snapshot from its leader: retry, or read from another member")]
    Installing,
    /// A delete, or a compare or range inside a txn, would read more than the
    /// apply path's bound.
    #[error(
        "etcdserver: request reads more than {max} bytes of keys and values at once: split it \
         into smaller ranges (delete or compare a part of the keys at a time)"
    )]
    ApplyTooLarge { max: usize },
    /// The cell does not own the tenant: the map it learned sends the tenant to
    /// `cell` (empty: to no cell).
    #[error(
        "tenant {tenant} moved to cell {cell} at map version {version}: this cell does not \
         serve it; refresh the cell map and send the request to {cell}"
    )]
    NotOwned {
        tenant: String,
        cell: String,
        version: u64,
    },
    /// A map older than the one the cell learned was pushed to it.
    #[error(
        "the cell already learned map version {have}, newer than (or different from) the \
         version {got} pushed: push the directory's current map"
    )]
    StaleMap { have: u64, got: u64 },
}

impl From<rocksdb::Error> for KvError {
    fn from(e: rocksdb::Error) -> Self {
        KvError::Storage(e.to_string())
    }
}

/// Opening a member's database failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open RocksDB at {path}: {source}")]
    Rocks {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
