//! Wire types of cellplane, generated from `proto/` by `build.rs`.
//!
//! - [`etcdserverpb`] and [`mvccpb`]: the etcd v3 API subset every cell and router
//!   serves, so `etcdctl` and every etcd v3 client work unchanged.
//! - [`raft`]: the member-to-member Raft transport inside one cell.
//! - [`cell`]: which tenants a cell serves (the map pushed to it).
//! - [`router`]: the router's admin service.
//! - [`discovery`]: service discovery; [`grpc_health`]: the standard gRPC health
//!   protocol its active checks speak.
//!
//! This crate depends on no other cellplane crate; everything else depends on it.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod raft {
    tonic::include_proto!("cellplane.raft.v1");
}

pub mod cell {
    tonic::include_proto!("cellplane.cell.v1");
}

pub mod router {
    tonic::include_proto!("cellplane.router.v1");
}

pub mod discovery {
    tonic::include_proto!("cellplane.discovery.v1");
}

pub mod grpc_health {
    tonic::include_proto!("grpc.health.v1");
}

/// Largest range a cell answers by default (its `limits.max_response_bytes`),
/// counted as key and value bytes plus [`RESPONSE_ENTRY_BYTES`] per key.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;

/// What one key-value pair adds to a response besides its key and value (its
/// revisions, version, lease and protobuf framing), at most.
pub const RESPONSE_ENTRY_BYTES: usize = 48;

/// What a response adds besides its key-value pairs (header, counts): the gRPC
/// message limit for responses is the response limit plus this, in the cell
/// and in the router alike.
pub const RESPONSE_FRAME_BYTES: usize = 64 << 10;

/// etcd's prefix range end: the smallest key after every key that starts with
/// `prefix` (trailing 0xff bytes dropped, the last byte left incremented), or
/// `"\0"` (no end: every key from the prefix on) when no byte is left. A range
/// `[prefix, prefix_end(prefix))` is what `etcdctl get --prefix` asks for.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A gRPC code as metrics label it: `OK`, else the code's name (`Unavailable`,
/// `DeadlineExceeded`, …). Members and routers label alike, so one query reads
/// both.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_as_etcd_computes_them() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
