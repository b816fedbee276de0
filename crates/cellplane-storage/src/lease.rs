//! Leases in the `lease` column family: what exists and which keys each one holds.
//!
//! Only the granted TTL is stored. When a lease expires is the leader's business
//! (an in-memory deadline, refreshed to a full TTL on a new leader, as etcd does):
//! expiry reaches the store as a [`crate::Command::LeaseRevoke`] like any client
//! revoke, so every member deletes the same keys at the same revision.
//!
//! A lease granted through a router belongs to the tenant the router named: its
//! owner is stored with it, and a key attached to it must lie in the owner's
//! namespace (see [`tenant_namespace`]). Leases granted on a cell directly have no
//! owner and behave as before owners existed.

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};

use crate::db::{CF_LEASE, Store};
use crate::error::KvError;
use crate::mvcc::KvReader;

/// Largest TTL a lease may be granted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A lease and the keys attached to it.
pub type LeaseWithKeys = (LeaseRecord, Vec<Vec<u8>>);

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The TTL granted, in seconds.
    pub ttl: i64,
    /// The tenant that granted it through a router; `None` for a lease granted on
    /// the cell directly (an operator's), or stored before owners were recorded.
    pub owner: Option<String>,
}

/// The record as stored before owners existed. postcard is not self-describing,
/// so those bytes (the TTL alone) do not decode as a [`LeaseRecord`]: they are
/// read with this.
#[derive(Deserialize)]
struct LeaseRecordV1 {
    ttl: i64,
}

impl LeaseRecord {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, KvError> {
        postcard::to_stdvec(self).map_err(|e| KvError::Storage(e.to_string()))
    }

    /// Decodes a stored record, of either format. The two cannot be confused: the
    /// old one is the TTL and nothing more, the new one has at least the owner's
    /// option tag after it, and each must use every byte.
    pub(crate) fn decode(b: &[u8]) -> Result<LeaseRecord, KvError> {
        if let Ok((rec, [])) = postcard::take_from_bytes::<LeaseRecord>(b) {
            return Ok(rec);
        }
        match postcard::take_from_bytes::<LeaseRecordV1>(b) {
            Ok((old, [])) => Ok(LeaseRecord {
                ttl: old.ttl,
                owner: None,
            }),
            _ => Err(KvError::Storage("corrupt lease record".into())),
        }
    }

    /// Whether `tenant` may use this lease: always for a lease without an owner
    /// (an operator's call may use any lease too: see the cell).
    pub fn owned_by(&self, tenant: &str) -> bool {
        self.owner.as_deref() == Some(tenant)
    }
}

/// Tenant `tenant`'s key namespace, `[/T/, prefix_end(/T/))`, as the router
/// assigns keys to tenants.
pub fn tenant_namespace(tenant: &str) -> (Vec<u8>, Vec<u8>) {
    let start = format!("/{tenant}/").into_bytes();
    (start.clone(), prefix_end(&start))
}

use cellplane_proto::prefix_end;

/// Whether `key` lies in `tenant`'s namespace.
pub(crate) fn in_namespace(tenant: &str, key: &[u8]) -> bool {
    let (start, end) = tenant_namespace(tenant);
    key >= start.as_slice() && key < end.as_slice()
}

const LEASE_TAG: u8 = b'l';
const KEY_TAG: u8 = b'k';

pub(crate) fn lease_key(id: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE_TAG;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The index entry saying `key` is attached to lease `id`.
pub(crate) fn attached_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(KEY_TAG);
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The keys attached to lease `id` in the store (committed state only).
pub(crate) fn attached_keys(
    store: &Store,
    opts: ReadOptions,
    id: i64,
) -> Result<Vec<Vec<u8>>, KvError> {
    let prefix = attached_key(id, b"");
    let mut keys = Vec::new();
    for item in store.db.iterator_cf_opt(
        store.cf(CF_LEASE),
        opts,
        IteratorMode::From(&prefix, Direction::Forward),
    ) {
        let (k, _) = item?;
        if !k.starts_with(&prefix) {
            break;
        }
        keys.push(k[prefix.len()..].to_vec());
    }
    Ok(keys)
}

pub(crate) fn read_lease(
    store: &Store,
    opts: &ReadOptions,
    id: i64,
) -> Result<Option<LeaseRecord>, KvError> {
    match store
        .db
        .get_cf_opt(store.cf(CF_LEASE), lease_key(id), opts)?
    {
        Some(b) => Ok(Some(LeaseRecord::decode(&b)?)),
        None => Ok(None),
    }
}

impl KvReader {
    /// The lease `id`, if it exists.
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRecord>, KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        read_lease(&self.store, &opts, id)
    }

    /// The lease `id` and the keys attached to it, read from one snapshot.
    pub fn lease_with_keys(&self, id: i64) -> Result<Option<LeaseWithKeys>, KvError> {
        let snap = self.store.read_view()?;
        let opts = || {
            let mut o = ReadOptions::default();
            o.set_snapshot(&snap);
            o
        };
        let Some(rec) = read_lease(&self.store, &opts(), id)? else {
            return Ok(None);
        };
        Ok(Some((rec, attached_keys(&self.store, opts(), id)?)))
    }

    /// Every lease, by id.
    pub fn leases(&self) -> Result<Vec<(i64, LeaseRecord)>, KvError> {
        let snap = self.store.read_view()?;
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        let mut out = Vec::new();
        for item in self.store.db.iterator_cf_opt(
            self.store.cf(CF_LEASE),
            opts,
            IteratorMode::From(&[LEASE_TAG], Direction::Forward),
        ) {
            let (k, v) = item?;
            if k.first() != Some(&LEASE_TAG) {
                break;
            }
            let id = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| KvError::Storage("corrupt lease key".into()))?;
            out.push((id, LeaseRecord::decode(&v)?));
        }
        Ok(out)
    }

    /// The leases `tenant` owns, by id.
    pub fn leases_of(&self, tenant: &str) -> Result<Vec<(i64, LeaseRecord)>, KvError> {
        let mut all = self.leases()?;
        all.retain(|(_, r)| r.owned_by(tenant));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stored_before_owners_existed_still_decode() {
        // The old format: a struct of the TTL alone.
        #[derive(Serialize)]
        struct Old {
            ttl: i64,
        }
        for ttl in [2, 60, MAX_LEASE_TTL] {
            let old = postcard::to_stdvec(&Old { ttl }).unwrap();
            assert_eq!(
                LeaseRecord::decode(&old).unwrap(),
                LeaseRecord { ttl, owner: None }
            );
        }
        for owner in [None, Some("a".to_string()), Some("tenant-7".to_string())] {
            let rec = LeaseRecord { ttl: 60, owner };
            assert_eq!(LeaseRecord::decode(&rec.encode().unwrap()).unwrap(), rec);
        }
        assert!(LeaseRecord::decode(&[]).is_err());
        let mut trailing = LeaseRecord {
            ttl: 60,
            owner: None,
        }
        .encode()
        .unwrap();
        trailing.push(7);
        assert!(LeaseRecord::decode(&trailing).is_err());
    }

    #[test]
    fn a_tenants_namespace_is_its_prefix_range() {
        assert_eq!(tenant_namespace("a"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert!(in_namespace("a", b"/a/"));
        assert!(in_namespace("a", b"/a/x"));
        assert!(in_namespace("a", b"/a/\xff\xff"));
        for outside in [&b"/a0"[..], b"/a", b"/ab/x", b"a/x", b"x", b"/b/x", b""] {
            assert!(!in_namespace("a", outside), "{outside:?}");
        }
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
