//! The Kubernetes manifests, without a cluster: `cellplane deploy render k8s`
//! output parsed back, every reference inside it checked to resolve (Service
//! selectors and target ports, StatefulSet service names, ConfigMaps, probes,
//! disruption budgets, anti-affinity and zone spread selectors, the seed Job, the
//! files the commands name), the rendered cell files checked to address members
//! by the DNS names the StatefulSets and headless Services create; and the
//! committed `deploy/k8s/` checked to be a fresh render.
//!
//! Structurally, every rendered object (with the default options and with
//! `--image`, `--zone-spread`, `--anti-affinity preferred`) is loaded into the
//! official Python client's model of its kind and must come back unchanged
//! (`deploy/k8s/validate.py`). Where Debian's python3-kubernetes is missing that
//! test says SKIPPED and passes; `CELLPLANE_REQUIRE_TOOLS=1` makes it a
//! failure instead.

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

/// The Secret workload `w` (called `who` in failures) mounts, checked to be
/// mounted at the secrets path of its first container, and that container.
fn mounted_secret<'a>(w: &'a Value, who: &str) -> (&'a str, &'a Value) {
    let pod = at(w, "spec/template/spec");
    let volume = at(pod, "volumes")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .unwrap_or_else(|| panic!("{who}: no Secret mounted though TLS is on"));
    let container = at(pod, "containers/0");
    let mount = at(container, "volumeMounts")
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("{who}: the Secret volume is not mounted"));
    assert_eq!(s(mount, "mountPath"), deploy::k8s::SECRETS_MOUNT, "{who}");
    (s(volume, "secret/secretName"), container)
}

fn arg_after<'a>(args: &'a [Value], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.as_str()
}

/// `cellplane deploy render k8s --cells <cells> --out <tmp> <extra>`: the folder
/// and its objects.
fn render(cells: &Path, extra: &[&str]) -> (tempfile::TempDir, Vec<(String, Value)>) {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["deploy", "render", "k8s", "--cells"])
        .arg(cells)
        .arg("--out")
        .arg(out.path())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "deploy render k8s {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let objs = objects(out.path());
    (out, objs)
}

fn containers(pod_owner: &Value) -> &Vec<Value> {
    at(pod_owner, "spec/template/spec/containers")
        .as_array()
        .unwrap()
}

#[test]
fn manifests_reference_only_what_exists() {
    let (_out, objs) = render(&repo().join("cells"), &[]);
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
            // Exactly a quorum: less could take a majority down, more would
            // block drains the cell can afford.
            assert_eq!(min, replicas / 2 + 1, "budget {name}: {min} of {replicas}");
        } else {
            assert_eq!(
                at(b, "spec/maxUnavailable").as_u64(),
                Some(1),
                "budget {name}"
            );
        }
    }

    // Each cell's members repel each other on a node, and only each other.
    for set in &sets {
        let name = s(set, "metadata/name");
        let pod_labels = labels(at(set, "spec/template/metadata/labels"));
        let terms = at(
            set,
            "spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
        )
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no required pod anti-affinity"));
        assert_eq!(terms.len(), 1, "{name}");
        assert_eq!(s(&terms[0], "topologyKey"), "kubernetes.io/hostname");
        let selector = labels(at(&terms[0], "labelSelector/matchLabels"));
        assert!(
            selects(&selector, &pod_labels),
            "{name}: anti-affinity misses its own pods"
        );
        for other in &workloads {
            if s(other, "metadata/name") != name {
                assert!(
                    !selects(
                        &selector,
                        &labels(at(other, "spec/template/metadata/labels"))
                    ),
                    "{name}: its anti-affinity also repels {}",
                    s(other, "metadata/name")
                );
            }
        }
        assert!(
            at(set, "spec/template/spec/topologySpreadConstraints").is_null(),
            "{name}: zone spread is off by default"
        );
    }

    // The routers' Service reaches the client, admin and http ports.
    let router_svc = services
        .iter()
        .find(|v| s(v, "metadata/name") == deploy::k8s::ROUTER_OBJECT)
        .unwrap();
    let ports: Vec<(&str, u64)> = at(router_svc, "spec/ports")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (s(p, "name"), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("client", 2379), ("admin", 2378), ("http", 2377)]);

    // The seed Job runs `map seed` on the mounted cells folder, with what it
    // mounts, in the default image, waiting for the cells.
    let jobs = of_kind(&objs, "Job");
    assert_eq!(jobs.len(), 1, "one seed Job");
    let job = jobs[0];
    let pod = at(job, "spec/template/spec");
    assert_eq!(s(pod, "restartPolicy"), "OnFailure");
    let c = &containers(job)[0];
    let args: Vec<&str> = at(c, "args")
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["map", "seed"]);
    assert_eq!(
        arg_after(at(c, "args").as_array().unwrap(), "--cells"),
        Some(deploy::CELLS_MOUNT)
    );
    assert!(
        args.contains(&"--wait"),
        "the Job waits for the cells: {args:?}"
    );
    assert_cli_accepts(&args);
    let volumes = at(pod, "volumes").as_array().unwrap();
    for m in at(c, "volumeMounts").as_array().unwrap() {
        let vol = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("seed Job: mount of undefined volume {}", m["name"]));
        if let Some(cm) = v_str(vol, "configMap/name") {
            assert_eq!(cm, s(config_map, "metadata/name"));
            assert_eq!(s(m, "mountPath"), deploy::CELLS_MOUNT);
        }
    }
    for w in workloads.iter().chain([&job]) {
        for c in containers(w) {
            assert_eq!(s(c, "image"), deploy::IMAGE, "{}", s(w, "metadata/name"));
        }
    }
}

/// clap answers `--help` only when every subcommand, flag and value before it is
/// one it accepts: the command a container runs, checked without running it.
fn assert_cli_accepts(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cellplane {args:?} is refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn v_str<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    at(v, path).as_str()
}

/// `--image`, `--zone-spread` and `--anti-affinity preferred` change what they
/// say and nothing they do not; the options other targets cannot honour are
/// refused, as is an image reference no runtime takes.
#[test]
fn render_options_do_what_they_say() {
    let cells = repo().join("cells");
    let image = "registry.example.com/team/cellplane:1.2.3";
    let (_a, objs) = render(&cells, &["--image", image, "--zone-spread"]);
    let sets = of_kind(&objs, "StatefulSet");
    let pod_owners: Vec<&Value> = sets
        .iter()
        .copied()
        .chain(of_kind(&objs, "Deployment"))
        .chain(of_kind(&objs, "Job"))
        .collect();
    assert_eq!(pod_owners.len(), sets.len() + 2);
    for w in &pod_owners {
        for c in containers(w) {
            assert_eq!(s(c, "image"), image, "{}", s(w, "metadata/name"));
        }
    }
    for w in pod_owners.iter().filter(|w| w["kind"] != "Job") {
        let name = s(w, "metadata/name");
        let spread = at(w, "spec/template/spec/topologySpreadConstraints")
            .as_array()
            .unwrap_or_else(|| panic!("{name}: --zone-spread rendered no constraint"));
        assert_eq!(spread.len(), 1);
        assert_eq!(s(&spread[0], "topologyKey"), "topology.kubernetes.io/zone");
        assert_eq!(at(&spread[0], "maxSkew").as_u64(), Some(1));
        assert!(selects(
            &labels(at(&spread[0], "labelSelector/matchLabels")),
            &labels(at(w, "spec/template/metadata/labels"))
        ));
        // Members wait for a zone that keeps the spread; routers never wait.
        let want = if w["kind"] == "StatefulSet" {
            "DoNotSchedule"
        } else {
            "ScheduleAnyway"
        };
        assert_eq!(s(&spread[0], "whenUnsatisfiable"), want, "{name}");
    }

    let (_b, objs) = render(&cells, &["--anti-affinity", "preferred"]);
    for set in of_kind(&objs, "StatefulSet") {
        let anti = at(set, "spec/template/spec/affinity/podAntiAffinity");
        assert!(anti["requiredDuringSchedulingIgnoredDuringExecution"].is_null());
        let term = at(anti, "preferredDuringSchedulingIgnoredDuringExecution/0");
        assert_eq!(
            s(term, "podAffinityTerm/topologyKey"),
            "kubernetes.io/hostname"
        );
        assert!(term["weight"].as_u64().is_some_and(|w| w > 0));
    }

    for (args, why) in [
        (&["compose", "--zone-spread"][..], "--zone-spread"),
        (&["prometheus", "--image", "x:1"][..], "--image"),
        (&["k8s", "--image", "has space:1"][..], "--image"),
        (&["k8s", "--image", ""][..], "--image"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["deploy", "render"])
            .args(args)
            .arg("--cells")
            .arg(&cells)
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{args:?}: {err}");
        assert_eq!(
            std::fs::read_dir(out.path()).unwrap().count(),
            0,
            "{args:?} wrote files"
        );
    }
}

/// A cells folder like `cells/` whose alpha has 5 members.
fn cells_with_five_member_alpha() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(repo().join("cells")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let alpha = dir.path().join("alpha.toml");
    let mut text = std::fs::read_to_string(&alpha).unwrap();
    for id in [4u16, 5] {
        let base = 12379 + (id - 1) * 10;
        text.push_str(&format!(
            "\n[[members]]\nid = {id}\nclient = \"127.0.0.1:{base}\"\npeer = \"127.0.0.1:{}\"\n\
             http = \"127.0.0.1:{}\"\ncert = \"secrets/alpha-{id}.crt\"\nkey = \"secrets/alpha-{id}.key\"\n",
            base + 1,
            base + 2
        ));
    }
    std::fs::write(&alpha, text).unwrap();
    let routing = dir.path().join("routing.toml");
    let three = r#"endpoints = ["127.0.0.1:12379", "127.0.0.1:12389", "127.0.0.1:12399"]"#;
    let text = std::fs::read_to_string(&routing).unwrap();
    assert!(
        text.contains(three),
        "cells/routing.toml changed: update this test"
    );
    let five = r#"endpoints = ["127.0.0.1:12379", "127.0.0.1:12389", "127.0.0.1:12399", "127.0.0.1:12409", "127.0.0.1:12419"]"#;
    std::fs::write(&routing, text.replace(three, five)).unwrap();
    dir
}

/// A node drain may take 1 member of a 3-member cell and 2 of a 5-member one,
/// never a majority.
#[test]
fn budgets_keep_a_quorum_of_3_and_5_members() {
    let cells = cells_with_five_member_alpha();
    let (_out, objs) = render(cells.path(), &[]);
    let want = [
        ("cellplane-alpha", 5, 3),
        ("cellplane-beta", 3, 2),
        ("cellplane-directory", 1, 1),
    ];
    for (name, replicas, min) in want {
        let set = of_kind(&objs, "StatefulSet")
            .into_iter()
            .find(|o| s(o, "metadata/name") == name)
            .unwrap();
        assert_eq!(at(set, "spec/replicas").as_u64(), Some(replicas), "{name}");
        let budget = of_kind(&objs, "PodDisruptionBudget")
            .into_iter()
            .find(|o| s(o, "metadata/name") == name)
            .unwrap();
        assert_eq!(
            at(budget, "spec/minAvailable").as_u64(),
            Some(min),
            "{name}"
        );
        assert_eq!(deploy::k8s::quorum(replicas as usize) as u64, min);
    }
}

/// Where Python's kubernetes models are: `/usr/bin/python3` (Debian's, with
/// python3-kubernetes; not a pyenv interpreter without it), or why not.
fn k8s_models() -> Result<PathBuf, String> {
    let py = PathBuf::from("/usr/bin/python3");
    let o = Command::new(&py)
        .args(["-c", "import kubernetes.client, yaml"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} cannot import the kubernetes client ({}): install Debian's python3-kubernetes",
            py.display(),
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(py)
}

/// Runs deploy/k8s/validate.py on `what` (a folder, or `-` with `stdin`).
fn validate(py: &Path, what: &Path, stdin: Option<&[u8]>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(py)
        .arg(repo().join("deploy/k8s/validate.py"))
        .arg(what)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn rendered_objects_load_into_the_kubernetes_models() {
    let py = match k8s_models() {
        Ok(py) => py,
        Err(why) => {
            let required = std::env::var("CELLPLANE_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
            assert!(!required, "CELLPLANE_REQUIRE_TOOLS is set but {why}");
            println!("SKIPPED the structural validation of the k8s manifests: {why}");
            eprintln!("SKIPPED the structural validation of the k8s manifests: {why}");
            return;
        }
    };
    // The checker catches what it is for: a misspelt field, a missing required
    // one, a value of the wrong type, an unknown kind.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("bad.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {}\n  \
         template:\n    spec:\n      containers:\n      - {name: c, image: i, imagePullPolicyy: Always}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: y}\nspec:\n  ports: [{targetPort: 1}]\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: z, labels: {a: 1}}\n\
         ---\napiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: w}\n",
    )
    .unwrap();
    let (ok, text) = validate(&py, bad.path(), None);
    assert!(!ok, "validate.py passed broken manifests:\n{text}");
    for want in [
        "containers[0].imagePullPolicyy: not a field",
        "`port`, must not be `None`",
        "metadata.labels.a: 1 (int)",
        "kind Deploymnet: not a kind of apps/v1",
    ] {
        assert!(
            text.contains(want),
            "validate.py did not report `{want}`:\n{text}"
        );
    }

    let cells = repo().join("cells");
    let variants: [&[&str]; 3] = [
        &[],
        &[
            "--image",
            "registry.example.com/team/cellplane:1.2.3",
            "--zone-spread",
        ],
        &["--anti-affinity", "preferred"],
    ];
    for extra in variants {
        let (out, objs) = render(&cells, extra);
        let (ok, text) = validate(&py, out.path(), None);
        assert!(ok, "render {extra:?} fails the structural check:\n{text}");
        let want = format!("{} object(s), 0 with problems", objs.len());
        assert!(text.contains(&want), "render {extra:?}: {text}");
        eprintln!("render {extra:?}: {}", text.trim());
    }

    // What `kubectl apply -k` sends: the kustomization built with the Secrets
    // (after `certs generate`), where kubectl is installed.
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let (out, _) = render(&cells, &[]);
        let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["certs", "generate", "--cells"])
            .arg(out.path().join("cells"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let built = Command::new("kubectl")
            .arg("kustomize")
            .arg(out.path())
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "kubectl kustomize: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let (ok, text) = validate(&py, Path::new("-"), Some(&built.stdout));
        assert!(
            ok,
            "kubectl kustomize output fails the structural check:\n{text}"
        );
        assert!(text.contains("0 with problems"), "{text}");
        eprintln!("kubectl kustomize: {}", text.trim());
    } else {
        eprintln!("kubectl is not installed: the kustomized stream (with Secrets) is not checked");
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
        let (secret, _) = mounted_secret(w, name);
        let files = generated
            .get(secret)
            .unwrap_or_else(|| panic!("{name}: Secret {secret} is not generated"));
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
    // The seed Job writes the map and pushes it to cells: operators' calls. Its
    // Secret holds the CA and the operator certificate `certs generate` made,
    // mounted where its arguments name them.
    let job = of_kind(&objs, "Job")[0];
    let (secret, container) = mounted_secret(job, "seed Job");
    let files = generated
        .get(secret)
        .unwrap_or_else(|| panic!("seed Job: Secret {secret} is not generated"));
    let args = at(container, "args").as_array().unwrap();
    let mut local = Vec::new();
    for flag in ["--cacert", "--cert", "--key"] {
        let path = arg_after(args, flag).unwrap_or_else(|| panic!("seed Job: no {flag}"));
        let file = path
            .strip_prefix(&format!("{}/", deploy::k8s::SECRETS_MOUNT))
            .unwrap_or_else(|| panic!("seed Job: {flag} {path} is not in its Secret's mount"));
        let key = format!("secrets/{file}");
        assert!(
            files.contains(&key),
            "seed Job: {flag} {path}: {secret} lacks {key}"
        );
        local.push(out.path().join(key));
    }
    let tls = cellplane_security::TlsFiles {
        ca: local[0].clone(),
        cert: local[1].clone(),
        key: local[2].clone(),
    }
    .load()
    .unwrap();
    assert!(
        matches!(
            tls.own_identity().unwrap(),
            cellplane_security::Identity::Operator(_)
        ),
        "the seed Job's certificate is an operator's"
    );
}
