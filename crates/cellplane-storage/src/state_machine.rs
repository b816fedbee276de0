//! The replicated state machine: applies committed Raft entries to the MVCC store,
//! builds and installs snapshots.

use std::collections::BTreeMap;
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
use rocksdb::{ReadOptions, WriteBatch, WriteOptions};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::alarm::{
    AlarmSet, Effect, Raised, alarm_key, check_kind, gate, read_alarms, txn_writes,
};
use crate::codec::{Rev, hist_key};
use crate::compactor::KEY_PHYSICAL;
use crate::db::{CF_ALARM, CF_HIST, CF_KV, CF_LEASE, CF_META, CF_OWNER, CF_REV, Store};
use crate::error::KvError;
use crate::events::RevisionEvents;
use crate::export::{SnapshotError, SnapshotSummary};
use crate::lease::{
    LeaseRecord, MAX_LEASE_TTL, attached_key, attached_keys, in_namespace, lease_key, read_lease,
};
use crate::mvcc::{
    KEY_COMPACTED, KEY_REVISION, KeyRange, KvReader, KvRecord, RevRecord, decode_record,
    finish_range, read_i64, scan_current,
};
use crate::ownership::{Change, Destination, Ownership};
use crate::snapshot_file::{self, SnapshotFile, StoredSnapshot};
use crate::types::{BatchResponse, Command, CommandResponse, Member, NodeId, TypeConfig};

pub(crate) const KEY_APPLIED: &[u8] = b"sm/applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"sm/membership";
/// The snapshot this member holds ([`StoredSnapshot`]).
const KEY_SNAPSHOT: &[u8] = b"sm/snapshot-file";
/// Where snapshots were kept whole as one value, before they were files: such a
/// record is dropped at open (openraft builds a new snapshot when it needs one).
const KEY_LEGACY_SNAPSHOT: &[u8] = b"sm/snapshot";
/// An install begun and not finished ([`StoredSnapshot`]).
const KEY_INSTALLING: &[u8] = b"sm/installing";
/// Which tenants the cell serves (the `ownership` module's record), in [`CF_OWNER`].
const KEY_OWNER_MAP: &[u8] = b"map";

type SResult<T> = Result<T, StorageError<NodeId>>;

/// The most keys and values (bytes) one command may read while it is applied:
/// a range or compare inside a txn, or the keys a delete removes. A constant,
/// not a setting: every member must reach the same verdict for the same entry.
pub const MAX_APPLY_SCAN_BYTES: usize = crate::mvcc::DEFAULT_MAX_RESPONSE_BYTES;

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
    /// Which tenants the cell serves, as applied.
    ownership: watch::Sender<Arc<Ownership>>,
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
        recover_snapshots(&store)?;
        let opts = ReadOptions::default();
        let (applied, membership) = read_raft_meta(&store, &opts).map_err(rd)?;
        let revision = read_i64(&store, &opts, KEY_REVISION).map_err(rd)?;
        let compacted = read_i64(&store, &opts, KEY_COMPACTED).map_err(rd)?;
        let alarms = read_alarms(&store, ReadOptions::default()).map_err(rd)?;
        let ownership = read_ownership(&store).map_err(rd)?;
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
            ownership: watch::channel(Arc::new(ownership)).0,
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

    /// Follows which tenants the cell serves, as applied.
    pub fn ownership(&self) -> watch::Receiver<Arc<Ownership>> {
        self.ownership.subscribe()
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
        stored_snapshot(&self.store).map_err(rd)
    }
}

/// The map `store`'s cell learned, if any.
fn read_ownership(store: &Store) -> Result<Ownership, KvError> {
    match store.db.get_cf(store.cf(CF_OWNER), KEY_OWNER_MAP)? {
        Some(b) => Ownership::from_stored(&b),
        None => Ok(Ownership::default()),
    }
}

/// What Raft knows of a state machine: the last applied log id and the
/// membership in it.
type RaftMeta = (Option<LogId<NodeId>>, StoredMembership<NodeId, Member>);

/// The applied log id and the membership `store` holds (as `opts` sees it).
pub(crate) fn read_raft_meta(store: &Store, opts: &ReadOptions) -> Result<RaftMeta, KvError> {
    let get = |key: &[u8]| store.db.get_cf_opt(store.cf(CF_META), key, opts);
    let decode = |e: postcard::Error| KvError::Storage(format!("corrupt state-machine meta: {e}"));
    let applied = match get(KEY_APPLIED)? {
        Some(b) => postcard::from_bytes(&b).map_err(decode)?,
        None => None,
    };
    let membership = match get(KEY_MEMBERSHIP)? {
        Some(b) => postcard::from_bytes(&b).map_err(decode)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// The snapshot record `store` holds.
fn stored_snapshot(store: &Store) -> Result<Option<StoredSnapshot>, SnapshotError> {
    match store
        .db
        .get_cf(store.cf(CF_META), KEY_SNAPSHOT)
        .map_err(KvError::from)?
    {
        Some(b) => Ok(Some(
            postcard::from_bytes(&b).map_err(|e| SnapshotError::Damaged(e.to_string()))?,
        )),
        None => Ok(None),
    }
}

/// At open: finishes an install a crash interrupted, drops a snapshot record of
/// the old in-database kind, and deletes snapshot files nothing refers to.
fn recover_snapshots(store: &Store) -> SResult<()> {
    let meta = store.cf(CF_META);
    if let Some(b) = store.db.get_cf(meta, KEY_INSTALLING).map_err(rd)? {
        let stored: StoredSnapshot = postcard::from_bytes(&b).map_err(rd)?;
        tracing::warn!(
            snapshot = %stored.meta.snapshot_id,
            "finishing the install of a snapshot that a restart interrupted"
        );
        finish_install(store, &Mutex::new(()), &stored).map_err(|e| {
            rw(format!(
                "cannot finish installing snapshot {} from {}: {e}; wipe this member's data \
                 directory and add it to its cell again",
                stored.meta.snapshot_id,
                stored.path(store).display()
            ))
        })?;
    }
    if store
        .db
        .get_cf(meta, KEY_LEGACY_SNAPSHOT)
        .map_err(rd)?
        .is_some()
    {
        store.db.delete_cf(meta, KEY_LEGACY_SNAPSHOT).map_err(rw)?;
    }
    let current = stored_snapshot(store).map_err(rd)?;
    snapshot_file::remove_others(store, current.as_ref().map(|s| s.file.as_str()), true);
    Ok(())
}

/// Installs the verified snapshot file `received` as this member's state: the
/// file becomes the member's snapshot, the install is recorded, then carried
/// out. Blocks.
fn install_file(
    store: &Store,
    lock: &Mutex<()>,
    meta: &SnapshotMeta<NodeId, Member>,
    received: &std::path::Path,
) -> Result<SnapshotSummary, SnapshotError> {
    snapshot_file::verify(received)?;
    let stored = StoredSnapshot {
        meta: meta.clone(),
        file: snapshot_file::snap_name(),
    };
    snapshot_file::adopt(store, received, &stored.path(store))?;
    // Recorded first: a member killed part-way finishes the install at open.
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    let record = encode(&stored)?;
    store
        .db
        .put_cf_opt(store.cf(CF_META), KEY_INSTALLING, record, &opts)
        .map_err(KvError::from)?;
    let summary = finish_install(store, lock, &stored)?;
    tracing::info!(
        snapshot = %stored.meta.snapshot_id,
        bytes = summary.bytes,
        pairs = summary.pairs,
        revision = summary.revision,
        "installed a snapshot"
    );
    Ok(summary)
}

/// Loads the recorded install's file into the state machine and makes its meta
/// the member's; readers are refused until it is done. Blocks.
fn finish_install(
    store: &Store,
    lock: &Mutex<()>,
    stored: &StoredSnapshot,
) -> Result<SnapshotSummary, SnapshotError> {
    let previous = stored_snapshot(store)?;
    let installing = store.installing();
    // The data's last batch and the meta go in one synced write.
    let (summary, mut batch) = snapshot_file::load(store, &stored.path(store))?;
    let m = store.cf(CF_META);
    batch.put_cf(m, KEY_APPLIED, encode(&stored.meta.last_log_id)?);
    batch.put_cf(m, KEY_MEMBERSHIP, encode(&stored.meta.last_membership)?);
    batch.put_cf(m, KEY_REVISION, summary.revision.to_be_bytes());
    batch.put_cf(m, KEY_COMPACTED, summary.compacted.to_be_bytes());
    // The history came as the leader's store held it: remove what its
    // compaction left from the start.
    batch.delete_cf(m, KEY_PHYSICAL);
    batch.put_cf(m, KEY_SNAPSHOT, encode(stored)?);
    batch.delete_cf(m, KEY_INSTALLING);
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    {
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        store.db.write_opt(batch, &opts).map_err(KvError::from)?;
    }
    drop(installing);
    if let Some(old) = previous.filter(|p| p.file != stored.file) {
        old.remove(store);
    }
    Ok(summary)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(v).map_err(|e| SnapshotError::Damaged(e.to_string()))
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
    /// The tenants served, with this batch's earlier commands' changes.
    ownership: Arc<Ownership>,
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
            scan_current(self.store, ReadOptions::default(), kr, MAX_APPLY_SCAN_BYTES)?
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
        let result = self.execute_command(cmd, true);
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
                    encoded_events: Default::default(),
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

    /// Executes `cmd`; `owned` checks that the cell owns the tenants it writes
    /// (off only for the mover's writes, which `check_mover` allowed).
    fn execute_command(&mut self, cmd: &Command, owned: bool) -> Result<Vec<u8>, KvError> {
        let decode_err =
            |e: prost::DecodeError| KvError::Invalid(format!("undecodable command: {e}"));
        let raised = Raised::of(&self.alarms);
        match cmd {
            Command::Put(b) => {
                let req = PutRequest::decode(b.as_slice()).map_err(decode_err)?;
                if owned {
                    self.ownership.check_write(&req.key, b"")?;
                }
                gate(raised, Effect::Grows)?;
                self.check_put(&req)?;
                let rev = self.revision + 1;
                let resp = self.put(&req, Rev { main: rev, sub: 0 })?;
                self.revision = rev;
                Ok(resp.encode_to_vec())
            }
            Command::DeleteRange(b) => {
                let req = DeleteRangeRequest::decode(b.as_slice()).map_err(decode_err)?;
                if owned {
                    self.ownership.check_write(&req.key, &req.range_end)?;
                }
                gate(raised, Effect::Shrinks)?;
                let mut sub = 0;
                let resp = self.delete(&req, self.revision + 1, &mut sub)?;
                if sub > 0 {
                    self.revision += 1;
                }
                Ok(resp.encode_to_vec())
            }
            Command::Txn(b) => {
                let req = TxnRequest::decode(b.as_slice()).map_err(decode_err)?;
                if owned {
                    self.ownership.check_txn(&req)?;
                }
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
                if owned {
                    self.check_lease_owner(*id)?;
                }
                self.revoke(*id)?;
                Ok(LeaseRevokeResponse::default().encode_to_vec())
            }
            Command::LeaseGrantOwned { id, ttl, owner } => {
                if owned {
                    self.ownership.check_tenant(owner)?;
                }
                gate(raised, Effect::Grows)?;
                self.grant(*id, *ttl, Some(owner.clone()))
            }
            Command::LeaseRevokeOwned { id, owner } => {
                // Another tenant's lease looks exactly like a missing one.
                if !self.lease(*id)?.is_some_and(|l| l.owned_by(owner)) {
                    return Err(KvError::LeaseNotFound);
                }
                if owned {
                    self.ownership.check_tenant(owner)?;
                }
                self.revoke(*id)?;
                Ok(LeaseRevokeResponse::default().encode_to_vec())
            }
            Command::Alarm {
                activate,
                member,
                alarm,
            } => self.alarm(*activate, *member, *alarm),
            Command::LearnMap { cell, map } => self.change_ownership(cell, &Change::Learn(map)),
            Command::Fence {
                cell,
                tenant,
                to,
                version,
            } => {
                let to = Destination {
                    cell: to.clone(),
                    version: *version,
                };
                self.change_ownership(cell, &Change::Fence { tenant, to })
            }
            Command::Unfence { tenant } => self.change_ownership("", &Change::Unfence(tenant)),
            Command::Expect {
                cell,
                tenant,
                from,
                version,
            } => {
                let from = Destination {
                    cell: from.clone(),
                    version: *version,
                };
                self.change_ownership(cell, &Change::Expect { tenant, from })
            }
            Command::Forget { tenant } => self.change_ownership("", &Change::Forget(tenant)),
            Command::Moving { tenant, cmd } => {
                self.ownership.check_mover(tenant, cmd)?;
                self.execute_command(cmd, false)
            }
        }
    }

    /// Refuses a revoke of a lease whose tenant this cell does not serve (moving
    /// out or in): its keys are the mover's to delete, or a revoke after the
    /// fence point would be lost by the move.
    fn check_lease_owner(&self, id: i64) -> Result<(), KvError> {
        match self.lease(id)?.and_then(|l| l.owner) {
            Some(owner) => self.ownership.check_tenant(&owner),
            None => Ok(()),
        }
    }

    /// Applies a change of which tenants the cell serves; answers nothing (the
    /// response's revision is the point it took effect).
    fn change_ownership(&mut self, cell: &str, change: &Change<'_>) -> Result<Vec<u8>, KvError> {
        let next = self.ownership.apply(cell, change)?;
        let enc =
            postcard::to_stdvec(&next.to_stored()).map_err(|e| KvError::Storage(e.to_string()))?;
        self.pending
            .push((CF_OWNER, KEY_OWNER_MAP.to_vec(), Some(enc)));
        self.ownership = Arc::new(next);
        Ok(Vec::new())
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
        let scanned = match self.scan(&KeyRange::new(&req.key, &req.range_end)) {
            Err(KvError::ApplyTooLarge { max }) => return Err(KvError::ResponseTooLarge { max }),
            other => other?,
        };
        let kvs: Vec<KeyValue> = scanned.into_iter().map(|(k, r)| r.to_kv(&k)).collect();
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

    /// etcd's compaction: reads below `rev` are refused from now on (reads at
    /// `rev` still work). Applying it changes one number; the versions it makes
    /// unreadable are removed in the background ([`crate::HistoryCompactor`]),
    /// so a compaction never holds up the apply path however long the history.
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
            ownership: self.ownership.borrow().clone(),
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
            ownership,
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
        if !Arc::ptr_eq(&ownership, &self.ownership.borrow()) {
            self.ownership.send_replace(ownership);
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<SnapshotFile>> {
        let path = snapshot_file::receive_path(&self.store).map_err(rw)?;
        let file = SnapshotFile::create(&path).await.map_err(rw)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        mut snapshot: Box<SnapshotFile>,
    ) -> SResult<()> {
        let bad = |e: &dyn std::fmt::Display| -> StorageError<NodeId> {
            StorageIOError::read_snapshot(
                Some(meta.signature()),
                &std::io::Error::other(e.to_string()),
            )
            .into()
        };
        snapshot.sync().await.map_err(|e| bad(&e))?;
        let received = snapshot.path().to_path_buf();
        drop(snapshot);
        let (store, lock, m) = (self.store.clone(), self.snapshot_lock.clone(), meta.clone());
        // Checking and loading the file is blocking work, in bounded batches.
        let summary =
            tokio::task::spawn_blocking(move || install_file(&store, &lock, &m, &received))
                .await
                .map_err(|e| bad(&e))?
                .map_err(|e| bad(&e))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.revision = summary.revision;
        self.compacted = summary.compacted;
        self.alarms = read_alarms(&self.store, ReadOptions::default()).map_err(rd)?;
        self.ownership
            .send_replace(Arc::new(read_ownership(&self.store).map_err(rd)?));
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        // Read and pinned under the lock that replacing it takes, so a build
        // finishing meanwhile cannot delete it before it is read.
        let (stored, data) = {
            let _guard = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
            let Some(stored) = self.read_snapshot()? else {
                return Ok(None);
            };
            let data = stored.data(&self.store);
            (stored, data)
        };
        match data.open().await {
            Ok(file) => Ok(Some(Snapshot {
                meta: stored.meta,
                snapshot: Box::new(file),
            })),
            Err(e) => {
                // openraft builds a new one when it needs one.
                tracing::warn!(snapshot = %stored.file, error = %e, "the stored snapshot is missing");
                Ok(None)
            }
        }
    }
}

/// Builds a snapshot as a RocksDB checkpoint, beside the apply path without
/// stopping it; its data is written out only when a follower needs it.
pub struct SnapshotBuilder {
    store: Store,
    lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let (store, lock) = (self.store.clone(), self.lock.clone());
        let (stored, data) = tokio::task::spawn_blocking(move || build_and_store(&store, &lock))
            .await
            .map_err(rd)?
            .map_err(rd)?;
        let file = data.open().await.map_err(rd)?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(file),
        })
    }
}

/// Builds a snapshot and makes it the member's snapshot unless a newer one is
/// stored already (an install may have overtaken the build); returns it with
/// its data, held on disk until that is dropped. Blocks.
fn build_and_store(
    store: &Store,
    lock: &Mutex<()>,
) -> Result<(StoredSnapshot, snapshot_file::SnapshotData), SnapshotError> {
    let stored = snapshot_file::build(store)?;
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let data = stored.data(store);
    let previous = stored_snapshot(store)?;
    if previous
        .as_ref()
        .is_some_and(|p| p.meta.last_log_id > stored.meta.last_log_id)
    {
        // openraft takes only the meta of a build: the data goes once it is
        // dropped.
        stored.remove(store);
        return Ok((stored, data));
    }
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    store
        .db
        .put_cf_opt(store.cf(CF_META), KEY_SNAPSHOT, encode(&stored)?, &opts)
        .map_err(KvError::from)?;
    if let Some(old) = previous {
        old.remove(store);
    }
    tracing::info!(snapshot = %stored.meta.snapshot_id, "built a snapshot (a checkpoint)");
    Ok((stored, data))
}

#[cfg(test)]
mod tests {
    use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use prost::Message;

    use super::*;
    use crate::types::Batch;

    #[tokio::test]
    async fn an_install_a_crash_interrupted_is_finished_at_open() {
        let dir_a = tempfile::tempdir().unwrap();
        let store_a = crate::open(dir_a.path()).unwrap();
        let mut a = StateMachine::new(store_a.clone()).unwrap();
        let entries = (1..=20u64).map(|i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Batch(vec![Command::Put(
                PutRequest {
                    key: b"/k".to_vec(),
                    value: i.to_string().into_bytes(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )])),
        });
        a.apply(entries).await.unwrap();
        let stored = snapshot_file::build(&store_a).unwrap();
        let mut data = Vec::new();
        {
            use tokio::io::AsyncReadExt;
            let mut file = stored.data(&store_a).open().await.unwrap();
            file.read_to_end(&mut data).await.unwrap();
        }

        // Member B was killed right after recording the install: its state
        // machine column families hold nothing of the snapshot yet.
        let dir_b = tempfile::tempdir().unwrap();
        let store_b = crate::open(dir_b.path()).unwrap();
        let target = StoredSnapshot {
            meta: stored.meta.clone(),
            file: snapshot_file::snap_name(),
        };
        std::fs::create_dir_all(store_b.snapshot_dir()).unwrap();
        std::fs::write(target.path(&store_b), &data).unwrap();
        store_b
            .db
            .put_cf(
                store_b.cf(CF_META),
                KEY_INSTALLING,
                encode(&target).unwrap(),
            )
            .unwrap();
        drop(store_b);

        let mut b = StateMachine::new(crate::open(dir_b.path()).unwrap()).unwrap();
        let (applied, _) = b.applied_state().await.unwrap();
        assert_eq!(applied.unwrap().index, 20);
        let reader = b.reader();
        assert_eq!(reader.revisions().unwrap(), (20, 0));
        let got = reader
            .range(&RangeRequest {
                key: b"/k".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.kvs[0].value, b"20");
        assert!(
            b.store
                .db
                .get_cf(b.store.cf(CF_META), KEY_INSTALLING)
                .unwrap()
                .is_none()
        );
        let current = b.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.snapshot_id, stored.meta.snapshot_id);
    }

    fn puts(from: u64, to: u64) -> impl Iterator<Item = Entry<TypeConfig>> {
        (from..=to).map(|i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Batch(vec![Command::Put(
                PutRequest {
                    key: format!("/k/{i}").into_bytes(),
                    value: i.to_string().into_bytes(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )])),
        })
    }

    /// openraft reads a snapshot to send it while the leader builds newer ones;
    /// a replaced snapshot that vanished mid-send was a storage error, which
    /// stops the member's Raft.
    #[tokio::test]
    async fn a_snapshot_being_sent_outlives_the_newer_one_that_replaces_it() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::open(dir.path()).unwrap();
        let mut sm = StateMachine::new(store.clone()).unwrap();
        sm.apply(puts(1, 10)).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap();
        // A follower is being sent the current snapshot...
        let mut sending = sm.get_current_snapshot().await.unwrap().unwrap();
        // ...when two newer ones are built.
        sm.apply(puts(11, 20)).await.unwrap();
        builder.build_snapshot().await.unwrap();
        sm.apply(puts(21, 30)).await.unwrap();
        let newest = builder.build_snapshot().await.unwrap();
        let mut data = Vec::new();
        sending.snapshot.read_to_end(&mut data).await.unwrap();
        let summary = crate::export::read_records(&data[..], |_, _, _| Ok(())).unwrap();
        assert_eq!(summary.revision, 10);
        // Once read, the replaced one is deleted; the newest stays.
        let entries = || std::fs::read_dir(store.snapshot_dir()).unwrap().count();
        let before = entries();
        drop(sending);
        assert!(
            entries() < before,
            "the replaced snapshot is deleted when read"
        );
        drop(newest);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.unwrap().index, 30);
    }
}
