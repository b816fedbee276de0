//! The fault schedule: at given times, kill (SIGKILL), pause (SIGSTOP), resume
//! (SIGCONT) or restart a member, a whole cell or a router of an environment
//! started by `cellplane up`, found through its `up.json`; or move a tenant to
//! another cell (`cellplane tenant move`, whose fence window the event reports).
//!
//! A restart asks `up` to start the stopped process again by creating
//! `<data-dir>/restart/<member-CELL-ID|router-ID>` (`up` watches for it and starts
//! the process with its own command line, so it stays under `up`'s supervision
//! and stops with it). When `up` does not pick the request up (an older `up`), the
//! process is started from the command line recorded in `up.json`, detached: it
//! then outlives `up`, which the event's message says.
//!
//! Processes still paused when the run ends are resumed, so a run never leaves a
//! frozen environment behind; killed ones stay dead unless the schedule restarts
//! them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::env::{UpEnvironment, UpProcess};
use crate::report::round_to;
use crate::scenario::{Fault, FaultAction};

/// How long a restart waits for `up` to notice the kill, to start the process,
/// and for the process to report ready.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One fault as applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// When the schedule said, seconds from the start of measurement.
    pub planned_s: f64,
    /// When it was applied.
    pub at_s: f64,
    /// When it was complete (a restart: when the restarted processes were ready).
    pub done_s: f64,
    pub action: FaultAction,
    /// `cell beta`, `member beta/2`, `router 1`.
    pub target: String,
    pub cell: Option<String>,
    /// The processes acted on (`beta/1`, `router/1`).
    pub processes: Vec<String>,
    pub pids: Vec<u32>,
    pub ok: bool,
    pub message: String,
}

impl FaultEvent {
    pub fn describe(&self) -> String {
        format!(
            "t={:.1}s {} {}{}: {}",
            self.at_s,
            self.action.name(),
            self.target,
            if self.pids.is_empty() {
                String::new()
            } else {
                format!(
                    " (pid {})",
                    self.pids
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            self.message
        )
    }
}

/// A span of the run during which a fault was in force: from a kill or pause to
/// the resume or restart that undid it (or the end of the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// `kill cell beta`.
    pub label: String,
    pub cell: Option<String>,
    pub processes: Vec<String>,
    pub start_s: f64,
    pub end_s: f64,
    /// Undone before the end of the run.
    pub healed: bool,
}

/// The windows the events describe (see [`FaultWindow`]); `run_end_s` closes the
/// ones never undone. Failed events open and close nothing.
pub fn windows(events: &[FaultEvent], run_end_s: f64) -> Vec<FaultWindow> {
    let mut done: Vec<FaultWindow> = Vec::new();
    let mut open: Vec<FaultWindow> = Vec::new();
    for e in events.iter().filter(|e| e.ok) {
        let procs: BTreeSet<&String> = e.processes.iter().collect();
        match e.action {
            FaultAction::Kill | FaultAction::Pause => {
                let already = open.iter().any(|w| {
                    w.processes.iter().all(|p| procs.contains(p))
                        && w.processes.len() == procs.len()
                });
                if !already {
                    open.push(FaultWindow {
                        label: format!("{} {}", e.action.name(), e.target),
                        cell: e.cell.clone(),
                        processes: e.processes.clone(),
                        start_s: e.at_s,
                        end_s: run_end_s,
                        healed: false,
                    });
                }
            }
            FaultAction::Move => done.push(FaultWindow {
                label: format!("move {}", e.target),
                cell: e.cell.clone(),
                processes: Vec::new(),
                start_s: e.at_s,
                end_s: e.done_s,
                healed: true,
            }),
            FaultAction::Resume | FaultAction::Restart => {
                let (closing, staying): (Vec<FaultWindow>, Vec<FaultWindow>) = open
                    .into_iter()
                    .partition(|w| w.processes.iter().any(|p| procs.contains(p)));
                open = staying;
                let end = if e.action == FaultAction::Restart {
                    e.done_s
                } else {
                    e.at_s
                };
                if closing.is_empty() && e.action == FaultAction::Restart {
                    done.push(FaultWindow {
                        label: format!("restart {}", e.target),
                        cell: e.cell.clone(),
                        processes: e.processes.clone(),
                        start_s: e.at_s,
                        end_s: end,
                        healed: true,
                    });
                }
                for mut w in closing {
                    w.end_s = end;
                    w.healed = true;
                    done.push(w);
                }
            }
        }
    }
    done.extend(open);
    done.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    done
}

/// Applies faults to a `cellplane up` environment.
pub struct Injector {
    data_dir: PathBuf,
    paused: Mutex<BTreeSet<u32>>,
}

fn alive(pid: u32) -> bool {
    // A zombie has exited already: look at its state, not just its existence.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: Signal) -> Result<(), String> {
    kill(Pid::from_raw(pid as i32), sig).map_err(|e| format!("pid {pid}: {e}"))
}

/// GET /readyz on `addr` (host:port); true on a 200.
async fn ready(addr: &str) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

impl Injector {
    pub fn new(data_dir: &Path) -> Injector {
        Injector {
            data_dir: data_dir.to_path_buf(),
            paused: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn env(&self) -> Result<UpEnvironment, String> {
        UpEnvironment::read(&self.data_dir).map_err(|e| e.to_string())
    }

    /// Checks that every fault names something the environment has; the error
    /// names the fault's field.
    pub fn check(&self, faults: &[Fault]) -> Result<(), String> {
        let env = self.env()?;
        for (i, f) in faults.iter().enumerate() {
            if f.action == FaultAction::Move {
                let to = f.to.as_deref().unwrap_or_default();
                if !env.cells().iter().any(|c| c == to) {
                    return Err(format!(
                        "faults[{i}].to: the environment in {} has no cell {to} (cells: {})",
                        self.data_dir.display(),
                        env.cells().join(", ")
                    ));
                }
                continue;
            }
            if targets(&env, f).is_empty() {
                let (field, what) = match (&f.cell, f.member, f.router) {
                    (Some(c), Some(m), _) => ("member", format!("member {m} of cell {c}")),
                    (Some(c), None, _) => ("cell", format!("cell {c}")),
                    (_, _, Some(r)) => ("router", format!("router {r}")),
                    _ => ("cell", "nothing".into()),
                };
                return Err(format!(
                    "faults[{i}].{field}: the environment in {} has no {what} (cells: {}; routers: {})",
                    self.data_dir.display(),
                    env.cells().join(", "),
                    env.routers()
                        .iter()
                        .map(|r| r.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Applies one fault; never fails, the event says what happened.
    pub async fn apply(&self, f: &Fault, clock: Instant) -> FaultEvent {
        let at_s = round_to(clock.elapsed().as_secs_f64(), 3);
        let mut ev = FaultEvent {
            planned_s: f.at.0,
            at_s,
            done_s: at_s,
            action: f.action,
            target: f.target_label(),
            cell: f.cell.clone(),
            processes: Vec::new(),
            pids: Vec::new(),
            ok: false,
            message: String::new(),
        };
        let env = match self.env() {
            Ok(e) => e,
            Err(e) => {
                ev.message = e;
                return ev;
            }
        };
        let procs: Vec<UpProcess> = targets(&env, f).into_iter().cloned().collect();
        ev.processes = procs.iter().map(UpProcess::label).collect();
        let result = match f.action {
            FaultAction::Kill => self.signal_all(&procs, Signal::SIGKILL, &mut ev),
            FaultAction::Pause => self.signal_all(&procs, Signal::SIGSTOP, &mut ev),
            FaultAction::Resume => self.signal_all(&procs, Signal::SIGCONT, &mut ev),
            FaultAction::Restart => self.restart(&procs, &mut ev).await,
            FaultAction::Move => move_tenant(&env, f, &mut ev).await,
        };
        match result {
            Ok(msg) => {
                ev.ok = true;
                ev.message = msg;
            }
            Err(msg) => ev.message = msg,
        }
        ev.done_s = round_to(clock.elapsed().as_secs_f64(), 3);
        ev
    }

    fn signal_all(
        &self,
        procs: &[UpProcess],
        sig: Signal,
        ev: &mut FaultEvent,
    ) -> Result<String, String> {
        let mut errors = Vec::new();
        for p in procs {
            if p.pid == 0 || !alive(p.pid) {
                errors.push(format!("{} is not running", p.label()));
                continue;
            }
            match signal(p.pid, sig) {
                Ok(()) => {
                    ev.pids.push(p.pid);
                    let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
                    match sig {
                        Signal::SIGSTOP => {
                            paused.insert(p.pid);
                        }
                        _ => {
                            paused.remove(&p.pid);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if ev.pids.is_empty() {
            return Err(format!("nothing signalled: {}", errors.join("; ")));
        }
        let mut msg = format!("{sig} sent to {}", ev.processes.join(", "));
        if !errors.is_empty() {
            msg.push_str(&format!(" ({})", errors.join("; ")));
        }
        Ok(msg)
    }

    async fn restart(&self, procs: &[UpProcess], ev: &mut FaultEvent) -> Result<String, String> {
        // Kill whatever still runs (resumed first: a stopped process dies on SIGKILL
        // too, but `up` must see it exit).
        for p in procs.iter().filter(|p| p.pid != 0 && alive(p.pid)) {
            let _ = signal(p.pid, Signal::SIGCONT);
            signal(p.pid, Signal::SIGKILL)?;
            self.paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p.pid);
        }
        // Wait for `up` to notice (pid 0, or a new pid if it restarts by itself).
        let deadline = Instant::now() + NOTICE_TIMEOUT;
        let mut env = self.env()?;
        while Instant::now() < deadline
            && procs.iter().any(|p| {
                env.find(&p.label())
                    .is_some_and(|now| now.pid != 0 && now.pid == p.pid && p.pid != 0)
            })
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            env = self.env()?;
        }
        // Ask `up` to start the ones that are down.
        let mut asked = Vec::new();
        for p in procs {
            let now = env.find(&p.label()).cloned().unwrap_or_else(|| p.clone());
            if now.pid != 0 && now.pid != p.pid && alive(now.pid) {
                continue; // `up --restart` did it already
            }
            let req = now.restart_request(&self.data_dir);
            if let Some(dir) = req.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            std::fs::write(&req, b"")
                .map_err(|e| format!("cannot write {}: {e}", req.display()))?;
            asked.push((now, req));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let mut notes = Vec::new();
        loop {
            env = self.env()?;
            let waiting = asked
                .iter()
                .filter(|(p, _)| env.find(&p.label()).is_none_or(|n| n.pid == 0))
                .count();
            if waiting == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (p, req) in &asked {
            if env.find(&p.label()).is_none_or(|n| n.pid == 0) {
                let _ = std::fs::remove_file(req);
                let pid = spawn_detached(p)?;
                notes.push(format!(
                    "{}: `up` did not take the restart request; started it from up.json's command line as pid {pid}, outside `up`'s supervision",
                    p.label()
                ));
                ev.pids.push(pid);
            }
        }
        for p in procs {
            if let Some(n) = env.find(&p.label())
                && n.pid != 0
            {
                ev.pids.push(n.pid);
            }
        }
        // Ready again (all at once: a cell's members need each other for a quorum).
        let deadline = Instant::now() + READY_TIMEOUT;
        for p in procs {
            while !ready(&p.http).await {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{} started but not ready in {}s",
                        p.label(),
                        READY_TIMEOUT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let mut msg = format!("{} restarted and ready", ev.processes.join(", "));
        for n in notes {
            msg.push_str("; ");
            msg.push_str(&n);
        }
        Ok(msg)
    }

    /// SIGCONT to every process this injector paused and nobody resumed.
    pub fn resume_paused(&self) -> Vec<u32> {
        let pids: Vec<u32> =
            std::mem::take(&mut *self.paused.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        for pid in &pids {
            let _ = signal(*pid, Signal::SIGCONT);
        }
        pids
    }
}

/// The processes a fault acts on.
pub fn targets<'a>(env: &'a UpEnvironment, f: &Fault) -> Vec<&'a UpProcess> {
    match (&f.cell, f.member, f.router) {
        (Some(c), Some(m), _) => env.members(c).into_iter().filter(|p| p.id == m).collect(),
        (Some(c), None, _) => env.members(c),
        (None, _, Some(r)) => env.routers().into_iter().filter(|p| p.id == r).collect(),
        _ => Vec::new(),
    }
}

/// How long a move may take before the event says it failed (the mover goes on
/// in the background: its record in the directory says where it is).
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `cellplane tenant move` (the binary `up` runs) against the
/// environment's directory; the event names the source cell and carries the
/// mover's summary, with the fence window.
async fn move_tenant(
    env: &UpEnvironment,
    f: &Fault,
    ev: &mut FaultEvent,
) -> Result<String, String> {
    let (Some(tenant), Some(to)) = (&f.tenant, &f.to) else {
        return Err("a move needs its tenant and cell".into());
    };
    let directory = env.members(&env.directory);
    let exe = directory
        .first()
        .and_then(|p| p.argv.first())
        .ok_or("up.json records no command line for the directory's members")?;
    let endpoints: Vec<&str> = directory.iter().map(|p| p.client.as_str()).collect();
    let run = tokio::process::Command::new(exe)
        .args([
            "tenant",
            "move",
            tenant,
            "--to",
            to,
            "--grace",
            "2s",
            "--directory",
        ])
        .arg(endpoints.join(","))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(MOVE_TIMEOUT, run)
        .await
        .map_err(|_| format!("the move did not finish within {MOVE_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {exe}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("moved tenant"))
        .unwrap_or_default()
        .to_string();
    // "moved tenant a from alpha to beta: …"
    ev.cell = summary
        .split_whitespace()
        .skip_while(|w| *w != "from")
        .nth(1)
        .map(str::to_string);
    if out.status.success() {
        Ok(summary)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("the move failed: {}", stderr.trim()))
    }
}

/// Starts `p` from its recorded command line, without `--parent-pid` (its parent
/// would not be `up`), appending to its log.
fn spawn_detached(p: &UpProcess) -> Result<u32, String> {
    let Some((exe, args)) = p.argv.split_first() else {
        return Err(format!(
            "{}: `up` did not restart it and up.json records no command line",
            p.label()
        ));
    };
    let mut kept = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--parent-pid" {
            skip = true;
            continue;
        }
        kept.push(a.clone());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .map_err(|e| format!("cannot open {}: {e}", p.log.display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", p.log.display()))?;
    let child = tokio::process::Command::new(exe)
        .args(&kept)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {exe}: {e}"))?;
    // Dropped without kill_on_drop: it runs on, and tokio reaps it when it exits.
    Ok(child.id().unwrap_or(0))
}

/// Applies `faults` at their times (from `clock`, the start of measurement) until
/// `stop`; hands each event to `notify` as it happens and returns them all.
pub async fn run_schedule(
    injector: &Injector,
    faults: &[Fault],
    clock: Instant,
    stop: CancellationToken,
    mut notify: impl FnMut(&FaultEvent),
) -> Vec<FaultEvent> {
    let mut order: Vec<&Fault> = faults.iter().collect();
    order.sort_by(|a, b| a.at.0.total_cmp(&b.at.0));
    let mut events = Vec::new();
    for f in order {
        tokio::select! {
            _ = tokio::time::sleep_until(clock + f.at.duration()) => {}
            _ = stop.cancelled() => break,
        }
        let ev = injector.apply(f, clock).await;
        notify(&ev);
        events.push(ev);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: f64, done: f64, action: FaultAction, procs: &[&str]) -> FaultEvent {
        FaultEvent {
            planned_s: at,
            at_s: at,
            done_s: done,
            action,
            target: format!("cell {}", procs[0].split('/').next().unwrap()),
            cell: Some(procs[0].split('/').next().unwrap().into()),
            processes: procs.iter().map(|s| s.to_string()).collect(),
            pids: vec![1],
            ok: true,
            message: String::new(),
        }
    }

    #[test]
    fn a_move_is_a_window_from_its_start_to_its_end() {
        let mut e = ev(3.0, 3.4, FaultAction::Move, &["alpha"]);
        e.processes.clear();
        let w = windows(&[e], 10.0);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].start_s, w[0].end_s, w[0].healed), (3.0, 3.4, true));
        assert_eq!(w[0].cell.as_deref(), Some("alpha"));
    }

    #[test]
    fn windows_open_on_kill_and_pause_and_close_on_restart_and_resume() {
        let beta = ["beta/1", "beta/2", "beta/3"];
        let events = [
            ev(2.0, 2.0, FaultAction::Kill, &beta),
            ev(3.0, 3.0, FaultAction::Pause, &["alpha/1"]),
            ev(5.0, 5.0, FaultAction::Resume, &["alpha/1"]),
            ev(8.0, 11.5, FaultAction::Restart, &beta),
            ev(12.0, 14.0, FaultAction::Restart, &["gamma/2"]),
            ev(15.0, 15.0, FaultAction::Kill, &["gamma/1"]),
        ];
        let w = windows(&events, 20.0);
        let spans: Vec<(&str, f64, f64, bool)> = w
            .iter()
            .map(|w| (w.label.as_str(), w.start_s, w.end_s, w.healed))
            .collect();
        assert_eq!(
            spans,
            [
                ("kill cell beta", 2.0, 11.5, true),
                ("pause cell alpha", 3.0, 5.0, true),
                ("restart cell gamma", 12.0, 14.0, true),
                ("kill cell gamma", 15.0, 20.0, false),
            ]
        );
        // A failed fault marks nothing.
        let mut failed = ev(1.0, 1.0, FaultAction::Kill, &beta);
        failed.ok = false;
        assert!(windows(&[failed], 9.0).is_empty());
    }

    #[test]
    fn this_process_is_alive_and_a_bogus_pid_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX / 2));
    }
}
