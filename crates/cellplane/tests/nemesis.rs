//! Nemesis: concurrent clients do put, get, compare-and-swap and delete on a few
//! hot keys of a 3-member cell of real processes, while a seeded schedule kills
//! (SIGKILL) and restarts members, pauses them (SIGSTOP/SIGCONT), cuts them off
//! from their peers through fault-injecting proxies (blackholed or refused, both
//! ways or inbound only) and slows their links. Afterwards every fault is
//! healed, a final read of every key joins the history, and:
//!
//! - the whole history must be linearizable (`cellplane_chaos::lincheck`);
//! - every write acknowledged on a key of its own must be readable on every
//!   member.
//!
//! Each member listens on private ports; the cell file advertises a proxy in
//! front of each member's peer and client ports, so all traffic between members
//! (Raft, read-index requests and writes forwarded to the leader) crosses a
//! proxy that knows which member opened each connection. Test clients talk to
//! the members' private client ports directly: a partition separates members,
//! not clients, as in Jepsen.
//!
//! A last test holds a linearizable read while the leader's quorum answers
//! late: it must wait for a confirmation round that succeeds, not fail.
//!
//! `CELLPLANE_NEMESIS_SEED=<n>` replays a schedule; `CELLPLANE_SOAK=1` runs a
//! long one; `CELLPLANE_NEMESIS_ROUNDS=<n>` sets the number of faults. A failing
//! run saves its seed and history and prints how to replay and re-check it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellplane_chaos::lincheck::{
    self, CheckOptions, KvInput, KvOutput, Operation, Recorder, Verdict,
};
use cellplane_chaos::nemesis::{self, Cut, Fault, Rng, Step, Target};
use cellplane_chaos::procnet;
use cellplane_chaos::proxy::{Link, Proxy, Resolver, Rules};
use cellplane_proto::etcdserverpb::kv_client::KvClient;
use cellplane_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, compare,
    request_op,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Client deadline of one operation; past it the outcome is unknown.
const OP_DEADLINE: Duration = Duration::from_secs(3);
const CLIENTS: u64 = 4;
const HOT_KEYS: u64 = 3;
/// Faults per key generation: the keys change every this many faults, so each
/// key's history (what the checker searches) stays short however long the run.
const ROUNDS_PER_EPOCH: usize = 5;

use common::free_addrs;

struct Member {
    id: u64,
    /// Where the member listens; the test's clients use these directly.
    client: SocketAddr,
    http: SocketAddr,
    /// What the cell file advertises: the other members reach this member only
    /// through these.
    peer_proxy: Proxy,
    client_proxy: Proxy,
    data_dir: PathBuf,
    log: PathBuf,
    listen_peer: SocketAddr,
    child: Option<Child>,
    paused: bool,
}

impl Member {
    fn proxies(&self) -> [&Proxy; 2] {
        [&self.peer_proxy, &self.client_proxy]
    }
}

/// A cell whose members reach each other only through proxies.
struct ProxiedCell {
    _dir: tempfile::TempDir,
    def_path: PathBuf,
    members: Vec<Member>,
    /// pid → member id, for telling connections apart.
    pids: Arc<Mutex<HashMap<u32, u64>>>,
    proxies_stop: CancellationToken,
}

impl ProxiedCell {
    async fn start(n: usize) -> ProxiedCell {
        let dir = tempfile::tempdir().unwrap();
        let pids: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
        let table = pids.clone();
        let resolver: Resolver = Arc::new(move |peer, local| {
            let table = table.lock().unwrap().clone();
            let candidates: Vec<u32> = table.keys().copied().collect();
            procnet::tcp_owner(peer, local, &candidates).and_then(|pid| table.get(&pid).copied())
        });
        let proxies_stop = CancellationToken::new();
        let addrs = free_addrs(3 * n);
        let mut toml = "name = \"nemesis\"\n".to_string();
        let mut members = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let (client, listen_peer, http) = (addrs[3 * i], addrs[3 * i + 1], addrs[3 * i + 2]);
            let peer_proxy = Proxy::bind(listen_peer, Some(resolver.clone()), proxies_stop.clone())
                .await
                .unwrap();
            let client_proxy = Proxy::bind(client, Some(resolver.clone()), proxies_stop.clone())
                .await
                .unwrap();
            toml.push_str(&format!(
                "[[members]]\nid = {id}\nclient = \"{}\"\npeer = \"{}\"\nhttp = \"{http}\"\n",
                client_proxy.addr(),
                peer_proxy.addr()
            ));
            members.push(Member {
                id,
                client,
                http,
                peer_proxy,
                client_proxy,
                data_dir: dir.path().join(format!("m{id}")),
                log: dir.path().join(format!("m{id}.log")),
                listen_peer,
                child: None,
                paused: false,
            });
        }
        let def_path = dir.path().join("nemesis.toml");
        std::fs::write(&def_path, toml).unwrap();
        let mut cell = ProxiedCell {
            _dir: dir,
            def_path,
            members,
            pids,
            proxies_stop,
        };
        for id in 1..=n as u64 {
            cell.spawn(id);
        }
        cell.wait_ready(Duration::from_secs(60)).await;
        cell
    }

    fn member(&mut self, id: u64) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    fn spawn(&mut self, id: u64) {
        let def = self.def_path.clone();
        let m = self.member(id);
        assert!(m.child.is_none(), "member {id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new(common::bin())
            .args(["node", "--cell"])
            .arg(&def)
            .args(["--id", &id.to_string(), "--data-dir"])
            .arg(&m.data_dir)
            .args(["--listen-client", &m.client.to_string()])
            .args(["--listen-peer", &m.listen_peer.to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn cellplane node");
        let pid = child.id();
        m.child = Some(child);
        m.paused = false;
        self.pids.lock().unwrap().insert(pid, id);
    }

    fn kill(&mut self, id: u64) {
        let pids = self.pids.clone();
        let m = self.member(id);
        if let Some(mut c) = m.child.take() {
            pids.lock().unwrap().remove(&c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
        m.paused = false;
    }

    fn signal(&mut self, id: u64, sig: Signal) {
        let m = self.member(id);
        if let Some(c) = &m.child {
            kill(Pid::from_raw(c.id() as i32), sig).unwrap();
            m.paused = sig == Signal::SIGSTOP;
        }
    }

    /// Every member running and awake, every link passing.
    fn heal(&mut self) {
        for id in 1..=self.members.len() as u64 {
            if self.member(id).paused {
                self.signal(id, Signal::SIGCONT);
            }
            if self.member(id).child.is_none() {
                self.spawn(id);
            }
        }
        for m in &self.members {
            for p in m.proxies() {
                p.set_link(Link::Pass);
            }
        }
    }

    /// Cuts member `id`'s links with the others: inbound (its own proxies), and
    /// unless `inbound_only`, outbound too (the others' proxies refuse it).
    fn cut(&self, id: u64, link: Link, inbound_only: bool) {
        for m in &self.members {
            if m.id == id {
                for p in m.proxies() {
                    p.set_link(link);
                }
            } else if !inbound_only {
                let mut rules = Rules::default();
                rules.by_source.insert(id, link);
                for p in m.proxies() {
                    p.set_rules(rules.clone());
                }
            }
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let (id, http) = (self.members[i].id, self.members[i].http);
            loop {
                let exited = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    panic!("member {id} exited ({status}):\n{}", self.log_of(id));
                }
                let ready = tokio::task::spawn_blocking(move || common::http_get(http, "/readyz"))
                    .await
                    .unwrap()
                    .is_some_and(|(code, _)| code == 200);
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "member {id} not ready in time:\n{}",
                    self.log_of(id)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.members[(id - 1) as usize].log).unwrap_or_default()
    }

    /// The leader most reachable members name now, if any.
    async fn leader_now(&self) -> Option<u64> {
        let mut votes: HashMap<u64, usize> = HashMap::new();
        for m in self
            .members
            .iter()
            .filter(|m| m.child.is_some() && !m.paused)
        {
            let status = async {
                let ch = common::channel(m.client).await.ok()?;
                let mut c =
                    cellplane_proto::etcdserverpb::maintenance_client::MaintenanceClient::new(ch);
                c.status(StatusRequest {}).await.ok()
            };
            if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(1), status).await {
                let l = r.into_inner().leader;
                if l != 0 {
                    *votes.entry(l).or_default() += 1;
                }
            }
        }
        votes.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l)
    }

    async fn resolve(&self, t: Target, rng: &mut Rng) -> u64 {
        let n = self.members.len() as u64;
        match t {
            Target::Member(id) => id,
            Target::Leader => match self.leader_now().await {
                Some(l) => l,
                None => 1 + rng.below(n),
            },
            Target::Follower => {
                let leader = self.leader_now().await;
                let others: Vec<u64> = (1..=n).filter(|id| Some(*id) != leader).collect();
                others[rng.below(others.len() as u64) as usize]
            }
        }
    }

    /// Starts `fault`; says what it did.
    async fn apply(&mut self, fault: Fault, rng: &mut Rng) -> String {
        let link = |c: Cut| match c {
            Cut::Blackhole => Link::Blackhole,
            Cut::Refuse => Link::Refuse,
        };
        match fault {
            Fault::Kill(t) => {
                let id = self.resolve(t, rng).await;
                self.kill(id);
                format!("kill -9 member {id} ({t:?})")
            }
            Fault::KillAll => {
                for id in 1..=self.members.len() as u64 {
                    self.kill(id);
                }
                "kill -9 every member".into()
            }
            Fault::Pause(t) => {
                let id = self.resolve(t, rng).await;
                self.signal(id, Signal::SIGSTOP);
                format!("SIGSTOP member {id} ({t:?})")
            }
            Fault::Isolate(t, c) => {
                let id = self.resolve(t, rng).await;
                self.cut(id, link(c), false);
                format!("isolate member {id} ({t:?}, {c:?})")
            }
            Fault::IsolateInbound(t, c) => {
                let id = self.resolve(t, rng).await;
                self.cut(id, link(c), true);
                format!("cut traffic into member {id} ({t:?}, {c:?})")
            }
            Fault::Slow(t, ms) => {
                let id = self.resolve(t, rng).await;
                self.cut(id, Link::Delay(Duration::from_millis(ms)), false);
                format!("delay member {id}'s links by {ms} ms ({t:?})")
            }
        }
    }
}

impl Drop for ProxiedCell {
    fn drop(&mut self) {
        for id in 1..=self.members.len() as u64 {
            self.kill(id);
        }
        self.proxies_stop.cancel();
    }
}

fn kv_client(addr: SocketAddr) -> KvClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    KvClient::new(ch)
}

/// How a run's clients read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// etcd's default: linearizable (ReadIndex).
    Linearizable,
    /// From the member's own state at once, possibly stale: only for the test
    /// that shows the checker catches stale reads.
    Serializable,
}

/// Runs one operation as an etcd client would.
async fn execute(
    kv: &mut KvClient<Channel>,
    key: &str,
    input: &KvInput,
    reads: Reads,
) -> Result<KvOutput, tonic::Status> {
    Ok(match input {
        KvInput::Get => {
            let mut req = common::get(key);
            req.serializable = reads == Reads::Serializable;
            let r = kv.range(req).await?.into_inner();
            KvOutput::Get(
                r.kvs
                    .first()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            )
        }
        KvInput::Put { value } => {
            kv.put(common::put(key, value)).await?;
            KvOutput::Put
        }
        KvInput::Cas { expect, new } => {
            // etcd's idioms: compare the value, or create_revision == 0 for "absent".
            let compare = match expect {
                Some(v) => Compare {
                    key: key.into(),
                    target: compare::CompareTarget::Value as i32,
                    result: compare::CompareResult::Equal as i32,
                    target_union: Some(compare::TargetUnion::Value(v.clone().into())),
                    ..Default::default()
                },
                None => Compare {
                    key: key.into(),
                    target: compare::CompareTarget::Create as i32,
                    result: compare::CompareResult::Equal as i32,
                    target_union: Some(compare::TargetUnion::CreateRevision(0)),
                    ..Default::default()
                },
            };
            let r = kv
                .txn(TxnRequest {
                    compare: vec![compare],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(common::put(key, new))),
                    }],
                    failure: vec![],
                })
                .await?
                .into_inner();
            KvOutput::Cas(r.succeeded)
        }
        KvInput::Delete => {
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: key.into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            KvOutput::Delete(r.deleted > 0)
        }
    })
}

fn hot_key(epoch: u64, i: u64) -> String {
    format!("/nemesis/e{epoch}/k{i}")
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

/// What every client shares.
struct Shared {
    rec: Recorder,
    counts: Counts,
    /// Writes acknowledged on keys of their own: (key, value).
    acked: Mutex<Vec<(String, String)>>,
    /// The current key generation.
    epoch: AtomicU64,
    reads: Reads,
}

/// One client: operations on the hot keys, one at a time, against a member it
/// keeps until a request fails (then it picks another at random), unless it is
/// `pinned` to one.
async fn client(
    id: u64,
    mut rng: Rng,
    addrs: Vec<SocketAddr>,
    pinned: Option<usize>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let kvs: Vec<KvClient<Channel>> = addrs.iter().map(|a| kv_client(*a)).collect();
    let pick = |rng: &mut Rng| pinned.unwrap_or_else(|| rng.below(kvs.len() as u64) as usize);
    let mut at = pick(&mut rng);
    let mut last_seen: HashMap<String, Option<String>> = HashMap::new();
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        seq += 1;
        let value = format!("c{id}-{seq}");
        let mut kv = kvs[at].clone();
        if rng.chance(10) {
            // A write on a key of its own: it must survive everything once acked.
            let key = format!("/nemesis/acked/c{id}-{seq}");
            let r = tokio::time::timeout(OP_DEADLINE, kv.put(common::put(&key, &value))).await;
            if let Ok(Ok(_)) = r {
                shared.acked.lock().unwrap().push((key, value));
            } else {
                at = pick(&mut rng);
            }
            continue;
        }
        let key = hot_key(shared.epoch.load(Ordering::Relaxed), rng.below(HOT_KEYS));
        let input = match rng.below(100) {
            0..=39 => KvInput::Get,
            40..=64 => KvInput::Put { value },
            65..=94 => KvInput::Cas {
                expect: last_seen.get(&key).cloned().flatten(),
                new: value,
            },
            _ => KvInput::Delete,
        };
        let pending = shared.rec.invoke(id, &key, input.clone());
        let result =
            tokio::time::timeout(OP_DEADLINE, execute(&mut kv, &key, &input, shared.reads)).await;
        match result {
            Ok(Ok(out)) => {
                let seen = match (&input, &out) {
                    (_, KvOutput::Get(v)) => Some(v.clone()),
                    (KvInput::Put { value }, _) => Some(Some(value.clone())),
                    (KvInput::Cas { new, .. }, KvOutput::Cas(true)) => Some(Some(new.clone())),
                    (_, KvOutput::Delete(_)) => Some(None),
                    _ => None,
                };
                if let Some(v) = seen {
                    last_seen.insert(key, v);
                }
                shared.rec.complete(pending, out);
                shared.counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            failed => {
                // A failed read tells nothing; a failed write may still happen.
                if input == KvInput::Get {
                    shared.rec.discard(pending);
                } else {
                    shared.rec.unknown(pending);
                }
                let c = if failed.is_err() {
                    &shared.counts.timed_out
                } else {
                    &shared.counts.failed
                };
                c.fetch_add(1, Ordering::Relaxed);
                at = pick(&mut rng);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(rng.millis(0, 10)).await;
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// One nemesis run.
struct Run {
    seed: u64,
    schedule: Vec<Step>,
    reads: Reads,
    /// Client 0 talks only to this member (by index).
    pin_client_0: Option<usize>,
}

/// What a run saw.
struct Outcome {
    cell: ProxiedCell,
    /// The faults as they happened.
    log: Vec<String>,
    ops: Vec<Operation>,
    /// Acknowledged writes on own keys missing at the end.
    lost: Vec<String>,
    acked: usize,
    verdict: Verdict,
    /// Hot keys read at the end.
    final_keys: usize,
}

async fn run(r: &Run) -> Outcome {
    let mut rng = Rng::new(r.seed ^ 0x5eed_0fc1_1e47);
    let mut cell = ProxiedCell::start(3).await;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        rec: Recorder::new(),
        counts: Counts::default(),
        acked: Mutex::new(Vec::new()),
        epoch: AtomicU64::new(0),
        reads: r.reads,
    });
    let stop_clients = CancellationToken::new();
    let addrs: Vec<SocketAddr> = cell.members.iter().map(|m| m.client).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client(
                c,
                rng.fork(),
                addrs.clone(),
                r.pin_client_0.filter(|_| c == 0),
                shared.clone(),
                stop_clients.clone(),
            ))
        })
        .collect();

    // Traffic before the first fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut log = Vec::new();
    for (round, step) in r.schedule.iter().enumerate() {
        if round > 0 && round % ROUNDS_PER_EPOCH == 0 {
            shared.epoch.fetch_add(1, Ordering::Relaxed);
        }
        let what = cell.apply(step.fault, &mut rng).await;
        let line = format!(
            "{:>6.1}s fault {round}: {what} for {} ms",
            started.elapsed().as_secs_f64(),
            step.hold_ms
        );
        eprintln!("{line}");
        log.push(line);
        tokio::time::sleep(Duration::from_millis(step.hold_ms)).await;
        cell.heal();
        tokio::time::sleep(Duration::from_millis(step.rest_ms)).await;
    }

    // Heal, let the clients finish what they started, and wait for the cell.
    cell.heal();
    stop_clients.cancel();
    for c in clients {
        c.await.unwrap();
    }
    cell.wait_ready(Duration::from_secs(60)).await;

    // A final linearizable read of every hot key joins the history: it is what
    // shows that acknowledged writes to the hot keys survived.
    let epochs = shared.epoch.load(Ordering::Relaxed) + 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let finals: Vec<KvClient<Channel>> = addrs.iter().map(|a| kv_client(*a)).collect();
    for e in 0..epochs {
        for k in 0..HOT_KEYS {
            let key = hot_key(e, k);
            let mut attempt = 0usize;
            loop {
                let p = shared.rec.invoke(CLIENTS, &key, KvInput::Get);
                let mut kv = finals[attempt % finals.len()].clone();
                let read = execute(&mut kv, &key, &KvInput::Get, Reads::Linearizable);
                match tokio::time::timeout(OP_DEADLINE, read).await {
                    Ok(Ok(out)) => {
                        shared.rec.complete(p, out);
                        break;
                    }
                    _ => {
                        shared.rec.discard(p);
                        attempt += 1;
                        assert!(
                            Instant::now() < deadline,
                            "final read of {key} never succeeded"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }

    let ops = shared.rec.operations();
    let unknown = ops.iter().filter(|o| o.output == KvOutput::Unknown).count();
    let acked = shared.acked.lock().unwrap().clone();
    eprintln!(
        "nemesis: {} operations recorded ({} ok, {} failed, {} timed out; {unknown} writes with unknown outcome), {} acknowledged writes on own keys, {:.1}s",
        ops.len(),
        shared.counts.ok.load(Ordering::Relaxed),
        shared.counts.failed.load(Ordering::Relaxed),
        shared.counts.timed_out.load(Ordering::Relaxed),
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    for m in &cell.members {
        for (name, p) in [("peer", &m.peer_proxy), ("client", &m.client_proxy)] {
            let st = p.stats();
            eprintln!(
                "nemesis: member {} {name} proxy: {} connections, {} refused, {} cut, {} unattributed",
                m.id,
                st.accepted.load(Ordering::Relaxed),
                st.refused.load(Ordering::Relaxed),
                st.cut.load(Ordering::Relaxed),
                st.unattributed.load(Ordering::Relaxed),
            );
        }
    }

    // Every acknowledged write on its own key, on every member.
    let mut lost = Vec::new();
    for m in &cell.members {
        let mut kv = kv_client(m.client);
        let mut got = None;
        for _ in 0..20 {
            let req = RangeRequest {
                key: "/nemesis/acked/".into(),
                range_end: "/nemesis/acked0".into(),
                ..Default::default()
            };
            if let Ok(Ok(r)) = tokio::time::timeout(OP_DEADLINE, kv.range(req)).await {
                got = Some(r.into_inner());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let got = got.unwrap_or_else(|| panic!("member {} never answered the final range", m.id));
        let present: HashMap<String, String> = got
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        for (k, v) in &acked {
            if present.get(k) != Some(v) {
                lost.push(format!(
                    "member {}: acknowledged {k} = {v} is missing",
                    m.id
                ));
            }
        }
    }

    let checked_at = Instant::now();
    let verdict = lincheck::check(&ops, &CheckOptions::default()).expect("well-formed history");
    eprintln!("nemesis: history checked in {:?}", checked_at.elapsed());
    Outcome {
        cell,
        log,
        ops,
        lost,
        acked: acked.len(),
        verdict,
        final_keys: (epochs * HOT_KEYS) as usize,
    }
}

/// Saves what is needed to look into a failure; returns the history file.
fn save_failure(r: &Run, o: &Outcome, problem: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let seed = r.seed;
    let path = dir.join(format!("nemesis-{seed}.json"));
    let doc = serde_json::json!({
        "seed": seed,
        "problem": problem,
        "schedule": r.schedule,
        "faults": o.log,
        "operations": o.ops,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    for m in &o.cell.members {
        let _ = std::fs::copy(
            &m.log,
            dir.join(format!("nemesis-{seed}-member{}.log", m.id)),
        );
    }
    path
}

fn fail(r: &Run, o: &Outcome, problem: &str) -> ! {
    let path = save_failure(r, o, problem);
    panic!(
        "{problem}\n\
         seed {seed}; history, schedule and member logs saved beside {path}\n\
         replay the schedule:  CELLPLANE_NEMESIS_SEED={seed} cargo test --release -p cellplane --test nemesis\n\
         re-check the history: CELLPLANE_NEMESIS_HISTORY={path} cargo test --release -p cellplane --test nemesis -- --ignored recheck_saved_history\n\
         bisect it offline:    cargo run --release -p cellplane-chaos --example lincheck -- {path} --bisect",
        seed = r.seed,
        path = path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_histories_on_a_three_member_cell_are_linearizable() {
    let soak = std::env::var("CELLPLANE_SOAK").is_ok_and(|v| v != "0" && !v.is_empty());
    let seed = env_u64("CELLPLANE_NEMESIS_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let rounds = env_u64("CELLPLANE_NEMESIS_ROUNDS").unwrap_or(if soak { 80 } else { 10 }) as usize;
    eprintln!(
        "nemesis: seed {seed}, {rounds} faults (replay: CELLPLANE_NEMESIS_SEED={seed} cargo test --release -p cellplane --test nemesis)"
    );
    let r = Run {
        seed,
        schedule: nemesis::schedule(seed, rounds, 3),
        reads: Reads::Linearizable,
        pin_client_0: None,
    };
    let o = run(&r).await;
    if !o.lost.is_empty() {
        let problem = format!(
            "{} acknowledged writes lost:\n{}",
            o.lost.len(),
            o.lost.join("\n")
        );
        fail(&r, &o, &problem);
    }
    match &o.verdict {
        Verdict::Linearizable { keys, operations } => {
            eprintln!("nemesis: linearizable: {operations} operations on {keys} keys");
            assert_eq!(*keys, o.final_keys, "every hot key was read at the end");
        }
        Verdict::NotLinearizable(v) => fail(&r, &o, &format!("linearizability violation:\n{v}")),
        Verdict::GaveUp { key, steps } => fail(
            &r,
            &o,
            &format!("the checker gave up on {key} after {steps} steps"),
        ),
    }
    // The faults left room for progress: writes were acknowledged on hot keys
    // and on own keys alike.
    assert!(
        o.ops.iter().any(|op| op.output == KvOutput::Put),
        "no put on a hot key was ever acknowledged"
    );
    assert!(o.acked > 0, "no write on an own key was ever acknowledged");
}

/// The harness can see a violation: with serializable reads (which etcd allows
/// to be stale) and a client reading from a follower cut off from the others,
/// the history is not linearizable, and the checker must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_from_an_isolated_follower_are_caught() {
    let cut_off = Step {
        fault: Fault::Isolate(Target::Member(3), Cut::Refuse),
        hold_ms: 3_000,
        rest_ms: 500,
    };
    let r = Run {
        seed: 1,
        schedule: vec![cut_off, cut_off],
        reads: Reads::Serializable,
        pin_client_0: Some(2),
    };
    let o = run(&r).await;
    match &o.verdict {
        Verdict::NotLinearizable(v) => {
            eprintln!("caught, as it should be:\n{v}");
            assert!(v.history.iter().any(|op| op.client == 0));
        }
        v => fail(
            &r,
            &o,
            &format!("stale reads from an isolated follower went unnoticed: {v:?}"),
        ),
    }
}

/// A linearizable read sent while the leader's quorum answers late (both
/// followers' links slowed past openraft's deadline for a confirmation round,
/// one heartbeat interval, as when their disks stall) waits for a round that
/// succeeds instead of failing at once, and sees the write before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_out_a_quorum_that_answers_late() {
    let cell = ProxiedCell::start(3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let Some(l) = cell.leader_now().await {
            break l;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut kv = kv_client(cell.members[(leader - 1) as usize].client);
    kv.put(common::put("/late", "before")).await.unwrap();

    // 200 ms each way on every link into both followers: each round of
    // heartbeats misses its 100 ms deadline until the links heal.
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in &followers {
        cell.cut(*id, Link::Delay(Duration::from_millis(200)), true);
    }
    let proxies: Vec<_> = followers
        .iter()
        .flat_map(|id| cell.members[(*id - 1) as usize].proxies())
        .collect();
    let read = kv.range(common::get("/late"));
    let heal = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        for p in &proxies {
            p.set_link(Link::Pass);
        }
    };
    let (r, ()) = tokio::join!(read, heal);
    let r = r.unwrap_or_else(|s| panic!("the read failed instead of waiting: {s:?}"));
    assert_eq!(r.into_inner().kvs[0].value, b"before");
}

/// Re-checks a history saved by a failing run:
/// `CELLPLANE_NEMESIS_HISTORY=<file> cargo test --release -p cellplane --test nemesis -- --ignored recheck_saved_history`
#[test]
#[ignore = "needs CELLPLANE_NEMESIS_HISTORY=<saved history>"]
fn recheck_saved_history() {
    let path = std::env::var("CELLPLANE_NEMESIS_HISTORY")
        .expect("set CELLPLANE_NEMESIS_HISTORY to a history saved by a failing nemesis run");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the history")).expect("JSON");
    let ops: Vec<Operation> =
        serde_json::from_value(doc["operations"].clone()).expect("operations");
    eprintln!(
        "seed {}, {} operations; {}",
        doc["seed"],
        ops.len(),
        doc["problem"]
    );
    let verdict = lincheck::check(&ops, &CheckOptions::default()).expect("well-formed history");
    match verdict {
        Verdict::NotLinearizable(v) => panic!("{v}"),
        Verdict::GaveUp { key, steps } => panic!("gave up on {key} after {steps} steps"),
        v => eprintln!("{v:?}"),
    }
}
