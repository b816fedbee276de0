//! `cellplane up`: the local environment. Starts, as child processes on 127.0.0.1,
//! every member of every cell defined in `cells/` (the directory cell included) and
//! the routers of `cells/routers.toml`; seeds the directory with the static map
//! when it holds none and pushes the directory's map to every cell (so each serves
//! only its own tenants) before the routers start; waits until everything is
//! ready; prints the endpoints; and stops every child on Ctrl-C or SIGTERM.
//!
//! It writes `<data-dir>/up.json` (every process: kind, cell, id, pid, endpoints,
//! log file, command line) so other tools (the load generator's fault schedule) can
//! find them; such a tool restarts a stopped process by creating
//! `<data-dir>/restart/member-<cell>-<id>` (or `router-<id>`), which `up` picks up.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cellplane_cell::CellDef;
use cellplane_router::RoutersDef;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// The folder of cell definitions (cells, routers.toml, routing.toml).
    #[arg(long, default_value = "cells")]
    pub cells: PathBuf,
    /// Where members and routers keep their data and logs.
    #[arg(long, default_value = ".cellplane")]
    pub data_dir: PathBuf,
    /// Wipe the data directory first.
    #[arg(long)]
    pub fresh: bool,
    /// Restart a process that exits.
    #[arg(long)]
    pub restart: bool,
    /// How many of the routers in routers.toml to start.
    #[arg(long, default_value_t = 1)]
    pub routers: usize,
    /// How long to wait for everything to become ready.
    #[arg(long, default_value_t = 90)]
    pub ready_timeout_secs: u64,
    /// Serve TLS everywhere (and mTLS between members) with the certificates the
    /// cell files name; `cellplane certs generate` is run first for what is
    /// missing. Without it everything is plaintext: a local environment only.
    #[arg(long)]
    pub tls: bool,
    /// Routers require every request to prove an identity (a client certificate
    /// or a password login: `cellplane tenant add`). Without it, auth is off.
    #[arg(long)]
    pub auth: bool,
    /// Runtime threads of each process started (`cellplane --worker-threads`).
    /// Default: the host's cores shared out among the processes, at least one
    /// each. Every process of the environment runs on this host; threads beyond
    /// a process's share only hand work to one another (docs/benchmarks.md
    /// measures what that costs).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub process_threads: Option<u16>,
}

/// The runtime threads each of `processes` processes on this host gets: the
/// cores shared out, at least one each.
fn thread_share(cores: usize, processes: usize) -> usize {
    (cores / processes.max(1)).max(1)
}

/// What `up` started, as written to `<data-dir>/up.json`.
#[derive(Debug, Serialize)]
pub struct Environment {
    pub supervisor_pid: u32,
    pub directory: String,
    pub processes: Vec<ProcessEntry>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ProcessEntry {
    /// "member" or "router".
    pub kind: &'static str,
    /// The member's cell (empty for a router).
    pub cell: String,
    pub id: u64,
    /// 0 while not running.
    pub pid: u32,
    /// The etcd API address.
    pub client: String,
    pub http: String,
    pub log: PathBuf,
    /// The command line it was started with (`--parent-pid` included).
    pub argv: Vec<String>,
}

/// The environment defined by a `cells/` folder.
pub struct EnvDef {
    pub cells: Vec<(PathBuf, CellDef)>,
    pub routers: RoutersDef,
    pub routers_path: PathBuf,
    pub static_map: cellplane_map::CellMap,
}

/// Reads and cross-checks a `cells/` folder: every `*.toml` but `routers.toml` and
/// the static map is a cell; the static map must name exactly the defined cells
/// (the directory aside) with their members' client addresses.
pub fn load_env(dir: &Path) -> anyhow::Result<EnvDef> {
    let routers_path = dir.join("routers.toml");
    let routers = RoutersDef::load(&routers_path)?;
    let static_path = dir.join(&routers.static_map);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| *p != routers_path && *p != static_path)
        .collect();
    paths.sort();
    let mut cells = Vec::new();
    for p in paths {
        let def = CellDef::load(&p)?;
        cells.push((p, def));
    }
    if !cells.iter().any(|(_, d)| d.name == routers.directory) {
        bail!(
            "{}: directory cell `{}` has no definition in {}",
            routers_path.display(),
            routers.directory,
            dir.display()
        );
    }
    // The role decides what routers may do on a cell once TLS is on: the
    // directory must say it is one (or routers could write the map), and no other
    // cell may.
    for (path, def) in &cells {
        let is_directory = def.name == routers.directory;
        let says_directory = def.role == cellplane_cell::CellRole::Directory;
        if says_directory && !is_directory {
            bail!(
                "{}: field `role`: cell `{}` says it is the directory, but {} names `{}`",
                path.display(),
                def.name,
                routers_path.display(),
                routers.directory
            );
        }
        if is_directory && !says_directory && def.tls.is_some() {
            bail!(
                "{}: field `role`: the directory cell needs `role = \"directory\"` with [tls], \
                 so that routers may only read it",
                path.display()
            );
        }
    }
    let static_map = cellplane_router::map_source::read_map_file(&static_path)?;
    for entry in &static_map.cells {
        let Some((_, def)) = cells.iter().find(|(_, d)| d.name == entry.name) else {
            bail!(
                "{}: cell `{}` has no definition in {}",
                static_path.display(),
                entry.name,
                dir.display()
            );
        };
        let defined: Vec<String> = def.members.iter().map(|m| m.client.to_string()).collect();
        if defined != entry.endpoints {
            bail!(
                "{}: cell `{}` endpoints {:?} differ from its members' client addresses {:?}",
                static_path.display(),
                entry.name,
                entry.endpoints,
                defined
            );
        }
    }
    Ok(EnvDef {
        cells,
        routers,
        routers_path,
        static_map,
    })
}

struct Running {
    entry: ProcessEntry,
    /// host:port of /readyz.
    http: String,
    args: Vec<OsString>,
    child: Option<Child>,
}

fn spawn(exe: &Path, args: &[OsString], log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err_file = log_file.try_clone()?;
    Command::new(exe)
        .args(args)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// Runs the environment until SIGINT or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let env = load_env(&args.cells)?;
    if args.routers == 0 || args.routers > env.routers.routers.len() {
        bail!(
            "--routers {}: {} defines {} router(s)",
            args.routers,
            env.routers_path.display(),
            env.routers.routers.len()
        );
    }
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("--fresh: cannot remove {}", args.data_dir.display()))?;
    }
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let security = Security::prepare(&env, &args)?;
    let exe = std::env::current_exe().context("cannot find the cellplane executable")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::signals::cancel_on_signal(shutdown.clone()));

    let processes = env
        .cells
        .iter()
        .map(|(_, d)| d.members.len())
        .sum::<usize>()
        + args.routers;
    let threads = match args.process_threads {
        Some(n) => usize::from(n),
        None => thread_share(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            processes,
        ),
    };
    let threads_args =
        || -> [OsString; 2] { ["--worker-threads".into(), threads.to_string().into()] };
    let mut running: Vec<Running> = Vec::new();
    for (path, def) in &env.cells {
        for m in &def.members {
            let data_dir = args.data_dir.join(&def.name).join(m.id.to_string());
            let log = logs.join(format!("{}-{}.log", def.name, m.id));
            let mut a: Vec<OsString> = vec![
                "node".into(),
                "--cell".into(),
                path.into(),
                "--id".into(),
                m.id.to_string().into(),
                "--data-dir".into(),
                data_dir.into(),
            ];
            a.extend(security.node_args());
            a.extend(threads_args());
            let child = spawn(&exe, &a, &log)?;
            running.push(Running {
                entry: ProcessEntry {
                    kind: "member",
                    cell: def.name.clone(),
                    id: m.id,
                    pid: child.id().unwrap_or(0),
                    client: m.client.to_string(),
                    http: m.http.to_string(),
                    argv: argv_of(&exe, &a),
                    log,
                },
                http: m.http.to_string(),
                args: a,
                child: Some(child),
            });
        }
    }
    write_environment(&args.data_dir, &env, &running)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout_secs);
    let started = async {
        wait_ready(&mut running, deadline).await?;
        let tls = security.operator_tls()?;
        let map = seed_directory(&env, tls.clone()).await?;
        // Before any router starts: every cell serves only what the map gives it.
        crate::map_cmd::push_to_cells(&map, tls.as_ref()).await?;
        for r in env.routers.routers.iter().take(args.routers) {
            let log = logs.join(format!("router-{}.log", r.id));
            let mut a: Vec<OsString> = vec![
                "router".into(),
                "--routers".into(),
                env.routers_path.clone().into(),
                "--id".into(),
                r.id.to_string().into(),
                "--state-dir".into(),
                args.data_dir.join(format!("router-{}", r.id)).into(),
            ];
            a.extend(security.router_args());
            a.extend(threads_args());
            let child = spawn(&exe, &a, &log)?;
            running.push(Running {
                entry: ProcessEntry {
                    kind: "router",
                    cell: String::new(),
                    id: r.id,
                    pid: child.id().unwrap_or(0),
                    client: r.client.to_string(),
                    http: r.http.to_string(),
                    argv: argv_of(&exe, &a),
                    log,
                },
                http: r.http.to_string(),
                args: a,
                child: Some(child),
            });
        }
        write_environment(&args.data_dir, &env, &running)?;
        wait_ready(&mut running, deadline).await
    };
    let ready = tokio::select! {
        r = started => r,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted before the environment was ready")),
    };
    if let Err(e) = ready {
        stop_all(&mut running).await;
        return Err(e);
    }
    print_table(&running, &env, args.routers, &security);
    println!(
        "cellplane is ready: {} cell(s) ({} the directory), {} router(s); data in {}; Ctrl-C stops everything",
        env.cells.len(),
        env.routers.directory,
        args.routers,
        args.data_dir.display()
    );
    supervise(&mut running, &exe, &args, &env, shutdown).await;
    stop_all(&mut running).await;
    println!("cellplane stopped");
    Ok(())
}

/// What `up --tls` and `--auth` turn on, and what the children are told.
pub struct Security {
    tls: bool,
    auth: bool,
    /// The CA, and the operator certificate `up` seeds the directory with.
    operator: Option<cellplane_security::TlsFiles>,
}

impl Security {
    /// Makes missing certificates (`--tls`) and an empty credentials file
    /// (`--auth`), and says plainly what is off.
    pub fn prepare(env: &EnvDef, args: &UpArgs) -> anyhow::Result<Security> {
        let mut operator = None;
        if args.tls {
            let n = crate::certs_cmd::generate(env, 365, false)?;
            if n > 0 {
                println!("--tls: wrote {n} certificate and key file(s) (cellplane certs generate)");
            }
            operator = Some(crate::certs_cmd::operator_files(env)?);
        } else {
            println!(
                "TLS is off: every port is plaintext and any local process may call it \
                 (`cellplane up --tls` turns it on)"
            );
        }
        if args.auth {
            if crate::certs_cmd::ensure_credentials(env)? {
                let creds = env.routers.base_dir.join(&env.routers.auth.credentials);
                println!(
                    "--auth: created an empty {}; add tenants with `cellplane tenant add <name>`",
                    creds.display()
                );
            }
        } else {
            println!(
                "auth is off: a request acts for the tenant its keys or `cellplane-tenant` \
                 metadata name (`cellplane up --auth` turns it on)"
            );
        }
        Ok(Security {
            tls: args.tls,
            auth: args.auth,
            operator,
        })
    }

    fn node_args(&self) -> Vec<OsString> {
        if self.tls {
            vec![]
        } else {
            vec!["--plaintext".into()]
        }
    }

    fn router_args(&self) -> Vec<OsString> {
        let mut a = self.node_args();
        a.extend(["--auth".into(), if self.auth { "on" } else { "off" }.into()]);
        a
    }

    fn operator_tls(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        Ok(match &self.operator {
            Some(files) => Some(files.load()?.client()),
            None => None,
        })
    }
}

/// Writes the static map into the directory when it holds none yet (as `cellplane
/// map seed` does); returns the directory's map.
async fn seed_directory(
    env: &EnvDef,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<cellplane_map::CellMap> {
    let (_, def) = env
        .cells
        .iter()
        .find(|(_, d)| d.name == env.routers.directory)
        .context("no directory cell")?;
    let eps: Vec<String> = def.members.iter().map(|m| m.client.to_string()).collect();
    let dir =
        cellplane_router::directory::Directory::new(&eps, Duration::from_secs(3), tls.as_ref())
            .map_err(anyhow::Error::msg)?;
    crate::map_cmd::seed_once(&dir, &env.static_map).await
}

async fn supervise(
    running: &mut [Running],
    exe: &Path,
    args: &UpArgs,
    env: &EnvDef,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut changed = false;
        for r in running.iter_mut() {
            // A restart asked for by another tool (the load generator's faults).
            let request = restart_request(&args.data_dir, &r.entry);
            if r.child.is_none() && request.exists() {
                let _ = std::fs::remove_file(&request);
                let what = describe(&r.entry);
                match spawn(exe, &r.args, &r.entry.log) {
                    Ok(c) => {
                        eprintln!("{what} restarted on request");
                        r.entry.pid = c.id().unwrap_or(0);
                        r.child = Some(c);
                        changed = true;
                    }
                    Err(e) => eprintln!("{what} could not restart: {e:#}"),
                }
                continue;
            }
            let Some(child) = r.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                let what = describe(&r.entry);
                eprintln!("{what} exited ({status}); log: {}", r.entry.log.display());
                r.child = None;
                r.entry.pid = 0;
                changed = true;
                if args.restart {
                    match spawn(exe, &r.args, &r.entry.log) {
                        Ok(c) => {
                            eprintln!("{what} restarted");
                            r.entry.pid = c.id().unwrap_or(0);
                            r.child = Some(c);
                        }
                        Err(e) => eprintln!("{what} could not restart: {e:#}"),
                    }
                }
            }
        }
        if changed && let Err(e) = write_environment(&args.data_dir, env, running) {
            eprintln!("cannot update up.json: {e:#}");
        }
    }
}

/// The file whose creation asks `up` to start a stopped process again.
fn restart_request(data_dir: &Path, e: &ProcessEntry) -> PathBuf {
    let name = match e.kind {
        "router" => format!("router-{}", e.id),
        _ => format!("member-{}-{}", e.cell, e.id),
    };
    data_dir.join("restart").join(name)
}

/// The command line `spawn` runs, as recorded in up.json.
fn argv_of(exe: &Path, args: &[OsString]) -> Vec<String> {
    std::iter::once(exe.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy().into_owned())
        .chain(["--parent-pid".to_string(), std::process::id().to_string()])
        .collect()
}

fn describe(e: &ProcessEntry) -> String {
    match e.kind {
        "router" => format!("router {}", e.id),
        _ => format!("member {}/{}", e.cell, e.id),
    }
}

fn write_environment(data_dir: &Path, env: &EnvDef, running: &[Running]) -> anyhow::Result<()> {
    let doc = Environment {
        supervisor_pid: std::process::id(),
        directory: env.routers.directory.clone(),
        processes: running.iter().map(|r| r.entry.clone()).collect(),
    };
    let path = data_dir.join("up.json");
    let tmp = data_dir.join("up.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

async fn wait_ready(running: &mut [Running], deadline: tokio::time::Instant) -> anyhow::Result<()> {
    for r in running.iter_mut() {
        loop {
            if let Some(Ok(Some(status))) = r.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "{} exited during start-up ({status}); its log {} ends with:\n{}",
                    describe(&r.entry),
                    r.entry.log.display(),
                    tail(&r.entry.log, 20)
                );
            }
            if probe_ready(r.http.as_str()).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready in time (http://{}/readyz); log: {}",
                    describe(&r.entry),
                    r.http,
                    r.entry.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// GET /readyz; true on a 200.
pub async fn probe_ready(addr: impl tokio::net::ToSocketAddrs) -> bool {
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

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_table(running: &[Running], env: &EnvDef, routers: usize, security: &Security) {
    println!(
        "{:<10} {:<10} {:>3}  {:<22} {:<22}",
        "KIND", "CELL", "ID", "ETCD API", "HTTP"
    );
    for r in running {
        println!(
            "{:<10} {:<10} {:>3}  {:<22} {:<22}",
            r.entry.kind, r.entry.cell, r.entry.id, r.entry.client, r.entry.http
        );
    }
    let first = &env.routers.routers[0];
    let endpoints = env
        .routers
        .routers
        .iter()
        .take(routers)
        .map(|r| r.client.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let tls = match &security.operator {
        Some(op) => {
            let dir = op
                .ca
                .parent()
                .unwrap_or(Path::new("."))
                .display()
                .to_string();
            (
                format!(
                    " --cacert={dir}/ca.crt --cert={dir}/tenant-a.crt --key={dir}/tenant-a.key"
                ),
                format!(
                    " --cacert {dir}/ca.crt --cert {} --key {}",
                    op.cert.display(),
                    op.key.display()
                ),
            )
        }
        None => (String::new(), String::new()),
    };
    println!(
        "\netcdctl --endpoints={endpoints}{} put /a/hello world    # tenant `a`, routed to its cell",
        tls.0
    );
    if security.auth {
        println!(
            "cellplane tenant add acme --password s3cret; etcdctl --endpoints={endpoints}{} --user acme:s3cret put /acme/x 1",
            if security.tls {
                " --cacert=<ca.crt>"
            } else {
                ""
            }
        );
    }
    println!(
        "cellplane status --admin {}{}                # the router's view of every cell",
        first.admin, tls.1
    );
}

async fn stop_all(running: &mut [Running]) {
    // Routers first (they were started last), then members.
    for r in running.iter().rev() {
        if let Some(pid) = r.child.as_ref().and_then(|c| c.id()) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for r in running.iter_mut() {
        let what = describe(&r.entry);
        if let Some(c) = r.child.as_mut()
            && tokio::time::timeout_at(deadline, c.wait()).await.is_err()
        {
            eprintln!("{what} did not stop in time: killing it");
            let _ = c.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_gets_its_share_of_the_cores_and_at_least_one_thread() {
        assert_eq!(thread_share(2, 11), 1); // this project's machine and cells/
        assert_eq!(thread_share(64, 13), 4);
        assert_eq!(thread_share(8, 4), 2);
        assert_eq!(thread_share(1, 0), 1);
    }

    #[test]
    fn the_shipped_cells_folder_is_consistent() {
        let env = load_env(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cells")).unwrap();
        let names: Vec<&str> = env.cells.iter().map(|(_, d)| d.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta", "directory", "gamma"]);
        assert!(
            env.cells
                .iter()
                .filter(|(_, d)| d.name != "directory")
                .all(|(_, d)| d.members.len() == 3)
        );
        let cells: Vec<&str> = ["a", "b", "c"]
            .iter()
            .map(|t| env.static_map.cell_for(t).unwrap().name.as_str())
            .collect();
        assert_eq!(cells, ["alpha", "beta", "gamma"]);
        assert_eq!(env.routers.routers.len(), 2);
    }
}
