//! Linearizable reads through Raft's ReadIndex, batched.
//!
//! A read must see every write acknowledged before it started. The member asks the
//! leader (itself, or over the Raft transport) for the current commit index, which
//! the leader confirms by a heartbeat round with a quorum, then waits until its own
//! state machine has applied that index and reads locally. Every read that arrived
//! before a confirmation round started shares that round, so a burst of reads costs
//! one round, not one each (as etcd's read loop does).

use std::time::Duration;

use cellplane_storage::AppliedState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::Raft;
use crate::network::Network;
use crate::network::bytes_payload::{decode, encode};

/// What the leader answers a follower's ReadIndex: the index to wait for, or why it
/// cannot confirm its leadership.
pub type ReadIndexReply = Result<u64, String>;

/// Reads waiting for the next confirmation round. When full, a read waits for room:
/// a bounded queue, never an unbounded one.
const QUEUE: usize = 65_536;

/// Why a linearizable read could not be confirmed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadIndexError {
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The leader answered but reached no quorum in time: worth another round.
    #[error("cannot confirm leadership: {0}")]
    Unconfirmed(String),
    /// The leader this member knows did not answer (gone, or cut off from
    /// here): fails at once, so the client or router tries another member.
    #[error("cannot reach the leader: {0}")]
    LeaderUnreachable(String),
    #[error("member is shutting down")]
    Stopped,
}

/// What the barrier counts, for the member's metrics: reads per round is how
/// well rounds are shared (each round is a heartbeat to every follower).
#[derive(Clone, Default)]
pub struct Counts {
    /// Confirmation rounds run (on a follower, each asks the leader once).
    pub rounds: prometheus_client::metrics::counter::Counter,
    /// Reads those rounds answered: this member's and, on the leader, the
    /// followers' ReadIndex calls.
    pub reads: prometheus_client::metrics::counter::Counter,
}

/// Handle to the read barrier of one member. Cheap to clone.
#[derive(Clone)]
pub struct ReadBarrier {
    tx: mpsc::Sender<oneshot::Sender<Result<u64, ReadIndexError>>>,
}

impl ReadBarrier {
    /// Starts the batching loop; it stops when `shutdown` is cancelled.
    pub fn start(
        raft: Raft,
        network: Network,
        rpc_timeout: Duration,
        counts: Counts,
        shutdown: CancellationToken,
    ) -> (ReadBarrier, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(raft, network, rpc_timeout, counts, rx, shutdown));
        (ReadBarrier { tx }, task)
    }

    /// Returns a log index such that a local read after it is applied is
    /// linearizable.
    pub async fn read_index(&self) -> Result<u64, ReadIndexError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| ReadIndexError::Stopped)?;
        rx.await.map_err(|_| ReadIndexError::Stopped)?
    }

    /// Waits until a linearizable read may be served from the local state machine.
    pub async fn wait_linearizable(
        &self,
        applied: &mut watch::Receiver<AppliedState>,
    ) -> Result<(), ReadIndexError> {
        let index = self.read_index().await?;
        applied
            .wait_for(|a| a.log_index >= index)
            .await
            .map_err(|_| ReadIndexError::Stopped)?;
        Ok(())
    }
}

async fn run(
    raft: Raft,
    network: Network,
    rpc_timeout: Duration,
    counts: Counts,
    mut rx: mpsc::Receiver<oneshot::Sender<Result<u64, ReadIndexError>>>,
    shutdown: CancellationToken,
) {
    let mut waiters = Vec::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = rx.recv() => match w { Some(w) => w, None => return },
        };
        waiters.push(first);
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        counts.rounds.inc();
        counts.reads.inc_by(waiters.len() as u64);
        let result = tokio::select! {
            _ = shutdown.cancelled() => Err(ReadIndexError::Stopped),
            r = confirm_retrying(&raft, &network, rpc_timeout) => r,
        };
        for w in waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

/// Pause before trying an unconfirmed round again, doubling up to the cap.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(200);

/// [`confirm`], tried again for up to `budget` while the leader is known but a
/// round reaches no quorum, as etcd's read loop retries ReadIndex. openraft
/// gives each round one heartbeat interval: a follower whose disk is busy (an
/// fsync of a second while the machine writes back) answers a round late, so
/// one round fails where the next succeeds. Every waiter arrived before the
/// retried round started, so sharing its answer stays linearizable. No leader,
/// or a leader that does not answer at all, still fails at once: the router or
/// client tries another member instead of waiting here.
async fn confirm_retrying(
    raft: &Raft,
    network: &Network,
    budget: Duration,
) -> Result<u64, ReadIndexError> {
    let deadline = tokio::time::Instant::now() + budget;
    let mut pause = RETRY_PAUSE;
    loop {
        match confirm(raft, network, budget).await {
            Err(ReadIndexError::Unconfirmed(why))
                if tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(%why, "read index round not confirmed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
            r => return r,
        }
    }
}

async fn confirm(
    raft: &Raft,
    network: &Network,
    rpc_timeout: Duration,
) -> Result<u64, ReadIndexError> {
    let metrics = raft.metrics().borrow().clone();
    let leader = metrics.current_leader.ok_or(ReadIndexError::NoLeader)?;
    if leader == metrics.id {
        let (read, _) = raft
            .get_read_log_id()
            .await
            .map_err(|e| ReadIndexError::Unconfirmed(e.to_string()))?;
        return Ok(read.map(|l| l.index).unwrap_or(0));
    }
    let member = metrics
        .membership_config
        .membership()
        .get_node(&leader)
        .cloned()
        .ok_or(ReadIndexError::NoLeader)?;
    let unreachable =
        |why: String| ReadIndexError::LeaderUnreachable(format!("leader {leader}: {why}"));
    let mut client = network
        .client(leader, &member.peer_addr)
        .map_err(|e| unreachable(e.to_string()))?;
    let payload = encode(&()).map_err(|e| unreachable(e.to_string()))?;
    let mut req = tonic::Request::new(payload);
    req.set_timeout(rpc_timeout);
    let reply = client
        .read_index(req)
        .await
        .map_err(|s| unreachable(s.message().to_string()))?;
    let reply: ReadIndexReply =
        decode(reply.get_ref()).map_err(|s| unreachable(s.message().to_string()))?;
    reply.map_err(|e| ReadIndexError::Unconfirmed(format!("leader {leader}: {e}")))
}
