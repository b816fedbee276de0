//! Who may call a member, once TLS is on: a tower layer on the client and peer
//! servers that reads the identity the caller's certificate names and refuses the
//! call before any service sees it.
//!
//! | caller | peer port | client port of a tenant cell | client port of the directory |
//! |---|---|---|---|
//! | a member of this cell | yes | yes | yes |
//! | an operator | no | yes | yes |
//! | a router | no | yes (it forwards what it has checked) | read and watch only |
//! | a tenant, another cell's member | no | no | no |
//!
//! The TLS handshake already required a certificate from the CA; a certificate
//! that names no cellplane identity is refused here. In plaintext mode there are
//! no identities and everything passes (the local environment, which says so).

use std::sync::Arc;
use std::task::{Context, Poll};

use cellplane_security::Identity;
use futures::future::{Either, Ready, ready};
use tonic::Status;
use tonic::codegen::http;

use crate::config::CellRole;

/// Which server a policy guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Client,
    Peer,
}

/// What callers the member's own cell admits.
#[derive(Debug)]
pub struct Policy {
    cell: String,
    role: CellRole,
    port: Port,
}

/// The calls a router may make on the directory: read the map and follow it.
const DIRECTORY_READS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Cluster/MemberList",
];

/// Operator calls a router never makes, refused to routers on every cell: a
/// router forwards tenants' requests; membership, alarms, defragmentation and
/// backups are an operator's.
const OPERATOR_ONLY: &[&str] = &[
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/cellplane.cell.v1.Ownership/LearnMap",
    "/cellplane.cell.v1.Ownership/Fence",
    "/cellplane.cell.v1.Ownership/Unfence",
    "/cellplane.cell.v1.Ownership/Expect",
    "/cellplane.cell.v1.Ownership/Forget",
    "/cellplane.cell.v1.Ownership/SetLeaseDeadlines",
];

impl Policy {
    pub fn new(cell: &str, role: CellRole, port: Port) -> Policy {
        Policy {
            cell: cell.to_string(),
            role,
            port,
        }
    }

    /// Whether `caller` may call `path` (`/package.Service/Method`).
    pub fn check(&self, caller: &Identity, path: &str) -> Result<(), Status> {
        let own_member = matches!(caller, Identity::Member { cell, .. } if *cell == self.cell);
        let allowed = match (self.port, caller) {
            _ if own_member => true,
            (Port::Peer, _) => false,
            (Port::Client, Identity::Operator(_)) => true,
            (Port::Client, Identity::Router(_)) => {
                (self.role == CellRole::Tenants && !OPERATOR_ONLY.contains(&path))
                    || DIRECTORY_READS.contains(&path)
            }
            (Port::Client, _) => false,
        };
        if allowed {
            return Ok(());
        }
        let why = match (self.port, caller) {
            (Port::Peer, _) => format!(
                "{caller} may not speak Raft to cell {}: the peer port accepts only the cell's \
                 own members",
                self.cell
            ),
            (_, Identity::Tenant(_)) => format!(
                "{caller} may not call cell {} directly: tenants reach their cell through a \
                 router",
                self.cell
            ),
            (_, Identity::Router(_)) if OPERATOR_ONLY.contains(&path) => format!(
                "{caller} may not call {path} on cell {}: it is an operator's call",
                self.cell
            ),
            (_, Identity::Router(_)) => format!(
                "{caller} may only read and watch the directory ({path} refused): the map is \
                 written by operators"
            ),
            _ => format!("{caller} may not call {path} on cell {}", self.cell),
        };
        Err(Status::permission_denied(why))
    }

    /// The caller's proven identity from a request's TLS connection.
    fn caller(ext: &http::Extensions) -> Result<Identity, Status> {
        match cellplane_security::peer_identity(ext) {
            Some(Ok(id)) => Ok(id),
            Some(Err(e)) => Err(Status::permission_denied(e.to_string())),
            None => Err(Status::unauthenticated(
                "a client certificate from the cell's CA is required",
            )),
        }
    }
}

/// The layer: wraps a server's routes with [`Policy`]; without one (plaintext)
/// every call passes.
#[derive(Clone)]
pub struct AccessLayer {
    policy: Option<Arc<Policy>>,
}

impl AccessLayer {
    pub fn new(policy: Option<Policy>) -> AccessLayer {
        AccessLayer {
            policy: policy.map(Arc::new),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Access<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verdict = match &self.policy {
            None => Ok(()),
            Some(policy) => {
                Policy::caller(req.extensions()).and_then(|id| policy.check(&id, req.uri().path()))
            }
        };
        match verdict {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cell: &str) -> Identity {
        Identity::Member {
            cell: cell.into(),
            id: 1,
        }
    }

    #[test]
    fn the_peer_port_admits_only_its_own_members() {
        let p = Policy::new("alpha", CellRole::Tenants, Port::Peer);
        let path = "/cellplane.raft.v1.Raft/AppendEntries";
        assert!(p.check(&member("alpha"), path).is_ok());
        for other in [
            member("beta"),
            Identity::Router(1),
            Identity::Operator("o".into()),
            Identity::Tenant("a".into()),
        ] {
            let e = p.check(&other, path).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{other}");
        }
    }

    #[test]
    fn tenants_never_call_a_member_and_routers_only_read_the_directory() {
        let cell = Policy::new("alpha", CellRole::Tenants, Port::Client);
        let put = "/etcdserverpb.KV/Put";
        assert!(cell.check(&Identity::Router(1), put).is_ok());
        assert!(cell.check(&Identity::Operator("o".into()), put).is_ok());
        let e = cell.check(&Identity::Tenant("a".into()), put).unwrap_err();
        assert!(e.message().contains("through a router"), "{}", e.message());
        assert!(cell.check(&member("beta"), put).is_err());
        for op in OPERATOR_ONLY {
            let e = cell.check(&Identity::Router(1), op).unwrap_err();
            assert!(e.message().contains("operator"), "{}", e.message());
            assert!(cell.check(&Identity::Operator("o".into()), op).is_ok());
        }

        let dir = Policy::new("directory", CellRole::Directory, Port::Client);
        assert!(
            dir.check(&Identity::Router(1), "/etcdserverpb.KV/Range")
                .is_ok()
        );
        assert!(
            dir.check(&Identity::Router(1), "/etcdserverpb.Watch/Watch")
                .is_ok()
        );
        for write in [put, "/etcdserverpb.KV/Txn", "/etcdserverpb.KV/DeleteRange"] {
            assert!(dir.check(&Identity::Router(1), write).is_err(), "{write}");
        }
        assert!(dir.check(&Identity::Operator("o".into()), put).is_ok());
    }
}
