//! The etcd KV service of a member (Maintenance is in `maintenance`, Cluster in
//! `cluster`).
//!
//! Any member serves any request. Writes are proposed through Raft on the leader: a
//! follower sends them to the leader in batches over the peer transport (see
//! `proposer`), or, when the leader is known not to have applied a batch, forwards
//! the request to the leader's client API. Linearizable reads (the
//! default) wait on the read barrier and are served from the local state machine;
//! serializable reads are served locally at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use cellplane_storage::{Command, KvError};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::{kv_status, node_status, read_status};
use crate::node::{ProposeError, Shared};
use crate::ownership::{as_mover, keep_mover, mover_tenant};

/// How long a `physical` Compact waits for the member to remove old versions.
const PHYSICAL_COMPACTION_WAIT: Duration = Duration::from_secs(120);

/// Set on a request a member forwards to the leader, so that a request never
/// travels more than one hop (a stale leader view cannot bounce it around).
pub const FORWARDED: &str = "cellplane-forwarded";

/// The etcd version this API is compatible with, as `etcdctl endpoint status` shows.
pub const ETCD_API_VERSION: &str = "3.5.0";

pub struct KvService {
    shared: Arc<Shared>,
}

impl KvService {
    pub fn new(shared: Arc<Shared>) -> KvService {
        KvService { shared }
    }

    async fn serve<T, F>(&self, method: &'static str, fut: F) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, Status>>,
    {
        serve_request(&self.shared, method, fut).await
    }
}

/// Runs one client request under the member's admission limit, deadline and
/// metrics.
pub(crate) async fn serve_request<T, F>(
    s: &Shared,
    method: &'static str,
    fut: F,
) -> Result<Response<T>, Status>
where
    F: std::future::Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let result = match s.inflight.try_acquire() {
        Err(_) => Err(Status::unavailable(
            "etcdserver: too many requests in flight on this member; retry with backoff",
        )),
        Ok(_permit) => match tokio::time::timeout(s.config.request_timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
        },
    };
    s.metrics
        .request_seconds
        .get_or_create(&crate::metrics::MethodLabels { method })
        .observe(started.elapsed().as_secs_f64());
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(st) => st.code(),
    };
    let code = cellplane_proto::code_label(code);
    s.metrics
        .requests
        .get_or_create(&crate::metrics::ResultLabels { method, code })
        .inc();
    result.map(Response::new)
}

impl KvService {
    fn check_size<M: Message>(&self, m: &M) -> Result<(), Status> {
        let max = self.shared.limits.max_request_bytes;
        if m.encoded_len() > max {
            return Err(kv_status(KvError::RequestTooLarge { max }));
        }
        Ok(())
    }

    /// Proposes a write here, or forwards it once to the leader with `forward`.
    /// etcd's `physical` compaction: waits until this member has removed the
    /// versions a compaction at `revision` hid (it does so in the background).
    async fn removed_up_to(&self, revision: i64) -> Result<(), Status> {
        let compactor = cellplane_storage::HistoryCompactor::new(self.shared.store.clone());
        let deadline = tokio::time::Instant::now() + PHYSICAL_COMPACTION_WAIT;
        loop {
            let c = compactor.clone();
            let done = tokio::task::spawn_blocking(move || c.targets())
                .await
                .map_err(|e| Status::internal(format!("compaction check failed: {e}")))?
                .map_err(crate::error::kv_status)?
                .1;
            if done >= revision {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "compaction at {revision} is applied; this member is still removing the \
                     old versions from disk (done up to {done}): retry without --physical, or \
                     wait and watch cellplane_history_compacted_revision"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn write<T, F, Fut>(&self, cmd: Command, forwarded: bool, forward: F) -> Result<T, Status>
    where
        T: Message + Default + HasHeader,
        F: FnOnce(
            cellplane_proto::etcdserverpb::kv_client::KvClient<tonic::transport::Channel>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let s = &self.shared;
        s.refuse_learner()?;
        // A follower hands the write to the leader in a batch (never a request
        // that already travelled its one hop).
        match s.propose_with(cmd, !forwarded).await {
            Ok((resp, term)) => {
                let mut body: T = decode_outcome(resp.outcome)?;
                let mut header = s.header(resp.revision);
                header.raft_term = term;
                body.set_header(header);
                Ok(body)
            }
            Err(ProposeError::Forward(leader)) => {
                if forwarded {
                    return Err(Status::unavailable(format!(
                        "etcdserver: not leader (member {} thinks {leader} leads); retry",
                        s.id
                    )));
                }
                let client = s.kv_client(leader).map_err(node_status)?;
                forward(client).await.map(Response::into_inner)
            }
            Err(ProposeError::Failed(e)) => Err(node_status(e)),
        }
    }
}

/// The etcd response a command's apply produced, or the status for its error.
pub(crate) fn decode_outcome<T: Message + Default, B: AsRef<[u8]>>(
    outcome: Option<Result<B, KvError>>,
) -> Result<T, Status> {
    match outcome {
        Some(Ok(bytes)) => T::decode(bytes.as_ref())
            .map_err(|e| Status::internal(format!("cannot decode apply result: {e}"))),
        Some(Err(e)) => Err(kv_status(e)),
        None => Err(Status::internal("apply produced no result")),
    }
}

/// Responses that carry an etcd header.
pub trait HasHeader {
    fn set_header(&mut self, h: cellplane_proto::etcdserverpb::ResponseHeader);
}

macro_rules! has_header {
    ($($t:ty),*) => {$(
        impl HasHeader for $t {
            fn set_header(&mut self, h: cellplane_proto::etcdserverpb::ResponseHeader) {
                self.header = Some(h);
            }
        }
    )*};
}
has_header!(
    PutResponse,
    DeleteRangeResponse,
    TxnResponse,
    CompactionResponse
);

pub(crate) fn forwarded_request<T>(inner: T) -> Request<T> {
    let mut r = Request::new(inner);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

pub(crate) fn is_forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

#[tonic::async_trait]
impl cellplane_proto::etcdserverpb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let req = request.into_inner();
        self.serve("Range", async {
            self.check_size(&req)?;
            cellplane_storage::mvcc_check::range(&req).map_err(kv_status)?;
            let s = &self.shared;
            if !req.serializable {
                s.refuse_learner()?;
                let mut applied = s.applied.clone();
                s.barrier
                    .wait_linearizable(&mut applied)
                    .await
                    .map_err(read_status)?;
                crate::ownership::check_read(s, &req.key, &req.range_end)?;
            }
            let mut resp = s.reader.range(&req).map_err(kv_status)?;
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            resp.header = Some(s.header(revision));
            Ok(resp)
        })
        .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let mover = mover_tenant(request.metadata())?;
        let cmd = as_mover(&request, Command::Put(request.get_ref().encode_to_vec()))?;
        let req = request.into_inner();
        self.serve("Put", async {
            self.check_size(&req)?;
            cellplane_storage::mvcc_check::put(&req).map_err(kv_status)?;
            self.write(cmd, forwarded, |mut c| async move {
                c.put(keep_mover(forwarded_request(req), mover.as_deref()))
                    .await
            })
            .await
        })
        .await
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let mover = mover_tenant(request.metadata())?;
        let cmd = as_mover(
            &request,
            Command::DeleteRange(request.get_ref().encode_to_vec()),
        )?;
        let req = request.into_inner();
        self.serve("DeleteRange", async {
            self.check_size(&req)?;
            cellplane_storage::mvcc_check::delete(&req).map_err(kv_status)?;
            self.write(cmd, forwarded, |mut c| async move {
                c.delete_range(keep_mover(forwarded_request(req), mover.as_deref()))
                    .await
            })
            .await
        })
        .await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let mover = mover_tenant(request.metadata())?;
        let cmd = as_mover(&request, Command::Txn(request.get_ref().encode_to_vec()))?;
        let req = request.into_inner();
        self.serve("Txn", async {
            self.check_size(&req)?;
            cellplane_storage::mvcc_check::txn(&req, &self.shared.limits).map_err(kv_status)?;
            self.write(cmd, forwarded, |mut c| async move {
                c.txn(keep_mover(forwarded_request(req), mover.as_deref()))
                    .await
            })
            .await
        })
        .await
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        let (revision, physical) = (req.revision, req.physical);
        self.serve("Compact", async {
            let cmd = Command::Compact(revision);
            let resp = self
                .write(cmd, forwarded, |mut c| async move {
                    c.compact(forwarded_request(req)).await
                })
                .await?;
            if physical {
                self.removed_up_to(revision).await?;
            }
            Ok(resp)
        })
        .await
    }
}
