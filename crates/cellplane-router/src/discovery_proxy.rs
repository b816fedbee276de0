//! Service discovery through the router: each call is routed by its `namespace`
//! (the tenant) to that tenant's cell, like a key's first path segment routes a KV
//! request. Unary calls go to a healthy member of the cell with the pool's
//! request timeout; Resolve and Heartbeat (safe to repeat) are tried once more on
//! another member when the first is unreachable. A Watch is passed through as the
//! cell streams it: HTTP/2 flow control carries a slow client's back-pressure to
//! the cell, which ends the stream with the revision to resume from.

use std::sync::Arc;
use std::time::Duration;

use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::discovery::discovery_server::Discovery;
use cellplane_proto::discovery::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, ResolveRequest, ResolveResponse, WatchRequest, WatchResponse,
};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::cell_pool::CellPool;
use crate::map_source::MapHolder;
use crate::server::{CELL_METADATA, Pools};
use crate::tenant::TENANT_METADATA;

pub struct RouterDiscovery {
    maps: MapHolder,
    pools: Arc<Pools>,
    timeout: Duration,
}

impl RouterDiscovery {
    /// `timeout` bounds each unary call (the pools' `request_timeout_ms`).
    pub fn new(maps: MapHolder, pools: Arc<Pools>, timeout: Duration) -> RouterDiscovery {
        RouterDiscovery {
            maps,
            pools,
            timeout,
        }
    }

    /// The pool of the cell serving `namespace`.
    fn route(&self, meta: &MetadataMap, namespace: &str) -> Result<CellPool, Status> {
        if namespace.is_empty() {
            return Err(Status::invalid_argument(
                "namespace: is required (it is the tenant: the router routes by it)",
            ));
        }
        if let Some(t) = meta.get(TENANT_METADATA) {
            let t = t.to_str().map_err(|_| {
                Status::invalid_argument("`cellplane-tenant` metadata must be ASCII")
            })?;
            if t != namespace {
                return Err(Status::invalid_argument(format!(
                    "`cellplane-tenant` metadata says tenant {t:?}, the request's namespace is \
                     {namespace:?}: a namespace is the tenant it belongs to"
                )));
            }
        }
        let active = self.maps.current();
        let cell = active.map.cell_for(namespace).ok_or_else(|| {
            Status::internal(format!(
                "the cell map (version {}) has no cell for tenant {namespace:?}",
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

    fn client(pool: &CellPool) -> Result<DiscoveryClient<Channel>, Status> {
        let channel = pool.stream_channel().ok_or_else(|| {
            Status::unavailable(format!("cell {}: no reachable member", pool.inner.name))
        })?;
        Ok(DiscoveryClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    /// Calls the cell once (twice when `retry` and the first member was
    /// unreachable), within the timeout; errors name the cell.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        pool: CellPool,
        req: Req,
        retry: bool,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(DiscoveryClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let name = pool.inner.name.clone();
        let attempts = if retry { 2 } else { 1 };
        let mut result = Err(Status::unavailable("not tried"));
        for _ in 0..attempts {
            let client = Self::client(&pool)?;
            result = match tokio::time::timeout(self.timeout, call(client, req.clone())).await {
                Ok(r) => r,
                Err(_) => Err(Status::unavailable(format!(
                    "did not answer within {} ms",
                    self.timeout.as_millis()
                ))),
            };
            match &result {
                Err(s) if s.code() == Code::Unavailable => continue,
                _ => break,
            }
        }
        match result {
            Ok(mut r) => {
                if let Ok(v) = MetadataValue::try_from(name.as_str()) {
                    r.metadata_mut().insert(CELL_METADATA, v);
                }
                Ok(r)
            }
            Err(s) if s.code() == Code::Unavailable => {
                Err(Status::unavailable(format!("cell {name}: {}", s.message())))
            }
            Err(s) => Err(s),
        }
    }
}

#[tonic::async_trait]
impl Discovery for RouterDiscovery {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let ns = req.instance.as_ref().map_or("", |i| i.namespace.as_str());
        let pool = self.route(&meta, ns)?;
        // Not repeated: each Register grants a lease.
        self.unary(
            pool,
            req,
            false,
            |mut c, r| async move { c.register(r).await },
        )
        .await
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &req.namespace)?;
        self.unary(
            pool,
            req,
            false,
            |mut c, r| async move { c.deregister(r).await },
        )
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &req.namespace)?;
        self.unary(
            pool,
            req,
            true,
            |mut c, r| async move { c.heartbeat(r).await },
        )
        .await
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &req.namespace)?;
        self.unary(
            pool,
            req,
            true,
            |mut c, r| async move { c.resolve(r).await },
        )
        .await
    }

    type WatchStream = Streaming<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (meta, _, req) = request.into_parts();
        let pool = self.route(&meta, &req.namespace)?;
        let name = pool.inner.name.clone();
        let mut client = Self::client(&pool)?;
        let opened = tokio::time::timeout(self.timeout, client.watch(req)).await;
        let stream = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == Code::Unavailable => {
                return Err(Status::unavailable(format!("cell {name}: {}", s.message())));
            }
            Ok(Err(s)) => return Err(s),
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "cell {name}: the watch did not open within {} ms",
                    self.timeout.as_millis()
                )));
            }
        };
        let mut r = Response::new(stream);
        if let Ok(v) = MetadataValue::try_from(name.as_str()) {
            r.metadata_mut().insert(CELL_METADATA, v);
        }
        Ok(r)
    }
}
