//! Watch events: what the apply path publishes, and how a watcher that starts
//! behind the in-memory log reads the history from RocksDB.

use cellplane_proto::mvccpb::event::EventType;
use cellplane_proto::mvccpb::{Event, KeyValue};
use rocksdb::{IteratorMode, ReadOptions};

use crate::codec::{Rev, escape_key, hist_key, unescape_key};
use crate::db::{CF_HIST, CF_REV};
use crate::error::KvError;
use crate::mvcc::{KeyRange, KvReader, RevRecord, decode_record};

/// Every event of one revision, in the order the revision wrote them. Events carry
/// the previous version of their key; watchers that did not ask for it drop it.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionEvents {
    pub revision: i64,
    pub events: Vec<Event>,
    /// The events were too large to keep in the in-memory log (`events` is empty):
    /// read them with [`KvReader::history`]`(revision, revision)`.
    pub elided: bool,
}

impl RevisionEvents {
    /// Bytes of keys and values the events hold (what keeping them costs).
    pub fn payload_bytes(&self) -> usize {
        self.events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len());
                let prev = e
                    .prev_kv
                    .as_ref()
                    .map_or(0, |p| p.key.len() + p.value.len());
                kv + prev
            })
            .sum()
    }
}

impl KvReader {
    /// The events of revisions `from..=to` on keys in `range` (every key with
    /// `None`), read from the stored history (for a watcher that starts behind
    /// the in-memory event log). Only events in the range are built and kept, so
    /// a watcher of one prefix holds that prefix's history, not the cell's.
    /// Refused with `Compacted` when `from` is below the compaction.
    pub fn history(
        &self,
        from: i64,
        to: i64,
        range: Option<&KeyRange>,
    ) -> Result<Vec<RevisionEvents>, KvError> {
        let snap = self.store.db.snapshot();
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        let (_, compacted) = self.revisions()?;
        if from < compacted {
            return Err(KvError::Compacted { compacted });
        }
        opts.set_iterate_upper_bound(
            Rev {
                main: to + 1,
                sub: 0,
            }
            .encode()
            .to_vec(),
        );
        let start = Rev { main: from, sub: 0 }.encode();
        let mut out: Vec<RevisionEvents> = Vec::new();
        for item in self.store.db.iterator_cf_opt(
            self.store.cf(CF_REV),
            opts,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let rev =
                Rev::decode(&k).ok_or_else(|| KvError::Storage("corrupt revision key".into()))?;
            let rec: RevRecord = decode_record(&v)?;
            if range.is_some_and(|r| !r.contains(&rec.key)) {
                continue;
            }
            let prev = self.previous_version(&snap, &rec.key, rev)?;
            let event = Event {
                r#type: if rec.kv.is_some() {
                    EventType::Put
                } else {
                    EventType::Delete
                } as i32,
                kv: Some(match &rec.kv {
                    Some(r) => r.to_kv(&rec.key),
                    None => KeyValue {
                        key: rec.key.clone(),
                        mod_revision: rev.main,
                        ..Default::default()
                    },
                }),
                prev_kv: prev,
            };
            match out.last_mut() {
                Some(last) if last.revision == rev.main => last.events.push(event),
                _ => out.push(RevisionEvents {
                    elided: false,
                    revision: rev.main,
                    events: vec![event],
                }),
            }
        }
        Ok(out)
    }

    /// The version of `key` just before `rev`, if it existed and was not deleted.
    fn previous_version<D: rocksdb::DBAccess>(
        &self,
        snap: &rocksdb::SnapshotWithThreadMode<'_, D>,
        key: &[u8],
        rev: Rev,
    ) -> Result<Option<KeyValue>, KvError> {
        let mut lower = Vec::new();
        escape_key(key, &mut lower);
        let mut opts = ReadOptions::default();
        opts.set_snapshot(snap);
        opts.set_iterate_lower_bound(lower);
        let here = hist_key(key, rev);
        let mut iter = self.store.db.iterator_cf_opt(
            self.store.cf(CF_HIST),
            opts,
            IteratorMode::From(&here, rocksdb::Direction::Reverse),
        );
        for item in iter.by_ref() {
            let (k, _) = item?;
            if k.as_ref() == here.as_slice() {
                continue;
            }
            let Some((k_key, rest)) = unescape_key(&k) else {
                break;
            };
            if k_key != key {
                break;
            }
            let Some(prev_rev) = Rev::decode(rest) else {
                break;
            };
            let mut ropts = ReadOptions::default();
            ropts.set_snapshot(snap);
            let raw = self
                .store
                .db
                .get_cf_opt(self.store.cf(CF_REV), prev_rev.encode(), &ropts)?;
            return match raw {
                Some(b) => Ok(decode_record::<RevRecord>(&b)?.kv.map(|r| r.to_kv(key))),
                None => Ok(None),
            };
        }
        Ok(None)
    }
}
