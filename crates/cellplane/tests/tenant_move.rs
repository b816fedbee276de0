//! `cellplane tenant move`: a tenant's keys move between cells while clients
//! write and read it through the router (history checked for linearizability),
//! other tenants see no error, a router on the stale static map is served by the
//! new cell, and a mover stopped at every step is resumed or aborted with no
//! write lost and no tenant left fenced.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cellplane_chaos::lincheck::{self, CheckOptions, KvOutput, Recorder, Verdict};
use cellplane_proto::cell::ShowOwnershipRequest;
use cellplane_proto::cell::ownership_client::OwnershipClient;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
use common::{TestEnv, apply_map, cli, get, put, served_by};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// `cellplane tenant move <args>` against the environment's directory.
fn mover(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let dir = env.directory.members[0].client.to_string();
    let mut a = vec!["tenant", "move"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--directory", &dir, "--grace", "1s"]);
    cli(&a)
}

/// Which cells hold tenant moves (fenced or incoming), by cell.
async fn moves_in_cells(env: &TestEnv) -> Vec<String> {
    let mut out = Vec::new();
    for c in &env.cells {
        let mut o = OwnershipClient::new(common::channel(c.members[0].client).await.unwrap());
        let s = o.show(ShowOwnershipRequest {}).await.unwrap().into_inner();
        for m in s.fenced.iter().chain(&s.incoming) {
            out.push(format!("{}: {} ({})", s.cell, m.tenant, m.cell));
        }
    }
    out
}

/// Serializable reads of tenant `t`'s keys on every member of cell `i`.
async fn keys_in_cell(env: &TestEnv, i: usize, t: &str) -> Vec<usize> {
    let mut counts = Vec::new();
    for m in 1..=env.cells[i].members.len() as u64 {
        let mut kv = env.cells[i].kv(m).await;
        let mut r = common::prefix(&format!("/{t}/"));
        r.serializable = true;
        counts.push(kv.range(r).await.unwrap().into_inner().kvs.len());
    }
    counts
}

/// Puts and linearizable gets of tenant a's keys through the router.
async fn client(rec: Arc<Recorder>, id: u64, mut kv: KvClient<Channel>, stop: CancellationToken) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        common::recorded_op(&rec, id, n, "/a/h/", &mut kv).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Tenant b's writer: counts its errors.
async fn bystander(mut kv: KvClient<Channel>, errors: Arc<AtomicU64>, stop: CancellationToken) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        if kv.put(put(&format!("/b/k{}", n % 50), "v")).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_moves_under_load_with_a_linearizable_history_and_no_lost_write() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 3);
    apply_map(&env, 1, &[]);
    env.start_router();
    let mut r = env.router_kv().await;
    for i in 0..300 {
        r.put(put(&format!("/a/seed/{i:03}"), &format!("v{i}")))
            .await
            .unwrap();
    }

    let rec = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<_> = (0..3)
        .map(|id| tokio::spawn(client(rec.clone(), id, r.clone(), stop.clone())))
        .collect();
    tasks.push(tokio::spawn(bystander(
        r.clone(),
        errors.clone(),
        stop.clone(),
    )));
    // A watch of the tenant through the router, open across the move.
    let (wtx, wrx) = tokio::sync::mpsc::channel(4);
    wtx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"/a/".to_vec(),
                range_end: b"/a0".to_vec(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut watch = WatchClient::new(common::channel(env.router_client).await.unwrap())
        .watch(tokio_stream::wrappers::ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().unwrap().created);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, out) = mover(&env, &["a", "--to", "beta"]);
    assert!(ok, "move: {out}");
    assert!(
        out.contains("moved tenant a from alpha to beta") && out.contains("fence window"),
        "{out}"
    );
    println!("{out}");
    // The watch ends, telling the client to read again (revisions do not
    // carry across cells).
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = watch.message().await.unwrap().unwrap();
            if m.canceled {
                return m.cancel_reason;
            }
        }
    })
    .await
    .expect("the watch of the moved tenant never ended");
    assert!(
        ended.contains("moved to cell beta") && ended.contains("read the keys again"),
        "{ended}"
    );
    drop(wtx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }

    assert_eq!(errors.load(Ordering::Relaxed), 0, "tenant b saw errors");
    let ops = rec.operations();
    let acked = ops.iter().filter(|o| o.output == KvOutput::Put).count();
    assert!(acked > 20, "too few acknowledged writes: {acked}");
    match lincheck::check(&ops, &CheckOptions::default()).expect("well-formed history") {
        Verdict::Linearizable { .. } => {}
        other => panic!("not linearizable: {other:?}"),
    }
    // Every seeded key is in beta, served through the router; alpha's copy is
    // retired; no move is left in a cell.
    let resp = r.range(common::prefix("/a/seed/")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    let kvs = resp.into_inner().kvs;
    assert_eq!(kvs.len(), 300);
    assert!(
        kvs.iter()
            .enumerate()
            .all(|(i, kv)| kv.value == format!("v{i}").as_bytes())
    );
    assert_eq!(keys_in_cell(&env, 0, "a").await, [0, 0, 0]);
    assert!(moves_in_cells(&env).await.is_empty());
    let dir = env.directory.members[0].client.to_string();
    let (ok, out) = cli(&["tenant", "moves", "--directory", &dir]);
    assert!(ok && out.contains("no move in progress"), "{out}");
    // A router that never reached the directory (the static map: a → alpha)
    // is refused by alpha and served by beta.
    let stale = common::StaleRouter::start(&env);
    let mut s = common::kv(stale.client).await.unwrap();
    let resp = s.put(put("/a/after", "v")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    assert_eq!(keys_in_cell(&env, 0, "a").await, [0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_stopped_at_any_step_is_resumed_or_aborted_with_nothing_lost() {
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    apply_map(&env, 1, &[]);
    env.start_router();
    let mut r = env.router_kv().await;
    let mut expected = 0;
    let write = async |r: &mut KvClient<Channel>, expected: &mut usize| {
        r.put(put(&format!("/a/k/{expected:03}"), "v"))
            .await
            .unwrap();
        *expected += 1;
    };
    for _ in 0..50 {
        write(&mut r, &mut expected).await;
    }
    let cells = ["alpha", "beta"];
    let mut at = 0; // where tenant a is
    for (step, finish) in [
        ("copying", "--abort"),
        ("copying", "--resume"),
        ("fenced", "--abort"),
        ("fenced", "--resume"),
        ("verified", "--abort"),
        ("verified", "--resume"),
        ("cut-over", "--resume"),
    ] {
        let to = cells[1 - at];
        let (ok, out) = mover(&env, &["a", "--to", to, "--stop-after", step]);
        assert!(
            !ok && out.contains(&format!("stopped after {step}")),
            "{step}: {out}"
        );
        let dir = env.directory.members[0].client.to_string();
        let (ok, out) = cli(&["tenant", "moves", "--directory", &dir]);
        assert!(ok && out.contains(step), "{step}: {out}");
        // A second mover cannot start the same move.
        let (ok, out) = mover(&env, &["a", "--to", to]);
        assert!(!ok && out.contains("in progress"), "{step}: {out}");

        let (ok, out) = mover(&env, &["a", finish]);
        assert!(ok, "{step} {finish}: {out}");
        if finish == "--resume" {
            at = 1 - at;
        }
        // Nothing lost, nothing left fenced, and the tenant writes on.
        assert!(moves_in_cells(&env).await.is_empty(), "{step} {finish}");
        write(&mut r, &mut expected).await;
        let resp = r.range(common::prefix("/a/k/")).await.unwrap();
        assert_eq!(served_by(&resp), cells[at], "{step} {finish}");
        assert_eq!(resp.into_inner().kvs.len(), expected, "{step} {finish}");
        assert_eq!(
            keys_in_cell(&env, 1 - at, "a").await,
            [0],
            "{step} {finish}: the other cell keeps no copy"
        );
    }
    // Cut over, the move cannot be aborted any more.
    let (ok, out) = mover(
        &env,
        &["a", "--to", cells[1 - at], "--stop-after", "cut-over"],
    );
    assert!(!ok, "{out}");
    let (ok, out) = mover(&env, &["a", "--abort"]);
    assert!(!ok && out.contains("cut over"), "{out}");
    let (ok, out) = mover(&env, &["a", "--resume"]);
    assert!(ok, "{out}");
}

/// Writes unique keys of `tenant` through the router; keeps the acknowledged.
async fn writer(
    mut kv: KvClient<Channel>,
    tenant: String,
    acked: Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let key = format!("/{tenant}/w/{n}");
        if kv.put(put(&key, "v")).await.is_ok() {
            acked.lock().unwrap().push(key);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_with_three_tenants_is_drained_under_load_and_a_new_cell_is_added() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 1);
    apply_map(&env, 1, &[]);
    env.start_router();
    let map = cellplane_map::CellMap::from_toml(&env.static_map(1, &[])).unwrap();
    // Gamma's tenants: c (pinned to it) and two placed there by their bucket.
    let mut tenants = vec!["c".to_string()];
    tenants.extend(
        (0..)
            .map(|i| format!("t{i}"))
            .filter(|t| map.cell_for(t).unwrap().name == "gamma")
            .take(2),
    );
    let mut r = env.router_kv().await;
    for t in &tenants {
        for i in 0..20 {
            r.put(put(&format!("/{t}/seed/{i}"), "v")).await.unwrap();
        }
    }
    let stop = CancellationToken::new();
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<_> = tenants
        .iter()
        .map(|t| tokio::spawn(writer(r.clone(), t.clone(), acked.clone(), stop.clone())))
        .collect();
    tasks.push(tokio::spawn(bystander(
        r.clone(),
        errors.clone(),
        stop.clone(),
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dir = env.directory.members[0].client.to_string();
    let (ok, out) = cli(&[
        "cell",
        "drain",
        "gamma",
        "--directory",
        &dir,
        "--grace",
        "1s",
    ]);
    assert!(ok && out.contains("3 tenant(s) moved"), "drain: {out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }

    // Tenant b (beta) saw no error; every acknowledged write is served, by a
    // cell other than gamma, which keeps nothing of the three.
    assert_eq!(errors.load(Ordering::Relaxed), 0, "tenant b saw errors");
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 30,
        "too few acknowledged writes: {}",
        acked.len()
    );
    for t in &tenants {
        let resp = r.range(common::prefix(&format!("/{t}/"))).await.unwrap();
        assert_ne!(served_by(&resp), "gamma", "{t}");
        let have: std::collections::HashSet<Vec<u8>> =
            resp.into_inner().kvs.into_iter().map(|kv| kv.key).collect();
        for k in acked.iter().filter(|k| k.starts_with(&format!("/{t}/"))) {
            assert!(
                have.contains(k.as_bytes()),
                "{k} was acknowledged and is gone"
            );
        }
        assert!(have.len() >= 20, "{t}: {}", have.len());
        assert_eq!(keys_in_cell(&env, 2, t).await, [0], "gamma keeps {t}");
    }
    let (ok, out) = cli(&["map", "--directory", &dir, "show"]);
    assert!(ok && out.contains("draining"), "{out}");

    // A fourth cell joins the map and takes a tenant.
    let delta = common::TestCell::start_named("delta", 1, "");
    let (ok, out) = cli(&[
        "cell",
        "add",
        delta.def_path.to_str().unwrap(),
        "--directory",
        &dir,
    ]);
    assert!(ok && out.contains("cell delta added"), "cell add: {out}");
    let (ok, out) = mover(&env, &["c", "--to", "delta"]);
    assert!(ok, "move to delta: {out}");
    let resp = r.range(common::prefix("/c/")).await.unwrap();
    assert_eq!(served_by(&resp), "delta");
    assert!(resp.into_inner().kvs.len() >= 20);
}

/// Beta's member 1 holds this many of tenant a's keys (a serializable count:
/// the destination of a move does not serve the tenant yet).
async fn count_in(env: &TestEnv, cell: usize) -> i64 {
    let mut kv = env.cells[cell].kv(1).await;
    let mut r = common::prefix("/a/");
    r.serializable = true;
    r.count_only = true;
    kv.range(r).await.unwrap().into_inner().count
}

/// Starts `cellplane tenant move a --to <to>` and SIGKILLs it once the
/// destination holds part of the copy.
async fn kill_mid_copy(env: &TestEnv, to: usize, total: i64) {
    let dir = env.directory.members[0].client.to_string();
    let to_name = env.cells[to].def_name();
    let mut child = std::process::Command::new(common::bin())
        .args(["tenant", "move", "a", "--to", &to_name, "--directory", &dir])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = count_in(env, to).await;
        if n > 0 {
            assert!(
                n < total,
                "the copy finished before the kill: make it larger"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_killed_mid_copy_is_resumed_or_aborted() {
    use cellplane_proto::etcdserverpb::{RequestOp, TxnRequest, request_op};
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    apply_map(&env, 1, &[]);
    env.start_router();
    let mut r = env.router_kv().await;
    let total: i64 = 20_000;
    for chunk in 0..total / 100 {
        let ops = (0..100)
            .map(|i| RequestOp {
                request: Some(request_op::Request::RequestPut(put(
                    &format!("/a/k/{:05}", chunk * 100 + i),
                    &"x".repeat(100),
                ))),
            })
            .collect();
        r.txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let dir = env.directory.members[0].client.to_string();

    // Killed mid-copy, then resumed: every key arrives, alpha keeps none.
    kill_mid_copy(&env, 1, total).await;
    let (ok, out) = cli(&["tenant", "moves", "--directory", &dir]);
    assert!(ok && out.contains("copying"), "{out}");
    // Meanwhile the tenant is served by alpha, and writes.
    let resp = r.put(put("/a/during", "v")).await.unwrap();
    assert_eq!(served_by(&resp), "alpha");
    let (ok, out) = mover(&env, &["a", "--resume"]);
    assert!(ok, "resume: {out}");
    assert_eq!(count_in(&env, 1).await, total + 1);
    assert_eq!(count_in(&env, 0).await, 0);

    // Killed mid-copy back to alpha, then aborted: beta serves it as before,
    // alpha keeps nothing, no cell is left moving.
    kill_mid_copy(&env, 0, total + 1).await;
    let (ok, out) = mover(&env, &["a", "--abort"]);
    assert!(ok, "abort: {out}");
    assert_eq!(count_in(&env, 0).await, 0);
    assert!(moves_in_cells(&env).await.is_empty());
    let resp = r.range(common::prefix("/a/")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    assert_eq!(resp.into_inner().kvs.len() as i64, total + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_completes_while_an_unrelated_cell_is_down() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 1);
    apply_map(&env, 1, &[]);
    env.start_router();
    let mut r = env.router_kv().await;
    r.put(put("/a/k", "v")).await.unwrap();
    env.cells[2].kill_all();

    let (ok, out) = mover(&env, &["a", "--to", "beta"]);
    assert!(ok, "move: {out}");
    assert!(
        out.contains("warning: cell gamma did not learn map version 2"),
        "{out}"
    );
    let resp = r.range(get("/a/k")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    assert_eq!(resp.into_inner().kvs.len(), 1);

    // Back up, gamma learns the map with `map push`.
    env.cells[2].spawn(1);
    env.cells[2].wait_ready(Duration::from_secs(60));
    let dir = env.directory.members[0].client.to_string();
    let (ok, out) = cli(&["map", "--directory", &dir, "push"]);
    assert!(
        ok && out.contains("cell gamma: serves by map version 2"),
        "{out}"
    );
}
