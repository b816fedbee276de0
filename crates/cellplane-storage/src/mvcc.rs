//! The MVCC model shared by the read path and the apply path: record formats, range
//! evaluation with etcd's semantics, and request validation done before a request
//! is proposed.

use std::collections::{BTreeMap, HashSet};

use cellplane_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader,
    TxnRequest, range_request::SortOrder, range_request::SortTarget, request_op,
};
use cellplane_proto::mvccpb::KeyValue;
use rocksdb::{IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};

use crate::codec::{Rev, escape_key, unescape_key};
use crate::db::{CF_HIST, CF_KV, CF_META, CF_REV, Store};
use crate::error::KvError;

pub(crate) const KEY_REVISION: &[u8] = b"sm/revision";
pub(crate) const KEY_COMPACTED: &[u8] = b"sm/compacted";

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KvRecord {
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl KvRecord {
    pub fn to_kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }
}

/// An entry of the revision log: the key and its new version, or `None` for a
/// deletion (a tombstone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RevRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub kv: Option<KvRecord>,
}

/// A user key and its newest version.
pub(crate) type KeyRecord = (Vec<u8>, KvRecord);

/// Limits on requests, applied before anything is proposed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest encoded request, in bytes (etcd: 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most compares, or ops in one branch, of a Txn (etcd: 128).
    pub max_txn_ops: usize,
    /// Largest range answered, in key and value bytes: a bigger one is refused
    /// before it is read into memory, naming the limit (etcd has none short of
    /// gRPC's 2 GiB; paginate with `limit`).
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 3 * 512 * 1024,
            max_txn_ops: 128,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

pub use cellplane_proto::DEFAULT_MAX_RESPONSE_BYTES;
use cellplane_proto::RESPONSE_ENTRY_BYTES;

/// The key interval `[key, range_end)` of a request, as etcd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key (`range_end` empty).
    Single(Vec<u8>),
    /// `[start, end)`; `end: None` is unbounded (`range_end` = "\0").
    Span {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

impl KeyRange {
    /// The interval of a request's `key` and `range_end`.
    pub fn new(key: &[u8], range_end: &[u8]) -> KeyRange {
        if range_end.is_empty() {
            KeyRange::Single(key.to_vec())
        } else if range_end == [0] {
            KeyRange::Span {
                start: key.to_vec(),
                end: None,
            }
        } else {
            KeyRange::Span {
                start: key.to_vec(),
                end: Some(range_end.to_vec()),
            }
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(s) => s.as_slice() == k,
            KeyRange::Span { start, end } => {
                k >= start.as_slice() && end.as_ref().is_none_or(|e| k < e.as_slice())
            }
        }
    }
}

fn check_key_and_range(key: &[u8], range_end: &[u8]) -> Result<(), KvError> {
    // etcd allows an empty key only together with range_end "\0" (every key).
    if key.is_empty() && range_end != [0] {
        return Err(KvError::EmptyKey);
    }
    if !range_end.is_empty() && range_end != [0] && range_end <= key {
        return Err(KvError::Invalid(format!(
            "range_end ({}) must sort after key ({}); use \"\\0\" for every key from key on",
            show(range_end),
            show(key)
        )));
    }
    Ok(())
}

fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// Checks a Range before it is served.
pub fn check_range(r: &RangeRequest) -> Result<(), KvError> {
    check_key_and_range(&r.key, &r.range_end)?;
    if r.limit < 0 {
        return Err(KvError::Invalid("limit must not be negative".into()));
    }
    if SortOrder::try_from(r.sort_order).is_err() {
        return Err(KvError::Invalid(format!(
            "unknown sort_order {}",
            r.sort_order
        )));
    }
    if SortTarget::try_from(r.sort_target).is_err() {
        return Err(KvError::Invalid(format!(
            "unknown sort_target {}",
            r.sort_target
        )));
    }
    Ok(())
}

/// Checks a Put before it is proposed.
pub fn check_put(r: &PutRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

/// Checks a DeleteRange before it is proposed.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), KvError> {
    check_key_and_range(&r.key, &r.range_end)
}

/// Checks a Txn before it is proposed: sizes, every op, and no two writes to one key
/// in one branch (etcd refuses those, as their order would be ambiguous).
pub fn check_txn(t: &TxnRequest, limits: &Limits) -> Result<(), KvError> {
    let max = limits.max_txn_ops;
    if t.compare.len() > max || t.success.len() > max || t.failure.len() > max {
        return Err(KvError::TooManyOps { max });
    }
    for c in &t.compare {
        check_key_and_range(&c.key, &c.range_end)?;
    }
    for branch in [&t.success, &t.failure] {
        for op in branch {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => check_range(r)?,
                Some(request_op::Request::RequestPut(p)) => check_put(p)?,
                Some(request_op::Request::RequestDeleteRange(d)) => check_delete(d)?,
                Some(request_op::Request::RequestTxn(t)) => check_txn(t, limits)?,
                None => return Err(KvError::Invalid("txn op has no request".into())),
            }
        }
        check_branch_writes(branch)?;
    }
    Ok(())
}

fn check_branch_writes(ops: &[RequestOp]) -> Result<(), KvError> {
    let mut puts = HashSet::new();
    let mut deletes = Vec::new();
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) if !puts.insert(p.key.clone()) => {
                return Err(KvError::DuplicateKey);
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                deletes.push(KeyRange::new(&d.key, &d.range_end))
            }
            _ => {}
        }
    }
    if puts.iter().any(|k| deletes.iter().any(|d| d.contains(k))) {
        return Err(KvError::DuplicateKey);
    }
    Ok(())
}

/// Applies etcd's post-processing of a range: filters, sort, limit, keys_only and
/// count_only. `kvs` must be in ascending key order; `count` is the number of keys
/// in the range before filters (`kvs` may hold fewer: see [`scan_limit`]).
pub(crate) fn finish_range(
    r: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    count: usize,
    revision: i64,
) -> RangeResponse {
    let count = count as i64;
    if r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
    {
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        });
    }
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    // As etcd: results are already ascending by key; a non-key target with no order
    // means ascending.
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        match target {
            SortTarget::Key => {}
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.count_only {
        kvs.clear();
    } else if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        kvs,
        more,
        count,
    }
}

/// What [`KvReader::hash_kv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The compaction revision: hashes compare only between equal ones.
    pub compacted: i64,
    /// The revision hashed up to.
    pub revision: i64,
}

/// Reads of the key-value store. Every read uses a RocksDB snapshot, so it sees one
/// revision and holds nothing the apply path waits for. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KvReader {
    pub(crate) store: Store,
    max_response_bytes: usize,
}

impl KvReader {
    pub fn new(store: Store) -> KvReader {
        KvReader {
            store,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// The same reader, refusing ranges larger than `bytes`.
    pub fn with_max_response_bytes(mut self, bytes: usize) -> KvReader {
        self.max_response_bytes = bytes;
        self
    }

    /// The newest revision and the compaction revision.
    pub fn revisions(&self) -> Result<(i64, i64), KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        read_revisions(&self.store, &opts)
    }

    /// The raised alarms: (member id, etcd `AlarmType` value).
    pub fn alarms(&self) -> Result<crate::AlarmSet, KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        crate::alarm::read_alarms(&self.store, opts)
    }

    /// etcd's HashKV: a hash of the history a reader can see up to `rev` (0:
    /// the newest): every version and tombstone after the compaction revision,
    /// and, at or below it, the version of each key a read at the compaction
    /// revision returns. Members that applied the same log see the same history,
    /// however far each has physically removed compacted versions (that runs in
    /// the background, at each member's pace), so two members' hashes at one
    /// revision with the same compaction revision must agree; a difference is
    /// corruption. Streams the history once on a RocksDB snapshot, holding one
    /// entry at a time: call it off the async runtime.
    pub fn hash_kv(&self, rev: i64) -> Result<KvHash, KvError> {
        use sha2::Digest;
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        let (current, compacted) = read_revisions(&self.store, &opts)?;
        let rev = if rev <= 0 { current } else { rev };
        if rev > current {
            return Err(KvError::FutureRevision { current });
        }
        if rev < compacted {
            return Err(KvError::Compacted { compacted });
        }
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        opts.set_iterate_upper_bound(
            Rev {
                main: rev.saturating_add(1),
                sub: 0,
            }
            .encode()
            .to_vec(),
        );
        let mut h = sha2::Sha256::new();
        for item in self
            .store
            .db
            .iterator_cf_opt(self.store.cf(CF_REV), opts, IteratorMode::Start)
        {
            let (k, v) = item?;
            let r =
                Rev::decode(&k).ok_or_else(|| KvError::Storage("corrupt revision key".into()))?;
            if r.main <= compacted && !self.survives_compaction(&snap, r, &v, compacted)? {
                continue;
            }
            crate::db::hash_entry(&mut h, &k, &v);
        }
        Ok(KvHash {
            hash: crate::db::truncate_hash(h),
            compacted,
            revision: rev,
        })
    }

    /// Whether the history entry `r` (value `raw`), at or below `compacted`, is
    /// one a compaction at `compacted` keeps: its key's newest version at or
    /// below it, and not a tombstone.
    fn survives_compaction(
        &self,
        snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
        r: Rev,
        raw: &[u8],
        compacted: i64,
    ) -> Result<bool, KvError> {
        let rec: RevRecord = decode_record(raw)?;
        if rec.kv.is_none() {
            return Ok(false);
        }
        Ok(newest_at_or_below(&self.store, snap, &rec.key, compacted)? == Some(r))
    }

    /// Serves a Range (already checked with [`check_range`]).
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        let (current, compacted) = read_revisions(&self.store, &opts)?;
        let kr = KeyRange::new(&r.key, &r.range_end);
        let (kvs, count) = if r.revision <= 0 || r.revision == current {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snap);
            let budget = self.max_response_bytes;
            let (recs, count) =
                scan_current_limited(&self.store, opts, &kr, scan_limit(r), budget)?;
            (
                recs.into_iter().map(|(k, rec)| rec.to_kv(&k)).collect(),
                count,
            )
        } else {
            if r.revision > current {
                return Err(KvError::FutureRevision { current });
            }
            if r.revision < compacted {
                return Err(KvError::Compacted { compacted });
            }
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snap);
            let kvs = scan_at(
                &self.store,
                opts,
                &kr,
                r.revision,
                &snap,
                self.max_response_bytes,
            )?;
            let count = kvs.len();
            (kvs, count)
        };
        Ok(finish_range(r, kvs, count, current))
    }
}

pub(crate) fn read_i64(store: &Store, opts: &ReadOptions, key: &[u8]) -> Result<i64, KvError> {
    match store.db.get_cf_opt(store.cf(CF_META), key, opts)? {
        None => Ok(0),
        Some(b) => {
            Ok(i64::from_be_bytes(b.as_slice().try_into().map_err(
                |_| KvError::Storage(format!("corrupt {}", show(key))),
            )?))
        }
    }
}

fn read_revisions(store: &Store, opts: &ReadOptions) -> Result<(i64, i64), KvError> {
    Ok((
        read_i64(store, opts, KEY_REVISION)?,
        read_i64(store, opts, KEY_COMPACTED)?,
    ))
}

pub(crate) fn decode_record<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, KvError> {
    postcard::from_bytes(b).map_err(|e| KvError::Storage(format!("corrupt record: {e}")))
}

/// How many records a range needs decoded, when fewer than all will do: with no
/// sort and no filter only the first `limit + 1` (the extra one tells `more`), and
/// none for `count_only`. The rest are only counted.
pub(crate) fn scan_limit(r: &RangeRequest) -> Option<usize> {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let key_order =
        r.sort_target == SortTarget::Key as i32 && r.sort_order != SortOrder::Descend as i32;
    if filtered || !key_order {
        return None;
    }
    if r.count_only {
        Some(0)
    } else if r.limit > 0 {
        Some(r.limit as usize + 1)
    } else {
        None
    }
}

/// Like [`scan_current`], decoding at most `keep` records; returns them and the
/// number of keys in the range.
pub(crate) fn scan_current_limited(
    store: &Store,
    mut opts: ReadOptions,
    kr: &KeyRange,
    keep: Option<usize>,
    budget: usize,
) -> Result<(Vec<KeyRecord>, usize), KvError> {
    let KeyRange::Span { start, end } = kr else {
        let all = scan_current(store, opts, kr, usize::MAX)?;
        let n = all.len();
        return Ok((
            all.into_iter().take(keep.unwrap_or(usize::MAX)).collect(),
            n,
        ));
    };
    if let Some(end) = end {
        opts.set_iterate_upper_bound(end.clone());
    }
    let mut out = Vec::new();
    let mut count = 0;
    let mut bytes = 0usize;
    let iter = store.db.iterator_cf_opt(
        store.cf(CF_KV),
        opts,
        IteratorMode::From(start, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (k, v) = item?;
        if keep.is_none_or(|n| out.len() < n) {
            bytes = bytes.saturating_add(k.len() + v.len() + RESPONSE_ENTRY_BYTES);
            if bytes > budget {
                return Err(KvError::ResponseTooLarge { max: budget });
            }
            out.push((k.to_vec(), decode_record(&v)?));
        }
        count += 1;
    }
    Ok((out, count))
}

/// The newest version of every live key in `kr`, ascending by key; refused with
/// `ApplyTooLarge` past `budget` bytes of keys and values.
pub(crate) fn scan_current(
    store: &Store,
    mut opts: ReadOptions,
    kr: &KeyRange,
    budget: usize,
) -> Result<Vec<(Vec<u8>, KvRecord)>, KvError> {
    let cf = store.cf(CF_KV);
    match kr {
        KeyRange::Single(k) => Ok(match store.db.get_cf_opt(cf, k, &opts)? {
            Some(b) => vec![(k.clone(), decode_record(&b)?)],
            None => vec![],
        }),
        KeyRange::Span { start, end } => {
            if let Some(end) = end {
                opts.set_iterate_upper_bound(end.clone());
            }
            let mut out = Vec::new();
            let mut bytes = 0usize;
            let iter = store.db.iterator_cf_opt(
                cf,
                opts,
                IteratorMode::From(start, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (k, v) = item?;
                bytes = bytes.saturating_add(k.len() + v.len() + RESPONSE_ENTRY_BYTES);
                if bytes > budget {
                    return Err(KvError::ApplyTooLarge { max: budget });
                }
                out.push((k.to_vec(), decode_record(&v)?));
            }
            Ok(out)
        }
    }
}

/// Every live key in `kr` as it was at revision `at`, ascending by key.
fn scan_at<D: rocksdb::DBAccess>(
    store: &Store,
    mut opts: ReadOptions,
    kr: &KeyRange,
    at: i64,
    snap: &rocksdb::SnapshotWithThreadMode<'_, D>,
    budget: usize,
) -> Result<Vec<KeyValue>, KvError> {
    let (start, upper) = match kr {
        KeyRange::Single(k) => {
            let mut s = Vec::new();
            escape_key(k, &mut s);
            // Every history entry of k is escape(k) ++ rev; the next possible prefix
            // after the terminator 0x00 0x01 is 0x00 0x02.
            let mut u = s.clone();
            if let Some(last) = u.last_mut() {
                *last = 0x02;
            }
            (s, Some(u))
        }
        KeyRange::Span { start, end } => {
            let mut s = Vec::new();
            escape_key(start, &mut s);
            s.truncate(s.len() - 2);
            let u = end.as_ref().map(|e| {
                let mut u = Vec::new();
                escape_key(e, &mut u);
                u.truncate(u.len() - 2);
                u
            });
            (s, u)
        }
    };
    if let Some(u) = upper {
        opts.set_iterate_upper_bound(u);
    }
    // For each key, the newest revision at or below `at`.
    let mut chosen: BTreeMap<Vec<u8>, Rev> = BTreeMap::new();
    let iter = store.db.iterator_cf_opt(
        store.cf(CF_HIST),
        opts,
        IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (k, _) = item?;
        let (key, rest) =
            unescape_key(&k).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
        let rev =
            Rev::decode(rest).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
        if rev.main <= at {
            chosen.insert(key, rev);
        }
    }
    let mut out = Vec::with_capacity(chosen.len());
    let mut ropts = ReadOptions::default();
    ropts.set_snapshot(snap);
    let mut bytes = 0usize;
    for (key, rev) in chosen {
        let raw = store
            .db
            .get_cf_opt(store.cf(CF_REV), rev.encode(), &ropts)?
            .ok_or_else(|| KvError::Storage(format!("history of {} lost", show(&key))))?;
        bytes = bytes.saturating_add(raw.len() + RESPONSE_ENTRY_BYTES);
        if bytes > budget {
            return Err(KvError::ResponseTooLarge { max: budget });
        }
        let rec: RevRecord = decode_record(&raw)?;
        if let Some(kv) = rec.kv {
            out.push(kv.to_kv(&key));
        }
    }
    Ok(out)
}

/// The revision of `key`'s newest version (or tombstone) at or below `rev`, as
/// `snap` sees the history index.
pub(crate) fn newest_at_or_below(
    store: &Store,
    snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
    key: &[u8],
    rev: i64,
) -> Result<Option<Rev>, KvError> {
    let mut lower = Vec::new();
    escape_key(key, &mut lower);
    let mut opts = ReadOptions::default();
    opts.set_snapshot(snap);
    opts.set_iterate_lower_bound(lower);
    let top = crate::codec::hist_key(
        key,
        Rev {
            main: rev,
            sub: i64::MAX,
        },
    );
    let mut iter = store.db.iterator_cf_opt(
        store.cf(CF_HIST),
        opts,
        IteratorMode::From(&top, rocksdb::Direction::Reverse),
    );
    let Some(item) = iter.next() else {
        return Ok(None);
    };
    let (k, _) = item?;
    Ok(match unescape_key(&k) {
        Some((k_key, rest)) if k_key == key => Rev::decode(rest),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ranges_are_refused_with_a_reason() {
        assert_eq!(check_key_and_range(b"", b""), Err(KvError::EmptyKey));
        assert!(check_key_and_range(b"", b"\0").is_ok());
        assert!(check_key_and_range(b"a", b"\0").is_ok());
        assert!(matches!(
            check_key_and_range(b"b", b"a"),
            Err(KvError::Invalid(_))
        ));
        assert!(check_key_and_range(b"a", b"b").is_ok());
    }

    #[test]
    fn txn_with_two_writes_to_one_key_is_refused() {
        let put = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let del = |k: &str, e: &str| RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.into(),
                    range_end: e.into(),
                    ..Default::default()
                },
            )),
        };
        let limits = Limits::default();
        let t = TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert_eq!(check_txn(&t, &limits), Err(KvError::DuplicateKey));
        let t = TxnRequest {
            success: vec![put("ab"), del("a", "b")],
            ..Default::default()
        };
        assert_eq!(check_txn(&t, &limits), Err(KvError::DuplicateKey));
        let t = TxnRequest {
            success: vec![put("a")],
            failure: vec![put("a")],
            ..Default::default()
        };
        assert!(check_txn(&t, &limits).is_ok());
        let t = TxnRequest {
            success: (0..129).map(|i| put(&i.to_string())).collect(),
            ..Default::default()
        };
        assert_eq!(
            check_txn(&t, &limits),
            Err(KvError::TooManyOps { max: 128 })
        );
    }
}
