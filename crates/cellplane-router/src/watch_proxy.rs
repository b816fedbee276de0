//! Watch through the router. A client's watch stream may hold watches of several
//! tenants; each create is routed by its tenant to that tenant's cell, over one
//! upstream watch stream per cell (opened on first use). The router assigns the
//! watch ids the client leaves to the server, so ids stay unique across cells. If
//! a cell's stream fails, only that cell's watches are canceled, each with the
//! revision to watch again from; the other cells' watches go on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::watch_server::Watch;
use cellplane_proto::etcdserverpb::{WatchRequest, WatchResponse, watch_request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::map_source::MapHolder;
use crate::server::Pools;
use crate::tenant::{TENANT_METADATA, tenant_of};

/// Responses buffered toward one client; a client that lets it fill has its
/// stream ended (the cells keep their own bounds behind it).
const CLIENT_BUFFER: usize = 1024;

/// Router-assigned watch ids start here, far from the small ids clients choose.
const FIRST_ROUTER_ID: i64 = 1 << 40;

pub struct RouterWatch {
    maps: MapHolder,
    pools: Arc<Pools>,
}

impl RouterWatch {
    pub fn new(maps: MapHolder, pools: Arc<Pools>) -> RouterWatch {
        RouterWatch { maps, pools }
    }
}

#[tonic::async_trait]
impl Watch for RouterWatch {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let explicit = match request.metadata().get(TENANT_METADATA) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        Status::invalid_argument("`cellplane-tenant` metadata must be ASCII")
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        let proxy = Proxy {
            maps: self.maps.clone(),
            pools: self.pools.clone(),
            explicit,
            tx,
            upstreams: HashMap::new(),
            owner: HashMap::new(),
            next_id: FIRST_ROUTER_ID,
        };
        tokio::spawn(proxy.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Watch id → the last revision its client was sent, per cell stream.
type Progress = Arc<Mutex<BTreeMap<i64, i64>>>;

struct Upstream {
    tx: mpsc::Sender<WatchRequest>,
}

struct Proxy {
    maps: MapHolder,
    pools: Arc<Pools>,
    explicit: Option<String>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    upstreams: HashMap<String, Upstream>,
    owner: HashMap<i64, String>,
    next_id: i64,
}

impl Proxy {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        while let Ok(Some(req)) = inbound.message().await {
            if self.handle(req).await.is_err() {
                return;
            }
        }
        // The client is gone: dropping the upstream senders ends the cell streams.
    }

    async fn reply(&self, r: WatchResponse) -> Result<(), ()> {
        self.tx.send(Ok(r)).await.map_err(|_| ())
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), ()> {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(mut c)) => {
                if c.watch_id == 0 {
                    c.watch_id = self.next_id;
                    self.next_id += 1;
                }
                let id = c.watch_id;
                let refuse = |reason: String| WatchResponse {
                    watch_id: id,
                    created: true,
                    canceled: true,
                    cancel_reason: reason,
                    ..Default::default()
                };
                let tenant = match tenant_of(self.explicit.as_deref(), &c.key, &c.range_end) {
                    Ok(t) => t,
                    Err(e) => return self.reply(refuse(e.to_string())).await,
                };
                let active = self.maps.current();
                let Some(cell) = active.map.cell_for(&tenant).map(|c| c.name.clone()) else {
                    return self
                        .reply(refuse(format!("no cell for tenant {tenant:?}")))
                        .await;
                };
                let up = match self.upstream(&cell).await {
                    Ok(up) => up,
                    Err(why) => return self.reply(refuse(why)).await,
                };
                self.owner.insert(id, cell);
                let req = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(c)),
                };
                if up.send(req).await.is_err() {
                    return self
                        .reply(refuse("the cell's watch stream closed; watch again".into()))
                        .await;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                let cell = self.owner.remove(&c.watch_id);
                let up = cell.and_then(|cell| self.upstreams.get(&cell).map(|u| u.tx.clone()));
                let forward = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CancelRequest(c)),
                };
                match up {
                    Some(up) if up.send(forward).await.is_ok() => Ok(()),
                    _ => {
                        self.reply(WatchResponse {
                            watch_id: c.watch_id,
                            canceled: true,
                            ..Default::default()
                        })
                        .await
                    }
                }
            }
            Some(watch_request::RequestUnion::ProgressRequest(p)) => {
                // Every cell answers for its own revision.
                for up in self.upstreams.values() {
                    let _ = up
                        .tx
                        .send(WatchRequest {
                            request_union: Some(watch_request::RequestUnion::ProgressRequest(p)),
                        })
                        .await;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The upstream watch stream to `cell`, opened on first use.
    async fn upstream(&mut self, cell: &str) -> Result<mpsc::Sender<WatchRequest>, String> {
        if let Some(u) = self.upstreams.get(cell).filter(|u| !u.tx.is_closed()) {
            return Ok(u.tx.clone());
        }
        let pool = self
            .pools
            .get(cell)
            .ok_or_else(|| format!("cell {cell}: no connection pool"))?;
        let channel = pool
            .stream_channel()
            .ok_or_else(|| format!("cell {cell}: no reachable member"))?;
        let (up_tx, up_rx) = mpsc::channel(64);
        let responses = WatchClient::new(channel)
            .watch(ReceiverStream::new(up_rx))
            .await
            .map_err(|s| format!("cell {cell}: {}", s.message()))?
            .into_inner();
        let progress: Progress = Arc::default();
        tokio::spawn(pump(cell.to_string(), responses, self.tx.clone(), progress));
        self.upstreams
            .insert(cell.to_string(), Upstream { tx: up_tx.clone() });
        Ok(up_tx)
    }
}

/// Copies a cell's watch responses to the client; if the cell's stream fails,
/// cancels that cell's watches with the revision to watch again from.
async fn pump(
    cell: String,
    mut responses: Streaming<WatchResponse>,
    client: mpsc::Sender<Result<WatchResponse, Status>>,
    progress: Progress,
) {
    let failure = loop {
        match responses.message().await {
            Ok(Some(r)) => {
                {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    let rev = r.header.as_ref().map_or(0, |h| h.revision);
                    if r.canceled {
                        p.remove(&r.watch_id);
                    } else if r.created || !r.events.is_empty() {
                        let e = p.entry(r.watch_id).or_insert(rev);
                        *e = (*e).max(rev);
                    }
                }
                if client.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break "the cell ended the watch stream".to_string(),
            Err(s) => break s.message().to_string(),
        }
    };
    let watches = std::mem::take(&mut *progress.lock().unwrap_or_else(|e| e.into_inner()));
    for (id, last) in watches {
        let _ = client
            .send(Ok(WatchResponse {
                watch_id: id,
                canceled: true,
                cancel_reason: format!(
                    "cell {cell} watch stream failed ({failure}); watch again from revision {}",
                    last + 1
                ),
                ..Default::default()
            }))
            .await;
    }
}
