//! `cellplane tenant move`: a tenant's keys move between cells while clients
//! write and read it through the router (history checked for linearizability),
//! other tenants see no error, a router on the stale static map is served by the
//! new cell, a mover stopped at every step is resumed or aborted with no
//! write lost and no tenant left fenced, and leases move with their tenant.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cellplane_chaos::lincheck::{self, CheckOptions, KvOutput, Recorder, Verdict};
use cellplane_proto::cell::ShowOwnershipRequest;
use cellplane_proto::cell::ownership_client::OwnershipClient;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, WatchCreateRequest, WatchRequest, watch_request,
};
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
    // A lease with a key, which every finished move must carry along.
    let mut leases = LeaseClient::new(common::channel(env.router_client).await.unwrap());
    let lease = leased_key(&mut leases, &mut r, 600, "/a/leased")
        .await
        .unwrap();
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
        // `status` shows the move as the cells record it.
        let (ok, out) = cli(&["status", "--admin", &env.router_admin.to_string()]);
        let shown = match step {
            "copying" => format!("tenant a: {} -> {to} (copying", cells[at]),
            "fenced" | "verified" => format!("tenant a: {} -> {to} (FENCED", cells[at]),
            _ => "no tenant moves in flight".to_string(),
        };
        assert!(ok && out.contains(&shown), "{step}: {out}");
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
        let (ttl, keys) = ttl_of(&mut leases, Some("a"), lease).await;
        assert!(
            ttl > 0 && keys == [b"/a/leased".to_vec()],
            "{step} {finish}: {ttl} {keys:?}"
        );
        let other = common::channel(env.cells[1 - at].members[0].client)
            .await
            .unwrap();
        let left = LeaseClient::new(other)
            .lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap();
        assert!(
            left.into_inner().leases.is_empty(),
            "{step} {finish}: a lease left behind"
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

    // And a hash bucket moves to it with its tenant, while b writes on.
    let moved = &tenants[1];
    let bucket = cellplane_map::bucket_of(moved, map.buckets).to_string();
    let stop = CancellationToken::new();
    let bystander = tokio::spawn(bystander(r.clone(), errors.clone(), stop.clone()));
    let (ok, out) = cli(&[
        "bucket",
        "move",
        &bucket,
        "--to",
        "delta",
        "--directory",
        &dir,
        "--grace",
        "1s",
    ]);
    stop.cancel();
    bystander.await.unwrap();
    assert!(
        ok && out.contains("1 tenant(s) moved"),
        "bucket move: {out}"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "tenant b saw errors");
    let resp = r
        .range(common::prefix(&format!("/{moved}/")))
        .await
        .unwrap();
    assert_eq!(served_by(&resp), "delta");
    assert!(resp.into_inner().kvs.len() >= 20);
    // The bucket, not an override, sends the tenant there now.
    let (ok, out) = cli(&["map", "--directory", &dir, "show"]);
    assert!(ok, "{out}");
    let shown = cellplane_map::CellMap::from_toml(&out).unwrap();
    assert_eq!(shown.bucket_cell(moved), Some("delta"));
    assert!(!shown.tenants.contains_key(moved.as_str()), "{out}");
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

/// A request through the router for tenant `t` (`None`: naming no tenant).
fn for_tenant<T>(t: Option<&str>, inner: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(inner);
    if let Some(t) = t {
        r.metadata_mut()
            .insert("cellplane-tenant", t.parse().unwrap());
    }
    r
}

/// Grants a lease of tenant a through the router and puts `key` on it.
async fn leased_key(
    leases: &mut LeaseClient<Channel>,
    kv: &mut KvClient<Channel>,
    ttl: i64,
    key: &str,
) -> Result<i64, tonic::Status> {
    let id = leases
        .lease_grant(for_tenant(Some("a"), LeaseGrantRequest { ttl, id: 0 }))
        .await?
        .into_inner()
        .id;
    let mut p = put(key, "v");
    p.lease = id;
    kv.put(p).await?;
    Ok(id)
}

/// Tenant a's lease `id` through the router: remaining TTL and keys.
async fn ttl_of(
    leases: &mut LeaseClient<Channel>,
    t: Option<&str>,
    id: i64,
) -> (i64, Vec<Vec<u8>>) {
    let r = leases
        .lease_time_to_live(for_tenant(t, LeaseTimeToLiveRequest { id, keys: true }))
        .await
        .unwrap()
        .into_inner();
    (r.ttl, r.keys)
}

/// Keeps lease `id` alive through the router every 500 ms, reopening the
/// stream on an error as etcd's clients do; counts answers with TTL 0 (lost).
async fn keep_alive(
    mut leases: LeaseClient<Channel>,
    id: i64,
    lost: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let req = for_tenant(Some("a"), tokio_stream::wrappers::ReceiverStream::new(rx));
        let Ok(resp) = leases.lease_keep_alive(req).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut answers = resp.into_inner();
        while !stop.is_cancelled() {
            if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                break;
            }
            match answers.message().await {
                Ok(Some(a)) if a.ttl > 0 => {}
                Ok(Some(_)) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_move_with_their_tenant_keeping_ids_keys_and_remaining_time() {
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    apply_map(&env, 1, &[]);
    env.start_router();
    let mut kv = env.router_kv().await;
    let router = common::channel(env.router_client).await.unwrap();
    let mut leases = LeaseClient::new(router.clone());

    // kept: kept alive all along; counted: never renewed (its remaining time
    // must survive the move); short: expires after the move, in the new cell.
    let kept = leased_key(&mut leases, &mut kv, 60, "/a/kept")
        .await
        .unwrap();
    let counted = leased_key(&mut leases, &mut kv, 30, "/a/counted")
        .await
        .unwrap();
    let short = leased_key(&mut leases, &mut kv, 10, "/a/short")
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let lost = Arc::new(AtomicU64::new(0));
    let keeper = tokio::spawn(keep_alive(
        LeaseClient::new(router.clone()),
        kept,
        lost.clone(),
        stop.clone(),
    ));
    // Leases granted while the tenant moves (the copy and the tail): the
    // acknowledged ones must all arrive, keys attached.
    let granter = {
        let (mut leases, mut kv, stop) = (leases.clone(), kv.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                let key = format!("/a/during/{n}");
                if let Ok(id) = leased_key(&mut leases, &mut kv, 60, &key).await {
                    acked.push((key, id));
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            acked
        })
    };
    // Time passes on `counted` before the move: 30 s granted, over 3 s gone.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let dir = env.directory.members[0].client.to_string();
    let mover = std::thread::spawn(move || {
        cli(&[
            "tenant",
            "move",
            "a",
            "--to",
            "beta",
            "--directory",
            &dir,
            "--grace",
            "4s",
        ])
    });
    // Once beta serves a, and before alpha's copy is retired, a call naming no
    // tenant goes to alpha (the ID's cell), which points the router to beta.
    loop {
        let r = kv.range(get("/a/kept")).await;
        if r.as_ref().is_ok_and(|r| served_by(r) == "beta") {
            break;
        }
        if mover.is_finished() {
            panic!("the move ended first: {}", mover.join().unwrap().1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = leases
        .lease_time_to_live(for_tenant(
            None,
            LeaseTimeToLiveRequest {
                id: kept,
                keys: true,
            },
        ))
        .await
        .unwrap();
    assert_eq!(served_by(&r), "beta");
    assert_eq!(r.into_inner().keys, vec![b"/a/kept".to_vec()]);

    let (ok, out) = mover.join().unwrap();
    assert!(ok && out.contains("leases"), "move: {out}");
    stop.cancel();
    keeper.await.unwrap();
    let acked = granter.await.unwrap();
    assert!(!acked.is_empty());
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "a kept-alive lease was lost"
    );

    // Every lease is in beta under its ID, with its keys, and alive.
    let mut beta = LeaseClient::new(
        common::channel(env.cells[1].members[0].client)
            .await
            .unwrap(),
    );
    let mut beta_kv = env.cells[1].kv(1).await;
    for (key, id) in acked.iter().chain([&("/a/kept".to_string(), kept)]) {
        let (ttl, keys) = ttl_of(&mut leases, Some("a"), *id).await;
        assert!(
            ttl > 0 && keys == vec![key.clone().into_bytes()],
            "{key}: {ttl} {keys:?}"
        );
        let mut r = get(key);
        r.serializable = true;
        let got = beta_kv.range(r).await.unwrap().into_inner().kvs;
        assert_eq!(got.len(), 1, "{key} is in beta");
        assert_eq!(got[0].lease, *id, "{key} keeps its lease");
    }
    // The lease nobody renewed kept counting down: over 3 s had gone.
    let (ttl, _) = ttl_of(&mut leases, Some("a"), counted).await;
    assert!((1..=27).contains(&ttl), "remaining {ttl} of 30 s");
    let granted = beta
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: counted,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner()
        .granted_ttl;
    assert_eq!(granted, 30);

    // The short lease expires in beta, deleting its key there.
    let mut expired = false;
    for _ in 0..100 {
        if ttl_of(&mut leases, Some("a"), short).await.0 == -1 {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(expired, "the short lease never expired in beta");
    assert!(
        kv.range(get("/a/short"))
            .await
            .unwrap()
            .into_inner()
            .kvs
            .is_empty()
    );

    // Alpha keeps nothing of a's: keys and leases were retired.
    let mut alpha = LeaseClient::new(
        common::channel(env.cells[0].members[0].client)
            .await
            .unwrap(),
    );
    let left = alpha
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(left.iter().all(|l| l.id != kept), "{left:?}");
    assert_eq!(keys_in_cell(&env, 0, "a").await, vec![0]);

    // A revoke through the router deletes the key in beta.
    leases
        .lease_revoke(for_tenant(Some("a"), LeaseRevokeRequest { id: kept }))
        .await
        .unwrap();
    assert!(
        kv.range(get("/a/kept"))
            .await
            .unwrap()
            .into_inner()
            .kvs
            .is_empty()
    );
}

/// The router's status page reads the movers' records with a view of its own
/// (it does not depend on the mover): same prefix, and a record parses.
#[test]
fn the_status_page_reads_move_records_as_movers_write_them() {
    use cellplane_router::directory::{MOVES_PREFIX, MoveView};
    assert_eq!(MOVES_PREFIX, cellplane_mover::RECORD_PREFIX);
    let record = cellplane_mover::MoveRecord {
        tenant: "acme".into(),
        from: "alpha".into(),
        to: "beta".into(),
        version: 7,
        state: cellplane_mover::MoveState::Fenced,
        r0: 10,
        rf: 12,
        keys: 3,
        retire_after_ms: 0,
    };
    let view: MoveView = serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(
        (view.tenant.as_str(), view.from.as_str(), view.to.as_str()),
        ("acme", "alpha", "beta")
    );
    assert_eq!(view.state, "fenced");
}
