//! Alarms, as etcd has them: a member raises NOSPACE when its store passes the
//! space quota, the leader raises CORRUPT for a member whose history hashes
//! differently from its own, and an operator disarms them. They are replicated
//! state (raised and cleared by [`Command::Alarm`](crate::Command) through Raft,
//! stored in the `alarm` column family, carried in snapshots), so every member
//! refuses the same writes at the same log position:
//!
//! - NOSPACE: puts, lease grants and txns that write are refused with etcd's
//!   `etcdserver: mvcc: database space exceeded`; reads, deletes, compaction and
//!   lease revokes go on, so an operator can make room.
//! - CORRUPT: every write is refused with `etcdserver: corrupt cluster` until an
//!   operator has found the bad member, replaced it and disarmed the alarm.
//!   Reads go on (the operator needs them to compare members).

use std::collections::BTreeSet;

use cellplane_proto::etcdserverpb::{AlarmType, RequestOp, TxnRequest, request_op};
use rocksdb::{IteratorMode, ReadOptions};

use crate::db::{CF_ALARM, Store};
use crate::error::KvError;

/// Raised alarms: (member id, etcd `AlarmType` value).
pub type AlarmSet = BTreeSet<(u64, i32)>;

/// Which kinds of alarm are raised, on any member: what the apply path and the
/// services need to decide, cheap to copy into [`crate::AppliedState`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Raised {
    pub no_space: bool,
    pub corrupt: bool,
}

impl Raised {
    pub fn of(set: &AlarmSet) -> Raised {
        Raised {
            no_space: set.iter().any(|(_, a)| *a == AlarmType::Nospace as i32),
            corrupt: set.iter().any(|(_, a)| *a == AlarmType::Corrupt as i32),
        }
    }
}

/// The key of one alarm in the `alarm` column family.
pub(crate) fn alarm_key(member: u64, alarm: i32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&member.to_be_bytes());
    k[8..].copy_from_slice(&alarm.to_be_bytes());
    k
}

/// Every alarm stored in `store`, as `opts` sees it.
pub(crate) fn read_alarms(store: &Store, opts: ReadOptions) -> Result<AlarmSet, KvError> {
    let mut out = AlarmSet::new();
    for item in store
        .db
        .iterator_cf_opt(store.cf(CF_ALARM), opts, IteratorMode::Start)
    {
        let (k, _) = item?;
        let (Ok(m), Ok(a)) = (
            k[..8.min(k.len())].try_into(),
            k[8.min(k.len())..].try_into(),
        ) else {
            return Err(KvError::Storage(format!("corrupt alarm key {k:?}")));
        };
        out.insert((u64::from_be_bytes(m), i32::from_be_bytes(a)));
    }
    Ok(out)
}

/// The alarm kinds etcd defines, the only ones that may be raised.
pub(crate) fn check_kind(alarm: i32) -> Result<(), KvError> {
    match AlarmType::try_from(alarm) {
        Ok(AlarmType::Nospace | AlarmType::Corrupt) => Ok(()),
        _ => Err(KvError::Invalid(format!("unknown alarm type {alarm}"))),
    }
}

/// What a command does, for the alarm gate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Adds data: puts, lease grants, txns that write.
    Grows,
    /// Removes data only: deletes.
    Shrinks,
    /// Reads, compaction, lease revokes, alarms: always allowed.
    Neutral,
}

/// Refuses a command the raised alarms forbid.
pub(crate) fn gate(raised: Raised, effect: Effect) -> Result<(), KvError> {
    match effect {
        _ if raised.corrupt && effect != Effect::Neutral => Err(KvError::Corrupt),
        Effect::Grows if raised.no_space => Err(KvError::NoSpace),
        _ => Ok(()),
    }
}

/// Whether a txn writes anything in either branch (etcd refuses every such txn
/// under NOSPACE, whichever branch would run).
pub(crate) fn txn_writes(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(op_writes)
}

fn op_writes(op: &RequestOp) -> bool {
    match &op.request {
        Some(request_op::Request::RequestPut(_) | request_op::Request::RequestDeleteRange(_)) => {
            true
        }
        Some(request_op::Request::RequestTxn(t)) => txn_writes(t),
        Some(request_op::Request::RequestRange(_)) | None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_follows_etcd() {
        let none = Raised::default();
        let full = Raised {
            no_space: true,
            corrupt: false,
        };
        let bad = Raised {
            no_space: false,
            corrupt: true,
        };
        for e in [Effect::Grows, Effect::Shrinks, Effect::Neutral] {
            assert!(gate(none, e).is_ok());
        }
        assert_eq!(gate(full, Effect::Grows), Err(KvError::NoSpace));
        assert!(gate(full, Effect::Shrinks).is_ok());
        assert_eq!(gate(bad, Effect::Shrinks), Err(KvError::Corrupt));
        assert!(gate(bad, Effect::Neutral).is_ok());
        assert!(check_kind(0).is_err() && check_kind(3).is_err() && check_kind(1).is_ok());
    }
}
