//! Membership change with etcd's tool, under load, with the history checked:
//! a member's disk is lost (killed, data wiped); the runbook of
//! docs/operations.md replaces it (cell file entry, `etcdctl member add
//! --learner`, `cellplane node --join`, `etcdctl member promote` once caught up,
//! `etcdctl member remove` of the dead one) while clients put and read through
//! the surviving members. The history must be linearizable and the new member
//! must hold every acknowledged write.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_chaos::lincheck::{self, CheckOptions, KvOutput, Recorder, Verdict};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use common::{TestCell, etcdctl, get, put};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn endpoints(cell: &TestCell, ids: &[u64]) -> String {
    ids.iter()
        .map(|id| cell.member(*id).client.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One client: alternating puts and linearizable gets on a few keys, each
/// recorded; a failing member is left for the next one.
async fn client(rec: Arc<Recorder>, id: u64, members: Vec<SocketAddr>, stop: CancellationToken) {
    let conns: Vec<KvClient<Channel>> = members
        .iter()
        .map(|a| {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                .unwrap()
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(3))
                .connect_lazy();
            KvClient::new(ch)
        })
        .collect();
    let mut at = id as usize;
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let mut kv = conns[at % conns.len()].clone();
        if common::recorded_op(&rec, id, n, "/h/", &mut kv)
            .await
            .is_none()
        {
            at += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_lost_disk_is_replaced_under_load_with_etcdctl() {
    // Snapshots every 50 entries keeping 10: the new member catches up by
    // snapshot (a file, streamed), then by the log.
    let mut cell = TestCell::start_named(
        "repl",
        3,
        "[raft]\nsnapshot_every_entries = 50\nkeep_entries_after_snapshot = 10\n",
    );
    let leader = cell.leader(Duration::from_secs(30)).await;
    let lost = (1..=3).find(|i| *i != leader).unwrap();
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != lost).collect();

    let rec = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    let addrs: Vec<SocketAddr> = (1..=3).map(|i| cell.member(i).client).collect();
    let mut clients = Vec::new();
    for id in 0..3 {
        clients.push(tokio::spawn(client(
            rec.clone(),
            id,
            addrs.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The disk is lost: the member dies and its data is gone.
    cell.kill(lost);
    std::fs::remove_dir_all(&cell.member(lost).data_dir).unwrap();

    // The runbook: the cell file first, then etcdctl, then the new member.
    let new = 4;
    let peer = cell.define_member(new).peer;
    let live = endpoints(&cell, &survivors);
    let (ok, out) = etcdctl(
        &live,
        &[
            "member",
            "add",
            "repl-4",
            "--learner",
            &format!("--peer-urls=http://{peer}"),
        ],
        None,
    );
    assert!(ok, "member add: {out}");
    let (_, list) = etcdctl(&live, &["member", "list"], None);
    assert!(
        list.contains("repl-4") && list.contains("true"),
        "a learner: {list}"
    );
    // Promoting before it runs is refused, as etcd refuses it.
    let (ok, out) = etcdctl(&live, &["member", "promote", "4"], None);
    assert!(!ok && out.contains("in sync"), "early promote: {out}");
    cell.spawn_with(new, &["--join"]);

    // A learner serves serializable reads only, as etcd's.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let Ok(mut kv4) = common::kv(cell.member(new).client).await else {
            assert!(Instant::now() < deadline, "member 4 never listened");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match kv4.put(put("/h/learner", "x")).await {
            Err(s) if s.message().contains("learner") => {
                assert_eq!(s.code(), tonic::Code::Unavailable);
                let mut r = get("/h/0");
                r.serializable = true;
                kv4.range(r)
                    .await
                    .expect("a learner serves serializable reads");
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "learner answered {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = etcdctl(&live, &["member", "promote", "4"], None);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never promotable: {out}\n{}",
            (1..=new)
                .map(|i| format!("--- member {i}:\n{}", cell.log_of(i)))
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        cell.log_of(new).contains("installed a snapshot"),
        "member 4 should have caught up by snapshot:\n{}",
        cell.log_of(new)
    );
    let (ok, out) = etcdctl(&live, &["member", "remove", &format!("{lost:x}")], None);
    assert!(ok, "member remove: {out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }

    let (_, list) = etcdctl(&live, &["member", "list"], None);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(!list.contains("true"), "no learner left: {list}");

    let ops = rec.operations();
    let acked = ops.iter().filter(|o| o.output == KvOutput::Put).count();
    assert!(
        acked > 20,
        "too few acknowledged writes to mean anything: {acked}"
    );
    match lincheck::check(&ops, &CheckOptions::default()).expect("well-formed history") {
        Verdict::Linearizable { .. } => {}
        other => panic!("not linearizable: {other:?}"),
    }

    // The new member holds what the leader holds.
    let leader = cell.leader(Duration::from_secs(30)).await;
    let mut lkv = cell.kv(leader).await;
    let want = lkv.range(common::prefix("/h/")).await.unwrap().into_inner();
    let mut nkv = cell.kv(new).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut r = common::prefix("/h/");
        r.serializable = true;
        let got = nkv.range(r).await.unwrap().into_inner();
        if got.kvs == want.kvs {
            break;
        }
        assert!(Instant::now() < deadline, "member 4 never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
