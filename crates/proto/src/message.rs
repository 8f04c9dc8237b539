//! Wire values. Enums are encoded by variant position: variants are only ever
//! appended, never reordered or removed, and each carries its number in a
//! comment. Structs never change shape within `hamgam/1`.

use crate::store::{
    AlbumInfo, AlbumItem, ChunkList, ChunkRef, FileEntry, FileManifest, FolderPage, SharedFile, SnapshotInfo,
    SnapshotStats, UsageReport, Visibility,
};
use hamgam_types::{ChatId, ChunkId, DeviceId, NodeId, ShardId, UserId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;

// ---- handshake ---------------------------------------------------------------

/// First frame of a connection, from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free text such as "hamgam-cli 0.1"; for logs only.
    pub client_name: String,
}

/// The node's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// 0
    Welcome(Welcome),
    /// 1
    Refused(ErrorBody),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    pub node: NodeId,
    pub server_name: String,
}

// ---- requests ----------------------------------------------------------------

/// One request; each is sent on its own bidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// 0: create an account. Needs no session.
    SignUp { username: String, password: String, display_name: String },
    /// 1: log in; creates a device session and returns its token once.
    LogIn { username: String, password: String, device_name: String },
    /// 2: bind this connection to a device session.
    Authenticate { token: String },
    /// 3: end this device's session.
    LogOut,
    /// 4
    ListDevices,
    /// 5: end another device's session; it stops working at once.
    RevokeDevice { device: DeviceId },
    /// 6
    ResolveUsername { username: String },
    /// 7: the direct chat with `peer`, made on first use.
    CreateDirectChat { peer: UserId },
    /// 8: `client_ref` is random per group the client means to create, so a
    /// retried request returns the same group.
    CreateGroup { title: String, client_ref: u64 },
    /// 9
    AddMember { chat: ChatId, user: UserId },
    /// 10
    RemoveMember { chat: ChatId, user: UserId },
    /// 11
    SetRole { chat: ChatId, user: UserId, role: Role },
    /// 12
    LeaveChat { chat: ChatId },
    /// 13: the caller's chats in id order, starting after `after`.
    ListChats { after: Option<ChatId>, limit: u32 },
    /// 14
    ChatMembers { chat: ChatId },
    /// 15: `client_msg_id` is unique per message; a retry with the same id
    /// returns the first result and never makes a second message. Ids that
    /// grow with time (the SDK puts the unix second in the high half) are
    /// the fast case: the node reads nothing to tell a new one from a retry.
    SendMessage { chat: ChatId, client_msg_id: u64, text: String },
    /// 16
    EditMessage { chat: ChatId, seq: u64, text: String },
    /// 17
    DeleteMessage { chat: ChatId, seq: u64 },
    /// 18
    History { chat: ChatId, anchor: HistoryAnchor, limit: u32 },
    /// 19: moves the caller's read marker forward (never back).
    MarkRead { chat: ChatId, seq: u64 },
    /// 20: everything after `since_pts` in the caller's update sequence.
    Sync { since_pts: u64, limit: u32 },
    /// 21: keep this stream open and push updates after `since_pts` as they happen.
    Subscribe { since_pts: u64 },
    /// 22: which of these chunks the cluster lacks (at most
    /// `CHUNK_IDS_PER_REQUEST_MAX`); answered by [`Response::MissingChunks`].
    MissingChunks { ids: Vec<ChunkId> },
    /// 23: `count` chunk frames follow on this stream (at most
    /// `CHUNKS_PER_STREAM_MAX`); answered once every one is durable.
    PutChunks { count: u32 },
    /// 24: answered by [`Response::ChunksFollow`], then one chunk frame per
    /// id that was found, in request order.
    GetChunks { ids: Vec<ChunkId> },
    /// 25: store (or replace) a file at `path`. Every chunk it names must be
    /// stored already.
    PutFile { path: String, manifest: FileManifest },
    /// 26: a file's entry and chunk list.
    StatFile { path: String },
    /// 27: a folder's entries in name order, after the name `after`.
    ListFolder { path: String, after: Option<String>, limit: u32 },
    /// 28: rename or move a file or a folder with what it holds.
    MovePath { from: String, to: String },
    /// 29: delete a file, or an empty folder.
    DeletePath { path: String },
    /// 30
    Usage,
    /// 31: record a backup snapshot whose tree and every chunk it names are stored.
    CommitSnapshot { label: String, parent: Option<u64>, tree: ChunkList, stats: SnapshotStats },
    /// 32: the caller's snapshots in id order, after `after`.
    ListSnapshots { after: Option<u64>, limit: u32 },
    /// 33
    ForgetSnapshots { ids: Vec<u64> },
    /// 34: share the caller's stored file at `path` into `chat` as a
    /// message with `caption` (may be empty); no chunk is sent again.
    /// `client_msg_id` works as for `SendMessage`.
    ShareFile { chat: ChatId, client_msg_id: u64, path: String, caption: String },
    /// 35: as `History`, with the files shared in the page's messages (at
    /// most `HISTORY_WITH_FILES_PAGE_MAX` messages).
    HistoryWithFiles { chat: ChatId, anchor: HistoryAnchor, limit: u32 },
    /// 36: a new album; `client_ref` is random per album the client means
    /// to create, so a retry finds the album it made.
    CreateAlbum { title: String, visibility: Visibility, client_ref: u64 },
    /// 37
    SetAlbumVisibility { album: u64, visibility: Visibility },
    /// 38: add the caller's stored file at `path` to an album, with the
    /// thumbnail chunk the client made and stored (JPEG and PNG photos).
    AddToAlbum { album: u64, path: String, thumbnail: Option<ChunkRef> },
    /// 39
    RemoveFromAlbum { album: u64, item: u64 },
    /// 40: only an empty album.
    DeleteAlbum { album: u64 },
    /// 41: `owner`'s albums the caller may see, in id order after `after`.
    ListAlbums { owner: UserId, after: Option<u64>, limit: u32 },
    /// 42: an album's items in the order added, after `after`.
    ListAlbumItems { owner: UserId, album: u64, after: Option<u64>, limit: u32 },
    /// 43: like (or, with `like: false`, unlike) an item the caller may see.
    LikeItem { owner: UserId, album: u64, item: u64, like: bool },
    /// 44: where each shard's leader serves clients, so that a client can
    /// send a chat's writes to its leader rather than through this node.
    Routes,
}

impl Request {
    /// Number of request kinds this version knows; a higher variant index is
    /// an unknown request, not a malformed one.
    pub const KINDS: u32 = 45;

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::SignUp { .. } => "sign_up",
            Request::LogIn { .. } => "log_in",
            Request::Authenticate { .. } => "authenticate",
            Request::LogOut => "log_out",
            Request::ListDevices => "list_devices",
            Request::RevokeDevice { .. } => "revoke_device",
            Request::ResolveUsername { .. } => "resolve_username",
            Request::CreateDirectChat { .. } => "create_direct_chat",
            Request::CreateGroup { .. } => "create_group",
            Request::AddMember { .. } => "add_member",
            Request::RemoveMember { .. } => "remove_member",
            Request::SetRole { .. } => "set_role",
            Request::LeaveChat { .. } => "leave_chat",
            Request::ListChats { .. } => "list_chats",
            Request::ChatMembers { .. } => "chat_members",
            Request::SendMessage { .. } => "send_message",
            Request::EditMessage { .. } => "edit_message",
            Request::DeleteMessage { .. } => "delete_message",
            Request::History { .. } => "history",
            Request::MarkRead { .. } => "mark_read",
            Request::Sync { .. } => "sync",
            Request::Subscribe { .. } => "subscribe",
            Request::MissingChunks { .. } => "missing_chunks",
            Request::PutChunks { .. } => "put_chunks",
            Request::GetChunks { .. } => "get_chunks",
            Request::PutFile { .. } => "put_file",
            Request::StatFile { .. } => "stat_file",
            Request::ListFolder { .. } => "list_folder",
            Request::MovePath { .. } => "move_path",
            Request::DeletePath { .. } => "delete_path",
            Request::Usage => "usage",
            Request::CommitSnapshot { .. } => "commit_snapshot",
            Request::ListSnapshots { .. } => "list_snapshots",
            Request::ForgetSnapshots { .. } => "forget_snapshots",
            Request::ShareFile { .. } => "share_file",
            Request::HistoryWithFiles { .. } => "history_with_files",
            Request::CreateAlbum { .. } => "create_album",
            Request::SetAlbumVisibility { .. } => "set_album_visibility",
            Request::AddToAlbum { .. } => "add_to_album",
            Request::RemoveFromAlbum { .. } => "remove_from_album",
            Request::DeleteAlbum { .. } => "delete_album",
            Request::ListAlbums { .. } => "list_albums",
            Request::ListAlbumItems { .. } => "list_album_items",
            Request::LikeItem { .. } => "like_item",
            Request::Routes => "routes",
        }
    }
}

/// Where a history page starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryAnchor {
    /// 0: the newest messages.
    Latest,
    /// 1: messages with seq below this one, newest first in selection.
    Before(u64),
    /// 2: messages with seq above this one.
    After(u64),
}

// ---- responses ---------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// 0
    Error(ErrorBody),
    /// 1
    SignedUp { user: UserId },
    /// 2: the token is shown once; the node keeps only its hash.
    LoggedIn { user: UserId, device: DeviceId, token: String },
    /// 3
    Authenticated { user: UserId, device: DeviceId, username: String },
    /// 4: the request took effect and has nothing to return.
    Done,
    /// 5
    Devices(Vec<DeviceInfo>),
    /// 6
    User(UserInfo),
    /// 7
    Chat(ChatInfo),
    /// 8
    Chats(ChatList),
    /// 9
    Members(Vec<MemberInfo>),
    /// 10
    Sent { seq: u64, date_ms: u64 },
    /// 11
    Messages(MessagePage),
    /// 12: the read marker after the request (it never moves back).
    ReadMarker { seq: u64 },
    /// 13
    Difference(Difference),
    /// 14: the device is too far behind; re-read the chat list and continue from `pts`.
    TooLong { pts: u64 },
    /// 15: first frame on a subscribe stream; pushes follow.
    Subscribed { pts: u64 },
    /// 16: the asked-about chunks the cluster lacks.
    MissingChunks { ids: Vec<ChunkId> },
    /// 17: every chunk of the upload is durable; `stored` were new.
    ChunksStored { stored: u32, present: u32 },
    /// 18: chunk frames follow for every asked id except these.
    ChunksFollow { missing: Vec<ChunkId> },
    /// 19
    File { entry: FileEntry, content: ChunkList },
    /// 20
    Folder(FolderPage),
    /// 21
    Usage(UsageReport),
    /// 22
    Snapshot(SnapshotInfo),
    /// 23
    Snapshots { snapshots: Vec<SnapshotInfo>, more: bool },
    /// 24: a history page and the file shared in each of its messages that has one.
    MessagesWithFiles { page: MessagePage, files: Vec<(u64, SharedFile)> },
    /// 25
    Album(AlbumInfo),
    /// 26
    Albums { albums: Vec<AlbumInfo>, more: bool },
    /// 27
    AlbumItemAdded { item: u64 },
    /// 28
    AlbumItems { items: Vec<AlbumItem>, more: bool },
    /// 29: the item's likes after the request.
    Likes { count: u64 },
    /// 30
    Routes(RouteTable),
}

/// Frames on a subscribe stream after [`Response::Subscribed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// 0: new updates, contiguous from the last push.
    Updates(Difference),
    /// 1: the device fell too far behind while subscribed; same meaning as [`Response::TooLong`].
    TooLong { pts: u64 },
}

// ---- values ------------------------------------------------------------------

/// Where a cluster's shard leaders serve clients, as the answering node knows
/// it: a hint, not a promise. A write sent to a node that does not lead the
/// shard is still served (the node forwards it), only with more hops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Data shards of the cluster: chat `c` lives in shard `1 + c % data_shards`
    /// (`hamgam_types::Placement`). Zero from a node that does not say.
    pub data_shards: u32,
    /// Members that serve clients, with the address each serves on (at most
    /// `limits::ROUTE_NODES_MAX`).
    pub nodes: Vec<(NodeId, SocketAddr)>,
    /// Each data shard's leader where the answering node knows it (at most
    /// one per data shard).
    pub leaders: Vec<(ShardId, NodeId)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// 0
    Member,
    /// 1
    Admin,
    /// 2
    Owner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatKind {
    /// 0
    Direct,
    /// 1
    Group,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user: UserId,
    pub username: String,
    pub display_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: DeviceId,
    pub name: String,
    pub created_ms: u64,
    /// True for the device that asked.
    pub current: bool,
}

/// A chat as one member sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatInfo {
    pub chat: ChatId,
    pub kind: ChatKind,
    /// Group title; empty for direct chats.
    pub title: String,
    /// The other person of a direct chat.
    pub peer: Option<UserId>,
    pub member_count: u32,
    pub last_seq: u64,
    pub my_role: Role,
    pub my_read_seq: u64,
    pub created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatList {
    pub chats: Vec<ChatInfo>,
    /// The caller's update sequence when the list was read: sync from here.
    pub pts: u64,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next_after: Option<ChatId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub user: UserId,
    pub role: Role,
    pub read_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub chat: ChatId,
    pub seq: u64,
    pub sender: UserId,
    pub date_ms: u64,
    /// Empty once deleted.
    pub text: String,
    pub edit_date_ms: Option<u64>,
    pub deleted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// Ascending by seq.
    pub messages: Vec<Message>,
    /// More messages exist before the first / after the last of this page.
    pub more_before: bool,
    pub more_after: bool,
}

/// One entry in a user's update sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub pts: u64,
    pub kind: UpdateKind,
}

/// Updates are pointers ("chat C is now at seq S"), not copies of messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateKind {
    /// 0
    NewMessage { chat: ChatId, seq: u64 },
    /// 1
    MessageEdited { chat: ChatId, seq: u64 },
    /// 2
    MessageDeleted { chat: ChatId, seq: u64 },
    /// 3: this user became a member.
    ChatJoined { chat: ChatId },
    /// 4: this user left or was removed.
    ChatLeft { chat: ChatId },
    /// 5: someone else joined, left or changed role.
    MembersChanged { chat: ChatId },
    /// 6: `reader` has read up to `seq`.
    ReadUpTo { chat: ChatId, reader: UserId, seq: u64 },
}

/// A page of updates with the messages they point at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// Ascending and contiguous in pts.
    pub updates: Vec<Update>,
    /// Current state of every message an update of this page points at.
    pub messages: Vec<Message>,
    /// The pts to continue from (the last update's, or the request's if none).
    pub pts: u64,
    /// More updates are waiting after `pts`.
    pub more: bool,
}

// ---- errors ------------------------------------------------------------------

/// Every failure a client can see: a stable code and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { code, message: message.into() }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.name(), self.code.0, self.message)
    }
}

/// A numeric error code. A newtype rather than an enum so that a client
/// decodes codes added by newer nodes instead of failing on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($value);)*

            /// The code's name, or "UNKNOWN" for a code this version does not know.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => stringify!($name),)*
                    _ => "UNKNOWN",
                }
            }
        }
    };
}

error_codes! {
    /// The bytes of a frame do not decode.
    MALFORMED_FRAME = 1,
    /// A frame header announced more than its kind allows.
    FRAME_TOO_LARGE = 2,
    /// A request kind this node does not know.
    UNKNOWN_REQUEST = 3,
    /// A text field is not UTF-8.
    INVALID_UTF8 = 4,
    /// The client speaks a protocol version this node does not.
    UNSUPPORTED_VERSION = 5,
    /// The connection must say hello first.
    HANDSHAKE_REQUIRED = 6,
    /// The request needs a session and the connection has none.
    UNAUTHENTICATED = 10,
    /// Wrong username or password.
    INVALID_CREDENTIALS = 11,
    /// The session was logged out or revoked.
    SESSION_REVOKED = 12,
    /// Too many attempts or requests; wait and retry.
    RATE_LIMITED = 13,
    /// The token is not of the form this node hands out.
    INVALID_TOKEN = 14,
    /// The username breaks the naming rules.
    INVALID_USERNAME = 20,
    /// The username is taken.
    USERNAME_TAKEN = 21,
    /// The password is too short or too long.
    WEAK_PASSWORD = 22,
    /// A field is out of range or malformed.
    INVALID_ARGUMENT = 23,
    /// Message text over the limit.
    TEXT_TOO_LONG = 24,
    /// Message text with nothing in it.
    TEXT_EMPTY = 25,
    /// A count limit was reached (devices, members).
    LIMIT_REACHED = 26,
    /// No such user, chat, message or device.
    NOT_FOUND = 30,
    /// The caller is not a member of the chat.
    NOT_MEMBER = 31,
    /// The caller's role does not allow this.
    PERMISSION_DENIED = 32,
    /// The request conflicts with the current state (already a member, ...).
    CONFLICT = 33,
    /// The node holds too many connections.
    TOO_MANY_CONNECTIONS = 40,
    /// The node cannot serve this now (shutting down, no leader); retry.
    UNAVAILABLE = 50,
    /// A fault inside the node; the request may be retried.
    INTERNAL = 51,
    /// The write did not commit in time; retry with the same client id.
    TIMEOUT = 52,
    /// A chunk's bytes do not hash to its name.
    CHUNK_MISMATCH = 60,
    /// A manifest or snapshot names chunks that are not stored; upload them first.
    CHUNKS_MISSING = 61,
    /// The user's storage quota would be exceeded.
    QUOTA_EXCEEDED = 62,
    /// Stored bytes failed their check and no good copy was found.
    DATA_CORRUPT = 63,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::frame::{FrameKind, encode_frame};

    #[test]
    fn the_last_request_kind_matches_the_kind_count() {
        let bytes = codec::encode(&Request::Routes).unwrap();
        assert_eq!(codec::peek_variant_index(&bytes), Some(Request::KINDS - 1));
    }

    /// Golden bytes: these pin the frame format of `hamgam/1`. If this test
    /// fails, the change broke every deployed client; make a new ALPN instead.
    #[test]
    fn golden_bytes_of_a_send_request_frame() {
        let request = Request::SendMessage { chat: ChatId(300), client_msg_id: 7, text: "سلام".into() };
        let frame = encode_frame(FrameKind::Request, &request).unwrap();
        let expected: &[u8] = &[
            3, // frame kind: request
            14, 0, 0, 0,  // payload length, u32 little endian
            15, // variant 15: SendMessage
            251, 0x2c, 0x01, // chat 300 as varint: 251 marks a u16 follows
            7,    // client_msg_id
            8, 0xd8, 0xb3, 0xd9, 0x84, 0xd8, 0xa7, 0xd9, 0x85, // "سلام": length 8, UTF-8
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn golden_bytes_of_an_error_response_frame() {
        let response = Response::Error(ErrorBody::new(ErrorCode::NOT_MEMBER, "no"));
        let frame = encode_frame(FrameKind::Response, &response).unwrap();
        assert_eq!(frame, [4, 5, 0, 0, 0, 0, 31, 2, b'n', b'o']);
    }

    #[test]
    fn unknown_error_codes_still_decode() {
        let body: ErrorBody = codec::decode(&codec::encode(&ErrorBody::new(ErrorCode(999), "later")).unwrap()).unwrap();
        assert_eq!(body.code.name(), "UNKNOWN");
        assert_eq!(ErrorCode::NOT_MEMBER.name(), "NOT_MEMBER");
    }
}
