//! What the router believes of one member's health, from what its own calls see
//! (passive: latency, calls pending, failures in a row) and from its probes
//! (active: a data-path read and the member's applied index), compared with the
//! cell's other members. A member that looks unhealthy is **ejected**: no call
//! is sent to it while another member can take it, and the calls in flight to it
//! end at once (UNAVAILABLE; reads are retried on another member). It rejoins
//! only after several probes in a row succeed and its ejection time (growing
//! with each repeat, jittered) has passed.
//!
//! Why not only probes: a frozen process still completes TCP handshakes, and a
//! slow disk may leave `Maintenance.Status` fast while reads crawl (Huang et al.,
//! "Gray failure", HotOS'17; Panorama, OSDI'18: the callers' own observations
//! see what health checks miss). Why a cap: Envoy's outlier detection switches
//! itself off below 5 hosts; a 3-member cell needs it most, so here at most a
//! minority is ejected for being slow or behind, and never the last member.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How fast the latency average forgets (Finagle's peak EWMA decays over 10 s;
/// shorter here so a member that recovered is preferred again soon).
const DECAY: Duration = Duration::from_secs(2);
/// A failed call counts as at least this slow, so a member that fails fast
/// never looks fast.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Failures in a row (calls or probes) that eject a member.
const FAILURES_TO_EJECT: u32 = 3;
/// Calls pending and none answered for this long, and either its latest probe
/// unanswered too or the cell gone on without it (another member's applied
/// index past its own, unchanged this long): the member is stalled. The second
/// half tells a member that does not answer at all (frozen) or that the cell
/// left behind (a leader cut off from its followers, which elected another)
/// from one whose calls wait on something slow that the whole cell waits on too
/// (fsyncs of a second while the machine writes back): the latter's calls
/// complete, and ending them would turn slow writes into errors of unknown
/// outcome.
const STALL: Duration = Duration::from_millis(800);
/// Applied index unchanged this long while another member's passed it.
const LAG_STALL: Duration = Duration::from_secs(2);
/// A member this many times slower than the cell's median, and slower than
/// [`OUTLIER_FLOOR`], is an outlier.
const OUTLIER_FACTOR: f64 = 5.0;
const OUTLIER_FLOOR: Duration = Duration::from_millis(100);
/// Successful probes in a row before an ejected member serves again.
const PROBES_TO_REJOIN: u32 = 3;
/// The first ejection lasts this long at least; each repeat doubles it, up to
/// [`EJECT_MAX`]. Serving this long without an ejection forgets the repeats.
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Why a member is ejected: by what callers saw (failures, a stall) or by
/// comparison with its cell (slow, behind). Only the comparisons are capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Failing,
    Stalled,
    Outlier,
    Lagging,
}

impl Cause {
    fn capped(self) -> bool {
        matches!(self, Cause::Outlier | Cause::Lagging)
    }

    /// Whether calls in flight to the member are ended too: only when they
    /// would not complete (a slow or lagging member still answers, and ending a
    /// write there would turn a slow success into an error of unknown outcome).
    fn interrupts(self) -> bool {
        matches!(self, Cause::Failing | Cause::Stalled)
    }
}

/// Weight of a new probe in the probe latency average (plain EWMA: one slow
/// probe is no outlier, a few in a row are).
const PROBE_WEIGHT: f64 = 0.3;

#[derive(Debug, Clone)]
struct Ejection {
    cause: Cause,
    reason: String,
    until: Instant,
    probes_ok: u32,
}

#[derive(Debug)]
struct State {
    /// Peak EWMA of call latency, microseconds; 0 until the first call. Ranks
    /// members for reads; not compared across members (the leader takes the
    /// writes, which are slower by nature).
    ewma_us: f64,
    updated: Instant,
    /// EWMA of the probes' latency: the same read on every member, so members
    /// are compared by it.
    probe_ewma_us: f64,
    /// When calls last went from none pending to some.
    busy_since: Instant,
    failures_in_a_row: u32,
    last_error: String,
    /// The last time a call to it completed (any answer of its own).
    last_answer: Instant,
    /// Whether its latest probe got no answer.
    probe_unanswered: bool,
    ejected: Option<Ejection>,
    /// Ejections since it last served for [`FORGET_AFTER`].
    repeats: u32,
    serving_since: Instant,
    applied_index: u64,
    applied_changed: Instant,
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthView {
    pub ewma_ms: f64,
    pub probe_ms: f64,
    pub pending: u64,
    pub failures_in_a_row: u32,
    pub ejected: bool,
    pub reason: String,
    pub applied_index: u64,
    pub ejections_total: u64,
}

/// One member's health.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    pending: AtomicU64,
    ejections_total: AtomicU64,
    /// Bumped at every ejection: calls in flight to the member watch it.
    ejected_tx: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        let now = Instant::now();
        Health {
            state: Mutex::new(State {
                ewma_us: 0.0,
                updated: now,
                probe_ewma_us: 0.0,
                busy_since: now,
                failures_in_a_row: 0,
                last_error: String::new(),
                last_answer: now,
                probe_unanswered: false,
                ejected: None,
                repeats: 0,
                serving_since: now,
                applied_index: 0,
                applied_changed: now,
            }),
            pending: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            ejected_tx: watch::channel(0).0,
        }
    }
}

/// Marks one call in flight until dropped.
pub struct Pending<'a>(&'a Health);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_ejected(&self) -> bool {
        self.lock().ejected.is_some()
    }

    /// Ejected for not answering at all (failing, stalled): even calls only it
    /// can serve well (the leader's) go elsewhere.
    pub fn is_down(&self) -> bool {
        self.lock()
            .ejected
            .as_ref()
            .is_some_and(|e| e.cause.interrupts())
    }

    /// Load-aware cost of sending the next call here (lower is better).
    pub fn score(&self) -> f64 {
        let ewma = self.lock().ewma_us.max(1.0);
        ewma * (self.pending.load(Ordering::Relaxed) + 1) as f64
    }

    /// A call starts; the guard ends it.
    pub fn start(&self) -> Pending<'_> {
        if self.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            self.lock().busy_since = Instant::now();
        }
        Pending(self)
    }

    /// Fires when the member is ejected after this was called.
    pub fn ejections(&self) -> watch::Receiver<u64> {
        self.ejected_tx.subscribe()
    }

    /// A call answered by the member (success, or an error of its own).
    pub fn answered(&self, elapsed: Duration) {
        let mut s = self.lock();
        let (ewma, at) = observe(s.ewma_us, s.updated, elapsed);
        (s.ewma_us, s.updated) = (ewma, at);
        s.failures_in_a_row = 0;
        s.last_answer = Instant::now();
    }

    /// A call that got no answer of the member's own (transport error, timeout).
    /// Answers whether the member was ejected for it.
    pub fn failed(&self, elapsed: Duration, error: &str, cap: &Cap) -> bool {
        let mut s = self.lock();
        let (ewma, at) = observe(s.ewma_us, s.updated, elapsed.max(FAILURE_PENALTY));
        (s.ewma_us, s.updated) = (ewma, at);
        s.failures_in_a_row += 1;
        s.last_error = error.to_string();
        if s.failures_in_a_row >= FAILURES_TO_EJECT {
            let reason = format!("{} failures in a row (last: {error})", s.failures_in_a_row);
            return self.eject(&mut s, Cause::Failing, reason, cap);
        }
        false
    }

    /// A probe's outcome: `Some(applied index)` if the member answered its
    /// status and a data-path read in time (`elapsed`). Counts towards
    /// rejoining.
    pub fn probed(&self, applied: Option<u64>, elapsed: Duration, error: &str, cap: &Cap) {
        let mut s = self.lock();
        let now = Instant::now();
        let sample = elapsed.as_micros() as f64;
        s.probe_ewma_us = if s.probe_ewma_us == 0.0 {
            sample
        } else {
            s.probe_ewma_us * (1.0 - PROBE_WEIGHT) + sample * PROBE_WEIGHT
        };
        s.probe_unanswered = applied.is_none();
        match applied {
            Some(index) => {
                if index != s.applied_index {
                    s.applied_index = index;
                    s.applied_changed = now;
                }
                if let Some(e) = &mut s.ejected {
                    e.probes_ok += 1;
                }
            }
            None => {
                if let Some(e) = &mut s.ejected {
                    e.probes_ok = 0;
                }
                s.failures_in_a_row += 1;
                s.last_error = format!("probe: {error}");
                if s.failures_in_a_row >= FAILURES_TO_EJECT {
                    let reason = format!(
                        "{} failures in a row (last: probe: {error})",
                        s.failures_in_a_row
                    );
                    self.eject(&mut s, Cause::Failing, reason, cap);
                }
            }
        }
    }

    /// Ejects the member for `cause`; one already ejected for being slow or
    /// behind is ejected again as not answering (its calls in flight end).
    /// Answers whether anything changed.
    fn eject(&self, s: &mut State, cause: Cause, reason: String, cap: &Cap) -> bool {
        if let Some(e) = &mut s.ejected {
            if e.cause.interrupts() || !cause.interrupts() {
                return false;
            }
            tracing::warn!(%reason, "ejected member does not answer either");
            (e.cause, e.reason) = (cause, reason);
            self.ejected_tx.send_modify(|n| *n += 1);
            return true;
        }
        if !cap.allows(cause) {
            return false;
        }
        let now = Instant::now();
        if now.duration_since(s.serving_since) > FORGET_AFTER {
            s.repeats = 0;
        }
        let base = EJECT_BASE
            .saturating_mul(1 << s.repeats.min(5))
            .min(EJECT_MAX);
        // ±20 % so that members ejected together do not come back together.
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        s.repeats += 1;
        tracing::warn!(%reason, "member ejected");
        s.ejected = Some(Ejection {
            cause,
            reason,
            until: now + base.mul_f64(jitter),
            probes_ok: 0,
        });
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        if cause.interrupts() {
            self.ejected_tx.send_modify(|n| *n += 1);
        }
        true
    }

    /// Takes an ejected member back once its time is served and enough probes
    /// in a row succeeded; answers whether it did.
    fn maybe_rejoin(&self, s: &mut State, now: Instant) -> bool {
        let back = s
            .ejected
            .as_ref()
            .is_some_and(|e| now >= e.until && e.probes_ok >= PROBES_TO_REJOIN);
        if back {
            s.ejected = None;
            s.failures_in_a_row = 0;
            s.serving_since = now;
            s.last_answer = now;
            // Its old averages would eject it again at once.
            s.ewma_us = 0.0;
            s.probe_ewma_us = 0.0;
            tracing::info!("member rejoined");
        }
        back
    }

    pub fn view(&self) -> HealthView {
        let s = self.lock();
        HealthView {
            ewma_ms: s.ewma_us / 1000.0,
            probe_ms: s.probe_ewma_us / 1000.0,
            pending: self.pending.load(Ordering::Relaxed),
            failures_in_a_row: s.failures_in_a_row,
            ejected: s.ejected.is_some(),
            reason: s
                .ejected
                .as_ref()
                .map(|e| e.reason.clone())
                .unwrap_or_default(),
            applied_index: s.applied_index,
            ejections_total: self.ejections_total.load(Ordering::Relaxed),
        }
    }
}

/// A peak EWMA (`ewma` last updated `at`) after one more observation: a slow
/// answer counts at once, recovery is gradual.
fn observe(ewma: f64, at: Instant, elapsed: Duration) -> (f64, Instant) {
    let now = Instant::now();
    let rtt = elapsed.as_micros() as f64;
    if ewma == 0.0 || rtt > ewma {
        return (rtt, now);
    }
    let w = (-now.duration_since(at).as_secs_f64() / DECAY.as_secs_f64()).exp();
    (ewma * w + rtt * (1.0 - w), now)
}

/// How many of a cell's members may be ejected now, by cause.
#[derive(Debug, Clone, Copy)]
pub struct Cap {
    members: usize,
    ejected: usize,
    /// Of those, for a capped cause.
    capped: usize,
}

impl Cap {
    pub fn of(members: &[&Health]) -> Cap {
        let mut cap = Cap {
            members: members.len(),
            ejected: 0,
            capped: 0,
        };
        for h in members {
            if let Some(e) = &h.lock().ejected {
                cap.ejected += 1;
                cap.capped += usize::from(e.cause.capped());
            }
        }
        cap
    }

    /// Never the last member; for being slow or behind, at most a minority.
    fn allows(&self, cause: Cause) -> bool {
        if self.ejected + 1 >= self.members {
            return false;
        }
        !cause.capped() || self.capped < self.members.saturating_sub(1) / 2
    }
}

/// Compares the cell's members and ejects or takes back; run often (every
/// 100 ms or so).
pub fn evaluate(members: &[&Health]) {
    let now = Instant::now();
    for h in members {
        let mut s = h.lock();
        h.maybe_rejoin(&mut s, now);
    }
    let seen: Vec<(bool, f64, u64)> = members
        .iter()
        .map(|h| {
            let s = h.lock();
            (s.ejected.is_some(), s.probe_ewma_us, s.applied_index)
        })
        .collect();
    let top_index = seen.iter().map(|v| v.2).max().unwrap_or(0);
    for (i, h) in members.iter().enumerate() {
        let cap = Cap::of(members);
        let mut s = h.lock();
        if s.ejected.as_ref().is_some_and(|e| e.cause.interrupts()) {
            continue;
        }
        let pending = h.pending.load(Ordering::Relaxed);
        let silent = now.duration_since(s.last_answer.max(s.busy_since));
        let left_behind =
            s.applied_index < top_index && now.duration_since(s.applied_changed) > STALL;
        if pending > 0 && silent > STALL && (s.probe_unanswered || left_behind) {
            let why = if s.probe_unanswered {
                format!("nor its latest probe (last error: {})", s.last_error)
            } else {
                format!(
                    "and its applied index stays at {} while another member reached {top_index}",
                    s.applied_index
                )
            };
            let reason = format!(
                "stalled: {pending} call(s) pending, none answered for {} ms, {why}",
                silent.as_millis()
            );
            h.eject(&mut s, Cause::Stalled, reason, &cap);
            continue;
        }
        let stuck = now.duration_since(s.applied_changed);
        if s.applied_index < top_index && stuck > LAG_STALL {
            let reason = format!(
                "lagging: applied index stuck at {} for {} ms while another member reached \
                 {top_index}",
                s.applied_index,
                stuck.as_millis()
            );
            h.eject(&mut s, Cause::Lagging, reason, &cap);
            continue;
        }
        // Probe latency against the other serving members' (two at least).
        let mut others: Vec<f64> = seen
            .iter()
            .enumerate()
            .filter(|(j, (ejected, ewma, _))| *j != i && !ejected && *ewma > 0.0)
            .map(|(_, (_, ewma, _))| *ewma)
            .collect();
        if others.len() < 2 {
            continue;
        }
        others.sort_by(f64::total_cmp);
        let median = others[(others.len() - 1) / 2];
        let floor = OUTLIER_FLOOR.as_micros() as f64;
        if s.probe_ewma_us > floor && s.probe_ewma_us > median * OUTLIER_FACTOR {
            let reason = format!(
                "slow: probes take {:.1} ms against the cell's median {:.1} ms",
                s.probe_ewma_us / 1000.0,
                median / 1000.0
            );
            h.eject(&mut s, Cause::Outlier, reason, &cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(n: usize) -> Vec<Health> {
        (0..n).map(|_| Health::default()).collect()
    }

    fn refs(c: &[Health]) -> Vec<&Health> {
        c.iter().collect()
    }

    #[test]
    fn failures_in_a_row_eject_but_never_the_last_member() {
        let c = cell(3);
        let r = refs(&c);
        for h in &c {
            for _ in 0..FAILURES_TO_EJECT {
                h.failed(Duration::from_millis(1), "refused", &Cap::of(&r));
            }
        }
        let ejected = c.iter().filter(|h| h.is_ejected()).count();
        assert_eq!(ejected, 2, "the last member stays");
        let v = c[0].view();
        assert!(v.reason.contains("3 failures in a row") && v.reason.contains("refused"));
        // A fast failure does not look fast.
        assert!(v.ewma_ms >= FAILURE_PENALTY.as_millis() as f64);
    }

    #[test]
    fn a_stalled_member_is_ejected_and_its_calls_are_told() {
        let c = cell(3);
        let r = refs(&c);
        let told = c[1].ejections();
        // A call just started on a member idle for long is not a stall.
        c[1].lock().last_answer = Instant::now() - STALL * 10;
        let _call = c[1].start();
        evaluate(&r);
        assert!(!c[1].is_ejected());
        c[1].lock().busy_since = Instant::now() - STALL - Duration::from_millis(1);
        // Calls silent but the probe answered: slow (a disk), not stalled.
        c[1].probed(Some(1), Duration::from_millis(2), "", &Cap::of(&r));
        evaluate(&r);
        assert!(!c[1].is_ejected(), "{:?}", c[1].view());
        assert!(!told.has_changed().unwrap());
        // The cell moving on without it (a cut-off leader) is a stall too.
        c[0].probed(Some(2), Duration::from_millis(2), "", &Cap::of(&r));
        c[1].lock().applied_changed = Instant::now() - STALL - Duration::from_millis(1);
        evaluate(&r);
        assert!(c[1].view().reason.contains("applied index stays at 1"));
        let c = cell(3);
        let r = refs(&c);
        let told = c[1].ejections();
        // Or one that answers nothing, probes included (frozen).
        c[1].lock().last_answer = Instant::now() - STALL * 10;
        let _call = c[1].start();
        c[1].lock().busy_since = Instant::now() - STALL - Duration::from_millis(1);
        c[1].probed(None, Duration::from_millis(400), "no answer", &Cap::of(&r));
        evaluate(&r);
        assert!(c[1].is_ejected());
        let reason = c[1].view().reason;
        assert!(reason.starts_with("stalled: 1 call(s) pending"), "{reason}");
        assert!(reason.contains("nor its latest probe"), "{reason}");
        assert!(told.has_changed().unwrap());
        assert!(!c[0].is_ejected() && !c[2].is_ejected());
    }

    #[test]
    fn one_slow_or_lagging_member_of_three_at_most() {
        let c = cell(3);
        let r = refs(&c);
        let cap = Cap::of(&r);
        c[0].probed(Some(1), Duration::from_millis(2), "", &cap);
        c[1].probed(Some(1), Duration::from_millis(2), "", &cap);
        c[2].probed(Some(1), Duration::from_millis(2), "", &cap);
        // One slow probe is no outlier; several in a row are.
        c[2].probed(Some(1), Duration::from_millis(300), "", &cap);
        evaluate(&r);
        assert!(!c[2].is_ejected(), "{:?}", c[2].view());
        let told = c[2].ejections();
        for _ in 0..3 {
            c[2].probed(Some(1), Duration::from_millis(300), "", &cap);
        }
        // Slow calls alone (the leader's writes) are no outlier.
        c[0].answered(Duration::from_millis(900));
        evaluate(&r);
        assert!(!c[0].is_ejected());
        assert!(c[2].is_ejected(), "{:?}", c[2].view());
        assert!(c[2].view().reason.starts_with("slow:"));
        // A slow member's calls still complete: they are not ended.
        assert!(!told.has_changed().unwrap() && !c[2].is_down());
        // Another one falls behind: not ejected, the cap is reached.
        c[1].lock().applied_index = 5;
        c[1].lock().applied_changed = Instant::now() - LAG_STALL * 2;
        c[0].lock().applied_index = 50;
        evaluate(&r);
        assert!(!c[1].is_ejected());
        // Once the slow one stops answering altogether, its calls are ended.
        let _call = c[2].start();
        c[2].lock().busy_since = Instant::now() - STALL * 2;
        c[2].lock().last_answer = Instant::now() - STALL * 2;
        c[2].lock().probe_unanswered = true;
        evaluate(&r);
        assert!(told.has_changed().unwrap() && c[2].is_down());
        assert!(c[2].view().reason.starts_with("stalled"));
        // In five members two may go.
        let c = cell(5);
        let r = refs(&c);
        for (i, h) in c.iter().enumerate() {
            h.lock().applied_index = 100;
            h.lock().applied_changed = Instant::now();
            if i >= 3 {
                h.lock().applied_index = 1;
                h.lock().applied_changed = Instant::now() - LAG_STALL * 2;
            }
        }
        evaluate(&r);
        assert_eq!(c.iter().filter(|h| h.is_ejected()).count(), 2);
        assert!(
            c[3].view()
                .reason
                .starts_with("lagging: applied index stuck at 1")
        );
    }

    #[test]
    fn an_ejected_member_rejoins_after_probes_in_a_row_and_its_time() {
        let c = cell(3);
        let r = refs(&c);
        for _ in 0..FAILURES_TO_EJECT {
            c[0].failed(Duration::from_millis(1), "refused", &Cap::of(&r));
        }
        assert!(c[0].is_ejected());
        for _ in 0..PROBES_TO_REJOIN - 1 {
            c[0].probed(Some(1), Duration::ZERO, "", &Cap::of(&r));
        }
        c[0].probed(None, Duration::ZERO, "timeout", &Cap::of(&r));
        for _ in 0..PROBES_TO_REJOIN {
            c[0].probed(Some(2), Duration::ZERO, "", &Cap::of(&r));
        }
        evaluate(&r);
        assert!(c[0].is_ejected(), "its time is not served yet");
        c[0].lock().ejected.as_mut().unwrap().until = Instant::now();
        evaluate(&r);
        assert!(!c[0].is_ejected());
        assert_eq!(c[0].view().ejections_total, 1);
    }
}
