//! The routing core every service goes through: (identity, request) → a checked
//! scope and a cell, then a call to that cell through [`crate::cell_client`].
//!
//! 1. [`Core::caller`]: who is calling ([`crate::auth`]) and what tenant the
//!    metadata names.
//! 2. [`Core::admit`] and its siblings: the scope ([`crate::scope`], where every
//!    tenant rule lives) and the route ([`crate::routes`]) in the map in force.
//! 3. [`Admitted::unary`] / [`Admitted::open_stream`]: the call, carrying the
//!    tenant to the cell and the cell's name back to the client.
//! 4. A cell that does not own the tenant refuses a call with FAILED_PRECONDITION
//!    and names the cell that does (`cellplane-moved-to`, at map version
//!    `cellplane-map-version`): [`Admitted::unary`] then retries once, on the
//!    cell its map sends the tenant to once it holds that version (it waits up to
//!    [`MOVED_MAP_WAIT`] for the directory's), else on the cell named. A refusal
//!    is never an executed request (cells check ownership before they apply or
//!    read), so writes retry safely.
//!
//! No service resolves a tenant or picks a cell on its own.

use std::sync::Arc;
use std::time::Duration;

use cellplane_security::Identity;
use prost::bytes::Bytes;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;
use crate::cell_client::{CallKind, CellClient, CellStream, Cells, StreamKind};
use crate::map_source::MapHolder;
use crate::routes::{self, Route};
use crate::scope::{self, Action, Scope, TENANT_METADATA};

/// The response (and request, for operator actions) metadata naming a cell.
pub const CELL_METADATA: &str = "cellplane-cell";

/// Who is calling, and which tenant its metadata names (checked as a name only).
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub header: Option<String>,
    /// The `cellplane-cell` metadata, for operators' cell-wide actions.
    pub cell: Option<String>,
}

/// How long a call refused by a cell that names a newer map waits for the
/// directory to hand this router that map before following the cell's hint.
pub const MOVED_MAP_WAIT: Duration = Duration::from_secs(1);

/// How long a call waits before retrying a cell whose map is older than this
/// router's (the operator pushes a map to the directory, then to the cells).
const CELL_BEHIND_WAIT: Duration = Duration::from_millis(200);

/// A request that passed the checks: for whom it acts and the cell that serves it.
pub struct Admitted {
    pub scope: Scope,
    pub cell: CellClient,
    reroute: Reroute,
}

/// What a refused call needs to find the right cell.
#[derive(Clone)]
struct Reroute {
    maps: MapHolder,
    cells: Arc<Cells>,
}

/// A cell's refusal of a tenant it does not own.
#[derive(Debug, PartialEq, Eq)]
struct Moved {
    /// The cell the refusing cell's map sends the tenant to.
    to: String,
    /// That map's version.
    version: u64,
    /// The tenant refused (named for a call about a lease by ID).
    tenant: Option<String>,
}

impl Moved {
    fn of(s: &Status) -> Option<Moved> {
        if s.code() != tonic::Code::FailedPrecondition {
            return None;
        }
        let to = s
            .metadata()
            .get(cellplane_map::MOVED_TO_METADATA)?
            .to_str()
            .ok()?;
        let version = s
            .metadata()
            .get(cellplane_map::MAP_VERSION_METADATA)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        let tenant = s
            .metadata()
            .get(cellplane_map::MOVED_TENANT_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Some(Moved {
            to: to.to_string(),
            version,
            tenant,
        })
    }
}

impl Reroute {
    /// The cell to retry on after `refused_by` refused `tenant`, if any.
    async fn after(&self, tenant: &str, refused_by: &str, moved: &Moved) -> Option<CellClient> {
        let mut maps = self.maps.subscribe();
        let _ = tokio::time::timeout(
            MOVED_MAP_WAIT,
            maps.wait_for(|m| m.map.version >= moved.version),
        )
        .await;
        let map = self.maps.current().map;
        let by_map = routes::for_tenant(&map, tenant).ok()?.cell;
        let target = if map.version > moved.version && by_map == refused_by {
            // The cell has not learned the map this router routes by yet.
            tokio::time::sleep(CELL_BEHIND_WAIT).await;
            by_map
        } else if map.version >= moved.version {
            by_map
        } else {
            // The directory did not answer in time: the cell knows better.
            moved.to.clone()
        };
        if target == refused_by && map.version <= moved.version {
            return None;
        }
        tracing::debug!(tenant, refused_by, to = %target, version = moved.version, "retrying a call on the tenant's cell");
        self.cells.get(&target)
    }
}

pub struct Core {
    maps: MapHolder,
    cells: Arc<Cells>,
    auth: Arc<Authenticator>,
}

impl Core {
    pub fn new(maps: MapHolder, cells: Arc<Cells>, auth: Arc<Authenticator>) -> Arc<Core> {
        Arc::new(Core { maps, cells, auth })
    }

    pub fn cells(&self) -> &Arc<Cells> {
        &self.cells
    }

    /// Who sent `req`, and what its metadata asks for.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.caller_of(req.extensions(), req.metadata())
    }

    pub fn caller_of(&self, ext: &tonic::Extensions, meta: &MetadataMap) -> Result<Caller, Status> {
        let identity = self.auth.identify(ext, meta)?;
        let header = scope::metadata_tenant(meta.get(TENANT_METADATA).map(|v| v.as_bytes()))?;
        let cell = match meta.get(CELL_METADATA) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::invalid_argument("`cellplane-cell` must be ASCII"))?
                    .to_string(),
            ),
            None => None,
        };
        Ok(Caller {
            identity,
            header,
            cell,
        })
    }

    fn client(&self, route: &Route) -> Result<CellClient, Status> {
        self.cells.get(&route.cell).ok_or_else(|| {
            Status::unavailable(format!(
                "cell {}: no connection pool (endpoints invalid?)",
                route.cell
            ))
        })
    }

    /// Checks what `caller` touches and finds the cell of its tenant.
    pub fn admit(&self, caller: &Caller, action: Action<'_>) -> Result<Admitted, Status> {
        let scope = scope::scope(&caller.identity, caller.header.as_deref(), action)?;
        let map = self.maps.current().map;
        let route = match &scope {
            Scope::Tenant(t) => routes::for_tenant(&map, t)?,
            Scope::Operator => {
                routes::for_operator(&map, caller.cell.as_deref(), caller.header.as_deref())?
            }
            Scope::Unscoped => {
                return Err(Status::invalid_argument(
                    "the request names no tenant: set the `cellplane-tenant` metadata \
                     (`--tenant T` in the cellplane CLI), or authenticate as the tenant",
                ));
            }
        };
        let cell = self.client(&route)?;
        Ok(Admitted {
            scope,
            cell,
            reroute: self.reroute(),
        })
    }

    fn reroute(&self) -> Reroute {
        Reroute {
            maps: self.maps.clone(),
            cells: self.cells.clone(),
        }
    }

    /// A call about lease `id`: acts for the caller's tenant in the tenant's
    /// cell (a lease moves with its tenant, keeping its ID), or, unscoped (auth
    /// off and no metadata), in the cell whose tag the ID carries, which points
    /// on to the tenant's cell while it still holds a moved lease. `Ok(None)`
    /// when no cell of the map carries the tag: the lease exists nowhere.
    pub fn admit_lease(&self, caller: &Caller, id: i64) -> Result<Option<Admitted>, Status> {
        let scope = scope::scope(&caller.identity, caller.header.as_deref(), Action::Tenant)?;
        let map = self.maps.current().map;
        let route = match &scope {
            Scope::Tenant(t) => routes::for_tenant(&map, t)?,
            _ => match routes::for_lease(&map, id) {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        let cell = self.client(&route)?;
        Ok(Some(Admitted {
            scope,
            cell,
            reroute: self.reroute(),
        }))
    }

    /// The scope of a tenant-wide call without a key (a lease list).
    pub fn tenant_scope(&self, caller: &Caller) -> Result<Scope, Status> {
        Ok(scope::scope(
            &caller.identity,
            caller.header.as_deref(),
            Action::Tenant,
        )?)
    }
}

impl Admitted {
    /// Calls `path` on the cell for this scope's tenant; the answer, or the
    /// error, carries the cell's name.
    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        req: &Req,
        kind: CallKind,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let answer = self
            .unary_raw(path, req.encode_to_vec().into(), kind)
            .await?;
        let (meta, bytes, ext) = answer.into_parts();
        let body = Resp::decode(bytes).map_err(|e| {
            let cell = meta.get(CELL_METADATA).and_then(|v| v.to_str().ok());
            Status::internal(format!(
                "cell {}: undecodable answer to {path}: {e}",
                cell.unwrap_or("?")
            ))
        })?;
        Ok(Response::from_parts(meta, body, ext))
    }

    /// [`Admitted::unary`] on an encoded request, answering the cell's encoded
    /// response as it came: the router forwards KV calls without decoding more
    /// than their keys ([`crate::services::kv`]).
    pub async fn unary_raw(
        &self,
        path: &'static str,
        body: Bytes,
        kind: CallKind,
    ) -> Result<Response<Bytes>, Status> {
        let tenant = self.scope.tenant();
        let mut cell = self.cell.clone();
        let mut retried = false;
        loop {
            match cell.unary_raw(path, body.clone(), kind, tenant).await {
                Ok(r) => return Ok(with_cell(r, cell.name())),
                Err(mut s) => {
                    let moved = Moved::of(&s);
                    let refused = tenant.or(moved.as_ref().and_then(|m| m.tenant.as_deref()));
                    if !retried
                        && let (Some(t), Some(moved)) = (refused, &moved)
                        && let Some(next) = self.reroute.after(t, cell.name(), moved).await
                    {
                        retried = true;
                        cell = next;
                        continue;
                    }
                    if let Ok(v) = MetadataValue::try_from(cell.name()) {
                        s.metadata_mut().insert(CELL_METADATA, v);
                    }
                    return Err(s);
                }
            }
        }
    }

    /// Opens stream `path` on the cell with `first` as its first request.
    pub async fn open_stream<Req: prost::Message>(
        &self,
        path: &'static str,
        kind: StreamKind,
        first: &Req,
    ) -> Result<CellStream, Status> {
        self.cell
            .open_stream(
                path,
                kind,
                first.encode_to_vec().into(),
                self.scope.tenant(),
            )
            .await
    }
}

/// `body` with the metadata naming the cell that served it.
pub fn with_cell<T>(body: T, cell: &str) -> Response<T> {
    let mut r = Response::new(body);
    if let Ok(v) = MetadataValue::try_from(cell) {
        r.metadata_mut().insert(CELL_METADATA, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell_client::PoolSettings;
    use crate::map_source::{ActiveMap, MapSource};

    fn core(dir: &std::path::Path) -> Arc<Core> {
        let map = crate::routes::tests::map();
        let maps = MapHolder::new(
            ActiveMap {
                map: Arc::new(map.clone()),
                source: MapSource::Static,
            },
            dir.to_path_buf(),
        );
        let cells = Cells::new(
            PoolSettings::default(),
            crate::config::RouterSettings::default().message_limits(),
            None,
            crate::metrics::CallMetrics::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        cells.reconcile(&map);
        Core::new(maps, cells, Arc::new(Authenticator::disabled()))
    }

    fn caller(identity: Identity, header: Option<&str>, cell: Option<&str>) -> Caller {
        Caller {
            identity,
            header: header.map(str::to_string),
            cell: cell.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn requests_are_admitted_to_their_tenants_cell_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        let b = caller(Identity::Tenant("b".into()), None, None);
        let a = core
            .admit(&b, Action::Keys(&[(b"/b/x", b""), (b"/b/", b"/b0")]))
            .unwrap();
        assert_eq!((a.scope.tenant(), a.cell.name()), (Some("b"), "beta"));
        let e = core
            .admit(&b, Action::Keys(&[(b"/a/x", b"")]))
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // Anonymous, auth off: the key names the tenant; no key and no header is
        // refused with what to do.
        let anon = caller(Identity::Anonymous, None, None);
        let a = core.admit(&anon, Action::Keys(&[(b"/x/k", b"")])).unwrap();
        assert_eq!(a.cell.name(), "alpha");
        let e = core.admit(&anon, Action::Tenant).err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("cellplane-tenant"), "{}", e.message());
    }

    #[tokio::test]
    async fn operators_name_the_cell_of_a_cell_wide_action() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        let op = caller(Identity::Operator("o".into()), None, Some("beta"));
        assert_eq!(
            core.admit(&op, Action::Operator).unwrap().cell.name(),
            "beta"
        );
        let op = caller(Identity::Operator("o".into()), Some("b"), None);
        assert_eq!(
            core.admit(&op, Action::Operator).unwrap().cell.name(),
            "beta"
        );
        let tenant = caller(Identity::Tenant("b".into()), None, Some("beta"));
        let e = core.admit(&tenant, Action::Operator).err().unwrap();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_lease_goes_to_its_tenants_cell_or_unscoped_to_the_cell_its_id_names() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        let with_tag = |cell: &str| {
            ((cellplane_map::lease_tag(cell) << cellplane_map::LEASE_TAG_SHIFT) | 7) as i64
        };
        let b = caller(Identity::Tenant("b".into()), None, None);
        // A tenant's lease is in its cell, whichever cell granted it (moved).
        for id in [with_tag("beta"), with_tag("alpha")] {
            let a = core.admit_lease(&b, id).unwrap().unwrap();
            assert_eq!((a.cell.name(), a.scope.tenant()), ("beta", Some("b")));
        }
        let anon = caller(Identity::Anonymous, None, None);
        let a = core.admit_lease(&anon, with_tag("alpha")).unwrap().unwrap();
        assert_eq!((a.cell.name(), &a.scope), ("alpha", &Scope::Unscoped));
        let nowhere = (0..0x7fffu64)
            .find(|t| {
                *t != cellplane_map::lease_tag("beta") && *t != cellplane_map::lease_tag("alpha")
            })
            .unwrap();
        let id = (nowhere << cellplane_map::LEASE_TAG_SHIFT) as i64;
        assert!(core.admit_lease(&anon, id).unwrap().is_none());
    }
}
