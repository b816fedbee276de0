//! The etcd Lease API on the router.
//!
//! A lease lives in one cell and belongs to the tenant that granted it (the cell
//! records the owner from the `cellplane-tenant` the router sends). Grant goes to
//! the cell of the caller's tenant. The other calls carry only a lease ID: for a
//! tenant they go to the tenant's cell (a lease moves with its tenant and keeps
//! its ID), and the cell answers only the owner (anyone else sees a lease that
//! does not exist). Unscoped (auth off, no tenant named) they go to the cell
//! whose tag the ID carries (`cellplane_map::lease_tag`, in every ID a cell
//! chooses); a cell holding a lease whose tenant moved away refuses it naming
//! the tenant and its cell, and the router retries there. A list names the
//! caller's tenant's leases; with auth off and no tenant named, every cell's (an
//! operator's view).

use std::pin::Pin;
use std::sync::Arc;

use cellplane_map::{lease_tag, lease_tag_of};
use cellplane_proto::etcdserverpb::lease_server::Lease;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::cell_client::CallKind;
use crate::core::{Caller, Core};
use crate::scope::{Action, Scope};

/// Keep-alive answers buffered per client stream; when full, the router stops
/// reading that client's keep-alives until it reads.
const KEEPALIVE_BUFFER: usize = 16;

const GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
const KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const TIME_TO_LIVE: &str = "/etcdserverpb.Lease/LeaseTimeToLive";
const LEASES: &str = "/etcdserverpb.Lease/LeaseLeases";

pub struct RouterLease {
    core: Arc<Core>,
}

impl RouterLease {
    pub fn new(core: Arc<Core>) -> RouterLease {
        RouterLease { core }
    }
}

fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

async fn keep_alive_one(
    core: &Core,
    caller: &Caller,
    req: LeaseKeepAliveRequest,
) -> Result<LeaseKeepAliveResponse, Status> {
    let Some(a) = core.admit_lease(caller, req.id)? else {
        // etcd's answer for a lease that does not exist: TTL 0.
        return Ok(LeaseKeepAliveResponse {
            header: Some(ResponseHeader::default()),
            id: req.id,
            ttl: 0,
        });
    };
    Ok(a.unary(KEEP_ALIVE, &req, CallKind::KEEP_ALIVE)
        .await?
        .into_inner())
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for RouterLease {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self.core.admit(&caller, Action::Tenant).map_err(|s| {
            if s.code() == tonic::Code::InvalidArgument {
                Status::invalid_argument(
                    "a lease lives in one cell and a grant names no key: authenticate as the \
                     tenant, or set the `cellplane-tenant` metadata (`cellplane lease grant \
                     --tenant T`)",
                )
            } else {
                s
            }
        })?;
        let tag = lease_tag(a.cell.name());
        if req.id != 0 && lease_tag_of(req.id) != tag {
            return Err(Status::invalid_argument(format!(
                "lease ID {:#x} does not carry cell {}'s tag {tag:#x} in bits 48..63, so the \
                 router could not route its keep-alives; use ID 0 to let the cell choose",
                req.id,
                a.cell.name(),
            )));
        }
        a.unary(GRANT, &req, CallKind::WRITE).await
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self
            .core
            .admit_lease(&caller, req.id)?
            .ok_or_else(lease_not_found)?;
        a.unary(REVOKE, &req, CallKind::WRITE).await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let caller = self.core.caller(&request)?;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_BUFFER);
        let core = self.core.clone();
        let shutdown = core.cells().shutdown_token();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = incoming.next() => n,
                };
                let Some(Ok(req)) = next else { return };
                let resp = keep_alive_one(&core, &caller, req).await;
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let Some(a) = self.core.admit_lease(&caller, req.id)? else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: Some(ResponseHeader::default()),
                id: req.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        a.unary(TIME_TO_LIVE, &req, CallKind::READ).await
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        if let Scope::Tenant(_) = self.core.tenant_scope(&caller)? {
            let a = self.core.admit(&caller, Action::Tenant)?;
            return a.unary(LEASES, &req, CallKind::READ).await;
        }
        // No tenant named, auth off (or an operator): every cell's leases. A cell
        // that cannot answer fails the listing with its name rather than return a
        // partial list.
        let mut all = LeaseLeasesResponse {
            header: Some(ResponseHeader::default()),
            leases: Vec::new(),
        };
        for cell in self.core.cells().all() {
            let r: LeaseLeasesResponse = cell.unary(LEASES, &req, CallKind::READ, None).await?;
            all.leases.extend(r.leases);
        }
        Ok(Response::new(all))
    }
}
