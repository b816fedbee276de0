//! etcd's Cluster service on a member: the cell's membership.

use std::sync::Arc;

use cellplane_proto::etcdserverpb::cluster_server::Cluster;
use cellplane_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::node::Shared;

pub struct ClusterService {
    shared: Arc<Shared>,
}

impl ClusterService {
    pub fn new(shared: Arc<Shared>) -> ClusterService {
        ClusterService { shared }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _r: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let s = &self.shared;
        let m = s.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let learners: std::collections::BTreeSet<u64> = membership.learner_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                name: node.name.clone(),
                peer_ur_ls: vec![format!("http://{}", node.peer_addr)],
                client_ur_ls: vec![format!("http://{}", node.client_addr)],
                is_learner: learners.contains(id),
            })
            .collect();
        let applied = *s.applied.borrow();
        Ok(Response::new(MemberListResponse {
            header: Some(s.header(applied.revision)),
            members,
        }))
    }

    async fn member_add(
        &self,
        _r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(
            "Cluster.MemberAdd is not served by cellplane yet",
        ))
    }

    async fn member_remove(
        &self,
        _r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented(
            "Cluster.MemberRemove is not served by cellplane yet",
        ))
    }

    async fn member_update(
        &self,
        _r: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(
            "Cluster.MemberUpdate is not served by cellplane yet",
        ))
    }

    async fn member_promote(
        &self,
        _r: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented(
            "Cluster.MemberPromote is not served by cellplane yet",
        ))
    }
}
