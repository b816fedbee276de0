//! Keeps the Raft and storage gauges current from openraft's metrics stream.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::node::Shared;

pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut raft = shared.raft.metrics();
    let mut last_leader = None;
    // The DB size is a RocksDB property lookup: refresh it on a timer, not per change.
    let mut size_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = size_tick.tick() => {
                let m = &shared.metrics;
                m.db_size_bytes.set(shared.store.size_bytes() as i64);
                m.state_size_bytes.set(shared.store.state_size_bytes() as i64);
                let alarms = shared.applied.borrow().alarms;
                m.alarm_nospace.set(i64::from(alarms.no_space));
                m.alarm_corrupt.set(i64::from(alarms.corrupt));
                m.log_syncs.set(shared.sync_stats.syncs.load(std::sync::atomic::Ordering::Relaxed) as i64);
                m.log_synced_appends
                    .set(shared.sync_stats.appends.load(std::sync::atomic::Ordering::Relaxed) as i64);
                continue;
            }
            changed = raft.changed() => if changed.is_err() { return },
        }
        let m = raft.borrow_and_update().clone();
        let met = &shared.metrics;
        met.term.set(m.current_term as i64);
        met.is_leader.set(i64::from(m.current_leader == Some(m.id)));
        if m.current_leader != last_leader {
            if m.current_leader.is_some() {
                met.leader_changes.inc();
            }
            last_leader = m.current_leader;
        }
        met.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        met.applied_index
            .set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
        met.snapshot_index
            .set(m.snapshot.map(|l| l.index).unwrap_or(0) as i64);
        met.purged_index
            .set(m.purged.map(|l| l.index).unwrap_or(0) as i64);
        met.revision.set(shared.applied.borrow().revision);
    }
}
