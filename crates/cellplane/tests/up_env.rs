//! `cellplane up` end to end: starts every member of the cells in a folder, the
//! directory and a router, reports ready, serves requests through the router, and
//! on SIGTERM stops every child, leaving no orphan. On the way, what an operator
//! looks at works: the router's metrics and its status page in a real browser.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so look at /proc state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

/// The router's `/metrics` counts the calls just made, by cell, method and code;
/// its status page renders in a real browser and shows the map, the cell, its
/// leader and every member serving.
fn the_operator_sees_it(http: SocketAddr, members: [SocketAddr; 3]) {
    let (code, metrics) = common::http_get(http, "/metrics").expect("router /metrics answers");
    assert_eq!(code, 200, "{metrics}");
    let put = "cellplane_router_request_duration_seconds_count{cell=\"e2e\",method=\"Put\",code=\"OK\"} 1";
    assert!(metrics.lines().any(|l| l == put), "{put} in:\n{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "cellplane_router_map_version{source=\"directory\"} 1"),
        "{metrics}"
    );

    // A client that connects and sends nothing is let go (the router's HTTP
    // port caps its connections, so idle ones must not hold them).
    {
        use std::io::Read;
        let mut idle = std::net::TcpStream::connect(http).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = idle
            .read(&mut buf)
            .expect("the router closes an idle connection");
        assert_eq!(n, 0, "the router answered a request never sent");
    }

    let url = format!("http://{http}/");
    let Some(dom) = common::headless(&url, "router-status-page") else {
        return;
    };
    for expected in [
        "cellplane router 1",
        "id=\"map-version\">1<",
        ">directory<",
        "id=\"cell-e2e\"",
        "3 of 3 members serve",
        "(leader)",
        "serving",
        "Moves in progress",
    ] {
        assert!(
            dom.contains(expected),
            "{expected:?} not on the status page:\n{dom}"
        );
    }
    for member in members {
        assert!(
            dom.contains(&member.to_string()),
            "member {member} not listed:\n{dom}"
        );
    }
}

/// `cellplane up`, stopped with SIGTERM (which stops its children) if the test
/// ends early, so a failed assertion leaves no environment running.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_serves_and_stops_without_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let cells = dir.path().join("cells");
    std::fs::create_dir_all(&cells).unwrap();
    let socks: Vec<TcpListener> = (0..15)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let a: Vec<_> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
    drop(socks);
    let member = |id: usize, base: usize| {
        format!(
            "[[members]]\nid = {id}\nclient = \"{}\"\npeer = \"{}\"\nhttp = \"{}\"\n",
            a[base],
            a[base + 1],
            a[base + 2]
        )
    };
    let mut def = String::from("name = \"e2e\"\n");
    for i in 0..3 {
        def.push_str(&member(i + 1, 3 * i));
    }
    std::fs::write(cells.join("e2e.toml"), def).unwrap();
    std::fs::write(
        cells.join("directory.toml"),
        format!("name = \"directory\"\n{}", member(1, 9)),
    )
    .unwrap();
    std::fs::write(
        cells.join("routers.toml"),
        format!(
            "directory = \"directory\"\n[[routers]]\nid = 1\nclient = \"{}\"\nadmin = \"{}\"\nhttp = \"{}\"\n",
            a[12], a[13], a[14]
        ),
    )
    .unwrap();
    std::fs::write(
        cells.join("routing.toml"),
        format!(
            "version = 1\n[[cells]]\nname = \"e2e\"\nendpoints = [\"{}\", \"{}\", \"{}\"]\n[[ranges]]\nfrom = 0\nto = 4095\ncell = \"e2e\"\n",
            a[0], a[3], a[6]
        ),
    )
    .unwrap();
    let data = dir.path().join("data");

    let mut up = Up(Command::new(common::bin())
        .arg("up")
        .arg("--cells")
        .arg(&cells)
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap());
    let stdout = up.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!("`up` never said ready; it printed:\n{}", printed.join("\n"))
            });
        let ready = line.starts_with("cellplane is ready");
        printed.push(line);
        if ready {
            break;
        }
    }
    let table = printed.join("\n");
    assert!(
        table.contains(&a[0].to_string()),
        "endpoint table:\n{table}"
    );

    // up.json names every member's pid.
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("up.json")).unwrap()).unwrap();
    let pids: Vec<i32> = env["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 5, "3 members, the directory, a router: {env}");
    assert!(pids.iter().all(|p| pid_alive(*p)));

    // It serves, through the router.
    let mut kv = common::kv(a[12]).await.unwrap();
    kv.put(PutRequest {
        key: "/e2e/k".into(),
        value: "v".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = kv
        .range(RangeRequest {
            key: "/e2e/k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs[0].value, b"v");

    the_operator_sees_it(a[14], [a[0], a[3], a[6]]);

    // SIGTERM: every child stops, then `up` exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = up.0.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(Instant::now() < deadline, "orphan members left: {pids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
