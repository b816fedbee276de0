//! Physical compaction: removing the versions a compaction made unreadable.
//!
//! A `Compact` command is applied as a change of one number (the compaction
//! revision): reads below it are refused from then on, on every member at the
//! same log index. Removing the versions themselves scans the whole history, so
//! it runs outside the apply path, in steps of a bounded number of entries, at
//! each member's own pace ([`HistoryCompactor`]). Until it is done the old
//! versions take space but nobody can read them; HashKV looks only at what a
//! reader can see, so members part-way through agree with those done.
//!
//! A step deletes, for every key, its versions at or below the target except the
//! newest one, and that one too when it is a tombstone. Within a key it deletes
//! older versions before newer ones, so at every point a read at or above the
//! target sees what it saw before. When a pass is done, the deleted ranges are
//! compacted in RocksDB so their space goes back to the disk, and the target is
//! recorded; a member restarted mid-pass starts the pass again (deleting what is
//! left is idempotent).

use rocksdb::{CompactOptions, IteratorMode, ReadOptions, WriteBatch};

use crate::codec::{Rev, unescape_key};
use crate::db::{CF_HIST, CF_META, CF_REV, Store};
use crate::error::KvError;
use crate::mvcc::{KEY_COMPACTED, RevRecord, decode_record, read_i64};

/// The compaction revision up to which history has been physically removed.
pub(crate) const KEY_PHYSICAL: &[u8] = b"sm/physically-compacted";

/// Where a pass stands between two steps.
#[derive(Debug, Default, Clone)]
pub struct CompactCursor {
    /// The last history-index key looked at.
    after: Option<Vec<u8>>,
    /// The newest version at or below the target seen so far of the key being
    /// scanned: deleted when a newer one turns up, kept (unless a tombstone) when
    /// the key ends.
    candidate: Option<(Vec<u8>, Rev)>,
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
    /// More history to scan: call again with this cursor.
    More(CompactCursor),
    /// The pass reached the end of the history.
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
    /// has been physically removed up to.
    pub fn targets(&self) -> Result<(i64, i64), KvError> {
        let opts = ReadOptions::default();
        Ok((
            read_i64(&self.store, &opts, KEY_COMPACTED)?,
            read_i64(&self.store, &opts, KEY_PHYSICAL)?,
        ))
    }

    /// Scans up to `max_entries` history entries from `cursor`, deleting those
    /// a compaction at `target` removes. Blocks on RocksDB: call it off the
    /// async runtime. `target` must not exceed the applied compaction revision.
    pub fn step(
        &self,
        target: i64,
        mut cursor: CompactCursor,
        max_entries: usize,
    ) -> Result<CompactStep, KvError> {
        let store = &self.store;
        let mode = match &cursor.after {
            Some(k) => IteratorMode::From(k, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut batch = WriteBatch::default();
        let mut scanned = 0usize;
        let mut finished = true;
        for item in store.db.iterator_cf(store.cf(CF_HIST), mode) {
            let (k, _) = item?;
            if cursor.after.as_deref() == Some(&*k) {
                continue;
            }
            if scanned >= max_entries {
                finished = false;
                break;
            }
            scanned += 1;
            let (key, rest) =
                unescape_key(&k).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            let r =
                Rev::decode(rest).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            let same_key = cursor
                .candidate
                .as_ref()
                .is_some_and(|(hk, _)| unescape_key(hk).is_some_and(|(ck, _)| ck == key));
            if !same_key {
                self.settle(&mut cursor, &mut batch)?;
            }
            if r.main <= target {
                // A newer version at or below the target: the older one goes.
                if let Some((hk, old)) = cursor.candidate.replace((k.to_vec(), r)) {
                    delete(store, &mut batch, &hk, old);
                    cursor.deleted += 1;
                }
            }
            cursor.after = Some(k.to_vec());
        }
        if finished {
            self.settle(&mut cursor, &mut batch)?;
        }
        store.db.write(batch)?;
        Ok(if finished {
            CompactStep::Done(cursor)
        } else {
            CompactStep::More(cursor)
        })
    }

    /// The key being scanned ended: its newest old version stays unless it is a
    /// tombstone.
    fn settle(&self, cursor: &mut CompactCursor, batch: &mut WriteBatch) -> Result<(), KvError> {
        let Some((hk, r)) = cursor.candidate.take() else {
            return Ok(());
        };
        let tomb = match self.store.db.get_cf(self.store.cf(CF_REV), r.encode())? {
            Some(b) => decode_record::<RevRecord>(&b)?.kv.is_none(),
            None => true,
        };
        if tomb {
            delete(&self.store, batch, &hk, r);
            cursor.deleted += 1;
        }
        Ok(())
    }

    /// Records that history is removed up to `target`, then compacts the
    /// deleted ranges in RocksDB so their space returns to the disk. Blocks for
    /// as long as RocksDB takes.
    pub fn finish(&self, target: i64) -> Result<(), KvError> {
        let store = &self.store;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(store.cf(CF_META), KEY_PHYSICAL, target.to_be_bytes());
        store.db.write_opt(batch, &opts)?;
        let mut compact = CompactOptions::default();
        compact.set_exclusive_manual_compaction(false);
        let end = Rev {
            main: target.saturating_add(1),
            sub: 0,
        }
        .encode();
        store
            .db
            .compact_range_cf_opt(store.cf(CF_REV), None::<&[u8]>, Some(&end[..]), &compact);
        store
            .db
            .compact_range_cf_opt(store.cf(CF_HIST), None::<&[u8]>, None::<&[u8]>, &compact);
        Ok(())
    }
}

fn delete(store: &Store, batch: &mut WriteBatch, hist_key: &[u8], r: Rev) {
    batch.delete_cf(store.cf(CF_HIST), hist_key);
    batch.delete_cf(store.cf(CF_REV), r.encode());
}
