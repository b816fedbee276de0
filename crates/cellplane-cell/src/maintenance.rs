//! etcd's Maintenance service on a member: Status, and the operator's
//! maintenance calls.
//!
//! `HashKV`, `Hash` and `Defragment` read or rewrite the whole database: they run
//! on the blocking pool, one at a time per member (a second waits), so no runtime
//! thread stalls and two operators cannot stack full scans on one member.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_proto::etcdserverpb::alarm_request::AlarmAction;
use cellplane_proto::etcdserverpb::maintenance_server::Maintenance;
use cellplane_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use cellplane_storage::Command;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::{kv_status, node_status};
use crate::node::{ProposeError, Shared};
use crate::service::ETCD_API_VERSION;
use crate::service::decode_outcome;

pub struct MaintenanceService {
    shared: Arc<Shared>,
    /// One whole-database operation at a time on this member.
    heavy: Arc<tokio::sync::Mutex<()>>,
    /// Snapshots being sent.
    snapshots: Arc<tokio::sync::Semaphore>,
}

/// Snapshot chunks: etcd's size.
pub const SNAPSHOT_CHUNK_BYTES: usize = 32 << 10;
/// Chunks waiting for a slow snapshot client.
const SNAPSHOT_QUEUE: usize = 8;
/// A snapshot client that takes no chunk for this long is cut off.
const SNAPSHOT_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Snapshots one member sends at once.
const MAX_SNAPSHOTS: usize = 2;

impl MaintenanceService {
    pub fn new(shared: Arc<Shared>) -> MaintenanceService {
        MaintenanceService {
            shared,
            heavy: Arc::default(),
            snapshots: Arc::new(tokio::sync::Semaphore::new(MAX_SNAPSHOTS)),
        }
    }

    /// Runs `work` on the blocking pool after any earlier whole-database
    /// operation of this member has finished. The turn is held by the blocking
    /// work itself, so a caller that gives up does not let the next one start
    /// beside a scan that is still running.
    async fn heavy<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let turn = self.heavy.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work()
        })
        .await
        .map_err(|e| Status::internal(format!("maintenance task failed: {e}")))?
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.shared;
        let m = s.raft.metrics().borrow().clone();
        let applied = *s.applied.borrow();
        let db = s.store.size_bytes() as i64;
        let mut header = s.header(applied.revision);
        header.raft_term = m.current_term;
        Ok(Response::new(StatusResponse {
            header: Some(header),
            version: ETCD_API_VERSION.to_string(),
            db_size: db,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            // As etcd: one entry per raised alarm (`etcdctl endpoint status`
            // shows them).
            // The store is read only when the applied state says an alarm is up
            // (routers probe Status every few seconds).
            errors: if applied.alarms == cellplane_storage::Raised::default() {
                Default::default()
            } else {
                s.reader.alarms().unwrap_or_default()
            }
            .into_iter()
            .map(|(m, a)| {
                let name = AlarmType::try_from(a).map_or("UNKNOWN", |t| t.as_str_name());
                format!("memberID:{m} alarm:{name} ")
            })
            .collect(),
            db_size_in_use: db,
            is_learner: !s.is_voter(),
        }))
    }

    /// etcd's Alarm: GET lists the raised alarms; ACTIVATE and DEACTIVATE raise
    /// and disarm one through Raft (from a follower, forwarded to the leader).
    async fn alarm(&self, r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = r.into_inner();
        let s = &self.shared;
        let activate = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => {
                let alarms = s.reader.alarms().map_err(kv_status)?;
                let revision = s.applied.borrow().revision;
                return Ok(Response::new(AlarmResponse {
                    header: Some(s.header(revision)),
                    alarms: alarms
                        .into_iter()
                        .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                        .collect(),
                }));
            }
            Ok(AlarmAction::Activate) => true,
            Ok(AlarmAction::Deactivate) => false,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown alarm action {}: GET, ACTIVATE or DEACTIVATE",
                    r.action
                )));
            }
        };
        let cmd = Command::Alarm {
            activate,
            member: r.member_id,
            alarm: r.alarm,
        };
        match s.propose_with(cmd, true).await {
            Ok((resp, _)) => {
                let mut body: AlarmResponse = decode_outcome(resp.outcome)?;
                body.header = Some(s.header(resp.revision));
                if !activate {
                    tracing::warn!(member = r.member_id, alarm = r.alarm, "alarm disarmed");
                }
                Ok(Response::new(body))
            }
            Err(ProposeError::Forward(leader)) => Err(Status::unavailable(format!(
                "etcdserver: not leader (member {leader} leads); retry"
            ))),
            Err(ProposeError::Failed(e)) => Err(node_status(e)),
        }
    }

    async fn defragment(
        &self,
        _r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let store = self.shared.store.clone();
        let before = store.size_bytes();
        self.heavy(move || store.defragment().map_err(kv_status))
            .await?;
        let after = self.shared.store.size_bytes();
        tracing::info!(before, after, "defragmented");
        let revision = self.shared.applied.borrow().revision;
        Ok(Response::new(DefragmentResponse {
            header: Some(self.shared.header(revision)),
        }))
    }

    async fn hash(&self, _r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let store = self.shared.store.clone();
        let revision = self.shared.applied.borrow().revision;
        let hash = self
            .heavy(move || store.hash_all().map_err(kv_status))
            .await?;
        Ok(Response::new(HashResponse {
            header: Some(self.shared.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let reader = self.shared.reader.clone();
        let rev = r.into_inner().revision;
        let h = self
            .heavy(move || reader.hash_kv(rev).map_err(kv_status))
            .await?;
        let revision = self.shared.applied.borrow().revision;
        Ok(Response::new(HashKvResponse {
            header: Some(self.shared.header(revision)),
            hash: h.hash,
            compact_revision: h.compacted,
            hash_revision: h.revision,
        }))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

    /// etcd's Snapshot: one consistent snapshot of this member's key-value state
    /// in our checksummed format (see `cellplane_storage::export_snapshot`), in
    /// chunks of [`SNAPSHOT_CHUNK_BYTES`]. At most [`SNAPSHOT_QUEUE`] chunks wait
    /// for a slow client; one that takes no chunk for [`SNAPSHOT_STALL`] is cut
    /// off, so a stalled download cannot pin a RocksDB snapshot (and the disk
    /// space it holds) forever. `remaining_bytes` is 0 on the last chunk and 1
    /// before it: the size is not known in advance.
    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let Ok(permit) = self.snapshots.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{MAX_SNAPSHOTS} snapshots are already being sent from this member; retry later \
                 or ask another member"
            )));
        };
        let s = &self.shared;
        let header = s.header(s.applied.borrow().revision);
        let store = s.store.clone();
        let shutdown = s.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_QUEUE);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let send = |blob: Vec<u8>, last: bool| {
                let chunk = SnapshotResponse {
                    header: Some(header),
                    remaining_bytes: u64::from(!last),
                    blob,
                    // etcd 3.6 names its storage version here; ours is in the
                    // snapshot's own magic.
                    version: String::new(),
                };
                runtime.block_on(async {
                    tokio::select! {
                        _ = shutdown.cancelled() => false,
                        sent = tokio::time::timeout(SNAPSHOT_STALL, tx.send(Ok(chunk))) => {
                            matches!(sent, Ok(Ok(())))
                        }
                    }
                })
            };
            match cellplane_storage::export_snapshot(&store, SNAPSHOT_CHUNK_BYTES, send) {
                Ok(summary) => tracing::info!(
                    revision = summary.revision,
                    bytes = summary.bytes,
                    "snapshot sent"
                ),
                Err(cellplane_storage::SnapshotError::Abandoned) => {
                    tracing::warn!("snapshot abandoned: the client stopped reading or left");
                }
                Err(e) => {
                    tracing::error!(error = %e, "snapshot failed");
                    // Never wait for a client that stopped reading.
                    let _ = tx.try_send(Err(Status::internal(format!("snapshot failed: {e}"))));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// Not served: openraft 0.9 has no leader transfer (0.10 adds it), and an
    /// election triggered on the target is refused by voters still inside the
    /// current leader's lease. Restarting the leader moves leadership at the
    /// cost of one election (docs/operations.md, rolling upgrade).
    async fn move_leader(
        &self,
        _r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.MoveLeader is not served: the Raft library in use (openraft 0.9) has no \
             leader transfer; restart the leader to move leadership (one election)",
        ))
    }
}
