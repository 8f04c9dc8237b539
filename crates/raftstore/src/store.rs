//! The store loop: one thread owns every shard's raft node on this node.
//!
//! A pass of the loop:
//! 1. takes up to [`limits::STORE_INPUTS_PER_PASS_MAX`] inputs from the queue
//!    (proposals, wake-ups, checkpoint results), so ticks are never starved;
//! 2. ticks every raft node if a tick interval has passed;
//! 3. proposes each shard's gathered commands as one raft entry (a follower
//!    forwards it to the leader through raft and answers when it applies it);
//! 4. handles every shard's Ready in raft-rs's documented order: messages
//!    (handed to the [`RaftTransport`] before the local write, so followers
//!    write in parallel with the leader), snapshot, committed entries, new
//!    entries, hard state; then one WAL record and one fdatasync for all
//!    shards; then persisted messages, read states, and `advance` with its
//!    light ready;
//! 5. hands the pass's committed entries, with the proposers waiting for
//!    them, to the apply thread ([`crate::apply`]): those the Ready reports
//!    before the WAL write (durable already), those the light ready commits
//!    after it. The apply thread answers each proposer once the command is
//!    in the database: an answer means the command is durable (WAL) and
//!    visible (database);
//! 6. starts a checkpoint (off the loop, in its own thread) when enough WAL
//!    has accumulated; when it reports back, WAL segments behind it go.

use crate::apply::{
    ApplyInput, ApplyProgress, ApplyState, ApplyTask, Applier, Reply, read_applied, resume_install, write_applied,
};
use crate::snapshot::{self, IncomingSnapshot, OutgoingSnapshot, SnapshotError, SnapshotRef};
use crate::log::ShardLog;
use crate::wal::{ShardWrite, Wal};
use crate::{ProposalForwarder, ProposeError, RaftTransport, RemoteRead, RemoteReadAnswer, ShardReader, StateMachine, StoreError, shard_reader};
use raft::SnapshotStatus;
use hamgam_storage::{Db, KeyRange, KvRead, Order, StorageError, Txn};
use hamgam_types::{NodeId, ShardId, limits};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType};
use raft::{ProgressState, RawNode, Ready, StateRole};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Rounds of committed entries waiting for the apply thread; beyond this the
/// store loop waits, which pushes back on proposers.
const APPLY_QUEUE_ROUNDS_MAX: usize = 64;

/// How far behind the leader's last entry a voter may be and still be
/// handed the lead: raft sends it the rest before the hand-over.
const LEADER_TRANSFER_SLACK: u64 = 100;

/// Where a new shard's initial replicas start their logs.
const BOOTSTRAP_INDEX: u64 = 1;

/// How a store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub node: NodeId,
    /// The store's directory: the WAL in `wal/`, snapshot files in `snapshots/`.
    pub dir: PathBuf,
    /// Shards this node hosts, each with the voters it starts with when it
    /// has no state yet (every replica of a new shard must be given the same
    /// list). A shard with state keeps the configuration it has. An empty
    /// list makes a replica that waits to be added: it has nothing until a
    /// leader that added it sends a snapshot.
    pub shards: BTreeMap<ShardId, Vec<NodeId>>,
}

impl StoreConfig {
    /// A store whose every shard has this node as its only voter.
    pub fn single_node(node: NodeId, dir: PathBuf, shards: impl IntoIterator<Item = ShardId>) -> StoreConfig {
        StoreConfig { node, dir, shards: shards.into_iter().map(|s| (s, vec![node])).collect() }
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.dir.join("wal")
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
}

/// The database view of a shard hosted elsewhere: reads go to a replica
/// there; writes are refused (only the apply thread writes, and only to
/// hosted shards).
#[derive(Debug)]
struct RemoteShard {
    shard: ShardId,
    raft: RaftHandle,
}

impl RemoteShard {
    fn ask(&self, read: RemoteRead) -> Result<RemoteReadAnswer, StorageError> {
        let raft = self.raft.clone();
        let shard = self.shard;
        let asked = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move { raft.read_remote(shard, read).await })
        });
        asked.map_err(|error| StorageError::Unreachable(format!("shard {shard} is hosted elsewhere and could not be read: {error}")))
    }
}

impl hamgam_storage::KvRead for RemoteShard {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.ask(RemoteRead::Get(key.to_vec()))? {
            RemoteReadAnswer::Value(value) => Ok(value),
            RemoteReadAnswer::Pairs(_) => Err(StorageError::Unreachable("a remote get answered with pairs".into())),
        }
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<hamgam_storage::KvPairs, StorageError> {
        let read = RemoteRead::Scan {
            start: range.start.clone(),
            end: range.end.clone(),
            descending: order == Order::Descending,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        match self.ask(read)? {
            RemoteReadAnswer::Pairs(pairs) => Ok(pairs),
            RemoteReadAnswer::Value(_) => Err(StorageError::Unreachable("a remote scan answered with a value".into())),
        }
    }
}

impl Db for RemoteShard {
    fn write(&self, _batch: &hamgam_storage::WriteBatch) -> Result<(), StorageError> {
        Err(StorageError::Unreachable(format!("shard {} is hosted elsewhere: not writable here", self.shard)))
    }

    fn persist(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Answers a fresh-read request: `Ok` once the local applied state holds
/// everything the leader had committed when the read arrived.
type ReadReply = oneshot::Sender<Result<(), ProposeError>>;

/// One replica's view of its shard, for operators and the placement
/// driver (it travels in admin answers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub role: ReplicaRole,
    /// The leader this replica knows, if any.
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The voters of the shard's configuration.
    pub voters: Vec<NodeId>,
    /// Replicas that receive the log but do not vote.
    pub learners: Vec<NodeId>,
    pub last_index: u64,
    pub committed: u64,
    pub applied: u64,
    /// Filled on the leader only: how far each replica's log matches it.
    pub matched: Vec<(NodeId, u64)>,
    /// Filled on the leader only: the commit index each replica last told
    /// the leader it knows (in its append and heartbeat answers).
    pub known_committed: Vec<(NodeId, u64)>,
}

impl ShardStatus {
    pub fn leads(&self) -> bool {
        self.role == ReplicaRole::Leader
    }
}

/// A change to the replicas of one shard (one raft configuration change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaChange {
    /// A replica that receives the log but does not vote, while it catches up.
    AddLearner(NodeId),
    /// A voter (or a learner promoted to one).
    AddVoter(NodeId),
    Remove(NodeId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaRole {
    Leader,
    Candidate,
    Follower,
}

/// Counters for operators and benchmarks; cheap to read at any time.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub passes: AtomicU64,
    pub wal_rounds: AtomicU64,
    pub entries_applied: AtomicU64,
    pub commands_applied: AtomicU64,
    pub checkpoints: AtomicU64,
    pub wal_segments_released: AtomicU64,
    /// Database batches written by the apply thread, and keys in them.
    pub apply_batches: AtomicU64,
    pub keys_written: AtomicU64,
    /// Snapshots made for followers, and installed from a leader.
    pub snapshots_made: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

enum Input {
    Propose { shard: ShardId, command: Vec<u8>, reply: Reply },
    /// A raft message from another node.
    Step { shard: ShardId, message: Message },
    /// Whether a snapshot sent to `to` arrived.
    SnapshotSent { shard: ShardId, to: NodeId, delivered: bool },
    ReadIndex { shard: ShardId, reply: ReadReply },
    ChangeReplicas { shard: ShardId, change: ReplicaChange, reply: Reply },
    TransferLeader { shard: ShardId, to: NodeId, reply: oneshot::Sender<Result<bool, ProposeError>> },
    Status { reply: oneshot::Sender<Vec<ShardStatus>> },
    Release { shard: ShardId, reply: oneshot::Sender<Result<(), ProposeError>> },
    Wake,
    CheckpointDone(Result<BTreeMap<ShardId, u64>, hamgam_storage::StorageError>),
    Stop,
    /// Tests: end the loop as a crash would, with no final checkpoint.
    #[cfg(test)]
    Crash,
}

/// The running store: a handle for proposals and the loop's thread.
pub struct Store {
    handle: RaftHandle,
    thread: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Cheap to clone; every clone talks to the same store loop.
#[derive(Clone)]
pub struct RaftHandle {
    node: NodeId,
    inputs: mpsc::Sender<Input>,
    db: Arc<dyn Db>,
    leaders: Arc<BTreeMap<ShardId, AtomicU64>>,
    /// Per shard: whether this node is a replica, and whether it is the only
    /// voter (its applied state is then always fresh). See `replica_flags`.
    replicas: Arc<BTreeMap<ShardId, AtomicU8>>,
    forwarder: Arc<OnceLock<Arc<dyn ProposalForwarder>>>,
    stats: Arc<StoreStats>,
    progress: Arc<ApplyProgress>,
    running: watch::Receiver<bool>,
    snapshot_dir: Arc<PathBuf>,
}

impl std::fmt::Debug for RaftHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandle").finish_non_exhaustive()
    }
}

impl RaftHandle {
    /// Sets where proposals for shards led by other nodes go. Set once, by
    /// the cluster layer after its network is up; until then (and on a
    /// single node) every proposal is made here.
    pub fn set_forwarder(&self, forwarder: Arc<dyn ProposalForwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Proposes `command` to `shard` and waits until it is applied; returns
    /// the state machine's reply. A shard this node hosts takes it here (see
    /// [`RaftHandle::propose_here`]); any other goes through the forwarder to
    /// its leader. While the shard has
    /// no leader (an election) it retries for up to
    /// [`limits::LEADER_WAIT_MS`]: a refusal before proposing is always safe
    /// to retry. Waits for queue space (backpressure).
    pub async fn propose(&self, shard: ShardId, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let deadline = Instant::now() + Duration::from_millis(limits::LEADER_WAIT_MS);
        let mut attempt = 0usize;
        loop {
            let forwarder = self.forwarder.get();
            let result = match (self.leader_or_replica(shard, attempt), forwarder) {
                (Some(leader), Some(forwarder)) if leader != self.node && !self.hosts(shard) => {
                    forwarder.forward(leader, shard, command.clone()).await
                }
                _ => self.propose_here(shard, command.clone()).await,
            };
            attempt += 1;
            match result {
                Err(ProposeError::NotLeader { leader, .. }) if Instant::now() < deadline => {
                    if let Some(leader) = leader.filter(|_| !self.hosts(shard)) {
                        // A replica named its leader: go there next.
                        self.note_leader(shard, leader);
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 5)).await;
                }
                Err(ProposeError::NoLeader(_) | ProposeError::UnknownShard(_)) if Instant::now() < deadline => {
                    self.forget_leader(shard);
                    tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 5)).await;
                }
                Err(ProposeError::NotLeader { shard, .. }) => return Err(ProposeError::NoLeader(shard)),
                other => return other,
            }
        }
    }

    /// Whether this node is a replica (voter or learner) of `shard`.
    pub fn hosts(&self, shard: ShardId) -> bool {
        self.replicas.get(&shard).is_some_and(|flags| flags.load(Ordering::Acquire) & HOSTED != 0)
    }

    /// Where to send a request for `shard`: its leader as this node knows it;
    /// for a shard hosted elsewhere with no known leader, one of the replicas
    /// shard 0 records (taking turns over `attempt`s), which forwards or
    /// names the leader.
    fn leader_or_replica(&self, shard: ShardId, attempt: usize) -> Option<NodeId> {
        if let Some(leader) = self.leader(shard) {
            return Some(leader);
        }
        if self.hosts(shard) {
            return None;
        }
        let replicas = self.forwarder.get()?.replicas(shard);
        replicas.get(attempt % replicas.len().max(1)).copied()
    }

    /// Remembers the leader of a shard hosted elsewhere (the loop keeps the
    /// leaders of hosted shards itself).
    fn note_leader(&self, shard: ShardId, leader: NodeId) {
        if let Some(slot) = self.leaders.get(&shard) {
            slot.store(leader.0, Ordering::Relaxed);
        }
    }

    fn forget_leader(&self, shard: ShardId) {
        if !self.hosts(shard)
            && let Some(slot) = self.leaders.get(&shard)
        {
            slot.store(raft::INVALID_ID, Ordering::Relaxed);
        }
    }

    /// Reads `shard`'s state at a replica elsewhere, fresh (see
    /// [`RaftHandle::serve_remote_read`]): the leader if known, else each
    /// recorded replica in turn.
    pub async fn read_remote(&self, shard: ShardId, read: RemoteRead) -> Result<RemoteReadAnswer, ProposeError> {
        let forwarder = self.forwarder.get().ok_or(ProposeError::NoLeader(shard))?;
        let deadline = Instant::now() + Duration::from_millis(limits::LEADER_WAIT_MS);
        let mut attempt = 0usize;
        loop {
            let Some(node) = self.leader_or_replica(shard, attempt).filter(|n| *n != self.node) else {
                return Err(ProposeError::NoLeader(shard));
            };
            attempt += 1;
            match forwarder.read(node, shard, read.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(ProposeError::NotLeader { leader: Some(leader), .. }) if Instant::now() < deadline => {
                    self.note_leader(shard, leader)
                }
                Err(_) if Instant::now() < deadline => {
                    self.forget_leader(shard);
                    tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 5)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Answers another node's read of `shard`: after a ReadIndex, from this
    /// replica's applied state, only within the shard's range.
    pub async fn serve_remote_read(&self, shard: ShardId, read: RemoteRead) -> Result<RemoteReadAnswer, ProposeError> {
        if !self.hosts(shard) {
            return Err(ProposeError::NotLeader { shard, leader: self.leader(shard).filter(|l| *l != self.node) });
        }
        self.read_index(shard).await?;
        // Keys arrive whole (the asking side's view adds the shard's
        // prefix); anything outside the shard's range is refused.
        let prefix = crate::state_machine_prefix(shard);
        let range = KeyRange::prefix(&prefix);
        let failed = |error: hamgam_storage::StorageError| ProposeError::Forward { node: self.node, reason: error.to_string() };
        match read {
            RemoteRead::Get(key) if range.contains(&key) => self.db.get(&key).map(RemoteReadAnswer::Value).map_err(failed),
            RemoteRead::Scan { start, end, descending, limit }
                if range.contains(&start) && end.is_some() && end.as_ref() <= range.end.as_ref() =>
            {
                let order = if descending { Order::Descending } else { Order::Ascending };
                let limit = (limit as usize).min(limits::REMOTE_SCAN_PAIRS_MAX);
                self.db.scan(&KeyRange { start, end }, order, limit).map(RemoteReadAnswer::Pairs).map_err(failed)
            }
            _ => Err(ProposeError::Forward { node: self.node, reason: format!("a read outside shard {shard}") }),
        }
    }

    /// Proposes `command` to `shard`'s replica on this node, and answers once
    /// this node has applied it. As the shard's leader it proposes the entry;
    /// as a follower it forwards the entry to the leader through raft (on the
    /// link raft's own messages use, a pass's commands in one message) and
    /// answers when it applies the entry itself, as every replica does.
    /// `NotLeader` when no leader is known (an election). Proposals
    /// forwarded by nodes without a replica arrive here too.
    pub async fn propose_here(&self, shard: ShardId, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        if command.len() > limits::COMMAND_BYTES_MAX {
            return Err(ProposeError::TooLarge(command.len()));
        }
        if !self.leaders.contains_key(&shard) {
            return Err(ProposeError::UnknownShard(shard));
        }
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Propose { shard, command, reply }).await.map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Hands a raft message from another node to the loop. Never waits: when
    /// the queue is full the message is dropped and raft retransmits.
    pub fn step(&self, shard: ShardId, message: Message) -> bool {
        self.inputs.try_send(Input::Step { shard, message }).is_ok()
    }

    /// The transport reports whether a snapshot reached `to`, so raft resumes
    /// replicating to it (or sends another).
    pub async fn report_snapshot(&self, shard: ShardId, to: NodeId, delivered: bool) {
        let _ = self.inputs.send(Input::SnapshotSent { shard, to, delivered }).await;
    }

    /// Waits until this node's applied state of `shard` includes everything
    /// committed before the call (raft's ReadIndex, confirmed by a quorum),
    /// so a read that follows sees every acknowledged write, whichever node
    /// acknowledged it.
    pub async fn read_index(&self, shard: ShardId) -> Result<(), ProposeError> {
        let Some(flags) = self.replicas.get(&shard) else {
            return Err(ProposeError::UnknownShard(shard));
        };
        let flags = flags.load(Ordering::Acquire);
        if flags & SOLE_VOTER != 0 && self.progress.replayed(shard) {
            // Only this node commits, and it has replayed what it committed
            // before a restart: whatever it acknowledged is applied. (Until
            // then the ReadIndex below waits for the replay.)
            return Ok(());
        }
        if flags & HOSTED == 0 {
            // Reads of a shard hosted elsewhere are made fresh there, one by one.
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(limits::LEADER_WAIT_MS);
        loop {
            let (reply, answer) = oneshot::channel();
            self.inputs.send(Input::ReadIndex { shard, reply }).await.map_err(|_| ProposeError::Stopped)?;
            let attempt = Duration::from_millis(limits::RAFT_TICK_MS * 10);
            match tokio::time::timeout(attempt, answer).await {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(ProposeError::Stopped))) | Ok(Err(_)) => return Err(ProposeError::Stopped),
                // Dropped by an election or lost on the way: ask again.
                Ok(Ok(Err(_))) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 5)).await;
                }
                Ok(Ok(Err(_))) | Err(_) => return Err(ProposeError::NoLeader(shard)),
            }
        }
    }

    /// Changes the replicas of `shard` by one step and waits until the
    /// change is applied here. Only on the shard's leader (`NotLeader`
    /// elsewhere); while another change is pending it waits its turn. A
    /// leader asked to remove itself hands leadership to a caught-up voter
    /// instead and answers `NotLeader` naming it: ask again there.
    pub async fn change_replicas(&self, shard: ShardId, change: ReplicaChange) -> Result<(), ProposeError> {
        let deadline = Instant::now() + Duration::from_millis(limits::LEADER_WAIT_MS);
        loop {
            let (reply, answer) = oneshot::channel();
            self.inputs.send(Input::ChangeReplicas { shard, change, reply }).await.map_err(|_| ProposeError::Stopped)?;
            match answer.await.map_err(|_| ProposeError::Stopped)? {
                // The previous change is not applied yet. Asking again is
                // safe even if this one was lost in a leader change and
                // applies later: a repeated change changes nothing.
                Err(ProposeError::Dropped) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 5)).await;
                }
                other => return other.map(|_| ()),
            }
        }
    }

    /// Starts handing the lead of `shard` to voter `to`: `Ok(true)` once
    /// raft has begun (the hand-over itself completes within an election
    /// timeout, or is abandoned), `Ok(false)` when `to` is not an active
    /// voter within a few entries of this leader, or a hand-over is already
    /// under way. Only on the shard's leader (`NotLeader` elsewhere). The
    /// placement driver decides who leads what, for the whole cluster.
    pub async fn transfer_leader(&self, shard: ShardId, to: NodeId) -> Result<bool, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::TransferLeader { shard, to, reply }).await.map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// The file of a snapshot message this node made, for the transport to
    /// send after the message (the message carries only its reference).
    pub fn outgoing_snapshot(&self, shard: ShardId, message: &Message) -> Result<OutgoingSnapshot, SnapshotError> {
        let (reference, index, term) = SnapshotRef::of_message(message)?;
        let path = snapshot::made_path(&self.snapshot_dir, shard, index, term);
        let file = std::fs::File::open(&path)
            .map_err(|source| SnapshotError::Io { path: path.display().to_string(), source })?;
        Ok(OutgoingSnapshot { file, len: reference.bytes })
    }

    /// Where the transport writes the file of a snapshot message arriving
    /// from a leader, before stepping the message (raft installs from the
    /// file). An install removes the shard's files it supersedes; a start
    /// removes every file.
    pub fn incoming_snapshot(&self, shard: ShardId, message: &Message) -> Result<IncomingSnapshot, SnapshotError> {
        let (reference, index, term) = SnapshotRef::of_message(message)?;
        IncomingSnapshot::create(snapshot::received_path(&self.snapshot_dir, shard, index, term), reference)
    }

    /// Gives up this node's replica of `shard`: returns once its state is
    /// reset to empty, durably; the apply thread deletes its data right
    /// after, in batches. Only for a replica the shard's leader no
    /// longer counts (neither voter nor learner) and will not re-add before
    /// this returns: raft assumes a replica never loses log it
    /// acknowledged, so a leader still tracking this one would fail on it.
    /// The placement driver, which alone changes replicas, calls it.
    pub async fn release_replica(&self, shard: ShardId) -> Result<(), ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Release { shard, reply }).await.map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Every hosted shard as the store loop sees it now.
    pub async fn status(&self) -> Result<Vec<ShardStatus>, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Status { reply }).await.map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)
    }

    /// The applied state of `shard`, for reads: this node's when it hosts
    /// the shard, else a view whose every read goes to a replica elsewhere
    /// (and is fresh there). Remote reads block the calling thread, so call
    /// this only from a multi-threaded tokio runtime.
    pub fn reader(&self, shard: ShardId) -> ShardReader {
        if self.hosts(shard) || self.forwarder.get().is_none() {
            return self.local_reader(shard);
        }
        let remote: Arc<dyn Db> = Arc::new(RemoteShard { shard, raft: self.clone() });
        shard_reader(remote, shard)
    }

    /// This node's applied state of `shard`, whether or not it hosts it.
    pub fn local_reader(&self, shard: ShardId) -> ShardReader {
        shard_reader(self.db.clone(), shard)
    }

    /// The leader of `shard` as this node last saw it.
    pub fn leader(&self, shard: ShardId) -> Option<NodeId> {
        let id = self.leaders.get(&shard)?.load(Ordering::Relaxed);
        (id != raft::INVALID_ID).then_some(NodeId(id))
    }

    /// True once every hosted shard knows a leader.
    pub fn all_leaders_known(&self) -> bool {
        self.leaders.values().all(|id| id.load(Ordering::Relaxed) != raft::INVALID_ID)
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Waits until every shard hosted here has applied what its log held
    /// committed when the store opened. After a crash the database may be
    /// behind the WAL; reads served before the replay could miss writes
    /// acknowledged before the crash. `Stopped` if the store ends first.
    pub async fn replayed(&self) -> Result<(), ProposeError> {
        loop {
            let behind = |(shard, flags): (&ShardId, &AtomicU8)| {
                flags.load(Ordering::Acquire) & HOSTED != 0 && !self.progress.replayed(*shard)
            };
            if !self.replicas.iter().any(behind) {
                return Ok(());
            }
            if !*self.running.borrow() {
                return Err(ProposeError::Stopped);
            }
            tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS / 10)).await;
        }
    }

    /// Resolves when the store loop has ended (stopped or failed).
    pub async fn stopped(&self) {
        let mut running = self.running.clone();
        while *running.borrow_and_update() {
            if running.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Store {
    /// Recovers every shard from the database and the WAL, creates missing
    /// shards, and starts the loop thread. Messages for other nodes leave
    /// through `transport`.
    pub fn open(
        config: StoreConfig,
        db: Arc<dyn Db>,
        machine: Box<dyn StateMachine>,
        transport: Box<dyn RaftTransport>,
    ) -> Result<Store, StoreError> {
        let (wal, mut recovered) = Wal::open(&config.wal_dir())?;
        let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!());
        let mut states = read_applied(&*db)?;
        let snapshot_dir = config.snapshot_dir();
        resume_install(&*db, &mut states, &snapshot_dir)?;
        let mut bootstrapped = false;
        for (&shard, voters) in &config.shards {
            states.entry(shard).or_insert_with(|| {
                bootstrapped = true;
                if voters.is_empty() {
                    return ApplyState { index: 0, term: 0, conf: ConfState::default() };
                }
                // Every initial replica starts at the same point, after the
                // first entry; so a replica added later, which starts at 0,
                // always gets a snapshot first, carrying the configuration.
                let conf = ConfState { voters: voters.iter().map(|n| n.0).collect(), ..Default::default() };
                ApplyState { index: BOOTSTRAP_INDEX, term: BOOTSTRAP_INDEX, conf }
            });
        }
        let mut peers = BTreeMap::new();
        let mut replay_to = BTreeMap::new();
        let mut initial_flags = BTreeMap::new();
        for &shard in config.shards.keys() {
            let apply_state = states[&shard].clone();
            let from_wal = recovered.remove(&shard).unwrap_or_default();
            // The WAL's commit index lags: a round's new commit is recorded
            // with the next round. A sole voter commits every entry of its
            // log once it leads again, so it replays to the last of them.
            let last_logged = from_wal.entries.last().map_or(0, |entry| entry.index);
            let sole_voter = sole_voter_at_open(&apply_state, config.node, &from_wal.entries);
            let flags = replica_flags(&apply_state.conf, config.node);
            initial_flags.insert(shard, if sole_voter { flags } else { flags & !SOLE_VOTER });
            let commit = from_wal.hard_state.commit;
            replay_to.insert(shard, if sole_voter { last_logged.max(commit) } else { commit });
            let log = ShardLog::recover(
                from_wal.hard_state,
                apply_state.conf.clone(),
                apply_state.index,
                apply_state.term,
                from_wal.entries,
            );
            let mut node = new_raw_node(config.node, shard, apply_state.index, log, &logger)?;
            if sole_voter {
                // Sole voter: no one to wait for, lead at once.
                node.campaign().map_err(|source| StoreError::Raft { shard, source })?;
            }
            peers.insert(shard, Peer::new(node, apply_state.index));
        }
        if bootstrapped {
            let mut txn = Txn::new(&*db);
            write_applied(&mut txn, &states);
            db.write(&txn.into_batch())?;
            db.persist()?;
        }
        if !recovered.is_empty() {
            tracing::warn!(shards = ?recovered.keys().collect::<Vec<_>>(), "WAL holds shards this node no longer hosts");
        }
        states.retain(|shard, _| config.shards.contains_key(shard));

        let (inputs, queue) = mpsc::channel(limits::STORE_QUEUE_MAX);
        let (running_tx, running) = watch::channel(true);
        let leaders: Arc<BTreeMap<ShardId, AtomicU64>> =
            Arc::new(config.shards.keys().map(|s| (*s, AtomicU64::new(raft::INVALID_ID))).collect());
        let replicas: Arc<BTreeMap<ShardId, AtomicU8>> =
            Arc::new(initial_flags.into_iter().map(|(shard, flags)| (shard, AtomicU8::new(flags))).collect());
        let stats = Arc::new(StoreStats::default());
        let progress = Arc::new(ApplyProgress::new(&states, replay_to));
        let handle = RaftHandle {
            node: config.node,
            inputs: inputs.clone(),
            db: db.clone(),
            leaders: leaders.clone(),
            replicas: replicas.clone(),
            forwarder: Arc::new(OnceLock::new()),
            stats: stats.clone(),
            progress: progress.clone(),
            running,
            snapshot_dir: Arc::new(snapshot_dir.clone()),
        };

        let ticker_inputs = inputs.clone();
        std::thread::Builder::new()
            .name("raft-ticker".into())
            .spawn(move || {
                // Wakes an idle loop so it can tick; a busy loop ticks on its
                // own clock, so a full queue just skips a wake-up.
                while !ticker_inputs.is_closed() {
                    std::thread::sleep(Duration::from_millis(limits::RAFT_TICK_MS));
                    let _ = ticker_inputs.try_send(Input::Wake);
                }
            })
            .map_err(StoreError::Thread)?;

        let (apply_inputs, apply_queue) = std::sync::mpsc::sync_channel(APPLY_QUEUE_ROUNDS_MAX);
        let applier = Applier {
            db: db.clone(),
            machine,
            states,
            progress: progress.clone(),
            stats: stats.clone(),
            snapshot_dir: snapshot_dir.clone(),
            busy: BTreeMap::new(),
            pre_images_max: limits::SNAPSHOT_PRE_IMAGES_BYTES_MAX,
        };
        let wake_inputs = inputs.clone();
        let apply_thread = std::thread::Builder::new()
            .name("raft-apply".into())
            .spawn(move || {
                applier.run(apply_queue, move || {
                    let _ = wake_inputs.try_send(Input::Wake);
                })
            })
            .map_err(StoreError::Thread)?;

        let mut store_loop = StoreLoop {
            node: config.node,
            logger,
            peers,
            wal,
            db,
            queue,
            inputs,
            leaders,
            replicas,
            stats,
            transport,
            snapshots_in_flight: Default::default(),
            snapshot_floors: BTreeMap::new(),
            installing: Default::default(),
            outbound: Vec::new(),
            reads: PendingReads::new(config.node),
            entry_contexts: Contexts::new(config.node),
            apply_inputs,
            apply_thread: Some(apply_thread),
            progress,
            last_tick: Instant::now(),
            checkpoint: CheckpointState { in_flight: false, thread: None, wal_bytes: 0, last: Instant::now() },
        };
        let thread = std::thread::Builder::new()
            .name("raftstore".into())
            .spawn(move || {
                let result = store_loop.run();
                if let Err(error) = &result {
                    tracing::error!(?error, "raft store stopped by a fatal error");
                }
                store_loop.stop_applier();
                store_loop.fail_queued();
                // After the queue is closed: its report can no longer block.
                if let Some(checkpoint) = store_loop.checkpoint.thread.take() {
                    let _ = checkpoint.join();
                }
                let _ = running_tx.send(false);
                result
            })
            .map_err(StoreError::Thread)?;
        Ok(Store { handle, thread: Some(thread) })
    }

    pub fn handle(&self) -> RaftHandle {
        self.handle.clone()
    }

    /// Tests: stop the loop the way a crash would (no final checkpoint, WAL kept).
    #[cfg(test)]
    fn crash(mut self) {
        let _ = self.handle.inputs.try_send(Input::Crash);
        let _ = self.join();
    }

    /// Stops the loop after its current pass, takes a final checkpoint and
    /// joins the thread. Proposals still queued are answered `Stopped`.
    pub fn stop(mut self) -> Result<(), StoreError> {
        let _ = self.handle.inputs.try_send(Input::Stop);
        self.join()
    }

    fn join(&mut self) -> Result<(), StoreError> {
        match self.thread.take() {
            Some(thread) => {
                if !thread.is_finished() {
                    // The queue may be full: keep offering Stop until taken.
                    while !thread.is_finished() && self.handle.inputs.try_send(Input::Stop).is_err() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                thread.join().unwrap_or_else(|_| Err(StoreError::Thread(std::io::Error::other("store thread panicked"))))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.handle.inputs.try_send(Input::Stop);
            let _ = self.join();
        }
    }
}

/// Commands batched into one raft entry: version, count, then length-prefixed commands.
const ENTRY_BATCH_VERSION: u8 = 1;

pub(crate) fn encode_batch(commands: &[Vec<u8>]) -> Vec<u8> {
    let bytes: usize = commands.iter().map(|c| c.len() + 4).sum();
    let mut out = Vec::with_capacity(5 + bytes);
    out.push(ENTRY_BATCH_VERSION);
    out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
    for command in commands {
        out.extend_from_slice(&(command.len() as u32).to_le_bytes());
        out.extend_from_slice(command);
    }
    out
}

pub(crate) fn decode_batch(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err("entry shorter than its commands".into());
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head)
    }
    fn u32_of(b: &[u8]) -> usize {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }
    let version = take(&mut bytes, 1)?[0];
    if version != ENTRY_BATCH_VERSION {
        return Err(format!("unknown entry batch version {version}"));
    }
    let count = u32_of(take(&mut bytes, 4)?);
    if count > limits::ENTRY_COMMANDS_MAX {
        return Err(format!("{count} commands in one entry"));
    }
    let mut commands = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32_of(take(&mut bytes, 4)?);
        commands.push(take(&mut bytes, len)?);
    }
    if !bytes.is_empty() {
        return Err("trailing bytes after the last command".into());
    }
    Ok(commands)
}

/// A proposed entry waiting to be applied.
struct Inflight {
    index: u64,
    term: u64,
    replies: Vec<Reply>,
}

/// A shard's raft node as this store runs it.
fn new_raw_node(
    node: NodeId,
    shard: ShardId,
    applied: u64,
    log: ShardLog,
    logger: &slog::Logger,
) -> Result<RawNode<ShardLog>, StoreError> {
    let raft_config = raft::Config {
        id: node.0,
        applied,
        election_tick: 10,
        heartbeat_tick: 3,
        pre_vote: true,
        check_quorum: true,
        max_inflight_msgs: limits::RAFT_INFLIGHT_MSGS_MAX,
        max_size_per_msg: limits::RAFT_MSG_BYTES_MAX,
        max_committed_size_per_ready: 16 << 20,
        // A pass's appends to one follower go as one message.
        batch_append: true,
        ..Default::default()
    };
    raft_config.validate().map_err(|source| StoreError::Raft { shard, source })?;
    RawNode::new(&raft_config, log, logger).map_err(|source| StoreError::Raft { shard, source })
}

/// An entry this node forwarded to its shard's leader, waiting for this
/// node to apply it.
struct Forwarded {
    /// The leader it went to: if another one takes over, it may be lost.
    leader: u64,
    sent: Instant,
    replies: Vec<Reply>,
}

struct Peer {
    node: RawNode<ShardLog>,
    /// Commands gathered this pass, proposed together as one entry.
    batch: Vec<(Vec<u8>, Reply)>,
    batch_bytes: usize,
    inflight: VecDeque<Inflight>,
    /// Entries forwarded as a follower, by their context's counter (which
    /// grows with time, so the first is the oldest).
    forwarded: BTreeMap<u64, Forwarded>,
    /// The applied index last reported to raft.
    applied: u64,
}

impl Peer {
    fn new(node: RawNode<ShardLog>, applied: u64) -> Peer {
        Peer { node, batch: Vec::new(), batch_bytes: 0, inflight: VecDeque::new(), forwarded: BTreeMap::new(), applied }
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The refusal for a proposal made here while another node leads.
    fn not_leader(&self, shard: ShardId) -> ProposeError {
        let leader = self.node.raft.leader_id;
        ProposeError::NotLeader { shard, leader: (leader != raft::INVALID_ID).then_some(NodeId(leader)) }
    }

    /// The refusal when raft declined a proposal before appending it (a
    /// leadership transfer is under way): nothing was proposed, so the
    /// caller may retry, with the node taking over.
    fn refused_unproposed(&self, shard: ShardId) -> ProposeError {
        ProposeError::NotLeader { shard, leader: self.node.raft.lead_transferee.map(NodeId) }
    }

    /// The entry just appended is answered to `replies` once applied.
    fn await_last_entry(&mut self, replies: Vec<Reply>) {
        let index = self.node.raft.raft_log.last_index();
        let term = self.node.raft.term;
        self.inflight.push_back(Inflight { index, term, replies });
    }

    /// Refuses the commands gathered but not yet proposed (safe to retry).
    /// Proposed ones wait: the entry may still commit under the next leader,
    /// and `attach_replies` answers them either way.
    fn refuse_batch(&mut self, error: &ProposeError) {
        for (_, reply) in self.batch.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.batch_bytes = 0;
    }

    fn fail_all(&mut self, error: &ProposeError) {
        self.refuse_batch(error);
        for inflight in self.inflight.drain(..) {
            for reply in inflight.replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        self.drop_forwarded(|_| true);
    }

    /// Tells the proposers of forwarded entries that match `lost` that the
    /// entry may be lost: it may still apply, so they may retry only what is
    /// idempotent.
    fn drop_forwarded(&mut self, lost: impl Fn(&Forwarded) -> bool) {
        self.forwarded.retain(|_, forwarded| {
            if !lost(forwarded) {
                return true;
            }
            for reply in forwarded.replies.drain(..) {
                let _ = reply.send(Err(ProposeError::Dropped));
            }
            false
        });
    }
}

struct CheckpointState {
    in_flight: bool,
    /// The thread of the checkpoint in flight, joined when the store stops
    /// so nothing holds the database after `Store::stop` returns.
    thread: Option<std::thread::JoinHandle<()>>,
    /// WAL bytes written since the last checkpoint started.
    wal_bytes: u64,
    last: Instant,
}

/// Names what this node asks of a shard's leader through raft (a fresh
/// read, a forwarded entry) so that the answer finds its way back: this
/// node and a counter. A leader keeps one pending read per context, so two
/// nodes' must never share one; the counter starts from the clock, so an
/// answer to something asked before a restart never matches something
/// asked after it.
struct Contexts {
    node: NodeId,
    next: u64,
}

impl Contexts {
    fn new(node: NodeId) -> Contexts {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Contexts { node, next: now.as_nanos() as u64 }
    }

    /// A new context: its counter, and its bytes for raft.
    fn make(&mut self) -> (u64, Vec<u8>) {
        let counter = self.next;
        self.next = self.next.wrapping_add(1);
        (counter, [self.node.0.to_le_bytes(), counter.to_le_bytes()].concat())
    }

    /// The counter of `context`, if this node made it.
    fn ours(&self, context: &[u8]) -> Option<u64> {
        let (node, counter) = context.split_at_checked(8)?;
        if u64::from_le_bytes(node.try_into().ok()?) != self.node.0 {
            return None;
        }
        Some(u64::from_le_bytes(counter.try_into().ok()?))
    }
}

/// Fresh-read requests between `read_index` and the apply that satisfies them.
struct PendingReads {
    contexts: Contexts,
    /// Asked of raft, waiting for its read state: context → (shard, asked at, reply).
    asked: HashMap<u64, (ShardId, Instant, ReadReply)>,
    /// Read states received, waiting for the shard's apply to reach the index.
    awaiting_apply: Vec<(ShardId, u64, ReadReply)>,
}

impl PendingReads {
    fn new(node: NodeId) -> PendingReads {
        PendingReads { contexts: Contexts::new(node), asked: HashMap::new(), awaiting_apply: Vec::new() }
    }

    /// Registers a read of `shard`; returns the context to ask raft with.
    fn ask(&mut self, shard: ShardId, reply: ReadReply) -> Vec<u8> {
        let (counter, context) = self.contexts.make();
        self.asked.insert(counter, (shard, Instant::now(), reply));
        context
    }

    /// The read that a read state of `shard` answers, if this node asked it.
    fn answered(&mut self, shard: ShardId, context: &[u8]) -> Option<ReadReply> {
        let counter = self.contexts.ours(context)?;
        if self.asked.get(&counter)?.0 != shard {
            return None;
        }
        self.asked.remove(&counter).map(|(_, _, reply)| reply)
    }

    fn len(&self) -> usize {
        self.asked.len() + self.awaiting_apply.len()
    }
}

struct StoreLoop {
    node: NodeId,
    logger: slog::Logger,
    peers: BTreeMap<ShardId, Peer>,
    transport: Box<dyn RaftTransport>,
    /// Shards whose snapshot the apply thread is making.
    snapshots_in_flight: std::collections::BTreeSet<ShardId>,
    /// Shards whose in-memory log is kept from an index on, for a snapshot
    /// being made, sent or installed: see [`StoreLoop::advance_applied`].
    snapshot_floors: BTreeMap<ShardId, u64>,
    /// Shards whose snapshot the apply thread is installing: this node does
    /// not read them until it is done.
    installing: std::collections::BTreeSet<ShardId>,
    /// Messages gathered for the transport, sent before and after the WAL write.
    outbound: Vec<(ShardId, Message)>,
    reads: PendingReads,
    /// Contexts of the entries this node forwards to leaders as a follower.
    entry_contexts: Contexts,
    wal: Wal,
    db: Arc<dyn Db>,
    queue: mpsc::Receiver<Input>,
    /// For the checkpoint thread to report back.
    inputs: mpsc::Sender<Input>,
    leaders: Arc<BTreeMap<ShardId, AtomicU64>>,
    replicas: Arc<BTreeMap<ShardId, AtomicU8>>,
    stats: Arc<StoreStats>,
    apply_inputs: std::sync::mpsc::SyncSender<ApplyInput>,
    apply_thread: Option<std::thread::JoinHandle<()>>,
    progress: Arc<ApplyProgress>,
    last_tick: Instant,
    checkpoint: CheckpointState,
}

impl StoreLoop {
    fn run(&mut self) -> Result<(), StoreError> {
        // Publish the leaders the start-up campaigns produced.
        self.process_ready()?;
        loop {
            // Block only when no raft node has work left over.
            let first = if self.peers.values().any(|p| p.node.has_ready()) {
                self.queue.try_recv().ok()
            } else {
                match self.queue.blocking_recv() {
                    Some(input) => Some(input),
                    None => break,
                }
            };
            let mut stop = false;
            if let Some(input) = first {
                stop |= self.handle(input)?;
                let mut taken = 1;
                while taken < limits::STORE_INPUTS_PER_PASS_MAX && !stop {
                    match self.queue.try_recv() {
                        Ok(input) => stop |= self.handle(input)?,
                        Err(_) => break,
                    }
                    taken += 1;
                }
            }
            if self.progress.failed.load(Ordering::Acquire) {
                return Err(self.progress.take_error().unwrap_or(StoreError::Thread(std::io::Error::other("apply failed"))));
            }
            self.advance_applied();
            self.answer_reads();
            self.tick_if_due();
            self.propose_batches();
            self.process_ready()?;
            self.tend_snapshots()?;
            self.start_checkpoint_if_due();
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            if stop {
                break;
            }
        }
        self.final_checkpoint()
    }

    /// Returns true when the loop must stop.
    fn handle(&mut self, input: Input) -> Result<bool, StoreError> {
        match input {
            Input::Propose { shard, command, reply } => {
                let Some(peer) = self.peers.get_mut(&shard) else {
                    let _ = reply.send(Err(ProposeError::UnknownShard(shard)));
                    return Ok(false);
                };
                if peer.batch.len() >= limits::ENTRY_COMMANDS_MAX
                    || peer.batch_bytes + command.len() > limits::ENTRY_BYTES_MAX
                {
                    propose_batch(shard, peer, &mut self.entry_contexts);
                }
                peer.batch_bytes += command.len() + 4;
                peer.batch.push((command, reply));
            }
            Input::Step { shard, message } => {
                let Some(peer) = self.peers.get_mut(&shard) else {
                    tracing::debug!(%shard, from = message.from, "a message for a shard not hosted here; dropped");
                    return Ok(false);
                };
                if message.get_msg_type() == MessageType::MsgPropose && !forwarded_entry_welcome(peer, &message) {
                    // Not passed on again: the follower that sent it answers
                    // its proposers when its leader changes or in time.
                    tracing::debug!(%shard, from = message.from, "a forwarded entry this node cannot take; dropped");
                    return Ok(false);
                }
                if let Err(error) = peer.node.step(message) {
                    tracing::debug!(%shard, %error, "raft refused a message");
                }
            }
            Input::SnapshotSent { shard, to, delivered } => {
                if let Some(peer) = self.peers.get_mut(&shard) {
                    let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                    peer.node.report_snapshot(to.0, status);
                }
            }
            Input::ReadIndex { shard, reply } => {
                let Some(peer) = self.peers.get_mut(&shard) else {
                    let _ = reply.send(Err(ProposeError::UnknownShard(shard)));
                    return Ok(false);
                };
                if self.reads.len() >= limits::READS_PENDING_MAX {
                    let _ = reply.send(Err(ProposeError::NoLeader(shard)));
                    return Ok(false);
                }
                peer.node.read_index(self.reads.ask(shard, reply));
            }
            Input::ChangeReplicas { shard, change, reply } => {
                let peer = match leading_peer(&mut self.peers, shard) {
                    Ok(peer) => peer,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return Ok(false);
                    }
                };
                if change == ReplicaChange::Remove(NodeId(peer.node.raft.id)) {
                    // raft-rs keeps a leader that removed itself leading a
                    // group it cannot propose to; hand leadership over first
                    // and let the caller ask the new leader.
                    // The most advanced active voter: raft brings it up to
                    // date before it hands over.
                    let raft = &peer.node.raft;
                    let successor = raft
                        .prs()
                        .conf()
                        .voters()
                        .ids()
                        .iter()
                        .filter(|id| *id != raft.id)
                        .filter_map(|id| raft.prs().get(id).filter(|p| p.recent_active).map(|p| (p.matched, id)))
                        .max()
                        .map(|(_, id)| id);
                    if let Some(successor) = successor {
                        peer.node.transfer_leader(successor);
                    }
                    let leader = successor.map(NodeId);
                    let _ = reply.send(Err(ProposeError::NotLeader { shard, leader }));
                    return Ok(false);
                }
                let (change_type, node) = match change {
                    ReplicaChange::AddLearner(node) => (ConfChangeType::AddLearnerNode, node),
                    ReplicaChange::AddVoter(node) => (ConfChangeType::AddNode, node),
                    ReplicaChange::Remove(node) => (ConfChangeType::RemoveNode, node),
                };
                if peer.node.raft.has_pending_conf() {
                    // raft would turn it into an empty entry: refuse it
                    // unproposed instead, so asking again is safe.
                    let _ = reply.send(Err(ProposeError::Dropped));
                    return Ok(false);
                }
                let change = ConfChange { change_type, node_id: node.0, ..Default::default() };
                match peer.node.propose_conf_change(Vec::new(), change) {
                    Ok(()) => peer.await_last_entry(vec![reply]),
                    Err(error) => {
                        tracing::debug!(%shard, %error, "configuration change refused");
                        let _ = reply.send(Err(peer.refused_unproposed(shard)));
                    }
                }
            }
            Input::TransferLeader { shard, to, reply } => {
                let peer = match leading_peer(&mut self.peers, shard) {
                    Ok(peer) => peer,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return Ok(false);
                    }
                };
                let raft = &peer.node.raft;
                if to.0 == raft.id {
                    let _ = reply.send(Ok(true));
                    return Ok(false);
                }
                let last = raft.raft_log.last_index();
                let voter = raft.prs().conf().voters().contains(to.0);
                let close =
                    raft.prs().get(to.0).is_some_and(|p| p.recent_active && p.matched + LEADER_TRANSFER_SLACK >= last);
                let ready = voter && close && raft.lead_transferee.is_none();
                if ready {
                    tracing::debug!(%shard, %to, "handing leadership over");
                    peer.node.transfer_leader(to.0);
                }
                let _ = reply.send(Ok(ready));
            }
            Input::Release { shard, reply } => {
                let Some(peer) = self.peers.get(&shard) else {
                    let _ = reply.send(Err(ProposeError::UnknownShard(shard)));
                    return Ok(false);
                };
                let empty = peer.node.raft.raft_log.last_index() == 0;
                if !empty {
                    // Everything handed to the apply thread goes first.
                    self.release_replica(shard)?;
                }
                let _ = reply.send(Ok(()));
            }
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Wake => {}
            Input::CheckpointDone(result) => {
                self.checkpoint.in_flight = false;
                let durable = result?;
                let released = self.wal.release_through(&durable)?;
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                self.stats.wal_segments_released.fetch_add(released as u64, Ordering::Relaxed);
            }
            Input::Stop => return Ok(true),
            #[cfg(test)]
            Input::Crash => return Err(StoreError::Thread(std::io::Error::other("simulated crash"))),
        }
        Ok(false)
    }

    fn status(&self) -> Vec<ShardStatus> {
        self.peers
            .iter()
            .map(|(&shard, peer)| {
                let raft = &peer.node.raft;
                let role = match raft.state {
                    StateRole::Leader => ReplicaRole::Leader,
                    StateRole::Candidate | StateRole::PreCandidate => ReplicaRole::Candidate,
                    StateRole::Follower => ReplicaRole::Follower,
                };
                let of_each = |field: fn(&raft::Progress) -> u64| -> Vec<(NodeId, u64)> {
                    let mut values: Vec<(NodeId, u64)> = if role == ReplicaRole::Leader {
                        raft.prs().iter().map(|(id, progress)| (NodeId(*id), field(progress))).collect()
                    } else {
                        Vec::new()
                    };
                    values.sort();
                    values
                };
                let mut voters: Vec<NodeId> = raft.prs().conf().voters().ids().iter().map(NodeId).collect();
                voters.sort();
                let mut learners: Vec<NodeId> = raft.prs().conf().learners().iter().copied().map(NodeId).collect();
                learners.sort();
                ShardStatus {
                    shard,
                    role,
                    leader: (raft.leader_id != raft::INVALID_ID).then_some(NodeId(raft.leader_id)),
                    term: raft.term,
                    voters,
                    learners,
                    last_index: raft.raft_log.last_index(),
                    committed: raft.raft_log.committed,
                    applied: self.progress.applied(shard),
                    matched: of_each(|progress| progress.matched),
                    known_committed: of_each(|progress| progress.committed_index),
                }
            })
            .collect()
    }

    fn tick_if_due(&mut self) {
        let interval = Duration::from_millis(limits::RAFT_TICK_MS);
        if self.last_tick.elapsed() < interval {
            return;
        }
        self.last_tick = Instant::now();
        for peer in self.peers.values_mut() {
            peer.node.tick();
        }
        // A read raft never answered (lost in an election, or no leader to
        // ask) is refused; the caller asks again.
        let limit = Duration::from_millis(limits::RAFT_TICK_MS * 10);
        let expired: Vec<u64> =
            self.reads.asked.iter().filter(|(_, (_, asked, _))| asked.elapsed() >= limit).map(|(c, _)| *c).collect();
        for context in expired {
            if let Some((shard, _, reply)) = self.reads.asked.remove(&context) {
                let _ = reply.send(Err(ProposeError::NoLeader(shard)));
            }
        }
        // A forwarded entry the leader dropped (or whose message was lost)
        // never applies here.
        let wait = Duration::from_millis(limits::FORWARDED_ENTRY_WAIT_MS);
        for peer in self.peers.values_mut() {
            if peer.forwarded.first_key_value().is_some_and(|(_, oldest)| oldest.sent.elapsed() >= wait) {
                peer.drop_forwarded(|forwarded| forwarded.sent.elapsed() >= wait);
            }
        }
    }

    /// Hands the gathered messages to the transport.
    fn flush_outbound(&mut self) {
        if !self.outbound.is_empty() {
            self.transport.send(std::mem::take(&mut self.outbound));
        }
    }

    /// Answers fresh reads whose index the apply thread has reached.
    fn answer_reads(&mut self) {
        if self.reads.awaiting_apply.is_empty() {
            return;
        }
        let progress = &self.progress;
        let waiting = std::mem::take(&mut self.reads.awaiting_apply);
        for (shard, index, reply) in waiting {
            if progress.applied(shard) >= index {
                let _ = reply.send(Ok(()));
            } else {
                self.reads.awaiting_apply.push((shard, index, reply));
            }
        }
    }

    fn propose_batches(&mut self) {
        for (shard, peer) in self.peers.iter_mut() {
            if !peer.batch.is_empty() {
                propose_batch(*shard, peer, &mut self.entry_contexts);
            }
        }
    }

    fn process_ready(&mut self) -> Result<(), StoreError> {
        let mut readies: Vec<(ShardId, Ready)> = Vec::new();
        let mut writes: BTreeMap<ShardId, ShardWrite> = BTreeMap::new();
        let mut committed: Vec<ApplyTask> = Vec::new();

        for (&shard, peer) in self.peers.iter_mut() {
            if !peer.node.has_ready() {
                continue;
            }
            let mut ready = peer.node.ready();
            if let Some(soft) = ready.ss() {
                self.leaders[&shard].store(soft.leader_id, Ordering::Relaxed);
                if soft.raft_state != StateRole::Leader {
                    peer.refuse_batch(&peer.not_leader(shard));
                }
                // What went to a leader that no longer leads may be lost.
                let leader = soft.leader_id;
                peer.drop_forwarded(|forwarded| forwarded.leader != leader);
            }
            // 1. Messages a leader may send before its own write is durable.
            self.outbound.extend(ready.take_messages().into_iter().map(|m| (shard, m)));
            // 2. A snapshot from the leader: its install is put on record
            // durably (after every round already handed over) before
            // anything else of this shard, so nothing this node then
            // acknowledges can be lost; the install itself runs beside the
            // other shards, and the shard's later rounds wait for it. Rare:
            // only a replica far behind gets one.
            if !ready.snapshot().is_empty() {
                if !committed.is_empty() {
                    send_to_applier(&self.apply_inputs, ApplyInput::Round(std::mem::take(&mut committed)))?;
                }
                let snapshot = ready.snapshot().clone();
                let install = snapshot.clone();
                // The range is replaced in several batches: until it is
                // whole, this node reads the shard from another replica.
                self.replicas[&shard].store(0, Ordering::Release);
                self.installing.insert(shard);
                ask_applier(&self.apply_inputs, |started| ApplyInput::InstallSnapshot {
                    shard,
                    snapshot: install,
                    started,
                })?;
                peer.node.mut_store().apply_snapshot(&snapshot);
                // Proposals waiting here were for entries the snapshot replaced.
                peer.fail_all(&ProposeError::Dropped);
            }
            // 3. Entries committed earlier (already durable here).
            let entries = ready.take_committed_entries();
            if !entries.is_empty() {
                let flags = (!self.installing.contains(&shard)).then_some(&*self.replicas);
                committed.push(prepare_apply(shard, peer, entries, flags, &self.entry_contexts)?);
            }
            // 4 and 5. New entries and hard state: into the log now, on disk below.
            let mut write = ShardWrite::default();
            if !ready.entries().is_empty() {
                peer.node.mut_store().append(ready.entries());
                write.entries = ready.take_entries();
            }
            if let Some(hs) = ready.hs() {
                peer.node.mut_store().set_hard_state(hs.clone());
                write.hard_state = Some(hs.clone());
            }
            if write.hard_state.is_some() || !write.entries.is_empty() {
                writes.insert(shard, write);
            }
            readies.push((shard, ready));
        }
        if readies.is_empty() {
            return Ok(());
        }
        self.flush_outbound();
        // 3, continued. Entries committed earlier are durable here already:
        // the apply thread takes them now, beside this round's fdatasync,
        // rather than after it (a leader's commits arrive with the next
        // round's new entries, a follower's with the leader's next append).
        if !committed.is_empty() {
            send_to_applier(&self.apply_inputs, ApplyInput::Round(std::mem::take(&mut committed)))?;
        }

        // One record, one fdatasync, for every shard of this round.
        if !writes.is_empty() {
            self.wal.append_round(&writes)?;
            self.stats.wal_rounds.fetch_add(1, Ordering::Relaxed);
        }

        for (shard, mut ready) in readies {
            let Some(peer) = self.peers.get_mut(&shard) else { continue };
            // 6. Messages that must wait until our write is durable (votes, acks).
            self.outbound.extend(ready.take_persisted_messages().into_iter().map(|m| (shard, m)));
            for state in ready.take_read_states() {
                if let Some(reply) = self.reads.answered(shard, &state.request_ctx) {
                    self.reads.awaiting_apply.push((shard, state.index, reply));
                }
            }
            // 7. Advance, then the light ready. `advance_append`, not
            // `advance`: the latter would also mark everything handed out as
            // applied, while the apply thread may not have applied it yet.
            let mut light = peer.node.advance_append(ready);
            if let Some(commit) = light.commit_index() {
                peer.node.mut_store().set_commit(commit);
            }
            self.outbound.extend(light.take_messages().into_iter().map(|m| (shard, m)));
            let entries = light.take_committed_entries();
            if !entries.is_empty() {
                let flags = (!self.installing.contains(&shard)).then_some(&*self.replicas);
                committed.push(prepare_apply(shard, peer, entries, flags, &self.entry_contexts)?);
            }
        }
        self.flush_outbound();
        if !committed.is_empty() {
            // Blocks only when the apply thread is far behind: backpressure.
            send_to_applier(&self.apply_inputs, ApplyInput::Round(committed))?;
        }
        Ok(())
    }

    /// Gives up this node's replica of `shard` (see
    /// [`RaftHandle::release_replica`]): once everything before is applied,
    /// its state is reset to an empty replica (durably), the raft node
    /// starts over empty (keeping its term), and the WAL stops tracking the
    /// shard. A later re-add then starts from a snapshot, as a new replica
    /// does.
    fn release_replica(&mut self, shard: ShardId) -> Result<(), StoreError> {
        ask_applier(&self.apply_inputs, |done| ApplyInput::Release { shard, done })?;
        let Some(peer) = self.peers.get_mut(&shard) else { return Ok(()) };
        peer.fail_all(&ProposeError::NotLeader { shard, leader: None });
        let hard_state = raft::eraftpb::HardState { term: peer.node.raft.term, ..Default::default() };
        let log = ShardLog::recover(hard_state, ConfState::default(), 0, 0, Vec::new());
        *peer = Peer::new(new_raw_node(self.node, shard, 0, log, &self.logger)?, 0);
        self.wal.forget_shard(shard);
        self.leaders[&shard].store(raft::INVALID_ID, Ordering::Relaxed);
        tracing::info!(%shard, "released this node's replica");
        Ok(())
    }

    /// Has snapshots made for the shards whose followers need one, and hands
    /// finished ones to their logs.
    fn tend_snapshots(&mut self) -> Result<(), StoreError> {
        // Installs finished: the shard is whole again and read here, as its
        // configuration now says (changes may have come after the snapshot).
        let installed = std::mem::take(&mut *self.progress.installed.lock().unwrap_or_else(|p| p.into_inner()));
        for shard in installed {
            self.installing.remove(&shard);
            if let (Some(flags), Some(peer)) = (self.replicas.get(&shard), self.peers.get(&shard)) {
                let conf = peer.node.raft.prs().conf().to_conf_state();
                flags.store(replica_flags(&conf, self.node), Ordering::Release);
            }
        }
        let made = std::mem::take(&mut *self.progress.snapshots.lock().unwrap_or_else(|p| p.into_inner()));
        for (shard, snapshot) in made {
            self.snapshots_in_flight.remove(&shard);
            match (self.peers.get_mut(&shard), snapshot) {
                (Some(peer), Some(snapshot)) => {
                    self.snapshot_floors.insert(shard, snapshot.get_metadata().index);
                    peer.node.mut_store().set_snapshot(snapshot);
                }
                _ => {
                    self.snapshot_floors.remove(&shard);
                }
            }
        }
        let wanted: Vec<ShardId> = self
            .peers
            .iter()
            .filter(|(shard, peer)| peer.node.store().take_snapshot_wanted() && !self.snapshots_in_flight.contains(shard))
            .map(|(shard, _)| *shard)
            .collect();
        for shard in wanted {
            self.snapshots_in_flight.insert(shard);
            // The snapshot will be at least this recent.
            if let Some(peer) = self.peers.get(&shard) {
                self.snapshot_floors.insert(shard, peer.applied);
            }
            send_to_applier(&self.apply_inputs, ApplyInput::GenerateSnapshot(shard))?;
        }
        Ok(())
    }

    /// Tells raft what the apply thread has applied, and trims the in-memory log.
    fn advance_applied(&mut self) {
        for (shard, peer) in self.peers.iter_mut() {
            let applied = self.progress.applied(*shard);
            if applied <= peer.applied {
                continue;
            }
            peer.applied = applied;
            peer.node.advance_apply_to(applied);
            // Keep a short tail of applied entries in memory for followers
            // that lag a little (the WAL keeps them on disk until a
            // checkpoint). And while a snapshot is made, sent and installed
            // (seconds, for a big shard), keep every entry after it: a
            // follower installing it would otherwise find them gone, need
            // another snapshot, and so on for ever under steady writes.
            if let Some(floor) = self.snapshot_floors.get(shard).copied()
                && !snapshot_floor_needed(&peer.node, floor)
            {
                self.snapshot_floors.remove(shard);
            }
            let store = peer.node.mut_store();
            let mut through = applied.saturating_sub(limits::LOG_ENTRIES_KEPT_BEHIND_APPLIED);
            if let Some(floor) = self.snapshot_floors.get(shard) {
                through = through.min(*floor);
            }
            if through >= store.first_index_in_memory() + limits::LOG_ENTRIES_KEPT_BEHIND_APPLIED {
                store.compact(through);
            }
        }
    }

    /// Lets the apply thread finish what it was given, then joins it.
    fn stop_applier(&mut self) {
        let _ = self.apply_inputs.send(ApplyInput::Stop);
        if let Some(thread) = self.apply_thread.take() {
            let _ = thread.join();
        }
    }

    fn start_checkpoint_if_due(&mut self) {
        self.checkpoint.wal_bytes += self.wal.take_bytes_appended();
        if self.checkpoint.in_flight || self.checkpoint.wal_bytes == 0 {
            return;
        }
        let due = self.checkpoint.wal_bytes >= limits::CHECKPOINT_WAL_BYTES
            || self.checkpoint.last.elapsed() >= Duration::from_millis(limits::CHECKPOINT_INTERVAL_MS);
        if !due {
            return;
        }
        // Everything applied so far is already written to the database; the
        // checkpoint makes it durable, so these indexes become safe to
        // truncate the WAL behind once it reports success.
        let applied: BTreeMap<ShardId, u64> = self.peers.keys().map(|s| (*s, self.progress.applied(*s))).collect();
        let db = self.db.clone();
        let inputs = self.inputs.clone();
        let spawned = std::thread::Builder::new().name("raft-checkpoint".into()).spawn(move || {
            let result = db.persist().map(|()| applied);
            let _ = inputs.blocking_send(Input::CheckpointDone(result));
        });
        match spawned {
            Ok(thread) => {
                self.checkpoint =
                    CheckpointState { in_flight: true, thread: Some(thread), wal_bytes: 0, last: Instant::now() };
            }
            Err(error) => tracing::warn!(?error, "could not start a checkpoint; will retry"),
        }
    }

    /// On a clean stop: make the database durable and drop the WAL behind it,
    /// so the next start replays nothing.
    fn final_checkpoint(&mut self) -> Result<(), StoreError> {
        self.stop_applier();
        if let Some(error) = self.progress.take_error() {
            return Err(error);
        }
        self.db.persist()?;
        let applied: BTreeMap<ShardId, u64> = self.peers.keys().map(|s| (*s, self.progress.applied(*s))).collect();
        self.wal.release_through(&applied)?;
        let stats = &self.stats;
        tracing::info!(
            fsyncs = self.wal.fsyncs(),
            commands = stats.commands_applied.load(Ordering::Relaxed),
            entries = stats.entries_applied.load(Ordering::Relaxed),
            apply_batches = stats.apply_batches.load(Ordering::Relaxed),
            keys_written = stats.keys_written.load(Ordering::Relaxed),
            "raft store stopped cleanly"
        );
        Ok(())
    }

    /// Answers everything still waiting with `Stopped`.
    fn fail_queued(&mut self) {
        for peer in self.peers.values_mut() {
            peer.fail_all(&ProposeError::Stopped);
        }
        self.queue.close();
        while let Ok(input) = self.queue.try_recv() {
            if let Input::Propose { reply, .. } = input {
                let _ = reply.send(Err(ProposeError::Stopped));
            }
        }
    }
}

/// Blocks only when the apply thread is far behind: backpressure.
fn send_to_applier(apply_inputs: &std::sync::mpsc::SyncSender<ApplyInput>, input: ApplyInput) -> Result<(), StoreError> {
    apply_inputs.send(input).map_err(|_| applier_gone())
}

/// Hands the apply thread a task that answers on `done`, and waits for the
/// answer (after every round handed over before it).
fn ask_applier(
    apply_inputs: &std::sync::mpsc::SyncSender<ApplyInput>,
    task: impl FnOnce(std::sync::mpsc::SyncSender<Result<(), StoreError>>) -> ApplyInput,
) -> Result<(), StoreError> {
    let (done, answer) = std::sync::mpsc::sync_channel(1);
    send_to_applier(apply_inputs, task(done))?;
    answer.recv().map_err(|_| applier_gone())?
}

fn applier_gone() -> StoreError {
    StoreError::Thread(std::io::Error::other("the apply thread is gone"))
}

/// Proposes the commands `peer` gathered as one entry: as the leader, into
/// its log; as a follower, forwarded to the leader through raft with a
/// context naming this node, to be answered when this node applies it.
fn propose_batch(shard: ShardId, peer: &mut Peer, contexts: &mut Contexts) {
    let batch = std::mem::take(&mut peer.batch);
    peer.batch_bytes = 0;
    let (commands, replies): (Vec<Vec<u8>>, Vec<Reply>) = batch.into_iter().unzip();
    let refuse = |replies: Vec<Reply>, error: ProposeError| {
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
    };
    if peer.is_leader() {
        match peer.node.propose(Vec::new(), encode_batch(&commands)) {
            Ok(()) => peer.await_last_entry(replies),
            Err(error) => {
                tracing::debug!(%shard, %error, "proposal refused");
                refuse(replies, peer.refused_unproposed(shard));
            }
        }
        return;
    }
    let raft = &peer.node.raft;
    let leader = raft.leader_id;
    // With no leader, a leader not heard from for two heartbeats (it may be
    // dead, and what went to it would be answered only as "may be lost"),
    // or too much forwarded and unapplied, nothing is proposed: the
    // proposers wait and try again.
    if leader == raft::INVALID_ID
        || raft.election_elapsed > 2 * raft.heartbeat_timeout()
        || peer.forwarded.len() >= limits::FORWARDED_ENTRIES_PENDING_MAX
    {
        return refuse(replies, ProposeError::NotLeader { shard, leader: None });
    }
    let (counter, context) = contexts.make();
    match peer.node.propose(context, encode_batch(&commands)) {
        Ok(()) => {
            peer.forwarded.insert(counter, Forwarded { leader, sent: Instant::now(), replies });
        }
        Err(error) => {
            tracing::debug!(%shard, %error, "forwarding refused");
            refuse(replies, peer.not_leader(shard));
        }
    }
}

/// Whether a leader takes an entry a follower forwarded: only while it leads
/// (a proposal is never passed on twice), and only plain commands with a
/// context naming their sender (configuration changes are the leader's own).
fn forwarded_entry_welcome(peer: &Peer, message: &Message) -> bool {
    peer.is_leader()
        && message.get_entries().iter().all(|entry| {
            entry.get_entry_type() == EntryType::EntryNormal
                && entry.context.len() == 16
                && entry.context[..8] == message.from.to_le_bytes()
        })
}

/// Whether a shard may count on this node being its only voter at open.
/// Not while a configuration change logged after the applied index is
/// unapplied: the node may have acted on it before a crash (the loop
/// switches configuration at commit, the database records it at apply).
fn sole_voter_at_open(applied: &ApplyState, node: NodeId, logged: &[Entry]) -> bool {
    is_sole_voter(&applied.conf, node)
        && !logged.iter().any(|entry| entry.index > applied.index && entry.get_entry_type() != EntryType::EntryNormal)
}

fn is_sole_voter(conf: &ConfState, node: NodeId) -> bool {
    conf.voters == [node.0] && conf.learners.is_empty()
}

/// This node is a replica (voter or learner) of the shard.
const HOSTED: u8 = 1;
/// This node is the shard's only voter (and there are no learners).
const SOLE_VOTER: u8 = 2;

/// The replica of `shard` for a request only its leader takes: refused
/// with `UnknownShard` or `NotLeader` (naming the leader known) otherwise.
fn leading_peer(peers: &mut BTreeMap<ShardId, Peer>, shard: ShardId) -> Result<&mut Peer, ProposeError> {
    let peer = peers.get_mut(&shard).ok_or(ProposeError::UnknownShard(shard))?;
    if !peer.is_leader() {
        return Err(peer.not_leader(shard));
    }
    Ok(peer)
}

fn replica_flags(conf: &ConfState, node: NodeId) -> u8 {
    let hosted = conf.voters.contains(&node.0) || conf.learners.contains(&node.0);
    (if hosted { HOSTED } else { 0 }) | (if is_sole_voter(conf, node) { SOLE_VOTER } else { 0 })
}

/// Readies committed entries of `shard` for the apply thread: pairs them
/// with their proposers, and applies each configuration change to raft now,
/// in log order, handing the resulting configuration along so the apply
/// thread stores it with the entry's index. `replicas`, the read flags to
/// keep current, is `None` while the shard's snapshot is being installed.
fn prepare_apply(
    shard: ShardId,
    peer: &mut Peer,
    entries: Vec<Entry>,
    replicas: Option<&BTreeMap<ShardId, AtomicU8>>,
    contexts: &Contexts,
) -> Result<ApplyTask, StoreError> {
    let mut confs = Vec::new();
    for entry in &entries {
        let corrupt = |error: protobuf::ProtobufError| StoreError::Corrupt {
            shard,
            what: "configuration change",
            reason: error.to_string(),
        };
        let applied = match entry.get_entry_type() {
            EntryType::EntryNormal => continue,
            EntryType::EntryConfChange => peer.node.apply_conf_change(&ConfChange::parse_from_bytes(&entry.data).map_err(corrupt)?),
            EntryType::EntryConfChangeV2 => {
                peer.node.apply_conf_change(&ConfChangeV2::parse_from_bytes(&entry.data).map_err(corrupt)?)
            }
        };
        // A change that does not fit the configuration (adding a voter
        // twice, removing the last one) fails alike on every replica and
        // changes nothing: keep the configuration as it is.
        let conf = applied.unwrap_or_else(|error| {
            tracing::warn!(%shard, index = entry.index, %error, "a configuration change changed nothing");
            peer.node.raft.prs().conf().to_conf_state()
        });
        tracing::info!(%shard, index = entry.index, voters = ?conf.voters, learners = ?conf.learners, "configuration changed");
        peer.node.mut_store().set_conf_state(conf.clone());
        if let Some(flags) = replicas.and_then(|r| r.get(&shard)) {
            flags.store(replica_flags(&conf, NodeId(peer.node.raft.id)), Ordering::Release);
        }
        confs.push((entry.index, conf));
    }
    Ok(ApplyTask { shard, entries: attach_replies(peer, entries, contexts), confs })
}

/// Pairs committed entries with the proposers waiting for them: by index
/// for entries this node proposed as leader, by context for entries it
/// forwarded. Proposals whose index was taken by another leader's entry are
/// answered `Dropped`.
fn attach_replies(peer: &mut Peer, entries: Vec<Entry>, contexts: &Contexts) -> Vec<(Entry, Vec<Reply>)> {
    entries
        .into_iter()
        .map(|entry| {
            let mut replies = Vec::new();
            while let Some(front) = peer.inflight.front() {
                if front.index > entry.index {
                    break;
                }
                let Some(inflight) = peer.inflight.pop_front() else { break };
                if inflight.index == entry.index && inflight.term == entry.term {
                    replies = inflight.replies;
                    break;
                }
                for reply in inflight.replies {
                    let _ = reply.send(Err(ProposeError::Dropped));
                }
            }
            // A leader's own entries carry no context, so at most one of the two matches.
            if let Some(forwarded) = contexts.ours(&entry.context).and_then(|counter| peer.forwarded.remove(&counter)) {
                replies = forwarded.replies;
            }
            (entry, replies)
        })
        .collect()
}



/// Whether a shard's log must still be kept from `floor` on: while it
/// leads, holds no more than `limits::LOG_BYTES_HELD_FOR_FOLLOWERS_MAX`, and
/// some follower is being sent a snapshot or has not reached `floor` (the
/// one the snapshot is for, before its install is done).
fn snapshot_floor_needed(node: &RawNode<ShardLog>, floor: u64) -> bool {
    let raft = &node.raft;
    raft.state == StateRole::Leader
        && node.store().bytes_in_memory() <= limits::LOG_BYTES_HELD_FOR_FOLLOWERS_MAX
        && raft
            .prs()
            .iter()
            .any(|(id, progress)| *id != raft.id && (progress.state == ProgressState::Snapshot || progress.matched < floor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShardWriter;
    use hamgam_storage::{KvRead, KvWrite, MemDb, SledDb};

    /// A counter per shard: each command adds its bytes' length and replies
    /// with the new total. Deterministic, like a real state machine must be.
    struct Counter;

    impl StateMachine for Counter {
        fn apply(
            &mut self,
            _shard: ShardId,
            _index: u64,
            command: &[u8],
            kv: &mut ShardWriter<'_, '_>,
        ) -> Result<Vec<u8>, hamgam_storage::StorageError> {
            // `fill:` and a count writes that many more keys (a large state to snapshot).
            if let Some(count) = command.strip_prefix(b"fill:") {
                let count = u32::from_le_bytes(count.try_into().unwrap());
                for i in 0..count {
                    kv.put(format!("fill-{i:08}").as_bytes(), vec![i as u8; 64]);
                }
            }
            let old = kv.get(b"total")?.map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()));
            let new = old + command.len() as u64;
            kv.put(b"total", new.to_le_bytes().to_vec());
            Ok(new.to_le_bytes().to_vec())
        }
    }

    /// The counter as this node's own replica holds it.
    fn total(handle: &RaftHandle, shard: u32) -> u64 {
        total_in(&handle.local_reader(ShardId(shard)))
    }

    fn total_in(reader: &ShardReader) -> u64 {
        reader.get(b"total").unwrap().map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()))
    }

    fn config(dir: &std::path::Path) -> StoreConfig {
        StoreConfig::single_node(NodeId(1), dir.to_path_buf(), [ShardId(0), ShardId(1), ShardId(2)])
    }

    /// The log is kept for a snapshot only while it leads, within the
    /// memory bound, and some follower is being sent one or is short of it.
    #[test]
    fn a_snapshot_floor_holds_until_every_follower_has_reached_it() {
        let conf = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        let log = ShardLog::recover(Default::default(), conf, 10, 1, Vec::new());
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = new_raw_node(NodeId(1), ShardId(1), 10, log, &logger).unwrap();
        assert!(!snapshot_floor_needed(&node, 50), "a follower keeps nothing for others");
        node.raft.become_candidate();
        node.raft.become_leader();
        for id in [2, 3] {
            let progress = node.raft.mut_prs().get_mut(id).unwrap();
            progress.matched = 60;
            progress.become_replicate();
        }
        node.raft.mut_prs().get_mut(3).unwrap().matched = 20;
        assert!(snapshot_floor_needed(&node, 50), "follower 3 has not reached the snapshot");
        node.raft.mut_prs().get_mut(3).unwrap().become_snapshot(50);
        assert!(snapshot_floor_needed(&node, 50), "follower 3 is being sent it");
        let progress = node.raft.mut_prs().get_mut(3).unwrap();
        progress.matched = 50;
        progress.become_probe();
        assert!(!snapshot_floor_needed(&node, 50), "every follower is past it");

        node.raft.mut_prs().get_mut(3).unwrap().matched = 20;
        let big = Entry { index: 11, term: 2, data: vec![0; limits::LOG_BYTES_HELD_FOR_FOLLOWERS_MAX].into(), ..Default::default() };
        node.mut_store().append(&[big]);
        assert!(!snapshot_floor_needed(&node, 50), "past the memory bound the log is trimmed anyway");
    }

    /// A leader keeps one pending read per context: two nodes' reads never
    /// share one, and an answer matches only the read it was asked for.
    #[test]
    fn read_contexts_are_unique_across_nodes_and_match_only_their_read() {
        let (mut one, mut two) = (PendingReads::new(NodeId(1)), PendingReads::new(NodeId(2)));
        two.contexts.next = one.contexts.next;
        let (reply, _answer) = oneshot::channel();
        let asked_by_one = one.ask(ShardId(3), reply);
        let (reply, _answer) = oneshot::channel();
        let asked_by_two = two.ask(ShardId(3), reply);
        assert_ne!(asked_by_one, asked_by_two);
        assert!(one.answered(ShardId(3), &asked_by_two).is_none(), "another node's read");
        assert!(one.answered(ShardId(4), &asked_by_one).is_none(), "another shard's read");
        assert!(one.answered(ShardId(3), &asked_by_one[..12]).is_none(), "a cut context");
        assert!(one.answered(ShardId(3), &asked_by_one).is_some());
        assert!(one.answered(ShardId(3), &asked_by_one).is_none(), "answered once");
    }

    #[test]
    fn a_logged_configuration_change_not_yet_applied_means_not_counting_on_being_the_sole_voter() {
        let applied = ApplyState { index: 10, term: 2, conf: ConfState { voters: vec![1], ..Default::default() } };
        let normal = |index| Entry { index, term: 2, ..Default::default() };
        let change = |index| Entry { index, term: 2, entry_type: EntryType::EntryConfChange, ..Default::default() };
        assert!(sole_voter_at_open(&applied, NodeId(1), &[normal(11), normal(12)]));
        assert!(sole_voter_at_open(&applied, NodeId(1), &[change(9), normal(11)]), "a change already applied");
        assert!(!sole_voter_at_open(&applied, NodeId(1), &[normal(11), change(12)]));
        assert!(!sole_voter_at_open(&applied, NodeId(2), &[]), "another node's shard");
    }

    #[test]
    fn entry_batches_round_trip_and_reject_garbage() {
        let commands = vec![b"a".to_vec(), Vec::new(), b"ccc".to_vec()];
        let encoded = encode_batch(&commands);
        assert_eq!(decode_batch(&encoded).unwrap(), vec![&b"a"[..], &b""[..], &b"ccc"[..]]);
        assert!(decode_batch(&encoded[..encoded.len() - 1]).is_err());
        assert!(decode_batch(&[9, 0, 0, 0, 0]).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_proposals_apply_once_each_and_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(MemDb::new());
        let store = Store::open(config(dir.path()), db, Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
        let handle = store.handle();
        let mut tasks = Vec::new();
        for i in 0..400u32 {
            let handle = handle.clone();
            tasks.push(tokio::spawn(async move { handle.propose(ShardId(1 + i % 2), vec![0u8; 3]).await }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(total(&handle, 1) + total(&handle, 2), 1200);
        let rounds = handle.stats().wal_rounds.load(Ordering::Relaxed);
        assert!(rounds < 400, "400 proposals took {rounds} WAL rounds: no batching");
        store.stop().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_survives_restart_with_and_without_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db: Arc<dyn Db> = Arc::new(SledDb::open(&dir.path().join("db"), 8 << 20).unwrap());
            let store = Store::open(config(dir.path()), db, Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
            let handle = store.handle();
            for _ in 0..10 {
                handle.propose(ShardId(1), vec![1; 5]).await.unwrap();
            }
            store.stop().unwrap();
        }
        {
            let db: Arc<dyn Db> = Arc::new(SledDb::open(&dir.path().join("db"), 8 << 20).unwrap());
            let store = Store::open(config(dir.path()), db, Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
            let handle = store.handle();
            assert_eq!(total(&handle, 1), 50);
            let reply = handle.propose(ShardId(1), vec![1; 5]).await.unwrap();
            assert_eq!(reply, 55u64.to_le_bytes());
            store.crash();
        }
        {
            // After a crash the WAL replays what the database did not persist.
            let db: Arc<dyn Db> = Arc::new(SledDb::open(&dir.path().join("db"), 8 << 20).unwrap());
            let store = Store::open(config(dir.path()), db, Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
            let reply = store.handle().propose(ShardId(1), vec![1; 5]).await.unwrap();
            assert_eq!(reply, 60u64.to_le_bytes());
            store.stop().unwrap();
        }
    }

    /// The database loses everything (as if its unsynced writes vanished in
    /// a power cut); the WAL must bring every acknowledged command back
    /// before a fresh read on the sole voter, the start-up wait or a new
    /// proposal sees the state, though the WAL's recorded commit index
    /// lags its last entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_replay_rebuilds_state_lost_from_the_database_before_anything_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Store::open(config(dir.path()), Arc::new(MemDb::new()), Box::new(Counter), Box::new(crate::NoPeers));
        let store = open().unwrap();
        for _ in 0..7 {
            store.handle().propose(ShardId(2), vec![1; 2]).await.unwrap();
        }
        store.crash();
        for (after, read_index) in [("a fresh read", true), ("the start-up wait", false)] {
            let store = open().unwrap();
            let handle = store.handle();
            if read_index {
                handle.read_index(ShardId(2)).await.unwrap();
            } else {
                handle.replayed().await.unwrap();
            }
            assert_eq!(total(&handle, 2), 14, "{after} missed acknowledged commands");
            store.crash();
        }
        // A new proposal orders after the replay.
        let store = open().unwrap();
        let reply = store.handle().propose(ShardId(2), vec![1; 2]).await.unwrap();
        assert_eq!(reply, 16u64.to_le_bytes());
        store.stop().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_keep_the_wal_bounded_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(SledDb::open(&dir.path().join("db"), 8 << 20).unwrap());
        let store = Store::open(config(dir.path()), db, Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
        let handle = store.handle();
        // Five times the checkpoint volume, in 128 KiB commands.
        let command = vec![7u8; 128 << 10];
        let commands = 5 * limits::CHECKPOINT_WAL_BYTES as usize / command.len();
        for _ in 0..commands {
            handle.propose(ShardId(1), command.clone()).await.unwrap();
        }
        let checkpoints = handle.stats().checkpoints.load(Ordering::Relaxed);
        let released = handle.stats().wal_segments_released.load(Ordering::Relaxed);
        // A segment goes at the checkpoint after the one that closed it
        // (writes go on while a checkpoint runs), so releases trail by one.
        assert!(checkpoints >= 3, "checkpoints ran on their own ({checkpoints})");
        assert!(released >= checkpoints - 1, "{released} segments deleted after {checkpoints} checkpoints");
        let files: Vec<(String, u64)> = std::fs::read_dir(dir.path().join("wal"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        let segments = files.iter().filter(|(name, _)| name.ends_with(".wal")).count();
        let wal_bytes: u64 = files.iter().map(|(_, len)| len).sum();
        let written = (commands * command.len()) as u64;
        // About two checkpoints' worth stays: the one being written and the
        // one a checkpoint has yet to cover. Segments made ahead are whole
        // (zeros past their records), and one more may be in the making.
        assert!(segments <= 3, "the WAL holds {segments} segments after {written} bytes written ({files:?})");
        assert!(
            wal_bytes <= 4 * limits::WAL_SEGMENT_BYTES_MAX,
            "the WAL holds {wal_bytes} bytes of {written} written ({checkpoints} checkpoints)"
        );
        assert_eq!(total(&handle, 1), written, "and nothing was lost on the way");
        store.stop().unwrap();
    }

    /// Nodes in one process, wired by direct calls: the raft logic of a
    /// cluster without the network (the network's own tests use QUIC).
    #[derive(Clone, Default)]
    struct InProcess {
        handles: Arc<std::sync::Mutex<BTreeMap<NodeId, RaftHandle>>>,
        /// Proposals that went through the forwarder.
        forwarded: Arc<AtomicU64>,
        /// While set, proposals a follower forwards through raft are lost on the way.
        lose_forwarded_entries: Arc<std::sync::atomic::AtomicBool>,
    }

    impl InProcess {
        fn get(&self, node: NodeId) -> Option<RaftHandle> {
            self.handles.lock().unwrap().get(&node).cloned()
        }

        /// Opens `node`'s store under `dir` on this network.
        fn open(
            &self,
            dir: &std::path::Path,
            node: NodeId,
            shards: BTreeMap<ShardId, Vec<NodeId>>,
            db: Arc<MemDb>,
        ) -> Store {
            let config = StoreConfig { node, dir: dir.join(format!("store-{}", node.0)), shards };
            let store = Store::open(config, db, Box::new(Counter), Box::new(self.clone())).unwrap();
            store.handle().set_forwarder(Arc::new(self.clone()));
            self.handles.lock().unwrap().insert(node, store.handle());
            store
        }

        /// Opens a store on each of `nodes`, all replicas of `shards`.
        fn open_all(&self, dir: &std::path::Path, nodes: &[NodeId], shards: &[ShardId]) -> BTreeMap<NodeId, Store> {
            let replicas: BTreeMap<ShardId, Vec<NodeId>> =
                shards.iter().map(|shard| (*shard, nodes.to_vec())).collect();
            nodes.iter().map(|node| (*node, self.open(dir, *node, replicas.clone(), Arc::new(MemDb::new())))).collect()
        }
    }

    impl RaftTransport for InProcess {
        fn send(&mut self, messages: Vec<(ShardId, Message)>) {
            for (shard, message) in messages {
                let (Some(to), Some(from)) = (self.get(NodeId(message.to)), self.get(NodeId(message.from))) else {
                    continue;
                };
                if message.get_msg_type() == MessageType::MsgPropose
                    && self.lose_forwarded_entries.load(Ordering::Relaxed)
                {
                    continue;
                }
                if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    // As a network transport does: the file first, in pieces, then the message.
                    let mut outgoing = from.outgoing_snapshot(shard, &message).unwrap();
                    let mut incoming = to.incoming_snapshot(shard, &message).unwrap();
                    let mut piece = vec![0u8; 4096];
                    loop {
                        let n = std::io::Read::read(&mut outgoing, &mut piece).unwrap();
                        if n == 0 {
                            break;
                        }
                        incoming.write(&piece[..n]).unwrap();
                    }
                    incoming.finish().unwrap();
                }
                to.step(shard, message);
            }
        }
    }

    impl ProposalForwarder for InProcess {
        fn forward(&self, leader: NodeId, shard: ShardId, command: Vec<u8>) -> crate::ForwardedReply {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            let target = self.get(leader);
            Box::pin(async move {
                match target {
                    Some(handle) => handle.propose_here(shard, command).await,
                    None => Err(ProposeError::NoLeader(shard)),
                }
            })
        }

        fn replicas(&self, _shard: ShardId) -> Vec<NodeId> {
            self.handles.lock().unwrap().keys().copied().collect()
        }

        fn read(&self, node: NodeId, shard: ShardId, read: crate::RemoteRead) -> crate::RemoteReadReply {
            let target = self.get(node);
            Box::pin(async move {
                match target {
                    Some(handle) => handle.serve_remote_read(shard, read).await,
                    None => Err(ProposeError::NoLeader(shard)),
                }
            })
        }
    }

    async fn wait_for_leader(handle: &RaftHandle, shard: ShardId, not: Option<NodeId>) -> NodeId {
        for _ in 0..600 {
            if let Some(leader) = handle.leader(shard)
                && Some(leader) != not
            {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("shard {shard} elected no leader");
    }

    /// A forwarded entry that never reaches the leader (dropped by a leader
    /// handing over its lead, or lost with its message) is answered in
    /// bounded time, with the leader unchanged, and nothing is applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forwarded_entry_lost_on_the_way_is_answered_dropped_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let network = InProcess::default();
        let stores = network.open_all(dir.path(), &nodes, &[ShardId(1)]);
        let leader = wait_for_leader(&stores[&NodeId(1)].handle(), ShardId(1), None).await;
        let follower = stores[nodes.iter().find(|n| **n != leader).unwrap()].handle();
        follower.propose(ShardId(1), vec![0; 2]).await.unwrap();

        network.lose_forwarded_entries.store(true, Ordering::Relaxed);
        let lost = tokio::time::timeout(Duration::from_secs(60), follower.propose(ShardId(1), vec![0; 3])).await;
        assert!(matches!(lost, Ok(Err(ProposeError::Dropped))), "answered, as possibly lost: {lost:?}");
        assert_eq!(follower.leader(ShardId(1)), Some(leader), "by the wait, not a leader change");

        network.lose_forwarded_entries.store(false, Ordering::Relaxed);
        let reply = follower.propose(ShardId(1), vec![0; 2]).await.unwrap();
        assert_eq!(reply, 4u64.to_le_bytes(), "the lost entry never applied; the next one did");
        for (_, store) in stores {
            store.stop().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_replicas_agree_read_fresh_and_survive_losing_the_leader() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let network = InProcess::default();
        let mut stores = network.open_all(dir.path(), &nodes, &[ShardId(1), ShardId(2)]);
        let leader = wait_for_leader(&stores[&NodeId(1)].handle(), ShardId(1), None).await;

        // Proposals through every node, answered once applied there:
        // followers forward to the leader through raft, not the forwarder
        // (which serves nodes without a replica).
        for i in 0..30u64 {
            let via = stores[&nodes[(i % 3) as usize]].handle();
            let reply = via.propose(ShardId(1), vec![0; 2]).await.unwrap();
            assert_eq!(reply, (2 * (i + 1)).to_le_bytes(), "the reply is the applied state on the proposing node");
            assert_eq!(total(&via, 1), 2 * (i + 1), "applied on the proposing node before the answer");
        }
        assert_eq!(network.forwarded.load(Ordering::Relaxed), 0, "hosted shards never use the forwarder");
        // A fresh read on a follower sees every acknowledged write at once.
        let follower = nodes.iter().copied().find(|n| *n != leader).unwrap();
        let handle = stores[&follower].handle();
        handle.read_index(ShardId(1)).await.unwrap();
        assert_eq!(total(&handle, 1), 60);

        // Lose the leader. A proposal forwarded to it at once is answered
        // (it may be lost: `Dropped`), not left waiting; the other two
        // elect a leader and go on from the acknowledged state.
        stores.remove(&leader).unwrap().stop().unwrap();
        network.handles.lock().unwrap().remove(&leader);
        let survivor = stores[&follower].handle();
        let at_once = tokio::time::timeout(Duration::from_secs(60), survivor.propose(ShardId(1), vec![0; 2])).await;
        let made = match at_once.expect("a proposal to a dead leader is answered") {
            Ok(reply) => {
                assert_eq!(reply, 62u64.to_le_bytes());
                2
            }
            Err(ProposeError::Dropped) => 0u64,
            Err(other) => panic!("{other}"),
        };
        let new_leader = wait_for_leader(&survivor, ShardId(1), Some(leader)).await;
        assert_ne!(new_leader, leader);
        let reply = survivor.propose(ShardId(1), vec![0; 2]).await.unwrap();
        assert_eq!(reply, (62 + made).to_le_bytes(), "the new leader continues from the acknowledged state");
        for store in stores.values() {
            let handle = store.handle();
            handle.read_index(ShardId(1)).await.unwrap();
            assert_eq!(total(&handle, 1), 62 + made);
        }
        for (_, store) in stores {
            store.stop().unwrap();
        }
    }

    async fn eventually_total(handle: &RaftHandle, shard: u32, expected: u64) {
        for _ in 0..1000 {
            if total(handle, shard) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("shard {shard} never reached {expected} (at {})", total(handle, shard));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_added_later_catches_up_by_snapshot_votes_and_keeps_its_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let initial = vec![NodeId(1), NodeId(2), NodeId(3)];
        let network = InProcess::default();
        let open = |node: NodeId, voters: Vec<NodeId>, db: Arc<MemDb>| {
            network.open(dir.path(), node, [(ShardId(1), voters)].into(), db)
        };
        let mut stores = BTreeMap::new();
        let mut dbs = BTreeMap::new();
        for &node in &initial {
            let db = Arc::new(MemDb::new());
            dbs.insert(node, db.clone());
            stores.insert(node, open(node, initial.clone(), db));
        }
        // Node 4 hosts shard 1 only once a leader adds it.
        let db4 = Arc::new(MemDb::new());
        stores.insert(NodeId(4), open(NodeId(4), Vec::new(), db4.clone()));
        let leader = wait_for_leader(&stores[&NodeId(1)].handle(), ShardId(1), None).await;
        let lead = stores[&leader].handle();
        for _ in 0..20 {
            lead.propose(ShardId(1), vec![0; 2]).await.unwrap();
        }
        // Enough keys that the snapshot is made, sent and installed in several pieces.
        const FILLED: u32 = 25_000;
        let fill = [&b"fill:"[..], &FILLED.to_le_bytes()].concat();
        lead.propose(ShardId(1), fill.clone()).await.unwrap();
        let total_before_outsider = 40 + fill.len() as u64;
        assert_eq!(total(&stores[&NodeId(4)].handle(), 1), 0);
        // Before it hosts the shard, node 4 still serves it: proposals find
        // the leader through a replica, reads go to one and are fresh.
        let outsider = stores[&NodeId(4)].handle();
        assert!(!outsider.hosts(ShardId(1)));
        let expected_total = total_before_outsider + 2;
        assert_eq!(outsider.propose(ShardId(1), vec![0; 2]).await.unwrap(), expected_total.to_le_bytes());
        assert_eq!(total_in(&outsider.reader(ShardId(1))), expected_total, "a read elsewhere sees the write just made");
        assert_eq!(total(&outsider, 1), 0, "and nothing was written here");
        assert!(matches!(
            stores[&NodeId(4)].handle().change_replicas(ShardId(1), ReplicaChange::AddLearner(NodeId(4))).await,
            Err(ProposeError::NotLeader { .. })
        ));

        lead.change_replicas(ShardId(1), ReplicaChange::AddLearner(NodeId(4))).await.unwrap();
        eventually_total(&stores[&NodeId(4)].handle(), 1, expected_total).await;
        // The install's last batch is durable before the store loop records
        // the shard as hosted.
        for _ in 0..250 {
            if outsider.hosts(ShardId(1)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(outsider.hosts(ShardId(1)));
        assert_eq!(stores[&NodeId(4)].handle().stats().snapshots_installed.load(Ordering::Relaxed), 1);
        let filled = outsider
            .local_reader(ShardId(1))
            .scan(&KeyRange::prefix(b"fill-"), Order::Ascending, usize::MAX)
            .unwrap();
        assert_eq!(filled.len(), FILLED as usize, "every key of the snapshot arrived");
        assert!(filled.iter().enumerate().all(|(i, (k, v))| *k == format!("fill-{i:08}").into_bytes() && *v == vec![i as u8; 64]));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("store-4").join("snapshots")).unwrap().collect();
        assert!(left.is_empty(), "the received file is gone once installed: {left:?}");
        lead.change_replicas(ShardId(1), ReplicaChange::AddVoter(NodeId(4))).await.unwrap();
        // Take out a follower other than the leader: three voters again.
        let removed = initial.iter().copied().find(|n| *n != leader).unwrap();
        lead.change_replicas(ShardId(1), ReplicaChange::Remove(removed)).await.unwrap();
        let status = lead.status().await.unwrap();
        let mut expected: Vec<NodeId> = initial.iter().copied().filter(|n| *n != removed).collect();
        expected.push(NodeId(4));
        assert_eq!(status[0].voters, expected);

        // The removed node gives its replica up: empty, its data deleted,
        // and so it stays after a restart (its old log is ignored).
        let gone = stores[&removed].handle();
        for _ in 0..200 {
            if !gone.hosts(ShardId(1)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!gone.hosts(ShardId(1)), "the removed node still counts itself a replica");
        assert!(total(&gone, 1) > 0, "its data stays until it is told to give the replica up");
        gone.release_replica(ShardId(1)).await.unwrap();
        assert!(!gone.hosts(ShardId(1)));
        // The reset is durable when the call returns; the keys go right after.
        for _ in 0..200 {
            if total(&gone, 1) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(total(&gone, 1), 0, "the removed node's data is deleted");
        let removed_db = dbs[&removed].clone();
        stores.remove(&removed).unwrap().stop().unwrap();
        network.handles.lock().unwrap().remove(&removed);
        let reopened = open(removed, initial.clone(), removed_db);
        let view = reopened.handle().status().await.unwrap();
        assert_eq!((view[0].applied, view[0].voters.len()), (0, 0), "empty after a restart: {view:?}");
        network.handles.lock().unwrap().remove(&removed);
        reopened.stop().unwrap();

        // Writes go on with node 4 voting.
        lead.propose(ShardId(1), vec![0; 2]).await.unwrap();
        eventually_total(&stores[&NodeId(4)].handle(), 1, expected_total + 2).await;

        // Node 4 restarts with its configuration from disk, not from its
        // (empty) start-up list, and still counts in the quorum.
        stores.remove(&NodeId(4)).unwrap().stop().unwrap();
        network.handles.lock().unwrap().remove(&NodeId(4));
        let restarted = open(NodeId(4), Vec::new(), db4);
        let status = restarted.handle().status().await.unwrap();
        assert_eq!(status[0].voters, expected);
        stores.insert(NodeId(4), restarted);
        let other = expected.iter().copied().find(|n| *n != leader && *n != NodeId(4)).unwrap();
        stores.remove(&other).unwrap().stop().unwrap();
        network.handles.lock().unwrap().remove(&other);
        // Leader and node 4 are two of three: a quorum only with node 4.
        let reply = stores[&leader].handle().propose(ShardId(1), vec![0; 2]).await.unwrap();
        assert_eq!(reply, (expected_total + 4).to_le_bytes());

        // A leader asked to remove itself hands leadership to node 4 (the
        // only other voter that is up) and names it; there the removal goes.
        let refused = stores[&leader].handle().change_replicas(ShardId(1), ReplicaChange::Remove(leader)).await;
        assert_eq!(refused, Err(ProposeError::NotLeader { shard: ShardId(1), leader: Some(NodeId(4)) }));
        let successor = stores[&NodeId(4)].handle();
        assert_eq!(wait_for_leader(&successor, ShardId(1), Some(leader)).await, NodeId(4));
        for (_, store) in stores {
            store.stop().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_shards_and_oversize_commands_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path()), Arc::new(MemDb::new()), Box::new(Counter), Box::new(crate::NoPeers)).unwrap();
        let handle = store.handle();
        assert_eq!(handle.propose(ShardId(99), vec![]).await, Err(ProposeError::UnknownShard(ShardId(99))));
        let big = vec![0; limits::COMMAND_BYTES_MAX + 1];
        assert!(matches!(handle.propose(ShardId(1), big).await, Err(ProposeError::TooLarge(_))));
        store.stop().unwrap();
        assert_eq!(handle.propose(ShardId(1), vec![1]).await, Err(ProposeError::Stopped));
    }
}
