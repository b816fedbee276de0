//! The etcd Watch API on a 3-member cell: ordering, one response per revision,
//! resume from a revision, compaction, prev_kv, filters, many watches on one
//! stream, a watch across a leader kill, a stalled stream, and the real etcdctl.

mod common;

use common::put;

use std::time::Duration;

use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::watch_create_request::FilterType;
use cellplane_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, RequestOp, TxnRequest, WatchCancelRequest,
    WatchCreateRequest, WatchRequest, WatchResponse, request_op, watch_request,
};
use common::TestCell;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

fn create(w: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(w)),
    }
}

fn prefix(p: &str) -> WatchCreateRequest {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    WatchCreateRequest {
        key: p.into(),
        range_end: end,
        ..Default::default()
    }
}

struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

async fn open(addr: std::net::SocketAddr) -> Stream {
    let (tx, rx) = mpsc::channel(16);
    let mut client = WatchClient::new(common::channel(addr).await.unwrap());
    let rx = client
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Stream { tx, rx }
}

impl Stream {
    async fn send(&self, r: WatchRequest) {
        self.tx.send(r).await.unwrap();
    }
    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a watch response in time")
            .unwrap()
            .expect("stream open")
    }
    /// Responses until `n` events have arrived (skipping created/progress).
    async fn events(&mut self, n: usize) -> Vec<WatchResponse> {
        let mut got = Vec::new();
        let mut count = 0;
        while count < n {
            let r = self.next().await;
            if r.created || r.events.is_empty() {
                continue;
            }
            count += r.events.len();
            got.push(r);
        }
        got
    }
}

fn keys_values(rs: &[WatchResponse]) -> Vec<(String, String)> {
    rs.iter()
        .flat_map(|r| r.events.iter())
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_semantics_match_etcd() {
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    let mut kv = cell.kv(1).await;
    // Watches on a follower, writes through another member.
    let mut s = open(cell.member(2).client).await;

    // Two watches on one stream, one with a client-chosen id, one with prev_kv and
    // a NODELETE filter.
    s.send(create(WatchCreateRequest {
        watch_id: 7,
        ..prefix("/w/")
    }))
    .await;
    let r = s.next().await;
    assert!(r.created && r.watch_id == 7);
    s.send(create(WatchCreateRequest {
        prev_kv: true,
        filters: vec![FilterType::Nodelete as i32],
        ..prefix("/w/a")
    }))
    .await;
    let r = s.next().await;
    assert!(r.created);
    let second = r.watch_id;
    assert_ne!(second, 7);

    kv.put(put("/w/a", "1")).await.unwrap();
    kv.put(put("/w/a", "2")).await.unwrap();
    kv.put(put("/w/b", "x")).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: "/w/a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A txn writing two keys: one revision, so one response with both events.
    kv.txn(TxnRequest {
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put("/w/t1", "1"))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(put("/w/t2", "2"))),
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap();

    // Watch 7 sees all 6 events in revision order; watch `second` sees the two
    // puts of /w/a with prev_kv, and not the delete.
    let mut by_watch: std::collections::BTreeMap<i64, Vec<WatchResponse>> = Default::default();
    for r in s.events(8).await {
        by_watch.entry(r.watch_id).or_default().push(r);
    }
    let all = &by_watch[&7];
    let revs: Vec<i64> = all
        .iter()
        .map(|r| r.header.as_ref().unwrap().revision)
        .collect();
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "one response per revision, in order: {revs:?}"
    );
    assert_eq!(
        keys_values(all),
        [
            ("/w/a", "1"),
            ("/w/a", "2"),
            ("/w/b", "x"),
            ("/w/a", ""),
            ("/w/t1", "1"),
            ("/w/t2", "2")
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert_eq!(
        all.last().unwrap().events.len(),
        2,
        "both events of the txn in one response"
    );
    assert!(
        all.iter()
            .flat_map(|r| &r.events)
            .all(|e| e.prev_kv.is_none()),
        "no prev_kv unless asked"
    );
    let a = &by_watch[&second];
    assert_eq!(
        keys_values(a),
        [
            ("/w/a".to_string(), "1".to_string()),
            ("/w/a".to_string(), "2".to_string())
        ]
    );
    assert_eq!(a[1].events[0].prev_kv.as_ref().unwrap().value, b"1");
    let first_rev = all[0].header.as_ref().unwrap().revision;

    // Cancel one watch: it says so, and the other keeps going.
    s.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: second },
        )),
    })
    .await;
    let r = s.next().await;
    assert!(r.canceled && r.watch_id == second);

    // Resume from a past revision on another member: the same events again.
    let mut s2 = open(cell.member(3).client).await;
    s2.send(create(WatchCreateRequest {
        start_revision: first_rev,
        ..prefix("/w/")
    }))
    .await;
    let replay = s2.events(6).await;
    assert_eq!(keys_values(&replay), keys_values(all));

    // Compact, then ask for a compacted revision: canceled with compact_revision.
    let now = all.last().unwrap().header.as_ref().unwrap().revision;
    kv.compact(CompactionRequest {
        revision: now,
        physical: true,
    })
    .await
    .unwrap();
    // A linearizable read on member 3 first: then it has applied the compaction.
    cell.kv(3)
        .await
        .range(cellplane_proto::etcdserverpb::RangeRequest {
            key: "/w/a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    s2.send(create(WatchCreateRequest {
        start_revision: first_rev,
        watch_id: 99,
        ..prefix("/w/")
    }))
    .await;
    let mut canceled = None;
    for _ in 0..4 {
        let r = s2.next().await;
        if r.watch_id == 99 && r.canceled {
            canceled = Some(r);
            break;
        }
    }
    let c = canceled.expect("canceled for compaction");
    assert_eq!(c.compact_revision, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_a_leader_kill_without_missing_an_event() {
    let mut cell = TestCell::start(3);
    let leader = cell.leader(Duration::from_secs(30)).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let writer_at = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let mut s = open(cell.member(leader).client).await;
    s.send(create(prefix("/k/"))).await;
    assert!(s.next().await.created);
    let mut kv = cell.kv(writer_at).await;
    for i in 0..20 {
        kv.put(put(&format!("/k/{i:03}"), "v")).await.unwrap();
    }
    let seen = s.events(20).await;
    let last = seen.last().unwrap().header.as_ref().unwrap().revision;
    // The member we watched on dies; more writes land meanwhile.
    cell.kill(leader);
    cell.new_leader(leader, Duration::from_secs(30)).await;
    for i in 20..40 {
        kv.put(put(&format!("/k/{i:03}"), "v")).await.unwrap();
    }
    // Resume on a survivor from the last revision seen + 1: exactly the rest.
    let mut s = open(cell.member(follower).client).await;
    s.send(create(WatchCreateRequest {
        start_revision: last + 1,
        ..prefix("/k/")
    }))
    .await;
    let rest = s.events(20).await;
    let keys: Vec<String> = keys_values(&rest).into_iter().map(|(k, _)| k).collect();
    let want: Vec<String> = (20..40).map(|i| format!("/k/{i:03}")).collect();
    assert_eq!(keys, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_stream_is_ended_and_writes_go_on() {
    let cell = TestCell::start_with(1, "[watch]\nstream_buffer = 16\n");
    cell.leader(Duration::from_secs(30)).await;
    // A stream that never reads: a raw HTTP/2 client would keep its window open; a
    // tonic client stops reading when we stop polling it.
    let mut stalled = open(cell.member(1).client).await;
    stalled.send(create(prefix("/s/"))).await;
    let mut kv = cell.kv(1).await;
    for i in 0..3000 {
        kv.put(put(&format!("/s/{i}"), &"v".repeat(1000)))
            .await
            .unwrap();
    }
    // The member is alive and serving; the stalled stream was ended: draining it
    // ends with an error that names the revision to resume from.
    let mut ended = None;
    for _ in 0..10_000 {
        match tokio::time::timeout(Duration::from_secs(10), stalled.rx.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => {
                ended = Some(String::new());
                break;
            }
            Ok(Err(status)) => {
                ended = Some(status.message().to_string());
                break;
            }
            Err(_) => panic!("stalled stream neither ended nor delivered"),
        }
    }
    let msg = ended.expect("the stalled stream ended");
    assert!(
        msg.is_empty() || msg.contains("watch again from revision"),
        "{msg}"
    );
    kv.put(put("/s/after", "ok")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prints_events() {
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    let ep = cell.member(2).client.to_string();
    let mut child = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={ep}"),
            "watch",
            "--prefix",
            "/e/",
            "--prev-kv",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("etcdctl is not installed: run scripts/setup.sh");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut kv = cell.kv(1).await;
    kv.put(put("/e/x", "1")).await.unwrap();
    kv.put(put("/e/x", "2")).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: "/e/x".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        // etcdctl prints prev_kv before kv; a delete's kv has an empty value.
        [
            "PUT", "/e/x", "1", "PUT", "/e/x", "1", "/e/x", "2", "DELETE", "/e/x", "2", "/e/x", ""
        ],
        "{text}"
    );
}
