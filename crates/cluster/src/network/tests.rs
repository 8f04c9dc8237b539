//! Three raft stores in one process, talking over real QUIC on loopback.

use super::*;
use hamgam_raftstore::{ShardWriter, StateMachine, Store, StoreConfig};
use hamgam_storage::{KvRead, KvWrite, SledDb, StorageError};

/// Each command adds its length to the shard's total; replies the new total.
struct Counter;

impl StateMachine for Counter {
    fn apply(&mut self, _: ShardId, _: u64, command: &[u8], kv: &mut ShardWriter<'_, '_>) -> Result<Vec<u8>, StorageError> {
        let old = kv.get(b"total")?.map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])));
        let new = old + command.len() as u64;
        kv.put(b"total", new.to_le_bytes().to_vec());
        Ok(new.to_le_bytes().to_vec())
    }
}

fn total(raft: &RaftHandle, shard: ShardId) -> u64 {
    raft.reader(shard).get(b"total").unwrap().map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()))
}

struct TestNode {
    store: Store,
    network: Arc<PeerNetwork>,
}

async fn start(dir: &std::path::Path, node: NodeId, members: &Members, shards: &BTreeMap<ShardId, Vec<NodeId>>) -> TestNode {
    let identity = NodeIdentity::load(&dir.join(format!("tls-{}", node.0))).unwrap().unwrap();
    let listen = members.read().unwrap()[&node];
    // A stopped node's socket is freed once its connections finish closing.
    let mut attempts = 0;
    let network = loop {
        match PeerNetwork::bind(&identity, node, listen, members.clone()) {
            Ok(network) => break network,
            Err(error) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(%error, "port still held; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => panic!("cannot bind {listen}: {error}"),
        }
    };
    let config = StoreConfig { node, dir: dir.join(format!("store-{}", node.0)), shards: shards.clone() };
    let db = SledDb::open(&dir.join(format!("db-{}", node.0)), 8 << 20).unwrap();
    let store = Store::open(config, Arc::new(db), Box::new(Counter), Box::new(network.transport())).unwrap();
    store.handle().set_forwarder(network.forwarder());
    network.serve(store.handle());
    TestNode { store, network }
}

impl TestNode {
    async fn stop(self) {
        self.network.shutdown().await;
        self.store.stop().unwrap();
    }
}

async fn stop_all(running: BTreeMap<NodeId, TestNode>) {
    for (_, test_node) in running {
        test_node.stop().await;
    }
}

fn free_udp_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Three nodes under one CA, each on a free port, all replicating shard 1.
struct TestCluster {
    dir: tempfile::TempDir,
    nodes: [NodeId; 3],
    members: Members,
    shard: ShardId,
    shards: BTreeMap<ShardId, Vec<NodeId>>,
    running: BTreeMap<NodeId, TestNode>,
}

async fn three_nodes() -> TestCluster {
    let dir = tempfile::tempdir().unwrap();
    let nodes = [NodeId(1), NodeId(2), NodeId(3)];
    NodeIdentity::load_or_create(&dir.path().join("tls-1"), nodes[0]).unwrap();
    for node in &nodes[1..] {
        NodeIdentity::issue(&dir.path().join("tls-1"), *node, &dir.path().join(format!("tls-{}", node.0))).unwrap();
    }
    let members: Members = Arc::new(RwLock::new(nodes.iter().map(|n| (*n, free_udp_port())).collect()));
    let shard = ShardId(1);
    let shards: BTreeMap<ShardId, Vec<NodeId>> = [(shard, nodes.to_vec())].into();
    let mut running = BTreeMap::new();
    for node in nodes {
        running.insert(node, start(dir.path(), node, &members, &shards).await);
    }
    TestCluster { dir, nodes, members, shard, shards, running }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_forward_elect_a_new_leader_and_catch_up_by_snapshot_over_quic() {
    let TestCluster { dir, nodes, members, shard, shards, mut running } = three_nodes().await;

    // Proposals through every node: followers forward to the leader.
    let mut tasks = Vec::new();
    for i in 0..60usize {
        let raft = running[&nodes[i % 3]].store.handle();
        tasks.push(tokio::spawn(async move { raft.propose(shard, vec![0; 3]).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for test_node in running.values() {
        let raft = test_node.store.handle();
        raft.read_index(shard).await.unwrap();
        assert_eq!(total(&raft, shard), 180, "every replica applied every command once");
    }

    // The leader goes; the other two elect a new one and keep every write.
    let leader = running[&nodes[0]].store.handle().leader(shard).unwrap();
    let gone = running.remove(&leader).unwrap();
    gone.stop().await;
    let survivor = running.values().next().unwrap().store.handle();
    // Until it sees another leader, what it forwards may go to the dead one
    // and be answered "may be lost".
    for _ in 0..600 {
        if survivor.leader(shard).is_some_and(|now| now != leader) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let reply = survivor.propose(shard, vec![0; 3]).await.unwrap();
    assert_eq!(reply, 183u64.to_le_bytes());
    assert_ne!(survivor.leader(shard), Some(leader));

    // The survivors restart: their logs now begin at what they applied, so
    // the returning node is behind every log and must get a snapshot.
    drop(survivor); // a handle keeps its node's database open
    let survivors: Vec<NodeId> = running.keys().copied().collect();
    for node in &survivors {
        running.remove(node).unwrap().stop().await;
    }
    for node in &survivors {
        running.insert(*node, start(dir.path(), *node, &members, &shards).await);
    }

    // It comes back, catches up from the new leader, and serves fresh reads.
    let back = start(dir.path(), leader, &members, &shards).await;
    let raft = back.store.handle();
    raft.read_index(shard).await.unwrap();
    assert_eq!(total(&raft, shard), 183);
    let installed = raft.stats().snapshots_installed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(installed, 1, "it caught up by a snapshot, the leader's log no longer reaching back far enough");
    running.insert(leader, back);
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_proposals_forwarded_at_once_each_get_their_own_answer() {
    // The directory lives until the end: dropping it deletes the nodes' files.
    let TestCluster { dir: _dir, nodes, shard, running, .. } = three_nodes().await;
    running[&nodes[0]].store.handle().propose(shard, vec![0; 1]).await.unwrap();
    let leader = running[&nodes[0]].store.handle().leader(shard).unwrap();
    let follower = nodes.into_iter().find(|node| *node != leader).unwrap();

    // Commands of 1..=400 bytes, all through the follower at once: each
    // reply is the total after that command, so a reply handed to the wrong
    // caller shows as a step that is not the caller's own length.
    let mut tasks = Vec::new();
    for len in 1..=400usize {
        let raft = running[&follower].store.handle();
        tasks.push(tokio::spawn(async move { (len as u64, raft.propose(shard, vec![7; len]).await) }));
    }
    let mut replies = Vec::new();
    for task in tasks {
        let (len, reply) = task.await.unwrap();
        let total = u64::from_le_bytes(reply.unwrap().try_into().unwrap());
        replies.push((total, len));
    }
    replies.sort();
    let mut before = 1;
    for (total, len) in replies {
        assert_eq!(total - before, len, "the answer to a {len}-byte command went to its caller");
        before = total;
    }
    assert_eq!(before, 1 + 400 * 401 / 2);
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_client_keeps_one_connection_and_dials_again_after_a_restart() {
    let TestCluster { dir, nodes, members, shards, mut running, .. } = three_nodes().await;
    let identity = NodeIdentity::load(&dir.path().join("tls-1")).unwrap().unwrap();
    let admin = crate::admin::AdminClient::new(&identity).unwrap();
    let addr = members.read().unwrap()[&nodes[1]];
    for _ in 0..3 {
        assert_eq!(admin.node_status(addr).await.unwrap().node, nodes[1]);
    }
    assert_eq!(admin.connections_open(), 1, "three asks, one connection");

    // The node restarts: the connection the client kept is gone with it.
    running.remove(&nodes[1]).unwrap().stop().await;
    running.insert(nodes[1], start(dir.path(), nodes[1], &members, &shards).await);
    let mut answered = None;
    for _ in 0..30 {
        match admin.node_status(addr).await {
            Ok(status) => {
                answered = Some(status.node);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(answered, Some(nodes[1]), "the client dialled the restarted node again");
    assert_eq!(admin.connections_open(), 1);
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_to_a_removed_member_stays_open_a_moment_for_what_was_sent() {
    let TestCluster { dir: _dir, nodes, members, running, .. } = three_nodes().await;
    let network = &running[&nodes[0]].network;
    let connection = network.connection(nodes[2]).await.unwrap();
    let mut stream = connection.open_uni().await.unwrap();

    // Shard 0 applies the removal of the third node while a message to it
    // is still on its way.
    let without: BTreeMap<NodeId, SocketAddr> =
        members.read().unwrap().iter().filter(|(node, _)| **node != nodes[2]).map(|(n, a)| (*n, *a)).collect();
    network.set_members(without);
    assert!(connection.close_reason().is_none(), "not closed at once");
    stream.write_all(&[wire::RAFT_STREAM]).await.unwrap();
    assert!(network.connection(nodes[2]).await.is_err(), "no new dial to a removed member");

    let started = std::time::Instant::now();
    while connection.close_reason().is_none() && started.elapsed() < REMOVED_LINK_GRACE * 10 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(connection.close_reason().is_some(), "closed after the grace");
    stop_all(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_tells_a_node_it_knows_removed_and_only_that_node() {
    let TestCluster { dir: _dir, nodes, members, running, .. } = three_nodes().await;
    // The first node's shard 0 records the third as removed (while the
    // third was down, say: the third's own records never got it).
    let addrs = members.read().unwrap().clone();
    let record = |node: NodeId, state| crate::membership::MemberRecord { id: node, peer_addr: addrs[&node], state };
    let view = ClusterView {
        members: vec![
            record(nodes[0], crate::MemberState::Active),
            record(nodes[1], crate::MemberState::Active),
            record(nodes[2], crate::MemberState::Removed),
        ],
        placement: BTreeMap::new(),
        client_addrs: BTreeMap::new(),
    };
    let (_recorded, view) = tokio::sync::watch::channel(view);
    running[&nodes[0]].network.follow(view);
    let first_knows = async {
        while running[&nodes[0]].network.members.read().unwrap().contains_key(&nodes[2]) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), first_knows).await.unwrap();

    // The removed node's periodic dial reaches the first, which tells it.
    running[&nodes[2]].network.check_membership();
    let told_removed = running[&nodes[2]].network.told_removed();
    let told = tokio::time::timeout(std::time::Duration::from_secs(20), told_removed).await;
    assert!(told.is_ok(), "the removed node was told");

    // A member in good standing dials the same node and is served.
    let second = &running[&nodes[1]].network;
    let connection = second.connection(nodes[0]).await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&[wire::CHUNK_MISSING]).await.unwrap();
    send.finish().unwrap();
    let _ = recv.read_to_end(1 << 16).await;
    assert!(connection.close_reason().is_none(), "the second node's connection is still open");
    assert!(!second.told_removed.is_cancelled(), "the second node was not told it was removed");
    stop_all(running).await;
}

#[tokio::test]
async fn chunks_go_to_the_starting_members_until_shard_0_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let identity = NodeIdentity::load_or_create(&dir.path().join("tls-1"), NodeId(1)).unwrap();
    let nodes = [NodeId(1), NodeId(2), NodeId(3)];
    let members: Members = Arc::new(RwLock::new(nodes.iter().map(|n| (*n, free_udp_port())).collect()));
    let network = PeerNetwork::bind(&identity, nodes[0], members.read().unwrap()[&nodes[0]], members.clone()).unwrap();
    assert_eq!(network.chunk_members(false), nodes, "before following shard 0");
    let (record, view) = tokio::sync::watch::channel(ClusterView::default());
    network.follow(view);
    assert_eq!(network.chunk_members(false), nodes, "shard 0 has no members recorded yet");

    let addrs = members.read().unwrap().clone();
    let member = |node: NodeId, state| crate::membership::MemberRecord { id: node, peer_addr: addrs[&node], state };
    record.send_replace(ClusterView {
        members: vec![
            member(nodes[0], crate::MemberState::Active),
            member(nodes[1], crate::MemberState::Active),
            member(nodes[2], crate::MemberState::Draining),
        ],
        ..ClusterView::default()
    });
    assert_eq!(network.chunk_members(false), nodes[..2], "recorded: the active members hold chunks");
    assert_eq!(network.chunk_members(true), nodes, "and a draining one is still reachable");
    network.shutdown().await;
}
