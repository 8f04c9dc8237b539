//! The placement driver: puts each shard's replicas on the right nodes.
//!
//! It runs on every clustered node and acts only where this node leads
//! shard 0, once a second: it asks every member for its status (the same
//! admin request operators use), plans at most one configuration change per
//! shard ([`plan`], a pure function), asks each shard's leader to make it,
//! and records each shard's replicas in shard 0 so that nodes without a
//! replica know whom to ask. It also spreads the data shards' leaders (and
//! with them the work of proposing and replicating) evenly over the members
//! ([`plan_leaders`]), asking each leader to hand over.
//!
//! Goals, in order: no replica on a removed, draining or dead member; every
//! shard at `min(3, members that keep replicas)` voters; replicas spread so
//! that no node holds two more than another. A replica moves by adding a
//! learner on the new node (it catches up, by snapshot if need be), promoting
//! it once it is within [`CATCH_UP_SLACK`] entries of the leader, then
//! removing the voter it replaces; so a shard never has fewer voters than it
//! started with. Shard 0 also has a learner on every other member, so every
//! node applies the member list and placement.
//!
//! A node removed from a shard keeps its state until the driver tells it
//! to give the replica up ([`stale_replicas`]), which it does only when the
//! shard's leader no longer counts the node and no change to the shard is
//! under way: raft assumes a replica never loses log it acknowledged.
//!
//! A member that did not answer for `dead_after` counts as dead: its
//! replicas are rebuilt elsewhere. The clock starts when this node took
//! shard 0's lead, so a new driver never judges on what it did not see.

use crate::PeerNetwork;
use crate::admin::{AdminClient, AdminError, AdminRequest, NodeStatus};
use crate::join::propose_cluster;
use crate::membership::{ClusterCommand, ClusterView, MemberRecord, MemberState};
use hamgam_raftstore::{RaftHandle, ReplicaChange};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, ShardId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A learner this close to the leader's last index is promoted.
pub const CATCH_UP_SLACK: u64 = 100;
/// New replicas started per pass to even out the spread (each costs a snapshot).
const BALANCING_MOVES_PER_PASS: usize = 4;
/// Changes made per pass, all reasons together.
const CHANGES_PER_PASS: usize = 16;
/// Former replicas given up per pass (each deletes a shard's data on a node).
const RELEASES_PER_PASS: usize = 8;
/// How long a pass waits for a member's status. A member that is down
/// would otherwise hold every pass for the whole connection timeout; one
/// that answers late counts as not up for this pass only (it keeps its
/// replicas; only `dead_after` of silence moves them).
const STATUS_WAIT: Duration = Duration::from_millis(1500);
/// Leaders handed over per pass (each pauses that shard's writes for a
/// moment: proposals made during a hand-over are refused and retried).
const LEADER_MOVES_PER_PASS: usize = 8;

#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Voters per shard where the cluster has that many members.
    pub replicas: usize,
    /// How long a member may be unreachable before its replicas are rebuilt elsewhere.
    pub dead_after: Duration,
    pub interval: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { replicas: 3, dead_after: Duration::from_secs(600), interval: Duration::from_secs(1) }
    }
}

/// One shard as its leader reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplicas {
    pub shard: ShardId,
    pub leader: NodeId,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub matched: BTreeMap<NodeId, u64>,
    /// The commit index each replica has told the leader it knows.
    pub known_committed: BTreeMap<NodeId, u64>,
    pub last_index: u64,
}

impl ShardReplicas {
    fn hosts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }

    fn caught_up(&self, node: NodeId) -> bool {
        self.matched.get(&node).is_some_and(|m| *m > 0 && m + CATCH_UP_SLACK >= self.last_index)
    }

    /// Every replica, sorted: what shard 0 records.
    pub fn replicas(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self.voters.iter().chain(&self.learners).copied().collect();
        all.sort();
        all
    }
}

/// What the planner knows of each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub state: MemberState,
    /// Answered this pass.
    pub up: bool,
    /// Unreachable for longer than the configured time.
    pub dead: bool,
}

impl Standing {
    /// May keep the replicas it has.
    fn keeps(&self) -> bool {
        self.state == MemberState::Active && !self.dead
    }

    /// May be given a new replica now.
    fn takes_new(&self) -> bool {
        self.keeps() && self.up
    }
}

/// One change to make: at `leader`, on `shard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChange {
    pub shard: ShardId,
    pub leader: NodeId,
    pub change: ReplicaChange,
}

/// Plans at most one change per shard toward the goals in the module's
/// documentation. Deterministic for the same inputs.
pub fn plan(members: &BTreeMap<NodeId, Standing>, shards: &[ShardReplicas], replicas: usize) -> Vec<PlannedChange> {
    let standing = |node: &NodeId| members.get(node).copied();
    let keeps = |node: &NodeId| standing(node).is_some_and(|s| s.keeps());
    let target = replicas.min(members.values().filter(|s| s.keeps()).count());
    if target == 0 {
        return Vec::new();
    }
    // Data replicas per node (shard 0 is on every node and does not count).
    let mut load: BTreeMap<NodeId, i64> = members.keys().map(|n| (*n, 0)).collect();
    for shard in shards.iter().filter(|s| s.shard != ShardId::CLUSTER) {
        for node in shard.voters.iter().chain(&shard.learners) {
            *load.entry(*node).or_default() += 1;
        }
    }
    let least_loaded = |load: &BTreeMap<NodeId, i64>, shard: &ShardReplicas| {
        members
            .iter()
            .filter(|(node, s)| s.takes_new() && !shard.hosts(**node))
            .min_by_key(|(node, _)| (load.get(*node).copied().unwrap_or(0), **node))
            .map(|(node, _)| *node)
    };
    let mut changes = Vec::new();
    let mut balancing_moves = 0;
    for shard in shards {
        if changes.len() >= CHANGES_PER_PASS {
            break;
        }
        let change = |change| PlannedChange { shard: shard.shard, leader: shard.leader, change };
        let kept_voters = shard.voters.iter().filter(|v| keeps(v)).count();
        if shard.shard == ShardId::CLUSTER {
            // A removed member keeps its learner until it holds every entry
            // and has told the leader it knows them committed, so it applies
            // its own removal and stops: holding the entry is not enough,
            // for once its learner is gone no one tells it the entry is
            // committed. One that is dead goes at once, as does anything no
            // longer a member.
            let gone = |node: &NodeId| match standing(node) {
                None => true,
                Some(s) if s.dead => true,
                Some(s) if s.state == MemberState::Removed => {
                    shard.known_committed.get(node) == Some(&shard.last_index)
                }
                Some(_) => false,
            };
            let planned = if let Some(gone) = shard.learners.iter().find(|n| gone(n)) {
                Some(ReplicaChange::Remove(*gone))
            } else if kept_voters < target {
                shard.learners.iter().find(|n| keeps(n) && shard.caught_up(**n)).map(|n| ReplicaChange::AddVoter(*n))
            } else if shard.voters.len() > target {
                let leaving = shard.voters.iter().rev().find(|v| !keeps(v)).or(shard.voters.iter().max());
                leaving.map(|v| ReplicaChange::Remove(*v))
            } else {
                members
                    .iter()
                    .find(|(node, s)| s.state != MemberState::Removed && !s.dead && s.up && !shard.hosts(**node))
                    .map(|(node, _)| ReplicaChange::AddLearner(*node))
            };
            changes.extend(planned.map(change));
            continue;
        }
        if let Some(gone) = shard.learners.iter().find(|n| !keeps(n)) {
            changes.push(change(ReplicaChange::Remove(*gone)));
            continue;
        }
        if let Some(ready) = shard.learners.iter().find(|n| shard.caught_up(**n)) {
            changes.push(change(ReplicaChange::AddVoter(*ready)));
            continue;
        }
        if !shard.learners.is_empty() {
            continue; // still catching up
        }
        if kept_voters < target {
            if let Some(node) = least_loaded(&load, shard) {
                *load.entry(node).or_default() += 1;
                changes.push(change(ReplicaChange::AddLearner(node)));
            }
            continue;
        }
        if shard.voters.len() > target {
            let leaving = shard
                .voters
                .iter()
                .find(|v| !keeps(v))
                .or_else(|| shard.voters.iter().max_by_key(|v| (load.get(*v).copied().unwrap_or(0), **v)));
            if let Some(voter) = leaving {
                *load.entry(*voter).or_default() -= 1;
                changes.push(change(ReplicaChange::Remove(*voter)));
            }
            continue;
        }
        if balancing_moves < BALANCING_MOVES_PER_PASS {
            let busiest = shard.voters.iter().max_by_key(|v| (load.get(*v).copied().unwrap_or(0), **v)).copied();
            let idlest = least_loaded(&load, shard);
            if let (Some(from), Some(to)) = (busiest, idlest)
                && load[&from] > load.get(&to).copied().unwrap_or(0) + 1
            {
                // The voter leaves once the learner is promoted (the shard
                // then has one voter too many and sheds the busiest).
                *load.entry(to).or_default() += 1;
                *load.entry(from).or_default() -= 1;
                balancing_moves += 1;
                changes.push(change(ReplicaChange::AddLearner(to)));
            }
        }
    }
    changes
}

/// One hand-over of a shard's lead, asked of its current leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderMove {
    pub shard: ShardId,
    pub from: NodeId,
    pub to: NodeId,
}

/// Plans hand-overs that spread the leaders of the data shards over the
/// members that may take new work (active and answering): first away from
/// members that may not (draining ones), then, repeatedly, from a member
/// leading the most to one leading at least two fewer, directly when they
/// share a shard, else along the shortest chain of hand-overs. Each step
/// lowers the sum of the squared leader counts, so repeated passes settle
/// and never swing back and forth. Only voters close to the leader's log
/// take over; shards in `busy` (changing replicas this pass) and shard 0
/// (whose leader runs this driver) stay.
/// A preference per shard fixed in advance (say voter `shard mod 3`)
/// cannot do this: with more than three members, which voters a shard has
/// decides how many shards each member is preferred for. Deterministic.
pub fn plan_leaders(
    members: &BTreeMap<NodeId, Standing>,
    shards: &[ShardReplicas],
    busy: &[ShardId],
) -> Vec<LeaderMove> {
    let may_lead = |node: &NodeId| members.get(node).is_some_and(|s| s.takes_new());
    let data = || shards.iter().filter(|s| s.shard != ShardId::CLUSTER);
    let mut led: BTreeMap<NodeId, usize> = members.keys().filter(|n| may_lead(n)).map(|n| (*n, 0)).collect();
    for shard in data() {
        if let Some(count) = led.get_mut(&shard.leader) {
            *count += 1;
        }
    }
    let takers = |shard: &ShardReplicas| -> Vec<NodeId> {
        shard.voters.iter().copied().filter(|v| *v != shard.leader && may_lead(v) && shard.caught_up(*v)).collect()
    };
    let movable = |shard: &&ShardReplicas| !busy.contains(&shard.shard);
    let mut moves: Vec<LeaderMove> = Vec::new();
    for shard in data().filter(movable).filter(|s| !may_lead(&s.leader)) {
        if moves.len() >= LEADER_MOVES_PER_PASS {
            return moves;
        }
        if let Some(to) = takers(shard).into_iter().min_by_key(|v| (led[v], *v)) {
            *led.entry(to).or_default() += 1;
            moves.push(LeaderMove { shard: shard.shard, from: shard.leader, to });
        }
    }
    // Even out: a chain of hand-overs from a member leading the most to
    // one leading at least two fewer (the shortest chain; members between
    // give one lead and take one, so only the ends change).
    while moves.len() < LEADER_MOVES_PER_PASS {
        let Some(most) = led.values().max().copied() else { break };
        let mut queue: VecDeque<NodeId> = led.iter().filter(|(_, n)| **n == most).map(|(node, _)| *node).collect();
        let mut reached: BTreeMap<NodeId, Option<(NodeId, ShardId)>> = queue.iter().map(|n| (*n, None)).collect();
        let mut end = None;
        while let Some(node) = queue.pop_front() {
            if led[&node] + 2 <= most {
                end = Some(node);
                break;
            }
            let led_here =
                data().filter(movable).filter(|s| s.leader == node && !moves.iter().any(|m| m.shard == s.shard));
            for shard in led_here {
                for to in takers(shard) {
                    if let std::collections::btree_map::Entry::Vacant(entry) = reached.entry(to) {
                        entry.insert(Some((node, shard.shard)));
                        queue.push_back(to);
                    }
                }
            }
        }
        let Some(end) = end else { break };
        let mut chain = Vec::new();
        let mut at = end;
        while let Some(Some((from, shard))) = reached.get(&at) {
            chain.push(LeaderMove { shard: *shard, from: *from, to: at });
            at = *from;
        }
        if moves.len() + chain.len() > LEADER_MOVES_PER_PASS {
            break;
        }
        *led.entry(at).or_default() -= 1;
        *led.entry(end).or_default() += 1;
        moves.extend(chain.into_iter().rev());
    }
    moves
}

/// Each shard's report from the replica that leads it in the highest term.
pub fn leaders_reports(statuses: &HashMap<NodeId, NodeStatus>) -> Vec<ShardReplicas> {
    let mut best: BTreeMap<ShardId, (u64, ShardReplicas)> = BTreeMap::new();
    for (node, status) in statuses {
        for report in status.shards.iter().filter(|r| r.leads()) {
            if best.get(&report.shard).is_some_and(|(term, _)| *term >= report.term) {
                continue;
            }
            let replicas = ShardReplicas {
                shard: report.shard,
                leader: *node,
                voters: report.voters.clone(),
                learners: report.learners.clone(),
                matched: report.matched.iter().copied().collect(),
                known_committed: report.known_committed.iter().copied().collect(),
                last_index: report.last_index,
            };
            best.insert(report.shard, (report.term, replicas));
        }
    }
    best.into_values().map(|(_, replicas)| replicas).collect()
}

/// Runs the driver until `cancel`.
pub async fn run(
    node: NodeId,
    raft: RaftHandle,
    network: Arc<PeerNetwork>,
    identity: Arc<NodeIdentity>,
    config: DriverConfig,
    cancel: CancellationToken,
) {
    let admin = match AdminClient::new(&identity) {
        Ok(admin) => Arc::new(admin),
        Err(error) => {
            tracing::error!(%error, "the placement driver cannot ask other nodes; it does not run");
            return;
        }
    };
    let mut last_seen: HashMap<NodeId, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if raft.leader(ShardId::CLUSTER) != Some(node) {
            last_seen.clear();
            continue;
        }
        let Some(view) = network.view().filter(|v| !v.members.is_empty()) else { continue };
        let statuses = gather(&admin, &view.members).await;
        let now = Instant::now();
        let mut members = BTreeMap::new();
        for member in &view.members {
            let up = statuses.contains_key(&member.id);
            let seen = last_seen.entry(member.id).or_insert(now);
            if up {
                *seen = now;
            }
            // Removed members are not asked (their peers refuse them), so
            // they count as dead once `dead_after` has passed since removal.
            let dead = now.duration_since(*seen) > config.dead_after;
            members.insert(member.id, Standing { state: member.state, up, dead });
        }
        let shards = leaders_reports(&statuses);
        let addrs: HashMap<NodeId, SocketAddr> = view.members.iter().map(|m| (m.id, m.peer_addr)).collect();
        let planned_changes = plan(&members, &shards, config.replicas);
        let changing: Vec<ShardId> = planned_changes.iter().map(|c| c.shard).collect();
        let leader_moves = plan_leaders(&members, &shards, &changing);
        tracing::debug!(
            ?members,
            shards = shards.len(),
            changes = planned_changes.len(),
            leader_moves = leader_moves.len(),
            "placement pass"
        );
        let stale = stale_replicas(&statuses, &shards, &planned_changes);
        for planned in planned_changes {
            if cancel.is_cancelled() {
                return;
            }
            match change(&admin, &addrs, planned).await {
                Ok(()) => tracing::info!(shard = %planned.shard, change = ?planned.change, "replicas changed"),
                Err(error) => tracing::debug!(shard = %planned.shard, change = ?planned.change, %error, "a replica change did not happen; next pass"),
            }
        }
        for planned in leader_moves {
            let Some(addr) = addrs.get(&planned.from).copied() else { continue };
            let request = AdminRequest::TransferLeader { shard: planned.shard, to: planned.to };
            match admin.command(addr, &request).await {
                Ok(()) => {
                    tracing::debug!(shard = %planned.shard, from = %planned.from, to = %planned.to, "leadership handed over")
                }
                Err(error) => {
                    tracing::debug!(shard = %planned.shard, to = %planned.to, %error, "a leadership hand-over did not start; next pass")
                }
            }
        }
        for (node, shard) in stale {
            let Some(addr) = addrs.get(&node).copied() else { continue };
            match admin.command(addr, &AdminRequest::ReleaseReplica { shard }).await {
                Ok(()) => tracing::info!(%node, %shard, "a former replica was given up"),
                Err(error) => tracing::debug!(%node, %shard, %error, "a former replica was not given up; next pass"),
            }
        }
        record_placement(&raft, &view, &shards).await;
    }
}

/// Former replicas to give up: a node still holding state of a shard whose
/// leader counts it neither voter nor learner. Shards this pass changes are
/// left for the next one, so no replica is given up while it is re-added.
pub fn stale_replicas(
    statuses: &HashMap<NodeId, NodeStatus>,
    shards: &[ShardReplicas],
    changes: &[PlannedChange],
) -> Vec<(NodeId, ShardId)> {
    let mut stale = Vec::new();
    for shard in shards {
        if changes.iter().any(|c| c.shard == shard.shard) {
            continue;
        }
        for (node, status) in statuses {
            let holds_state = status.shards.iter().any(|r| r.shard == shard.shard && r.last_index > 0);
            if holds_state && !shard.hosts(*node) {
                stale.push((*node, shard.shard));
            }
        }
    }
    stale.sort();
    stale.truncate(RELEASES_PER_PASS);
    stale
}

/// Every non-removed member's status; members that do not answer within
/// [`STATUS_WAIT`] are left out.
async fn gather(admin: &Arc<AdminClient>, members: &[MemberRecord]) -> HashMap<NodeId, NodeStatus> {
    let mut asks = tokio::task::JoinSet::new();
    for member in members.iter().filter(|m| m.state != MemberState::Removed) {
        let (admin, id, addr) = (admin.clone(), member.id, member.peer_addr);
        asks.spawn(async move {
            let status = tokio::time::timeout(STATUS_WAIT, admin.node_status(addr)).await;
            (id, status.unwrap_or_else(|_| Err(AdminError::Unreachable { addr, reason: "no answer in time".into() })))
        });
    }
    let mut statuses = HashMap::new();
    while let Some(answer) = asks.join_next().await {
        if let Ok((id, Ok(status))) = answer {
            statuses.insert(id, status);
        }
    }
    statuses
}

/// Makes one change at the shard's leader. A leader asked to remove itself
/// hands leadership over and names its successor: ask there, briefly.
async fn change(
    admin: &AdminClient,
    addrs: &HashMap<NodeId, SocketAddr>,
    planned: PlannedChange,
) -> Result<(), AdminError> {
    let request = AdminRequest::ChangeReplicas { shard: planned.shard, change: planned.change };
    let mut at = planned.leader;
    for _ in 0..20 {
        let Some(addr) = addrs.get(&at).copied() else { break };
        match admin.command(addr, &request).await {
            Err(AdminError::NotLeader { leader: Some(next), .. }) => {
                at = next;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
    Err(AdminError::Refused { addr: addrs.get(&at).copied().unwrap_or(([0, 0, 0, 0], 0).into()), reason: "the shard's leadership kept moving".into() })
}

/// Records in shard 0 each shard's replicas where the record differs.
async fn record_placement(raft: &RaftHandle, view: &ClusterView, shards: &[ShardReplicas]) {
    for shard in shards {
        let replicas = shard.replicas();
        if view.placement.get(&shard.shard) == Some(&replicas) {
            continue;
        }
        let command = ClusterCommand::Placed { shard: shard.shard, replicas };
        if let Err(reason) = propose_cluster(raft, &command).await {
            tracing::debug!(shard = %shard.shard, %reason, "could not record a shard's replicas");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(ids: &[u64]) -> BTreeMap<NodeId, Standing> {
        ids.iter().map(|id| (NodeId(*id), Standing { state: MemberState::Active, up: true, dead: false })).collect()
    }

    fn shard(id: u32, voters: &[u64], learners: &[u64]) -> ShardReplicas {
        let all: Vec<u64> = voters.iter().chain(learners).copied().collect();
        ShardReplicas {
            shard: ShardId(id),
            leader: NodeId(voters[0]),
            voters: voters.iter().copied().map(NodeId).collect(),
            learners: learners.iter().copied().map(NodeId).collect(),
            matched: all.iter().map(|n| (NodeId(*n), 1_000)).collect(),
            known_committed: all.iter().map(|n| (NodeId(*n), 1_000)).collect(),
            last_index: 1_000,
        }
    }

    /// Applies planned changes the way raft would (learners promoted at
    /// once), for up to `passes` passes; returns the shards.
    fn converge(members: &BTreeMap<NodeId, Standing>, mut shards: Vec<ShardReplicas>, passes: usize) -> Vec<ShardReplicas> {
        for _ in 0..passes {
            let changes = plan(members, &shards, 3);
            if changes.is_empty() {
                break;
            }
            for planned in changes {
                let shard = shards.iter_mut().find(|s| s.shard == planned.shard).unwrap();
                match planned.change {
                    ReplicaChange::AddLearner(n) => {
                        shard.learners.push(n);
                        shard.matched.insert(n, shard.last_index);
                    }
                    ReplicaChange::AddVoter(n) => {
                        shard.learners.retain(|l| *l != n);
                        shard.voters.push(n);
                    }
                    ReplicaChange::Remove(n) => {
                        shard.voters.retain(|v| *v != n);
                        shard.learners.retain(|l| *l != n);
                        if shard.leader == n {
                            shard.leader = shard.voters[0];
                        }
                    }
                }
            }
        }
        shards
    }

    fn loads(shards: &[ShardReplicas]) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for shard in shards.iter().filter(|s| s.shard != ShardId::CLUSTER) {
            assert!(shard.learners.is_empty(), "{shard:?}");
            for voter in &shard.voters {
                *load.entry(*voter).or_default() += 1;
            }
        }
        load
    }

    #[test]
    fn a_balanced_cluster_is_left_alone() {
        let shards: Vec<_> = (0..=8).map(|s| shard(s, &[1, 2, 3], &[])).collect();
        assert!(plan(&active(&[1, 2, 3]), &shards, 3).is_empty());
    }

    #[test]
    fn new_members_receive_replicas_until_the_spread_is_even_and_every_shard_keeps_three() {
        let shards: Vec<_> = (0..=64).map(|s| shard(s, &[1, 2, 3], &[])).collect();
        let members = active(&[1, 2, 3, 4, 5]);
        let shards = converge(&members, shards, 500);
        let load = loads(&shards);
        assert_eq!(load.len(), 5, "{load:?}");
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        assert!(shards.iter().filter(|s| s.shard != ShardId::CLUSTER).all(|s| s.voters.len() == 3));
        let cluster = &shards[0];
        assert_eq!(cluster.voters.len(), 3);
        assert_eq!(cluster.learners.len(), 2, "shard 0 reaches every member");
    }

    #[test]
    fn draining_and_dead_members_lose_every_replica_without_a_shard_going_below_its_target() {
        let mut members = active(&[1, 2, 3, 4, 5]);
        let shards: Vec<_> = (0..=64).map(|s| shard(s, &[1, 2, 3], &[])).collect();
        let shards = converge(&members, shards, 500);
        members.get_mut(&NodeId(4)).unwrap().state = MemberState::Draining;
        members.insert(NodeId(5), Standing { state: MemberState::Active, up: false, dead: true });
        let shards = converge(&members, shards, 500);
        let load = loads(&shards);
        assert_eq!(load.keys().copied().collect::<Vec<_>>(), vec![NodeId(1), NodeId(2), NodeId(3)], "{load:?}");
        assert!(shards.iter().all(|s| s.voters.len() == 3));
        assert!(shards[0].learners.iter().all(|n| *n == NodeId(4)), "a draining member still follows shard 0");
    }

    #[test]
    fn only_state_the_leader_no_longer_counts_is_given_up_and_not_while_the_shard_changes() {
        let report = |shard: u32, last_index: u64| hamgam_raftstore::ShardStatus {
            shard: ShardId(shard),
            role: hamgam_raftstore::ReplicaRole::Follower,
            leader: None,
            term: 1,
            voters: Vec::new(),
            learners: Vec::new(),
            last_index,
            committed: last_index,
            applied: last_index,
            matched: Vec::new(),
            known_committed: Vec::new(),
        };
        let status = |node: u64, shards: Vec<hamgam_raftstore::ShardStatus>| NodeStatus { node: NodeId(node), members: Vec::new(), shards };
        let statuses: HashMap<NodeId, NodeStatus> = [
            (NodeId(1), status(1, vec![report(1, 50), report(2, 50)])),
            // Node 4 still holds state of shard 1 (removed) and of shard 2 (a learner now).
            (NodeId(4), status(4, vec![report(1, 40), report(2, 10), report(3, 0)])),
        ]
        .into();
        let shards = vec![shard(1, &[1, 2, 3], &[]), shard(2, &[1, 2, 3], &[4]), shard(3, &[1, 2, 3], &[])];
        assert_eq!(stale_replicas(&statuses, &shards, &[]), vec![(NodeId(4), ShardId(1))]);
        let readding = PlannedChange { shard: ShardId(1), leader: NodeId(1), change: ReplicaChange::AddLearner(NodeId(4)) };
        assert!(stale_replicas(&statuses, &shards, &[readding]).is_empty());
    }

    #[test]
    fn a_removed_member_keeps_its_shard_0_learner_until_it_knows_its_removal_committed_or_is_dead() {
        let mut members = active(&[1, 2, 3]);
        let removed = Standing { state: MemberState::Removed, up: false, dead: false };
        members.insert(NodeId(4), removed);
        let mut cluster = shard(0, &[1, 2, 3], &[4]);
        cluster.matched.insert(NodeId(4), cluster.last_index - 1);
        cluster.known_committed.insert(NodeId(4), cluster.last_index - 1);
        let removes_four = |members: &BTreeMap<NodeId, Standing>, cluster: &ShardReplicas| {
            plan(members, std::slice::from_ref(cluster), 3).contains(&PlannedChange {
                shard: ShardId::CLUSTER,
                leader: NodeId(1),
                change: ReplicaChange::Remove(NodeId(4)),
            })
        };
        assert!(!removes_four(&members, &cluster), "behind: it has not received its removal yet");
        cluster.matched.insert(NodeId(4), cluster.last_index);
        assert!(!removes_four(&members, &cluster), "it holds its removal but does not know it committed");
        cluster.known_committed.insert(NodeId(4), cluster.last_index);
        assert!(removes_four(&members, &cluster), "it knows every entry committed, its removal too");
        cluster.matched.insert(NodeId(4), 0);
        cluster.known_committed.insert(NodeId(4), 0);
        members.insert(NodeId(4), Standing { dead: true, ..removed });
        assert!(removes_four(&members, &cluster), "dead: no waiting");
    }

    #[test]
    fn an_unreachable_member_keeps_its_replicas_until_it_counts_as_dead() {
        let mut members = active(&[1, 2, 3, 4]);
        members.insert(NodeId(3), Standing { state: MemberState::Active, up: false, dead: false });
        let shards: Vec<_> = (1..=8).map(|s| shard(s, &[1, 2, 3], &[])).collect();
        let changes = plan(&members, &shards, 3);
        assert!(changes.iter().all(|c| c.change != ReplicaChange::Remove(NodeId(3))), "{changes:?}");
        assert!(changes.iter().all(|c| c.change != ReplicaChange::AddLearner(NodeId(3))));
    }

    /// Applies leader hand-overs as raft would, pass after pass, until the
    /// planner has nothing left; returns the shards and the passes taken.
    fn settle_leaders(
        members: &BTreeMap<NodeId, Standing>,
        mut shards: Vec<ShardReplicas>,
    ) -> (Vec<ShardReplicas>, usize) {
        for pass in 0..64 {
            let moves = plan_leaders(members, &shards, &[]);
            if moves.is_empty() {
                return (shards, pass);
            }
            for planned in moves {
                let shard = shards.iter_mut().find(|s| s.shard == planned.shard).unwrap();
                assert_eq!(shard.leader, planned.from);
                assert!(shard.voters.contains(&planned.to), "{planned:?} to a non-voter");
                shard.leader = planned.to;
            }
        }
        panic!("leader hand-overs did not settle in 64 passes");
    }

    fn led(shards: &[ShardReplicas]) -> BTreeMap<NodeId, usize> {
        let mut led = BTreeMap::new();
        for shard in shards.iter().filter(|s| s.shard != ShardId::CLUSTER) {
            *led.entry(shard.leader).or_default() += 1;
        }
        led
    }

    #[test]
    fn leaders_spread_evenly_after_growing_from_three_members_to_five() {
        // The replicas as the placement planner spreads them over five
        // members; every shard first led by its lowest voter (5 members,
        // 64 data shards: 12 or 13 each).
        let members = active(&[1, 2, 3, 4, 5]);
        let grown = converge(&members, (0..=64).map(|s| shard(s, &[1, 2, 3], &[])).collect(), 100);
        let lowest_first: Vec<ShardReplicas> = grown
            .into_iter()
            .map(|mut s| {
                s.leader = *s.voters.iter().min().unwrap();
                s
            })
            .collect();
        let before = led(&lowest_first);
        let (settled, passes) = settle_leaders(&members, lowest_first);
        let after = led(&settled);
        assert_eq!(after.len(), 5, "every member leads some shards: {after:?} (before: {before:?})");
        let (min, max) = (after.values().min().unwrap(), after.values().max().unwrap());
        assert!(max - min <= 1, "leaders per member {after:?} (before: {before:?})");
        assert!(passes <= 8, "{passes} passes");
        assert_eq!(settled.iter().find(|s| s.shard == ShardId::CLUSTER).unwrap().leader, NodeId(1), "shard 0 stays");
    }

    #[test]
    fn a_spread_of_leaders_is_left_alone() {
        let shards: Vec<_> = (1..=9)
            .map(|s| {
                let mut one = shard(s, &[1, 2, 3], &[]);
                one.leader = NodeId(u64::from(s % 3) + 1);
                one
            })
            .collect();
        assert!(plan_leaders(&active(&[1, 2, 3]), &shards, &[]).is_empty());
    }

    #[test]
    fn a_draining_member_hands_over_every_lead_and_only_to_voters_that_keep_up() {
        let mut members = active(&[1, 2, 3, 4]);
        members.insert(NodeId(1), Standing { state: MemberState::Draining, up: true, dead: false });
        let mut shards: Vec<_> = (1..=6).map(|s| shard(s, &[1, 2, 3], &[])).collect();
        // Voter 2 of shard 1 is far behind: only 3 may take that one over.
        shards[0].matched.insert(NodeId(2), 10);
        let moves = plan_leaders(&members, &shards, &[ShardId(6)]);
        let moved: Vec<ShardId> = moves.iter().map(|m| m.shard).collect();
        assert_eq!(moved, (1..=5).map(ShardId).collect::<Vec<_>>(), "shard 6 changes replicas this pass: {moves:?}");
        assert!(moves.iter().all(|m| m.from == NodeId(1) && m.to != NodeId(4)), "{moves:?}");
        assert_eq!(moves[0].to, NodeId(3));
        let to_two = moves.iter().filter(|m| m.to == NodeId(2)).count();
        assert!((2..=3).contains(&to_two), "the leads are shared between 2 and 3: {moves:?}");
    }
}
