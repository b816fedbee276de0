//! The etcd Lease API on a cell and through the router: grant, attach, keep-alive,
//! time-to-live with keys, revoke, expiry deleting keys with delete events, leases
//! surviving a leader change; with our client and with the real etcdctl; leases
//! belonging to the tenant a router names in `cellplane-tenant`.

mod common;

use std::time::{Duration, Instant};

use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
    WatchResponse, request_op, watch_request,
};
use cellplane_proto::mvccpb::event::EventType;
use common::{TestCell, TestEnv, channel, etcdctl, get, put};
use tonic::transport::Channel;

async fn lease_client(addr: std::net::SocketAddr) -> LeaseClient<Channel> {
    LeaseClient::new(channel(addr).await.expect("connect"))
}

fn put_with_lease(k: &str, lease: i64) -> PutRequest {
    PutRequest {
        lease,
        ..put(k, "v")
    }
}

async fn keep_alive_once(c: &mut LeaseClient<Channel>, id: i64) -> i64 {
    keep_alive_as(c, None, id).await
}

/// A request as a router passes it on for `tenant` (`None`: an operator's).
fn as_tenant<T>(tenant: Option<&str>, inner: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(inner);
    if let Some(t) = tenant {
        r.metadata_mut()
            .insert("cellplane-tenant", t.parse().unwrap());
    }
    r
}

async fn keep_alive_as(c: &mut LeaseClient<Channel>, tenant: Option<&str>, id: i64) -> i64 {
    let mut s = c
        .lease_keep_alive(as_tenant(
            tenant,
            tokio_stream::once(LeaseKeepAliveRequest { id }),
        ))
        .await
        .expect("keep-alive")
        .into_inner();
    s.message()
        .await
        .expect("keep-alive answer")
        .expect("one answer")
        .ttl
}

/// A watch on `prefix` from the next revision; returns the response stream.
async fn watch_prefix(addr: std::net::SocketAddr, prefix: &str) -> tonic::Streaming<WatchResponse> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: prefix.into(),
                range_end: end,
                ..Default::default()
            },
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create).await.unwrap();
    // Keep the request side open for the life of the test.
    std::mem::forget(tx);
    let mut s = WatchClient::new(channel(addr).await.unwrap())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let created = s.message().await.unwrap().unwrap();
    assert!(created.created);
    s
}

/// Waits for the next response with delete events and returns (type, key) of
/// each of its events.
async fn next_events(s: &mut tonic::Streaming<WatchResponse>) -> Vec<(i32, String)> {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(60), s.message())
            .await
            .expect("an event within a minute")
            .unwrap()
            .unwrap();
        if r.events
            .iter()
            .any(|e| e.r#type == EventType::Delete as i32)
        {
            return r
                .events
                .iter()
                .map(|e| {
                    let kv = e.kv.as_ref().unwrap();
                    (e.r#type, String::from_utf8_lossy(&kv.key).into_owned())
                })
                .collect();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_attach_keep_alive_time_to_live_and_revoke_through_a_follower() {
    let cell = TestCell::start(3);
    let leader = cell.leader(Duration::from_secs(30)).await;
    let follower = cell.members.iter().find(|m| m.id != leader).unwrap();
    let mut lc = lease_client(follower.client).await;
    let mut kv = cell.kv(follower.id).await;

    let g = lc
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(g.id > 0);
    assert_eq!(g.ttl, 60);
    assert!(g.header.unwrap().revision >= 0);

    kv.put(put_with_lease("/l/a", g.id)).await.unwrap();
    kv.put(put_with_lease("/l/b", g.id)).await.unwrap();
    let r = kv.range(get("/l/a")).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].lease, g.id);

    let ttl = lc
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: g.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 60);
    assert!(ttl.ttl > 0 && ttl.ttl <= 60, "{}", ttl.ttl);
    assert_eq!(ttl.keys, vec![b"/l/a".to_vec(), b"/l/b".to_vec()]);

    assert_eq!(keep_alive_once(&mut lc, g.id).await, 60);
    let listed = lc
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.leases.iter().any(|l| l.id == g.id));

    // A client-chosen ID, and the errors etcd gives.
    let mine = lc
        .lease_grant(LeaseGrantRequest { ttl: 30, id: 4242 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.id, 4242);
    let dup = lc
        .lease_grant(LeaseGrantRequest { ttl: 30, id: 4242 })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::FailedPrecondition);
    assert_eq!(dup.message(), "etcdserver: lease already exists");
    let too_big = lc
        .lease_grant(LeaseGrantRequest {
            ttl: 9_000_000_001,
            id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.message(), "etcdserver: too large lease TTL");
    let no_lease = kv.put(put_with_lease("/l/x", 999)).await.unwrap_err();
    assert_eq!(no_lease.message(), "etcdserver: requested lease not found");

    // Revoke deletes the keys, as delete events at one revision.
    let mut w = watch_prefix(follower.client, "/l/").await;
    lc.lease_revoke(LeaseRevokeRequest { id: g.id })
        .await
        .unwrap();
    let events = next_events(&mut w).await;
    assert_eq!(
        events,
        vec![
            (EventType::Delete as i32, "/l/a".to_string()),
            (EventType::Delete as i32, "/l/b".to_string())
        ]
    );
    assert!(
        kv.range(get("/l/a"))
            .await
            .unwrap()
            .into_inner()
            .kvs
            .is_empty()
    );
    let gone = lc
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: g.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.ttl, -1, "etcd: an unknown lease has TTL -1");
    assert_eq!(keep_alive_once(&mut lc, g.id).await, 0);
    let again = lc
        .lease_revoke(LeaseRevokeRequest { id: g.id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_deletes_its_keys_and_a_kept_alive_one_survives_a_leader_kill() {
    let mut cell = TestCell::start(3);
    let leader = cell.leader(Duration::from_secs(30)).await;
    let mut lc = lease_client(cell.member(leader).client).await;
    let mut kv = cell.kv(leader).await;

    // The shortest TTL is raised to outlive an election (about 2 s here).
    let short = lc
        .lease_grant(LeaseGrantRequest { ttl: 1, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(short.ttl >= 2, "minimum TTL applied: {}", short.ttl);
    let long = lc
        .lease_grant(LeaseGrantRequest { ttl: 15, id: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut w = watch_prefix(cell.member(leader).client, "/exp/").await;
    kv.put(put_with_lease("/exp/short", short.id))
        .await
        .unwrap();
    kv.put(put_with_lease("/exp/long", long.id)).await.unwrap();

    // Nobody keeps `short` alive: the leader revokes it through Raft.
    let events = next_events(&mut w).await;
    assert_eq!(
        events,
        vec![(EventType::Delete as i32, "/exp/short".into())]
    );

    // `long` is kept alive across the death of the leader: the new leader loads it
    // with a full TTL and renews it.
    cell.kill(leader);
    let new_leader = cell.new_leader(leader, Duration::from_secs(60)).await;
    let mut lc = lease_client(cell.member(new_leader).client).await;
    let mut kv = cell.kv(new_leader).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lc
            .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id: long.id }))
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                match s.message().await {
                    Ok(Some(r)) => {
                        assert_eq!(r.ttl, 15, "renewed for the granted TTL");
                        break;
                    }
                    // The new leader is still loading its leases: retry, as clients do.
                    other => assert!(Instant::now() < deadline, "{other:?}"),
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = kv.range(get("/exp/long")).await.unwrap().into_inner();
    assert_eq!(r.kvs.len(), 1, "the kept-alive lease's key survived");
    let ttl = lc
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: long.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.keys, vec![b"/exp/long".to_vec()]);

    // Left alone, it expires on the new leader too.
    let mut w = watch_prefix(cell.member(new_leader).client, "/exp/").await;
    let events = next_events(&mut w).await;
    assert_eq!(events, vec![(EventType::Delete as i32, "/exp/long".into())]);
}

/// `etcdctl lease` output: "lease 694d77aa9e38260f granted with TTL(60s)".
fn granted_id(out: &str) -> String {
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected etcdctl output: {out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands_work_against_a_cell() {
    let cell = TestCell::start(3);
    cell.leader(Duration::from_secs(30)).await;
    let eps = cell.all_endpoints().join(",");

    let (ok, out) = etcdctl(&eps, &["lease", "grant", "60"], None);
    assert!(ok && out.contains("granted with TTL(60s)"), "{out}");
    let id = granted_id(&out);
    let (ok, out) = etcdctl(&eps, &["put", "--lease", &id, "/ctl/k", "v"], None);
    assert!(ok && out.trim() == "OK", "{out}");
    let (ok, out) = etcdctl(&eps, &["lease", "keep-alive", "--once", &id], None);
    assert!(
        ok && out.contains(&format!("lease {id} keepalived with TTL(60)")),
        "{out}"
    );
    let (ok, out) = etcdctl(&eps, &["lease", "timetolive", "--keys", &id], None);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("lease {id} granted with TTL(60s)"))
            && out.contains("attached keys([/ctl/k])"),
        "{out}"
    );
    let (ok, out) = etcdctl(&eps, &["lease", "list"], None);
    assert!(ok && out.contains(&id), "{out}");
    let (ok, out) = etcdctl(&eps, &["lease", "revoke", &id], None);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, out) = etcdctl(&eps, &["get", "/ctl/k"], None);
    assert!(
        ok && out.trim().is_empty(),
        "the key went with its lease: {out}"
    );
    let (ok, out) = etcdctl(&eps, &["lease", "timetolive", &id], None);
    assert!(ok && out.contains("already expired"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_the_router_live_in_the_tenants_cell() {
    let mut env = TestEnv::start(&["alpha", "beta"], 1);
    env.start_router();
    let router = env.router_client.to_string();

    // etcdctl cannot send metadata: a grant through the router says what to do.
    let (ok, out) = etcdctl(&router, &["lease", "grant", "60"], None);
    assert!(!ok && out.contains("cellplane-tenant"), "{out}");

    // Our CLI names the tenant; the lease lives in beta (tenant b's cell).
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = cli(&[
        "lease",
        "--endpoints",
        &router,
        "--tenant",
        "b",
        "grant",
        "60",
    ]);
    assert!(ok && out.contains("granted with TTL(60s)"), "{out}");
    let id = granted_id(&out);

    // Every other call finds the cell from the ID alone, so etcdctl works.
    let (ok, out) = etcdctl(&router, &["put", "--lease", &id, "/b/svc", "up"], None);
    assert!(ok && out.trim() == "OK", "{out}");
    let (ok, out) = etcdctl(&router, &["lease", "keep-alive", "--once", &id], None);
    assert!(ok && out.contains("keepalived with TTL(60)"), "{out}");
    let (ok, out) = etcdctl(&router, &["lease", "timetolive", "--keys", &id], None);
    assert!(ok && out.contains("attached keys([/b/svc])"), "{out}");
    let beta = env.cells[1].members[0].client;
    let mut lc = lease_client(beta).await;
    let numeric = i64::from_str_radix(&id, 16).unwrap();
    let on_beta = lc
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: numeric,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_beta.granted_ttl, 60, "the lease is in beta");
    let alpha = env.cells[0].members[0].client;
    let on_alpha = lease_client(alpha)
        .await
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: numeric,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_alpha.ttl, -1, "and not in alpha");

    // A key of tenant a cannot use beta's lease.
    let (ok, out) = etcdctl(&router, &["put", "--lease", &id, "/a/svc", "up"], None);
    assert!(!ok && out.contains("requested lease not found"), "{out}");

    let (ok, out) = cli(&["lease", "--endpoints", &router, "list"]);
    assert!(ok && out.contains(&id), "{out}");
    let (ok, out) = cli(&["kv", "--endpoints", &router, "get", "/b/svc"]);
    assert!(ok && out.contains("up"), "{out}");
    let (ok, out) = etcdctl(&router, &["lease", "revoke", &id], None);
    assert!(ok, "{out}");
    let (ok, out) = etcdctl(&router, &["get", "/b/svc"], None);
    assert!(ok && out.trim().is_empty(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_lease_answers_only_to_that_tenant_through_a_follower() {
    let cell = TestCell::start(3);
    let leader = cell.leader(Duration::from_secs(30)).await;
    let follower = cell.members.iter().find(|m| m.id != leader).unwrap();
    let mut lc = lease_client(follower.client).await;
    let mut kv = cell.kv(follower.id).await;
    let (a, b) = (Some("a"), Some("b"));

    let grant = |tenant| as_tenant(tenant, LeaseGrantRequest { ttl: 60, id: 0 });
    let la = lc.lease_grant(grant(a)).await.unwrap().into_inner().id;
    let lb = lc.lease_grant(grant(b)).await.unwrap().into_inner().id;
    kv.put(put_with_lease("/a/k", la)).await.unwrap();
    let ttl = |tenant, id| as_tenant(tenant, LeaseTimeToLiveRequest { id, keys: true });
    let list = |tenant| as_tenant(tenant, LeaseLeasesRequest {});
    let ids = |r: cellplane_proto::etcdserverpb::LeaseLeasesResponse| {
        let mut v: Vec<i64> = r.leases.iter().map(|l| l.id).collect();
        v.sort();
        v
    };

    // Tenant b sees a's lease as one that does not exist, and changes nothing.
    let e = lc
        .lease_revoke(as_tenant(b, LeaseRevokeRequest { id: la }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "etcdserver: requested lease not found");
    assert_eq!(keep_alive_as(&mut lc, b, la).await, 0);
    let t = lc
        .lease_time_to_live(ttl(b, la))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.ttl, t.granted_ttl), (-1, 0));
    assert!(t.keys.is_empty(), "b saw a's keys: {:?}", t.keys);
    let listed = ids(lc.lease_leases(list(b)).await.unwrap().into_inner());
    assert_eq!(listed, vec![lb]);

    // Tenant a sees its own lease, and only it.
    let t = lc
        .lease_time_to_live(ttl(a, la))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.granted_ttl, 60);
    assert_eq!(t.keys, vec![b"/a/k".to_vec()]);
    assert_eq!(keep_alive_as(&mut lc, a, la).await, 60);
    let listed = ids(lc.lease_leases(list(a)).await.unwrap().into_inner());
    assert_eq!(listed, vec![la]);
    let t = lc
        .lease_time_to_live(ttl(a, lb))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.ttl, -1);

    // An operator (no metadata) sees every lease.
    let mut both = [la, lb];
    both.sort();
    let listed = ids(lc.lease_leases(list(None)).await.unwrap().into_inner());
    assert!(both.iter().all(|id| listed.contains(id)), "{listed:?}");
    let t = lc
        .lease_time_to_live(ttl(None, la))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.granted_ttl, 60);

    // a's lease holds only a's keys, on every write path.
    let e = kv.put(put_with_lease("/b/x", la)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(e.message(), "etcdserver: permission denied");
    let txn = TxnRequest {
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put_with_lease("/a/t", la))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(put_with_lease("/ax", la))),
            },
        ],
        ..Default::default()
    };
    let e = kv.txn(txn).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    for k in ["/b/x", "/a/t", "/ax"] {
        let r = kv.range(get(k)).await.unwrap().into_inner();
        assert!(r.kvs.is_empty(), "{k} written");
    }

    // Malformed metadata is refused, not taken for an operator's call.
    let e = lc.lease_leases(list(Some("_x"))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The owner revokes its lease, and its key goes with it.
    lc.lease_revoke(as_tenant(a, LeaseRevokeRequest { id: la }))
        .await
        .unwrap();
    assert!(
        kv.range(get("/a/k"))
            .await
            .unwrap()
            .into_inner()
            .kvs
            .is_empty()
    );
    assert_eq!(keep_alive_as(&mut lc, a, la).await, 0);
    // An operator may revoke any lease.
    lc.lease_revoke(as_tenant(None, LeaseRevokeRequest { id: lb }))
        .await
        .unwrap();
    let listed = ids(lc.lease_leases(list(b)).await.unwrap().into_inner());
    assert!(listed.is_empty(), "{listed:?}");
}
