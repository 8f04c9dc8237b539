//! The operator's way in: `hamgam admin` talks to a node on the peer
//! endpoint with ALPN [`ADMIN_ALPN`]. Like a node, it must present a
//! certificate issued by the cluster CA, so only someone holding a member's
//! identity (or one issued for them) can ask. One request per bidi stream,
//! encoded with the workspace codec, each side bounded.

use crate::Members;
use crate::exchange;
use crate::join::propose_cluster;
use crate::membership::{ClusterCommand, ClusterReply, ClusterView, MemberRecord, MemberState};
use hamgam_raftstore::{ProposeError, RaftHandle, ReplicaChange, ShardStatus};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResponse {
    Status(NodeStatus),
    Done,
    /// A request this node cannot answer, with a sentence saying why.
    Refused(String),
    /// A shard request for the shard's leader, which is (as far as this node knows) this one.
    NotLeader(Option<NodeId>),
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

/// Serves one admin connection: each bidi stream is one request.
pub(crate) async fn serve_connection(
    connection: quinn::Connection,
    raft: RaftHandle,
    node: NodeId,
    members: Members,
    view: Option<ClusterView>,
) {
    while let Ok((send, mut recv)) = connection.accept_bi().await {
        let answer = match exchange::read_request(&mut recv, REQUEST_BYTES_MAX).await.map(|b| hamgam_proto::codec::decode(&b)) {
            Some(Ok(request)) => answer(request, &raft, node, &members, view.as_ref()).await,
            Some(Err(error)) => AdminResponse::Refused(format!("the request does not decode: {error}")),
            None => AdminResponse::Refused("the request was cut off or too large".into()),
        };
        let Ok(bytes) = hamgam_proto::codec::encode(&answer) else { return };
        exchange::answer(send, &bytes).await;
    }
}

async fn answer(
    request: AdminRequest,
    raft: &RaftHandle,
    node: NodeId,
    members: &Members,
    view: Option<&ClusterView>,
) -> AdminResponse {
    match request {
        AdminRequest::Status => match raft.status().await {
            Ok(shards) => {
                let members = match view.filter(|v| !v.members.is_empty()) {
                    Some(view) => view.members.clone(),
                    // Before shard 0 records them: the list this node started with.
                    None => members
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|(id, addr)| MemberRecord { id: *id, peer_addr: *addr, state: MemberState::Active })
                        .collect(),
                };
                AdminResponse::Status(NodeStatus { node, members, shards })
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
        AdminRequest::ChangeReplicas { shard, change } => match raft.change_replicas(shard, change).await {
            Ok(()) => AdminResponse::Done,
            Err(ProposeError::NotLeader { leader, .. }) => AdminResponse::NotLeader(leader),
            Err(error) => AdminResponse::Refused(error.to_string()),
        },
    }
}

/// Sends one request to the node whose peer endpoint is at `addr`,
/// presenting `identity`.
pub async fn query(identity: &NodeIdentity, addr: SocketAddr, request: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let unreachable = |reason: String| AdminError::Unreachable { addr, reason };
    let config = hamgam_transport::peer_client_config(identity, ADMIN_ALPN)?;
    let bytes = hamgam_proto::codec::encode(request).map_err(|e| unreachable(e.to_string()))?;
    let answer = exchange::ask(config, addr, &bytes, RESPONSE_BYTES_MAX, ADMIN_TIMEOUT).await.map_err(unreachable)?;
    match hamgam_proto::codec::decode::<AdminResponse>(&answer)
        .map_err(|e| AdminError::BadAnswer { addr, reason: e.to_string() })?
    {
        AdminResponse::Refused(reason) => Err(AdminError::Refused { addr, reason }),
        AdminResponse::NotLeader(leader) => Err(AdminError::NotLeader { addr, leader }),
        answer => Ok(answer),
    }
}

/// Asks the node at `addr` for its status.
pub async fn node_status(identity: &NodeIdentity, addr: SocketAddr) -> Result<NodeStatus, AdminError> {
    match query(identity, addr, &AdminRequest::Status).await? {
        AdminResponse::Status(status) => Ok(status),
        AdminResponse::Refused(reason) => Err(AdminError::Refused { addr, reason }),
        _ => Err(AdminError::BadAnswer { addr, reason: "an answer of another kind".into() }),
    }
}

/// Asks the node at `addr` to do something; `Ok` once it is done.
pub async fn command(identity: &NodeIdentity, addr: SocketAddr, request: &AdminRequest) -> Result<(), AdminError> {
    match query(identity, addr, request).await? {
        AdminResponse::Done => Ok(()),
        AdminResponse::Refused(reason) => Err(AdminError::Refused { addr, reason }),
        _ => Err(AdminError::BadAnswer { addr, reason: "an answer of another kind".into() }),
    }
}
