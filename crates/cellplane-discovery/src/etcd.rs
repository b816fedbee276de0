//! The few etcd v3 calls discovery makes, over one gRPC channel to a cell: every
//! call has a deadline and names itself in its error.

use std::time::Duration;

use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest, WatchResponse, request_op, watch_request,
};
use cellplane_proto::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::error::DiscoveryError;
use cellplane_proto::prefix_end;

type Result<T> = std::result::Result<T, DiscoveryError>;

/// The largest answer read from the member's etcd API: a cell's default
/// response limit and its frame allowance.
const MAX_RESPONSE: usize =
    cellplane_proto::DEFAULT_MAX_RESPONSE_BYTES + cellplane_proto::RESPONSE_FRAME_BYTES;

/// Clients of one cell's KV, Lease and Watch services. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    timeout: Duration,
}

/// A watch on one prefix. Dropping it ends the watch (the request side closes).
pub struct PrefixWatch {
    _requests: mpsc::Sender<WatchRequest>,
    pub responses: Streaming<WatchResponse>,
}

impl Etcd {
    /// A client of the etcd API at `url` that connects on first use.
    pub fn connect_lazy(url: &str, timeout: Duration) -> Result<Etcd> {
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(|e| DiscoveryError::Config(format!("bad etcd address {url}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Etcd::new(channel, timeout))
    }

    pub fn new(channel: Channel, timeout: Duration) -> Etcd {
        Etcd {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel).max_decoding_message_size(MAX_RESPONSE),
            timeout,
        }
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r
                .map(tonic::Response::into_inner)
                .map_err(DiscoveryError::etcd(op)),
            Err(_) => Err(DiscoveryError::Etcd {
                op,
                status: Status::unavailable(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )),
            }),
        }
    }

    /// Every key with `prefix` at `revision` (0: now, linearizable unless
    /// `serializable`), and the revision read at.
    pub async fn range_prefix(
        &self,
        prefix: &[u8],
        revision: i64,
        serializable: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let req = RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            revision,
            serializable,
            ..Default::default()
        };
        let r = self.bounded("range", self.kv.clone().range(req)).await?;
        let rev = if revision > 0 {
            revision
        } else {
            r.header.map_or(0, |h| h.revision)
        };
        Ok((r.kvs, rev))
    }

    /// One key, if present, and the revision read at.
    pub async fn get(&self, key: &[u8], serializable: bool) -> Result<(Option<KeyValue>, i64)> {
        let req = RangeRequest {
            key: key.to_vec(),
            serializable,
            ..Default::default()
        };
        let r = self.bounded("range", self.kv.clone().range(req)).await?;
        Ok((r.kvs.into_iter().next(), r.header.map_or(0, |h| h.revision)))
    }

    /// Puts `value` at `key` with `lease` (0: none); returns the revision.
    pub async fn put(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64> {
        let req = PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..Default::default()
        };
        let r = self.bounded("put", self.kv.clone().put(req)).await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// Puts only if `key` was last modified at `mod_revision`: the checker's
    /// writes never overwrite a registration it has not seen. The new revision,
    /// or None when the key changed meanwhile.
    pub async fn put_if(
        &self,
        key: &[u8],
        mod_revision: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<i64>> {
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value,
                lease,
                ..Default::default()
            })),
        };
        self.txn_if(key, mod_revision, put).await
    }

    /// Deletes only if `key` was last modified at `mod_revision`.
    pub async fn delete_if(&self, key: &[u8], mod_revision: i64) -> Result<Option<i64>> {
        let del = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            )),
        };
        self.txn_if(key, mod_revision, del).await
    }

    async fn txn_if(&self, key: &[u8], mod_revision: i64, op: RequestOp) -> Result<Option<i64>> {
        let req = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.to_vec(),
                target_union: Some(TargetUnion::ModRevision(mod_revision)),
                range_end: vec![],
            }],
            success: vec![op],
            failure: vec![],
        };
        let r = self.bounded("txn", self.kv.clone().txn(req)).await?;
        Ok(r.succeeded.then(|| r.header.map_or(0, |h| h.revision)))
    }

    /// Deletes `key`; (deleted, revision).
    pub async fn delete(&self, key: &[u8]) -> Result<(bool, i64)> {
        let req = DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let r = self
            .bounded("delete", self.kv.clone().delete_range(req))
            .await?;
        Ok((r.deleted > 0, r.header.map_or(0, |h| h.revision)))
    }

    /// A new lease of `ttl` seconds: (id, granted ttl).
    pub async fn grant(&self, ttl: i64) -> Result<(i64, i64)> {
        let r = self
            .bounded(
                "lease grant",
                self.lease
                    .clone()
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 }),
            )
            .await?;
        if !r.error.is_empty() {
            return Err(DiscoveryError::Etcd {
                op: "lease grant",
                status: Status::unavailable(r.error),
            });
        }
        Ok((r.id, r.ttl))
    }

    /// Revokes lease `id`, deleting its keys; false when it did not exist.
    pub async fn revoke(&self, id: i64) -> Result<bool> {
        let r = self
            .bounded(
                "lease revoke",
                self.lease.clone().lease_revoke(LeaseRevokeRequest { id }),
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(DiscoveryError::Etcd { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Renews lease `id` once: its TTL after renewal, 0 when it does not exist.
    pub async fn keep_alive(&self, id: i64) -> Result<i64> {
        let (tx, rx) = mpsc::channel(1);
        // The one request is queued before the call, so the stream carries it as
        // soon as it opens. The request side stays open until the answer is in
        // (a server may end the stream as soon as its client's side closes).
        let _ = tx.try_send(LeaseKeepAliveRequest { id });
        let call = async move {
            let mut responses = self
                .lease
                .clone()
                .lease_keep_alive(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let answer = responses.message().await?;
            drop(tx);
            match answer {
                Some(r) => Ok(tonic::Response::new(r)),
                None => Err(Status::unavailable(
                    "keep-alive stream ended without an answer",
                )),
            }
        };
        let r = self.bounded("lease keep-alive", call).await?;
        Ok(r.ttl)
    }

    /// Lease `id`'s (remaining, granted) TTL in seconds; None when it does not
    /// exist (expired or revoked).
    pub async fn time_to_live(&self, id: i64) -> Result<Option<(i64, i64)>> {
        let r = self
            .bounded(
                "lease time-to-live",
                self.lease
                    .clone()
                    .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }),
            )
            .await;
        match r {
            Ok(r) if r.ttl < 0 => Ok(None),
            Ok(r) => Ok(Some((r.ttl, r.granted_ttl))),
            Err(DiscoveryError::Etcd { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Watches every key with `prefix` from `start_revision`, with previous
    /// values. The created response is consumed here: a refusal is an error.
    pub async fn watch_prefix(&self, prefix: &[u8], start_revision: i64) -> Result<PrefixWatch> {
        let (tx, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        };
        let _ = tx.try_send(create);
        let call = async {
            let mut responses = self
                .watch
                .clone()
                .watch(ReceiverStream::new(rx))
                .await?
                .into_inner();
            match responses.message().await? {
                Some(r) if r.created && !r.canceled => Ok(tonic::Response::new(responses)),
                Some(r) if r.compact_revision > 0 => Err(Status::out_of_range(format!(
                    "revision {start_revision} has been compacted (oldest kept: {})",
                    r.compact_revision
                ))),
                Some(r) => Err(Status::unavailable(format!(
                    "watch refused: {}",
                    r.cancel_reason
                ))),
                None => Err(Status::unavailable("watch stream ended at once")),
            }
        };
        let responses = self.bounded("watch", call).await?;
        Ok(PrefixWatch {
            _requests: tx,
            responses,
        })
    }
}
