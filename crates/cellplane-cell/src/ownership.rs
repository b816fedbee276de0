//! The cell's Ownership service: operators push the cell map to the cell, and
//! the member refuses tenants the map sends elsewhere (the checks themselves are
//! `cellplane_storage::Ownership`'s, at apply for writes and here, after the
//! read barrier, for linearizable reads and watch creates).

use std::sync::Arc;

use cellplane_proto::cell::ownership_server::Ownership;
use cellplane_proto::cell::{
    LearnMapRequest, LearnMapResponse, ShowOwnershipRequest, ShowOwnershipResponse,
};
use cellplane_storage::{Command, KvError};
use tonic::{Request, Response, Status};

use crate::error::{kv_status, node_status, read_status};
use crate::node::{ProposeError, Shared};
use crate::service::serve_request;

pub struct OwnershipService {
    shared: Arc<Shared>,
}

impl OwnershipService {
    pub fn new(shared: Arc<Shared>) -> OwnershipService {
        OwnershipService { shared }
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

#[tonic::async_trait]
impl Ownership for OwnershipService {
    async fn learn_map(
        &self,
        r: Request<LearnMapRequest>,
    ) -> Result<Response<LearnMapResponse>, Status> {
        let s = &self.shared;
        let map = r.into_inner().map;
        serve_request(s, "LearnMap", async {
            // The map is one Raft entry: it fits the cell's request limit.
            let max = s.limits.max_request_bytes;
            if map.len() > max {
                return Err(kv_status(KvError::RequestTooLarge { max }));
            }
            s.refuse_learner()?;
            let cmd = Command::LearnMap {
                cell: s.config.cell.name.clone(),
                map,
            };
            match s.propose_with(cmd, true).await {
                Ok((resp, _)) => match resp.outcome {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(kv_status(e)),
                    None => return Err(Status::internal("apply produced no result")),
                },
                Err(ProposeError::Forward(leader)) => {
                    return Err(Status::unavailable(format!(
                        "etcdserver: not leader (member {leader} leads); retry"
                    )));
                }
                Err(ProposeError::Failed(e)) => return Err(node_status(e)),
            }
            let version = s.ownership.borrow().map_version().unwrap_or(0);
            tracing::info!(version, "learned the cell map");
            Ok(LearnMapResponse {
                cell: s.config.cell.name.clone(),
                version,
            })
        })
        .await
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
            let version = s.ownership.borrow().map_version();
            Ok(ShowOwnershipResponse {
                cell: s.config.cell.name.clone(),
                learned: version.is_some(),
                version: version.unwrap_or(0),
            })
        })
        .await
    }
}
