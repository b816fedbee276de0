//! Test harness: a cell of real `cellplane node` processes on 127.0.0.1 with
//! free ports (below the ephemeral range) and temporary data directories,
//! removed on drop.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::StatusRequest;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cellplane_security::Identity;
use cellplane_security::issue::Authority;
use tonic::transport::{Channel, ClientTlsConfig};

pub struct MemberProc {
    pub id: u64,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct TestCell {
    pub dir: tempfile::TempDir,
    pub def_path: PathBuf,
    pub members: Vec<MemberProc>,
    /// With TLS on: how the test's own clients dial the members (an operator's
    /// certificate).
    pub tls: Option<ClientTlsConfig>,
}

/// Ports the OS considers free right now. Between dropping the probe sockets and the
/// member binding them another process could take one; on a test machine that is
/// rare, and the start-up check below then fails loudly rather than hangs.
/// Ports free right now, for processes the test starts (which bind them
/// themselves, so the test cannot hold them). Taken below Linux's ephemeral
/// range (32768-60999): a port the OS picked for `:0` is also one it may hand
/// to the next outgoing connection (a client's, a member's dialing a peer)
/// before the process that should listen there has started. Each call in
/// this process moves on from where the last stopped, starting at an offset
/// from the process id, so parallel tests do not draw the same ports.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut out = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if out.len() == n {
            break;
        }
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if let Ok(l) = TcpListener::bind(addr) {
            held.push(l);
            out.push(addr);
        }
    }
    assert_eq!(out.len(), n, "no free ports below the ephemeral range");
    out
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cellplane"))
}

impl TestCell {
    /// Starts a cell of `n` members and waits until every member is ready.
    pub fn start(n: usize) -> TestCell {
        Self::start_with(n, "")
    }

    /// Like `start`, with extra TOML appended to the cell definition.
    pub fn start_with(n: usize, extra_toml: &str) -> TestCell {
        Self::start_named("test", n, extra_toml)
    }

    /// A cell with the given name.
    pub fn start_named(name: &str, n: usize, extra_toml: &str) -> TestCell {
        Self::start_full(name, n, extra_toml, None)
    }

    /// A cell whose members serve TLS with certificates from `pki`'s CA, and
    /// require one from every caller.
    pub fn start_tls(name: &str, n: usize, extra_toml: &str, pki: &TestPki) -> TestCell {
        Self::start_full(name, n, extra_toml, Some(pki))
    }

    fn start_full(name: &str, n: usize, extra_toml: &str, pki: Option<&TestPki>) -> TestCell {
        let mut cell = Self::define(name, n, extra_toml, pki);
        cell.start_all();
        cell
    }

    /// Starts every member and waits until each is ready.
    pub fn start_all(&mut self) {
        for id in 1..=self.members.len() as u64 {
            self.spawn(id);
        }
        self.wait_ready(Duration::from_secs(60));
    }

    /// The folder holding member `id`'s data directory as `<id>`.
    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A cell's definition, written, with no member started yet.
    pub fn define(name: &str, n: usize, extra_toml: &str, pki: Option<&TestPki>) -> TestCell {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs = free_addrs(3 * n);
        let mut toml = format!("name = \"{name}\"\n{extra_toml}\n");
        if let Some(pki) = pki {
            toml.push_str(&format!("[tls]\nca = {:?}\n", pki.ca_path()));
        }
        let mut members = Vec::new();
        for i in 0..n {
            let id = (i + 1) as u64;
            let (client, peer, http) = (addrs[3 * i], addrs[3 * i + 1], addrs[3 * i + 2]);
            toml.push_str(&format!(
                "[[members]]\nid = {id}\nclient = \"{client}\"\npeer = \"{peer}\"\nhttp = \"{http}\"\n"
            ));
            if let Some(pki) = pki {
                let (cert, key) = pki.issue(
                    &format!("{name}-{id}"),
                    &Identity::Member {
                        cell: name.to_string(),
                        id,
                    },
                );
                toml.push_str(&format!("cert = {cert:?}\nkey = {key:?}\n"));
            }
            members.push(MemberProc {
                id,
                client,
                peer,
                http,
                data_dir: dir.path().join("data").join(id.to_string()),
                log: dir.path().join(format!("m{id}.log")),
                child: None,
            });
        }
        let def_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&def_path, toml).expect("write cell definition");
        TestCell {
            dir,
            def_path,
            members,
            tls: pki.map(|p| p.client(&Identity::Operator("test-operator".into()))),
        }
    }

    /// Appends member `id` to the cell file, on fresh ports, without starting
    /// it (what an operator does before `etcdctl member add`).
    pub fn define_member(&mut self, id: u64) -> &MemberProc {
        let addrs = free_addrs(3);
        let (client, peer, http) = (addrs[0], addrs[1], addrs[2]);
        let mut toml = std::fs::read_to_string(&self.def_path).expect("read cell file");
        toml.push_str(&format!(
            "[[members]]\nid = {id}\nclient = \"{client}\"\npeer = \"{peer}\"\nhttp = \"{http}\"\n"
        ));
        std::fs::write(&self.def_path, toml).expect("write cell file");
        self.members.push(MemberProc {
            id,
            client,
            peer,
            http,
            data_dir: self.dir.path().join("data").join(id.to_string()),
            log: self.dir.path().join(format!("m{id}.log")),
            child: None,
        });
        self.member(id)
    }

    pub fn member(&self, id: u64) -> &MemberProc {
        &self.members[(id - 1) as usize]
    }

    pub fn spawn(&mut self, id: u64) {
        self.spawn_with(id, &[]);
    }

    /// Starts member `id` with extra `cellplane node` arguments (`--join`).
    pub fn spawn_with(&mut self, id: u64, extra: &[&str]) {
        let def = self.def_path.clone();
        let m = &mut self.members[(id - 1) as usize];
        assert!(m.child.is_none(), "member {id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open log");
        let child = Command::new(bin())
            .args(["node", "--cell"])
            .arg(&def)
            .args(["--id", &id.to_string(), "--data-dir"])
            .arg(&m.data_dir)
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn cellplane node");
        m.child = Some(child);
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u64) {
        let m = &mut self.members[(id - 1) as usize];
        if let Some(mut c) = m.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_all(&mut self) {
        for id in 1..=self.members.len() as u64 {
            self.kill(id);
        }
    }

    pub fn all_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.member(id).log).unwrap_or_default()
    }

    /// Waits until every running member answers /readyz with 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let id = self.members[i].id;
            let http = self.members[i].http;
            loop {
                let exited = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    panic!("member {id} exited ({status}):\n{}", self.log_of(id));
                }
                if http_get(http, "/readyz")
                    .map(|(code, _)| code == 200)
                    .unwrap_or(false)
                {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("member {id} not ready in time:\n{}", self.log_of(id));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The id of the member every running member agrees leads, once they agree on
    /// one other than `not` (survivors report a dead leader until they time out).
    pub async fn new_leader(&self, not: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self
                .leader(deadline.saturating_duration_since(Instant::now()))
                .await;
            if l != not {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "members still follow dead leader {not}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The id of the member every running member agrees leads, once they agree.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Ok(ch) = channel_with(m.client, self.tls.as_ref()).await
                    && let Ok(r) = MaintenanceClient::new(ch).status(StatusRequest {}).await
                {
                    seen.push(r.into_inner().leader);
                }
            }
            let running = self.members.iter().filter(|m| m.child.is_some()).count();
            if seen.len() == running
                && !seen.is_empty()
                && seen.iter().all(|l| *l == seen[0] && *l != 0)
            {
                return seen[0];
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader in time: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn kv(&self, id: u64) -> KvClient<Channel> {
        let ch = channel_with(self.member(id).client, self.tls.as_ref())
            .await
            .expect("connect kv");
        KvClient::new(ch)
    }
}

impl Drop for TestCell {
    fn drop(&mut self) {
        self.kill_all();
    }
}

pub async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    channel_with(addr, None).await
}

/// A channel to `addr`, over TLS with `tls`.
pub async fn channel_with(
    addr: SocketAddr,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    cellplane_security::endpoint(&addr.to_string(), tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A CA for a test environment, and the certificates it issues, in a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    ca: Authority,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::generate("test CA", 30).expect("CA");
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        TestPki { dir, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_string()
    }

    /// Issues a certificate for `id` valid for loopback, written as
    /// `<name>.crt` and `<name>.key`; returns the two paths.
    pub fn issue(&self, name: &str, id: &Identity) -> (PathBuf, PathBuf) {
        let hosts = ["127.0.0.1", "localhost", "::1"].map(String::from);
        let issued = self.ca.issue(id, &hosts, 30).expect("issue");
        let (cert, key) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        (cert, key)
    }

    /// Client TLS settings presenting a fresh certificate for `id`.
    pub fn client(&self, id: &Identity) -> ClientTlsConfig {
        let name = id.uri().unwrap_or_default().replace(['/', ':'], "_");
        let (cert, key) = self.issue(&name, id);
        cellplane_security::TlsFiles {
            ca: self.ca_path(),
            cert,
            key,
        }
        .load()
        .expect("load test TLS files")
        .client()
    }

    /// Client TLS settings that trust the CA and present no certificate.
    pub fn anonymous_client(&self) -> ClientTlsConfig {
        cellplane_security::tls::client_trusting(self.ca.cert_pem().as_bytes())
    }
}

pub async fn kv(addr: SocketAddr) -> Result<KvClient<Channel>, tonic::transport::Error> {
    Ok(KvClient::new(channel(addr).await?))
}

pub async fn maintenance(
    addr: SocketAddr,
) -> Result<MaintenanceClient<Channel>, tonic::transport::Error> {
    Ok(MaintenanceClient::new(channel(addr).await?))
}

/// A bare HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

/// The value of the series `name` (with its labels, if any) in a Prometheus
/// text exposition; panics, showing the text, if it is not there.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// A whole environment: cells, a directory cell and one router, as real processes.
pub struct TestEnv {
    pub cells: Vec<TestCell>,
    pub directory: TestCell,
    pub folder: tempfile::TempDir,
    pub router_client: SocketAddr,
    pub router_admin: SocketAddr,
    pub router_http: SocketAddr,
    pub router: Option<Child>,
    /// With TLS on: the environment's CA.
    pub pki: Option<TestPki>,
}

/// A user of a secure environment's credentials file.
pub struct User<'a> {
    pub name: &'a str,
    pub operator: bool,
    pub password: &'a str,
}

impl TestEnv {
    /// Cells `names` of `members` each, plus a 1-member directory and a router.
    /// The static map pins tenant `a` to the first cell, `b` to the second, and so on.
    pub fn start(names: &[&str], members: usize) -> TestEnv {
        let cells: Vec<TestCell> = names
            .iter()
            .map(|n| TestCell::start_named(n, members, ""))
            .collect();
        let directory = TestCell::start_named("directory", 1, "");
        let folder = tempfile::tempdir().expect("tempdir");
        let r = free_addrs(3);
        std::fs::write(
            folder.path().join("routers.toml"),
            format!(
                "directory = \"directory\"\nstatic_map = \"routing.toml\"\n[[routers]]\nid = 1\nclient = \"{}\"\nadmin = \"{}\"\nhttp = \"{}\"\n[settings]\ndirectory_poll_ms = 200\n[settings.pool]\nrequest_timeout_ms = 3000\nprobe_interval_ms = 200\n",
                r[0], r[1], r[2]
            ),
        )
        .unwrap();
        Self::assemble(cells, directory, folder, r, None)
    }

    /// The environment of `folder` (routers.toml written), with the directory's
    /// definition and the static map beside it.
    fn assemble(
        cells: Vec<TestCell>,
        directory: TestCell,
        folder: tempfile::TempDir,
        r: Vec<SocketAddr>,
        pki: Option<TestPki>,
    ) -> TestEnv {
        std::fs::copy(&directory.def_path, folder.path().join("directory.toml")).unwrap();
        let env = TestEnv {
            cells,
            directory,
            folder,
            router_client: r[0],
            router_admin: r[1],
            router_http: r[2],
            router: None,
            pki,
        };
        std::fs::write(
            env.folder.path().join("routing.toml"),
            env.static_map(1, &[]),
        )
        .unwrap();
        env
    }

    /// Like [`TestEnv::start`] with TLS everywhere (mTLS between members) and auth
    /// on at the router: `users` log in with passwords; tokens live `token_ttl_secs`.
    pub fn start_secure(
        names: &[&str],
        members: usize,
        users: &[User],
        token_ttl_secs: u64,
    ) -> TestEnv {
        let pki = TestPki::new();
        let cells: Vec<TestCell> = names
            .iter()
            .map(|n| TestCell::start_tls(n, members, "", &pki))
            .collect();
        let directory = TestCell::start_tls("directory", 1, "role = \"directory\"\n", &pki);
        let folder = tempfile::tempdir().expect("tempdir");
        let r = free_addrs(3);
        let (cert, key) = pki.issue("router-1", &Identity::Router(1));
        let mut creds = cellplane_security::Credentials::default();
        for u in users {
            let role = if u.operator {
                cellplane_security::Role::Operator
            } else {
                cellplane_security::Role::Tenant
            };
            creds.add(u.name, role, u.password, false).unwrap();
        }
        creds.save(&folder.path().join("credentials.toml")).unwrap();
        std::fs::write(
            folder.path().join("token.key"),
            cellplane_security::token::new_key_line(),
        )
        .unwrap();
        std::fs::write(
            folder.path().join("routers.toml"),
            format!(
                "directory = \"directory\"\nstatic_map = \"routing.toml\"\n\
                 [tls]\nca = {:?}\n\
                 [auth]\nenabled = true\ncredentials = \"credentials.toml\"\n\
                 token_key = \"token.key\"\ntoken_ttl_secs = {token_ttl_secs}\nreload_ms = 200\n\
                 [[routers]]\nid = 1\nclient = \"{}\"\nadmin = \"{}\"\nhttp = \"{}\"\n\
                 cert = {cert:?}\nkey = {key:?}\n\
                 [settings]\ndirectory_poll_ms = 200\n[settings.pool]\nrequest_timeout_ms = 3000\n\
                 probe_interval_ms = 200\n",
                pki.ca_path(),
                r[0],
                r[1],
                r[2]
            ),
        )
        .unwrap();
        Self::assemble(cells, directory, folder, r, Some(pki))
    }

    /// The environment's CA (a secure environment only).
    pub fn pki(&self) -> &TestPki {
        self.pki.as_ref().expect("a secure environment")
    }

    /// The static map text: even buckets over the cells, tenants a, b, c… pinned to
    /// cells 1, 2, 3…, plus `extra` pins.
    pub fn static_map(&self, version: u64, extra: &[(&str, &str)]) -> String {
        let names: Vec<String> = self.cells.iter().map(|c| c.def_name()).collect();
        let mut t = format!("version = {version}\nbuckets = 4096\n");
        for c in &self.cells {
            let eps: Vec<String> = c
                .members
                .iter()
                .map(|m| format!("\"{}\"", m.client))
                .collect();
            t.push_str(&format!(
                "[[cells]]\nname = \"{}\"\nendpoints = [{}]\n",
                c.def_name(),
                eps.join(", ")
            ));
        }
        let n = names.len() as u32;
        let mut from = 0;
        for (i, name) in names.iter().enumerate() {
            let share = 4096 / n + u32::from((i as u32) < 4096 % n);
            t.push_str(&format!(
                "[[ranges]]\nfrom = {from}\nto = {}\ncell = \"{name}\"\n",
                from + share - 1
            ));
            from += share;
        }
        t.push_str("[tenants]\n");
        for (i, name) in names.iter().enumerate() {
            let tenant = (b'a' + i as u8) as char;
            if !extra.iter().any(|(t, _)| *t == tenant.to_string()) {
                t.push_str(&format!("{tenant} = \"{name}\"\n"));
            }
        }
        for (tenant, cell) in extra {
            t.push_str(&format!("{tenant} = \"{cell}\"\n"));
        }
        t
    }

    pub fn state_dir(&self) -> PathBuf {
        self.folder.path().join("router-state")
    }

    pub fn start_router(&mut self) {
        assert!(self.router.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.folder.path().join("router.log"))
            .unwrap();
        let child = Command::new(bin())
            .args(["router", "--routers"])
            .arg(self.folder.path().join("routers.toml"))
            .args(["--id", "1", "--state-dir"])
            .arg(self.state_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.router = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.router_http, "/readyz").is_none_or(|(c, _)| c != 200) {
            assert!(
                Instant::now() < deadline,
                "router not ready:\n{}",
                self.router_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_router(&mut self) {
        if let Some(mut c) = self.router.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn router_log(&self) -> String {
        std::fs::read_to_string(self.folder.path().join("router.log")).unwrap_or_default()
    }

    pub async fn router_kv(&self) -> KvClient<Channel> {
        kv(self.router_client).await.expect("connect router")
    }

    /// Writes a map (TOML text) into the directory as the live map.
    pub async fn publish_map(&self, toml_text: &str, expected_revision: i64) {
        let map = cellplane_map::CellMap::from_toml(toml_text).expect("valid map");
        let eps: Vec<String> = self
            .directory
            .members
            .iter()
            .map(|m| m.client.to_string())
            .collect();
        let tls = self
            .pki
            .as_ref()
            .map(|p| p.client(&Identity::Operator("test-operator".into())));
        let dir =
            cellplane_router::directory::Directory::new(&eps, Duration::from_secs(3), tls.as_ref())
                .unwrap();
        dir.write(&map, expected_revision).await.expect("write map");
    }

    pub async fn admin_status(&self) -> cellplane_proto::router::RouterStatusResponse {
        let tls = self
            .pki
            .as_ref()
            .map(|p| p.client(&Identity::Operator("test-operator".into())));
        let ch = channel_with(self.router_admin, tls.as_ref()).await.unwrap();
        cellplane_proto::router::router_admin_client::RouterAdminClient::new(ch)
            .status(cellplane_proto::router::RouterStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

/// A second router whose directory never answers and that has no
/// last-known-good map: it routes by the static map of version 1 forever.
pub struct StaleRouter {
    _folder: tempfile::TempDir,
    pub client: std::net::SocketAddr,
    child: std::process::Child,
}

impl StaleRouter {
    pub fn start(env: &TestEnv) -> StaleRouter {
        let folder = tempfile::tempdir().unwrap();
        let r = free_addrs(6);
        std::fs::write(
            folder.path().join("directory.toml"),
            format!(
                "name = \"directory\"\n[[members]]\nid = 1\nclient = \"{}\"\npeer = \"{}\"\nhttp = \"{}\"\n",
                r[3], r[4], r[5]
            ),
        )
        .unwrap();
        std::fs::write(folder.path().join("routing.toml"), env.static_map(1, &[])).unwrap();
        std::fs::write(
            folder.path().join("routers.toml"),
            format!(
                "directory = \"directory\"\nstatic_map = \"routing.toml\"\n[[routers]]\nid = 1\n\
                 client = \"{}\"\nadmin = \"{}\"\nhttp = \"{}\"\n[settings]\ndirectory_poll_ms = 200\n\
                 [settings.pool]\nrequest_timeout_ms = 3000\nprobe_interval_ms = 200\n",
                r[0], r[1], r[2]
            ),
        )
        .unwrap();
        let log = std::fs::File::create(folder.path().join("router.log")).unwrap();
        let child = std::process::Command::new(bin())
            .args(["router", "--routers"])
            .arg(folder.path().join("routers.toml"))
            .args(["--id", "1", "--state-dir"])
            .arg(folder.path().join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(r[2], "/readyz").is_none_or(|(c, _)| c != 200) {
            assert!(Instant::now() < deadline, "stale router not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        StaleRouter {
            _folder: folder,
            client: r[0],
            child,
        }
    }
}

impl Drop for StaleRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.stop_router();
    }
}

impl TestCell {
    pub fn def_name(&self) -> String {
        self.def_path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

/// A Put of `k` = `v`.
pub fn put(k: &str, v: &str) -> cellplane_proto::etcdserverpb::PutRequest {
    cellplane_proto::etcdserverpb::PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

/// A Range of the single key `k`.
pub fn get(k: &str) -> cellplane_proto::etcdserverpb::RangeRequest {
    cellplane_proto::etcdserverpb::RangeRequest {
        key: k.into(),
        ..Default::default()
    }
}

/// Runs Debian's `etcdctl` (3.4, v3 API) against `endpoints`; returns whether it
/// succeeded and its stdout and stderr together.
pub fn etcdctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("etcdctl is not installed: run scripts/setup.sh (Debian package etcd-client)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A range over every key starting with `p` (whose last byte is below 0xff).
pub fn prefix(p: &str) -> cellplane_proto::etcdserverpb::RangeRequest {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    cellplane_proto::etcdserverpb::RangeRequest {
        key: p.into(),
        range_end: end,
        ..Default::default()
    }
}

/// A line of `/proc/<pid>/status` (`VmRSS`: resident memory now, `VmHWM`: its
/// peak so far), in bytes (Linux).
pub fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A value LZ4 cannot shrink much (letters from a xorshift generator), so a
/// test's data takes its size in RocksDB and in memory.
pub fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The cell's current revision, as a read's header gives it.
pub async fn revision(kv: &mut KvClient<Channel>) -> i64 {
    kv.range(get("/"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision
}

/// Puts `k` = `v` and answers the revision the put made.
pub async fn put_revision(kv: &mut KvClient<Channel>, k: &str, v: &str) -> i64 {
    kv.put(put(k, v))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision
}

/// Runs `cellplane <args>`; answers whether it succeeded and what it printed
/// (stdout, then stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The cell that served a router's response (its `cellplane-cell` metadata).
pub fn served_by<T>(r: &tonic::Response<T>) -> String {
    r.metadata()
        .get("cellplane-cell")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// `cellplane map apply` of version `version` of the environment's map with
/// `extra` pins: written to the directory, then pushed to every cell.
pub fn apply_map(env: &TestEnv, version: u64, extra: &[(&str, &str)]) -> String {
    let file = env.folder.path().join(format!("map-{version}.toml"));
    std::fs::write(&file, env.static_map(version, extra)).unwrap();
    let dir = env.directory.members[0].client.to_string();
    let (ok, out) = cli(&["map", "--directory", &dir, "apply", file.to_str().unwrap()]);
    assert!(ok, "map apply: {out}");
    out
}

/// Operation `n` of history client `id`, recorded in `rec`: a put of key
/// `{prefix}{n % 3}` when `n` is even, a linearizable get otherwise. Answers
/// the cell that served it, or `None` when it failed (a failed put is recorded
/// as of unknown outcome, a failed get is dropped).
pub async fn recorded_op(
    rec: &cellplane_chaos::lincheck::Recorder,
    id: u64,
    n: u64,
    prefix: &str,
    kv: &mut KvClient<Channel>,
) -> Option<String> {
    use cellplane_chaos::lincheck::{KvInput, KvOutput};
    let key = format!("{prefix}{}", n % 3);
    let input = if n.is_multiple_of(2) {
        KvInput::Put {
            value: format!("{id}-{n}"),
        }
    } else {
        KvInput::Get
    };
    let p = rec.invoke(id, &key, input.clone());
    let result = match &input {
        KvInput::Put { value } => kv
            .put(put(&key, value))
            .await
            .map(|r| (served_by(&r), KvOutput::Put)),
        _ => kv.range(get(&key)).await.map(|r| {
            let cell = served_by(&r);
            let v = r
                .into_inner()
                .kvs
                .first()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            (cell, KvOutput::Get(v))
        }),
    };
    match (result, input) {
        (Ok((cell, out)), _) => {
            rec.complete(p, out);
            Some(cell)
        }
        (Err(_), KvInput::Get) => {
            rec.discard(p);
            None
        }
        (Err(_), _) => {
            rec.unknown(p);
            None
        }
    }
}

/// Whether a test must fail, not skip, when a tool it needs is missing:
/// `.ci/run` sets `CELLPLANE_REQUIRE_TOOLS=1` after `scripts/setup.sh` installed them.
pub fn tools_required() -> bool {
    std::env::var("CELLPLANE_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Loads `url` in headless Chromium (`scripts/headless.sh`: no network beyond
/// 127.0.0.1) and answers the DOM it rendered; the screenshot is kept as
/// `<target>/tmp/artifacts/<name>.png` for a person to look at. `None` (with
/// SKIPPED printed) when no Chromium is installed and tools are not required.
pub fn headless(url: &str, name: &str) -> Option<String> {
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(format!("{name}.png"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/headless.sh");
    let out = std::process::Command::new(script)
        .arg(url)
        .arg(&shot)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) && !tools_required() {
        eprintln!("SKIPPED the browser check of {url}: {stderr}");
        return None;
    }
    assert!(out.status.success(), "headless Chromium on {url}: {stderr}");
    eprintln!("screenshot of {url}: {}", shot.display());
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}
