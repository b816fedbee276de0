//! Service discovery on real cells: TTL health from leases (register → resolve →
//! heartbeats stop → unhealthy → removed), active HTTP and TCP checks, a service
//! watch that sees every change in order, the checker following the leader, the
//! router routing by namespace, and the `cellplane svc` command.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::discovery::{
    ChangeKind, Check, DeregisterRequest, Health, HeartbeatRequest, HttpCheck, Instance,
    RegisterRequest, RegisterResponse, ResolveRequest, TcpCheck, WatchRequest, WatchResponse,
    check,
};
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, RangeRequest,
    WatchCreateRequest, watch_request,
};
use common::{TestCell, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(60);

async fn disc(addr: SocketAddr) -> DiscoveryClient<Channel> {
    DiscoveryClient::new(common::channel(addr).await.expect("connect"))
}

fn instance(ns: &str, svc: &str, id: &str, check: Check) -> Instance {
    Instance {
        namespace: ns.into(),
        service: svc.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        tags: vec!["v1".into()],
        metadata: [("zone".to_string(), "z1".to_string())].into(),
        check: Some(check),
        ..Default::default()
    }
}

fn ttl(ttl_seconds: i64, deregister_after_seconds: i64) -> Check {
    Check {
        ttl_seconds,
        deregister_after_seconds,
        ..Default::default()
    }
}

fn http_check(url: &str, deregister_after_seconds: i64) -> Check {
    Check {
        active: Some(check::Active::Http(HttpCheck { url: url.into() })),
        interval_ms: 200,
        timeout_ms: 1000,
        deregister_after_seconds,
        ..Default::default()
    }
}

async fn register(c: &mut DiscoveryClient<Channel>, i: Instance) -> RegisterResponse {
    c.register(RegisterRequest {
        instance: Some(i),
        lease_id: 0,
    })
    .await
    .expect("register")
    .into_inner()
}

async fn resolve(c: &mut DiscoveryClient<Channel>, ns: &str, svc: &str) -> Vec<Instance> {
    c.resolve(ResolveRequest {
        namespace: ns.into(),
        service: svc.into(),
        ..Default::default()
    })
    .await
    .expect("resolve")
    .into_inner()
    .instances
}

/// The instance `id` as resolved now (None: not registered).
async fn lookup(
    c: &mut DiscoveryClient<Channel>,
    ns: &str,
    svc: &str,
    id: &str,
) -> Option<Instance> {
    resolve(c, ns, svc).await.into_iter().find(|i| i.id == id)
}

/// Polls until `id`'s state satisfies `ok` (None: absent), or panics after the deadline.
async fn wait_until(
    c: &mut DiscoveryClient<Channel>,
    (ns, svc, id): (&str, &str, &str),
    what: &str,
    ok: impl Fn(Option<&Instance>) -> bool,
) -> Option<Instance> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = lookup(c, ns, svc, id).await;
        if ok(now.as_ref()) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {what}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn health(i: Option<&Instance>) -> Option<Health> {
    i.map(|i| Health::try_from(i.health).unwrap())
}

/// An HTTP server answering every request with the status in `code`.
async fn http_server(code: Arc<AtomicU16>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let code = code.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok");
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_instance_turns_unhealthy_without_heartbeats_then_is_removed() {
    let cell = TestCell::start(3);
    let mut c = disc(cell.member(2).client).await;
    let key = ("a", "web", "web-1");

    let r = register(&mut c, instance("a", "web", "web-1", ttl(2, 3))).await;
    assert_ne!(r.lease_id, 0, "a TTL instance gets a lease");
    assert!(
        r.lease_ttl_seconds >= 5,
        "ttl + deregister_after: {}",
        r.lease_ttl_seconds
    );
    let i = r.instance.unwrap();
    assert_eq!(Health::try_from(i.health).unwrap(), Health::Healthy);
    assert!(i.lease_owned && i.mod_revision > 0);

    let got = resolve(&mut c, "a", "web").await;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].address.as_str(), got[0].port), ("127.0.0.1", 8080));
    assert_eq!(got[0].tags, vec!["v1"]);
    assert_eq!(got[0].metadata.get("zone").map(String::as_str), Some("z1"));
    // Another member answers the same (any member serves discovery).
    let mut other = disc(cell.member(3).client).await;
    assert_eq!(resolve(&mut other, "a", "web").await, got);

    // No heartbeats: UNHEALTHY once the TTL has passed, and no longer resolved
    // by healthy-only lookups.
    let sick = wait_until(&mut c, key, "unhealthy", |i| {
        health(i) == Some(Health::Unhealthy)
    })
    .await
    .unwrap();
    assert!(
        sick.health_reason.contains("heartbeat"),
        "{}",
        sick.health_reason
    );
    assert!(sick.unhealthy_since_unix_ms > 0);
    let healthy_only = c
        .resolve(ResolveRequest {
            namespace: "a".into(),
            service: "web".into(),
            healthy_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(healthy_only.instances.is_empty());

    // A heartbeat brings it back.
    let hb = c
        .heartbeat(HeartbeatRequest {
            namespace: "a".into(),
            service: "web".into(),
            id: "web-1".into(),
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.lease_ttl_seconds > 0);
    let well = wait_until(&mut c, key, "healthy again", |i| {
        health(i) == Some(Health::Healthy)
    })
    .await
    .unwrap();
    assert_eq!(
        (well.unhealthy_since_unix_ms, well.health_reason.as_str()),
        (0, "")
    );

    // Silence again: unhealthy, then the lease expires and the instance is gone.
    wait_until(&mut c, key, "unhealthy", |i| {
        health(i) == Some(Health::Unhealthy)
    })
    .await;
    wait_until(&mut c, key, "removed", |i| i.is_none()).await;
    let e = c
        .heartbeat(HeartbeatRequest {
            namespace: "a".into(),
            service: "web".into(),
            id: "web-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("register it again"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_flip_health_and_write_only_on_change() {
    let cell = TestCell::start(3);
    let mut c = disc(cell.member(1).client).await;
    let code = Arc::new(AtomicU16::new(200));
    let server = http_server(code.clone()).await;
    let url = format!("http://{server}/health");
    let key = ("a", "api", "api-1");

    let r = register(&mut c, instance("a", "api", "api-1", http_check(&url, 600))).await;
    assert_eq!(r.lease_id, 0, "an active check needs no lease");
    let i = r.instance.unwrap();
    assert_eq!(
        Health::try_from(i.health).unwrap(),
        Health::Unknown,
        "until the first check"
    );
    let well = wait_until(&mut c, key, "healthy", |i| {
        health(i) == Some(Health::Healthy)
    })
    .await
    .unwrap();

    // Checks every 200 ms write nothing while nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = lookup(&mut c, "a", "api", "api-1").await.unwrap();
    assert_eq!(
        still.mod_revision, well.mod_revision,
        "a check that changes nothing writes nothing"
    );

    code.store(500, Ordering::Relaxed);
    let sick = wait_until(&mut c, key, "unhealthy", |i| {
        health(i) == Some(Health::Unhealthy)
    })
    .await
    .unwrap();
    assert!(
        sick.health_reason.contains("HTTP 500"),
        "{}",
        sick.health_reason
    );
    code.store(204, Ordering::Relaxed);
    wait_until(&mut c, key, "healthy again", |i| {
        health(i) == Some(Health::Healthy)
    })
    .await;

    // A TCP check against a closed port, removed once unhealthy for 2 s.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let doomed = Check {
        active: Some(check::Active::Tcp(TcpCheck {
            address: closed.to_string(),
        })),
        interval_ms: 200,
        timeout_ms: 500,
        deregister_after_seconds: 2,
        ..Default::default()
    };
    register(&mut c, instance("a", "api", "api-2", doomed)).await;
    let sick = wait_until(&mut c, ("a", "api", "api-2"), "unhealthy", |i| {
        health(i) == Some(Health::Unhealthy)
    })
    .await
    .unwrap();
    assert!(
        sick.health_reason.contains("TCP connect"),
        "{}",
        sick.health_reason
    );
    wait_until(&mut c, ("a", "api", "api-2"), "removed", |i| i.is_none()).await;
    // The healthy one stays.
    assert!(lookup(&mut c, "a", "api", "api-1").await.is_some());

    c.deregister(DeregisterRequest {
        namespace: "a".into(),
        service: "api".into(),
        id: "api-1".into(),
    })
    .await
    .expect("deregister");
    assert!(resolve(&mut c, "a", "api").await.is_empty());
    let e = c
        .deregister(DeregisterRequest {
            namespace: "a".into(),
            service: "api".into(),
            id: "api-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// Next snapshot of a discovery watch.
async fn next(w: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(DEADLINE, w.message())
        .await
        .expect("a snapshot in time")
        .expect("stream ok")
        .expect("stream open")
}

/// (kind, id, health) of a change.
type Seen = (ChangeKind, String, Health);

fn seen(r: &WatchResponse) -> Vec<Seen> {
    r.changes
        .iter()
        .map(|c| {
            let i = c.instance.as_ref().unwrap();
            (
                ChangeKind::try_from(c.kind).unwrap(),
                i.id.clone(),
                Health::try_from(i.health).unwrap(),
            )
        })
        .collect()
}

/// The revisions that changed keys under `prefix` after `from`, up to `to`, as the
/// cell's own etcd watch replays them.
async fn revisions_between(addr: SocketAddr, prefix: &[u8], from: i64, to: i64) -> Vec<i64> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut end = prefix.to_vec();
    *end.last_mut().unwrap() += 1;
    tx.send(cellplane_proto::etcdserverpb::WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: prefix.to_vec(),
                range_end: end,
                start_revision: from + 1,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut s = WatchClient::new(common::channel(addr).await.unwrap())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut revs: Vec<i64> = Vec::new();
    while revs.last().is_none_or(|r| *r < to) {
        let r = tokio::time::timeout(DEADLINE, s.message())
            .await
            .expect("history in time")
            .unwrap()
            .unwrap();
        for e in r.events {
            let rev = e.kv.unwrap().mod_revision;
            if revs.last() != Some(&rev) {
                revs.push(rev);
            }
        }
    }
    drop(tx);
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_watch_sees_every_change_in_order() {
    let cell = TestCell::start(3);
    let addr = cell.member(3).client;
    let mut c = disc(addr).await;
    let mut w = c
        .watch(WatchRequest {
            namespace: "a".into(),
            service: "web".into(),
            start_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut w).await;
    assert!(first.instances.is_empty() && first.changes.is_empty());
    let start = first.revision;

    // A TTL instance that never heartbeats, then an HTTP-checked one that flips,
    // then a deregistration.
    register(&mut c, instance("a", "web", "w1", ttl(1, 2))).await;
    let code = Arc::new(AtomicU16::new(200));
    let url = format!("http://{}/", http_server(code.clone()).await);
    let mut log: Vec<WatchResponse> = Vec::new();
    let mut wait_for = async |log: &mut Vec<WatchResponse>, want: Seen| {
        loop {
            let r = next(&mut w).await;
            let hit = seen(&r).contains(&want);
            log.push(r);
            if hit {
                return;
            }
        }
    };
    wait_for(
        &mut log,
        (ChangeKind::ChangeAdded, "w1".into(), Health::Healthy),
    )
    .await;
    wait_for(
        &mut log,
        (ChangeKind::ChangeUpdated, "w1".into(), Health::Unhealthy),
    )
    .await;
    wait_for(
        &mut log,
        (ChangeKind::ChangeRemoved, "w1".into(), Health::Unhealthy),
    )
    .await;
    register(&mut c, instance("a", "web", "w2", http_check(&url, 600))).await;
    wait_for(
        &mut log,
        (ChangeKind::ChangeAdded, "w2".into(), Health::Unknown),
    )
    .await;
    wait_for(
        &mut log,
        (ChangeKind::ChangeUpdated, "w2".into(), Health::Healthy),
    )
    .await;
    code.store(503, Ordering::Relaxed);
    wait_for(
        &mut log,
        (ChangeKind::ChangeUpdated, "w2".into(), Health::Unhealthy),
    )
    .await;
    c.deregister(DeregisterRequest {
        namespace: "a".into(),
        service: "web".into(),
        id: "w2".into(),
    })
    .await
    .unwrap();
    wait_for(
        &mut log,
        (ChangeKind::ChangeRemoved, "w2".into(), Health::Unhealthy),
    )
    .await;

    // Exactly one snapshot per revision that touched the service, in order, each
    // consistent with the one before and its changes.
    let last = log.last().unwrap().revision;
    let prefix = b"/_cellplane/discovery/a/web/";
    let truth = revisions_between(addr, prefix, start, last).await;
    let got: Vec<i64> = log.iter().map(|r| r.revision).collect();
    assert_eq!(got, truth, "one snapshot per revision");
    let mut state: std::collections::BTreeMap<String, Instance> = Default::default();
    for r in &log {
        for ch in &r.changes {
            let i = ch.instance.clone().unwrap();
            if ch.kind == ChangeKind::ChangeRemoved as i32 {
                assert!(state.remove(&i.id).is_some(), "removed what was there");
            } else {
                state.insert(i.id.clone(), i);
            }
        }
        let ids: Vec<&String> = r.instances.iter().map(|i| &i.id).collect();
        assert_eq!(
            ids,
            state.keys().collect::<Vec<_>>(),
            "at revision {}",
            r.revision
        );
        assert_eq!(r.instances, state.values().cloned().collect::<Vec<_>>());
    }
    assert!(state.is_empty());

    // Resuming from a past revision replays the state at that revision.
    let mid = log[0].revision;
    let mut again = c
        .watch(WatchRequest {
            namespace: "a".into(),
            service: "web".into(),
            start_revision: mid,
        })
        .await
        .unwrap()
        .into_inner();
    let replay = next(&mut again).await;
    assert_eq!(
        (replay.revision, &replay.instances),
        (mid, &log[0].instances)
    );
    assert_eq!(next(&mut again).await, log[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_follows_the_leader() {
    let mut cell = TestCell::start(3);
    let leader = cell.leader(DEADLINE).await;
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    let mut c = disc(cell.member(survivor).client).await;
    register(&mut c, instance("a", "svc", "s1", ttl(1, 3))).await;
    cell.kill(leader);
    let key = ("a", "svc", "s1");
    let mut c = disc(cell.member(survivor).client).await;
    // The new leader's checker marks it and the lease's expiry removes it.
    let deadline = Instant::now() + DEADLINE;
    let mut was_unhealthy = false;
    loop {
        match c
            .resolve(ResolveRequest {
                namespace: "a".into(),
                service: "svc".into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => match r.into_inner().instances.first() {
                Some(i) => was_unhealthy |= i.health == Health::Unhealthy as i32,
                None => break,
            },
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
        assert!(Instant::now() < deadline, "{key:?} never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(was_unhealthy, "marked unhealthy before removal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_existing_leases_bind_instances() {
    let cell = TestCell::start(3);
    let addr = cell.member(1).client;
    let mut c = disc(addr).await;
    let refuse = async |c: &mut DiscoveryClient<Channel>, i: Instance, lease_id: i64| {
        c.register(RegisterRequest {
            instance: Some(i),
            lease_id,
        })
        .await
        .unwrap_err()
    };
    let e = refuse(&mut c, instance("a", "", "x", ttl(5, 5)), 0).await;
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "service: is required")
    );
    let mut bad_port = instance("a", "web", "x", ttl(5, 5));
    bad_port.port = 0;
    let e = refuse(&mut c, bad_port, 0).await;
    assert!(e.message().starts_with("port:"), "{}", e.message());
    let e = refuse(&mut c, instance("a", "web", "x", ttl(0, 0)), 0).await;
    assert!(e.message().contains("needs a TTL"), "{}", e.message());
    let e = refuse(&mut c, instance("a/b", "web", "x", ttl(5, 5)), 0).await;
    assert!(e.message().starts_with("namespace:"), "{}", e.message());
    let unknown_kind = Check {
        interval_ms: 1000,
        ..Default::default()
    };
    let e = refuse(&mut c, instance("a", "web", "x", unknown_kind), 0).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = refuse(&mut c, instance("a", "web", "x", Check::default()), 0x7777).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .resolve(ResolveRequest {
            namespace: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // An instance on an existing lease lives and dies with it.
    let mut leases = LeaseClient::new(common::channel(addr).await.unwrap());
    let lease = leases
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let r = c
        .register(RegisterRequest {
            instance: Some(instance("a", "db", "db-1", Check::default())),
            lease_id: lease,
        })
        .await
        .expect("register on a lease")
        .into_inner();
    assert_eq!(r.lease_id, lease);
    let i = r.instance.unwrap();
    assert!(!i.lease_owned);
    assert_eq!(Health::try_from(i.health).unwrap(), Health::Healthy);
    leases
        .lease_revoke(LeaseRevokeRequest { id: lease })
        .await
        .unwrap();
    assert!(resolve(&mut c, "a", "db").await.is_empty());

    // Instances are plain keys under the documented prefix.
    register(&mut c, instance("a", "web", "w1", ttl(30, 30))).await;
    let kv = common::kv(addr)
        .await
        .unwrap()
        .range(RangeRequest {
            key: b"/_cellplane/discovery/a/web/w1".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kv.kvs.len(), 1);
    let first_lease = kv.kvs[0].lease;
    assert_ne!(first_lease, 0);

    // Registering the same id again replaces the instance: it moves to a new
    // lease, and the lease of the one it replaced is revoked without taking the
    // key with it.
    let again = register(&mut c, instance("a", "web", "w1", ttl(30, 30))).await;
    assert_ne!(again.lease_id, first_lease);
    let got = resolve(&mut c, "a", "web").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].lease_id, again.lease_id);
    let old = leases
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: first_lease,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.ttl, -1, "the replaced instance's lease is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_routes_discovery_by_namespace() {
    let mut env = TestEnv::start(&["alpha", "beta", "gamma"], 1);
    env.start_router();
    let mut r = disc(env.router_client).await;

    for (ns, cell) in [("a", 0usize), ("b", 1)] {
        let resp = r
            .register(RegisterRequest {
                instance: Some(instance(ns, "web", "w1", ttl(30, 30))),
                lease_id: 0,
            })
            .await
            .expect("register through the router");
        let served_by = resp
            .metadata()
            .get("cellplane-cell")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(served_by, env.cells[cell].def_name());
        let key = format!("/_cellplane/discovery/{ns}/web/w1");
        for (j, c) in env.cells.iter().enumerate() {
            let got = common::kv(c.members[0].client)
                .await
                .unwrap()
                .range(RangeRequest {
                    key: key.clone().into_bytes(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(got.kvs.len(), usize::from(j == cell), "{key} in cell {j}");
        }
        let got = resolve(&mut r, ns, "web").await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].namespace, ns);
    }

    // A watch through the router sees the cell's changes.
    let mut w = r
        .watch(WatchRequest {
            namespace: "a".into(),
            service: "web".into(),
            start_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut w).await.instances.len(), 1);
    r.heartbeat(HeartbeatRequest {
        namespace: "a".into(),
        service: "web".into(),
        id: "w1".into(),
    })
    .await
    .expect("heartbeat through the router");
    r.deregister(DeregisterRequest {
        namespace: "a".into(),
        service: "web".into(),
        id: "w1".into(),
    })
    .await
    .unwrap();
    let gone = next(&mut w).await;
    assert!(gone.instances.is_empty());
    assert_eq!(seen(&gone)[0].0, ChangeKind::ChangeRemoved);

    let e = r
        .resolve(ResolveRequest {
            namespace: String::new(),
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("namespace"), "{}", e.message());
}

fn svc(endpoint: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(common::bin())
        .args([
            "svc",
            "--endpoints",
            &endpoint.to_string(),
            "--namespace",
            "a",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn listed(endpoint: SocketAddr, service: &str) -> serde_json::Value {
    let (code, out) = svc(endpoint, &["list", "--service", service, "--json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_svc_command() {
    let cell = TestCell::start(3);
    let ep = cell.member(1).client;
    let reg = [
        "register",
        "--service",
        "web",
        "--id",
        "w1",
        "--address",
        "127.0.0.1",
        "--port",
        "8080",
        "--tag",
        "v1",
        "--meta",
        "zone=z1",
        "--ttl",
        "30s",
    ];
    let (code, out) = svc(ep, &reg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("registered w1"), "{out}");
    let l = listed(ep, "web");
    assert_eq!(l["instances"][0]["id"], "w1");
    assert_eq!(l["instances"][0]["health"], "healthy");
    assert_eq!(l["instances"][0]["metadata"]["zone"], "z1");
    let (code, out) = svc(ep, &["list", "--service", "web", "--tag", "v2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 instance(s)"), "{out}");

    let (code, out) = svc(ep, &["deregister", "--service", "web", "--id", "w1"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = svc(ep, &["deregister", "--service", "web", "--id", "w1"]);
    assert_ne!(code, 0);
    assert!(out.contains("not registered"), "{out}");
    let (code, out) = svc(
        ep,
        &[
            "register",
            "--service",
            "web",
            "--id",
            "w1",
            "--address",
            "h",
            "--port",
            "0",
            "--ttl",
            "5",
        ],
    );
    assert_ne!(code, 0);
    assert!(out.contains("port:"), "{out}");

    // --heartbeat keeps the instance alive and deregisters it on Ctrl-C.
    let mut child = std::process::Command::new(common::bin())
        .args(["svc", "--endpoints", &ep.to_string(), "--namespace", "a"])
        .args([
            "register",
            "--service",
            "hb",
            "--id",
            "h1",
            "--address",
            "127.0.0.1",
            "--port",
            "1",
            "--ttl",
            "1s",
            "--deregister-after",
            "30s",
            "--heartbeat",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while listed(ep, "hb")["instances"][0]["health"] != "healthy" {
        assert!(Instant::now() < deadline, "never listed healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(listed(ep, "hb")["instances"], serde_json::json!([]));
}
