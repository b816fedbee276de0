//! `cellplane bucket move <n> --to <cell>`: a hash bucket moves to another cell
//! with its tenants' data ([`cellplane_mover::Mover::move_bucket`]), resumable
//! by running it again.

use std::path::PathBuf;

use cellplane_mover::MoveSettings;

#[derive(clap::Args, Debug)]
pub struct BucketArgs {
    /// The folder of cell definitions (its routers.toml names the directory).
    #[arg(long, default_value = "cells", global = true)]
    pub cells: PathBuf,
    #[command(flatten)]
    pub mover: crate::move_cmd::MoverArgs,
    #[command(subcommand)]
    pub op: BucketOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum BucketOp {
    /// Give bucket <n> to <cell>, moving the data of every tenant of the bucket
    /// that has keys in its current cell; run it again to resume.
    Move {
        bucket: u32,
        #[arg(long)]
        to: String,
        /// The cell the bucket's tenants are in, to finish a move interrupted
        /// after the map gave the bucket away (default: the bucket's cell).
        #[arg(long)]
        from: Option<String>,
        /// Tenants moved at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// How long the old cell keeps each tenant's copy after its move.
        #[arg(long, default_value = "30s", value_parser = crate::client::parse_duration)]
        grace: std::time::Duration,
    },
}

pub async fn run(args: BucketArgs) -> anyhow::Result<()> {
    let BucketOp::Move {
        bucket,
        to,
        from,
        concurrency,
        grace,
    } = args.op;
    let settings = MoveSettings {
        grace,
        ..MoveSettings::default()
    };
    let mover = crate::move_cmd::mover(&args.mover, &args.cells, settings)?;
    let report = mover
        .move_bucket(bucket, &to, from.as_deref(), concurrency)
        .await?;
    crate::move_cmd::refuse_failures(&report, &format!("bucket {bucket}"))?;
    crate::outln!(
        "bucket {bucket} is in cell {to}: {} tenant(s) moved with their data",
        report.moved.len()
    );
    Ok(())
}
