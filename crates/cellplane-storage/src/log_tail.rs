//! The newest entries of the Raft log, kept in memory as they were appended.
//!
//! openraft reads every entry back after appending it: once per follower to
//! replicate it (on the leader) and once more to apply it (on every member).
//! From RocksDB each read is an iterator over the memtables and every level plus
//! a decode of each entry; from here it is a clone. The cache holds a
//! contiguous run of indexes, always a subset of what RocksDB holds (entries go
//! in after RocksDB has them and come out before RocksDB drops them), so a read
//! it can answer whole gets exactly what RocksDB would have returned; any other
//! read goes to RocksDB.

use std::collections::VecDeque;
use std::ops::Range;

use openraft::Entry;

use crate::types::TypeConfig;

/// What the cache may hold, in encoded bytes plus each entry's own size. Past it
/// the oldest entries are dropped: a follower that far behind reads from RocksDB.
pub(crate) const TAIL_CACHE_BYTES: usize = 16 << 20;

/// A contiguous run of the log's newest entries (see the module docs).
#[derive(Default)]
pub(crate) struct LogTail {
    /// Index of `entries[0]`.
    first: u64,
    /// Each entry with what it is charged against the budget.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
    budget: usize,
}

impl LogTail {
    pub(crate) fn new(budget: usize) -> LogTail {
        LogTail {
            budget,
            ..LogTail::default()
        }
    }

    /// One past the last cached index.
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Clones of the entries `range`, if every one of them is cached.
    pub(crate) fn get(&self, range: Range<u64>) -> Option<Vec<Entry<TypeConfig>>> {
        if range.start >= range.end || range.start < self.first || range.end > self.end() {
            return None;
        }
        let from = (range.start - self.first) as usize;
        let to = (range.end - self.first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// Records an entry RocksDB now holds, `encoded` bytes long. An entry that
    /// replaces a cached index drops the cached ones from there on; one that
    /// leaves a gap starts the run anew.
    pub(crate) fn push(&mut self, entry: Entry<TypeConfig>, encoded: usize) {
        let index = entry.log_id.index;
        if self.entries.is_empty() || index < self.first || index > self.end() {
            self.clear_from(self.first);
            self.first = index;
        } else if index < self.end() {
            self.clear_from(index);
        }
        let charge = encoded + std::mem::size_of::<Entry<TypeConfig>>();
        self.entries.push_back((entry, charge));
        self.bytes += charge;
        while self.bytes > self.budget {
            match self.entries.pop_front() {
                Some((_, c)) => {
                    self.bytes -= c;
                    self.first += 1;
                }
                None => break,
            }
        }
    }

    /// Forgets the entries at `index` and after (the log is truncated there).
    pub(crate) fn clear_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first) as usize;
        while self.entries.len() > keep {
            if let Some((_, c)) = self.entries.pop_back() {
                self.bytes -= c;
            }
        }
    }

    /// Forgets the entries up to and including `index` (the log is purged there).
    pub(crate) fn clear_through(&mut self, index: u64) {
        while self.first <= index {
            match self.entries.pop_front() {
                Some((_, c)) => {
                    self.bytes -= c;
                    self.first += 1;
                }
                None => {
                    self.first = index + 1;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    use super::LogTail;
    use crate::types::TypeConfig;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(t: &LogTail, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        t.get(from..to).map(|v| {
            v.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect()
        })
    }

    #[test]
    fn answers_only_ranges_it_holds_whole() {
        let mut t = LogTail::new(1 << 20);
        for i in 5..10 {
            t.push(entry(1, i), 10);
        }
        assert_eq!(indexes(&t, 6, 9), Some(vec![(1, 6), (1, 7), (1, 8)]));
        assert_eq!(indexes(&t, 5, 10).map(|v| v.len()), Some(5));
        assert_eq!(indexes(&t, 4, 8), None, "index 4 is not cached");
        assert_eq!(indexes(&t, 8, 11), None, "index 10 is not cached");
        assert_eq!(indexes(&t, 7, 7), None, "empty ranges go to RocksDB");
    }

    #[test]
    fn an_overwrite_drops_what_followed_and_a_gap_starts_anew() {
        let mut t = LogTail::new(1 << 20);
        for i in 1..6 {
            t.push(entry(1, i), 10);
        }
        // A new leader's entry at 3 replaces 3, 4 and 5.
        t.push(entry(2, 3), 10);
        assert_eq!(indexes(&t, 1, 4), Some(vec![(1, 1), (1, 2), (2, 3)]));
        assert_eq!(indexes(&t, 3, 5), None);
        // An entry after a gap (a snapshot was installed): only it is cached.
        t.push(entry(2, 50), 10);
        assert_eq!(indexes(&t, 50, 51), Some(vec![(2, 50)]));
        assert_eq!(indexes(&t, 3, 4), None);
        // An entry before the run also starts it anew.
        t.push(entry(3, 7), 10);
        assert_eq!(indexes(&t, 7, 8), Some(vec![(3, 7)]));
        assert_eq!(indexes(&t, 50, 51), None);
    }

    #[test]
    fn truncate_and_purge_forget_their_entries() {
        let mut t = LogTail::new(1 << 20);
        for i in 1..11 {
            t.push(entry(1, i), 10);
        }
        t.clear_from(8);
        assert_eq!(indexes(&t, 1, 8).map(|v| v.len()), Some(7));
        assert_eq!(indexes(&t, 7, 9), None);
        t.clear_through(3);
        assert_eq!(indexes(&t, 3, 5), None);
        assert_eq!(indexes(&t, 4, 8).map(|v| v.len()), Some(4));
        // Purging past the cached run empties it; the next entry starts a new one.
        t.clear_through(20);
        assert_eq!(indexes(&t, 7, 8), None);
        t.push(entry(1, 21), 10);
        assert_eq!(indexes(&t, 21, 22), Some(vec![(1, 21)]));
        assert_eq!(t.bytes, 10 + std::mem::size_of::<Entry<TypeConfig>>());
    }

    #[test]
    fn the_oldest_entries_leave_past_the_budget() {
        let each = 100 + std::mem::size_of::<Entry<TypeConfig>>();
        let mut t = LogTail::new(3 * each);
        for i in 1..=5 {
            t.push(entry(1, i), 100);
        }
        assert_eq!(indexes(&t, 3, 6).map(|v| v.len()), Some(3));
        assert_eq!(indexes(&t, 2, 4), None);
        assert_eq!(t.bytes, 3 * each);
    }
}
