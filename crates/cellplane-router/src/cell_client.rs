//! The one way the router calls a cell: per cell a connection pool, one bulkhead
//! and one set of member health, so a dead or slow cell cannot take what another
//! cell needs. Every service (KV, Lease, Watch, Discovery) calls cells through
//! here, unary or streaming.
//!
//! A unary call goes through the cell's tower stack, outermost first:
//!
//! - load shedding: when the cell's bulkhead is full, fail at once with
//!   UNAVAILABLE instead of queueing (a dead cell's requests fail fast);
//! - a concurrency limit (the bulkhead): at most `max_in_flight` calls per cell;
//! - a timeout per call, retries included;
//! - retries with a budget (a fraction of recent calls), only for calls that are
//!   safe to send again to another member;
//! - around the stack, for serializable reads: a **hedge** — when the first
//!   attempt has not answered within `hedge_after_ms`, a second one goes out
//!   (within the same budget) and the first success wins, so one slow member
//!   does not set the cell's tail latency;
//! - member choice: the known leader for writes and linearizable reads, else the
//!   better of two serving members by latency × calls pending (power of two
//!   choices); a member that fails is skipped until a probe finds it well, and one
//!   that looks unhealthy by what callers see is ejected ([`member_health`]),
//!   ending the calls in flight to it.
//!
//! A stream (watch, discovery watch) takes one of the cell's `max_streams` slots
//! for its life, opens within the call timeout on a healthy member (another one
//! if that member is unreachable), and ends when the router shuts down.
//!
//! Messages pass as their encoded bytes ([`RawCodec`]): the stack is one type for
//! every RPC, and a request is encoded once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cellplane_map::CellMap;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_proto::etcdserverpb::{RangeRequest, StatusRequest};
use prost::bytes::{Buf, BufMut, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Status, Streaming};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::member_health::{self, Cap, Health};
use crate::metrics::{AttemptTimer, CallMetrics, CallTimer};
use crate::scope::TENANT_METADATA;

/// A key of no tenant: the probe's data-path read (serializable, one key).
const PROBE_KEY: &[u8] = b"/_cellplane/router-probe";
/// How often a cell's members are compared (ejections, rejoins).
const EVALUATE_EVERY: Duration = Duration::from_millis(100);

/// Settings of every cell's pool.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Unary calls in flight to one cell; more are shed with UNAVAILABLE.
    pub max_in_flight: usize,
    /// Streams (watches) open to one cell; more are refused with UNAVAILABLE.
    pub max_streams: usize,
    /// Deadline of one forwarded call, retries included, and of opening a stream.
    pub request_timeout_ms: u64,
    /// TCP connect timeout to a member.
    pub connect_timeout_ms: u64,
    /// How often each member is probed (Maintenance.Status).
    pub probe_interval_ms: u64,
    /// Deadline of one probe.
    pub probe_timeout_ms: u64,
    /// Retries allowed as a share of recent calls (0.2 = 20 %), 0 to 1.
    pub retry_ratio: f32,
    /// Retries always allowed per second, whatever the ratio.
    pub retry_min_per_sec: u32,
    /// A serializable read unanswered this long is sent again (to the better of
    /// two members, which the first one's pending call makes another one);
    /// 0: never hedge.
    pub hedge_after_ms: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_in_flight: 2048,
            max_streams: 4096,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 500,
            probe_interval_ms: 500,
            probe_timeout_ms: 400,
            retry_ratio: 0.2,
            retry_min_per_sec: 10,
            hedge_after_ms: 50,
        }
    }
}

impl PoolSettings {
    /// Refuses values tower or tokio would panic on, naming the field (under
    /// `prefix`, e.g. `settings.pool`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        for (field, v) in [
            ("max_in_flight", self.max_in_flight as u64),
            ("max_streams", self.max_streams as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("probe_interval_ms", self.probe_interval_ms),
            ("probe_timeout_ms", self.probe_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("field `{prefix}.{field}`: must be > 0"));
            }
        }
        if !(0.0..=1.0).contains(&self.retry_ratio) {
            return Err(format!(
                "field `{prefix}.retry_ratio`: must be from 0 to 1 (a share of recent calls), got {}",
                self.retry_ratio
            ));
        }
        // tokio's semaphore holds at most usize::MAX >> 3 permits.
        if self.max_streams > Semaphore::MAX_PERMITS || self.max_in_flight > Semaphore::MAX_PERMITS
        {
            return Err(format!("field `{prefix}.max_streams`: too large"));
        }
        Ok(())
    }
}

/// How a unary call may be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallKind {
    /// Safe to send again to another member when the first did not answer.
    pub idempotent: bool,
    /// Goes to the leader when it is known (writes, linearizable reads).
    pub prefer_leader: bool,
    /// The RPC is a bidirectional stream of which this is one exchange: send one
    /// message, take the first answer (a lease keep-alive).
    pub one_exchange: bool,
}

impl CallKind {
    /// A write: sent again only when it certainly never left.
    pub const WRITE: CallKind = CallKind {
        idempotent: false,
        prefer_leader: true,
        one_exchange: false,
    };
    /// A linearizable read: any member can answer it; the leader saves a hop.
    pub const READ: CallKind = CallKind {
        idempotent: true,
        prefer_leader: true,
        one_exchange: false,
    };
    /// A serializable read: any healthy member.
    pub const LOCAL_READ: CallKind = CallKind {
        idempotent: true,
        prefer_leader: false,
        one_exchange: false,
    };
    /// A lease keep-alive: renews to the same deadline however often it is sent.
    pub const KEEP_ALIVE: CallKind = CallKind {
        idempotent: true,
        prefer_leader: true,
        one_exchange: true,
    };
}

/// Passes encoded messages through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// True when the member gave no answer of its own: UNAVAILABLE, or any status
/// tonic built here from a transport error (it carries that error as its source;
/// a member's answer arrives without one). A connection that dies with calls in
/// flight, as when a cell's members are killed, surfaces as UNKNOWN ("transport
/// error") or CANCELLED, which must not reach the client as such.
fn unreachable(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
}

/// True when the call failed before it could reach the member: the connection
/// was refused, could not be made, or timed out connecting (the pool's channels
/// set no per-request deadline, so a timeout in the chain is the connect
/// timeout). Judged by the error types in the chain, never by their text.
fn never_sent(s: &Status) -> bool {
    use std::error::Error;
    use std::io::ErrorKind;
    if s.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut src: Option<&(dyn Error + 'static)> = s.source();
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::NotConnected
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            );
        }
        if e.is::<tower::timeout::error::Elapsed>() {
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
    /// What calls and probes say of it.
    pub health: Health,
    /// Latency of every attempt on it.
    attempts: prometheus_client::metrics::histogram::Histogram,
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
    /// Reachable and not ejected: calls may go to it.
    pub fn serving(&self) -> bool {
        self.healthy() && !self.health.is_ejected()
    }
}

/// True when a call failed in transport (tonic built the status from a
/// connection error), as opposed to the member answering, even UNAVAILABLE
/// ("no leader" during an election is a member that works).
fn transport_failure(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
}

/// Call counters and recent latency of one cell.
pub struct CellStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub shed: AtomicU64,
    /// Serializable reads sent a second time ([`PoolSettings::hedge_after_ms`]).
    pub hedged: AtomicU64,
    /// Retries not sent because the retry budget was spent (the call failed
    /// where another member might have answered).
    pub budget_exhausted: AtomicU64,
    window: Mutex<(
        Instant,
        hdrhistogram::Histogram<u64>,
        hdrhistogram::Histogram<u64>,
    )>,
}

/// How long one latency window lasts; p99 is read over the current and the last.
const WINDOW: Duration = Duration::from_secs(10);

impl CellStats {
    pub fn new() -> CellStats {
        let h =
            || hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds");
        CellStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            hedged: AtomicU64::new(0),
            budget_exhausted: AtomicU64::new(0),
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
    /// Kept across rebuilds of the cell's pool (by [`Cells`]), so counters never
    /// go back.
    pub stats: Arc<CellStats>,
    /// The cell's name as the metrics' `cell` label.
    label: Arc<String>,
    calls: CallMetrics,
    next: AtomicU64,
}

impl CellInner {
    /// The leader the serving members report (else any reachable one's).
    fn leader(&self) -> Option<u64> {
        let reported = |serving: bool| {
            self.members.iter().find_map(|m| {
                let l = m.leader_id();
                (m.healthy() && (!serving || m.serving()) && l != 0).then_some(l)
            })
        };
        reported(true).or_else(|| reported(false))
    }

    /// The member to send a call to next, never `avoid`: the leader when wanted
    /// and serving; else the better of two serving members (latency × calls
    /// pending); else, when none serves, the next reachable one round-robin.
    fn pick(&self, prefer_leader: bool, avoid: Option<usize>) -> Option<usize> {
        if prefer_leader {
            // The leader serves writes best even when slow; only one that does
            // not answer is passed over (followers forward to it anyway).
            let at = self.leader().and_then(|l| {
                self.members
                    .iter()
                    .position(|m| m.member_id() == l && m.healthy() && !m.health.is_down())
            });
            if let Some(i) = at.filter(|i| Some(*i) != avoid) {
                return Some(i);
            }
        }
        let serving: Vec<usize> = (0..self.members.len())
            .filter(|i| Some(*i) != avoid && self.members[*i].serving())
            .collect();
        match serving.len() {
            0 => {}
            1 => return Some(serving[0]),
            n => {
                let a = rand::random_range(0..n);
                let b = (a + 1 + rand::random_range(0..n - 1)) % n;
                let (a, b) = (serving[a], serving[b]);
                let better = self.members[a].health.score() <= self.members[b].health.score();
                return Some(if better { a } else { b });
            }
        }
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|i| Some(*i) != avoid && self.members[*i].healthy())
    }

    fn healths(&self) -> Vec<&Health> {
        self.members.iter().map(|m| &m.health).collect()
    }

    /// Records a call's outcome on member `i`'s health.
    fn observed(&self, i: usize, elapsed: Duration, r: &Result<Bytes, Status>) {
        let h = &self.members[i].health;
        match r {
            Err(s) if transport_failure(s) => {
                h.failed(elapsed, s.message(), &Cap::of(&self.healths()));
            }
            _ => h.answered(elapsed),
        }
    }

    /// A member's call failed without its own answer: stop choosing it until a
    /// probe says it is well again.
    fn failed(&self, member: usize, status: &Status) {
        if unreachable(status) {
            self.members[member].healthy.store(false, Ordering::Relaxed);
        }
    }
}

/// A unary call as it moves through the stack: the call and the member it last
/// failed on.
#[derive(Debug, Clone)]
struct Attempt {
    path: PathAndQuery,
    body: Bytes,
    tenant: Option<MetadataValue<Ascii>>,
    kind: CallKind,
    failed_on: Option<usize>,
    /// The member the call last went to (`usize::MAX`: none yet), so a hedge
    /// goes elsewhere.
    sent_to: Arc<AtomicUsize>,
}

fn with_tenant<T>(body: T, tenant: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if let Some(t) = tenant {
        r.metadata_mut().insert(TENANT_METADATA, t.clone());
    }
    r
}

/// The gRPC message limits towards cells: requests as large as the router
/// accepts, responses as large as a cell sends (its `limits.max_response_bytes`
/// and the frame allowance); a larger answer fails with a status naming the
/// limit instead of being buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    pub request: usize,
    pub response: usize,
}

/// Innermost service: sends an attempt to one member.
#[derive(Clone)]
struct Picker {
    cell: Arc<CellInner>,
    limits: MessageLimits,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No member of the cell is reachable now.
#[derive(Debug, thiserror::Error)]
#[error("no reachable member")]
struct NoMember;

/// A member's error, with which member it came from (for retries).
#[derive(Debug, thiserror::Error)]
#[error("{status}")]
struct MemberError {
    status: Status,
    member: usize,
}

impl Picker {
    fn grpc(&self, member: usize) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.cell.members[member].channel.clone())
            .max_decoding_message_size(self.limits.response)
            .max_encoding_message_size(self.limits.request)
    }
}

impl Service<Attempt> for Picker {
    type Response = Bytes;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, a: Attempt) -> Self::Future {
        let picker = self.clone();
        Box::pin(async move {
            let i = picker
                .cell
                .pick(a.kind.prefer_leader, a.failed_on)
                .ok_or(NoMember)?;
            a.sent_to.store(i, Ordering::Relaxed);
            let mut grpc = picker.grpc(i);
            let member = &picker.cell.members[i];
            let _pending = member.health.start();
            let mut ejected = member.health.ejections();
            let started = Instant::now();
            let _timed = AttemptTimer(member.attempts.clone(), started);
            let call = async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("member not ready: {e}")))?;
                if a.kind.one_exchange {
                    let req = with_tenant(tokio_stream::once(a.body), &a.tenant);
                    let mut answers = grpc.streaming(req, a.path, RawCodec).await?.into_inner();
                    answers.message().await?.ok_or_else(|| {
                        Status::unavailable("the member ended the stream unanswered")
                    })
                } else {
                    let req = with_tenant(a.body, &a.tenant);
                    Ok(grpc.unary(req, a.path, RawCodec).await?.into_inner())
                }
            };
            let r = tokio::select! {
                r = call => {
                    picker.cell.observed(i, started.elapsed(), &r);
                    r
                }
                // A read is retried on another member (UNAVAILABLE from here is
                // "unreachable"); a write is not: it may have been applied.
                _ = ejected.changed() => Err(Status::unavailable(format!(
                    "member {} was ejected while the call was in flight ({}); a write's \
                     outcome is unknown",
                    member.endpoint,
                    member.health.view().reason
                ))),
            };
            r.map_err(|status| {
                picker.cell.failed(i, &status);
                Box::new(MemberError { status, member: i }) as BoxError
            })
        })
    }
}

/// Retry policy: one more member, within the cell's budget, only when safe.
#[derive(Clone)]
struct RetryPolicy {
    budget: Arc<TpsBudget>,
    cell: Arc<CellInner>,
    attempts_left: usize,
}

impl tower::retry::Policy<Attempt, Bytes, BoxError> for RetryPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut Attempt,
        result: &mut Result<Bytes, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(e) => {
                let me = e.downcast_ref::<MemberError>()?;
                let safe =
                    (req.kind.idempotent && unreachable(&me.status)) || never_sent(&me.status);
                if !safe || self.attempts_left == 0 {
                    return None;
                }
                if !self.budget.withdraw() {
                    let exhausted = &self.cell.stats.budget_exhausted;
                    exhausted.fetch_add(1, Ordering::Relaxed);
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

/// Why a cell could not be called: a status that names the cell.
fn cell_status(cell: &str, e: BoxError, settings: &PoolSettings, stats: &CellStats) -> Status {
    if e.is::<tower::load_shed::error::Overloaded>() {
        stats.shed.fetch_add(1, Ordering::Relaxed);
        Status::unavailable(format!(
            "cell {cell} is overloaded or unreachable: {} calls already in flight; call shed",
            settings.max_in_flight
        ))
    } else if e.is::<tower::timeout::error::Elapsed>() {
        Status::unavailable(format!(
            "cell {cell} did not answer within {} ms",
            settings.request_timeout_ms
        ))
    } else if e.is::<NoMember>() {
        Status::unavailable(format!("cell {cell}: no reachable member"))
    } else {
        match e.downcast::<MemberError>() {
            // The cell's own answer (an etcd error such as a compacted revision)
            // goes back as the cell sent it; transport failures name the cell.
            Ok(me) if unreachable(&me.status) => {
                Status::unavailable(format!("cell {cell}: {}", me.status.message()))
            }
            Ok(me) => me.status,
            Err(other) => Status::internal(format!("cell {cell}: {other}")),
        }
    }
}

/// Where a cell's client records what its calls do: histograms shared by every
/// cell, and the cell's own counters (kept across rebuilds of its pool).
pub struct Recording {
    pub calls: CallMetrics,
    pub stats: Arc<CellStats>,
}

/// One cell's pool and stack. Cheap to clone.
#[derive(Clone)]
pub struct CellClient {
    pub inner: Arc<CellInner>,
    stack: Stack,
    /// The retry budget, which hedges draw on too.
    budget: Arc<TpsBudget>,
    streams: Arc<Semaphore>,
    settings: PoolSettings,
    limits: MessageLimits,
    shutdown: CancellationToken,
}

/// An open stream to a cell: send requests with [`CellStream::send`], read
/// answers with [`CellStream::message`]. Holds one of the cell's stream slots
/// until dropped.
pub struct CellStream {
    /// `None` once the request side is closed.
    tx: Option<mpsc::Sender<Bytes>>,
    rx: Streaming<Bytes>,
    cell: String,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
}

/// Requests buffered toward a cell on one stream; when full, the sender waits
/// (the client's own stream is then not read: back-pressure to the client).
const STREAM_REQUEST_BUFFER: usize = 64;

impl CellStream {
    /// The next answer; `Ok(None)` when the cell ended the stream. Ends with
    /// UNAVAILABLE when the router shuts down.
    pub async fn message(&mut self) -> Result<Option<Bytes>, Status> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(Status::unavailable("the router is shutting down")),
            m = self.rx.message() => m.map_err(|s| {
                if unreachable(&s) {
                    Status::unavailable(format!("cell {}: {}", self.cell, s.message()))
                } else {
                    s
                }
            }),
        }
    }

    /// A handle to send on the stream from another task; `None` for a
    /// server-streaming call, whose one request is already sent.
    pub fn sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.tx.clone()
    }
}

/// The shape of a streaming call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Requests keep coming after the first (a watch).
    Bidirectional,
    /// One request, then answers (a discovery watch): the request side ends after
    /// the first, as the server waits for it to before answering.
    ServerStreaming,
}

impl CellClient {
    pub fn new(
        name: &str,
        endpoints: &[String],
        settings: &PoolSettings,
        limits: MessageLimits,
        tls: Option<&ClientTlsConfig>,
        recording: Recording,
        shutdown: CancellationToken,
    ) -> Result<CellClient, String> {
        let Recording { calls, stats } = recording;
        let label = Arc::new(name.to_string());
        let mut members = Vec::new();
        for ep in endpoints {
            let channel = cellplane_security::endpoint(ep, tls)
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
                health: Health::default(),
                attempts: calls.member(&label, ep),
            });
        }
        let inner = Arc::new(CellInner {
            name: name.to_string(),
            members,
            stats,
            label,
            calls,
            next: AtomicU64::new(0),
        });
        let budget = Arc::new(TpsBudget::new(
            Duration::from_secs(10),
            settings.retry_min_per_sec,
            settings.retry_ratio,
        ));
        let policy = RetryPolicy {
            budget: budget.clone(),
            cell: inner.clone(),
            attempts_left: endpoints.len().saturating_sub(1),
        };
        let stack = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(settings.max_in_flight)
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .retry(policy)
            .service(Picker {
                cell: inner.clone(),
                limits,
            });
        Ok(CellClient {
            inner,
            stack,
            budget,
            streams: Arc::new(Semaphore::new(settings.max_streams)),
            settings: settings.clone(),
            limits,
            shutdown,
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Calls `path` on this cell with `req`, acting for `tenant` (sent to the cell
    /// as `cellplane-tenant`). Every failure names the cell.
    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        req: &Req,
        kind: CallKind,
        tenant: Option<&str>,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let bytes = self
            .unary_raw(path, Bytes::from(req.encode_to_vec()), kind, tenant)
            .await?;
        Resp::decode(bytes).map_err(|e| {
            Status::internal(format!(
                "cell {}: undecodable answer to {path}: {e}",
                self.inner.name
            ))
        })
    }

    /// [`CellClient::unary`] on an encoded request, answering the encoded
    /// response: what the router forwards without decoding.
    pub async fn unary_raw(
        &self,
        path: &'static str,
        body: Bytes,
        kind: CallKind,
        tenant: Option<&str>,
    ) -> Result<Bytes, Status> {
        let tenant = tenant_value(tenant)?;
        let inner = &self.inner;
        let timer = CallTimer::start(&inner.calls, &inner.label, path);
        let attempt = Attempt {
            path: PathAndQuery::from_static(path),
            body,
            tenant,
            kind,
            failed_on: None,
            sent_to: Arc::new(AtomicUsize::new(usize::MAX)),
        };
        let result = if kind == CallKind::LOCAL_READ && self.settings.hedge_after_ms > 0 {
            self.hedged(attempt).await
        } else {
            self.stack.clone().oneshot(attempt).await
        }
        .map_err(|e| cell_status(&inner.name, e, &self.settings, &inner.stats));
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let ok = !matches!(code, tonic::Code::Unavailable | tonic::Code::Internal);
        inner.stats.record(timer.finish(code), ok);
        result
    }

    /// Sends `attempt`; if it has not answered within `hedge_after_ms` and the
    /// budget allows, sends it again, and answers the first success (or, if both
    /// fail, the last failure).
    async fn hedged(&self, attempt: Attempt) -> Result<Bytes, BoxError> {
        let first = self.stack.clone().oneshot(attempt.clone());
        tokio::pin!(first);
        let delay = Duration::from_millis(self.settings.hedge_after_ms);
        tokio::select! {
            r = &mut first => return r,
            _ = tokio::time::sleep(delay) => {}
        }
        // A hedge the budget refuses costs nothing (the first call goes on), so
        // it is not counted as the budget being exhausted.
        if !self.budget.withdraw() {
            return first.await;
        }
        self.inner.stats.hedged.fetch_add(1, Ordering::Relaxed);
        let busy = attempt.sent_to.load(Ordering::Relaxed);
        let again = Attempt {
            failed_on: (busy != usize::MAX).then_some(busy),
            sent_to: Arc::new(AtomicUsize::new(usize::MAX)),
            ..attempt
        };
        let second = self.stack.clone().oneshot(again);
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => match r {
                Ok(b) => Ok(b),
                Err(_) => second.await,
            },
            r = &mut second => match r {
                Ok(b) => Ok(b),
                Err(_) => first.await,
            },
        }
    }

    /// Opens stream `path` on a healthy member with `first` as its first request,
    /// acting for `tenant`; tries another member when one is unreachable. Refused
    /// with UNAVAILABLE when the cell's stream slots are all taken.
    pub async fn open_stream(
        &self,
        path: &'static str,
        kind: StreamKind,
        first: Bytes,
        tenant: Option<&str>,
    ) -> Result<CellStream, Status> {
        let name = &self.inner.name;
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            self.inner.stats.shed.fetch_add(1, Ordering::Relaxed);
            Status::unavailable(format!(
                "cell {name} already has {} streams open through this router; stream refused",
                self.settings.max_streams
            ))
        })?;
        let tenant = tenant_value(tenant)?;
        let deadline = Duration::from_millis(self.settings.request_timeout_ms);
        let mut avoid = None;
        let mut last = Status::unavailable(format!("cell {name}: no reachable member"));
        for _ in 0..self.inner.members.len() {
            let Some(i) = self.inner.pick(false, avoid) else {
                break;
            };
            let (tx, rx) = mpsc::channel(STREAM_REQUEST_BUFFER);
            // The buffer is empty: the first request always fits.
            let _ = tx.try_send(first.clone());
            // A server-streaming call's request side ends with its one request:
            // the sender is dropped here, not merely left unused (the server
            // answers only once the request side has ended).
            let tx = match kind {
                StreamKind::Bidirectional => Some(tx),
                StreamKind::ServerStreaming => {
                    drop(tx);
                    None
                }
            };
            let mut grpc = tonic::client::Grpc::new(self.inner.members[i].channel.clone())
                .max_decoding_message_size(self.limits.response)
                .max_encoding_message_size(self.limits.request);
            let req = with_tenant(tokio_stream::wrappers::ReceiverStream::new(rx), &tenant);
            let opened = tokio::time::timeout(deadline, async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("member not ready: {e}")))?;
                grpc.streaming(req, PathAndQuery::from_static(path), RawCodec)
                    .await
            })
            .await;
            match opened {
                Ok(Ok(resp)) => {
                    return Ok(CellStream {
                        tx,
                        rx: resp.into_inner(),
                        cell: name.clone(),
                        shutdown: self.shutdown.clone(),
                        _slot: slot,
                    });
                }
                Ok(Err(s)) if unreachable(&s) => {
                    self.inner.failed(i, &s);
                    last = Status::unavailable(format!("cell {name}: {}", s.message()));
                    avoid = Some(i);
                }
                Ok(Err(s)) => return Err(s),
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "cell {name}: the stream did not open within {} ms",
                        self.settings.request_timeout_ms
                    )));
                }
            }
        }
        Err(last)
    }

    /// Probes every member until `shutdown` (Status: reachability, id, leader
    /// and applied index; then a serializable read of a key of no tenant: the
    /// data path), and compares the members every [`EVALUATE_EVERY`].
    pub async fn probe_loop(self, shutdown: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.settings.probe_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut evaluate = tokio::time::interval(EVALUATE_EVERY);
        evaluate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = evaluate.tick() => {
                    member_health::evaluate(&self.inner.healths());
                    continue;
                }
                _ = tick.tick() => {}
            }
            let timeout = Duration::from_millis(self.settings.probe_timeout_ms);
            let cell = &self.inner;
            let probes = cell.members.iter().map(|m| async move {
                let started = Instant::now();
                let r = tokio::time::timeout(timeout, probe(m)).await;
                let elapsed = started.elapsed();
                let cap = Cap::of(&cell.healths());
                match r {
                    Ok(Ok((id, leader, applied))) => {
                        m.member_id.store(id, Ordering::Relaxed);
                        m.leader_id.store(leader, Ordering::Relaxed);
                        m.healthy.store(true, Ordering::Relaxed);
                        m.health.probed(Some(applied), elapsed, "", &cap);
                    }
                    Ok(Err(s)) => {
                        m.healthy.store(false, Ordering::Relaxed);
                        m.leader_id.store(0, Ordering::Relaxed);
                        m.health.probed(None, elapsed, s.message(), &cap);
                    }
                    Err(_) => {
                        m.healthy.store(false, Ordering::Relaxed);
                        m.leader_id.store(0, Ordering::Relaxed);
                        let why = format!("no answer within {} ms", timeout.as_millis());
                        m.health.probed(None, elapsed, &why, &cap);
                    }
                }
            });
            futures::future::join_all(probes).await;
        }
    }
}

/// One probe of `m`: its id, the leader it knows and its applied index, once it
/// also served a serializable read.
async fn probe(m: &MemberState) -> Result<(u64, u64, u64), Status> {
    let s = MaintenanceClient::new(m.channel.clone())
        .status(StatusRequest {})
        .await?
        .into_inner();
    KvClient::new(m.channel.clone())
        .range(RangeRequest {
            key: PROBE_KEY.to_vec(),
            serializable: true,
            limit: 1,
            ..Default::default()
        })
        .await?;
    let id = s.header.as_ref().map_or(0, |h| h.member_id);
    Ok((id, s.leader, s.raft_applied_index))
}

fn tenant_value(tenant: Option<&str>) -> Result<Option<MetadataValue<Ascii>>, Status> {
    tenant
        .map(|t| {
            MetadataValue::try_from(t)
                .map_err(|_| Status::invalid_argument(format!("tenant {t:?} is not ASCII")))
        })
        .transpose()
}

/// A cell's client, the endpoints it was built for, and the stop of its prober.
type Entry = (Vec<String>, CellClient, CancellationToken);

/// The clients of every cell in the map in force, rebuilt when the map changes.
pub struct Cells {
    by_cell: RwLock<HashMap<String, Entry>>,
    settings: PoolSettings,
    limits: MessageLimits,
    tls: Option<ClientTlsConfig>,
    calls: CallMetrics,
    /// Each cell's counters, by name: a cell's pool is rebuilt when its members
    /// change, its counters carry on. Bounded by the cells maps have named.
    stats: Mutex<HashMap<String, Arc<CellStats>>>,
    shutdown: CancellationToken,
}

impl Cells {
    pub fn new(
        settings: PoolSettings,
        limits: MessageLimits,
        tls: Option<ClientTlsConfig>,
        calls: CallMetrics,
        shutdown: CancellationToken,
    ) -> Arc<Cells> {
        Arc::new(Cells {
            by_cell: RwLock::default(),
            settings,
            limits,
            tls,
            calls,
            stats: Mutex::default(),
            shutdown,
        })
    }

    /// Makes the clients match `map`: new cells get a client and a prober; cells
    /// whose endpoints changed get fresh ones; cells gone from the map are stopped.
    pub fn reconcile(&self, map: &CellMap) {
        let mut by_cell = self.by_cell.write().unwrap_or_else(|p| p.into_inner());
        by_cell.retain(|name, (_, _, stop)| {
            let keep = map.cells.iter().any(|c| &c.name == name);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for cell in &map.cells {
            if let Some((eps, _, stop)) = by_cell.get(&cell.name) {
                if *eps == cell.endpoints {
                    continue;
                }
                stop.cancel();
            }
            let stop = self.shutdown.child_token();
            match CellClient::new(
                &cell.name,
                &cell.endpoints,
                &self.settings,
                self.limits,
                self.tls.as_ref(),
                Recording {
                    calls: self.calls.clone(),
                    stats: self.stats_of(&cell.name),
                },
                stop.clone(),
            ) {
                Ok(client) => {
                    tokio::spawn(client.clone().probe_loop(stop.clone()));
                    by_cell.insert(cell.name.clone(), (cell.endpoints.clone(), client, stop));
                }
                Err(e) => {
                    tracing::error!(cell = %cell.name, error = %e, "cannot build the cell's client")
                }
            }
        }
    }

    /// Cancelled when the router shuts down (ends long-lived streams).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn get(&self, cell: &str) -> Option<CellClient> {
        let by_cell = self.by_cell.read().unwrap_or_else(|p| p.into_inner());
        by_cell.get(cell).map(|(_, c, _)| c.clone())
    }

    fn stats_of(&self, cell: &str) -> Arc<CellStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats
            .entry(cell.to_string())
            .or_insert_with(|| Arc::new(CellStats::new()))
            .clone()
    }

    pub fn all(&self) -> Vec<CellClient> {
        let by_cell = self.by_cell.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = by_cell.values().map(|(_, c, _)| c.clone()).collect();
        v.sort_by(|a, b| a.inner.name.cmp(&b.inner.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_tower_would_panic_on_are_refused_by_name() {
        let ok = PoolSettings::default();
        assert!(ok.validate("settings.pool").is_ok());
        for (bad, field) in [
            (
                PoolSettings {
                    retry_ratio: 1.5,
                    ..ok.clone()
                },
                "settings.pool.retry_ratio",
            ),
            (
                PoolSettings {
                    retry_ratio: f32::NAN,
                    ..ok.clone()
                },
                "settings.pool.retry_ratio",
            ),
            (
                PoolSettings {
                    probe_timeout_ms: 0,
                    ..ok.clone()
                },
                "settings.pool.probe_timeout_ms",
            ),
            (
                PoolSettings {
                    max_streams: 0,
                    ..ok.clone()
                },
                "settings.pool.max_streams",
            ),
        ] {
            let e = bad.validate("settings.pool").unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn never_sent_is_judged_by_error_types_not_text() {
        let with_source = |kind: std::io::ErrorKind| {
            let mut s = Status::unavailable("transport error");
            s.set_source(Arc::new(std::io::Error::new(kind, "whatever it says")));
            s
        };
        assert!(never_sent(&with_source(
            std::io::ErrorKind::ConnectionRefused
        )));
        assert!(!never_sent(&with_source(std::io::ErrorKind::BrokenPipe)));
        // A member's own UNAVAILABLE may have been applied; its text is no clue.
        assert!(!never_sent(&Status::unavailable("connect error")));
        assert!(unreachable(&Status::unavailable("x")));
        assert!(!unreachable(&Status::not_found("x")));
    }
}
