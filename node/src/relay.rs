//! Live push across nodes.
//!
//! A node learns that a user's update sequence grew when it applies the
//! user's shard. Nodes without a replica of that shard never apply it, yet
//! a device of the user may be connected to one of them. So the shard's
//! leader relays each such hint (and each revocation, which connections
//! must notice) to every member that does not host the shard, along the
//! raft links; the receiving node hands it to its push hub as if it had
//! applied the write itself. Hints are only hints: one lost in a full queue
//! costs a device nothing but latency, since it catches up by sequence.

use hamgam_api::PushHub;
use hamgam_cluster::PeerNetwork;
use hamgam_raftstore::RaftHandle;
use hamgam_sync::UpdateListener;
use hamgam_types::{NodeId, Placement, UserId};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Hint {
    Updated { user: u64, pts: u64 },
    Revoked { user: u64 },
}

/// The push hub's listener on a clustered node: tells the local hub, and
/// relays to the members that cannot learn it themselves.
pub struct RelayingListener {
    hub: Arc<PushHub>,
    network: Arc<PeerNetwork>,
    placement: Placement,
    node: NodeId,
    /// Set once the store is open (the listener exists before it).
    raft: OnceLock<RaftHandle>,
}

impl RelayingListener {
    pub fn new(hub: Arc<PushHub>, network: Arc<PeerNetwork>, placement: Placement, node: NodeId) -> Arc<RelayingListener> {
        let listener =
            Arc::new(RelayingListener { hub: hub.clone(), network: network.clone(), placement, node, raft: OnceLock::new() });
        network.set_hint_sink(Arc::new(move |from, bytes| match hamgam_proto::codec::decode::<Hint>(bytes) {
            Ok(Hint::Updated { user, pts }) => hub.user_updated(UserId(user), pts),
            Ok(Hint::Revoked { user }) => hub.device_revoked(UserId(user)),
            Err(error) => tracing::warn!(%from, %error, "an undecodable push hint; dropped"),
        }));
        listener
    }

    pub fn set_raft(&self, raft: RaftHandle) {
        let _ = self.raft.set(raft);
    }

    fn relay(&self, user: UserId, hint: Hint) {
        let shard = self.placement.shard_of_user(user);
        let Some(raft) = self.raft.get() else { return };
        if raft.leader(shard) != Some(self.node) {
            return; // the leader relays, once
        }
        let lacking = self.network.members_lacking(shard);
        if lacking.is_empty() {
            return; // every member applies this shard itself
        }
        let Ok(bytes) = hamgam_proto::codec::encode(&hint) else { return };
        for member in lacking {
            self.network.relay_hint(member, bytes.clone());
        }
    }
}

impl UpdateListener for RelayingListener {
    fn user_updated(&self, user: UserId, pts: u64) {
        self.hub.user_updated(user, pts);
        self.relay(user, Hint::Updated { user: user.0, pts });
    }

    fn device_revoked(&self, user: UserId) {
        self.hub.device_revoked(user);
        self.relay(user, Hint::Revoked { user: user.0 });
    }
}
