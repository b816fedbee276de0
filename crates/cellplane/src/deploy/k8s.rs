//! The Kubernetes manifests (`deploy/k8s/`), for `kubectl apply -f deploy/k8s/`.
//!
//! - `cells.yaml`: the ConfigMap `cellplane-cells`, the `cells/` folder with
//!   Kubernetes addresses (cell files, routers, the static map), mounted in every
//!   pod at [`CELLS_MOUNT`](super::CELLS_MOUNT).
//! - `cell-<name>.yaml`, per cell: a headless Service, a StatefulSet and a
//!   PodDisruptionBudget, all named `cellplane-<name>`. Pod `cellplane-alpha-0`
//!   is member 1 (`--id-from-hostname`) and is reached by its peers, the routers
//!   and clients at `cellplane-alpha-0.cellplane-alpha:2379`, a name the headless
//!   Service keeps while the pod's IP changes. The Service publishes pods that are
//!   not ready yet (`publishNotReadyAddresses`) and the pods start in parallel: a
//!   member is ready only once its cell has a leader, which needs its peers first.
//!   The budget keeps a quorum: at most a minority of a cell is evicted at once.
//!   A required pod anti-affinity keeps a cell's members on different nodes
//!   (`--anti-affinity preferred` relaxes it for small clusters), and
//!   `--zone-spread` spreads them evenly over zones.
//! - `router.yaml`: the Deployment, Service and PodDisruptionBudget
//!   `cellplane-router`. Routers are interchangeable: every replica runs router 1
//!   of the rendered `routers.toml`, listening on every interface. The Service
//!   exposes the client, admin and http ports.
//! - `seed.yaml`: the Job `cellplane-seed`, `cellplane map seed`: the static map
//!   into the directory unless it holds one, then pushed to every cell (what
//!   `cellplane up` does on start). With TLS it uses the operator certificate of
//!   the Secret `cellplane-seed-secrets`.
//! - `cells/`: the ConfigMap's files as a folder, for `cellplane certs generate
//!   --cells deploy/k8s/cells` (certificates for the pods' DNS names).
//! - `kustomization.yaml`: every manifest, and a Secret per cell, one for the
//!   routers and one for the seed Job made from `deploy/k8s/secrets/`
//!   ([`SECRETS_MOUNT`] in the pods; the cell files name `../secrets/<file>` from
//!   the cells mount).
//!
//! Names are relative (`cellplane-alpha-0.cellplane-alpha`), so the manifests work
//! in whichever namespace they are applied to. Readiness is `/readyz` and liveness
//! `/healthz` on each process's http port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

use super::{
    AntiAffinity, CELLS_MOUNT, MEMBER_PORTS, Placement, ROUTER_PORTS, RenderOptions, Rendered,
};
use crate::up::EnvDef;
use cellplane_router::config::RouterDef;

/// The ConfigMap holding the rendered `cells/` folder.
pub const CONFIG_MAP: &str = "cellplane-cells";

const HEADER: &str = "# Rendered by `cellplane deploy render k8s` from cells/: do not edit,\n\
                      # change cells/ and render again.\n";

/// StatefulSet, headless Service and PodDisruptionBudget of a cell.
pub fn cell_object(cell: &str) -> String {
    format!("cellplane-{cell}")
}

/// The stable DNS name of member `id`: pod `<statefulset>-<id - 1>` under the
/// headless Service of the same name.
pub fn member_host(cell: &str, id: u64) -> String {
    let set = cell_object(cell);
    format!("{set}-{}.{set}", id.saturating_sub(1))
}

pub const ROUTER_OBJECT: &str = "cellplane-router";

/// The Job that seeds the directory, and its Secret's prefix.
pub const SEED_OBJECT: &str = "cellplane-seed";

/// How long `cellplane map seed` in the Job waits for the directory and the cells
/// to answer (they start beside it).
const SEED_WAIT: &str = "10m";

/// The node label a cell's members must not share.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
/// The node label `--zone-spread` spreads members over.
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

fn member_labels(cell: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "cellplane",
        "app.kubernetes.io/component": "member",
        "cellplane.io/cell": cell,
    })
}

fn router_labels() -> Value {
    json!({
        "app.kubernetes.io/name": "cellplane",
        "app.kubernetes.io/component": "router",
    })
}

fn seed_labels() -> Value {
    json!({
        "app.kubernetes.io/name": "cellplane",
        "app.kubernetes.io/component": "seed",
    })
}

/// The conventional annotations a Prometheus with Kubernetes pod discovery
/// scrapes by: `/metrics` on the http port.
fn scrape_annotations(port: u16) -> Value {
    json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port.to_string(),
        "prometheus.io/path": "/metrics",
    })
}

/// Keeps the pods `labels` selects on different nodes: strictly (the scheduler
/// leaves a pod Pending rather than put two on one node) or when it can.
fn spread_over_nodes(labels: &Value, how: AntiAffinity) -> Value {
    let term = json!({
        "labelSelector": { "matchLabels": labels },
        "topologyKey": HOSTNAME_KEY,
    });
    match how {
        AntiAffinity::Required => json!({
            "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [term] },
        }),
        AntiAffinity::Preferred => json!({
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    { "weight": 100, "podAffinityTerm": term },
                ],
            },
        }),
    }
}

/// Spreads the pods `labels` selects evenly over zones: at most one more in any
/// zone than in another. `strict`: a pod waits (Pending) rather than break that.
fn spread_over_zones(labels: &Value, strict: bool) -> Value {
    json!([{
        "maxSkew": 1,
        "topologyKey": ZONE_KEY,
        "whenUnsatisfiable": if strict { "DoNotSchedule" } else { "ScheduleAnyway" },
        "labelSelector": { "matchLabels": labels },
    }])
}

/// The PodDisruptionBudget of a cell of `members`: a quorum stays available, so
/// a voluntary eviction (a node drain) never takes a cell's majority: 2 of 3, 3
/// of 5 (at most 1 and 2 evicted at once). A 1-member cell therefore blocks
/// evictions until it is grown.
pub fn quorum(members: usize) -> usize {
    members / 2 + 1
}

fn cells_volume() -> Value {
    json!({ "name": "cells", "configMap": { "name": CONFIG_MAP } })
}

fn cells_mount() -> Value {
    json!({ "name": "cells", "mountPath": CELLS_MOUNT, "readOnly": true })
}

fn probes() -> (Value, Value) {
    (
        json!({
            "httpGet": { "path": "/readyz", "port": "http" },
            "periodSeconds": 2,
            "failureThreshold": 3,
        }),
        json!({
            "httpGet": { "path": "/healthz", "port": "http" },
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        }),
    )
}

pub fn render(env: &EnvDef, opts: &RenderOptions) -> anyhow::Result<Rendered> {
    let image = opts.image.as_str();
    for (_, def) in &env.cells {
        super::check_member_ids(def)?;
    }
    let placement = Placement {
        member_host: &member_host,
        routers: vec![super::deployed_router(env, 1)],
        header: HEADER,
        secrets: "../secrets",
    };
    let cells = super::deployed_cells(env, &placement)?;
    let secrets = secret_sets(env, &placement.routers)?;
    let data: BTreeMap<String, String> = cells
        .iter()
        .map(|(p, t)| (p.display().to_string(), t.clone()))
        .collect();
    let mut files: Rendered = cells
        .iter()
        .map(|(p, t)| (PathBuf::from("cells").join(p), t.clone()))
        .collect();
    files.insert(
        PathBuf::from("cells.yaml"),
        documents(&[json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": CONFIG_MAP, "labels": { "app.kubernetes.io/name": "cellplane" } },
            "data": data,
        })])?,
    );
    let (readiness, liveness) = probes();
    for (_, def) in &env.cells {
        let name = cell_object(&def.name);
        let labels = member_labels(&def.name);
        let n = def.members.len();
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": labels,
                "ports": [
                    { "name": "client", "port": MEMBER_PORTS.client, "targetPort": "client" },
                    { "name": "peer", "port": MEMBER_PORTS.peer, "targetPort": "peer" },
                    { "name": "http", "port": MEMBER_PORTS.http, "targetPort": "http" },
                ],
            },
        });
        let set = json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "serviceName": name,
                "replicas": n,
                "podManagementPolicy": "Parallel",
                "selector": { "matchLabels": labels },
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": scrape_annotations(MEMBER_PORTS.http),
                    },
                    "spec": with_zone_spread(json!({
                        "terminationGracePeriodSeconds": 30,
                        "affinity": spread_over_nodes(&labels, opts.anti_affinity),
                        "containers": [{
                            "name": "member",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": [
                                "node",
                                "--cell", format!("{CELLS_MOUNT}/{}.toml", def.name),
                                "--id-from-hostname",
                                "--data-dir", "/data",
                            ],
                            "ports": [
                                { "name": "client", "containerPort": MEMBER_PORTS.client },
                                { "name": "peer", "containerPort": MEMBER_PORTS.peer },
                                { "name": "http", "containerPort": MEMBER_PORTS.http },
                            ],
                            "readinessProbe": readiness,
                            "livenessProbe": liveness,
                            "volumeMounts": with_secrets_mount(
                                vec![cells_mount(), json!({ "name": "data", "mountPath": "/data" })],
                                secrets.contains_key(&name),
                            ),
                        }],
                        "volumes": with_secrets_volume(vec![cells_volume()], &name, &secrets),
                    }), opts.zone_spread.then(|| spread_over_zones(&labels, true))),
                },
                "volumeClaimTemplates": [{
                    "metadata": { "name": "data" },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": { "requests": { "storage": "1Gi" } },
                    },
                }],
            },
        });
        // minAvailable rather than maxUnavailable: the budget counts ready pods,
        // so a member already down uses up the cell's margin and a drain waits.
        let budget = json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": { "name": name, "labels": labels },
            "spec": { "minAvailable": quorum(n), "selector": { "matchLabels": labels } },
        });
        files.insert(
            PathBuf::from(format!("cell-{}.yaml", def.name)),
            documents(&[service, set, budget])?,
        );
    }

    let labels = router_labels();
    let replicas = env.routers.routers.len();
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": ROUTER_OBJECT, "labels": labels },
        "spec": {
            "selector": labels,
            // The admin port for `cellplane status`; http for /metrics and the
            // status page (`kubectl port-forward svc/cellplane-router ...`).
            "ports": [
                { "name": "client", "port": ROUTER_PORTS.client, "targetPort": "client" },
                { "name": "admin", "port": ROUTER_PORTS.peer, "targetPort": "admin" },
                { "name": "http", "port": ROUTER_PORTS.http, "targetPort": "http" },
            ],
        },
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": ROUTER_OBJECT, "labels": labels },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": scrape_annotations(ROUTER_PORTS.http),
                },
                "spec": with_zone_spread(json!({
                    "terminationGracePeriodSeconds": 15,
                    // Routers are interchangeable: apart where the scheduler can,
                    // never Pending for it.
                    "affinity": spread_over_nodes(&labels, AntiAffinity::Preferred),
                    "containers": [{
                        "name": "router",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": [
                            "router",
                            "--routers", format!("{CELLS_MOUNT}/routers.toml"),
                            "--id", "1",
                            "--state-dir", "/state",
                        ],
                        "ports": [
                            { "name": "client", "containerPort": ROUTER_PORTS.client },
                            { "name": "admin", "containerPort": ROUTER_PORTS.peer },
                            { "name": "http", "containerPort": ROUTER_PORTS.http },
                        ],
                        "readinessProbe": readiness,
                        "livenessProbe": liveness,
                        "volumeMounts": with_secrets_mount(
                            vec![cells_mount(), json!({ "name": "state", "mountPath": "/state" })],
                            secrets.contains_key(ROUTER_OBJECT),
                        ),
                    }],
                    "volumes": with_secrets_volume(
                        vec![cells_volume(), json!({ "name": "state", "emptyDir": {} })],
                        ROUTER_OBJECT,
                        &secrets,
                    ),
                }), opts.zone_spread.then(|| spread_over_zones(&labels, false))),
            },
        },
    });
    let budget = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": { "name": ROUTER_OBJECT, "labels": labels },
        "spec": { "maxUnavailable": 1, "selector": { "matchLabels": labels } },
    });
    files.insert(
        PathBuf::from("router.yaml"),
        documents(&[service, deployment, budget])?,
    );
    files.insert(
        PathBuf::from("seed.yaml"),
        documents(&[seed_job(image, &secrets)?])?,
    );
    let resources: Vec<String> = files
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.insert(
        PathBuf::from(KUSTOMIZATION),
        kustomization(&resources, &secrets)?,
    );
    Ok(files)
}

/// `spec` with `spread` as its topologySpreadConstraints when there is one.
fn with_zone_spread(mut spec: Value, spread: Option<Value>) -> Value {
    if let (Some(spread), Some(obj)) = (spread, spec.as_object_mut()) {
        obj.insert("topologySpreadConstraints".into(), spread);
    }
    spec
}

/// The Job running `cellplane map seed` once the cells answer. Reapplying the
/// manifests leaves a finished Job alone; it is deleted an hour after it
/// finished, so a later `kubectl apply` (a new image, say: a Job's pod template
/// cannot change) creates and runs it again, which is harmless.
fn seed_job(image: &str, secrets: &BTreeMap<String, Vec<String>>) -> anyhow::Result<Value> {
    let labels = seed_labels();
    let mut args: Vec<String> = ["map", "seed", "--cells", CELLS_MOUNT]
        .map(String::from)
        .into();
    if let Some(files) = secrets.get(SEED_OBJECT) {
        // The Secret holds the CA and the operator's certificate and key, in
        // that order (secret_sets).
        let mounted = |i: usize| -> anyhow::Result<String> {
            let file = files
                .get(i)
                .and_then(|f| Path::new(f).file_name())
                .context("the seed Secret lacks a file")?;
            Ok(format!("{SECRETS_MOUNT}/{}", file.to_string_lossy()))
        };
        args.extend([
            "--cacert".to_string(),
            mounted(0)?,
            "--cert".to_string(),
            mounted(1)?,
            "--key".to_string(),
            mounted(2)?,
        ]);
    }
    args.extend(["--wait".to_string(), SEED_WAIT.to_string()]);
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": SEED_OBJECT, "labels": labels },
        "spec": {
            "backoffLimit": 6,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [{
                        "name": "seed",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": args,
                        "volumeMounts": with_secrets_mount(
                            vec![cells_mount()],
                            secrets.contains_key(SEED_OBJECT),
                        ),
                    }],
                    "volumes": with_secrets_volume(vec![cells_volume()], SEED_OBJECT, secrets),
                },
            },
        },
    }))
}

/// The kustomization `kubectl apply -k deploy/k8s/` applies: every manifest, and
/// the Secrets made from the files `cellplane certs generate --cells
/// deploy/k8s/cells` writes to `deploy/k8s/secrets/` (never committed).
pub const KUSTOMIZATION: &str = "kustomization.yaml";

/// Where the Secret of a pod is mounted; the deployed cell files name their TLS
/// files as `../secrets/<file>` relative to [`CELLS_MOUNT`].
pub const SECRETS_MOUNT: &str = "/etc/cellplane/secrets";

/// The Secret of a StatefulSet or of the routers' Deployment.
pub fn secret_name(object: &str) -> String {
    format!("{object}-secrets")
}

/// Object (a cell's StatefulSet, the routers' Deployment) → the files, relative to
/// `deploy/k8s/`, its Secret holds. A cell's Secret holds the CA and its own
/// members' certificates and keys only (a pod template is shared by the cell's
/// members, so each member can read its cell-mates' keys; no other cell's); the
/// routers' holds the CA, the router certificate, the credentials and the token
/// key; the seed Job's the CA and the operator certificate and key `cellplane
/// certs generate` writes (`operator-admin`): writing the map and pushing it to
/// cells are operators' calls. Objects without TLS or auth have none.
fn secret_sets(
    env: &EnvDef,
    routers: &[RouterDef],
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let file = |p: &Path| super::secret_path("secrets", p).display().to_string();
    let mut sets = BTreeMap::new();
    for (_, def) in &env.cells {
        let Some(tls) = &def.tls else { continue };
        let mut files = vec![file(&tls.ca)];
        for m in &def.members {
            files.extend([&m.cert, &m.key].into_iter().flatten().map(|p| file(p)));
        }
        sets.insert(cell_object(&def.name), files);
    }
    let r = &env.routers;
    let mut files = Vec::new();
    if let Some(tls) = &r.tls {
        files.push(file(&tls.ca));
        for def in routers {
            files.extend([&def.cert, &def.key].into_iter().flatten().map(|p| file(p)));
        }
    }
    if r.auth.enabled {
        files.push(file(&r.auth.credentials));
        files.push(file(&r.auth.token_key));
    }
    if !files.is_empty() {
        sets.insert(ROUTER_OBJECT.to_string(), files);
    }
    if super::directory_has_tls(env) {
        let op = crate::certs_cmd::operator_files(env)?;
        sets.insert(
            SEED_OBJECT.to_string(),
            vec![file(&op.ca), file(&op.cert), file(&op.key)],
        );
    }
    Ok(sets)
}

fn with_secrets_mount(mut mounts: Vec<Value>, has: bool) -> Vec<Value> {
    if has {
        mounts.push(json!({ "name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": true }));
    }
    mounts
}

fn with_secrets_volume(
    mut volumes: Vec<Value>,
    object: &str,
    secrets: &BTreeMap<String, Vec<String>>,
) -> Vec<Value> {
    if secrets.contains_key(object) {
        volumes.push(json!({
            "name": "secrets",
            "secret": { "secretName": secret_name(object), "defaultMode": 0o400 },
        }));
    }
    volumes
}

fn kustomization(
    resources: &[String],
    secrets: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<String> {
    let generators: Vec<Value> = secrets
        .iter()
        .map(|(object, files)| json!({ "name": secret_name(object), "files": files }))
        .collect();
    let doc = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "secretGenerator": generators,
        // Fixed names: the manifests name the Secrets; a changed certificate is
        // picked up by restarting the pods (`kubectl rollout restart`).
        "generatorOptions": { "disableNameSuffixHash": true },
    });
    Ok(format!(
        "{HEADER}# Needs deploy/k8s/secrets/: `cellplane certs generate --cells deploy/k8s/cells`.\n{}",
        serde_saphyr::to_string(&doc).context("cannot encode the kustomization")?
    ))
}

/// YAML documents, one after another, under the header.
fn documents(docs: &[Value]) -> anyhow::Result<String> {
    let mut out = String::from(HEADER);
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(d).context("cannot encode a manifest")?);
    }
    Ok(out)
}
