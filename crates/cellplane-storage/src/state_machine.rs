//! The replicated state machine: applies committed Raft entries to the MVCC store,
//! builds and installs snapshots.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use cellplane_proto::etcdserverpb::{
    AlarmMember, AlarmResponse, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantResponse, LeaseRevokeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
    compare, request_op, response_op,
};
use cellplane_proto::mvccpb::event::EventType;
use cellplane_proto::mvccpb::{Event, KeyValue};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use prost::Message;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::alarm::{
    AlarmSet, Effect, Raised, alarm_key, check_kind, gate, read_alarms, txn_writes,
};
use crate::codec::{Rev, hist_key, unescape_key};
use crate::db::{CF_ALARM, CF_HIST, CF_KV, CF_LEASE, CF_META, CF_REV, SM_CFS, Store};
use crate::error::KvError;
use crate::events::RevisionEvents;
use crate::lease::{
    LeaseRecord, MAX_LEASE_TTL, attached_key, attached_keys, in_namespace, lease_key, read_lease,
};
use crate::mvcc::{
    KEY_COMPACTED, KEY_REVISION, KeyRange, KvReader, KvRecord, RevRecord, decode_record,
    finish_range, read_i64, scan_current,
};
use crate::types::{BatchResponse, Command, CommandResponse, Member, NodeId, TypeConfig};

const KEY_APPLIED: &[u8] = b"sm/applied";
const KEY_MEMBERSHIP: &[u8] = b"sm/membership";
const KEY_SNAPSHOT: &[u8] = b"sm/snapshot";

type SResult<T> = Result<T, StorageError<NodeId>>;

/// What the apply path publishes after each batch, for readers that wait on it
/// (linearizable reads, metrics, readiness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppliedState {
    pub log_index: u64,
    pub revision: i64,
    pub compacted: i64,
    /// The kinds of alarm raised in the cell.
    pub alarms: Raised,
}

/// The state machine of one member.
pub struct StateMachine {
    store: Store,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    revision: i64,
    compacted: i64,
    alarms: AlarmSet,
    published: watch::Sender<AppliedState>,
    /// Serializes writes of the stored snapshot: openraft may build one while it
    /// installs another, and an older one must never replace a newer one.
    snapshot_lock: Arc<Mutex<()>>,
    /// The in-memory event log: the newest revisions' events, for watchers.
    events_tx: broadcast::Sender<Arc<RevisionEvents>>,
    /// Revisions with more event bytes than this enter the log without them.
    max_revision_bytes: usize,
}

/// The bounds of the in-memory event log: its memory is at most `revisions` times
/// `revision_bytes` (plus per-event overhead).
#[derive(Debug, Clone, Copy)]
pub struct EventLogLimits {
    /// Revisions kept; a watcher further behind is canceled and resumes from
    /// RocksDB.
    pub revisions: usize,
    /// A revision with more key and value bytes than this is kept without its
    /// events (marked `elided`); watchers read them from RocksDB.
    pub revision_bytes: usize,
}

impl Default for EventLogLimits {
    fn default() -> Self {
        EventLogLimits {
            revisions: DEFAULT_EVENT_LOG_REVISIONS,
            revision_bytes: 64 << 10,
        }
    }
}

/// Revisions the in-memory event log keeps by default.
pub const DEFAULT_EVENT_LOG_REVISIONS: usize = 4096;

/// What a snapshot carries besides openraft's meta: the raw state-machine column
/// families and the two revisions.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    revision: i64,
    compacted: i64,
    cfs: Vec<(String, Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

fn rw(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

fn rd(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&std::io::Error::other(e.to_string())).into()
}

impl StateMachine {
    /// Loads the state machine from `store`, with the default event log.
    pub fn new(store: Store) -> SResult<StateMachine> {
        Self::open(store, EventLogLimits::default())
    }

    /// Loads the state machine from `store`, with an event log bounded by `log`.
    pub fn open(store: Store, log: EventLogLimits) -> SResult<StateMachine> {
        let opts = ReadOptions::default();
        let get = |key: &[u8]| store.db.get_cf(store.cf(CF_META), key).map_err(rd);
        let applied = match get(KEY_APPLIED)? {
            Some(b) => postcard::from_bytes(&b).map_err(rd)?,
            None => None,
        };
        let membership = match get(KEY_MEMBERSHIP)? {
            Some(b) => postcard::from_bytes(&b).map_err(rd)?,
            None => StoredMembership::default(),
        };
        let revision = read_i64(&store, &opts, KEY_REVISION).map_err(rd)?;
        let compacted = read_i64(&store, &opts, KEY_COMPACTED).map_err(rd)?;
        let alarms = read_alarms(&store, ReadOptions::default()).map_err(rd)?;
        let (published, _) = watch::channel(AppliedState {
            log_index: applied.map(|l: LogId<NodeId>| l.index).unwrap_or(0),
            revision,
            compacted,
            alarms: Raised::of(&alarms),
        });
        Ok(StateMachine {
            store,
            applied,
            membership,
            revision,
            compacted,
            alarms,
            published,
            snapshot_lock: Arc::default(),
            events_tx: broadcast::channel(log.revisions.max(1)).0,
            max_revision_bytes: log.revision_bytes,
        })
    }

    /// Follows the event log from now on.
    pub fn events(&self) -> broadcast::Sender<Arc<RevisionEvents>> {
        self.events_tx.clone()
    }

    /// A reader over the same store.
    pub fn reader(&self) -> KvReader {
        KvReader::new(self.store.clone())
    }

    /// Follows what has been applied.
    pub fn subscribe(&self) -> watch::Receiver<AppliedState> {
        self.published.subscribe()
    }

    fn publish(&self) {
        let state = AppliedState {
            log_index: self.applied.map(|l| l.index).unwrap_or(0),
            revision: self.revision,
            compacted: self.compacted,
            alarms: Raised::of(&self.alarms),
        };
        self.published.send_replace(state);
    }

    fn read_snapshot(&self) -> SResult<Option<StoredSnapshot>> {
        match self
            .store
            .db
            .get_cf(self.store.cf(CF_META), KEY_SNAPSHOT)
            .map_err(rd)?
        {
            Some(b) => Ok(Some(postcard::from_bytes(&b).map_err(rd)?)),
            None => Ok(None),
        }
    }
}

/// Applies the commands of one `apply` call into one write batch. Reads see the
/// writes of earlier commands in the same batch through `overlay`.
///
/// A command is all or nothing: its writes wait in `pending` and reach the batch
/// only if the whole command succeeds; on an error `undo` restores the overlay, so
/// a txn that fails halfway leaves no trace.
struct Applier<'a> {
    store: &'a Store,
    batch: WriteBatch,
    overlay: BTreeMap<Vec<u8>, Option<KvRecord>>,
    /// Leases granted (Some) or revoked (None) by this batch's earlier commands.
    lease_overlay: BTreeMap<i64, Option<LeaseRecord>>,
    revision: i64,
    compacted: i64,
    /// Raised alarms, with this batch's earlier commands' changes.
    alarms: AlarmSet,
    pending: Vec<PendingWrite>,
    undo: Vec<(Vec<u8>, Option<Option<KvRecord>>)>,
    /// Watch events of the command being executed.
    pending_events: Vec<Event>,
    /// Watch events of the commands applied, one entry per revision, published
    /// once the batch holding them is written.
    events: Vec<Arc<RevisionEvents>>,
    max_revision_bytes: usize,
}

/// A write waiting for its command to succeed: column family, key, and the value
/// (None: delete).
type PendingWrite = (&'static str, Vec<u8>, Option<Vec<u8>>);

impl Applier<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<KvRecord>, KvError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        match self.store.db.get_cf(self.store.cf(CF_KV), key)? {
            Some(b) => Ok(Some(decode_record(&b)?)),
            None => Ok(None),
        }
    }

    fn lease(&self, id: i64) -> Result<Option<LeaseRecord>, KvError> {
        if let Some(l) = self.lease_overlay.get(&id) {
            return Ok(l.clone());
        }
        read_lease(self.store, &ReadOptions::default(), id)
    }

    /// The live keys of `kr` at the newest revision, including this batch's writes.
    fn scan(&self, kr: &KeyRange) -> Result<Vec<(Vec<u8>, KvRecord)>, KvError> {
        if let KeyRange::Single(k) = kr {
            return Ok(self.get(k)?.map(|r| (k.clone(), r)).into_iter().collect());
        }
        let mut merged: BTreeMap<Vec<u8>, KvRecord> =
            scan_current(self.store, ReadOptions::default(), kr)?
                .into_iter()
                .collect();
        for (k, v) in &self.overlay {
            if kr.contains(k) {
                match v {
                    Some(r) => merged.insert(k.clone(), r.clone()),
                    None => merged.remove(k),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// Records a new version of `key` (`kv: None` deletes it); `prev` is the version
    /// it replaces, for the watch event.
    fn write(
        &mut self,
        key: &[u8],
        kv: Option<KvRecord>,
        prev: Option<&KvRecord>,
        rev: Rev,
    ) -> Result<(), KvError> {
        self.pending_events.push(Event {
            r#type: if kv.is_some() {
                EventType::Put
            } else {
                EventType::Delete
            } as i32,
            kv: Some(match &kv {
                Some(r) => r.to_kv(key),
                None => KeyValue {
                    key: key.to_vec(),
                    mod_revision: rev.main,
                    ..Default::default()
                },
            }),
            prev_kv: prev.map(|p| p.to_kv(key)),
        });
        let rec = RevRecord {
            key: key.to_vec(),
            kv: kv.clone(),
        };
        let enc = postcard::to_stdvec(&rec).map_err(|e| KvError::Storage(e.to_string()))?;
        self.pending
            .push((CF_REV, rev.encode().to_vec(), Some(enc)));
        self.pending
            .push((CF_HIST, hist_key(key, rev), Some(Vec::new())));
        let current = match &kv {
            Some(r) => Some(postcard::to_stdvec(r).map_err(|e| KvError::Storage(e.to_string()))?),
            None => None,
        };
        self.pending.push((CF_KV, key.to_vec(), current));
        // Keep the lease → keys index in step with the key's lease.
        let old_lease = prev.map_or(0, |p| p.lease);
        let new_lease = kv.as_ref().map_or(0, |r| r.lease);
        if old_lease != new_lease {
            if old_lease != 0 {
                self.pending
                    .push((CF_LEASE, attached_key(old_lease, key), None));
            }
            if new_lease != 0 {
                self.pending
                    .push((CF_LEASE, attached_key(new_lease, key), Some(Vec::new())));
            }
        }
        let before = self.overlay.insert(key.to_vec(), kv);
        self.undo.push((key.to_vec(), before));
        Ok(())
    }

    /// Executes one command atomically (see the type's docs).
    fn execute(&mut self, cmd: &Command) -> Result<Vec<u8>, KvError> {
        let (revision, compacted) = (self.revision, self.compacted);
        let result = self.execute_command(cmd);
        if result.is_ok() {
            for (cf, key, value) in self.pending.drain(..) {
                let cf = self.store.cf(cf);
                match value {
                    Some(v) => self.batch.put_cf(cf, key, v),
                    None => self.batch.delete_cf(cf, key),
                }
            }
            self.undo.clear();
            if !self.pending_events.is_empty() {
                let mut rev = RevisionEvents {
                    revision: self.revision,
                    events: std::mem::take(&mut self.pending_events),
                    elided: false,
                };
                if rev.payload_bytes() > self.max_revision_bytes {
                    rev.events = Vec::new();
                    rev.elided = true;
                }
                self.events.push(Arc::new(rev));
            }
        } else {
            self.pending.clear();
            self.pending_events.clear();
            for (key, before) in self.undo.drain(..).rev() {
                match before {
                    Some(v) => self.overlay.insert(key, v),
                    None => self.overlay.remove(&key),
                };
            }
            self.revision = revision;
            self.compacted = compacted;
        }
        result
    }

    fn execute_command(&mut self, cmd: &Command) -> Result<Vec<u8>, KvError> {
        let decode_err =
            |e: prost::DecodeError| KvError::Invalid(format!("undecodable command: {e}"));
        let raised = Raised::of(&self.alarms);
        match cmd {
            Command::Put(b) => {
                gate(raised, Effect::Grows)?;
                let req = PutRequest::decode(b.as_slice()).map_err(decode_err)?;
                self.check_put(&req)?;
                let rev = self.revision + 1;
                let resp = self.put(&req, Rev { main: rev, sub: 0 })?;
                self.revision = rev;
                Ok(resp.encode_to_vec())
            }
            Command::DeleteRange(b) => {
                gate(raised, Effect::Shrinks)?;
                let req = DeleteRangeRequest::decode(b.as_slice()).map_err(decode_err)?;
                let mut sub = 0;
                let resp = self.delete(&req, self.revision + 1, &mut sub)?;
                if sub > 0 {
                    self.revision += 1;
                }
                Ok(resp.encode_to_vec())
            }
            Command::Txn(b) => {
                let req = TxnRequest::decode(b.as_slice()).map_err(decode_err)?;
                if txn_writes(&req) {
                    gate(raised, Effect::Grows)?;
                }
                let mut sub = 0;
                let mut resp = self.txn(&req, self.revision + 1, &mut sub)?;
                if sub > 0 {
                    self.revision += 1;
                }
                set_nested_headers(&mut resp.responses, self.revision);
                Ok(resp.encode_to_vec())
            }
            Command::Compact(rev) => {
                self.compact(*rev)?;
                Ok(CompactionResponse::default().encode_to_vec())
            }
            Command::LeaseGrant { id, ttl } => {
                gate(raised, Effect::Grows)?;
                self.grant(*id, *ttl, None)
            }
            Command::LeaseRevoke(id) => {
                self.revoke(*id)?;
                Ok(LeaseRevokeResponse::default().encode_to_vec())
            }
            Command::LeaseGrantOwned { id, ttl, owner } => {
                gate(raised, Effect::Grows)?;
                self.grant(*id, *ttl, Some(owner.clone()))
            }
            Command::LeaseRevokeOwned { id, owner } => {
                // Another tenant's lease looks exactly like a missing one.
                if !self.lease(*id)?.is_some_and(|l| l.owned_by(owner)) {
                    return Err(KvError::LeaseNotFound);
                }
                self.revoke(*id)?;
                Ok(LeaseRevokeResponse::default().encode_to_vec())
            }
            Command::Alarm {
                activate,
                member,
                alarm,
            } => self.alarm(*activate, *member, *alarm),
        }
    }

    /// Raises or clears one alarm; answers etcd's `AlarmResponse` naming the alarm
    /// that changed (none when it already was as asked).
    fn alarm(&mut self, activate: bool, member: u64, alarm: i32) -> Result<Vec<u8>, KvError> {
        check_kind(alarm)?;
        let key = alarm_key(member, alarm).to_vec();
        let changed = if activate {
            self.alarms.insert((member, alarm))
        } else {
            self.alarms.remove(&(member, alarm))
        };
        if changed {
            self.pending.push((CF_ALARM, key, activate.then(Vec::new)));
        }
        let alarms = changed
            .then_some(AlarmMember {
                member_id: member,
                alarm,
            })
            .into_iter()
            .collect();
        Ok(AlarmResponse {
            header: None,
            alarms,
        }
        .encode_to_vec())
    }

    /// Creates lease `id`, owned by `owner` if given.
    fn grant(&mut self, id: i64, ttl: i64, owner: Option<String>) -> Result<Vec<u8>, KvError> {
        if id <= 0 {
            return Err(KvError::Invalid(format!("lease ID {id} must be positive")));
        }
        if ttl > MAX_LEASE_TTL {
            return Err(KvError::LeaseTtlTooLarge);
        }
        if self.lease(id)?.is_some() {
            return Err(KvError::LeaseExists);
        }
        let rec = LeaseRecord { ttl, owner };
        self.pending
            .push((CF_LEASE, lease_key(id).to_vec(), Some(rec.encode()?)));
        self.lease_overlay.insert(id, Some(rec));
        Ok(LeaseGrantResponse {
            id,
            ttl,
            ..Default::default()
        }
        .encode_to_vec())
    }

    /// Deletes lease `id` and its keys, all at one new revision (none if it held no
    /// keys), as etcd does.
    fn revoke(&mut self, id: i64) -> Result<(), KvError> {
        if self.lease(id)?.is_none() {
            return Err(KvError::LeaseNotFound);
        }
        // The committed index, plus keys this batch attached; each candidate is
        // checked against its newest version, which drops stale index entries.
        let mut keys: std::collections::BTreeSet<Vec<u8>> =
            attached_keys(self.store, ReadOptions::default(), id)?
                .into_iter()
                .collect();
        for (k, v) in &self.overlay {
            if v.as_ref().is_some_and(|r| r.lease == id) {
                keys.insert(k.clone());
            }
        }
        let main = self.revision + 1;
        let mut sub = 0;
        for key in keys {
            if let Some(rec) = self.get(&key)?
                && rec.lease == id
            {
                self.write(&key, None, Some(&rec), Rev { main, sub })?;
                sub += 1;
            }
        }
        if sub > 0 {
            self.revision = main;
        }
        self.pending.push((CF_LEASE, lease_key(id).to_vec(), None));
        self.lease_overlay.insert(id, None);
        Ok(())
    }

    /// Checks of a Put that depend on the store (done again at apply time because
    /// the store may have changed since the request was proposed). Every put, alone
    /// or in a txn at any depth, passes here before it writes.
    fn check_put(&self, req: &PutRequest) -> Result<(), KvError> {
        if req.lease != 0 {
            let Some(lease) = self.lease(req.lease)? else {
                return Err(KvError::LeaseNotFound);
            };
            // A tenant's lease holds only the tenant's keys: otherwise revoking it
            // (or letting it expire) would delete another tenant's keys. Checked at
            // apply so that no path (a put, a txn, a forwarded batch) escapes it.
            if let Some(owner) = &lease.owner
                && !in_namespace(owner, &req.key)
            {
                return Err(KvError::PermissionDenied);
            }
        }
        if (req.ignore_value || req.ignore_lease) && self.get(&req.key)?.is_none() {
            return Err(KvError::KeyNotFound);
        }
        Ok(())
    }

    fn put(&mut self, req: &PutRequest, rev: Rev) -> Result<PutResponse, KvError> {
        let prev = self.get(&req.key)?;
        let rec = KvRecord {
            create_revision: prev.as_ref().map_or(rev.main, |p| p.create_revision),
            mod_revision: rev.main,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: match (&prev, req.ignore_lease) {
                (Some(p), true) => p.lease,
                _ => req.lease,
            },
            value: match (&prev, req.ignore_value) {
                (Some(p), true) => p.value.clone(),
                _ => req.value.clone(),
            },
        };
        self.write(&req.key, Some(rec), prev.as_ref(), rev)?;
        Ok(PutResponse {
            header: None,
            prev_kv: if req.prev_kv {
                prev.map(|p| p.to_kv(&req.key))
            } else {
                None
            },
        })
    }

    fn delete(
        &mut self,
        req: &DeleteRangeRequest,
        main: i64,
        sub: &mut i64,
    ) -> Result<DeleteRangeResponse, KvError> {
        let victims = self.scan(&KeyRange::new(&req.key, &req.range_end))?;
        let mut prev_kvs = Vec::new();
        for (key, rec) in &victims {
            self.write(key, None, Some(rec), Rev { main, sub: *sub })?;
            *sub += 1;
            if req.prev_kv {
                prev_kvs.push(rec.to_kv(key));
            }
        }
        Ok(DeleteRangeResponse {
            header: None,
            deleted: victims.len() as i64,
            prev_kvs,
        })
    }

    /// A Range inside a txn; `wrote` tells whether the txn has written already.
    fn range(&self, req: &RangeRequest, wrote: bool) -> Result<RangeResponse, KvError> {
        // At an explicit revision older than the txn's own writes the read comes
        // from RocksDB, which holds everything before this txn (see `apply`).
        if req.revision > 0
            && (req.revision < self.revision || (req.revision == self.revision && wrote))
        {
            if req.revision < self.compacted {
                return Err(KvError::Compacted {
                    compacted: self.compacted,
                });
            }
            return KvReader::new(self.store.clone()).range(req);
        }
        if req.revision > self.revision {
            return Err(KvError::FutureRevision {
                current: self.revision,
            });
        }
        let kvs: Vec<KeyValue> = self
            .scan(&KeyRange::new(&req.key, &req.range_end))?
            .into_iter()
            .map(|(k, r)| r.to_kv(&k))
            .collect();
        let count = kvs.len();
        Ok(finish_range(req, kvs, count, self.revision))
    }

    fn compare(&self, c: &Compare) -> Result<bool, KvError> {
        let kvs = self.scan(&KeyRange::new(&c.key, &c.range_end))?;
        let target = compare::CompareTarget::try_from(c.target)
            .map_err(|_| KvError::Invalid(format!("unknown compare target {}", c.target)))?;
        if kvs.is_empty() {
            // As etcd: a value compare on a missing key always fails (a missing value
            // and an empty one look alike on the wire); other targets compare zero.
            if target == compare::CompareTarget::Value {
                return Ok(false);
            }
            return compare_one(c, target, &KeyValue::default());
        }
        for (k, r) in &kvs {
            if !compare_one(c, target, &r.to_kv(k))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn txn(&mut self, req: &TxnRequest, main: i64, sub: &mut i64) -> Result<TxnResponse, KvError> {
        let mut succeeded = true;
        for c in &req.compare {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        // Refuse the whole txn before writing anything if one of its puts would fail.
        self.precheck_ops(ops)?;
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    response_op::Response::ResponseRange(self.range(r, *sub > 0)?)
                }
                Some(request_op::Request::RequestPut(p)) => {
                    let r = self.put(p, Rev { main, sub: *sub })?;
                    *sub += 1;
                    response_op::Response::ResponsePut(r)
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    response_op::Response::ResponseDeleteRange(self.delete(d, main, sub)?)
                }
                Some(request_op::Request::RequestTxn(t)) => {
                    response_op::Response::ResponseTxn(self.txn(t, main, sub)?)
                }
                None => return Err(KvError::Invalid("txn op has no request".into())),
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    fn precheck_ops(&self, ops: &[RequestOp]) -> Result<(), KvError> {
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => self.check_put(p)?,
                Some(request_op::Request::RequestRange(r)) => {
                    if r.revision > self.revision {
                        return Err(KvError::FutureRevision {
                            current: self.revision,
                        });
                    }
                    if r.revision > 0 && r.revision < self.compacted {
                        return Err(KvError::Compacted {
                            compacted: self.compacted,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Drops history below `rev`, keeping for every key its newest version at or
    /// below `rev` (reads at `rev` still work), as etcd does.
    fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        if rev <= self.compacted {
            return Err(KvError::Compacted {
                compacted: self.compacted,
            });
        }
        if rev > self.revision {
            return Err(KvError::FutureRevision {
                current: self.revision,
            });
        }
        let store = self.store;
        let revs = store.cf(CF_REV);
        let mut current_key: Option<Vec<u8>> = None;
        // Versions at or below `rev` of the key being scanned, oldest first.
        let mut old: Vec<(Vec<u8>, Rev)> = Vec::new();
        let flush = |old: &mut Vec<(Vec<u8>, Rev)>,
                     pending: &mut Vec<PendingWrite>|
         -> Result<(), KvError> {
            if let Some((newest_hk, newest)) = old.pop() {
                // The newest old version stays unless it is a tombstone.
                let tomb = match store.db.get_cf(revs, newest.encode())? {
                    Some(b) => decode_record::<RevRecord>(&b)?.kv.is_none(),
                    None => true,
                };
                if tomb {
                    pending.push((CF_HIST, newest_hk, None));
                    pending.push((CF_REV, newest.encode().to_vec(), None));
                }
            }
            for (hk, r) in old.drain(..) {
                pending.push((CF_HIST, hk, None));
                pending.push((CF_REV, r.encode().to_vec(), None));
            }
            Ok(())
        };
        for item in store.db.iterator_cf(store.cf(CF_HIST), IteratorMode::Start) {
            let (k, _) = item?;
            let (key, rest) =
                unescape_key(&k).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            let r =
                Rev::decode(rest).ok_or_else(|| KvError::Storage("corrupt history key".into()))?;
            if current_key.as_deref() != Some(key.as_slice()) {
                flush(&mut old, &mut self.pending)?;
                current_key = Some(key);
            }
            if r.main <= rev {
                old.push((k.to_vec(), r));
            }
        }
        flush(&mut old, &mut self.pending)?;
        self.compacted = rev;
        Ok(())
    }
}

/// Writes an apply batch with the state-machine meta that goes with it. Not synced:
/// the entries are durable in the log already, and the WAL shared with the log keeps
/// this batch and the log in order across a crash.
fn commit_batch(
    store: &Store,
    mut batch: WriteBatch,
    applied: &Option<LogId<NodeId>>,
    membership: Option<&StoredMembership<NodeId, Member>>,
    revision: i64,
    compacted: i64,
) -> SResult<()> {
    let meta = store.cf(CF_META);
    batch.put_cf(meta, KEY_APPLIED, postcard::to_stdvec(applied).map_err(rw)?);
    if let Some(m) = membership {
        batch.put_cf(meta, KEY_MEMBERSHIP, postcard::to_stdvec(m).map_err(rw)?);
    }
    batch.put_cf(meta, KEY_REVISION, revision.to_be_bytes());
    batch.put_cf(meta, KEY_COMPACTED, compacted.to_be_bytes());
    store.db.write(batch).map_err(rw)
}

fn compare_one(
    c: &Compare,
    target: compare::CompareTarget,
    kv: &KeyValue,
) -> Result<bool, KvError> {
    use compare::CompareTarget as T;
    use compare::TargetUnion as U;
    let ord = match (target, &c.target_union) {
        (T::Version, Some(U::Version(v))) => kv.version.cmp(v),
        (T::Create, Some(U::CreateRevision(v))) => kv.create_revision.cmp(v),
        (T::Mod, Some(U::ModRevision(v))) => kv.mod_revision.cmp(v),
        (T::Value, Some(U::Value(v))) => kv.value.as_slice().cmp(v.as_slice()),
        (T::Lease, Some(U::Lease(v))) => kv.lease.cmp(v),
        // proto3 drops a zero in a oneof only when unset; an unset target compares
        // against the zero value of its type, as in etcd.
        (T::Version, None) => kv.version.cmp(&0),
        (T::Create, None) => kv.create_revision.cmp(&0),
        (T::Mod, None) => kv.mod_revision.cmp(&0),
        (T::Lease, None) => kv.lease.cmp(&0),
        (T::Value, None) => kv.value.as_slice().cmp(&[]),
        _ => {
            return Err(KvError::Invalid(
                "compare target and target_union disagree".into(),
            ));
        }
    };
    let result = compare::CompareResult::try_from(c.result)
        .map_err(|_| KvError::Invalid(format!("unknown compare result {}", c.result)))?;
    use std::cmp::Ordering::*;
    Ok(match result {
        compare::CompareResult::Equal => ord == Equal,
        compare::CompareResult::NotEqual => ord != Equal,
        compare::CompareResult::Greater => ord == Greater,
        compare::CompareResult::Less => ord == Less,
    })
}

fn set_nested_headers(responses: &mut [ResponseOp], revision: i64) {
    let header = || {
        Some(ResponseHeader {
            revision,
            ..Default::default()
        })
    };
    for r in responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => x.header = header(),
            Some(response_op::Response::ResponsePut(x)) => x.header = header(),
            Some(response_op::Response::ResponseDeleteRange(x)) => x.header = header(),
            Some(response_op::Response::ResponseTxn(x)) => {
                x.header = header();
                set_nested_headers(&mut x.responses, revision);
            }
            None => {}
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> SResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<BatchResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applier = Applier {
            store: &self.store,
            batch: WriteBatch::default(),
            overlay: BTreeMap::new(),
            lease_overlay: BTreeMap::new(),
            revision: self.revision,
            compacted: self.compacted,
            alarms: self.alarms.clone(),
            pending: Vec::new(),
            undo: Vec::new(),
            pending_events: Vec::new(),
            events: Vec::new(),
            max_revision_bytes: self.max_revision_bytes,
        };
        let mut out = Vec::new();
        let mut applied = self.applied;
        let mut membership = None;
        for entry in entries {
            // A txn may read history and a compaction scans it: both read RocksDB,
            // so everything before them must be there first. Otherwise how entries
            // happen to be grouped into apply calls (which differs between members)
            // would change their outcome.
            let reads_history = match &entry.payload {
                EntryPayload::Normal(batch) => batch.0.iter().any(Command::reads_history),
                _ => false,
            };
            if reads_history && !applier.batch.is_empty() {
                commit_batch(
                    &self.store,
                    std::mem::take(&mut applier.batch),
                    &applied,
                    membership.as_ref(),
                    applier.revision,
                    applier.compacted,
                )?;
                applier.overlay.clear();
                applier.lease_overlay.clear();
                for e in applier.events.drain(..) {
                    // No receiver is fine; a full ring drops the oldest: the apply
                    // path never waits for a watcher.
                    let _ = self.events_tx.send(e);
                }
            }
            applied = Some(entry.log_id);
            let mut responses = Vec::new();
            match &entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                }
                EntryPayload::Normal(batch) => {
                    for cmd in &batch.0 {
                        let outcome = applier.execute(cmd).map(serde_bytes::ByteBuf::from);
                        // A local storage failure stops this member (openraft treats
                        // it as fatal); it is never reported as a request's outcome.
                        if let Err(KvError::Storage(e)) = &outcome {
                            return Err(rw(e));
                        }
                        responses.push(CommandResponse {
                            revision: applier.revision,
                            outcome: Some(outcome),
                        });
                    }
                }
            }
            out.push(BatchResponse(responses));
        }
        let Applier {
            batch,
            revision,
            compacted,
            alarms,
            events,
            ..
        } = applier;
        commit_batch(
            &self.store,
            batch,
            &applied,
            membership.as_ref(),
            revision,
            compacted,
        )?;
        for e in events {
            let _ = self.events_tx.send(e);
        }
        self.applied = applied;
        if let Some(m) = membership {
            self.membership = m;
        }
        self.revision = revision;
        self.compacted = compacted;
        self.alarms = alarms;
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = postcard::from_bytes(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                &std::io::Error::other(e.to_string()),
            ))
        })?;
        let mut batch = WriteBatch::default();
        for name in SM_CFS {
            let cf = self.store.cf(name);
            for item in self.store.db.iterator_cf(cf, IteratorMode::Start) {
                let (k, _) = item.map_err(rd)?;
                batch.delete_cf(cf, k);
            }
        }
        for (name, pairs) in &body.cfs {
            if !SM_CFS.contains(&name.as_str()) {
                return Err(rw(format!("snapshot has unknown column family {name}")));
            }
            let cf = self.store.cf(name);
            for (k, v) in pairs {
                batch.put_cf(cf, k, v);
            }
        }
        let m = self.store.cf(CF_META);
        let membership = meta.last_membership.clone();
        batch.put_cf(
            m,
            KEY_APPLIED,
            postcard::to_stdvec(&meta.last_log_id).map_err(rw)?,
        );
        batch.put_cf(
            m,
            KEY_MEMBERSHIP,
            postcard::to_stdvec(&membership).map_err(rw)?,
        );
        batch.put_cf(m, KEY_REVISION, body.revision.to_be_bytes());
        batch.put_cf(m, KEY_COMPACTED, body.compacted.to_be_bytes());
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        batch.put_cf(m, KEY_SNAPSHOT, postcard::to_stdvec(&stored).map_err(rw)?);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        {
            let _guard = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.store.db.write_opt(batch, &opts).map_err(rw)?;
        }
        self.applied = meta.last_log_id;
        self.membership = membership;
        self.revision = body.revision;
        self.compacted = body.compacted;
        self.alarms = read_alarms(&self.store, ReadOptions::default()).map_err(rd)?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Builds a snapshot from a RocksDB snapshot, so it runs beside the apply path
/// without stopping it.
pub struct SnapshotBuilder {
    store: Store,
    lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let store = self.store.clone();
        // Reading every key is blocking work: keep it off the async workers.
        let (meta, data) = tokio::task::spawn_blocking(move || build(&store))
            .await
            .map_err(rd)??;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let enc = postcard::to_stdvec(&stored).map_err(rw)?;
        {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let newer_stored = match self
                .store
                .db
                .get_cf(self.store.cf(CF_META), KEY_SNAPSHOT)
                .map_err(rd)?
            {
                Some(b) => {
                    let old: StoredSnapshot = postcard::from_bytes(&b).map_err(rd)?;
                    old.meta.last_log_id > meta.last_log_id
                }
                None => false,
            };
            if !newer_stored {
                self.store
                    .db
                    .put_cf(self.store.cf(CF_META), KEY_SNAPSHOT, enc)
                    .map_err(rw)?;
            }
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

fn build(store: &Store) -> SResult<(SnapshotMeta<NodeId, Member>, Vec<u8>)> {
    let snap = store.db.snapshot();
    let opts = || {
        let mut o = ReadOptions::default();
        o.set_snapshot(&snap);
        o
    };
    let get = |key: &[u8]| {
        store
            .db
            .get_cf_opt(store.cf(CF_META), key, &opts())
            .map_err(rd)
    };
    let applied: Option<LogId<NodeId>> = match get(KEY_APPLIED)? {
        Some(b) => postcard::from_bytes(&b).map_err(rd)?,
        None => None,
    };
    let membership: StoredMembership<NodeId, Member> = match get(KEY_MEMBERSHIP)? {
        Some(b) => postcard::from_bytes(&b).map_err(rd)?,
        None => StoredMembership::default(),
    };
    let mut body = SnapshotBody {
        revision: read_i64(store, &opts(), KEY_REVISION).map_err(rd)?,
        compacted: read_i64(store, &opts(), KEY_COMPACTED).map_err(rd)?,
        cfs: Vec::new(),
    };
    for name in SM_CFS {
        let mut pairs = Vec::new();
        for item in store
            .db
            .iterator_cf_opt(store.cf(name), opts(), IteratorMode::Start)
        {
            let (k, v) = item.map_err(rd)?;
            pairs.push((
                serde_bytes::ByteBuf::from(k.to_vec()),
                serde_bytes::ByteBuf::from(v.to_vec()),
            ));
        }
        body.cfs.push((name.to_string(), pairs));
    }
    let data = postcard::to_stdvec(&body).map_err(rw)?;
    let snapshot_id = match applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, body.revision),
        None => format!("empty-{}", body.revision),
    };
    Ok((
        SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        },
        data,
    ))
}
