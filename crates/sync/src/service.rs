//! The domain's async face: commands routed to their shard through raft,
//! reads of applied state, and the outbox deliverer.
//!
//! Reads go to this node's applied state. A read that must see every
//! acknowledged write, whichever node acknowledged it, first calls one of
//! the `fresh_*` methods (raft's ReadIndex on the shard; free when this
//! node is the shard's only voter).
//!
//! The deliverer is one long-lived task ([`SyncService::run_outbox`]): it
//! wakes when an apply round wrote outbox records, proposes one
//! `DeliverMany` per target shard carrying every source's new records, one
//! delivery in flight per target so each pair's order is kept and at most
//! one started per [`limits::OUTBOX_DELIVERY_INTERVAL_MS`] (so that under
//! load a target's records go together), and later an `OutboxAck` to each
//! source. A delivery retried after a crash is skipped by
//! the target's inbox marks, so every update lands exactly once.

use crate::command::direct_chat_id;
use crate::command::{Command, Reply};
use crate::files::{self, ChunkRoot};
use crate::gallery;
use crate::keys;
use crate::machine::{
    Signals, get_record, read_last_seq, read_message_block, read_outbox_meta, read_user_meta, scan_members, scan_page,
};
use crate::records::{
    self, ChatRecord, DeviceRecord, Held, MemberRecord, MessageBlock, MessageRecord, OutboxRecord, UpdateBlock,
    UsageRecord, UserMeta, UserRecord,
};
use crate::{DomainError, SyncError};
use hamgam_proto::store::{
    AlbumInfo, AlbumItem, ChunkList, FileEntry, FolderPage, SharedFile, SnapshotInfo, Visibility,
};
use hamgam_proto::{
    ChatInfo, ChatList, Difference, HistoryAnchor, MemberInfo, Message, MessagePage, Update, UpdateKind, codec,
};
use hamgam_raftstore::{RaftHandle, ShardReader};
use hamgam_storage::{KeyRange, KvRead, Order};
use hamgam_types::{ChatId, DeviceId, NodeId, Placement, ShardId, UserId, limits};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The answer to "everything since pts N".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DifferenceOutcome {
    Page(Difference),
    /// Too far behind (or ahead): re-read the chat list, continue from `pts`.
    TooLong {
        pts: u64,
    },
}

#[derive(Clone, Debug)]
pub struct SyncService {
    raft: RaftHandle,
    placement: Placement,
    node: NodeId,
    signals: Arc<Signals>,
    /// `DeliverMany` commands this node's deliverer has proposed.
    deliveries: Arc<AtomicU64>,
}

/// Bytes a message is counted as in a sync page, beyond its text.
const MESSAGE_OVERHEAD_BYTES: usize = 64;
const UPDATE_BYTES: usize = 32;
/// Bytes of outbox records carried by one delivery, well under a command's limit.
const DELIVERY_BYTES_MAX: usize = limits::COMMAND_BYTES_MAX / 2;

impl SyncService {
    pub fn new(raft: RaftHandle, placement: Placement, node: NodeId, signals: Arc<Signals>) -> SyncService {
        SyncService { raft, placement, node, signals, deliveries: Arc::new(AtomicU64::new(0)) }
    }

    /// How many deliveries (one `DeliverMany` each) this node has proposed.
    pub fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// Runs a command on its shard and returns the domain's reply.
    pub async fn execute(&self, command: Command) -> Result<Reply, SyncError> {
        let shard = command.shard(&self.placement);
        let bytes =
            codec::encode(&command).map_err(|e| SyncError::Corrupt { what: "command", reason: e.to_string() })?;
        let timeout = Duration::from_millis(limits::REQUEST_COMMIT_TIMEOUT_MS);
        let answer =
            tokio::time::timeout(timeout, self.raft.propose(shard, bytes)).await.map_err(|_| SyncError::Timeout)??;
        let reply: Result<Reply, DomainError> =
            codec::decode(&answer).map_err(|e| SyncError::Corrupt { what: "reply", reason: e.to_string() })?;
        Ok(reply?)
    }

    /// Waits until this node's state of `user`'s shard holds every write
    /// acknowledged anywhere before the call.
    pub async fn fresh_user(&self, user: UserId) -> Result<(), SyncError> {
        Ok(self.raft.read_index(self.placement.shard_of_user(user)).await?)
    }

    /// As [`SyncService::fresh_user`], for a chat's shard.
    pub async fn fresh_chat(&self, chat: ChatId) -> Result<(), SyncError> {
        Ok(self.raft.read_index(self.placement.shard_of_chat(chat)).await?)
    }

    /// As [`SyncService::fresh_user`], for the shard of a username's index.
    pub async fn fresh_username(&self, username_key: &str) -> Result<(), SyncError> {
        Ok(self.raft.read_index(self.placement.shard_of_username(username_key)).await?)
    }

    fn user_reader(&self, user: UserId) -> ShardReader {
        self.raft.reader(self.placement.shard_of_user(user))
    }

    fn chat_reader(&self, chat: ChatId) -> ShardReader {
        self.raft.reader(self.placement.shard_of_chat(chat))
    }

    // ---- the cloud store ---------------------------------------------------------
    // Callers wanting a fresh view call `fresh_user` first.

    /// A file's entry and chunk list, or a folder's entry.
    pub fn stat_path(&self, user: UserId, path: &str) -> Result<(FileEntry, ChunkList), SyncError> {
        files::stat(&self.user_reader(user), user, path)
    }

    pub fn list_folder(
        &self,
        user: UserId,
        path: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<FolderPage, SyncError> {
        let (entries, more) = files::list_folder(&self.user_reader(user), user, path, after, limit as usize)?;
        Ok(FolderPage { entries, more })
    }

    /// One page of `shard`'s chunk roots from the key `from` on (see
    /// [`files::chunk_roots`]); a shard hosted elsewhere is read there.
    /// Call [`SyncService::fresh_shard`] first.
    pub fn chunk_roots(
        &self,
        shard: ShardId,
        from: Option<&[u8]>,
    ) -> Result<(Vec<ChunkRoot>, Option<Vec<u8>>), SyncError> {
        files::chunk_roots(&self.raft.reader(shard), from)
    }

    /// As [`SyncService::fresh_user`], for a whole shard.
    pub async fn fresh_shard(&self, shard: ShardId) -> Result<(), SyncError> {
        if !self.raft.hosts(shard) {
            return Ok(()); // a read elsewhere is fresh by itself
        }
        Ok(self.raft.read_index(shard).await?)
    }

    pub fn usage(&self, user: UserId) -> Result<UsageRecord, SyncError> {
        files::usage(&self.user_reader(user), user)
    }

    pub fn snapshots(
        &self,
        user: UserId,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<SnapshotInfo>, bool), SyncError> {
        files::snapshots(&self.user_reader(user), user, after, limit as usize)
    }

    pub fn snapshot(&self, user: UserId, id: u64) -> Result<SnapshotInfo, SyncError> {
        files::snapshot(&self.user_reader(user), user, id)
    }

    // ---- users and devices ---------------------------------------------------

    pub fn user_by_username(&self, username_key: &str) -> Result<Option<UserId>, SyncError> {
        let reader = self.raft.reader(self.placement.shard_of_username(username_key));
        match reader.get(&keys::username(username_key))? {
            None => Ok(None),
            Some(bytes) => {
                let id: [u8; 8] = bytes
                    .try_into()
                    .map_err(|_| SyncError::Corrupt { what: "username index", reason: "not 8 bytes".into() })?;
                Ok(Some(UserId(u64::from_be_bytes(id))))
            }
        }
    }

    pub fn user(&self, user: UserId) -> Result<Option<UserRecord>, SyncError> {
        get_record(&self.user_reader(user), "user", &keys::user(user))
    }

    /// A user's update sequence position; `None` if there is no such user.
    pub fn user_meta(&self, user: UserId) -> Result<Option<UserMeta>, SyncError> {
        read_user_meta(&self.user_reader(user), user)
    }

    pub fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>, SyncError> {
        get_record(&self.user_reader(user), "device", &keys::device(user, device))
    }

    pub fn devices(&self, user: UserId) -> Result<Vec<(DeviceId, DeviceRecord)>, SyncError> {
        let pairs = self.user_reader(user).scan(
            &KeyRange::prefix(&keys::devices_of(user)),
            Order::Ascending,
            limits::DEVICES_PER_USER_MAX,
        )?;
        pairs
            .into_iter()
            .map(|(key, value)| {
                let id =
                    keys::last_u64(&key).ok_or(SyncError::Corrupt { what: "device key", reason: "short".into() })?;
                Ok((DeviceId(id), records::decode("device", &value)?))
            })
            .collect()
    }

    // ---- chats -----------------------------------------------------------------

    fn chat_record(&self, chat: ChatId) -> Result<Option<ChatRecord>, SyncError> {
        get_record(&self.chat_reader(chat), "chat", &keys::chat(chat))
    }

    fn member(&self, chat: ChatId, user: UserId) -> Result<Option<MemberRecord>, SyncError> {
        get_record(&self.chat_reader(chat), "member", &keys::member(chat, user))
    }

    fn last_seq(&self, chat: ChatId) -> Result<u64, SyncError> {
        read_last_seq(&self.chat_reader(chat), chat)
    }

    /// The caller's membership, or `NotMember` (also for chats that do not exist,
    /// so outsiders cannot probe which chats exist).
    fn require_member(&self, chat: ChatId, viewer: UserId) -> Result<MemberRecord, SyncError> {
        self.member(chat, viewer)?.ok_or(SyncError::Domain(DomainError::NotMember))
    }

    /// A chat as `viewer` sees it; only for members.
    pub fn chat_info(&self, chat: ChatId, viewer: UserId) -> Result<ChatInfo, SyncError> {
        let member = self.require_member(chat, viewer)?;
        let record = self.chat_record(chat)?.ok_or(SyncError::Domain(DomainError::ChatNotFound))?;
        Ok(ChatInfo {
            chat,
            kind: record.kind,
            title: record.title,
            peer: record.pair.map(|(a, b)| if a == viewer { b } else { a }),
            member_count: record.member_count,
            last_seq: self.last_seq(chat)?,
            my_role: member.role,
            my_read_seq: member.read_seq,
            created_ms: record.created_ms,
        })
    }

    pub fn members(&self, chat: ChatId, viewer: UserId) -> Result<Vec<MemberInfo>, SyncError> {
        self.require_member(chat, viewer)?;
        Ok(scan_members(&self.chat_reader(chat), chat)?
            .into_iter()
            .map(|(user, m)| MemberInfo { user, role: m.role, read_seq: m.read_seq })
            .collect())
    }

    /// The caller's chats in id order after `after`, with the pts to sync from.
    pub fn list_chats(&self, user: UserId, after: Option<ChatId>, limit: u32) -> Result<ChatList, SyncError> {
        // Read pts first: anything that changes after it is in the next sync.
        let pts = self.user_meta(user)?.map_or(0, |m| m.pts);
        let limit = (limit as usize).clamp(1, limits::CHAT_LIST_PAGE_MAX);
        let prefix = keys::dialogs_of(user);
        let range = match after {
            None => KeyRange::prefix(&prefix),
            Some(after) => {
                let mut start = keys::dialog(user, after);
                start.push(0); // the first key after `after`
                KeyRange { start, end: KeyRange::prefix(&prefix).end }
            }
        };
        let reader = self.user_reader(user);
        let (dialogs, more) = scan_page(&reader, &range, limit)?;
        let mut chats = Vec::with_capacity(limit);
        for (key, _) in dialogs {
            let chat =
                ChatId(keys::last_u64(&key).ok_or(SyncError::Corrupt { what: "dialog key", reason: "short".into() })?);
            match self.chat_info(chat, user) {
                Ok(info) => chats.push(info),
                // The leave is applied in the chat's shard before the dialog
                // goes from the user's: skip the chat in between.
                Err(SyncError::Domain(DomainError::NotMember)) => {}
                Err(other) => return Err(other),
            }
        }
        let next_after = if more { chats.last().map(|c| c.chat) } else { None };
        Ok(ChatList { chats, pts, next_after })
    }

    // ---- messages ----------------------------------------------------------------

    /// Messages `first..=last` of a chat (those that exist), ascending.
    fn messages_between(&self, chat: ChatId, first: u64, last: u64) -> Result<Vec<Message>, SyncError> {
        let reader = self.chat_reader(chat);
        let Some(Held { block: start, .. }) = read_message_block(&reader, chat, first)? else { return Ok(Vec::new()) };
        let mut messages = Vec::new();
        let mut take = |block: &MessageBlock| {
            let wanted = block.messages().filter(|(seq, _)| (first..=last).contains(seq));
            messages.extend(wanted.map(|(seq, record)| to_message(chat, seq, record.clone())));
        };
        take(&start);
        if start.last() < last {
            let rest = KeyRange::between(
                &keys::message_block(chat, start.last() + 1),
                &keys::message_block(chat, last.saturating_add(1)),
            );
            // Each block holds at least one message of the range.
            let blocks = usize::try_from(last - start.last()).unwrap_or(usize::MAX);
            for (_, value) in reader.scan(&rest, Order::Ascending, blocks)? {
                take(&records::decode_block("message block", &value)?);
            }
        }
        Ok(messages)
    }

    /// A page of a chat's messages, ascending by seq; only for members.
    pub fn history(
        &self,
        chat: ChatId,
        viewer: UserId,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> Result<MessagePage, SyncError> {
        self.require_member(chat, viewer)?;
        let limit = (limit as usize).clamp(1, limits::HISTORY_PAGE_MAX);
        let last_seq = self.last_seq(chat)?;
        // Seqs run from 1 to the last without a gap, so the page's seqs follow from the anchor.
        let span = limit as u64 - 1;
        let (first, last) = match anchor {
            HistoryAnchor::Latest => (last_seq.saturating_sub(span).max(1), last_seq),
            HistoryAnchor::Before(seq) => {
                let last = seq.saturating_sub(1).min(last_seq);
                (last.saturating_sub(span).max(1), last)
            }
            HistoryAnchor::After(seq) => {
                let first = seq.saturating_add(1);
                (first, first.saturating_add(span).min(last_seq))
            }
        };
        let messages = if first <= last { self.messages_between(chat, first, last)? } else { Vec::new() };
        // Seqs are gap-free from 1 (deleted messages stay as tombstones), so
        // the page's ends tell whether more exists on either side.
        let (more_before, more_after) = match (messages.first(), messages.last()) {
            (Some(first), Some(last)) => (first.seq > 1, last.seq < last_seq),
            _ => match anchor {
                HistoryAnchor::Latest => (false, false),
                HistoryAnchor::Before(seq) => (false, seq <= last_seq),
                HistoryAnchor::After(seq) => (seq > 1 && last_seq > 0, false),
            },
        };
        Ok(MessagePage { messages, more_before, more_after })
    }

    // ---- galleries -----------------------------------------------------------------
    // Callers wanting a fresh view call `fresh_user` on the owner first.

    /// `owner`'s albums whose visibility is one of `visible`, one page.
    pub fn albums(
        &self,
        owner: UserId,
        visible: &[Visibility],
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<AlbumInfo>, bool), SyncError> {
        gallery::albums(&self.user_reader(owner), owner, visible, after, limit as usize)
    }

    /// One album as `viewer` sees it; a private one only for its owner.
    pub fn album(&self, owner: UserId, album: u64, viewer: UserId) -> Result<AlbumInfo, SyncError> {
        gallery::album(&self.user_reader(owner), owner, album, viewer)
    }

    /// One page of an album's items for `viewer`.
    pub fn album_items(
        &self,
        owner: UserId,
        album: u64,
        viewer: UserId,
        after: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<AlbumItem>, bool), SyncError> {
        gallery::items(&self.user_reader(owner), owner, album, viewer, after, limit as usize)
    }

    /// Whether `a` and `b` have a direct chat (what "contacts" means for
    /// a gallery). Fresh.
    pub async fn are_contacts(&self, a: UserId, b: UserId) -> Result<bool, SyncError> {
        let chat = direct_chat_id(&self.placement, a, b);
        self.fresh_chat(chat).await?;
        Ok(self.member(chat, b)?.is_some())
    }

    /// A history page and the file shared in each of its messages that
    /// carries one (at most `HISTORY_WITH_FILES_PAGE_MAX` messages).
    pub fn history_with_files(
        &self,
        chat: ChatId,
        viewer: UserId,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> Result<(MessagePage, Vec<(u64, SharedFile)>), SyncError> {
        let limit = limit.min(limits::HISTORY_WITH_FILES_PAGE_MAX as u32);
        let page = self.history(chat, viewer, anchor, limit)?;
        let reader = self.chat_reader(chat);
        let mut files = Vec::new();
        for message in page.messages.iter().filter(|m| !m.deleted) {
            if let Some(file) = get_record(&reader, "shared file", &keys::shared_file(chat, message.seq))? {
                files.push((message.seq, file));
            }
        }
        Ok((page, files))
    }

    // ---- update sequence -----------------------------------------------------------

    /// Everything after `since` in `user`'s update sequence, one bounded page,
    /// with the current state of every message the page points at.
    pub fn difference(&self, user: UserId, since: u64, limit: u32) -> Result<DifferenceOutcome, SyncError> {
        let meta = self.user_meta(user)?.ok_or(SyncError::Domain(DomainError::UserNotFound))?;
        if since > meta.pts || since + 1 < meta.first_pts {
            return Ok(DifferenceOutcome::TooLong { pts: meta.pts });
        }
        let limit = (limit as usize).clamp(1, limits::SYNC_PAGE_UPDATES_MAX);
        let range = KeyRange {
            start: keys::update_block(user, UpdateBlock::number_of(since + 1)),
            end: KeyRange::prefix(&keys::update_blocks_of(user)).end,
        };
        // The first block may start before `since`; one more covers that.
        let blocks_needed = (limit as u64).div_ceil(records::UPDATES_PER_BLOCK) as usize + 1;
        let blocks = self.user_reader(user).scan(&range, Order::Ascending, blocks_needed)?;
        let blocks: Vec<UpdateBlock> =
            blocks.iter().map(|(_, value)| records::decode_block("update block", value)).collect::<Result<_, _>>()?;
        let page = blocks.iter().flat_map(UpdateBlock::updates).skip_while(|(pts, _)| *pts <= since).take(limit);

        let mut updates = Vec::with_capacity(limit);
        let mut messages = Vec::new();
        let mut seen: HashSet<(ChatId, u64)> = HashSet::new();
        let mut blocks_read = MessageBlocksRead::default();
        let mut bytes = 0usize;
        for (pts, kind) in page {
            let kind = kind.clone();
            let pointer = match &kind {
                UpdateKind::NewMessage { chat, seq }
                | UpdateKind::MessageEdited { chat, seq }
                | UpdateKind::MessageDeleted { chat, seq } => Some((*chat, *seq)),
                _ => None,
            };
            let mut cost = UPDATE_BYTES;
            let mut message = None;
            if let Some(pointer) = pointer
                && !seen.contains(&pointer)
                && let Some(m) = blocks_read.message(self, pointer.0, pointer.1)?
            {
                cost += MESSAGE_OVERHEAD_BYTES + m.text.len();
                message = Some((pointer, m));
            }
            if !updates.is_empty() && bytes + cost > limits::SYNC_PAGE_BYTES_MAX {
                break;
            }
            bytes += cost;
            if let Some((pointer, m)) = message {
                seen.insert(pointer);
                messages.push(m);
            }
            updates.push(Update { pts, kind });
        }
        let pts = updates.last().map_or(since, |u| u.pts);
        Ok(DifferenceOutcome::Page(Difference { updates, messages, pts, more: pts < meta.pts }))
    }

    // ---- outbox deliverer ------------------------------------------------------------

    /// Delivers outbox records until `cancel` fires. Start once per node.
    ///
    /// One delivery is in flight per target shard; it carries the records of
    /// every source with something for that target (one raft command and one
    /// inbox write at the target for the whole batch). Acknowledgements go
    /// back to each source at most every `OUTBOX_ACK_INTERVAL_MS`.
    pub async fn run_outbox(self, cancel: CancellationToken) {
        self.mark_all_pending_outboxes();
        let retry = Duration::from_millis(limits::OUTBOX_RETRY_MS);
        let mut ack_tick = tokio::time::interval(Duration::from_millis(limits::OUTBOX_ACK_INTERVAL_MS));
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut pairs: HashMap<(ShardId, ShardId), PairState> = HashMap::new();
        let mut busy_targets: HashSet<ShardId> = HashSet::new();
        let interval = Duration::from_millis(limits::OUTBOX_DELIVERY_INTERVAL_MS);
        // When each target's last delivery started (within the interval).
        let mut last_delivery: HashMap<ShardId, tokio::time::Instant> = HashMap::new();
        // The earliest time a target the last pass held back may go.
        let mut held_until: Option<tokio::time::Instant> = None;
        let mut tasks: JoinSet<TaskDone> = JoinSet::new();
        loop {
            let mut ack_due = false;
            let held = async {
                match held_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.signals.outbox_wake.notified() => {}
                () = held => {}
                _ = ack_tick.tick() => ack_due = true,
                Some(done) = tasks.join_next() => {
                    let Ok(done) = done else { continue };
                    match done {
                        TaskDone::Delivered { target, results } => {
                            busy_targets.remove(&target);
                            for (pair, result) in results {
                                let state = pairs.entry(pair).or_default();
                                match result {
                                    Delivery::Through { seq, more } => {
                                        state.next = Some(seq + 1);
                                        state.delivered = seq;
                                        if state.delivered >= state.acked + limits::OUTBOX_ACK_RECORDS {
                                            ack_due = true;
                                        }
                                        if more {
                                            self.signals.mark_outbox([pair]);
                                        }
                                    }
                                    Delivery::Nothing => {}
                                    Delivery::NotLeader => state.next = None,
                                    Delivery::Failed(error) => {
                                        tracing::warn!(source = %pair.0, target = %pair.1, %error, "outbox delivery failed; will retry");
                                        state.next = None;
                                        let signals = self.signals.clone();
                                        tokio::spawn(async move {
                                            tokio::time::sleep(retry).await;
                                            signals.mark_outbox([pair]);
                                        });
                                    }
                                }
                            }
                        }
                        TaskDone::Acked { pair, result } => {
                            let state = pairs.entry(pair).or_default();
                            state.acking = false;
                            match result {
                                Ok(through) => state.acked = state.acked.max(through),
                                Err(error) => tracing::warn!(source = %pair.0, target = %pair.1, %error, "outbox acknowledgement failed; will retry"),
                            }
                        }
                    }
                }
            }
            // Every dirty pair whose target has no delivery in flight and
            // none started within the interval, grouped by target.
            let now = tokio::time::Instant::now();
            held_until = None;
            let ready: BTreeMap<ShardId, Vec<ShardId>> = {
                let mut dirty = self.signals.outbox_dirty.lock().unwrap_or_else(|p| p.into_inner());
                let mut ready: BTreeMap<ShardId, Vec<ShardId>> = BTreeMap::new();
                let room = limits::OUTBOX_DELIVERIES_IN_FLIGHT_MAX.saturating_sub(tasks.len());
                for &(source, target) in dirty.iter() {
                    if busy_targets.contains(&target) || (!ready.contains_key(&target) && ready.len() >= room) {
                        continue;
                    }
                    if let Some(last) = last_delivery.get(&target)
                        && now < *last + interval
                    {
                        let at = *last + interval;
                        held_until = Some(held_until.map_or(at, |held| held.min(at)));
                        continue;
                    }
                    ready.entry(target).or_default().push(source);
                }
                for (target, sources) in &ready {
                    for source in sources {
                        dirty.remove(&(*source, *target));
                    }
                }
                ready
            };
            last_delivery.retain(|_, last| now < *last + interval);
            for (target, sources) in ready {
                busy_targets.insert(target);
                last_delivery.insert(target, now);
                let work: Vec<SourceWork> = sources
                    .into_iter()
                    .map(|source| {
                        (source, pairs.entry((source, target)).or_default().next, self.take_fresh((source, target)))
                    })
                    .collect();
                let service = self.clone();
                tasks.spawn(
                    async move { TaskDone::Delivered { target, results: service.deliver_to(target, work).await } },
                );
            }
            if ack_due {
                for (pair, state) in pairs.iter_mut() {
                    if state.delivered > state.acked && !state.acking {
                        state.acking = true;
                        let (pair, through, service) = (*pair, state.delivered, self.clone());
                        tasks.spawn(async move {
                            let (source, target) = pair;
                            let result =
                                service.execute(Command::OutboxAck { source, target, through }).await.map(|_| through);
                            TaskDone::Acked { pair, result }
                        });
                    }
                }
            }
        }
        tasks.shutdown().await;
    }

    fn take_fresh(&self, pair: (ShardId, ShardId)) -> Vec<(u64, OutboxRecord)> {
        let mut queues = self.signals.outbox_fresh.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queues.get_mut(&pair) else {
            return Vec::new();
        };
        let take = queue.len().min(limits::OUTBOX_RECORDS_PER_DELIVERY_MAX);
        let fresh: Vec<_> = queue.drain(..take).collect();
        if queue.is_empty() {
            queues.remove(&pair);
        } else {
            drop(queues);
            self.signals.mark_outbox([pair]);
        }
        fresh
    }

    /// At start-up, find every outbox with undelivered records.
    fn mark_all_pending_outboxes(&self) {
        let mut pending = Vec::new();
        for source in self.placement.all_shards() {
            let reader = self.raft.local_reader(source);
            for target in self.placement.all_shards() {
                match reader.scan(&KeyRange::prefix(&keys::outbox_of(target)), Order::Ascending, 1) {
                    Ok(found) if !found.is_empty() => pending.push((source, target)),
                    Ok(_) => {}
                    Err(error) => tracing::error!(%source, %error, "cannot read outbox state"),
                }
            }
        }
        self.signals.mark_outbox(pending);
    }

    /// One delivery to `target` of the records of every source in `work`,
    /// each starting at its `next` (or where the source's outbox says, when
    /// this node does not know). Fresh records are used when they continue
    /// exactly from there; storage is read otherwise.
    async fn deliver_to(&self, target: ShardId, work: Vec<SourceWork>) -> Vec<((ShardId, ShardId), Delivery)> {
        let mut outcomes = Vec::with_capacity(work.len());
        let mut batches = Vec::new();
        let mut budget = DELIVERY_BYTES_MAX;
        for (source, next, fresh) in work {
            let pair = (source, target);
            if self.raft.leader(source) != Some(self.node) {
                outcomes.push((pair, Delivery::NotLeader)); // the source's leader delivers
                continue;
            }
            if budget == 0 {
                // This delivery is full; the rest go in the next one.
                self.signals.mark_outbox([pair]);
                outcomes.push((pair, Delivery::Nothing));
                continue;
            }
            match self.records_for(pair, next, fresh, &mut budget) {
                Ok((records, more)) => match records.last() {
                    Some(&(seq, _)) => {
                        outcomes.push((pair, Delivery::Through { seq, more }));
                        batches.push((source, records));
                    }
                    None => outcomes.push((pair, Delivery::Nothing)),
                },
                Err(error) => outcomes.push((pair, Delivery::Failed(error.to_string()))),
            }
        }
        if batches.is_empty() {
            return outcomes;
        }
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.execute(Command::DeliverMany { target, batches }).await {
            // Whether it applied is unknown: send it all again (the target's
            // inbox marks skip what it already has).
            let reason = error.to_string();
            for (_, outcome) in &mut outcomes {
                if matches!(outcome, Delivery::Through { .. }) {
                    *outcome = Delivery::Failed(reason.clone());
                }
            }
        }
        outcomes
    }

    /// The records of one pair to deliver next, within `budget` bytes.
    /// Returns them and whether more are waiting in storage.
    fn records_for(
        &self,
        (source, target): (ShardId, ShardId),
        next: Option<u64>,
        fresh: Vec<(u64, OutboxRecord)>,
        budget: &mut usize,
    ) -> Result<(Vec<(u64, OutboxRecord)>, bool), SyncError> {
        let reader = self.raft.local_reader(source);
        let start = match next {
            Some(next) => next,
            None => read_outbox_meta(&reader, target)?.acked + 1,
        };
        let fresh: Vec<(u64, OutboxRecord)> = fresh.into_iter().filter(|(seq, _)| *seq >= start).collect();
        let contiguous =
            fresh.first().is_some_and(|(seq, _)| *seq == start) && fresh.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        if contiguous {
            let bytes: usize = fresh.iter().map(|(_, r)| 16 + 24 * r.items.len()).sum();
            *budget = budget.saturating_sub(bytes);
            return Ok((fresh, false));
        }
        let range =
            KeyRange { start: keys::outbox(target, start), end: KeyRange::prefix(&keys::outbox_of(target)).end };
        let pairs = reader.scan(&range, Order::Ascending, limits::OUTBOX_RECORDS_PER_DELIVERY_MAX)?;
        let found = pairs.len();
        let mut records = Vec::with_capacity(found);
        for (key, value) in pairs {
            if !records.is_empty() && value.len() > *budget {
                break;
            }
            *budget = budget.saturating_sub(value.len());
            let seq = keys::last_u64(&key).ok_or(SyncError::Corrupt { what: "outbox key", reason: "short".into() })?;
            records.push((seq, records::decode("outbox record", &value)?));
        }
        let more = records.len() < found || found == limits::OUTBOX_RECORDS_PER_DELIVERY_MAX;
        Ok((records, more))
    }
}

/// The outcome of one delivery attempt.
enum Delivery {
    /// Records through `seq` were applied by the target; `more` may wait in storage.
    Through {
        seq: u64,
        more: bool,
    },
    Nothing,
    /// Another node leads the source shard and delivers for it.
    NotLeader,
    /// The delivery may or may not have applied; it will be sent again.
    Failed(String),
}

/// One source's share of a delivery: where to start (if known) and the
/// records handed over in memory.
type SourceWork = (ShardId, Option<u64>, Vec<(u64, OutboxRecord)>);

/// What the deliverer knows of one (source, target) pair.
#[derive(Debug, Default)]
struct PairState {
    /// The next seq to deliver, when known.
    next: Option<u64>,
    /// The last seq delivered and the last acknowledged.
    delivered: u64,
    acked: u64,
    acking: bool,
}

enum TaskDone {
    Delivered { target: ShardId, results: Vec<((ShardId, ShardId), Delivery)> },
    Acked { pair: (ShardId, ShardId), result: Result<u64, SyncError> },
}

/// The last message block read for each chat while building one sync page:
/// a page's updates point at runs of messages, most of them in one block.
#[derive(Default)]
struct MessageBlocksRead {
    last_of_chat: HashMap<ChatId, MessageBlock>,
}

impl MessageBlocksRead {
    fn message(&mut self, service: &SyncService, chat: ChatId, seq: u64) -> Result<Option<Message>, SyncError> {
        let held = self.last_of_chat.get(&chat).and_then(|block| block.get(seq));
        if let Some(record) = held {
            return Ok(Some(to_message(chat, seq, record.clone())));
        }
        let reader = service.chat_reader(chat);
        let Some(Held { block, .. }) = read_message_block(&reader, chat, seq)? else { return Ok(None) };
        let message = block.get(seq).map(|record| to_message(chat, seq, record.clone()));
        self.last_of_chat.insert(chat, block);
        Ok(message)
    }
}

fn to_message(chat: ChatId, seq: u64, record: MessageRecord) -> Message {
    Message {
        chat,
        seq,
        sender: record.sender,
        date_ms: record.date_ms,
        text: record.text,
        edit_date_ms: record.edit_date_ms,
        deleted: record.deleted,
    }
}
