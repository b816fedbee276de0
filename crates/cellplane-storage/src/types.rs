//! The openraft type configuration of a cell and the commands carried in its log.

use serde::{Deserialize, Serialize};

use crate::error::KvError;

/// A member id, unique within its cell (the `id` in `cells/<cell>.toml`).
pub type NodeId = u64;

/// What every member knows about another: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Address of the etcd-compatible client API, `host:port`.
    pub client_addr: String,
    /// Address of the member-to-member Raft transport, `host:port`.
    pub peer_addr: String,
}

openraft::declare_raft_types!(
    /// The Raft types of a cell.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot_file::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// One Raft log entry's worth of commands: concurrent client writes proposed
/// together, so that one log append and one fsync serve them all. Each command is
/// still applied on its own, with its own revision and outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// The outcomes of a [`Batch`], one per command, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse(pub Vec<CommandResponse>);

/// A write to the key-value store, as proposed through Raft.
///
/// Requests are carried in their etcd protobuf encoding: the wire format is already
/// a stable, versioned schema, and re-encoding them into another one would only add
/// a place for the two to drift apart.
///
/// Commands are postcard-encoded in the Raft log, where a variant is its index:
/// existing variants never change, and new ones are added at the end, so that
/// entries already in a log (or a peer's batch) still decode.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An encoded `etcdserverpb.PutRequest`.
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An encoded `etcdserverpb.DeleteRangeRequest`.
    DeleteRange(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An encoded `etcdserverpb.TxnRequest`.
    Txn(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Compact the history below this revision.
    Compact(i64),
    /// Create a lease. The id is chosen before proposing (by the client or the
    /// leader), so that every member applies the same one.
    LeaseGrant { id: i64, ttl: i64 },
    /// Delete a lease and every key attached to it: a client's revoke, or the
    /// leader's decision that the lease expired.
    LeaseRevoke(i64),
    /// As `LeaseGrant`, for a tenant: the lease records `owner`, and only keys in
    /// the owner's namespace (`/owner/…`) may be attached to it.
    LeaseGrantOwned { id: i64, ttl: i64, owner: String },
    /// A tenant's revoke: as `LeaseRevoke` if the lease belongs to `owner`;
    /// otherwise nothing happens and the outcome is "lease not found", as for a
    /// lease that does not exist, so that one tenant cannot probe for another's.
    LeaseRevokeOwned { id: i64, owner: String },
    /// Raise (`activate`) or clear an alarm of `member` (etcd's `AlarmType`
    /// value): see the `alarm` module.
    Alarm {
        activate: bool,
        member: u64,
        alarm: i32,
    },
    /// Cell `cell` learns the cell map `map` (JSON): from then on it serves only
    /// the tenants the map sends it (see the `ownership` module).
    LearnMap {
        cell: String,
        #[serde(with = "serde_bytes")]
        map: Vec<u8>,
    },
    /// Cell `cell` stops serving tenant `tenant`, which moves to cell `to` with
    /// map version `version` (refused unless the cell owns the tenant).
    Fence {
        cell: String,
        tenant: String,
        to: String,
        version: u64,
    },
    /// Undoes a fence (an aborted move).
    Unfence { tenant: String },
    /// Cell `cell` lets the mover write tenant `tenant`, moving in from `from`
    /// for map version `version`.
    Expect {
        cell: String,
        tenant: String,
        from: String,
        version: u64,
    },
    /// Undoes an `Expect` (an aborted move).
    Forget { tenant: String },
    /// The mover's write of a moving tenant: applied without the ownership
    /// checks, if the `ownership` module's `check_mover` allows it.
    Moving { tenant: String, cmd: Box<Command> },
}

impl Command {
    /// Whether applying this command reads the stored history (a compaction, or a
    /// txn with a range at an explicit revision). Such a command is proposed alone
    /// in its batch, and the state machine writes everything before it to RocksDB
    /// first, so its outcome never depends on how entries were grouped.
    pub fn reads_history(&self) -> bool {
        use cellplane_proto::etcdserverpb::{TxnRequest, request_op};
        use prost::Message;
        fn txn_reads_history(t: &TxnRequest) -> bool {
            t.success
                .iter()
                .chain(&t.failure)
                .any(|op| match &op.request {
                    Some(request_op::Request::RequestRange(r)) => r.revision > 0,
                    Some(request_op::Request::RequestTxn(t)) => txn_reads_history(t),
                    _ => false,
                })
        }
        match self {
            Command::Compact(_) => true,
            // An undecodable txn is refused at apply; alone is the safe side.
            Command::Txn(b) => {
                TxnRequest::decode(b.as_slice()).map_or(true, |t| txn_reads_history(&t))
            }
            Command::Put(_)
            | Command::DeleteRange(_)
            | Command::LeaseGrant { .. }
            | Command::LeaseRevoke(_)
            | Command::LeaseGrantOwned { .. }
            | Command::LeaseRevokeOwned { .. }
            | Command::Alarm { .. }
            | Command::LearnMap { .. }
            | Command::Fence { .. }
            | Command::Unfence { .. }
            | Command::Expect { .. }
            | Command::Forget { .. } => false,
            Command::Moving { cmd, .. } => cmd.reads_history(),
        }
    }

    /// Encoded size, for bounding batches.
    pub fn size(&self) -> usize {
        match self {
            Command::Put(b) | Command::DeleteRange(b) | Command::Txn(b) => b.len(),
            Command::Compact(_) | Command::LeaseRevoke(_) => 8,
            Command::LeaseGrant { .. } => 16,
            Command::LeaseGrantOwned { owner, .. } => 16 + owner.len(),
            Command::LeaseRevokeOwned { owner, .. } => 8 + owner.len(),
            Command::Alarm { .. } => 13,
            Command::LearnMap { cell, map } => cell.len() + map.len(),
            Command::Fence {
                cell, tenant, to, ..
            }
            | Command::Expect {
                cell,
                tenant,
                from: to,
                ..
            } => 8 + cell.len() + tenant.len() + to.len(),
            Command::Unfence { tenant } | Command::Forget { tenant } => tenant.len(),
            Command::Moving { tenant, cmd } => tenant.len() + cmd.size(),
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Put(b) => write!(f, "Put({} bytes)", b.len()),
            Command::DeleteRange(b) => write!(f, "DeleteRange({} bytes)", b.len()),
            Command::Txn(b) => write!(f, "Txn({} bytes)", b.len()),
            Command::Compact(r) => write!(f, "Compact({r})"),
            Command::LeaseGrant { id, ttl } => write!(f, "LeaseGrant({id}, {ttl}s)"),
            Command::LeaseRevoke(id) => write!(f, "LeaseRevoke({id})"),
            Command::LeaseGrantOwned { id, ttl, owner } => {
                write!(f, "LeaseGrantOwned({id}, {ttl}s, {owner:?})")
            }
            Command::LeaseRevokeOwned { id, owner } => {
                write!(f, "LeaseRevokeOwned({id}, {owner:?})")
            }
            Command::Alarm {
                activate,
                member,
                alarm,
            } => write!(f, "Alarm({activate}, {member}, {alarm})"),
            Command::LearnMap { cell, map } => {
                write!(f, "LearnMap({cell:?}, {} bytes)", map.len())
            }
            Command::Fence {
                cell,
                tenant,
                to,
                version,
            } => write!(f, "Fence({cell:?}, {tenant:?} → {to:?} at {version})"),
            Command::Unfence { tenant } => write!(f, "Unfence({tenant:?})"),
            Command::Expect {
                cell,
                tenant,
                from,
                version,
            } => write!(f, "Expect({cell:?}, {tenant:?} ← {from:?} at {version})"),
            Command::Forget { tenant } => write!(f, "Forget({tenant:?})"),
            Command::Moving { tenant, cmd } => write!(f, "Moving({tenant:?}, {cmd:?})"),
        }
    }
}

/// The result of applying one log entry.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// The store's revision after the entry was applied.
    pub revision: i64,
    /// The encoded etcd response (`PutResponse`, `DeleteRangeResponse`,
    /// `TxnResponse`, `CompactionResponse`, `LeaseGrantResponse` or
    /// `LeaseRevokeResponse`, without header), or the error every
    /// member deterministically reached for this entry. Empty for entries that
    /// carry no command.
    pub outcome: Option<Result<serde_bytes::ByteBuf, KvError>>,
}

impl std::fmt::Debug for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandResponse")
            .field("revision", &self.revision)
            .field("ok", &self.outcome.as_ref().map(|o| o.is_ok()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_their_log_encoding() {
        // A variant is its index in the log: these bytes are in logs already, and a
        // new variant must not shift them.
        let enc = |c: &Command| postcard::to_stdvec(c).unwrap();
        assert_eq!(enc(&Command::Compact(3)), [3, 6]);
        assert_eq!(enc(&Command::LeaseGrant { id: 1, ttl: 2 }), [4, 2, 4]);
        assert_eq!(enc(&Command::LeaseRevoke(7)), [5, 14]);
        let owned = Command::LeaseGrantOwned {
            id: 1,
            ttl: 2,
            owner: "a".into(),
        };
        assert_eq!(enc(&owned), [6, 2, 4, 1, b'a']);
        let revoke = Command::LeaseRevokeOwned {
            id: 7,
            owner: "a".into(),
        };
        assert_eq!(enc(&revoke), [7, 14, 1, b'a']);
        let alarm = Command::Alarm {
            activate: true,
            member: 2,
            alarm: 1,
        };
        assert_eq!(enc(&alarm), [8, 1, 2, 2]);
        for c in [owned, revoke, alarm] {
            assert_eq!(postcard::from_bytes::<Command>(&enc(&c)).unwrap(), c);
            assert!(!c.reads_history());
        }
    }
}
