//! Gray failure: a member frozen with SIGSTOP still accepts TCP connections, so
//! only what the router's own calls and data-path probes see catches it. The
//! router ejects it with a reason (status and `/metrics` say so), serves reads
//! from the other members meanwhile, fails writes over once the cell elects a
//! new leader, and takes the member back after several good probes once it
//! runs again.

mod common;

use std::time::Duration;

use cellplane_proto::etcdserverpb::RangeRequest;
use cellplane_proto::router::MemberStatus;
use common::{TestEnv, cli, get, put};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn signal(env: &TestEnv, member: u64, sig: Signal) {
    let pid = env.cells[0].member(member).child.as_ref().unwrap().id();
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Member `id` of the first cell as the router's status shows it.
async fn member_status(env: &TestEnv, id: u64) -> MemberStatus {
    let s = env.admin_status().await;
    let c = &s.cells[0];
    c.members
        .iter()
        .find(|m| m.member_id == id)
        .cloned()
        .unwrap_or_else(|| panic!("member {id} not in {c:?}"))
}

/// Polls until `pred` holds for member `id` (up to `limit`).
async fn wait_member(
    env: &TestEnv,
    id: u64,
    limit: Duration,
    pred: impl Fn(&MemberStatus) -> bool,
) -> MemberStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = member_status(env, id).await;
        if pred(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {id} stayed {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_ejected_reads_go_around_it_and_it_rejoins() {
    let mut env = TestEnv::start(&["alpha"], 3);
    env.start_router();
    let mut kv = env.router_kv().await;
    kv.put(put("/a/k", "v")).await.unwrap();
    let leader = env.cells[0].leader(Duration::from_secs(10)).await;
    let frozen = (1..=3).find(|m| *m != leader).unwrap();
    // Every member known to the router (ids come from probes).
    for id in 1..=3 {
        wait_member(&env, id, Duration::from_secs(10), |m| m.healthy).await;
    }

    signal(&env, frozen, Signal::SIGSTOP);
    // Serializable reads keep coming; some go to the frozen member at first.
    let reader = {
        let mut kv = kv.clone();
        tokio::spawn(async move {
            let mut served = 0u32;
            for _ in 0..400 {
                let mut r = get("/a/k");
                r.serializable = true;
                let got = kv.range(r).await.expect("a read around the frozen member");
                assert_eq!(got.into_inner().kvs.len(), 1);
                served += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            served
        })
    };
    let m = wait_member(&env, frozen, Duration::from_secs(20), |m| m.ejected).await;
    // Stalled calls, failed probes or slow probes: whichever the router saw first.
    assert!(
        ["stalled", "in a row", "slow"]
            .iter()
            .any(|r| m.ejection_reason.contains(r)),
        "{m:?}"
    );
    assert_eq!(reader.await.unwrap(), 400);

    // Writes go on (the leader is another member), and the operator sees why.
    kv.put(put("/a/k2", "v")).await.unwrap();
    let (ok, out) = cli(&["status", "--admin", &env.router_admin.to_string()]);
    assert!(ok && out.contains("EJECTED: "), "{out}");
    // The plain HTTP getter gives up after 2 s of silence; a loaded machine
    // may take that long to schedule the router: ask again.
    let mut got = None;
    for _ in 0..5 {
        got = common::http_get(env.router_http, "/metrics");
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = got.expect("the router's /metrics answers");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cellplane_router_member_ejected{") && l.ends_with(" 1")),
        "{metrics}"
    );
    // Reads that went to the frozen member before its ejection were hedged.
    assert!(
        metrics.lines().any(|l| {
            l.starts_with("cellplane_router_hedged_total{cell=\"alpha\"}") && !l.ends_with(" 0")
        }),
        "{metrics}"
    );

    // Running again, it serves again after good probes.
    signal(&env, frozen, Signal::SIGCONT);
    wait_member(&env, frozen, Duration::from_secs(30), |m| {
        !m.ejected && m.healthy
    })
    .await;
    assert!(member_status(&env, frozen).await.ejections_total >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_over_from_a_frozen_leader_and_it_is_ejected() {
    let mut env = TestEnv::start(&["alpha"], 3);
    env.start_router();
    let mut kv = env.router_kv().await;
    kv.put(put("/a/k", "0")).await.unwrap();
    let leader = env.cells[0].leader(Duration::from_secs(10)).await;
    for id in 1..=3 {
        wait_member(&env, id, Duration::from_secs(10), |m| m.healthy).await;
    }

    signal(&env, leader, Signal::SIGSTOP);
    // Each write is retried by this client until it succeeds, as etcd clients do
    // on UNAVAILABLE; all of them land while the old leader stays frozen.
    for i in 1..=20 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match kv.put(put("/a/k", &i.to_string())).await {
                Ok(_) => break,
                Err(s) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "write {i} never succeeded: {s:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let m = member_status(&env, leader).await;
    assert!(m.ejected || !m.healthy, "{m:?}");
    let r = kv
        .range(RangeRequest {
            key: b"/a/k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs[0].value, b"20");
    signal(&env, leader, Signal::SIGCONT);
}
