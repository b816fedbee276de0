//! The Compose environment (`deploy/compose/`): one container per member and per
//! router, from the `cellplane:local` image.
//!
//! Each cell has its own network, so cutting a cell off is cutting its network
//! links and nothing else; the routers join every network, as they reach every
//! cell. Cell files name members by IP, so each member has a static IP on its
//! cell's network: `SUBNET_PREFIX.<k>.<10 + id>` where `k` numbers the cells in
//! name order; routers take `.<200 + id>` on every network.
//!
//! Nothing is published on the host but on 127.0.0.1: each router's client and
//! admin ports on the ports `cells/routers.toml` gives them (overridable with
//! `CELLPLANE_ROUTER_<id>_CLIENT_PORT` / `_ADMIN_PORT`; set empty, Docker picks
//! one), every other port on a port Docker picks (`docker-compose port`).
//!
//! Containers carry labels (`cellplane.role`, `cellplane.cell`, `cellplane.id`,
//! `cellplane.ip`; a router `cellplane.ip.<cell>` per network) so
//! `deploy/compose/fault.sh` finds a container and its addresses without parsing
//! this file.

use std::path::PathBuf;

use anyhow::Context;
use cellplane_router::config::RouterDef;
use serde_json::{Value, json};

use super::{CELLS_MOUNT, IMAGE, MEMBER_PORTS, Placement, ROUTER_PORTS, Rendered};
use crate::up::EnvDef;

/// The first two octets of every cell network (`/24` each). Outside Docker's
/// default address pools (172.17-31.x, 192.168.x), so networks Docker creates on
/// its own never overlap these.
pub const SUBNET_PREFIX: &str = "10.213";

/// The Compose file's name in the output folder.
pub const COMPOSE_FILE: &str = "docker-compose.yml";

const HEADER: &str = "# Rendered by `cellplane deploy render compose` from cells/: do not edit,\n\
                      # change cells/ and render again.\n";

/// The number of cell `cell` in the network plan (1-based, name order).
fn cell_index(env: &EnvDef, cell: &str) -> Option<usize> {
    let mut names: Vec<&str> = env.cells.iter().map(|(_, d)| d.name.as_str()).collect();
    names.sort_unstable();
    names.iter().position(|n| *n == cell).map(|i| i + 1)
}

/// Member `id` of cell number `k`.
pub fn member_ip(k: usize, id: u64) -> String {
    format!("{SUBNET_PREFIX}.{k}.{}", 10 + id)
}

fn router_ip(k: usize, id: u64) -> String {
    format!("{SUBNET_PREFIX}.{k}.{}", 200 + id)
}

/// The service (and host) name of a member.
pub fn member_service(cell: &str, id: u64) -> String {
    format!("{cell}-{id}")
}

pub fn router_service(id: u64) -> String {
    format!("router-{id}")
}

pub fn render(env: &EnvDef) -> anyhow::Result<Rendered> {
    if env.cells.len() > 250 {
        anyhow::bail!(
            "{} cells: the Compose network plan has room for 250",
            env.cells.len()
        );
    }
    for (_, def) in &env.cells {
        super::check_member_ids(def)?;
        if def.members.len() > 100 {
            anyhow::bail!(
                "cell {}: more than 100 members do not fit its /24",
                def.name
            );
        }
    }
    for r in &env.routers.routers {
        if r.id == 0 || r.id > 50 {
            anyhow::bail!("router {}: ids 1..=50 fit the Compose network plan", r.id);
        }
    }
    let member_host = |cell: &str, id: u64| member_ip(cell_index(env, cell).unwrap_or(0), id);
    let routers: Vec<RouterDef> = env
        .routers
        .routers
        .iter()
        .map(|r| super::deployed_router(env, r.id))
        .collect();
    let placement = Placement {
        member_host: &member_host,
        routers,
        header: HEADER,
        secrets: "secrets",
    };
    let mut files: Rendered = super::deployed_cells(env, &placement)?
        .into_iter()
        .map(|(p, t)| (PathBuf::from("cells").join(p), t))
        .collect();

    let mounted = format!("./cells:{CELLS_MOUNT}:ro");
    let mut services = serde_json::Map::new();
    let mut volumes = serde_json::Map::new();
    let mut networks = serde_json::Map::new();
    for (_, def) in &env.cells {
        let k = cell_index(env, &def.name).context("cell index")?;
        networks.insert(
            def.name.clone(),
            json!({
                "driver": "bridge",
                "ipam": { "config": [ { "subnet": format!("{SUBNET_PREFIX}.{k}.0/24") } ] },
            }),
        );
        for m in &def.members {
            let name = member_service(&def.name, m.id);
            let ip = member_ip(k, m.id);
            volumes.insert(name.clone(), json!({}));
            services.insert(
                name.clone(),
                json!({
                    "image": IMAGE,
                    "hostname": name,
                    "environment": { "NO_COLOR": "1" },
                    "command": [
                        "node",
                        "--cell", format!("{CELLS_MOUNT}/{}.toml", def.name),
                        "--id", m.id.to_string(),
                        "--data-dir", "/data",
                    ],
                    "labels": {
                        "cellplane.role": "member",
                        "cellplane.cell": def.name,
                        "cellplane.id": m.id.to_string(),
                        "cellplane.ip": ip,
                    },
                    "networks": { def.name.clone(): { "ipv4_address": ip } },
                    "ports": [
                        format!("127.0.0.1::{}", MEMBER_PORTS.client),
                        format!("127.0.0.1::{}", MEMBER_PORTS.http),
                    ],
                    "volumes": [mounted, format!("{name}:/data")],
                    "stop_grace_period": "10s",
                }),
            );
        }
    }
    for (orig, r) in env.routers.routers.iter().zip(&placement.routers) {
        let name = router_service(r.id);
        let mut nets = serde_json::Map::new();
        let mut labels = serde_json::Map::new();
        labels.insert("cellplane.role".into(), json!("router"));
        labels.insert("cellplane.id".into(), json!(r.id.to_string()));
        for (_, def) in &env.cells {
            let k = cell_index(env, &def.name).context("cell index")?;
            let ip = router_ip(k, r.id);
            labels.insert(format!("cellplane.ip.{}", def.name), json!(ip));
            nets.insert(def.name.clone(), json!({ "ipv4_address": ip }));
        }
        volumes.insert(name.clone(), json!({}));
        let id = r.id;
        services.insert(
            name.clone(),
            json!({
                "image": IMAGE,
                "hostname": name,
                // `docker logs` is read as text, not on a terminal.
                "environment": { "NO_COLOR": "1" },
                "command": [
                    "router",
                    "--routers", format!("{CELLS_MOUNT}/routers.toml"),
                    "--id", r.id.to_string(),
                    "--state-dir", "/state",
                ],
                "labels": Value::Object(labels),
                "networks": Value::Object(nets),
                "ports": [
                    format!(
                        "127.0.0.1:${{CELLPLANE_ROUTER_{id}_CLIENT_PORT-{}}}:{}",
                        orig.client.port(),
                        ROUTER_PORTS.client
                    ),
                    format!(
                        "127.0.0.1:${{CELLPLANE_ROUTER_{id}_ADMIN_PORT-{}}}:{}",
                        orig.admin.port(),
                        ROUTER_PORTS.peer
                    ),
                    format!("127.0.0.1::{}", ROUTER_PORTS.http),
                ],
                "volumes": [mounted, format!("{name}:/state")],
                "stop_grace_period": "10s",
            }),
        );
    }
    let doc = json!({
        // 2.4: static addresses (ipam, ipv4_address) with docker-compose 1.x and
        // `docker compose` alike.
        "version": "2.4",
        "services": services,
        "networks": networks,
        "volumes": volumes,
    });
    let yaml = serde_saphyr::to_string(&doc).context("cannot encode the Compose file")?;
    files.insert(
        PathBuf::from(COMPOSE_FILE),
        format!(
            "{HEADER}# Build the image with deploy/build-image.sh; see deploy/README.md.\n{yaml}"
        ),
    );
    Ok(files)
}
