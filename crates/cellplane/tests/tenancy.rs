//! Tenants are identities: the hostile-tenant suite, through a real router with
//! TLS everywhere and auth on. Every probe from the issue is refused with a clear
//! status, and nothing it aimed at changes.

mod common;

use std::time::Duration;

use cellplane_proto::discovery::discovery_client::DiscoveryClient;
use cellplane_proto::discovery::{Check, Instance, RegisterRequest, ResolveRequest};
use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::lease_client::LeaseClient;
use cellplane_proto::etcdserverpb::watch_client::WatchClient;
use cellplane_proto::etcdserverpb::{
    AuthenticateRequest, CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, request_op,
    watch_request,
};
use cellplane_security::Identity;
use common::{TestEnv, User, channel_with, get, put};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

/// Adds the token (and optionally a tenant header) to every request.
#[derive(Clone)]
struct As {
    token: Option<String>,
    header: Option<&'static str>,
}

impl tonic::service::Interceptor for As {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            r.metadata_mut()
                .insert("token", MetadataValue::try_from(t.as_str()).unwrap());
        }
        if let Some(h) = self.header {
            r.metadata_mut()
                .insert("cellplane-tenant", MetadataValue::from_static(h));
        }
        Ok(r)
    }
}

type Conn = InterceptedService<Channel, As>;

const USERS: &[User] = &[
    User {
        name: "b",
        operator: false,
        password: "b-password",
    },
    User {
        name: "acme",
        operator: false,
        password: "acme-password",
    },
    User {
        name: "ops",
        operator: true,
        password: "ops-password",
    },
];

/// A TLS channel to the router presenting `tls`'s certificate (if any).
async fn router_channel(env: &TestEnv, tls: &ClientTlsConfig) -> Channel {
    channel_with(env.router_client, Some(tls))
        .await
        .expect("connect to the router over TLS")
}

async fn login(env: &TestEnv, name: &str, password: &str) -> String {
    let ch = router_channel(env, &env.pki().anonymous_client()).await;
    cellplane_proto::etcdserverpb::auth_client::AuthClient::new(ch)
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .expect("login")
        .into_inner()
        .token
}

/// A connection acting as a password user (token), with an optional header.
async fn as_user(env: &TestEnv, token: &str, header: Option<&'static str>) -> Conn {
    let ch = router_channel(env, &env.pki().anonymous_client()).await;
    InterceptedService::new(
        ch,
        As {
            token: Some(token.to_string()),
            header,
        },
    )
}

/// A connection proving `id` with a client certificate.
async fn as_cert(env: &TestEnv, id: &Identity, header: Option<&'static str>) -> Conn {
    let ch = router_channel(env, &env.pki().client(id)).await;
    InterceptedService::new(
        ch,
        As {
            token: None,
            header,
        },
    )
}

fn range(key: &[u8], end: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        range_end: end.to_vec(),
        ..Default::default()
    }
}

fn denied(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) -> tonic::Status {
    let e = r.expect_err(&format!("{what}: accepted"));
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    e
}

/// Every key of `cell` (an operator reading the cell directly).
async fn all_keys(env: &TestEnv, cell: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut kv = env.cells[cell].kv(1).await;
    kv.range(range(b"\0", b"\0"))
        .await
        .unwrap()
        .into_inner()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_cannot_reach_past_its_namespace() {
    let mut env = TestEnv::start_secure(&["alpha", "beta"], 1, USERS, 600);
    env.start_router();
    let a = Identity::Tenant("a".into());

    // Tenant a (certificate) and tenant b (password) write their own keys.
    let mut kv_a = KvClient::new(as_cert(&env, &a, None).await);
    kv_a.put(put("/a/secret", "s1")).await.unwrap();
    kv_a.put(put("/a/config", "c1")).await.unwrap();
    let token_b = login(&env, "b", "b-password").await;
    let mut kv_b = KvClient::new(as_user(&env, &token_b, Some("b")).await);
    kv_b.put(put("/b/own", "o")).await.unwrap();
    let alpha_before = all_keys(&env, 0).await;
    let beta_before = all_keys(&env, 1).await;

    // Every key of the cell, the way `cellplane kv --tenant b get "" --prefix` and
    // `etcdctl get "" --prefix` ask; and the same as deletes.
    for (k, e) in [(&b""[..], &b"\0"[..]), (b"\0", b"\0"), (b"", b"")] {
        denied(kv_b.range(range(k, e)).await, "range of every key");
        let del = DeleteRangeRequest {
            key: k.to_vec(),
            range_end: e.to_vec(),
            ..Default::default()
        };
        denied(kv_b.delete_range(del).await, "delete of every key");
    }
    // Keys without the tenant's segment, with b's own header.
    denied(kv_b.put(put("config", "x")).await, "unprefixed key");
    let e = denied(kv_b.range(get("config")).await, "unprefixed get");
    assert!(e.message().contains("\"b\""), "{}", e.message());
    // Another tenant's keys, and range tricks around b's prefix end `/b0`.
    denied(kv_b.range(get("/a/config")).await, "another tenant's key");
    for (k, e) in [
        (&b"/b/"[..], &b"/c"[..]),
        (b"/b/", b"/b0\0"),
        (b"/b", b"/b0"),
        (b"/b/", b"\xff"),
        (b"/a/", b"/a0"),
        (b"b/own", b""),
        (b"/\xff\xfe/x", b""),
        (b"/_cellplane/discovery/", b"/_cellplane/discovery0"),
    ] {
        denied(kv_b.range(range(k, e)).await, &format!("[{k:?}, {e:?})"));
    }
    // Inside the namespace, the prefix end itself is a fine end.
    let own = kv_b
        .range(range(b"/b/", b"/b0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.kvs.len(), 1);
    kv_b.range(range(b"/b/\xff\xff", b"/b0")).await.unwrap();
    // A header may not name another tenant than the token proves.
    let mut kv_b_as_a = KvClient::new(as_user(&env, &token_b, Some("a")).await);
    denied(kv_b_as_a.range(get("/a/config")).await, "header widening");

    // Txns: a compare, an op, a nested op on a's keys.
    let put_op = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: b"pwned".to_vec(),
            ..Default::default()
        })),
    };
    let compare_a = Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key: b"/a/secret".to_vec(),
        target_union: Some(TargetUnion::Value(b"s1".to_vec())),
        range_end: vec![],
    };
    for txn in [
        TxnRequest {
            compare: vec![compare_a.clone()],
            success: vec![put_op("/b/learned")],
            failure: vec![],
        },
        TxnRequest {
            compare: vec![],
            success: vec![put_op("/b/ok"), put_op("/a/secret")],
            failure: vec![],
        },
        TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            DeleteRangeRequest {
                                key: b"/a/".to_vec(),
                                range_end: b"/a0".to_vec(),
                                ..Default::default()
                            },
                        )),
                    }],
                    failure: vec![],
                })),
            }],
            failure: vec![],
        },
    ] {
        denied(kv_b.txn(txn).await, "txn touching a's keys");
    }

    // Watches: a create on a's range is canceled with the reason; b's own works.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut w = WatchClient::new(as_user(&env, &token_b, None).await)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (key, end) in [(&b"/a/"[..], &b"/a0"[..]), (b"/b/", b"/b0")] {
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: key.to_vec(),
                    range_end: end.to_vec(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.created);
        if key == b"/a/" {
            assert!(r.canceled, "a watch on a's keys was created");
            assert!(r.cancel_reason.contains("\"b\""), "{}", r.cancel_reason);
        } else {
            assert!(!r.canceled, "b's own watch: {}", r.cancel_reason);
        }
    }

    // Compaction compacts every tenant of a cell: operators only.
    let compact = CompactionRequest {
        revision: 1,
        physical: false,
    };
    denied(kv_b.compact(compact).await, "a tenant's compaction");
    let token_ops = login(&env, "ops", "ops-password").await;
    let mut ops = tonic::Request::new(compact);
    ops.metadata_mut()
        .insert("cellplane-cell", MetadataValue::from_static("beta"));
    KvClient::new(as_user(&env, &token_ops, None).await)
        .compact(ops)
        .await
        .expect("an operator compacts a cell it names");

    // Nothing changed in either cell.
    assert_eq!(all_keys(&env, 0).await, alpha_before);
    assert_eq!(all_keys(&env, 1).await, beta_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_discovery_and_credentials_belong_to_their_owner() {
    let mut env = TestEnv::start_secure(&["alpha", "beta"], 1, USERS, 600);
    env.start_router();
    // acme and b are pinned nowhere: put both on beta for the lease probes.
    let map = env.static_map(2, &[("acme", "beta")]);
    env.publish_map(&map, 0).await;
    let token_acme = login(&env, "acme", "acme-password").await;
    let token_b = login(&env, "b", "b-password").await;
    let acme = as_user(&env, &token_acme, None).await;
    let b = as_user(&env, &token_b, None).await;

    // `etcdctl lease grant` through the router needs nothing but the login.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let id = loop {
        match LeaseClient::new(acme.clone())
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
        {
            Ok(r) => {
                let meta = r.metadata().get("cellplane-cell").cloned();
                // The map naming acme's cell may take a moment to reach the router.
                if meta.as_ref().is_some_and(|c| c == "beta") {
                    break r.into_inner().id;
                }
            }
            Err(e) => panic!("grant: {e:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "acme never routed to beta"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut kv_acme = KvClient::new(acme.clone());
    kv_acme
        .put(PutRequest {
            key: b"/acme/leased".to_vec(),
            value: b"v".to_vec(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();

    // b cannot see, renew, inspect or revoke acme's lease, nor attach to it.
    let mut lease_b = LeaseClient::new(b.clone());
    let e = lease_b
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let ttl = lease_b
        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ttl.ttl, ttl.keys.len()), (-1, 0));
    let mut ka = lease_b
        .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ka.message().await.unwrap().unwrap().ttl, 0);
    let listed = lease_b
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.leases.iter().all(|l| l.id != id), "{listed:?}");
    let e = KvClient::new(b.clone())
        .put(PutRequest {
            key: b"/b/hijack".to_vec(),
            value: b"v".to_vec(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // acme's lease and key are intact; acme sees and owns its lease.
    let ttl = LeaseClient::new(acme.clone())
        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert!(ttl.ttl > 0);
    assert_eq!(ttl.keys, vec![b"/acme/leased".to_vec()]);
    let mine = LeaseClient::new(acme.clone())
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.leases.iter().map(|l| l.id).collect::<Vec<_>>(), [id]);

    // Discovery: the namespace is the tenant.
    let inst = |ns: &str| Instance {
        namespace: ns.into(),
        service: "web".into(),
        id: "w1".into(),
        address: "127.0.0.1".into(),
        port: 80,
        check: Some(Check {
            ttl_seconds: 30,
            deregister_after_seconds: 60,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut disc_b = DiscoveryClient::new(b.clone());
    let e = disc_b
        .register(RegisterRequest {
            instance: Some(inst("acme")),
            lease_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "forged registration: {e:?}"
    );
    disc_b
        .register(RegisterRequest {
            instance: Some(inst("b")),
            lease_id: 0,
        })
        .await
        .expect("b registers in its own namespace");
    let e = disc_b
        .resolve(ResolveRequest {
            namespace: "acme".into(),
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // discovery's records are nobody's namespace through the KV API.
    for k in ["/_cellplane/discovery/b/web/w1", "/_cellplane/"] {
        let e = KvClient::new(b.clone())
            .put(put(k, "forged"))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
            "{k}: {e:?}"
        );
    }

    // Credentials: nothing proven, a wrong password, a forged or expired token.
    let anon = router_channel(&env, &env.pki().anonymous_client()).await;
    let e = KvClient::new(anon.clone())
        .range(get("/b/x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = cellplane_proto::etcdserverpb::auth_client::AuthClient::new(anon)
        .authenticate(AuthenticateRequest {
            name: "b".into(),
            password: "wrong".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // One character of the MAC changed (not the last: its low bits may be
    // padding, and it may already be the character put there).
    let forged = {
        let mut t = token_b.clone().into_bytes();
        let i = t.len() - 5;
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).unwrap()
    };
    assert_ne!(forged, token_b);
    let keys = cellplane_security::TokenKeys::load(&env.folder.path().join("token.key")).unwrap();
    let mut claims = keys
        .verify(&token_b, 0)
        .expect("the router's token verifies with the environment's key");
    claims.exp = 1;
    let expired = keys.issue(&claims);
    claims.exp = u64::MAX;
    claims.role = cellplane_security::Role::Operator;
    let promoted = keys.issue(&claims);
    for bad in [&forged, &expired, &promoted] {
        let e = KvClient::new(as_user(&env, bad, None).await)
            .range(get("/b/own"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert_eq!(e.message(), "etcdserver: invalid auth token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_and_the_directory_admit_only_their_callers() {
    let mut env = TestEnv::start_secure(&["alpha"], 3, USERS, 600);
    env.start_router();
    let pki = env.pki();
    let member = env.cells[0].member(1);

    // A tenant's certificate on a member's client port.
    let ch = channel_with(
        member.client,
        Some(&pki.client(&Identity::Tenant("a".into()))),
    )
    .await
    .unwrap();
    let e = denied(
        KvClient::new(ch).range(get("/a/x")).await,
        "a tenant on a member",
    );
    assert!(e.message().contains("router"), "{}", e.message());
    // No certificate at all: the handshake itself fails.
    let no_cert = channel_with(member.client, Some(&pki.anonymous_client())).await;
    if let Ok(ch) = no_cert {
        let e = KvClient::new(ch).range(get("/a/x")).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok);
    }

    // etcdctl with an operator's certificate works against a member directly.
    let (cert, key) = pki.issue("operator-o", &Identity::Operator("o".into()));
    let args = [
        format!("--cacert={}", pki.ca_path().display()),
        format!("--cert={}", cert.display()),
        format!("--key={}", key.display()),
        "endpoint".to_string(),
        "status".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = common::etcdctl(&format!("https://{}", member.client), &args, None);
    assert!(ok, "etcdctl endpoint status over TLS: {out}");

    // The peer port: only the cell's own members speak Raft.
    for (who, id) in [
        ("an operator", Identity::Operator("o".into())),
        ("a router", Identity::Router(1)),
        (
            "another cell's member",
            Identity::Member {
                cell: "beta".into(),
                id: 1,
            },
        ),
    ] {
        let ch = channel_with(member.peer, Some(&pki.client(&id)))
            .await
            .unwrap();
        let r = cellplane_proto::raft::raft_client::RaftClient::new(ch)
            .vote(cellplane_proto::raft::RaftPayload {
                data: Default::default(),
            })
            .await;
        denied(r, who);
    }

    // The directory: only an operator writes the map; a router only reads it.
    let dir = env.directory.member(1).client;
    let write = |tls: ClientTlsConfig| async move {
        let ch = channel_with(dir, Some(&tls)).await.unwrap();
        KvClient::new(ch)
            .put(put("/cellplane/cellmap", "{\"version\":999}"))
            .await
    };
    denied(
        write(pki.client(&Identity::Router(1))).await,
        "a router writes the map",
    );
    denied(
        write(pki.client(&Identity::Tenant("a".into()))).await,
        "a tenant writes the map",
    );
    let ch = channel_with(dir, Some(&pki.client(&Identity::Router(1))))
        .await
        .unwrap();
    KvClient::new(ch)
        .range(get("/cellplane/cellmap"))
        .await
        .expect("a router reads the map");

    // A hostile map, written by an operator: refused by the router, which keeps
    // routing and says so.
    let op = pki.client(&Identity::Operator("o".into()));
    let ch = channel_with(dir, Some(&op)).await.unwrap();
    let huge = r#"{"version":2,"buckets":4294967295,"cells":[{"name":"alpha","endpoints":["127.0.0.1:1"]}],"ranges":[{"from":0,"to":4294967294,"cell":"alpha"}]}"#;
    KvClient::new(ch.clone())
        .put(put("/cellplane/cellmap", huge))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = env.admin_status().await;
        if s.maps_refused_total > 0 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the map was not refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        status.last_refused_map.contains("buckets"),
        "{}",
        status.last_refused_map
    );
    assert_eq!(status.map_version, 1);
    assert!(status.auth_enabled && status.tls);
    let token = login(&env, "b", "b-password").await;
    KvClient::new(as_user(&env, &token, None).await)
        .put(put("/b/after", "still routed"))
        .await
        .expect("routing goes on with the map in force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_clients_log_in_with_a_password_or_a_certificate() {
    let mut env = TestEnv::start_secure(&["alpha", "beta"], 1, USERS, 600);
    env.start_router();
    let pki = env.pki();
    let ca = pki.ca_path().display().to_string();
    let endpoint = format!("https://{}", env.router_client);
    let ca_flag = format!("--cacert={ca}");

    // etcdctl --user: etcd's own auth flow, through the router.
    let user = "--user=acme:acme-password";
    let (ok, out) = common::etcdctl(&endpoint, &[&ca_flag, user, "put", "/acme/x", "1"], None);
    assert!(ok, "etcdctl --user put: {out}");
    let (ok, out) = common::etcdctl(&endpoint, &[&ca_flag, user, "get", "/acme/x"], None);
    assert!(ok && out.contains("/acme/x"), "{out}");
    let (ok, out) = common::etcdctl(&endpoint, &[&ca_flag, user, "lease", "grant", "60"], None);
    assert!(ok && out.contains("granted"), "etcdctl lease grant: {out}");
    let (ok, out) = common::etcdctl(&endpoint, &[&ca_flag, user, "get", "/b/own"], None);
    assert!(!ok && out.contains("acme"), "another tenant's key: {out}");
    let (ok, out) = common::etcdctl(
        &endpoint,
        &[&ca_flag, "--user=acme:wrong", "get", "/acme/x"],
        None,
    );
    assert!(!ok && out.contains("authentication failed"), "{out}");
    let (ok, out) = common::etcdctl(&endpoint, &[&ca_flag, "get", "/acme/x"], None);
    assert!(!ok, "nothing proven, yet served: {out}");

    // etcdctl --cert: a tenant certificate.
    let (cert, key) = pki.issue("tenant-a", &Identity::Tenant("a".into()));
    let cert_flags = [
        ca_flag.clone(),
        format!("--cert={}", cert.display()),
        format!("--key={}", key.display()),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        cert_flags
            .iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let args = with(&["put", "/a/from-cert", "v"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = common::etcdctl(&endpoint, &args, None);
    assert!(ok, "etcdctl --cert put: {out}");
    let args = with(&["get", "/acme/x"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = common::etcdctl(&endpoint, &args, None);
    assert!(!ok, "tenant a read acme's key: {out}");

    // The Rust etcd-client with ConnectOptions::with_user, over TLS.
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(pki.ca_pem()));
    let opts = etcd_client::ConnectOptions::new()
        .with_user("acme", "acme-password")
        .with_tls(tls);
    let mut client = etcd_client::Client::connect([endpoint.as_str()], Some(opts))
        .await
        .expect("etcd-client connects with a user");
    client.put("/acme/rust", "v", None).await.unwrap();
    let got = client.get("/acme/rust", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"v");
    let lease = client.lease_grant(30, None).await.unwrap();
    assert!(lease.id() > 0);
    assert!(client.get("/a/from-cert", None).await.is_err());
}
