//! The etcd Lease API on the router.
//!
//! A lease lives in one cell. Grant has no key, so it goes to the cell of the
//! tenant named in the `cellplane-tenant` metadata. The other calls carry only a
//! lease ID: IDs chosen by a cell carry that cell's tag (`cellplane_map::lease_tag`),
//! so the router finds the cell from the ID alone and a client's keep-alives need
//! no metadata. Leases without metadata lists every cell's leases.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_map::{CellMap, lease_tag, lease_tag_of};
use cellplane_proto::etcdserverpb::lease_server::Lease;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::cell_pool::{CellPool, KvCall, KvReply};
use crate::map_source::MapHolder;
use crate::server::{Pools, RouterKv, unexpected, with_cell};
use crate::tenant::TENANT_METADATA;

/// Keep-alive answers buffered per client stream; when full, the router stops
/// reading that client's keep-alives until it reads.
const KEEPALIVE_BUFFER: usize = 16;

pub struct RouterLease {
    kv: Arc<RouterKv>,
}

impl RouterLease {
    pub fn new(maps: MapHolder, pools: Arc<Pools>) -> RouterLease {
        RouterLease {
            kv: Arc::new(RouterKv::new(maps, pools)),
        }
    }
}

/// The cell whose tag lease `id` carries, if the map has one.
fn cell_of_lease(map: &CellMap, id: i64) -> Option<String> {
    let tag = lease_tag_of(id);
    map.cells
        .iter()
        .find(|c| lease_tag(&c.name) == tag)
        .map(|c| c.name.clone())
}

fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

impl RouterKv {
    /// The pool of the cell holding lease `id`, or `None` when no cell in the map
    /// carries its tag (the lease cannot exist anywhere this router knows).
    fn route_lease(&self, id: i64) -> Result<Option<CellPool>, Status> {
        let active = self.maps.current();
        let Some(cell) = cell_of_lease(&active.map, id) else {
            return Ok(None);
        };
        self.pools.get(&cell).map(Some).ok_or_else(|| {
            Status::unavailable(format!(
                "cell {cell}: no connection pool (endpoints invalid?)"
            ))
        })
    }
}

async fn keep_alive_one(
    kv: &RouterKv,
    req: LeaseKeepAliveRequest,
) -> Result<LeaseKeepAliveResponse, Status> {
    let id = req.id;
    let Some(pool) = kv.route_lease(id)? else {
        // etcd's answer for a lease that does not exist: TTL 0.
        return Ok(LeaseKeepAliveResponse {
            header: Some(ResponseHeader::default()),
            id,
            ttl: 0,
        });
    };
    match kv.forward(pool, KvCall::LeaseKeepAlive(req)).await? {
        (KvReply::LeaseKeepAlive(r), _) => Ok(r),
        _ => Err(unexpected()),
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for RouterLease {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        if !meta.contains_key(TENANT_METADATA) {
            return Err(Status::invalid_argument(
                "a lease lives in one cell and a grant names no key: set the \
                 `cellplane-tenant` metadata to the tenant whose keys will use the lease \
                 (`cellplane lease grant --tenant T`), or grant it on the cell directly",
            ));
        }
        let pool = self.kv.route(&meta, &[])?;
        if req.id != 0 && lease_tag_of(req.id) != lease_tag(&pool.inner.name) {
            return Err(Status::invalid_argument(format!(
                "lease ID {:#x} does not carry cell {}'s tag {:#x} in bits 48..63, so the \
                 router could not route its keep-alives; use ID 0 to let the cell choose",
                req.id,
                pool.inner.name,
                lease_tag(&pool.inner.name)
            )));
        }
        match self.kv.forward(pool, KvCall::LeaseGrant(req)).await? {
            (KvReply::LeaseGrant(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let req = request.into_inner();
        let pool = self.kv.route_lease(req.id)?.ok_or_else(lease_not_found)?;
        match self.kv.forward(pool, KvCall::LeaseRevoke(req)).await? {
            (KvReply::LeaseRevoke(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_BUFFER);
        let kv = self.kv.clone();
        let shutdown = kv.pools.shutdown_token();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = incoming.next() => n,
                };
                let Some(Ok(req)) = next else { return };
                let resp = keep_alive_one(&kv, req).await;
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
        let req = request.into_inner();
        let Some(pool) = self.kv.route_lease(req.id)? else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: Some(ResponseHeader::default()),
                id: req.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        match self.kv.forward(pool, KvCall::LeaseTimeToLive(req)).await? {
            (KvReply::LeaseTimeToLive(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        if meta.contains_key(TENANT_METADATA) {
            let pool = self.kv.route(&meta, &[])?;
            return match self.kv.forward(pool, KvCall::LeaseLeases(req)).await? {
                (KvReply::LeaseLeases(r), cell) => Ok(with_cell(r, &cell)),
                _ => Err(unexpected()),
            };
        }
        // Every cell's leases: an operator's listing. A cell that cannot answer
        // fails the listing with its name rather than return a partial list.
        let mut all = LeaseLeasesResponse {
            header: Some(ResponseHeader::default()),
            leases: Vec::new(),
        };
        for pool in self.kv.pools.all() {
            match self.kv.forward(pool, KvCall::LeaseLeases(req)).await? {
                (KvReply::LeaseLeases(r), _) => all.leases.extend(r.leases),
                _ => return Err(unexpected()),
            }
        }
        Ok(Response::new(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_id_finds_the_cell_whose_tag_it_carries() {
        let map = CellMap::from_toml(
            r#"
version = 1
buckets = 8
[[cells]]
name = "alpha"
endpoints = ["127.0.0.1:1"]
[[cells]]
name = "beta"
endpoints = ["127.0.0.1:2"]
[[ranges]]
from = 0
to = 7
cell = "alpha"
"#,
        )
        .unwrap();
        let id = ((lease_tag("beta") << cellplane_map::LEASE_TAG_SHIFT) | 12345) as i64;
        assert_eq!(cell_of_lease(&map, id).as_deref(), Some("beta"));
        let id = ((lease_tag("alpha") << cellplane_map::LEASE_TAG_SHIFT) | 1) as i64;
        assert_eq!(cell_of_lease(&map, id).as_deref(), Some("alpha"));
        let unknown = (lease_tag("alpha") ^ lease_tag("beta") ^ 0x1234) as i64;
        let unknown = unknown << cellplane_map::LEASE_TAG_SHIFT;
        if lease_tag_of(unknown) != lease_tag("alpha") && lease_tag_of(unknown) != lease_tag("beta")
        {
            assert_eq!(cell_of_lease(&map, unknown), None);
        }
    }
}
