//! The router: thin and stateless. It finds each request's tenant, looks the tenant
//! up in the cell map, and forwards the request to a healthy member of that cell.
//! It never calls a cell other than the one a request belongs to, and never waits
//! on the directory on a request path.
//!
//! Depends on `cellplane-proto` (the etcd API it serves and forwards) and
//! `cellplane-map` (the cell map); never on a cell's internals or storage.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cell_pool;
pub mod config;
pub mod directory;
pub mod discovery_proxy;
pub mod lease_proxy;
pub mod map_source;
pub mod run;
pub mod server;
pub mod tenant;
pub mod watch_proxy;

pub use config::{RouterConfig, RoutersDef};
pub use run::{RouterListeners, run};
