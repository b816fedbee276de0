//! One member of a cell: a Raft group member (openraft) on the RocksDB store of
//! `cellplane-storage`, serving the etcd v3 KV, Watch and Lease APIs,
//! `Maintenance.Status` and `Cluster.MemberList` and service discovery to clients,
//! Raft to its peers, and `/metrics`, `/healthz`, `/readyz` over HTTP.
//!
//! Main types: [`config::CellDef`] (a cell as defined in `cells/`), [`node::run`]
//! (run one member until shut down), [`service::KvService`] (the etcd KV API),
//! [`maintenance::MaintenanceService`] and [`cluster::ClusterService`] (etcd's
//! Maintenance and Cluster services),
//! [`watch::WatchService`] (watches from the in-memory event log, handed by key
//! to the streams that watch it),
//! [`lease::LeaseService`] and [`lease::Lessor`] (leases; expiry on the leader),
//! `ownership` (the cell map pushed to the cell: tenants it does not own are
//! refused with the cell that serves them),
//! [`network::Network`] (Raft over gRPC), [`read_index::ReadBarrier`] (batched
//! linearizable reads); `upkeep` runs auto-compaction, the space quota and the
//! corruption check on the leader.
//!
//! With TLS on, both gRPC ports require a client certificate and a tower layer
//! (`access`) admits only the identities each port serves: the peer port its own
//! cell's members, the client port members, routers and operators.
//!
//! Depends on `cellplane-proto`, `cellplane-storage`, `cellplane-map` (the
//! lease-ID tag that lets routers find a lease's cell, and the metadata of a
//! refusal for a tenant the cell does not own), `cellplane-security`
//! (TLS material and identities) and `cellplane-discovery` (hosted here, talking
//! to this member over the etcd API); never on the router or any other cell: a
//! cell shares nothing with another.

#![forbid(unsafe_code)]

mod access;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod lease;
pub mod maintenance;
pub mod metrics;
mod metrics_loop;
pub mod network;
pub mod node;
mod ownership;
mod peer_stream;
pub mod proposer;
pub mod read_index;
pub mod service;
mod upkeep;
pub mod watch;
mod watch_hub;

/// The Raft handle of a member.
pub type Raft = openraft::Raft<cellplane_storage::TypeConfig>;

pub use config::{CellDef, CellRole, HostPort, NodeConfig};
pub use node::{Listeners, run};
