//! etcd's Maintenance service on a member: Status, and the operator's
//! maintenance calls.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_proto::etcdserverpb::maintenance_server::Maintenance;
use cellplane_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::node::Shared;
use crate::service::ETCD_API_VERSION;

pub struct MaintenanceService {
    shared: Arc<Shared>,
}

impl MaintenanceService {
    pub fn new(shared: Arc<Shared>) -> MaintenanceService {
        MaintenanceService { shared }
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
            errors: vec![],
            db_size_in_use: db,
            is_learner: false,
        }))
    }

    async fn alarm(&self, _r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.Alarm is not served by cellplane yet",
        ))
    }

    async fn defragment(
        &self,
        _r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.Defragment is not served by cellplane yet",
        ))
    }

    async fn hash(&self, _r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.Hash is not served by cellplane yet",
        ))
    }

    async fn hash_kv(
        &self,
        _r: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.HashKV is not served by cellplane yet",
        ))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented(
            "Maintenance.Snapshot is not served by cellplane yet",
        ))
    }

    async fn move_leader(
        &self,
        _r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "Maintenance.MoveLeader is not served by cellplane yet",
        ))
    }
}
