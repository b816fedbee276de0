//! The `cellplane` command. Thin: parses options, sets up logging, calls library
//! code.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "cellplane", version, about = "A cell-based control plane: etcd-compatible cells of Raft members.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cell.
    Node {
        /// The cell definition, e.g. cells/default.toml.
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
    /// Start the local environment defined in cells/ as child processes on 127.0.0.1.
    Up(cellplane::up::UpArgs),
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
            Cmd::Up(args) => cellplane::up::run(args).await,
        }
    })
}

async fn node(cell: PathBuf, id: u64, data_dir: PathBuf, parent_pid: Option<u32>) -> anyhow::Result<()> {
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
    let shutdown = CancellationToken::new();
    tokio::spawn(cellplane::signals::cancel_on_signal(shutdown.clone()));
    if let Some(parent) = parent_pid {
        tokio::spawn(cellplane::signals::cancel_when_orphaned(parent, shutdown.clone()));
    }
    cellplane_cell::run(config, listeners, shutdown).await?;
    Ok(())
}
