//! Every KV behaviour of a cell, against etcd's documented results, on a 3-member
//! cell of real processes. Each case says what etcd does.

mod common;

use common::{get, put};

use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use cellplane_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest,
    request_op, response_op,
};
use common::{TestCell, prefix};
use tonic::Code;
use tonic::transport::Channel;

fn keys(r: &cellplane_proto::etcdserverpb::RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_match_etcd() {
    let cell = TestCell::start(3);
    let leader = cell.leader(std::time::Duration::from_secs(30)).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    // Writes go through a follower: any member serves any request.
    let mut c = cell.kv(follower).await;

    put_semantics(&mut c).await;
    range_semantics(&mut c).await;
    delete_semantics(&mut c).await;
    txn_semantics(&mut c).await;
    revision_and_compaction(&mut c).await;
    bad_input(&mut c).await;

    // Header fields are filled by whichever member answered.
    let r = c.range(get("/p/a")).await.unwrap().into_inner();
    let h = r.header.unwrap();
    assert_ne!(h.cluster_id, 0);
    assert_ne!(h.member_id, 0);
    assert!(h.raft_term >= 1);

    // Serializable reads on every member see the same data once caught up.
    let want = keys(&c.range(prefix("/p/")).await.unwrap().into_inner());
    for id in 1..=3 {
        let mut m = cell.kv(id).await;
        let mut req = prefix("/p/");
        // Linearizable first: after it, this member has applied everything.
        let lin = m.range(req.clone()).await.unwrap().into_inner();
        assert_eq!(keys(&lin), want, "member {id}");
        req.serializable = true;
        let ser = m.range(req).await.unwrap().into_inner();
        assert_eq!(keys(&ser), want, "member {id} serializable");
    }
    // Nothing above killed a member.
    for id in 1..=3 {
        assert!(
            common::http_get(cell.member(id).http, "/healthz").is_some(),
            "member {id} died"
        );
    }
}

async fn put_semantics(c: &mut KvClient<Channel>) {
    let r0 = common::revision(c).await;
    let r = c.put(put("/k", "v1")).await.unwrap().into_inner();
    assert_eq!(
        r.header.as_ref().unwrap().revision,
        r0 + 1,
        "each put is one revision"
    );
    assert!(r.prev_kv.is_none());
    let mut p = put("/k", "v2");
    p.prev_kv = true;
    let r = c.put(p).await.unwrap().into_inner();
    let prev = r.prev_kv.expect("prev_kv requested");
    assert_eq!(prev.value, b"v1");
    assert_eq!(prev.version, 1);
    let kv = c.range(get("/k")).await.unwrap().into_inner().kvs.remove(0);
    assert_eq!(kv.value, b"v2");
    assert_eq!(kv.create_revision, r0 + 1, "create_revision stays");
    assert_eq!(kv.mod_revision, r0 + 2);
    assert_eq!(kv.version, 2);
    assert_eq!(kv.lease, 0);

    // ignore_value keeps the value and still makes a new revision.
    let mut p = put("/k", "");
    p.ignore_value = true;
    c.put(p).await.unwrap();
    let kv = c.range(get("/k")).await.unwrap().into_inner().kvs.remove(0);
    assert_eq!(kv.value, b"v2");
    assert_eq!(kv.version, 3);
    // ignore_value on a missing key: etcd's "key not found".
    let mut p = put("/missing", "");
    p.ignore_value = true;
    let e = c.put(p).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "etcdserver: key not found");
    // ignore_value with a value: "value is provided".
    let mut p = put("/k", "x");
    p.ignore_value = true;
    let e = c.put(p).await.unwrap_err();
    assert_eq!(e.message(), "etcdserver: value is provided");
    // ignore_lease keeps the lease (none here).
    let mut p = put("/k", "v3");
    p.ignore_lease = true;
    c.put(p).await.unwrap();
    // A lease that does not exist: "requested lease not found".
    let mut p = put("/k", "v");
    p.lease = 12345;
    let e = c.put(p).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "etcdserver: requested lease not found");
    c.delete_range(DeleteRangeRequest {
        key: "/k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Re-created after delete: version restarts at 1, new create_revision.
    let r = c.put(put("/k", "again")).await.unwrap().into_inner();
    let kv = c.range(get("/k")).await.unwrap().into_inner().kvs.remove(0);
    assert_eq!(kv.version, 1);
    assert_eq!(kv.create_revision, r.header.unwrap().revision);
}

async fn range_semantics(c: &mut KvClient<Channel>) {
    // /p/a .. /p/e, written in an order that differs from key order.
    for (k, v) in [
        ("/p/c", "3"),
        ("/p/a", "5"),
        ("/p/e", "1"),
        ("/p/b", "4"),
        ("/p/d", "2"),
    ] {
        c.put(put(k, v)).await.unwrap();
    }
    c.put(put("/p/b", "44")).await.unwrap(); // version 2
    c.put(put("/q", "outside")).await.unwrap();

    let r = c.range(prefix("/p/")).await.unwrap().into_inner();
    assert_eq!(keys(&r), ["/p/a", "/p/b", "/p/c", "/p/d", "/p/e"]);
    assert_eq!(r.count, 5);
    assert!(!r.more);

    // range_end "\0": every key >= key.
    let r = c
        .range(RangeRequest {
            key: "/p/d".into(),
            range_end: vec![0],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&r), ["/p/d", "/p/e", "/q"]);
    // key "\0" and range_end "\0": every key (etcdctl get --from-key "").
    let r = c
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.count >= 7 && r.kvs.is_empty(),
        "count_only returns only the count"
    );

    // limit: `more` and the full `count`.
    let mut req = prefix("/p/");
    req.limit = 2;
    let r = c.range(req).await.unwrap().into_inner();
    assert_eq!(keys(&r), ["/p/a", "/p/b"]);
    assert!(r.more);
    assert_eq!(r.count, 5);

    // Sorting.
    let mut req = prefix("/p/");
    req.sort_order = SortOrder::Descend as i32;
    assert_eq!(
        keys(&c.range(req).await.unwrap().into_inner()),
        ["/p/e", "/p/d", "/p/c", "/p/b", "/p/a"]
    );
    let mut req = prefix("/p/");
    req.sort_target = SortTarget::Value as i32; // no order given: ascending
    let r = c.range(req).await.unwrap().into_inner();
    assert_eq!(
        keys(&r),
        ["/p/e", "/p/d", "/p/c", "/p/b", "/p/a"],
        "values 1,2,3,44,5 sort as bytes"
    );
    let mut req = prefix("/p/");
    req.sort_target = SortTarget::Mod as i32;
    req.sort_order = SortOrder::Descend as i32;
    req.limit = 1;
    let r = c.range(req).await.unwrap().into_inner();
    assert_eq!(keys(&r), ["/p/b"], "last modified first");
    let mut req = prefix("/p/");
    req.sort_target = SortTarget::Create as i32;
    req.sort_order = SortOrder::Ascend as i32;
    assert_eq!(
        keys(&c.range(req).await.unwrap().into_inner()),
        ["/p/c", "/p/a", "/p/e", "/p/b", "/p/d"]
    );
    let mut req = prefix("/p/");
    req.sort_target = SortTarget::Version as i32;
    req.sort_order = SortOrder::Descend as i32;
    req.limit = 1;
    assert_eq!(keys(&c.range(req).await.unwrap().into_inner()), ["/p/b"]);

    // keys_only.
    let mut req = prefix("/p/");
    req.keys_only = true;
    let r = c.range(req).await.unwrap().into_inner();
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()) && r.kvs.len() == 5);

    // min/max mod and create revision filters (count stays the range's size).
    let all = c.range(prefix("/p/")).await.unwrap().into_inner();
    let b = all.kvs.iter().find(|kv| kv.key == b"/p/b").unwrap().clone();
    let c_kv = all.kvs.iter().find(|kv| kv.key == b"/p/c").unwrap().clone();
    let mut req = prefix("/p/");
    req.min_mod_revision = b.mod_revision;
    let r = c.range(req).await.unwrap().into_inner();
    assert_eq!(keys(&r), ["/p/b"]);
    assert_eq!(r.count, 5);
    let mut req = prefix("/p/");
    req.max_create_revision = c_kv.create_revision;
    assert_eq!(keys(&c.range(req).await.unwrap().into_inner()), ["/p/c"]);
    let mut req = prefix("/p/");
    req.min_create_revision = c_kv.create_revision + 1;
    req.max_mod_revision = b.mod_revision - 1;
    assert_eq!(
        keys(&c.range(req).await.unwrap().into_inner()),
        ["/p/a", "/p/d", "/p/e"]
    );

    // A missing key: no kvs, count 0.
    let r = c.range(get("/p/zz")).await.unwrap().into_inner();
    assert!(r.kvs.is_empty() && r.count == 0);
}

async fn delete_semantics(c: &mut KvClient<Channel>) {
    for k in ["/d/1", "/d/2", "/d/3"] {
        c.put(put(k, k)).await.unwrap();
    }
    let before = common::revision(c).await;
    let r = c
        .delete_range(DeleteRangeRequest {
            key: "/d/1".into(),
            range_end: "/d/3".into(),
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 2);
    assert_eq!(r.prev_kvs.len(), 2);
    assert_eq!(r.prev_kvs[0].value, b"/d/1");
    assert_eq!(
        r.header.unwrap().revision,
        before + 1,
        "one revision for the whole delete"
    );
    // Deleting nothing makes no revision.
    let r = c
        .delete_range(DeleteRangeRequest {
            key: "/d/1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 0);
    assert_eq!(r.header.unwrap().revision, before + 1);
    assert_eq!(
        keys(&c.range(prefix("/d/")).await.unwrap().into_inner()),
        ["/d/3"]
    );
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        target_union: Some(u),
        range_end: vec![],
    }
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put(k, v))),
    }
}

fn op_get(k: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(get(k))),
    }
}

async fn txn_semantics(c: &mut KvClient<Channel>) {
    c.put(put("/t/x", "1")).await.unwrap();
    let x = c
        .range(get("/t/x"))
        .await
        .unwrap()
        .into_inner()
        .kvs
        .remove(0);

    // Every comparison target and operator, each on a case that holds and one that
    // does not.
    use CompareResult::*;
    use CompareTarget::*;
    let cases = [
        (
            cmp("/t/x", Value, Equal, TargetUnion::Value("1".into())),
            true,
        ),
        (
            cmp("/t/x", Value, Equal, TargetUnion::Value("2".into())),
            false,
        ),
        (
            cmp("/t/x", Value, NotEqual, TargetUnion::Value("2".into())),
            true,
        ),
        (
            cmp("/t/x", Value, Greater, TargetUnion::Value("0".into())),
            true,
        ),
        (
            cmp("/t/x", Value, Less, TargetUnion::Value("0".into())),
            false,
        ),
        (cmp("/t/x", Version, Equal, TargetUnion::Version(1)), true),
        (
            cmp("/t/x", Version, Greater, TargetUnion::Version(1)),
            false,
        ),
        (
            cmp(
                "/t/x",
                Create,
                Equal,
                TargetUnion::CreateRevision(x.create_revision),
            ),
            true,
        ),
        (
            cmp(
                "/t/x",
                Create,
                Less,
                TargetUnion::CreateRevision(x.create_revision + 1),
            ),
            true,
        ),
        (
            cmp(
                "/t/x",
                Mod,
                NotEqual,
                TargetUnion::ModRevision(x.mod_revision),
            ),
            false,
        ),
        (
            cmp(
                "/t/x",
                Mod,
                Greater,
                TargetUnion::ModRevision(x.mod_revision - 1),
            ),
            true,
        ),
        // A missing key: a value compare fails; other targets compare against 0.
        (
            cmp("/t/none", Value, NotEqual, TargetUnion::Value("a".into())),
            false,
        ),
        (
            cmp("/t/none", Version, Equal, TargetUnion::Version(0)),
            true,
        ),
        (
            cmp("/t/none", Create, Equal, TargetUnion::CreateRevision(0)),
            true,
        ),
    ];
    for (i, (compare, want)) in cases.into_iter().enumerate() {
        let r = c
            .txn(TxnRequest {
                compare: vec![compare],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.succeeded, want, "case {i}");
    }

    // Compare-and-swap: success branch writes, failure branch reads.
    let before = common::revision(c).await;
    let r = c
        .txn(TxnRequest {
            compare: vec![cmp("/t/x", Value, Equal, TargetUnion::Value("1".into()))],
            success: vec![op_put("/t/x", "2"), op_put("/t/y", "new"), op_get("/t/x")],
            failure: vec![op_get("/t/x")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
    assert_eq!(
        r.header.unwrap().revision,
        before + 1,
        "a txn is one revision"
    );
    assert_eq!(r.responses.len(), 3);
    match &r.responses[2].response {
        Some(response_op::Response::ResponseRange(rr)) => {
            assert_eq!(
                rr.kvs[0].value, b"2",
                "a read in a txn sees the txn's earlier writes"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    let y = c
        .range(get("/t/y"))
        .await
        .unwrap()
        .into_inner()
        .kvs
        .remove(0);
    assert_eq!(y.mod_revision, before + 1);
    // Now the compare fails: the failure branch runs.
    let r = c
        .txn(TxnRequest {
            compare: vec![cmp("/t/x", Value, Equal, TargetUnion::Value("1".into()))],
            success: vec![op_put("/t/x", "3")],
            failure: vec![op_get("/t/x")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded);
    match &r.responses[0].response {
        Some(response_op::Response::ResponseRange(rr)) => assert_eq!(rr.kvs[0].value, b"2"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        common::revision(c).await,
        before + 1,
        "a txn that writes nothing makes no revision"
    );

    // A compare over a range holds only if it holds for every key.
    let mut all_small = cmp("/p/", Version, Less, TargetUnion::Version(2));
    all_small.range_end = "/p0".into();
    let r = c
        .txn(TxnRequest {
            compare: vec![all_small],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded, "/p/b has version 2");

    // Two writes to one key in one branch: etcd refuses.
    let e = c
        .txn(TxnRequest {
            success: vec![op_put("/t/d", "1"), op_put("/t/d", "2")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "etcdserver: duplicate key given in txn request"
    );
    // More ops than max_txn_ops (128).
    let e = c
        .txn(TxnRequest {
            success: (0..129)
                .map(|i| op_put(&format!("/t/many/{i}"), "v"))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "etcdserver: too many operations in txn request"
    );
}

async fn revision_and_compaction(c: &mut KvClient<Channel>) {
    let r1 = common::put_revision(c, "/h", "one").await;
    let r2 = common::put_revision(c, "/h", "two").await;
    let r3 = c
        .delete_range(DeleteRangeRequest {
            key: "/h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let at = |rev: i64| RangeRequest {
        key: "/h".into(),
        revision: rev,
        ..Default::default()
    };
    let v = c.range(at(r1)).await.unwrap().into_inner();
    assert_eq!(v.kvs[0].value, b"one");
    assert_eq!(
        v.header.unwrap().revision,
        r3,
        "the header carries the newest revision"
    );
    assert_eq!(
        c.range(at(r2)).await.unwrap().into_inner().kvs[0].value,
        b"two"
    );
    assert!(
        c.range(at(r3)).await.unwrap().into_inner().kvs.is_empty(),
        "deleted at r3"
    );
    // Historical prefix read.
    let mut p = prefix("/h");
    p.revision = r1;
    assert_eq!(keys(&c.range(p).await.unwrap().into_inner()), ["/h"]);

    // A future revision.
    let e = c.range(at(r3 + 1000)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );

    // Compact at r2: r2 still readable, r1 not.
    c.compact(CompactionRequest {
        revision: r2,
        physical: true,
    })
    .await
    .unwrap();
    assert_eq!(
        c.range(at(r2)).await.unwrap().into_inner().kvs[0].value,
        b"two"
    );
    let e = c.range(at(r1)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    // Compacting at or below the compaction again, or into the future: etcd's errors.
    let e = c
        .compact(CompactionRequest {
            revision: r2,
            physical: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let e = c
        .compact(CompactionRequest {
            revision: r3 + 1000,
            physical: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    // Older keys survive compaction at their newest version.
    assert_eq!(
        c.range(get("/p/a")).await.unwrap().into_inner().kvs.len(),
        1
    );
}

async fn bad_input(c: &mut KvClient<Channel>) {
    let e = c.put(put("", "v")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "etcdserver: key is not provided");
    let e = c.range(get("")).await.unwrap_err();
    assert_eq!(e.message(), "etcdserver: key is not provided");
    let e = c
        .range(RangeRequest {
            key: "b".into(),
            range_end: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("range_end"), "{}", e.message());
    let e = c
        .delete_range(DeleteRangeRequest {
            key: "b".into(),
            range_end: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Just over 1.5 MiB: etcd's "request is too large".
    let big = "x".repeat(1_600_000);
    let e = c.put(put("/big", &big)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "etcdserver: request is too large");
    // Far over: refused by the transport limit before decoding.
    let huge = "x".repeat(8 << 20);
    let e = c.put(put("/big", &huge)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{e:?}"
    );
    let e = c
        .range(RangeRequest {
            key: "a".into(),
            sort_order: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .range(RangeRequest {
            key: "a".into(),
            limit: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The member still works.
    c.put(put("/after-bad-input", "ok")).await.unwrap();
}
