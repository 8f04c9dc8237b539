//! `hamgam admin`: the operator's view of a cluster.
//!
//! Runs on a member's machine with that member's data directory, whose
//! identity (a certificate of the cluster CA) admits it to the peer
//! endpoints, and whose `cluster.toml` says where the node listens. Asks
//! that node for the member list, then asks every member for its own view,
//! so a node that is down shows as down rather than hiding the others.

use anyhow::{Context, bail};
use hamgam_cluster::ClusterFile;
use hamgam_cluster::admin::{NodeStatus, ShardReport};
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
    pub status: Result<NodeStatus, String>,
}

/// One shard, as its leader (or, lacking one, its replicas) report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub committed: u64,
    pub voters: Vec<NodeId>,
    /// Entries each voter is behind the leader; `None` when unknown.
    pub lag: Vec<(NodeId, Option<u64>)>,
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

impl ClusterStatus {
    /// Asks the node of the data directory `data` (or the one at `via`) for
    /// the members, then every member for its status.
    pub async fn gather(data: &Path, via: Option<SocketAddr>) -> anyhow::Result<ClusterStatus> {
        let file = ClusterFile::read(data)?
            .with_context(|| format!("{} holds no cluster (no cluster.toml); pass a node's --data", data.display()))?;
        let identity = NodeIdentity::load(&data.join("tls"))?
            .with_context(|| format!("{} holds no node identity (tls/)", data.display()))?;
        let identity = std::sync::Arc::new(identity);
        let Some(addr) = via.or(file.own_peer_addr()) else {
            bail!("node {} is a single-node cluster: it has no peer endpoint to ask", file.node_id);
        };
        let first = hamgam_cluster::admin::node_status(&identity, addr)
            .await
            .with_context(|| format!("asking node {} at {addr}", file.node_id))?;
        let mut asks = tokio::task::JoinSet::new();
        for &(node, member_addr) in &first.members {
            if node == first.node {
                continue;
            }
            let identity = identity.clone();
            asks.spawn(async move {
                let status = hamgam_cluster::admin::node_status(&identity, member_addr).await.map_err(|e| e.to_string());
                (node, NodeView { addr: member_addr, status })
            });
        }
        let mut nodes = BTreeMap::new();
        let first_node = first.node;
        nodes.insert(first_node, NodeView { addr, status: Ok(first) });
        while let Some(answer) = asks.join_next().await {
            let (node, view) = answer.context("an admin request task failed")?;
            nodes.insert(node, view);
        }
        Ok(ClusterStatus { nodes })
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|view| view.status.is_ok())
    }

    fn reports(&self) -> impl Iterator<Item = (NodeId, &ShardReport)> {
        self.nodes
            .iter()
            .filter_map(|(node, view)| view.status.as_ref().ok().map(|status| (*node, status)))
            .flat_map(|(node, status)| status.shards.iter().map(move |report| (node, report)))
    }

    /// Each shard as seen by the replica that leads it in the highest term,
    /// or by its most advanced replica when no leader answered.
    pub fn shards(&self) -> BTreeMap<ShardId, ShardView> {
        let mut best: BTreeMap<ShardId, &ShardReport> = BTreeMap::new();
        for (_, report) in self.reports() {
            let better = match best.get(&report.shard) {
                None => true,
                Some(current) => {
                    (report.leading, report.term, report.committed) > (current.leading, current.term, current.committed)
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
                    .map(|voter| {
                        let matched = report.matched.iter().find(|(node, _)| node == voter).map(|(_, m)| *m);
                        (*voter, matched.map(|m| report.last_index.saturating_sub(m)))
                    })
                    .collect();
                let view = ShardView {
                    shard,
                    leader: if report.leading { report.leader } else { None },
                    term: report.term,
                    committed: report.committed,
                    voters: report.voters.clone(),
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
        let _ = writeln!(out, "\n{:<6}{:<24}{:<8}{:>9}{:>7}", "NODE", "PEER ADDRESS", "HEALTH", "REPLICAS", "LEADS");
        for (node, view) in &self.nodes {
            let (health, replicas) = match &view.status {
                Ok(status) => ("up", status.shards.len().to_string()),
                Err(_) => ("down", "-".to_string()),
            };
            let leads = shards.values().filter(|s| s.leader == Some(*node)).count();
            let _ = writeln!(out, "{:<6}{:<24}{health:<8}{replicas:>9}{leads:>7}", node.0, view.addr.to_string());
        }
        for (node, view) in &self.nodes {
            if let Err(reason) = &view.status {
                let _ = writeln!(out, "  node {node}: {reason}");
            }
        }
        let _ = writeln!(out, "\n{:<7}{:<11}{:>6}{:>8}{:>11}  REPLICAS (entries behind)", "SHARD", "HEALTH", "TERM", "LEADER", "COMMITTED");
        for view in shards.values() {
            let leader = view.leader.map_or("-".to_string(), |l| l.0.to_string());
            let replicas: Vec<String> = view
                .lag
                .iter()
                .map(|(node, lag)| match (up(*node), lag) {
                    (false, _) => format!("{node}:down"),
                    (true, Some(lag)) => format!("{node}:{lag}"),
                    (true, None) => format!("{node}:?"),
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
