//! Where a request goes: the cell that serves a scope in the map in force.
//! Knows nothing of gRPC messages or of who is calling ([`crate::scope`] decided
//! that); only of the map.

use cellplane_map::{CellMap, lease_tag, lease_tag_of};
use tonic::Status;

/// A request's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub cell: String,
}

/// The cell serving `tenant`.
pub fn for_tenant(map: &CellMap, tenant: &str) -> Result<Route, Status> {
    let cell = map.cell_for(tenant).ok_or_else(|| {
        Status::internal(format!(
            "the cell map (version {}) has no cell for tenant {tenant:?}",
            map.version
        ))
    })?;
    Ok(Route {
        cell: cell.name.clone(),
    })
}

/// The cell holding lease `id`: the one whose tag the ID carries (IDs a cell
/// chooses carry its tag, see `cellplane_map::lease_tag`); `None` when no cell of
/// the map carries it, so the lease cannot exist anywhere this router knows.
pub fn for_lease(map: &CellMap, id: i64) -> Option<Route> {
    let tag = lease_tag_of(id);
    map.cells
        .iter()
        .find(|c| lease_tag(&c.name) == tag)
        .map(|c| Route {
            cell: c.name.clone(),
        })
}

/// The cell an operator's cell-wide action names: by cell name, else by one of
/// its tenants.
pub fn for_operator(
    map: &CellMap,
    cell: Option<&str>,
    tenant: Option<&str>,
) -> Result<Route, Status> {
    match (cell, tenant) {
        (Some(c), _) => map
            .cells
            .iter()
            .find(|e| e.name == c)
            .map(|e| Route {
                cell: e.name.clone(),
            })
            .ok_or_else(|| {
                Status::not_found(format!(
                    "the cell map (version {}) has no cell {c:?}",
                    map.version
                ))
            }),
        (None, Some(t)) => for_tenant(map, t),
        (None, None) => Err(Status::invalid_argument(
            "a cell-wide action names its cell: send the `cellplane-cell` metadata (or \
             `cellplane-tenant` for the cell of that tenant)",
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two cells, every bucket on alpha, tenant `b` pinned to beta.
    pub(crate) fn map() -> CellMap {
        CellMap::from_toml(
            r#"
version = 3
buckets = 8
[[cells]]
name = "alpha"
endpoints = ["127.0.0.1:1"]
[[cells]]
name = "beta"
endpoints = ["127.0.0.1:2"]
[[ranges]]
from = 0
to = 7
cell = "alpha"
[tenants]
b = "beta"
"#,
        )
        .unwrap()
    }

    #[test]
    fn tenants_overrides_and_leases_find_their_cells() {
        let m = map();
        assert_eq!(for_tenant(&m, "x").unwrap().cell, "alpha");
        assert_eq!(
            for_tenant(&m, "b").unwrap(),
            Route {
                cell: "beta".into()
            }
        );
        let id = ((lease_tag("beta") << cellplane_map::LEASE_TAG_SHIFT) | 12345) as i64;
        assert_eq!(for_lease(&m, id).unwrap().cell, "beta");
        let unknown = (0..0x7fffu64)
            .find(|t| *t != lease_tag("alpha") && *t != lease_tag("beta"))
            .unwrap();
        assert_eq!(
            for_lease(&m, (unknown << cellplane_map::LEASE_TAG_SHIFT) as i64),
            None
        );
    }

    #[test]
    fn operators_name_a_cell_or_a_tenant() {
        let m = map();
        assert_eq!(for_operator(&m, Some("beta"), None).unwrap().cell, "beta");
        assert_eq!(for_operator(&m, None, Some("b")).unwrap().cell, "beta");
        assert_eq!(
            for_operator(&m, Some("nope"), None).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            for_operator(&m, None, None).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
