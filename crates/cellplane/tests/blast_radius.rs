//! Blast radius: three 3-member cells and a router, under load from one tenant
//! per cell. Every member of cell alpha is killed (SIGKILL), then, once it is back,
//! paused (SIGSTOP), then partitioned from the router (a proxy in front of each
//! member that starts dropping every byte). Throughout:
//!
//! - the tenants of beta and gamma see zero errors;
//! - alpha's tenant gets errors, and they are UNAVAILABLE or DEADLINE_EXCEEDED
//!   answers that come back, not requests that queue: no request takes longer
//!   than the router's request timeout plus a 5 s margin (a bound against
//!   queueing, not a latency target);
//! - alpha serves its tenant again after each fault is healed.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_chaos::proxy::{Link, Proxy};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use common::TestEnv;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The router's request timeout in `TestEnv`'s routers.toml.
const ROUTER_TIMEOUT: Duration = Duration::from_millis(3_000);
/// A request that takes longer than this queued somewhere.
const QUEUE_BOUND: Duration = Duration::from_millis(3_000 + 5_000);
/// How long each fault is held under load.
const HOLD: Duration = Duration::from_secs(6);

const PHASES: [&str; 7] = [
    "warm-up",
    "alpha killed",
    "alpha restarting",
    "alpha paused",
    "alpha resuming",
    "alpha partitioned",
    "alpha healing",
];
const FAULTY: [usize; 3] = [1, 3, 5];

#[derive(Default, Debug)]
struct PhaseStats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    samples: Vec<String>,
    max_latency: Duration,
}

type Stats = Arc<Mutex<BTreeMap<(char, usize), PhaseStats>>>;

fn router_client(addr: SocketAddr) -> KvClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    KvClient::new(ch)
}

/// Puts and gets on the tenant's keys through the router until `stop`,
/// recording each result under the phase in force when it was sent.
async fn worker(
    tenant: char,
    w: usize,
    router: SocketAddr,
    phase: Arc<AtomicUsize>,
    stats: Stats,
    stop: CancellationToken,
) {
    let mut kv = router_client(router);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let key = format!("/{tenant}/w{w}-{}", n % 64);
        let ph = phase.load(Ordering::SeqCst);
        let started = Instant::now();
        // A generous client deadline: only to see a hang instead of waiting forever.
        let r = tokio::time::timeout(QUEUE_BOUND * 4, async {
            if n.is_multiple_of(2) {
                kv.put(common::put(&key, &n.to_string())).await.map(|_| ())
            } else {
                kv.range(common::get(&key)).await.map(|_| ())
            }
        })
        .await;
        let took = started.elapsed();
        let failed = {
            let mut s = stats.lock().unwrap();
            let s = s.entry((tenant, ph)).or_default();
            s.max_latency = s.max_latency.max(took);
            match r {
                Ok(Ok(())) => {
                    s.ok += 1;
                    false
                }
                Ok(Err(status)) => {
                    *s.errors.entry(format!("{:?}", status.code())).or_default() += 1;
                    if s.samples.len() < 3 {
                        s.samples
                            .push(format!("{:?}: {}", status.code(), status.message()));
                    }
                    true
                }
                Err(_) => {
                    *s.errors.entry("client deadline".into()).or_default() += 1;
                    true
                }
            }
        };
        // Errors come back fast: pace the retries instead of spinning.
        let pause = if failed { 20 } else { 5 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Waits until tenant `a` (alpha) is served again.
async fn wait_alpha_serves(router: SocketAddr) {
    let mut kv = router_client(router);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = tokio::time::timeout(QUEUE_BOUND, kv.put(common::put("/a/probe", "v"))).await;
        if let Ok(Ok(_)) = r {
            return;
        }
        assert!(Instant::now() < deadline, "alpha never served again: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signal_all(env: &TestEnv, cell: usize, sig: Signal) {
    for m in &env.cells[cell].members {
        let pid = m.child.as_ref().expect("member running").id();
        kill(Pid::from_raw(pid as i32), sig).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_paused_or_partitioned_cell_fails_fast_and_alone() {
    let mut env = tokio::task::block_in_place(|| TestEnv::start(&["alpha", "beta", "gamma"], 3));
    // The router reaches alpha's members only through proxies (its static map
    // names them), so alpha can be cut off from the router.
    let proxies_stop = CancellationToken::new();
    let map_path = env.folder.path().join("routing.toml");
    let mut map = std::fs::read_to_string(&map_path).unwrap();
    let mut proxies = Vec::new();
    for m in &env.cells[0].members {
        let p = Proxy::bind(m.client, None, proxies_stop.clone())
            .await
            .unwrap();
        map = map.replace(&format!("\"{}\"", m.client), &format!("\"{}\"", p.addr()));
        proxies.push(p);
    }
    std::fs::write(&map_path, map).unwrap();
    tokio::task::block_in_place(|| env.start_router());

    let phase = Arc::new(AtomicUsize::new(0));
    let stats: Stats = Arc::default();
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for tenant in ['a', 'b', 'c'] {
        for w in 0..2 {
            workers.push(tokio::spawn(worker(
                tenant,
                w,
                env.router_client,
                phase.clone(),
                stats.clone(),
                stop.clone(),
            )));
        }
    }
    let started = Instant::now();
    let mark = |p: usize| {
        phase.store(p, Ordering::SeqCst);
        eprintln!("{:>6.1}s {}", started.elapsed().as_secs_f64(), PHASES[p]);
    };
    mark(0);
    wait_alpha_serves(env.router_client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Every member of alpha killed.
    mark(1);
    tokio::task::block_in_place(|| env.cells[0].kill_all());
    tokio::time::sleep(HOLD).await;
    mark(2);
    tokio::task::block_in_place(|| {
        for id in 1..=3 {
            env.cells[0].spawn(id);
        }
        env.cells[0].wait_ready(Duration::from_secs(60));
    });
    wait_alpha_serves(env.router_client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. Every member of alpha paused.
    mark(3);
    signal_all(&env, 0, Signal::SIGSTOP);
    tokio::time::sleep(HOLD).await;
    mark(4);
    signal_all(&env, 0, Signal::SIGCONT);
    wait_alpha_serves(env.router_client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. Alpha partitioned from the router: every byte dropped.
    mark(5);
    for p in &proxies {
        p.set_link(Link::Blackhole);
    }
    tokio::time::sleep(HOLD).await;
    mark(6);
    for p in &proxies {
        p.set_link(Link::Pass);
    }
    wait_alpha_serves(env.router_client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    proxies_stop.cancel();

    let stats = stats.lock().unwrap();
    for ((tenant, p), s) in stats.iter() {
        eprintln!(
            "{tenant} {:<18} ok {:>5}  errors {:?}  max {:?}  {:?}",
            PHASES[*p], s.ok, s.errors, s.max_latency, s.samples
        );
    }
    let mut problems = Vec::new();
    for ((tenant, p), s) in stats.iter() {
        let phase = PHASES[*p];
        if *tenant != 'a' {
            if !s.errors.is_empty() {
                problems.push(format!(
                    "tenant {tenant} (not on alpha) saw errors while {phase}: {:?} {:?}",
                    s.errors, s.samples
                ));
            }
            continue;
        }
        // Alpha's tenant: errors are answers, and no request queued.
        let answers = [Code::Unavailable, Code::DeadlineExceeded].map(|c| format!("{c:?}"));
        for code in s.errors.keys().filter(|c| !answers.contains(c)) {
            problems.push(format!(
                "tenant a while {phase}: error {code}, not UNAVAILABLE or DEADLINE_EXCEEDED: {:?}",
                s.samples
            ));
        }
        if s.max_latency > QUEUE_BOUND {
            problems.push(format!(
                "tenant a while {phase}: a request took {:?}, more than the router's timeout ({:?}) + 5 s",
                s.max_latency, ROUTER_TIMEOUT
            ));
        }
    }
    for p in FAULTY {
        let errors = stats
            .get(&('a', p))
            .map_or(0, |s| s.errors.values().sum::<u64>());
        if errors == 0 {
            problems.push(format!("tenant a saw no error while {}", PHASES[p]));
        }
        for tenant in ['b', 'c'] {
            if stats.get(&(tenant, p)).map_or(0, |s| s.ok) == 0 {
                problems.push(format!(
                    "tenant {tenant} was not served while {}",
                    PHASES[p]
                ));
            }
        }
    }
    if !problems.is_empty() {
        let log = env.router_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{}\n\nlast lines of the router's log:\n{}",
            problems.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}
