//! Service discovery through the router: each call is admitted by its
//! `namespace`, which is the tenant (an authenticated tenant uses only its own),
//! and sent to that tenant's cell through the cell's bulkhead, timeout and retry
//! budget like any call. Resolve and Heartbeat (safe to repeat) may be sent again
//! to another member; Register and Deregister are not. A Watch is passed through
//! as the cell streams it, in one of the cell's stream slots: HTTP/2 flow control
//! carries a slow client's back-pressure to the cell, which ends the stream with
//! the revision to resume from.

use std::pin::Pin;
use std::sync::Arc;

use cellplane_proto::discovery::discovery_server::Discovery;
use cellplane_proto::discovery::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, ResolveRequest, ResolveResponse, WatchRequest, WatchResponse,
};
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::cell_client::{CallKind, StreamKind};
use crate::core::{Admitted, Core, with_cell};
use crate::scope::Action;

pub struct RouterDiscovery {
    core: Arc<Core>,
}

impl RouterDiscovery {
    pub fn new(core: Arc<Core>) -> RouterDiscovery {
        RouterDiscovery { core }
    }

    fn admit<T>(&self, request: &Request<T>, namespace: &str) -> Result<Admitted, Status> {
        let caller = self.core.caller(request)?;
        if namespace.is_empty() {
            return Err(Status::invalid_argument(
                "namespace: is required (it is the tenant: the router routes by it)",
            ));
        }
        self.core.admit(&caller, Action::Namespace(namespace))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Discovery for RouterDiscovery {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let ns = request
            .get_ref()
            .instance
            .as_ref()
            .map_or("", |i| i.namespace.as_str())
            .to_string();
        let a = self.admit(&request, &ns)?;
        // Not repeated: each Register grants a lease.
        a.unary(
            "/cellplane.discovery.v1.Discovery/Register",
            request.get_ref(),
            CallKind::WRITE,
        )
        .await
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let a = self.admit(&request, &request.get_ref().namespace)?;
        a.unary(
            "/cellplane.discovery.v1.Discovery/Deregister",
            request.get_ref(),
            CallKind::WRITE,
        )
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let a = self.admit(&request, &request.get_ref().namespace)?;
        a.unary(
            "/cellplane.discovery.v1.Discovery/Heartbeat",
            request.get_ref(),
            CallKind::READ,
        )
        .await
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let a = self.admit(&request, &request.get_ref().namespace)?;
        a.unary(
            "/cellplane.discovery.v1.Discovery/Resolve",
            request.get_ref(),
            CallKind::LOCAL_READ,
        )
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let a = self.admit(&request, &request.get_ref().namespace)?;
        let stream = a
            .open_stream(
                "/cellplane.discovery.v1.Discovery/Watch",
                StreamKind::ServerStreaming,
                request.get_ref(),
            )
            .await?;
        let out = futures::stream::unfold(stream, |mut s| async move {
            match s.message().await {
                Ok(Some(b)) => Some((
                    WatchResponse::decode(b)
                        .map_err(|e| Status::internal(format!("undecodable snapshot: {e}"))),
                    s,
                )),
                Ok(None) => None,
                Err(e) => Some((Err(e), s)),
            }
        });
        Ok(with_cell(Box::pin(out) as WatchStream, a.cell.name()))
    }
}
