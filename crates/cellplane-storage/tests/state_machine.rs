//! The state machine applied directly (no Raft, no network): atomicity of a failing
//! command, history across a snapshot, restart from disk, and leases with their
//! owners.

use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest, request_op};
use cellplane_storage::{Batch, Command, KvError, SnapshotFile, StateMachine, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use prost::Message;

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch(vec![cmd])),
    }
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: k.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_txn_that_fails_halfway_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = cellplane_storage::open(dir.path()).unwrap();
    let mut sm = StateMachine::new(store).unwrap();
    let reader = sm.reader();

    // Put /a first, then a nested txn whose put names a lease that does not exist:
    // the whole txn must fail and /a must not be written.
    let nested = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                lease: 77,
                ..put("/b", "x")
            })),
        }],
        ..Default::default()
    };
    let txn = TxnRequest {
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put("/a", "1"))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestTxn(nested)),
            },
        ],
        ..Default::default()
    };
    let out = sm
        .apply(vec![
            entry(1, Command::Put(put("/before", "0").encode_to_vec())),
            entry(2, Command::Txn(txn.encode_to_vec())),
            entry(3, Command::Put(put("/after", "2").encode_to_vec())),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    let out: Vec<_> = out.into_iter().map(|b| b.0[0].clone()).collect();
    assert_eq!(out[1].outcome, Some(Err(KvError::LeaseNotFound)));
    assert_eq!(out[0].revision, 1);
    assert_eq!(out[1].revision, 1, "a failed command makes no revision");
    assert_eq!(out[2].revision, 2);
    assert!(
        reader.range(&get("/a")).unwrap().kvs.is_empty(),
        "/a leaked from a failed txn"
    );
    assert_eq!(reader.range(&get("/after")).unwrap().kvs[0].mod_revision, 2);
}

#[tokio::test]
async fn snapshot_carries_history_and_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = cellplane_storage::open(dir.path()).unwrap();
    let mut sm = StateMachine::new(store).unwrap();
    let mut entries = Vec::new();
    for i in 1..=50u64 {
        entries.push(entry(
            i,
            Command::Put(put("/k", &i.to_string()).encode_to_vec()),
        ));
    }
    sm.apply(entries).await.unwrap();
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, 50);

    // Install it on a fresh member: the newest value and a past revision both read.
    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachine::new(cellplane_storage::open(dir2.path()).unwrap()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let r2 = sm2.reader();
    assert_eq!(r2.range(&get("/k")).unwrap().kvs[0].value, b"50");
    let mut at = get("/k");
    at.revision = 10;
    assert_eq!(r2.range(&at).unwrap().kvs[0].value, b"10");
    drop(sm2);
    drop(r2);

    // Reopen from disk: applied state and data are there.
    let mut sm3 = StateMachine::new(cellplane_storage::open(dir2.path()).unwrap()).unwrap();
    let (applied, _) = sm3.applied_state().await.unwrap();
    assert_eq!(applied.unwrap().index, 50);
    assert_eq!(sm3.reader().revisions().unwrap(), (50, 0));
}

#[tokio::test]
async fn commands_in_one_batch_apply_in_order_each_with_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let reader = sm.reader();
    // A txn in the same batch sees the put before it: compare on its value holds.
    use cellplane_proto::etcdserverpb::Compare;
    use cellplane_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
    let cas = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: "/x".into(),
            target_union: Some(TargetUnion::Value("1".into())),
            range_end: vec![],
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(put("/x", "2"))),
        }],
        failure: vec![],
    };
    let batch = Batch(vec![
        Command::Put(put("/x", "1").encode_to_vec()),
        Command::Put(
            PutRequest {
                lease: 5,
                ..put("/y", "1")
            }
            .encode_to_vec(),
        ),
        Command::Txn(cas.encode_to_vec()),
    ]);
    assert!(
        !batch.0[2].reads_history(),
        "a txn without revision reads batches"
    );
    let out = sm
        .apply(vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(batch),
        }])
        .await
        .unwrap();
    let r = &out[0].0;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].revision, 1);
    assert_eq!(
        r[1].outcome,
        Some(Err(KvError::LeaseNotFound)),
        "one failure, others unaffected"
    );
    assert_eq!(r[2].revision, 2);
    assert_eq!(reader.range(&get("/x")).unwrap().kvs[0].value, b"2");

    // A txn reading at an explicit revision, or a compaction, is marked to be
    // proposed alone.
    let at_rev = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                revision: 1,
                ..get("/x")
            })),
        }],
        ..Default::default()
    };
    assert!(Command::Txn(at_rev.encode_to_vec()).reads_history());
    assert!(Command::Compact(1).reads_history());
}

#[tokio::test]
async fn leases_attach_keys_and_revoke_deletes_them_at_one_revision() {
    use cellplane_proto::mvccpb::event::EventType;
    let dir = tempfile::tempdir().unwrap();
    let store = cellplane_storage::open(dir.path()).unwrap();
    let mut sm = StateMachine::new(store).unwrap();
    let reader = sm.reader();
    let mut events = sm.events().subscribe();
    let with_lease = |k: &str, lease: i64| {
        Command::Put(
            PutRequest {
                lease,
                ..put(k, "v")
            }
            .encode_to_vec(),
        )
    };
    // Grant and attach in one batch: the put sees the grant before it.
    let out = sm
        .apply(vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Batch(vec![
                Command::LeaseGrant { id: 7, ttl: 30 },
                with_lease("/a", 7),
                with_lease("/b", 7),
                Command::LeaseGrant { id: 7, ttl: 30 },
                Command::LeaseGrant {
                    id: 8,
                    ttl: cellplane_storage::MAX_LEASE_TTL + 1,
                },
            ])),
        }])
        .await
        .unwrap();
    let r = &out[0].0;
    assert!(r[0].outcome.as_ref().unwrap().is_ok());
    assert_eq!(r[2].revision, 2);
    assert_eq!(r[3].outcome, Some(Err(KvError::LeaseExists)));
    assert_eq!(r[4].outcome, Some(Err(KvError::LeaseTtlTooLarge)));
    let (rec, keys) = reader.lease_with_keys(7).unwrap().unwrap();
    assert_eq!(rec.ttl, 30);
    assert_eq!(keys, vec![b"/a".to_vec(), b"/b".to_vec()]);

    // Re-putting /b without the lease detaches it; /c attaches in the same batch
    // as the revoke, and goes with it.
    let out = sm
        .apply(vec![
            entry(2, Command::Put(put("/b", "free").encode_to_vec())),
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 3),
                payload: EntryPayload::Normal(Batch(vec![
                    with_lease("/c", 7),
                    Command::LeaseRevoke(7),
                    Command::LeaseRevoke(7),
                    with_lease("/d", 7),
                ])),
            },
        ])
        .await
        .unwrap();
    let r = &out[1].0;
    assert_eq!(r[1].revision, 5, "revoke deletes /a and /c at one revision");
    assert_eq!(r[2].outcome, Some(Err(KvError::LeaseNotFound)));
    assert_eq!(r[3].outcome, Some(Err(KvError::LeaseNotFound)));
    assert!(reader.range(&get("/a")).unwrap().kvs.is_empty());
    assert!(reader.range(&get("/c")).unwrap().kvs.is_empty());
    assert_eq!(reader.range(&get("/b")).unwrap().kvs[0].value, b"free");
    assert!(reader.lease(7).unwrap().is_none());
    assert!(reader.leases().unwrap().is_empty());

    // Watchers saw the revoke as one revision of delete events.
    let mut last = None;
    while let Ok(e) = events.try_recv() {
        last = Some(e);
    }
    let last = last.unwrap();
    assert_eq!(last.revision, 5);
    let deleted: Vec<&[u8]> = last
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.r#type, EventType::Delete as i32);
            e.kv.as_ref().unwrap().key.as_slice()
        })
        .collect();
    assert_eq!(deleted, vec![b"/a".as_slice(), b"/c".as_slice()]);
}

#[tokio::test]
async fn leases_travel_in_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    sm.apply(vec![
        entry(1, Command::LeaseGrant { id: 42, ttl: 10 }),
        entry(
            2,
            Command::Put(
                PutRequest {
                    lease: 42,
                    ..put("/k", "v")
                }
                .encode_to_vec(),
            ),
        ),
    ])
    .await
    .unwrap();
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let dir2 = tempfile::tempdir().unwrap();
    let mut other = StateMachine::new(cellplane_storage::open(dir2.path()).unwrap()).unwrap();
    other
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let (rec, keys) = other.reader().lease_with_keys(42).unwrap().unwrap();
    assert_eq!(rec.ttl, 10);
    assert_eq!(keys, vec![b"/k".to_vec()]);
}

fn put_with_lease(k: &[u8], lease: i64) -> PutRequest {
    PutRequest {
        key: k.to_vec(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    }
}

fn put_op(p: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(p)),
    }
}

fn owned_grant(id: i64, owner: &str) -> Command {
    Command::LeaseGrantOwned {
        id,
        ttl: 30,
        owner: owner.into(),
    }
}

/// Applies one command as log entry `index` and returns its outcome and revision.
async fn apply_one(
    sm: &mut StateMachine,
    index: u64,
    cmd: Command,
) -> (Option<Result<serde_bytes::ByteBuf, KvError>>, i64) {
    let mut out = sm.apply(vec![entry(index, cmd)]).await.unwrap();
    let r = out.remove(0).0.remove(0);
    (r.outcome, r.revision)
}

#[tokio::test]
async fn a_tenants_lease_holds_only_keys_in_the_tenants_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let reader = sm.reader();
    let (ok, _) = apply_one(&mut sm, 1, owned_grant(9, "T")).await;
    assert!(ok.unwrap().is_ok());
    let rec = reader.lease(9).unwrap().unwrap();
    assert_eq!(rec.owner.as_deref(), Some("T"));

    // Inside [/T/, /T0): attached.
    for (i, k) in [&b"/T/"[..], b"/T/a", b"/T/\xff"].iter().enumerate() {
        let (out, _) = apply_one(
            &mut sm,
            2 + i as u64,
            Command::Put(put_with_lease(k, 9).encode_to_vec()),
        )
        .await;
        assert!(out.unwrap().is_ok(), "{k:?}");
    }
    let revision = reader.revisions().unwrap().0;
    assert_eq!(revision, 3);

    // Outside, the prefix end itself included: refused, nothing written.
    let mut index = 10;
    for k in [&b"/other/x"[..], b"x", b"/Tx", b"/T0", b"/T", b"T/x"] {
        index += 1;
        let (out, rev) = apply_one(
            &mut sm,
            index,
            Command::Put(put_with_lease(k, 9).encode_to_vec()),
        )
        .await;
        assert_eq!(out, Some(Err(KvError::PermissionDenied)), "{k:?}");
        assert_eq!(
            KvError::PermissionDenied.to_string(),
            "etcdserver: permission denied"
        );
        assert_eq!(rev, revision, "{k:?}: no revision");
        let mut r = get("");
        r.key = k.to_vec();
        assert!(reader.range(&r).unwrap().kvs.is_empty(), "{k:?} written");
    }

    // The same inside a txn, at the top and nested: the txn leaves no trace.
    let nested = TxnRequest {
        success: vec![put_op(put_with_lease(b"/other/y", 9))],
        ..Default::default()
    };
    for txn in [
        TxnRequest {
            success: vec![
                put_op(put_with_lease(b"/T/in-txn", 9)),
                put_op(put_with_lease(b"/other/y", 9)),
            ],
            ..Default::default()
        },
        TxnRequest {
            success: vec![
                put_op(put_with_lease(b"/T/in-txn", 9)),
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(nested)),
                },
            ],
            ..Default::default()
        },
    ] {
        index += 1;
        let (out, rev) = apply_one(&mut sm, index, Command::Txn(txn.encode_to_vec())).await;
        assert_eq!(out, Some(Err(KvError::PermissionDenied)));
        assert_eq!(rev, revision);
        assert!(reader.range(&get("/T/in-txn")).unwrap().kvs.is_empty());
        assert!(reader.range(&get("/other/y")).unwrap().kvs.is_empty());
    }
    let (_, keys) = reader.lease_with_keys(9).unwrap().unwrap();
    assert_eq!(
        keys,
        vec![b"/T/".to_vec(), b"/T/a".to_vec(), b"/T/\xff".to_vec()]
    );

    // A lease without an owner (an operator's) holds any key, as before.
    index += 1;
    apply_one(&mut sm, index, Command::LeaseGrant { id: 10, ttl: 30 }).await;
    index += 1;
    let (out, _) = apply_one(
        &mut sm,
        index,
        Command::Put(put_with_lease(b"x", 10).encode_to_vec()),
    )
    .await;
    assert!(out.unwrap().is_ok());
}

#[tokio::test]
async fn only_the_owner_revokes_a_tenants_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let reader = sm.reader();
    let mut events = sm.events().subscribe();
    sm.apply(vec![Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Batch(vec![
            owned_grant(9, "a"),
            Command::Put(put_with_lease(b"/a/1", 9).encode_to_vec()),
            Command::Put(put_with_lease(b"/a/2", 9).encode_to_vec()),
            Command::LeaseGrant { id: 10, ttl: 30 },
        ])),
    }])
    .await
    .unwrap();
    assert_eq!(reader.revisions().unwrap().0, 2);
    assert_eq!(
        reader
            .leases_of("a")
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        vec![9]
    );
    assert!(reader.leases_of("b").unwrap().is_empty());

    // Another tenant: as if the lease did not exist; nothing changes. A lease
    // without an owner is nobody's to revoke as a tenant either.
    for (index, cmd) in [
        (
            2,
            Command::LeaseRevokeOwned {
                id: 9,
                owner: "b".into(),
            },
        ),
        (
            3,
            Command::LeaseRevokeOwned {
                id: 10,
                owner: "a".into(),
            },
        ),
        (
            4,
            Command::LeaseRevokeOwned {
                id: 11,
                owner: "a".into(),
            },
        ),
    ] {
        let (out, rev) = apply_one(&mut sm, index, cmd).await;
        assert_eq!(out, Some(Err(KvError::LeaseNotFound)));
        assert_eq!(rev, 2);
    }
    let (_, keys) = reader.lease_with_keys(9).unwrap().unwrap();
    assert_eq!(keys, vec![b"/a/1".to_vec(), b"/a/2".to_vec()]);
    assert!(reader.lease(10).unwrap().is_some());
    assert_eq!(reader.range(&get("/a/1")).unwrap().kvs.len(), 1);

    // The owner: the lease goes, its keys with it, at one revision.
    let (out, rev) = apply_one(
        &mut sm,
        5,
        Command::LeaseRevokeOwned {
            id: 9,
            owner: "a".into(),
        },
    )
    .await;
    assert!(out.unwrap().is_ok());
    assert_eq!(rev, 3);
    assert!(reader.lease(9).unwrap().is_none());
    assert!(reader.range(&get("/a/1")).unwrap().kvs.is_empty());
    assert!(reader.range(&get("/a/2")).unwrap().kvs.is_empty());
    let mut last = None;
    while let Ok(e) = events.try_recv() {
        last = Some(e);
    }
    let last = last.unwrap();
    assert_eq!(last.revision, 3);
    assert_eq!(last.events.len(), 2);
}

/// Map version `version` of cells alpha and beta with tenant a pinned to `a_in`.
fn map_json(version: u64, a_in: &str) -> Vec<u8> {
    use cellplane_map::{CellEntry, CellMap, CellState};
    CellMap {
        version,
        buckets: 16,
        cells: ["alpha", "beta"]
            .iter()
            .map(|n| CellEntry {
                name: n.to_string(),
                endpoints: vec![format!("{n}:2379")],
                state: CellState::Active,
            })
            .collect(),
        ranges: CellMap::even_ranges(&["alpha", "beta"], 16),
        tenants: [("a".to_string(), a_in.to_string())].into(),
    }
    .to_json()
}

#[tokio::test]
async fn a_moving_tenants_leases_are_revoked_by_nobody_but_the_mover_once_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let reader = sm.reader();
    let learn = |v, a_in| Command::LearnMap {
        cell: "alpha".into(),
        map: map_json(v, a_in),
    };
    let setup = [
        learn(1, "alpha"),
        owned_grant(9, "a"),
        Command::Put(put_with_lease(b"/a/1", 9).encode_to_vec()),
        Command::Fence {
            cell: "alpha".into(),
            tenant: "a".into(),
            to: "beta".into(),
            version: 2,
        },
    ];
    for (i, cmd) in setup.into_iter().enumerate() {
        let (out, _) = apply_one(&mut sm, i as u64 + 1, cmd).await;
        assert!(out.unwrap().is_ok());
    }
    let by_mover = || Command::Moving {
        tenant: "a".into(),
        cmd: Box::new(Command::LeaseRevokeOwned {
            id: 9,
            owner: "a".into(),
        }),
    };
    // Fenced: the tenant's, an operator's (or expiry's) and the mover's revoke
    // are all refused; a revoke after the fence point would be lost by the move.
    let refused = [
        Command::LeaseRevokeOwned {
            id: 9,
            owner: "a".into(),
        },
        Command::LeaseRevoke(9),
        by_mover(),
    ];
    for (i, cmd) in refused.into_iter().enumerate() {
        let (out, _) = apply_one(&mut sm, 10 + i as u64, cmd).await;
        assert!(out.unwrap().is_err());
    }
    let (out, _) = apply_one(&mut sm, 20, Command::LeaseRevoke(9)).await;
    assert!(
        matches!(out, Some(Err(KvError::NotOwned { ref cell, .. })) if cell == "beta"),
        "{out:?}"
    );
    assert_eq!(reader.range(&get("/a/1")).unwrap().kvs.len(), 1);

    // Moved away: the tenant still cannot, the mover retires the lease and key.
    let (out, _) = apply_one(&mut sm, 21, learn(2, "beta")).await;
    assert!(out.unwrap().is_ok());
    let (out, _) = apply_one(&mut sm, 22, Command::LeaseRevoke(9)).await;
    assert!(matches!(out, Some(Err(KvError::NotOwned { .. }))));
    let (out, _) = apply_one(&mut sm, 23, by_mover()).await;
    assert!(out.unwrap().is_ok());
    assert!(reader.lease(9).unwrap().is_none());
    assert!(reader.range(&get("/a/1")).unwrap().kvs.is_empty());
}

/// A snapshot received as openraft receives one: written into a file the state
/// machine handed out.
async fn received(sm: &mut StateMachine, data: &[u8]) -> Box<SnapshotFile> {
    use tokio::io::AsyncWriteExt;
    let mut file = sm.begin_receiving_snapshot().await.unwrap();
    file.write_all(data).await.unwrap();
    file.flush().await.unwrap();
    file
}

/// Rewrites the pairs of a snapshot file (the documented format in
/// `export.rs`) with `edit`, and writes its padding and checksum again.
fn rewrite_snapshot(data: &[u8], mut edit: impl FnMut(&str, &[u8], &mut Vec<u8>)) -> Vec<u8> {
    use sha2::Digest;
    let mut out = data[..22].to_vec();
    let mut i = 22;
    let mut cf = String::new();
    let u32_at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap()) as usize;
    loop {
        match data[i] {
            1 => {
                let n = data[i + 1] as usize;
                cf = String::from_utf8(data[i + 2..i + 2 + n].to_vec()).unwrap();
                out.extend_from_slice(&data[i..i + 2 + n]);
                i += 2 + n;
            }
            2 => {
                let klen = u32_at(i + 1);
                let key = &data[i + 5..i + 5 + klen];
                let vlen = u32_at(i + 5 + klen);
                let mut value = data[i + 9 + klen..i + 9 + klen + vlen].to_vec();
                edit(&cf, key, &mut value);
                out.push(2);
                out.extend_from_slice(&(klen as u32).to_be_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&(value.len() as u32).to_be_bytes());
                out.extend_from_slice(&value);
                i += 9 + klen + vlen;
            }
            3 => {
                out.extend_from_slice(&data[i..i + 17]);
                break;
            }
            t => panic!("unknown tag {t}"),
        }
    }
    out.resize(out.len().div_ceil(512) * 512, 0);
    let digest = sha2::Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

#[tokio::test]
async fn owners_travel_in_snapshots_and_old_records_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    sm.apply(vec![
        entry(1, owned_grant(9, "a")),
        entry(2, Command::LeaseGrant { id: 10, ttl: 20 }),
        entry(3, Command::Put(put_with_lease(b"/a/k", 9).encode_to_vec())),
    ])
    .await
    .unwrap();
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let meta = snap.meta.clone();
    let mut data = Vec::new();
    {
        use tokio::io::AsyncReadExt;
        let mut file = snap.snapshot;
        file.read_to_end(&mut data).await.unwrap();
    }

    let dir2 = tempfile::tempdir().unwrap();
    let mut other = StateMachine::new(cellplane_storage::open(dir2.path()).unwrap()).unwrap();
    let file = received(&mut other, &data).await;
    other.install_snapshot(&meta, file).await.unwrap();
    let (rec, keys) = other.reader().lease_with_keys(9).unwrap().unwrap();
    assert_eq!(rec.owner.as_deref(), Some("a"));
    assert_eq!(rec.ttl, 30);
    assert_eq!(keys, vec![b"/a/k".to_vec()]);
    assert_eq!(other.reader().lease(10).unwrap().unwrap().owner, None);

    // A snapshot (or a store) written before owners existed holds each lease as
    // its TTL alone. Rewrite the records that way: they read as leases without an
    // owner, and revoke as before.
    #[derive(serde::Serialize)]
    struct OldLease {
        ttl: i64,
    }
    let mut rewritten = 0;
    let old = rewrite_snapshot(&data, |cf, k, v| {
        if cf == "lease" && k.first() == Some(&b'l') {
            let id = i64::from_be_bytes(k[1..9].try_into().unwrap());
            let ttl = if id == 9 { 30 } else { 20 };
            *v = postcard::to_stdvec(&OldLease { ttl }).unwrap();
            rewritten += 1;
        }
    });
    assert_eq!(rewritten, 2, "the lease layout changed: update this test");
    let dir3 = tempfile::tempdir().unwrap();
    let mut third = StateMachine::new(cellplane_storage::open(dir3.path()).unwrap()).unwrap();
    let file = received(&mut third, &old).await;
    third.install_snapshot(&meta, file).await.unwrap();
    let reader = third.reader();
    let leases = reader.leases().unwrap();
    assert_eq!(leases.len(), 2);
    assert!(leases.iter().all(|(_, r)| r.owner.is_none()));
    let (rec, keys) = reader.lease_with_keys(9).unwrap().unwrap();
    assert_eq!((rec.ttl, rec.owner), (30, None));
    assert_eq!(keys, vec![b"/a/k".to_vec()]);
    let (out, _) = apply_one(&mut third, 4, Command::LeaseRevoke(9)).await;
    assert!(out.unwrap().is_ok());
    assert!(reader.range(&get("/a/k")).unwrap().kvs.is_empty());
}

/// HashKV: members that applied the same log agree at every revision they both
/// hold; a hash at a revision does not change as the store moves on; a member
/// that holds a different version disagrees; revisions outside the held history
/// are refused as etcd refuses them.
#[tokio::test]
async fn hash_kv_agrees_between_equal_histories_and_catches_a_difference() {
    let open = || {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
        (dir, sm)
    };
    let (_a_dir, mut a) = open();
    let (_b_dir, mut b) = open();
    let (_c_dir, mut c) = open();
    let log = |last: &str| {
        vec![
            entry(1, Command::Put(put("/k1", "1").encode_to_vec())),
            entry(2, Command::Put(put("/k2", "2").encode_to_vec())),
            entry(3, Command::Put(put("/k1", last).encode_to_vec())),
        ]
    };
    a.apply(log("3")).await.unwrap();
    b.apply(log("3")).await.unwrap();
    c.apply(log("three")).await.unwrap();
    let (ra, rb, rc) = (a.reader(), b.reader(), c.reader());
    for rev in [0, 1, 2, 3] {
        assert_eq!(
            ra.hash_kv(rev).unwrap(),
            rb.hash_kv(rev).unwrap(),
            "rev {rev}"
        );
    }
    assert_eq!(ra.hash_kv(0).unwrap().revision, 3);
    assert_eq!(
        ra.hash_kv(2).unwrap(),
        rc.hash_kv(2).unwrap(),
        "equal up to 2"
    );
    assert_ne!(ra.hash_kv(3).unwrap().hash, rc.hash_kv(3).unwrap().hash);

    let at2 = ra.hash_kv(2).unwrap();
    a.apply(vec![entry(
        4,
        Command::Put(put("/k3", "4").encode_to_vec()),
    )])
    .await
    .unwrap();
    assert_eq!(ra.hash_kv(2).unwrap(), at2, "a hash at 2 stays put");
    assert!(matches!(
        ra.hash_kv(9),
        Err(KvError::FutureRevision { current: 4 })
    ));
    a.apply(vec![entry(5, Command::Compact(3))]).await.unwrap();
    assert!(matches!(
        ra.hash_kv(2),
        Err(KvError::Compacted { compacted: 3 })
    ));
    assert_eq!(ra.hash_kv(4).unwrap().compacted, 3);
}

/// A range larger than the reader's response limit is refused before it is
/// read whole, at the newest revision and at a past one; a page of it is not.
#[tokio::test]
async fn ranges_past_the_response_limit_are_refused_and_pages_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let value = "x".repeat(10_000);
    let entries = (1..=100)
        .map(|i| {
            entry(
                i,
                Command::Put(put(&format!("/r/{i:03}"), &value).encode_to_vec()),
            )
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.unwrap();
    let reader = sm.reader().with_max_response_bytes(200_000);
    let all = |revision: i64, limit: i64| RangeRequest {
        key: b"/r/".to_vec(),
        range_end: b"/r0".to_vec(),
        revision,
        limit,
        ..Default::default()
    };
    for revision in [0, 50] {
        let err = reader.range(&all(revision, 0)).unwrap_err();
        assert_eq!(err, KvError::ResponseTooLarge { max: 200_000 });
        assert!(
            err.to_string().contains("limits.max_response_bytes"),
            "{err}"
        );
    }
    let page = reader.range(&all(0, 10)).unwrap();
    assert_eq!(page.kvs.len(), 10);
    assert!(page.more);
    assert_eq!(page.count, 100);
    assert_eq!(sm.reader().range(&all(0, 0)).unwrap().kvs.len(), 100);
}

/// An operator snapshot streams in chunks of the size asked, restores into a new
/// store with the same keys, history hash and revisions, and a damaged or
/// truncated file is refused and leaves no store behind.
#[tokio::test]
async fn snapshots_stream_in_chunks_and_restore_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = cellplane_storage::open(&dir.path().join("src")).unwrap();
    let mut sm = StateMachine::new(store.clone()).unwrap();
    let entries = (1..=300)
        .map(|i| {
            entry(
                i,
                Command::Put(
                    put(&format!("/s/{}", i % 50), &"v".repeat(i as usize)).encode_to_vec(),
                ),
            )
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.unwrap();
    sm.apply(vec![entry(301, Command::Compact(100))])
        .await
        .unwrap();

    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut lasts = 0;
    let summary = cellplane_storage::export_snapshot(&store, 4096, |c, last| {
        chunks.push(c);
        lasts += usize::from(last);
        true
    })
    .unwrap();
    assert!(chunks.len() > 10);
    assert_eq!(lasts, 1);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() == 4096));
    let file: Vec<u8> = chunks.concat();
    assert_eq!(summary.bytes, file.len() as u64);
    assert_eq!(
        file.len() % 512,
        32,
        "pages and a SHA-256, as etcdctl checks"
    );
    assert_eq!((summary.revision, summary.compacted), (300, 100));

    let restored_dir = dir.path().join("restored");
    let back = cellplane_storage::import_snapshot(&restored_dir, file.as_slice()).unwrap();
    assert_eq!(back, summary);
    let restored = StateMachine::new(cellplane_storage::open(&restored_dir).unwrap()).unwrap();
    let (a, b) = (sm.reader(), restored.reader());
    assert_eq!(b.revisions().unwrap(), (300, 100));
    assert_eq!(a.hash_kv(0).unwrap(), b.hash_kv(0).unwrap());
    let all = RangeRequest {
        key: b"/s/".to_vec(),
        range_end: b"/s0".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.range(&all).unwrap().kvs, b.range(&all).unwrap().kvs);
    drop(restored);

    // A flipped byte, a truncation, an etcd file: refused, nothing left behind.
    let mut flipped = file.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let truncated = &file[..file.len() - 10];
    for (what, bad) in [
        ("flipped", flipped.as_slice()),
        ("truncated", truncated),
        ("etcd", &b"\x00\x00\x00\x00bolt"[..]),
    ] {
        let target = dir.path().join(what);
        assert!(
            cellplane_storage::import_snapshot(&target, bad).is_err(),
            "{what}"
        );
        assert!(!target.exists(), "{what}: a failed restore left a store");
    }
    let again = cellplane_storage::import_snapshot(&restored_dir, file.as_slice());
    assert!(matches!(
        again,
        Err(cellplane_storage::SnapshotError::NotEmpty(_))
    ));
}

/// A watcher's catch-up reads only its range's events from the history.
#[tokio::test]
async fn history_keeps_only_the_watched_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let entries = (1..=40)
        .map(|i| {
            let key = if i % 4 == 0 { "/a/k" } else { "/b/k" };
            entry(i, Command::Put(put(key, &i.to_string()).encode_to_vec()))
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.unwrap();
    let reader = sm.reader();
    let a = cellplane_storage::KeyRange::new(b"/a/", b"/a0");
    let only_a = reader.history(1, 40, Some(&a)).unwrap();
    let revisions: Vec<i64> = only_a.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, (1..=10).map(|i| i * 4).collect::<Vec<_>>());
    assert!(
        only_a
            .iter()
            .flat_map(|r| &r.events)
            .all(|e| e.kv.as_ref().unwrap().key == b"/a/k")
    );
    assert_eq!(reader.history(1, 40, None).unwrap().len(), 40);
}

/// A catch-up reads the history in pages of whole revisions, each about the
/// size asked, and the pages together are the whole history.
#[tokio::test]
async fn history_pages_are_bounded_and_add_up_to_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let value = "v".repeat(1000);
    let entries = (1..=100)
        .map(|i| {
            entry(
                i,
                Command::Put(put(&format!("/p/{i}"), &value).encode_to_vec()),
            )
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.unwrap();
    let reader = sm.reader();
    let whole = reader.history(1, 100, None).unwrap();
    let (mut from, mut pages, mut got) = (1, 0, Vec::new());
    loop {
        let page = reader.history_page(from, 100, None, 10_000).unwrap();
        let bytes: usize = page.revisions.iter().map(|r| r.payload_bytes()).sum();
        // Whole revisions: stops after the one that crosses the bound.
        assert!(bytes < 10_000 + 2_000, "{bytes}");
        pages += 1;
        got.extend(page.revisions);
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    assert!(pages >= 9, "{pages} pages");
    assert_eq!(got, whole);
}

/// Applying a compaction changes one number; the versions it hides leave the
/// disk in steps, in the background. A member part-way through, or one that has
/// not started, agrees with a finished one on every read and on HashKV.
#[tokio::test]
async fn compacted_history_leaves_the_disk_in_steps_and_members_agree_meanwhile() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store_a = cellplane_storage::open(dir_a.path()).unwrap();
    let store_b = cellplane_storage::open(dir_b.path()).unwrap();
    let mut a = StateMachine::new(store_a.clone()).unwrap();
    let mut b = StateMachine::new(store_b.clone()).unwrap();
    // Revision r writes /k{(r-1) % 3}; 121 deletes /k2; 122 writes /k1 again.
    let mut entries: Vec<_> = (1..=120u64)
        .map(|r| {
            let key = format!("/k{}", (r - 1) % 3);
            entry(r, Command::Put(put(&key, &r.to_string()).encode_to_vec()))
        })
        .collect();
    entries.push(entry(
        121,
        Command::DeleteRange(
            cellplane_proto::etcdserverpb::DeleteRangeRequest {
                key: b"/k2".to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ));
    entries.push(entry(122, Command::Put(put("/k1", "122").encode_to_vec())));
    entries.push(entry(123, Command::Compact(121)));
    a.apply(entries.clone()).await.unwrap();
    b.apply(entries).await.unwrap();
    let pairs = |store: &cellplane_storage::Store| {
        cellplane_storage::export_snapshot(store, 1 << 20, |_, _| true)
            .unwrap()
            .pairs
    };
    let before = pairs(&store_a);

    let compactor = cellplane_storage::HistoryCompactor::new(store_a.clone());
    assert_eq!(compactor.targets().unwrap(), (121, 0));
    let mut cursor = cellplane_storage::CompactCursor::default();
    let mut steps = 0;
    loop {
        steps += 1;
        match compactor.step(0, 121, cursor, 1).unwrap() {
            cellplane_storage::CompactStep::More(c) => cursor = c,
            cellplane_storage::CompactStep::Done(c) => {
                cursor = c;
                break;
            }
        }
        // Part-way: what readers see has not changed.
        assert_eq!(
            a.reader().hash_kv(0).unwrap(),
            b.reader().hash_kv(0).unwrap()
        );
    }
    // One key per step: /k0, /k1, /k2 trimmed in turn, then the survivors seen.
    assert!(steps >= 4, "{steps} steps");
    compactor.finish(0, 121).unwrap();
    assert_eq!(compactor.targets().unwrap(), (121, 121));
    // 40 versions of /k0 and /k1, 40 of /k2 and its tombstone: /k0 keeps 118,
    // /k1 keeps 119 (and 122), /k2 keeps nothing.
    assert_eq!(cursor.deleted(), 39 + 39 + 41);
    assert_eq!(before - pairs(&store_a), 2 * (39 + 39 + 41));

    let (ra, rb) = (a.reader(), b.reader());
    assert_eq!(ra.hash_kv(0).unwrap(), rb.hash_kv(0).unwrap());
    assert_eq!(ra.hash_kv(121).unwrap(), rb.hash_kv(121).unwrap());
    for (key, at, want) in [
        ("/k0", 121, Some("118")),
        ("/k1", 121, Some("119")),
        ("/k2", 121, None),
        ("/k1", 0, Some("122")),
    ] {
        let mut req = get(key);
        req.revision = at;
        let got = ra.range(&req).unwrap();
        assert_eq!(
            got.kvs.first().map(|kv| kv.value.as_slice()),
            want.map(str::as_bytes),
            "{key} at {at}"
        );
        assert_eq!(got.kvs, rb.range(&req).unwrap().kvs);
    }
    // A second pass finds nothing left to remove.
    match compactor.step(0, 121, Default::default(), 1000).unwrap() {
        cellplane_storage::CompactStep::Done(c) => assert_eq!(c.deleted(), 0),
        other => panic!("{other:?}"),
    }
}

/// A command that would read more keys and values at once than the apply
/// path's bound (a delete, a range inside a txn) is refused the same way on
/// every member, and changes nothing; the same keys in smaller parts go.
#[tokio::test]
async fn commands_reading_past_the_apply_bound_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::new(cellplane_storage::open(dir.path()).unwrap()).unwrap();
    let mb = "m".repeat(1 << 20);
    let n = (cellplane_storage::MAX_APPLY_SCAN_BYTES >> 20) as u64 + 4;
    let entries = (1..=n)
        .map(|i| {
            entry(
                i,
                Command::Put(put(&format!("/m/{i:03}"), &mb).encode_to_vec()),
            )
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.unwrap();
    let all = RangeRequest {
        key: b"/m/".to_vec(),
        range_end: b"/m0".to_vec(),
        ..Default::default()
    };
    let txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(all.clone())),
        }],
        ..Default::default()
    };
    let (out, _) = apply_one(&mut sm, n + 1, Command::Txn(txn.encode_to_vec())).await;
    assert!(
        matches!(out, Some(Err(KvError::ResponseTooLarge { .. }))),
        "{out:?}"
    );
    let delete_all = cellplane_proto::etcdserverpb::DeleteRangeRequest {
        key: all.key.clone(),
        range_end: all.range_end.clone(),
        ..Default::default()
    };
    let (out, _) = apply_one(
        &mut sm,
        n + 2,
        Command::DeleteRange(delete_all.encode_to_vec()),
    )
    .await;
    assert!(
        matches!(out, Some(Err(KvError::ApplyTooLarge { .. }))),
        "{out:?}"
    );
    let reader = sm.reader();
    assert_eq!(reader.revisions().unwrap().0, n as i64, "nothing changed");
    // Half the keys at a time go.
    let half = cellplane_proto::etcdserverpb::DeleteRangeRequest {
        key: b"/m/".to_vec(),
        range_end: format!("/m/{:03}", n / 2).into_bytes(),
        ..Default::default()
    };
    let (out, _) = apply_one(&mut sm, n + 3, Command::DeleteRange(half.encode_to_vec())).await;
    assert!(matches!(out, Some(Ok(_))), "{out:?}");
}
