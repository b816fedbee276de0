//! `cellplane certs generate | issue`: the TLS material a `cells/` folder names.
//!
//! `generate` makes a CA (unless one is there) and, at the paths the cell files
//! and `routers.toml` name, a certificate and key for every member (naming its
//! cell and id, valid for its addresses and loopback) and every router, plus an
//! operator's and one for each tenant pinned in the static map, the routers'
//! token key and, with auth on, an empty credentials file. Existing files are
//! kept unless `--force`, so a rerun fills gaps.
//! `issue` adds a certificate for one tenant or operator.
//!
//! The CA key sits next to the CA certificate (`ca.key` beside `ca.crt`): fine for
//! a local or Compose environment; in production keep it offline and issue with
//! `issue --out` on the machine that holds it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cellplane_security::Identity;
use cellplane_security::issue::{Authority, Issued};

use crate::up::{EnvDef, load_env};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// The folder of cell definitions.
    #[arg(long, default_value = "cells", global = true)]
    pub cells: PathBuf,
    /// Validity of new certificates, in days.
    #[arg(long, default_value_t = 365, global = true)]
    pub days: u32,
    #[command(subcommand)]
    pub op: CertsOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum CertsOp {
    /// Write the CA and every certificate the cells folder names.
    Generate {
        /// Replace existing certificates and keys (the CA too: every process
        /// then needs its new certificate).
        #[arg(long)]
        force: bool,
    },
    /// Issue one certificate from the folder's CA.
    Issue {
        /// A tenant certificate (`cellplane://tenant/<name>`).
        #[arg(
            long,
            conflicts_with = "operator",
            required_unless_present = "operator"
        )]
        tenant: Option<String>,
        /// An operator certificate (`cellplane://operator/<name>`).
        #[arg(long)]
        operator: Option<String>,
        /// Where to write `<name>.crt` and `<name>.key`; default: beside the CA.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let env = load_env(&args.cells)?;
    match args.op {
        CertsOp::Generate { force } => {
            let written = generate(&env, args.days, force)?;
            crate::outln!(
                "wrote {written} file(s) under {}; existing ones were kept{}",
                ca_path(&env)?.parent().unwrap_or(Path::new(".")).display(),
                if force { " (--force: none)" } else { "" }
            );
            Ok(())
        }
        CertsOp::Issue {
            tenant,
            operator,
            out,
        } => {
            let (id, name) = match (tenant, operator) {
                (Some(t), _) => (Identity::tenant(&t)?, format!("tenant-{t}")),
                (None, Some(o)) => (Identity::operator(&o)?, format!("operator-{o}")),
                (None, None) => bail!("--tenant or --operator"),
            };
            let ca_cert = ca_path(&env)?;
            let ca = load_ca(&ca_cert)?;
            let dir = out.unwrap_or_else(|| ca_cert.parent().unwrap_or(Path::new(".")).into());
            let issued = ca.issue(&id, &[], args.days)?;
            let (crt, key) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            write_pair(&crt, &key, &issued)?;
            crate::outln!("{id}: {} and {}", crt.display(), key.display());
            Ok(())
        }
    }
}

/// The CA certificate the folder's files name (they must agree on one).
fn ca_path(env: &EnvDef) -> anyhow::Result<PathBuf> {
    let mut cas = Vec::new();
    for (_, def) in &env.cells {
        if let Some(t) = &def.tls {
            cas.push(def.base_dir.join(&t.ca));
        }
    }
    if let Some(t) = &env.routers.tls {
        cas.push(env.routers.base_dir.join(&t.ca));
    }
    let Some(first) = cas.first().cloned() else {
        bail!(
            "no file in the cells folder has a [tls] section: nothing names a CA (add `[tls] ca = \
             \"secrets/ca.crt\"` and member cert/key fields)"
        );
    };
    if let Some(other) = cas.iter().find(|c| **c != first) {
        bail!(
            "the cells folder names two CAs ({} and {}): every process of an environment \
             trusts one",
            first.display(),
            other.display()
        );
    }
    Ok(first)
}

/// The CA key beside its certificate: `ca.crt` → `ca.key`.
fn ca_key_path(ca_cert: &Path) -> PathBuf {
    ca_cert.with_extension("key")
}

fn load_ca(ca_cert: &Path) -> anyhow::Result<Authority> {
    let key_path = ca_key_path(ca_cert);
    let cert = std::fs::read_to_string(ca_cert)
        .with_context(|| format!("cannot read the CA certificate {}", ca_cert.display()))?;
    let key = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "cannot read the CA key {} (`cellplane certs generate` makes one)",
            key_path.display()
        )
    })?;
    Ok(Authority::load(&cert, &key)?)
}

fn write_pair(crt: &Path, key: &Path, issued: &Issued) -> anyhow::Result<()> {
    for p in [crt, key] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    std::fs::write(crt, &issued.cert_pem)
        .with_context(|| format!("cannot write {}", crt.display()))?;
    cellplane_security::write_private(key, issued.key_pem.as_bytes())
        .with_context(|| format!("cannot write {}", key.display()))?;
    Ok(())
}

/// Every host a process is dialled by: its own, and loopback (a member dials its
/// own client port over loopback; local tools use 127.0.0.1).
fn hosts(own: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut h: Vec<String> = own.into_iter().collect();
    h.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    h.retain(|x| x != "0.0.0.0" && x != "::");
    h.sort();
    h.dedup();
    h
}

/// One certificate to make: its identity, hosts, and where it goes.
struct Wanted {
    id: Identity,
    hosts: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
}

fn wanted(env: &EnvDef, ca_dir: &Path) -> Vec<Wanted> {
    let mut out = Vec::new();
    for (_, def) in &env.cells {
        if def.tls.is_none() {
            continue;
        }
        for m in &def.members {
            let (Some(cert), Some(key)) = (&m.cert, &m.key) else {
                continue;
            };
            out.push(Wanted {
                id: Identity::Member {
                    cell: def.name.clone(),
                    id: m.id,
                },
                hosts: hosts([m.client.host(), m.peer.host()].map(str::to_string)),
                cert: def.base_dir.join(cert),
                key: def.base_dir.join(key),
            });
        }
    }
    let r = &env.routers;
    if r.tls.is_some() {
        for def in &r.routers {
            let (Some(cert), Some(key)) = (&def.cert, &def.key) else {
                continue;
            };
            out.push(Wanted {
                id: Identity::Router(def.id),
                hosts: hosts([def.client.ip(), def.admin.ip()].map(|ip| ip.to_string())),
                cert: r.base_dir.join(cert),
                key: r.base_dir.join(key),
            });
        }
    }
    let client = |id: Identity, name: String| Wanted {
        id,
        hosts: Vec::new(),
        cert: ca_dir.join(format!("{name}.crt")),
        key: ca_dir.join(format!("{name}.key")),
    };
    out.push(client(
        Identity::Operator("admin".into()),
        "operator-admin".into(),
    ));
    for tenant in env.static_map.tenants.keys() {
        if let Ok(id) = Identity::tenant(tenant) {
            out.push(client(id, format!("tenant-{tenant}")));
        }
    }
    out
}

/// Writes what is missing (everything with `force`); returns how many files.
pub fn generate(env: &EnvDef, days: u32, force: bool) -> anyhow::Result<usize> {
    let ca_cert = ca_path(env)?;
    let ca_key = ca_key_path(&ca_cert);
    let ca_dir = ca_cert.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut written = 0;
    let ca = if force || !ca_cert.exists() {
        let ca = Authority::generate("cellplane environment CA", days.max(3650))?;
        write_pair(
            &ca_cert,
            &ca_key,
            &Issued {
                cert_pem: ca.cert_pem().to_string(),
                key_pem: ca.key_pem(),
            },
        )?;
        written += 2;
        ca
    } else {
        load_ca(&ca_cert)?
    };
    for w in wanted(env, &ca_dir) {
        if !force && w.cert.exists() && w.key.exists() {
            continue;
        }
        write_pair(&w.cert, &w.key, &ca.issue(&w.id, &w.hosts, days)?)?;
        written += 2;
    }
    let token_key = env.routers.base_dir.join(&env.routers.auth.token_key);
    if force || !token_key.exists() {
        if let Some(dir) = token_key.parent() {
            std::fs::create_dir_all(dir)?;
        }
        cellplane_security::write_private(
            &token_key,
            cellplane_security::token::new_key_line().as_bytes(),
        )
        .with_context(|| format!("cannot write {}", token_key.display()))?;
        written += 1;
    }
    if env.routers.auth.enabled && ensure_credentials(env)? {
        written += 1;
    }
    Ok(written)
}

/// Creates the routers' credentials file, empty, when it does not exist (a router
/// with auth on needs one to start; `cellplane tenant add` fills it). Returns
/// whether it wrote one.
pub fn ensure_credentials(env: &EnvDef) -> anyhow::Result<bool> {
    let creds = env.routers.base_dir.join(&env.routers.auth.credentials);
    if creds.exists() {
        return Ok(false);
    }
    cellplane_security::Credentials::default().save(&creds)?;
    Ok(true)
}

/// The CA and the operator certificate `generate` writes (`operator-admin`).
pub fn operator_files(env: &EnvDef) -> anyhow::Result<cellplane_security::TlsFiles> {
    let ca = ca_path(env)?;
    let dir = ca.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(cellplane_security::TlsFiles {
        cert: dir.join("operator-admin.crt"),
        key: dir.join("operator-admin.key"),
        ca,
    })
}
