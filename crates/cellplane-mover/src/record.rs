//! The migration record: one per moving tenant, in the directory under
//! [`RECORD_PREFIX`], the single source of truth of a move. Every step is
//! persisted with a compare-and-swap on the record's revision before the next
//! starts, so a mover killed anywhere resumes from it (or aborts it), and two
//! movers cannot drive one move.

use std::time::Duration;

use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, request_op,
};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::MoveError;

/// Where migration records live in the directory.
pub const RECORD_PREFIX: &str = "/cellplane/moves/";

/// How far a move got. Each state is persisted once its step is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveState {
    /// Planned: the destination expects the tenant; the copy and tail run.
    Copying,
    /// The source refuses the tenant from revision `rf` on.
    Fenced,
    /// Both sides hold the same keys and values at the fence point.
    Verified,
    /// The map sends the tenant to the destination; the source's copy waits
    /// for the grace period, then is deleted.
    CutOver,
}

impl std::fmt::Display for MoveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MoveState::Copying => "copying",
            MoveState::Fenced => "fenced",
            MoveState::Verified => "verified",
            MoveState::CutOver => "cut-over",
        })
    }
}

impl std::str::FromStr for MoveState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copying" => Ok(MoveState::Copying),
            "fenced" => Ok(MoveState::Fenced),
            "verified" => Ok(MoveState::Verified),
            "cut-over" => Ok(MoveState::CutOver),
            other => Err(format!(
                "unknown move state {other:?}: copying, fenced, verified or cut-over"
            )),
        }
    }
}

/// One tenant's move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// The map version the move was planned to publish (the source's fence and
    /// the destination's expectation carry it).
    pub version: u64,
    pub state: MoveState,
    /// The source's revision the copy was read at.
    pub r0: i64,
    /// The fence point: the source's revision when the fence took effect.
    pub rf: i64,
    /// Keys copied (at the fence point, once verified).
    pub keys: u64,
    /// When the source's copy may be deleted (ms since the Unix epoch).
    pub retire_after_ms: u64,
}

/// The records in the directory.
pub(crate) struct Records {
    channels: Vec<Channel>,
}

impl Records {
    pub fn new(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Records, MoveError> {
        let channels = endpoints
            .iter()
            .map(|ep| {
                cellplane_security::endpoint(ep, tls)
                    .map(|e| e.connect_timeout(timeout).timeout(timeout).connect_lazy())
                    .map_err(|e| MoveError::Directory(format!("bad endpoint {ep}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if channels.is_empty() {
            return Err(MoveError::Directory(
                "the directory has no endpoints".into(),
            ));
        }
        Ok(Records { channels })
    }

    fn key(tenant: &str) -> Vec<u8> {
        format!("{RECORD_PREFIX}{tenant}").into_bytes()
    }

    /// Runs `call` on each directory member until one answers other than
    /// UNAVAILABLE.
    async fn any<T, F, Fut>(&self, mut call: F) -> Result<T, MoveError>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = String::new();
        for ch in &self.channels {
            match call(KvClient::new(ch.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => last = s.message().into(),
                Err(s) => return Err(MoveError::Directory(s.message().into())),
            }
        }
        Err(MoveError::Directory(format!("unreachable: {last}")))
    }

    /// The record of `tenant`'s move and its revision, if one is in progress.
    pub async fn get(&self, tenant: &str) -> Result<Option<(MoveRecord, i64)>, MoveError> {
        let key = Self::key(tenant);
        let r = self
            .any(|mut c| {
                let key = key.clone();
                async move {
                    c.range(RangeRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        match r.kvs.first() {
            Some(kv) => Ok(Some((decode(&kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every move in progress.
    pub async fn list(&self) -> Result<Vec<MoveRecord>, MoveError> {
        let key = RECORD_PREFIX.as_bytes().to_vec();
        let end = cellplane_proto::prefix_end(&key);
        let r = self
            .any(|mut c| {
                let (key, range_end) = (key.clone(), end.clone());
                async move {
                    c.range(RangeRequest {
                        key,
                        range_end,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        r.kvs.iter().map(|kv| decode(&kv.value)).collect()
    }

    /// Writes `record` if the stored one is at `expected` (0: none stored);
    /// returns the new revision.
    pub async fn put(&self, record: &MoveRecord, expected: i64) -> Result<i64, MoveError> {
        let key = Self::key(&record.tenant);
        let value = serde_json::to_vec(record).map_err(|e| MoveError::Directory(e.to_string()))?;
        let op = request_op::Request::RequestPut(PutRequest {
            key: key.clone(),
            value,
            ..Default::default()
        });
        self.swap(&record.tenant, key, expected, op).await
    }

    /// Deletes the record if it is still at `expected`.
    pub async fn delete(&self, tenant: &str, expected: i64) -> Result<(), MoveError> {
        let key = Self::key(tenant);
        let op = request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        });
        self.swap(tenant, key, expected, op).await.map(drop)
    }

    /// Applies `op` to `tenant`'s record at `key` if it is still at revision
    /// `expected`; answers the directory's revision after.
    async fn swap(
        &self,
        tenant: &str,
        key: Vec<u8>,
        expected: i64,
        op: request_op::Request,
    ) -> Result<i64, MoveError> {
        let txn = TxnRequest {
            compare: vec![guard(&key, expected)],
            success: vec![RequestOp { request: Some(op) }],
            failure: vec![],
        };
        let r = self
            .any(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !r.succeeded {
            return Err(MoveError::Raced(tenant.to_string()));
        }
        Ok(r.header.map_or(0, |h| h.revision))
    }
}

/// "The record is at mod revision `expected`" (0: there is none).
fn guard(key: &[u8], expected: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::ModRevision(expected)),
        range_end: vec![],
    }
}

fn decode(bytes: &[u8]) -> Result<MoveRecord, MoveError> {
    serde_json::from_slice(bytes)
        .map_err(|e| MoveError::Directory(format!("unreadable migration record: {e}")))
}
