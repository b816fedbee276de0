//! Raft between the members of one cell, over gRPC (`cellplane.raft.v1.Raft`),
//! with the two calls a follower makes to its leader: ReadIndex and Propose
//! (batches of forwarded writes, see `proposer`).
//!
//! openraft's RPC types travel as postcard-encoded bytes: the schema is the Rust
//! type, and both ends always run the same binary within a cell's upgrade window.
//! Every call has a deadline and every message a size limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes_payload::{decode, encode};
use cellplane_proto::raft::RaftPayload;
use cellplane_proto::raft::raft_client::RaftClient;
use cellplane_proto::raft::raft_server::Raft as RaftRpc;
use cellplane_storage::{Member, NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::Raft;
use crate::peer_stream::{Answers, ExchangeError, Slot};
use crate::proposer::{ProposeRequest, serve_forwarded};
use crate::read_index::{ReadBarrier, ReadIndexReply};

/// Encoding of payloads.
pub(crate) mod bytes_payload {
    use tonic::Status;

    pub fn encode<T: serde::Serialize>(
        v: &T,
    ) -> Result<cellplane_proto::raft::RaftPayload, Status> {
        postcard::to_stdvec(v)
            .map(|b| cellplane_proto::raft::RaftPayload { data: b.into() })
            .map_err(|e| Status::internal(format!("cannot encode raft message: {e}")))
    }

    pub fn decode<T: serde::de::DeserializeOwned>(
        p: &cellplane_proto::raft::RaftPayload,
    ) -> Result<T, Status> {
        postcard::from_bytes(&p.data)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
    }
}

/// How often a member pings each connection to or from a peer, and how long it
/// waits for the answer before it closes the connection (and the streams on it).
pub(crate) const PEER_KEEPALIVE: Duration = Duration::from_secs(5);

/// Creates one client per peer; connections are made lazily and reused.
#[derive(Clone)]
pub struct Network {
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    max_message_bytes: usize,
    connect_timeout: Duration,
    /// This member's TLS identity toward its peers (mTLS), when TLS is on.
    tls: Option<ClientTlsConfig>,
}

impl Network {
    pub fn new(
        max_message_bytes: usize,
        connect_timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Network {
        Network {
            channels: Arc::default(),
            max_message_bytes,
            connect_timeout,
            tls,
        }
    }

    /// A client for the member at `peer_addr` (`host:port`).
    pub(crate) fn client(
        &self,
        target: NodeId,
        peer_addr: &str,
    ) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let channel = {
            let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            // Keyed by address too: a member whose peer address changed
            // (MemberUpdate) is dialled at the new one.
            match map.get(&(target, peer_addr.to_string())) {
                Some(c) => c.clone(),
                None => {
                    let c = cellplane_security::endpoint(peer_addr, self.tls.as_ref())?
                        .connect_timeout(self.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(PEER_KEEPALIVE)
                        .keep_alive_timeout(PEER_KEEPALIVE)
                        .connect_lazy();
                    map.retain(|(id, _), _| *id != target);
                    map.insert((target, peer_addr.to_string()), c.clone());
                    c
                }
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerClient {
            target,
            client: self
                .client(target, &node.peer_addr)
                .map_err(|e| e.to_string()),
            appends: Slot::default(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
    /// AppendEntries go over one lockstep stream (`peer_stream`); votes and
    /// snapshots, rare, as unary calls.
    appends: Slot,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        method: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    e.clone(),
                ))));
            }
        };
        let payload = encode(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let ttl = option.hard_ttl();
        let result = if method == "append" {
            let opener = client.clone();
            self.appends
                .call(
                    |s| async move { opener.clone().append_entries_stream(s).await },
                    |p| unary(client, method, p, ttl),
                    payload,
                    ttl,
                )
                .await
                .map_err(ExchangeError::into_status)
        } else {
            unary(client, method, payload, ttl).await
        };
        let payload = result.map_err(|s| match s.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
            _ => RPCError::Network(NetworkError::new(&s)),
        })?;
        let reply: Result<Resp, RaftError<NodeId, E>> =
            decode(&payload).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// One unary Raft call with a deadline.
async fn unary(
    mut client: RaftClient<Channel>,
    method: &'static str,
    payload: RaftPayload,
    timeout: Duration,
) -> Result<RaftPayload, Status> {
    let mut request = Request::new(payload);
    request.set_timeout(timeout);
    let response = match method {
        "append" => client.append_entries(request).await,
        "vote" => client.vote(request).await,
        _ => client.install_snapshot(request).await,
    };
    response.map(Response::into_inner)
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call("vote", &rpc, &option).await
    }
}

/// The server side: hands peers' messages to the local Raft.
pub struct RaftService {
    raft: Raft,
    barrier: ReadBarrier,
    /// The batch limit forwarded batches are held to (the proposer's).
    max_batch_bytes: usize,
    /// Ends the peers' long-lived streams when the member stops.
    shutdown: CancellationToken,
}

impl RaftService {
    pub fn new(
        raft: Raft,
        barrier: ReadBarrier,
        max_batch_bytes: usize,
        shutdown: CancellationToken,
    ) -> RaftService {
        RaftService {
            raft,
            barrier,
            max_batch_bytes,
            shutdown,
        }
    }
}

async fn append(raft: Raft, req: RaftPayload) -> Result<RaftPayload, Status> {
    let rpc: AppendEntriesRequest<TypeConfig> = decode(&req)?;
    encode(&raft.append_entries(rpc).await)
}

async fn propose(
    raft: Raft,
    req: RaftPayload,
    max_batch_bytes: usize,
) -> Result<RaftPayload, Status> {
    let rpc: ProposeRequest = decode(&req)?;
    encode(&serve_forwarded(&raft, rpc, max_batch_bytes).await)
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(
            append(self.raft.clone(), req.into_inner()).await?,
        ))
    }

    type AppendEntriesStreamStream = Answers;

    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Answers>, Status> {
        let raft = self.raft.clone();
        Ok(Response::new(crate::peer_stream::serve(
            req.into_inner(),
            self.shutdown.clone(),
            move |p| append(raft.clone(), p),
        )))
    }

    type ProposeStreamStream = Answers;

    async fn propose_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Answers>, Status> {
        let raft = self.raft.clone();
        let max = self.max_batch_bytes;
        Ok(Response::new(crate::peer_stream::serve(
            req.into_inner(),
            self.shutdown.clone(),
            move |p| propose(raft.clone(), p, max),
        )))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        let reply = self.raft.vote(rpc).await;
        Ok(Response::new(encode(&reply)?))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        let reply = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(encode(&reply)?))
    }

    async fn read_index(
        &self,
        _req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        // Only the leader answers: a member that is not (or no longer) the leader
        // must not pass the question on, or two members with stale views could
        // wait on each other. Through the leader's own barrier, so that reads from
        // every follower share its confirmation rounds.
        let m = self.raft.metrics().borrow().clone();
        let reply: ReadIndexReply = if m.current_leader != Some(m.id) {
            Err(format!("member {} is not the leader", m.id))
        } else {
            self.barrier.read_index().await.map_err(|e| e.to_string())
        };
        Ok(Response::new(encode(&reply)?))
    }

    async fn propose(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(
            propose(self.raft.clone(), req.into_inner(), self.max_batch_bytes).await?,
        ))
    }
}
