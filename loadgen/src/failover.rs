//! The failover benchmark (`loadgen failover`): writers put through a router of
//! a `cellplane up` environment while the leader of one cell is killed (SIGKILL)
//! again and again; for each kill, how long until a write succeeds again, as a
//! client of the router sees it. Between kills the killed member is restarted
//! and the cell left to settle. Before the first kill, a quiet period under the
//! same load counts elections that no fault caused (spurious ones).
//!
//! The measure: from the instant of the kill to the first put that completes
//! successfully after it (writers put back to back, so a put completes soon
//! after writes are possible again). Leader changes are read from the members'
//! Raft terms.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_proto::etcdserverpb::{PutRequest, StatusRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::env::{UpEnvironment, UpProcess};
use crate::faults::Injector;
use crate::scenario::{Fault, FaultAction, Secs};

/// How long one kill may leave writes failing before the run gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Deadline of one put (a put stuck longer counts as failed).
const PUT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub data_dir: PathBuf,
    pub cell: String,
    /// A tenant the router sends to `cell`.
    pub tenant: String,
    pub kills: usize,
    pub writers: usize,
    /// Connections to the router the writers share (1: all on one).
    pub connections: usize,
    /// Load without faults before the kills, to count spurious elections.
    pub quiet: Duration,
    /// Time after a restarted member is ready before the next kill.
    pub settle: Duration,
}

/// One kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillResult {
    pub killed: String,
    /// Kill to the first successful put after it, in milliseconds.
    pub unavailable_ms: f64,
    /// Raft term increases over the kill and the restart (1 is one election).
    pub elections: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub cell: String,
    pub writers: usize,
    pub connections: usize,
    pub quiet_s: f64,
    /// Term increases during the quiet period (no fault: spurious).
    pub quiet_elections: u64,
    pub kills: Vec<KillResult>,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub puts_ok: u64,
    pub puts_failed: u64,
}

/// Put outcomes, and the first success after the kill being measured.
#[derive(Default)]
struct Completions {
    ok: u64,
    failed: u64,
    /// The kill being measured, as an offset from the start.
    armed: Option<Duration>,
    /// The first success after it.
    first_after: Option<Duration>,
}

fn router_endpoint(env: &UpEnvironment) -> Result<String, String> {
    env.processes
        .iter()
        .find(|p| p.is_router())
        .map(|p| format!("http://{}", p.client))
        .ok_or_else(|| "the environment has no router".to_string())
}

async fn writer(
    mut kv: KvClient<tonic::transport::Channel>,
    key: String,
    start: Instant,
    done: Arc<Mutex<Completions>>,
    stop: CancellationToken,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let put = PutRequest {
            key: key.clone().into_bytes(),
            value: n.to_string().into_bytes(),
            ..Default::default()
        };
        let sent = start.elapsed();
        let ok = matches!(
            tokio::time::timeout(PUT_TIMEOUT, kv.put(put)).await,
            Ok(Ok(_))
        );
        {
            let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
            if ok {
                d.ok += 1;
                let now = start.elapsed();
                // Sent after the kill: an answer already on its way when the
                // leader died says nothing about the new one.
                if d.armed.is_some_and(|k| sent > k) && d.first_after.is_none() {
                    d.first_after = Some(now);
                }
            } else {
                d.failed += 1;
            }
        }
        if !ok {
            // A failing cell answers at once: do not spin.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The member of `cell` that says it leads in the highest Raft term any member
/// reports, and that term.
async fn leader_and_term(env: &UpEnvironment, cell: &str) -> (Option<UpProcess>, u64) {
    let mut leader: Option<(u64, UpProcess)> = None;
    let mut term = 0;
    for m in env.members(cell) {
        let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{}", m.client))
            .map(|e| e.connect_timeout(Duration::from_millis(300)))
        else {
            continue;
        };
        let Ok(ch) = ch.connect().await else { continue };
        let s = tokio::time::timeout(
            Duration::from_millis(500),
            MaintenanceClient::new(ch).status(StatusRequest {}),
        )
        .await;
        if let Ok(Ok(s)) = s {
            let s = s.into_inner();
            term = term.max(s.raft_term);
            let own = s.header.as_ref().map_or(0, |h| h.member_id);
            let newer = leader.as_ref().is_none_or(|l| l.0 < s.raft_term);
            if own == s.leader && own == m.id && newer {
                leader = Some((s.raft_term, m.clone()));
            }
        }
    }
    let leader = leader.filter(|l| l.0 == term).map(|l| l.1);
    (leader, term)
}

/// The leader of `cell`, asked a few times (just after a restart the members
/// may not agree yet).
async fn current_leader(env: &UpEnvironment, cell: &str) -> Option<(UpProcess, u64)> {
    for _ in 0..20 {
        if let (Some(l), term) = leader_and_term(env, cell).await {
            return Some((l, term));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Runs the benchmark; `say` reports progress.
pub async fn run_failover(
    cfg: &FailoverConfig,
    say: impl Fn(&str),
) -> Result<FailoverReport, String> {
    let env = UpEnvironment::read(&cfg.data_dir).map_err(|e| e.to_string())?;
    let endpoint = tonic::transport::Endpoint::from_shared(router_endpoint(&env)?)
        .map_err(|e| e.to_string())?;
    let mut channels = Vec::new();
    for _ in 0..cfg.connections.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("cannot reach the router: {e}"))?,
        );
    }
    let start = Instant::now();
    let done = Arc::new(Mutex::new(Completions::default()));
    let stop = CancellationToken::new();
    let tasks: Vec<_> = (0..cfg.writers)
        .map(|w| {
            tokio::spawn(writer(
                KvClient::new(channels[w % channels.len()].clone()),
                format!("/{}/failover/{w}", cfg.tenant),
                start,
                done.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let result = measure(cfg, &env, start, &done, &say).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let mut report = result?;
    let d = done.lock().unwrap_or_else(|e| e.into_inner());
    report.puts_ok = d.ok;
    report.puts_failed = d.failed;
    Ok(report)
}

async fn measure(
    cfg: &FailoverConfig,
    env: &UpEnvironment,
    start: Instant,
    done: &Arc<Mutex<Completions>>,
    say: &impl Fn(&str),
) -> Result<FailoverReport, String> {
    let (_, term0) = leader_and_term(env, &cfg.cell).await;
    tokio::time::sleep(cfg.quiet).await;
    let (_, term1) = leader_and_term(env, &cfg.cell).await;
    let quiet_elections = term1.saturating_sub(term0);
    say(&format!(
        "quiet {:.0} s under load: {quiet_elections} election(s)",
        cfg.quiet.as_secs_f64()
    ));
    let injector = Injector::new(&cfg.data_dir);
    let mut kills = Vec::new();
    for k in 0..cfg.kills {
        let env = injector.env()?;
        let Some((leader, term_before)) = current_leader(&env, &cfg.cell).await else {
            return Err(format!(
                "cell {}: no leader before kill {}",
                cfg.cell,
                k + 1
            ));
        };
        let killed_at = start.elapsed();
        {
            let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
            d.armed = Some(killed_at);
            d.first_after = None;
        }
        if leader.pid == 0 {
            return Err(format!("{} has no pid in up.json", leader.label()));
        }
        kill(Pid::from_raw(leader.pid as i32), Signal::SIGKILL)
            .map_err(|e| format!("cannot kill {} (pid {}): {e}", leader.label(), leader.pid))?;
        let unavailable = wait_for_write(done, killed_at).await?;
        let restart = Fault {
            at: Secs(0.0),
            action: FaultAction::Restart,
            cell: Some(cfg.cell.clone()),
            member: Some(leader.id),
            router: None,
            tenant: None,
            to: None,
        };
        let ev = injector.apply(&restart, Instant::now()).await;
        if !ev.ok {
            return Err(format!("restarting {}: {}", leader.label(), ev.message));
        }
        tokio::time::sleep(cfg.settle).await;
        let (_, term_after) = leader_and_term(&injector.env()?, &cfg.cell).await;
        let r = KillResult {
            killed: leader.label(),
            unavailable_ms: round_ms(unavailable),
            elections: term_after.saturating_sub(term_before),
        };
        say(&format!(
            "kill {}/{}: {} (pid {}) -> writes again after {:.0} ms ({} election(s))",
            k + 1,
            cfg.kills,
            r.killed,
            leader.pid,
            r.unavailable_ms,
            r.elections
        ));
        kills.push(r);
    }
    let mut ms: Vec<f64> = kills.iter().map(|k| k.unavailable_ms).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(FailoverReport {
        cell: cfg.cell.clone(),
        writers: cfg.writers,
        connections: cfg.connections.max(1),
        quiet_s: cfg.quiet.as_secs_f64(),
        quiet_elections,
        median_ms: at(0.5),
        p90_ms: at(0.9),
        max_ms: ms.last().copied().unwrap_or(0.0),
        kills,
        puts_ok: 0,
        puts_failed: 0,
    })
}

/// Waits for the first successful put after `killed_at`; answers how long after.
async fn wait_for_write(
    done: &Arc<Mutex<Completions>>,
    killed_at: Duration,
) -> Result<Duration, String> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        {
            let d = done.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = d.first_after {
                return Ok(t - killed_at);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no write succeeded within {} s of the kill",
                RECOVERY_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Writes the report as JSON next to `dir`'s other reports.
pub fn write_json(report: &FailoverReport, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
