//! The Raft log on RocksDB, with group commit.
//!
//! openraft hands us entries with a callback to fire once they are durable. We
//! write each append to RocksDB at once (unsynced) and pass the callback to one
//! sync thread, which fsyncs the WAL once for every callback queued behind it. A
//! burst of appends therefore costs one fsync, not one each, and no entry is ever
//! reported durable before the fsync that covers it has returned: openraft's own
//! RocksDB example skips that step.
//!
//! Reads of the newest entries (replication and apply read every entry back
//! right after it was appended) are answered from memory ([`crate::log_tail`]).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{DB, IteratorMode, WriteBatch, WriteOptions};
use tokio::sync::mpsc;

use crate::codec::{decode_u64_key, u64_key};
use crate::db::{CF_LOG, CF_META, Store};
use crate::log_tail::{LogTail, TAIL_CACHE_BYTES};
use crate::types::{NodeId, TypeConfig};

const KEY_VOTE: &[u8] = b"raft/vote";
const KEY_COMMITTED: &[u8] = b"raft/committed";
const KEY_PURGED: &[u8] = b"raft/purged";

/// How many appends may wait for the sync thread. When it is full, `append` waits,
/// which slows openraft's intake: backpressure, not memory growth.
const SYNC_QUEUE: usize = 4096;

type SResult<T> = Result<T, StorageError<NodeId>>;

/// The Raft log store of one member. Cheap to clone; clones share the sync thread,
/// which stops when the last clone is dropped.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    syncer: Arc<SyncThread>,
    stats: Arc<SyncStats>,
    tail: Arc<Mutex<LogTail>>,
}

/// The sync thread and its queue. Dropping it closes the queue and joins the
/// thread, so the thread's handle on the database is gone before anyone closes
/// the database or the process exits (RocksDB must not be used during its own
/// static teardown).
struct SyncThread {
    tx: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SyncThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    /// Wraps the log column families of `store` and starts the sync thread.
    pub fn new(store: Store) -> std::io::Result<LogStore> {
        let (tx, rx) = mpsc::channel(SYNC_QUEUE);
        let db = store.db.clone();
        let stats = Arc::new(SyncStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_loop(db, rx, thread_stats))?;
        Ok(LogStore {
            store,
            syncer: Arc::new(SyncThread {
                tx: Some(tx),
                thread: Some(thread),
            }),
            stats,
            tail: Arc::new(Mutex::new(LogTail::new(TAIL_CACHE_BYTES))),
        })
    }

    /// The in-memory tail. A panic while it was held cannot leave it wrong for
    /// RocksDB's sake (it only ever holds what RocksDB holds), so poisoning is
    /// ignored.
    fn tail(&self) -> MutexGuard<'_, LogTail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sync thread's counters.
    pub fn sync_stats(&self) -> Arc<SyncStats> {
        self.stats.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> SResult<Option<T>> {
        let raw = self
            .store
            .db
            .get_cf(self.store.cf(CF_META), key)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        match raw {
            None => Ok(None),
            Some(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| StorageIOError::read_logs(&e).into()),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T, sync: bool) -> SResult<()> {
        let bytes = postcard::to_stdvec(value).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.store
            .db
            .put_cf_opt(self.store.cf(CF_META), key, bytes, &opts)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// Counts of the log store's work: appends per fsync is the group-commit factor.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// WAL fsyncs done.
    pub syncs: AtomicU64,
    /// Appends those fsyncs made durable.
    pub appends: AtomicU64,
    /// Reads of entries answered from the in-memory tail.
    pub reads_cached: AtomicU64,
    /// Reads of entries that went to RocksDB (older than the tail, or empty).
    pub reads_stored: AtomicU64,
    /// Time spent in fsync, in nanoseconds.
    sync_nanos: AtomicU64,
    /// fsyncs by latency: bucket `i` counts those at most [`SyncStats::BUCKET_BOUNDS`]`[i]`
    /// and above the one before; the last has no upper bound.
    sync_buckets: [AtomicU64; SyncStats::BUCKETS],
}

/// fsync latency as a histogram: total seconds, count, and (upper bound in
/// seconds, count in that bucket alone) per bucket, the last bound infinite.
pub struct SyncLatency {
    pub sum_secs: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl SyncStats {
    /// Buckets of the fsync histogram, the unbounded one included.
    const BUCKETS: usize = 17;

    /// The upper bound of bucket `i`: 100 µs doubling (to ~3.3 s), then infinity.
    fn bound(i: usize) -> f64 {
        if i + 1 >= Self::BUCKETS {
            f64::INFINITY
        } else {
            0.0001 * f64::from(1u32 << i)
        }
    }

    fn observe(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let i = (0..Self::BUCKETS)
            .find(|&i| secs <= Self::bound(i))
            .unwrap_or(Self::BUCKETS - 1);
        self.sync_buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The fsync latency histogram so far.
    pub fn latency(&self) -> SyncLatency {
        let buckets: Vec<(f64, u64)> = (0..Self::BUCKETS)
            .map(|i| (Self::bound(i), self.sync_buckets[i].load(Ordering::Relaxed)))
            .collect();
        SyncLatency {
            sum_secs: self.sync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

fn sync_loop(db: Arc<DB>, mut rx: mpsc::Receiver<LogFlushed<TypeConfig>>, stats: Arc<SyncStats>) {
    let mut pending = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let started = std::time::Instant::now();
        let result = db.flush_wal(true);
        stats.observe(started.elapsed());
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .appends
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        for cb in pending.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            cb.log_io_completed(r);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(x.saturating_add(1)),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(cached) = end.and_then(|end| self.tail().get(start..end)) {
            self.stats.reads_cached.fetch_add(1, Ordering::Relaxed);
            return Ok(cached);
        }
        self.stats.reads_stored.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        let iter = self.store.db.iterator_cf(
            self.store.cf(CF_LOG),
            IteratorMode::From(&u64_key(start), rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = decode_u64_key(&k)
                .ok_or_else(|| StorageIOError::read_logs(&std::io::Error::other("bad log key")))?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                postcard::from_bytes(&v).map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
        let mut iter = self
            .store
            .db
            .iterator_cf(self.store.cf(CF_LOG), IteratorMode::End);
        let last = match iter.next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry<TypeConfig> =
                    postcard::from_bytes(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        // A vote must survive a crash before it is acted on: sync it now.
        let bytes = postcard::to_stdvec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store
            .db
            .put_cf_opt(self.store.cf(CF_META), KEY_VOTE, bytes, &opts)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        // Only an optimization for restart (re-apply up to here at once): not synced.
        self.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let cf = self.store.cf(CF_LOG);
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = postcard::to_stdvec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.put_cf(cf, u64_key(entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        self.store
            .db
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Only now that RocksDB holds them: the tail never has what RocksDB lacks.
        {
            let mut tail = self.tail();
            for (entry, len) in appended {
                tail.push(entry, len);
            }
        }
        let tx = self.syncer.tx.as_ref().ok_or_else(|| {
            StorageIOError::write_logs(&std::io::Error::other("log sync thread stopped"))
        })?;
        tx.send(callback).await.map_err(|_| {
            StorageIOError::write_logs(&std::io::Error::other("log sync thread stopped"))
        })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // Removing entries [index, end): the next append's fsync makes it durable
        // before anything that depends on it is acknowledged. Out of the tail
        // first, so that it never holds what RocksDB no longer has.
        self.tail().clear_from(log_id.index);
        self.store
            .db
            .delete_range_cf(
                self.store.cf(CF_LOG),
                u64_key(log_id.index),
                u64_key(u64::MAX),
            )
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.put_meta(KEY_PURGED, &log_id, false)?;
        self.tail().clear_through(log_id.index);
        self.store
            .db
            .delete_range_cf(self.store.cf(CF_LOG), u64_key(0), u64_key(log_id.index + 1))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::SyncStats;

    #[test]
    fn fsync_latency_lands_in_the_bucket_whose_bound_covers_it() {
        let s = SyncStats::default();
        s.observe(Duration::from_micros(100)); // exactly the first bound
        s.observe(Duration::from_micros(101)); // just past it: the second
        s.observe(Duration::from_secs(3)); // under the last finite bound (~3.28 s)
        s.observe(Duration::from_secs(10)); // past every bound: +Inf
        let l = s.latency();
        assert_eq!(l.count, 4);
        assert!((l.sum_secs - (0.0001 + 0.000101 + 3.0 + 10.0)).abs() < 1e-9);
        assert_eq!(l.buckets.len(), SyncStats::BUCKETS);
        let counts: Vec<u64> = l.buckets.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[SyncStats::BUCKETS - 2], 1);
        assert_eq!(counts[SyncStats::BUCKETS - 1], 1);
        assert!((l.buckets[SyncStats::BUCKETS - 2].0 - 3.2768).abs() < 1e-9);
        assert!(l.buckets[SyncStats::BUCKETS - 1].0.is_infinite());
    }
}
