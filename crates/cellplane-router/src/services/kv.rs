//! The etcd KV API on the router.

use std::sync::Arc;

use cellplane_proto::etcdserverpb::kv_server::Kv;
use cellplane_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse, request_op,
};
use tonic::{Request, Response, Status};

use crate::cell_client::CallKind;
use crate::core::Core;
use crate::scope::Action;

pub struct RouterKv {
    core: Arc<Core>,
}

impl RouterKv {
    pub fn new(core: Arc<Core>) -> RouterKv {
        RouterKv { core }
    }
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

#[tonic::async_trait]
impl Kv for RouterKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self
            .core
            .admit(&caller, Action::Keys(&[(&req.key, &req.range_end)]))?;
        let kind = if req.serializable {
            CallKind::LOCAL_READ
        } else {
            CallKind::READ
        };
        a.unary("/etcdserverpb.KV/Range", &req, kind).await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self.core.admit(&caller, Action::Keys(&[(&req.key, &[])]))?;
        a.unary("/etcdserverpb.KV/Put", &req, CallKind::WRITE).await
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self
            .core
            .admit(&caller, Action::Keys(&[(&req.key, &req.range_end)]))?;
        a.unary("/etcdserverpb.KV/DeleteRange", &req, CallKind::WRITE)
            .await
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let mut ranges = Vec::new();
        txn_ranges(&req, &mut ranges);
        let a = self.core.admit(&caller, Action::Keys(&ranges))?;
        let kind = if txn_writes(&req) {
            CallKind::WRITE
        } else {
            CallKind::READ
        };
        a.unary("/etcdserverpb.KV/Txn", &req, kind).await
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        // A compaction has no key and compacts every tenant of a cell: operators
        // only, naming the cell (`cellplane-cell`) or one of its tenants.
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let a = self.core.admit(&caller, Action::Operator)?;
        a.unary("/etcdserverpb.KV/Compact", &req, CallKind::WRITE)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::etcdserverpb::{Compare, PutRequest};

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
