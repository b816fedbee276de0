//! The Kubernetes manifests, without a cluster: `cellplane deploy render k8s`
//! output parsed back, every reference inside it checked to resolve (Service
//! selectors and target ports, StatefulSet service names, ConfigMaps, probes,
//! disruption budgets, the files the commands name), the rendered cell files
//! checked to address members by the DNS names the StatefulSets and headless
//! Services create; and the committed `deploy/k8s/` checked to be a fresh render.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cellplane::deploy::{self, Target};
use cellplane_cell::CellDef;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every object of every `.yaml` in `dir`, with the file it came from.
fn objects(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", p.display()));
        for d in docs {
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), d));
        }
    }
    out
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path}: not a string in {v}"))
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('/') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
    }
    cur
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `selector` picks pods labelled `pod` (and selects something).
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

fn of_kind<'a>(objs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    objs.iter()
        .filter(|(_, o)| o["kind"] == kind)
        .map(|(_, o)| o)
        .collect()
}

fn arg_after<'a>(args: &'a [Value], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.as_str()
}

#[test]
fn manifests_reference_only_what_exists() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["deploy", "render", "k8s", "--cells"])
        .arg(repo().join("cells"))
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let objs = objects(out.path());
    let env = cellplane::up::load_env(&repo().join("cells")).unwrap();

    // The ConfigMap is a cells/ folder that `up` itself would accept.
    let maps = of_kind(&objs, "ConfigMap");
    assert_eq!(maps.len(), 1);
    let config_map = maps[0];
    let cells_dir = tempfile::tempdir().unwrap();
    for (name, text) in at(config_map, "data").as_object().unwrap() {
        std::fs::write(cells_dir.path().join(name), text.as_str().unwrap()).unwrap();
    }
    let deployed = cellplane::up::load_env(cells_dir.path()).unwrap();
    assert_eq!(deployed.cells.len(), env.cells.len());
    assert_eq!(deployed.static_map.tenants, env.static_map.tenants);

    let services = of_kind(&objs, "Service");
    let sets = of_kind(&objs, "StatefulSet");
    let deployments = of_kind(&objs, "Deployment");
    let budgets = of_kind(&objs, "PodDisruptionBudget");
    assert_eq!(sets.len(), env.cells.len(), "one StatefulSet per cell");
    assert_eq!(deployments.len(), 1, "one router Deployment");
    assert_eq!(
        at(deployments[0], "spec/replicas").as_u64(),
        Some(env.routers.routers.len() as u64)
    );
    let workloads: Vec<&Value> = sets.iter().chain(&deployments).copied().collect();

    for w in &workloads {
        let name = s(w, "metadata/name");
        let pod_labels = labels(at(w, "spec/template/metadata/labels"));
        assert!(
            selects(&labels(at(w, "spec/selector/matchLabels")), &pod_labels),
            "{name}: its selector does not match its pod template"
        );
        // No two workloads' pods are told apart by nothing.
        for other in &workloads {
            if s(other, "metadata/name") != name {
                assert!(
                    !selects(
                        &labels(at(w, "spec/selector/matchLabels")),
                        &labels(at(other, "spec/template/metadata/labels"))
                    ),
                    "{name}'s selector also picks {}'s pods",
                    s(other, "metadata/name")
                );
            }
        }
        let pod = at(w, "spec/template/spec");
        let volumes = at(pod, "volumes").as_array().unwrap();
        let claims: Vec<&str> = at(w, "spec/volumeClaimTemplates")
            .as_array()
            .map(|c| c.iter().map(|c| s(c, "metadata/name")).collect())
            .unwrap_or_default();
        for v in volumes {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(
                    maps.iter().any(|m| s(m, "metadata/name") == cm),
                    "{name}: volume {} names ConfigMap {cm}, which is not defined",
                    v["name"]
                );
            }
        }
        for c in at(pod, "containers").as_array().unwrap() {
            let ports = at(c, "ports").as_array().unwrap();
            let port_named = |n: &str| {
                ports
                    .iter()
                    .find(|p| p["name"] == n)
                    .and_then(|p| p["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("{name}: no container port named {n}"))
            };
            for m in at(c, "volumeMounts").as_array().unwrap() {
                let vol = s(m, "name");
                assert!(
                    volumes.iter().any(|v| v["name"] == vol) || claims.contains(&vol),
                    "{name}: mount of undefined volume {vol}"
                );
            }
            // Probes: /readyz and /healthz on the http port.
            assert_eq!(s(c, "readinessProbe/httpGet/path"), "/readyz", "{name}");
            assert_eq!(s(c, "livenessProbe/httpGet/path"), "/healthz", "{name}");
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = s(c, &format!("{probe}/httpGet/port"));
                assert_eq!(port, "http", "{name}: {probe} on port {port}");
                port_named(port);
            }
            // The files the command names are in the mounted ConfigMap.
            let args = at(c, "args").as_array().unwrap();
            let mount = at(c, "volumeMounts")
                .as_array()
                .unwrap()
                .iter()
                .find(|m| {
                    volumes
                        .iter()
                        .any(|v| v["name"] == m["name"] && v["configMap"]["name"].is_string())
                })
                .map(|m| s(m, "mountPath").to_string())
                .unwrap_or_else(|| panic!("{name}: the cells ConfigMap is not mounted"));
            for flag in ["--cell", "--routers"] {
                if let Some(file) = arg_after(args, flag) {
                    let key = file
                        .strip_prefix(&format!("{mount}/"))
                        .unwrap_or_else(|| panic!("{name}: {flag} {file} is not under {mount}"));
                    assert!(
                        config_map["data"][key].is_string(),
                        "{name}: {flag} {file}: no such key in the ConfigMap"
                    );
                }
            }
            match s(w, "kind") {
                "StatefulSet" => {
                    assert!(args.iter().any(|a| a == "--id-from-hostname"), "{name}");
                    let file = arg_after(args, "--cell")
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap();
                    let def =
                        CellDef::parse(config_map["data"][file].as_str().unwrap(), Path::new(file))
                            .unwrap();
                    check_member_addresses(w, &services, &def, &port_named);
                }
                _ => {
                    let id: u64 = arg_after(args, "--id").unwrap().parse().unwrap();
                    let me = deployed
                        .routers
                        .router(id)
                        .expect("the router's id is defined");
                    assert_eq!(u64::from(me.client.port()), port_named("client"));
                    assert_eq!(u64::from(me.admin.port()), port_named("admin"));
                    assert_eq!(u64::from(me.http.port()), port_named("http"));
                    assert!(me.client.ip().is_unspecified(), "routers listen everywhere");
                }
            }
        }
    }

    // Every Service selects pods of one workload and targets its container ports.
    for svc in &services {
        let name = s(svc, "metadata/name");
        let selector = labels(at(svc, "spec/selector"));
        let matched: Vec<&&Value> = workloads
            .iter()
            .filter(|w| selects(&selector, &labels(at(w, "spec/template/metadata/labels"))))
            .collect();
        assert_eq!(
            matched.len(),
            1,
            "Service {name} selects {} workloads",
            matched.len()
        );
        let containers = at(matched[0], "spec/template/spec/containers")
            .as_array()
            .unwrap();
        for p in at(svc, "spec/ports").as_array().unwrap() {
            let target = &p["targetPort"];
            let found = containers.iter().any(|c| {
                c["ports"].as_array().unwrap().iter().any(|cp| {
                    (target.is_string() && cp["name"] == *target)
                        || (target.is_u64() && cp["containerPort"] == *target)
                })
            });
            assert!(
                found,
                "Service {name}: targetPort {target} is no container port"
            );
        }
    }

    // Every budget covers one workload and leaves a quorum of a cell up.
    assert_eq!(budgets.len(), workloads.len());
    for b in &budgets {
        let name = s(b, "metadata/name");
        let selector = labels(at(b, "spec/selector/matchLabels"));
        let matched: Vec<&&Value> = workloads
            .iter()
            .filter(|w| selects(&selector, &labels(at(w, "spec/template/metadata/labels"))))
            .collect();
        assert_eq!(
            matched.len(),
            1,
            "budget {name} covers {} workloads",
            matched.len()
        );
        let replicas = at(matched[0], "spec/replicas").as_u64().unwrap();
        if let Some(min) = at(b, "spec/minAvailable").as_u64() {
            assert!(
                min > replicas / 2 && min <= replicas,
                "budget {name}: {min} of {replicas}"
            );
        } else {
            assert_eq!(
                at(b, "spec/maxUnavailable").as_u64(),
                Some(1),
                "budget {name}"
            );
        }
    }
}

/// The members of `def` are the pods of StatefulSet `set`, by the names its
/// headless Service gives them, on its container ports.
fn check_member_addresses(
    set: &Value,
    services: &[&Value],
    def: &CellDef,
    port_named: &dyn Fn(&str) -> u64,
) {
    let name = s(set, "metadata/name");
    let service_name = s(set, "spec/serviceName");
    let service = services
        .iter()
        .find(|v| s(v, "metadata/name") == service_name)
        .unwrap_or_else(|| panic!("{name}: serviceName {service_name} is not a Service"));
    assert_eq!(
        s(service, "spec/clusterIP"),
        "None",
        "{service_name} must be headless"
    );
    assert_eq!(
        at(service, "spec/publishNotReadyAddresses"),
        &Value::Bool(true),
        "{service_name}: members must find each other before they are ready"
    );
    assert_eq!(s(set, "spec/podManagementPolicy"), "Parallel", "{name}");
    let replicas = at(set, "spec/replicas").as_u64().unwrap();
    assert_eq!(
        replicas,
        def.members.len() as u64,
        "{name}: one pod per member"
    );
    for m in &def.members {
        let ordinal = m.id - 1;
        let pod = format!("{name}-{ordinal}");
        assert!(ordinal < replicas, "{name}: member {} has no pod", m.id);
        for (field, addr) in [("client", &m.client), ("peer", &m.peer), ("http", &m.http)] {
            assert_eq!(
                addr.host(),
                format!("{pod}.{service_name}"),
                "{}: member {} {field}",
                def.name,
                m.id
            );
            assert_eq!(
                u64::from(addr.port()),
                port_named(field),
                "{}: member {} {field}",
                def.name,
                m.id
            );
        }
        assert_eq!(
            cellplane::deploy::member_id_from_hostname(&def.name, &pod).unwrap(),
            m.id,
            "pod {pod} must find its own id"
        );
    }
}

#[test]
fn committed_manifests_are_a_fresh_render() {
    let files = deploy::render(Target::K8s, &repo().join("cells")).unwrap();
    let dir = repo().join("deploy/k8s");
    for (rel, text) in &files {
        let committed = std::fs::read_to_string(dir.join(rel)).unwrap_or_default();
        assert!(
            committed == *text,
            "deploy/k8s/{} differs from a fresh render of cells/: run \
             `cargo run --release -- deploy render k8s`",
            rel.display()
        );
    }
    let stale = deploy::stale_files(&dir, &files).unwrap();
    assert!(stale.is_empty(), "stale files in deploy/k8s: {stale:?}");
}

/// TLS is on by default: `cellplane certs generate --cells deploy/k8s/cells`
/// writes every file the kustomization turns into Secrets, each pod mounts its
/// own workload's Secret where its cell file looks for it, and the certificates
/// there are ones the processes load: a member's names its cell and id and the
/// DNS name its peers dial.
#[test]
fn secrets_are_generated_and_mounted() {
    let out = tempfile::tempdir().unwrap();
    let cellplane = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cellplane {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let cells = repo().join("cells");
    let (cells, out_dir) = (cells.to_str().unwrap(), out.path().to_str().unwrap());
    cellplane(&[
        "deploy", "render", "k8s", "--cells", cells, "--out", out_dir,
    ]);
    let deployed_cells = out.path().join("cells");
    cellplane(&[
        "certs",
        "generate",
        "--cells",
        deployed_cells.to_str().unwrap(),
    ]);

    let objs = objects(out.path());
    let kustomization = of_kind(&objs, "Kustomization");
    assert_eq!(kustomization.len(), 1);
    let k = kustomization[0];
    let mut generated: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in at(k, "secretGenerator").as_array().unwrap() {
        let files: Vec<String> = at(g, "files")
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        for f in &files {
            assert!(
                out.path().join(f).is_file(),
                "Secret {}: {f} is not written by `cellplane certs generate`",
                s(g, "name")
            );
        }
        generated.insert(s(g, "name").to_string(), files);
    }
    let resources: Vec<&str> = at(k, "resources")
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for (file, _) in objs.iter().filter(|(_, o)| o["kind"] != "Kustomization") {
        assert!(
            resources.contains(&file.as_str()),
            "{file} is not a resource"
        );
    }

    let env = cellplane::up::load_env(&deployed_cells).unwrap();
    let workloads: Vec<&Value> = of_kind(&objs, "StatefulSet")
        .into_iter()
        .chain(of_kind(&objs, "Deployment"))
        .collect();
    assert_eq!(workloads.len(), env.cells.len() + 1);
    for w in workloads {
        let name = s(w, "metadata/name");
        let pod = at(w, "spec/template/spec");
        let volume = at(pod, "volumes")
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"].is_object())
            .unwrap_or_else(|| panic!("{name}: no Secret mounted though TLS is on"));
        let secret = s(volume, "secret/secretName");
        let files = generated
            .get(secret)
            .unwrap_or_else(|| panic!("{name}: Secret {secret} is not generated"));
        let container = at(pod, "containers/0");
        let mount = at(container, "volumeMounts")
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{name}: the Secret volume is not mounted"));
        assert_eq!(s(mount, "mountPath"), deploy::k8s::SECRETS_MOUNT, "{name}");
        // What the process opens, as the pod sees it: its file's paths taken
        // from the cells mount, which must land in this Secret.
        let needs: Vec<PathBuf> = match s(w, "kind") {
            "StatefulSet" => {
                let def = env
                    .cells
                    .iter()
                    .map(|(_, d)| d)
                    .find(|d| deploy::k8s::cell_object(&d.name) == name)
                    .unwrap();
                for m in &def.members {
                    let tls = def.member_tls(m.id).unwrap().load().unwrap();
                    assert_eq!(
                        tls.own_identity().unwrap(),
                        cellplane_security::Identity::Member {
                            cell: def.name.clone(),
                            id: m.id
                        }
                    );
                }
                let tls = def.tls.as_ref().unwrap();
                let mut p = vec![tls.ca.clone()];
                for m in &def.members {
                    p.extend(m.cert.clone());
                    p.extend(m.key.clone());
                }
                p
            }
            _ => {
                let r = &env.routers;
                let me = r.router(1).unwrap();
                let mut p = vec![r.tls.as_ref().unwrap().ca.clone()];
                p.extend(me.cert.clone());
                p.extend(me.key.clone());
                p.extend([r.auth.credentials.clone(), r.auth.token_key.clone()]);
                p
            }
        };
        // `../secrets` from the cells mount is the Secret's mount.
        assert_eq!(
            Path::new(deploy::CELLS_MOUNT)
                .parent()
                .unwrap()
                .join("secrets"),
            Path::new(deploy::k8s::SECRETS_MOUNT)
        );
        for rel in needs {
            let dir = rel.parent().unwrap();
            assert_eq!(
                dir,
                Path::new("../secrets"),
                "{name}: {} is not under ../secrets",
                rel.display()
            );
            let file = format!("secrets/{}", rel.file_name().unwrap().to_string_lossy());
            assert!(
                files.contains(&file),
                "{name}: needs {file}, which Secret {secret} lacks"
            );
        }
    }
}
