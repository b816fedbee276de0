//! The member-wide fan-out from the event log to watch streams.
//!
//! One dispatcher task follows the event log (the apply path's broadcast ring) and
//! hands each revision only to the streams that watch a key it touches, or that
//! hold a range watcher. A revision therefore costs one hash lookup per event, and
//! a stream whose watchers are idle is never woken: 10,000 idle watchers cost the
//! write path memory, not CPU.
//!
//! Each stream has a bounded mailbox (`watch.event_log_revisions` revisions). A
//! stream is *lagged*, and is handed nothing more, when
//! - its mailbox is full, or the oldest revision waiting in it is more than
//!   `watch.event_log_revisions` older than the one being dispatched (the event
//!   log's own horizon, so mailboxes never keep alive much more than the log), or
//! - the dispatcher itself fell behind the ring and lost revisions.
//!
//! A lagged stream takes what its mailbox still holds, then cancels its watchers
//! with the revision to resume from (the first revision it was not handed) and
//! resets its subscription.
//!
//! Registration and the history catch-up fit together like this: a stream follows
//! a key *before* it reads the history, and [`Subscription::follow_key`] returns
//! the newest revision dispatched so far. Every later revision reaches the
//! mailbox; everything up to it is already in RocksDB (revisions are published
//! after they are written), so the catch-up reads up to it and no revision falls
//! between the two.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cellplane_storage::RevisionEvents;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

type StreamId = u64;

/// The index from keys to the streams that watch them, and the streams' mailboxes.
pub struct Hub {
    index: Mutex<Index>,
    /// The newest revision handed to every mailbox it concerns.
    dispatched: AtomicI64,
    next_id: AtomicU64,
    /// Mailbox length, and how many revisions a stream may fall behind.
    window: usize,
}

#[derive(Default)]
struct Index {
    by_key: HashMap<Vec<u8>, Vec<StreamId>>,
    /// Streams with a range watcher: they see every revision.
    every: HashSet<StreamId>,
    streams: HashMap<StreamId, Slot>,
    /// Scratch list of the streams one revision goes to (kept to save allocations).
    targets: Vec<StreamId>,
}

struct Slot {
    tx: mpsc::Sender<Arc<RevisionEvents>>,
    signal: Arc<Signal>,
    keys: HashSet<Vec<u8>>,
    /// The newest revision put into the mailbox.
    last_sent: i64,
    /// The revision put into the mailbox when it last went from empty to not.
    queued_since: i64,
}

/// What the dispatcher and one stream tell each other without the index lock.
#[derive(Default)]
struct Signal {
    /// The first revision the stream was not handed; 0 while it is not lagged.
    lagged_from: AtomicI64,
    /// The newest revision the stream has taken out of its mailbox.
    taken: AtomicI64,
    /// Wakes a stream that was lagged while its mailbox was empty.
    wake: Notify,
}

impl Slot {
    fn lag(&self, from: i64) {
        if self.signal.lagged_from.load(Ordering::Acquire) == 0 {
            self.signal.lagged_from.store(from, Ordering::Release);
            self.signal.wake.notify_one();
        }
    }
}

/// What a stream gets next from its subscription.
pub enum Next {
    Revision(Arc<RevisionEvents>),
    /// Revisions from this one on were not handed to the stream.
    Lagged(i64),
}

impl Hub {
    pub fn new(window: usize) -> Arc<Hub> {
        Arc::new(Hub {
            index: Mutex::default(),
            dispatched: AtomicI64::new(0),
            next_id: AtomicU64::new(1),
            window: window.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Nothing under the lock can leave the index half-changed; a panic elsewhere
        // while holding it must not take every watch stream down with it.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream's subscription. It follows nothing until told to.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.window);
        let signal = Arc::new(Signal::default());
        self.lock().streams.insert(
            id,
            Slot {
                tx,
                signal: signal.clone(),
                keys: HashSet::new(),
                last_sent: 0,
                queued_since: 0,
            },
        );
        Subscription {
            hub: self.clone(),
            id,
            signal,
            rx,
        }
    }

    /// Follows the event log until `shutdown`, handing each revision to the
    /// mailboxes it concerns.
    pub async fn run(
        self: Arc<Self>,
        mut events: broadcast::Receiver<Arc<RevisionEvents>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = events.recv() => next,
            };
            match next {
                Ok(rev) => self.dispatch(&rev),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let from = self.dispatched.load(Ordering::Acquire) + 1;
                    tracing::warn!(
                        missed,
                        from,
                        "watch dispatcher fell behind the event log: lagging every stream"
                    );
                    for slot in self.lock().streams.values() {
                        slot.lag(from);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn dispatch(&self, rev: &Arc<RevisionEvents>) {
        let mut guard = self.lock();
        let ix = &mut *guard;
        ix.targets.clear();
        if rev.elided {
            // Its keys are not in memory: every stream that watches anything reads
            // it from RocksDB and decides; a stream with no watchers is not woken.
            let every = &ix.every;
            ix.targets.extend(
                ix.streams
                    .iter()
                    .filter(|(id, slot)| !slot.keys.is_empty() || every.contains(id))
                    .map(|(id, _)| *id),
            );
        } else {
            ix.targets.extend(ix.every.iter().copied());
            for e in &rev.events {
                if let Some(ids) = e.kv.as_ref().and_then(|kv| ix.by_key.get(&kv.key)) {
                    ix.targets.extend(ids.iter().copied());
                }
            }
            if ix.targets.len() > 1 {
                ix.targets.sort_unstable();
                ix.targets.dedup();
            }
        }
        let window = self.window as i64;
        for id in &ix.targets {
            let Some(slot) = ix.streams.get_mut(id) else {
                continue;
            };
            if slot.signal.lagged_from.load(Ordering::Acquire) != 0 {
                continue;
            }
            let taken = slot.signal.taken.load(Ordering::Acquire);
            let waiting = slot.last_sent > taken;
            // The oldest revision still in the mailbox is at least this.
            let oldest = slot.queued_since.max(taken + 1);
            if waiting && rev.revision - oldest >= window {
                slot.lag(rev.revision);
                continue;
            }
            match slot.tx.try_send(rev.clone()) {
                Ok(()) => {
                    if !waiting {
                        slot.queued_since = rev.revision;
                    }
                    slot.last_sent = rev.revision;
                }
                Err(mpsc::error::TrySendError::Full(_)) => slot.lag(rev.revision),
                // The stream is ending; dropping its subscription unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        // After the mailboxes: a stream that reads this and then finds its mailbox
        // empty has been handed everything up to here.
        self.dispatched.store(rev.revision, Ordering::Release);
    }
}

/// One watch stream's place in the hub; dropping it unregisters the stream.
pub struct Subscription {
    hub: Arc<Hub>,
    id: StreamId,
    signal: Arc<Signal>,
    rx: mpsc::Receiver<Arc<RevisionEvents>>,
}

impl Subscription {
    /// Hands this stream every revision that touches `key` from now on. Returns
    /// the newest revision dispatched before that (read the history up to it).
    pub fn follow_key(&self, key: &[u8]) -> i64 {
        let mut ix = self.hub.lock();
        let Index {
            by_key, streams, ..
        } = &mut *ix;
        if let Some(slot) = streams.get_mut(&self.id)
            && slot.keys.insert(key.to_vec())
        {
            by_key.entry(key.to_vec()).or_default().push(self.id);
        }
        self.hub.dispatched.load(Ordering::Acquire)
    }

    pub fn unfollow_key(&self, key: &[u8]) {
        let mut ix = self.hub.lock();
        let Index {
            by_key, streams, ..
        } = &mut *ix;
        if let Some(slot) = streams.get_mut(&self.id)
            && slot.keys.remove(key)
        {
            remove_from(by_key, key, self.id);
        }
    }

    /// Hands this stream every revision (it holds a range watcher), or stops.
    /// Returns the newest revision dispatched before that.
    pub fn follow_every(&self, on: bool) -> i64 {
        let mut ix = self.hub.lock();
        if on {
            ix.every.insert(self.id);
        } else {
            ix.every.remove(&self.id);
        }
        self.hub.dispatched.load(Ordering::Acquire)
    }

    /// The next revision for this stream, or `None` when the hub is gone.
    /// Cancel-safe: nothing taken is lost when the future is dropped.
    pub async fn next(&mut self) -> Option<Next> {
        loop {
            match self.rx.try_recv() {
                Ok(rev) => return Some(self.took(rev)),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let from = self.signal.lagged_from.load(Ordering::Acquire);
                    if from != 0 {
                        return Some(Next::Lagged(from));
                    }
                }
            }
            tokio::select! {
                rev = self.rx.recv() => return rev.map(|rev| self.took(rev)),
                _ = self.signal.wake.notified() => {}
            }
        }
    }

    /// The next revision if one is already in the mailbox; never waits. A lag
    /// is left for [`Subscription::next`] to report once the mailbox is empty.
    pub fn try_next(&mut self) -> Option<Arc<RevisionEvents>> {
        let rev = self.rx.try_recv().ok()?;
        self.signal.taken.store(rev.revision, Ordering::Release);
        Some(rev)
    }

    fn took(&self, rev: Arc<RevisionEvents>) -> Next {
        self.signal.taken.store(rev.revision, Ordering::Release);
        Next::Revision(rev)
    }

    /// The newest revision through which this stream has been handed everything
    /// it follows, given that it has finished with every revision up to
    /// `finished` it took.
    pub fn synced(&self, finished: i64) -> i64 {
        let dispatched = self.hub.dispatched.load(Ordering::Acquire);
        let lagged = self.signal.lagged_from.load(Ordering::Acquire) != 0;
        let taken = self.signal.taken.load(Ordering::Acquire);
        if !lagged && taken <= finished && self.rx.is_empty() {
            dispatched.max(finished)
        } else {
            finished
        }
    }

    /// After a lag, once the stream has canceled its watchers: follows nothing and
    /// is handed revisions again.
    pub fn reset(&mut self) {
        let mut ix = self.hub.lock();
        let Index {
            by_key,
            every,
            streams,
            ..
        } = &mut *ix;
        every.remove(&self.id);
        if let Some(slot) = streams.get_mut(&self.id) {
            for key in slot.keys.drain() {
                remove_from(by_key, &key, self.id);
            }
            while self.rx.try_recv().is_ok() {}
            slot.last_sent = 0;
            slot.queued_since = 0;
            self.signal.taken.store(0, Ordering::Release);
            self.signal.lagged_from.store(0, Ordering::Release);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut ix = self.hub.lock();
        let Index {
            by_key,
            every,
            streams,
            ..
        } = &mut *ix;
        every.remove(&self.id);
        if let Some(slot) = streams.remove(&self.id) {
            for key in &slot.keys {
                remove_from(by_key, key, self.id);
            }
        }
    }
}

fn remove_from(by_key: &mut HashMap<Vec<u8>, Vec<StreamId>>, key: &[u8], id: StreamId) {
    if let Some(ids) = by_key.get_mut(key) {
        ids.retain(|s| *s != id);
        if ids.is_empty() {
            by_key.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::mvccpb::{Event, KeyValue};

    fn rev(revision: i64, keys: &[&str]) -> Arc<RevisionEvents> {
        Arc::new(RevisionEvents {
            revision,
            events: keys
                .iter()
                .map(|k| Event {
                    kv: Some(KeyValue {
                        key: k.as_bytes().to_vec(),
                        mod_revision: revision,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            elided: false,
            encoded_events: Default::default(),
        })
    }

    fn revision(n: Option<Next>) -> i64 {
        match n {
            Some(Next::Revision(r)) => r.revision,
            Some(Next::Lagged(from)) => panic!("lagged from {from}"),
            None => panic!("hub gone"),
        }
    }

    #[tokio::test]
    async fn only_streams_following_a_key_are_handed_its_revisions() {
        let hub = Hub::new(16);
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        let mut every = hub.subscribe();
        assert_eq!(a.follow_key(b"/a"), 0);
        b.follow_key(b"/b");
        every.follow_every(true);
        hub.dispatch(&rev(1, &["/a"]));
        hub.dispatch(&rev(2, &["/b", "/a"]));
        hub.dispatch(&rev(3, &["/z"]));
        assert_eq!(revision(a.next().await), 1);
        assert_eq!(a.try_next().map(|r| r.revision), Some(2));
        assert!(a.try_next().is_none());
        assert!(a.rx.is_empty());
        assert_eq!(revision(b.next().await), 2);
        assert!(b.rx.is_empty());
        for want in 1..=3 {
            assert_eq!(revision(every.next().await), want);
        }
        // b took everything it was handed: it is synced with the dispatcher.
        assert_eq!(b.synced(2), 3);
        assert_eq!(a.follow_key(b"/c"), 3);
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_is_lagged_from_the_first_revision_it_missed() {
        let hub = Hub::new(2);
        let mut s = hub.subscribe();
        s.follow_key(b"/k");
        for r in 1..=4 {
            hub.dispatch(&rev(r, &["/k"]));
        }
        assert_eq!(revision(s.next().await), 1);
        assert_eq!(revision(s.next().await), 2);
        assert!(matches!(s.next().await, Some(Next::Lagged(3))));
        // Nothing is handed while lagged; after a reset the stream follows nothing.
        hub.dispatch(&rev(5, &["/k"]));
        s.reset();
        hub.dispatch(&rev(6, &["/k"]));
        assert!(s.rx.is_empty());
        s.follow_key(b"/k");
        hub.dispatch(&rev(7, &["/k"]));
        assert_eq!(revision(s.next().await), 7);
    }

    #[tokio::test]
    async fn a_dropped_stream_leaves_no_trace_in_the_index() {
        let hub = Hub::new(4);
        let s = hub.subscribe();
        s.follow_key(b"/k");
        s.follow_every(true);
        drop(s);
        let ix = hub.lock();
        assert!(ix.by_key.is_empty() && ix.every.is_empty() && ix.streams.is_empty());
    }
}
