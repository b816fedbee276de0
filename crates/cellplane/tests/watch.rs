//! The etcd Watch API on a 3-member cell: ordering, a revision's events never split,
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
        "responses in revision order: {revs:?}"
    );
    // A response may carry the events of several revisions that were waiting
    // together (as etcd's do); its header names the newest, and its events are
    // in revision order.
    for r in all {
        let mods: Vec<i64> = r
            .events
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert!(
            mods.windows(2).all(|w| w[0] <= w[1])
                && mods.last() <= Some(&r.header.as_ref().unwrap().revision),
            "events in order, none newer than the header: {mods:?}"
        );
    }
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
    let txn_rev = |r: &WatchResponse| {
        r.events
            .iter()
            .filter(|e| e.kv.as_ref().unwrap().key.starts_with(b"/w/t"))
            .count()
    };
    assert!(
        all.iter().any(|r| txn_rev(r) == 2),
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

/// Watchers of single keys created while writes go on, on every member, some
/// from an explicit older revision: each gets exactly its key's events from where
/// it started, none missed between its history catch-up and the live events. A
/// progress response comes only after every event up to its revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_watchers_created_during_writes_miss_nothing() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    const KEYS: i64 = 8;
    const PUTS: usize = 400;
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    let last_put = Arc::new(AtomicI64::new(0));
    let mut kv = cell.kv(1).await;
    let writer = {
        let last_put = last_put.clone();
        tokio::spawn(async move {
            let mut puts = Vec::new();
            for i in 0..PUTS {
                let key = format!("/hot/{}", i as i64 % KEYS);
                let r = kv
                    .put(put(&key, &i.to_string()))
                    .await
                    .unwrap()
                    .into_inner();
                let rev = r.header.unwrap().revision;
                last_put.store(rev, Ordering::Release);
                puts.push((key, rev));
            }
            puts
        })
    };

    // Set once the writes are done: the revision every stream must reach.
    let target = Arc::new(AtomicI64::new(0));
    let progress = || WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            Default::default(),
        )),
    };
    let mut watchers = Vec::new();
    for member in 1..=3u64 {
        let mut s = open(cell.member(member).client).await;
        let tx = s.tx.clone();
        let asker = s.tx.clone();
        let last_put = last_put.clone();
        // Creates, spread over the writes; odd keys start from an older revision.
        let creates = tokio::spawn(async move {
            let mut starts = HashMap::new();
            for j in 0..KEYS {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let start = if j % 2 == 1 {
                    (last_put.load(Ordering::Acquire) - 5).max(1)
                } else {
                    0
                };
                starts.insert(j + 1, start);
                tx.send(create(WatchCreateRequest {
                    watch_id: j + 1,
                    key: format!("/hot/{j}").into(),
                    start_revision: start,
                    ..Default::default()
                }))
                .await
                .unwrap();
            }
            starts
        });
        let target = target.clone();
        // Collects every response until a progress response at or past `target`.
        let reader = tokio::spawn(async move {
            // watch id -> (revision of its created response, its events)
            let mut got: HashMap<i64, (i64, Vec<(String, i64)>)> = HashMap::new();
            loop {
                let r = s.next().await;
                let rev = r.header.as_ref().unwrap().revision;
                if r.watch_id == -1 {
                    if rev >= target.load(Ordering::Acquire) {
                        return got;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    s.send(progress()).await;
                    continue;
                }
                assert!(
                    !r.canceled,
                    "watch {} canceled: {}",
                    r.watch_id, r.cancel_reason
                );
                let entry = got.entry(r.watch_id).or_default();
                if r.created {
                    entry.0 = rev;
                }
                for e in &r.events {
                    let kv = e.kv.as_ref().unwrap();
                    assert!(
                        kv.mod_revision <= rev,
                        "no event newer than its response's header"
                    );
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    entry.1.push((key, kv.mod_revision));
                }
            }
        });
        watchers.push((member, asker, creates, reader));
    }
    let puts = writer.await.unwrap();
    target.store(puts.last().unwrap().1, Ordering::Release);

    for (member, asker, creates, reader) in watchers {
        let starts = creates.await.unwrap();
        asker.send(progress()).await.unwrap();
        let got = reader.await.unwrap();
        for (id, start) in starts {
            let key = format!("/hot/{}", id - 1);
            let (created_at, events) = &got[&id];
            let from = if start > 0 { start } else { created_at + 1 };
            let want: Vec<(String, i64)> = puts
                .iter()
                .filter(|(k, r)| *k == key && *r >= from)
                .cloned()
                .collect();
            assert_eq!(
                events, &want,
                "member {member}, watch {id} on {key} from {from}"
            );
        }
    }
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
    let mut kv = cell.kv(1).await;
    // Write first and watch from the revision after the one before the writes:
    // the events reach etcdctl however long it takes to start (a fixed wait for
    // it to connect before writing missed them on a loaded machine).
    let before = common::put_revision(&mut kv, "/other", "x").await;
    kv.put(put("/e/x", "1")).await.unwrap();
    kv.put(put("/e/x", "2")).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: "/e/x".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ep = cell.member(2).client.to_string();
    let mut child = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={ep}"),
            "watch",
            "--prefix",
            "/e/",
            "--prev-kv",
            &format!("--rev={}", before + 1),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("etcdctl is not installed: run scripts/setup.sh");
    let want = [
        "PUT", "/e/x", "1", "PUT", "/e/x", "1", "/e/x", "2", "DELETE", "/e/x", "2", "/e/x", "",
    ];
    // etcdctl watch never exits by itself: read its lines until all are in
    // (or a deadline passes), then stop it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while lines.len() < want.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // etcdctl prints prev_kv before kv; a delete's kv has an empty value.
    assert_eq!(lines, want);
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    common::proc_memory(pid, "VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_of_big_values_leave_the_members_memory_bounded() {
    // 40 streams that never read, each watching the written keys with prev_kv,
    // while 160 puts of 128 KiB values go by. Unbounded, each stream would hold
    // 128 responses of ~256 KiB (value and previous value): 32 MiB per stream,
    // 1.3 GiB in all. Bounded, each holds at most 1 MiB (plus what HTTP/2 flow
    // control lets through), and the event log keeps such revisions without their
    // events.
    let cell = TestCell::start_with(1, "[watch]\nstream_buffer_bytes = 1048576\n");
    cell.leader(Duration::from_secs(30)).await;
    let pid = cell.member(1).child.as_ref().unwrap().id();
    let mut kv = cell.kv(1).await;
    let value = "x".repeat(128 << 10);
    // Warm up allocator and RocksDB, so the baseline is not an empty process.
    for i in 0..40 {
        kv.put(put(&format!("/big/{}", i % 8), &value))
            .await
            .unwrap();
    }
    let before = rss_bytes(pid);
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let s = open(cell.member(1).client).await;
        s.send(create(WatchCreateRequest {
            prev_kv: true,
            ..prefix("/big/")
        }))
        .await;
        stalled.push(s);
    }
    for i in 0..160 {
        kv.put(put(&format!("/big/{}", i % 8), &value))
            .await
            .unwrap();
    }
    let after = rss_bytes(pid);
    let grown = after.saturating_sub(before);
    assert!(
        grown < 400 << 20,
        "member grew by {} MiB (from {} to {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
    // And the streams were ended with the revision to resume from.
    let mut s = stalled.pop().unwrap();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), s.rx.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => break String::new(),
            Ok(Err(status)) => break status.message().to_string(),
            Err(_) => panic!("stalled stream neither ended nor delivered"),
        }
    };
    assert!(ended.contains("watch again from revision"), "{ended}");
    println!(
        "member RSS {} MiB before, {} MiB after 40 stalled streams x 160 puts of 128 KiB",
        before >> 20,
        after >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_too_big_for_the_event_log_still_reaches_watchers() {
    let cell = TestCell::start_with(1, "[watch]\nevent_log_max_revision_bytes = 1024\n");
    cell.leader(Duration::from_secs(30)).await;
    let mut w = open(cell.member(1).client).await;
    w.send(create(WatchCreateRequest {
        prev_kv: true,
        ..prefix("/e/")
    }))
    .await;
    assert!(w.next().await.created);
    let mut kv = cell.kv(1).await;
    let big = "b".repeat(4096);
    kv.put(put("/e/1", "small")).await.unwrap();
    kv.put(put("/e/1", &big)).await.unwrap();
    kv.put(put("/e/2", "small")).await.unwrap();
    let rs = w.events(3).await;
    let got = keys_values(&rs);
    assert_eq!(
        got,
        vec![
            ("/e/1".to_string(), "small".to_string()),
            ("/e/1".to_string(), big.clone()),
            ("/e/2".to_string(), "small".to_string()),
        ]
    );
    let prev = rs[1].events[0].prev_kv.as_ref().unwrap();
    assert_eq!(prev.value, b"small", "prev_kv read from the stored history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_puts_gets_deletes_and_watches_from_a_revision() {
    use std::io::BufRead;
    let cell = TestCell::start(1);
    cell.leader(Duration::from_secs(30)).await;
    let ep = cell.member(1).client.to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .arg("kv")
            .args(["--endpoints", &ep])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(cli(&["put", "/w/a", "1"]).starts_with("OK"));
    assert!(cli(&["put", "/w/b", "2"]).starts_with("OK"));
    assert_eq!(cli(&["get", "/w/", "--prefix"]), "/w/a\n1\n/w/b\n2\n");
    assert_eq!(cli(&["del", "/w/a"]), "1\n");
    // Watching from revision 1 replays the history, so nothing races the watch.
    let mut child = std::process::Command::new(common::bin())
        .args([
            "kv",
            "--endpoints",
            &ep,
            "watch",
            "/w/",
            "--prefix",
            "--rev",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .take(3)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("three events within 30 s")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        lines,
        [
            "PUT /w/a 1 (revision 1)",
            "PUT /w/b 2 (revision 2)",
            "DELETE /w/a (revision 3)"
        ]
    );
    // Bad input: a clear message and a failing exit code.
    let out = std::process::Command::new(common::bin())
        .args(["kv", "--endpoints", &ep, "get", "/w/", "--rev", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rev"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_revision_1_catches_up_on_a_large_history_in_bounded_memory() {
    // 160 versions of one key, 512 KiB each: 80 MiB of history, 160 MiB with
    // the previous values the watcher asks for. Read whole, the catch-up would
    // hold all of it; read a page at a time as the client drains the stream, the
    // member holds a page and the stream's buffer.
    let cell = TestCell::start_with(1, "");
    cell.leader(Duration::from_secs(30)).await;
    let pid = cell.member(1).child.as_ref().unwrap().id();
    let mut kv = cell.kv(1).await;
    let n = 160;
    for i in 0..n {
        kv.put(put("/hist/k", &common::noise(i, 512 << 10)))
            .await
            .unwrap();
    }
    let before = rss_bytes(pid);
    let mut w = open(cell.member(1).client).await;
    w.send(create(WatchCreateRequest {
        key: b"/hist/k".to_vec(),
        start_revision: 1,
        prev_kv: true,
        ..Default::default()
    }))
    .await;
    let (mut revisions, mut peak) = (Vec::new(), before);
    while revisions.len() < n as usize {
        let resp = tokio::time::timeout(Duration::from_secs(30), w.rx.message())
            .await
            .expect("the catch-up stalled")
            .expect("the stream failed")
            .expect("the stream ended");
        assert!(!resp.canceled, "{}", resp.cancel_reason);
        for e in &resp.events {
            let kv = e.kv.as_ref().unwrap();
            assert_eq!(kv.value.len(), 512 << 10);
            revisions.push(kv.mod_revision);
        }
        // A client slower than the member: the catch-up waits for it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        peak = peak.max(rss_bytes(pid));
    }
    assert_eq!(revisions, (1..=n as i64).collect::<Vec<_>>());
    let grown = peak.saturating_sub(before);
    println!(
        "member RSS {} MiB before a catch-up over 160 MiB of events, {} MiB at most during it",
        before >> 20,
        peak >> 20
    );
    // What a catch-up may add: RocksDB's block cache (32 MiB, shared), a page
    // of events (4 MiB, twice with previous values) and the stream's buffer (4
    // MiB), and their encodings. Measured about 15 MiB.
    assert!(
        grown < 96 << 20,
        "member grew by {} MiB during the catch-up (from {} to {} MiB)",
        grown >> 20,
        before >> 20,
        peak >> 20
    );
    // Live events follow the history on the same watcher.
    kv.put(put("/hist/k", "live")).await.unwrap();
    let live = w.next().await;
    assert_eq!(live.events[0].kv.as_ref().unwrap().value, b"live");
}
