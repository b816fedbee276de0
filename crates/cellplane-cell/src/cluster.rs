//! etcd's Cluster service on a member: the cell's membership, changed through
//! openraft (learners added with `add_learner`, voters changed by joint
//! consensus with `change_membership`).
//!
//! The cell file stays the source of truth for addresses: a member is added by
//! first writing its `[[members]]` entry (id, client, peer, http) into
//! `cells/<cell>.toml`, then calling MemberAdd with its peer URL. The leader reads
//! the file again and takes the member's id and addresses from it, so
//! `etcdctl member add NAME --peer-urls=http://HOST:PORT [--learner]` works
//! unchanged and ids stay the small numbers the files use. Every change is made
//! on the leader; a follower forwards the call there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cellplane_proto::etcdserverpb::cluster_client::ClusterClient;
use cellplane_proto::etcdserverpb::cluster_server::Cluster;
use cellplane_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, ResponseHeader,
};
use cellplane_storage::NodeId;
use openraft::ChangeMembers;
use tonic::{Request, Response, Status};

use crate::config::CellDef;
use crate::node::Shared;

/// A learner may be promoted once it holds this share of the leader's log
/// (etcd's rule: 90 %).
const PROMOTE_READY_PERCENT: u64 = 90;

pub struct ClusterService {
    shared: Arc<Shared>,
}

impl ClusterService {
    pub fn new(shared: Arc<Shared>) -> ClusterService {
        ClusterService { shared }
    }

    /// The member list as etcd shows it, from the membership in force.
    fn members(&self) -> Vec<Member> {
        let stored = self.shared.membership();
        let membership = stored.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                name: node.name.clone(),
                peer_ur_ls: vec![format!("http://{}", node.peer_addr)],
                client_ur_ls: if node.client_addr.is_empty() {
                    vec![]
                } else {
                    vec![format!("http://{}", node.client_addr)]
                },
                is_learner: !voters.contains(id),
            })
            .collect()
    }

    fn header(&self) -> ResponseHeader {
        let revision = self.shared.applied.borrow().revision;
        self.shared.header(revision)
    }

    /// The leader, if it is another member: the call is forwarded there.
    fn leader_elsewhere(&self) -> Result<Option<NodeId>, Status> {
        let s = &self.shared;
        match s.raft.metrics().borrow().current_leader {
            Some(l) if l == s.id => Ok(None),
            Some(l) => Ok(Some(l)),
            None => Err(Status::unavailable("etcdserver: no leader")),
        }
    }

    fn leader_client(
        &self,
        leader: NodeId,
    ) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        let channel = self
            .shared
            .channel(leader)
            .map_err(|e| Status::unavailable(format!("cannot reach the leader {leader}: {e}")))?;
        Ok(ClusterClient::new(channel))
    }

    async fn change(
        &self,
        change: ChangeMembers<NodeId, cellplane_storage::Member>,
    ) -> Result<(), Status> {
        self.shared
            .raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(membership_status)
    }
}

/// openraft's refusal as etcd would word it.
fn membership_status<E: std::fmt::Display>(e: E) -> Status {
    let text = e.to_string();
    Status::failed_precondition(format!("etcdserver: membership change refused: {text}"))
}

/// `http://host:port` (or `host:port`) → `host:port`.
fn peer_addr(urls: &[String]) -> Result<String, Status> {
    let [url] = urls else {
        return Err(Status::invalid_argument(
            "etcdserver: give exactly one peer URL (a member has one peer address)",
        ));
    };
    let hp = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url)
        .trim_end_matches('/');
    hp.parse::<crate::config::HostPort>()
        .map(|h| h.to_string())
        .map_err(|e| Status::invalid_argument(format!("etcdserver: bad peer URL {url}: {e}")))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _r: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: Some(self.header()),
            members: self.members(),
        }))
    }

    /// Adds the member whose peer address the cell file lists, as a learner or
    /// (etcd's default) a voter. A voter that is not running yet counts in the
    /// quorum at once, so prefer `--learner`, then promote.
    async fn member_add(
        &self,
        r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        if let Some(leader) = self.leader_elsewhere()? {
            return self.leader_client(leader)?.member_add(r.into_inner()).await;
        }
        let r = r.into_inner();
        let peer = peer_addr(&r.peer_ur_ls)?;
        let source = &self.shared.config.cell.source;
        let def = CellDef::load(source).map_err(|e| {
            Status::failed_precondition(format!("cannot read the cell file again: {e}"))
        })?;
        let Some(def) = def.members.iter().find(|m| m.peer.to_string() == peer) else {
            return Err(Status::failed_precondition(format!(
                "no member of {} has peer address {peer}: add its [[members]] entry (id, client, \
                 peer, http) to the cell file first, then retry",
                source.display()
            )));
        };
        let current = self.members();
        if current.iter().any(|m| m.id == def.id) {
            return Err(Status::already_exists(
                "etcdserver: member ID already exist",
            ));
        }
        let wanted = format!("http://{peer}");
        if current.iter().any(|m| m.peer_ur_ls.contains(&wanted)) {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let node = cellplane_storage::Member {
            name: def
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.shared.config.cell.name, def.id)),
            client_addr: def.client.to_string(),
            peer_addr: peer,
        };
        self.shared
            .raft
            .add_learner(def.id, node.clone(), false)
            .await
            .map_err(membership_status)?;
        if !r.is_learner {
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([def.id])))
                .await?;
        }
        tracing::warn!(member = def.id, learner = r.is_learner, "member added");
        let members = self.members();
        let added = members.iter().find(|m| m.id == def.id).cloned();
        Ok(Response::new(MemberAddResponse {
            header: Some(self.header()),
            member: added,
            members,
        }))
    }

    async fn member_remove(
        &self,
        r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        if let Some(leader) = self.leader_elsewhere()? {
            return self
                .leader_client(leader)?
                .member_remove(r.into_inner())
                .await;
        }
        let id = r.into_inner().id;
        let current = self.members();
        let Some(member) = current.iter().find(|m| m.id == id) else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        let ids = BTreeSet::from([id]);
        if member.is_learner {
            self.change(ChangeMembers::RemoveNodes(ids)).await?;
        } else {
            if current.iter().filter(|m| !m.is_learner).count() == 1 {
                return Err(Status::failed_precondition(
                    "etcdserver: cannot remove the cell's last voting member",
                ));
            }
            self.change(ChangeMembers::RemoveVoters(ids)).await?;
        }
        tracing::warn!(member = id, "member removed");
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.header()),
            members: self.members(),
        }))
    }

    /// Changes a member's peer address (the cell file must say the same for
    /// the members started from it).
    async fn member_update(
        &self,
        r: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        if let Some(leader) = self.leader_elsewhere()? {
            return self
                .leader_client(leader)?
                .member_update(r.into_inner())
                .await;
        }
        let r = r.into_inner();
        let peer = peer_addr(&r.peer_ur_ls)?;
        let node = self
            .shared
            .membership()
            .membership()
            .get_node(&r.id)
            .cloned();
        let Some(mut node) = node else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        node.peer_addr = peer;
        self.change(ChangeMembers::SetNodes(BTreeMap::from([(r.id, node)])))
            .await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.header()),
            members: self.members(),
        }))
    }

    /// Makes a learner a voter, once it holds 90 % of the leader's log (etcd
    /// refuses earlier, with the same message).
    async fn member_promote(
        &self,
        r: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        if let Some(leader) = self.leader_elsewhere()? {
            return self
                .leader_client(leader)?
                .member_promote(r.into_inner())
                .await;
        }
        let id = r.into_inner().id;
        let Some(member) = self.members().into_iter().find(|m| m.id == id) else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        if !member.is_learner {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member",
            ));
        }
        let (last, matched) = {
            let m = self.shared.raft.metrics().borrow().clone();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map_or(0, |l| l.index);
            (m.last_log_index.unwrap_or(0), matched)
        };
        if matched * 100 < last * PROMOTE_READY_PERCENT {
            return Err(Status::failed_precondition(format!(
                "etcdserver: can only promote a learner member which is in sync with leader \
                 (it holds {matched} of {last} entries)"
            )));
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        tracing::warn!(member = id, "learner promoted");
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.header()),
            members: self.members(),
        }))
    }
}
