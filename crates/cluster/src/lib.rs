//! The cluster: the network between its nodes, its membership, and where
//! each shard's replicas live.
//!
//! Owns: the peer endpoint (QUIC, ALPN [`PEER_ALPN`], mutual TLS under the
//! cluster CA, so only nodes of this cluster get in), the links that carry
//! raft messages and push hints to each other node (one bounded queue and
//! one task per node, writing batches of frames to one uni stream; see
//! [`wire`]), the inbound side that hands each message to the local raft
//! store after checking it comes from the node that sent it, forwarded
//! proposals and remote reads (a node asks the one that leads or hosts a
//! shard); shard 0's state machine ([`membership`]: the member list and
//! placement), joining with a token ([`join`], ALPN `hamgam-join/1`, the
//! one protocol open without a certificate), and the placement driver
//! ([`driver`]) that adds, promotes and removes replicas, and the chunk
//! exchanges between nodes ([`ChunkLinks`], serving from the node's pack
//! store) that the blob crate's replicated chunk store runs on.
//!
//! The same endpoint answers operators on [`admin::ADMIN_ALPN`], and
//! [`ClusterFile`] is the record of the cluster a data directory belongs to.
//!
//! Entry point: [`PeerNetwork::bind`], then [`PeerNetwork::transport`] for
//! the raft store, [`ClusterMachine`] as its state machine,
//! [`PeerNetwork::serve`] and [`PeerNetwork::follow`] once the store runs,
//! [`PeerNetwork::forwarder`] for the store's handle, and [`driver::run`].
//!
//! Must not know: what data commands mean, chats, users, clients (push
//! hints are opaque bytes here).

pub mod admin;
mod chunks;
mod cluster_file;
pub mod driver;
mod exchange;
pub mod join;
pub mod membership;
mod network;
pub mod wire;

pub use chunks::ChunkLinks;
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
