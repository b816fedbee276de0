//! The etcd Watch API of a member.
//!
//! The apply path publishes every revision's events into a bounded in-memory event
//! log (a broadcast ring, `watch.event_log_revisions` long) and never waits for a
//! watcher. One dispatcher per member (`watch_hub`) follows the ring and hands a
//! revision only to the streams watching a key it touches (or holding a range
//! watcher), so idle watchers cost no CPU per write. A watcher that starts behind
//! reads the history of its range from RocksDB first, a page at a time (at most
//! 4 MiB of events), each page sent as its client drains the stream's buffer.
//! Limits, and what happens at them:
//!
//! - a catching-up watcher whose client takes nothing for 30 s ends its stream
//!   as not read (below); one whose history is compacted part-way is canceled
//!   with the compaction revision;
//! - a stream that falls more than `watch.event_log_revisions` revisions behind
//!   what it was handed (its mailbox fills, or the dispatcher itself lost
//!   revisions from the ring) cancels its watchers, each with the revision to
//!   resume from in `cancel_reason`;
//! - a stream whose client does not read fills its bounded response buffer
//!   (`watch.stream_buffer` responses or `watch.stream_buffer_bytes` bytes,
//!   whichever comes first); the member then ends that stream, saying from which
//!   revision to resume, and frees everything it held;
//! - a revision with more than `watch.event_log_max_revision_bytes` of keys and
//!   values enters the event log without its events; streams that need it read it
//!   from RocksDB. So the log holds at most `event_log_revisions` times that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cellplane_proto::etcdserverpb::watch_create_request::FilterType;
use cellplane_proto::etcdserverpb::{
    ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse, watch_request,
};
use cellplane_proto::mvccpb::Event;
use cellplane_proto::mvccpb::event::EventType;
use cellplane_storage::{HistoryPage, KeyRange, KvError, RevisionEvents};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

use crate::node::Shared;
use crate::watch_hub::{Next, Subscription};

/// The watch id etcd uses for responses that belong to no watcher (progress).
const NO_WATCH: i64 = -1;

/// Bounds of one page of catch-up history (the page follows the stream's
/// buffer size within them): what a catching-up watcher holds besides its
/// stream's buffer.
const MIN_CATCH_UP_PAGE_BYTES: usize = 64 << 10;
const MAX_CATCH_UP_PAGE_BYTES: usize = 4 << 20;

/// Revisions already waiting in a stream's mailbox are delivered together, one
/// response per watcher holding the events of all of them (etcd's watch
/// responses may span revisions; the header names the newest): with 1,000
/// watchers on written keys the member otherwise builds, encodes and sends a
/// response per watcher per revision. At most this many revisions, and about
/// [`COALESCE_BYTES`] of keys and values (or a quarter of the stream's byte
/// budget, if smaller), go in one response.
const COALESCE_REVISIONS: usize = 64;
const COALESCE_BYTES: usize = 256 << 10;

/// How long a catching-up watcher waits for its client to take something
/// before the stream is ended as not read.
const CATCH_UP_STALL: Duration = Duration::from_secs(30);

/// The response that cancels watcher `id` whose history was compacted.
fn compacted_cancel(
    header: Option<cellplane_proto::etcdserverpb::ResponseHeader>,
    id: i64,
    compacted: i64,
) -> WatchResponse {
    WatchResponse {
        header,
        watch_id: id,
        canceled: true,
        compact_revision: compacted,
        cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
        ..Default::default()
    }
}

/// The Watch service. Responses leave as bytes the stream encoded itself, so a
/// revision's events, encoded once ([`RevisionEvents::encoded_events`]), can go
/// to every stream that wants them alike; requests decode as usual.
#[derive(Clone)]
pub struct WatchService {
    shared: Arc<Shared>,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl WatchService {
    pub fn new(
        shared: Arc<Shared>,
        max_request_bytes: usize,
        max_response_bytes: usize,
    ) -> WatchService {
        WatchService {
            shared,
            max_request_bytes,
            max_response_bytes,
        }
    }

    /// Starts the stream's task; answers its responses as they are queued.
    fn open(&self, inbound: Streaming<WatchRequest>) -> ResponseStream {
        let (tx, rx) = mpsc::channel(self.shared.config.cell.watch.stream_buffer);
        let queued = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(tokio::sync::Notify::new());
        let stream = WatchStream {
            queued: queued.clone(),
            drained: drained.clone(),
            shared: self.shared.clone(),
            ownership: self.shared.ownership.clone(),
            events: self.shared.watch_hub.subscribe(),
            tx,
            watchers: BTreeMap::new(),
            by_key: HashMap::new(),
            spans: BTreeSet::new(),
            finished: 0,
            next_id: 0,
        };
        tokio::spawn(stream.run(inbound, self.shared.shutdown.clone()));
        // What the client has taken leaves the byte count.
        let out = ReceiverStream::new(rx).map(move |item| {
            if let Ok(r) = &item {
                queued.fetch_sub(r.len(), Ordering::Relaxed);
                drained.notify_one();
            }
            item
        });
        Box::pin(out)
    }
}

type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Bytes, Status>> + Send>>;

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl<B> tonic::codegen::Service<http::Request<B>> for WatchService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/etcdserverpb.Watch/Watch" {
            let status = Status::unimplemented(format!(
                "{}: not a method of etcdserverpb.Watch",
                req.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let svc = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec).apply_max_message_size_config(
                Some(svc.max_request_bytes),
                Some(svc.max_response_bytes),
            );
            Ok(grpc.streaming(svc, req).await)
        })
    }
}

impl tonic::server::StreamingService<WatchRequest> for WatchService {
    type Response = Bytes;
    type ResponseStream = ResponseStream;
    type Future = tonic::codegen::BoxFuture<Response<ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<WatchRequest>>) -> Self::Future {
        let out = self.open(request.into_inner());
        Box::pin(async move { Ok(Response::new(out)) })
    }
}

/// Decodes watch requests; sends responses as the bytes they were encoded to.
#[derive(Debug, Clone, Copy, Default)]
struct WatchCodec;

impl tonic::codec::Codec for WatchCodec {
    type Encode = Bytes;
    type Decode = WatchRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> WatchCodec {
        WatchCodec
    }

    fn decoder(&mut self) -> WatchCodec {
        WatchCodec
    }
}

impl tonic::codec::Encoder for WatchCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for WatchCodec {
    type Item = WatchRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<WatchRequest>, Status> {
        WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable watch request: {e}")))
    }
}

struct Watcher {
    range: KeyRange,
    /// The first revision not yet delivered.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

struct WatchStream {
    shared: Arc<Shared>,
    /// Which tenants the cell serves: a watch of a tenant that moved away ends.
    ownership: tokio::sync::watch::Receiver<Arc<cellplane_storage::Ownership>>,
    events: Subscription,
    tx: mpsc::Sender<Result<Bytes, Status>>,
    /// Encoded bytes of the responses in `tx` not yet taken by the client.
    queued: Arc<AtomicUsize>,
    /// Signalled when the client takes a response (a catch-up waits on it).
    drained: Arc<tokio::sync::Notify>,
    watchers: BTreeMap<i64, Watcher>,
    /// Single-key watchers by key, so a revision costs a lookup per event, not a
    /// look at every watcher (10,000 idle watchers must cost nearly nothing).
    by_key: HashMap<Vec<u8>, BTreeSet<i64>>,
    /// Range watchers: checked against every event.
    spans: BTreeSet<i64>,
    /// The newest revision this stream took from its mailbox and delivered in
    /// full (to every watcher it concerns).
    finished: i64,
    next_id: i64,
}

/// Why a stream stopped.
enum Stop {
    /// The client went away or the member shuts down.
    Done,
    /// The client stopped reading.
    Stalled,
}

impl WatchStream {
    async fn run(
        mut self,
        mut inbound: Streaming<WatchRequest>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let every = Duration::from_millis(self.shared.config.cell.watch.progress_notify_ms);
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => Err(Stop::Done),
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.handle(req).await,
                    _ => Err(Stop::Done),
                },
                next = self.events.next() => match next {
                    Some(Next::Revision(revision)) => self.deliver_waiting(revision),
                    Some(Next::Lagged(from)) => self.cancel_all_behind(from),
                    None => Err(Stop::Done),
                },
                _ = progress.tick() => self.notify_progress(),
                changed = self.ownership.changed() => match changed {
                    Ok(()) => self.end_moved(),
                    Err(_) => Err(Stop::Done),
                },
            };
            match step {
                Ok(()) => {}
                Err(Stop::Done) => return,
                Err(Stop::Stalled) => {
                    let synced = self.synced();
                    let resume = self
                        .watchers
                        .values()
                        .map(|w| w.next.max(synced + 1))
                        .min()
                        .unwrap_or(synced + 1);
                    tracing::warn!(
                        resume,
                        watchers = self.watchers.len(),
                        "watch stream not read by its client: ending it"
                    );
                    // Best effort: the buffer is full, so this only lands if the
                    // client reads again soon. Either way the stream's memory goes.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        self.tx.send(Err(Status::resource_exhausted(format!(
                            "watch stream fell behind its client by {} responses or {} bytes; \
                             watch again from revision {resume}",
                            self.shared.config.cell.watch.stream_buffer,
                            self.shared.config.cell.watch.stream_buffer_bytes
                        )))),
                    )
                    .await;
                    return;
                }
            }
        }
    }

    fn header(&self, revision: i64) -> Option<cellplane_proto::etcdserverpb::ResponseHeader> {
        Some(self.shared.header(revision))
    }

    fn current_revision(&self) -> i64 {
        self.shared.applied.borrow().revision
    }

    /// Queues a response; a full buffer (in responses or in bytes) means the
    /// client is not reading. One response larger than the byte bound still goes
    /// when nothing else is queued.
    fn send(&self, resp: WatchResponse) -> Result<(), Stop> {
        self.send_encoded(Bytes::from(resp.encode_to_vec()))
    }

    /// [`WatchStream::send`] of an encoded response.
    fn send_encoded(&self, resp: Bytes) -> Result<(), Stop> {
        let size = resp.len();
        let queued = self.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + size > self.shared.config.cell.watch.stream_buffer_bytes {
            return Err(Stop::Stalled);
        }
        match self.tx.try_send(Ok(resp)) {
            Ok(()) => {
                self.queued.fetch_add(size, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Stop::Stalled),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Done),
        }
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), Stop> {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                let existed = self.remove(c.watch_id);
                self.send(WatchResponse {
                    header: self.header(self.current_revision()),
                    watch_id: c.watch_id,
                    canceled: true,
                    cancel_reason: if existed {
                        String::new()
                    } else {
                        "no such watch".into()
                    },
                    ..Default::default()
                })
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => self.send(WatchResponse {
                header: self.header(self.synced()),
                watch_id: NO_WATCH,
                ..Default::default()
            }),
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Stop> {
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let now = self.header(self.current_revision());
        let refuse = |reason: String| WatchResponse {
            header: now,
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        };
        if self.watchers.contains_key(&id) {
            return self.send(refuse(format!(
                "etcdserver: watch id {id} is already in use on this stream"
            )));
        }
        if c.key.is_empty() && c.range_end != [0] {
            return self.send(refuse("etcdserver: key is not provided".into()));
        }
        if let Err(e) = crate::ownership::check_read(&self.shared, &c.key, &c.range_end) {
            return self.send(refuse(e.message().to_string()));
        }
        let current = self.current_revision();
        let start = if c.start_revision > 0 {
            c.start_revision
        } else {
            current + 1
        };
        let mut w = Watcher {
            range: KeyRange::new(&c.key, &c.range_end),
            next: start,
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
        };
        let created = WatchResponse {
            header: self.header(current),
            watch_id: id,
            created: true,
            ..Default::default()
        };
        // Follow the key first, then catch up from the stored history up to what
        // the hub had dispatched by then: every later revision reaches the mailbox.
        let dispatched = self.index(id, &w.range);
        let caught_up = current.max(dispatched);
        let mut page = None;
        if start <= caught_up {
            match self.read_history(start, caught_up, &w.range).await {
                Ok(p) => page = Some(p),
                Err(KvError::Compacted { compacted }) => {
                    self.unindex(id, &w.range);
                    self.send(created)?;
                    return self.send(compacted_cancel(self.header(current), id, compacted));
                }
                Err(e) => {
                    self.unindex(id, &w.range);
                    return self.send(refuse(e.to_string()));
                }
            }
        }
        self.send(created)?;
        self.next_id = self.next_id.max(id + 1);
        // A page at a time, each sent as the client drains the buffer: the
        // history behind a watcher may be far larger than what a stream holds.
        while let Some(p) = page.take() {
            for rev in &p.revisions {
                if let Some(resp) = self.matching(id, &w, rev) {
                    self.send_paced(resp).await?;
                }
            }
            let Some(next) = p.next else { break };
            match self.read_history(next, caught_up, &w.range).await {
                Ok(p) => page = Some(p),
                Err(e) => {
                    // Compacted or failed part-way: the client resumes from the
                    // first revision it has not been sent.
                    self.unindex(id, &w.range);
                    let header = self.header(self.current_revision());
                    return self.send(match e {
                        KvError::Compacted { compacted } => compacted_cancel(header, id, compacted),
                        e => WatchResponse {
                            header,
                            watch_id: id,
                            canceled: true,
                            cancel_reason: format!("{e}; watch again from revision {next}"),
                            ..Default::default()
                        },
                    });
                }
            }
        }
        w.next = w.next.max(caught_up + 1);
        self.watchers.insert(id, w);
        Ok(())
    }

    /// One page of the stored history of `range`, read off the runtime's
    /// threads (a catch-up from an old revision scans much of the history).
    async fn read_history(
        &self,
        from: i64,
        to: i64,
        range: &KeyRange,
    ) -> Result<HistoryPage, KvError> {
        let reader = self.shared.reader.clone();
        let range = range.clone();
        let max_bytes = self
            .shared
            .config
            .cell
            .watch
            .stream_buffer_bytes
            .clamp(MIN_CATCH_UP_PAGE_BYTES, MAX_CATCH_UP_PAGE_BYTES);
        tokio::task::spawn_blocking(move || reader.history_page(from, to, Some(&range), max_bytes))
            .await
            .unwrap_or_else(|e| Err(KvError::Storage(format!("history read failed: {e}"))))
    }

    /// Queues a catch-up response, waiting while the client drains the buffer;
    /// a client that takes nothing for [`CATCH_UP_STALL`] is not reading.
    async fn send_paced(&self, resp: WatchResponse) -> Result<(), Stop> {
        let size = resp.encoded_len();
        let limit = self.shared.config.cell.watch.stream_buffer_bytes;
        let deadline = tokio::time::Instant::now() + CATCH_UP_STALL;
        loop {
            let queued = self.queued.load(Ordering::Relaxed);
            if (queued == 0 || queued + size <= limit) && self.tx.capacity() > 0 {
                return self.send(resp);
            }
            if tokio::time::timeout_at(deadline, self.drained.notified())
                .await
                .is_err()
            {
                return Err(Stop::Stalled);
            }
        }
    }

    /// Indexes watcher `id` here and, for its key or for every revision, in the
    /// hub. Returns the newest revision the hub had dispatched before that.
    fn index(&mut self, id: i64, range: &KeyRange) -> i64 {
        match range {
            KeyRange::Single(k) => {
                self.by_key.entry(k.clone()).or_default().insert(id);
                self.events.follow_key(k)
            }
            KeyRange::Span { .. } => {
                self.spans.insert(id);
                self.events.follow_every(true)
            }
        }
    }

    fn unindex(&mut self, id: i64, range: &KeyRange) {
        match range {
            KeyRange::Single(k) => {
                if let Some(ids) = self.by_key.get_mut(k) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_key.remove(k);
                        self.events.unfollow_key(k);
                    }
                }
            }
            KeyRange::Span { .. } => {
                self.spans.remove(&id);
                if self.spans.is_empty() {
                    self.events.follow_every(false);
                }
            }
        }
    }

    /// Drops watcher `id` and its index entries; false if there was none.
    fn remove(&mut self, id: i64) -> bool {
        let Some(w) = self.watchers.remove(&id) else {
            return false;
        };
        self.unindex(id, &w.range);
        true
    }

    /// The response a watcher gets for one revision, if any event matches.
    fn matching(&self, id: i64, w: &Watcher, rev: &RevisionEvents) -> Option<WatchResponse> {
        let mut events = Vec::new();
        matching_events(w, rev, &mut events);
        (!events.is_empty()).then(|| WatchResponse {
            header: self.header(rev.revision),
            watch_id: id,
            events,
            ..Default::default()
        })
    }

    /// Delivers `first` and the revisions waiting behind it in the mailbox,
    /// coalesced (see [`COALESCE_REVISIONS`]).
    fn deliver_waiting(&mut self, first: Arc<RevisionEvents>) -> Result<(), Stop> {
        let max_bytes = COALESCE_BYTES.min(self.shared.config.cell.watch.stream_buffer_bytes / 4);
        let mut run: Vec<Arc<RevisionEvents>> = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(rev) = next.take() {
            if rev.elided {
                // Read from RocksDB on its own, in order.
                self.deliver_run(&run)?;
                run.clear();
                bytes = 0;
                self.deliver_elided(rev.revision)?;
            } else {
                bytes += rev.payload_bytes();
                run.push(rev);
            }
            if run.len() < COALESCE_REVISIONS && bytes < max_bytes {
                next = self.events.try_next();
            }
        }
        self.deliver_run(&run)
    }

    /// One response per watcher with the events of `run` (consecutive revisions,
    /// none elided) that it matches.
    fn deliver_run(&mut self, run: &[Arc<RevisionEvents>]) -> Result<(), Stop> {
        let Some(last) = run.last().map(|r| r.revision) else {
            return Ok(());
        };
        // One header for the run: every watcher's response names the same revision.
        let header = self.header(last);
        // Revisions arrive in order, so a watcher's `next` only matters for the
        // revisions its catch-up already covered.
        let mut candidates: BTreeSet<i64> = self.spans.clone();
        for e in run.iter().flat_map(|r| &r.events) {
            if let Some(ids) = e.kv.as_ref().and_then(|kv| self.by_key.get(&kv.key)) {
                candidates.extend(ids.iter().copied());
            }
        }
        for id in candidates {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            if let Some(resp) = shared_response(id, w, run, header) {
                self.send_encoded(resp)?;
                continue;
            }
            let mut events = Vec::new();
            for rev in run {
                matching_events(w, rev, &mut events);
            }
            if !events.is_empty() {
                self.send(WatchResponse {
                    header,
                    watch_id: id,
                    events,
                    ..Default::default()
                })?;
            }
        }
        self.finished = last;
        Ok(())
    }

    /// Delivers a revision too large for the in-memory log, read from RocksDB.
    fn deliver_elided(&mut self, revision: i64) -> Result<(), Stop> {
        match self.shared.reader.history(revision, revision, None) {
            Ok(stored) => {
                for r in stored {
                    self.deliver_run(&[Arc::new(r)])?;
                }
            }
            // Compacted away already: the watchers resume from a revision they
            // can read.
            Err(_) => return self.cancel_all_behind(revision),
        }
        self.finished = revision;
        Ok(())
    }

    /// The stream was not handed revisions from `from` on: its watchers can no
    /// longer be told every event in order, so each is canceled with the revision
    /// to watch again from, and the stream starts over with none.
    /// Ends the watchers of tenants the cell no longer serves (a move cut
    /// over): their events now happen in another cell, at unrelated revisions.
    fn end_moved(&mut self) -> Result<(), Stop> {
        let own = self.ownership.borrow_and_update().clone();
        let moved: Vec<(i64, String)> = self
            .watchers
            .iter()
            .filter_map(|(id, w)| {
                let (key, end) = bounds(&w.range);
                own.moved_away(&key, &end).map(|e| (*id, e.to_string()))
            })
            .collect();
        for (id, why) in moved {
            self.remove(id);
            self.send(WatchResponse {
                header: self.header(self.current_revision()),
                watch_id: id,
                canceled: true,
                cancel_reason: format!(
                    "{why}. Revisions do not carry across cells: read the keys again and watch \
                     from the revision that read returns"
                ),
                ..Default::default()
            })?;
        }
        Ok(())
    }

    fn cancel_all_behind(&mut self, from: i64) -> Result<(), Stop> {
        let watchers = std::mem::take(&mut self.watchers);
        self.by_key.clear();
        self.spans.clear();
        self.events.reset();
        self.finished = from - 1;
        for (id, w) in watchers {
            self.send(WatchResponse {
                header: self.header(self.current_revision()),
                watch_id: id,
                canceled: true,
                cancel_reason: format!(
                    "watcher fell more than {} revisions behind; watch again from revision {}",
                    self.shared.config.cell.watch.event_log_revisions,
                    w.next.max(from)
                ),
                ..Default::default()
            })?;
        }
        Ok(())
    }

    /// The revision through which every watcher of this stream has been sent
    /// every event: what a progress notification may claim.
    fn synced(&self) -> i64 {
        self.events.synced(self.finished)
    }

    fn notify_progress(&self) -> Result<(), Stop> {
        let synced = self.synced();
        for (id, w) in &self.watchers {
            if w.progress_notify {
                self.send(WatchResponse {
                    header: self.header(synced),
                    watch_id: *id,
                    ..Default::default()
                })?;
            }
        }
        Ok(())
    }
}

/// The response for watcher `id` to `run` built from the revisions' shared
/// encoding, when the watcher wants every event of every revision as stored (no
/// filter, no previous values): a header and a watch id, then the events' bytes
/// (a message's fields may be concatenated). `None` otherwise.
fn shared_response(
    id: i64,
    w: &Watcher,
    run: &[Arc<RevisionEvents>],
    header: Option<ResponseHeader>,
) -> Option<Bytes> {
    let wants_all = !w.no_put && !w.no_delete && !w.prev_kv;
    let every_event = |rev: &Arc<RevisionEvents>| {
        rev.revision >= w.next
            && rev
                .events
                .iter()
                .all(|e| e.kv.as_ref().is_some_and(|kv| w.range.contains(&kv.key)))
    };
    if !wants_all || !run.iter().all(every_event) || run.iter().all(|r| r.events.is_empty()) {
        return None;
    }
    let head = WatchResponse {
        header,
        watch_id: id,
        ..Default::default()
    };
    let parts: Vec<&Vec<u8>> = run.iter().map(|r| encoded_events(r)).collect();
    let mut out =
        Vec::with_capacity(head.encoded_len() + parts.iter().map(|p| p.len()).sum::<usize>());
    head.encode(&mut out).ok()?;
    for p in parts {
        out.extend_from_slice(p);
    }
    Some(Bytes::from(out))
}

/// `rev`'s events as the repeated `events` field (11) of a WatchResponse,
/// without previous values; encoded by the first stream that asks.
fn encoded_events(rev: &RevisionEvents) -> &Vec<u8> {
    rev.encoded_events.get_or_init(|| {
        let mut out = Vec::new();
        for e in &rev.events {
            let plain = Event {
                prev_kv: None,
                ..e.clone()
            };
            prost::encoding::message::encode(WATCH_RESPONSE_EVENTS_TAG, &plain, &mut out);
        }
        out
    })
}

/// The field number of `events` in etcd's WatchResponse (rpc.proto).
const WATCH_RESPONSE_EVENTS_TAG: u32 = 11;

/// Adds the events of `rev` that watcher `w` wants to `out`, as it wants them
/// (without the previous value unless it asked for it).
fn matching_events(w: &Watcher, rev: &RevisionEvents, out: &mut Vec<Event>) {
    if rev.revision < w.next {
        return;
    }
    out.extend(
        rev.events
            .iter()
            .filter(|e| {
                let put = e.r#type == EventType::Put as i32;
                !(put && w.no_put || !put && w.no_delete)
                    && e.kv.as_ref().is_some_and(|kv| w.range.contains(&kv.key))
            })
            .map(|e| {
                let mut e = e.clone();
                if !w.prev_kv {
                    e.prev_kv = None;
                }
                e
            }),
    );
}

/// The etcd `(key, range_end)` of a watched range.
fn bounds(range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    match range {
        KeyRange::Single(k) => (k.clone(), Vec::new()),
        KeyRange::Span {
            start,
            end: Some(end),
        } => (start.clone(), end.clone()),
        KeyRange::Span { start, end: None } => (start.clone(), vec![0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::mvccpb::KeyValue;

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            mod_revision: rev,
            create_revision: 1,
            version: 2,
            ..Default::default()
        }
    }

    #[test]
    fn shared_event_bytes_decode_as_the_response_built_for_one_watcher() {
        let rev = |n: i64| RevisionEvents {
            revision: n,
            events: vec![
                Event {
                    kv: Some(kv("/a/x", "1", n)),
                    prev_kv: Some(kv("/a/x", "0", n - 1)),
                    ..Default::default()
                },
                Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(kv("/a/y", "", n)),
                    ..Default::default()
                },
            ],
            elided: false,
            encoded_events: Default::default(),
        };
        let (r7, r8) = (rev(7), rev(8));
        let header = ResponseHeader {
            cluster_id: 3,
            member_id: 4,
            revision: 8,
            raft_term: 5,
        };
        let mut bytes = WatchResponse {
            header: Some(header),
            watch_id: 9,
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(encoded_events(&r7));
        bytes.extend_from_slice(encoded_events(&r8));
        let got = WatchResponse::decode(&bytes[..]).unwrap();
        let w = Watcher {
            range: KeyRange::new(b"/a/", b"/a0"),
            next: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
        };
        let mut events = Vec::new();
        matching_events(&w, &r7, &mut events);
        matching_events(&w, &r8, &mut events);
        let want = WatchResponse {
            header: Some(header),
            watch_id: 9,
            events,
            ..Default::default()
        };
        assert_eq!(got, want);
        assert!(got.events.iter().all(|e| e.prev_kv.is_none()));
        // Encoded once: a second stream gets the same bytes.
        assert!(std::ptr::eq(encoded_events(&r7), encoded_events(&r7)));
    }
}
