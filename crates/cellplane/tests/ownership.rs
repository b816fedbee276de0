//! Cells own their tenants: once the cell map is pushed to a cell (`cellplane map`
//! does it after every change), the cell refuses a write, a linearizable read and
//! a watch of a tenant the map sends elsewhere, naming the cell that serves it,
//! and a router on any map (a stale static file, the directory down) follows that
//! refusal to the right cell. Checked with a history under faults: a stale router
//! and a live one write one tenant while a member of each cell is killed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellplane_chaos::lincheck::{self, CheckOptions, KvOutput, Recorder, Verdict};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, WatchCreateRequest, WatchRequest, watch_request,
};
use common::{StaleRouter, TestEnv, apply_map, cli, get, put, served_by};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_refuses_tenants_it_does_not_own_and_routers_follow_it() {
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    // Before any map is pushed, a cell serves every tenant (a fresh environment).
    let mut alpha = common::kv(env.cells[0].members[0].client).await.unwrap();
    alpha.put(put("/b/early", "x")).await.unwrap();

    let out = apply_map(&env, 1, &[]);
    assert!(
        out.contains("cell alpha: serves by map version 1")
            && out.contains("cell beta: serves by map version 1"),
        "{out}"
    );

    // Tenant b is beta's: alpha refuses its writes, linearizable reads and
    // watches, naming beta; a serializable read is the member's local view.
    let e = alpha.put(put("/b/k", "v")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("tenant b moved to cell beta at map version 1"),
        "{}",
        e.message()
    );
    assert_eq!(
        e.metadata()
            .get("cellplane-moved-to")
            .unwrap()
            .to_str()
            .unwrap(),
        "beta"
    );
    assert_eq!(
        e.metadata()
            .get("cellplane-map-version")
            .unwrap()
            .to_str()
            .unwrap(),
        "1"
    );
    let e = alpha.range(get("/b/early")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let mut r = get("/b/early");
    r.serializable = true;
    assert_eq!(alpha.range(r).await.unwrap().into_inner().kvs.len(), 1);
    // A txn touching b anywhere is refused whole.
    let txn = cellplane_proto::etcdserverpb::TxnRequest {
        success: vec![
            cellplane_proto::etcdserverpb::RequestOp {
                request: Some(
                    cellplane_proto::etcdserverpb::request_op::Request::RequestPut(put(
                        "/a/t", "1",
                    )),
                ),
            },
            cellplane_proto::etcdserverpb::RequestOp {
                request: Some(
                    cellplane_proto::etcdserverpb::request_op::Request::RequestPut(put(
                        "/b/t", "1",
                    )),
                ),
            },
        ],
        ..Default::default()
    };
    assert_eq!(
        alpha.txn(txn).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // A delete over several tenants cannot be checked tenant by tenant.
    let e = alpha
        .delete_range(DeleteRangeRequest {
            key: b"/".to_vec(),
            range_end: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Its own tenant, and keys of no tenant, are served.
    alpha.put(put("/a/k", "v")).await.unwrap();
    alpha.put(put("/_cellplane/probe", "v")).await.unwrap();
    let mut w = WatchClient::new(
        common::channel(env.cells[0].members[0].client)
            .await
            .unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"/b/".to_vec(),
                range_end: b"/b0".to_vec(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = w
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let created = stream.message().await.unwrap().unwrap();
    assert!(
        created.canceled && created.cancel_reason.contains("moved to cell beta"),
        "{created:?}"
    );

    // Tenant a is pinned to beta (version 2): alpha now refuses a too.
    apply_map(&env, 2, &[("a", "beta")]);
    let e = alpha.put(put("/a/k2", "v")).await.unwrap_err();
    assert!(
        e.message()
            .contains("tenant a moved to cell beta at map version 2"),
        "{}",
        e.message()
    );
    // An older map is refused by the cell; the same one again is harmless.
    let mut own = cellplane_proto::cell::ownership_client::OwnershipClient::new(
        common::channel(env.cells[0].members[0].client)
            .await
            .unwrap(),
    );
    let old = cellplane_map::CellMap::from_toml(&env.static_map(1, &[])).unwrap();
    let e = own
        .learn_map(cellplane_proto::cell::LearnMapRequest { map: old.to_json() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("already learned map version 2"),
        "{}",
        e.message()
    );
    let dir = env.directory.members[0].client.to_string();
    let (ok, out) = cli(&["map", "--directory", &dir, "push"]);
    assert!(ok && out.contains("serves by map version 2"), "{out}");

    // A router that never reached the directory routes by the static map
    // (version 1: a → alpha). Its writes of a land on beta all the same.
    let stale = StaleRouter::start(&env);
    let mut r = common::kv(stale.client).await.unwrap();
    let resp = r.put(put("/a/stale", "v")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    let resp = r.range(get("/a/stale")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
    assert_eq!(resp.into_inner().kvs[0].value, b"v");
    let mut lease = cellplane_proto::etcdserverpb::lease_client::LeaseClient::new(
        common::channel(stale.client).await.unwrap(),
    );
    let mut grant = tonic::Request::new(LeaseGrantRequest { ttl: 30, id: 0 });
    grant
        .metadata_mut()
        .insert("cellplane-tenant", "a".parse().unwrap());
    let granted = lease.lease_grant(grant).await.unwrap();
    assert_eq!(served_by(&granted), "beta");
    // Nothing of a reached alpha after the change.
    let mut r = get("/a/stale");
    r.serializable = true;
    assert!(alpha.range(r).await.unwrap().into_inner().kvs.is_empty());

    // The live router agrees.
    env.start_router();
    let mut live = env.router_kv().await;
    let resp = live.range(get("/a/stale")).await.unwrap();
    assert_eq!(served_by(&resp), "beta");
}

/// Client `id`: puts and linearizable gets of tenant a's keys, alternately
/// through the live router and the stale one.
async fn client(
    rec: Arc<Recorder>,
    id: u64,
    routers: Vec<KvClient<Channel>>,
    stop: CancellationToken,
    served: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let mut kv = routers[(n as usize + id as usize) % routers.len()].clone();
        if let Some(cell) = common::recorded_op(&rec, id, n, "/a/h/", &mut kv).await {
            *served.lock().unwrap().entry(cell).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_and_a_live_router_write_one_tenant_linearizably_under_member_kills() {
    let mut env = TestEnv::start(&["alpha", "beta"], 3);
    // Tenant a belongs to beta from version 2; the stale router says alpha.
    apply_map(&env, 2, &[("a", "beta")]);
    env.start_router();
    let stale = StaleRouter::start(&env);
    let routers = vec![
        env.router_kv().await,
        common::kv(stale.client).await.unwrap(),
    ];

    let rec = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    let served = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let clients: Vec<_> = (0..4)
        .map(|id| {
            tokio::spawn(client(
                rec.clone(),
                id,
                routers.clone(),
                stop.clone(),
                served.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Faults: alpha's leader (the cell the stale router asks first) and then
    // beta's leader are killed and restarted.
    for cell in [0, 1] {
        let leader = env.cells[cell].leader(Duration::from_secs(30)).await;
        env.cells[cell].kill(leader);
        tokio::time::sleep(Duration::from_secs(2)).await;
        env.cells[cell].spawn(leader);
        env.cells[cell].wait_ready(Duration::from_secs(60));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }

    let served = served.lock().unwrap().clone();
    assert_eq!(served.keys().collect::<Vec<_>>(), ["beta"], "{served:?}");
    let ops = rec.operations();
    let acked = ops.iter().filter(|o| o.output == KvOutput::Put).count();
    assert!(acked > 20, "too few acknowledged writes: {acked}");
    match lincheck::check(&ops, &CheckOptions::default()).expect("well-formed history") {
        Verdict::Linearizable { .. } => {}
        other => panic!("not linearizable: {other:?}"),
    }
    // Every member of alpha holds none of a's keys.
    for m in 1..=3 {
        let mut kv = env.cells[0].kv(m).await;
        let mut r = common::prefix("/a/");
        r.serializable = true;
        let got = kv.range(r).await.unwrap().into_inner();
        assert!(got.kvs.is_empty(), "alpha member {m} holds {:?}", got.kvs);
    }
}
