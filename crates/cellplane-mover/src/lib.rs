//! The tenant mover: moves one tenant's keys from the cell that serves it to
//! another with no lost acknowledged write, following design section 9.
//!
//! 1. **Plan**: create the migration record in the directory (create-only: one
//!    move per tenant), push the current map to both cells, and have the
//!    destination expect the tenant (only the mover may write it there).
//! 2. **Copy** the tenant's keys at the source's revision R0, a page at a time.
//! 3. **Tail**: a watch on the source from R0+1 applies every later change to
//!    the destination, until it has caught up.
//! 4. **Fence**: the source stops serving the tenant (a Raft command in the
//!    source: it binds every router, stale ones included); the answer's revision
//!    is the fence point Rf.
//! 5. **Drain** the tail up to Rf, within [`MoveSettings::fence_deadline`];
//!    past it the move is rolled back (unfenced) and fails.
//! 6. **Verify**: the tenant's keys and values hash the same on both sides.
//! 7. **Cut over**: the map (tenant → destination, new version) is written to
//!    the directory with a compare-and-swap and pushed to every cell; the
//!    destination serves the tenant, routers follow the refusal or the map.
//! 8. **Retire**: after [`MoveSettings::grace`], the source's copy is deleted.
//!
//! Each step is persisted in the record ([`MoveRecord`]) before the next, so a
//! killed mover resumes ([`Mover::resume`]) or rolls back ([`Mover::abort`]).
//! The fence window — writes of the moving tenant refused — runs from step 4
//! to the end of step 7 and is reported.
//!
//! [`Mover::drain`] empties a cell this way: it marks the cell draining with
//! every tenant that has keys in it pinned to it, then moves those tenants to the
//! cells their buckets now go to, a few at a time.
//!
//! Leases move with the tenant, keeping their IDs, granted TTLs and remaining
//! time (`leases.rs`). [`Mover::move_bucket`] moves a hash bucket: its tenants
//! with data, and the bucket in the map for tenants to come.
//!
//! Depends on `cellplane-map`, `cellplane-proto`, `cellplane-security` and the
//! router's directory client; talks to cells and the directory over their gRPC
//! APIs only.

mod bucket;
mod cell;
mod drain;
mod leases;
mod record;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RequestOp, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse, request_op, watch_request,
};
use cellplane_proto::mvccpb::KeyValue;
use cellplane_proto::mvccpb::event::EventType;
use cellplane_router::directory::{Directory, MapWriteError};
use tokio::sync::mpsc;
use tonic::transport::ClientTlsConfig;

pub use drain::{DrainReport, MAX_DRAIN_TENANTS};
pub use record::{MoveRecord, MoveState, RECORD_PREFIX};

use cell::CellConn;
use record::Records;

/// Ops per txn the mover writes (below every cell's `limits.max_txn_ops`).
const OPS_PER_TXN: usize = 64;

/// How a move runs.
#[derive(Debug, Clone)]
pub struct MoveSettings {
    /// The longest the tenant's writes may be refused (fence to cut-over
    /// excluded the directory write): past it the move rolls back.
    pub fence_deadline: Duration,
    /// How long the source keeps its copy after the cut-over (routers on an
    /// older map are refused by it meanwhile, and nothing is lost if the move
    /// must be looked at).
    pub grace: Duration,
    /// A tenant with more keys is refused (a move copies it whole).
    pub max_keys: u64,
    /// Stop (fail) right after persisting this state (for `Copying`: after the
    /// copy and the tail caught up, before the fence): to rehearse a mover
    /// killed there (`cellplane tenant move --stop-after`).
    pub stop_after: Option<MoveState>,
}

impl Default for MoveSettings {
    fn default() -> Self {
        MoveSettings {
            fence_deadline: Duration::from_secs(5),
            grace: Duration::from_secs(30),
            max_keys: 1_000_000,
            stop_after: None,
        }
    }
}

/// Why a move did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("directory: {0}")]
    Directory(String),
    #[error("cell {cell}: {message}")]
    Cell { cell: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error(
        "a move of tenant {tenant} is in progress ({state}): `cellplane tenant move {tenant} --resume` or `--abort`"
    )]
    InProgress { tenant: String, state: MoveState },
    #[error("no move of tenant {0} is in progress")]
    NoMove(String),
    #[error("another mover changed the record of tenant {0}'s move meanwhile")]
    Raced(String),
    #[error(
        "tenant {tenant}: the destination did not catch up with the fence point within \
         {deadline:?}; the move was rolled back (the source serves the tenant again)"
    )]
    FenceDeadline { tenant: String, deadline: Duration },
    #[error(
        "tenant {tenant}: the copies differ at the fence point (source {source_keys} keys, \
         destination {dest_keys} keys, or different values); the tenant stays fenced: \
         `--resume` copies again, `--abort` rolls back"
    )]
    Verify {
        tenant: String,
        source_keys: u64,
        dest_keys: u64,
    },
    #[error(
        "tenant {tenant}: the lease sets differ at the fence point (source {source_leases} \
         leases, destination {dest_leases}); the tenant stays fenced: `--resume` copies again, \
         `--abort` rolls back"
    )]
    VerifyLeases {
        tenant: String,
        source_leases: usize,
        dest_leases: usize,
    },
    #[error("stopped after {0}, as asked: `--resume` or `--abort` it")]
    Stopped(MoveState),
}

/// What a finished move did.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// The map version that sends the tenant to its new cell.
    pub version: u64,
    /// Keys and bytes (keys and values) at the fence point.
    pub keys: u64,
    pub bytes: u64,
    /// Leases moved (at the fence point).
    pub leases: usize,
    /// How long the tenant's writes were refused (fence to cut-over).
    pub fence_window: Duration,
}

/// Drives moves, with the directory as the source of truth.
pub struct Mover {
    directory: Directory,
    records: Records,
    tls: Option<ClientTlsConfig>,
    settings: MoveSettings,
    progress: Box<dyn Fn(&str) + Send + Sync>,
}

impl Mover {
    /// A mover using the directory at `endpoints`, as an operator (`tls`).
    pub fn new(
        endpoints: &[String],
        tls: Option<ClientTlsConfig>,
        settings: MoveSettings,
        progress: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<Mover, MoveError> {
        let timeout = Duration::from_secs(5);
        Ok(Mover {
            directory: Directory::new(endpoints, timeout, tls.as_ref())
                .map_err(MoveError::Directory)?,
            records: Records::new(endpoints, timeout, tls.as_ref())?,
            tls,
            settings,
            progress: Box::new(progress),
        })
    }

    fn say(&self, what: &str) {
        (self.progress)(what);
    }

    /// Moves in progress.
    pub async fn list(&self) -> Result<Vec<MoveRecord>, MoveError> {
        self.records.list().await
    }

    async fn map(&self) -> Result<(CellMap, i64), MoveError> {
        self.directory
            .read()
            .await
            .map_err(|e| MoveError::Directory(e.to_string()))
    }

    fn conn(&self, map: &CellMap, name: &str) -> Result<CellConn, MoveError> {
        let entry = map
            .cells
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| MoveError::Refused(format!("the map has no cell {name}")))?;
        CellConn::new(entry, self.tls.as_ref())
    }

    /// Moves `tenant` to cell `to`.
    pub async fn start(&self, tenant: &str, to: &str) -> Result<MoveReport, MoveError> {
        cellplane_security::check_tenant_name(tenant)
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        if let Some((r, _)) = self.records.get(tenant).await? {
            return Err(MoveError::InProgress {
                tenant: tenant.into(),
                state: r.state,
            });
        }
        let (map, _) = self.map().await?;
        let from = map
            .cell_for(tenant)
            .map(|c| c.name.clone())
            .ok_or_else(|| MoveError::Refused(format!("the map sends tenant {tenant} nowhere")))?;
        if from == to {
            return Err(MoveError::Refused(format!(
                "tenant {tenant} is served by cell {to} already"
            )));
        }
        match map.cells.iter().find(|c| c.name == to) {
            None => return Err(MoveError::Refused(format!("the map has no cell {to}"))),
            Some(c) if c.state != cellplane_map::CellState::Active => {
                return Err(MoveError::Refused(format!(
                    "cell {to} is draining: move tenants to an active cell"
                )));
            }
            Some(_) => {}
        }
        // Both cells serve by the directory's map before the move relies on it.
        let (src, dst) = (self.conn(&map, &from)?, self.conn(&map, to)?);
        for c in [&src, &dst] {
            c.learn_map(&map.to_json()).await?;
        }
        let record = MoveRecord {
            tenant: tenant.into(),
            from,
            to: to.into(),
            version: map
                .next_version()
                .map_err(|e| MoveError::Refused(e.to_string()))?,
            state: MoveState::Copying,
            r0: 0,
            rf: 0,
            keys: 0,
            retire_after_ms: 0,
        };
        let rev = self.records.put(&record, 0).await.map_err(|e| match e {
            MoveError::Raced(t) => {
                MoveError::Refused(format!("another mover started moving tenant {t} meanwhile"))
            }
            other => other,
        })?;
        self.say(&format!(
            "planned: tenant {tenant} from {} to {to} (map version {})",
            record.from, record.version
        ));
        self.drive(record, rev).await
    }

    /// Resumes `tenant`'s move from its record.
    pub async fn resume(&self, tenant: &str) -> Result<MoveReport, MoveError> {
        let (record, rev) = self
            .records
            .get(tenant)
            .await?
            .ok_or_else(|| MoveError::NoMove(tenant.into()))?;
        self.say(&format!(
            "resuming tenant {tenant}'s move at {}",
            record.state
        ));
        self.drive(record, rev).await
    }

    /// Rolls `tenant`'s move back: the source serves it again, the
    /// destination forgets its copy. Refused once cut over.
    pub async fn abort(&self, tenant: &str) -> Result<(), MoveError> {
        let (record, rev) = self
            .records
            .get(tenant)
            .await?
            .ok_or_else(|| MoveError::NoMove(tenant.into()))?;
        if record.state >= MoveState::CutOver {
            return Err(MoveError::Refused(format!(
                "tenant {tenant} is cut over to {}: finish with `--resume` (or move it back)",
                record.to
            )));
        }
        self.roll_back(&record).await?;
        self.records.delete(tenant, rev).await?;
        self.say(&format!(
            "aborted: tenant {tenant} stays in {}",
            record.from
        ));
        Ok(())
    }

    async fn roll_back(&self, r: &MoveRecord) -> Result<(), MoveError> {
        let (map, _) = self.map().await?;
        let (src, dst) = (self.conn(&map, &r.from)?, self.conn(&map, &r.to)?);
        src.unfence(&r.tenant).await?;
        dst.delete_tenant(&r.tenant).await?;
        dst.forget(&r.tenant).await
    }

    /// Persists `record` at `state` (CAS on `rev`); stops there if asked.
    async fn persist(
        &self,
        record: &mut MoveRecord,
        rev: &mut i64,
        state: MoveState,
    ) -> Result<(), MoveError> {
        record.state = state;
        *rev = self.records.put(record, *rev).await?;
        self.say(&format!("tenant {}: {state}", record.tenant));
        if self.settings.stop_after == Some(state) {
            return Err(MoveError::Stopped(state));
        }
        Ok(())
    }

    async fn drive(&self, mut r: MoveRecord, mut rev: i64) -> Result<MoveReport, MoveError> {
        let (map, _) = self.map().await?;
        let (src, dst) = (self.conn(&map, &r.from)?, self.conn(&map, &r.to)?);
        let tenant = r.tenant.clone();
        let mut fenced_at = Instant::now();
        if r.state == MoveState::Copying {
            let copied = async {
                dst.expect(&tenant, &r.from, r.version).await?;
                // What an earlier, interrupted copy left is written again.
                dst.delete_tenant(&tenant).await?;
                let r0 = src.revision().await?;
                let mut tail = Tail::open(&src, &tenant, r0 + 1).await?;
                let copied = self.copy(&src, &dst, &tenant, r0, &mut tail.leases).await?;
                self.say(&format!(
                    "tenant {tenant}: copied {copied} keys at revision {r0}"
                ));
                tail.drain_to(&dst, src.revision().await?).await?;
                Ok::<_, MoveError>((r0, tail))
            }
            .await;
            let (r0, mut tail) = match copied {
                Ok(c) => c,
                Err(e @ MoveError::Refused(_)) => {
                    // The tenant cannot move (too large): nothing to keep.
                    self.roll_back(&r).await?;
                    self.records.delete(&tenant, rev).await?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            r.r0 = r0;
            if self.settings.stop_after == Some(MoveState::Copying) {
                // As if killed mid-tail: the destination holds a copy, the
                // record still says copying.
                return Err(MoveError::Stopped(MoveState::Copying));
            }
            fenced_at = Instant::now();
            r.rf = src.fence(&tenant, &r.to, r.version).await?;
            self.persist(&mut r, &mut rev, MoveState::Fenced).await?;
            let drained =
                tokio::time::timeout(self.settings.fence_deadline, tail.drain_to(&dst, r.rf)).await;
            if !matches!(drained, Ok(Ok(()))) {
                self.roll_back(&r).await?;
                self.records.delete(&tenant, rev).await?;
                return Err(match drained {
                    Ok(Err(e)) => e,
                    _ => MoveError::FenceDeadline {
                        tenant,
                        deadline: self.settings.fence_deadline,
                    },
                });
            }
        } else if r.state == MoveState::Fenced {
            // Resumed: the source is frozen for the tenant, copy it whole again.
            dst.delete_tenant(&tenant).await?;
            self.copy(&src, &dst, &tenant, r.rf, &mut BTreeSet::new())
                .await?;
        }
        let (mut keys, mut bytes, mut leases) = (r.keys, 0, 0);
        if r.state == MoveState::Fenced {
            let moved = leases::sync_leases(&src, &dst, &tenant).await?;
            let landed = dst.leases(&tenant).await?;
            if moved != landed {
                return Err(MoveError::VerifyLeases {
                    tenant,
                    source_leases: moved.len(),
                    dest_leases: landed.len(),
                });
            }
            leases = moved.len();
            let (a, b) = (src.hash(&tenant, r.rf).await?, dst.hash(&tenant, 0).await?);
            if a != b {
                return Err(MoveError::Verify {
                    tenant,
                    source_keys: a.keys,
                    dest_keys: b.keys,
                });
            }
            (keys, bytes) = (a.keys, a.bytes);
            r.keys = keys;
            self.say(&format!(
                "tenant {tenant}: verified {keys} keys, {bytes} bytes, {leases} leases: same \
                 SHA-256 on both sides"
            ));
            self.persist(&mut r, &mut rev, MoveState::Verified).await?;
        }
        if r.state == MoveState::Verified {
            // The source is fenced: its leases count down untouched by clients.
            let ttls = src.lease_ttls(&tenant).await?;
            dst.set_lease_deadlines(&tenant, &ttls).await?;
            leases = ttls.len();
            self.cut_over(&tenant, &r.to).await?;
            r.retire_after_ms = now_ms() + self.settings.grace.as_millis() as u64;
            self.persist(&mut r, &mut rev, MoveState::CutOver).await?;
        }
        let fence_window = fenced_at.elapsed();
        // Cut over: make sure every cell learned the map (a resumed mover may
        // have died before), then retire the old copy after the grace period.
        let (map, _) = self.map().await?;
        self.push_for_move(&map, &r.from, &r.to).await?;
        let wait = r.retire_after_ms.saturating_sub(now_ms());
        self.say(&format!(
            "tenant {tenant}: retiring the copy in {} after {wait} ms",
            r.from
        ));
        tokio::time::sleep(Duration::from_millis(wait)).await;
        src.delete_tenant(&tenant).await?;
        self.records.delete(&tenant, rev).await?;
        self.say(&format!("done: tenant {tenant} is served by {}", r.to));
        Ok(MoveReport {
            tenant,
            from: r.from,
            to: r.to,
            version: map.version,
            keys,
            bytes,
            leases,
            fence_window,
        })
    }

    /// Copies the tenant's leases (as they are now) and keys (at `revision`)
    /// from `src` to `dst`; answers how many keys, and adds the leases to
    /// `leases`.
    async fn copy(
        &self,
        src: &CellConn,
        dst: &CellConn,
        tenant: &str,
        revision: i64,
        leases: &mut BTreeSet<i64>,
    ) -> Result<u64, MoveError> {
        let ttls = src.lease_ttls(tenant).await?;
        if ttls.len() as u64 > self.settings.max_keys {
            return Err(MoveError::Refused(format!(
                "tenant {tenant} has more than {} leases: too large to move in one piece",
                self.settings.max_keys
            )));
        }
        dst.grant_leases(tenant, &ttls).await?;
        leases.extend(ttls.iter().map(|l| l.id));
        let mut pages = src.pages(tenant, revision).await?;
        let mut n = 0u64;
        while let Some(kvs) = pages.next().await? {
            n += kvs.len() as u64;
            if n > self.settings.max_keys {
                return Err(MoveError::Refused(format!(
                    "tenant {tenant} has more than {} keys: too large to move in one piece",
                    self.settings.max_keys
                )));
            }
            for chunk in kvs.chunks(OPS_PER_TXN) {
                let ops = chunk.iter().map(|kv| put_op(kv, leases)).collect();
                dst.write(tenant, ops).await?;
            }
        }
        Ok(n)
    }

    /// Writes the map sending `tenant` to `to` (compare-and-swap, retried on a
    /// concurrent change) and pushes it to every cell; answers its version.
    async fn cut_over(&self, tenant: &str, to: &str) -> Result<u64, MoveError> {
        for _ in 0..5 {
            let (map, mrev) = self.map().await?;
            if map.cell_for(tenant).is_some_and(|c| c.name == to) {
                let from = self.source_cell(tenant).await?;
                self.push_for_move(&map, &from, to).await?;
                return Ok(map.version);
            }
            let mut next = map.clone();
            next.tenants.insert(tenant.to_string(), to.to_string());
            if !self.commit_map(&map, mrev, &mut next).await? {
                continue;
            }
            self.say(&format!(
                "cut over: map version {} sends {tenant} to {to}",
                next.version
            ));
            let from = map.cell_for(tenant).map_or("", |c| c.name.as_str());
            self.push_for_move(&next, from, to).await?;
            return Ok(next.version);
        }
        Err(MoveError::Directory(
            "the map kept changing under the cut-over: resume the move".into(),
        ))
    }
}

impl Mover {
    /// Writes `next` as the successor of `map` (stored at directory revision
    /// `mrev`), numbered and validated; `Ok(false)` when another writer changed
    /// the map meanwhile (read it again).
    async fn commit_map(
        &self,
        map: &CellMap,
        mrev: i64,
        next: &mut CellMap,
    ) -> Result<bool, MoveError> {
        next.version = map
            .next_version()
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        next.validate_successor(map)
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        match self.directory.write(next, mrev).await {
            Ok(()) => Ok(true),
            Err(MapWriteError::Changed) => Ok(false),
            Err(e) => Err(MoveError::Directory(e.to_string())),
        }
    }

    /// The source cell of `tenant`'s move in progress.
    async fn source_cell(&self, tenant: &str) -> Result<String, MoveError> {
        let (r, _) = self
            .records
            .get(tenant)
            .await?
            .ok_or_else(|| MoveError::NoMove(tenant.into()))?;
        Ok(r.from)
    }

    /// Pushes a cut-over's map: the destination first (it serves the tenant
    /// while the source is still fenced), then the source (its fence gives way
    /// to the map), both required; then every other cell, where a failure is
    /// reported, not fatal (that cell keeps its older map, which does not
    /// concern this tenant, until `cellplane map push`).
    async fn push_for_move(&self, map: &CellMap, from: &str, to: &str) -> Result<(), MoveError> {
        let json = map.to_json();
        for name in [to, from] {
            self.conn(map, name)?.learn_map(&json).await?;
        }
        for entry in map.cells.iter().filter(|c| c.name != from && c.name != to) {
            let learned = match CellConn::new(entry, self.tls.as_ref()) {
                Ok(c) => c.learn_map(&json).await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = learned {
                self.say(&format!(
                    "warning: cell {} did not learn map version {}: {e}; run `cellplane map \
                     push` once it answers",
                    entry.name, map.version
                ));
            }
        }
        Ok(())
    }
}

/// Pushes `map` to every cell it names; answers each cell's name and the version
/// it now serves by. Fails naming every cell that did not learn it.
pub async fn push_map(
    map: &CellMap,
    tls: Option<&ClientTlsConfig>,
) -> Result<Vec<(String, u64)>, MoveError> {
    let json = map.to_json();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for entry in &map.cells {
        let learned = match CellConn::new(entry, tls) {
            Ok(c) => c.learn_map(&json).await,
            Err(e) => Err(e),
        };
        match learned {
            Ok(v) => done.push((entry.name.clone(), v)),
            Err(e) => failed.push(e.to_string()),
        }
    }
    if !failed.is_empty() {
        return Err(MoveError::Refused(format!(
            "map version {} did not reach every cell, which go on serving by the map they had: \
             {}; run `cellplane map push` once they answer",
            map.version,
            failed.join("; ")
        )));
    }
    Ok(done)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The put that recreates `kv` in the destination, on its lease if the
/// destination has it (one that is not there was revoked in the source since:
/// the revoke's delete follows in the tail).
fn put_op(kv: &KeyValue, leases: &BTreeSet<i64>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: kv.key.clone(),
            value: kv.value.clone(),
            lease: if leases.contains(&kv.lease) {
                kv.lease
            } else {
                0
            },
            ..Default::default()
        })),
    }
}

/// A watch on the source that replays the tenant's changes onto the destination.
struct Tail {
    requests: mpsc::Sender<WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
    tenant: String,
    src: CellConn,
    /// The tenant's leases the destination has.
    leases: BTreeSet<i64>,
}

impl Tail {
    async fn open(src: &CellConn, tenant: &str, from: i64) -> Result<Tail, MoveError> {
        let key = format!("/{tenant}/").into_bytes();
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    range_end: cellplane_proto::prefix_end(&key),
                    key,
                    start_revision: from,
                    ..Default::default()
                },
            )),
        };
        let mut last = String::from("no member");
        for i in 0..src.members() {
            let Some(ch) = src.member(i) else { continue };
            let (tx, rx) = mpsc::channel(4);
            let _ = tx.send(create.clone()).await;
            let opened = WatchClient::new(ch)
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let mut responses = match opened {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    last = s.message().to_string();
                    continue;
                }
            };
            match responses.message().await {
                Ok(Some(r)) if r.created && !r.canceled => {
                    return Ok(Tail {
                        requests: tx,
                        responses,
                        tenant: tenant.to_string(),
                        src: src.clone(),
                        leases: BTreeSet::new(),
                    });
                }
                Ok(Some(r)) => last = r.cancel_reason,
                Ok(None) => last = "the watch ended".into(),
                Err(s) => last = s.message().to_string(),
            }
        }
        Err(MoveError::Cell {
            cell: src.name.clone(),
            message: format!("cannot watch tenant {tenant} from revision {from}: {last}"),
        })
    }

    /// Applies the source's changes to `dst` until the source says it has sent
    /// every change up to `target`.
    async fn drain_to(&mut self, dst: &CellConn, target: i64) -> Result<(), MoveError> {
        let tenant = self.tenant.clone();
        let broken = |m: String| MoveError::Cell {
            cell: dst.name.clone(),
            message: format!("the tail of tenant {tenant} broke: {m}"),
        };
        loop {
            let progress = WatchRequest {
                request_union: Some(watch_request::RequestUnion::ProgressRequest(
                    WatchProgressRequest {},
                )),
            };
            self.requests
                .send(progress)
                .await
                .map_err(|_| broken("the watch stream closed".into()))?;
            loop {
                let resp = match self.responses.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(broken("the watch ended".into())),
                    Err(s) => return Err(broken(s.message().to_string())),
                };
                if resp.canceled {
                    return Err(broken(resp.cancel_reason));
                }
                if !resp.events.is_empty() {
                    self.apply(dst, &resp).await?;
                    continue;
                }
                // A progress answer: every change up to its revision was sent.
                if resp.header.as_ref().is_some_and(|h| h.revision >= target) {
                    return Ok(());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn apply(&mut self, dst: &CellConn, resp: &WatchResponse) -> Result<(), MoveError> {
        let mut ops = Vec::new();
        let mut keys = std::collections::HashSet::new();
        for ev in &resp.events {
            let Some(kv) = &ev.kv else { continue };
            // No key twice in one txn: a later change of it starts the next.
            if !keys.insert(kv.key.clone()) || ops.len() == OPS_PER_TXN {
                dst.write(&self.tenant, std::mem::take(&mut ops)).await?;
                keys.clear();
                keys.insert(kv.key.clone());
            }
            if ev.r#type == EventType::Delete as i32 {
                ops.push(RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(
                        DeleteRangeRequest {
                            key: kv.key.clone(),
                            ..Default::default()
                        },
                    )),
                });
            } else {
                if kv.lease != 0 && !self.leases.contains(&kv.lease) {
                    self.lease_moves_in(dst, kv.lease).await?;
                }
                ops.push(put_op(kv, &self.leases));
            }
        }
        dst.write(&self.tenant, ops).await
    }

    /// Grants in `dst` a lease the source granted after the copy, if it still
    /// exists there.
    async fn lease_moves_in(&mut self, dst: &CellConn, id: i64) -> Result<(), MoveError> {
        if let Some(l) = self.src.lease_ttl(&self.tenant, id).await? {
            dst.grant_lease(&self.tenant, id, l.granted).await?;
            self.leases.insert(id);
        }
        Ok(())
    }
}
