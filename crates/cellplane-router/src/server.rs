//! The etcd KV API on the router: find the tenant, find its cell, forward.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::kv_server::Kv;
use cellplane_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse, request_op,
};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::cell_pool::{CellPool, KvCall, KvReply, PoolSettings};
use crate::map_source::MapHolder;
use crate::tenant::{TENANT_METADATA, TenantError, tenant_of};

/// The response metadata that names the cell that served a request.
pub const CELL_METADATA: &str = "cellplane-cell";

/// A cell's pool, the endpoints it was built for, and the stop of its prober.
type PoolEntry = (Vec<String>, CellPool, CancellationToken);

/// The pools of every cell in the map in force, rebuilt when the map changes.
pub struct Pools {
    by_cell: RwLock<HashMap<String, PoolEntry>>,
    settings: PoolSettings,
    max_message_bytes: usize,
    shutdown: CancellationToken,
}

impl Pools {
    pub fn new(
        settings: PoolSettings,
        max_message_bytes: usize,
        shutdown: CancellationToken,
    ) -> Arc<Pools> {
        Arc::new(Pools {
            by_cell: RwLock::default(),
            settings,
            max_message_bytes,
            shutdown,
        })
    }

    /// Makes the pools match `map`: new cells get a pool and a prober; cells whose
    /// endpoints changed get fresh ones; cells gone from the map are stopped.
    pub fn reconcile(&self, map: &CellMap) {
        let mut by_cell = self.by_cell.write().unwrap_or_else(|p| p.into_inner());
        by_cell.retain(|name, (_, _, stop)| {
            let keep = map.cells.iter().any(|c| &c.name == name);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for cell in &map.cells {
            if let Some((eps, _, stop)) = by_cell.get(&cell.name) {
                if *eps == cell.endpoints {
                    continue;
                }
                stop.cancel();
            }
            match CellPool::new(
                &cell.name,
                &cell.endpoints,
                &self.settings,
                self.max_message_bytes,
            ) {
                Ok(pool) => {
                    let stop = self.shutdown.child_token();
                    tokio::spawn(pool.clone().probe_loop(stop.clone()));
                    by_cell.insert(cell.name.clone(), (cell.endpoints.clone(), pool, stop));
                }
                Err(e) => {
                    tracing::error!(cell = %cell.name, error = %e, "cannot build the cell's pool")
                }
            }
        }
    }

    /// Cancelled when the router shuts down (ends long-lived streams).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn get(&self, cell: &str) -> Option<CellPool> {
        let by_cell = self.by_cell.read().unwrap_or_else(|p| p.into_inner());
        by_cell.get(cell).map(|(_, p, _)| p.clone())
    }

    pub fn all(&self) -> Vec<CellPool> {
        let by_cell = self.by_cell.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = by_cell.values().map(|(_, p, _)| p.clone()).collect();
        v.sort_by(|a, b| a.inner.name.cmp(&b.inner.name));
        v
    }
}

pub struct RouterKv {
    pub(crate) maps: MapHolder,
    pub(crate) pools: Arc<Pools>,
}

impl RouterKv {
    pub fn new(maps: MapHolder, pools: Arc<Pools>) -> RouterKv {
        RouterKv { maps, pools }
    }

    /// The cell pool for a request touching `ranges`.
    pub(crate) fn route(
        &self,
        meta: &MetadataMap,
        ranges: &[(&[u8], &[u8])],
    ) -> Result<CellPool, Status> {
        let explicit = match meta.get(TENANT_METADATA) {
            Some(v) => Some(v.to_str().map_err(|_| {
                Status::invalid_argument("`cellplane-tenant` metadata must be ASCII")
            })?),
            None => None,
        };
        let mut tenant: Option<String> = None;
        for (key, end) in ranges {
            let t = tenant_of(explicit, key, end).map_err(tenant_status)?;
            match &tenant {
                Some(prev) if *prev != t => {
                    return Err(tenant_status(TenantError::SpansTenants {
                        detail: format!("tenants {prev:?} and {t:?}"),
                    }));
                }
                _ => tenant = Some(t),
            }
        }
        let tenant = match (tenant, explicit) {
            (Some(t), _) => t,
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(Status::invalid_argument(
                    "the request names no key and no `cellplane-tenant` metadata: the router \
                     cannot tell which cell it is for",
                ));
            }
        };
        let active = self.maps.current();
        let cell = active.map.cell_for(&tenant).ok_or_else(|| {
            Status::internal(format!(
                "the cell map (version {}) has no cell for tenant {tenant:?}",
                active.map.version
            ))
        })?;
        self.pools.get(&cell.name).ok_or_else(|| {
            Status::unavailable(format!(
                "cell {}: no connection pool (endpoints invalid?)",
                cell.name
            ))
        })
    }

    pub(crate) async fn forward(
        &self,
        pool: CellPool,
        call: KvCall,
    ) -> Result<(KvReply, String), Status> {
        let name = pool.inner.name.clone();
        let reply = pool.call(call).await.map_err(|mut s| {
            if let Ok(v) = MetadataValue::try_from(name.as_str()) {
                s.metadata_mut().insert(CELL_METADATA, v);
            }
            s
        })?;
        Ok((reply, name))
    }
}

fn tenant_status(e: TenantError) -> Status {
    match e {
        TenantError::SpansTenants { .. } => Status::failed_precondition(e.to_string()),
        TenantError::NoTenant { .. } | TenantError::BadMetadata(_) => {
            Status::invalid_argument(e.to_string())
        }
    }
}

pub(crate) fn with_cell<T>(body: T, cell: &str) -> Response<T> {
    let mut r = Response::new(body);
    if let Ok(v) = MetadataValue::try_from(cell) {
        r.metadata_mut().insert(CELL_METADATA, v);
    }
    r
}

/// Every key range a txn touches, compares and ops, nested txns included.
fn txn_ranges(t: &TxnRequest, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    for c in &t.compare {
        out.push((c.key.clone(), c.range_end.clone()));
    }
    for op in t.success.iter().chain(&t.failure) {
        op_ranges(op, out);
    }
}

fn op_ranges(op: &RequestOp, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => {
            out.push((r.key.clone(), r.range_end.clone()))
        }
        Some(request_op::Request::RequestPut(p)) => out.push((p.key.clone(), vec![])),
        Some(request_op::Request::RequestDeleteRange(d)) => {
            out.push((d.key.clone(), d.range_end.clone()))
        }
        Some(request_op::Request::RequestTxn(t)) => txn_ranges(t, out),
        None => {}
    }
}

pub(crate) fn unexpected() -> Status {
    Status::internal("the cell answered with a response of another kind")
}

#[tonic::async_trait]
impl Kv for RouterKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &[(&req.key, &req.range_end)])?;
        match self.forward(pool, KvCall::Range(req)).await? {
            (KvReply::Range(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &[(&req.key, &[])])?;
        match self.forward(pool, KvCall::Put(req)).await? {
            (KvReply::Put(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &[(&req.key, &req.range_end)])?;
        match self.forward(pool, KvCall::DeleteRange(req)).await? {
            (KvReply::DeleteRange(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let mut ranges = Vec::new();
        txn_ranges(&req, &mut ranges);
        let borrowed: Vec<(&[u8], &[u8])> = ranges
            .iter()
            .map(|(k, e)| (k.as_slice(), e.as_slice()))
            .collect();
        let pool = self.route(&meta, &borrowed)?;
        match self.forward(pool, KvCall::Txn(req)).await? {
            (KvReply::Txn(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        // A compaction has no key: it compacts the cell of the tenant named in the
        // metadata (and so every tenant of that cell).
        let pool = self.route(&meta, &[])?;
        match self.forward(pool, KvCall::Compact(req)).await? {
            (KvReply::Compact(r), cell) => Ok(with_cell(r, &cell)),
            _ => Err(unexpected()),
        }
    }
}
