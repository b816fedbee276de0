//! The Compose environment.
//!
//! Without Docker: the committed `deploy/compose/` (and
//! `deploy/prometheus/prometheus.yml`) is a fresh render of `cells/`, and its
//! addresses agree (each member on its cell's network with the IP its cell file
//! advertises, routers, the seed and Prometheus on every network, Prometheus
//! scraping every member and router where they listen); `promtool check config`
//! accepts both Prometheus configs where promtool is installed.
//!
//! With a Docker daemon: builds the image and the Prometheus image
//! (`deploy/prometheus/build-image.sh`), brings the environment up under a
//! project of its own, checks that the seed container seeded the directory and
//! exited 0 and that Prometheus loaded the alert rules and scrapes every target,
//! then runs puts and gets for tenants a, b and c (cells alpha,
//! beta, gamma) through both routers over TLS, each with its tenant certificate
//! (`cellplane certs generate` makes them first), and in turn partitions alpha,
//! pauses beta and kills gamma with `deploy/compose/fault.sh`. Each time the other
//! two tenants must see zero errors, the faulted one must fail, and after `heal` it
//! must recover with its data. Without a daemon it says so and passes;
//! `CELLPLANE_REQUIRE_DOCKER=1` (set by `.ci/run` when Docker answers) makes that
//! a failure instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane::deploy::{self, Target, compose};
use cellplane_cell::CellDef;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn compose_dir() -> PathBuf {
    repo().join("deploy/compose")
}

/// Every file `target` renders from cells/ is committed in `dir` as rendered;
/// answers the files.
fn assert_fresh_render(target: Target, dir: &Path, name: &str) -> deploy::Rendered {
    let files = deploy::render(target, &repo().join("cells")).unwrap();
    for (rel, text) in &files {
        let committed = std::fs::read_to_string(dir.join(rel)).unwrap_or_default();
        assert!(
            committed == *text,
            "{} differs from a fresh render of cells/: run \
             `cargo run --release -- deploy render {name}`",
            dir.join(rel).display()
        );
    }
    files
}

#[test]
fn committed_compose_files_are_a_fresh_render() {
    let dir = compose_dir();
    let files = assert_fresh_render(Target::Compose, &dir, "compose");
    let stale = deploy::stale_files(&dir, &files).unwrap();
    assert!(stale.is_empty(), "stale files in deploy/compose: {stale:?}");
}

#[test]
fn committed_prometheus_config_is_a_fresh_render() {
    let dir = repo().join("deploy/prometheus");
    let files = assert_fresh_render(Target::Prometheus, &dir, "prometheus");
    assert_eq!(files.len(), 1);
    // Scrapes every process of cells/ where `cellplane up` runs it.
    let env = cellplane::up::load_env(&repo().join("cells")).unwrap();
    let members: Vec<(String, u64, String)> = env
        .cells
        .iter()
        .flat_map(|(_, d)| {
            d.members
                .iter()
                .map(|m| (d.name.clone(), m.id, m.http.to_string()))
        })
        .collect();
    let routers: Vec<(u64, String)> = env
        .routers
        .routers
        .iter()
        .map(|r| (r.id, r.http.to_string()))
        .collect();
    check_scrape_config(
        &dir.join("prometheus.yml"),
        "alerts.yml",
        &members,
        &routers,
    );
}

/// The scrape config at `path` loads the rules at `rules` and scrapes exactly
/// `members` (cell, id, host:port) and `routers` (id, host:port), labelled so;
/// `promtool check config` accepts it where promtool is installed.
fn check_scrape_config(
    path: &Path,
    rules: &str,
    members: &[(String, u64, String)],
    routers: &[(u64, String)],
) {
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        doc["rule_files"][0].as_str(),
        Some(rules),
        "{}",
        path.display()
    );
    let job = |name: &str| -> Vec<(String, Value)> {
        let jobs = doc["scrape_configs"].as_array().unwrap();
        let job = jobs
            .iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("{}: no job {name}", path.display()));
        job["static_configs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| {
                c["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t.as_str().unwrap().to_string(), c["labels"].clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let got: Vec<(String, u64, String)> = job("cellplane-members")
        .into_iter()
        .map(|(t, l)| {
            let id = l["member"].as_str().unwrap().parse().unwrap();
            (l["cell"].as_str().unwrap().to_string(), id, t)
        })
        .collect();
    assert_eq!(got, members, "{}: member targets", path.display());
    let got: Vec<(u64, String)> = job("cellplane-routers")
        .into_iter()
        .map(|(t, l)| (l["router"].as_str().unwrap().parse().unwrap(), t))
        .collect();
    assert_eq!(got, routers, "{}: router targets", path.display());
    // promtool fails a config whose rules file is missing: check the whole of it
    // where the rules are on this host (the local config, once alerts.yml is
    // written), the syntax alone otherwise (the Compose config names the path
    // inside its container).
    let rules_here = path.parent().unwrap().join(rules);
    let mut promtool = Command::new("promtool");
    promtool.args(["check", "config"]);
    if !rules_here.is_file() {
        promtool.arg("--syntax-only");
    }
    promtool.arg(path);
    run_promtool(promtool);
}

/// Runs a promtool command and fails on its failure; where promtool is not
/// installed, says SKIPPED (a failure when `CELLPLANE_REQUIRE_TOOLS=1`).
fn run_promtool(mut cmd: Command) {
    let what = format!("{cmd:?}");
    match cmd.output() {
        Ok(o) => assert!(
            o.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            let required = std::env::var("CELLPLANE_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
            assert!(!required, "{what}: {e} (Debian package prometheus)");
            eprintln!("SKIPPED {what}: {e} (Debian package prometheus)");
        }
    }
}

/// The alert rules load, pass their unit tests (`alerts_test.yml`, which fires
/// and clears every alert from synthetic series), and use only metrics that
/// cellplane exports (docs/metrics.md, itself checked against the registries by
/// tests/docs.rs) or Prometheus's own `up`.
#[test]
fn alert_rules_pass_their_tests_and_name_real_metrics() {
    let dir = repo().join("deploy/prometheus");
    let mut check = Command::new("promtool");
    check.args(["check", "rules"]).arg(dir.join("alerts.yml"));
    run_promtool(check);
    let mut test = Command::new("promtool");
    test.args(["test", "rules"])
        .arg(dir.join("alerts_test.yml"));
    run_promtool(test);

    let reference = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&rules).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for group in doc["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("cellplane_") {
                    used.insert(word.to_string());
                }
            }
        }
    }
    assert!(used.len() > 5, "{used:?}");
    for name in used {
        // A histogram's series are its family's name and a suffix.
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            reference.contains(&format!("`{family}`")),
            "alerts.yml uses {name}, which docs/metrics.md does not list"
        );
    }
}

#[test]
fn compose_addresses_agree() {
    let dir = compose_dir();
    let text = std::fs::read_to_string(dir.join(compose::COMPOSE_FILE)).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let env = cellplane::up::load_env(&dir.join("cells")).unwrap();
    let services = doc["services"].as_object().unwrap();
    let networks = doc["networks"].as_object().unwrap();
    let volumes = doc["volumes"].as_object().unwrap();
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    for (name, svc) in services {
        for (net, cfg) in svc["networks"].as_object().unwrap() {
            let subnet = networks[net]["ipam"]["config"][0]["subnet"]
                .as_str()
                .unwrap();
            let ip = cfg["ipv4_address"].as_str().unwrap();
            let prefix = subnet.strip_suffix("0/24").unwrap();
            assert!(
                ip.starts_with(prefix),
                "{name}: {ip} is not in {net}'s {subnet}"
            );
            if let Some(other) = taken.insert(ip.to_string(), name.clone()) {
                panic!("{ip} is given to {name} and {other}");
            }
        }
        for v in svc["volumes"].as_array().unwrap() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            // A bind mount's source must exist: Docker would create a missing
            // one as an empty directory.
            let bind = source.starts_with("./") || source.starts_with("../");
            assert!(
                if bind {
                    dir.join(source).exists()
                } else {
                    volumes.contains_key(source)
                },
                "{name}: volume {source} is not declared or does not exist"
            );
        }
    }
    let mut members = 0;
    for (_, def) in &env.cells {
        for m in &def.members {
            members += 1;
            let svc = &services[&compose::member_service(&def.name, m.id)];
            let nets = svc["networks"].as_object().unwrap();
            assert_eq!(nets.len(), 1, "a member is on its cell's network only");
            assert_eq!(
                nets[&def.name]["ipv4_address"].as_str(),
                Some(m.client.host()),
                "{}/{}: the cell file advertises its network address",
                def.name,
                m.id
            );
            assert_eq!(m.client.host(), m.peer.host());
            assert_eq!(
                svc["labels"]["cellplane.ip"].as_str(),
                Some(m.client.host())
            );
            let cmd: Vec<&str> = svc["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let cell_file = cmd[cmd.iter().position(|a| *a == "--cell").unwrap() + 1];
            let file = cell_file.rsplit('/').next().unwrap();
            let parsed = CellDef::load(&dir.join("cells").join(file)).unwrap();
            assert_eq!(parsed.name, def.name);
            assert_eq!(
                cmd[cmd.iter().position(|a| *a == "--id").unwrap() + 1],
                m.id.to_string()
            );
        }
    }
    assert_eq!(members, 10, "3 cells × 3 members and the directory");

    // The seed runs `map seed` on the mounted cells, as the operator.
    let seed = &services[compose::SEED_SERVICE];
    assert_eq!(seed["networks"].as_object().unwrap().len(), env.cells.len());
    let cmd: Vec<&str> = seed["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(cmd[..4], ["map", "seed", "--cells", deploy::CELLS_MOUNT]);
    // The command parses (clap answers `--help` only after accepting the rest).
    let o = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(&cmd)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the seed's command is refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let op = cellplane::certs_cmd::operator_files(&env).unwrap();
    for (flag, file) in [
        ("--cacert", &op.ca),
        ("--cert", &op.cert),
        ("--key", &op.key),
    ] {
        let i = cmd.iter().position(|a| *a == flag).unwrap();
        let mounted = cmd[i + 1]
            .strip_prefix(&format!("{}/", deploy::CELLS_MOUNT))
            .unwrap();
        assert_eq!(dir.join("cells").join(mounted), *file, "seed {flag}");
    }
    assert_eq!(seed["restart"].as_str(), Some("no"), "the seed runs once");

    // Prometheus is on every network and scrapes every member and router.
    let prom = &services[compose::PROMETHEUS_SERVICE];
    assert_eq!(prom["networks"].as_object().unwrap().len(), env.cells.len());
    let members: Vec<(String, u64, String)> = env
        .cells
        .iter()
        .flat_map(|(_, d)| {
            d.members
                .iter()
                .map(|m| (d.name.clone(), m.id, format!("{}:2381", m.http.host())))
        })
        .collect();
    let routers: Vec<(u64, String)> = env
        .routers
        .routers
        .iter()
        .map(|r| (r.id, format!("{}:2377", compose::router_service(r.id))))
        .collect();
    let mounts: Vec<&str> = prom["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"./prometheus.yml:/etc/prometheus/prometheus.yml:ro"));
    assert!(mounts.contains(&"../prometheus:/etc/prometheus/rules:ro"));
    check_scrape_config(
        &dir.join("prometheus.yml"),
        "/etc/prometheus/rules/alerts.yml",
        &members,
        &routers,
    );
    for r in &env.routers.routers {
        let svc = &services[&compose::router_service(r.id)];
        let nets = svc["networks"].as_object().unwrap();
        assert_eq!(
            nets.len(),
            env.cells.len(),
            "router {} joins every cell network",
            r.id
        );
        for (net, cfg) in nets {
            assert_eq!(
                svc["labels"][format!("cellplane.ip.{net}")],
                cfg["ipv4_address"]
            );
        }
    }
}

// ---- The environment itself (needs Docker) ----

/// Runs the Compose tool on one project; `down -v` on drop, whatever happened.
struct Project {
    tool: Vec<String>,
    name: String,
    routers: Vec<u64>,
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Project {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.tool[0]);
        c.args(&self.tool[1..])
            .args(["-f", compose::COMPOSE_FILE, "-p", &self.name])
            .current_dir(compose_dir());
        // Docker picks the routers' host ports: nothing fixed can collide.
        for id in &self.routers {
            c.env(format!("CELLPLANE_ROUTER_{id}_CLIENT_PORT"), "");
            c.env(format!("CELLPLANE_ROUTER_{id}_ADMIN_PORT"), "");
        }
        c.env("CELLPLANE_PROMETHEUS_PORT", "");
        c
    }

    /// The state of `service`'s container: `running`, or `exited <code>`...
    fn state(&self, service: &str) -> String {
        let id = ok(self.cmd().args(["ps", "-q", service]));
        let id = id.trim();
        if id.is_empty() {
            return "absent".into();
        }
        ok(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            id,
        ]))
        .trim()
        .to_string()
    }

    /// The loopback address Docker published `port` of `service` on (the
    /// routers' certificates name 127.0.0.1, not the 0.0.0.0 Docker reports).
    fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = ok(self.cmd().args(["port", service, &port.to_string()]));
        let published: SocketAddr = out
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("port {service} {port}: `{out}`: {e}"));
        SocketAddr::from(([127, 0, 0, 1], published.port()))
    }

    fn fault(&self, args: &str) {
        let out = ok(Command::new(compose_dir().join("fault.sh"))
            .args(args.split(' '))
            .env("COMPOSE_PROJECT_NAME", &self.name));
        eprintln!("{}", out.trim());
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = run(self.cmd().args(["logs", "--no-color", "--tail", "25"]));
            eprintln!(
                "---- container logs ----\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let out = run(self.cmd().args(["down", "-v", "--timeout", "5"]));
        if !out.status.success() {
            eprintln!(
                "cannot take project {} down: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

const PROJECT_PREFIX: &str = "cellplanetest";

/// `docker compose` or `docker-compose`, if Docker answers; else why not.
fn docker() -> Result<Vec<String>, String> {
    let answers = |args: &[&str]| {
        Command::new("timeout")
            .arg("30")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !answers(&["docker", "info"]) {
        return Err("`docker info` failed: no Docker daemon answers".into());
    }
    if answers(&["docker", "compose", "version"]) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if answers(&["docker-compose", "version"]) {
        return Ok(vec!["docker-compose".into()]);
    }
    Err("Docker answers but neither `docker compose` nor `docker-compose` exists".into())
}

/// Takes down projects an interrupted earlier run left behind: their networks
/// hold the fixed subnets.
fn remove_leftovers(tool: &[String]) {
    let mut names = std::collections::BTreeSet::new();
    for what in [&["ps", "-a"][..], &["network", "ls"][..]] {
        let out = run(Command::new("docker")
            .args(what)
            .args(["--format", "{{.Label \"com.docker.compose.project\"}}"]));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with(PROJECT_PREFIX) {
                names.insert(line.to_string());
            }
        }
    }
    for name in names {
        eprintln!("taking down project {name}, left by an earlier run");
        let _ = run(Command::new(&tool[0])
            .args(&tool[1..])
            .args([
                "-f",
                compose::COMPOSE_FILE,
                "-p",
                &name,
                "down",
                "-v",
                "--timeout",
                "1",
            ])
            .current_dir(compose_dir()));
    }
}

/// What one tenant's requests did, by the phases they overlapped.
#[derive(Default, Debug, Clone)]
struct Tally {
    ok: usize,
    errors: Vec<String>,
}

/// Phase number → the cell a fault is on (or recovering from) in that phase.
type Plan = Arc<Mutex<Vec<Option<&'static str>>>>;

#[derive(Default)]
struct Results {
    /// (tenant, phase) → outcomes of requests that overlapped no fault of the
    /// tenant's cell.
    clean: BTreeMap<(&'static str, usize), Tally>,
    /// (tenant, phase) → outcomes of requests that overlapped a fault of the
    /// tenant's own cell.
    faulted: BTreeMap<(&'static str, usize), Tally>,
    /// tenant → when its last request that started after `since` succeeded.
    last_ok: BTreeMap<&'static str, Instant>,
}

const TENANTS: [(&str, &str); 3] = [("a", "alpha"), ("b", "beta"), ("c", "gamma")];

async fn one_request(
    kv: &mut KvClient<tonic::transport::Channel>,
    tenant: &str,
    i: u64,
) -> Result<(), String> {
    let key = format!("/{tenant}/load/{}", i % 64).into_bytes();
    let value = format!("v{i}").into_bytes();
    let call = async {
        kv.put(PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("put: {}", s.message()))?;
        let got = kv
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("get: {}", s.message()))?;
        match got.get_ref().kvs.first() {
            Some(kv) if kv.value == value => Ok(()),
            other => Err(format!("get: read {other:?} after writing {value:?}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(r) => r,
        Err(_) => Err("no answer in 15 s".into()),
    }
}

/// A client of a router acting as `tenant`, by the certificate `cellplane certs
/// generate` wrote for it (the Compose environment runs TLS and auth).
async fn client(addr: SocketAddr, tenant: &str) -> KvClient<tonic::transport::Channel> {
    let secrets = compose_dir().join("cells/secrets");
    let tls = cellplane_security::TlsFiles {
        ca: secrets.join("ca.crt"),
        cert: secrets.join(format!("tenant-{tenant}.crt")),
        key: secrets.join(format!("tenant-{tenant}.key")),
    }
    .load()
    .unwrap_or_else(|e| panic!("tenant {tenant}'s certificate: {e}"))
    .client();
    let channel = cellplane_security::endpoint(&addr.to_string(), Some(&tls))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(12))
        .connect_lazy();
    KvClient::new(channel)
}

/// One tenant's closed loop: put then get, alternating routers, each outcome
/// filed under the phases the request overlapped.
async fn load(
    tenant: &'static str,
    cell: &'static str,
    routers: Vec<SocketAddr>,
    phase: Arc<AtomicUsize>,
    plan: Plan,
    results: Arc<Mutex<Results>>,
    stop: CancellationToken,
) {
    let mut clients = Vec::new();
    for r in &routers {
        clients.push(client(*r, tenant).await);
    }
    let mut i = 0u64;
    while !stop.is_cancelled() {
        i += 1;
        let start_phase = phase.load(Ordering::SeqCst);
        let c = &mut clients[i as usize % routers.len()];
        let outcome = one_request(c, tenant, i).await;
        let end_phase = phase.load(Ordering::SeqCst);
        let plan = plan.lock().unwrap().clone();
        let hit = (start_phase..=end_phase).any(|p| plan.get(p).copied().flatten() == Some(cell));
        let failed = outcome.is_err();
        {
            let mut r = results.lock().unwrap();
            let book = if hit { &mut r.faulted } else { &mut r.clean };
            let tally = book.entry((tenant, start_phase)).or_default();
            match outcome {
                Ok(()) => {
                    tally.ok += 1;
                    r.last_ok.insert(tenant, Instant::now());
                }
                Err(e) => tally.errors.push(e),
            }
        }
        if failed {
            // A failing cell answers fast or not at all; do not spin on it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn wait_ready(p: &Project, services: &[(String, u16)], deadline: Instant) {
    for (svc, port) in services {
        let addr = p.port(svc, *port);
        loop {
            if cellplane::up::probe_ready(addr).await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{svc} not ready in time (/readyz at {addr})"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulted_cell_leaves_the_other_cells_untouched() {
    let tool = match docker() {
        Ok(t) => t,
        Err(why) => {
            assert!(
                std::env::var_os("CELLPLANE_REQUIRE_DOCKER").is_none(),
                "CELLPLANE_REQUIRE_DOCKER is set but {why}"
            );
            println!("SKIPPED the Compose fault test: {why}");
            eprintln!("SKIPPED the Compose fault test: {why}");
            return;
        }
    };
    let started = Instant::now();
    ok(Command::new(repo().join("deploy/build-image.sh"))
        .env("CELLPLANE_BIN", env!("CARGO_BIN_EXE_cellplane")));
    // Prometheus's image, built from Debian's binary like cellplane's.
    ok(&mut Command::new(
        repo().join("deploy/prometheus/build-image.sh"),
    ));
    remove_leftovers(&tool);
    // The environment runs TLS and auth: its certificates, keys, token key and
    // credentials file, made as the operator would (existing ones are kept).
    ok(Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["certs", "generate", "--cells"])
        .arg(compose_dir().join("cells")));
    let env = cellplane::up::load_env(&compose_dir().join("cells")).unwrap();
    let project = Project {
        tool,
        name: format!("{PROJECT_PREFIX}{}", std::process::id()),
        routers: env.routers.routers.iter().map(|r| r.id).collect(),
    };
    ok(project.cmd().args(["up", "-d"]));

    // Every member and router answers /readyz on its published http port.
    let mut services: Vec<(String, u16)> = Vec::new();
    for (_, def) in &env.cells {
        for m in &def.members {
            services.push((compose::member_service(&def.name, m.id), m.http.port()));
        }
    }
    for r in &env.routers.routers {
        services.push((compose::router_service(r.id), r.http.port()));
    }
    wait_ready(
        &project,
        &services,
        Instant::now() + Duration::from_secs(180),
    )
    .await;
    eprintln!("environment ready after {:?}", started.elapsed());
    check_seeded(&project, &env).await;
    check_prometheus(&project, &env).await;
    let routers: Vec<SocketAddr> = env
        .routers
        .routers
        .iter()
        .map(|r| project.port(&compose::router_service(r.id), r.client.port()))
        .collect();

    // A marker per tenant, read back at the end: faults lose no acknowledged write.
    for (tenant, _) in TENANTS {
        let mut kv = client(routers[0], tenant).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let put = kv
                .put(PutRequest {
                    key: format!("/{tenant}/marker").into_bytes(),
                    value: b"kept".to_vec(),
                    ..Default::default()
                })
                .await;
            match put {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("marker for {tenant}: {} (retrying)", e.message());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("tenant {tenant}: no write through the router: {e}"),
            }
        }
    }

    let phase = Arc::new(AtomicUsize::new(0));
    let plan: Plan = Arc::new(Mutex::new(vec![None]));
    let results = Arc::new(Mutex::new(Results::default()));
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for (tenant, cell) in TENANTS {
        workers.push(tokio::spawn(load(
            tenant,
            cell,
            routers.clone(),
            phase.clone(),
            plan.clone(),
            results.clone(),
            stop.clone(),
        )));
    }
    let next_phase = |cell: Option<&'static str>| {
        let mut p = plan.lock().unwrap();
        p.push(cell);
        phase.store(p.len() - 1, Ordering::SeqCst);
    };
    tokio::time::sleep(Duration::from_secs(4)).await;

    let faults = [
        ("disconnect", "alpha", "a"),
        ("pause", "beta", "b"),
        ("kill", "gamma", "c"),
    ];
    let mut fault_phases = Vec::new();
    for (action, cell, tenant) in faults {
        next_phase(Some(cell));
        fault_phases.push((phase.load(Ordering::SeqCst), cell, tenant));
        project.fault(&format!("{action} cell {cell}"));
        tokio::time::sleep(Duration::from_secs(8)).await;
        // Recovering: the faulted tenant may still fail until it answers again.
        next_phase(Some(cell));
        let healed = Instant::now();
        project.fault(&format!("heal cell {cell}"));
        let deadline = healed + Duration::from_secs(90);
        loop {
            let recovered = results
                .lock()
                .unwrap()
                .last_ok
                .get(tenant)
                .is_some_and(|t| *t > healed);
            if recovered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tenant {tenant} did not recover within 90 s of healing cell {cell}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "{action} {cell}: tenant {tenant} recovered in {:?}",
            healed.elapsed()
        );
        next_phase(None);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    check_results(&results.lock().unwrap(), &fault_phases);

    for (tenant, _) in TENANTS {
        let mut kv = client(routers[0], tenant).await;
        let got = kv
            .range(RangeRequest {
                key: format!("/{tenant}/marker").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("tenant {tenant}: marker unreadable: {e}"));
        assert_eq!(
            got.get_ref().kvs.first().map(|kv| kv.value.as_slice()),
            Some(&b"kept"[..]),
            "tenant {tenant} lost its marker"
        );
    }
    eprintln!("Compose fault test done in {:?}", started.elapsed());
}

/// The seed container ran `map seed` to the end: exited 0, and the directory
/// holds the static map (read through the published client port of the
/// directory's first member, as the operator).
async fn check_seeded(p: &Project, env: &cellplane::up::EnvDef) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = p.state(compose::SEED_SERVICE);
        if state.starts_with("exited") {
            let logs = run(p.cmd().args(["logs", "--no-color", compose::SEED_SERVICE]));
            assert_eq!(
                state,
                "exited 0",
                "the seed failed: {}",
                String::from_utf8_lossy(&logs.stdout)
            );
            eprintln!("seed: {}", String::from_utf8_lossy(&logs.stdout).trim());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the seed is still {state} after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, dir) = env
        .cells
        .iter()
        .find(|(_, d)| d.name == env.routers.directory)
        .unwrap();
    let addr = p.port(&compose::member_service(&dir.name, 1), 2379);
    let op = cellplane::certs_cmd::operator_files(env).unwrap();
    let tls = op.load().unwrap().client();
    let directory = cellplane_router::directory::Directory::new(
        &[addr.to_string()],
        Duration::from_secs(5),
        Some(&tls),
    )
    .unwrap();
    let (map, _) = directory
        .read()
        .await
        .expect("the directory holds the seeded map");
    assert_eq!(map.version, env.static_map.version);
    assert_eq!(map.tenants, env.static_map.tenants);
}

/// GET `path` from Prometheus at `addr`; the JSON body.
async fn prometheus_get(addr: SocketAddr, path: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Prometheus answers on its published port, loaded the rules of
/// deploy/prometheus/alerts.yml (when that file exists) and scrapes every member
/// and router: each target is up within a minute.
async fn check_prometheus(p: &Project, env: &cellplane::up::EnvDef) {
    let addr = p.port(compose::PROMETHEUS_SERVICE, compose::PROMETHEUS_PORT);
    let expected = env
        .cells
        .iter()
        .map(|(_, d)| d.members.len())
        .sum::<usize>()
        + env.routers.routers.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        if let Some(targets) = prometheus_get(addr, "/api/v1/targets").await {
            let active = targets["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            if active.len() == expected && up == expected {
                break;
            }
            last = format!("{up} of {} targets up (want {expected})", active.len());
        }
        assert!(Instant::now() < deadline, "Prometheus at {addr}: {last}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rules = prometheus_get(addr, "/api/v1/rules")
        .await
        .expect("Prometheus answers /api/v1/rules");
    assert_eq!(rules["status"], "success", "{rules}");
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let alerts: usize = groups
        .iter()
        .map(|g| g["rules"].as_array().map_or(0, |r| r.len()))
        .sum();
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let written = text.matches("- alert:").count();
    assert_eq!(
        alerts, written,
        "Prometheus loaded {alerts} of the {written} rules in alerts.yml: {rules}"
    );
    eprintln!(
        "prometheus: {expected} targets up, {} rule group(s), {alerts} rule(s)",
        groups.len()
    );
}

/// Zero errors for tenants whose cell was untouched; errors for the faulted one;
/// enough requests served beside each fault for the zero to mean something.
fn check_results(r: &Results, fault_phases: &[(usize, &'static str, &'static str)]) {
    for ((tenant, p), tally) in &r.clean {
        assert!(
            tally.errors.is_empty(),
            "tenant {tenant} saw {} error(s) in phase {p} while its cell was untouched: {:?}",
            tally.errors.len(),
            &tally.errors[..tally.errors.len().min(5)]
        );
    }
    for (p, cell, tenant) in fault_phases {
        let failed = r.faulted.get(&(*tenant, *p)).map_or(0, |t| t.errors.len());
        assert!(
            failed > 0,
            "faulting cell {cell} failed no request of tenant {tenant}"
        );
        for (other, _) in TENANTS.iter().filter(|(t, _)| t != tenant) {
            let served = r.clean.get(&(*other, *p)).map_or(0, |t| t.ok);
            assert!(
                served >= 3,
                "tenant {other} made {served} request(s) while cell {cell} was down: too few to count"
            );
        }
        eprintln!(
            "phase {p} ({cell} faulted): {}",
            TENANTS
                .iter()
                .map(|(t, _)| {
                    let c = r.clean.get(&(*t, *p)).cloned().unwrap_or_default();
                    let f = r.faulted.get(&(*t, *p)).cloned().unwrap_or_default();
                    format!(
                        "{t}: {} ok {} failed",
                        c.ok + f.ok,
                        c.errors.len() + f.errors.len()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
