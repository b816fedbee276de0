//! The `cellplane` command. Thin: parses options, sets up logging, calls library
//! code.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellplane",
    version,
    about = "A cell-based control plane: etcd-compatible cells of Raft members."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Threads of this process's async runtime. Default: one per core this
    /// process may use (its cgroup's CPU quota counts). Fewer when processes
    /// share cores: `up` gives each of its processes a share (`--process-threads`).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cell.
    Node {
        /// The cell definition, e.g. cells/alpha.toml.
        #[arg(long)]
        cell: PathBuf,
        /// This member's id in the cell definition.
        #[arg(long, required_unless_present = "id_from_hostname")]
        id: Option<u64>,
        /// Take the id from the host name `<cell>-<N>` as id N+1: a Kubernetes
        /// StatefulSet's pod `alpha-0` is member 1 of cell alpha.
        #[arg(long, conflicts_with = "id")]
        id_from_hostname: bool,
        /// Where this member keeps its RocksDB.
        #[arg(long)]
        data_dir: PathBuf,
        /// Stop when this process (the `up` supervisor) is gone, so a killed
        /// supervisor leaves no orphan members.
        #[arg(long, hide = true)]
        parent_pid: Option<u32>,
        #[command(flatten)]
        listen: ListenArgs,
        /// Serve plaintext even though the cell file has a [tls] section: for the
        /// local environment only (anyone who reaches a port may call it).
        #[arg(long)]
        plaintext: bool,
        /// Join a running cell: never initialize one, even with empty data; wait
        /// for the leader to add this member (`etcdctl member add`) and send it
        /// the log or a snapshot. For a member that replaces a lost one.
        #[arg(long)]
        join: bool,
    },
    /// Run one router: forwards each tenant's requests to its cell.
    Router {
        /// The routers' definition.
        #[arg(long, default_value = "cells/routers.toml")]
        routers: PathBuf,
        /// This router's id in it.
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// Where the router keeps its last-known-good map.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, hide = true)]
        parent_pid: Option<u32>,
        /// Serve and dial plaintext even though routers.toml has a [tls] section:
        /// for the local environment only.
        #[arg(long)]
        plaintext: bool,
        /// Turn authentication on or off, whatever routers.toml's [auth] says.
        #[arg(long, value_name = "on|off")]
        auth: Option<OnOff>,
    },
    /// Start the local environment defined in cells/ as child processes on 127.0.0.1.
    Up(cellplane::up::UpArgs),
    /// Show the map in force and every cell as a router sees it.
    Status(cellplane::status_cmd::StatusArgs),
    /// Show or change the cell map in the directory.
    Map(cellplane::map_cmd::MapArgs),
    /// Add a cell to the live map, or drain one with its data.
    Cell(cellplane::cell_cmd::CellArgs),
    /// Move a hash bucket, with its tenants' data, to another cell.
    Bucket(cellplane::bucket_cmd::BucketArgs),
    /// Render the Compose environment, the Kubernetes manifests or a Prometheus
    /// config from cells/.
    Deploy(cellplane::deploy::DeployArgs),
    /// Put, get, delete and watch keys.
    Kv(cellplane::kv_cmd::KvArgs),
    /// Grant, keep alive, inspect, list and revoke leases.
    Lease(cellplane::lease_cmd::LeaseArgs),
    /// Register, list and watch service instances (service discovery).
    Svc(cellplane::svc_cmd::SvcArgs),
    /// Make the CA and the certificates the cells folder names.
    Certs(cellplane::certs_cmd::CertsArgs),
    /// Add, remove and list the tenants and operators that log in with a password.
    Tenant(cellplane::tenant_cmd::TenantArgs),
    /// Operator snapshots: restore one into a new cell.
    Snapshot(cellplane::snapshot_cmd::SnapshotArgs),
}

/// Where a member listens, when that differs from the address the cell definition
/// advertises to peers and clients (etcd's `--listen-*-urls` vs
/// `--advertise-*-urls`): behind a proxy, NAT or in a container.
#[derive(clap::Args)]
struct ListenArgs {
    /// Listen for clients here instead of the member's `client` address.
    #[arg(long)]
    listen_client: Option<std::net::SocketAddr>,
    /// Listen for peers here instead of the member's `peer` address.
    #[arg(long)]
    listen_peer: Option<std::net::SocketAddr>,
    /// Serve /metrics, /healthz and /readyz here instead of the member's `http` address.
    #[arg(long)]
    listen_http: Option<std::net::SocketAddr>,
}

/// Every cellplane process allocates through mimalloc: with glibc's malloc the
/// router spent ~17 % of its CPU in the allocator (locks between worker threads'
/// arenas, consolidation) forwarding small messages. docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = cli.worker_threads {
        runtime.worker_threads(usize::from(n));
    }
    let rt = runtime.build().context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Node {
                cell,
                id,
                id_from_hostname,
                data_dir,
                parent_pid,
                listen,
                plaintext,
                join,
            } => {
                let opts = NodeOpts {
                    id,
                    id_from_hostname,
                    data_dir,
                    parent_pid,
                    listen,
                    plaintext,
                    join,
                };
                node(cell, opts).await
            }
            Cmd::Router {
                routers,
                id,
                state_dir,
                parent_pid,
                plaintext,
                auth,
            } => {
                let opts = RouterOpts {
                    id,
                    state_dir,
                    parent_pid,
                    plaintext,
                    auth,
                };
                router(routers, opts).await
            }
            Cmd::Up(args) => cellplane::up::run(args).await,
            Cmd::Status(args) => cellplane::status_cmd::run(args).await,
            Cmd::Map(args) => cellplane::map_cmd::run(args).await,
            Cmd::Cell(args) => cellplane::cell_cmd::run(args).await,
            Cmd::Bucket(args) => cellplane::bucket_cmd::run(args).await,
            Cmd::Deploy(args) => cellplane::deploy::run(args),
            Cmd::Kv(args) => cellplane::kv_cmd::run(args).await,
            Cmd::Lease(args) => cellplane::lease_cmd::run(args).await,
            Cmd::Svc(args) => cellplane::svc_cmd::run(args).await,
            Cmd::Certs(args) => cellplane::certs_cmd::run(args),
            Cmd::Tenant(args) => cellplane::tenant_cmd::run(args).await,
            Cmd::Snapshot(args) => cellplane::snapshot_cmd::run(args),
        }
    })
}

/// `cellplane node`'s options besides the cell file.
struct NodeOpts {
    id: Option<u64>,
    id_from_hostname: bool,
    data_dir: PathBuf,
    parent_pid: Option<u32>,
    listen: ListenArgs,
    plaintext: bool,
    join: bool,
}

async fn node(cell: PathBuf, opts: NodeOpts) -> anyhow::Result<()> {
    let NodeOpts {
        id,
        id_from_hostname,
        data_dir,
        parent_pid,
        listen,
        plaintext,
        join,
    } = opts;
    let cell = cellplane_cell::CellDef::load(&cell)?;
    let id = match id {
        Some(id) => id,
        None if id_from_hostname => {
            let host = cellplane::deploy::own_hostname()?;
            cellplane::deploy::member_id_from_hostname(&cell.name, &host)?
        }
        None => anyhow::bail!("--id or --id-from-hostname is needed"),
    };
    if cell.member(id).is_none() {
        let ids: Vec<String> = cell.members.iter().map(|m| m.id.to_string()).collect();
        anyhow::bail!(
            "--id {id}: cell {} has no member {id} (its members: {})",
            cell.name,
            ids.join(", ")
        );
    }
    let tls = match cell.member_tls(id) {
        Some(_) if plaintext => {
            tracing::warn!(
                "--plaintext: serving without TLS; any client that reaches a port may call it"
            );
            None
        }
        Some(files) => Some(files.load()?),
        None => {
            tracing::warn!(cell = %cell.name, "the cell file has no [tls] section: serving plaintext; any client that reaches a port may call it");
            None
        }
    };
    let config = cellplane_cell::NodeConfig {
        cell,
        id,
        data_dir,
        tls,
        join,
    };
    let me = config
        .cell
        .member(id)
        .cloned()
        .context("member checked above")?;
    let bind = |a: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("cannot bind {a}"))
    };
    let listeners = cellplane_cell::Listeners {
        client: bind(listen.listen_client.unwrap_or(me.client.bind_addr())).await?,
        peer: bind(listen.listen_peer.unwrap_or(me.peer.bind_addr())).await?,
        http: bind(listen.listen_http.unwrap_or(me.http.bind_addr())).await?,
    };
    let shutdown = cellplane::signals::process_shutdown(parent_pid);
    cellplane_cell::run(config, listeners, shutdown).await?;
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

/// `cellplane router`'s options besides the routers file.
struct RouterOpts {
    id: u64,
    state_dir: PathBuf,
    parent_pid: Option<u32>,
    plaintext: bool,
    auth: Option<OnOff>,
}

async fn router(routers: PathBuf, opts: RouterOpts) -> anyhow::Result<()> {
    let RouterOpts {
        id,
        state_dir,
        parent_pid,
        plaintext,
        auth,
    } = opts;
    let def = cellplane_router::RoutersDef::load(&routers)?;
    let me = def
        .router(id)
        .with_context(|| format!("--id {id}: {} defines no router {id}", routers.display()))?;
    let folder = routers.parent().unwrap_or(std::path::Path::new("."));
    let directory = cellplane_cell::CellDef::load(&folder.join(format!("{}.toml", def.directory)))?;
    let tls = match def.router_tls(id) {
        Some(_) if plaintext => {
            tracing::warn!("--plaintext: serving and dialling without TLS");
            None
        }
        Some(files) => Some(files.load()?),
        None => None,
    };
    let mut auth_settings = def.auth.resolved(&def.base_dir);
    if let Some(on) = auth {
        auth_settings.enabled = on == OnOff::On;
    }
    if auth_settings.enabled && tls.is_none() {
        tracing::warn!(
            "auth without TLS: passwords and tokens cross the network in the clear, and cells \
             accept any caller"
        );
    }
    let config = cellplane_router::RouterConfig {
        id,
        state_dir,
        static_map: folder.join(&def.static_map),
        directory_endpoints: directory
            .members
            .iter()
            .map(|m| m.client.to_string())
            .collect(),
        settings: def.settings.clone(),
        tls,
        auth: auth_settings,
    };
    let bind = |a: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("cannot bind {a}"))
    };
    let listeners = cellplane_router::RouterListeners {
        client: bind(me.client).await?,
        admin: bind(me.admin).await?,
        http: bind(me.http).await?,
    };
    let shutdown = cellplane::signals::process_shutdown(parent_pid);
    cellplane_router::run(config, listeners, shutdown).await?;
    Ok(())
}
