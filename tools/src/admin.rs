//! `hamgam admin`: the operator's view of a cluster.
//!
//! Runs on a member's machine with that member's data directory, whose
//! identity (a certificate of the cluster CA) admits it to the peer
//! endpoints, and whose `cluster.toml` says where the node listens. Asks
//! that node for the member list, then asks every member for its own view,
//! so a node that is down shows as down rather than hiding the others.

use anyhow::{Context, bail};
use hamgam_cluster::admin::{AdminClient, NodeStatus};
use hamgam_raftstore::ShardStatus;
use hamgam_cluster::{ClusterFile, MemberState};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, ShardId};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

/// A replica this many entries behind its leader counts as lagging.
const LAG_ENTRIES_WARN: u64 = 1_000;

/// Every member's answer (or why it gave none).
#[derive(Debug)]
pub struct ClusterStatus {
    pub nodes: BTreeMap<NodeId, NodeView>,
}

#[derive(Debug)]
pub struct NodeView {
    pub addr: SocketAddr,
    pub state: MemberState,
    pub status: Result<NodeStatus, String>,
    /// Chunk copies it keeps; `None` if it did not say (down, or a build
    /// from before nodes answered the question).
    pub chunks: Option<u64>,
}

impl NodeView {
    /// The member at `addr`'s status, then (if it answered) its chunk copies.
    async fn ask(admin: &AdminClient, addr: SocketAddr, state: MemberState) -> NodeView {
        let status = admin.node_status(addr).await.map_err(|e| e.to_string());
        let chunks = match status {
            Ok(_) => admin.chunks_held(addr).await.ok(),
            Err(_) => None,
        };
        NodeView { addr, state, status, chunks }
    }
}

/// One shard, as its leader (or, lacking one, its replicas) report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub committed: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Entries each replica (voters, then learners) is behind the leader;
    /// `None` when unknown.
    pub lag: Vec<(NodeId, Option<u64>)>,
}

impl ShardView {
    pub fn hosts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

impl ShardView {
    pub fn health(&self, up: impl Fn(NodeId) -> bool) -> &'static str {
        if self.leader.is_none() {
            return "no leader";
        }
        let behind = self.lag.iter().any(|(node, lag)| !up(*node) || lag.is_none_or(|lag| lag > LAG_ENTRIES_WARN));
        if behind { "degraded" } else { "ok" }
    }
}

/// A member's data directory as the admin tool uses it: its cluster record,
/// its identity, and the peer address of the node to ask.
pub struct Operator {
    pub file: ClusterFile,
    pub identity: std::sync::Arc<NodeIdentity>,
    pub addr: SocketAddr,
    data: std::path::PathBuf,
}

impl Operator {
    /// Reads the member's data directory `data`; requests go to `via` or the member itself.
    pub fn open(data: &Path, via: Option<SocketAddr>) -> anyhow::Result<Operator> {
        let file = ClusterFile::read(data)?
            .with_context(|| format!("{} holds no cluster (no cluster.toml); pass a node's --data", data.display()))?;
        let identity = NodeIdentity::load(&data.join("tls"))?
            .with_context(|| format!("{} holds no node identity (tls/)", data.display()))?;
        let Some(addr) = via.or(file.own_peer_addr()) else {
            bail!("node {} is a single-node cluster: it has no peer endpoint to ask", file.node_id);
        };
        Ok(Operator { file, identity: std::sync::Arc::new(identity), addr, data: data.to_path_buf() })
    }

    /// A join token valid for `ttl`, made with this member's CA key.
    pub fn join_token(&self, ttl: std::time::Duration) -> anyhow::Result<String> {
        let ca_key = NodeIdentity::ca_key(&self.data.join("tls"))?
            .with_context(|| format!("{} holds no CA key; make the token on another member", self.data.display()))?;
        Ok(hamgam_cluster::join::JoinToken::issue(&ca_key, &self.file.cluster_id, self.identity.ca_fingerprint(), ttl))
    }

    /// Sets a member's state through shard 0 (any node forwards it there).
    pub async fn set_member_state(&self, node: NodeId, state: MemberState) -> anyhow::Result<()> {
        let request = hamgam_cluster::admin::AdminRequest::SetMemberState { node, state };
        hamgam_cluster::admin::command(&self.identity, self.addr, &request).await?;
        Ok(())
    }
}

/// What a removed node was known to keep of the cloud store's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunksLeft {
    None,
    /// It did not answer (down, or a build from before nodes were asked):
    /// the other holders' scrub passes, which follow the removal, copy its
    /// chunks to the members that hold them now.
    Unknown,
}

impl Operator {
    /// Takes a drained (or dead) member out of the cluster. Refused while it
    /// hosts a replica of a data shard, or keeps chunk copies not yet on all
    /// of their holders (it hands them over in the scrub pass that follows
    /// its drain; removing it before would leave those chunks a copy short).
    pub async fn remove(&self, node: NodeId) -> anyhow::Result<ChunksLeft> {
        let status = ClusterStatus::gather_with(self).await?;
        let hosted = status.shards().values().filter(|s| s.shard != ShardId::CLUSTER && s.hosts(node)).count();
        let chunks = status.nodes.get(&node).and_then(|view| view.chunks);
        let mut still = Vec::new();
        if hosted > 0 {
            still.push(format!("holds {hosted} replicas"));
        }
        if let Some(held) = chunks.filter(|held| *held > 0) {
            still.push(format!("keeps {held} chunk copies that are not yet on all of their holders"));
        }
        if !still.is_empty() {
            bail!(
                "node {node} still {}; run `hamgam admin drain {node}` and wait until `hamgam admin status` shows no \
                 replicas and 0 chunks for it",
                still.join(" and ")
            );
        }
        let left = if chunks.is_some() { ChunksLeft::None } else { ChunksLeft::Unknown };
        self.set_member_state(node, MemberState::Removed).await?;
        Ok(left)
    }
}

impl ClusterStatus {
    /// Asks the node of the data directory `data` (or the one at `via`) for
    /// the members, then every member for its status.
    pub async fn gather(data: &Path, via: Option<SocketAddr>) -> anyhow::Result<ClusterStatus> {
        ClusterStatus::gather_with(&Operator::open(data, via)?).await
    }

    pub async fn gather_with(operator: &Operator) -> anyhow::Result<ClusterStatus> {
        let addr = operator.addr;
        // One connection per member for both questions.
        let admin = std::sync::Arc::new(AdminClient::new(&operator.identity)?);
        let first =
            admin.node_status(addr).await.with_context(|| format!("asking node {} at {addr}", operator.file.node_id))?;
        let mut asks = tokio::task::JoinSet::new();
        for member in &first.members {
            if member.id == first.node || member.state == MemberState::Removed {
                continue;
            }
            let admin = admin.clone();
            let (node, member_addr, state) = (member.id, member.peer_addr, member.state);
            asks.spawn(async move { (node, NodeView::ask(&admin, member_addr, state).await) });
        }
        let mut nodes = BTreeMap::new();
        let first_node = first.node;
        let state = first.members.iter().find(|m| m.id == first_node).map_or(MemberState::Active, |m| m.state);
        let chunks = admin.chunks_held(addr).await.ok();
        nodes.insert(first_node, NodeView { addr, state, status: Ok(first), chunks });
        while let Some(answer) = asks.join_next().await {
            let (node, view) = answer.context("an admin request task failed")?;
            nodes.insert(node, view);
        }
        Ok(ClusterStatus { nodes })
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|view| view.status.is_ok())
    }

    fn reports(&self) -> impl Iterator<Item = (NodeId, &ShardStatus)> {
        self.nodes
            .iter()
            .filter_map(|(node, view)| view.status.as_ref().ok().map(|status| (*node, status)))
            .flat_map(|(node, status)| status.shards.iter().map(move |report| (node, report)))
    }

    /// Each shard as seen by the replica that leads it in the highest term,
    /// or by its most advanced replica when no leader answered.
    pub fn shards(&self) -> BTreeMap<ShardId, ShardView> {
        let mut best: BTreeMap<ShardId, &ShardStatus> = BTreeMap::new();
        for (_, report) in self.reports() {
            let better = match best.get(&report.shard) {
                None => true,
                Some(current) => {
                    (report.leads(), report.term, report.committed) > (current.leads(), current.term, current.committed)
                }
            };
            if better {
                best.insert(report.shard, report);
            }
        }
        best.into_iter()
            .map(|(shard, report)| {
                let lag = report
                    .voters
                    .iter()
                    .chain(&report.learners)
                    .map(|voter| {
                        let matched = report.matched.iter().find(|(node, _)| node == voter).map(|(_, m)| *m);
                        (*voter, matched.map(|m| report.last_index.saturating_sub(m)))
                    })
                    .collect();
                let view = ShardView {
                    shard,
                    leader: if report.leads() { report.leader } else { None },
                    term: report.term,
                    committed: report.committed,
                    voters: report.voters.clone(),
                    learners: report.learners.clone(),
                    lag,
                };
                (shard, view)
            })
            .collect()
    }

    /// The leader of each shard that has one.
    pub fn leaders(&self) -> BTreeMap<ShardId, NodeId> {
        self.shards().into_iter().filter_map(|(shard, view)| view.leader.map(|leader| (shard, leader))).collect()
    }

    pub fn render(&self) -> String {
        let shards = self.shards();
        let up = |node| self.is_up(node);
        let mut out = String::new();
        let nodes_up = self.nodes.keys().filter(|n| up(**n)).count();
        let led = shards.values().filter(|s| s.leader.is_some()).count();
        let ok = shards.values().filter(|s| s.health(up) == "ok").count();
        let _ = writeln!(
            out,
            "{} nodes ({nodes_up} up), {} shards: {led} with a leader, {ok} fully replicated and current",
            self.nodes.len(),
            shards.len()
        );
        let _ = writeln!(
            out,
            "\n{:<6}{:<24}{:<10}{:<8}{:>9}{:>7}{:>11}",
            "NODE", "PEER ADDRESS", "STATE", "HEALTH", "REPLICAS", "LEADS", "CHUNKS"
        );
        for (node, view) in &self.nodes {
            let health = if view.status.is_ok() { "up" } else { "down" };
            let replicas = shards.values().filter(|s| s.hosts(*node)).count();
            let leads = shards.values().filter(|s| s.leader == Some(*node)).count();
            let chunks = view.chunks.map_or("-".to_string(), |c| c.to_string());
            let _ = writeln!(
                out,
                "{:<6}{:<24}{:<10}{health:<8}{replicas:>9}{leads:>7}{chunks:>11}",
                node.0,
                view.addr.to_string(),
                view.state.to_string()
            );
        }
        for (node, view) in &self.nodes {
            if let Err(reason) = &view.status {
                let _ = writeln!(out, "  node {node}: {reason}");
            }
        }
        let _ = writeln!(out, "\n{:<7}{:<11}{:>6}{:>8}{:>11}  REPLICAS (entries behind; L: learner)", "SHARD", "HEALTH", "TERM", "LEADER", "COMMITTED");
        for view in shards.values() {
            let leader = view.leader.map_or("-".to_string(), |l| l.0.to_string());
            let replicas: Vec<String> = view
                .lag
                .iter()
                .map(|(node, lag)| {
                    let kind = if view.learners.contains(node) { "L" } else { "" };
                    match (up(*node), lag) {
                        (false, _) => format!("{node}{kind}:down"),
                        (true, Some(lag)) => format!("{node}{kind}:{lag}"),
                        (true, None) => format!("{node}{kind}:?"),
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "{:<7}{:<11}{:>6}{leader:>8}{:>11}  {}",
                view.shard.0,
                view.health(up),
                view.term,
                view.committed,
                replicas.join(" ")
            );
        }
        out
    }
}
