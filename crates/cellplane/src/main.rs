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
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cell.
    Node {
        /// The cell definition, e.g. cells/alpha.toml.
        #[arg(long)]
        cell: PathBuf,
        /// This member's id in the cell definition.
        #[arg(long)]
        id: u64,
        /// Where this member keeps its RocksDB.
        #[arg(long)]
        data_dir: PathBuf,
        /// Stop when this process (the `up` supervisor) is gone, so a killed
        /// supervisor leaves no orphan members.
        #[arg(long, hide = true)]
        parent_pid: Option<u32>,
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
    },
    /// Start the local environment defined in cells/ as child processes on 127.0.0.1.
    Up(cellplane::up::UpArgs),
    /// Show the map in force and every cell as a router sees it.
    Status(cellplane::status_cmd::StatusArgs),
    /// Show or change the cell map in the directory.
    Map(cellplane::map_cmd::MapArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Node {
                cell,
                id,
                data_dir,
                parent_pid,
            } => node(cell, id, data_dir, parent_pid).await,
            Cmd::Router {
                routers,
                id,
                state_dir,
                parent_pid,
            } => router(routers, id, state_dir, parent_pid).await,
            Cmd::Up(args) => cellplane::up::run(args).await,
            Cmd::Status(args) => cellplane::status_cmd::run(args).await,
            Cmd::Map(args) => cellplane::map_cmd::run(args).await,
        }
    })
}

async fn node(
    cell: PathBuf,
    id: u64,
    data_dir: PathBuf,
    parent_pid: Option<u32>,
) -> anyhow::Result<()> {
    let cell = cellplane_cell::CellDef::load(&cell)?;
    if cell.member(id).is_none() {
        let ids: Vec<String> = cell.members.iter().map(|m| m.id.to_string()).collect();
        anyhow::bail!(
            "--id {id}: cell {} has no member {id} (its members: {})",
            cell.name,
            ids.join(", ")
        );
    }
    let config = cellplane_cell::NodeConfig { cell, id, data_dir };
    let listeners = cellplane_cell::Listeners::bind(&config).await?;
    let shutdown = cellplane::signals::process_shutdown(parent_pid);
    cellplane_cell::run(config, listeners, shutdown).await?;
    Ok(())
}

async fn router(
    routers: PathBuf,
    id: u64,
    state_dir: PathBuf,
    parent_pid: Option<u32>,
) -> anyhow::Result<()> {
    let def = cellplane_router::RoutersDef::load(&routers)?;
    let me = def
        .router(id)
        .with_context(|| format!("--id {id}: {} defines no router {id}", routers.display()))?;
    let folder = routers.parent().unwrap_or(std::path::Path::new("."));
    let directory = cellplane_cell::CellDef::load(&folder.join(format!("{}.toml", def.directory)))?;
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
