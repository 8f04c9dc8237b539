//! Bursts of sends that keep a ledger of what was acknowledged, and the
//! checks that every acknowledged message exists exactly once, in one order
//! that every member sees. Shared by the crash tests of one node and of a
//! cluster.

use crate::support::retrying_unavailable;
use hamgam_client::{ChatId, Client, ErrorCode, UserId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A group of every user (created by the first), and a direct chat of each
/// user with the next: the chats each sender writes in, per sender. Each
/// step is retried while a cluster's leaders settle, as an app would.
pub async fn group_and_pairs(clients: &[Client], ids: &[UserId], title: &str) -> (ChatId, Vec<Vec<ChatId>>) {
    let group = retrying_unavailable(|| clients[0].create_group(title)).await.unwrap().chat;
    for id in &ids[1..] {
        match retrying_unavailable(|| clients[0].add_member(group, *id)).await {
            // A proposal dropped by a leader change may still have been
            // committed: the retry then finds the member already there.
            Ok(()) => {}
            Err(error) if error.code() == Some(ErrorCode::CONFLICT) => {}
            Err(error) => panic!("adding a member to the group: {error}"),
        }
    }
    let mut chats_of: Vec<Vec<ChatId>> = vec![vec![group]; clients.len()];
    for (i, chats) in chats_of.iter_mut().enumerate() {
        let peer = ids[(i + 1) % ids.len()];
        let direct = retrying_unavailable(|| clients[i].direct_chat(peer)).await.unwrap().chat;
        chats.push(direct);
    }
    (group, chats_of)
}

/// What one sender knows after a burst.
#[derive(Default)]
pub struct Ledger {
    /// text -> (chat, seq), for sends a node acknowledged.
    pub acked: BTreeMap<String, (ChatId, u64)>,
    /// Sends that got no answer or an error: (chat, client id, text).
    pub pending: Vec<(ChatId, u64, String)>,
}

/// Signals shared by the senders of one burst.
#[derive(Default)]
pub struct Burst {
    pub stop: AtomicBool,
    /// Set when a node was killed; acknowledgements after it are counted.
    pub killed: AtomicBool,
    pub acked_after_kill: AtomicUsize,
}

/// Sends to `chats` in turn until told to stop or until its connection is
/// closed. A failed send is kept as pending (to retry later with the same
/// client id) and the sender goes on: another node may still serve it.
pub async fn burst(client: Arc<Client>, me: usize, chats: Vec<ChatId>, round: u32, signals: Arc<Burst>) -> (usize, Ledger) {
    let mut ledger = Ledger::default();
    let mut n = 0u64;
    while !signals.stop.load(Ordering::Relaxed) {
        let chat = chats[(n as usize) % chats.len()];
        let text = format!("r{round}-u{me}-{n}");
        let client_msg_id = rand::random::<u64>();
        match client.send_with_id(chat, client_msg_id, &text).await {
            Ok((seq, _)) => {
                ledger.acked.insert(text, (chat, seq));
                if signals.killed.load(Ordering::Relaxed) {
                    signals.acked_after_kill.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                ledger.pending.push((chat, client_msg_id, text));
                if client.connection().close_reason().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        n += 1;
    }
    (me, ledger)
}

/// Retries every pending send from its own sender with its client id (it
/// exists exactly once whether or not it applied before), checks a second
/// retry returns the same seq, and adds everything to `all`. A retry the
/// node refuses as unavailable (a leader moved meanwhile) is made again,
/// as a client does.
pub async fn settle(clients: &[Client], ledgers: Vec<(usize, Ledger)>, all: &mut BTreeMap<String, (ChatId, u64)>) {
    for (sender, mut ledger) in ledgers {
        for (chat, client_msg_id, text) in std::mem::take(&mut ledger.pending) {
            let (seq, _) = send_until_taken(&clients[sender], chat, client_msg_id, &text).await;
            let (again, _) = send_until_taken(&clients[sender], chat, client_msg_id, &text).await;
            assert_eq!(again, seq, "a retry returns the first result");
            ledger.acked.insert(text, (chat, seq));
        }
        for (text, at) in ledger.acked {
            assert!(all.insert(text, at).is_none());
        }
    }
}

/// Sends with `client_msg_id` until a node takes it, for up to half a
/// minute of `UNAVAILABLE` answers (an election after a leader change);
/// any other error fails the test.
async fn send_until_taken(client: &Client, chat: ChatId, client_msg_id: u64, text: &str) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.send_with_id(chat, client_msg_id, text).await {
            Err(error) if error.code() == Some(ErrorCode::UNAVAILABLE) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outcome => return outcome.unwrap(),
        }
    }
}

/// Every chat: gap-free, each acknowledged message exactly once at its seq,
/// nothing else, and the same list for every member, each reading through
/// its own connection (and so its own node).
pub async fn assert_histories(clients: &[Client], chats: &[ChatId], all: &BTreeMap<String, (ChatId, u64)>) {
    let mut chats = chats.to_vec();
    chats.sort();
    chats.dedup();
    for chat in chats {
        let mut views = Vec::new();
        for client in clients {
            if client.members(chat).await.is_ok() {
                views.push(client.full_history(chat).await.unwrap());
            }
        }
        assert!(views.len() >= 2);
        assert!(views.windows(2).all(|w| w[0] == w[1]), "every member sees the same order");
        let history = &views[0];
        assert!(history.iter().map(|m| m.seq).eq(1..=history.len() as u64), "seq is gap-free");
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for message in history {
            assert!(seen.insert(message.text.as_str(), message.seq).is_none(), "duplicate: {}", message.text);
        }
        let mut sent = 0;
        for (text, (at_chat, seq)) in all {
            if *at_chat == chat {
                assert_eq!(seen.get(text.as_str()), Some(seq), "acknowledged {text} lost or moved");
                sent += 1;
            }
        }
        assert_eq!(history.len(), sent, "nothing but what was sent");
    }
}
