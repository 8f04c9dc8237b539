//! Key layout inside a shard's state-machine range. The first byte names the
//! table; ids are fixed-width big-endian so keys sort by id and by sequence.
//! Table numbers are part of the stored format: never reuse one.

use hamgam_types::{ChatId, DeviceId, ShardId, UserId};

// Tables of a user's shard.
const USERNAME: u8 = 0x10;
const USER: u8 = 0x11;
// 0x12 was the user meta table; a user's position is now derived from its update keys.
const DEVICE: u8 = 0x13;
// 0x14 was one update per key; updates are now kept in blocks.
const UPDATE_BLOCK: u8 = 0x19;
const DIALOG: u8 = 0x15;
// 0x16 was one inbox mark per source; all marks of a shard now share one record.
const INBOX_MARKS: u8 = 0x18;
const SHARD_META: u8 = 0x17;
// Tables of a chat's shard.
const CHAT: u8 = 0x20;
// 0x21 was the chat seq table; a chat's last seq is now its last message key.
const MEMBER: u8 = 0x22;
// 0x23 was one message per key; messages are now kept in blocks.
const MESSAGE_BLOCK: u8 = 0x26;
// 0x24 was one client id per key; they are now kept in blocks.
const DEDUP_BLOCK: u8 = 0x27;
// The file shared in a message, by (chat, seq).
const SHARED_FILE: u8 = 0x25;
// The cloud store's tables, in a user's shard.
const ENTRY: u8 = 0x40;
const SNAPSHOT: u8 = 0x41;
const USAGE: u8 = 0x42;
// Garbage collection's floor, one per shard.
const GC_FLOOR: u8 = 0x43;
// How many moves a user's namespace has seen (collection reads it around a scan).
const MOVES: u8 = 0x44;
// Galleries, in the owner's shard.
const ALBUM: u8 = 0x48;
const ALBUM_ITEM: u8 = 0x49;
const LIKE: u8 = 0x4A;
// The cross-shard outbox of any shard.
const OUTBOX: u8 = 0x30;
const OUTBOX_META: u8 = 0x31;

fn key(table: u8, parts: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * parts.len());
    k.push(table);
    for part in parts {
        k.extend_from_slice(&part.to_be_bytes());
    }
    k
}

pub fn username(name_key: &str) -> Vec<u8> {
    let mut k = vec![USERNAME];
    k.extend_from_slice(name_key.as_bytes());
    k
}

pub fn user(user: UserId) -> Vec<u8> {
    key(USER, &[user.0])
}

pub fn device(user: UserId, device: DeviceId) -> Vec<u8> {
    key(DEVICE, &[user.0, device.0])
}

pub fn devices_of(user: UserId) -> Vec<u8> {
    key(DEVICE, &[user.0])
}

/// Block `number` of a user's updates (see `records::UpdateBlock`).
pub fn update_block(user: UserId, number: u64) -> Vec<u8> {
    key(UPDATE_BLOCK, &[user.0, number])
}

pub fn update_blocks_of(user: UserId) -> Vec<u8> {
    key(UPDATE_BLOCK, &[user.0])
}

pub fn dialog(user: UserId, chat: ChatId) -> Vec<u8> {
    key(DIALOG, &[user.0, chat.0])
}

pub fn dialogs_of(user: UserId) -> Vec<u8> {
    key(DIALOG, &[user.0])
}

/// The highest outbox seq applied from each source shard.
pub fn inbox_marks() -> Vec<u8> {
    vec![INBOX_MARKS]
}

pub fn shard_meta() -> Vec<u8> {
    vec![SHARD_META]
}

pub fn chat(chat: ChatId) -> Vec<u8> {
    key(CHAT, &[chat.0])
}

pub fn member(chat: ChatId, user: UserId) -> Vec<u8> {
    key(MEMBER, &[chat.0, user.0])
}

pub fn members_of(chat: ChatId) -> Vec<u8> {
    key(MEMBER, &[chat.0])
}

/// The block of a chat's messages that starts at `first` (see `records::MessageBlock`).
pub fn message_block(chat: ChatId, first: u64) -> Vec<u8> {
    key(MESSAGE_BLOCK, &[chat.0, first])
}

pub fn shared_file(chat: ChatId, seq: u64) -> Vec<u8> {
    key(SHARED_FILE, &[chat.0, seq])
}

/// Every file shared in any chat of a shard.
pub fn all_shared_files() -> Vec<u8> {
    vec![SHARED_FILE]
}

pub fn message_blocks_of(chat: ChatId) -> Vec<u8> {
    key(MESSAGE_BLOCK, &[chat.0])
}

/// The block of a sender's client ids in a chat that starts at `first_id` (see `records::DedupBlock`).
pub fn dedup_block(chat: ChatId, sender: UserId, first_id: u64) -> Vec<u8> {
    key(DEDUP_BLOCK, &[chat.0, sender.0, first_id])
}

/// A sender's dedup blocks in a chat, in client id order.
pub fn dedup_blocks_of(chat: ChatId, sender: UserId) -> Vec<u8> {
    key(DEDUP_BLOCK, &[chat.0, sender.0])
}

pub fn outbox(target: ShardId, seq: u64) -> Vec<u8> {
    key(OUTBOX, &[u64::from(target.0), seq])
}

pub fn outbox_of(target: ShardId) -> Vec<u8> {
    key(OUTBOX, &[u64::from(target.0)])
}

pub fn outbox_meta(target: ShardId) -> Vec<u8> {
    key(OUTBOX_META, &[u64::from(target.0)])
}

/// A file or folder: the parent folder's path, a zero byte, the name, so
/// that one folder's entries are one prefix and sort by name. The root's
/// path is empty.
pub fn entry(user: UserId, parent: &str, name: &str) -> Vec<u8> {
    let mut k = folder_entries(user, parent);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The prefix of a folder's own entries.
pub fn folder_entries(user: UserId, folder: &str) -> Vec<u8> {
    let mut k = key(ENTRY, &[user.0]);
    k.extend_from_slice(folder.as_bytes());
    k.push(0);
    k
}

/// The prefix of entries in the folder's subfolders, at any depth.
pub fn folder_subtree(user: UserId, folder: &str) -> Vec<u8> {
    let mut k = key(ENTRY, &[user.0]);
    k.extend_from_slice(folder.as_bytes());
    k.push(b'/');
    k
}

/// The (parent, name) of an entry key of `user`.
pub fn split_entry(user: UserId, key: &[u8]) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(self::key(ENTRY, &[user.0]).as_slice())?;
    let zero = rest.iter().position(|&b| b == 0)?;
    Some((std::str::from_utf8(&rest[..zero]).ok()?, std::str::from_utf8(&rest[zero + 1..]).ok()?))
}

pub fn snapshot(user: UserId, id: u64) -> Vec<u8> {
    key(SNAPSHOT, &[user.0, id])
}

pub fn snapshots_of(user: UserId) -> Vec<u8> {
    key(SNAPSHOT, &[user.0])
}

pub fn usage(user: UserId) -> Vec<u8> {
    key(USAGE, &[user.0])
}

pub fn gc_floor() -> Vec<u8> {
    vec![GC_FLOOR]
}

pub fn album(owner: UserId, album: u64) -> Vec<u8> {
    key(ALBUM, &[owner.0, album])
}

pub fn albums_of(owner: UserId) -> Vec<u8> {
    key(ALBUM, &[owner.0])
}

pub fn album_item(owner: UserId, album: u64, item: u64) -> Vec<u8> {
    key(ALBUM_ITEM, &[owner.0, album, item])
}

pub fn album_items(owner: UserId, album: u64) -> Vec<u8> {
    key(ALBUM_ITEM, &[owner.0, album])
}

/// Every album item of a shard, all users.
pub fn all_album_items() -> Vec<u8> {
    vec![ALBUM_ITEM]
}

pub fn like(owner: UserId, album: u64, item: u64, liker: UserId) -> Vec<u8> {
    key(LIKE, &[owner.0, album, item, liker.0])
}

pub fn likes_of(owner: UserId, album: u64, item: u64) -> Vec<u8> {
    key(LIKE, &[owner.0, album, item])
}

pub fn moves(user: UserId) -> Vec<u8> {
    key(MOVES, &[user.0])
}

/// Every file entry of a shard, all users.
pub fn all_entries() -> Vec<u8> {
    vec![ENTRY]
}

/// The prefix of every entry of `user`.
pub fn entries_of(user: UserId) -> Vec<u8> {
    key(ENTRY, &[user.0])
}

/// The user of an entry key.
pub fn entry_user(key: &[u8]) -> Option<UserId> {
    if key.first() != Some(&ENTRY) {
        return None;
    }
    Some(UserId(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?)))
}

/// Every snapshot of a shard, all users.
pub fn all_snapshots() -> Vec<u8> {
    vec![SNAPSHOT]
}

/// The trailing big-endian u64 of a key (a seq, pts or id).
pub fn last_u64(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}
