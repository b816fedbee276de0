//! `cellplane tenant add | remove | list`: the password credentials routers check
//! (`[auth] credentials` in routers.toml). Running routers pick a change up within
//! their reload interval; removing a user or changing its password also revokes
//! the tokens it holds. `cellplane tenant move | moves` move a tenant's data
//! between cells ([`crate::move_cmd`]).

use std::path::PathBuf;

use anyhow::Context;
use cellplane_security::credentials::{Credentials, Role};

#[derive(clap::Args, Debug)]
pub struct TenantArgs {
    /// The folder of cell definitions (its routers.toml names the credentials file).
    #[arg(long, default_value = "cells", global = true)]
    pub cells: PathBuf,
    /// The credentials file itself, instead of the one routers.toml names.
    #[arg(long, global = true)]
    pub file: Option<PathBuf>,
    #[command(subcommand)]
    pub op: TenantOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum TenantOp {
    /// Add a tenant (or, with --operator, an operator) with a password.
    Add {
        name: String,
        /// An operator (compaction, maintenance, the map), not a tenant.
        #[arg(long)]
        operator: bool,
        /// The password; without it, the first line of stdin.
        #[arg(long)]
        password: Option<String>,
        /// Change the password (and role) of an existing user.
        #[arg(long)]
        replace: bool,
    },
    /// Remove a user; its tokens stop working.
    Remove { name: String },
    /// List users and roles (never passwords).
    List,
    /// Move a tenant and its keys to another cell (or resume or abort a move).
    Move(crate::move_cmd::MoveArgs),
    /// List the moves in progress.
    Moves(crate::move_cmd::MoverArgs),
}

fn credentials_path(cells: &std::path::Path, file: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(f) = file {
        return Ok(f);
    }
    let routers = cellplane_router::RoutersDef::load(&cells.join("routers.toml"))?;
    Ok(routers.base_dir.join(&routers.auth.credentials))
}

pub async fn run(args: TenantArgs) -> anyhow::Result<()> {
    let TenantArgs { cells, file, op } = args;
    match op {
        TenantOp::Move(m) => crate::move_cmd::run(m, &cells).await,
        TenantOp::Moves(m) => crate::move_cmd::list(m, &cells).await,
        op => credentials(&cells, file, op),
    }
}

/// The credentials verbs: add, remove, list.
fn credentials(cells: &std::path::Path, file: Option<PathBuf>, op: TenantOp) -> anyhow::Result<()> {
    let path = credentials_path(cells, file)?;
    let mut creds = Credentials::load_or_empty(&path)?;
    match op {
        TenantOp::Add {
            name,
            operator,
            password,
            replace,
        } => {
            let role = if operator {
                Role::Operator
            } else {
                Role::Tenant
            };
            cellplane_security::credentials::check_user_name(role, &name)?;
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("cannot read the password from stdin")?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            creds.add(&name, role, &password, replace)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            creds.save(&path)?;
            crate::outln!("{role} {name} saved in {}", path.display());
        }
        TenantOp::Remove { name } => {
            if !creds.remove(&name) {
                anyhow::bail!("no user {name:?} in {}", path.display());
            }
            creds.save(&path)?;
            crate::outln!("removed {name} from {}", path.display());
        }
        TenantOp::List => {
            crate::outln!("{:<10} NAME", "ROLE");
            for u in &creds.users {
                crate::outln!("{:<10} {}", u.role.to_string(), u.name);
            }
        }
        TenantOp::Move(_) | TenantOp::Moves(_) => {}
    }
    Ok(())
}
