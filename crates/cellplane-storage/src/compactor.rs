//! Physical compaction: removing the versions a compaction made unreadable.
//!
//! A `Compact` command is applied as a change of one number (the compaction
//! revision): reads below it are refused from then on, on every member at the
//! same log index. Removing the versions themselves runs outside the apply path,
//! in steps of a bounded number of entries, at each member's own pace
//! ([`HistoryCompactor`]). Until it is done the old versions take space but
//! nobody can read them; HashKV looks only at what a reader can see, so members
//! part-way through agree with those done.
//!
//! A pass from the last target `P` to a new target `T` looks only at the
//! revisions in `(P, T]`: a key no revision of that window wrote has, at or
//! below `T`, the versions it had at or below `P`, which the last pass already
//! reduced to at most one. For each key the window wrote, it deletes its
//! versions at or below `T` except the newest, and that one too when it is a
//! tombstone, in one write batch (so at every point a read at or above `T` sees
//! what it saw before). The cost of a pass is the writes since the last one, not
//! the size of the store. When a pass is done the window's range of the
//! revision index is compacted in RocksDB, so its space returns to the disk,
//! and `T` is recorded; a member restarted mid-pass runs the pass again
//! (deleting what is left is idempotent), and a member whose state came from a
//! snapshot starts from `P = 0`.

use std::collections::HashSet;

use rocksdb::{CompactOptions, IteratorMode, ReadOptions, WriteBatch};

use crate::codec::{Rev, escape_key, hist_key, unescape_key};
use crate::db::{CF_HIST, CF_META, CF_REV, Store};
use crate::error::KvError;
use crate::mvcc::{KEY_COMPACTED, RevRecord, decode_record, read_i64};

/// The compaction revision up to which history has been physically removed.
pub(crate) const KEY_PHYSICAL: &[u8] = b"sm/physically-compacted";

/// Where a pass stands between two steps.
#[derive(Debug, Default, Clone)]
pub struct CompactCursor {
    /// The last revision-index key looked at.
    after: Option<Vec<u8>>,
    /// Entries deleted so far in this pass.
    deleted: u64,
}

impl CompactCursor {
    /// History entries (versions) this pass has deleted so far.
    pub fn deleted(&self) -> u64 {
        self.deleted
    }
}

/// What one step did.
#[derive(Debug)]
pub enum CompactStep {
    /// More of the window to look at: call again with this cursor.
    More(CompactCursor),
    /// The pass reached the end of its window.
    Done(CompactCursor),
}

/// Removes compacted history from one member's store, step by step.
#[derive(Debug, Clone)]
pub struct HistoryCompactor {
    store: Store,
}

impl HistoryCompactor {
    pub fn new(store: Store) -> HistoryCompactor {
        HistoryCompactor { store }
    }

    /// The compaction revision (what a pass should reach) and the one history
    /// has been physically removed up to (where the pass starts).
    pub fn targets(&self) -> Result<(i64, i64), KvError> {
        let opts = ReadOptions::default();
        Ok((
            read_i64(&self.store, &opts, KEY_COMPACTED)?,
            read_i64(&self.store, &opts, KEY_PHYSICAL)?,
        ))
    }

    /// Looks at up to `max_entries` revisions of the window `(from, target]`
    /// from `cursor`, deleting the versions a compaction at `target` removes
    /// from the keys they wrote. Blocks on RocksDB: call it off the async
    /// runtime. `target` must not exceed the applied compaction revision.
    pub fn step(
        &self,
        from: i64,
        target: i64,
        mut cursor: CompactCursor,
        max_entries: usize,
    ) -> Result<CompactStep, KvError> {
        let store = &self.store;
        let start = match &cursor.after {
            Some(k) => k.clone(),
            None => Rev {
                main: from.saturating_add(1),
                sub: 0,
            }
            .encode()
            .to_vec(),
        };
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(window_end(target).to_vec());
        let mut batch = WriteBatch::default();
        let mut done_keys: HashSet<Vec<u8>> = HashSet::new();
        let mut scanned = 0usize;
        let mut finished = true;
        let iter = store.db.iterator_cf_opt(
            store.cf(CF_REV),
            opts,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if cursor.after.as_deref() == Some(&*k) {
                continue;
            }
            if scanned >= max_entries {
                finished = false;
                break;
            }
            scanned += 1;
            let rec: RevRecord = decode_record(&v)?;
            if done_keys.insert(rec.key.clone()) {
                cursor.deleted += self.trim_key(&rec.key, target, &mut batch)?;
            }
            cursor.after = Some(k.to_vec());
        }
        store.db.write(batch)?;
        Ok(if finished {
            CompactStep::Done(cursor)
        } else {
            CompactStep::More(cursor)
        })
    }

    /// Deletes `key`'s versions at or below `target` but the newest, and the
    /// newest too when it is a tombstone. Returns how many.
    fn trim_key(&self, key: &[u8], target: i64, batch: &mut WriteBatch) -> Result<u64, KvError> {
        let store = &self.store;
        let mut lower = Vec::new();
        escape_key(key, &mut lower);
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lower.clone());
        opts.set_iterate_upper_bound(hist_key(
            key,
            Rev {
                main: target.saturating_add(1),
                sub: 0,
            },
        ));
        let mut versions: Vec<(Vec<u8>, Rev)> = Vec::new();
        for item in store.db.iterator_cf_opt(
            store.cf(CF_HIST),
            opts,
            IteratorMode::From(&lower, rocksdb::Direction::Forward),
        ) {
            let (hk, _) = item?;
            let rest = unescape_key(&hk)
                .and_then(|(k, rest)| (k == key).then(|| rest.to_vec()))
                .ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            let r =
                Rev::decode(&rest).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            versions.push((hk.to_vec(), r));
        }
        let Some((newest_hk, newest)) = versions.pop() else {
            return Ok(0);
        };
        let mut deleted = 0;
        // Older first, then (if it goes) the newest: one batch, so never seen apart.
        for (hk, r) in versions {
            delete(store, batch, &hk, r);
            deleted += 1;
        }
        let tomb = match store.db.get_cf(store.cf(CF_REV), newest.encode())? {
            Some(b) => decode_record::<RevRecord>(&b)?.kv.is_none(),
            None => true,
        };
        if tomb {
            delete(store, batch, &newest_hk, newest);
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Records that history is removed up to `target`, then compacts the
    /// window's range of the revision index in RocksDB so its space returns to
    /// the disk. Blocks for as long as RocksDB takes.
    pub fn finish(&self, from: i64, target: i64) -> Result<(), KvError> {
        let store = &self.store;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(store.cf(CF_META), KEY_PHYSICAL, target.to_be_bytes());
        store.db.write_opt(batch, &opts)?;
        let mut compact = CompactOptions::default();
        compact.set_exclusive_manual_compaction(false);
        let start = Rev {
            main: from.saturating_add(1),
            sub: 0,
        }
        .encode();
        store.db.compact_range_cf_opt(
            store.cf(CF_REV),
            Some(&start[..]),
            Some(&window_end(target)[..]),
            &compact,
        );
        Ok(())
    }
}

/// The first revision-index key after the window ending at `target`.
fn window_end(target: i64) -> [u8; 16] {
    Rev {
        main: target.saturating_add(1),
        sub: 0,
    }
    .encode()
}

fn delete(store: &Store, batch: &mut WriteBatch, hist_key: &[u8], r: Rev) {
    batch.delete_cf(store.cf(CF_HIST), hist_key);
    batch.delete_cf(store.cf(CF_REV), r.encode());
}
