//! The network between the nodes of one cluster.
//!
//! Owns: the peer endpoint (QUIC, ALPN [`PEER_ALPN`], mutual TLS under the
//! cluster CA, so only nodes of this cluster get in), the links that carry
//! raft messages to each other node (one bounded queue and one task per
//! node, writing batches of frames to one uni stream; see [`wire`]), the
//! inbound side that hands each message to the local raft store after
//! checking it comes from the node that sent it, and forwarded proposals (a
//! node that does not lead a shard sends the command to the leader and
//! relays its answer).
//!
//! The same endpoint answers operators on [`admin::ADMIN_ALPN`] (status of
//! this node and its shards), and [`ClusterFile`] is the record of the
//! cluster a data directory belongs to.
//!
//! Entry point: [`PeerNetwork::bind`], then [`PeerNetwork::transport`] for
//! the raft store, [`PeerNetwork::serve`] once the store runs, and
//! [`PeerNetwork::forwarder`] for the store's handle.
//!
//! Must not know: what commands mean, chats, users, clients.

pub mod admin;
mod cluster_file;
pub mod driver;
pub mod join;
pub mod membership;
mod network;
pub mod wire;

pub use cluster_file::{CLUSTER_FILE, ClusterFile, Member};
pub use membership::{ClusterMachine, ClusterView, MemberRecord, MemberState};
pub use network::{HintSink, Members, PeerNetwork, PeerTransport};

/// The ALPN of node-to-node connections.
pub const PEER_ALPN: &[u8] = b"hamgam-peer/1";

/// Failures setting up the peer network.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Transport(#[from] hamgam_transport::TransportError),
    #[error("peer endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}
