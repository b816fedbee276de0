//! `cellplane cell add <file> | drain <cell>`: cells come and go with their data.
//! `add` puts a defined cell into the live map (it serves nothing until tenants
//! move to it); `drain` moves every tenant that has keys in a cell to the other
//! active cells ([`cellplane_mover::Mover::drain`]), resumable by running it again.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cellplane_map::{CellEntry, CellState};
use cellplane_mover::MoveSettings;

#[derive(clap::Args, Debug)]
pub struct CellArgs {
    /// The folder of cell definitions (its routers.toml names the directory).
    #[arg(long, default_value = "cells", global = true)]
    pub cells: PathBuf,
    #[command(flatten)]
    pub mover: crate::move_cmd::MoverArgs,
    #[command(subcommand)]
    pub op: CellOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum CellOp {
    /// Add the cell defined in <file> to the live map (and push the map to it).
    Add { file: PathBuf },
    /// Move every tenant with keys in <cell> to the other active cells, and
    /// leave <cell> draining; run it again to resume.
    Drain {
        cell: String,
        /// Tenants moved at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// How long the drained cell keeps each tenant's copy after its move.
        #[arg(long, default_value = "30s", value_parser = crate::client::parse_duration)]
        grace: std::time::Duration,
    },
}

pub async fn run(args: CellArgs) -> anyhow::Result<()> {
    match args.op {
        CellOp::Add { file } => add(&args.mover, &args.cells, &file).await,
        CellOp::Drain {
            cell,
            concurrency,
            grace,
        } => {
            let settings = MoveSettings {
                grace,
                ..MoveSettings::default()
            };
            let mover = crate::move_cmd::mover(&args.mover, &args.cells, settings)?;
            let report = mover.drain(&cell, concurrency).await?;
            crate::move_cmd::refuse_failures(&report, &format!("cell {cell}"))?;
            crate::outln!(
                "cell {cell} drained: {} tenant(s) moved; it serves no tenant now. Remove it \
                 from the map (`cellplane map apply`) once no router needs it, then stop it",
                report.moved.len()
            );
            Ok(())
        }
    }
}

/// Adds the cell defined in `file` to the directory's map, then pushes the map
/// to every cell (the new one learns it owns nothing yet).
async fn add(args: &crate::move_cmd::MoverArgs, cells: &Path, file: &Path) -> anyhow::Result<()> {
    let def = cellplane_cell::CellDef::load(file)?;
    let endpoints = if args.directory.is_empty() {
        crate::map_cmd::directory_endpoints(cells)?
    } else {
        args.directory.clone()
    };
    let tls = args.tls.client_config()?;
    let dir = cellplane_router::directory::Directory::new(
        &endpoints,
        std::time::Duration::from_secs(3),
        tls.as_ref(),
    )
    .map_err(anyhow::Error::msg)?;
    let (map, rev) = dir
        .read()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the directory's map")?;
    if map.cells.iter().any(|c| c.name == def.name) {
        bail!("the map already has a cell {}", def.name);
    }
    let mut next = map.clone();
    next.version = map.next_version()?;
    next.cells.push(CellEntry {
        name: def.name.clone(),
        endpoints: def.members.iter().map(|m| m.client.to_string()).collect(),
        state: CellState::Active,
    });
    next.validate_successor(&map)?;
    dir.write(&next, rev).await?;
    crate::outln!("map version {}: cell {} added", next.version, def.name);
    crate::map_cmd::push_to_cells(&next, tls.as_ref()).await?;
    crate::outln!(
        "cell {} serves no tenant yet: move tenants to it with `cellplane tenant move <t> --to {}`",
        def.name,
        def.name
    );
    Ok(())
}
