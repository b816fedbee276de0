//! Writes that arrive at a follower travel to the leader in batches over the peer
//! transport (`Raft.Propose`). Each must come back with the outcome and revision
//! the leader applied, the leader must refuse what it may not append, and no write
//! may be lost or applied twice when the leader dies while followers forward.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_cell::proposer::{ProposeRefused, ProposeReply, ProposeRequest};
use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cellplane_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, request_op, response_op,
};
use cellplane_proto::raft::RaftPayload;
use cellplane_proto::raft::raft_client::RaftClient;
use cellplane_storage::{Batch, Command};
use common::{TestCell, get, metric, prefix, put};
use prost::Message;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A txn comparing `key`'s value with `value`, putting `put_key` on success and
/// reading `key` on failure.
fn cas(key: &str, value: &str, put_key: &str) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: key.into(),
            target_union: Some(TargetUnion::Value(value.into())),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(put(put_key, "from-txn"))),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(get(key))),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_writes_in_a_mixed_batch_get_the_leaders_outcomes() {
    let cell = TestCell::start(3);
    let leader = cell.leader(WAIT).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let mut c = cell.kv(follower).await;
    for i in 0..8 {
        c.put(put(&format!("/m/del/{i}"), "old")).await.unwrap();
    }
    c.put(put("/m/cas", "current")).await.unwrap();
    let r0 = c
        .range(get("/m/none"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;

    // Every kind of write at once through one follower, so that its proposer
    // batches them together: puts, txns whose compare fails (read-only: no new
    // revision), txns whose compare holds, deletes, and writes refused at apply.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40u32 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let out = match i % 5 {
                0 | 1 => {
                    let mut p = put(&format!("/m/put/{i}"), &format!("v{i}"));
                    p.prev_kv = true;
                    Ok(("put", c.put(p).await.map(|r| r.into_inner().header)))
                }
                2 => {
                    // Fails its compare.
                    let r = c.txn(cas("/m/cas", "stale", &format!("/m/no/{i}"))).await;
                    match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert!(!r.succeeded, "txn {i}: compare must fail");
                            match &r.responses[0].response {
                                Some(response_op::Response::ResponseRange(rr)) => {
                                    assert_eq!(rr.kvs[0].value, b"current");
                                }
                                other => panic!("txn {i}: failure branch reads: {other:?}"),
                            }
                            Ok(("failed-txn", Ok(r.header)))
                        }
                        Err(e) => Ok(("failed-txn", Err(e))),
                    }
                }
                3 => {
                    let d = DeleteRangeRequest {
                        key: format!("/m/del/{}", i / 5).into(),
                        prev_kv: true,
                        ..Default::default()
                    };
                    let r = c.delete_range(d).await.map(|r| {
                        let r = r.into_inner();
                        assert_eq!(r.deleted, 1, "delete {i}");
                        assert_eq!(r.prev_kvs[0].value, b"old");
                        r.header
                    });
                    Ok(("delete", r))
                }
                _ => {
                    // ignore_value on a missing key: refused at apply, no revision.
                    let mut p = put(&format!("/m/missing/{i}"), "");
                    p.ignore_value = true;
                    Err(c.put(p).await.unwrap_err())
                }
            };
            (i, out)
        });
    }
    let mut mutations = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (i, out) = r.unwrap();
        match out {
            Ok((kind, h)) => {
                let h = h
                    .unwrap_or_else(|e| panic!("{kind} {i} failed: {e}"))
                    .expect("header");
                assert_eq!(h.member_id, follower, "{kind} {i}: the follower answers");
                assert!(h.raft_term >= 1);
                if kind == "failed-txn" {
                    assert!(h.revision >= r0, "{kind} {i}");
                } else {
                    mutations.insert(h.revision, (kind, i));
                }
            }
            Err(e) => {
                assert_eq!(e.code(), Code::InvalidArgument, "write {i}: {e}");
                assert_eq!(e.message(), "etcdserver: key not found");
            }
        }
    }
    // Every successful write has its own revision, and together they are exactly
    // the revisions after r0: nothing was applied twice or skipped.
    let n = 40 / 5 * 3;
    assert_eq!(mutations.len(), n, "distinct revisions: {mutations:?}");
    let want: Vec<i64> = (r0 + 1..=r0 + n as i64).collect();
    assert_eq!(mutations.keys().copied().collect::<Vec<_>>(), want);

    // What the follower answered is what the cell stored (read on the leader).
    let mut l = cell.kv(leader).await;
    for (rev, (kind, i)) in &mutations {
        if *kind == "put" {
            let kv = l
                .range(get(&format!("/m/put/{i}")))
                .await
                .unwrap()
                .into_inner()
                .kvs
                .remove(0);
            assert_eq!(kv.mod_revision, *rev, "put {i}");
            assert_eq!(kv.version, 1, "put {i} applied once");
            assert_eq!(kv.value, format!("v{i}").as_bytes());
        }
    }
    let left = l.range(prefix("/m/del/")).await.unwrap().into_inner();
    assert_eq!(left.count, 0, "every delete applied");
    let none = l.range(prefix("/m/no/")).await.unwrap().into_inner();
    assert_eq!(none.count, 0, "failed compares wrote nothing");
    let missing = l.range(prefix("/m/missing/")).await.unwrap().into_inner();
    assert_eq!(missing.count, 0);
    let head = l
        .range(get("/m/none"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap();
    assert_eq!(head.revision, r0 + n as i64);

    // A txn reading history goes alone, and a compaction, both through the follower.
    let t = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: "/m/cas".into(),
                revision: r0,
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    let r = c.txn(t).await.unwrap().into_inner();
    match &r.responses[0].response {
        Some(response_op::Response::ResponseRange(rr)) => assert_eq!(rr.kvs[0].value, b"current"),
        other => panic!("history read: {other:?}"),
    }
    let r = c
        .compact(CompactionRequest {
            revision: r0,
            physical: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.header.unwrap().member_id, follower);
    let e = c
        .compact(CompactionRequest {
            revision: r0,
            physical: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "compacted twice: {e}");
}

/// A follower's linearizable reads ask the leader through its read barrier:
/// every read is counted once where it was served, every follower round once
/// more at the leader, which is what `cellplane_read_index_*` let an operator
/// see (reads per round: how well rounds are shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_linearizable_reads_are_confirmed_by_the_leader_and_counted() {
    let cell = TestCell::start(3);
    let leader = cell.leader(WAIT).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let c = cell.kv(follower).await;
    let written = common::put_revision(&mut c.clone(), "/r/key", "v").await;
    const READS: u64 = 64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..READS {
        let mut c = c.clone();
        tasks.spawn(async move { c.range(get("/r/key")).await.map(|r| r.into_inner()) });
    }
    while let Some(r) = tasks.join_next().await {
        // Linearizable: each read sees the write acknowledged before it began.
        let r = r.unwrap().unwrap();
        assert_eq!(r.kvs.len(), 1);
        assert_eq!(r.kvs[0].value, b"v");
        assert!(r.header.unwrap().revision >= written);
    }
    let scrape = |id: u64| {
        common::http_get(cell.member(id).http, "/metrics")
            .unwrap()
            .1
    };
    let at_follower = scrape(follower);
    let rounds = metric(&at_follower, "cellplane_read_index_rounds_total");
    let reads = metric(&at_follower, "cellplane_read_index_reads_total");
    assert_eq!(
        reads, READS,
        "every read waited on one round:\n{at_follower}"
    );
    assert!(
        (1..=reads).contains(&rounds),
        "{rounds} rounds for {reads} reads"
    );
    // Each of the follower's rounds was one ReadIndex call answered through the
    // leader's own barrier.
    let at_leader = scrape(leader);
    assert!(
        metric(&at_leader, "cellplane_read_index_reads_total") >= rounds,
        "the leader answered every round of the follower's:\n{at_leader}"
    );
    assert!(metric(&at_leader, "cellplane_read_index_rounds_total") >= 1);
}

async fn raw_propose(peer: SocketAddr, cmds: Vec<Command>) -> ProposeReply {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let req = ProposeRequest {
        from: 99,
        batch: Batch(cmds),
    };
    let payload = RaftPayload {
        data: postcard::to_stdvec(&req).unwrap().into(),
    };
    let reply = RaftClient::new(channel)
        .propose(payload)
        .await
        .unwrap()
        .into_inner();
    postcard::from_bytes(&reply.data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_appends_a_forwarded_batch_and_never_merges_a_history_read() {
    let cell = TestCell::start(3);
    let leader = cell.leader(WAIT).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let put_cmd = |k: &str| Command::Put(put(k, "x").encode_to_vec());

    // A follower refuses (and says who leads): never appends, never passes it on.
    match raw_propose(cell.member(follower).peer, vec![put_cmd("/r/refused")]).await {
        Err(ProposeRefused::NotLeader(hint)) => assert_eq!(hint, Some(leader)),
        other => panic!("a follower must refuse: {other:?}"),
    }
    // A history reader grouped with another command is refused by the leader.
    let history = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: "/r/a".into(),
                revision: 1,
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    let mixed = vec![
        Command::Txn(history.encode_to_vec()),
        put_cmd("/r/with-history"),
    ];
    match raw_propose(cell.member(leader).peer, mixed).await {
        Err(ProposeRefused::Invalid(_)) => {}
        other => panic!("a history read must go alone: {other:?}"),
    }
    // A good batch: one entry, one outcome per command, in order.
    let reply = raw_propose(
        cell.member(leader).peer,
        vec![put_cmd("/r/1"), put_cmd("/r/2")],
    )
    .await
    .expect("the leader appends");
    assert_eq!(reply.leader, leader);
    assert_eq!(reply.responses.0.len(), 2);
    let revs: Vec<i64> = reply.responses.0.iter().map(|r| r.revision).collect();
    assert_eq!(revs[1], revs[0] + 1);

    let mut l = cell.kv(leader).await;
    let r = l.range(prefix("/r/")).await.unwrap().into_inner();
    let got: Vec<(String, i64)> = r
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(
        got,
        [("/r/1".to_string(), revs[0]), ("/r/2".to_string(), revs[1])],
        "only the leader's good batch was applied"
    );
}

/// Puts fresh keys `/f/<writer>/<attempt>` through the followers of the moment,
/// never the same key twice, and records what was acknowledged.
async fn forwarding_writer(
    endpoints: Vec<SocketAddr>,
    writer: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    let mut attempt = 0u64;
    let mut which = writer;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let addr = endpoints[which % endpoints.len()];
        let key = format!("/f/{writer:02}/{attempt:06}");
        let value = format!("{writer}-{attempt}");
        attempt += 1;
        let done = match common::kv(addr).await {
            Ok(mut c) => c
                .put(PutRequest {
                    key: key.clone().into(),
                    value: value.clone().into(),
                    ..Default::default()
                })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if done {
            acked.lock().unwrap().insert(key, value);
            ok += 1;
        } else {
            failed += 1;
            which += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_followers_forward_loses_and_duplicates_nothing() {
    let mut cell = TestCell::start(3);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    for round in 0..2 {
        let old = cell.leader(WAIT).await;
        // Writers only ever talk to followers: every write is forwarded.
        let followers: Vec<SocketAddr> = cell
            .members
            .iter()
            .filter(|m| m.id != old && m.child.is_some())
            .map(|m| m.client)
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..16)
            .map(|w| {
                tokio::spawn(forwarding_writer(
                    followers.clone(),
                    round * 16 + w,
                    stop.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        cell.kill(old);
        let new = cell.new_leader(old, WAIT).await;
        // Keep writing a while under the new leader (one survivor forwards to it).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut failed) = (0, 0);
        for w in writers {
            let (o, f) = w.await.unwrap();
            ok += o;
            failed += f;
        }
        eprintln!(
            "round {round}: leader {old} killed, {new} leads; {ok} writes acknowledged, {failed} failed"
        );
        assert!(ok > 0, "round {round}: no write went through");
        cell.spawn(old);
        cell.wait_ready(Duration::from_secs(60));
    }
    cell.leader(WAIT).await;
    let acked = acked.lock().unwrap().clone();
    for m in &cell.members {
        let mut c = common::kv(m.client).await.unwrap();
        let r = c.range(prefix("/f/")).await.unwrap().into_inner();
        let got: BTreeMap<String, (String, i64)> = r
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    (String::from_utf8_lossy(&kv.value).into_owned(), kv.version),
                )
            })
            .collect();
        for (k, v) in &acked {
            match got.get(k) {
                Some((got_v, _)) => assert_eq!(got_v, v, "member {}: {k}", m.id),
                None => panic!("member {}: acknowledged {k} lost", m.id),
            }
        }
        // Every key was put at most once by its writer: a version above 1 would be
        // a write applied twice (an answer lost and the batch sent again).
        for (k, (_, version)) in &got {
            assert_eq!(*version, 1, "member {}: {k} applied {version} times", m.id);
        }
    }
    eprintln!("{} acknowledged forwarded writes all present", acked.len());
}
