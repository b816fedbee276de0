//! Errors of a member, and how each reaches a client as a gRPC status.

use std::net::SocketAddr;

use cellplane_storage::KvError;
use tonic::Status;

use crate::read_index::ReadIndexError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("member {0} is not in the cell definition")]
    UnknownMember(u64),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Open(#[from] cellplane_storage::OpenError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("io: {0}")]
    Io(#[source] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("raft: {0}")]
    Raft(String),
}

/// Maps a store error to the status etcd sends for it.
pub fn kv_status(e: KvError) -> Status {
    match e {
        KvError::Compacted { .. } | KvError::FutureRevision { .. } => {
            Status::out_of_range(e.to_string())
        }
        KvError::LeaseNotFound => Status::not_found(e.to_string()),
        KvError::LeaseExists => Status::failed_precondition(e.to_string()),
        KvError::LeaseTtlTooLarge => Status::out_of_range(e.to_string()),
        KvError::PermissionDenied => Status::permission_denied(e.to_string()),
        // etcd's codes: clients (etcdctl, clientv3) recognise these two.
        KvError::NoSpace | KvError::ResponseTooLarge { .. } | KvError::ApplyTooLarge { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        KvError::Corrupt => Status::data_loss(e.to_string()),
        KvError::Storage(_) => Status::internal(e.to_string()),
        KvError::Installing => Status::unavailable(e.to_string()),
        KvError::NotOwned {
            ref tenant,
            ref cell,
            version,
        } => {
            let mut s = Status::failed_precondition(e.to_string());
            if let Ok(v) = cell.parse() {
                s.metadata_mut().insert(cellplane_map::MOVED_TO_METADATA, v);
            }
            if let Ok(v) = tenant.parse() {
                s.metadata_mut()
                    .insert(cellplane_map::MOVED_TENANT_METADATA, v);
            }
            s.metadata_mut()
                .insert(cellplane_map::MAP_VERSION_METADATA, version.into());
            s
        }
        KvError::StaleMap { .. } => Status::failed_precondition(e.to_string()),
        KvError::EmptyKey
        | KvError::KeyNotFound
        | KvError::ValueProvided
        | KvError::LeaseProvided
        | KvError::TooManyOps { .. }
        | KvError::DuplicateKey
        | KvError::RequestTooLarge { .. }
        | KvError::Invalid(_) => Status::invalid_argument(e.to_string()),
    }
}

pub fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::NoLeader => Status::unavailable("etcdserver: no leader"),
        NodeError::UnknownMember(_) => Status::not_found("etcdserver: member not found"),
        other => Status::unavailable(other.to_string()),
    }
}

pub fn read_status(e: ReadIndexError) -> Status {
    match e {
        ReadIndexError::NoLeader => Status::unavailable("etcdserver: no leader"),
        other => Status::unavailable(format!("etcdserver: linearizable read failed: {other}")),
    }
}
