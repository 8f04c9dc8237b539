//! Growing a cluster of real processes from three nodes to five and back,
//! under load.
//!
//! Two nodes join with tokens while senders on the first three write; the
//! placement driver spreads the replicas over all five, and members read
//! every chat through the new nodes too (which host only some shards, so
//! some reads go to another node). A device on a node without its user's
//! shard gets live push; the nodes that lost replicas give their state up;
//! a used or forged join token is refused. Then one new node is killed and
//! stays dead: past the configured time its replicas are rebuilt on the
//! others. The other new node is drained; both are removed; three remain.
//! Each removed node, started again, stops by itself.
//! After each phase every acknowledged message is there exactly once, in
//! one order for every member.

use crate::cluster::{DATA_SHARDS, Senders, home, leaders_spread_on, log_in, start_cluster, status_with_leaders};
use crate::ledger::{Burst, assert_histories, burst, settle};
use crate::support::{Node, eventually, free_udp_addr};
use hamgam_client::{ChatId, Client, Push};
use hamgam_cluster::join::{JoinError, JoinToken};
use hamgam_cluster::{ClusterFile, MemberState};
use hamgam_tools::admin::{ClusterStatus, Operator};
use hamgam_types::{NodeId, Placement, ShardId};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Every node with its dead members' replicas rebuilt after this long.
const CONFIG: &str = "[cluster]\ndead_after_secs = 5\n";

/// Starts `hamgam-node join` for a new node under `root`, admitted by
/// `via`'s node, with this test's configuration.
fn join(root: &Path, name: &str, via: &Node) -> (Node, String) {
    join_with(root, name, via, CONFIG)
}

/// Starts `hamgam-node join` for a new node under `root`, admitted by
/// `via`'s node, with `config`; returns it and the token it used.
pub fn join_with(root: &Path, name: &str, via: &Node, config: &str) -> (Node, String) {
    let token = Operator::open(&via.dir, None).unwrap().join_token(Duration::from_secs(600)).unwrap();
    let via_peer = ClusterFile::read(&via.dir).unwrap().unwrap().own_peer_addr().unwrap();
    let args = vec![
        "join".to_string(),
        "--via".to_string(),
        via_peer.to_string(),
        "--token".to_string(),
        token.clone(),
        "--peer-listen".to_string(),
        free_udp_addr().to_string(),
    ];
    (Node::start_with(&root.join(name), free_udp_addr(), &args, config), token)
}

/// Waits until the data replicas sit only on `holders`, evenly (at most one
/// apart), every data shard has three voters and no learner, and every
/// replica keeps up (under load a replica is always a few entries behind).
/// Returns the replicas per holder.
async fn balanced_on(via: &Node, holders: &[NodeId]) -> BTreeMap<NodeId, usize> {
    eventually(Duration::from_secs(120), || async {
        let status = ClusterStatus::gather(&via.dir, None).await.ok()?;
        let shards = status.shards();
        if shards.len() != DATA_SHARDS as usize + 1 {
            return None;
        }
        let mut load: BTreeMap<NodeId, usize> = holders.iter().map(|n| (*n, 0)).collect();
        for view in shards.values().filter(|s| s.shard != ShardId::CLUSTER) {
            let settled = view.leader.is_some()
                && view.voters.len() == 3
                && view.learners.is_empty()
                && view.lag.iter().all(|(_, lag)| lag.is_some_and(|lag| lag < 1_000));
            if !settled {
                return None;
            }
            for voter in &view.voters {
                *load.get_mut(voter)? += 1;
            }
        }
        let (min, max) = (load.values().min()?, load.values().max()?);
        (max - min <= 1).then_some(load)
    })
    .await
}

/// Runs a burst from every client until `phase` finishes, then settles its ledgers.
async fn under_load<F: std::future::Future<Output = ()>>(
    clients: &[Arc<Client>],
    chats_of: &[Vec<ChatId>],
    round: u32,
    phase: F,
) -> Vec<(usize, crate::ledger::Ledger)> {
    let signals = Arc::new(Burst::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        tasks.spawn(burst(client.clone(), i, chats_of[i].clone(), round, signals.clone()));
    }
    phase.await;
    signals.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ledgers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ledgers.push(done.unwrap());
    }
    let acked: usize = ledgers.iter().map(|(_, l)| l.acked.len()).sum();
    eprintln!("round {round}: {acked} acknowledged");
    assert!(acked > 30, "the burst made progress in round {round} ({acked} acknowledged)");
    ledgers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_to_five_and_shrinking_to_three_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path(), CONFIG);
    status_with_leaders(&nodes[0]).await;
    let Senders { names, ids, clients, group, chats_of, chats } = Senders::sign_up(&nodes, "گروه رشد").await;
    let senders: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let mut all = BTreeMap::new();

    // Round 1: two nodes join; the replicas spread over five.
    let root = dir.path().to_path_buf();
    let mut joined = Vec::new();
    let mut used_token = String::new();
    let ledgers = under_load(&senders, &chats_of, 1, async {
        let (node, token) = join(&root, "node-4", &nodes[0]);
        joined.push(node);
        used_token = token;
        joined.push(join(&root, "node-5", &nodes[1]).0);
        let load = balanced_on(&nodes[0], &(1..=5).map(NodeId).collect::<Vec<_>>()).await;
        eprintln!("grown to five: data replicas per node {load:?}");
        let led = leaders_spread_on(&nodes[0], &(1..=5).map(NodeId).collect::<Vec<_>>()).await;
        eprintln!("grown to five: data shards led per node {led:?}");
    })
    .await;
    let joined_ids = [NodeId(4), NodeId(5)];
    // The nodes that lost replicas to the new ones give their state up.
    eventually(Duration::from_secs(60), || async {
        let status = ClusterStatus::gather(&nodes[0].dir, None).await.ok()?;
        let shards = status.shards();
        let stale = status.nodes.iter().any(|(node, view)| {
            view.status.as_ref().is_ok_and(|s| {
                s.shards.iter().any(|r| r.last_index > 0 && shards.get(&r.shard).is_some_and(|v| !v.hosts(*node)))
            })
        });
        (!stale).then_some(())
    })
    .await;

    // A token admits one node; one not made with the cluster's CA key none.
    let via_peer = ClusterFile::read(&nodes[2].dir).unwrap().unwrap().own_peer_addr().unwrap();
    let again = hamgam_cluster::join::request_join(via_peer, &used_token, free_udp_addr()).await;
    assert!(matches!(&again, Err(JoinError::Refused(reason)) if reason.contains("already used")), "{again:?}");
    let ca = Operator::open(&nodes[0].dir, None).unwrap().identity.ca_fingerprint();
    let cluster_id = ClusterFile::read(&nodes[0].dir).unwrap().unwrap().cluster_id;
    let forged = JoinToken::issue(b"not the CA key", &cluster_id, ca, Duration::from_secs(600));
    let refused = hamgam_cluster::join::request_join(via_peer, &forged, free_udp_addr()).await;
    assert!(matches!(&refused, Err(JoinError::Refused(reason)) if reason.contains("not from this cluster")), "{refused:?}");
    // Each sender settles (retries what failed) from a second device on its node.
    let mut readers: Vec<Client> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        readers.push(log_in(&nodes[home(i)], name).await);
    }
    settle(&readers, ledgers, &mut all).await;
    // Members read through the new nodes as well: same histories.
    let mut through_new = Vec::new();
    for (i, name) in names.iter().enumerate() {
        through_new.push(log_in(&joined[i % 2], name).await);
    }
    assert_histories(&through_new, &chats, &all).await;

    // Live push reaches a device connected to a node that holds no replica
    // of its user's shard (the shard's leader relays the hint).
    let shards = ClusterStatus::gather(&nodes[0].dir, None).await.unwrap().shards();
    let placement = Placement::new(DATA_SHARDS);
    let (listener, outsider) = (0..ids.len())
        .find_map(|i| {
            let shard = &shards[&placement.shard_of_user(ids[i])];
            (1..=5u64).map(NodeId).find(|n| !shard.hosts(*n)).map(|n| (i, n))
        })
        .expect("with five nodes and three replicas, some node lacks some user's shard");
    let outsider_node = if outsider.0 <= 3 { &nodes[outsider.0 as usize - 1] } else { &joined[outsider.0 as usize - 4] };
    let device = log_in(outsider_node, &names[listener]).await;
    let pts = device.subscribe(0).await.unwrap().pts;
    let mut push = device.subscribe(pts).await.unwrap();
    let speaker = (listener + 1) % ids.len();
    let (sent_seq, _) = readers[speaker].send(group, "برای همه: پیام زنده").await.unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(10), push.next()).await.expect("a push in time").unwrap();
    assert!(matches!(pushed, Some(Push::Updates(_))), "{pushed:?}");
    all.insert("برای همه: پیام زنده".to_string(), (group, sent_seq));
    drop((push, device));

    // Round 2: node 5 dies and stays dead; node 4 is drained; both are removed.
    let node4_listed = ClusterFile::read(&joined[0].dir).unwrap().unwrap();
    let operator = Operator::open(&nodes[0].dir, None).unwrap();
    drop(through_new);
    let ledgers = under_load(&senders, &chats_of, 2, async {
        joined[1].kill();
        let load = balanced_on(&nodes[0], &[NodeId(1), NodeId(2), NodeId(3), NodeId(4)]).await;
        eprintln!("node 5 dead: its replicas rebuilt, data replicas per node {load:?}");
        operator.set_member_state(joined_ids[0], MemberState::Draining).await.unwrap();
        let load = balanced_on(&nodes[0], &[NodeId(1), NodeId(2), NodeId(3)]).await;
        eprintln!("node 4 drained: data replicas per node {load:?}");
        for node in joined_ids {
            operator.set_member_state(node, MemberState::Removed).await.unwrap();
        }
    })
    .await;
    // Node 4, removed while running, learns it from shard 0 and stops cleanly by itself.
    assert_eq!(joined[0].exits_by_itself(Duration::from_secs(60)).code(), Some(0), "a removed node stops by itself");
    // Started again, it stops at once, before it listens: its member list
    // (recorded as shard 0 changed) leaves it out; and with that list put
    // back as it was before the removal, its own copy of shard 0 says so.
    for attempt in ["as recorded", "with the old member list"] {
        if attempt == "with the old member list" {
            node4_listed.write(&joined[0].dir).unwrap();
        }
        let (status, out, err) = Node::run_expecting_exit(&joined[0].dir, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{attempt}: {err}");
        assert!(!out.contains("listening"), "{attempt}: it started serving: {out}");
        assert!(err.contains("was removed from the cluster and stops"), "{attempt}: {err}");
    }
    // Node 5, removed while it was down, never got its removal through shard
    // 0 (no member sends to it any more). Started again, it dials the
    // members, one tells it, and it stops by itself.
    let (status, _, err) = Node::run_expecting_exit(&joined[1].dir, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "node 5: {err}");
    assert!(err.contains("was removed from the cluster and stops"), "node 5: {err}");
    settle(&readers, ledgers, &mut all).await;
    assert_histories(&readers, &chats, &all).await;
    let status = ClusterStatus::gather(&nodes[0].dir, None).await.unwrap();
    assert_eq!(status.nodes.keys().copied().collect::<Vec<_>>(), vec![NodeId(1), NodeId(2), NodeId(3)], "removed nodes are gone");

    for node in &mut nodes {
        assert_eq!(node.stop().code(), Some(0));
    }
}
