//! `cellplane snapshot restore`: new data directories for a cell, from a snapshot
//! taken with `etcdctl snapshot save` (etcd's `Maintenance.Snapshot`, served by
//! every member in cellplane's own format).
//!
//! Every member of the cell file gets `<data-dir>/<id>` holding the snapshot's
//! key-value state and no Raft state: started with `cellplane node`, the members
//! form a new Raft group (the cell file's name gives its cluster id) whose
//! revisions continue from the snapshot's.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cellplane_cell::CellDef;

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub op: SnapshotOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotOp {
    /// Build fresh data directories for every member of a cell from a snapshot.
    Restore {
        /// The snapshot file (`etcdctl snapshot save FILE` against a member).
        file: PathBuf,
        /// The cell definition of the cell to create.
        #[arg(long)]
        cell: PathBuf,
        /// Where the members' data directories go: `<data-dir>/<member id>`
        /// (what `cellplane node --data-dir` is then given). None may exist yet.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

pub fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.op {
        SnapshotOp::Restore {
            file,
            cell,
            data_dir,
        } => restore(&file, &cell, &data_dir),
    }
}

fn restore(
    file: &std::path::Path,
    cell: &std::path::Path,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let def = CellDef::load(cell)?;
    let dirs: Vec<(u64, PathBuf)> = def
        .members
        .iter()
        .map(|m| (m.id, data_dir.join(m.id.to_string())))
        .collect();
    for (id, dir) in &dirs {
        if dir.exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "member {id}'s data directory {} is not empty: restore makes a new cell, \
                 into directories that do not exist yet",
                dir.display()
            );
        }
    }
    let mut restored = Vec::new();
    for (id, dir) in &dirs {
        let input = std::fs::File::open(file)
            .with_context(|| format!("cannot open the snapshot {}", file.display()))?;
        let summary = cellplane_storage::import_snapshot(dir, std::io::BufReader::new(input));
        match summary {
            Ok(s) => restored.push((*id, s)),
            Err(e) => {
                // Leave nothing half made: a cell with some members restored
                // would start with a minority.
                for (_, d) in &dirs {
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(e).with_context(|| format!("{} is not restorable", file.display()));
            }
        }
    }
    let s = restored[0].1;
    crate::outln!(
        "restored {} key-value records at revision {} (compacted {}) for the {} member(s) of \
         cell {} under {}; start them with `cellplane node --cell {} --id <id> --data-dir {}/<id>`",
        s.pairs,
        s.revision,
        s.compacted,
        restored.len(),
        def.name,
        data_dir.display(),
        cell.display(),
        data_dir.display()
    );
    Ok(())
}
