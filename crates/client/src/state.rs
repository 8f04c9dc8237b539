//! A local copy of one user's chats, kept in step by the update sequence.
//!
//! Updates apply only in pts order with no gap; a page that does not start
//! right after the local pts is refused, and the caller syncs instead. Two
//! devices of one user that catch up end in the same state.

use crate::{Client, ClientError, SyncPage};
use hamgam_proto::{Difference, Message, UpdateKind};
use hamgam_types::{ChatId, UserId, limits};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalChat {
    pub messages: BTreeMap<u64, Message>,
    /// Read markers heard of, per reader.
    pub read: BTreeMap<UserId, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    pub pts: u64,
    pub chats: BTreeMap<ChatId, LocalChat>,
}

impl LocalState {
    /// Applies a page that continues from `self.pts`. Returns false (and
    /// changes nothing) if the page does not continue from here.
    pub fn apply(&mut self, page: &Difference) -> bool {
        if let Some(first) = page.updates.first()
            && first.pts != self.pts + 1
        {
            return false;
        }
        let messages: BTreeMap<(ChatId, u64), &Message> = page.messages.iter().map(|m| ((m.chat, m.seq), m)).collect();
        for update in &page.updates {
            match &update.kind {
                UpdateKind::ChatJoined { chat } | UpdateKind::MembersChanged { chat } => {
                    self.chats.entry(*chat).or_default();
                }
                UpdateKind::ChatLeft { chat } => {
                    self.chats.remove(chat);
                }
                UpdateKind::NewMessage { chat, seq }
                | UpdateKind::MessageEdited { chat, seq }
                | UpdateKind::MessageDeleted { chat, seq } => {
                    if let Some(message) = messages.get(&(*chat, *seq)) {
                        self.chats.entry(*chat).or_default().messages.insert(*seq, (*message).clone());
                    }
                }
                UpdateKind::ReadUpTo { chat, reader, seq } => {
                    let marker = self.chats.entry(*chat).or_default().read.entry(*reader).or_insert(0);
                    *marker = (*marker).max(*seq);
                }
            }
            self.pts = update.pts;
        }
        self.pts = self.pts.max(page.pts);
        true
    }

    /// Catches up with the node: pages of updates until none are left, or,
    /// when the node says "too long", a fresh copy of every chat.
    pub async fn catch_up(&mut self, client: &Client) -> Result<(), ClientError> {
        loop {
            match client.sync_page(self.pts, limits::SYNC_PAGE_UPDATES_MAX as u32).await? {
                SyncPage::Difference(page) => {
                    if !self.apply(&page) {
                        return Err(ClientError::Protocol("the node sent a page that does not continue".into()));
                    }
                    if !page.more {
                        return Ok(());
                    }
                }
                SyncPage::TooLong { .. } => return self.reload(client).await,
            }
        }
    }

    /// Rebuilds the copy from the chat list and each chat's history.
    pub async fn reload(&mut self, client: &Client) -> Result<(), ClientError> {
        let mut fresh = LocalState::default();
        let mut after = None;
        loop {
            let list = client.list_chats(after, limits::CHAT_LIST_PAGE_MAX as u32).await?;
            if after.is_none() {
                fresh.pts = list.pts;
            }
            for info in &list.chats {
                let chat = fresh.chats.entry(info.chat).or_default();
                for message in client.full_history(info.chat).await? {
                    chat.messages.insert(message.seq, message);
                }
            }
            match list.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        *self = fresh;
        Ok(())
    }
}
