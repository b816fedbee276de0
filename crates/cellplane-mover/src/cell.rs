//! One cell as the mover uses it: a channel per member, and the calls the move
//! protocol makes. The mover's writes carry [`MOVE_TENANT_METADATA`], which
//! the cell accepts only while the tenant moves in (or, for a delete, once the
//! cell no longer serves it).

use std::time::Duration;

use cellplane_map::{CellEntry, MOVE_TENANT_METADATA};
use cellplane_proto::cell::ownership_client::OwnershipClient;
use cellplane_proto::cell::{LearnMapRequest, MoveStep};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest};
use cellplane_proto::mvccpb::KeyValue;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Status};

use crate::MoveError;

/// Keys read per page of a copy or a hash.
const PAGE_KEYS: i64 = 500;

/// A key no tenant owns: a linearizable read of it makes a member apply all
/// that was committed before, so its serializable reads after are current.
const SYNC_KEY: &[u8] = b"/_cellplane/mover-sync";

/// One cell's members.
#[derive(Clone)]
pub(crate) struct CellConn {
    pub name: String,
    members: Vec<Channel>,
}

/// A tenant's keys and values, summed up: what verification compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TenantHash {
    pub keys: u64,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl CellConn {
    pub fn new(entry: &CellEntry, tls: Option<&ClientTlsConfig>) -> Result<CellConn, MoveError> {
        let members = entry
            .endpoints
            .iter()
            .map(|ep| {
                cellplane_security::endpoint(ep, tls)
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(1))
                            .timeout(Duration::from_secs(10))
                            .connect_lazy()
                    })
                    .map_err(|e| {
                        MoveError::Refused(format!("cell {}: bad endpoint {ep}: {e}", entry.name))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CellConn {
            name: entry.name.clone(),
            members,
        })
    }

    fn fail(&self, s: Status) -> MoveError {
        MoveError::Cell {
            cell: self.name.clone(),
            message: s.message().to_string(),
        }
    }

    /// Runs `call` on each member in turn until one answers other than
    /// UNAVAILABLE (a member down, or no leader for a moment), for a few rounds.
    pub(crate) async fn any<T, F, Fut>(&self, mut call: F) -> Result<T, MoveError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("the cell lists no member");
        for round in 0..10 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            for ch in &self.members {
                match call(ch.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(s) if s.code() == tonic::Code::Unavailable => last = s,
                    Err(s) => return Err(self.fail(s)),
                }
            }
        }
        Err(self.fail(last))
    }

    async fn step(
        &self,
        rpc: &'static str,
        tenant: &str,
        cell: &str,
        version: u64,
    ) -> Result<i64, MoveError> {
        let step = MoveStep {
            tenant: tenant.to_string(),
            cell: cell.to_string(),
            version,
        };
        self.any(|ch| {
            let step = step.clone();
            async move {
                let mut c = OwnershipClient::new(ch);
                let r = match rpc {
                    "fence" => c.fence(step).await,
                    "unfence" => c.unfence(step).await,
                    "expect" => c.expect(step).await,
                    _ => c.forget(step).await,
                }?;
                Ok(r.into_inner().revision)
            }
        })
        .await
    }

    /// Stops serving `tenant`, which moves to `to`; answers the fence point.
    pub async fn fence(&self, tenant: &str, to: &str, version: u64) -> Result<i64, MoveError> {
        self.step("fence", tenant, to, version).await
    }

    pub async fn unfence(&self, tenant: &str) -> Result<(), MoveError> {
        self.step("unfence", tenant, "", 0).await.map(drop)
    }

    /// Lets the mover write `tenant`, moving in from `from`.
    pub async fn expect(&self, tenant: &str, from: &str, version: u64) -> Result<(), MoveError> {
        self.step("expect", tenant, from, version).await.map(drop)
    }

    pub async fn forget(&self, tenant: &str) -> Result<(), MoveError> {
        self.step("forget", tenant, "", 0).await.map(drop)
    }

    /// Makes the cell serve by `map_json`; answers the version it serves by.
    pub async fn learn_map(&self, map_json: &[u8]) -> Result<u64, MoveError> {
        self.any(|ch| {
            let map = map_json.to_vec();
            async move {
                let r = OwnershipClient::new(ch)
                    .learn_map(LearnMapRequest { map })
                    .await?;
                Ok(r.into_inner().version)
            }
        })
        .await
    }

    /// The cell's current revision (a linearizable read).
    pub async fn revision(&self) -> Result<i64, MoveError> {
        let (_, revision) = self.synced_member().await?;
        Ok(revision)
    }

    /// A member that has applied everything committed so far, and the cell's
    /// revision then: its serializable reads are current from here on.
    async fn synced_member(&self) -> Result<(Channel, i64), MoveError> {
        self.any(|ch| async move {
            let r = KvClient::new(ch.clone())
                .range(RangeRequest {
                    key: SYNC_KEY.to_vec(),
                    ..Default::default()
                })
                .await?;
            Ok((ch, r.into_inner().header.map_or(0, |h| h.revision)))
        })
        .await
    }

    /// `tenant`'s key-value pairs at `revision` (0: the newest), a page at a
    /// time, read serializably from a synced member (the source refuses
    /// linearizable reads of a fenced tenant, the destination of one still
    /// moving in).
    pub async fn pages(&self, tenant: &str, revision: i64) -> Result<Pager, MoveError> {
        let (member, _) = self.synced_member().await?;
        let from = format!("/{tenant}/").into_bytes();
        Ok(Pager {
            cell: self.clone(),
            member,
            end: cellplane_proto::prefix_end(&from),
            from: Some(from),
            revision,
        })
    }

    /// The tenants that have keys in the cell (first segments `/T/` of a name
    /// that is not the system's), found with one one-key read per tenant; at
    /// most `max`.
    pub async fn tenants(&self, max: usize) -> Result<Vec<String>, MoveError> {
        let (member, _) = self.synced_member().await?;
        let end = cellplane_proto::prefix_end(b"/");
        let mut from = b"/".to_vec();
        let mut found = Vec::new();
        loop {
            let req = RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: 1,
                keys_only: true,
                serializable: true,
                ..Default::default()
            };
            let page = KvClient::new(member.clone())
                .range(req)
                .await
                .map_err(|s| self.fail(s))?
                .into_inner();
            let Some(kv) = page.kvs.first() else {
                return Ok(found);
            };
            let rest = &kv.key[1..];
            let Some(slash) = rest.iter().position(|b| *b == b'/') else {
                // `/x` with no second slash: no tenant's; the next key on.
                from = kv.key.clone();
                from.push(0);
                continue;
            };
            let segment = &rest[..slash];
            // Skip the whole `/segment/` prefix, whoever's it is.
            from = cellplane_proto::prefix_end(&kv.key[..slash + 2]);
            let system = segment.is_empty() || segment[0] == b'_';
            if let (false, Ok(t)) = (system, std::str::from_utf8(segment)) {
                if found.len() == max {
                    return Err(MoveError::Refused(format!(
                        "cell {} holds keys of more than {max} tenants: too many to drain at once",
                        self.name
                    )));
                }
                found.push(t.to_string());
            }
        }
    }

    /// Hashes `tenant`'s keys, values and the leases they are attached to at
    /// `revision` (0: the newest).
    pub async fn hash(&self, tenant: &str, revision: i64) -> Result<TenantHash, MoveError> {
        let mut h = Sha256::new();
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut pages = self.pages(tenant, revision).await?;
        while let Some(kvs) = pages.next().await? {
            for kv in &kvs {
                h.update(kv.lease.to_be_bytes());
                h.update((kv.key.len() as u32).to_be_bytes());
                h.update(&kv.key);
                h.update((kv.value.len() as u32).to_be_bytes());
                h.update(&kv.value);
                keys += 1;
                bytes += (kv.key.len() + kv.value.len()) as u64;
            }
        }
        Ok(TenantHash {
            keys,
            bytes,
            sha256: h.finalize().into(),
        })
    }

    /// Applies `ops` (puts and deletes of `tenant`'s keys, no key twice) in one
    /// txn, as the mover.
    pub async fn write(&self, tenant: &str, ops: Vec<RequestOp>) -> Result<(), MoveError> {
        if ops.is_empty() {
            return Ok(());
        }
        let txn = TxnRequest {
            success: ops,
            ..Default::default()
        };
        self.any(|ch| {
            let req = as_mover(txn.clone(), tenant);
            async move { KvClient::new(ch).txn(req).await.map(drop) }
        })
        .await
    }

    /// Deletes every key of `tenant` and revokes its leases, as the mover.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<(), MoveError> {
        self.delete_keys(tenant).await?;
        self.revoke_leases(tenant).await
    }

    async fn delete_keys(&self, tenant: &str) -> Result<(), MoveError> {
        let key = format!("/{tenant}/").into_bytes();
        let del = DeleteRangeRequest {
            range_end: cellplane_proto::prefix_end(&key),
            key,
            ..Default::default()
        };
        self.any(|ch| {
            let req = as_mover(del.clone(), tenant);
            async move { KvClient::new(ch).delete_range(req).await.map(drop) }
        })
        .await
    }

    /// A member's channel, for the watch that tails the source.
    pub fn member(&self, i: usize) -> Option<Channel> {
        self.members.get(i).cloned()
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }
}

/// Reads a tenant's keys page by page ([`CellConn::pages`]).
pub(crate) struct Pager {
    cell: CellConn,
    member: Channel,
    /// The next page's first key; `None` once done.
    from: Option<Vec<u8>>,
    end: Vec<u8>,
    revision: i64,
}

impl Pager {
    /// The next page, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<KeyValue>>, MoveError> {
        let Some(from) = self.from.take() else {
            return Ok(None);
        };
        let req = RangeRequest {
            key: from,
            range_end: self.end.clone(),
            revision: self.revision,
            limit: PAGE_KEYS,
            serializable: true,
            ..Default::default()
        };
        let page = KvClient::new(self.member.clone())
            .range(req)
            .await
            .map_err(|s| self.cell.fail(s))?
            .into_inner();
        if page.more
            && let Some(last) = page.kvs.last()
        {
            let mut next = last.key.clone();
            next.push(0);
            self.from = Some(next);
        }
        if page.kvs.is_empty() {
            return Ok(None);
        }
        Ok(Some(page.kvs))
    }
}

pub(crate) fn as_mover<T>(body: T, tenant: &str) -> Request<T> {
    let mut r = Request::new(body);
    if let Ok(v) = tenant.parse() {
        r.metadata_mut().insert(MOVE_TENANT_METADATA, v);
    }
    r
}
