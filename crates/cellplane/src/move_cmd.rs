//! `cellplane tenant move <tenant> --to <cell> | --resume | --abort`, and
//! `cellplane tenant moves`: the tenant mover ([`cellplane_mover`]) from the
//! command line. The migration record in the directory is the source of truth:
//! a mover killed at any step is resumed or aborted from it.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use cellplane_mover::{MoveSettings, MoveState, Mover};

/// Where the directory is, and as whom to talk to it and to the cells.
#[derive(clap::Args, Debug)]
pub struct MoverArgs {
    /// Directory endpoints (host:port, comma-separated). Default: the members of
    /// the directory cell named in <cells>/routers.toml.
    #[arg(long, value_delimiter = ',', global = true)]
    pub directory: Vec<String>,
    /// With TLS on, moving a tenant needs an operator's certificate.
    #[command(flatten)]
    pub tls: crate::client::TlsArgs,
}

#[derive(clap::Args, Debug)]
pub struct MoveArgs {
    /// The tenant to move.
    pub tenant: String,
    /// The cell to move it to.
    #[arg(long, required_unless_present_any = ["resume", "abort"])]
    pub to: Option<String>,
    /// Resume the move in progress from its record.
    #[arg(long, conflicts_with_all = ["to", "abort"])]
    pub resume: bool,
    /// Roll the move in progress back (before its cut-over).
    #[arg(long, conflicts_with_all = ["to", "resume"])]
    pub abort: bool,
    /// The longest the tenant's writes may be refused before the move rolls back.
    #[arg(long, default_value = "5s", value_parser = crate::client::parse_duration)]
    pub fence_deadline: Duration,
    /// How long the old cell keeps its copy after the cut-over.
    #[arg(long, default_value = "30s", value_parser = crate::client::parse_duration)]
    pub grace: Duration,
    /// Refuse a tenant with more keys than this.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_keys: u64,
    /// Stop right after this step is recorded (copying, fenced, verified,
    /// cut-over), as if the mover were killed there: to rehearse --resume and
    /// --abort.
    #[arg(long)]
    pub stop_after: Option<MoveState>,
    #[command(flatten)]
    pub mover: MoverArgs,
}

/// A mover talking to the directory `args` (or `cells`/routers.toml) names.
pub fn mover(args: &MoverArgs, cells: &Path, settings: MoveSettings) -> anyhow::Result<Mover> {
    let endpoints = if args.directory.is_empty() {
        crate::map_cmd::directory_endpoints(cells)?
    } else {
        args.directory.clone()
    };
    let tls = args.tls.client_config()?;
    Ok(Mover::new(&endpoints, tls, settings, |line| {
        crate::outln!("{line}");
    })?)
}

/// `cellplane tenant move`, with the cell definitions in `cells`.
pub async fn run(args: MoveArgs, cells: &Path) -> anyhow::Result<()> {
    let settings = MoveSettings {
        fence_deadline: args.fence_deadline,
        grace: args.grace,
        max_keys: args.max_keys,
        stop_after: args.stop_after,
    };
    let m = mover(&args.mover, cells, settings)?;
    if args.abort {
        m.abort(&args.tenant).await?;
        return Ok(());
    }
    let report = if args.resume {
        m.resume(&args.tenant).await?
    } else {
        let Some(to) = &args.to else {
            bail!("--to <cell> is needed to start a move");
        };
        m.start(&args.tenant, to).await?
    };
    crate::outln!(
        "moved tenant {} from {} to {}: {} keys, {} bytes, {} leases; writes refused for {} ms (fence window); map version {}",
        report.tenant,
        report.from,
        report.to,
        report.keys,
        report.bytes,
        report.leases,
        report.fence_window.as_millis(),
        report.version
    );
    Ok(())
}

/// `cellplane tenant moves`: the moves in progress.
pub async fn list(args: MoverArgs, cells: &Path) -> anyhow::Result<()> {
    let m = mover(&args, cells, MoveSettings::default())?;
    let moves = m.list().await?;
    if moves.is_empty() {
        crate::outln!("no move in progress");
        return Ok(());
    }
    crate::outln!(
        "{:<20} {:<12} {:<12} {:<10} VERSION",
        "TENANT",
        "FROM",
        "TO",
        "STATE"
    );
    for r in moves {
        crate::outln!(
            "{:<20} {:<12} {:<12} {:<10} {}",
            r.tenant,
            r.from,
            r.to,
            r.state.to_string(),
            r.version
        );
    }
    Ok(())
}

/// Prints each tenant of `what` (a cell, a bucket) that did not move, and fails
/// if any did not: running the command again resumes.
pub fn refuse_failures(report: &cellplane_mover::DrainReport, what: &str) -> anyhow::Result<()> {
    for (tenant, e) in &report.failed {
        crate::outln!("tenant {tenant}: not moved: {e}");
    }
    if !report.failed.is_empty() {
        anyhow::bail!(
            "{} tenant(s) of {what} did not move; run the command again once the cause is fixed",
            report.failed.len()
        );
    }
    Ok(())
}
