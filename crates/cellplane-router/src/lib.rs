//! The router: thin and stateless. It finds who is calling and which tenant a
//! request acts for, looks the tenant up in the cell map, and forwards the
//! request to a healthy member of that tenant's cell. It never calls a cell other
//! than the one a request belongs to, and never waits on the directory on a
//! request path.
//!
//! Every API (KV, Lease, Watch, Discovery) goes through one routing core
//! ([`core`]): [`auth`] says who is calling (a client certificate, a token from
//! etcd's auth flow, or anonymous with auth off); [`scope`] holds every tenant
//! rule (one namespace `/T/` per tenant, on every path); [`routes`] finds the cell
//! in the map in force ([`map_source`], fed by [`directory`]); [`cell_client`] is
//! the one way to call a cell, with its bulkhead, timeout, retry budget, member
//! health and shutdown. [`services`] only translate each API to those steps.
//! The HTTP port serves `/metrics` ([`metrics`], prometheus-client, as members)
//! and the status page ([`status_page`]).
//!
//! Depends on `cellplane-proto` (the APIs it serves and forwards),
//! `cellplane-map` (the cell map) and `cellplane-security` (TLS, identities,
//! credentials, tokens); never on a cell's internals or storage.

#![forbid(unsafe_code)]

mod admin;
mod auth;
mod cell_client;
pub mod config;
mod core;
pub mod directory;
pub mod map_source;
mod member_health;
mod metrics;
mod routes;
mod run;
mod scope;
mod services;
mod status_page;

pub use auth::AuthSettings;
pub use cell_client::PoolSettings;
pub use config::{RouterConfig, RoutersDef};
pub use core::CELL_METADATA;
pub use metrics::describe as describe_metrics;
pub use run::{RouterListeners, run};
pub use scope::TENANT_METADATA;
