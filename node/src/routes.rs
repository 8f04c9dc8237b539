//! Telling clients where shard leaders serve them.
//!
//! A message sent to a node that does not lead its chat's shard crosses the
//! cluster twice more than one sent to the leader: forwarded to the leader,
//! and the commit told back before the node can answer. Clients that ask
//! for the route table (`Request::Routes`) send each chat's writes to its
//! leader instead. Each member records the address it serves clients on in
//! shard 0, and answers with the leaders it knows.

use hamgam_api::RouteSource;
use hamgam_cluster::ClusterView;
use hamgam_cluster::membership::{ClusterCommand, ClusterReply};
use hamgam_proto::RouteTable;
use hamgam_raftstore::RaftHandle;
use hamgam_types::{NodeId, ShardId};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The route table from this node's view of the cluster.
pub(crate) struct ClusterRoutes {
    pub raft: RaftHandle,
    pub view: watch::Receiver<ClusterView>,
    pub data_shards: u32,
}

impl RouteSource for ClusterRoutes {
    fn routes(&self) -> RouteTable {
        let nodes: Vec<(NodeId, SocketAddr)> = self.view.borrow().client_routes().into_iter().collect();
        let leaders = (1..=self.data_shards)
            .filter_map(|shard| self.raft.leader(ShardId(shard)).map(|leader| (ShardId(shard), leader)))
            .collect();
        RouteTable { data_shards: self.data_shards, nodes, leaders }
    }
}

/// Records in shard 0 that `node` serves clients on `addr`, again whenever
/// the recorded address differs (a restart on another address). An
/// unspecified address (0.0.0.0) tells a client nothing and is not recorded.
pub(crate) async fn record_client_addr(
    raft: RaftHandle,
    node: NodeId,
    addr: SocketAddr,
    mut view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
) {
    if addr.ip().is_unspecified() {
        tracing::info!(%addr, "listening on an unspecified address: clients are not told where this node serves");
        return;
    }
    let command = ClusterCommand::ClientAddr { node, addr };
    loop {
        let recorded = view.borrow_and_update().client_addrs.get(&node) == Some(&addr);
        if !recorded {
            match hamgam_cluster::join::propose_cluster(&raft, &command).await {
                Ok(ClusterReply::Done) => {}
                Ok(other) => tracing::debug!(?other, "the client address is not recorded yet; retrying"),
                Err(reason) => tracing::debug!(%reason, "the client address is not recorded yet; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}
