//! Stored records. Each value is one version byte followed by the codec's
//! encoding of the record, so a later version can migrate old values.

use crate::SyncError;
use hamgam_proto::store::{ChunkList, ChunkRef, EntryKind, SharedFile, Visibility};
use hamgam_proto::{ChatKind, Role, UpdateKind, codec};
use hamgam_types::UserId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const RECORD_VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(codec::ENCODE_START_BYTES);
    out.push(RECORD_VERSION);
    // Records are plain structs of bounded size: encoding cannot fail.
    if let Err(error) = codec::encode_into(value, &mut out) {
        unreachable!("encoding a stored record failed: {error}");
    }
    out
}

/// A record kept as several items to a key: messages, updates, client ids.
///
/// Stored as the version byte, the block's header, then its items end to
/// end without a count, so adding an item to a block appends the item's
/// encoding and leaves the stored bytes before it alone ([`Held::push`]).
pub trait Block: Sized {
    type Header: Serialize + DeserializeOwned;
    type Item: Serialize + DeserializeOwned;
    fn header(&self) -> Self::Header;
    fn items(&self) -> &[Self::Item];
    fn items_mut(&mut self) -> &mut Vec<Self::Item>;
    fn from_parts(header: Self::Header, items: Vec<Self::Item>) -> Self;
}

pub fn encode_block<B: Block>(block: &B) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    encode_item(&block.header(), &mut out);
    for item in block.items() {
        encode_item(item, &mut out);
    }
    out
}

fn encode_item<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Items are plain values of bounded size: encoding cannot fail.
    if let Err(error) = codec::encode_into(value, out) {
        unreachable!("encoding a stored record failed: {error}");
    }
}

pub fn decode_block<B: Block>(what: &'static str, bytes: &[u8]) -> Result<B, SyncError> {
    let corrupt = |reason: String| SyncError::Corrupt { what, reason };
    let body = match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => body,
        Some((version, _)) => return Err(corrupt(format!("unknown record version {version}"))),
        None => return Err(corrupt("empty record".into())),
    };
    let (header, mut at) = codec::decode_prefix(body).map_err(|e| corrupt(e.to_string()))?;
    let mut items = Vec::new();
    while at < body.len() {
        let (item, used) = codec::decode_prefix(&body[at..]).map_err(|e| corrupt(e.to_string()))?;
        items.push(item);
        at += used;
    }
    Ok(B::from_parts(header, items))
}

/// A block as the state machine keeps it between commands: decoded, and
/// as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<B> {
    pub block: B,
    pub stored: Vec<u8>,
}

impl<B: Block> Held<B> {
    pub fn new(block: B) -> Self {
        let stored = encode_block(&block);
        Held { block, stored }
    }

    pub fn decode(what: &'static str, stored: Vec<u8>) -> Result<Self, SyncError> {
        Ok(Held { block: decode_block(what, &stored)?, stored })
    }

    /// Adds an item at the end: its encoding is appended to the stored bytes.
    pub fn push(&mut self, item: B::Item) {
        encode_item(&item, &mut self.stored);
        self.block.items_mut().push(item);
    }

    /// Encodes the block again after its items were changed in place.
    pub fn changed(&mut self) {
        self.stored = encode_block(&self.block);
    }
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, SyncError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => {
            codec::decode(body).map_err(|e| SyncError::Corrupt { what, reason: e.to_string() })
        }
        Some((version, _)) => Err(SyncError::Corrupt { what, reason: format!("unknown record version {version}") }),
        None => Err(SyncError::Corrupt { what, reason: "empty record".into() }),
    }
}

/// A user's profile and credentials (changes rarely).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// As typed at sign-up; lookups use the lowercase key.
    pub username: String,
    pub display_name: String,
    /// argon2id PHC string.
    pub password_phc: String,
    pub created_ms: u64,
}

/// A user's update sequence position. Not stored: derived from the first
/// and last update blocks, cached by the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserMeta {
    /// The last update's pts (0 before the first).
    pub pts: u64,
    /// The oldest retained update's pts.
    pub first_pts: u64,
}

/// Consecutive updates of one user's sequence, the first at pts `first`.
/// Update pts P lives in block P / [`UPDATES_PER_BLOCK`]; trimming the
/// oldest updates moves a block's `first` up, and a block left empty is
/// deleted.
///
/// Why blocks: a busy user gains several updates between two write-outs of
/// the database, and the database's cost follows the number of keys
/// written; those updates then fold into one key. Reading a page of
/// updates reads a few keys instead of one per update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateBlock {
    pub first: u64,
    pub kinds: Vec<UpdateKind>,
}

/// Updates per block (at most about 800 bytes encoded).
pub const UPDATES_PER_BLOCK: u64 = 32;

impl UpdateBlock {
    /// The block a pts falls in.
    pub fn number_of(pts: u64) -> u64 {
        pts / UPDATES_PER_BLOCK
    }

    /// The last update's pts (`first` itself for a block never left empty).
    pub fn last(&self) -> u64 {
        self.first + (self.kinds.len() as u64).saturating_sub(1)
    }

    /// The updates with their pts.
    pub fn updates(&self) -> impl Iterator<Item = (u64, &UpdateKind)> {
        (self.first..).zip(&self.kinds)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: String,
    /// blake3 of the token's secret; the secret itself is never stored.
    pub token_hash: [u8; 32],
    pub created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    pub kind: ChatKind,
    pub title: String,
    pub creator: UserId,
    /// The two people of a direct chat, lower id first.
    pub pair: Option<(UserId, UserId)>,
    pub member_count: u32,
    pub created_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub role: Role,
    pub read_seq: u64,
    pub joined_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub sender: UserId,
    pub date_ms: u64,
    pub text: String,
    pub edit_date_ms: Option<u64>,
    pub deleted: bool,
}

/// Consecutive messages of one chat, the first at seq `first` (the key is
/// the chat and `first`). Seqs are gap-free and messages are never
/// removed (a deleted one stays as a tombstone), so blocks tile a chat's
/// log. A block takes messages until it holds [`MESSAGES_PER_BLOCK_MAX`]
/// or its texts reach [`MESSAGE_BLOCK_TEXT_BYTES`]; the next message
/// starts a new one.
///
/// Why blocks: a busy chat (a group, a channel) gains several messages
/// between two write-outs of the database, which then cost one key written
/// instead of one each; a page of history reads a few keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageBlock {
    pub first: u64,
    pub messages: Vec<MessageRecord>,
}

pub const MESSAGES_PER_BLOCK_MAX: usize = 16;
/// Text bytes after which a block takes no more messages (one long message
/// may pass it; a block stays under about 8 KiB plus one message).
pub const MESSAGE_BLOCK_TEXT_BYTES: usize = 8 * 1024;

impl MessageBlock {
    /// The last message's seq.
    pub fn last(&self) -> u64 {
        self.first + (self.messages.len() as u64).saturating_sub(1)
    }

    pub fn get(&self, seq: u64) -> Option<&MessageRecord> {
        self.messages.get(usize::try_from(seq.checked_sub(self.first)?).ok()?)
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut MessageRecord> {
        self.messages.get_mut(usize::try_from(seq.checked_sub(self.first)?).ok()?)
    }

    /// Whether the next message starts a new block.
    pub fn is_full(&self) -> bool {
        self.messages.len() >= MESSAGES_PER_BLOCK_MAX
            || self.messages.iter().map(|m| m.text.len()).sum::<usize>() >= MESSAGE_BLOCK_TEXT_BYTES
    }

    /// The messages with their seqs.
    pub fn messages(&self) -> impl Iterator<Item = (u64, &MessageRecord)> {
        (self.first..).zip(&self.messages)
    }
}

/// Client message ids one sender used in one chat, with the seqs they made,
/// sorted by id (the key is the chat, the sender and the first id). Blocks
/// tile the id space: the block for an id is the last one whose first id
/// is at or below it. An id above every other (clients make them grow with
/// time) goes to the end of the last block, or starts a new block once that
/// holds [`DEDUP_BLOCK_IDS`]; an older, unseen id goes into its block in
/// order, and a block that passes twice that is split in two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupBlock {
    pub ids: Vec<(u64, u64)>,
}

pub const DEDUP_BLOCK_IDS: usize = 32;

impl DedupBlock {
    pub fn first_id(&self) -> Option<u64> {
        self.ids.first().map(|(id, _)| *id)
    }

    pub fn last_id(&self) -> Option<u64> {
        self.ids.last().map(|(id, _)| *id)
    }

    /// The seq a client id made, if it is in this block.
    pub fn seq_of(&self, client_msg_id: u64) -> Option<u64> {
        let at = self.ids.binary_search_by_key(&client_msg_id, |(id, _)| *id).ok()?;
        Some(self.ids[at].1)
    }

    /// Adds an id this block does not hold, in order; if the block then
    /// holds more than twice [`DEDUP_BLOCK_IDS`], its upper half is split
    /// off and returned (to be stored under its own first id).
    pub fn insert(&mut self, client_msg_id: u64, seq: u64) -> Option<DedupBlock> {
        let at = self.ids.partition_point(|(id, _)| *id < client_msg_id);
        self.ids.insert(at, (client_msg_id, seq));
        (self.ids.len() > 2 * DEDUP_BLOCK_IDS).then(|| DedupBlock { ids: self.ids.split_off(self.ids.len() / 2) })
    }
}

/// Updates for users of one target shard, made by one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub items: Vec<(UserId, UpdateKind)>,
}

/// Per target shard: the last outbox seq the target acknowledged and the
/// next seq to hand out. Not stored as such: both follow from the outbox
/// keys, and only the acknowledged seq of an emptied outbox is kept (as a
/// plain counter under `keys::outbox_meta`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxMeta {
    pub next_seq: u64,
    pub acked: u64,
}

/// The highest outbox seq applied from each source shard (by shard id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMarks {
    pub marks: std::collections::BTreeMap<u32, u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Accounts created by this shard so far (drives user ids).
    pub users_created: u64,
}

/// A file or folder of a user's cloud store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub kind: EntryKind,
    pub size: u64,
    pub hash: [u8; 32],
    pub mtime_ms: u64,
    pub stored_ms: u64,
    /// A file's chunks; `None` for a folder.
    pub content: Option<ChunkList>,
}

impl EntryRecord {
    pub fn folder(now_ms: u64) -> EntryRecord {
        EntryRecord {
            kind: EntryKind::Folder,
            size: 0,
            hash: [0; 32],
            mtime_ms: now_ms,
            stored_ms: now_ms,
            content: None,
        }
    }
}

/// An album of a user's gallery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlbumRecord {
    pub title: String,
    pub visibility: Visibility,
    pub created_ms: u64,
    pub items: u64,
    /// Item ids are never reused, so a like never lands on another photo.
    pub next_item: u64,
}

/// A photo or video in an album.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlbumItemRecord {
    pub file: SharedFile,
    pub thumbnail: Option<ChunkRef>,
    pub added_ms: u64,
    pub likes: u64,
}

/// A user's use of the cloud store (see `files` for what counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub used_bytes: u64,
    pub files: u64,
    pub snapshots: u64,
}

impl Block for UpdateBlock {
    type Header = u64;
    type Item = UpdateKind;
    fn header(&self) -> u64 {
        self.first
    }
    fn items(&self) -> &[UpdateKind] {
        &self.kinds
    }
    fn items_mut(&mut self) -> &mut Vec<UpdateKind> {
        &mut self.kinds
    }
    fn from_parts(first: u64, kinds: Vec<UpdateKind>) -> Self {
        UpdateBlock { first, kinds }
    }
}

impl Block for MessageBlock {
    type Header = u64;
    type Item = MessageRecord;
    fn header(&self) -> u64 {
        self.first
    }
    fn items(&self) -> &[MessageRecord] {
        &self.messages
    }
    fn items_mut(&mut self) -> &mut Vec<MessageRecord> {
        &mut self.messages
    }
    fn from_parts(first: u64, messages: Vec<MessageRecord>) -> Self {
        MessageBlock { first, messages }
    }
}

impl Block for DedupBlock {
    type Header = ();
    type Item = (u64, u64);
    fn header(&self) {}
    fn items(&self) -> &[(u64, u64)] {
        &self.ids
    }
    fn items_mut(&mut self) -> &mut Vec<(u64, u64)> {
        &mut self.ids
    }
    fn from_parts((): (), ids: Vec<(u64, u64)>) -> Self {
        DedupBlock { ids }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamgam_types::ChatId;

    /// Appending to a held block gives the bytes a whole new encoding gives,
    /// and they decode back to the block; a cut block is refused.
    #[test]
    fn a_block_grown_item_by_item_is_stored_as_if_encoded_whole() {
        let mut held = Held::new(MessageBlock { first: 17, messages: Vec::new() });
        for i in 0..5u64 {
            let text = "سلام ".repeat(i as usize * 40);
            held.push(MessageRecord { sender: UserId(i), date_ms: i, text, edit_date_ms: None, deleted: i == 3 });
        }
        assert_eq!(held.stored, encode_block(&held.block));
        let decoded: MessageBlock = decode_block("message block", &held.stored).unwrap();
        assert_eq!(decoded, held.block);
        assert!(decode_block::<MessageBlock>("message block", &held.stored[..held.stored.len() - 1]).is_err());

        let mut updates = Held::new(UpdateBlock { first: 64, kinds: Vec::new() });
        updates.push(UpdateKind::NewMessage { chat: ChatId(9), seq: 1 });
        updates.push(UpdateKind::ChatJoined { chat: ChatId(9) });
        assert_eq!(decode_block::<UpdateBlock>("update block", &updates.stored).unwrap(), updates.block);
        let mut ids = Held::new(DedupBlock::default());
        ids.push((5, 1));
        assert_eq!(decode_block::<DedupBlock>("dedup block", &ids.stored).unwrap().ids, vec![(5, 1)]);
        assert_eq!(Held::<DedupBlock>::decode("dedup block", ids.stored.clone()).unwrap(), ids);
    }
}
