//! The `loadgen` command: parses options and calls the library.
//!
//! - `loadgen run SCENARIO [--target router|cell|etcd|map] [--endpoints …] [--up DIR]`
//! - `loadgen compare SCENARIO --etcd EPS [--cellplane EPS] [--router EPS] [--rounds N]`
//! - `loadgen validate SCENARIO…`, `loadgen render REPORT.json`
//! - `loadgen closed …`: the first version's flags, kept for the benchmark scripts.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use loadgen::compare::{CompareConfig, System, compare};
use loadgen::env::UpEnvironment;
use loadgen::scenario::{Consistency, Model, Op as ScenarioOp, Scenario, Secs, WatchMode as Wm};
use loadgen::target::{Target, TargetKind};
use loadgen::{Report, RunConfig, html, run, write_report};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the etcd v3 API: cellplane routers, cells, or etcd."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario file against a target; print a summary, write JSON and HTML.
    Run(RunArgs),
    /// Run a scenario against cellplane and etcd, alternated, and print the ratios.
    Compare(CompareArgs),
    /// Check scenario files (every error names its field).
    Validate {
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
    /// Render the HTML report of a JSON report again.
    Render {
        json: PathBuf,
        /// Default: the JSON's path with .html.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Closed-loop load from flags (the first version's interface).
    Closed(ClosedArgs),
    /// Kill a cell's leader again and again under write load through the
    /// router; report how long writes failed after each kill.
    Failover(FailoverArgs),
}

#[derive(clap::Args, Debug)]
struct FailoverArgs {
    /// Data directory of a running `cellplane up` environment.
    #[arg(long)]
    up: PathBuf,
    #[arg(long, default_value = "alpha")]
    cell: String,
    /// A tenant the router sends to --cell.
    #[arg(long, default_value = "a")]
    tenant: String,
    #[arg(long, default_value_t = 30)]
    kills: usize,
    /// Concurrent writers (each puts back to back).
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Connections to the router the writers share (1: all on one; as many as
    /// --writers: one each).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seconds of load with no fault first, counting spurious elections.
    #[arg(long, default_value_t = 30.0)]
    quiet: f64,
    /// Seconds after a restarted member is ready before the next kill.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// What the endpoints are.
    #[arg(long, value_enum, default_value = "router")]
    target: TargetKind,
    /// Comma-separated endpoints (host:port). Default: from --up's up.json (the
    /// routers, or the members of --cell).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The cell (--target cell): its name in reports, and its members from --up.
    #[arg(long)]
    cell: Option<String>,
    /// Data directory of a `cellplane up` environment (its up.json): default
    /// endpoints, and the processes a fault schedule acts on.
    #[arg(long)]
    up: Option<PathBuf>,
    /// A cell map (e.g. cells/routing.toml): routes --target map, and charges
    /// router requests that fail before naming their cell to the tenant's cell.
    #[arg(long)]
    map: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    scenario: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// Override a scenario field: --set load.clients=256 (repeatable).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
    /// Folder for report.json and report.html. Default:
    /// <up dir or .cellplane>/loadgen/<scenario>-<unix time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The JSON report's path (instead of <out>/report.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The HTML report's path (instead of <out>/report.html).
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    scenario: PathBuf,
    /// Endpoints of a cellplane cell's members (compared directly).
    #[arg(long, value_delimiter = ',')]
    cellplane: Vec<String>,
    /// The cell's name in the output.
    #[arg(long, default_value = "cellplane")]
    cell_name: String,
    /// Endpoints of cellplane routers (compared through the router).
    #[arg(long, value_delimiter = ',')]
    router: Vec<String>,
    /// Endpoints of an etcd cluster: the baseline of the ratios.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds of rest between two runs.
    #[arg(long, default_value_t = 2.0)]
    pause: f64,
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
    /// Write the comparison as JSON (schema in loadgen/REPORT.md).
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    no_progress: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Op {
    /// Put random keys.
    Put,
    /// Linearizable get of random keys.
    Get,
    /// Serializable get of random keys.
    SerializableGet,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum WatchMode {
    Idle,
    Stalled,
    Active,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum WatchFlow {
    Default,
    Adaptive,
}

#[derive(clap::Args, Debug)]
struct ClosedArgs {
    /// Comma-separated client endpoints (host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// gRPC connections shared by the clients (round-robin over endpoints).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up, seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Prefix of every key.
    #[arg(long, default_value = "/bench/")]
    prefix: String,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
    /// Watchers opened before the load starts (see --watch-mode).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// idle: watch keys nobody writes; stalled: watch the written keys and never
    /// read the stream; active: watch the written keys and read every event.
    #[arg(long, value_enum, default_value = "idle")]
    watch_mode: WatchMode,
    /// Connections the watchers use, apart from the writers' connections.
    #[arg(long, default_value_t = 16)]
    watch_connections: usize,
    /// Watches per watch stream (idle mode; stalled and active use one each).
    #[arg(long, default_value_t = 100)]
    watches_per_stream: usize,
    /// HTTP/2 flow control of the watchers' connections: default (fixed 2 MiB
    /// per stream, 5 MiB per connection) or adaptive (grown to the measured
    /// bandwidth-delay product, as grpc-go and gRPC C-core clients do).
    #[arg(long, value_enum, default_value = "default")]
    watch_flow: WatchFlow,
    /// Report the CPU these processes spend per 1,000 operations in the measured
    /// window: NAME=PID[+PID...], repeatable (`--cpu members=11+12+13 --cpu
    /// router=14`). The client's own CPU is always reported, as `client`.
    #[arg(long = "cpu", value_name = "NAME=PIDS", value_parser = loadgen::cpu::Group::parse)]
    cpu: Vec<loadgen::cpu::Group>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = rt.block_on(async {
        let s = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing the report");
                s.cancel();
            }
        });
        match cli.cmd {
            Cmd::Run(a) => cmd_run(a, shutdown).await,
            Cmd::Compare(a) => cmd_compare(a, shutdown).await,
            Cmd::Validate { scenarios } => validate(&scenarios),
            Cmd::Render { json, html } => render(&json, html),
            Cmd::Closed(a) => closed(a, shutdown).await,
            Cmd::Failover(a) => failover(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    use loadgen::failover::{FailoverConfig, run_failover, write_json};
    let cfg = FailoverConfig {
        data_dir: a.up,
        cell: a.cell,
        tenant: a.tenant,
        kills: a.kills,
        writers: a.writers.max(1),
        connections: a.connections.max(1),
        quiet: Duration::from_secs_f64(a.quiet.max(0.0)),
        settle: Duration::from_secs_f64(a.settle.max(0.0)),
    };
    let r = run_failover(&cfg, |m| eprintln!("{m}"))
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "cell {}: {} kills of the leader, {} writers on {} connection(s) to the router: writes failed for \
         median {:.0} ms, p90 {:.0} ms, max {:.0} ms; elections per kill {:.2}; {} spurious \
         election(s) in {:.0} s of load without faults; puts ok {}, failed {}",
        r.cell,
        r.kills.len(),
        r.writers,
        r.connections,
        r.median_ms,
        r.p90_ms,
        r.max_ms,
        r.kills.iter().map(|k| k.elections).sum::<u64>() as f64 / r.kills.len().max(1) as f64,
        r.quiet_elections,
        r.quiet_s,
        r.puts_ok,
        r.puts_failed
    );
    if let Some(p) = a.json {
        write_json(&r, &p).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_map(path: &Path) -> anyhow::Result<cellplane_map::CellMap> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    cellplane_map::CellMap::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn resolve_target(a: &TargetArgs) -> anyhow::Result<Target> {
    let env = a.up.as_deref().map(UpEnvironment::read).transpose()?;
    let map = a.map.as_deref().map(read_map).transpose()?;
    let endpoints = if a.endpoints.is_empty() && a.up.is_none() && a.target == TargetKind::Router {
        vec!["127.0.0.1:2379".to_string()]
    } else {
        a.endpoints.clone()
    };
    Target::resolve(a.target, endpoints, a.cell.clone(), env.as_ref(), map)
}

async fn cmd_run(a: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let scenario = Scenario::load(&a.scenario, &a.set)?;
    let target = resolve_target(&a.target)?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.target
            .up
            .clone()
            .unwrap_or_else(|| PathBuf::from(".cellplane"))
            .join("loadgen")
            .join(format!("{}-{}", scenario.name, unix_secs()))
    });
    let json = a.json.clone().unwrap_or_else(|| out.join("report.json"));
    let html = a.html.clone().unwrap_or_else(|| out.join("report.html"));
    eprintln!(
        "{}: {} against {}",
        scenario.name,
        loadgen::report::load_label(&scenario),
        target.label()
    );
    let result = run(
        RunConfig {
            scenario,
            scenario_file: Some(a.scenario.display().to_string()),
            target,
            up_dir: a.target.up.clone(),
            progress: !a.no_progress,
            log_faults: true,
        },
        shutdown,
    )
    .await?;
    print!("{}", result.report.summary());
    let (j, h) = write_report(&result.report, &json, &html)
        .with_context(|| format!("cannot write the reports to {}", out.display()))?;
    println!("report: {} and {}", j.display(), h.display());
    Ok(())
}

async fn cmd_compare(a: CompareArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let scenario = Scenario::load(&a.scenario, &a.set)?;
    anyhow::ensure!(
        scenario.faults.is_empty(),
        "{}: compare runs no fault schedule; use a scenario without [[faults]]",
        a.scenario.display()
    );
    let mut systems = Vec::new();
    if !a.cellplane.is_empty() {
        systems.push(System {
            name: format!("{} (direct)", a.cell_name),
            target: Target::cell(&a.cell_name, a.cellplane.clone()),
        });
    }
    if !a.router.is_empty() {
        systems.push(System {
            name: "router".into(),
            target: Target::router(a.router.clone()),
        });
    }
    if !a.etcd.is_empty() {
        systems.push(System {
            name: "etcd".into(),
            target: Target::etcd(a.etcd.clone()),
        });
    }
    anyhow::ensure!(
        systems.len() >= 2,
        "give at least two of --cellplane, --router and --etcd"
    );
    let cfg = CompareConfig {
        scenario,
        scenario_file: Some(a.scenario.display().to_string()),
        systems,
        rounds: a.rounds,
        pause: Duration::from_secs_f64(a.pause.max(0.0)),
        progress: !a.no_progress,
    };
    let report = compare(&cfg, shutdown, |line| println!("{line}")).await?;
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("comparison: {}", path.display());
    }
    Ok(())
}

fn validate(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut bad = 0;
    for f in files {
        match Scenario::load(f, &[]) {
            Ok(s) => println!(
                "{}: ok ({}; {})",
                f.display(),
                s.name,
                loadgen::report::load_label(&s)
            ),
            Err(e) => {
                eprintln!("{e}");
                bad += 1;
            }
        }
    }
    anyhow::ensure!(bad == 0, "{bad} scenario(s) refused");
    Ok(())
}

fn render(json: &Path, html_path: Option<PathBuf>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
    let report =
        Report::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))?;
    let out = html_path.unwrap_or_else(|| json.with_extension("html"));
    std::fs::write(&out, html::render(&report))
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

/// The first version's interface, on the scenario engine. Prints the same line.
async fn closed(a: ClosedArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut s = Scenario {
        name: "closed".into(),
        ..Scenario::default()
    };
    s.load.model = Model::Closed;
    s.load.clients = a.clients;
    s.load.connections = a.connections;
    s.load.duration = Some(Secs(a.duration as f64));
    s.load.warmup = Secs(a.warmup as f64);
    s.keys.space = a.key_space;
    s.keys.value_size = a.value_size;
    s.keys.prefix = a.prefix.clone();
    s.workload.op = match a.op {
        Op::Put => ScenarioOp::Put,
        Op::Get | Op::SerializableGet => ScenarioOp::Get,
    };
    if a.op == Op::SerializableGet {
        s.workload.consistency = Consistency::Serializable;
    }
    s.watch.watchers = a.watchers;
    s.watch.mode = match a.watch_mode {
        WatchMode::Idle => Wm::Idle,
        WatchMode::Stalled => Wm::Stalled,
        WatchMode::Active => Wm::Active,
    };
    s.watch.connections = a.watch_connections;
    s.watch.watches_per_stream = a.watches_per_stream;
    s.watch.flow = match a.watch_flow {
        WatchFlow::Default => loadgen::scenario::Flow::Default,
        WatchFlow::Adaptive => loadgen::scenario::Flow::Adaptive,
    };
    s.validate()
        .map_err(|(field, msg)| anyhow::anyhow!("{field}: {msg}"))?;
    let mut groups = a.cpu.clone();
    groups.push(loadgen::cpu::Group {
        name: "client".into(),
        pids: vec![std::process::id()],
    });
    let sampler = loadgen::cpu::Sampler::start(groups);
    let result = run(
        RunConfig {
            scenario: s,
            scenario_file: None,
            target: Target::cell("target", a.endpoints.clone()),
            up_dir: None,
            progress: false,
            log_faults: false,
        },
        shutdown,
    )
    .await?;
    let cpu = sampler
        .finish(result.window.0.into_std())
        .await
        .map_err(|e| anyhow::anyhow!("measuring CPU: {e}"))?;
    let r = &result.report;
    let ms = |us: u64| us as f64 / 1000.0;
    let op = format!("{:?}", a.op).to_lowercase();
    if let Some(w) = &r.watch {
        print!(
            "[{} {:?} watchers, {} events read] ",
            w.watchers, a.watch_mode, w.events
        );
    }
    let t = &r.totals;
    let cpu_text: Vec<String> = cpu
        .iter()
        .map(|u| format!("{} {:.0}", u.name, u.per_1k_ops(t.throughput)))
        .collect();
    println!(
        "{} clients={} connections={}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, errors {}, cpu ms/1k ops: {}",
        op,
        a.clients,
        a.connections,
        t.throughput,
        ms(t.latency.p50_us),
        ms(t.latency.p99_us),
        ms(t.latency.p999_us),
        ms(t.latency.max_us),
        t.errors,
        cpu_text.join(", ")
    );
    let cpu_json: serde_json::Map<String, serde_json::Value> = cpu
        .iter()
        .map(|u| (u.name.clone(), u.per_1k_ops(t.throughput).into()))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "op": op,
                "clients": a.clients,
                "connections": a.connections,
                "seconds": r.measured_s,
                "ok": t.ok,
                "errors": t.errors,
                "throughput": t.throughput,
                "p50_ms": ms(t.latency.p50_us),
                "p99_ms": ms(t.latency.p99_us),
                "p999_ms": ms(t.latency.p999_us),
                "max_ms": ms(t.latency.max_us),
                "cpu_ms_per_1k_ops": cpu_json,
            })
        );
    }
    Ok(())
}
