//! Wire types of cellplane, generated from `proto/` by `build.rs`.
//!
//! - [`etcdserverpb`] and [`mvccpb`]: the etcd v3 API subset every cell and router
//!   serves, so `etcdctl` and every etcd v3 client work unchanged.
//! - [`raft`]: the member-to-member Raft transport inside one cell.
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

pub mod router {
    tonic::include_proto!("cellplane.router.v1");
}

pub mod discovery {
    tonic::include_proto!("cellplane.discovery.v1");
}

pub mod grpc_health {
    tonic::include_proto!("grpc.health.v1");
}
