//! The messenger domain as a deterministic state machine.
//!
//! Owns users (username index, credentials, devices), chats (direct and
//! group, members and roles), messages (gap-free per-chat `seq`, idempotent
//! sends keyed by the client's id), per-user update sequences (`pts`) with
//! bounded retention, the cross-shard outbox that carries "chat C is now
//! at seq S" from a chat's shard to its members' shards, and each user's
//! cloud store namespace (files, folders, backup snapshots, usage against
//! the quota; the chunks themselves belong to the blob crate).
//!
//! Entry types: [`SyncMachine`] (the raft state machine: a [`Command`] in,
//! writes and a [`Reply`] out, no clock and no randomness), [`SyncService`]
//! (routes commands to shards, waits for their replies, runs the outbox
//! deliverer and answers reads such as history and "everything since pts").
//!
//! Must not know: QUIC, sessions on connections, the wire frames, sled. It
//! reaches storage only through raftstore's shard views.

mod cache;
mod command;
mod files;
mod gallery;
mod keys;
mod machine;
pub mod records;
mod service;
pub mod text;

#[cfg(test)]
mod tests;

pub use command::{Command, Reply, album_id, direct_chat_id, group_chat_id};
pub use files::{ChunkRoot, normalize_path, split_path};
pub use machine::{Signals, SyncMachine, UpdateListener};
pub use service::{DifferenceOutcome, SyncService};

use hamgam_raftstore::ProposeError;
use hamgam_storage::StorageError;
use serde::{Deserialize, Serialize};

/// A command the domain refused, with the reason. Deterministic: every
/// replica refuses the same command for the same reason, so this travels in
/// raft replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DomainError {
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    #[error("password refused: {0}")]
    WeakPassword(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the text has {chars} characters; the limit is {max}")]
    TextTooLong { chars: usize, max: usize },
    #[error("the text is empty")]
    TextEmpty,
    #[error("that username is taken")]
    UsernameTaken,
    #[error("no such user")]
    UserNotFound,
    #[error("no such device")]
    DeviceNotFound,
    #[error("no such chat")]
    ChatNotFound,
    #[error("no such message")]
    MessageNotFound,
    #[error("you are not a member of this chat")]
    NotMember,
    #[error("not allowed: {0}")]
    PermissionDenied(String),
    #[error("already a member of this chat")]
    AlreadyMember,
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("no such file or folder: {0}")]
    PathNotFound(String),
    #[error("no such snapshot: {0}")]
    SnapshotNotFound(u64),
    /// Anything else that is not there (or not visible to the asker).
    #[error("{0}")]
    NotFound(String),
    #[error("the quota of {quota} bytes would be exceeded ({used} used, {adding} more)")]
    QuotaExceeded { used: u64, adding: u64, quota: u64 },
    /// The chunks were checked before a garbage collection began reading
    /// this shard: they may be gone. Ask which are missing and send them.
    #[error("the chunks were checked too long ago and may have been collected; ask which are missing and retry")]
    ChecksExpired,
    /// Stored state that does not decode; logged where it was found.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What can go wrong when the service runs a command or a read.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The domain refused the request (expected; tell the client).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The raft store could not take or finish the command.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The command did not apply within the commit timeout. It may still
    /// apply later; retry with the same client id.
    #[error("the write did not commit in time")]
    Timeout,
    /// Storage failed underneath (fatal for this node).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A stored record or reply does not decode.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
}
