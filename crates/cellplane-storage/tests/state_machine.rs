//! The state machine applied directly (no Raft, no network): atomicity of a failing
//! command, history across a snapshot, and restart from disk.

use cellplane_proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest, request_op};
use cellplane_storage::{Batch, Command, KvError, StateMachine, TypeConfig};
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
