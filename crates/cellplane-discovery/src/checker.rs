//! The health checker: runs on the cell's leader only, and writes through Raft
//! only when an instance's health changes.
//!
//! While this member leads, the checker reads every instance under the reserved
//! prefix and follows them with an etcd watch. Each instance with a TTL or an
//! active check gets a task of its own:
//!
//! - TTL: every `ttl_poll_ms` it asks the lease how long it has left. The lease
//!   was granted `ttl + deregister_after` seconds and each heartbeat renews it, so
//!   more than `ttl` seconds gone since the last renewal is a missed heartbeat:
//!   UNHEALTHY. A heartbeat after that: HEALTHY again. No heartbeat at all: the
//!   lease expires and the cell deletes the key (the instance is removed).
//! - Active (HTTP, TCP, gRPC health): every `interval_ms`, bounded by
//!   `timeout_ms` and by `max_concurrent_checks` running at once, and only
//!   against addresses `check_allow` and `check_deny` permit: a check whose
//!   target is refused (an instance registered before the policy, or a name that
//!   now resolves to a refused address) fails, with the reason, without
//!   connecting.
//! - Unhealthy for longer than `deregister_after` (from `unhealthy_since`, which is
//!   stored, so a new leader keeps counting): the instance is deleted.
//!
//! Every write is a compare-and-swap on the instance's mod revision: a change the
//! checker has not seen yet (a re-registration, a deregistration) always wins,
//! and the task retries from the new state. Losing leadership cancels every task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellplane_proto::discovery::{Check, Health, Instance};
use cellplane_proto::mvccpb::event::EventType;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AddressPolicy, Settings};
use crate::error::DiscoveryError;
use crate::etcd::Etcd;
use crate::keys;

pub struct Checker {
    etcd: Etcd,
    settings: Settings,
    slots: Arc<Semaphore>,
    /// The addresses active checks may reach.
    policy: Arc<AddressPolicy>,
}

/// An instance the checker follows: the latest stored state goes to its task.
struct Tracked {
    check: Option<Check>,
    lease_id: i64,
    state: watch::Sender<Instance>,
    stop: CancellationToken,
}

impl Checker {
    pub fn new(etcd: Etcd, settings: Settings) -> Checker {
        let slots = Arc::new(Semaphore::new(settings.max_concurrent_checks));
        let policy = Arc::new(settings.check_policy());
        Checker {
            etcd,
            settings,
            slots,
            policy,
        }
    }

    /// Runs until `shutdown`: checks while `leader` says this member leads.
    pub async fn run(self, mut leader: watch::Receiver<bool>, shutdown: CancellationToken) {
        loop {
            let leads = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = leader.wait_for(|l| *l) => r.is_ok(),
            };
            if !leads {
                return; // The leadership flag is gone: the member is stopping.
            }
            tracing::info!("discovery checker: leading, checking instances");
            let term = shutdown.child_token();
            let lost = {
                let mut leader = leader.clone();
                let term = term.clone();
                async move {
                    tokio::select! {
                        _ = term.cancelled() => {}
                        _ = leader.wait_for(|l| !*l) => term.cancel(),
                    }
                }
            };
            // `lead` returns once the term is cancelled and its tasks have ended.
            tokio::join!(lost, self.lead(term.clone()));
            tracing::info!("discovery checker: not leading, stopped");
            // A closed flag keeps its last value: `wait_for` would answer
            // "leading" at once, forever.
            if leader.has_changed().is_err() {
                return;
            }
        }
    }

    /// One leadership term: follow the instances, retrying after failures.
    async fn lead(&self, term: CancellationToken) {
        let backoff = Duration::from_millis(self.settings.retry_backoff_ms);
        while !term.is_cancelled() {
            if let Err(e) = self.follow(&term).await {
                tracing::warn!(error = %e, "discovery checker: lost the instances; reading them again");
                tokio::select! {
                    _ = term.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }

    /// Reads every instance and follows changes until `term` ends or the watch
    /// fails. Tasks live as long as this call.
    async fn follow(&self, term: &CancellationToken) -> Result<(), DiscoveryError> {
        let root = keys::ROOT.as_bytes();
        let (kvs, revision) = tokio::select! {
            _ = term.cancelled() => return Ok(()),
            r = self.etcd.range_prefix(root, 0, false) => r?,
        };
        let mut w = tokio::select! {
            _ = term.cancelled() => return Ok(()),
            r = self.etcd.watch_prefix(root, revision + 1) => r?,
        };
        let round = term.child_token();
        // Should this future be dropped, the tasks still stop.
        let _stop_tasks = round.clone().drop_guard();
        let tasks = TaskTracker::new();
        let mut tracked: HashMap<Vec<u8>, Tracked> = HashMap::new();
        for kv in &kvs {
            self.upsert(&mut tracked, &tasks, &round, kv);
        }
        let result = loop {
            let msg = tokio::select! {
                _ = term.cancelled() => break Ok(()),
                m = w.responses.message() => m,
            };
            match msg {
                Ok(Some(r)) if r.canceled => {
                    break Err(DiscoveryError::Etcd {
                        op: "checker watch",
                        status: tonic::Status::unavailable(r.cancel_reason),
                    });
                }
                Ok(Some(r)) => {
                    for e in &r.events {
                        let Some(kv) = &e.kv else { continue };
                        if e.r#type == EventType::Delete as i32 {
                            if let Some(t) = tracked.remove(&kv.key) {
                                t.stop.cancel();
                            }
                        } else {
                            self.upsert(&mut tracked, &tasks, &round, kv);
                        }
                    }
                }
                Ok(None) => {
                    break Err(DiscoveryError::Etcd {
                        op: "checker watch",
                        status: tonic::Status::unavailable("the watch ended"),
                    });
                }
                Err(status) => {
                    break Err(DiscoveryError::Etcd {
                        op: "checker watch",
                        status,
                    });
                }
            }
        };
        round.cancel();
        tasks.close();
        tasks.wait().await;
        result
    }

    /// Starts, updates or restarts the task of the instance `kv` holds.
    fn upsert(
        &self,
        tracked: &mut HashMap<Vec<u8>, Tracked>,
        tasks: &TaskTracker,
        round: &CancellationToken,
        kv: &cellplane_proto::mvccpb::KeyValue,
    ) {
        let instance = match keys::decode(kv) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "discovery checker: skipping");
                if let Some(t) = tracked.remove(&kv.key) {
                    t.stop.cancel();
                }
                return;
            }
        };
        let check = instance.check.clone();
        let needs_task = check
            .as_ref()
            .is_some_and(|c| c.ttl_seconds > 0 || c.active.is_some());
        if let Some(t) = tracked.get(&kv.key) {
            if needs_task && t.check == check && t.lease_id == instance.lease_id {
                // Same check: the task goes on with the new state.
                t.state.send_replace(instance);
                return;
            }
            t.stop.cancel();
            tracked.remove(&kv.key);
        }
        if !needs_task {
            return;
        }
        let stop = round.child_token();
        let (state, rx) = watch::channel(instance.clone());
        let task = InstanceTask {
            etcd: self.etcd.clone(),
            key: kv.key.clone(),
            check: check.clone().unwrap_or_default(),
            state: rx,
            slots: self.slots.clone(),
            policy: self.policy.clone(),
            ttl_poll: Duration::from_millis(self.settings.ttl_poll_ms),
        };
        tasks.spawn(task.run(stop.clone()));
        tracked.insert(
            kv.key.clone(),
            Tracked {
                check,
                lease_id: instance.lease_id,
                state,
                stop,
            },
        );
    }
}

/// The health of one instance as its last observations say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The TTL side: None when the instance has no TTL or it was not asked yet.
    pub ttl: Option<Result<(), String>>,
    /// The active check: None when there is none or it has not run yet.
    pub active: Option<Result<(), String>>,
}

impl Observed {
    /// The health the observations call for, with the reason when unhealthy; None
    /// while a part the check needs is still unknown.
    pub fn verdict(&self, check: &Check) -> Option<(Health, String)> {
        for part in [&self.ttl, &self.active].into_iter().flatten() {
            if let Err(reason) = part {
                return Some((Health::Unhealthy, reason.clone()));
            }
        }
        let ttl_known = check.ttl_seconds == 0 || self.ttl.is_some();
        let active_known = check.active.is_none() || self.active.is_some();
        (ttl_known && active_known).then(|| (Health::Healthy, String::new()))
    }
}

/// What one task has seen of a TTL instance's lease.
///
/// A lease with more than `granted - ttl` seconds left is not proof of life: a new
/// leader reloads every lease with its full TTL, so right after a leader change
/// even a dead instance's lease looks fresh. An UNHEALTHY instance therefore turns
/// HEALTHY only on evidence of a heartbeat this task saw itself (the remaining
/// time went up between two polls); until then its TTL side is unknown.
#[derive(Debug, Clone, Default)]
pub struct LeaseView {
    last_remaining: Option<i64>,
    trusted: bool,
}

impl LeaseView {
    /// The TTL side's verdict after a poll; `stored_unhealthy` is the instance's
    /// stored health.
    pub fn observe(
        &mut self,
        remaining: i64,
        granted: i64,
        ttl: i64,
        stored_unhealthy: bool,
    ) -> Option<Result<(), String>> {
        let first = self.last_remaining.is_none();
        let renewed = self.last_remaining.is_some_and(|prev| remaining > prev);
        self.last_remaining = Some(remaining);
        if missed_heartbeat(remaining, granted, ttl) {
            self.trusted = false;
            return Some(Err(format!(
                "no heartbeat for more than its TTL of {ttl} s"
            )));
        }
        if renewed || (first && !stored_unhealthy) {
            self.trusted = true;
        }
        self.trusted.then_some(Ok(()))
    }
}

/// Whether a lease with `remaining` of `granted` seconds left has missed a
/// heartbeat of an instance whose TTL is `ttl`: more than `ttl` seconds gone since
/// its last renewal. Granted rather than requested, in case the cell rounded the
/// lease up.
pub fn missed_heartbeat(remaining: i64, granted: i64, ttl: i64) -> bool {
    granted - remaining > ttl
}

/// The stored instance after a change of health to `health` at `now_ms`.
pub fn with_health(i: &Instance, health: Health, reason: String, now_ms: i64) -> Instance {
    let mut next = i.clone();
    let was_unhealthy = i.health == Health::Unhealthy as i32;
    next.health = health as i32;
    next.health_reason = reason;
    next.unhealthy_since_unix_ms = match health {
        Health::Unhealthy if was_unhealthy && i.unhealthy_since_unix_ms > 0 => {
            i.unhealthy_since_unix_ms
        }
        Health::Unhealthy => now_ms,
        _ => 0,
    };
    next
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct InstanceTask {
    etcd: Etcd,
    key: Vec<u8>,
    check: Check,
    state: watch::Receiver<Instance>,
    slots: Arc<Semaphore>,
    policy: Arc<AddressPolicy>,
    ttl_poll: Duration,
}

impl InstanceTask {
    async fn run(self, stop: CancellationToken) {
        let mut seen = Observed::default();
        let mut lease = LeaseView::default();
        let far = Duration::from_secs(86_400 * 365);
        let ttl_every = if self.check.ttl_seconds > 0 {
            self.ttl_poll
        } else {
            far
        };
        let active_every = if self.check.active.is_some() {
            Duration::from_millis(self.check.interval_ms)
        } else {
            far
        };
        let mut ttl_tick = tokio::time::interval(ttl_every);
        let mut active_tick = tokio::time::interval(active_every);
        for t in [&mut ttl_tick, &mut active_tick] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ttl_tick.tick(), if self.check.ttl_seconds > 0 => {
                    match self.poll_lease().await {
                        Ok(Some((remaining, granted))) => {
                            let unhealthy = self.state.borrow().health == Health::Unhealthy as i32;
                            seen.ttl =
                                lease.observe(remaining, granted, self.check.ttl_seconds, unhealthy);
                        }
                        Ok(None) => {
                            // The lease is gone: the cell deletes its keys. Make
                            // sure, in case this key outlived it.
                            self.remove("its lease expired").await;
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "discovery checker: lease poll failed");
                            continue;
                        }
                    }
                }
                _ = active_tick.tick(), if self.check.active.is_some() => {
                    seen.active = Some(self.probe().await);
                }
            }
            if stop.is_cancelled() {
                return;
            }
            self.settle(&seen).await;
        }
    }

    /// The instance's lease (remaining, granted) TTL; None when it is gone.
    async fn poll_lease(&self) -> Result<Option<(i64, i64)>, DiscoveryError> {
        let lease = self.state.borrow().lease_id;
        self.etcd.time_to_live(lease).await
    }

    async fn probe(&self) -> Result<(), String> {
        let Some(active) = &self.check.active else {
            return Ok(());
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return Ok(());
        };
        let timeout = Duration::from_millis(self.check.timeout_ms);
        crate::probe::run(active, timeout, &self.policy).await
    }

    /// Writes the health the observations call for, if it differs from the
    /// stored one; removes the instance once unhealthy for too long.
    async fn settle(&self, seen: &Observed) {
        let current = self.state.borrow().clone();
        if let Some((health, reason)) = seen.verdict(&self.check)
            && health as i32 != current.health
        {
            let next = with_health(&current, health, reason.clone(), now_ms());
            tracing::info!(
                key = %String::from_utf8_lossy(&self.key),
                health = health.as_str_name(),
                reason = %reason,
                "discovery checker: health changed"
            );
            match self
                .etcd
                .put_if(
                    &self.key,
                    current.mod_revision,
                    keys::encode(&next),
                    current.lease_id,
                )
                .await
            {
                // The watch brings the new state (and revision) back to this task.
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "discovery checker: cannot write health"),
            }
            return;
        }
        let after_ms = self.check.deregister_after_seconds.saturating_mul(1000);
        if current.health == Health::Unhealthy as i32
            && current.unhealthy_since_unix_ms > 0
            && now_ms() - current.unhealthy_since_unix_ms > after_ms
        {
            self.remove(&format!(
                "unhealthy for more than {} s",
                self.check.deregister_after_seconds
            ))
            .await;
        }
    }

    async fn remove(&self, why: &str) {
        let current = self.state.borrow().clone();
        tracing::info!(key = %String::from_utf8_lossy(&self.key), why, "discovery checker: removing the instance");
        match self.etcd.delete_if(&self.key, current.mod_revision).await {
            Ok(Some(_)) if current.lease_owned => {
                // Its lease held only this key.
                let _ = self.etcd.revoke(current.lease_id).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "discovery checker: cannot remove an instance"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_proto::discovery::{HttpCheck, check::Active};

    fn ttl_check() -> Check {
        Check {
            ttl_seconds: 10,
            deregister_after_seconds: 60,
            ..Default::default()
        }
    }

    #[test]
    fn a_heartbeat_is_missed_once_more_than_the_ttl_has_gone() {
        // Granted 70 = ttl 10 + deregister_after 60.
        assert!(!missed_heartbeat(70, 70, 10));
        assert!(!missed_heartbeat(60, 70, 10), "exactly the TTL gone");
        assert!(missed_heartbeat(59, 70, 10));
        // A lease the cell rounded up to 80 s still counts from what it granted.
        assert!(!missed_heartbeat(75, 80, 10));
        assert!(missed_heartbeat(69, 80, 10));
    }

    #[test]
    fn an_unhealthy_instance_needs_a_seen_heartbeat_to_be_healthy_again() {
        // Healthy instance, fresh lease: trusted at once.
        let mut v = LeaseView::default();
        assert_eq!(v.observe(70, 70, 10, false), Some(Ok(())));
        assert_eq!(v.observe(65, 70, 10, false), Some(Ok(())));
        assert!(matches!(v.observe(59, 70, 10, false), Some(Err(_))));
        // Still silent: stays failed; a renewal (remaining went up) heals it.
        assert!(matches!(v.observe(58, 70, 10, true), Some(Err(_))));
        assert_eq!(v.observe(70, 70, 10, true), Some(Ok(())));

        // A new leader reloaded the lease with its full TTL: a fresh-looking
        // lease is no proof for an instance stored UNHEALTHY...
        let mut v = LeaseView::default();
        assert_eq!(v.observe(70, 70, 10, true), None);
        assert_eq!(v.observe(66, 70, 10, true), None);
        // ...a renewal seen afterwards is.
        assert_eq!(v.observe(70, 70, 10, true), Some(Ok(())));
    }

    #[test]
    fn the_verdict_waits_for_every_part_and_any_failure_wins() {
        let mut both = ttl_check();
        both.active = Some(Active::Http(HttpCheck {
            url: "http://h/".into(),
        }));
        let mut o = Observed::default();
        assert_eq!(o.verdict(&both), None);
        o.ttl = Some(Ok(()));
        assert_eq!(o.verdict(&both), None, "the active check has not run");
        assert_eq!(
            o.verdict(&ttl_check()),
            Some((Health::Healthy, String::new()))
        );
        o.active = Some(Err("HTTP 500".into()));
        assert_eq!(
            o.verdict(&both),
            Some((Health::Unhealthy, "HTTP 500".into()))
        );
        o.active = Some(Ok(()));
        assert_eq!(o.verdict(&both), Some((Health::Healthy, String::new())));
        o.ttl = Some(Err("no heartbeat".into()));
        assert_eq!(o.verdict(&both).unwrap().0, Health::Unhealthy);
    }

    #[test]
    fn unhealthy_since_is_kept_while_unhealthy_and_cleared_when_healthy() {
        let i = Instance {
            health: Health::Healthy as i32,
            ..Default::default()
        };
        let sick = with_health(&i, Health::Unhealthy, "x".into(), 1_000);
        assert_eq!(sick.unhealthy_since_unix_ms, 1_000);
        assert_eq!(sick.health_reason, "x");
        let still = with_health(&sick, Health::Unhealthy, "y".into(), 5_000);
        assert_eq!(still.unhealthy_since_unix_ms, 1_000);
        let well = with_health(&still, Health::Healthy, String::new(), 9_000);
        assert_eq!(
            (well.unhealthy_since_unix_ms, well.health_reason.as_str()),
            (0, "")
        );
        let first = with_health(
            &Instance::default(),
            Health::Unhealthy,
            "first check failed".into(),
            7,
        );
        assert_eq!(first.unhealthy_since_unix_ms, 7, "from UNKNOWN");
    }
}
