//! One member of a cell: wires the store, Raft, the read barrier and the servers,
//! and runs until shut down.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_proto::cell::ownership_server::OwnershipServer;
use cellplane_proto::etcdserverpb::cluster_server::ClusterServer;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::kv_server::KvServer;
use cellplane_proto::etcdserverpb::lease_server::LeaseServer;
use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use cellplane_proto::etcdserverpb::{ResponseHeader, StatusRequest};
use cellplane_proto::raft::raft_server::RaftServer;
use cellplane_storage::{
    AppliedState, Command, CommandResponse, KvReader, Limits, LogStore, Member, NodeId,
    StateMachine, Store,
};
use openraft::error::RaftError;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::Raft;
use crate::access::{AccessLayer, Policy, Port};
use crate::cluster::ClusterService;
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::maintenance::MaintenanceService;
use crate::metrics::Metrics;
use crate::network::{Network, RaftService};
use crate::proposer::{ProposalError, Proposer};
use crate::read_index::ReadBarrier;
use crate::service::KvService;

/// The listeners of one member. Tests bind them to port 0 and pass them in, so
/// nothing races for a port between choosing it and binding it.
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses of member `id` in its cell definition.
    pub async fn bind(config: &NodeConfig) -> Result<Listeners, NodeError> {
        let me = config
            .cell
            .member(config.id)
            .ok_or(NodeError::UnknownMember(config.id))?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind { addr, source })
        };
        Ok(Listeners {
            client: bind(me.client.bind_addr()).await?,
            peer: bind(me.peer.bind_addr()).await?,
            http: bind(me.http.bind_addr()).await?,
        })
    }
}

/// What the services of one member share.
pub struct Shared {
    pub id: NodeId,
    pub cluster_id: u64,
    pub config: NodeConfig,
    pub raft: Raft,
    pub store: Store,
    pub reader: KvReader,
    pub applied: watch::Receiver<AppliedState>,
    /// Which tenants the cell serves, as this member applied it.
    pub ownership: watch::Receiver<Arc<cellplane_storage::Ownership>>,
    pub barrier: ReadBarrier,
    pub proposer: Proposer,
    pub limits: Limits,
    pub metrics: Metrics,
    /// Group-commit counters of the Raft log.
    pub sync_stats: Arc<cellplane_storage::SyncStats>,
    /// Hands the event log's revisions to the watch streams they concern.
    pub(crate) watch_hub: Arc<crate::watch_hub::Hub>,
    /// Cancelled when the member shuts down (ends watch streams).
    pub shutdown: CancellationToken,
    /// Bounds the client requests in flight; beyond it requests are shed.
    pub inflight: Semaphore,
    /// Lease deadlines, kept while this member leads.
    pub lessor: crate::lease::Lessor,
    /// Client-API channels to the other members, for forwarding to the leader.
    members: MemberChannels,
}

/// Client-API channels to the cell's members, one per member, shared by every
/// forwarded request (HTTP/2 multiplexes them), dialled with this member's TLS
/// identity when TLS is on.
struct MemberChannels {
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<(NodeId, String), Channel>>,
}

/// Why a proposal did not produce a result here.
pub enum ProposeError {
    /// Another member leads: forward the request there.
    Forward(NodeId),
    Failed(NodeError),
}

impl Shared {
    /// A response header as this member sees things now.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term: self.raft.metrics().borrow().current_term,
        }
    }

    /// Proposes `cmd` through Raft (batched with concurrent writes) if this member
    /// leads; otherwise says who does. While no leader is known it waits, up to the
    /// request timeout, for one.
    pub async fn propose(&self, cmd: Command) -> Result<(CommandResponse, u64), ProposeError> {
        self.propose_with(cmd, false).await
    }

    /// As [`Shared::propose`]; a `forwardable` command proposed on a follower is
    /// sent to the leader in a batch over the peer transport (one hop: the leader
    /// never passes it on) and its outcome returned as if proposed here.
    /// `ProposeError::Forward` then only means the leader was known not to have
    /// applied it (it had stepped down, or does not serve batches).
    pub async fn propose_with(
        &self,
        cmd: Command,
        forwardable: bool,
    ) -> Result<(CommandResponse, u64), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout();
        loop {
            match self.proposer.propose(cmd.clone(), forwardable).await {
                Ok(r) => {
                    self.metrics.proposals_committed.inc();
                    return Ok(r);
                }
                Err(ProposalError::Forward(leader)) => {
                    if let Some(leader) = leader.filter(|l| *l != self.id) {
                        return Err(ProposeError::Forward(leader));
                    }
                    // No leader yet (or this member is only becoming one): wait for
                    // one rather than fail at once, but never past the deadline and
                    // never in a tight loop.
                    if tokio::time::Instant::now() >= deadline
                        || self.wait_for_leader(deadline).await.is_none()
                    {
                        self.metrics.proposals_failed.inc();
                        return Err(ProposeError::Failed(NodeError::NoLeader));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(ProposalError::Failed(e)) => {
                    self.metrics.proposals_failed.inc();
                    return Err(ProposeError::Failed(NodeError::Raft(e)));
                }
            }
        }
    }

    /// The membership in force, as this member last applied it.
    pub fn membership(&self) -> Arc<openraft::StoredMembership<NodeId, Member>> {
        self.raft.metrics().borrow().membership_config.clone()
    }

    /// Whether this member votes in its cell. A learner (or a member that has not
    /// received any membership yet) does not, and serves only serializable
    /// reads, as etcd's learners.
    pub fn is_voter(&self) -> bool {
        self.membership()
            .membership()
            .voter_ids()
            .any(|v| v == self.id)
    }

    /// etcd's refusal of what a learner does not serve (UNAVAILABLE, so clients
    /// try another endpoint).
    pub fn refuse_learner(&self) -> Result<(), tonic::Status> {
        if self.is_voter() {
            Ok(())
        } else {
            Err(tonic::Status::unavailable(
                "etcdserver: rpc not supported for learner",
            ))
        }
    }

    /// Waits until a leader is known or the deadline passes.
    pub async fn wait_for_leader(&self, deadline: tokio::time::Instant) -> Option<NodeId> {
        let mut m = self.raft.metrics();
        let waited =
            tokio::time::timeout_at(deadline, m.wait_for(|m| m.current_leader.is_some())).await;
        match waited {
            Ok(Ok(m)) => m.current_leader,
            _ => None,
        }
    }

    /// A KV client to member `id`, for forwarding writes to the leader.
    pub fn kv_client(&self, id: NodeId) -> Result<KvClient<Channel>, NodeError> {
        let max = self.limits.max_request_bytes + (1 << 20);
        Ok(KvClient::new(self.channel(id)?)
            .max_decoding_message_size(self.config.cell.limits.max_response_message_bytes())
            .max_encoding_message_size(max))
    }

    /// A channel to member `id`'s client API.
    pub fn channel(&self, id: NodeId) -> Result<Channel, NodeError> {
        let mut map = self
            .members
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The membership's address (it follows MemberAdd), else the cell file
        // this member started with.
        let from_membership = self
            .membership()
            .membership()
            .get_node(&id)
            .map(|n| n.client_addr.clone())
            .filter(|a| !a.is_empty());
        let addr = match from_membership {
            Some(a) => a,
            None => self
                .config
                .cell
                .member(id)
                .map(|m| m.client.to_string())
                .ok_or(NodeError::UnknownMember(id))?,
        };
        if let Some(c) = map.get(&(id, addr.clone())) {
            return Ok(c.clone());
        }
        map.retain(|(known, _), _| *known != id);
        let channel = client_endpoint(&addr, self.members.tls.as_ref())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert((id, addr), channel.clone());
        Ok(channel)
    }
}

/// An endpoint for a member's address, with TLS when `tls`.
fn client_endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, NodeError> {
    cellplane_security::endpoint(addr, tls)
        .map_err(|e| NodeError::Config(format!("cannot dial {addr}: {e}")))
}

/// The address to dial for a listener bound to `addr` (an unspecified address is
/// reached over loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn raft_config(config: &NodeConfig) -> Result<openraft::Config, NodeError> {
    let r = &config.cell.raft;
    let (min, max) = config.cell.election_timeout(config.id);
    let c = openraft::Config {
        cluster_name: config.cell.name.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: min,
        election_timeout_max: max,
        max_payload_entries: r.max_entries_per_append,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
        max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
        snapshot_max_chunk_size: r.snapshot_chunk_bytes as u64,
        install_snapshot_timeout: r.peer_rpc_timeout_ms * 5,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| NodeError::Config(format!("raft settings: {e}")))
}

/// Runs member `config.id` until `shutdown` is cancelled.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let me = config
        .cell
        .member(config.id)
        .cloned()
        .ok_or(NodeError::UnknownMember(config.id))?;
    let store = cellplane_storage::open(&config.data_dir)?;
    let fresh = store
        .is_fresh()
        .map_err(|e| NodeError::Storage(e.to_string()))?;
    let log = LogStore::new(store.clone()).map_err(NodeError::Io)?;
    let sync_stats = log.sync_stats();
    let log_limits = cellplane_storage::EventLogLimits {
        revisions: config.cell.watch.event_log_revisions,
        revision_bytes: config.cell.watch.event_log_max_revision_bytes,
    };
    let sm = StateMachine::open(store.clone(), log_limits)
        .map_err(|e| NodeError::Storage(e.to_string()))?;
    // Subscribed before Raft starts applying, so the hub sees every revision.
    let events = sm.events().subscribe();
    let watch_hub = crate::watch_hub::Hub::new(config.cell.watch.event_log_revisions);
    let reader = sm
        .reader()
        .with_max_response_bytes(config.cell.limits.max_response_bytes);
    let applied = sm.subscribe();
    let ownership = sm.ownership();
    let r = &config.cell.raft;
    let client_tls = config.tls.as_ref().map(|t| t.client());
    let network = Network::new(
        r.max_peer_message_bytes,
        Duration::from_millis(r.peer_rpc_timeout_ms),
        client_tls.clone(),
    );
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config(&config)?),
        network.clone(),
        log,
        sm,
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;

    let tasks = tokio_util::task::TaskTracker::new();
    let metrics = Metrics::new().with_fsync(sync_stats.clone());
    let (barrier, barrier_task) = ReadBarrier::start(
        raft.clone(),
        network.clone(),
        Duration::from_millis(r.peer_rpc_timeout_ms),
        metrics.read_index.clone(),
        shutdown.child_token(),
    );
    let (proposer, proposer_task) = Proposer::start(
        raft.clone(),
        crate::proposer::ForwardSettings {
            max_response_bytes: crate::proposer::MAX_FORWARDED_REPLY_BYTES,
            me: config.id,
            network: network.clone(),
            timeout: config.request_timeout(),
            stream: Default::default(),
        },
        config.cell.limits.max_request_bytes,
        r.proposal_batches_in_flight,
        shutdown.child_token(),
    );
    let limits = Limits {
        max_request_bytes: config.cell.limits.max_request_bytes,
        max_txn_ops: config.cell.limits.max_txn_ops,
        max_response_bytes: config.cell.limits.max_response_bytes,
    };
    let shared = Arc::new(Shared {
        id: config.id,
        cluster_id: config.cell.cluster_id(),
        raft: raft.clone(),
        store: store.clone(),
        reader,
        applied,
        ownership,
        barrier: barrier.clone(),
        proposer,
        limits,
        metrics,
        sync_stats,
        watch_hub: watch_hub.clone(),
        shutdown: shutdown.clone(),
        inflight: Semaphore::new(config.cell.limits.max_inflight_requests),
        lessor: crate::lease::Lessor::default(),
        members: MemberChannels {
            tls: client_tls.clone(),
            channels: Mutex::default(),
        },
        config: config.clone(),
    });

    let quota = shared.config.cell.maintenance.quota_backend_bytes;
    shared
        .metrics
        .space_quota_bytes
        .set(i64::try_from(quota).unwrap_or(i64::MAX));
    tasks.spawn(watch_hub.run(events, shutdown.child_token()));
    tasks.spawn(crate::metrics_loop::run(
        shared.clone(),
        shutdown.child_token(),
    ));
    tasks.spawn(crate::lease::run_lessor(
        shared.clone(),
        shutdown.child_token(),
    ));
    crate::upkeep::spawn(&shared, &tasks, &shutdown);

    // Service discovery, served here over this member's own etcd API; its health
    // checker runs while this member leads.
    let my_id = config.id;
    let (leads, leader_task) = cellplane_discovery::leader_flag(
        raft.metrics(),
        move |m| m.current_leader == Some(my_id),
        shutdown.child_token(),
    );
    tasks.spawn(leader_task);
    let own_api = reachable(listeners.client.local_addr().map_err(NodeError::Io)?);
    let own_api = client_endpoint(&own_api.to_string(), client_tls.as_ref())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    let (discovery, checker) = cellplane_discovery::host(
        config.cell.discovery.clone(),
        own_api,
        leads,
        shutdown.child_token(),
    )
    .map_err(|e| NodeError::Config(e.to_string()))?;
    tasks.spawn(checker);

    // Servers.
    let max_req = config.cell.limits.max_request_bytes + (512 << 10);
    let max_resp = config.cell.limits.max_response_message_bytes();
    let client_router = server(&config, Port::Client)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(
            KvServer::new(KvService::new(shared.clone()))
                .max_decoding_message_size(max_req)
                .max_encoding_message_size(max_resp),
        )
        .add_service(crate::watch::WatchService::new(
            shared.clone(),
            max_req,
            max_resp,
        ))
        .add_service(
            LeaseServer::new(crate::lease::LeaseService::new(shared.clone()))
                .max_decoding_message_size(max_req)
                .max_encoding_message_size(max_resp),
        )
        .add_service(
            MaintenanceServer::new(MaintenanceService::new(shared.clone()))
                .max_decoding_message_size(max_req)
                .max_encoding_message_size(max_resp),
        )
        .add_service(
            OwnershipServer::new(crate::ownership::OwnershipService::new(shared.clone()))
                .max_decoding_message_size(max_req),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(shared.clone()))
                .max_decoding_message_size(max_req)
                .max_encoding_message_size(max_resp),
        )
        .add_service(discovery);
    let peer_router = server(&config, Port::Peer)?.add_service(
        RaftServer::new(RaftService::new(
            raft.clone(),
            barrier,
            config.cell.limits.max_request_bytes,
            shutdown.child_token(),
        ))
        .max_decoding_message_size(r.max_peer_message_bytes)
        // The outcomes of a forwarded batch (a txn's range results) may be
        // larger than any request, up to a response's limit; every other answer
        // is small.
        .max_encoding_message_size(crate::proposer::MAX_FORWARDED_REPLY_BYTES),
    );
    let client_addr = listeners.client.local_addr().map_err(NodeError::Io)?;
    let stop = shutdown.clone();
    let incoming =
        tonic::transport::server::TcpIncoming::from(listeners.client).with_nodelay(Some(true));
    tasks.spawn(async move {
        if let Err(e) = client_router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "client API server failed");
        }
    });
    let stop = shutdown.clone();
    let incoming =
        tonic::transport::server::TcpIncoming::from(listeners.peer).with_nodelay(Some(true));
    tasks.spawn(async move {
        if let Err(e) = peer_router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "peer server failed");
        }
    });
    tasks.spawn(crate::http::serve(
        listeners.http,
        shared.clone(),
        shutdown.child_token(),
    ));
    tasks.close();

    if fresh && config.join {
        tracing::info!("--join: waiting for the leader to add this member and send it the log");
    } else if fresh {
        initialize_once(&config, &raft, &me, client_tls.as_ref(), shutdown.clone()).await?;
    }
    tracing::info!(
        cell = %config.cell.name, id = config.id, client = %client_addr,
        "member serving"
    );

    // openraft stops a member's Raft for good on a storage failure; a member
    // that went on serving without it would answer reads from a frozen state
    // and fail every write. Exit instead, so a supervisor restarts it.
    // Watched from a task on the runtime, not here: this future runs on the
    // process's main thread, and Raft's metrics change several times per write,
    // each change a cross-thread wake-up (7 % of the leader's samples at one
    // client).
    let mut raft_alive = raft.metrics();
    let watching = shutdown.clone();
    let raft_watch = tokio::spawn(async move {
        tokio::select! {
            _ = watching.cancelled() => false,
            _ = async { while raft_alive.changed().await.is_ok() {} } => true,
        }
    });
    // A watcher that panicked cannot tell; treat it as a shutdown.
    let stopped = raft_watch.await.unwrap_or(false);
    if stopped {
        tracing::error!("Raft stopped on a fatal error (see above): the member exits");
        shutdown.cancel();
    }
    tracing::info!("shutting down");
    let _ = raft.shutdown().await;
    let _ = barrier_task.await;
    let _ = proposer_task.await;
    // Servers drain in-flight requests; give them a bounded grace period.
    let drained = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    if drained.is_err() {
        tracing::warn!("servers did not drain within 5s");
    }
    if stopped {
        return Err(NodeError::Raft(
            "Raft stopped on a fatal error; restart the member".into(),
        ));
    }
    Ok(())
}

/// A server for one of the member's ports: TLS with a required client
/// certificate when the cell has TLS, and the port's access policy.
fn server(
    config: &NodeConfig,
    port: Port,
) -> Result<
    tonic::transport::Server<tower::layer::util::Stack<AccessLayer, tower::layer::util::Identity>>,
    NodeError,
> {
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if port == Port::Peer {
        // Peers hold long-lived streams (`peer_stream`). A peer whose host
        // vanished never closes its connection; pings end it, and the streams
        // on it, within seconds, as the peers' own channels ping us.
        builder = builder
            .http2_keepalive_interval(Some(crate::network::PEER_KEEPALIVE))
            .http2_keepalive_timeout(Some(crate::network::PEER_KEEPALIVE));
    }
    let policy = match &config.tls {
        Some(tls) => {
            builder = builder
                .tls_config(tls.server(cellplane_security::ClientAuth::Required))
                .map_err(|e| NodeError::Config(format!("TLS: {e}")))?;
            Some(Policy::new(&config.cell.name, config.cell.role, port))
        }
        None => None,
    };
    Ok(builder.layer(AccessLayer::new(policy)))
}

/// The first boot of a cell: the member with the lowest id, finding its own store
/// empty and no peer that already belongs to a running cell, initializes the cell's
/// membership. Every later boot finds state on disk and skips this, so a restart
/// never re-initializes.
async fn initialize_once(
    config: &NodeConfig,
    raft: &Raft,
    me: &crate::config::MemberDef,
    tls: Option<&ClientTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let lowest = config.cell.members.iter().map(|m| m.id).min();
    if lowest != Some(me.id) {
        return Ok(());
    }
    for m in config.cell.members.iter().filter(|m| m.id != me.id) {
        if let Some(term) = peer_term(&m.client, tls).await.filter(|t| *t > 0) {
            tracing::warn!(
                peer = m.id,
                term,
                "store is empty but peer already runs this cell: not initializing; \
                 this member must be re-added to the cell, not bootstrapped"
            );
            return Ok(());
        }
    }
    let members: BTreeMap<NodeId, Member> = config
        .cell
        .members
        .iter()
        .map(|m| {
            (
                m.id,
                Member {
                    name: m.display_name(&config.cell.name),
                    client_addr: m.client.to_string(),
                    peer_addr: m.peer.to_string(),
                },
            )
        })
        .collect();
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = raft.initialize(members) => match r {
            Ok(()) => {
                tracing::info!(cell = %config.cell.name, "initialized the cell");
                Ok(())
            }
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }
}

/// The Raft term a peer reports, if it answers quickly.
async fn peer_term(addr: &crate::config::HostPort, tls: Option<&ClientTlsConfig>) -> Option<u64> {
    let channel = client_endpoint(&addr.to_string(), tls)
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let resp = MaintenanceClient::new(channel)
        .status(StatusRequest {})
        .await
        .ok()?;
    Some(resp.get_ref().raft_term)
}
