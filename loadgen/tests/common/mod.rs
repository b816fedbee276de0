//! Harness of the end-to-end tests: real `cellplane` processes on 127.0.0.1 with
//! ephemeral ports and temporary directories, stopped on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `cellplane` binary: $CELLPLANE_BIN, else beside this test's profile
/// directory (`<target>/release/cellplane`, the test being
/// `<target>/release/deps/<name>-<hash>`), else under $CARGO_TARGET_DIR.
/// `cargo test --release` at the workspace root builds it (the cellplane
/// package's own tests need it); `cargo test -p loadgen` alone does not.
pub fn cellplane_bin() -> PathBuf {
    let mut tried = Vec::new();
    if let Ok(p) = std::env::var("CELLPLANE_BIN") {
        tried.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile) = exe.parent().and_then(Path::parent)
    {
        tried.push(profile.join("cellplane"));
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        tried.push(PathBuf::from(t).join("release").join("cellplane"));
    }
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "the cellplane binary is not built: run `cargo build --release -p cellplane` \
             (or set CELLPLANE_BIN); looked at {tried:?}"
        ),
    }
}

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

pub fn http_ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

fn members_toml(addrs: &[SocketAddr]) -> String {
    let mut t = String::new();
    for (i, a) in addrs.chunks(3).enumerate() {
        t.push_str(&format!(
            "[[members]]\nid = {}\nclient = \"{}\"\npeer = \"{}\"\nhttp = \"{}\"\n",
            i + 1,
            a[0],
            a[1],
            a[2]
        ));
    }
    t
}

/// A 3-member cell of `cellplane node` processes.
pub struct Cell {
    pub dir: tempfile::TempDir,
    pub clients: Vec<SocketAddr>,
    children: Vec<Child>,
}

impl Cell {
    pub fn start(name: &str) -> Cell {
        let bin = cellplane_bin();
        let dir = tempfile::tempdir().unwrap();
        let addrs = free_addrs(9);
        let def = dir.path().join(format!("{name}.toml"));
        std::fs::write(&def, format!("name = \"{name}\"\n{}", members_toml(&addrs))).unwrap();
        let mut children = Vec::new();
        for id in 1..=3 {
            let log = std::fs::File::create(dir.path().join(format!("m{id}.log"))).unwrap();
            children.push(
                Command::new(&bin)
                    .args(["node", "--cell"])
                    .arg(&def)
                    .args(["--id", &id.to_string(), "--data-dir"])
                    .arg(dir.path().join(format!("m{id}")))
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("spawn cellplane node"),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (i, a) in addrs.chunks(3).enumerate() {
            while !http_ready(a[2]) {
                assert!(
                    Instant::now() < deadline,
                    "member {} not ready in 60 s:\n{}",
                    i + 1,
                    std::fs::read_to_string(dir.path().join(format!("m{}.log", i + 1)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cell {
            dir,
            clients: addrs.chunks(3).map(|a| a[0]).collect(),
            children,
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.clients.iter().map(|a| a.to_string()).collect()
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cellplane up` over a generated `cells/` folder: cells alpha and beta (3
/// members each), the directory (1 member) and one router; tenant `a` is pinned to
/// alpha and `b` to beta.
pub struct Up {
    pub dir: tempfile::TempDir,
    pub cells: PathBuf,
    pub data: PathBuf,
    pub router: SocketAddr,
    child: Child,
}

impl Up {
    pub fn start() -> Up {
        let bin = cellplane_bin();
        let dir = tempfile::tempdir().unwrap();
        let cells = dir.path().join("cells");
        std::fs::create_dir_all(&cells).unwrap();
        let a = free_addrs(24);
        std::fs::write(
            cells.join("alpha.toml"),
            format!("name = \"alpha\"\n{}", members_toml(&a[0..9])),
        )
        .unwrap();
        std::fs::write(
            cells.join("beta.toml"),
            format!("name = \"beta\"\n{}", members_toml(&a[9..18])),
        )
        .unwrap();
        std::fs::write(
            cells.join("directory.toml"),
            format!("name = \"directory\"\n{}", members_toml(&a[18..21])),
        )
        .unwrap();
        std::fs::write(
            cells.join("routers.toml"),
            format!(
                "directory = \"directory\"\n[[routers]]\nid = 1\nclient = \"{}\"\nadmin = \"{}\"\nhttp = \"{}\"\n",
                a[21], a[22], a[23]
            ),
        )
        .unwrap();
        let eps = |r: &[SocketAddr]| {
            r.chunks(3)
                .map(|m| format!("\"{}\"", m[0]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        std::fs::write(
            cells.join("routing.toml"),
            format!(
                "version = 1\n\
                 [[cells]]\nname = \"alpha\"\nendpoints = [{}]\n\
                 [[cells]]\nname = \"beta\"\nendpoints = [{}]\n\
                 [[ranges]]\nfrom = 0\nto = 2047\ncell = \"alpha\"\n\
                 [[ranges]]\nfrom = 2048\nto = 4095\ncell = \"beta\"\n\
                 [tenants]\na = \"alpha\"\nb = \"beta\"\n",
                eps(&a[0..9]),
                eps(&a[9..18])
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let mut child = Command::new(&bin)
            .arg("up")
            .arg("--cells")
            .arg(&cells)
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn cellplane up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut printed = Vec::new();
        loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                panic!("`up` never said ready; it printed:\n{}", printed.join("\n"));
            };
            let ready = line.starts_with("cellplane is ready");
            printed.push(line);
            if ready {
                break;
            }
        }
        Up {
            dir,
            cells,
            data,
            router: a[21],
            child,
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM: `up` stops its children (they also stop when it is gone).
        let _ = nix_term(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_term(pid: u32) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
}
