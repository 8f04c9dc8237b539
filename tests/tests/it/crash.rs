//! SIGKILL the node in the middle of a burst of sends from several clients.
//! Afterwards every acknowledged message is there exactly once, retries of
//! unacknowledged sends never duplicate, every member sees one order, and
//! every member's update sequence catches up (the outbox survived).

use crate::ledger::{Burst, assert_histories, burst, group_and_pairs, settle};
use crate::support::{Node, PASSWORD, eventually};
use hamgam_client::{ChatId, Client, LocalState, UserId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const SENDERS: usize = 6;

async fn log_in(node: &Node, names: &[String]) -> Vec<Client> {
    let mut clients = Vec::new();
    for name in names {
        let client = node.client().await;
        client.log_in(name, PASSWORD, "burst").await.unwrap();
        clients.push(client);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_loses_no_acknowledged_message_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("node"));
    let names: Vec<String> = (0..SENDERS).map(|i| format!("sender{i}")).collect();
    let mut ids: Vec<UserId> = Vec::new();
    for name in &names {
        ids.push(node.user(name).await.1);
    }
    let clients = log_in(&node, &names).await;
    // A group of all, and each sender in a direct chat with the next one.
    let (group, chats_of) = group_and_pairs(&clients, &ids, "burst").await;

    let mut all: BTreeMap<String, (ChatId, u64)> = BTreeMap::new();
    let mut clients = clients;
    for round in 0..2u32 {
        let signals = Arc::new(Burst::default());
        let shared: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, client) in shared.iter().enumerate() {
            tasks.spawn(burst(client.clone(), i, chats_of[i].clone(), round, signals.clone()));
        }
        // Let the burst run, then kill the node while writes are in flight.
        tokio::time::sleep(Duration::from_millis(1500 + 500 * u64::from(round))).await;
        node.kill();
        // A dead node sends nothing back; drop the connections instead of
        // waiting out the request timeout, as an app does when its network goes.
        for client in &shared {
            client.connection().close(quinn::VarInt::from_u32(0), b"node gone");
        }
        let mut ledgers = Vec::new();
        while let Some(done) = tasks.join_next().await {
            ledgers.push(done.unwrap());
        }
        let acked: usize = ledgers.iter().map(|(_, l)| l.acked.len()).sum();
        assert!(acked > 20, "the burst made progress before the kill ({acked} acknowledged)");

        node = Node::start_at(&node.dir.clone(), node.addr);
        clients = log_in(&node, &names).await;
        // Retry what was never answered, from the same sender with the same
        // client id: applied before the kill or not, it exists exactly once.
        settle(&clients, ledgers, &mut all).await;
        let chats: Vec<ChatId> = chats_of.iter().flatten().copied().collect();
        assert_histories(&clients, &chats, &all).await;
    }

    // Every member's update sequence catches up with every message, so the
    // cross-shard outbox lost nothing across two kills.
    for (i, client) in clients.iter().enumerate() {
        // Sender i is in the group, its own direct chat and the previous sender's.
        let member_of = [group, chats_of[i][1], chats_of[(i + SENDERS - 1) % SENDERS][1]];
        let expected = all.values().filter(|(chat, _)| member_of.contains(chat)).count();
        let state = eventually(Duration::from_secs(30), || async {
            let mut state = LocalState::default();
            state.catch_up(client).await.ok()?;
            let messages: usize = state.chats.values().map(|c| c.messages.len()).sum();
            (messages == expected).then_some(state)
        })
        .await;
        assert!(state.chats.contains_key(&group));
    }
    assert_eq!(node.stop().code(), Some(0));
}
