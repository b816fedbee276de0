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
//! - `router.yaml`: the Deployment, Service and PodDisruptionBudget
//!   `cellplane-router`. Routers are interchangeable: every replica runs router 1
//!   of the rendered `routers.toml`, listening on every interface.
//! - `cells/`: the ConfigMap's files as a folder, for `cellplane certs generate
//!   --cells deploy/k8s/cells` (certificates for the pods' DNS names).
//! - `kustomization.yaml`: every manifest, and a Secret per cell and one for the
//!   routers made from `deploy/k8s/secrets/` ([`SECRETS_MOUNT`] in the pods; the
//!   cell files name `../secrets/<file>` from the cells mount).
//!
//! Names are relative (`cellplane-alpha-0.cellplane-alpha`), so the manifests work
//! in whichever namespace they are applied to. Readiness is `/readyz` and liveness
//! `/healthz` on each process's http port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

use super::{CELLS_MOUNT, IMAGE, MEMBER_PORTS, Placement, ROUTER_PORTS, Rendered};
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

pub fn render(env: &EnvDef) -> anyhow::Result<Rendered> {
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
    let secrets = secret_sets(env, &placement.routers);
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
                    "metadata": { "labels": labels },
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{
                            "name": "member",
                            "image": IMAGE,
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
                    },
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
        // A quorum stays up through voluntary evictions (node drains); a 1-member
        // cell (the local directory) therefore blocks them until it is grown.
        let budget = json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": { "name": name, "labels": labels },
            "spec": { "minAvailable": n / 2 + 1, "selector": { "matchLabels": labels } },
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
            "ports": [
                { "name": "client", "port": ROUTER_PORTS.client, "targetPort": "client" },
                { "name": "admin", "port": ROUTER_PORTS.peer, "targetPort": "admin" },
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
                "metadata": { "labels": labels },
                "spec": {
                    "terminationGracePeriodSeconds": 15,
                    "containers": [{
                        "name": "router",
                        "image": IMAGE,
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
                },
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
/// key. Objects without TLS or auth have none.
fn secret_sets(env: &EnvDef, routers: &[RouterDef]) -> BTreeMap<String, Vec<String>> {
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
    sets
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
