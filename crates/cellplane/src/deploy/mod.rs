//! `cellplane deploy render compose|k8s|prometheus`: the Compose environment, the
//! Kubernetes manifests and the Prometheus scrape config of `cellplane up`,
//! rendered from `cells/` so that `cells/` stays the one source of the topology
//! (`up`, Compose and Kubernetes run the same cells, the same settings and the
//! same static map, and Prometheus scrapes exactly those processes).
//!
//! Only the addresses change. Locally every process shares 127.0.0.1 and each
//! member has its own ports; deployed, each member has its own host (a static IP
//! on its cell's Compose network, a stable DNS name in Kubernetes) and every
//! member uses the same ports, [`MEMBER_PORTS`]. Each renderer writes a copy of
//! the `cells/` folder with those addresses next to what runs it.
//!
//! In Kubernetes every pod of a StatefulSet runs the same command, so a member
//! finds its own id in its host name: pod `cellplane-alpha-0` is member 1 of cell
//! `alpha` ([`member_id_from_hostname`], `cellplane node --id-from-hostname`).

pub mod compose;
pub mod k8s;
pub mod prometheus;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cellplane_cell::{CellDef, HostPort};
use cellplane_router::RoutersDef;
use cellplane_router::config::{RouterDef, RouterSettings};

use crate::up::{EnvDef, load_env};

/// The ports every deployed member listens on (etcd's): client, peer, http.
pub const MEMBER_PORTS: Ports = Ports {
    client: 2379,
    peer: 2380,
    http: 2381,
};

/// The ports every deployed router listens on: client, admin, http.
pub const ROUTER_PORTS: Ports = Ports {
    client: 2379,
    peer: 2378,
    http: 2377,
};

/// Three ports of one process. For a router `peer` is its admin port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub client: u16,
    pub peer: u16,
    pub http: u16,
}

/// Where the rendered `cells/` folder is mounted in every container.
pub const CELLS_MOUNT: &str = "/etc/cellplane/cells";

/// The image the Compose file and the manifests run by default;
/// `deploy/build-image.sh` builds it (`--image` names another).
pub const IMAGE: &str = "cellplane:local";

/// What a render may vary besides `cells/`. The committed renders are made with
/// the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// The image every cellplane container runs.
    pub image: String,
    /// Kubernetes: spread each cell's members over zones.
    pub zone_spread: bool,
    /// Kubernetes: how strictly a cell's members are kept on different nodes.
    pub anti_affinity: AntiAffinity,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            image: IMAGE.to_string(),
            zone_spread: false,
            anti_affinity: AntiAffinity::Required,
        }
    }
}

/// Whether two members of a cell may share a node.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AntiAffinity {
    /// Never: a member stays Pending rather than join a cell-mate's node (a node
    /// lost then costs a cell one member at most). Needs as many nodes as the
    /// largest cell has members.
    Required,
    /// Avoided when the scheduler can: for clusters with fewer nodes than a cell
    /// has members (a one-node kind or k3s), where `required` would leave members
    /// Pending and the cell without a quorum.
    Preferred,
}

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    #[command(subcommand)]
    pub op: DeployOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum DeployOp {
    /// Write the Compose environment, the Kubernetes manifests or the Prometheus
    /// config of `cellplane up` for the cells in --cells.
    Render {
        target: Target,
        /// The folder of cell definitions.
        #[arg(long, default_value = "cells")]
        cells: PathBuf,
        /// Where to write; default deploy/compose, deploy/k8s or deploy/prometheus.
        /// For compose and k8s, files of the kinds rendered there (.yml, .yaml,
        /// .toml) that the render does not produce are removed, so a deleted cell
        /// leaves nothing behind; prometheus writes its one file and removes nothing.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The image the containers run: a registry reference your cluster can
        /// pull (`registry.example.com/cellplane:1.0`), or an image loaded into
        /// its nodes (deploy/README.md).
        #[arg(long, default_value = IMAGE)]
        image: String,
        /// k8s: spread each cell's members evenly over the zones
        /// (topologySpreadConstraints on topology.kubernetes.io/zone). Off by
        /// default: nodes without that label (kind, k3s, most bare-metal clusters)
        /// could then take no member at all.
        #[arg(long)]
        zone_spread: bool,
        /// k8s: keep a cell's members on different nodes strictly (`required`) or
        /// when possible (`preferred`, for clusters with fewer nodes than a cell
        /// has members).
        #[arg(long, value_enum, default_value_t = AntiAffinity::Required)]
        anti_affinity: AntiAffinity,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// deploy/compose/: the Compose environment (and its Prometheus config).
    Compose,
    /// deploy/k8s/: the Kubernetes manifests.
    K8s,
    /// deploy/prometheus/prometheus.yml: Prometheus scraping `cellplane up`.
    Prometheus,
}

/// Rendered files, by path relative to the output folder.
pub type Rendered = BTreeMap<PathBuf, String>;

pub fn run(args: DeployArgs) -> anyhow::Result<()> {
    match args.op {
        DeployOp::Render {
            target,
            cells,
            out,
            image,
            zone_spread,
            anti_affinity,
        } => {
            let opts = RenderOptions {
                image,
                zone_spread,
                anti_affinity,
            };
            let defaults = RenderOptions::default();
            if target != Target::K8s
                && (opts.zone_spread != defaults.zone_spread
                    || opts.anti_affinity != defaults.anti_affinity)
            {
                bail!("--zone-spread and --anti-affinity are for `deploy render k8s` only");
            }
            if target == Target::Prometheus && opts.image != defaults.image {
                bail!("--image: `deploy render prometheus` renders no container");
            }
            let out = out.unwrap_or_else(|| match target {
                Target::Compose => PathBuf::from("deploy/compose"),
                Target::K8s => PathBuf::from("deploy/k8s"),
                Target::Prometheus => PathBuf::from("deploy/prometheus"),
            });
            let files = render_with(target, &cells, &opts)?;
            // deploy/prometheus/ holds hand-written files of the same kinds
            // (alert rules, their tests): nothing there is stale.
            if target == Target::Prometheus {
                write_files(&out, &files)?;
            } else {
                write(&out, &files)?;
            }
            crate::outln!(
                "wrote {} file(s) to {} from {}",
                files.len(),
                out.display(),
                cells.display()
            );
            Ok(())
        }
    }
}

/// Renders `target` from the `cells/` folder at `cells` with the default options
/// (as committed).
pub fn render(target: Target, cells: &Path) -> anyhow::Result<Rendered> {
    render_with(target, cells, &RenderOptions::default())
}

/// Renders `target` from the `cells/` folder at `cells`.
pub fn render_with(target: Target, cells: &Path, opts: &RenderOptions) -> anyhow::Result<Rendered> {
    check_image(&opts.image)?;
    let env = load_env(cells)?;
    match target {
        Target::Compose => compose::render(&env, opts),
        Target::K8s => k8s::render(&env, opts),
        Target::Prometheus => prometheus::render_local(&env),
    }
}

/// An image reference goes into YAML and a container runtime's pull: refuse
/// what no runtime accepts (empty, spaces, control characters, a leading `-`)
/// here, with the flag's name, rather than from `kubectl apply` later.
fn check_image(image: &str) -> anyhow::Result<()> {
    let bad = image.is_empty()
        || image.starts_with('-')
        || image.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad {
        bail!(
            "--image `{}`: not an image reference (e.g. cellplane:local, \
             registry.example.com/team/cellplane:1.0)",
            image.escape_debug()
        );
    }
    Ok(())
}

/// Writes `files` under `out` and removes the stale ones (see [`stale_files`]).
pub fn write(out: &Path, files: &Rendered) -> anyhow::Result<()> {
    for path in stale_files(out, files)? {
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    write_files(out, files)
}

/// Writes `files` under `out`, removing nothing.
pub fn write_files(out: &Path, files: &Rendered) -> anyhow::Result<()> {
    for (rel, text) in files {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Files in a folder the render writes to, with an extension it writes there, that
/// it does not produce: left over from an earlier topology. Hand-written files
/// (scripts, READMEs) have other extensions and are never touched.
pub fn stale_files(out: &Path, files: &Rendered) -> anyhow::Result<Vec<PathBuf>> {
    let mut kinds: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for rel in files.keys() {
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if let Some(ext) = rel.extension() {
            kinds
                .entry(dir)
                .or_default()
                .push(ext.to_string_lossy().into_owned());
        }
    }
    let mut stale = Vec::new();
    for (dir, exts) in kinds {
        let Ok(entries) = std::fs::read_dir(out.join(&dir)) else {
            continue;
        };
        for e in entries {
            let e = e.with_context(|| format!("cannot list {}", out.join(&dir).display()))?;
            let path = e.path();
            let rel = dir.join(e.file_name());
            let ext = path
                .extension()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_file() && exts.contains(&ext) && !files.contains_key(&rel) {
                stale.push(path);
            }
        }
    }
    Ok(stale)
}

/// A deployed router `id`: listening on every interface on [`ROUTER_PORTS`], with
/// the certificate paths the local definition of router `id` names (or router 1's
/// naming pattern when there is none).
pub fn deployed_router(env: &EnvDef, id: u64) -> RouterDef {
    let any = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let local = env.routers.router(id);
    let tls = env.routers.tls.is_some();
    let path = |ext: &str| tls.then(|| PathBuf::from(format!("secrets/router-{id}.{ext}")));
    RouterDef {
        id,
        client: any(ROUTER_PORTS.client),
        admin: any(ROUTER_PORTS.peer),
        http: any(ROUTER_PORTS.http),
        cert: local.and_then(|r| r.cert.clone()).or_else(|| path("crt")),
        key: local.and_then(|r| r.key.clone()).or_else(|| path("key")),
    }
}

/// How a renderer places the processes: each member's host, and the routers'
/// definitions.
pub struct Placement<'a> {
    /// The host of member `id` of cell `cell`.
    pub member_host: &'a dyn Fn(&str, u64) -> String,
    /// The routers as deployed (they listen on every interface).
    pub routers: Vec<RouterDef>,
    /// The comment that opens every rendered file.
    pub header: &'a str,
    /// Where the deployed processes find their TLS files and the routers'
    /// credentials and token key, relative to the deployed `cells/` folder:
    /// every such file keeps its name and moves there.
    pub secrets: &'a str,
}

/// Whether the directory cell serves TLS: then seeding it (writing the map, and
/// pushing it to cells) needs an operator's certificate.
pub(crate) fn directory_has_tls(env: &EnvDef) -> bool {
    env.cells
        .iter()
        .any(|(_, d)| d.name == env.routers.directory && d.tls.is_some())
}

/// `file` moved into the folder `dir` (relative to the deployed `cells/`).
pub(crate) fn secret_path(dir: &str, file: &Path) -> PathBuf {
    Path::new(dir).join(file.file_name().unwrap_or(file.as_os_str()))
}

/// The `cells/` folder as deployed: file name → text. Cells keep their names,
/// members and settings; only addresses change (`host:MEMBER_PORTS`); the static
/// map lists the new client addresses. The result passes [`load_env`] (checked by
/// the tests).
pub fn deployed_cells(env: &EnvDef, placement: &Placement) -> anyhow::Result<Rendered> {
    let mut files = Rendered::new();
    let mut endpoints: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, def) in &env.cells {
        let mut def = def.clone();
        if let Some(tls) = &mut def.tls {
            tls.ca = secret_path(placement.secrets, &tls.ca);
        }
        for m in &mut def.members {
            for file in [&mut m.cert, &mut m.key].into_iter().flatten() {
                *file = secret_path(placement.secrets, file);
            }
            let host = (placement.member_host)(&def.name, m.id);
            let addr = |port: u16| -> anyhow::Result<HostPort> {
                format!("{host}:{port}")
                    .parse()
                    .with_context(|| format!("cell {}: member {}", def.name, m.id))
            };
            m.client = addr(MEMBER_PORTS.client)?;
            m.peer = addr(MEMBER_PORTS.peer)?;
            m.http = addr(MEMBER_PORTS.http)?;
        }
        endpoints.insert(
            def.name.clone(),
            def.members.iter().map(|m| m.client.to_string()).collect(),
        );
        let from = path.file_name().map(PathBuf::from).unwrap_or_default();
        files.insert(
            PathBuf::from(format!("{}.toml", def.name)),
            format!(
                "{}# Cell `{}`, from cells/{}.\n{}",
                placement.header,
                def.name,
                from.display(),
                cell_toml(&def)?
            ),
        );
    }
    let mut map = env.static_map.clone();
    for c in &mut map.cells {
        c.endpoints = endpoints
            .get(&c.name)
            .cloned()
            .with_context(|| format!("static map: cell `{}` is not defined", c.name))?;
    }
    files.insert(
        PathBuf::from("routing.toml"),
        format!(
            "{}# The static map, from cells/{}.\n{}",
            placement.header,
            env.routers.static_map.display(),
            map.to_toml()
        ),
    );
    let mut routers = RoutersDef {
        directory: env.routers.directory.clone(),
        static_map: PathBuf::from("routing.toml"),
        routers: placement.routers.clone(),
        settings: env.routers.settings.clone(),
        tls: env.routers.tls.clone(),
        auth: env.routers.auth.clone(),
        base_dir: PathBuf::new(),
    };
    let secrets = placement.secrets;
    if let Some(tls) = &mut routers.tls {
        tls.ca = secret_path(secrets, &tls.ca);
    }
    for r in &mut routers.routers {
        for file in [&mut r.cert, &mut r.key].into_iter().flatten() {
            *file = secret_path(secrets, file);
        }
    }
    routers.auth.credentials = secret_path(secrets, &routers.auth.credentials);
    routers.auth.token_key = secret_path(secrets, &routers.auth.token_key);
    files.insert(
        PathBuf::from("routers.toml"),
        format!(
            "{}# The routers, from cells/routers.toml.\n{}",
            placement.header,
            routers_toml(&routers)?
        ),
    );
    Ok(files)
}

/// A cell definition as TOML, without the setting tables left at their defaults
/// (as a hand-written file would be).
fn cell_toml(def: &CellDef) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'a cellplane_cell::CellRole>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<&'a cellplane_cell::config::CellTls>,
        members: &'a [cellplane_cell::config::MemberDef],
        #[serde(skip_serializing_if = "Option::is_none")]
        raft: Option<&'a cellplane_cell::config::RaftSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limits: Option<&'a cellplane_cell::config::LimitSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        watch: Option<&'a cellplane_cell::config::WatchSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        maintenance: Option<&'a cellplane_cell::config::MaintenanceSettings>,
        #[serde(skip_serializing_if = "Option::is_none")]
        discovery: Option<&'a cellplane_discovery::Settings>,
    }
    fn unless_default<T: Default + PartialEq>(v: &T) -> Option<&T> {
        (*v != T::default()).then_some(v)
    }
    toml::to_string(&Out {
        name: &def.name,
        role: unless_default(&def.role),
        tls: def.tls.as_ref(),
        members: &def.members,
        raft: unless_default(&def.raft),
        limits: unless_default(&def.limits),
        watch: unless_default(&def.watch),
        maintenance: unless_default(&def.maintenance),
        discovery: unless_default(&def.discovery),
    })
    .context("cannot encode a cell definition")
}

fn routers_toml(def: &RoutersDef) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        directory: &'a str,
        static_map: &'a Path,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<&'a cellplane_router::config::RouterTls>,
        #[serde(skip_serializing_if = "Option::is_none")]
        auth: Option<&'a cellplane_router::AuthSettings>,
        routers: &'a [RouterDef],
        #[serde(skip_serializing_if = "Option::is_none")]
        settings: Option<&'a RouterSettings>,
    }
    toml::to_string(&Out {
        directory: &def.directory,
        static_map: &def.static_map,
        tls: def.tls.as_ref(),
        auth: (def.auth != cellplane_router::AuthSettings::default()).then_some(&def.auth),
        routers: &def.routers,
        settings: (def.settings != RouterSettings::default()).then_some(&def.settings),
    })
    .context("cannot encode the routers")
}

/// Members must be numbered 1..=n where a member's id comes from its position
/// (a StatefulSet ordinal, a fixed IP): say which cell is not.
pub fn check_member_ids(def: &CellDef) -> anyhow::Result<()> {
    let mut ids: Vec<u64> = def.members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    let want: Vec<u64> = (1..=def.members.len() as u64).collect();
    if ids != want {
        bail!(
            "cell {}: member ids {:?} must be 1..={} to be deployed (an id is the pod's ordinal + 1)",
            def.name,
            ids,
            def.members.len()
        );
    }
    Ok(())
}

/// The member id encoded in a StatefulSet pod's host name: `<...><cell>-<N>` is
/// member N+1 of `cell`. A host name of another cell is refused, so a pod started
/// with the wrong cell file fails at once instead of joining the wrong group.
pub fn member_id_from_hostname(cell: &str, hostname: &str) -> anyhow::Result<u64> {
    let name = hostname.split('.').next().unwrap_or(hostname);
    let parsed = name.rsplit_once('-').and_then(|(prefix, ordinal)| {
        let n: u64 = ordinal.parse().ok()?;
        let ours = prefix == cell || prefix.ends_with(&format!("-{cell}"));
        ours.then_some(n + 1)
    });
    parsed.with_context(|| {
        format!(
            "--id-from-hostname: host name `{hostname}` is not `<prefix>-{cell}-<ordinal>` \
             (a pod of cell {cell}'s StatefulSet); pass --id instead"
        )
    })
}

/// This machine's host name: `$HOSTNAME` (set by Docker and Kubernetes), else the
/// kernel's.
pub fn own_hostname() -> anyhow::Result<String> {
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.trim().is_empty()
    {
        return Ok(h.trim().to_string());
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").context(
        "--id-from-hostname: $HOSTNAME is not set and the kernel's host name is unreadable",
    )?;
    Ok(h.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_come_from_pod_ordinals() {
        assert_eq!(
            member_id_from_hostname("alpha", "cellplane-alpha-0").unwrap(),
            1
        );
        assert_eq!(member_id_from_hostname("alpha", "alpha-2").unwrap(), 3);
        assert_eq!(
            member_id_from_hostname("alpha", "cellplane-alpha-1.cellplane-alpha.ns.svc").unwrap(),
            2
        );
        for bad in [
            "cellplane-beta-0",
            "cellplane-alpha",
            "alpha-x",
            "xalpha-0",
            "alpha-",
        ] {
            let e = member_id_from_hostname("alpha", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad) && e.contains("--id"), "{e}");
        }
    }

    #[test]
    fn stale_files_are_only_rendered_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(out.join("cells")).unwrap();
        for f in [
            "a.yml",
            "old.yml",
            "fault.sh",
            "cells/x.toml",
            "cells/old.toml",
        ] {
            std::fs::write(out.join(f), "").unwrap();
        }
        let files: Rendered = [("a.yml", ""), ("cells/x.toml", "")]
            .into_iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        let mut stale = stale_files(out, &files).unwrap();
        stale.sort();
        assert_eq!(stale, vec![out.join("cells/old.toml"), out.join("old.yml")]);
    }
}
