//! Leases: the etcd `Lease` service of a member and the leader's lessor.
//!
//! The store knows which leases exist and which keys each holds; *when* a lease
//! expires is known only to the leader, in memory, as in etcd. A member that
//! becomes leader loads every lease with a full TTL (a leader change extends
//! leases, never shortens them), then renews them on KeepAlive and proposes a
//! revoke through Raft for each one that runs out, so expiry deletes keys with
//! delete events on every member at one revision.
//!
//! Followers forward Grant, Revoke, KeepAlive and TimeToLive to the leader (each
//! once); Leases is served by any member after a linearizable read barrier.
//!
//! A call carrying the [`TENANT_METADATA`] is a tenant's, passed on by a router:
//! its grants record the tenant as the lease's owner, and for any lease it does not
//! own it gets the answers etcd gives for a lease that does not exist, so one
//! tenant can neither touch nor discover another's leases. A call without it is an
//! operator's (or a member's) and sees every lease.
//!
//! Leases move with their tenant (`cellplane-mover`): a lease whose tenant the
//! cell does not serve (moving in, fenced, or moved away) is refused like the
//! tenant's keys (FAILED_PRECONDITION naming the cell that serves it), is not
//! expired here (its countdown restarts instead: the mover decides its fate),
//! and only the mover, with the `cellplane-move-tenant` metadata, grants,
//! revokes and reads it.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, ResponseHeader,
};
use cellplane_storage::{Command, KvError, MAX_LEASE_TTL, NodeId};
use futures::Stream;
use prost::Message;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{kv_status, node_status, read_status};
use crate::node::{ProposeError, Shared};
use crate::ownership::{keep_mover, mover_tenant, moving};
use crate::service::{forwarded_request, is_forwarded, serve_request};

/// The gRPC metadata naming the tenant a call is made for. A router sets it on
/// every request it passes to a cell, to the tenant it authenticated; cells are
/// reached only by routers, operators and their own members, so it is trusted.
pub const TENANT_METADATA: &str = "cellplane-tenant";

/// The tenant `request` is made for, from its [`TENANT_METADATA`]; `None` for an
/// operator's or a member's call. A malformed name is refused rather than ignored:
/// ignoring it would turn a tenant's call into an operator's.
pub fn request_tenant<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let bad = |why: String| {
        Status::invalid_argument(format!("invalid `{TENANT_METADATA}` metadata: {why}"))
    };
    let mut values = request.metadata().get_all(TENANT_METADATA).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad("sent more than once".into()));
    }
    let name = value
        .to_str()
        .map_err(|_| bad("not a printable ASCII string".into()))?;
    cellplane_security::check_tenant_name(name).map_err(|e| bad(e.to_string()))?;
    Ok(Some(name.to_string()))
}

/// `inner` forwarded to the leader once, on behalf of `tenant` if any.
fn forwarded_for<T>(inner: T, tenant: Option<&str>) -> Request<T> {
    let mut r = forwarded_request(inner);
    if let Some(t) = tenant {
        // Checked by `request_tenant`: printable ASCII.
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(t) {
            r.metadata_mut().insert(TENANT_METADATA, v);
        }
    }
    r
}

/// How often the leader looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(250);
/// Revokes the leader proposes per tick at most, so that a mass expiry (say, after
/// a partition heals) is spread out instead of flooding the log (etcd: 1000/s).
const MAX_REVOKES_PER_TICK: usize = 250;
/// Keep-alive responses buffered per stream; a client that does not read them
/// stops being read from (its further keep-alives wait).
const KEEPALIVE_BUFFER: usize = 16;

/// The leader's in-memory lease deadlines.
#[derive(Default)]
pub struct Lessor {
    state: Mutex<LessorState>,
}

#[derive(Default)]
struct LessorState {
    /// The term whose leader loaded the deadlines below; `None` when this member
    /// does not lead (or has not loaded them yet).
    term: Option<u64>,
    leases: HashMap<i64, Deadline>,
    /// Expired leases whose revoke is being proposed.
    revoking: HashSet<i64>,
}

#[derive(Clone, Copy)]
struct Deadline {
    expires: Instant,
    ttl: i64,
}

/// What a keep-alive found.
enum Renewed {
    /// Renewed: the TTL granted, in seconds.
    Ttl(i64),
    /// No such lease, or it has expired (and is being revoked).
    NotFound,
    /// This member leads but has not loaded the leases yet: the client retries.
    NotReady,
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, LessorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lease this member (as leader) just granted. Kept even while the
    /// deadlines are still being loaded: the load may have read the store before
    /// this grant was applied, and a lease without a deadline would never expire.
    fn granted(&self, id: i64, ttl: i64) {
        self.lock().leases.insert(
            id,
            Deadline {
                expires: Instant::now() + secs(ttl),
                ttl,
            },
        );
    }

    fn revoked(&self, id: i64) {
        let mut st = self.lock();
        st.leases.remove(&id);
        st.revoking.remove(&id);
    }

    /// Renews `id` for a full TTL; `stored` looks the lease up in the store, for a
    /// lease granted after the deadlines were loaded by a path that did not pass
    /// here.
    fn renew(&self, id: i64, stored: impl FnOnce() -> Option<i64>) -> Renewed {
        let now = Instant::now();
        let mut st = self.lock();
        if st.term.is_none() {
            return Renewed::NotReady;
        }
        match st.leases.get_mut(&id) {
            Some(d) if d.expires <= now => Renewed::NotFound,
            Some(d) => {
                d.expires = now + secs(d.ttl);
                Renewed::Ttl(d.ttl)
            }
            None => match stored() {
                Some(ttl) => {
                    st.leases.insert(
                        id,
                        Deadline {
                            expires: now + secs(ttl),
                            ttl,
                        },
                    );
                    Renewed::Ttl(ttl)
                }
                None => Renewed::NotFound,
            },
        }
    }

    /// Remaining seconds of `id`, rounded up, if this member tracks it.
    fn remaining(&self, id: i64) -> Option<i64> {
        let st = self.lock();
        st.leases.get(&id).map(|d| {
            let left = d.expires.saturating_duration_since(Instant::now());
            left.as_millis().div_ceil(1000) as i64
        })
    }

    /// Expired leases not yet being revoked; marks them as being revoked.
    fn take_expired(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        let mut out = Vec::new();
        for (id, d) in &st.leases {
            if out.len() >= MAX_REVOKES_PER_TICK {
                break;
            }
            if d.expires <= now && !st.revoking.contains(id) {
                out.push(*id);
            }
        }
        st.revoking.extend(out.iter().copied());
        out
    }

    fn retry_later(&self, id: i64) {
        self.lock().revoking.remove(&id);
    }

    /// Restarts an expired lease's countdown with a full TTL instead of revoking
    /// it: its tenant is not served here (moving in or out), and the mover, not
    /// expiry, decides what becomes of it.
    fn hold(&self, id: i64) {
        let mut st = self.lock();
        st.revoking.remove(&id);
        if let Some(d) = st.leases.get_mut(&id) {
            d.expires = Instant::now() + secs(d.ttl);
        }
    }

    /// Makes `id` expire `remaining` from now, if this member leads with its
    /// deadlines loaded and tracks it; answers whether it did.
    pub fn set_remaining(&self, id: i64, remaining: Duration) -> bool {
        let mut st = self.lock();
        if st.term.is_none() {
            return false;
        }
        match st.leases.get_mut(&id) {
            Some(d) => {
                d.expires = Instant::now() + remaining;
                true
            }
            None => false,
        }
    }

    fn step_down(&self) {
        let mut st = self.lock();
        st.term = None;
        st.leases.clear();
        st.revoking.clear();
    }

    /// Installs the leases of the store with full TTLs, as leader of `term`.
    fn load(&self, term: u64, leases: Vec<(i64, i64)>) {
        let now = Instant::now();
        let mut st = self.lock();
        for (id, ttl) in leases {
            st.leases.entry(id).or_insert(Deadline {
                expires: now + secs(ttl),
                ttl,
            });
        }
        st.term = Some(term);
    }

    pub fn loaded_term(&self) -> Option<u64> {
        self.lock().term
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

/// Follows leadership and expires leases while this member leads. Runs until
/// `shutdown` is cancelled.
pub async fn run_lessor(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut metrics = shared.raft.metrics();
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Raft metrics change on every apply: they only tell leadership here, and
        // expiry is looked for on the tick alone.
        let ticked = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = tick.tick() => true,
        };
        let (leading, term) = {
            let m = metrics.borrow();
            (m.current_leader == Some(shared.id), m.current_term)
        };
        let lessor = &shared.lessor;
        if !leading {
            lessor.step_down();
            continue;
        }
        if lessor.loaded_term() != Some(term) {
            // Everything committed before this term must be applied first, or a
            // lease granted by the previous leader could be missed.
            lessor.step_down();
            let mut applied = shared.applied.clone();
            if shared
                .barrier
                .wait_linearizable(&mut applied)
                .await
                .is_err()
            {
                continue;
            }
            match shared.reader.leases() {
                Ok(leases) => {
                    let n = leases.len();
                    lessor.load(
                        term,
                        leases.into_iter().map(|(id, r)| (id, r.ttl)).collect(),
                    );
                    tracing::info!(term, leases = n, "leading: lease deadlines loaded");
                }
                Err(e) => tracing::warn!(error = %e, "cannot load leases"),
            }
            continue;
        }
        if !ticked {
            continue;
        }
        for id in lessor.take_expired() {
            if !lease_served(&shared, id) {
                lessor.hold(id);
                continue;
            }
            let shared = shared.clone();
            // One at a time per lease, all of a tick's concurrently: the proposer
            // batches them into few Raft entries.
            tokio::spawn(async move {
                match shared.propose(Command::LeaseRevoke(id)).await {
                    Ok((resp, _)) => {
                        match resp.outcome {
                            Some(Ok(_)) => {
                                shared.metrics.leases_expired.inc();
                                tracing::debug!(lease = id, "lease expired and revoked");
                            }
                            Some(Err(KvError::LeaseNotFound)) => {}
                            Some(Err(KvError::NotOwned { .. })) => {
                                // Its tenant started moving meanwhile.
                                shared.lessor.hold(id);
                                return;
                            }
                            other => {
                                tracing::warn!(lease = id, outcome = ?other, "revoking an expired lease failed");
                                shared.lessor.retry_later(id);
                                return;
                            }
                        }
                        shared.lessor.revoked(id);
                    }
                    Err(_) => shared.lessor.retry_later(id),
                }
            });
        }
    }
}

/// Whether the cell serves the tenant that owns lease `id` (an operator's lease,
/// or one the store cannot read now: yes, expiry proceeds as before).
fn lease_served(s: &Shared, id: i64) -> bool {
    match s.reader.lease(id) {
        Ok(Some(rec)) => check_served(s, &rec).is_ok(),
        _ => true,
    }
}

/// Refuses a lease whose tenant this cell does not serve, as the tenant's keys
/// are refused: FAILED_PRECONDITION naming the cell that serves it.
fn check_served(s: &Shared, rec: &cellplane_storage::LeaseRecord) -> Result<(), Status> {
    match &rec.owner {
        Some(owner) => s.ownership.borrow().check_tenant(owner).map_err(kv_status),
        None => Ok(()),
    }
}

/// `inner` forwarded to the leader once, for `tenant`, as the mover if `mover`.
fn forward<T>(inner: T, tenant: Option<&str>, mover: Option<&str>) -> Request<T> {
    keep_mover(forwarded_for(inner, tenant), mover)
}

/// The etcd `Lease` service of a member.
pub struct LeaseService {
    shared: Arc<Shared>,
}

impl LeaseService {
    pub fn new(shared: Arc<Shared>) -> LeaseService {
        LeaseService { shared }
    }

    fn leader_client(&self, leader: NodeId) -> Result<LeaseClient<Channel>, Status> {
        let channel = self.shared.channel(leader).map_err(node_status)?;
        Ok(LeaseClient::new(channel))
    }

    /// The leader to forward to, or `None` when this member leads. Waits (up to the
    /// request timeout) while no leader is known.
    async fn leader_elsewhere(&self, forwarded: bool) -> Result<Option<NodeId>, Status> {
        let s = &self.shared;
        let deadline = Instant::now() + s.config.request_timeout();
        match s.wait_for_leader(deadline).await {
            None => Err(Status::unavailable("etcdserver: no leader")),
            Some(l) if l == s.id => Ok(None),
            Some(l) if forwarded => Err(Status::unavailable(format!(
                "etcdserver: not leader (member {} thinks {l} leads); retry",
                s.id
            ))),
            Some(l) => Ok(Some(l)),
        }
    }

    /// The smallest TTL a lease gets: long enough to survive a leader election
    /// (etcd: 1.5 election timeouts; here 1.5 × the longest a member waits before
    /// it campaigns, its leader lease plus its election timeout, each up to the
    /// range's upper end).
    fn min_ttl(&self) -> i64 {
        let cell = &self.shared.config.cell;
        let max_election_ms = cell
            .members
            .iter()
            .map(|m| cell.election_timeout(m.id).1)
            .max()
            .unwrap_or(1000);
        (max_election_ms * 3).div_ceil(1000) as i64
    }

    fn new_lease_id(&self) -> i64 {
        let tag = cellplane_map::lease_tag(&self.shared.config.cell.name);
        loop {
            let low = rand::random::<u64>() & ((1 << cellplane_map::LEASE_TAG_SHIFT) - 1);
            if low != 0 {
                return ((tag << cellplane_map::LEASE_TAG_SHIFT) | low) as i64;
            }
        }
    }

    async fn keep_alive_one(
        &self,
        id: i64,
        forwarded: bool,
        tenant: Option<&str>,
    ) -> Result<LeaseKeepAliveResponse, Status> {
        let s = &self.shared;
        if let Some(leader) = self.leader_elsewhere(forwarded).await? {
            let mut client = self.leader_client(leader)?;
            let req = forwarded_for(tokio_stream::once(LeaseKeepAliveRequest { id }), tenant);
            let mut stream = client.lease_keep_alive(req).await?.into_inner();
            return match stream.message().await? {
                Some(r) => Ok(r),
                None => Err(Status::unavailable(
                    "etcdserver: leader ended the keep-alive",
                )),
            };
        }
        // Another tenant's lease is answered as a missing one, and not renewed;
        // a lease whose tenant is not served here is refused.
        // Until the deadlines are loaded the store may lag: renew says to retry.
        if s.lessor.loaded_term().is_some() {
            let rec = s.reader.lease(id).map_err(kv_status)?;
            if let Some(t) = tenant
                && !rec.as_ref().is_some_and(|r| r.owned_by(t))
            {
                return Ok(LeaseKeepAliveResponse {
                    header: Some(s.header(s.applied.borrow().revision)),
                    id,
                    ttl: 0,
                });
            }
            if let Some(rec) = &rec {
                check_served(s, rec)?;
            }
        }
        let stored = || s.reader.lease(id).ok().flatten().map(|r| r.ttl);
        let ttl = match s.lessor.renew(id, stored) {
            Renewed::Ttl(t) => t,
            Renewed::NotFound => 0,
            Renewed::NotReady => {
                return Err(Status::unavailable(
                    "etcdserver: the new leader is loading leases; retry",
                ));
            }
        };
        let revision = s.applied.borrow().revision;
        Ok(LeaseKeepAliveResponse {
            header: Some(s.header(revision)),
            id,
            ttl,
        })
    }

    /// Proposes a lease command and decodes its result, or says whom to forward to.
    async fn propose<T: Message + Default>(
        &self,
        cmd: Command,
        forwarded: bool,
    ) -> Result<Result<(T, ResponseHeader), NodeId>, Status> {
        let s = &self.shared;
        match s.propose(cmd).await {
            Ok((resp, term)) => {
                let body = crate::service::decode_outcome(resp.outcome)?;
                let mut header = s.header(resp.revision);
                header.raft_term = term;
                Ok(Ok((body, header)))
            }
            Err(ProposeError::Forward(leader)) if !forwarded => Ok(Err(leader)),
            Err(ProposeError::Forward(leader)) => Err(Status::unavailable(format!(
                "etcdserver: not leader (member {} thinks {leader} leads); retry",
                s.id
            ))),
            Err(ProposeError::Failed(e)) => Err(node_status(e)),
        }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl cellplane_proto::etcdserverpb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let tenant = request_tenant(&request)?;
        let mover = mover_tenant(request.metadata())?;
        let req = request.into_inner();
        serve_request(&self.shared, "LeaseGrant", async {
            if mover.is_some() && req.id == 0 {
                return Err(Status::invalid_argument(
                    "the mover grants a moving lease by the ID it has in the source cell",
                ));
            }
            if req.ttl > MAX_LEASE_TTL {
                return Err(kv_status(KvError::LeaseTtlTooLarge));
            }
            if req.id < 0 {
                return Err(Status::invalid_argument(format!(
                    "lease ID {} must be positive (0: let the cell choose)",
                    req.id
                )));
            }
            if let Some(leader) = self.leader_elsewhere(forwarded).await? {
                let mut c = self.leader_client(leader)?;
                let req = forward(req, tenant.as_deref(), mover.as_deref());
                return Ok(c.lease_grant(req).await?.into_inner());
            }
            let id = if req.id == 0 {
                self.new_lease_id()
            } else {
                req.id
            };
            let ttl = req.ttl.max(self.min_ttl());
            // The mover grants for the tenant it moves; a router for its caller.
            let grant = match mover.as_ref().or(tenant.as_ref()) {
                Some(owner) => Command::LeaseGrantOwned {
                    id,
                    ttl,
                    owner: owner.clone(),
                },
                None => Command::LeaseGrant { id, ttl },
            };
            let cmd = moving(mover.clone(), grant);
            match self.propose::<LeaseGrantResponse>(cmd, forwarded).await? {
                Ok((resp, header)) => {
                    self.shared.lessor.granted(id, ttl);
                    Ok(LeaseGrantResponse {
                        header: Some(header),
                        ..resp
                    })
                }
                Err(leader) => {
                    let mut c = self.leader_client(leader)?;
                    let req = forward(req, tenant.as_deref(), mover.as_deref());
                    Ok(c.lease_grant(req).await?.into_inner())
                }
            }
        })
        .await
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let tenant = request_tenant(&request)?;
        let mover = mover_tenant(request.metadata())?;
        let req = request.into_inner();
        serve_request(&self.shared, "LeaseRevoke", async {
            // A tenant's revoke of a lease it does not own fails at apply as if the
            // lease did not exist.
            let revoke = match mover.as_ref().or(tenant.as_ref()) {
                Some(owner) => Command::LeaseRevokeOwned {
                    id: req.id,
                    owner: owner.clone(),
                },
                None => Command::LeaseRevoke(req.id),
            };
            let cmd = moving(mover.clone(), revoke);
            match self.propose::<LeaseRevokeResponse>(cmd, forwarded).await? {
                Ok((_, header)) => {
                    self.shared.lessor.revoked(req.id);
                    Ok(LeaseRevokeResponse {
                        header: Some(header),
                    })
                }
                Err(leader) => {
                    let mut c = self.leader_client(leader)?;
                    let req = forward(req, tenant.as_deref(), mover.as_deref());
                    Ok(c.lease_revoke(req).await?.into_inner())
                }
            }
        })
        .await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let forwarded = is_forwarded(&request);
        let tenant = request_tenant(&request)?;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_BUFFER);
        let this = LeaseService {
            shared: self.shared.clone(),
        };
        let shutdown = self.shared.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = incoming.next() => n,
                };
                let req = match next {
                    None => return,
                    Some(Err(_)) => return,
                    Some(Ok(r)) => r,
                };
                let resp = this
                    .keep_alive_one(req.id, forwarded, tenant.as_deref())
                    .await;
                let failed = resp.is_err();
                // Full buffer: wait, which stops reading this client's requests.
                if tx.send(resp).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let tenant = request_tenant(&request)?;
        let mover = mover_tenant(request.metadata())?;
        let req = request.into_inner();
        serve_request(&self.shared, "LeaseTimeToLive", async {
            let s = &self.shared;
            if let Some(leader) = self.leader_elsewhere(forwarded).await? {
                let mut c = self.leader_client(leader)?;
                let req = forward(req, tenant.as_deref(), mover.as_deref());
                return Ok(c.lease_time_to_live(req).await?.into_inner());
            }
            let mut applied = s.applied.clone();
            s.barrier
                .wait_linearizable(&mut applied)
                .await
                .map_err(read_status)?;
            let revision = applied.borrow().revision;
            let header = Some(s.header(revision));
            // As etcd: an unknown (or expired and revoked) lease is TTL -1, not an
            // error. Another tenant's lease is answered the same way.
            // The mover reads its tenant's leases wherever they are.
            let owner = mover.as_deref().or(tenant.as_deref());
            let found = s
                .reader
                .lease_with_keys(req.id)
                .map_err(kv_status)?
                .filter(|(rec, _)| owner.is_none_or(|t| rec.owned_by(t)));
            if let (Some((rec, _)), None) = (&found, &mover) {
                check_served(s, rec)?;
            }
            let Some((rec, keys)) = found else {
                return Ok(LeaseTimeToLiveResponse {
                    header,
                    id: req.id,
                    ttl: -1,
                    ..Default::default()
                });
            };
            let ttl = s.lessor.remaining(req.id).unwrap_or(rec.ttl);
            Ok(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl,
                granted_ttl: rec.ttl,
                keys: if req.keys { keys } else { Vec::new() },
            })
        })
        .await
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let tenant = request_tenant(&request)?;
        let mover = mover_tenant(request.metadata())?;
        serve_request(&self.shared, "LeaseLeases", async {
            let s = &self.shared;
            let mut applied = s.applied.clone();
            s.barrier
                .wait_linearizable(&mut applied)
                .await
                .map_err(read_status)?;
            let revision = applied.borrow().revision;
            let leases = match (&mover, &tenant) {
                (Some(t), _) => s.reader.leases_of(t),
                (None, Some(t)) => {
                    s.ownership.borrow().check_tenant(t).map_err(kv_status)?;
                    s.reader.leases_of(t)
                }
                (None, None) => s.reader.leases(),
            }
            .map_err(kv_status)?;
            Ok(LeaseLeasesResponse {
                header: Some(s.header(revision)),
                leases: leases
                    .into_iter()
                    .map(|(id, _)| LeaseStatus { id })
                    .collect(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tenant(values: &[&[u8]]) -> Request<()> {
        let mut r = Request::new(());
        for v in values {
            let v = tonic::metadata::MetadataValue::try_from(*v).unwrap();
            r.metadata_mut().append(TENANT_METADATA, v);
        }
        r
    }

    #[test]
    fn the_tenant_comes_from_the_metadata_and_a_bad_one_is_refused() {
        assert_eq!(request_tenant(&with_tenant(&[])).unwrap(), None);
        for good in ["a", "acme", "t-1_x.y", "9lives", &"x".repeat(64)] {
            assert_eq!(
                request_tenant(&with_tenant(&[good.as_bytes()])).unwrap(),
                Some(good.to_string())
            );
        }
        let long = "x".repeat(65);
        for bad in [
            &b""[..],
            b"_system",
            b".hidden",
            b"-a",
            b"a/b",
            b"a b",
            b"caf\xc3\xa9",
            long.as_bytes(),
        ] {
            let e = request_tenant(&with_tenant(&[bad])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(e.message().contains(TENANT_METADATA), "{}", e.message());
        }
        let twice = request_tenant(&with_tenant(&[b"a", b"b"])).unwrap_err();
        assert_eq!(twice.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_held_lease_restarts_its_countdown_and_a_handed_over_deadline_is_kept() {
        let lessor = Lessor::default();
        assert!(!lessor.set_remaining(1, Duration::ZERO), "not leading yet");
        lessor.load(3, vec![(1, 10), (2, 10)]);
        assert!(lessor.set_remaining(1, Duration::ZERO));
        assert!(!lessor.set_remaining(9, Duration::ZERO), "no such lease");
        assert_eq!(lessor.take_expired(), vec![1]);
        // Its tenant is not served here: held, not revoked, full TTL again.
        lessor.hold(1);
        assert!(lessor.take_expired().is_empty());
        assert_eq!(lessor.remaining(1), Some(10));
        // A remaining time handed over by the mover replaces it.
        assert!(lessor.set_remaining(2, Duration::from_millis(2500)));
        assert_eq!(lessor.remaining(2), Some(3));
        lessor.step_down();
        assert!(!lessor.set_remaining(2, Duration::ZERO));
    }

    #[test]
    fn a_forwarded_call_carries_the_tenant() {
        let r = forwarded_for((), Some("acme"));
        assert!(is_forwarded(&r));
        assert_eq!(request_tenant(&r).unwrap().as_deref(), Some("acme"));
        let r = forwarded_for((), None);
        assert!(is_forwarded(&r));
        assert_eq!(request_tenant(&r).unwrap(), None);
    }
}
