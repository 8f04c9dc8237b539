//! The state machine of every data shard.
//!
//! Each command first checks everything it needs and only then writes, so a
//! refused command leaves nothing behind in the round's overlay.
//!
//! Updates for users of this same shard are written in the same apply; those
//! for users of other shards go to this shard's outbox in the same apply,
//! and the deliverer in [`crate::SyncService`] carries them over.
//!
//! Storage writes are the cost that decides throughput (a sled insert costs
//! several microseconds), so nothing is written that can be derived: a
//! chat's last seq is its last message key, a user's pts its last update key,
//! the next outbox seq follows the last outbox key. Those values, the chats'
//! member lists and the users' positions live in bounded caches; a miss reads
//! them back from storage.

use crate::cache::BoundedCache;
use crate::command::{Command, Reply, direct_chat_id};
use crate::files;
use crate::gallery;
use crate::keys;
use crate::records::{
    self, ChatRecord, DedupBlock, DeviceRecord, Held, InboxMarks, MemberRecord, MessageBlock, MessageRecord, OutboxMeta,
    OutboxRecord, ShardMeta, UpdateBlock, UserMeta, UserRecord,
};
use crate::{DomainError, SyncError, text};
use hamgam_proto::store::SharedFile;
use hamgam_proto::{ChatKind, Role, UpdateKind, codec};
use hamgam_raftstore::{ShardWriter, StateMachine};
use hamgam_storage::{KeyRange, KvPairs, KvRead, KvWrite, Order, StorageError};
use hamgam_types::{ChatId, Placement, ShardId, UserId, limits};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Told when a user's update sequence grows (after the write is readable).
/// Called on the raft store thread: it must not block.
pub trait UpdateListener: Send + Sync + 'static {
    fn user_updated(&self, user: UserId, pts: u64);

    /// A device session of `user` ended (logout or revocation).
    fn device_revoked(&self, user: UserId) {
        let _ = user;
    }
}

/// Outbox records by (source, target) shard pair.
pub(crate) type FreshOutbox = HashMap<(ShardId, ShardId), VecDeque<(u64, OutboxRecord)>>;

/// What the state machine tells the rest of the node after each round.
pub struct Signals {
    listener: Arc<dyn UpdateListener>,
    /// (source, target) shard pairs whose outbox gained records.
    pub(crate) outbox_dirty: Mutex<BTreeSet<(ShardId, ShardId)>>,
    /// The records themselves, so the deliverer need not read them back
    /// from storage. Bounded per pair; a gap makes the deliverer read storage.
    pub(crate) outbox_fresh: Mutex<FreshOutbox>,
    pub(crate) outbox_wake: Notify,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

impl Signals {
    pub fn new(listener: Arc<dyn UpdateListener>) -> Arc<Signals> {
        Arc::new(Signals {
            listener,
            outbox_dirty: Mutex::new(BTreeSet::new()),
            outbox_fresh: Mutex::new(HashMap::new()),
            outbox_wake: Notify::new(),
        })
    }

    fn publish_outbox(&self, fresh: FreshOutbox) {
        let pairs: Vec<(ShardId, ShardId)> = fresh.keys().copied().collect();
        {
            let mut queues = self.outbox_fresh.lock().unwrap_or_else(|p| p.into_inner());
            for (pair, records) in fresh {
                let queue = queues.entry(pair).or_default();
                queue.extend(records);
                if queue.len() > limits::OUTBOX_FRESH_RECORDS_MAX {
                    queue.clear(); // the deliverer falls back to storage
                }
            }
        }
        self.mark_outbox(pairs);
    }

    pub(crate) fn mark_outbox(&self, pairs: impl IntoIterator<Item = (ShardId, ShardId)>) {
        let mut dirty = self.outbox_dirty.lock().unwrap_or_else(|p| p.into_inner());
        let before = dirty.len();
        dirty.extend(pairs);
        if dirty.len() != before {
            self.outbox_wake.notify_one();
        }
    }
}

/// Cache bounds (entries; for chats, member records).
const CHATS_CACHED_MEMBERS_MAX: usize = 1_000_000;
const USERS_CACHED_MAX: usize = 500_000;
/// Updates held in the cache of users' last blocks (about 32 bytes each).
const TAIL_UPDATES_CACHED_MAX: usize = 500_000;
/// Messages held in the cache of chats' last blocks (a block's texts stop
/// growing at 8 KiB plus one message, so at most about 1 GiB in the worst
/// case, some 60 MiB for 256-byte messages).
const TAIL_MESSAGES_CACHED_MAX: usize = 200_000;
const COUNTERS_CACHED_MAX: usize = 500_000;
/// Senders' last blocks of client ids (up to 32 ids, about 0.5 KiB each).
const DEDUP_TAILS_CACHED_MAX: usize = 100_000;

/// A chat's record and members, as cached.
#[derive(Debug, Clone)]
struct ChatState {
    record: ChatRecord,
    /// Sorted by user id.
    members: Vec<(UserId, MemberRecord)>,
}

impl ChatState {
    fn member(&self, user: UserId) -> Option<MemberRecord> {
        self.members.binary_search_by_key(&user, |(u, _)| *u).ok().map(|i| self.members[i].1)
    }
}

#[derive(Debug)]
pub struct SyncMachine {
    placement: Placement,
    signals: Arc<Signals>,
    /// Collected during a round, published in `after_round`.
    fresh_outbox: FreshOutbox,
    updated_users: BTreeMap<UserId, u64>,
    revoked_users: BTreeSet<UserId>,
    /// Updates kept per user; every replica must use the same value.
    updates_retained: u64,
    chats: BoundedCache<ChatId, ChatState>,
    /// (chat, sender) -> the block of the highest client message ids used, if any.
    dedup_tails: BoundedCache<(ChatId, UserId), Option<Held<DedupBlock>>>,
    users: BoundedCache<UserId, UserMeta>,
    /// Each recently active user's last update block (weighed by updates).
    update_tails: BoundedCache<UserId, Held<UpdateBlock>>,
    /// Each recently active chat's last message block, `None` for a chat
    /// without messages (weighed by messages). Its last seq is the chat's.
    message_tails: BoundedCache<ChatId, Option<Held<MessageBlock>>>,
    /// (source, target) -> the outbox's next seq and acknowledged position.
    outboxes: BoundedCache<(ShardId, ShardId), OutboxMeta>,
    /// Each target shard's inbox marks.
    inboxes: BoundedCache<ShardId, InboxMarks>,
}

impl SyncMachine {
    pub fn new(placement: Placement, signals: Arc<Signals>) -> SyncMachine {
        SyncMachine {
            placement,
            signals,
            fresh_outbox: HashMap::new(),
            updated_users: BTreeMap::new(),
            revoked_users: BTreeSet::new(),
            updates_retained: limits::UPDATES_RETAINED_PER_USER,
            chats: BoundedCache::new(CHATS_CACHED_MEMBERS_MAX),
            dedup_tails: BoundedCache::new(DEDUP_TAILS_CACHED_MAX),
            users: BoundedCache::new(USERS_CACHED_MAX),
            update_tails: BoundedCache::new(TAIL_UPDATES_CACHED_MAX),
            message_tails: BoundedCache::new(TAIL_MESSAGES_CACHED_MAX),
            outboxes: BoundedCache::new(COUNTERS_CACHED_MAX),
            inboxes: BoundedCache::new(COUNTERS_CACHED_MAX),
        }
    }

    /// Keeps `retained` updates per user instead of the default (tests).
    pub fn with_updates_retained(mut self, retained: u64) -> SyncMachine {
        self.updates_retained = retained.max(1);
        self
    }
}

impl StateMachine for SyncMachine {
    fn apply(
        &mut self,
        shard: ShardId,
        index: u64,
        command: &[u8],
        kv: &mut ShardWriter<'_, '_>,
    ) -> Result<Vec<u8>, StorageError> {
        let outcome = match codec::decode::<Command>(command) {
            Ok(command) => self.apply_command(shard, command, kv),
            Err(error) => Err(SyncError::Corrupt { what: "command", reason: error.to_string() }),
        };
        let reply: Result<Reply, DomainError> = match outcome {
            Ok(reply) => Ok(reply),
            Err(SyncError::Domain(refusal)) => Err(refusal),
            Err(SyncError::Storage(error)) => return Err(error),
            Err(other) => {
                tracing::error!(%shard, index, error = %other, "command failed on damaged state");
                Err(DomainError::Internal(other.to_string()))
            }
        };
        // A reply is a small enum of plain values: encoding cannot fail.
        Ok(codec::encode(&reply).unwrap_or_default())
    }

    fn snapshot_installed(&mut self, _shard: ShardId) {
        // Rare (a replica far behind); dropping every cache is simplest and safe.
        self.chats.clear();
        self.dedup_tails.clear();
        self.users.clear();
        self.update_tails.clear();
        self.message_tails.clear();
        self.outboxes.clear();
        self.inboxes.clear();
    }

    fn after_round(&mut self) {
        if !self.fresh_outbox.is_empty() {
            self.signals.publish_outbox(std::mem::take(&mut self.fresh_outbox));
        }
        for (user, pts) in std::mem::take(&mut self.updated_users) {
            self.signals.listener.user_updated(user, pts);
        }
        for user in std::mem::take(&mut self.revoked_users) {
            self.signals.listener.device_revoked(user);
        }
    }
}

// ---- storage helpers, shared with the service's reads ----------------------------

pub(crate) fn get_record<T: DeserializeOwned>(
    kv: &impl KvRead,
    what: &'static str,
    key: &[u8],
) -> Result<Option<T>, SyncError> {
    kv.get(key)?.map(|bytes| records::decode(what, &bytes)).transpose()
}

fn put_record<T: Serialize>(kv: &mut impl KvWrite, key: &[u8], value: &T) {
    kv.put(key, records::encode(value));
}

fn get_u64(kv: &impl KvRead, key: &[u8]) -> Result<Option<u64>, SyncError> {
    match kv.get(key)? {
        None => Ok(None),
        Some(bytes) => {
            let array: [u8; 8] =
                bytes.try_into().map_err(|_| SyncError::Corrupt { what: "counter", reason: "not 8 bytes".into() })?;
            Ok(Some(u64::from_be_bytes(array)))
        }
    }
}

fn put_u64(kv: &mut impl KvWrite, key: &[u8], value: u64) {
    kv.put(key, value.to_be_bytes().to_vec());
}

/// The trailing u64 of the first (or last) key under `prefix`.
fn edge_u64(kv: &impl KvRead, prefix: &[u8], order: Order) -> Result<Option<u64>, SyncError> {
    match kv.scan(&KeyRange::prefix(prefix), order, 1)?.first() {
        None => Ok(None),
        Some((key, _)) => {
            keys::last_u64(key).map(Some).ok_or(SyncError::Corrupt { what: "key", reason: "short".into() })
        }
    }
}

/// One page of a scan: at most `limit` pairs, and whether more follow.
pub(crate) fn scan_page(kv: &impl KvRead, range: &KeyRange, limit: usize) -> Result<(KvPairs, bool), SyncError> {
    let mut pairs = kv.scan(range, Order::Ascending, limit + 1)?;
    let more = pairs.len() > limit;
    pairs.truncate(limit);
    Ok((pairs, more))
}

/// The last block stored in `range` (blocks are keyed by their first item,
/// so: the block with the highest start in it).
fn read_last_block<B: records::Block>(
    kv: &impl KvRead,
    range: &KeyRange,
    what: &'static str,
) -> Result<Option<Held<B>>, SyncError> {
    let Some((_, value)) = kv.scan(range, Order::Descending, 1)?.pop() else { return Ok(None) };
    Ok(Some(Held::decode(what, value)?))
}

/// A chat's last message block, if it has messages.
fn read_last_message_block(kv: &impl KvRead, chat: ChatId) -> Result<Option<Held<MessageBlock>>, SyncError> {
    read_last_block(kv, &KeyRange::prefix(&keys::message_blocks_of(chat)), "message block")
}

/// A chat's last seq: the last message of its last block (messages are never removed).
pub(crate) fn read_last_seq(kv: &impl KvRead, chat: ChatId) -> Result<u64, SyncError> {
    Ok(read_last_message_block(kv, chat)?.map_or(0, |held| held.block.last()))
}

/// The block that holds (or would hold) a sender's client id: the last one
/// starting at or before it. `None` if the id is below every block.
fn read_dedup_block(
    kv: &impl KvRead,
    chat: ChatId,
    sender: UserId,
    client_msg_id: u64,
) -> Result<Option<Held<DedupBlock>>, SyncError> {
    let start = keys::dedup_block(chat, sender, 0);
    let up_to_id = KeyRange::between(&start, &keys::dedup_block(chat, sender, client_msg_id.saturating_add(1)));
    read_last_block(kv, &up_to_id, "dedup block")
}

/// Stores that `client_msg_id` made `seq`, given the sender's last block and,
/// for an id below the highest, the block it falls in. Returns the sender's
/// last block as it is now.
fn record_client_id(
    kv: &mut impl KvWrite,
    (chat, sender): (ChatId, UserId),
    (client_msg_id, seq): (u64, u64),
    last: Option<Held<DedupBlock>>,
    older_block: Option<Held<DedupBlock>>,
) -> Option<Held<DedupBlock>> {
    let mut put = |held: &Held<DedupBlock>| {
        if let Some(first) = held.block.first_id() {
            kv.put(&keys::dedup_block(chat, sender, first), held.stored.clone());
        }
    };
    let highest = last.as_ref().and_then(|last| last.block.last_id());
    if highest.is_none_or(|highest| client_msg_id > highest) {
        let mut tail = match last {
            Some(last) if last.block.ids.len() < records::DEDUP_BLOCK_IDS => last,
            _ => Held::new(DedupBlock::default()),
        };
        tail.push((client_msg_id, seq));
        put(&tail);
        return Some(tail);
    }
    // Below the highest: into the block it falls in, or a block of its own
    // below every other.
    let mut block = older_block.unwrap_or_else(|| Held::new(DedupBlock::default()));
    let first_of = |held: &Held<DedupBlock>| held.block.first_id();
    let was_last = first_of(&block).is_some() && first_of(&block) == last.as_ref().and_then(first_of);
    let upper = block.block.insert(client_msg_id, seq).map(Held::new);
    block.changed();
    put(&block);
    if let Some(upper) = &upper {
        put(upper);
    }
    match (was_last, upper) {
        (true, Some(upper)) => Some(upper),
        (true, None) => Some(block),
        (false, _) => last,
    }
}

/// The block holding message `seq` of a chat: the last block starting at
/// or before it, if that reaches it.
pub(crate) fn read_message_block(
    kv: &impl KvRead,
    chat: ChatId,
    seq: u64,
) -> Result<Option<Held<MessageBlock>>, SyncError> {
    let up_to_seq = KeyRange::between(&keys::message_block(chat, 0), &keys::message_block(chat, seq.saturating_add(1)));
    let held: Option<Held<MessageBlock>> = read_last_block(kv, &up_to_seq, "message block")?;
    Ok(held.filter(|held| held.block.last() >= seq))
}

/// A user's position: the first update of the first block and the last of
/// the last. `None` if no such user.
pub(crate) fn read_user_meta(kv: &impl KvRead, user: UserId) -> Result<Option<UserMeta>, SyncError> {
    if kv.get(&keys::user(user))?.is_none() {
        return Ok(None);
    }
    let blocks = KeyRange::prefix(&keys::update_blocks_of(user));
    let edge = |order| -> Result<Option<UpdateBlock>, SyncError> {
        kv.scan(&blocks, order, 1)?.first().map(|(_, value)| records::decode_block("update block", value)).transpose()
    };
    let meta = match (edge(Order::Ascending)?, edge(Order::Descending)?) {
        (Some(first), Some(last)) => UserMeta { pts: last.last(), first_pts: first.first },
        _ => UserMeta { pts: 0, first_pts: 1 },
    };
    Ok(Some(meta))
}

/// The outbox toward `target`: the acknowledged position and the next seq.
/// Acknowledged records are deleted, so while records remain the position
/// is just before the first of them; the stored record matters only when
/// the outbox is empty (it is written when an acknowledgement empties it).
pub(crate) fn read_outbox_meta(kv: &impl KvRead, target: ShardId) -> Result<OutboxMeta, SyncError> {
    let prefix = keys::outbox_of(target);
    match (edge_u64(kv, &prefix, Order::Ascending)?, edge_u64(kv, &prefix, Order::Descending)?) {
        (Some(first), Some(last)) => Ok(OutboxMeta { acked: first - 1, next_seq: last + 1 }),
        _ => {
            let acked = get_u64(kv, &keys::outbox_meta(target))?.unwrap_or(0);
            Ok(OutboxMeta { acked, next_seq: acked + 1 })
        }
    }
}

/// Members of a chat, bounded by the group size limit, sorted by user id.
pub(crate) fn scan_members(kv: &impl KvRead, chat: ChatId) -> Result<Vec<(UserId, MemberRecord)>, SyncError> {
    let pairs = kv.scan(&KeyRange::prefix(&keys::members_of(chat)), Order::Ascending, limits::GROUP_MEMBERS_MAX + 1)?;
    pairs
        .into_iter()
        .map(|(key, value)| {
            let user = keys::last_u64(&key).ok_or(SyncError::Corrupt { what: "member key", reason: "short".into() })?;
            Ok((UserId(user), records::decode("member", &value)?))
        })
        .collect()
}

fn refuse<T>(error: DomainError) -> Result<T, SyncError> {
    Err(SyncError::Domain(error))
}

// ---- cached state ----------------------------------------------------------------

impl SyncMachine {
    fn chat(&mut self, kv: &impl KvRead, chat: ChatId) -> Result<Option<ChatState>, SyncError> {
        if let Some(state) = self.chats.get(&chat) {
            return Ok(Some(state.clone()));
        }
        let Some(record) = get_record::<ChatRecord>(kv, "chat", &keys::chat(chat))? else {
            return Ok(None);
        };
        let state = ChatState { record, members: scan_members(kv, chat)? };
        self.chats.insert(chat, state.clone(), state.members.len());
        Ok(Some(state))
    }

    fn existing_chat(&mut self, kv: &impl KvRead, chat: ChatId) -> Result<ChatState, SyncError> {
        self.chat(kv, chat)?.ok_or(SyncError::Domain(DomainError::ChatNotFound))
    }

    /// Stores a message (with its shared file, if any) once per client
    /// message id: a retry is answered with the first result.
    fn send(&mut self, shard: ShardId, kv: &mut impl KvWrite, new: NewMessage) -> Result<Reply, SyncError> {
        let NewMessage { chat, sender, client_msg_id, text, file, now_ms } = new;
        let state = self.existing_chat(kv, chat)?;
        role_in(&state, sender)?;
        // An id above every id this sender used in the chat cannot be a
        // retry: no read (the sender's last block is cached). Clients choose
        // ids that grow with time, so this is the common case; any other id
        // is looked up in its block.
        let last_ids = self.last_dedup_block(kv, chat, sender)?;
        let older_block = match &last_ids {
            Some(last) if last.block.last_id().is_some_and(|highest| client_msg_id <= highest) => {
                if last.block.first_id().is_some_and(|first| first <= client_msg_id) {
                    Some(last.clone())
                } else {
                    read_dedup_block(kv, chat, sender, client_msg_id)?
                }
            }
            _ => None,
        };
        if let Some(seq) = older_block.as_ref().and_then(|held| held.block.seq_of(client_msg_id)) {
            if let Some(last) = last_ids {
                self.dedup_tails.insert((chat, sender), Some(last), 1);
            }
            let date_ms = read_message_block(kv, chat, seq)?
                .and_then(|held| held.block.get(seq).map(|first| first.date_ms))
                .ok_or(SyncError::Corrupt { what: "message", reason: format!("dedup points at missing seq {seq}") })?;
            return Ok(Reply::Sent { seq, date_ms });
        }
        let seq = self.last_seq(kv, chat)? + 1;
        if let Some(file) = &file {
            files::require_fresh_checks(kv, now_ms)?;
            put_record(kv, &keys::shared_file(chat, seq), file);
        }
        let record = MessageRecord { sender, date_ms: now_ms, text, edit_date_ms: None, deleted: false };
        let mut block = self.message_block_for(kv, chat, seq)?;
        block.push(record);
        kv.put(&keys::message_block(chat, block.block.first), block.stored.clone());
        let weight = block.block.messages.len();
        self.message_tails.insert(chat, Some(block), weight);
        let last_ids = record_client_id(kv, (chat, sender), (client_msg_id, seq), last_ids, older_block);
        self.dedup_tails.insert((chat, sender), last_ids, 1);
        self.emit(shard, kv, state.members.iter().map(|(m, _)| (*m, UpdateKind::NewMessage { chat, seq })))?;
        Ok(Reply::Sent { seq, date_ms: now_ms })
    }

    fn group(&mut self, kv: &impl KvRead, chat: ChatId) -> Result<ChatState, SyncError> {
        let state = self.existing_chat(kv, chat)?;
        if state.record.kind != ChatKind::Group {
            return refuse(DomainError::PermissionDenied("the members of a direct chat do not change".into()));
        }
        Ok(state)
    }

    fn put_chat_record(&mut self, kv: &mut impl KvWrite, chat: ChatId, record: &ChatRecord) {
        put_record(kv, &keys::chat(chat), record);
        if let Some(state) = self.chats.get_mut(&chat) {
            state.record = record.clone();
        }
    }

    /// Writes a new chat with its first members and caches it whole.
    fn create_chat(
        &mut self,
        kv: &mut impl KvWrite,
        chat: ChatId,
        record: ChatRecord,
        members: Vec<(UserId, MemberRecord)>,
    ) {
        put_record(kv, &keys::chat(chat), &record);
        for (user, member) in &members {
            put_record(kv, &keys::member(chat, *user), member);
        }
        let weight = members.len();
        self.chats.insert(chat, ChatState { record, members }, weight);
        self.message_tails.insert(chat, None, 1);
    }

    fn put_member(&mut self, kv: &mut impl KvWrite, chat: ChatId, user: UserId, member: MemberRecord) {
        put_record(kv, &keys::member(chat, user), &member);
        if let Some(state) = self.chats.get_mut(&chat) {
            match state.members.binary_search_by_key(&user, |(u, _)| *u) {
                Ok(i) => state.members[i].1 = member,
                Err(i) => state.members.insert(i, (user, member)),
            }
            let weight = state.members.len();
            self.chats.reweigh(&chat, weight);
        }
    }

    fn delete_member(&mut self, kv: &mut impl KvWrite, chat: ChatId, user: UserId) {
        kv.delete(&keys::member(chat, user));
        if let Some(state) = self.chats.get_mut(&chat)
            && let Ok(i) = state.members.binary_search_by_key(&user, |(u, _)| *u)
        {
            state.members.remove(i);
        }
    }

    /// A chat's last seq, from its cached last message block (read and
    /// cached on a miss).
    fn last_seq(&mut self, kv: &impl KvRead, chat: ChatId) -> Result<u64, SyncError> {
        let last = self.last_message_block(kv, chat)?;
        let seq = last.as_ref().map_or(0, |held| held.block.last());
        let weight = last.as_ref().map_or(1, |held| held.block.messages.len());
        self.message_tails.insert(chat, last, weight);
        Ok(seq)
    }

    /// A chat's last message block, taken out of the cache or read.
    fn last_message_block(&mut self, kv: &impl KvRead, chat: ChatId) -> Result<Option<Held<MessageBlock>>, SyncError> {
        match self.message_tails.remove(&chat) {
            Some(cached) => Ok(cached),
            None => read_last_message_block(kv, chat),
        }
    }

    /// The last block of client ids `sender` has used in `chat` (the highest
    /// ids; blocks are never removed), taken out of the cache or read.
    fn last_dedup_block(
        &mut self,
        kv: &impl KvRead,
        chat: ChatId,
        sender: UserId,
    ) -> Result<Option<Held<DedupBlock>>, SyncError> {
        if let Some(cached) = self.dedup_tails.remove(&(chat, sender)) {
            return Ok(cached);
        }
        read_last_block(kv, &KeyRange::prefix(&keys::dedup_blocks_of(chat, sender)), "dedup block")
    }

    /// The outbox from `shard` to `target`. Cached: reading it scans the
    /// outbox's first and last keys, past every deletion still buffered.
    fn outbox_meta(&mut self, kv: &impl KvRead, shard: ShardId, target: ShardId) -> Result<OutboxMeta, SyncError> {
        self.outboxes.get_or_load((shard, target), || read_outbox_meta(kv, target))
    }

    /// The block message `seq` (the chat's next) goes into, taken out of the
    /// cache of last blocks or read; a new block if the last one is full.
    fn message_block_for(
        &mut self,
        kv: &impl KvRead,
        chat: ChatId,
        seq: u64,
    ) -> Result<Held<MessageBlock>, SyncError> {
        match self.last_message_block(kv, chat)? {
            Some(held) if held.block.last() + 1 != seq => Err(SyncError::Corrupt {
                what: "message block",
                reason: format!("message {seq} does not follow the block's last, {}", held.block.last()),
            }),
            Some(held) if !held.block.is_full() => Ok(held),
            _ => Ok(Held::new(MessageBlock { first: seq, messages: Vec::new() })),
        }
    }

    /// Writes back a block whose message changed in place (and the cached
    /// last block, if it is that one).
    fn put_changed_message_block(&mut self, kv: &mut impl KvWrite, chat: ChatId, mut held: Held<MessageBlock>) {
        held.changed();
        kv.put(&keys::message_block(chat, held.block.first), held.stored.clone());
        if let Some(Some(tail)) = self.message_tails.get_mut(&chat)
            && tail.block.first == held.block.first
        {
            *tail = held;
        }
    }

    /// The block update `pts` (the user's next) goes into, taken out of the
    /// cache of last blocks or read; a new block if `pts` starts one.
    fn tail_block(&mut self, kv: &impl KvRead, user: UserId, pts: u64) -> Result<Held<UpdateBlock>, SyncError> {
        let number = UpdateBlock::number_of(pts);
        let held = match self.update_tails.remove(&user) {
            Some(cached) if cached.block.last() + 1 == pts && UpdateBlock::number_of(cached.block.first) < number => {
                None
            }
            Some(cached) if UpdateBlock::number_of(cached.block.first) == number => Some(cached),
            _ => {
                let stored = kv.get(&keys::update_block(user, number))?;
                stored.map(|stored| Held::decode("update block", stored)).transpose()?
            }
        };
        match held {
            Some(held) if held.block.last() + 1 == pts => Ok(held),
            Some(held) => Err(SyncError::Corrupt {
                what: "update block",
                reason: format!("update {pts} does not follow the block's last, {}", held.block.last()),
            }),
            None => Ok(Held::new(UpdateBlock { first: pts, kinds: Vec::new() })),
        }
    }

    fn user_meta(&mut self, kv: &impl KvRead, user: UserId) -> Result<Option<UserMeta>, SyncError> {
        if let Some(meta) = self.users.get(&user) {
            return Ok(Some(*meta));
        }
        let meta = read_user_meta(kv, user)?;
        if let Some(meta) = meta {
            self.users.insert(user, meta, 1);
        }
        Ok(meta)
    }
}

fn role_in(state: &ChatState, user: UserId) -> Result<Role, SyncError> {
    state.member(user).map(|m| m.role).ok_or(SyncError::Domain(DomainError::NotMember))
}

// ---- commands ----------------------------------------------------------------------

impl SyncMachine {
    fn apply_command(&mut self, shard: ShardId, command: Command, kv: &mut impl KvWrite) -> Result<Reply, SyncError> {
        if command.shard(&self.placement) != shard {
            return refuse(DomainError::Internal(format!("command for another shard arrived at shard {shard}")));
        }
        match command {
            Command::SignUp { username_key, username, display_name, password_phc, now_ms } => {
                if kv.get(&keys::username(&username_key))?.is_some() {
                    return refuse(DomainError::UsernameTaken);
                }
                let mut meta: ShardMeta = get_record(kv, "shard meta", &keys::shard_meta())?.unwrap_or_default();
                let user = self.placement.user_id_for(shard, meta.users_created);
                meta.users_created += 1;
                put_record(kv, &keys::shard_meta(), &meta);
                put_u64(kv, &keys::username(&username_key), user.0);
                put_record(
                    kv,
                    &keys::user(user),
                    &UserRecord { username, display_name, password_phc, created_ms: now_ms },
                );
                self.users.insert(user, UserMeta { pts: 0, first_pts: 1 }, 1);
                Ok(Reply::SignedUp { user })
            }

            Command::CreateSession { user, device, name, token_hash, now_ms } => {
                if self.user_meta(kv, user)?.is_none() {
                    return refuse(DomainError::UserNotFound);
                }
                let devices = kv.scan(
                    &KeyRange::prefix(&keys::devices_of(user)),
                    Order::Ascending,
                    limits::DEVICES_PER_USER_MAX,
                )?;
                if devices.len() >= limits::DEVICES_PER_USER_MAX {
                    return refuse(DomainError::LimitReached(format!(
                        "an account has at most {} devices; log one out first",
                        limits::DEVICES_PER_USER_MAX
                    )));
                }
                if kv.get(&keys::device(user, device))?.is_some() {
                    return refuse(DomainError::Conflict("device id in use".into()));
                }
                put_record(kv, &keys::device(user, device), &DeviceRecord { name, token_hash, created_ms: now_ms });
                Ok(Reply::Done)
            }

            Command::RevokeSession { user, device } => {
                if kv.get(&keys::device(user, device))?.is_none() {
                    return refuse(DomainError::DeviceNotFound);
                }
                kv.delete(&keys::device(user, device));
                self.revoked_users.insert(user);
                Ok(Reply::Done)
            }

            Command::CreateDirect { chat, a, b, now_ms } => {
                if a == b {
                    return refuse(DomainError::InvalidArgument("a direct chat needs two different people".into()));
                }
                if chat != direct_chat_id(&self.placement, a, b) {
                    return refuse(DomainError::Internal("direct chat id does not match its pair".into()));
                }
                let pair = if a < b { (a, b) } else { (b, a) };
                if let Some(existing) = self.chat(kv, chat)? {
                    return if existing.record.pair == Some(pair) {
                        Ok(Reply::Chat { chat, created: false })
                    } else {
                        refuse(DomainError::Conflict("chat id in use".into()))
                    };
                }
                let record = ChatRecord {
                    kind: ChatKind::Direct,
                    title: String::new(),
                    creator: a,
                    pair: Some(pair),
                    member_count: 2,
                    created_ms: now_ms,
                };
                let member = MemberRecord { role: Role::Member, read_seq: 0, joined_ms: now_ms };
                self.create_chat(kv, chat, record, vec![(pair.0, member), (pair.1, member)]);
                self.emit(shard, kv, [a, b].map(|user| (user, UpdateKind::ChatJoined { chat })))?;
                Ok(Reply::Chat { chat, created: true })
            }

            Command::CreateGroup { chat, owner, title, now_ms } => {
                text::check_label("a group title", &title, limits::GROUP_TITLE_CHARS_MAX, true)?;
                if let Some(existing) = self.chat(kv, chat)? {
                    return if existing.record.kind == ChatKind::Group && existing.record.creator == owner {
                        Ok(Reply::Chat { chat, created: false })
                    } else {
                        refuse(DomainError::Conflict("chat id in use".into()))
                    };
                }
                let record = ChatRecord {
                    kind: ChatKind::Group,
                    title,
                    creator: owner,
                    pair: None,
                    member_count: 1,
                    created_ms: now_ms,
                };
                let member = MemberRecord { role: Role::Owner, read_seq: 0, joined_ms: now_ms };
                self.create_chat(kv, chat, record, vec![(owner, member)]);
                self.emit(shard, kv, [(owner, UpdateKind::ChatJoined { chat })])?;
                Ok(Reply::Chat { chat, created: true })
            }

            Command::AddMember { chat, actor, user, now_ms } => {
                let mut state = self.group(kv, chat)?;
                if role_in(&state, actor)? < Role::Admin {
                    return refuse(DomainError::PermissionDenied("only the owner and admins add members".into()));
                }
                if state.member(user).is_some() {
                    return refuse(DomainError::AlreadyMember);
                }
                if state.record.member_count as usize >= limits::GROUP_MEMBERS_MAX {
                    return refuse(DomainError::LimitReached(format!(
                        "a group has at most {} members",
                        limits::GROUP_MEMBERS_MAX
                    )));
                }
                state.record.member_count += 1;
                self.put_chat_record(kv, chat, &state.record);
                self.put_member(kv, chat, user, MemberRecord { role: Role::Member, read_seq: 0, joined_ms: now_ms });
                let mut updates = vec![(user, UpdateKind::ChatJoined { chat })];
                updates.extend(state.members.iter().map(|(other, _)| (*other, UpdateKind::MembersChanged { chat })));
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::RemoveMember { chat, actor, user } => {
                let mut state = self.group(kv, chat)?;
                if actor == user {
                    return refuse(DomainError::InvalidArgument("to remove yourself, leave the chat".into()));
                }
                let actor_role = role_in(&state, actor)?;
                let Some(target) = state.member(user) else {
                    return refuse(DomainError::InvalidArgument("that person is not a member".into()));
                };
                if actor_role < Role::Admin || target.role >= actor_role {
                    return refuse(DomainError::PermissionDenied(
                        "members are removed by the owner or by admins, and admins only by the owner".into(),
                    ));
                }
                state.record.member_count -= 1;
                self.put_chat_record(kv, chat, &state.record);
                self.delete_member(kv, chat, user);
                let mut updates = vec![(user, UpdateKind::ChatLeft { chat })];
                updates.extend(
                    state
                        .members
                        .iter()
                        .filter(|(m, _)| *m != user)
                        .map(|(m, _)| (*m, UpdateKind::MembersChanged { chat })),
                );
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::SetRole { chat, actor, user, role } => {
                let state = self.group(kv, chat)?;
                if role_in(&state, actor)? != Role::Owner {
                    return refuse(DomainError::PermissionDenied("only the owner changes roles".into()));
                }
                if actor == user {
                    return refuse(DomainError::InvalidArgument("the owner hands ownership to another member".into()));
                }
                let Some(mut target) = state.member(user) else {
                    return refuse(DomainError::InvalidArgument("that person is not a member".into()));
                };
                if role == Role::Owner {
                    // Handing over ownership: the old owner stays as an admin.
                    let mut old_owner = state.member(actor).ok_or(SyncError::Domain(DomainError::NotMember))?;
                    old_owner.role = Role::Admin;
                    self.put_member(kv, chat, actor, old_owner);
                }
                target.role = role;
                self.put_member(kv, chat, user, target);
                self.emit(shard, kv, state.members.iter().map(|(m, _)| (*m, UpdateKind::MembersChanged { chat })))?;
                Ok(Reply::Done)
            }

            Command::Leave { chat, user } => {
                let mut state = self.group(kv, chat)?;
                let role = role_in(&state, user)?;
                self.delete_member(kv, chat, user);
                state.record.member_count -= 1;
                self.put_chat_record(kv, chat, &state.record);
                let remaining: Vec<(UserId, MemberRecord)> =
                    state.members.iter().copied().filter(|(m, _)| *m != user).collect();
                if role == Role::Owner
                    && let Some((heir, mut record)) =
                        remaining.iter().copied().max_by_key(|(id, m)| (m.role, std::cmp::Reverse((m.joined_ms, *id))))
                {
                    // The group keeps an owner: the senior admin, else the
                    // longest-standing member.
                    record.role = Role::Owner;
                    self.put_member(kv, chat, heir, record);
                }
                let mut updates = vec![(user, UpdateKind::ChatLeft { chat })];
                updates.extend(remaining.iter().map(|(other, _)| (*other, UpdateKind::MembersChanged { chat })));
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::Send { chat, sender, client_msg_id, text, now_ms } => {
                text::check_message_text(&text)?;
                self.send(shard, kv, NewMessage { chat, sender, client_msg_id, text, file: None, now_ms })
            }

            Command::SendFile { chat, sender, client_msg_id, caption, file, now_ms } => {
                if !caption.is_empty() {
                    text::check_message_text(&caption)?;
                }
                files::check_shared_file(&file)?;
                self.send(
                    shard,
                    kv,
                    NewMessage { chat, sender, client_msg_id, text: caption, file: Some(file), now_ms },
                )
            }

            Command::Edit { chat, actor, seq, text, now_ms } => {
                let state = self.existing_chat(kv, chat)?;
                role_in(&state, actor)?;
                let mut block = live_message_block(kv, chat, seq)?;
                let message = block.block.get_mut(seq).ok_or(SyncError::Domain(DomainError::MessageNotFound))?;
                if message.sender != actor {
                    return refuse(DomainError::PermissionDenied("only the sender edits a message".into()));
                }
                text::check_message_text(&text)?;
                message.text = text;
                message.edit_date_ms = Some(now_ms);
                self.put_changed_message_block(kv, chat, block);
                self.emit(shard, kv, state.members.iter().map(|(m, _)| (*m, UpdateKind::MessageEdited { chat, seq })))?;
                Ok(Reply::Done)
            }

            Command::Delete { chat, actor, seq } => {
                let state = self.existing_chat(kv, chat)?;
                let role = role_in(&state, actor)?;
                let mut block = live_message_block(kv, chat, seq)?;
                let message = block.block.get_mut(seq).ok_or(SyncError::Domain(DomainError::MessageNotFound))?;
                let moderator = state.record.kind == ChatKind::Group && role >= Role::Admin;
                if message.sender != actor && !moderator {
                    return refuse(DomainError::PermissionDenied(
                        "a message is deleted by its sender or by a group's admins".into(),
                    ));
                }
                // Keep a tombstone so seq stays gap-free and devices learn of it.
                message.text.clear();
                message.deleted = true;
                self.put_changed_message_block(kv, chat, block);
                kv.delete(&keys::shared_file(chat, seq));
                self.emit(
                    shard,
                    kv,
                    state.members.iter().map(|(m, _)| (*m, UpdateKind::MessageDeleted { chat, seq })),
                )?;
                Ok(Reply::Done)
            }

            Command::MarkRead { chat, user, seq } => {
                let Some(state) = self.chat(kv, chat)? else {
                    return refuse(DomainError::NotMember);
                };
                let Some(mut member) = state.member(user) else {
                    return refuse(DomainError::NotMember);
                };
                let target = seq.min(self.last_seq(kv, chat)?);
                if target <= member.read_seq {
                    // Never backwards: answer with where the marker already is.
                    return Ok(Reply::ReadMarker { seq: member.read_seq });
                }
                member.read_seq = target;
                self.put_member(kv, chat, user, member);
                self.emit(
                    shard,
                    kv,
                    state.members.iter().map(|(m, _)| (*m, UpdateKind::ReadUpTo { chat, reader: user, seq: target })),
                )?;
                Ok(Reply::ReadMarker { seq: target })
            }

            Command::PutFile { user, path, manifest, quota_bytes, now_ms } => {
                files::put_file(kv, user, &path, manifest, quota_bytes, now_ms)
            }
            Command::MovePath { user, from, to, now_ms } => files::move_path(kv, user, &from, &to, now_ms),
            Command::DeletePath { user, path } => files::delete_path(kv, user, &path),
            Command::AddSnapshot { user, label, parent, tree, stats, added_bytes, quota_bytes, now_ms } => {
                let new = files::NewSnapshot { label, parent, tree, stats, added_bytes };
                files::add_snapshot(kv, user, new, quota_bytes, now_ms)
            }
            Command::ForgetSnapshots { user, ids } => files::forget_snapshots(kv, user, &ids),
            Command::GcBarrier { shard: _, floor_ms } => files::raise_gc_floor(kv, floor_ms),
            Command::CreateAlbum { owner, album, title, visibility, now_ms } => {
                gallery::create_album(kv, owner, album, &title, visibility, now_ms)
            }
            Command::SetAlbumVisibility { owner, album, visibility } => {
                gallery::set_visibility(kv, owner, album, visibility)
            }
            Command::AddAlbumItem { owner, album, file, thumbnail, now_ms } => {
                gallery::add_item(kv, owner, album, file, thumbnail, now_ms)
            }
            Command::RemoveAlbumItem { owner, album, item } => gallery::remove_item(kv, owner, album, item),
            Command::DeleteAlbum { owner, album } => gallery::delete_album(kv, owner, album),
            Command::LikeItem { owner, album, item, liker, like } => {
                gallery::like_item(kv, owner, album, item, liker, like)
            }

            Command::Deliver { source, target: _, records } => self.deliver(shard, kv, vec![(source, records)]),
            Command::DeliverMany { target: _, batches } => self.deliver(shard, kv, batches),

            Command::OutboxAck { source: _, target, through } => {
                let mut meta = self.outbox_meta(kv, shard, target)?;
                // Bounded: a delivery never carries more than this many records.
                let through =
                    through.min(meta.next_seq - 1).min(meta.acked + limits::OUTBOX_RECORDS_PER_DELIVERY_MAX as u64);
                if through <= meta.acked {
                    return Ok(Reply::Done);
                }
                for seq in meta.acked + 1..=through {
                    kv.delete(&keys::outbox(target, seq));
                }
                if through + 1 == meta.next_seq {
                    // The outbox is now empty: keep the position on record.
                    put_u64(kv, &keys::outbox_meta(target), through);
                }
                meta.acked = through;
                self.outboxes.insert((shard, target), meta, 1);
                Ok(Reply::Done)
            }
        }
    }

    /// Applies outbox records from other shards, skipping those at or below
    /// each source's inbox mark (a re-sent delivery), and raises the marks.
    fn deliver(
        &mut self,
        shard: ShardId,
        kv: &mut impl KvWrite,
        batches: Vec<(ShardId, Vec<(u64, OutboxRecord)>)>,
    ) -> Result<Reply, SyncError> {
        let mut inbox = match self.inboxes.get(&shard) {
            Some(inbox) => inbox.clone(),
            None => get_record::<InboxMarks>(kv, "inbox marks", &keys::inbox_marks())?.unwrap_or_default(),
        };
        for (source, records) in batches {
            let mut last = inbox.marks.get(&source.0).copied().unwrap_or(0);
            for (seq, record) in records {
                if seq <= last {
                    continue; // already applied by an earlier try of this delivery
                }
                if seq != last + 1 {
                    tracing::warn!(%source, %shard, expected = last + 1, got = seq, "outbox delivery skipped ahead");
                }
                for (user, kind) in record.items {
                    self.append_update(kv, user, kind)?;
                }
                last = seq;
            }
            inbox.marks.insert(source.0, last);
        }
        put_record(kv, &keys::inbox_marks(), &inbox);
        let weight = inbox.marks.len();
        self.inboxes.insert(shard, inbox, weight);
        Ok(Reply::Done)
    }

    /// Writes updates: users of this shard at once, the others through the outbox.
    fn emit(
        &mut self,
        shard: ShardId,
        kv: &mut impl KvWrite,
        updates: impl IntoIterator<Item = (UserId, UpdateKind)>,
    ) -> Result<(), SyncError> {
        let mut by_target: BTreeMap<ShardId, Vec<(UserId, UpdateKind)>> = BTreeMap::new();
        for (user, kind) in updates {
            let target = self.placement.shard_of_user(user);
            if target == shard {
                self.append_update(kv, user, kind)?;
            } else {
                by_target.entry(target).or_default().push((user, kind));
            }
        }
        for (target, items) in by_target {
            let mut meta = self.outbox_meta(kv, shard, target)?;
            let record = OutboxRecord { items };
            // The next seq is above every record this outbox ever held, so
            // the key holds nothing; most records are acknowledged before
            // the node's next database write-out, which then never sees them.
            kv.create(&keys::outbox(target, meta.next_seq), records::encode(&record));
            self.fresh_outbox.entry((shard, target)).or_default().push_back((meta.next_seq, record));
            meta.next_seq += 1;
            self.outboxes.insert((shard, target), meta, 1);
        }
        Ok(())
    }

    /// Appends one update to a user's sequence, trimming the oldest beyond retention.
    fn append_update(&mut self, kv: &mut impl KvWrite, user: UserId, kind: UpdateKind) -> Result<(), SyncError> {
        let Some(mut meta) = self.user_meta(kv, user)? else {
            tracing::warn!(%user, "update for a user this shard does not hold; dropped");
            return Ok(());
        };
        meta.pts += 1;
        match &kind {
            UpdateKind::ChatJoined { chat } => kv.put(&keys::dialog(user, *chat), Vec::new()),
            UpdateKind::ChatLeft { chat } => kv.delete(&keys::dialog(user, *chat)),
            _ => {}
        }
        let mut tail = self.tail_block(kv, user, meta.pts)?;
        tail.push(kind);
        let oldest_kept = (meta.first_pts + limits::UPDATES_TRIMMED_PER_APPEND_MAX)
            .min((meta.pts + 1).saturating_sub(self.updates_retained))
            .max(meta.first_pts);
        if oldest_kept > meta.first_pts {
            trim_updates(kv, user, &mut tail.block, meta.first_pts, oldest_kept)?;
            tail.changed();
            meta.first_pts = oldest_kept;
        }
        kv.put(&keys::update_block(user, UpdateBlock::number_of(meta.pts)), tail.stored.clone());
        let weight = tail.block.kinds.len();
        self.update_tails.insert(user, tail, weight);
        self.users.insert(user, meta, 1);
        self.updated_users.insert(user, meta.pts);
        Ok(())
    }
}

/// Drops a user's updates from `first` up to (not including) `oldest_kept`;
/// the last block (`tail`, written by the caller) is changed in place.
fn trim_updates(
    kv: &mut impl KvWrite,
    user: UserId,
    tail: &mut UpdateBlock,
    first: u64,
    oldest_kept: u64,
) -> Result<(), SyncError> {
    let drop_front = |block: &mut UpdateBlock| {
        let dropped = oldest_kept.saturating_sub(block.first).min(block.kinds.len() as u64);
        block.kinds.drain(..dropped as usize);
        block.first += dropped;
    };
    let tail_number = UpdateBlock::number_of(tail.first);
    for number in UpdateBlock::number_of(first)..=UpdateBlock::number_of(oldest_kept - 1) {
        if number == tail_number {
            drop_front(tail); // never emptied: at least the newest update is retained
            continue;
        }
        let key = keys::update_block(user, number);
        let Some(stored) = kv.get(&key)? else { continue };
        let mut block: UpdateBlock = records::decode_block("update block", &stored)?;
        drop_front(&mut block);
        if block.kinds.is_empty() {
            kv.delete(&key);
        } else {
            kv.put(&key, records::encode_block(&block));
        }
    }
    Ok(())
}

/// What [`SyncMachine::send`] stores.
struct NewMessage {
    chat: ChatId,
    sender: UserId,
    client_msg_id: u64,
    text: String,
    file: Option<SharedFile>,
    now_ms: u64,
}

/// The block holding message `seq`, refused if there is no such message or it was deleted.
fn live_message_block(kv: &impl KvRead, chat: ChatId, seq: u64) -> Result<Held<MessageBlock>, SyncError> {
    match read_message_block(kv, chat, seq)? {
        Some(held) if held.block.get(seq).is_some_and(|message| !message.deleted) => Ok(held),
        _ => refuse(DomainError::MessageNotFound),
    }
}
