//! The state machine of every data shard.
//!
//! Each command first checks everything it needs and only then writes, so a
//! refused command leaves nothing behind in the round's overlay. Effects on
//! users of other shards are written to this shard's outbox in the same
//! apply; the deliverer in [`crate::SyncService`] carries them over.

use crate::command::{Command, Reply, direct_chat_id};
use crate::keys;
use crate::records::{
    self, ChatRecord, DeviceRecord, MemberRecord, MessageRecord, OutboxMeta, OutboxRecord, ShardMeta, UserMeta,
    UserRecord,
};
use crate::{DomainError, SyncError, text};
use hamgam_proto::{ChatKind, Role, UpdateKind, codec};
use hamgam_raftstore::{ShardWriter, StateMachine};
use hamgam_storage::{KeyRange, KvRead, KvWrite, Order, StorageError};
use hamgam_types::{ChatId, Placement, ShardId, UserId, limits};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Told when a user's update sequence grows (after the write is readable).
/// Called on the raft store thread: it must not block.
pub trait UpdateListener: Send + Sync + 'static {
    fn user_updated(&self, user: UserId, pts: u64);
}

/// What the state machine tells the rest of the node after each round.
pub struct Signals {
    listener: Arc<dyn UpdateListener>,
    /// (source, target) shard pairs whose outbox gained records.
    pub(crate) outbox_dirty: Mutex<BTreeSet<(ShardId, ShardId)>>,
    pub(crate) outbox_wake: Notify,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

impl Signals {
    pub fn new(listener: Arc<dyn UpdateListener>) -> Arc<Signals> {
        Arc::new(Signals { listener, outbox_dirty: Mutex::new(BTreeSet::new()), outbox_wake: Notify::new() })
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

#[derive(Debug)]
pub struct SyncMachine {
    placement: Placement,
    signals: Arc<Signals>,
    /// Collected during a round, published in `after_round`.
    dirty_outboxes: BTreeSet<(ShardId, ShardId)>,
    updated_users: BTreeMap<UserId, u64>,
    /// Updates kept per user; every replica must use the same value.
    updates_retained: u64,
}

impl SyncMachine {
    pub fn new(placement: Placement, signals: Arc<Signals>) -> SyncMachine {
        SyncMachine {
            placement,
            signals,
            dirty_outboxes: BTreeSet::new(),
            updated_users: BTreeMap::new(),
            updates_retained: limits::UPDATES_RETAINED_PER_USER,
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

    fn after_round(&mut self) {
        if !self.dirty_outboxes.is_empty() {
            self.signals.mark_outbox(std::mem::take(&mut self.dirty_outboxes));
        }
        for (user, pts) in std::mem::take(&mut self.updated_users) {
            self.signals.listener.user_updated(user, pts);
        }
    }
}

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
            let array: [u8; 8] = bytes
                .try_into()
                .map_err(|_| SyncError::Corrupt { what: "counter", reason: "not 8 bytes".into() })?;
            Ok(Some(u64::from_be_bytes(array)))
        }
    }
}

fn put_u64(kv: &mut impl KvWrite, key: &[u8], value: u64) {
    kv.put(key, value.to_be_bytes().to_vec());
}

fn refuse<T>(error: DomainError) -> Result<T, SyncError> {
    Err(SyncError::Domain(error))
}

/// Members of a chat, bounded by the group size limit.
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

struct ChatState {
    record: ChatRecord,
}

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
                put_record(kv, &keys::user(user), &UserRecord { username, display_name, password_phc, created_ms: now_ms });
                put_record(kv, &keys::user_meta(user), &UserMeta { pts: 0, first_pts: 1 });
                Ok(Reply::SignedUp { user })
            }

            Command::CreateSession { user, device, name, token_hash, now_ms } => {
                if get_record::<UserMeta>(kv, "user meta", &keys::user_meta(user))?.is_none() {
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
                Ok(Reply::Done)
            }

            Command::CreateDirect { chat, a, b, now_ms } => {
                if a == b {
                    return refuse(DomainError::InvalidArgument("a direct chat needs two different people".into()));
                }
                if chat != direct_chat_id(a, b) {
                    return refuse(DomainError::Internal("direct chat id does not match its pair".into()));
                }
                let pair = if a < b { (a, b) } else { (b, a) };
                if let Some(existing) = get_record::<ChatRecord>(kv, "chat", &keys::chat(chat))? {
                    return if existing.pair == Some(pair) {
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
                put_record(kv, &keys::chat(chat), &record);
                for user in [a, b] {
                    let member = MemberRecord { role: Role::Member, read_seq: 0, joined_ms: now_ms };
                    put_record(kv, &keys::member(chat, user), &member);
                }
                self.emit(shard, kv, [a, b].map(|user| (user, UpdateKind::ChatJoined { chat })))?;
                Ok(Reply::Chat { chat, created: true })
            }

            Command::CreateGroup { chat, owner, title, now_ms } => {
                text::check_label("a group title", &title, limits::GROUP_TITLE_CHARS_MAX, true)?;
                if let Some(existing) = get_record::<ChatRecord>(kv, "chat", &keys::chat(chat))? {
                    return if existing.kind == ChatKind::Group && existing.creator == owner {
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
                put_record(kv, &keys::chat(chat), &record);
                put_record(kv, &keys::member(chat, owner), &MemberRecord { role: Role::Owner, read_seq: 0, joined_ms: now_ms });
                self.emit(shard, kv, [(owner, UpdateKind::ChatJoined { chat })])?;
                Ok(Reply::Chat { chat, created: true })
            }

            Command::AddMember { chat, actor, user, now_ms } => {
                let mut state = load_group(kv, chat)?;
                let actor_role = member_role(kv, chat, actor)?;
                if actor_role < Role::Admin {
                    return refuse(DomainError::PermissionDenied("only the owner and admins add members".into()));
                }
                if kv.get(&keys::member(chat, user))?.is_some() {
                    return refuse(DomainError::AlreadyMember);
                }
                if state.record.member_count as usize >= limits::GROUP_MEMBERS_MAX {
                    return refuse(DomainError::LimitReached(format!(
                        "a group has at most {} members",
                        limits::GROUP_MEMBERS_MAX
                    )));
                }
                let others = scan_members(kv, chat)?;
                state.record.member_count += 1;
                put_record(kv, &keys::chat(chat), &state.record);
                put_record(kv, &keys::member(chat, user), &MemberRecord { role: Role::Member, read_seq: 0, joined_ms: now_ms });
                let mut updates = vec![(user, UpdateKind::ChatJoined { chat })];
                updates.extend(others.into_iter().map(|(other, _)| (other, UpdateKind::MembersChanged { chat })));
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::RemoveMember { chat, actor, user } => {
                let mut state = load_group(kv, chat)?;
                if actor == user {
                    return refuse(DomainError::InvalidArgument("to remove yourself, leave the chat".into()));
                }
                let actor_role = member_role(kv, chat, actor)?;
                let Some(target) = get_record::<MemberRecord>(kv, "member", &keys::member(chat, user))? else {
                    return refuse(DomainError::InvalidArgument("that person is not a member".into()));
                };
                if actor_role < Role::Admin || target.role >= actor_role {
                    return refuse(DomainError::PermissionDenied(
                        "members are removed by the owner or by admins, and admins only by the owner".into(),
                    ));
                }
                state.record.member_count -= 1;
                put_record(kv, &keys::chat(chat), &state.record);
                kv.delete(&keys::member(chat, user));
                let remaining = scan_members(kv, chat)?;
                let mut updates = vec![(user, UpdateKind::ChatLeft { chat })];
                updates.extend(remaining.into_iter().map(|(other, _)| (other, UpdateKind::MembersChanged { chat })));
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::SetRole { chat, actor, user, role } => {
                load_group(kv, chat)?;
                if member_role(kv, chat, actor)? != Role::Owner {
                    return refuse(DomainError::PermissionDenied("only the owner changes roles".into()));
                }
                if actor == user {
                    return refuse(DomainError::InvalidArgument("the owner hands ownership to another member".into()));
                }
                let Some(mut target) = get_record::<MemberRecord>(kv, "member", &keys::member(chat, user))? else {
                    return refuse(DomainError::InvalidArgument("that person is not a member".into()));
                };
                if role == Role::Owner {
                    // Handing over ownership: the old owner stays as an admin.
                    let mut old_owner: MemberRecord = get_record(kv, "member", &keys::member(chat, actor))?
                        .ok_or(SyncError::Domain(DomainError::NotMember))?;
                    old_owner.role = Role::Admin;
                    put_record(kv, &keys::member(chat, actor), &old_owner);
                }
                target.role = role;
                put_record(kv, &keys::member(chat, user), &target);
                let members = scan_members(kv, chat)?;
                self.emit(shard, kv, members.into_iter().map(|(m, _)| (m, UpdateKind::MembersChanged { chat })))?;
                Ok(Reply::Done)
            }

            Command::Leave { chat, user } => {
                let mut state = load_group(kv, chat)?;
                let role = member_role(kv, chat, user)?;
                kv.delete(&keys::member(chat, user));
                state.record.member_count -= 1;
                put_record(kv, &keys::chat(chat), &state.record);
                let remaining = scan_members(kv, chat)?;
                if role == Role::Owner
                    && let Some((heir, mut record)) =
                        remaining.iter().copied().max_by_key(|(id, m)| (m.role, std::cmp::Reverse((m.joined_ms, *id))))
                {
                    // The group keeps an owner: the senior admin, else the
                    // longest-standing member.
                    record.role = Role::Owner;
                    put_record(kv, &keys::member(chat, heir), &record);
                }
                let mut updates = vec![(user, UpdateKind::ChatLeft { chat })];
                updates.extend(remaining.into_iter().map(|(other, _)| (other, UpdateKind::MembersChanged { chat })));
                self.emit(shard, kv, updates)?;
                Ok(Reply::Done)
            }

            Command::Send { chat, sender, client_msg_id, text, now_ms } => {
                if get_record::<ChatRecord>(kv, "chat", &keys::chat(chat))?.is_none() {
                    return refuse(DomainError::ChatNotFound);
                }
                member_role(kv, chat, sender)?;
                let dedup_key = keys::dedup(chat, sender, client_msg_id);
                if let Some(seq) = get_u64(kv, &dedup_key)? {
                    // A retry: answer with the first result, make nothing new.
                    let first: MessageRecord = get_record(kv, "message", &keys::message(chat, seq))?
                        .ok_or(SyncError::Corrupt { what: "message", reason: format!("dedup points at missing seq {seq}") })?;
                    return Ok(Reply::Sent { seq, date_ms: first.date_ms });
                }
                text::check_message_text(&text)?;
                let seq = get_u64(kv, &keys::chat_seq(chat))?.unwrap_or(0) + 1;
                let members = scan_members(kv, chat)?;
                let record = MessageRecord { sender, date_ms: now_ms, text, edit_date_ms: None, deleted: false };
                put_record(kv, &keys::message(chat, seq), &record);
                put_u64(kv, &keys::chat_seq(chat), seq);
                put_u64(kv, &dedup_key, seq);
                self.emit(shard, kv, members.into_iter().map(|(m, _)| (m, UpdateKind::NewMessage { chat, seq })))?;
                Ok(Reply::Sent { seq, date_ms: now_ms })
            }

            Command::Edit { chat, actor, seq, text, now_ms } => {
                member_role(kv, chat, actor)?;
                let mut message = live_message(kv, chat, seq)?;
                if message.sender != actor {
                    return refuse(DomainError::PermissionDenied("only the sender edits a message".into()));
                }
                text::check_message_text(&text)?;
                message.text = text;
                message.edit_date_ms = Some(now_ms);
                put_record(kv, &keys::message(chat, seq), &message);
                let members = scan_members(kv, chat)?;
                self.emit(shard, kv, members.into_iter().map(|(m, _)| (m, UpdateKind::MessageEdited { chat, seq })))?;
                Ok(Reply::Done)
            }

            Command::Delete { chat, actor, seq } => {
                let role = member_role(kv, chat, actor)?;
                let mut message = live_message(kv, chat, seq)?;
                let chat_record: ChatRecord =
                    get_record(kv, "chat", &keys::chat(chat))?.ok_or(SyncError::Domain(DomainError::ChatNotFound))?;
                let moderator = chat_record.kind == ChatKind::Group && role >= Role::Admin;
                if message.sender != actor && !moderator {
                    return refuse(DomainError::PermissionDenied(
                        "a message is deleted by its sender or by a group's admins".into(),
                    ));
                }
                // Keep a tombstone so seq stays gap-free and devices learn of it.
                message.text.clear();
                message.deleted = true;
                put_record(kv, &keys::message(chat, seq), &message);
                let members = scan_members(kv, chat)?;
                self.emit(shard, kv, members.into_iter().map(|(m, _)| (m, UpdateKind::MessageDeleted { chat, seq })))?;
                Ok(Reply::Done)
            }

            Command::MarkRead { chat, user, seq } => {
                let Some(mut member) = get_record::<MemberRecord>(kv, "member", &keys::member(chat, user))? else {
                    return refuse(DomainError::NotMember);
                };
                let last_seq = get_u64(kv, &keys::chat_seq(chat))?.unwrap_or(0);
                let target = seq.min(last_seq);
                if target <= member.read_seq {
                    // Never backwards: answer with where the marker already is.
                    return Ok(Reply::ReadMarker { seq: member.read_seq });
                }
                member.read_seq = target;
                put_record(kv, &keys::member(chat, user), &member);
                let members = scan_members(kv, chat)?;
                self.emit(
                    shard,
                    kv,
                    members.into_iter().map(|(m, _)| (m, UpdateKind::ReadUpTo { chat, reader: user, seq: target })),
                )?;
                Ok(Reply::ReadMarker { seq: target })
            }

            Command::Deliver { source, target: _, records } => {
                let mut last = get_u64(kv, &keys::inbox(source))?.unwrap_or(0);
                for (seq, record) in records {
                    if seq <= last {
                        continue; // already applied by an earlier try of this delivery
                    }
                    if seq != last + 1 {
                        tracing::warn!(%source, %shard, expected = last + 1, got = seq, "outbox delivery skipped ahead");
                    }
                    for (user, kind) in record.items {
                        self.append_update(shard, kv, user, kind)?;
                    }
                    last = seq;
                }
                put_u64(kv, &keys::inbox(source), last);
                Ok(Reply::Done)
            }

            Command::OutboxAck { source: _, target, through } => {
                let mut meta: OutboxMeta = get_record(kv, "outbox meta", &keys::outbox_meta(target))?
                    .ok_or(SyncError::Corrupt { what: "outbox meta", reason: format!("ack for unknown target {target}") })?;
                // Bounded: a delivery never carries more than this many records.
                let through = through.min(meta.next_seq - 1).min(meta.acked + limits::OUTBOX_RECORDS_PER_DELIVERY_MAX as u64);
                for seq in meta.acked + 1..=through {
                    kv.delete(&keys::outbox(target, seq));
                }
                meta.acked = meta.acked.max(through);
                put_record(kv, &keys::outbox_meta(target), &meta);
                Ok(Reply::Done)
            }
        }
    }

    /// Writes updates for users (of any shard) into this shard's outbox.
    fn emit(
        &mut self,
        shard: ShardId,
        kv: &mut impl KvWrite,
        updates: impl IntoIterator<Item = (UserId, UpdateKind)>,
    ) -> Result<(), SyncError> {
        let mut by_target: BTreeMap<ShardId, Vec<(UserId, UpdateKind)>> = BTreeMap::new();
        for (user, kind) in updates {
            by_target.entry(self.placement.shard_of_user(user)).or_default().push((user, kind));
        }
        for (target, items) in by_target {
            let mut meta: OutboxMeta = get_record(kv, "outbox meta", &keys::outbox_meta(target))?
                .unwrap_or(OutboxMeta { next_seq: 1, acked: 0 });
            put_record(kv, &keys::outbox(target, meta.next_seq), &OutboxRecord { items });
            meta.next_seq += 1;
            put_record(kv, &keys::outbox_meta(target), &meta);
            self.dirty_outboxes.insert((shard, target));
        }
        Ok(())
    }

    /// Appends one update to a user's sequence, trimming the oldest beyond retention.
    fn append_update(&mut self, shard: ShardId, kv: &mut impl KvWrite, user: UserId, kind: UpdateKind) -> Result<(), SyncError> {
        let Some(mut meta) = get_record::<UserMeta>(kv, "user meta", &keys::user_meta(user))? else {
            tracing::warn!(%shard, %user, "update for a user this shard does not hold; dropped");
            return Ok(());
        };
        meta.pts += 1;
        match &kind {
            UpdateKind::ChatJoined { chat } => kv.put(&keys::dialog(user, *chat), Vec::new()),
            UpdateKind::ChatLeft { chat } => kv.delete(&keys::dialog(user, *chat)),
            _ => {}
        }
        put_record(kv, &keys::update(user, meta.pts), &kind);
        let mut trimmed = 0;
        while meta.pts + 1 - meta.first_pts > self.updates_retained
            && trimmed < limits::UPDATES_TRIMMED_PER_APPEND_MAX
        {
            kv.delete(&keys::update(user, meta.first_pts));
            meta.first_pts += 1;
            trimmed += 1;
        }
        put_record(kv, &keys::user_meta(user), &meta);
        self.updated_users.insert(user, meta.pts);
        Ok(())
    }
}

fn load_group(kv: &impl KvRead, chat: ChatId) -> Result<ChatState, SyncError> {
    let Some(record) = get_record::<ChatRecord>(kv, "chat", &keys::chat(chat))? else {
        return refuse(DomainError::ChatNotFound);
    };
    if record.kind != ChatKind::Group {
        return refuse(DomainError::PermissionDenied("the members of a direct chat do not change".into()));
    }
    Ok(ChatState { record })
}

fn member_role(kv: &impl KvRead, chat: ChatId, user: UserId) -> Result<Role, SyncError> {
    match get_record::<MemberRecord>(kv, "member", &keys::member(chat, user))? {
        Some(member) => Ok(member.role),
        None => refuse(DomainError::NotMember),
    }
}

fn live_message(kv: &impl KvRead, chat: ChatId, seq: u64) -> Result<MessageRecord, SyncError> {
    match get_record::<MessageRecord>(kv, "message", &keys::message(chat, seq))? {
        Some(message) if !message.deleted => Ok(message),
        _ => refuse(DomainError::MessageNotFound),
    }
}
