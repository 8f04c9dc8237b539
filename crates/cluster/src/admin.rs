//! The operator's way in: `hamgam admin` talks to a node on the peer
//! endpoint with ALPN [`ADMIN_ALPN`]. Like a node, it must present a
//! certificate issued by the cluster CA, so only someone holding a member's
//! identity (or one issued for them) can ask. One request per bidi stream,
//! encoded with the workspace codec, each side bounded.

use crate::exchange;
use crate::join::propose_cluster;
use crate::membership::{ClusterCommand, ClusterReply, MemberRecord, MemberState};
use hamgam_raftstore::{ProposeError, RaftHandle, ReplicaChange, ShardStatus};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

pub const ADMIN_ALPN: &[u8] = b"hamgam-admin/1";

const REQUEST_BYTES_MAX: usize = 64 << 10;
const RESPONSE_BYTES_MAX: usize = 8 << 20;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Wire enums append variants only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// This node's view of itself and of each shard it hosts.
    Status,
    /// Drain (or remove, or reactivate) a member, through shard 0.
    SetMemberState { node: NodeId, state: MemberState },
    /// One configuration change of a shard this node leads.
    ChangeReplicas { shard: ShardId, change: ReplicaChange },
    /// Give up this node's (former) replica of a shard: for the placement
    /// driver, once the shard's leader no longer counts this node.
    ReleaseReplica { shard: ShardId },
    /// Hand the lead of a shard this node leads to voter `to`: for the
    /// placement driver, which spreads leaders over the members.
    TransferLeader { shard: ShardId, to: NodeId },
    /// How many chunk copies this node keeps: none, once a drained node has
    /// handed every copy to the chunk's holders.
    ChunksHeld,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResponse {
    Status(NodeStatus),
    Done,
    /// A request this node cannot answer, with a sentence saying why.
    Refused(String),
    /// A shard request for the shard's leader, which is (as far as this node knows) this one.
    NotLeader(Option<NodeId>),
    ChunksHeld(u64),
}

/// One node's own view: the members it knows and the shards it hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    /// Every member this node knows of, removed ones included.
    pub members: Vec<MemberRecord>,
    pub shards: Vec<ShardStatus>,
}

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Transport(#[from] hamgam_transport::TransportError),
    #[error("node at {addr} did not answer: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("node at {addr} sent an answer that does not decode: {reason}")]
    BadAnswer { addr: SocketAddr, reason: String },
    #[error("node at {addr} refused: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("node at {addr} does not lead the shard (leader: {leader:?})")]
    NotLeader { addr: SocketAddr, leader: Option<NodeId> },
}

/// What an admin request may need of the node besides its shards.
pub(crate) struct NodeSide<M, C> {
    pub node: NodeId,
    /// The members as shard 0 records them now (or as this node started).
    pub members: M,
    /// The chunk copies this node keeps, if it keeps a chunk store.
    pub chunks_held: C,
}

/// Serves one admin connection: each bidi stream is one request. The
/// placement driver keeps its connection for as long as both nodes run.
pub(crate) async fn serve_connection<M, C>(connection: quinn::Connection, raft: RaftHandle, side: NodeSide<M, C>)
where
    M: Fn() -> Vec<MemberRecord>,
    C: Fn() -> Option<u64>,
{
    while let Ok((send, mut recv)) = connection.accept_bi().await {
        let answer = match exchange::read_request(&mut recv, REQUEST_BYTES_MAX).await.map(|b| hamgam_proto::codec::decode(&b)) {
            Some(Ok(request)) => answer(request, &raft, &side).await,
            Some(Err(error)) => AdminResponse::Refused(format!("the request does not decode: {error}")),
            None => AdminResponse::Refused("the request was cut off or too large".into()),
        };
        let Ok(bytes) = hamgam_proto::codec::encode(&answer) else { return };
        exchange::answer(send, &bytes).await;
    }
}

async fn answer<M, C>(request: AdminRequest, raft: &RaftHandle, side: &NodeSide<M, C>) -> AdminResponse
where
    M: Fn() -> Vec<MemberRecord>,
    C: Fn() -> Option<u64>,
{
    match request {
        AdminRequest::Status => match raft.status().await {
            Ok(shards) => {
                let members = (side.members)();
                AdminResponse::Status(NodeStatus { node: side.node, members, shards })
            }
            Err(error) => AdminResponse::Refused(error.to_string()),
        },
        AdminRequest::SetMemberState { node, state } => {
            match propose_cluster(raft, &ClusterCommand::SetState { node, state }).await {
                Ok(ClusterReply::Refused(reason)) | Err(reason) => AdminResponse::Refused(reason),
                Ok(_) => AdminResponse::Done,
            }
        }
        AdminRequest::ReleaseReplica { shard } => match raft.release_replica(shard).await {
            Ok(()) => AdminResponse::Done,
            Err(error) => AdminResponse::Refused(error.to_string()),
        },
        AdminRequest::TransferLeader { shard, to } => match raft.transfer_leader(shard, to).await {
            Ok(true) => AdminResponse::Done,
            Ok(false) => AdminResponse::Refused(format!(
                "node {to} is not an active voter of shard {shard} close to its leader, or a hand-over is under way"
            )),
            Err(ProposeError::NotLeader { leader, .. }) => AdminResponse::NotLeader(leader),
            Err(error) => AdminResponse::Refused(error.to_string()),
        },
        AdminRequest::ChunksHeld => match (side.chunks_held)() {
            Some(held) => AdminResponse::ChunksHeld(held),
            None => AdminResponse::Refused("this node keeps no chunk store".into()),
        },
        AdminRequest::ChangeReplicas { shard, change } => match raft.change_replicas(shard, change).await {
            Ok(()) => AdminResponse::Done,
            Err(ProposeError::NotLeader { leader, .. }) => AdminResponse::NotLeader(leader),
            Err(error) => AdminResponse::Refused(error.to_string()),
        },
    }
}

/// Sends one request to the node whose peer endpoint is at `addr`,
/// presenting `identity`, over a connection made for it (see
/// [`AdminClient`] for asking again and again).
pub async fn query(identity: &NodeIdentity, addr: SocketAddr, request: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let config = hamgam_transport::peer_client_config(identity, ADMIN_ALPN)?;
    let bytes = encode_request(addr, request)?;
    let answer =
        exchange::ask(config, addr, &bytes, RESPONSE_BYTES_MAX, ADMIN_TIMEOUT).await.map_err(unreachable(addr))?;
    read_answer(addr, &answer)
}

/// Asks the node at `addr` for its status.
pub async fn node_status(identity: &NodeIdentity, addr: SocketAddr) -> Result<NodeStatus, AdminError> {
    status_in(addr, query(identity, addr, &AdminRequest::Status).await?)
}

/// Asks the node at `addr` to do something; `Ok` once it is done.
pub async fn command(identity: &NodeIdentity, addr: SocketAddr, request: &AdminRequest) -> Result<(), AdminError> {
    done_in(addr, query(identity, addr, request).await?)
}

/// Asks other nodes' admin services again and again, as the placement
/// driver does (every member's status each second): one UDP endpoint per
/// address family, one TLS configuration, and one connection per node kept
/// between requests, where [`query`] makes all three for one request. A
/// connection that fails or times out is dropped and the next request to
/// that node dials again.
pub struct AdminClient {
    config: quinn::ClientConfig,
    /// By address family: `true` for IPv6.
    endpoints: std::sync::Mutex<HashMap<bool, quinn::Endpoint>>,
    connections: std::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl AdminClient {
    pub fn new(identity: &NodeIdentity) -> Result<AdminClient, AdminError> {
        Ok(AdminClient {
            config: hamgam_transport::peer_client_config(identity, ADMIN_ALPN)?,
            endpoints: std::sync::Mutex::new(HashMap::new()),
            connections: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// As [`query`], over this client's connection to `addr`.
    pub async fn query(&self, addr: SocketAddr, request: &AdminRequest) -> Result<AdminResponse, AdminError> {
        let bytes = encode_request(addr, request)?;
        let exchange = async {
            let connection = self.connection(addr).await?;
            exchange::ask_over(&connection, &bytes, RESPONSE_BYTES_MAX).await
        };
        let answer = match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => answer,
            failed => {
                self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
                let reason = match failed {
                    Ok(Err(reason)) => reason,
                    _ => format!("no answer within {ADMIN_TIMEOUT:?}"),
                };
                return Err(unreachable(addr)(reason));
            }
        };
        read_answer(addr, &answer)
    }

    /// As [`node_status`], over this client's connection.
    pub async fn node_status(&self, addr: SocketAddr) -> Result<NodeStatus, AdminError> {
        status_in(addr, self.query(addr, &AdminRequest::Status).await?)
    }

    /// How many chunk copies the node at `addr` keeps.
    pub async fn chunks_held(&self, addr: SocketAddr) -> Result<u64, AdminError> {
        match self.query(addr, &AdminRequest::ChunksHeld).await? {
            AdminResponse::ChunksHeld(held) => Ok(held),
            _ => Err(AdminError::BadAnswer { addr, reason: "an answer of another kind".into() }),
        }
    }

    /// As [`command`], over this client's connection.
    pub async fn command(&self, addr: SocketAddr, request: &AdminRequest) -> Result<(), AdminError> {
        done_in(addr, self.query(addr, request).await?)
    }

    /// The open connection to `addr`, dialled if there is none.
    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        {
            let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            // Closed ones (a node restarted or went away) are dropped here,
            // so the map holds at most the nodes asked lately.
            connections.retain(|_, connection| connection.close_reason().is_none());
            if let Some(connection) = connections.get(&addr) {
                return Ok(connection.clone());
            }
        }
        let endpoint = self.endpoint(addr)?;
        let connection = exchange::connect(&endpoint, self.config.clone(), addr).await?;
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, connection.clone());
        Ok(connection)
    }

    #[cfg(test)]
    pub(crate) fn connections_open(&self) -> usize {
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn endpoint(&self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = endpoints.get(&addr.is_ipv6()) {
            return Ok(endpoint.clone());
        }
        let endpoint = hamgam_transport::client_endpoint(addr).map_err(|e| e.to_string())?;
        endpoints.insert(addr.is_ipv6(), endpoint.clone());
        Ok(endpoint)
    }
}

fn unreachable(addr: SocketAddr) -> impl Fn(String) -> AdminError {
    move |reason| AdminError::Unreachable { addr, reason }
}

fn encode_request(addr: SocketAddr, request: &AdminRequest) -> Result<Vec<u8>, AdminError> {
    hamgam_proto::codec::encode(request).map_err(|e| unreachable(addr)(e.to_string()))
}

/// A decoded answer; a refusal or a pointer to the leader is an error.
fn read_answer(addr: SocketAddr, answer: &[u8]) -> Result<AdminResponse, AdminError> {
    match hamgam_proto::codec::decode::<AdminResponse>(answer)
        .map_err(|e| AdminError::BadAnswer { addr, reason: e.to_string() })?
    {
        AdminResponse::Refused(reason) => Err(AdminError::Refused { addr, reason }),
        AdminResponse::NotLeader(leader) => Err(AdminError::NotLeader { addr, leader }),
        answer => Ok(answer),
    }
}

fn status_in(addr: SocketAddr, answer: AdminResponse) -> Result<NodeStatus, AdminError> {
    match answer {
        AdminResponse::Status(status) => Ok(status),
        _ => Err(AdminError::BadAnswer { addr, reason: "an answer of another kind".into() }),
    }
}

fn done_in(addr: SocketAddr, answer: AdminResponse) -> Result<(), AdminError> {
    match answer {
        AdminResponse::Done => Ok(()),
        _ => Err(AdminError::BadAnswer { addr, reason: "an answer of another kind".into() }),
    }
}
