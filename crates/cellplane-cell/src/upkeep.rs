//! How a cell looks after itself, on its leader: auto-compaction, the space
//! quota and the corruption check ([`MaintenanceSettings`]). Each is a loop that
//! does its work only while this member leads, and proposes what it decides
//! through Raft (a `Compact`, an `Alarm`), so every member applies the same
//! thing at the same log position. A new leader picks up where the old one left
//! off: the state they act on is replicated or sampled on every member.
//!
//! One loop runs on every member: removing, in the background and in steps,
//! the versions an applied compaction made unreadable
//! ([`cellplane_storage::HistoryCompactor`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_proto::etcdserverpb::{AlarmType, HashKvRequest};
use cellplane_storage::{Command, CompactCursor, CompactStep, HistoryCompactor, KvError, KvHash};
use tokio_util::sync::CancellationToken;

use crate::config::{AutoCompaction, MaintenanceSettings};
use crate::node::Shared;

/// How long a member's HashKV (a scan of its history) may take.
const HASH_TIMEOUT: Duration = Duration::from_secs(120);

/// Revision samples auto-compaction keeps (a few tens of KiB).
const MAX_SAMPLES: usize = 4096;

/// Revisions one step of physical compaction looks at: a few milliseconds of
/// work between which the member's other work runs.
const COMPACTION_STEP_ENTRIES: usize = 10_000;

/// The pause between two steps.
const COMPACTION_STEP_PAUSE: Duration = Duration::from_millis(2);

/// Starts the loops; they end with `shutdown`.
pub fn spawn(
    shared: &Arc<Shared>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) {
    let m = shared.config.cell.maintenance.clone();
    if m.auto_compaction_mode != AutoCompaction::Off {
        tasks.spawn(auto_compaction(
            shared.clone(),
            m.clone(),
            shutdown.child_token(),
        ));
    }
    tasks.spawn(remove_compacted_history(
        shared.clone(),
        shutdown.child_token(),
    ));
    tasks.spawn(quota(shared.clone(), m.clone(), shutdown.child_token()));
    if m.corrupt_check_secs > 0 {
        tasks.spawn(corruption_check(shared.clone(), m, shutdown.child_token()));
    }
}

/// Every member: once a compaction is applied, removes the versions it made
/// unreadable, step by step off the async runtime, then reclaims their space in
/// RocksDB. A compaction applied meanwhile is taken up by the next pass.
async fn remove_compacted_history(shared: Arc<Shared>, shutdown: CancellationToken) {
    let compactor = HistoryCompactor::new(shared.store.clone());
    let mut applied = shared.applied.clone();
    loop {
        let (target, done) = match blocking(&compactor, |c| c.targets()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the compaction revisions");
                (0, 0)
            }
        };
        shared.metrics.history_compacted_revision.set(done);
        if target > done {
            match compact_history(&compactor, done, target, &shared, &shutdown).await {
                Some(Ok(())) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, target, "removing compacted history failed; retrying later");
                    if !tick(Duration::from_secs(10), &shutdown).await {
                        return;
                    }
                    continue;
                }
                None => return,
            }
        }
        // Wait for the next compaction to be applied.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = applied.wait_for(|s| s.compacted > target) => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// One pass over the revisions `(from, target]`; None once `shutdown` is
/// cancelled.
async fn compact_history(
    compactor: &HistoryCompactor,
    from: i64,
    target: i64,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<Result<(), KvError>> {
    let started = Instant::now();
    let mut cursor = CompactCursor::default();
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        let step = blocking(compactor, move |c| {
            c.step(from, target, cursor, COMPACTION_STEP_ENTRIES)
        })
        .await;
        match step {
            Ok(CompactStep::More(next)) => cursor = next,
            Ok(CompactStep::Done(last)) => {
                cursor = last;
                break;
            }
            Err(e) => return Some(Err(e)),
        }
        // Let the apply path and readers have the disk and the CPU between steps
        // (etcd pauses between its compaction batches the same way).
        tokio::time::sleep(COMPACTION_STEP_PAUSE).await;
    }
    if let Err(e) = blocking(compactor, move |c| c.finish(from, target)).await {
        return Some(Err(e));
    }
    shared
        .metrics
        .history_versions_removed
        .inc_by(cursor.deleted());
    tracing::info!(
        target,
        removed = cursor.deleted(),
        ms = started.elapsed().as_millis() as u64,
        "removed compacted history"
    );
    Some(Ok(()))
}

/// Runs `f` on the compactor off the async runtime.
async fn blocking<T: Send + 'static>(
    compactor: &HistoryCompactor,
    f: impl FnOnce(&HistoryCompactor) -> Result<T, KvError> + Send + 'static,
) -> Result<T, KvError> {
    let c = compactor.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .unwrap_or_else(|e| Err(KvError::Storage(format!("compaction task failed: {e}"))))
}

fn leading(shared: &Shared) -> bool {
    shared.raft.metrics().borrow().current_leader == Some(shared.id)
}

/// Waits one `period`; false once `shutdown` is cancelled.
async fn tick(period: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(period) => true,
    }
}

/// Proposes `cmd` if this member leads; logs what went wrong otherwise.
async fn propose(shared: &Shared, cmd: Command, what: &str) -> Option<Result<(), KvError>> {
    match shared.propose(cmd).await {
        Ok((resp, _)) => match resp.outcome {
            Some(Ok(_)) => Some(Ok(())),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        },
        Err(_) => {
            tracing::debug!(what, "not proposed: this member no longer leads");
            None
        }
    }
}

/// etcd's auto-compaction. `periodic`: every member samples its applied revision
/// on each interval, so a new leader knows which revision was current
/// `retention` ago; the leader compacts to it. `revision`: the leader compacts to
/// the newest revision minus the retained count.
async fn auto_compaction(shared: Arc<Shared>, m: MaintenanceSettings, shutdown: CancellationToken) {
    let period = m.compaction_interval();
    let retention = Duration::from_secs(m.auto_compaction_retention_secs);
    // Samples span one retention and a little more, at most MAX_SAMPLES of
    // them: with an interval much shorter than the retention, sample less often
    // than the loop ticks (the compaction point is then up to retention /
    // MAX_SAMPLES late, never early).
    let sample_every = period.max(retention / MAX_SAMPLES as u32);
    let keep = (retention.as_millis() / sample_every.as_millis().max(1)) as usize + 2;
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::with_capacity(keep);
    while tick(period, &shutdown).await {
        let now = Instant::now();
        let applied = *shared.applied.borrow();
        if samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= sample_every)
        {
            samples.push_back((now, applied.revision));
            while samples.len() > keep {
                samples.pop_front();
            }
        }
        if !leading(&shared) {
            continue;
        }
        let target = match m.auto_compaction_mode {
            AutoCompaction::Periodic => samples
                .iter()
                .rev()
                .find(|(t, _)| now.duration_since(*t) >= retention)
                .map(|(_, r)| *r),
            AutoCompaction::Revision => Some(
                applied
                    .revision
                    .saturating_sub(m.auto_compaction_retained_revisions as i64),
            ),
            AutoCompaction::Off => None,
        };
        let Some(target) = target.filter(|r| *r > applied.compacted) else {
            continue;
        };
        match propose(&shared, Command::Compact(target), "auto-compaction").await {
            Some(Ok(())) => {
                shared.metrics.auto_compactions.inc();
                tracing::info!(revision = target, "auto-compacted");
            }
            // Compacted meanwhile by an operator: nothing to do.
            Some(Err(KvError::Compacted { .. })) | None => {}
            Some(Err(e)) => tracing::warn!(revision = target, error = %e, "auto-compaction failed"),
        }
    }
}

/// The space quota: the leader raises NOSPACE (for itself) once its key-value
/// state passes `quota_backend_bytes`. Every member holds the same state, so the
/// leader's size stands for the cell's. Only an operator disarms the alarm
/// (after compacting, defragmenting and checking the size), as with etcd.
async fn quota(shared: Arc<Shared>, m: MaintenanceSettings, shutdown: CancellationToken) {
    let period = Duration::from_millis(m.quota_check_ms);
    while tick(period, &shutdown).await {
        let size = shared.store.state_size_bytes();
        if !leading(&shared) || size <= m.quota_backend_bytes {
            continue;
        }
        if shared.applied.borrow().alarms.no_space {
            continue;
        }
        let raise = Command::Alarm {
            activate: true,
            member: shared.id,
            alarm: AlarmType::Nospace as i32,
        };
        if let Some(Ok(())) = propose(&shared, raise, "NOSPACE alarm").await {
            tracing::error!(
                size,
                quota = m.quota_backend_bytes,
                "space quota exceeded: NOSPACE raised, writes that grow the store are refused \
                 until an operator compacts, defragments and disarms it"
            );
        }
    }
}

/// etcd's corruption check: the leader hashes its history at its applied
/// revision and asks every other member for HashKV at the same revision. A member
/// with the same compaction revision and another hash holds different data: the
/// leader raises CORRUPT for it (for itself, when every other member that
/// answered agrees with each other and not with it).
async fn corruption_check(
    shared: Arc<Shared>,
    m: MaintenanceSettings,
    shutdown: CancellationToken,
) {
    let period = Duration::from_secs(m.corrupt_check_secs);
    while tick(period, &shutdown).await {
        if !leading(&shared) || shared.applied.borrow().alarms.corrupt {
            continue;
        }
        let reader = shared.reader.clone();
        let mine = match tokio::task::spawn_blocking(move || reader.hash_kv(0)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "corruption check: cannot hash the local store");
                continue;
            }
            Err(_) => continue,
        };
        let mut differ = Vec::new();
        let mut agree = 0;
        // Every member of the membership in force, learners and members added
        // since this one started included.
        let members: Vec<u64> = shared
            .membership()
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        for id in members.into_iter().filter(|id| *id != shared.id) {
            match peer_hash(&shared, id, mine.revision).await {
                Some(h) if h.compacted != mine.compacted => {}
                Some(h) if h.hash == mine.hash => agree += 1,
                Some(h) => differ.push((id, h)),
                None => {}
            }
        }
        if agree + differ.len() == 0 {
            continue;
        }
        shared.metrics.corruption_checks.inc();
        if differ.is_empty() {
            continue;
        }
        let peers_agree = differ.windows(2).all(|w| w[0].1.hash == w[1].1.hash);
        let suspects: Vec<u64> = if agree > 0 {
            // The leader agrees with someone: the others are the odd ones out.
            differ.iter().map(|(id, _)| *id).collect()
        } else if differ.len() >= 2 && peers_agree {
            // Everyone else agrees against the leader.
            vec![shared.id]
        } else {
            // One answer against the leader's (or no two alike): who is wrong
            // cannot be told; name both sides, writes stop either way.
            tracing::error!("corruption check: cannot tell which member is corrupt");
            std::iter::once(shared.id)
                .chain(differ.iter().map(|(id, _)| *id))
                .collect()
        };
        for id in suspects {
            tracing::error!(
                member = id,
                revision = mine.revision,
                "corruption check: member's history hashes differently at the same revision; \
                 raising CORRUPT (writes stop until an operator replaces it and disarms)"
            );
            let raise = Command::Alarm {
                activate: true,
                member: id,
                alarm: AlarmType::Corrupt as i32,
            };
            let _ = propose(&shared, raise, "CORRUPT alarm").await;
        }
    }
}

/// Member `id`'s HashKV at `revision`, or None when it cannot answer yet (behind,
/// unreachable, compacted past it).
async fn peer_hash(shared: &Shared, id: u64, revision: i64) -> Option<KvHash> {
    let channel = shared.channel(id).ok()?;
    let mut client = MaintenanceClient::new(channel);
    // A member that has not applied `revision` yet gets a few chances.
    for _ in 0..5 {
        let call = client.hash_kv(HashKvRequest { revision });
        match tokio::time::timeout(HASH_TIMEOUT, call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                return Some(KvHash {
                    hash: r.hash,
                    compacted: r.compact_revision,
                    revision: r.hash_revision,
                });
            }
            // Behind (a future revision) or compacted past it: both OUT_OF_RANGE;
            // waiting helps the first and costs the second a second at most.
            Ok(Err(s)) if s.code() == tonic::Code::OutOfRange => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => return None,
        }
    }
    None
}
