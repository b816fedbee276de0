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
    /// The events as encoded in a watch response (the repeated `events` field of
    /// an etcd WatchResponse, without previous values), filled by the first watch
    /// stream that needs them and shared by every other: a revision delivered to
    /// 1,000 streams is encoded once. Empty until then.
    pub encoded_events: std::sync::OnceLock<Vec<u8>>,
}

impl RevisionEvents {
    /// Bytes of keys and values the events hold (what keeping them costs).
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(event_bytes).sum()
    }
}

fn event_bytes(e: &Event) -> usize {
    let kv = e.kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len());
    let prev = e
        .prev_kv
        .as_ref()
        .map_or(0, |p| p.key.len() + p.value.len());
    kv + prev
}

/// A page of stored history (see [`KvReader::history_page`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub revisions: Vec<RevisionEvents>,
    /// Where to read on from, when the page stopped before the end asked for.
    pub next: Option<i64>,
}

/// History entries one page looks at, matching or not, before it stops at the
/// next revision boundary: bounds how long one read holds a thread.
const MAX_SCANNED_PER_PAGE: usize = 100_000;

impl KvReader {
    /// The events of revisions `from..=to` on keys in `range` (every key with
    /// `None`), read from the stored history, whole. For one revision or a short
    /// span; a watcher catching up reads [`KvReader::history_page`]s.
    pub fn history(
        &self,
        from: i64,
        to: i64,
        range: Option<&KeyRange>,
    ) -> Result<Vec<RevisionEvents>, KvError> {
        let mut out = Vec::new();
        let mut from = from;
        loop {
            let page = self.history_page(from, to, range, usize::MAX)?;
            out.extend(page.revisions);
            match page.next {
                Some(next) => from = next,
                None => return Ok(out),
            }
        }
    }

    /// The events of revisions `from..=to` on keys in `range` (every key with
    /// `None`), read from the stored history (for a watcher that starts behind
    /// the in-memory event log), a page at a time: whole revisions, stopping
    /// after the one that brings the page's keys and values past `max_bytes`, or
    /// after [`MAX_SCANNED_PER_PAGE`] entries looked at. Only events in the
    /// range are built and kept, so a watcher of one prefix holds at most a page
    /// of that prefix's history. Refused with `Compacted` when `from` is below
    /// the compaction.
    pub fn history_page(
        &self,
        from: i64,
        to: i64,
        range: Option<&KeyRange>,
        max_bytes: usize,
    ) -> Result<HistoryPage, KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        let (_, compacted) = self.revisions()?;
        if from < compacted {
            return Err(KvError::Compacted { compacted });
        }
        opts.set_iterate_upper_bound(
            Rev {
                main: to.saturating_add(1),
                sub: 0,
            }
            .encode()
            .to_vec(),
        );
        let start = Rev { main: from, sub: 0 }.encode();
        let mut out: Vec<RevisionEvents> = Vec::new();
        let (mut bytes, mut scanned, mut last_main) = (0usize, 0usize, None);
        for item in self.store.db.iterator_cf_opt(
            self.store.cf(CF_REV),
            opts,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let rev =
                Rev::decode(&k).ok_or_else(|| KvError::Storage("corrupt revision key".into()))?;
            if last_main != Some(rev.main)
                && (bytes >= max_bytes || scanned >= MAX_SCANNED_PER_PAGE)
            {
                return Ok(HistoryPage {
                    revisions: out,
                    next: Some(rev.main),
                });
            }
            last_main = Some(rev.main);
            scanned += 1;
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
            bytes += event_bytes(&event);
            match out.last_mut() {
                Some(last) if last.revision == rev.main => last.events.push(event),
                _ => out.push(RevisionEvents {
                    elided: false,
                    revision: rev.main,
                    events: vec![event],
                    encoded_events: Default::default(),
                }),
            }
        }
        Ok(HistoryPage {
            revisions: out,
            next: None,
        })
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
