//! Moving a tenant's leases: they keep their IDs (a lease ID names its cell only
//! for callers that name no tenant; routers send a tenant's lease calls to the
//! tenant's cell), their granted TTL and their remaining time.
//!
//! The copy grants every lease of the tenant in the destination before its keys
//! are written (keys keep their lease); the tail grants a lease the first time a
//! put names it. While the tenant is not served by a cell, that cell neither
//! expires nor renews the tenant's leases for clients (it refuses their calls),
//! so the copies in the destination live until the move decides. At the fence
//! point the lease sets are made equal (granted where missing, revoked where
//! gone), compared, and just before the cut-over the destination's leader is
//! told each lease's remaining time, read from the source (whole seconds,
//! rounded up, as etcd's TimeToLive answers).

use std::collections::BTreeSet;
use std::time::Duration;

use cellplane_proto::cell::LeaseDeadline;
use cellplane_proto::cell::LeaseDeadlines;
use cellplane_proto::cell::ownership_client::OwnershipClient;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use futures::StreamExt;

use crate::MoveError;
use crate::cell::{CellConn, as_mover};

/// Lease calls in flight at once when a whole set is read or written.
const LEASE_CONCURRENCY: usize = 16;

/// A lease as the source has it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseTtl {
    pub id: i64,
    /// Seconds left (rounded up).
    pub remaining: i64,
    /// Seconds granted.
    pub granted: i64,
}

impl CellConn {
    /// The IDs of `tenant`'s leases in this cell.
    pub async fn leases(&self, tenant: &str) -> Result<BTreeSet<i64>, MoveError> {
        self.any(|ch| {
            let req = as_mover(LeaseLeasesRequest {}, tenant);
            async move {
                let r = LeaseClient::new(ch).lease_leases(req).await?;
                Ok(r.into_inner().leases.into_iter().map(|l| l.id).collect())
            }
        })
        .await
    }

    /// Lease `id` of `tenant`, or `None` if it is gone (revoked or expired).
    pub async fn lease_ttl(&self, tenant: &str, id: i64) -> Result<Option<LeaseTtl>, MoveError> {
        self.any(|ch| {
            let req = as_mover(
                LeaseTimeToLiveRequest {
                    id,
                    ..Default::default()
                },
                tenant,
            );
            async move {
                let r = LeaseClient::new(ch)
                    .lease_time_to_live(req)
                    .await?
                    .into_inner();
                Ok((r.ttl >= 0).then_some(LeaseTtl {
                    id,
                    remaining: r.ttl,
                    granted: r.granted_ttl,
                }))
            }
        })
        .await
    }

    /// Every lease of `tenant` in this cell with its TTLs.
    pub async fn lease_ttls(&self, tenant: &str) -> Result<Vec<LeaseTtl>, MoveError> {
        let ids = self.leases(tenant).await?;
        let mut found = Vec::with_capacity(ids.len());
        let mut reads = futures::stream::iter(ids)
            .map(|id| self.lease_ttl(tenant, id))
            .buffer_unordered(LEASE_CONCURRENCY);
        while let Some(r) = reads.next().await {
            found.extend(r?);
        }
        Ok(found)
    }

    /// Grants `tenant`'s lease `id` with `ttl` seconds, as the mover.
    pub async fn grant_lease(&self, tenant: &str, id: i64, ttl: i64) -> Result<(), MoveError> {
        self.any(|ch| {
            let req = as_mover(
                LeaseGrantRequest {
                    id,
                    ttl: ttl.max(1),
                },
                tenant,
            );
            async move { LeaseClient::new(ch).lease_grant(req).await.map(drop) }
        })
        .await
    }

    /// Revokes `tenant`'s lease `id` (and the keys attached), as the mover; a
    /// lease already gone is fine.
    pub async fn revoke_lease(&self, tenant: &str, id: i64) -> Result<(), MoveError> {
        self.any(|ch| {
            let req = as_mover(LeaseRevokeRequest { id }, tenant);
            async move {
                match LeaseClient::new(ch).lease_revoke(req).await {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                    Err(s) => Err(s),
                }
            }
        })
        .await
    }

    /// Revokes every lease of `tenant` here.
    pub async fn revoke_leases(&self, tenant: &str) -> Result<(), MoveError> {
        let ids = self.leases(tenant).await?;
        let mut revokes = futures::stream::iter(ids)
            .map(|id| self.revoke_lease(tenant, id))
            .buffer_unordered(LEASE_CONCURRENCY);
        while let Some(r) = revokes.next().await {
            r?;
        }
        Ok(())
    }

    /// Tells the cell's leader how long each of `tenant`'s leases has left.
    /// Every member is asked (only the leader keeps deadlines); fails unless one
    /// of them led, after a few rounds.
    pub async fn set_lease_deadlines(
        &self,
        tenant: &str,
        leases: &[LeaseTtl],
    ) -> Result<(), MoveError> {
        let req = LeaseDeadlines {
            tenant: tenant.to_string(),
            leases: leases
                .iter()
                .map(|l| LeaseDeadline {
                    id: l.id,
                    remaining_ms: l.remaining.saturating_mul(1000),
                })
                .collect(),
        };
        for round in 0..10 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            for i in 0..self.members() {
                let Some(ch) = self.member(i) else { continue };
                if let Ok(r) = OwnershipClient::new(ch)
                    .set_lease_deadlines(req.clone())
                    .await
                    && r.into_inner().leading
                {
                    return Ok(());
                }
            }
        }
        Err(MoveError::Cell {
            cell: self.name.clone(),
            message: "no member leads with its lease deadlines loaded: cannot hand over the \
                      moved leases' remaining time; resume the move"
                .into(),
        })
    }
}

/// Makes `dst`'s leases of `tenant` those `src` has (granted where missing,
/// revoked where gone); answers the source's set.
pub(crate) async fn sync_leases(
    src: &CellConn,
    dst: &CellConn,
    tenant: &str,
) -> Result<BTreeSet<i64>, MoveError> {
    let theirs = src.lease_ttls(tenant).await?;
    let ours = dst.leases(tenant).await?;
    let want: BTreeSet<i64> = theirs.iter().map(|l| l.id).collect();
    for l in theirs.iter().filter(|l| !ours.contains(&l.id)) {
        dst.grant_lease(tenant, l.id, l.granted).await?;
    }
    for id in ours.difference(&want) {
        dst.revoke_lease(tenant, *id).await?;
    }
    Ok(want)
}

impl CellConn {
    /// Grants each of `leases` for `tenant` here, as the mover.
    pub async fn grant_leases(&self, tenant: &str, leases: &[LeaseTtl]) -> Result<(), MoveError> {
        let mut grants = futures::stream::iter(leases)
            .map(|l| self.grant_lease(tenant, l.id, l.granted))
            .buffer_unordered(LEASE_CONCURRENCY);
        while let Some(r) = grants.next().await {
            r?;
        }
        Ok(())
    }
}
