//! Leases in the `lease` column family: what exists and which keys each one holds.
//!
//! Only the granted TTL is stored. When a lease expires is the leader's business
//! (an in-memory deadline, refreshed to a full TTL on a new leader, as etcd does):
//! expiry reaches the store as a [`crate::Command::LeaseRevoke`] like any client
//! revoke, so every member deletes the same keys at the same revision.

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};

use crate::db::{CF_LEASE, Store};
use crate::error::KvError;
use crate::mvcc::{KvReader, decode_record};

/// Largest TTL a lease may be granted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A lease and the keys attached to it.
pub type LeaseWithKeys = (LeaseRecord, Vec<Vec<u8>>);

/// A lease as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The TTL granted, in seconds.
    pub ttl: i64,
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
        Some(b) => Ok(Some(decode_record(&b)?)),
        None => Ok(None),
    }
}

impl KvReader {
    /// The lease `id`, if it exists.
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRecord>, KvError> {
        read_lease(&self.store, &ReadOptions::default(), id)
    }

    /// The lease `id` and the keys attached to it, read from one snapshot.
    pub fn lease_with_keys(&self, id: i64) -> Result<Option<LeaseWithKeys>, KvError> {
        let snap = self.store.db.snapshot();
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
        let mut out = Vec::new();
        for item in self.store.db.iterator_cf(
            self.store.cf(CF_LEASE),
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
            out.push((id, decode_record(&v)?));
        }
        Ok(out)
    }
}
