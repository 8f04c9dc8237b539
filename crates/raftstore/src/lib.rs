//! The raft groups ("shards") hosted by one node, driven by raft-rs.
//!
//! Owns: one thread (the store loop, see `store`) that owns every shard's
//! `RawNode` and handles each Ready in raft-rs's documented order; the
//! write-ahead log ([`wal`]) that holds raft entries and hard state with one
//! fdatasync per ready round for all shards together; an apply thread (see
//! `apply`) that applies committed commands through a [`StateMachine`] in
//! one atomic database batch, with every shard's applied index written in
//! that same batch, while the loop already writes the next round; and
//! checkpoints that make the database durable so the WAL can be truncated.
//!
//! Entry types: [`Store::open`] starts the loop and returns a [`RaftHandle`]
//! (propose a command to a shard and wait for its applied result, wherever
//! the shard's leader is; confirm a read is fresh by ReadIndex; read a
//! shard's applied state; step a raft message that arrived from another node).
//! Messages to other nodes leave through a [`RaftTransport`]; proposals for a
//! shard led elsewhere go through a [`ProposalForwarder`]. Both are traits so
//! this crate never sees the network.
//!
//! Must not know: what commands mean (they are bytes for the state machine),
//! chats, users, QUIC. Keys: a shard's data lives under the 4-byte big-endian
//! shard id followed by 0x01, the state machine's range, handed to it through
//! a [`Prefixed`] view; the node-wide applied-state record lives under
//! `ff ff ff ff 00` and a snapshot install under way under `ff ff ff ff
//! 01`, prefixes no shard uses. Files: the WAL in `wal/` and snapshot files
//! ([`snapshot`]) in `snapshots/` of the store's directory.

mod apply;
mod log;
mod pre_images;
pub mod snapshot;
mod store;
pub mod wal;

pub use raft::eraftpb::{Message as RaftMessage, MessageType as RaftMessageType};
pub use store::{RaftHandle, ReplicaChange, ReplicaRole, ShardStatus, Store, StoreConfig, StoreStats};

use hamgam_storage::{Db, Prefixed, StorageError, Txn};
use hamgam_types::{NodeId, ShardId};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Carries raft messages to the other nodes of the cluster.
///
/// Called from the store loop (once before and once after each WAL write), so
/// it must not block: a message it cannot queue is dropped, which raft
/// tolerates (it retransmits and times out).
pub trait RaftTransport: Send + 'static {
    fn send(&mut self, messages: Vec<(ShardId, RaftMessage)>);
}

/// The transport of a node that has no peers: anything addressed elsewhere
/// is a bug in the configuration, logged and dropped.
#[derive(Debug, Default)]
pub struct NoPeers;

impl RaftTransport for NoPeers {
    fn send(&mut self, messages: Vec<(ShardId, RaftMessage)>) {
        for (shard, message) in messages {
            tracing::warn!(%shard, to = message.to, kind = ?message.msg_type, "no peer transport; message dropped");
        }
    }
}

/// The answer a forwarded proposal resolves to.
pub type ForwardedReply = Pin<Box<dyn Future<Output = Result<Vec<u8>, ProposeError>> + Send>>;

/// The answer a remote read resolves to.
pub type RemoteReadReply = Pin<Box<dyn Future<Output = Result<RemoteReadAnswer, ProposeError>> + Send>>;

/// A read of a shard hosted on another node, on keys of that shard's range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RemoteRead {
    Get(Vec<u8>),
    Scan { start: Vec<u8>, end: Option<Vec<u8>>, descending: bool, limit: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RemoteReadAnswer {
    Value(Option<Vec<u8>>),
    Pairs(hamgam_storage::KvPairs),
}

/// This node's way to the others for requests on shards it does not lead
/// (or does not host at all).
pub trait ProposalForwarder: Send + Sync + 'static {
    /// Sends a proposal to the node that leads its shard, which proposes it
    /// there (with [`RaftHandle::propose_here`]) and returns the state
    /// machine's reply.
    fn forward(&self, leader: NodeId, shard: ShardId, command: Vec<u8>) -> ForwardedReply;

    /// The nodes shard 0 records as `shard`'s replicas: whom to ask about a
    /// shard this node does not host.
    fn replicas(&self, shard: ShardId) -> Vec<NodeId>;

    /// Reads `shard` at `node` (see [`RaftHandle::serve_remote_read`]).
    fn read(&self, node: NodeId, shard: ShardId, read: RemoteRead) -> RemoteReadReply;
}

/// The state machine a shard's committed commands are applied to.
///
/// `apply` must be deterministic: the same commands in the same order give
/// the same writes and replies on every replica and after every restart.
/// Time and randomness come inside the command, never from the machine.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command of `shard` at raft `index`. Writes go
    /// into `kv`, which only reaches this shard's range. Returns the reply
    /// for the proposer (ignored when the proposer was another node). An
    /// error means storage failed underneath and stops the store.
    fn apply(
        &mut self,
        shard: ShardId,
        index: u64,
        command: &[u8],
        kv: &mut ShardWriter<'_, '_>,
    ) -> Result<Vec<u8>, StorageError>;

    /// Called once per apply round after its writes are visible to readers.
    fn after_round(&mut self) {}

    /// `shard`'s state was replaced by a snapshot from its leader: anything
    /// the machine keeps in memory about that shard is stale.
    fn snapshot_installed(&mut self, _shard: ShardId) {}
}

/// What a state machine writes through: its shard's range of the round's overlay.
pub type ShardWriter<'t, 'db> = Prefixed<&'t mut Txn<'db>>;

/// What readers read through: a shard's state-machine range of the database.
pub type ShardReader = Prefixed<Arc<dyn Db>>;

/// The prefix of the state machine's range of `shard`.
pub fn state_machine_prefix(shard: ShardId) -> [u8; 5] {
    let [a, b, c, d] = shard.0.to_be_bytes();
    [a, b, c, d, 0x01]
}

/// A read-only view of one shard's applied state.
pub fn shard_reader(db: Arc<dyn Db>, shard: ShardId) -> ShardReader {
    Prefixed::new(db, &state_machine_prefix(shard))
}

/// Why a proposal did not produce a result. None of these means the command
/// was rejected by the state machine: that is the state machine's reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the shard; `leader` is the last one it knew.
    #[error("this node does not lead shard {shard} (leader: {leader:?})")]
    NotLeader { shard: ShardId, leader: Option<NodeId> },
    /// The proposal was lost in a leader change. It may or may not have been
    /// applied: retry only commands that are idempotent.
    #[error("the proposal was dropped by a leader change")]
    Dropped,
    /// The store is stopping or has failed.
    #[error("the raft store is stopped")]
    Stopped,
    /// This node hosts no replica of the shard.
    #[error("shard {0} is not hosted here")]
    UnknownShard(ShardId),
    /// The command is over [`hamgam_types::limits::COMMAND_BYTES_MAX`].
    #[error("a command of {0} bytes is over the limit")]
    TooLarge(usize),
    /// No leader answered in time (an election, or this node is cut off
    /// from a quorum). The command was never proposed: retrying is safe.
    #[error("shard {0} has no reachable leader")]
    NoLeader(ShardId),
    /// A forwarded proposal's connection failed after it was sent. It may or
    /// may not have been applied: retry only commands that are idempotent.
    #[error("the forwarded proposal to node {node} failed: {reason}")]
    Forward { node: NodeId, reason: String },
}

/// Failures that stop the store. After one, the node must stop too.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("raft failed on shard {shard}")]
    Raft { shard: ShardId, source: raft::Error },
    /// A committed entry or stored record does not decode: the log or database is damaged.
    #[error("corrupt {what} in shard {shard}: {reason}")]
    Corrupt { shard: ShardId, what: &'static str, reason: String },
    #[error("could not start the store thread: {0}")]
    Thread(std::io::Error),
}
