//! Commands are what the raft log of a shard carries; replies come back to
//! the proposer. Both are stored or sent as bytes, so variants are only ever
//! appended.

use crate::records::OutboxRecord;
use hamgam_proto::Role;
use hamgam_proto::store::{ChunkList, ChunkRef, FileManifest, SharedFile, SnapshotStats, Visibility};
use hamgam_types::{ChatId, DeviceId, Placement, ShardId, UserId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// 0: in the username's shard; allocates a user id that maps to that shard.
    SignUp { username_key: String, username: String, display_name: String, password_phc: String, now_ms: u64 },
    /// 1
    CreateSession { user: UserId, device: DeviceId, name: String, token_hash: [u8; 32], now_ms: u64 },
    /// 2
    RevokeSession { user: UserId, device: DeviceId },
    /// 3: `chat` must be `direct_chat_id(a, b)`.
    CreateDirect { chat: ChatId, a: UserId, b: UserId, now_ms: u64 },
    /// 4
    CreateGroup { chat: ChatId, owner: UserId, title: String, now_ms: u64 },
    /// 5
    AddMember { chat: ChatId, actor: UserId, user: UserId, now_ms: u64 },
    /// 6
    RemoveMember { chat: ChatId, actor: UserId, user: UserId },
    /// 7
    SetRole { chat: ChatId, actor: UserId, user: UserId, role: Role },
    /// 8
    Leave { chat: ChatId, user: UserId },
    /// 9
    Send { chat: ChatId, sender: UserId, client_msg_id: u64, text: String, now_ms: u64 },
    /// 10
    Edit { chat: ChatId, actor: UserId, seq: u64, text: String, now_ms: u64 },
    /// 11
    Delete { chat: ChatId, actor: UserId, seq: u64 },
    /// 12
    MarkRead { chat: ChatId, user: UserId, seq: u64 },
    /// 13: outbox records of `source` for users of `target`, applied in `target`.
    Deliver { source: ShardId, target: ShardId, records: Vec<(u64, OutboxRecord)> },
    /// 14: `target` has applied `source`'s outbox through `through`; applied in `source`.
    OutboxAck { source: ShardId, target: ShardId, through: u64 },
    /// 15: outbox records of several sources for users of `target`, applied
    /// in `target`: one command and one inbox write for a whole round.
    DeliverMany { target: ShardId, batches: Vec<(ShardId, Vec<(u64, OutboxRecord)>)> },
    /// 16: store or replace a file; its chunks were checked by the proposer.
    PutFile { user: UserId, path: String, manifest: FileManifest, quota_bytes: u64, now_ms: u64 },
    /// 17: rename or move a file, or a folder with everything in it.
    MovePath { user: UserId, from: String, to: String, now_ms: u64 },
    /// 18: delete a file or an empty folder.
    DeletePath { user: UserId, path: String },
    /// 19: record a backup snapshot; its chunks were checked by the proposer,
    /// which also counted the bytes it adds.
    AddSnapshot {
        user: UserId,
        label: String,
        parent: Option<u64>,
        tree: ChunkList,
        stats: SnapshotStats,
        added_bytes: u64,
        quota_bytes: u64,
        now_ms: u64,
    },
    /// 20
    ForgetSnapshots { user: UserId, ids: Vec<u64> },
    /// 21: garbage collection is about to read `shard`'s chunk roots; from
    /// now on a command naming chunks checked before `floor_ms` is refused
    /// (see docs/design/store.md, "Garbage collection").
    GcBarrier { shard: ShardId, floor_ms: u64 },
    /// 22: a message carrying a stored file; its chunks were checked by the
    /// proposer from `now_ms` on. The caption may be empty.
    SendFile { chat: ChatId, sender: UserId, client_msg_id: u64, caption: String, file: SharedFile, now_ms: u64 },
    /// 23: `album` is derived from the owner and the client's reference, so
    /// a retry finds the album it made.
    CreateAlbum { owner: UserId, album: u64, title: String, visibility: Visibility, now_ms: u64 },
    /// 24
    SetAlbumVisibility { owner: UserId, album: u64, visibility: Visibility },
    /// 25: the file's (and thumbnail's) chunks were checked by the proposer from `now_ms` on.
    AddAlbumItem { owner: UserId, album: u64, file: SharedFile, thumbnail: Option<ChunkRef>, now_ms: u64 },
    /// 26
    RemoveAlbumItem { owner: UserId, album: u64, item: u64 },
    /// 27: only an empty album.
    DeleteAlbum { owner: UserId, album: u64 },
    /// 28: the proposer checked that `liker` may see the album.
    LikeItem { owner: UserId, album: u64, item: u64, liker: UserId, like: bool },
}

impl Command {
    /// The shard whose raft group must apply this command.
    pub fn shard(&self, placement: &Placement) -> ShardId {
        match self {
            Command::SignUp { username_key, .. } => placement.shard_of_username(username_key),
            Command::CreateSession { user, .. }
            | Command::RevokeSession { user, .. }
            | Command::PutFile { user, .. }
            | Command::MovePath { user, .. }
            | Command::DeletePath { user, .. }
            | Command::AddSnapshot { user, .. }
            | Command::ForgetSnapshots { user, .. } => placement.shard_of_user(*user),
            Command::CreateAlbum { owner, .. }
            | Command::SetAlbumVisibility { owner, .. }
            | Command::AddAlbumItem { owner, .. }
            | Command::RemoveAlbumItem { owner, .. }
            | Command::DeleteAlbum { owner, .. }
            | Command::LikeItem { owner, .. } => placement.shard_of_user(*owner),
            Command::CreateDirect { chat, .. }
            | Command::CreateGroup { chat, .. }
            | Command::AddMember { chat, .. }
            | Command::RemoveMember { chat, .. }
            | Command::SetRole { chat, .. }
            | Command::Leave { chat, .. }
            | Command::Send { chat, .. }
            | Command::SendFile { chat, .. }
            | Command::Edit { chat, .. }
            | Command::Delete { chat, .. }
            | Command::MarkRead { chat, .. } => placement.shard_of_chat(*chat),
            Command::Deliver { target, .. } | Command::DeliverMany { target, .. } => *target,
            Command::GcBarrier { shard, .. } => *shard,
            Command::OutboxAck { source, .. } => *source,
        }
    }
}

/// A successful command's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// 0
    Done,
    /// 1
    SignedUp { user: UserId },
    /// 2: `created` is false when the chat already existed (a retry or a
    /// second "new chat" with the same person).
    Chat { chat: ChatId, created: bool },
    /// 3
    Sent { seq: u64, date_ms: u64 },
    /// 4
    ReadMarker { seq: u64 },
    /// 5
    Snapshot { id: u64 },
    /// 6
    AlbumItem { item: u64 },
    /// 7: an item's likes after a like or unlike.
    Likes { count: u64 },
}

fn id_from_hash(hash: blake3::Hash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The one direct chat of two people, whoever starts it. It lives on the
/// shard of the lower user id.
pub fn direct_chat_id(placement: &Placement, a: UserId, b: UserId) -> ChatId {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut hasher = blake3::Hasher::new_derive_key("hamgam direct chat v1");
    hasher.update(&low.0.to_le_bytes());
    hasher.update(&high.0.to_le_bytes());
    placement.chat_id_near(id_from_hash(hasher.finalize()), low)
}

/// An album's id, derived from its owner and the client's random reference,
/// so a retried create finds the album it made.
pub fn album_id(owner: UserId, client_ref: u64) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("hamgam album v1");
    hasher.update(&owner.0.to_le_bytes());
    hasher.update(&client_ref.to_le_bytes());
    id_from_hash(hasher.finalize())
}

/// A group's id, derived from its creator and the client's random reference,
/// so a retried create finds the group it already made. It lives on the
/// creator's shard.
pub fn group_chat_id(placement: &Placement, owner: UserId, client_ref: u64) -> ChatId {
    let mut hasher = blake3::Hasher::new_derive_key("hamgam group chat v1");
    hasher.update(&owner.0.to_le_bytes());
    hasher.update(&client_ref.to_le_bytes());
    placement.chat_id_near(id_from_hash(hasher.finalize()), owner)
}
