//! The Compose environment (`deploy/compose/`): one container per member and per
//! router, from the `cellplane:local` image (`--image` names another); a one-shot
//! `seed` container that writes the static map into the directory unless it holds
//! one and pushes the directory's map to every cell (`cellplane map seed`, what
//! `cellplane up` does on start); and a `prometheus` container
//! ([`PROMETHEUS_IMAGE`]) scraping every member and router with the alert rules of
//! `deploy/prometheus/`, its config rendered as `deploy/compose/prometheus.yml`.
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
//! one), Prometheus on [`PROMETHEUS_PORT`] (`CELLPLANE_PROMETHEUS_PORT`), every
//! other port on a port Docker picks (`docker-compose port`).
//!
//! The seed and Prometheus containers join every cell network, as routers do,
//! at `.253` and `.254` (routers take `.201`-`.250`).
//!
//! Containers carry labels (`cellplane.role`, `cellplane.cell`, `cellplane.id`,
//! `cellplane.ip`; a router `cellplane.ip.<cell>` per network) so
//! `deploy/compose/fault.sh` finds a container and its addresses without parsing
//! this file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cellplane_router::config::RouterDef;
use serde_json::{Value, json};

use super::prometheus::{self, RouterTarget};
use super::{CELLS_MOUNT, MEMBER_PORTS, Placement, ROUTER_PORTS, RenderOptions, Rendered};
use crate::up::EnvDef;

/// The Prometheus image: Debian's Prometheus binary on `FROM scratch`, built by
/// `deploy/prometheus/build-image.sh`.
pub const PROMETHEUS_IMAGE: &str = "cellplane-prometheus:local";

/// Where Prometheus is published on 127.0.0.1 unless `CELLPLANE_PROMETHEUS_PORT`
/// says otherwise: Prometheus's own port, which no port of `cells/` takes.
pub const PROMETHEUS_PORT: u16 = 9090;

/// The one-shot service that seeds the directory.
pub const SEED_SERVICE: &str = "seed";
/// The Prometheus service.
pub const PROMETHEUS_SERVICE: &str = "prometheus";

/// Where the Prometheus container finds `deploy/prometheus/` (the alert rules,
/// as in the repository: no image rebuild when they change). The folder is
/// mounted rather than the rules file: Docker would create a missing bind-mount
/// source as a directory.
const RULES_MOUNT: &str = "/etc/prometheus/rules";

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

/// The address of a helper container (seed, Prometheus) on cell network `k`.
fn helper_ip(k: usize, host: u8) -> String {
    format!("{SUBNET_PREFIX}.{k}.{host}")
}

/// The service (and host) name of a member.
pub fn member_service(cell: &str, id: u64) -> String {
    format!("{cell}-{id}")
}

pub fn router_service(id: u64) -> String {
    format!("router-{id}")
}

pub fn render(env: &EnvDef, opts: &RenderOptions) -> anyhow::Result<Rendered> {
    let image = opts.image.as_str();
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
                    "image": image,
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
                "image": image,
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
    // The helpers join every cell network: the seed reaches the directory and
    // every cell, Prometheus every member and router.
    let helper_networks = |host: u8| -> anyhow::Result<Value> {
        let mut nets = serde_json::Map::new();
        for (_, def) in &env.cells {
            let k = cell_index(env, &def.name).context("cell index")?;
            nets.insert(
                def.name.clone(),
                json!({ "ipv4_address": helper_ip(k, host) }),
            );
        }
        Ok(Value::Object(nets))
    };
    services.insert(
        SEED_SERVICE.to_string(),
        json!({
            "image": image,
            "hostname": SEED_SERVICE,
            "environment": { "NO_COLOR": "1" },
            "command": seed_command(env)?,
            "labels": { "cellplane.role": "seed" },
            "networks": helper_networks(253)?,
            "volumes": [mounted],
            // One-shot: it exits once the map is in the directory and every
            // cell has learned it; `docker-compose up` runs it again, harmlessly.
            "restart": "no",
        }),
    );
    volumes.insert(PROMETHEUS_SERVICE.to_string(), json!({}));
    services.insert(
        PROMETHEUS_SERVICE.to_string(),
        json!({
            "image": PROMETHEUS_IMAGE,
            "hostname": PROMETHEUS_SERVICE,
            // No command: the image's entrypoint names the config, the storage
            // and the listen address (a flag given twice is refused), and
            // these mounts put our files where it looks.
            "labels": { "cellplane.role": "prometheus" },
            "networks": helper_networks(254)?,
            "ports": [format!(
                "127.0.0.1:${{CELLPLANE_PROMETHEUS_PORT-{PROMETHEUS_PORT}}}:{PROMETHEUS_PORT}"
            )],
            "volumes": [
                format!("./{}:/etc/prometheus/prometheus.yml:ro", prometheus::CONFIG_FILE),
                format!("../prometheus:{RULES_MOUNT}:ro"),
                "prometheus:/prometheus",
            ],
            "stop_grace_period": "10s",
        }),
    );
    let members = prometheus::member_targets(env, &|def, m| {
        let k = cell_index(env, &def.name).unwrap_or(0);
        format!("{}:{}", member_ip(k, m.id), MEMBER_PORTS.http)
    });
    let routers: Vec<RouterTarget> = placement
        .routers
        .iter()
        .map(|r| RouterTarget {
            id: r.id,
            http: format!("{}:{}", router_service(r.id), ROUTER_PORTS.http),
        })
        .collect();
    files.insert(
        PathBuf::from(prometheus::CONFIG_FILE),
        prometheus::scrape_config(
            &format!(
                "{HEADER}# The Compose environment's Prometheus (service `{PROMETHEUS_SERVICE}`).\n"
            ),
            &format!("{RULES_MOUNT}/{}", prometheus::RULES_FILE),
            &members,
            &routers,
        )?,
    );
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

/// `cellplane map seed` as the seed container runs it: the mounted `cells/`, and
/// with TLS the operator certificate `cellplane certs generate` writes beside the
/// CA (writing the map and pushing it to cells are operators' calls).
fn seed_command(env: &EnvDef) -> anyhow::Result<Vec<String>> {
    let mut args: Vec<String> = ["map", "seed", "--cells", CELLS_MOUNT]
        .map(String::from)
        .into();
    if super::directory_has_tls(env) {
        let files = crate::certs_cmd::operator_files(env)?;
        let secret = |p: &Path| -> String {
            let rel = super::secret_path("secrets", p);
            format!("{CELLS_MOUNT}/{}", rel.display())
        };
        args.extend([
            "--cacert".to_string(),
            secret(&files.ca),
            "--cert".to_string(),
            secret(&files.cert),
            "--key".to_string(),
            secret(&files.key),
        ]);
    }
    // The cells start beside it: wait for them rather than fail at once.
    args.extend(["--wait".to_string(), "5m".to_string()]);
    Ok(args)
}
