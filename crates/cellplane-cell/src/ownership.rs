//! The cell's Ownership service: operators push the cell map to the cell, and
//! the member refuses tenants the map sends elsewhere (the checks themselves are
//! `cellplane_storage::Ownership`'s, at apply for writes and here, after the
//! read barrier, for linearizable reads and watch creates). The tenant mover's
//! steps (fence, unfence, expect, forget) are Raft commands too, and its writes
//! of a moving tenant carry [`MOVE_TENANT_METADATA`].

use std::sync::Arc;

use cellplane_proto::cell::ownership_server::Ownership;
use cellplane_proto::cell::{
    LearnMapRequest, LearnMapResponse, LeaseDeadlines, LeaseDeadlinesResponse, Move, MoveStep,
    MoveStepResponse, ShowOwnershipRequest, ShowOwnershipResponse,
};
use cellplane_storage::{Command, KvError};
use tonic::{Request, Response, Status};

use crate::error::{kv_status, node_status, read_status};
use crate::node::{ProposeError, Shared};
use crate::service::serve_request;

/// The metadata on a KV request that makes it the tenant mover's write of that
/// tenant (allowed only while the tenant moves in, or, for deletes, once the cell
/// no longer serves it; see `cellplane_storage::Ownership::check_mover`).
use cellplane_map::MOVE_TENANT_METADATA;

pub struct OwnershipService {
    shared: Arc<Shared>,
}

impl OwnershipService {
    pub fn new(shared: Arc<Shared>) -> OwnershipService {
        OwnershipService { shared }
    }

    /// Proposes an ownership change; answers the revision it took effect at.
    async fn change(&self, method: &'static str, cmd: Command) -> Result<i64, Status> {
        let s = &self.shared;
        serve_request(s, method, async {
            s.refuse_learner()?;
            match s.propose_with(cmd, true).await {
                Ok((resp, _)) => match resp.outcome {
                    Some(Ok(_)) => Ok(resp.revision),
                    Some(Err(e)) => Err(kv_status(e)),
                    None => Err(Status::internal("apply produced no result")),
                },
                Err(ProposeError::Forward(leader)) => Err(Status::unavailable(format!(
                    "etcdserver: not leader (member {leader} leads); retry"
                ))),
                Err(ProposeError::Failed(e)) => Err(node_status(e)),
            }
        })
        .await
        .map(Response::into_inner)
    }

    async fn step(
        &self,
        method: &'static str,
        r: Request<MoveStep>,
        cmd: impl FnOnce(String, MoveStep) -> Command,
    ) -> Result<Response<MoveStepResponse>, Status> {
        let step = r.into_inner();
        cellplane_security::check_tenant_name(&step.tenant)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cmd = cmd(self.shared.config.cell.name.clone(), step);
        let revision = self.change(method, cmd).await?;
        Ok(Response::new(MoveStepResponse { revision }))
    }
}

/// Refuses a linearizable read of `[key, range_end)` (or a watch create) for a
/// tenant this member's applied state says the cell does not own. Call it after
/// the read barrier, so the ownership seen is at least as new as the read.
pub(crate) fn check_read(s: &Shared, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
    s.ownership
        .borrow()
        .check_read(key, range_end)
        .map_err(kv_status)
}

/// `cmd`, as the mover's write of the tenant `request` names in
/// [`MOVE_TENANT_METADATA`], if it names one.
pub(crate) fn as_mover<T>(request: &Request<T>, cmd: Command) -> Result<Command, Status> {
    Ok(moving(mover_tenant(request.metadata())?, cmd))
}

/// `cmd`, as the mover's write of `tenant` if one is named.
pub(crate) fn moving(tenant: Option<String>, cmd: Command) -> Command {
    match tenant {
        Some(tenant) => Command::Moving {
            tenant,
            cmd: Box::new(cmd),
        },
        None => cmd,
    }
}

/// The tenant of [`MOVE_TENANT_METADATA`], if set.
pub(crate) fn mover_tenant(meta: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(v) = meta.get(MOVE_TENANT_METADATA) else {
        return Ok(None);
    };
    let tenant = v
        .to_str()
        .map_err(|_| Status::invalid_argument(format!("`{MOVE_TENANT_METADATA}` must be ASCII")))?;
    cellplane_security::check_tenant_name(tenant)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(Some(tenant.to_string()))
}

/// Copies [`MOVE_TENANT_METADATA`] onto a request forwarded to the leader.
pub(crate) fn keep_mover<T>(mut forwarded: Request<T>, tenant: Option<&str>) -> Request<T> {
    if let Some(v) = tenant.and_then(|t| t.parse().ok()) {
        forwarded.metadata_mut().insert(MOVE_TENANT_METADATA, v);
    }
    forwarded
}

#[tonic::async_trait]
impl Ownership for OwnershipService {
    async fn learn_map(
        &self,
        r: Request<LearnMapRequest>,
    ) -> Result<Response<LearnMapResponse>, Status> {
        let s = &self.shared;
        let map = r.into_inner().map;
        // The map is one Raft entry: it fits the cell's request limit.
        let max = s.limits.max_request_bytes;
        if map.len() > max {
            return Err(kv_status(KvError::RequestTooLarge { max }));
        }
        let cmd = Command::LearnMap {
            cell: s.config.cell.name.clone(),
            map,
        };
        self.change("LearnMap", cmd).await?;
        let version = s.ownership.borrow().map_version().unwrap_or(0);
        tracing::info!(version, "learned the cell map");
        Ok(Response::new(LearnMapResponse {
            cell: s.config.cell.name.clone(),
            version,
        }))
    }

    async fn show(
        &self,
        _r: Request<ShowOwnershipRequest>,
    ) -> Result<Response<ShowOwnershipResponse>, Status> {
        let s = &self.shared;
        serve_request(s, "ShowOwnership", async {
            let mut applied = s.applied.clone();
            s.barrier
                .wait_linearizable(&mut applied)
                .await
                .map_err(read_status)?;
            let own = s.ownership.borrow().clone();
            let version = own.map_version();
            let (fenced, incoming) = own.moves();
            let list = |m: Vec<(String, cellplane_storage::Destination)>| {
                m.into_iter()
                    .map(|(tenant, d)| Move {
                        tenant,
                        cell: d.cell,
                        version: d.version,
                    })
                    .collect()
            };
            Ok(ShowOwnershipResponse {
                cell: s.config.cell.name.clone(),
                learned: version.is_some(),
                version: version.unwrap_or(0),
                fenced: list(fenced),
                incoming: list(incoming),
            })
        })
        .await
    }

    async fn fence(&self, r: Request<MoveStep>) -> Result<Response<MoveStepResponse>, Status> {
        self.step("Fence", r, |cell, m| Command::Fence {
            cell,
            tenant: m.tenant,
            to: m.cell,
            version: m.version,
        })
        .await
    }

    async fn unfence(&self, r: Request<MoveStep>) -> Result<Response<MoveStepResponse>, Status> {
        self.step("Unfence", r, |_, m| Command::Unfence { tenant: m.tenant })
            .await
    }

    async fn expect(&self, r: Request<MoveStep>) -> Result<Response<MoveStepResponse>, Status> {
        self.step("Expect", r, |cell, m| Command::Expect {
            cell,
            tenant: m.tenant,
            from: m.cell,
            version: m.version,
        })
        .await
    }

    async fn forget(&self, r: Request<MoveStep>) -> Result<Response<MoveStepResponse>, Status> {
        self.step("Forget", r, |_, m| Command::Forget { tenant: m.tenant })
            .await
    }

    async fn set_lease_deadlines(
        &self,
        r: Request<LeaseDeadlines>,
    ) -> Result<Response<LeaseDeadlinesResponse>, Status> {
        let s = &self.shared;
        let req = r.into_inner();
        cellplane_security::check_tenant_name(&req.tenant)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if s.lessor.loaded_term().is_none() {
            return Ok(Response::new(LeaseDeadlinesResponse::default()));
        }
        let mut set = 0u32;
        for l in &req.leases {
            // Only the moving tenant's leases: the call cannot shorten another's.
            let owned = s
                .reader
                .lease(l.id)
                .map_err(kv_status)?
                .is_some_and(|rec| rec.owned_by(&req.tenant));
            let remaining = std::time::Duration::from_millis(l.remaining_ms.max(0) as u64);
            if owned && s.lessor.set_remaining(l.id, remaining) {
                set += 1;
            }
        }
        Ok(Response::new(LeaseDeadlinesResponse { leading: true, set }))
    }
}
