//! The router on real processes: tenants land on their cells, a dead cell stays
//! dead alone, and the map survives a directory outage through last-known-good
//! and static fallbacks.

mod common;

use common::{cli, get, put};

use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::RangeRequest;
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use common::TestEnv;
use tonic::Code;
use tonic::transport::Channel;

/// Puts through the router and returns the cell that served it.
async fn put_cell(r: &mut KvClient<Channel>, key: &str) -> Result<String, tonic::Status> {
    let resp = r.put(put(key, "v")).await?;
    Ok(resp
        .metadata()
        .get("cellplane-cell")
        .expect("cellplane-cell metadata")
        .to_str()
        .unwrap()
        .to_string())
}

async fn present_in(env: &TestEnv, cell: usize, key: &str) -> bool {
    let mut c = common::kv(env.cells[cell].members[0].client).await.unwrap();
    !c.range(get(key)).await.unwrap().into_inner().kvs.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_route_to_their_cells_and_a_dead_cell_stays_alone() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 1);
    env.start_router();
    let mut r = env.router_kv().await;

    // a, b, c are pinned to alpha, beta, gamma; the key's first segment names the
    // tenant (auth is off), and a key without one is refused.
    for (i, (tenant, cell)) in [("a", "alpha"), ("b", "beta"), ("c", "gamma")]
        .iter()
        .enumerate()
    {
        let key = format!("/{tenant}/k");
        assert_eq!(put_cell(&mut r, &key).await.unwrap(), *cell);
        for j in 0..3 {
            assert_eq!(present_in(&env, j, &key).await, i == j, "{key} in cell {j}");
        }
        let e = put_cell(&mut r, &format!("{tenant}/plain"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // The metadata names the tenant explicitly, and only narrows: its keys must
    // still be under /b/.
    let with_b = |key: &str| {
        let mut req = tonic::Request::new(put(key, "x"));
        req.metadata_mut()
            .insert("cellplane-tenant", "b".parse().unwrap());
        req
    };
    let resp = r.put(with_b("/b/settings")).await.unwrap();
    assert_eq!(resp.metadata().get("cellplane-cell").unwrap(), "beta");
    for key in ["settings", "/a/settings"] {
        let e = r.put(with_b(key)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{key}: {e:?}");
    }
    // A prefix range inside one tenant routes; one spanning tenants is refused.
    let resp = r
        .range(RangeRequest {
            key: "/a/".into(),
            range_end: "/a0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("cellplane-cell").unwrap(), "alpha");
    assert_eq!(resp.into_inner().kvs.len(), 1);
    let e = r
        .range(RangeRequest {
            key: "/a/".into(),
            range_end: "/c0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("touches only keys in"),
        "{}",
        e.message()
    );
    let e = r.put(put("notenant", "v")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Kill every member of beta: a and c see no error, b fails with UNAVAILABLE
    // naming beta.
    env.cells[1].kill_all();
    let mut b_errors = 0;
    for n in 0..60 {
        for tenant in ["a", "c"] {
            put_cell(&mut r, &format!("/{tenant}/after-{n}"))
                .await
                .unwrap_or_else(|e| panic!("tenant {tenant} saw {e:?} while beta was down"));
        }
        let e = r.put(put(&format!("/b/after-{n}"), "v")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("beta"), "{}", e.message());
        b_errors += 1;
    }
    assert_eq!(b_errors, 60);
    let status = env.admin_status().await;
    let beta = status.cells.iter().find(|c| c.name == "beta").unwrap();
    assert!(
        beta.members.iter().all(|m| !m.healthy),
        "router sees beta down: {beta:?}"
    );
    assert!(
        status
            .cells
            .iter()
            .filter(|c| c.name != "beta")
            .all(|c| c.members.iter().all(|m| m.healthy))
    );
}

async fn wait_for_cell(r: &mut KvClient<Channel>, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if put_cell(r, key).await.ok().as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never routed to {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_survives_directory_loss_through_last_known_good_and_static() {
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    // The directory holds version 1 (the static map's content).
    env.publish_map(&env.static_map(1, &[]), 0).await;
    env.start_router();
    let mut r = env.router_kv().await;
    assert_eq!(put_cell(&mut r, "/a/x").await.unwrap(), "alpha");
    let s = env.admin_status().await;
    assert_eq!(s.map_source, "directory");
    assert!(s.directory_reachable);

    // A live change: version 2 moves tenant a to beta.
    let rev = {
        let mut d = common::kv(env.directory.members[0].client).await.unwrap();
        d.range(get("/cellplane/cellmap"))
            .await
            .unwrap()
            .into_inner()
            .kvs[0]
            .mod_revision
    };
    env.publish_map(&env.static_map(2, &[("a", "beta")]), rev)
        .await;
    wait_for_cell(&mut r, "/a/x", "beta").await;

    // The directory goes down: routing continues with the map in force, and the
    // status says the directory is unreachable (the map's source stays).
    env.directory.kill_all();
    for n in 0..20 {
        assert_eq!(put_cell(&mut r, &format!("/a/{n}")).await.unwrap(), "beta");
        assert_eq!(put_cell(&mut r, &format!("/b/{n}")).await.unwrap(), "beta");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = env.admin_status().await;
        if !s.directory_reachable {
            assert_eq!(s.map_source, "directory");
            break;
        }
        assert!(Instant::now() < deadline, "the router never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Restarted while the directory is down: last-known-good (version 2).
    env.stop_router();
    env.start_router();
    let mut r = env.router_kv().await;
    assert_eq!(put_cell(&mut r, "/a/y").await.unwrap(), "beta");
    let s = env.admin_status().await;
    assert_eq!(
        (s.map_source.as_str(), s.map_version),
        ("last-known-good", 2)
    );
    assert!(!s.directory_reachable);

    // A corrupt last-known-good is skipped, with a warning: the static map (v1).
    env.stop_router();
    let lkg = env.state_dir().join("cellmap.last-known-good.json");
    std::fs::write(&lkg, b"{ half a file").unwrap();
    env.start_router();
    let mut r = env.router_kv().await;
    assert_eq!(put_cell(&mut r, "/a/z").await.unwrap(), "alpha");
    let s = env.admin_status().await;
    assert_eq!((s.map_source.as_str(), s.map_version), ("static", 1));
    assert!(
        env.router_log().contains("last-known-good map is unusable"),
        "{}",
        env.router_log()
    );

    // The directory comes back: the router follows it again (version 2).
    env.directory.spawn(1);
    env.directory.wait_ready(Duration::from_secs(30));
    wait_for_cell(&mut r, "/a/w", "beta").await;
    let s = env.admin_status().await;
    assert_eq!(s.map_source, "directory");
    assert!(s.directory_reachable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_change_the_map_with_the_cli_and_routers_follow() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 1);
    env.publish_map(&env.static_map(1, &[]), 0).await;
    env.start_router();
    let mut r = env.router_kv().await;
    let dir = env.directory.members[0].client.to_string();
    let admin = env.router_admin.to_string();

    let (ok, out) = cli(&["map", "--directory", &dir, "show"]);
    assert!(ok && out.contains("version 1"), "{out}");

    // assign: tenant c moves from gamma to alpha.
    assert_eq!(put_cell(&mut r, "/c/k").await.unwrap(), "gamma");
    let (ok, out) = cli(&["map", "--directory", &dir, "assign", "c", "alpha"]);
    assert!(ok, "{out}");
    wait_for_cell(&mut r, "/c/k", "alpha").await;
    // An unknown cell is refused before anything is written.
    let (ok, out) = cli(&["map", "--directory", &dir, "assign", "c", "nowhere"]);
    assert!(!ok && out.contains("nowhere"), "{out}");

    // drain: beta's buckets go to alpha and gamma; a tenant pinned to beta stays.
    let (ok, out) = cli(&["map", "--directory", &dir, "drain", "beta"]);
    assert!(ok && out.contains("routing only"), "{out}");
    let (ok, out) = cli(&["map", "--directory", &dir, "show"]);
    assert!(
        ok && out.contains("version 3") && out.contains("draining"),
        "{out}"
    );
    // Routers follow: the status shows version 3 from the directory, beta draining.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = cli(&["status", "--admin", &admin]);
        assert!(ok, "{out}");
        if out.contains("map version 3 (source: directory; directory reachable)") {
            assert!(
                out.lines()
                    .any(|l| l.starts_with("beta") && l.contains("draining")),
                "{out}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "router never took version 3:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // apply: a map file with an older version is refused and names the versions.
    let stale = env.folder.path().join("stale.toml");
    std::fs::write(&stale, env.static_map(2, &[])).unwrap();
    let (ok, out) = cli(&["map", "--directory", &dir, "apply", stale.to_str().unwrap()]);
    assert!(!ok && out.contains("not newer"), "{out}");
    // The router follows the directory with a watch on the map key.
    assert!(
        env.router_log().contains("watching the directory's map"),
        "{}",
        env.router_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_through_the_router_follow_their_cells_and_fail_alone() {
    use cellplane_proto::etcdserverpb::watch_client::WatchClient;
    use cellplane_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    env.start_router();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses = WatchClient::new(common::channel(env.router_client).await.unwrap())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for t in ["a", "b"] {
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: format!("/{t}/").into(),
                    range_end: format!("/{t}0").into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
    }
    // The two cells answer independently, so the created responses may come in
    // either order; the router hands out ids in the order of the creates, so the
    // lower id is tenant a's.
    let mut created = [
        next_resp(&mut responses).await,
        next_resp(&mut responses).await,
    ];
    created.sort_by_key(|r| r.watch_id);
    let [ca, cb] = created;
    assert!(ca.created && cb.created && ca.watch_id != cb.watch_id);
    // A watch spanning tenants is refused, as a canceled create.
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: "/a/".into(),
                range_end: vec![0],
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let refused = next_resp(&mut responses).await;
    assert!(
        refused.canceled && refused.cancel_reason.contains("touches only keys in"),
        "{refused:?}"
    );

    let mut r = env.router_kv().await;
    put_cell(&mut r, "/a/1").await.unwrap();
    put_cell(&mut r, "/b/1").await.unwrap();
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let resp = next_resp(&mut responses).await;
        got.insert(
            resp.watch_id,
            String::from_utf8_lossy(&resp.events[0].kv.as_ref().unwrap().key).into_owned(),
        );
    }
    assert_eq!(got[&ca.watch_id], "/a/1");
    assert_eq!(got[&cb.watch_id], "/b/1");

    // Beta dies: b's watch is canceled with where to resume; a's goes on.
    env.cells[1].kill_all();
    let canceled = next_resp(&mut responses).await;
    assert_eq!(canceled.watch_id, cb.watch_id);
    assert!(
        canceled.canceled && canceled.cancel_reason.contains("watch again from revision"),
        "{canceled:?}"
    );
    put_cell(&mut r, "/a/2").await.unwrap();
    let resp = next_resp(&mut responses).await;
    assert_eq!(resp.watch_id, ca.watch_id);
    assert_eq!(resp.events[0].kv.as_ref().unwrap().key, b"/a/2");
}

async fn next_resp(
    s: &mut tonic::Streaming<cellplane_proto::etcdserverpb::WatchResponse>,
) -> cellplane_proto::etcdserverpb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("response in time")
        .unwrap()
        .expect("stream open")
}
