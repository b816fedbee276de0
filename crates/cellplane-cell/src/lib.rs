//! One member of a cell: a Raft group member (openraft) on the RocksDB store of
//! `cellplane-storage`, serving the etcd v3 KV API, `Maintenance.Status` and
//! `Cluster.MemberList` to clients, Raft to its peers, and `/metrics`, `/healthz`,
//! `/readyz` over HTTP.
//!
//! Main types: [`config::CellDef`] (a cell as defined in `cells/`), [`node::run`]
//! (run one member until shut down), [`service::KvService`] (the etcd API),
//! [`network::Network`] (Raft over gRPC), [`read_index::ReadBarrier`] (batched
//! linearizable reads).
//!
//! Depends on `cellplane-proto` and `cellplane-storage`; never on the router or any
//! other cell: a cell shares nothing with another.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
mod metrics_loop;
pub mod network;
pub mod node;
pub mod proposer;
pub mod read_index;
pub mod service;
pub mod watch;

/// The Raft handle of a member.
pub type Raft = openraft::Raft<cellplane_storage::TypeConfig>;

pub use config::{CellDef, NodeConfig};
pub use node::{Listeners, run};
