//! Which tenants a cell serves, in the cell's own replicated state.
//!
//! A cell learns the cell map (`cellplane-map`) through Raft ([`Command::LearnMap`],
//! pushed by `cellplane map` and `cellplane up`), and from then on applies a
//! write of tenant T only if that map sends T to this cell. The check runs at
//! apply, so every member reaches the same verdict for the same entry, and a
//! router on a stale map (or none: a static file) cannot put acknowledged data
//! into a cell that does not own the tenant: the write is refused with
//! [`KvError::NotOwned`], naming the cell that does.
//!
//! What is checked:
//! - A tenant's key is `/T/…` with a first segment that is not empty and does
//!   not start with `_` (names starting with `_` are the system's, as
//!   `/_cellplane/…`); other keys belong to no tenant and are never refused.
//! - Writes (put, delete, every op and compare of a txn, a tenant's lease grant)
//!   are checked at apply; linearizable reads and watch creates against the
//!   state the member has applied when they are served.
//! - A write whose range may span several tenants' namespaces is refused once
//!   the cell owns tenants by map: there is no way to know that every tenant in
//!   it is owned. Reads may span tenants (an operator looking at a cell).
//!
//! A cell that has never learned a map serves every tenant: that is a fresh
//! environment before its map is pushed, and a data directory from before
//! ownership existed. `cellplane up` pushes `cells/routing.toml` (or the
//! directory's newer map) into every cell before any router starts.

use std::sync::Arc;

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::{TxnRequest, request_op};
use serde::{Deserialize, Serialize};

use crate::error::KvError;

/// What a cell knows of its tenants: the map it last learned, and its own name
/// in it.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    learned: Option<Learned>,
}

#[derive(Debug, Clone)]
struct Learned {
    cell: String,
    map: Arc<CellMap>,
}

/// How a learned map is stored (in the `owner` column family, so it travels
/// with Raft snapshots).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredOwnership {
    pub cell: String,
    #[serde(with = "serde_bytes")]
    pub map: Vec<u8>,
}

/// Whether a key range stays in one tenant's namespace.
#[derive(Debug, PartialEq, Eq)]
enum Reach<'a> {
    /// No tenant's key is in it (system keys, keys without a leading `/`).
    NoTenant,
    One(&'a str),
    /// It may hold keys of several tenants.
    Several,
}

impl Ownership {
    /// Ownership by `map`, for the cell named `cell`.
    pub fn of(cell: &str, map: CellMap) -> Ownership {
        Ownership {
            learned: Some(Learned {
                cell: cell.to_string(),
                map: Arc::new(map),
            }),
        }
    }

    /// The version of the map learned, if any.
    pub fn map_version(&self) -> Option<u64> {
        self.learned.as_ref().map(|l| l.map.version)
    }

    /// Reads the stored form back; `Storage` if it does not parse (it was
    /// validated when it was learned).
    pub(crate) fn from_stored(bytes: &[u8]) -> Result<Ownership, KvError> {
        let stored: StoredOwnership = postcard::from_bytes(bytes)
            .map_err(|e| KvError::Storage(format!("corrupt ownership record: {e}")))?;
        let map = CellMap::from_json(&stored.map)
            .map_err(|e| KvError::Storage(format!("corrupt ownership record: {e}")))?;
        Ok(Ownership::of(&stored.cell, map))
    }

    /// The successor of this ownership after cell `cell` learns `map_json`:
    /// refused if the map does not parse, does not name `cell`, or is older
    /// than the one learned (the same version again is accepted only as the
    /// same map, so pushing a map twice is harmless).
    pub(crate) fn learn(&self, cell: &str, map_json: &[u8]) -> Result<Ownership, KvError> {
        let map = CellMap::from_json(map_json)
            .map_err(|e| KvError::Invalid(format!("the cell map does not validate: {e}")))?;
        if !map.cells.iter().any(|c| c.name == cell) {
            return Err(KvError::Invalid(format!(
                "the cell map (version {}) names no cell {cell}: add the cell to the map \
                 before pushing it to the cell",
                map.version
            )));
        }
        if let Some(l) = &self.learned {
            let stale =
                map.version < l.map.version || map.version == l.map.version && map != *l.map;
            if stale {
                return Err(KvError::StaleMap {
                    have: l.map.version,
                    got: map.version,
                });
            }
        }
        Ok(Ownership::of(cell, map))
    }

    /// Refuses tenant `tenant` unless this cell owns it.
    pub fn check_tenant(&self, tenant: &str) -> Result<(), KvError> {
        let Some(l) = &self.learned else {
            return Ok(());
        };
        match l.map.cell_for(tenant) {
            Some(c) if c.name == l.cell => Ok(()),
            other => Err(KvError::NotOwned {
                tenant: tenant.to_string(),
                cell: other.map_or_else(String::new, |c| c.name.clone()),
                version: l.map.version,
            }),
        }
    }

    /// Checks a write of `[key, range_end)` (`range_end` empty: one key).
    pub fn check_write(&self, key: &[u8], range_end: &[u8]) -> Result<(), KvError> {
        if self.learned.is_none() {
            return Ok(());
        }
        match reach(key, range_end) {
            Reach::NoTenant => Ok(()),
            Reach::One(t) => self.check_tenant(t),
            Reach::Several => Err(KvError::Invalid(format!(
                "a write may touch one tenant's keys at a time in a cell that owns tenants by \
                 map, and [{}, {}) may span several tenants: write each tenant's range \
                 (`/T/` to `/T0`) on its own",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(range_end)
            ))),
        }
    }

    /// Checks a linearizable read of `[key, range_end)`: one tenant's range must
    /// be owned; a range over several is an operator's look at the cell.
    pub fn check_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), KvError> {
        match reach(key, range_end) {
            Reach::One(t) => self.check_tenant(t),
            Reach::NoTenant | Reach::Several => Ok(()),
        }
    }

    /// Checks every key a txn compares, reads or writes (nested txns too).
    pub fn check_txn(&self, txn: &TxnRequest) -> Result<(), KvError> {
        if self.learned.is_none() {
            return Ok(());
        }
        for c in &txn.compare {
            self.check_read(&c.key, &c.range_end)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    self.check_read(&r.key, &r.range_end)?
                }
                Some(request_op::Request::RequestPut(p)) => self.check_write(&p.key, b"")?,
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    self.check_write(&d.key, &d.range_end)?
                }
                Some(request_op::Request::RequestTxn(t)) => self.check_txn(t)?,
                None => {}
            }
        }
        Ok(())
    }
}

/// The tenant whose namespace `key` is in: `/T/…` with `T` not empty and not
/// starting with `_`.
fn tenant_of(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(b"/")?;
    let end = rest.iter().position(|b| *b == b'/')?;
    let name = &rest[..end];
    if name.is_empty() || name[0] == b'_' {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// Which tenants' namespaces `[key, range_end)` may reach (etcd's range
/// conventions: empty end is one key, `"\0"` is every key from `key` on).
fn reach<'a>(key: &'a [u8], range_end: &[u8]) -> Reach<'a> {
    if range_end.is_empty() {
        return tenant_of(key).map_or(Reach::NoTenant, Reach::One);
    }
    let unbounded = range_end == [0];
    if let Some(t) = tenant_of(key) {
        let ns_end = cellplane_proto::prefix_end(&key[..t.len() + 2]);
        if !unbounded && range_end <= ns_end.as_slice() {
            return Reach::One(t);
        }
        return Reach::Several;
    }
    // Tenant keys are those from "/" + a byte other than "/" and "_", up to "0"
    // (the end of the "/" prefix): a range missing that whole space, or inside
    // the system's "/_" part of it, reaches no tenant.
    let below = !unbounded && range_end <= b"/".as_slice();
    let above = key >= b"0".as_slice();
    let system = key >= b"/_".as_slice() && !unbounded && range_end <= b"/`".as_slice();
    let empty_segment = key >= b"//".as_slice() && !unbounded && range_end <= b"/0".as_slice();
    if below || above || system || empty_segment {
        Reach::NoTenant
    } else {
        Reach::Several
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_map::{BucketRange, CellEntry, CellState};

    fn map(version: u64, overrides: &[(&str, &str)]) -> CellMap {
        CellMap {
            version,
            buckets: 16,
            cells: ["a", "b"]
                .iter()
                .map(|n| CellEntry {
                    name: n.to_string(),
                    endpoints: vec![format!("{n}:2379")],
                    state: CellState::Active,
                })
                .collect(),
            ranges: vec![
                BucketRange {
                    from: 0,
                    to: 7,
                    cell: "a".into(),
                },
                BucketRange {
                    from: 8,
                    to: 15,
                    cell: "b".into(),
                },
            ],
            tenants: overrides
                .iter()
                .map(|(t, c)| (t.to_string(), c.to_string()))
                .collect(),
        }
    }

    #[test]
    fn keys_name_their_tenant_and_ranges_their_reach() {
        assert_eq!(tenant_of(b"/acme/x"), Some("acme"));
        assert_eq!(tenant_of(b"/acme/"), Some("acme"));
        for none in [
            &b"/acme"[..],
            b"acme/x",
            b"/_cellplane/x",
            b"//x",
            b"",
            b"/",
        ] {
            assert_eq!(tenant_of(none), None, "{none:?}");
        }
        assert_eq!(reach(b"/acme/a", b"/acme/z"), Reach::One("acme"));
        assert_eq!(reach(b"/acme/", b"/acme0"), Reach::One("acme"));
        assert_eq!(reach(b"/acme/", b"/acme1"), Reach::Several);
        assert_eq!(reach(b"/acme/", b"\0"), Reach::Several);
        assert_eq!(reach(b"/", b"\0"), Reach::Several);
        assert_eq!(reach(b"", b"\0"), Reach::Several);
        assert_eq!(reach(b"/_cellplane/", b"/_cellplane0"), Reach::NoTenant);
        assert_eq!(reach(b"a", b"b"), Reach::NoTenant);
        assert_eq!(reach(b"0", b"\0"), Reach::NoTenant);
        assert_eq!(reach(b"", b"/"), Reach::NoTenant);
        assert_eq!(reach(b"/_", b"/a"), Reach::Several);
    }

    #[test]
    fn a_cell_serves_what_its_map_sends_it_and_names_the_owner_otherwise() {
        let open = Ownership::default();
        open.check_write(b"/t/x", b"").unwrap();
        open.check_write(b"", b"\0").unwrap();

        let m = map(3, &[("pinned", "b")]);
        let own = Ownership::default().learn("a", &m.to_json()).unwrap();
        let (mine, theirs) = (0..1000)
            .map(|i| format!("t{i}"))
            .fold((None, None), |(a, b), t| {
                match m.cell_for(&t).unwrap().name.as_str() {
                    "a" => (a.or(Some(t)), b),
                    _ => (a, b.or(Some(t))),
                }
            });
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        own.check_tenant(&mine).unwrap();
        own.check_write(format!("/{mine}/k").as_bytes(), b"")
            .unwrap();
        match own.check_write(format!("/{theirs}/k").as_bytes(), b"") {
            Err(KvError::NotOwned {
                tenant,
                cell,
                version,
            }) => {
                assert_eq!(
                    (tenant.as_str(), cell.as_str(), version),
                    (theirs.as_str(), "b", 3)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            own.check_tenant("pinned"),
            Err(KvError::NotOwned { .. })
        ));
        // System keys are nobody's; a write over several tenants is refused,
        // a read over several is not.
        own.check_write(b"/_cellplane/x", b"").unwrap();
        assert!(matches!(
            own.check_write(b"/", b"\0"),
            Err(KvError::Invalid(_))
        ));
        own.check_read(b"/", b"\0").unwrap();
        let err = own.check_read(format!("/{theirs}/").as_bytes(), b"\0");
        assert!(err.is_ok(), "{err:?}");
    }

    #[test]
    fn maps_are_learned_forward_only_and_only_by_cells_they_name() {
        let own = Ownership::default()
            .learn("a", &map(3, &[]).to_json())
            .unwrap();
        assert!(matches!(
            own.learn("a", &map(2, &[]).to_json()),
            Err(KvError::StaleMap { have: 3, got: 2 })
        ));
        own.learn("a", &map(3, &[]).to_json()).unwrap();
        assert!(matches!(
            own.learn("a", &map(3, &[("x", "b")]).to_json()),
            Err(KvError::StaleMap { .. })
        ));
        let next = own.learn("a", &map(4, &[("x", "b")]).to_json()).unwrap();
        assert_eq!(next.map_version(), Some(4));
        assert!(matches!(
            own.learn("c", &map(5, &[]).to_json()),
            Err(KvError::Invalid(_))
        ));
        assert!(matches!(own.learn("a", b"{"), Err(KvError::Invalid(_))));
    }
}
