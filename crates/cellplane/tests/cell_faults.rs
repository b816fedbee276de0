//! A cell under member loss: leader kill during writes, kill -9 of every member,
//! and a follower that comes back after the log moved past it (snapshot catch-up).
//! Every acknowledged write must be readable afterwards.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest};
use common::{TestCell, metric};

/// Puts `/w/<n>` = n through any running member, moving on from a member that
/// fails, and records what was acknowledged.
async fn writer(
    endpoints: Vec<std::net::SocketAddr>,
    start: u64,
    count: u64,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
) -> u64 {
    let mut failures = 0;
    let mut which = 0usize;
    let mut n = start;
    while n < start + count {
        let addr = endpoints[which % endpoints.len()];
        let key = format!("/w/{n:06}");
        let ok = match common::kv(addr).await {
            Ok(mut c) => c
                .put(PutRequest {
                    key: key.clone().into(),
                    value: n.to_string().into(),
                    ..Default::default()
                })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if ok {
            acked.lock().unwrap().insert(key, n.to_string());
            n += 1;
        } else {
            failures += 1;
            which += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(failures < 2_000, "writes never recovered");
    }
    failures
}

async fn assert_all_present(cell: &TestCell, acked: &BTreeMap<String, String>) {
    for m in cell.members.iter().filter(|m| m.child.is_some()) {
        let mut c = common::kv(m.client).await.unwrap();
        let r = c
            .range(RangeRequest {
                key: "/w/".into(),
                range_end: "/w0".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: BTreeMap<String, String> = r
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        for (k, v) in acked {
            assert_eq!(
                got.get(k),
                Some(v),
                "member {}: acknowledged {k} lost",
                m.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_writes_loses_nothing() {
    let mut cell = TestCell::start(3);
    let rounds: usize = std::env::var("CELLPLANE_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let endpoints: Vec<_> = cell.members.iter().map(|m| m.client).collect();
    let mut next = 0;
    for round in 0..rounds {
        let old = cell.leader(Duration::from_secs(30)).await;
        let w = tokio::spawn(writer(endpoints.clone(), next, 200, acked.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        cell.kill(old);
        let killed_at = Instant::now();
        let new = cell.new_leader(old, Duration::from_secs(30)).await;
        eprintln!(
            "round {round}: leader {old} killed, {new} elected after {:?}",
            killed_at.elapsed()
        );
        w.await.unwrap();
        next += 200;
        // Puts succeed through the survivors.
        let more = writer(
            endpoints
                .iter()
                .copied()
                .filter(|a| *a != cell.member(old).client)
                .collect(),
            next,
            20,
            acked.clone(),
        )
        .await;
        next += 20;
        assert!(more < 100);
        let snapshot = acked.lock().unwrap().clone();
        assert_all_present(&cell, &snapshot).await;
        cell.spawn(old);
        cell.wait_ready(Duration::from_secs(60));
    }
    let snapshot = acked.lock().unwrap().clone();
    assert_all_present(&cell, &snapshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_every_member_then_restart_keeps_acknowledged_writes() {
    let mut cell = TestCell::start(3);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let endpoints: Vec<_> = cell.members.iter().map(|m| m.client).collect();
    // Writes still in flight when the members die.
    let w = tokio::spawn(writer(endpoints.clone(), 0, 100_000, acked.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cell.kill_all();
    w.abort();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "some writes were acknowledged: {}",
        acked.len()
    );
    for id in 1..=3 {
        cell.spawn(id);
    }
    cell.wait_ready(Duration::from_secs(60));
    cell.leader(Duration::from_secs(30)).await;
    assert_all_present(&cell, &acked).await;
    eprintln!(
        "{} acknowledged writes survived kill -9 of every member",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_a_truncated_log_catches_up_by_snapshot() {
    let mut cell = TestCell::start_with(
        3,
        "[raft]\nsnapshot_every_entries = 100\nkeep_entries_after_snapshot = 10\n",
    );
    let leader = cell.leader(Duration::from_secs(30)).await;
    let lagger = (1..=3).find(|i| *i != leader).unwrap();
    let lagger_applied = {
        let (_, body) = common::http_get(cell.member(lagger).http, "/metrics").unwrap();
        metric(&body, "cellplane_raft_applied_index")
    };
    cell.kill(lagger);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let endpoints: Vec<_> = cell
        .members
        .iter()
        .filter(|m| m.id != lagger)
        .map(|m| m.client)
        .collect();
    writer(endpoints, 0, 600, acked.clone()).await;
    // The leader's log no longer holds what the lagger needs next.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = common::http_get(cell.member(leader).http, "/metrics").unwrap();
        let purged = metric(&body, "cellplane_raft_purged_index");
        if purged > lagger_applied + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader never purged its log (purged {purged})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cell.spawn(lagger);
    cell.wait_ready(Duration::from_secs(60));
    // Serializable reads on the lagger: its own state, which came from a snapshot.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = acked.lock().unwrap().clone();
    loop {
        let mut c = cell.kv(lagger).await;
        let r = c
            .range(RangeRequest {
                key: "/w/".into(),
                range_end: "/w0".into(),
                serializable: true,
                count_only: true,
                ..Default::default()
            })
            .await;
        // While it installs the snapshot the member refuses reads (UNAVAILABLE):
        // it holds half a state then.
        let r = match r {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(Instant::now() < deadline, "still installing: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            other => other.unwrap().into_inner(),
        };
        if r.count as usize == want.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lagger stuck at {} of {} keys",
            r.count,
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = common::http_get(cell.member(lagger).http, "/metrics").unwrap();
    assert!(
        metric(&body, "cellplane_raft_snapshot_index") > lagger_applied,
        "installed a snapshot"
    );
    assert_all_present(&cell, &want).await;
    // The leader replicated and applied the writes from its in-memory log tail;
    // the purges and the snapshot did not leave it answering wrongly (the reads
    // above saw every acknowledged write).
    let (_, body) = common::http_get(cell.member(leader).http, "/metrics").unwrap();
    assert!(
        metric(&body, "cellplane_raft_log_reads_total{from=\"memory\"}") > 0,
        "the leader read its newest entries from memory:\n{body}"
    );
}
