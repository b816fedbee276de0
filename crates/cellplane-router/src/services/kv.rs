//! The etcd KV API on the router, forwarded without a full decode: a request is
//! read only as far as routing needs (its key and range end, a range's
//! `serializable` flag; a txn is decoded whole for its compares and ops), and the
//! bytes it came as go to the cell; the cell's answer goes back to the client as
//! the bytes it came as. Decoding and re-encoding every message, both ways, was
//! work the router did per call for nothing (docs/benchmarks.md).
//!
//! A member decodes the same bytes with the same rules (prost, last occurrence of
//! a field wins), so the key the router checked is the key the member serves.

use std::convert::Infallible;
use std::sync::Arc;

use cellplane_proto::etcdserverpb::{RequestOp, TxnRequest, request_op};
use prost::Message;
use prost::bytes::Bytes;
use tonic::codegen::{BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::cell_client::{CallKind, RawCodec};
use crate::core::Core;
use crate::scope::Action;

/// The fields of a RangeRequest (rpc.proto) that routing reads.
#[derive(Clone, PartialEq, prost::Message)]
struct RangeView {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    range_end: Bytes,
    #[prost(bool, tag = "7")]
    serializable: bool,
}

/// The key of a PutRequest (its field 2 is the value, which routing skips).
#[derive(Clone, PartialEq, prost::Message)]
struct PutView {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
}

/// The key range of a DeleteRangeRequest.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyView {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    range_end: Bytes,
}

/// The KV methods, by gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Range,
        Method::Put,
        Method::DeleteRange,
        Method::Txn,
        Method::Compact,
    ];

    fn of(path: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.path() == path)
    }

    fn path(self) -> &'static str {
        match self {
            Method::Range => "/etcdserverpb.KV/Range",
            Method::Put => "/etcdserverpb.KV/Put",
            Method::DeleteRange => "/etcdserverpb.KV/DeleteRange",
            Method::Txn => "/etcdserverpb.KV/Txn",
            Method::Compact => "/etcdserverpb.KV/Compact",
        }
    }
}

/// The KV service, as a gRPC service of encoded messages.
#[derive(Clone)]
pub struct RouterKv {
    core: Arc<Core>,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl RouterKv {
    /// Requests over `max_request_bytes` are refused (RESOURCE_EXHAUSTED), as
    /// are cell answers over `max_response_bytes`.
    pub fn new(core: Arc<Core>, max_request_bytes: usize, max_response_bytes: usize) -> RouterKv {
        RouterKv {
            core,
            max_request_bytes,
            max_response_bytes,
        }
    }
}

impl NamedService for RouterKv {
    const NAME: &'static str = "etcdserverpb.KV";
}

impl<B> Service<http::Request<B>> for RouterKv
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(method) = Method::of(req.uri().path()) else {
            let status = Status::unimplemented(format!(
                "{}: not an etcd KV method this router serves",
                req.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let call = KvCall {
            core: self.core.clone(),
            method,
        };
        let (req_max, resp_max) = (self.max_request_bytes, self.max_response_bytes);
        Box::pin(async move {
            let mut grpc =
                Grpc::new(RawCodec).apply_max_message_size_config(Some(req_max), Some(resp_max));
            Ok(grpc.unary(call, req).await)
        })
    }
}

/// One KV call: admitted by its keys, forwarded as its bytes.
struct KvCall {
    core: Arc<Core>,
    method: Method,
}

impl UnaryService<Bytes> for KvCall {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (core, method) = (self.core.clone(), self.method);
        Box::pin(async move { forward(&core, method, request).await })
    }
}

fn undecodable(method: Method, e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!(
        "{}: the request does not decode: {e}",
        method.path()
    ))
}

async fn forward(
    core: &Core,
    method: Method,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    let caller = core.caller(&request)?;
    let raw = request.into_inner();
    let (a, kind) = match method {
        Method::Range => {
            let v = RangeView::decode(raw.clone()).map_err(|e| undecodable(method, e))?;
            let a = core.admit(&caller, Action::Keys(&[(&v.key, &v.range_end)]))?;
            let kind = if v.serializable {
                CallKind::LOCAL_READ
            } else {
                CallKind::READ
            };
            (a, kind)
        }
        Method::Put => {
            let v = PutView::decode(raw.clone()).map_err(|e| undecodable(method, e))?;
            (
                core.admit(&caller, Action::Keys(&[(&v.key, &[])]))?,
                CallKind::WRITE,
            )
        }
        Method::DeleteRange => {
            let v = KeyView::decode(raw.clone()).map_err(|e| undecodable(method, e))?;
            let a = core.admit(&caller, Action::Keys(&[(&v.key, &v.range_end)]))?;
            (a, CallKind::WRITE)
        }
        Method::Txn => {
            let t = TxnRequest::decode(raw.clone()).map_err(|e| undecodable(method, e))?;
            let mut ranges = Vec::new();
            txn_ranges(&t, &mut ranges);
            let a = core.admit(&caller, Action::Keys(&ranges))?;
            let kind = if txn_writes(&t) {
                CallKind::WRITE
            } else {
                CallKind::READ
            };
            (a, kind)
        }
        // A compaction has no key and compacts every tenant of a cell: operators
        // only, naming the cell (`cellplane-cell`) or one of its tenants.
        Method::Compact => (core.admit(&caller, Action::Operator)?, CallKind::WRITE),
    };
    a.unary_raw(method.path(), raw, kind).await
}

/// Every key range a txn touches, compares and ops, nested txns included.
fn txn_ranges<'a>(t: &'a TxnRequest, out: &mut Vec<(&'a [u8], &'a [u8])>) {
    for c in &t.compare {
        out.push((&c.key, &c.range_end));
    }
    for op in t.success.iter().chain(&t.failure) {
        op_ranges(op, out);
    }
}

fn op_ranges<'a>(op: &'a RequestOp, out: &mut Vec<(&'a [u8], &'a [u8])>) {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => out.push((&r.key, &r.range_end)),
        Some(request_op::Request::RequestPut(p)) => out.push((&p.key, &[])),
        Some(request_op::Request::RequestDeleteRange(d)) => out.push((&d.key, &d.range_end)),
        Some(request_op::Request::RequestTxn(t)) => txn_ranges(t, out),
        None => {}
    }
}

/// Whether a txn writes (then it goes to the leader and is never sent twice).
fn txn_writes(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => false,
            Some(request_op::Request::RequestTxn(t)) => txn_writes(t),
            Some(_) => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::etcdserverpb::{Compare, PutRequest};

    #[test]
    fn views_read_the_routing_fields_the_member_will_read() {
        use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};
        let r = RangeRequest {
            key: b"/a/k".to_vec(),
            range_end: b"/a/l".to_vec(),
            limit: 7,
            serializable: true,
            keys_only: true,
            ..Default::default()
        };
        let v = RangeView::decode(Bytes::from(r.encode_to_vec())).unwrap();
        assert_eq!(
            (&v.key[..], &v.range_end[..], v.serializable),
            (&b"/a/k"[..], &b"/a/l"[..], true)
        );
        let p = PutRequest {
            key: b"/a/k".to_vec(),
            value: vec![7; 300],
            lease: 9,
            ..Default::default()
        };
        let v = PutView::decode(Bytes::from(p.encode_to_vec())).unwrap();
        assert_eq!(&v.key[..], b"/a/k");
        // A key sent twice: the last one counts, for the router as for a member.
        let mut twice = PutRequest {
            key: b"/a/x".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        twice.extend(
            PutRequest {
                key: b"/b/y".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let v = PutView::decode(Bytes::from(twice.clone())).unwrap();
        let member = PutRequest::decode(&twice[..]).unwrap();
        assert_eq!(&v.key[..], &member.key[..]);
        // A field of the wrong wire type is refused, not guessed at.
        assert!(PutView::decode(Bytes::from_static(&[0x08, 0x01])).is_err());
        assert_eq!(
            Method::of("/etcdserverpb.KV/Txn").map(Method::path),
            Some("/etcdserverpb.KV/Txn")
        );
        assert_eq!(Method::of("/etcdserverpb.KV/Nope"), None);
    }

    #[test]
    fn every_range_of_a_nested_txn_is_collected() {
        let put = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let inner = TxnRequest {
            compare: vec![Compare {
                key: b"/c/k".to_vec(),
                range_end: b"/c0".to_vec(),
                ..Default::default()
            }],
            success: vec![put("/d/x")],
            failure: vec![],
        };
        let t = TxnRequest {
            compare: vec![],
            success: vec![put("/a/x")],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(inner)),
            }],
        };
        let mut r = Vec::new();
        txn_ranges(&t, &mut r);
        let keys: Vec<&[u8]> = r.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [&b"/a/x"[..], b"/c/k", b"/d/x"]);
        assert!(txn_writes(&t));
    }
}
