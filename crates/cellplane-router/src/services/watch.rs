//! Watch through the router. A client's watch stream may hold watches of several
//! tenants (auth off; an authenticated tenant has only its own); each create is
//! admitted by the routing core like any request (its range must lie in the
//! tenant's namespace) and sent to the tenant's cell, over one upstream watch
//! stream per cell opened on first use (each takes one of the cell's stream
//! slots). The router assigns the watch ids the client leaves to the server, so
//! ids stay unique across cells. If a cell's stream fails, only that cell's
//! watches are canceled, each with the revision to watch again from; the other
//! cells' watches go on. Everything ends when the router shuts down.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cellplane_proto::etcdserverpb::watch_server::Watch;
use cellplane_proto::etcdserverpb::{WatchRequest, WatchResponse, watch_request};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::cell_client::{CellStream, StreamKind};
use crate::core::{Caller, Core};
use crate::scope::Action;

/// Responses buffered toward one client; a client that lets it fill has its
/// stream ended (the cells keep their own bounds behind it).
const CLIENT_BUFFER: usize = 1024;

/// Router-assigned watch ids start here, far from the small ids clients choose.
const FIRST_ROUTER_ID: i64 = 1 << 40;

/// Most watches one client stream may hold at once (etcd has no limit; a bound
/// keeps one stream's bookkeeping finite).
const MAX_WATCHES_PER_STREAM: usize = 100_000;

const WATCH: &str = "/etcdserverpb.Watch/Watch";

pub struct RouterWatch {
    core: Arc<Core>,
}

impl RouterWatch {
    pub fn new(core: Arc<Core>) -> RouterWatch {
        RouterWatch { core }
    }
}

#[tonic::async_trait]
impl Watch for RouterWatch {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.core.caller(&request)?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        let proxy = Proxy {
            core: self.core.clone(),
            caller,
            tx,
            upstreams: HashMap::new(),
            owner: HashMap::new(),
            next_id: FIRST_ROUTER_ID,
        };
        let shutdown = self.core.cells().shutdown_token();
        tokio::spawn(proxy.run(inbound, shutdown));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Watch id → the last revision its client was sent, per cell stream.
type Progress = Arc<Mutex<BTreeMap<i64, i64>>>;

struct Proxy {
    core: Arc<Core>,
    caller: Caller,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    /// Senders on each cell's upstream stream.
    upstreams: HashMap<String, mpsc::Sender<Bytes>>,
    owner: HashMap<i64, String>,
    next_id: i64,
}

fn request(u: watch_request::RequestUnion) -> Bytes {
    WatchRequest {
        request_union: Some(u),
    }
    .encode_to_vec()
    .into()
}

impl Proxy {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, shutdown: CancellationToken) {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = inbound.message() => m,
            };
            let Ok(Some(req)) = next else { return };
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
        use watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                let up = self
                    .owner
                    .remove(&c.watch_id)
                    .and_then(|cell| self.upstreams.get(&cell).cloned());
                let id = c.watch_id;
                match up {
                    Some(up)
                        if up
                            .send(request(RequestUnion::CancelRequest(c)))
                            .await
                            .is_ok() =>
                    {
                        Ok(())
                    }
                    _ => {
                        self.reply(WatchResponse {
                            watch_id: id,
                            canceled: true,
                            ..Default::default()
                        })
                        .await
                    }
                }
            }
            Some(RequestUnion::ProgressRequest(p)) => {
                // Every cell answers for its own revision.
                for up in self.upstreams.values() {
                    let _ = up.send(request(RequestUnion::ProgressRequest(p))).await;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(
        &mut self,
        mut c: cellplane_proto::etcdserverpb::WatchCreateRequest,
    ) -> Result<(), ()> {
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
        if self.owner.len() >= MAX_WATCHES_PER_STREAM {
            return self
                .reply(refuse(format!(
                    "this stream already holds {MAX_WATCHES_PER_STREAM} watches; open another"
                )))
                .await;
        }
        let admitted = self
            .core
            .admit(&self.caller, Action::Keys(&[(&c.key, &c.range_end)]));
        let a = match admitted {
            Ok(a) => a,
            Err(s) => return self.reply(refuse(s.message().to_string())).await,
        };
        let cell = a.cell.name().to_string();
        let create = watch_request::RequestUnion::CreateRequest(c);
        if let Some(up) = self.upstreams.get(&cell).filter(|u| !u.is_closed()) {
            self.owner.insert(id, cell);
            if up.send(request(create)).await.is_err() {
                return self
                    .reply(refuse("the cell's watch stream closed; watch again".into()))
                    .await;
            }
            return Ok(());
        }
        // The first watch on this cell opens the upstream stream with its create.
        let first = WatchRequest {
            request_union: Some(create),
        };
        match a
            .open_stream(WATCH, StreamKind::Bidirectional, &first)
            .await
        {
            Ok(stream) => {
                let Some(sender) = stream.sender() else {
                    return self
                        .reply(refuse("the cell's watch stream closed".into()))
                        .await;
                };
                self.owner.insert(id, cell.clone());
                self.upstreams.insert(cell.clone(), sender);
                tokio::spawn(pump(cell, stream, self.tx.clone(), Progress::default()));
                Ok(())
            }
            Err(s) => self.reply(refuse(s.message().to_string())).await,
        }
    }
}

/// Copies a cell's watch responses to the client; if the cell's stream fails,
/// cancels that cell's watches with the revision to watch again from.
async fn pump(
    cell: String,
    mut responses: CellStream,
    client: mpsc::Sender<Result<WatchResponse, Status>>,
    progress: Progress,
) {
    let failure = loop {
        match responses.message().await {
            Ok(Some(bytes)) => {
                let r = match WatchResponse::decode(bytes) {
                    Ok(r) => r,
                    Err(e) => break format!("undecodable watch response: {e}"),
                };
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
