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

use std::collections::BTreeMap;
use std::sync::Arc;

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::{TxnRequest, request_op};
use serde::{Deserialize, Serialize};

use crate::error::KvError;
use crate::types::Command;

/// The most tenants a cell may have moving in or out at once: each is an
/// operator's move, and the whole record is rewritten on every change.
pub const MAX_MOVES: usize = 1024;

/// What a cell knows of its tenants: the map it last learned (and its own name
/// in it), and the tenants moving out (fenced) or in.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    learned: Option<Learned>,
    /// Tenants fenced here while they move out: refused, naming where they go,
    /// until a map sending them there is learned (or the move is aborted).
    fenced: BTreeMap<String, Destination>,
    /// Tenants moving in: only the mover writes them, until a map sending them
    /// here is learned (or the move is aborted).
    incoming: BTreeMap<String, Destination>,
}

#[derive(Debug, Clone)]
struct Learned {
    cell: String,
    map: Arc<CellMap>,
}

/// The other side of a move, and the map version the move will publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub cell: String,
    pub version: u64,
}

/// A tenant moving, and the other cell of the move.
pub type TenantMove = (String, Destination);

/// How ownership is stored (one record in the `owner` column family, so it
/// travels with Raft snapshots).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredOwnership {
    /// The learned map: the cell's name and the map as JSON.
    learned: Option<(String, serde_bytes::ByteBuf)>,
    fenced: Vec<(String, Destination)>,
    incoming: Vec<(String, Destination)>,
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

/// A change of ownership, applied through Raft.
#[derive(Debug)]
pub(crate) enum Change<'a> {
    /// Learn a map (JSON).
    Learn(&'a [u8]),
    /// Fence an owned tenant that moves to `to`.
    Fence {
        tenant: &'a str,
        to: Destination,
    },
    Unfence(&'a str),
    /// Let the mover write a tenant that moves in from `from`.
    Expect {
        tenant: &'a str,
        from: Destination,
    },
    Forget(&'a str),
}

impl Ownership {
    /// Ownership by `map`, for the cell named `cell`.
    pub fn of(cell: &str, map: CellMap) -> Ownership {
        Ownership {
            learned: Some(Learned {
                cell: cell.to_string(),
                map: Arc::new(map),
            }),
            ..Ownership::default()
        }
    }

    /// The version of the map learned, if any.
    pub fn map_version(&self) -> Option<u64> {
        self.learned.as_ref().map(|l| l.map.version)
    }

    /// Tenants moving out (fenced here) and in, with the other cell.
    pub fn moves(&self) -> (Vec<TenantMove>, Vec<TenantMove>) {
        let list = |m: &BTreeMap<String, Destination>| {
            m.iter().map(|(t, d)| (t.clone(), d.clone())).collect()
        };
        (list(&self.fenced), list(&self.incoming))
    }

    /// Whether anything is checked at all: a cell that never learned a map and
    /// moves nothing serves every tenant.
    fn governs(&self) -> bool {
        self.learned.is_some() || !self.fenced.is_empty() || !self.incoming.is_empty()
    }

    pub(crate) fn to_stored(&self) -> StoredOwnership {
        StoredOwnership {
            learned: self
                .learned
                .as_ref()
                .map(|l| (l.cell.clone(), serde_bytes::ByteBuf::from(l.map.to_json()))),
            fenced: self.moves().0,
            incoming: self.moves().1,
        }
    }

    /// Reads the stored form back; `Storage` if it does not parse (it was
    /// validated when it was learned).
    pub(crate) fn from_stored(bytes: &[u8]) -> Result<Ownership, KvError> {
        let corrupt =
            |e: &dyn std::fmt::Display| KvError::Storage(format!("corrupt ownership record: {e}"));
        let stored: StoredOwnership = postcard::from_bytes(bytes).map_err(|e| corrupt(&e))?;
        let learned = match stored.learned {
            Some((cell, json)) => Some(Learned {
                cell,
                map: Arc::new(CellMap::from_json(&json).map_err(|e| corrupt(&e))?),
            }),
            None => None,
        };
        Ok(Ownership {
            learned,
            fenced: stored.fenced.into_iter().collect(),
            incoming: stored.incoming.into_iter().collect(),
        })
    }

    /// The successor of this ownership after `change` in cell `cell`.
    pub(crate) fn apply(&self, cell: &str, change: &Change<'_>) -> Result<Ownership, KvError> {
        let mut next = self.clone();
        match change {
            Change::Learn(json) => return self.learn(cell, json),
            Change::Fence { tenant, to } => {
                if self.fenced.get(*tenant) == Some(to) {
                    return Ok(next);
                }
                self.check_tenant(tenant)?;
                if to.cell == cell {
                    return Err(KvError::Invalid(format!(
                        "tenant {tenant} cannot move from cell {cell} to itself"
                    )));
                }
                self.room()?;
                next.fenced.insert(tenant.to_string(), to.clone());
            }
            Change::Unfence(tenant) => {
                next.fenced.remove(*tenant);
            }
            Change::Expect { tenant, from } => {
                if self.incoming.get(*tenant) == Some(from) {
                    return Ok(next);
                }
                if self.owns_by_map(tenant) {
                    return Err(KvError::Invalid(format!(
                        "cell {cell} already serves tenant {tenant}: nothing to move in"
                    )));
                }
                self.room()?;
                next.incoming.insert(tenant.to_string(), from.clone());
            }
            Change::Forget(tenant) => {
                next.incoming.remove(*tenant);
            }
        }
        Ok(next)
    }

    fn room(&self) -> Result<(), KvError> {
        if self.fenced.len() + self.incoming.len() >= MAX_MOVES {
            return Err(KvError::Invalid(format!(
                "the cell already has {MAX_MOVES} tenants moving in or out: finish or abort some"
            )));
        }
        Ok(())
    }

    /// After cell `cell` learns `map_json`: refused if the map does not parse,
    /// does not name `cell`, or is older than the one learned (the same version
    /// again is accepted only as the same map, so pushing a map twice is
    /// harmless). A move the map completes is forgotten on both sides.
    fn learn(&self, cell: &str, map_json: &[u8]) -> Result<Ownership, KvError> {
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
        let sends = |t: &str, to: &str| map.cell_for(t).is_some_and(|c| c.name == to);
        let fenced = self
            .fenced
            .iter()
            .filter(|(t, d)| !sends(t, &d.cell))
            .map(|(t, d)| (t.clone(), d.clone()))
            .collect();
        let incoming = self
            .incoming
            .iter()
            .filter(|(t, _)| !sends(t, cell))
            .map(|(t, d)| (t.clone(), d.clone()))
            .collect();
        Ok(Ownership {
            learned: Some(Learned {
                cell: cell.to_string(),
                map: Arc::new(map),
            }),
            fenced,
            incoming,
        })
    }

    /// Whether the learned map sends `tenant` here (no map: yes).
    fn owns_by_map(&self, tenant: &str) -> bool {
        match &self.learned {
            None => true,
            Some(l) => l.map.cell_for(tenant).is_some_and(|c| c.name == l.cell),
        }
    }

    /// Refuses tenant `tenant` unless this cell owns it.
    pub fn check_tenant(&self, tenant: &str) -> Result<(), KvError> {
        let refuse = |cell: &str, version: u64| KvError::NotOwned {
            tenant: tenant.to_string(),
            cell: cell.to_string(),
            version,
        };
        if let Some(to) = self.fenced.get(tenant) {
            return Err(refuse(&to.cell, to.version));
        }
        let version = self.map_version().unwrap_or(0);
        if let Some(from) = self.incoming.get(tenant) {
            return Err(refuse(&from.cell, version));
        }
        let Some(l) = &self.learned else {
            return Ok(());
        };
        match l.map.cell_for(tenant) {
            Some(c) if c.name == l.cell => Ok(()),
            other => Err(refuse(other.map_or("", |c| c.name.as_str()), version)),
        }
    }

    /// Checks a write of `[key, range_end)` (`range_end` empty: one key).
    pub fn check_write(&self, key: &[u8], range_end: &[u8]) -> Result<(), KvError> {
        if !self.governs() {
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

    /// The refusal for a watch of `[key, range_end)` whose tenant the learned
    /// map now sends elsewhere (a finished move); `None` while the cell serves
    /// the tenant, or fences it (a mover still tails it).
    pub fn moved_away(&self, key: &[u8], range_end: &[u8]) -> Option<KvError> {
        let Reach::One(t) = reach(key, range_end) else {
            return None;
        };
        if self.fenced.contains_key(t) || self.owns_by_map(t) {
            return None;
        }
        self.check_tenant(t).err()
    }

    /// Checks every key a txn compares, reads or writes (nested txns too).
    pub fn check_txn(&self, txn: &TxnRequest) -> Result<(), KvError> {
        if !self.governs() {
            return Ok(());
        }
        for_txn_keys(txn, &mut |key, end, write| {
            if write {
                self.check_write(key, end)
            } else {
                self.check_read(key, end)
            }
        })
    }

    /// Whether the mover may apply `cmd` for `tenant` here, bypassing the
    /// checks above: while the tenant moves in (the copy), or, once the cell
    /// does not own it, to delete its keys and revoke its leases (retiring the
    /// old copy, or aborting a move in). Every key `cmd` touches must be the tenant's.
    pub fn check_mover(&self, tenant: &str, cmd: &Command) -> Result<(), KvError> {
        let deletes_only = matches!(
            cmd,
            Command::DeleteRange(_) | Command::LeaseRevokeOwned { .. }
        );
        let allowed = self.incoming.contains_key(tenant)
            || deletes_only && !self.fenced.contains_key(tenant) && !self.owns_by_map(tenant);
        if !allowed {
            return Err(KvError::Invalid(format!(
                "the mover may write tenant {tenant} here only while it moves in, and delete \
                 it only once the cell no longer serves it"
            )));
        }
        let outside = || KvError::PermissionDenied;
        let within = |key: &[u8], end: &[u8]| match reach(key, end) {
            Reach::One(t) if t == tenant => Ok(()),
            _ => Err(outside()),
        };
        use prost::Message;
        let undecodable =
            |e: prost::DecodeError| KvError::Invalid(format!("undecodable command: {e}"));
        match cmd {
            Command::Put(b) => {
                let p = cellplane_proto::etcdserverpb::PutRequest::decode(b.as_slice())
                    .map_err(undecodable)?;
                within(&p.key, b"")
            }
            Command::DeleteRange(b) => {
                let d = cellplane_proto::etcdserverpb::DeleteRangeRequest::decode(b.as_slice())
                    .map_err(undecodable)?;
                within(&d.key, &d.range_end)
            }
            Command::Txn(b) => {
                let t = TxnRequest::decode(b.as_slice()).map_err(undecodable)?;
                for_txn_keys(&t, &mut |k, e, _| within(k, e))
            }
            Command::LeaseGrantOwned { owner, .. } | Command::LeaseRevokeOwned { owner, .. }
                if owner == tenant =>
            {
                Ok(())
            }
            _ => Err(KvError::Invalid(
                "the mover writes keys and leases of one tenant only".into(),
            )),
        }
    }
}

/// Calls `f(key, range_end, writes)` for every key a txn compares, reads or
/// writes, nested txns included; stops at the first error.
fn for_txn_keys(
    txn: &TxnRequest,
    f: &mut impl FnMut(&[u8], &[u8], bool) -> Result<(), KvError>,
) -> Result<(), KvError> {
    for c in &txn.compare {
        f(&c.key, &c.range_end, false)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => f(&r.key, &r.range_end, false)?,
            Some(request_op::Request::RequestPut(p)) => f(&p.key, b"", true)?,
            Some(request_op::Request::RequestDeleteRange(d)) => f(&d.key, &d.range_end, true)?,
            Some(request_op::Request::RequestTxn(t)) => for_txn_keys(t, f)?,
            None => {}
        }
    }
    Ok(())
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
    #[test]
    fn a_move_fences_the_source_lets_only_the_mover_write_the_destination_and_ends_with_the_map() {
        use prost::Message;
        let put = |k: &str| {
            Command::Put(
                cellplane_proto::etcdserverpb::PutRequest {
                    key: k.as_bytes().to_vec(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        let del = |k: &str| {
            Command::DeleteRange(
                cellplane_proto::etcdserverpb::DeleteRangeRequest {
                    key: k.as_bytes().to_vec(),
                    range_end: cellplane_proto::prefix_end(k.as_bytes()),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        let v3 = map(3, &[("t", "a")]);
        let v4 = map(4, &[("t", "b")]);
        let src = Ownership::default().learn("a", &v3.to_json()).unwrap();
        let dst = Ownership::default().learn("b", &v3.to_json()).unwrap();
        let to_b = Destination {
            cell: "b".into(),
            version: 4,
        };
        let from_a = Destination {
            cell: "a".into(),
            version: 4,
        };

        // Fence in the source: refused, naming the destination and version 4.
        let src = src
            .apply(
                "a",
                &Change::Fence {
                    tenant: "t",
                    to: to_b.clone(),
                },
            )
            .unwrap();
        match src.check_write(b"/t/k", b"") {
            Err(KvError::NotOwned { cell, version, .. }) => {
                assert_eq!((cell.as_str(), version), ("b", 4))
            }
            other => panic!("{other:?}"),
        }
        // Only an owned tenant can be fenced; fencing twice is harmless.
        assert!(
            dst.apply(
                "b",
                &Change::Fence {
                    tenant: "t",
                    to: to_b.clone()
                }
            )
            .is_err()
        );
        src.apply(
            "a",
            &Change::Fence {
                tenant: "t",
                to: to_b.clone(),
            },
        )
        .unwrap();

        // The destination: the mover writes t, nobody else does, and nothing
        // outside t.
        let dst = dst
            .apply(
                "b",
                &Change::Expect {
                    tenant: "t",
                    from: from_a.clone(),
                },
            )
            .unwrap();
        assert!(dst.check_write(b"/t/k", b"").is_err());
        dst.check_mover("t", &put("/t/k")).unwrap();
        assert!(matches!(
            dst.check_mover("t", &put("/u/k")),
            Err(KvError::PermissionDenied)
        ));
        assert!(
            src.check_mover("t", &put("/t/k")).is_err(),
            "the source is fenced"
        );
        assert!(
            src.check_mover("t", &del("/t/")).is_err(),
            "no delete while fenced"
        );

        // The map of version 4 ends the move on both sides.
        let src = src.learn("a", &v4.to_json()).unwrap();
        let dst = dst.learn("b", &v4.to_json()).unwrap();
        assert_eq!((src.moves().0.len(), dst.moves().1.len()), (0, 0));
        dst.check_write(b"/t/k", b"").unwrap();
        assert!(src.check_write(b"/t/k", b"").is_err());
        // The old copy is deleted by the mover only, its leases revoked.
        src.check_mover("t", &del("/t/")).unwrap();
        assert!(src.check_mover("t", &put("/t/k")).is_err());
        let revoke = |owner: &str| Command::LeaseRevokeOwned {
            id: 7,
            owner: owner.into(),
        };
        src.check_mover("t", &revoke("t")).unwrap();
        assert!(src.check_mover("t", &revoke("u")).is_err());
        assert!(dst.check_tenant("t").is_ok() && dst.check_mover("t", &revoke("t")).is_err());

        // The record survives a restart.
        let enc = postcard::to_stdvec(
            &dst.apply(
                "b",
                &Change::Expect {
                    tenant: "x",
                    from: from_a,
                },
            )
            .unwrap()
            .to_stored(),
        )
        .unwrap();
        let back = Ownership::from_stored(&enc).unwrap();
        assert_eq!(back.moves().1.len(), 1);
        assert_eq!(back.map_version(), Some(4));
    }
}
