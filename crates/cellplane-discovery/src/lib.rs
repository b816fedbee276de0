//! Service discovery for one cell (`cellplane.discovery.v1`): instances register
//! with an address, port, tags and metadata; clients resolve a service's instances
//! and watch it as a stream of full snapshots. A member hosts it next to the etcd
//! API and reaches the cell's store only through that API, over a gRPC channel to
//! its own client address: KV for instances, Lease for TTL health, Watch for
//! snapshots and the checker.
//!
//! - Storage ([`keys`]): one key per instance under the reserved prefix
//!   `/_cellplane/discovery/<namespace>/<service>/<id>`, the value an encoded
//!   [`Instance`](cellplane_proto::discovery::Instance).
//! - Health ([`checker`]): a TTL instance's key is attached to a lease of `ttl +
//!   deregister_after` seconds that heartbeats renew without a Raft write; the
//!   checker, on the leader only, marks it UNHEALTHY once a heartbeat is missed
//!   and the lease's expiry removes it. Active checks ([`probe`]: HTTP, TCP, gRPC
//!   health) run on the leader too, only against addresses the cell's settings
//!   permit ([`config::AddressPolicy`]: `check_allow`, `check_deny`), so a
//!   registration cannot make the leader probe, say, a cloud metadata service.
//!   Either writes through Raft only when an instance's health changes.
//! - Serving ([`service::DiscoveryService`]), wiring into a member ([`host`]).
//!
//! Depends on `cellplane-proto` only: never on a cell's internals or storage, so it
//! runs, and is tested, against any etcd v3 API.

#![forbid(unsafe_code)]

pub mod checker;
pub mod config;
pub mod error;
pub mod etcd;
pub mod keys;
pub mod probe;
pub mod service;
pub mod snapshot;
pub mod validate;

pub use config::Settings;
pub use error::DiscoveryError;
pub use service::DiscoveryService;

use std::time::Duration;

use cellplane_proto::discovery::discovery_server::DiscoveryServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Discovery as a member hosts it: the gRPC service to add to the member's client
/// server, and the task to run until `shutdown` (the leader-only checker).
///
/// `etcd` is a channel to the member's own client API (the member makes it, with
/// its own TLS identity when TLS is on); `leader` says whether this member leads
/// its cell now.
pub fn host(
    settings: Settings,
    etcd: Channel,
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<
    (
        DiscoveryServer<DiscoveryService>,
        impl Future<Output = ()> + Send + 'static,
    ),
    DiscoveryError,
> {
    settings.validate()?;
    let etcd = etcd::Etcd::new(etcd, Duration::from_millis(settings.call_timeout_ms));
    let service = DiscoveryService::new(etcd.clone(), settings.clone(), shutdown.clone());
    let checker = checker::Checker::new(etcd, settings);
    Ok((DiscoveryServer::new(service), checker.run(leader, shutdown)))
}

/// Follows `source` (e.g. a member's Raft metrics) as a "this member leads" flag
/// until `shutdown`; the returned task must be run for the flag to move.
pub fn leader_flag<T, F>(
    mut source: watch::Receiver<T>,
    is_leader: F,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<bool>,
    impl Future<Output = ()> + Send + 'static,
)
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> bool + Send + 'static,
{
    let (tx, rx) = watch::channel(is_leader(&source.borrow()));
    let task = async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = source.changed() => if changed.is_err() { return },
            }
            let now = is_leader(&source.borrow_and_update());
            tx.send_if_modified(|v| std::mem::replace(v, now) != now);
        }
    };
    (rx, task)
}
