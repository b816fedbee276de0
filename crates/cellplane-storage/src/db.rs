//! Opening a member's RocksDB and its column families.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options};

use crate::error::OpenError;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_REV: &str = "rev";
pub(crate) const CF_HIST: &str = "hist";
pub(crate) const CF_LEASE: &str = "lease";
pub(crate) const CF_ALARM: &str = "alarm";
/// The cell map the cell learned ([`crate::ownership`]).
pub(crate) const CF_OWNER: &str = "owner";

/// Column families that hold the state machine (everything a snapshot carries).
pub(crate) const SM_CFS: [&str; 6] = [CF_KV, CF_REV, CF_HIST, CF_LEASE, CF_ALARM, CF_OWNER];

/// What the memtables of every column family may hold together.
pub const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;

/// The block cache every column family shares.
pub const BLOCK_CACHE_BYTES: usize = 32 << 20;

/// The block cache of a checkpoint opened to be written out.
const READ_ONLY_CACHE_BYTES: usize = 8 << 20;

/// One column family's memtable: RocksDB switches to a new one (and flushes
/// the full one) past this.
const CF_MEMTABLE_BYTES: usize = 16 << 20;

/// Every column family.
const ALL_CFS: [&str; 8] = [
    CF_META, CF_LOG, CF_KV, CF_REV, CF_HIST, CF_LEASE, CF_ALARM, CF_OWNER,
];

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
/// - `alarm`: raised alarms, member id + alarm type → nothing (see `alarm`).
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<DB>,
    /// Held for writing while a Raft snapshot is installed (the state-machine
    /// column families are rewritten in many batches then): readers are refused
    /// meanwhile and snapshot builders wait, so nobody sees half a state.
    install: Arc<RwLock<()>>,
    /// Raft snapshots being read (sent to a follower): one replaced meanwhile is
    /// deleted when its last reader is done.
    pub(crate) pins: Arc<crate::snapshot_file::SnapshotPins>,
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
    // Memtables of every column family together: RocksDB's default is 64 MiB per
    // column family, two of them each, up to ~900 MiB for our seven. One budget,
    // which stalls writers (until a flush is done) rather than grow past it,
    // keeps a member's write-path memory the same whatever it stores, and makes
    // a fast bulk load (a snapshot install) wait for the disk instead.
    opts.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(
        MEMTABLE_BUDGET_BYTES,
        true,
    ));
    // One block cache for every column family (RocksDB otherwise gives each its
    // own 32 MiB): what reads keep in memory is the same however much is read.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let cfs = ALL_CFS.map(|name| ColumnFamilyDescriptor::new(name, cf_options(&cache)));
    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| OpenError::Rocks {
        path: dir.display().to_string(),
        source,
    })?;
    Ok(Store::of(db))
}

/// Options of one column family, its blocks cached in `cache`.
fn cf_options(cache: &rocksdb::Cache) -> Options {
    let mut cf = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks count against the cache too, so a large store's
    // do not add memory of their own.
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    // Every put reads the key's previous version first, and most keys of a
    // growing store have none: without a filter each such read looks into
    // every level, more of them as the store grows. Ten bits per key answer
    // "not here" for 99% of files without reading them.
    table.set_bloom_filter(10.0, false);
    cf.set_block_based_table_factory(&table);
    cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
    cf.set_write_buffer_size(CF_MEMTABLE_BYTES);
    cf
}

/// Opens the store in `dir` (a checkpoint) read-only, with a small cache of
/// its own: it is read once, front to back.
pub(crate) fn open_read_only(dir: &Path) -> Result<Store, OpenError> {
    let opts = Options::default();
    let cache = rocksdb::Cache::new_lru_cache(READ_ONLY_CACHE_BYTES);
    let cfs = ALL_CFS.map(|name| ColumnFamilyDescriptor::new(name, cf_options(&cache)));
    let db = DB::open_cf_descriptors_read_only(&opts, dir, cfs, false).map_err(|source| {
        OpenError::Rocks {
            path: dir.display().to_string(),
            source,
        }
    })?;
    Ok(Store::of(db))
}

impl Store {
    fn of(db: DB) -> Store {
        Store {
            db: Arc::new(db),
            install: Arc::default(),
            pins: Arc::default(),
        }
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every column family is created by `open`; a missing one is a bug here, not
        // bad input.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// A consistent view for a reader. Refused while a Raft snapshot is being
    /// installed: the state is half old, half new until it is done.
    pub(crate) fn read_view(
        &self,
    ) -> Result<rocksdb::SnapshotWithThreadMode<'_, DB>, crate::KvError> {
        match self.install.try_read() {
            Ok(_guard) => Ok(self.db.snapshot()),
            Err(std::sync::TryLockError::Poisoned(_)) => Ok(self.db.snapshot()),
            Err(std::sync::TryLockError::WouldBlock) => Err(crate::KvError::Installing),
        }
    }

    /// A consistent view for a snapshot builder: waits for an install in
    /// progress to finish. Blocks: call it off the async runtime.
    pub(crate) fn wait_view(&self) -> rocksdb::SnapshotWithThreadMode<'_, DB> {
        let _guard = self.install.read().unwrap_or_else(|p| p.into_inner());
        self.db.snapshot()
    }

    /// A RocksDB checkpoint of the whole store at `path` (same file system:
    /// hard links to the SST files), never of a half-installed state. Blocks.
    pub(crate) fn checkpoint(&self, path: &Path) -> Result<(), rocksdb::Error> {
        let _guard = self.install.read().unwrap_or_else(|p| p.into_inner());
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(path)
    }

    /// Held while a Raft snapshot is installed.
    pub(crate) fn installing(&self) -> RwLockWriteGuard<'_, ()> {
        self.install.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Where this member keeps its Raft snapshot files.
    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.db.path().join("snapshots")
    }

    /// Live size of the database, in bytes: SST files and memtables of every column
    /// family.
    pub fn size_bytes(&self) -> u64 {
        self.cfs_size(&ALL_CFS)
    }

    /// Size of the key-value state alone (versions, history, leases, alarms; not
    /// the Raft log): what the space quota limits, as etcd's limits its backend
    /// and not its WAL.
    pub fn state_size_bytes(&self) -> u64 {
        self.cfs_size(&SM_CFS)
    }

    fn cfs_size(&self, names: &[&str]) -> u64 {
        let mut total = 0;
        for name in names {
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
    /// etcd's defragmentation, RocksDB's way: compacts every column family over
    /// its whole key range, so deleted and overwritten versions (compacted
    /// history, purged log entries) leave the SST files and their space returns
    /// to the disk. Blocks for as long as RocksDB takes: call it off the async
    /// runtime. Reads and writes go on meanwhile (RocksDB compacts in the
    /// background of its own writes).
    pub fn defragment(&self) -> Result<(), crate::KvError> {
        let mut opts = rocksdb::CompactOptions::default();
        // Rewrite the bottommost level too: that is where deleted ranges sit.
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        // Let RocksDB's own compactions run beside it, so level-0 files do not
        // pile up and stall writes (the Raft log's included).
        opts.set_exclusive_manual_compaction(false);
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name))?;
            self.db
                .compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    /// A hash of every state-machine column family as one RocksDB snapshot sees
    /// it (etcd's deprecated `Hash`: the whole store, not one revision). Reads
    /// the database once, streaming: call it off the async runtime.
    pub fn hash_all(&self) -> Result<u32, crate::KvError> {
        use sha2::Digest;
        let snap = self.read_view()?;
        let mut h = sha2::Sha256::new();
        for name in SM_CFS {
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_snapshot(&snap);
            h.update(name.as_bytes());
            for item in self
                .db
                .iterator_cf_opt(self.cf(name), opts, rocksdb::IteratorMode::Start)
            {
                let (k, v) = item?;
                hash_entry(&mut h, &k, &v);
            }
        }
        Ok(truncate_hash(h))
    }

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

/// Feeds one key-value pair to a hash, length-prefixed so that no two different
/// sequences of pairs feed the same bytes.
pub(crate) fn hash_entry(h: &mut sha2::Sha256, k: &[u8], v: &[u8]) {
    use sha2::Digest;
    h.update((k.len() as u64).to_be_bytes());
    h.update(k);
    h.update((v.len() as u64).to_be_bytes());
    h.update(v);
}

/// The first four bytes of a SHA-256: etcd's hashes are `uint32` on the wire.
pub(crate) fn truncate_hash(h: sha2::Sha256) -> u32 {
    use sha2::Digest;
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}
