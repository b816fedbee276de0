//! Opening a member's RocksDB and its column families.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options};

use crate::error::OpenError;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_REV: &str = "rev";
pub(crate) const CF_HIST: &str = "hist";
pub(crate) const CF_LEASE: &str = "lease";

/// Column families that hold the state machine (everything a snapshot carries).
pub(crate) const SM_CFS: [&str; 4] = [CF_KV, CF_REV, CF_HIST, CF_LEASE];

/// Every column family.
const ALL_CFS: [&str; 6] = [CF_META, CF_LOG, CF_KV, CF_REV, CF_HIST, CF_LEASE];

/// One member's database. Cheap to clone.
///
/// Layout (column families):
/// - `meta`: Raft vote, committed and purged log ids; the state machine's applied
///   log id, membership, revision, compacted revision; the last snapshot.
/// - `log`: Raft entries by index.
/// - `kv`: the newest version of every live key (the fast path for reads at the
///   newest revision).
/// - `rev`: every version and tombstone since the last compaction, by revision.
/// - `hist`: (key, revision) index into `rev`, for reads at a past revision.
/// - `lease`: leases (`l` + id → granted TTL) and the keys attached to each
///   (`k` + id + key), so that revoking or expiring a lease finds its keys without
///   a scan.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<DB>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Opens (creating if needed) the database in `dir`.
pub fn open(dir: &Path) -> Result<Store, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    // Small members: keep RocksDB's own memory and background work modest.
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    let cfs = ALL_CFS.map(|name| {
        let mut cf = Options::default();
        cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
        ColumnFamilyDescriptor::new(name, cf)
    });
    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| OpenError::Rocks {
        path: dir.display().to_string(),
        source,
    })?;
    Ok(Store { db: Arc::new(db) })
}

impl Store {
    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every column family is created by `open`; a missing one is a bug here, not
        // bad input.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Live size of the database, in bytes: SST files and memtables of every column
    /// family.
    pub fn size_bytes(&self) -> u64 {
        let mut total = 0;
        for name in ALL_CFS {
            for prop in [
                rocksdb::properties::TOTAL_SST_FILES_SIZE,
                rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES,
            ] {
                total += self
                    .db
                    .property_int_value_cf(self.cf(name), prop)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        total
    }
}

impl Store {
    /// True when this member has never taken part in its cell: no vote and no log.
    pub fn is_fresh(&self) -> Result<bool, rocksdb::Error> {
        let voted = self.db.get_cf(self.cf(CF_META), b"raft/vote")?.is_some();
        let logged = self
            .db
            .iterator_cf(self.cf(CF_LOG), rocksdb::IteratorMode::Start)
            .next()
            .is_some();
        let purged = self.db.get_cf(self.cf(CF_META), b"raft/purged")?.is_some();
        Ok(!voted && !logged && !purged)
    }
}
