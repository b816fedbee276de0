//! Batches concurrent writes into one Raft entry, and hands a follower's batches to
//! the leader.
//!
//! openraft appends and fsyncs each entry it is given before it takes the next
//! from the same leader (one fsync per entry, measured: 11,174 fsyncs for 11,174
//! puts). So the member batches itself: while `in_flight` batches are being
//! replicated, new commands queue; the next batch takes everything queued, up to
//! `max_batch_bytes`. Under load a batch grows to the number of waiting clients and
//! one fsync serves them all; a lone client still gets its write proposed at once.
//!
//! A follower batches the same way and sends the whole batch to the leader in one
//! peer RPC (`Raft.Propose`), which appends it as one entry and answers every
//! command's outcome: one hop per batch instead of one client call per write. The
//! leader never passes a forwarded batch on (one hop, as a forwarded client request)
//! and never merges it with its own commands. A batch whose RPC may have reached
//! the leader is never sent again: if its answer is lost, each of its writes fails
//! with an error that says the outcome is unknown, as etcd does.
//!
//! A command that reads stored history (a compaction, a txn reading at an explicit
//! revision) is proposed alone (see `Command::reads_history`).

use std::sync::Arc;
use std::time::Duration;

use cellplane_storage::{Batch, BatchResponse, Command, CommandResponse, NodeId};
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Raft;
use crate::network::Network;
use crate::network::bytes_payload::{decode, encode};
use crate::peer_stream::{ExchangeError, Slot};

/// Most commands in one batch.
pub(crate) const MAX_BATCH_COMMANDS: usize = 4096;

/// Commands waiting to be batched. When full, `propose` waits: a bounded queue.
const QUEUE: usize = 16_384;

/// Batches a follower has at the leader at once. Each becomes a Raft entry of its
/// own next to the leader's, and fewer, larger entries are cheaper: with one, 64
/// clients spread over a cell's members ran as fast as with per-request
/// forwarding and 256 clients 12 % faster; with two, 64 clients ran 10 % slower.
const FORWARDS_IN_FLIGHT: usize = 1;

/// Why a command was not applied here.
#[derive(Debug, Clone)]
pub enum ProposalError {
    /// Not applied: this member does not lead (and may not hand the command to the
    /// leader itself); the leader, if known.
    Forward(Option<NodeId>),
    /// Raft refused or failed (shutting down, a storage fault), or a forwarded
    /// batch's outcome is unknown. Never retried automatically.
    Failed(String),
}

type Reply = Result<(CommandResponse, u64), ProposalError>;

/// A command waiting for its batch.
struct Pending {
    cmd: Command,
    /// Whether a follower may send it to the leader in a forwarded batch.
    forwardable: bool,
    reply: oneshot::Sender<Reply>,
}

/// What a follower sends the leader (`Raft.Propose`, postcard-encoded).
#[derive(Debug, Serialize, Deserialize)]
pub struct ProposeRequest {
    /// The member that collected the batch (for the leader's logs).
    pub from: NodeId,
    pub batch: Batch,
}

/// The leader's answer to a forwarded batch.
pub type ProposeReply = Result<Proposed, ProposeRefused>;

/// A forwarded batch, committed and applied as one entry.
#[derive(Debug, Serialize, Deserialize)]
pub struct Proposed {
    /// The term and leader of the entry.
    pub term: u64,
    pub leader: NodeId,
    /// One outcome per command, in order.
    pub responses: BatchResponse,
}

/// Why the leader did not apply a forwarded batch.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeRefused {
    /// Not appended: the member asked does not lead; the leader it knows, if any.
    /// Safe to send elsewhere.
    NotLeader(Option<NodeId>),
    /// Not appended: the batch breaks a batching rule.
    Invalid(String),
    /// Raft failed after the batch may have been appended: outcome unknown.
    Failed(String),
}

/// Handle to a member's proposer. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

/// How a follower reaches the leader with its batches.
/// The largest reply to a forwarded batch: the outcomes of up to a batch's
/// commands, each of which may carry a txn's range results. Generous on
/// purpose: a reply over it fails after the batch committed, and its clients
/// see "outcome unknown", as after a lost connection.
pub const MAX_FORWARDED_REPLY_BYTES: usize = 1 << 30;

pub struct ForwardSettings {
    /// The gRPC limit of a response: a batch's outcomes are at most this.
    pub max_response_bytes: usize,
    /// This member.
    pub me: NodeId,
    pub network: Network,
    /// Deadline of one forwarded batch (the client request timeout: the batch has to
    /// be committed and applied on the leader within it).
    pub timeout: Duration,
    /// The stream batches go to the leader on (`peer_stream`); one batch is out
    /// at a time (`FORWARDS_IN_FLIGHT`), so the lock is not contended.
    pub(crate) stream: tokio::sync::Mutex<LeaderStream>,
}

/// A follower's stream to the leader it forwards to.
#[derive(Default)]
pub(crate) struct LeaderStream {
    /// The leader and its peer address; another leader gets a new stream.
    to: Option<(NodeId, String)>,
    slot: Slot,
}

impl Proposer {
    /// Starts the batching loop; it stops when `shutdown` is cancelled.
    pub fn start(
        raft: Raft,
        forward: ForwardSettings,
        max_batch_bytes: usize,
        in_flight: usize,
        shutdown: CancellationToken,
    ) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(
            raft,
            Arc::new(forward),
            rx,
            max_batch_bytes,
            in_flight,
            shutdown,
        ));
        (Proposer { tx }, task)
    }

    /// Proposes `cmd` and waits for its outcome and the term it committed in. On a
    /// follower a `forwardable` command is sent to the leader in a batch; any other
    /// gets `ProposalError::Forward`.
    pub async fn propose(&self, cmd: Command, forwardable: bool) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                cmd,
                forwardable,
                reply: tx,
            })
            .await
            .map_err(|_| ProposalError::Failed("member is shutting down".into()))?;
        rx.await
            .map_err(|_| ProposalError::Failed("member is shutting down".into()))?
    }
}

async fn run(
    raft: Raft,
    forward: Arc<ForwardSettings>,
    mut rx: mpsc::Receiver<Pending>,
    max_batch_bytes: usize,
    in_flight: usize,
    shutdown: CancellationToken,
) {
    // Bounds the batches being replicated from here, and (apart) the batches a
    // follower is forwarding to the leader.
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    let forward_slots = Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT));
    let mut held: Option<Pending> = None;
    loop {
        // Wait for room first: commands keep queueing meanwhile, which is what
        // makes the next batch large under load. The batch goes where the view is
        // when it is sent; a permit taken just before a leader change bounds the
        // other kind for one batch.
        let permit = loop {
            let mut metrics = raft.metrics();
            let leader = metrics.borrow().current_leader;
            let room = if leader_elsewhere(&raft).is_some() {
                &forward_slots
            } else {
                &slots
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                p = room.clone().acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return,
                },
                // Elected (or following another) while every slot of the old
                // role is taken, say by a batch waiting on a dead leader.
                changed = metrics.wait_for(|m| m.current_leader != leader) => {
                    if changed.is_err() {
                        return; // Raft has stopped.
                    }
                }
            }
        };
        let first = match held.take() {
            Some(f) => f,
            None => tokio::select! {
                _ = shutdown.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            },
        };
        let alone = first.cmd.reads_history();
        let mut bytes = first.cmd.size();
        let mut batch = vec![first];
        while !alone && batch.len() < MAX_BATCH_COMMANDS {
            let Ok(p) = rx.try_recv() else { break };
            if p.cmd.reads_history() || bytes + p.cmd.size() > max_batch_bytes {
                held = Some(p);
                break;
            }
            bytes += p.cmd.size();
            batch.push(p);
        }
        let raft = raft.clone();
        let forward = forward.clone();
        tokio::spawn(async move {
            match leader_elsewhere(&raft) {
                Some((leader, addr)) => forward_batch(&raft, &forward, leader, addr, batch).await,
                None => propose_here(&raft, batch).await,
            }
            drop(permit);
        });
    }
}

/// The leader and its peer address, if this member knows another member leads.
fn leader_elsewhere(raft: &Raft) -> Option<(NodeId, Option<String>)> {
    let m = raft.metrics();
    let m = m.borrow();
    let leader = m.current_leader.filter(|l| *l != m.id)?;
    let addr = m
        .membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.peer_addr.clone());
    Some((leader, addr))
}

/// Appends the batch here (this member leads, or no leader is known and openraft
/// says who to ask).
async fn propose_here(raft: &Raft, batch: Vec<Pending>) {
    let (cmds, waiters): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    match raft.client_write(Batch(cmds)).await {
        Ok(resp) => {
            let term = resp.log_id.leader_id.term;
            complete(waiters, resp.data, term);
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            for w in waiters {
                let _ = w.send(Err(ProposalError::Forward(f.leader_id)));
            }
        }
        Err(e) => fail(waiters, &e.to_string()),
    }
}

/// Sends the forwardable commands of a batch to the leader in one RPC; the others
/// are told to forward themselves. If this member learns of another leader (or
/// of none) while the RPC is out, the batch's outcome is reported unknown at
/// once: a leader that froze would otherwise hold the writes until it thaws or
/// the RPC times out, long after the cell elected another.
async fn forward_batch(
    raft: &Raft,
    forward: &ForwardSettings,
    leader: NodeId,
    addr: Option<String>,
    batch: Vec<Pending>,
) {
    let mut cmds = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    for p in batch {
        if p.forwardable {
            cmds.push(p.cmd);
            waiters.push(p.reply);
        } else {
            let _ = p.reply.send(Err(ProposalError::Forward(Some(leader))));
        }
    }
    if cmds.is_empty() {
        return;
    }
    let Some(addr) = addr else {
        // Nothing was sent: the client may retry anywhere.
        return fail(
            waiters,
            &format!("etcdserver: leader {leader} is not in this member's membership view"),
        );
    };
    let mut metrics = raft.metrics();
    let sent = tokio::select! {
        r = send(forward, leader, &addr, Batch(cmds)) => r,
        _ = metrics.wait_for(|m| m.current_leader != Some(leader)) => Err(Sent::Failed(format!(
            "etcdserver: write forwarded to leader {leader}, outcome unknown (it may or may \
             not have been applied): the cell elected another leader meanwhile"
        ))),
    };
    match sent {
        Ok(p) => complete(waiters, p.responses, p.term),
        // Known not appended: forward each client request the old way, or wait for
        // a leader (see `Shared::propose`).
        Err(Sent::NotApplied(hint)) => {
            for w in waiters {
                let _ = w.send(Err(ProposalError::Forward(hint)));
            }
        }
        Err(Sent::Failed(msg)) => fail(waiters, &msg),
    }
}

/// How a forward RPC ended when it produced no outcomes.
enum Sent {
    /// The batch was not appended; the leader to ask instead, if known.
    NotApplied(Option<NodeId>),
    /// The batch was refused, or its outcome is unknown. Never retried.
    Failed(String),
}

async fn send(
    forward: &ForwardSettings,
    leader: NodeId,
    addr: &str,
    batch: Batch,
) -> Result<Proposed, Sent> {
    let unknown = |what: String| {
        Sent::Failed(format!(
            "etcdserver: write forwarded to leader {leader}, outcome unknown \
             (it may or may not have been applied): {what}"
        ))
    };
    let client = forward
        .network
        .client(leader, addr)
        .map_err(|e| Sent::Failed(format!("cannot reach leader {leader}: {e}")))?;
    // Outcomes (a txn's range results) may be larger than any request, up to a
    // response's limit.
    let mut client = client.max_decoding_message_size(forward.max_response_bytes);
    let n = batch.0.len();
    let payload = encode(&ProposeRequest {
        from: forward.me,
        batch,
    })
    .map_err(|s| Sent::Failed(format!("cannot encode a forwarded batch: {}", s.message())))?;
    let mut stream = forward.stream.lock().await;
    if !stream
        .to
        .as_ref()
        .is_some_and(|(l, a)| *l == leader && a == addr)
    {
        *stream = LeaderStream {
            to: Some((leader, addr.to_string())),
            slot: Slot::default(),
        };
    }
    let timeout = forward.timeout;
    let opener = client.clone();
    let unary = |payload| async move {
        let mut request = tonic::Request::new(payload);
        request.set_timeout(timeout);
        client
            .propose(request)
            .await
            .map(tonic::Response::into_inner)
    };
    let reply = stream
        .slot
        .call(
            |s| async move { opener.clone().propose_stream(s).await },
            unary,
            payload,
            timeout,
        )
        .await;
    drop(stream);
    let reply = match reply {
        Ok(reply) => reply,
        Err(ExchangeError::Open(s)) => {
            return Err(Sent::Failed(format!(
                "cannot reach leader {leader} (nothing was sent): {}",
                s.message()
            )));
        }
        // An older leader without the RPC: nothing ran there.
        Err(ExchangeError::Sent(s)) if s.code() == tonic::Code::Unimplemented => {
            return Err(Sent::NotApplied(Some(leader)));
        }
        Err(ExchangeError::Sent(s)) => {
            return Err(unknown(format!("{:?}: {}", s.code(), s.message())));
        }
    };
    let reply: ProposeReply = decode(&reply).map_err(|s| unknown(s.message().to_string()))?;
    match reply {
        Ok(p) if p.responses.0.len() == n => Ok(p),
        Ok(p) => Err(unknown(format!(
            "{} outcomes for {n} commands",
            p.responses.0.len()
        ))),
        Err(ProposeRefused::NotLeader(hint)) => Err(Sent::NotApplied(hint)),
        Err(ProposeRefused::Invalid(msg)) => Err(Sent::Failed(format!(
            "leader {leader} refused a forwarded batch: {msg}"
        ))),
        Err(ProposeRefused::Failed(msg)) => Err(unknown(msg)),
    }
}

fn complete(waiters: Vec<oneshot::Sender<Reply>>, outcomes: BatchResponse, term: u64) {
    let mut outcomes = outcomes.0.into_iter();
    for w in waiters {
        let r = match outcomes.next() {
            Some(o) => Ok((o, term)),
            None => Err(ProposalError::Failed(
                "apply returned too few outcomes".into(),
            )),
        };
        let _ = w.send(r);
    }
}

fn fail(waiters: Vec<oneshot::Sender<Reply>>, msg: &str) {
    for w in waiters {
        let _ = w.send(Err(ProposalError::Failed(msg.to_string())));
    }
}

/// The leader's side of `Raft.Propose`: appends a follower's batch as one entry of
/// its own (never merged with this member's batches, never passed on).
///
/// Concurrency is bounded by the senders: each follower has at most
/// `FORWARDS_IN_FLIGHT` batches outstanding.
pub(crate) async fn serve_forwarded(
    raft: &Raft,
    req: ProposeRequest,
    max_batch_bytes: usize,
) -> ProposeReply {
    let cmds = &req.batch.0;
    let n = cmds.len();
    if n == 0 {
        return Err(ProposeRefused::Invalid("empty batch".into()));
    }
    if n > 1 {
        if n > MAX_BATCH_COMMANDS {
            return Err(ProposeRefused::Invalid(format!(
                "{n} commands, at most {MAX_BATCH_COMMANDS}"
            )));
        }
        let bytes: usize = cmds.iter().map(Command::size).sum();
        if bytes > max_batch_bytes {
            return Err(ProposeRefused::Invalid(format!(
                "{bytes} bytes of commands, at most {max_batch_bytes}"
            )));
        }
        // Its outcome must not depend on what it was grouped with.
        if cmds.iter().any(Command::reads_history) {
            return Err(ProposeRefused::Invalid(
                "a command reading history must be proposed alone".into(),
            ));
        }
    }
    match raft.client_write(req.batch).await {
        Ok(resp) => Ok(Proposed {
            term: resp.log_id.leader_id.term,
            leader: resp.log_id.leader_id.node_id,
            responses: resp.data,
        }),
        // Refused before appending, or appended and then truncated by a new
        // leader: not applied either way, so the follower may send it elsewhere.
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(ProposeRefused::NotLeader(f.leader_id))
        }
        Err(e) => {
            tracing::warn!(from = req.from, error = %e, "forwarded batch failed");
            Err(ProposeRefused::Failed(e.to_string()))
        }
    }
}
