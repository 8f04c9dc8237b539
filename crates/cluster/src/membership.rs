//! Shard 0's state: the members of the cluster and where each shard's
//! replicas are.
//!
//! [`ClusterMachine`] is the state machine of every shard on a clustered
//! node: shard 0's commands ([`ClusterCommand`]) it applies itself, every
//! other shard's it hands to the data machine (the messenger). Every member
//! hosts a replica of shard 0 (a voter on up to three, a learner on the
//! rest), so every node holds the member list and the placement, and learns
//! of a change when it applies it.

use hamgam_raftstore::{ShardReader, ShardWriter, StateMachine};
use hamgam_storage::{KeyRange, KvRead, KvWrite, Order, StorageError};
use hamgam_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio::sync::watch;

/// Members a cluster may ever have had (ids are never reused); bounds every
/// list of members.
pub const MEMBERS_MAX: usize = 256;

/// A member's standing, set by operators (and by joining).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Takes replicas.
    Active,
    /// Keeps serving, but its replicas are moved to other members.
    Draining,
    /// Out of the cluster: its certificate no longer admits it.
    Removed,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Removed => "removed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: NodeId,
    /// Where its peers reach it.
    pub peer_addr: SocketAddr,
    pub state: MemberState,
}

/// Shard 0's commands. Wire enums append variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterCommand {
    /// The initial members, from `init`. Applies only to an empty list, so
    /// every initial member may propose it.
    Seed { members: Vec<(NodeId, SocketAddr)> },
    /// A node joining with a token whose `nonce` no join has used yet. The
    /// new member's id is one above the highest ever given.
    Join { nonce: [u8; 16], peer_addr: SocketAddr },
    /// An operator's drain or remove.
    SetState { node: NodeId, state: MemberState },
    /// Where a shard's replicas are, recorded by the placement driver after
    /// each change so that nodes without a replica know whom to ask.
    Placed { shard: ShardId, replicas: Vec<NodeId> },
    /// Where a member serves clients, recorded by the member itself when it
    /// starts, so that clients can reach shard leaders directly.
    ClientAddr { node: NodeId, addr: SocketAddr },
}

/// Shard 0's replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterReply {
    Done,
    Joined(NodeId),
    /// Refused, with a sentence saying why; nothing changed.
    Refused(String),
}

const MEMBER: u8 = b'm';
const USED_NONCE: u8 = b'n';
const PLACED: u8 = b'p';
const CLIENT_ADDR: u8 = b'c';

fn member_key(node: NodeId) -> Vec<u8> {
    let mut key = vec![MEMBER];
    key.extend_from_slice(&node.0.to_be_bytes());
    key
}

fn client_addr_key(node: NodeId) -> Vec<u8> {
    let mut key = vec![CLIENT_ADDR];
    key.extend_from_slice(&node.0.to_be_bytes());
    key
}

fn placed_key(shard: ShardId) -> Vec<u8> {
    let mut key = vec![PLACED];
    key.extend_from_slice(&shard.0.to_be_bytes());
    key
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("corrupt cluster shard {what}: {error}"))
}

/// Every member ever recorded, in id order.
pub fn read_members(shard0: &impl KvRead) -> Result<Vec<MemberRecord>, StorageError> {
    shard0
        .scan(&KeyRange::prefix(&[MEMBER]), Order::Ascending, MEMBERS_MAX)?
        .into_iter()
        .map(|(_, value)| hamgam_proto::codec::decode(&value).map_err(|e| corrupt("member", e)))
        .collect()
}

/// Where each member that recorded one serves clients.
pub fn read_client_addrs(shard0: &impl KvRead) -> Result<BTreeMap<NodeId, SocketAddr>, StorageError> {
    shard0
        .scan(&KeyRange::prefix(&[CLIENT_ADDR]), Order::Ascending, MEMBERS_MAX)?
        .into_iter()
        .map(|(key, value)| {
            let id: [u8; 8] =
                key.get(1..9).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("client key", "short"))?;
            let addr = hamgam_proto::codec::decode(&value).map_err(|e| corrupt("client address", e))?;
            Ok((NodeId(u64::from_be_bytes(id)), addr))
        })
        .collect()
}

/// The recorded replicas of every shard the driver has placed.
pub fn read_placement(shard0: &impl KvRead, shards: usize) -> Result<BTreeMap<ShardId, Vec<NodeId>>, StorageError> {
    shard0
        .scan(&KeyRange::prefix(&[PLACED]), Order::Ascending, shards)?
        .into_iter()
        .map(|(key, value)| {
            let id: [u8; 4] = key.get(1..5).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("placement key", "short"))?;
            let replicas = hamgam_proto::codec::decode(&value).map_err(|e| corrupt("placement", e))?;
            Ok((ShardId(u32::from_be_bytes(id)), replicas))
        })
        .collect()
}

/// Applies one shard-0 command. Deterministic: checks, then writes.
fn apply_cluster(command: &ClusterCommand, kv: &mut ShardWriter<'_, '_>) -> Result<ClusterReply, StorageError> {
    let members = read_members(kv)?;
    let put_member = |kv: &mut ShardWriter<'_, '_>, record: &MemberRecord| -> Result<(), StorageError> {
        let bytes = hamgam_proto::codec::encode(record).map_err(|e| corrupt("member", e))?;
        kv.put(&member_key(record.id), bytes);
        Ok(())
    };
    match command {
        ClusterCommand::Seed { members: initial } => {
            if !members.is_empty() {
                return Ok(ClusterReply::Done);
            }
            for &(id, peer_addr) in initial.iter().take(MEMBERS_MAX) {
                put_member(kv, &MemberRecord { id, peer_addr, state: MemberState::Active })?;
            }
            Ok(ClusterReply::Done)
        }
        ClusterCommand::Join { nonce, peer_addr } => {
            if members.is_empty() {
                return Ok(ClusterReply::Refused("the cluster's member list is not recorded yet; try again".into()));
            }
            let mut nonce_key = vec![USED_NONCE];
            nonce_key.extend_from_slice(nonce);
            if kv.get(&nonce_key)?.is_some() {
                return Ok(ClusterReply::Refused("this join token was already used".into()));
            }
            if members.len() >= MEMBERS_MAX {
                return Ok(ClusterReply::Refused(format!("a cluster has at most {MEMBERS_MAX} members over its life")));
            }
            if let Some(taken) = members.iter().find(|m| m.peer_addr == *peer_addr && m.state != MemberState::Removed) {
                return Ok(ClusterReply::Refused(format!("node {} already listens on {peer_addr}", taken.id)));
            }
            let id = NodeId(members.iter().map(|m| m.id.0).max().unwrap_or(0) + 1);
            kv.put(&nonce_key, Vec::new());
            put_member(kv, &MemberRecord { id, peer_addr: *peer_addr, state: MemberState::Active })?;
            Ok(ClusterReply::Joined(id))
        }
        ClusterCommand::SetState { node, state } => {
            let Some(mut record) = members.into_iter().find(|m| m.id == *node) else {
                return Ok(ClusterReply::Refused(format!("node {node} is not a member")));
            };
            if record.state == MemberState::Removed && *state != MemberState::Removed {
                return Ok(ClusterReply::Refused(format!("node {node} was removed; a removed node cannot come back")));
            }
            record.state = *state;
            put_member(kv, &record)?;
            Ok(ClusterReply::Done)
        }
        ClusterCommand::Placed { shard, replicas } => {
            let bytes = hamgam_proto::codec::encode(replicas).map_err(|e| corrupt("placement", e))?;
            kv.put(&placed_key(*shard), bytes);
            Ok(ClusterReply::Done)
        }
        ClusterCommand::ClientAddr { node, addr } => {
            if !members.iter().any(|m| m.id == *node && m.state != MemberState::Removed) {
                return Ok(ClusterReply::Refused(format!("node {node} is not a member")));
            }
            let bytes = hamgam_proto::codec::encode(addr).map_err(|e| corrupt("client address", e))?;
            kv.put(&client_addr_key(*node), bytes);
            Ok(ClusterReply::Done)
        }
    }
}

/// What every node knows from shard 0, published after each change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub members: Vec<MemberRecord>,
    pub placement: BTreeMap<ShardId, Vec<NodeId>>,
    /// Where members serve clients (those that recorded it).
    pub client_addrs: BTreeMap<NodeId, SocketAddr>,
}

impl ClusterView {
    /// Reads the view from shard 0's applied state.
    pub fn read(shard0: &ShardReader, shards: usize) -> Result<ClusterView, StorageError> {
        Ok(ClusterView {
            members: read_members(shard0)?,
            placement: read_placement(shard0, shards)?,
            client_addrs: read_client_addrs(shard0)?,
        })
    }

    pub fn member(&self, node: NodeId) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.id == node)
    }

    /// Members that are not removed, with the addresses they serve clients on.
    pub fn client_routes(&self) -> BTreeMap<NodeId, SocketAddr> {
        let reachable = self.reachable();
        self.client_addrs.iter().filter(|(node, _)| reachable.contains_key(node)).map(|(n, a)| (*n, *a)).collect()
    }

    /// Members recorded as removed.
    pub fn removed(&self) -> Vec<NodeId> {
        self.members.iter().filter(|m| m.state == MemberState::Removed).map(|m| m.id).collect()
    }

    /// Members that are not removed, with their peer addresses.
    pub fn reachable(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.members.iter().filter(|m| m.state != MemberState::Removed).map(|m| (m.id, m.peer_addr)).collect()
    }
}

/// The state machine of every shard of a clustered node: shard 0 here, the
/// rest in `data`.
pub struct ClusterMachine {
    data: Box<dyn StateMachine>,
    shard0: ShardReader,
    shards: usize,
    view: watch::Sender<ClusterView>,
    changed: bool,
}

impl ClusterMachine {
    /// `shards` counts every shard, shard 0 included. Returns the machine and
    /// the view it keeps current (read from `shard0` now, then after every
    /// round that changed it).
    pub fn new(
        data: Box<dyn StateMachine>,
        shard0: ShardReader,
        shards: usize,
    ) -> Result<(ClusterMachine, watch::Receiver<ClusterView>), StorageError> {
        let (view, watcher) = watch::channel(ClusterView::read(&shard0, shards)?);
        Ok((ClusterMachine { data, shard0, shards, view, changed: false }, watcher))
    }
}

impl ClusterMachine {
    /// Reads shard 0 (its writes are visible by now) and tells the watchers if it changed.
    fn publish(&self) {
        match ClusterView::read(&self.shard0, self.shards) {
            Ok(view) => {
                self.view.send_if_modified(|current| {
                    let modified = *current != view;
                    *current = view;
                    modified
                });
            }
            Err(error) => tracing::error!(%error, "cannot read the cluster shard after a change"),
        }
    }
}

impl StateMachine for ClusterMachine {
    fn apply(
        &mut self,
        shard: ShardId,
        index: u64,
        command: &[u8],
        kv: &mut ShardWriter<'_, '_>,
    ) -> Result<Vec<u8>, StorageError> {
        if shard != ShardId::CLUSTER {
            return self.data.apply(shard, index, command, kv);
        }
        let reply = match hamgam_proto::codec::decode::<ClusterCommand>(command) {
            Ok(command) => {
                self.changed = true;
                apply_cluster(&command, kv)?
            }
            Err(error) => ClusterReply::Refused(format!("not a cluster command: {error}")),
        };
        hamgam_proto::codec::encode(&reply).map_err(|e| corrupt("reply", e))
    }

    fn after_round(&mut self) {
        self.data.after_round();
        if std::mem::take(&mut self.changed) {
            self.publish();
        }
    }

    fn snapshot_installed(&mut self, shard: ShardId) {
        if shard == ShardId::CLUSTER {
            self.publish();
        } else {
            self.data.snapshot_installed(shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_routed_only_to_members_that_are_not_removed() {
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let member = |id: u64, state| MemberRecord { id: NodeId(id), peer_addr: addr(7000 + id as u16), state };
        let view = ClusterView {
            members: vec![
                member(1, MemberState::Active),
                member(2, MemberState::Draining),
                member(3, MemberState::Removed),
                member(4, MemberState::Active),
            ],
            placement: BTreeMap::new(),
            // Node 4 has not recorded where it serves clients yet; node 9 is no member.
            client_addrs: [(1, 8001), (2, 8002), (3, 8003), (9, 8009)]
                .into_iter()
                .map(|(id, port)| (NodeId(id), addr(port)))
                .collect(),
        };
        let routes: Vec<(NodeId, SocketAddr)> = view.client_routes().into_iter().collect();
        assert_eq!(routes, vec![(NodeId(1), addr(8001)), (NodeId(2), addr(8002))]);
    }
}
