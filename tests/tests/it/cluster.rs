//! A three-node cluster of real processes on loopback.
//!
//! Senders connected to every node write into a group and direct chats
//! while the node leading the most of those chats' shards is killed with
//! SIGKILL: the other two go on acknowledging, no acknowledged message is
//! lost or duplicated, every member sees one order, and the killed node
//! comes back and catches up. Then one node is cut off alone (the other two
//! are stopped with SIGSTOP): it acknowledges no write and serves no read
//! that must be fresh, and once the others are back the write that was
//! refused exists at most once. A client with a router sends to each chat's
//! shard leader directly, and past a leader that dies.

use crate::ledger::{Burst, assert_histories, burst, group_and_pairs, settle};
use crate::support::{NODE_BIN, Node, PASSWORD, eventually, free_udp_addr, retrying_unavailable};
use hamgam_client::{ChatId, Client, UserId};
use hamgam_tools::admin::ClusterStatus;
use hamgam_types::{NodeId, Placement, ShardId};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const NODES: usize = 3;
pub const SENDERS: usize = 6;
pub const DATA_SHARDS: u32 = 8;

/// Writes a new cluster of three under `root` and starts its nodes, each
/// with `config` added to its configuration.
pub fn start_cluster(root: &Path, config: &str) -> Vec<Node> {
    let members: Vec<String> = (1..=NODES).map(|id| format!("{id}={}", free_udp_addr())).collect();
    let init = Command::new(NODE_BIN)
        .arg("init")
        .arg("--out")
        .arg(root)
        .arg("--initial-cluster")
        .arg(members.join(","))
        .arg("--data-shards")
        .arg(DATA_SHARDS.to_string())
        .output()
        .expect("run hamgam-node init");
    assert!(init.status.success(), "init failed: {}", String::from_utf8_lossy(&init.stderr));
    (1..=NODES).map(|id| Node::start_with(&root.join(format!("node-{id}")), free_udp_addr(), &[], config)).collect()
}

/// The cluster as `hamgam admin status` sees it, once every shard has a leader.
pub async fn status_with_leaders(node: &Node) -> ClusterStatus {
    eventually(Duration::from_secs(60), || async {
        let status = ClusterStatus::gather(&node.dir, None).await.ok()?;
        (status.leaders().len() == DATA_SHARDS as usize + 1).then_some(status)
    })
    .await
}

/// Sender i stays on node i mod 3.
pub fn home(sender: usize) -> usize {
    sender % NODES
}

/// The senders of a cluster test: signed up and logged in on their home
/// nodes, all in one group, and each pair in a direct chat.
pub struct Senders {
    pub names: Vec<String>,
    pub ids: Vec<UserId>,
    pub clients: Vec<Client>,
    pub group: ChatId,
    /// The chats each sender writes to.
    pub chats_of: Vec<Vec<ChatId>>,
    pub chats: Vec<ChatId>,
}

impl Senders {
    pub async fn sign_up(nodes: &[Node], group_title: &str) -> Senders {
        let names: Vec<String> = (0..SENDERS).map(|i| format!("sender{i}")).collect();
        let mut ids: Vec<UserId> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            ids.push(nodes[home(i)].user(name).await.1);
        }
        let mut clients = Vec::new();
        for (i, name) in names.iter().enumerate() {
            clients.push(log_in(&nodes[home(i)], name).await);
        }
        let (group, chats_of) = group_and_pairs(&clients, &ids, group_title).await;
        let chats: Vec<ChatId> = chats_of.iter().flatten().copied().collect();
        Senders { names, ids, clients, group, chats_of, chats }
    }
}

/// Waits until the data shards' leaders sit only on `holders`, evenly (at
/// most one apart). Returns the leads per holder.
pub async fn leaders_spread_on(via: &Node, holders: &[NodeId]) -> BTreeMap<NodeId, usize> {
    eventually(Duration::from_secs(60), || async {
        let status = ClusterStatus::gather(&via.dir, None).await.ok()?;
        let mut led: BTreeMap<NodeId, usize> = holders.iter().map(|n| (*n, 0)).collect();
        for view in status.shards().values().filter(|s| s.shard != ShardId::CLUSTER) {
            *led.get_mut(&view.leader?)? += 1;
        }
        let (min, max) = (led.values().min()?, led.values().max()?);
        (max - min <= 1).then_some(led)
    })
    .await
}

pub async fn log_in(node: &Node, name: &str) -> Client {
    let client = node.client().await;
    retrying_unavailable(|| client.log_in(name, PASSWORD, "burst")).await.unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_busiest_leader_loses_nothing_and_a_lone_node_accepts_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path(), "");
    status_with_leaders(&nodes[0]).await;

    let Senders { names, clients, group, chats_of, chats, .. } = Senders::sign_up(&nodes, "گروه آزمون").await;

    // Load from every node; then kill the node leading most of the chats' shards.
    let signals = Arc::new(Burst::default());
    let shared: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in shared.iter().enumerate() {
        tasks.spawn(burst(client.clone(), i, chats_of[i].clone(), 0, signals.clone()));
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let leaders = ClusterStatus::gather(&nodes[0].dir, None).await.unwrap().leaders();
    let placement = Placement::new(DATA_SHARDS);
    let busy: BTreeSet<ShardId> = chats.iter().map(|chat| placement.shard_of_chat(*chat)).collect();
    let mut led: BTreeMap<NodeId, usize> = BTreeMap::new();
    for shard in &busy {
        if let Some(leader) = leaders.get(shard) {
            *led.entry(*leader).or_default() += 1;
        }
    }
    let (&busiest, _) = led.iter().max_by_key(|(_, n)| **n).expect("the chats' shards have leaders");
    let victim = (busiest.0 - 1) as usize;
    let victim_addr = nodes[victim].addr;
    nodes[victim].kill();
    signals.killed.store(true, Ordering::Relaxed);
    // Its clients notice their node is gone, as an app on a dead network does.
    for (i, client) in shared.iter().enumerate() {
        if home(i) == victim {
            client.connection().close(quinn::VarInt::from_u32(0), b"node gone");
        }
    }
    // The other two elect new leaders and keep acknowledging.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    signals.stop.store(true, Ordering::Relaxed);
    let mut ledgers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ledgers.push(done.unwrap());
    }
    let acked: usize = ledgers.iter().map(|(_, l)| l.acked.len()).sum();
    let after = signals.acked_after_kill.load(Ordering::Relaxed);
    eprintln!("killed node {busiest}, which led {} of the {} shards the chats live on: {acked} acknowledged, {after} after the kill", led[&busiest], busy.len());
    assert!(acked > 30, "the burst made progress ({acked} acknowledged)");
    assert!(after > 5, "the surviving nodes kept acknowledging after the kill ({after})");

    // The killed node returns; its clients reconnect to it.
    let dir_of_victim = nodes[victim].dir.clone();
    nodes[victim] = Node::start_at(&dir_of_victim, victim_addr);
    drop(shared);
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        clients.push(log_in(&nodes[home(i)], name).await);
    }
    let mut all = BTreeMap::new();
    settle(&clients, ledgers, &mut all).await;
    // Read through every node, the restarted one included.
    assert_histories(&clients, &chats, &all).await;
    // And it caught up on every shard, not only the ones just read.
    eventually(Duration::from_secs(60), || async {
        let status = ClusterStatus::gather(&nodes[0].dir, None).await.ok()?;
        let shards = status.shards();
        let current = shards.len() == DATA_SHARDS as usize + 1
            && shards.values().all(|s| s.leader.is_some() && s.lag.iter().all(|(_, lag)| *lag == Some(0)));
        current.then_some(())
    })
    .await;
    // And the placement driver hands it its share of the leads again.
    let led = leaders_spread_on(&nodes[0], &[NodeId(1), NodeId(2), NodeId(3)]).await;
    eprintln!("after the restart: data shards led per node {led:?}");

    // Cut node 1 off: stop the other two.
    let lone = 0;
    for (i, node) in nodes.iter().enumerate() {
        if i != lone {
            node.pause();
        }
    }
    let writer = (0..SENDERS).find(|i| home(*i) == lone).unwrap();
    let client_msg_id = rand::random::<u64>();
    let text = "تنها: این نباید پذیرفته شود".to_string();
    let refused = clients[writer].send_with_id(group, client_msg_id, &text).await;
    assert!(refused.is_err(), "a node cut off from the others acknowledged a write: {refused:?}");
    let stale = clients[writer].full_history(group).await;
    assert!(stale.is_err(), "a node cut off from the others served a read that must be fresh");
    for (i, node) in nodes.iter().enumerate() {
        if i != lone {
            node.resume();
        }
    }
    // Back together: the refused write, retried with its client id, exists once.
    let (seq, _) = eventually(Duration::from_secs(60), || async {
        clients[writer].send_with_id(group, client_msg_id, &text).await.ok()
    })
    .await;
    all.insert(text, (group, seq));
    assert_histories(&clients, &chats, &all).await;

    for node in &mut nodes {
        assert_eq!(node.stop().code(), Some(0));
    }
}

/// A client that asks for the route table sends each chat's messages to the
/// node leading the chat's shard, over a connection of its own; what it
/// sends lands once, as through any other node. When that leader is killed,
/// the send that finds it gone (after the request timeout) is made through
/// the home node, once, and the router stops using the dead node.
/// Unauthenticated, the table is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_sends_each_chat_to_its_shard_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path(), "");
    status_with_leaders(&nodes[0]).await;
    // At start one node may lead every shard until the placement driver has
    // spread them; the chats below must have leaders away from the home node.
    leaders_spread_on(&nodes[0], &[NodeId(1), NodeId(2), NodeId(3)]).await;

    let stranger = nodes[0].client().await;
    let refused = stranger.call(&hamgam_proto::Request::Routes).await.unwrap_err();
    assert_eq!(refused.code(), Some(hamgam_proto::ErrorCode::UNAUTHENTICATED));

    // Enough peers that the direct chats' shards have leaders on every node.
    let (_, me) = nodes[0].user("router").await;
    let mut chats = Vec::new();
    for i in 0..8 {
        let (_, peer) = nodes[i % NODES].user(&format!("peer{i}")).await;
        chats.push(peer);
    }
    let home = nodes[0].client().await;
    let session = retrying_unavailable(|| home.log_in("router", PASSWORD, "router")).await.unwrap();
    assert_eq!(session.user, me);
    let mut chat_ids = Vec::new();
    for peer in chats {
        chat_ids.push(retrying_unavailable(|| home.direct_chat(peer)).await.unwrap().chat);
    }
    let placement = Placement::new(DATA_SHARDS);
    let home = Arc::new(home);
    let router = hamgam_client::Router::new(home.clone(), session.token.clone()).await.unwrap();
    // Each node records where it serves clients shortly after it starts, and
    // the placement driver may still be spreading leaders: compare with the
    // cluster's current view until the two agree.
    for chat in &chat_ids {
        eventually(Duration::from_secs(60), || async {
            let status = ClusterStatus::gather(&nodes[0].dir, None).await.ok()?;
            let leader = status.shards().get(&placement.shard_of_chat(*chat))?.leader?;
            router.refresh().await.ok()?;
            (router.for_chat(*chat).await.welcome().node == leader).then_some(())
        })
        .await;
    }
    let mut away = 0;
    for chat in &chat_ids {
        away += usize::from(router.for_chat(*chat).await.welcome().node != home.welcome().node);
    }
    assert!(away > 0, "every chat's shard is led by the home node; the test shows nothing");
    let mut sent = Vec::new();
    for (i, chat) in chat_ids.iter().enumerate() {
        let text = format!("پیام {i} از راه رهبر");
        let id = home.new_client_msg_id();
        let (seq, _) = retrying_unavailable(|| router.send_with_id(*chat, id, &text)).await.unwrap();
        // A retry with the same id through the home node is the same message.
        let (again, _) = retrying_unavailable(|| home.send_with_id(*chat, id, &text)).await.unwrap();
        assert_eq!(seq, again);
        sent.push((*chat, seq, text));
    }
    // A leader that dies: the send that finds it gone is made through the
    // home node instead, once, and the router stops using the dead node.
    let mut orphan = None;
    for chat in &chat_ids {
        if router.for_chat(*chat).await.welcome().node != home.welcome().node {
            orphan = Some(*chat);
            break;
        }
    }
    let orphan = orphan.unwrap();
    let victim = router.for_chat(orphan).await.welcome().node;
    nodes[(victim.0 - 1) as usize].kill();
    let text = "پس از مرگ رهبر".to_string();
    let id = home.new_client_msg_id();
    let (seq, _) = retrying_unavailable(|| router.send_with_id(orphan, id, &text)).await.unwrap();
    sent.push((orphan, seq, text));
    assert_ne!(router.for_chat(orphan).await.welcome().node, victim, "the router still sends to a dead node");

    for (chat, seq, text) in &sent {
        let history = retrying_unavailable(|| home.full_history(*chat)).await.unwrap();
        let found: Vec<_> = history.iter().filter(|m| &m.text == text).collect();
        assert_eq!(found.len(), 1, "chat {chat:?}: {history:?}");
        assert_eq!(found[0].seq, *seq);
    }

    for (i, node) in nodes.iter_mut().enumerate() {
        if i != (victim.0 - 1) as usize {
            assert_eq!(node.stop().code(), Some(0));
        }
    }
}
