//! `cellplane up`: the local environment. Starts every member of every cell defined
//! in `cells/` as a child process on 127.0.0.1, waits until each is ready, prints
//! the endpoints, and stops them all on Ctrl-C or SIGTERM.
//!
//! It writes `<data-dir>/up.json` (cells, members, pids, endpoints, log files) so
//! that other tools (the load generator's fault schedule) can find the processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cellplane_cell::CellDef;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// The folder of cell definitions.
    #[arg(long, default_value = "cells")]
    pub cells: PathBuf,
    /// Where members keep their data and logs.
    #[arg(long, default_value = ".cellplane")]
    pub data_dir: PathBuf,
    /// Wipe the data directory first.
    #[arg(long)]
    pub fresh: bool,
    /// Restart a member whose process exits.
    #[arg(long)]
    pub restart: bool,
    /// How long to wait for every member to become ready.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u64,
}

/// What `up` started, as written to `<data-dir>/up.json`.
#[derive(Debug, Serialize)]
pub struct Environment {
    pub supervisor_pid: u32,
    pub cells: Vec<CellProcesses>,
}

#[derive(Debug, Serialize)]
pub struct CellProcesses {
    pub name: String,
    pub definition: PathBuf,
    pub members: Vec<MemberProcess>,
}

#[derive(Debug, Serialize)]
pub struct MemberProcess {
    pub id: u64,
    pub pid: u32,
    pub client: String,
    pub peer: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// Reads every cell definition in `dir` (every `*.toml` but `routing.toml`).
pub fn load_cells(dir: &Path) -> anyhow::Result<Vec<(PathBuf, CellDef)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "routing.toml"))
        .collect();
    paths.sort();
    for p in paths {
        let def = CellDef::load(&p)?;
        out.push((p, def));
    }
    if out.is_empty() {
        bail!("{} holds no cell definition (*.toml)", dir.display());
    }
    Ok(out)
}

struct Running {
    cell: String,
    definition: PathBuf,
    id: u64,
    http: std::net::SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Child,
    /// Exited and not restarted.
    exited: bool,
}

fn spawn_member(r: &Path, def_path: &Path, id: u64, data_dir: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err_file = log_file.try_clone()?;
    let child = Command::new(r)
        .arg("node")
        .arg("--cell")
        .arg(def_path)
        .arg("--id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", r.display()))?;
    Ok(child)
}

/// Runs the environment until SIGINT or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let cells = load_cells(&args.cells)?;
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("--fresh: cannot remove {}", args.data_dir.display()))?;
    }
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let exe = std::env::current_exe().context("cannot find the cellplane executable")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(crate::signals::cancel_on_signal(shutdown.clone()));

    let mut running = Vec::new();
    for (path, def) in &cells {
        for m in &def.members {
            let data_dir = args.data_dir.join(&def.name).join(m.id.to_string());
            let log = logs.join(format!("{}-{}.log", def.name, m.id));
            let child = spawn_member(&exe, path, m.id, &data_dir, &log)?;
            running.push(Running {
                cell: def.name.clone(),
                definition: path.clone(),
                id: m.id,
                http: m.http,
                data_dir,
                log,
                child,
                exited: false,
            });
        }
    }
    write_environment(&args.data_dir, &cells, &running)?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout_secs);
    let ready = tokio::select! {
        r = wait_all_ready(&mut running, deadline) => r,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted before the environment was ready")),
    };
    if let Err(e) = ready {
        stop_all(&mut running).await;
        return Err(e);
    }
    print_table(&cells);
    let members: usize = cells.iter().map(|(_, d)| d.members.len()).sum();
    println!(
        "cellplane is ready: {} cell(s), {members} member(s); data in {}; Ctrl-C stops everything",
        cells.len(),
        args.data_dir.display()
    );

    supervise(&mut running, &exe, &args, &cells, shutdown).await;
    stop_all(&mut running).await;
    println!("cellplane stopped");
    Ok(())
}

async fn supervise(
    running: &mut [Running],
    exe: &Path,
    args: &UpArgs,
    cells: &[(PathBuf, CellDef)],
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut changed = false;
        for r in running.iter_mut().filter(|r| !r.exited) {
            if let Ok(Some(status)) = r.child.try_wait() {
                eprintln!(
                    "member {}/{} exited ({status}); log: {}",
                    r.cell,
                    r.id,
                    r.log.display()
                );
                if args.restart {
                    match spawn_member(exe, &r.definition, r.id, &r.data_dir, &r.log) {
                        Ok(c) => {
                            eprintln!("member {}/{} restarted", r.cell, r.id);
                            r.child = c;
                            changed = true;
                        }
                        Err(e) => eprintln!("member {}/{} could not restart: {e:#}", r.cell, r.id),
                    }
                } else {
                    // Keep supervising the others; this one stays down.
                    r.exited = true;
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = write_environment(&args.data_dir, cells, running) {
                eprintln!("cannot update up.json: {e:#}");
            }
        }
    }
}

fn write_environment(data_dir: &Path, cells: &[(PathBuf, CellDef)], running: &[Running]) -> anyhow::Result<()> {
    let mut by_cell: BTreeMap<&str, Vec<&Running>> = BTreeMap::new();
    for r in running {
        by_cell.entry(r.cell.as_str()).or_default().push(r);
    }
    let env = Environment {
        supervisor_pid: std::process::id(),
        cells: cells
            .iter()
            .map(|(path, def)| CellProcesses {
                name: def.name.clone(),
                definition: path.clone(),
                members: def
                    .members
                    .iter()
                    .filter_map(|m| {
                        let r = by_cell.get(def.name.as_str())?.iter().find(|r| r.id == m.id)?;
                        Some(MemberProcess {
                            id: m.id,
                            pid: if r.exited { 0 } else { r.child.id().unwrap_or(0) },
                            client: m.client.to_string(),
                            peer: m.peer.to_string(),
                            http: m.http.to_string(),
                            data_dir: r.data_dir.clone(),
                            log: r.log.clone(),
                        })
                    })
                    .collect(),
            })
            .collect(),
    };
    let path = data_dir.join("up.json");
    let tmp = data_dir.join("up.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&env)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

async fn wait_all_ready(running: &mut [Running], deadline: tokio::time::Instant) -> anyhow::Result<()> {
    for r in running.iter_mut() {
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                bail!(
                    "member {}/{} exited during start-up ({status}); its log {} ends with:\n{}",
                    r.cell,
                    r.id,
                    r.log.display(),
                    tail(&r.log, 20)
                );
            }
            if probe_ready(r.http).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "member {}/{} not ready in time (http://{}/readyz); log: {}",
                    r.cell,
                    r.id,
                    r.http,
                    r.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// GET /readyz; true on a 200.
pub async fn probe_ready(addr: std::net::SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(true)))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_table(cells: &[(PathBuf, CellDef)]) {
    println!("{:<12} {:>3}  {:<22} {:<22} {:<22}", "CELL", "ID", "CLIENT (etcd API)", "PEER", "HTTP");
    for (_, def) in cells {
        for m in &def.members {
            println!(
                "{:<12} {:>3}  {:<22} {:<22} {:<22}",
                def.name,
                m.id,
                m.client.to_string(),
                m.peer.to_string(),
                m.http.to_string()
            );
        }
    }
}

async fn stop_all(running: &mut [Running]) {
    for r in running.iter() {
        if let Some(pid) = r.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for r in running.iter_mut() {
        match tokio::time::timeout_at(deadline, r.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("member {}/{} did not stop in time: killing it", r.cell, r.id);
                let _ = r.child.kill().await;
            }
        }
    }
}
