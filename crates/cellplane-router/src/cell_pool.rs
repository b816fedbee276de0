//! Per-cell forwarding: one connection pool, one bulkhead and one set of member
//! health per cell, so a dead or slow cell cannot take what another cell needs.
//!
//! Each cell's requests go through its own tower stack, outermost first:
//!
//! - load shedding: when the cell's bulkhead is full, fail at once with
//!   UNAVAILABLE instead of queueing (a dead cell's requests fail fast);
//! - a concurrency limit (the bulkhead): at most `max_in_flight` requests per cell;
//! - a timeout per request;
//! - retries with a budget (a fraction of recent requests), only for requests
//!   that are safe to send again to another member;
//! - member choice: the known leader for writes and linearizable reads, else any
//!   healthy member; members that fail are skipped until a probe finds them well.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, StatusRequest, TxnRequest, TxnResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceBuilder, ServiceExt};

/// Settings of every cell's pool.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Requests in flight to one cell; more are shed with UNAVAILABLE.
    pub max_in_flight: usize,
    /// Deadline of one forwarded request, retries included.
    pub request_timeout_ms: u64,
    /// TCP connect timeout to a member.
    pub connect_timeout_ms: u64,
    /// How often each member is probed (Maintenance.Status).
    pub probe_interval_ms: u64,
    /// Deadline of one probe.
    pub probe_timeout_ms: u64,
    /// Retries allowed as a share of recent requests (0.2 = 20 %).
    pub retry_ratio: f32,
    /// Retries always allowed per second, whatever the ratio.
    pub retry_min_per_sec: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_in_flight: 2048,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 500,
            probe_interval_ms: 500,
            probe_timeout_ms: 400,
            retry_ratio: 0.2,
            retry_min_per_sec: 10,
        }
    }
}

/// A request forwarded to a cell.
#[derive(Debug, Clone)]
pub enum KvCall {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    /// One keep-alive, sent on a stream of its own (the router renews each lease in
    /// the cell that holds it, whatever stream the client used).
    LeaseKeepAlive(LeaseKeepAliveRequest),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    LeaseLeases(LeaseLeasesRequest),
}

/// The cell's answer.
#[derive(Debug)]
pub enum KvReply {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseKeepAlive(LeaseKeepAliveResponse),
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    LeaseLeases(LeaseLeasesResponse),
}

impl KvCall {
    /// Reads may be sent again to another member; a write may have been applied
    /// even when its answer was lost, so it is sent again only when it certainly
    /// never left (see [`never_sent`]).
    fn read_only(&self) -> bool {
        // A keep-alive renews to the same deadline however often it is sent.
        matches!(
            self,
            KvCall::Range(_)
                | KvCall::LeaseKeepAlive(_)
                | KvCall::LeaseTimeToLive(_)
                | KvCall::LeaseLeases(_)
        )
    }

    fn wants_leader(&self) -> bool {
        !matches!(self, KvCall::Range(r) if r.serializable)
    }
}

/// True when the member gave no answer of its own: UNAVAILABLE, or any status
/// tonic built here from a transport error (it carries that error as its source;
/// a member's answer arrives without one). A connection that dies with requests
/// in flight, as when a cell's members are killed, surfaces as UNKNOWN
/// ("transport error") or CANCELLED, which must not reach the client as such.
fn unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
}

/// True when the call failed before the request could reach the member
/// (connection refused or not established).
fn never_sent(s: &tonic::Status) -> bool {
    use std::error::Error;
    if s.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut src: Option<&(dyn Error + 'static)> = s.source();
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            );
        }
        if e.downcast_ref::<tonic::transport::Error>().is_some()
            && e.to_string().contains("connect")
        {
            return true;
        }
        src = e.source();
    }
    false
}

/// One member as the router sees it.
pub struct MemberState {
    pub endpoint: String,
    channel: Channel,
    /// Last probe or call succeeded.
    healthy: AtomicBool,
    /// The member's id, learned from its Status header.
    member_id: AtomicU64,
    /// The leader id the member last reported (0: none).
    leader_id: AtomicU64,
}

impl MemberState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    pub fn leader_id(&self) -> u64 {
        self.leader_id.load(Ordering::Relaxed)
    }
    pub fn member_id(&self) -> u64 {
        self.member_id.load(Ordering::Relaxed)
    }
}

/// Request counters and recent latency of one cell.
pub struct CellStats {
    /// When counting began (the pool's creation).
    pub since: Instant,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub shed: AtomicU64,
    window: Mutex<(
        Instant,
        hdrhistogram::Histogram<u64>,
        hdrhistogram::Histogram<u64>,
    )>,
}

/// How long one latency window lasts; p99 is read over the current and the last.
const WINDOW: Duration = Duration::from_secs(10);

impl CellStats {
    fn new() -> CellStats {
        let h =
            || hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds");
        CellStats {
            since: Instant::now(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            window: Mutex::new((Instant::now(), h(), h())),
        }
    }

    fn record(&self, elapsed: Duration, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut guard = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (started, current, previous) = &mut *guard;
        if started.elapsed() > WINDOW {
            std::mem::swap(current, previous);
            current.reset();
            *started = Instant::now();
        }
        let _ = current.record((elapsed.as_micros() as u64).max(1));
    }

    /// p99 in microseconds over roughly the last one or two windows.
    pub fn recent_p99_us(&self) -> u64 {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = w.1.clone();
        let _ = h.add(&w.2);
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(0.99)
        }
    }
}

/// What the member picker shares with the prober.
pub struct CellInner {
    pub name: String,
    pub members: Vec<MemberState>,
    pub stats: CellStats,
    next: AtomicU64,
}

impl CellInner {
    /// The member to send `call` to next: the leader when wanted and known healthy,
    /// else the next healthy member round-robin, skipping `avoid`.
    fn pick(&self, wants_leader: bool, avoid: Option<usize>) -> Option<usize> {
        if wants_leader {
            let leader = self.members.iter().find_map(|m| {
                let l = m.leader_id();
                (m.healthy() && l != 0).then_some(l)
            });
            let at = leader.and_then(|l| {
                self.members
                    .iter()
                    .position(|m| m.member_id() == l && m.healthy())
            });
            if let Some(i) = at.filter(|i| Some(*i) != avoid) {
                return Some(i);
            }
        }
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|i| Some(*i) != avoid && self.members[*i].healthy())
    }
}

/// The request as it moves through the stack: the call and the member it last
/// failed on.
#[derive(Debug, Clone)]
pub struct Attempt {
    call: KvCall,
    failed_on: Option<usize>,
}

/// Innermost service: sends an attempt to one member.
#[derive(Clone)]
pub struct Picker {
    cell: Arc<CellInner>,
    max_message_bytes: usize,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No member of the cell is reachable now.
#[derive(Debug, thiserror::Error)]
#[error("no reachable member")]
pub struct NoMember;

/// A member's error, with which member it came from (for retries).
#[derive(Debug, thiserror::Error)]
#[error("{status}")]
pub struct MemberError {
    pub status: tonic::Status,
    member: usize,
}

impl Service<Attempt> for Picker {
    type Response = KvReply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<KvReply, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, a: Attempt) -> Self::Future {
        let cell = self.cell.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let i = cell
                .pick(a.call.wants_leader(), a.failed_on)
                .ok_or(NoMember)?;
            let m = &cell.members[i];
            let mut c = KvClient::new(m.channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(max);
            let r = match a.call {
                KvCall::Range(r) => c.range(r).await.map(|x| KvReply::Range(x.into_inner())),
                KvCall::Put(r) => c.put(r).await.map(|x| KvReply::Put(x.into_inner())),
                KvCall::DeleteRange(r) => c
                    .delete_range(r)
                    .await
                    .map(|x| KvReply::DeleteRange(x.into_inner())),
                KvCall::Txn(r) => c.txn(r).await.map(|x| KvReply::Txn(x.into_inner())),
                KvCall::Compact(r) => c.compact(r).await.map(|x| KvReply::Compact(x.into_inner())),
                KvCall::LeaseGrant(r) => lease(m)
                    .lease_grant(r)
                    .await
                    .map(|x| KvReply::LeaseGrant(x.into_inner())),
                KvCall::LeaseRevoke(r) => lease(m)
                    .lease_revoke(r)
                    .await
                    .map(|x| KvReply::LeaseRevoke(x.into_inner())),
                KvCall::LeaseTimeToLive(r) => lease(m)
                    .lease_time_to_live(r)
                    .await
                    .map(|x| KvReply::LeaseTimeToLive(x.into_inner())),
                KvCall::LeaseLeases(r) => lease(m)
                    .lease_leases(r)
                    .await
                    .map(|x| KvReply::LeaseLeases(x.into_inner())),
                KvCall::LeaseKeepAlive(r) => {
                    keep_alive_once(m, r).await.map(KvReply::LeaseKeepAlive)
                }
            };
            r.map_err(|status| {
                if unreachable(&status) {
                    // Passive health: stop choosing this member until a probe says
                    // it is well again.
                    m.healthy.store(false, Ordering::Relaxed);
                }
                Box::new(MemberError { status, member: i }) as BoxError
            })
        })
    }
}

fn lease(m: &MemberState) -> LeaseClient<Channel> {
    LeaseClient::new(m.channel.clone())
}

/// One keep-alive on a stream of its own: the member answers it and the stream
/// ends when the request stream does.
async fn keep_alive_once(
    m: &MemberState,
    r: LeaseKeepAliveRequest,
) -> Result<LeaseKeepAliveResponse, tonic::Status> {
    let mut responses = lease(m)
        .lease_keep_alive(tokio_stream::once(r))
        .await?
        .into_inner();
    responses
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unavailable("the member ended the keep-alive unanswered"))
}

/// Retry policy: one more member, within the cell's budget, only when safe.
#[derive(Clone)]
pub struct RetryPolicy {
    budget: Arc<TpsBudget>,
    attempts_left: usize,
}

impl tower::retry::Policy<Attempt, KvReply, BoxError> for RetryPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut Attempt,
        result: &mut Result<KvReply, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(e) => {
                let me = e.downcast_ref::<MemberError>()?;
                let safe =
                    (req.call.read_only() && unreachable(&me.status)) || never_sent(&me.status);
                if !safe || self.attempts_left == 0 || !self.budget.withdraw() {
                    return None;
                }
                self.attempts_left -= 1;
                req.failed_on = Some(me.member);
                Some(std::future::ready(()))
            }
        }
    }

    fn clone_request(&mut self, req: &Attempt) -> Option<Attempt> {
        Some(req.clone())
    }
}

type Stack = tower::load_shed::LoadShed<
    tower::limit::ConcurrencyLimit<
        tower::timeout::Timeout<tower::retry::Retry<RetryPolicy, Picker>>,
    >,
>;

/// One cell's pool and stack. Cheap to clone.
#[derive(Clone)]
pub struct CellPool {
    pub inner: Arc<CellInner>,
    stack: Stack,
    settings: PoolSettings,
}

impl CellPool {
    pub fn new(
        name: &str,
        endpoints: &[String],
        settings: &PoolSettings,
        max_message_bytes: usize,
    ) -> Result<CellPool, String> {
        let mut members = Vec::new();
        for ep in endpoints {
            let uri = if ep.starts_with("http") {
                ep.clone()
            } else {
                format!("http://{ep}")
            };
            let channel = Endpoint::from_shared(uri.clone())
                .map_err(|e| format!("cell {name}: bad endpoint {ep}: {e}"))?
                .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .connect_lazy();
            members.push(MemberState {
                endpoint: ep.clone(),
                channel,
                // Optimistic until the first probe: a fresh router must route at once.
                healthy: AtomicBool::new(true),
                member_id: AtomicU64::new(0),
                leader_id: AtomicU64::new(0),
            });
        }
        let inner = Arc::new(CellInner {
            name: name.to_string(),
            members,
            stats: CellStats::new(),
            next: AtomicU64::new(0),
        });
        let policy = RetryPolicy {
            budget: Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                settings.retry_min_per_sec,
                settings.retry_ratio,
            )),
            attempts_left: endpoints.len().saturating_sub(1),
        };
        let stack = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(settings.max_in_flight)
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .retry(policy)
            .service(Picker {
                cell: inner.clone(),
                max_message_bytes,
            });
        Ok(CellPool {
            inner,
            stack,
            settings: settings.clone(),
        })
    }

    /// Forwards `call` to this cell. Every failure names the cell.
    pub async fn call(&self, call: KvCall) -> Result<KvReply, tonic::Status> {
        let started = Instant::now();
        let result = self
            .stack
            .clone()
            .oneshot(Attempt {
                call,
                failed_on: None,
            })
            .await;
        let name = &self.inner.name;
        let result = result.map_err(|e| {
            if e.is::<tower::load_shed::error::Overloaded>() {
                self.inner.stats.shed.fetch_add(1, Ordering::Relaxed);
                tonic::Status::unavailable(format!(
                    "cell {name} is overloaded or unreachable: {} requests already in flight; \
                     request shed",
                    self.settings.max_in_flight
                ))
            } else if e.is::<tower::timeout::error::Elapsed>() {
                tonic::Status::unavailable(format!(
                    "cell {name} did not answer within {} ms",
                    self.settings.request_timeout_ms
                ))
            } else if e.is::<NoMember>() {
                tonic::Status::unavailable(format!("cell {name}: no reachable member"))
            } else {
                match e.downcast::<MemberError>() {
                    // The cell's own answer (an etcd error such as a compacted
                    // revision) goes back as the cell sent it; transport failures
                    // name the cell.
                    Ok(me) if unreachable(&me.status) => {
                        tonic::Status::unavailable(format!("cell {name}: {}", me.status.message()))
                    }
                    Ok(me) => me.status,
                    Err(other) => tonic::Status::internal(format!("cell {name}: {other}")),
                }
            }
        });
        let ok = !matches!(&result, Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Internal);
        self.inner.stats.record(started.elapsed(), ok);
        result
    }

    /// A connection to a healthy member, for long-lived streams (watches), which
    /// do not go through the request stack.
    pub fn stream_channel(&self) -> Option<Channel> {
        self.inner
            .pick(false, None)
            .map(|i| self.inner.members[i].channel.clone())
    }

    /// Probes every member until `shutdown`: Status tells health, id and leader.
    pub async fn probe_loop(self, shutdown: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.settings.probe_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let timeout = Duration::from_millis(self.settings.probe_timeout_ms);
            let probes = self.inner.members.iter().map(|m| async move {
                let mut c = MaintenanceClient::new(m.channel.clone());
                let r = tokio::time::timeout(timeout, c.status(StatusRequest {})).await;
                match r {
                    Ok(Ok(s)) => {
                        let s = s.into_inner();
                        if let Some(h) = &s.header {
                            m.member_id.store(h.member_id, Ordering::Relaxed);
                        }
                        m.leader_id.store(s.leader, Ordering::Relaxed);
                        m.healthy.store(true, Ordering::Relaxed);
                    }
                    _ => {
                        m.healthy.store(false, Ordering::Relaxed);
                        m.leader_id.store(0, Ordering::Relaxed);
                    }
                }
            });
            futures::future::join_all(probes).await;
        }
    }
}
