//! The `cellplane.discovery.v1.Discovery` service of a member. Every call becomes
//! a few etcd calls to the member's own client API (which forwards writes to the
//! leader and serves linearizable reads), so any member serves any call.

use std::time::Duration;

use cellplane_proto::discovery::discovery_server::Discovery;
use cellplane_proto::discovery::{
    DeregisterRequest, DeregisterResponse, Health, HeartbeatRequest, HeartbeatResponse, Instance,
    RegisterRequest, RegisterResponse, ResolveRequest, ResolveResponse, WatchRequest,
    WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::{AddressPolicy, Settings};
use crate::error::DiscoveryError;
use crate::etcd::{Etcd, PrefixWatch};
use crate::keys;
use crate::snapshot::{self, Snapshot};
use crate::validate;

type Result<T> = std::result::Result<T, DiscoveryError>;

pub struct DiscoveryService {
    etcd: Etcd,
    settings: Settings,
    /// Which addresses a registration's active check may name (`settings`'
    /// `check_allow` and `check_deny`).
    policy: AddressPolicy,
    /// Ends watch streams when the member shuts down.
    shutdown: CancellationToken,
}

impl DiscoveryService {
    pub fn new(etcd: Etcd, settings: Settings, shutdown: CancellationToken) -> DiscoveryService {
        DiscoveryService {
            etcd,
            policy: settings.check_policy(),
            settings,
            shutdown,
        }
    }

    /// The stored instance, if registered. `serializable` reads this member's
    /// state without a leader round; a miss is confirmed with a linearizable read
    /// (a follower may not have applied a registration just made elsewhere).
    async fn lookup(
        &self,
        ns: &str,
        svc: &str,
        id: &str,
        serializable: bool,
    ) -> Result<Option<Instance>> {
        let key = keys::instance_key(ns, svc, id);
        let (mut kv, _) = self.etcd.get(&key, serializable).await?;
        if kv.is_none() && serializable {
            kv = self.etcd.get(&key, false).await?.0;
        }
        kv.map(|kv| keys::decode(&kv)).transpose()
    }

    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        let mut instance = validate::register(&req, &self.policy)?;
        let (ns, svc, id) = (&instance.namespace, &instance.service, &instance.id);
        let key = keys::instance_key(ns, svc, id);
        let previous = self.lookup(ns, svc, id, false).await.ok().flatten();
        let check = instance.check.clone().unwrap_or_default();
        let lease_ttl = if check.ttl_seconds > 0 {
            // The lease outlives the TTL by deregister_after: a missed heartbeat
            // makes the instance UNHEALTHY (the checker sees less than
            // deregister_after left) long before the lease expires and removes it.
            let (lease, ttl) = self
                .etcd
                .grant(check.ttl_seconds + check.deregister_after_seconds)
                .await?;
            instance.lease_id = lease;
            instance.lease_owned = true;
            ttl
        } else if instance.lease_id != 0 {
            match self.etcd.time_to_live(instance.lease_id).await? {
                Some((remaining, _)) => remaining,
                None => {
                    return Err(DiscoveryError::NotFound(format!(
                        "lease {} does not exist (expired or revoked): grant a new one, or \
                         register with a TTL",
                        instance.lease_id
                    )));
                }
            }
        } else {
            0
        };
        let put = self
            .etcd
            .put(&key, keys::encode(&instance), instance.lease_id)
            .await;
        let revision = match put {
            Ok(rev) => rev,
            Err(e) => {
                if instance.lease_owned {
                    // Nothing is attached to it: do not leave it to expire.
                    let _ = self.etcd.revoke(instance.lease_id).await;
                }
                return Err(e);
            }
        };
        // A re-registration replaces the instance; the lease granted to the one it
        // replaces now holds no key (the put moved the key to the new lease).
        if let Some(p) = previous.filter(|p| p.lease_owned && p.lease_id != instance.lease_id)
            && let Err(e) = self.etcd.revoke(p.lease_id).await
        {
            tracing::warn!(
                lease = p.lease_id,
                error = %e,
                "cannot revoke a replaced instance's lease; it will expire"
            );
        }
        instance.mod_revision = revision;
        Ok(RegisterResponse {
            lease_id: instance.lease_id,
            lease_ttl_seconds: lease_ttl,
            revision,
            instance: Some(instance),
        })
    }

    pub async fn deregister(&self, req: DeregisterRequest) -> Result<DeregisterResponse> {
        validate::instance_ref(&req.namespace, &req.service, &req.id)?;
        let key = keys::instance_key(&req.namespace, &req.service, &req.id);
        let not_found = || {
            DiscoveryError::NotFound(format!(
                "instance {:?} of service {:?} in namespace {:?} is not registered",
                req.id, req.service, req.namespace
            ))
        };
        let existing = self
            .lookup(&req.namespace, &req.service, &req.id, false)
            .await?
            .ok_or_else(not_found)?;
        // The lease Register granted holds only this key: revoking it deletes the
        // key and frees the lease in one step.
        if existing.lease_owned && self.etcd.revoke(existing.lease_id).await? {
            let (_, revision) = self.etcd.get(&key, false).await?;
            return Ok(DeregisterResponse { revision });
        }
        let (deleted, revision) = self.etcd.delete(&key).await?;
        if !deleted {
            return Err(not_found());
        }
        Ok(DeregisterResponse { revision })
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse> {
        validate::instance_ref(&req.namespace, &req.service, &req.id)?;
        let what = format!(
            "instance {:?} of service {:?} in namespace {:?}",
            req.id, req.service, req.namespace
        );
        let i = self
            .lookup(&req.namespace, &req.service, &req.id, true)
            .await?
            .ok_or_else(|| {
                DiscoveryError::NotFound(format!(
                    "{what} is not registered (removed after missing its heartbeats?): register it again"
                ))
            })?;
        if i.lease_id == 0 {
            return Err(DiscoveryError::FailedPrecondition(format!(
                "{what} has no TTL and no lease: its health comes from its active check, \
                 heartbeats do not apply"
            )));
        }
        let ttl = self.etcd.keep_alive(i.lease_id).await?;
        if ttl <= 0 {
            return Err(DiscoveryError::NotFound(format!(
                "the lease of {what} has expired: register it again"
            )));
        }
        Ok(HeartbeatResponse {
            lease_ttl_seconds: ttl,
            health: i.health,
        })
    }

    pub async fn resolve(&self, req: ResolveRequest) -> Result<ResolveResponse> {
        validate::namespace(&req.namespace)?;
        validate::service(&req.service)?;
        let prefix = keys::service_prefix(&req.namespace, &req.service);
        let (kvs, revision) = self.etcd.range_prefix(&prefix, 0, false).await?;
        let instances = Snapshot::from_kvs(&kvs)
            .instances
            .into_values()
            .filter(|i| !req.healthy_only || i.health == Health::Healthy as i32)
            .filter(|i| req.tags.iter().all(|t| i.tags.contains(t)))
            .collect();
        Ok(ResolveResponse {
            instances,
            revision,
        })
    }

    /// Opens a snapshot stream: the snapshot at the start revision (or now), then
    /// one per revision that changes the service.
    pub async fn watch_stream(
        &self,
        req: WatchRequest,
    ) -> Result<ReceiverStream<std::result::Result<WatchResponse, Status>>> {
        validate::namespace(&req.namespace)?;
        validate::service(&req.service)?;
        if req.start_revision < 0 {
            return Err(DiscoveryError::invalid(
                "start_revision",
                "must not be negative (0: now)",
            ));
        }
        let prefix = keys::service_prefix(&req.namespace, &req.service);
        let (kvs, revision) = self
            .etcd
            .range_prefix(&prefix, req.start_revision, false)
            .await?;
        let snap = Snapshot::from_kvs(&kvs);
        let upstream = self.etcd.watch_prefix(&prefix, revision + 1).await?;
        let (tx, rx) = mpsc::channel(self.settings.watch_buffer);
        let first = snap.response(revision, snap.all_added());
        // The buffer is empty and holds at least one response.
        let _ = tx.try_send(Ok(first));
        let pump = Pump {
            prefix,
            snap,
            sent: revision,
            tx,
            buffer: self.settings.watch_buffer,
        };
        tokio::spawn(pump.run(upstream, self.shutdown.clone()));
        Ok(ReceiverStream::new(rx))
    }
}

/// Follows the etcd watch of one service and sends a snapshot per revision.
struct Pump {
    prefix: Vec<u8>,
    snap: Snapshot,
    /// The revision of the last snapshot queued to the client.
    sent: i64,
    tx: mpsc::Sender<std::result::Result<WatchResponse, Status>>,
    buffer: usize,
}

impl Pump {
    async fn run(mut self, mut upstream: PrefixWatch, shutdown: CancellationToken) {
        let end = loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break Some(DiscoveryError::Resume {
                    reason: "the member is shutting down".into(),
                    resume: self.sent,
                }),
                _ = self.tx.closed() => break None,
                m = upstream.responses.message() => m,
            };
            match msg {
                Ok(Some(r)) if r.canceled => {
                    break Some(DiscoveryError::Resume {
                        reason: format!("the cell canceled the watch ({})", r.cancel_reason),
                        resume: self.sent,
                    });
                }
                Ok(Some(r)) => {
                    for (rev, events) in snapshot::by_revision(&r.events) {
                        let changes = self.snap.apply(&self.prefix, events);
                        if changes.is_empty() {
                            continue;
                        }
                        let rev = if rev > 0 {
                            rev
                        } else {
                            r.header.as_ref().map_or(self.sent, |h| h.revision)
                        };
                        match self.tx.try_send(Ok(self.snap.response(rev, changes))) {
                            Ok(()) => self.sent = rev,
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.stalled().await;
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {
                    break Some(DiscoveryError::Resume {
                        reason: "the cell ended the watch".into(),
                        resume: self.sent,
                    });
                }
                Err(s) => {
                    break Some(DiscoveryError::Resume {
                        reason: format!("the cell's watch failed ({})", s.message()),
                        resume: self.sent,
                    });
                }
            }
        };
        if let Some(e) = end {
            // Best effort: a client that is not reading does not get it.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(Err(e.into()))).await;
        }
    }

    /// The client stopped reading: end its stream, saying where to resume, and
    /// free what it held.
    async fn stalled(&self) {
        tracing::warn!(
            resume = self.sent,
            "discovery watch not read by its client: ending it"
        );
        let status = Status::resource_exhausted(format!(
            "discovery watch fell behind its client by {} snapshots; watch again with \
             start_revision = the revision of the last snapshot you processed (this stream \
             had queued up to {})",
            self.buffer, self.sent
        ));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(Err(status))).await;
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> std::result::Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(
            DiscoveryService::register(self, request.into_inner()).await?,
        ))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> std::result::Result<Response<DeregisterResponse>, Status> {
        Ok(Response::new(
            DiscoveryService::deregister(self, request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(
            DiscoveryService::heartbeat(self, request.into_inner()).await?,
        ))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> std::result::Result<Response<ResolveResponse>, Status> {
        Ok(Response::new(
            DiscoveryService::resolve(self, request.into_inner()).await?,
        ))
    }

    type WatchStream = ReceiverStream<std::result::Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            self.watch_stream(request.into_inner()).await?,
        ))
    }
}
