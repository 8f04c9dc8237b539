//! The apply thread: committed entries into the database.
//!
//! The store loop hands over each round's committed entries (with the
//! proposers waiting for them) and goes on with the next round's WAL write
//! while this thread applies, so the fsync and the database work overlap.
//! When it falls behind, it takes every round waiting and applies them in one
//! database batch: the busier the node, the bigger the batch.
//!
//! One batch holds the state machine's writes and one node-wide record of
//! every shard's applied index, so after a crash the database is at a
//! consistent point and the WAL replays what came after it. Proposers are
//! answered only after the batch is written. Progress goes back to the store
//! loop through atomics (never a channel the loop could be blocked on).
//!
//! Snapshots are made and installed here too, in order with the rounds: a
//! snapshot of a shard is its state-machine range as of its applied index
//! (read between batches, so it is a consistent point), and installing one
//! replaces that range and the shard's applied state in one batch, made
//! durable before the store loop goes on.

use crate::{ProposeError, StateMachine, StoreError, StoreStats, state_machine_prefix};
use hamgam_storage::{Db, KeyRange, KvRead, KvWrite, Order, Prefixed, Txn};
use hamgam_types::{ShardId, limits};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Snapshot};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

pub(crate) type Reply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;

/// Rounds the apply thread may take into one database batch.
const ROUNDS_PER_BATCH_MAX: usize = 32;

/// A shard's applied point, stored with the state it describes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApplyState {
    pub index: u64,
    pub term: u64,
    pub conf: ConfState,
}

/// Where the node-wide applied-state record lives: a prefix no shard uses.
const APPLIED_KEY: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x00];
const APPLIED_VERSION: u8 = 1;

pub(crate) fn encode_applied(states: &BTreeMap<ShardId, ApplyState>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + states.len() * 32);
    out.push(APPLIED_VERSION);
    out.extend_from_slice(&(states.len() as u32).to_le_bytes());
    for (shard, state) in states {
        out.extend_from_slice(&shard.0.to_le_bytes());
        out.extend_from_slice(&state.index.to_le_bytes());
        out.extend_from_slice(&state.term.to_le_bytes());
        // Encoding a ConfState into a Vec cannot fail: no size limits apply.
        let conf = state.conf.write_to_bytes().unwrap_or_default();
        out.extend_from_slice(&(conf.len() as u32).to_le_bytes());
        out.extend_from_slice(&conf);
    }
    out
}

fn decode_applied(bytes: &[u8]) -> Result<BTreeMap<ShardId, ApplyState>, String> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("applied-state record cut short".into());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let word4 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let word8 = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    };
    let version = take(1)?[0];
    if version != APPLIED_VERSION {
        return Err(format!("unknown applied-state version {version}"));
    }
    let count = word4(take(4)?);
    let mut states = BTreeMap::new();
    for _ in 0..count {
        let shard = ShardId(word4(take(4)?));
        let index = word8(take(8)?);
        let term = word8(take(8)?);
        let conf_len = word4(take(4)?) as usize;
        let mut conf = ConfState::default();
        conf.merge_from_bytes(take(conf_len)?).map_err(|e| e.to_string())?;
        states.insert(shard, ApplyState { index, term, conf });
    }
    Ok(states)
}

pub(crate) fn read_applied(db: &dyn Db) -> Result<BTreeMap<ShardId, ApplyState>, StoreError> {
    match db.get(APPLIED_KEY)? {
        None => Ok(BTreeMap::new()),
        Some(bytes) => decode_applied(&bytes)
            .map_err(|reason| StoreError::Corrupt { shard: ShardId(u32::MAX), what: "applied state", reason }),
    }
}

pub(crate) fn write_applied(txn: &mut Txn<'_>, states: &BTreeMap<ShardId, ApplyState>) {
    txn.put(APPLIED_KEY, encode_applied(states));
}

/// Committed entries of one shard, each with the proposers waiting for it.
pub(crate) struct ApplyTask {
    pub shard: ShardId,
    pub entries: Vec<(Entry, Vec<Reply>)>,
    /// The configuration after each configuration-change entry, by index:
    /// raft computed it when the store loop applied the change to raft.
    pub confs: Vec<(u64, ConfState)>,
}

/// Keys deleted per batch when a replica is released.
const RELEASE_BATCH_KEYS: usize = 10_000;

pub(crate) enum ApplyInput {
    Round(Vec<ApplyTask>),
    /// Make a snapshot of the shard's applied state for a lagging follower.
    GenerateSnapshot(ShardId),
    /// Replace the shard's state with the leader's snapshot, durably, then say so.
    InstallSnapshot { shard: ShardId, snapshot: Snapshot, done: std::sync::mpsc::SyncSender<Result<(), StoreError>> },
    /// This node is no longer a replica of the shard: reset it to empty,
    /// durably, say so, then delete its data.
    Release { shard: ShardId, done: std::sync::mpsc::SyncSender<Result<(), StoreError>> },
    Stop,
}

/// What the apply thread shares with the store loop.
#[derive(Debug)]
pub(crate) struct ApplyProgress {
    /// Applied index per shard, published after the batch holding it is written.
    pub applied: BTreeMap<ShardId, AtomicU64>,
    pub failed: AtomicBool,
    pub error: Mutex<Option<StoreError>>,
    /// Snapshots made for the store loop to serve.
    pub snapshots: Mutex<Vec<(ShardId, Snapshot)>>,
}

impl ApplyProgress {
    pub(crate) fn new(states: &BTreeMap<ShardId, ApplyState>) -> ApplyProgress {
        ApplyProgress {
            applied: states.iter().map(|(s, a)| (*s, AtomicU64::new(a.index))).collect(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            snapshots: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn applied(&self, shard: ShardId) -> u64 {
        self.applied.get(&shard).map_or(0, |a| a.load(Ordering::Acquire))
    }

    pub(crate) fn take_error(&self) -> Option<StoreError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub(crate) struct Applier {
    pub db: Arc<dyn Db>,
    pub machine: Box<dyn StateMachine>,
    pub states: BTreeMap<ShardId, ApplyState>,
    pub progress: Arc<ApplyProgress>,
    pub stats: Arc<StoreStats>,
}

impl Applier {
    /// Runs until told to stop or until the channel closes.
    pub(crate) fn run(mut self, inputs: std::sync::mpsc::Receiver<ApplyInput>, wake: impl Fn()) {
        let mut next = inputs.recv().ok();
        while let Some(first) = next.take() {
            // Gather consecutive rounds into one batch; anything else waits
            // until they are written, so it sees their state.
            let mut rounds = Vec::new();
            let mut other = None;
            match first {
                ApplyInput::Round(tasks) => rounds.push(tasks),
                input => other = Some(input),
            }
            while other.is_none() && rounds.len() < ROUNDS_PER_BATCH_MAX {
                match inputs.try_recv() {
                    Ok(ApplyInput::Round(tasks)) => rounds.push(tasks),
                    Ok(input) => other = Some(input),
                    Err(_) => break,
                }
            }
            let mut result = if rounds.is_empty() { Ok(()) } else { self.apply(rounds) };
            let mut stop = false;
            match other {
                _ if result.is_err() => {}
                None => {}
                Some(ApplyInput::Stop) => stop = true,
                Some(ApplyInput::GenerateSnapshot(shard)) => result = self.generate_snapshot(shard),
                Some(ApplyInput::InstallSnapshot { shard, snapshot, done }) => {
                    result = self.install_snapshot(shard, &snapshot);
                    let answer = match &result {
                        Ok(()) => Ok(()),
                        Err(error) => Err(StoreError::Corrupt { shard, what: "snapshot", reason: error.to_string() }),
                    };
                    let _ = done.send(answer);
                }
                Some(ApplyInput::Release { shard, done }) => {
                    result = self.release(shard, &done);
                }
                Some(ApplyInput::Round(_)) => {}
            }
            if let Err(error) = result {
                tracing::error!(?error, "apply failed; the store stops");
                *self.progress.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                self.progress.failed.store(true, Ordering::Release);
                wake();
                return;
            }
            wake();
            if stop {
                return;
            }
            next = inputs.recv().ok();
        }
    }

    /// A snapshot of `shard` as of its applied index, for the store loop to send.
    fn generate_snapshot(&mut self, shard: ShardId) -> Result<(), StoreError> {
        let Some(state) = self.states.get(&shard) else { return Ok(()) };
        let prefix = state_machine_prefix(shard);
        let pairs = self.db.scan(&KeyRange::prefix(&prefix), Order::Ascending, usize::MAX)?;
        let mut data = Vec::new();
        data.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
        for (key, value) in &pairs {
            let key = &key[prefix.len()..];
            data.extend_from_slice(&(key.len() as u32).to_le_bytes());
            data.extend_from_slice(key);
            data.extend_from_slice(&(value.len() as u32).to_le_bytes());
            data.extend_from_slice(value);
        }
        if data.len() > limits::SNAPSHOT_BYTES_MAX {
            tracing::error!(%shard, bytes = data.len(), "a shard is too large to ship as one snapshot");
            return Ok(());
        }
        let mut snapshot = Snapshot { data: data.into(), ..Default::default() };
        let meta = snapshot.mut_metadata();
        meta.index = state.index;
        meta.term = state.term;
        meta.set_conf_state(state.conf.clone());
        tracing::info!(%shard, index = state.index, bytes = snapshot.data.len(), keys = pairs.len(), "made a snapshot");
        self.progress.snapshots.lock().unwrap_or_else(|p| p.into_inner()).push((shard, snapshot));
        self.stats.snapshots_made.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Replaces `shard`'s range and applied state with `snapshot`, in one
    /// batch, and makes it durable: the WAL no longer holds what it replaced.
    /// Resets `shard` to an empty replica (applied index 0, no
    /// configuration: a later re-add starts from a snapshot) durably, tells
    /// the store loop, then deletes the shard's keys in bounded batches. A
    /// crash in between leaves keys that the next snapshot installed for
    /// the shard deletes.
    fn release(&mut self, shard: ShardId, done: &std::sync::mpsc::SyncSender<Result<(), StoreError>>) -> Result<(), StoreError> {
        let db = self.db.clone();
        self.states.insert(shard, ApplyState { index: 0, term: 0, conf: ConfState::default() });
        let mut txn = Txn::new(&*db);
        write_applied(&mut txn, &self.states);
        let reset = db.write(&txn.into_batch()).and_then(|()| db.persist());
        if let Err(error) = reset {
            let _ = done.send(Err(StoreError::Corrupt { shard, what: "release", reason: error.to_string() }));
            return Err(error.into());
        }
        if let Some(applied) = self.progress.applied.get(&shard) {
            applied.store(0, Ordering::Release);
        }
        self.machine.snapshot_installed(shard);
        let _ = done.send(Ok(()));
        let range = KeyRange::prefix(&state_machine_prefix(shard));
        let mut deleted = 0usize;
        loop {
            let keys = db.scan(&range, Order::Ascending, RELEASE_BATCH_KEYS)?;
            if keys.is_empty() {
                break;
            }
            let mut txn = Txn::new(&*db);
            for (key, _) in &keys {
                txn.delete(key);
            }
            db.write(&txn.into_batch())?;
            deleted += keys.len();
        }
        tracing::info!(%shard, keys = deleted, "this node is no longer a replica of the shard; its data is deleted");
        Ok(())
    }

    fn install_snapshot(&mut self, shard: ShardId, snapshot: &Snapshot) -> Result<(), StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt { shard, what: "snapshot", reason: reason.into() };
        let prefix = state_machine_prefix(shard);
        let db = self.db.clone();
        let mut txn = Txn::new(&*db);
        for (key, _) in db.scan(&KeyRange::prefix(&prefix), Order::Ascending, usize::MAX)? {
            txn.delete(&key);
        }
        let mut rest: &[u8] = &snapshot.data;
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            if rest.len() < n {
                return Err(corrupt("cut short"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let count = u64::from_le_bytes(take(8)?.try_into().map_err(|_| corrupt("count"))?);
        let mut writer = Prefixed::new(&mut txn, &prefix);
        for _ in 0..count {
            let key_len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| corrupt("key length"))?) as usize;
            let key = take(key_len)?.to_vec();
            let value_len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| corrupt("value length"))?) as usize;
            writer.put(&key, take(value_len)?.to_vec());
        }
        let meta = snapshot.get_metadata();
        let state = ApplyState { index: meta.index, term: meta.term, conf: meta.get_conf_state().clone() };
        self.states.insert(shard, state);
        write_applied(&mut txn, &self.states);
        db.write(&txn.into_batch())?;
        db.persist()?;
        if let Some(applied) = self.progress.applied.get(&shard) {
            applied.store(meta.index, Ordering::Release);
        }
        self.machine.snapshot_installed(shard);
        self.stats.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%shard, index = meta.index, keys = count, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply(&mut self, rounds: Vec<Vec<ApplyTask>>) -> Result<(), StoreError> {
        let db = self.db.clone();
        let mut txn = Txn::new(&*db);
        let mut answers: Vec<(Reply, Result<Vec<u8>, ProposeError>)> = Vec::new();
        let (mut commands, mut entries_applied) = (0u64, 0u64);
        for task in rounds.into_iter().flatten() {
            let shard = task.shard;
            let Some(state) = self.states.get_mut(&shard) else { continue };
            for (entry, replies) in task.entries {
                if entry.index <= state.index {
                    continue;
                }
                match entry.get_entry_type() {
                    EntryType::EntryNormal => {
                        let mut results = Vec::new();
                        if !entry.data.is_empty() {
                            let batch = crate::store::decode_batch(&entry.data)
                                .map_err(|reason| StoreError::Corrupt { shard, what: "committed entry", reason })?;
                            let mut writer = Prefixed::new(&mut txn, &state_machine_prefix(shard));
                            for command in batch {
                                results.push(self.machine.apply(shard, entry.index, command, &mut writer)?);
                            }
                            commands += results.len() as u64;
                        }
                        if replies.len() == results.len() {
                            answers.extend(replies.into_iter().zip(results.into_iter().map(Ok)));
                        } else {
                            answers.extend(replies.into_iter().map(|r| (r, Err(ProposeError::Dropped))));
                        }
                    }
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        let Some((_, conf)) = task.confs.iter().find(|(index, _)| *index == entry.index) else {
                            return Err(StoreError::Corrupt {
                                shard,
                                what: "configuration change",
                                reason: format!("no configuration computed for entry {}", entry.index),
                            });
                        };
                        state.conf = conf.clone();
                        answers.extend(replies.into_iter().map(|r| (r, Ok(Vec::new()))));
                    }
                }
                state.index = entry.index;
                state.term = entry.term;
                entries_applied += 1;
            }
        }
        write_applied(&mut txn, &self.states);
        let batch = txn.into_batch();
        db.write(&batch)?;
        self.stats.apply_batches.fetch_add(1, Ordering::Relaxed);
        self.stats.keys_written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (shard, state) in &self.states {
            if let Some(applied) = self.progress.applied.get(shard) {
                applied.store(state.index, Ordering::Release);
            }
        }
        self.machine.after_round();
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        self.stats.commands_applied.fetch_add(commands, Ordering::Relaxed);
        self.stats.entries_applied.fetch_add(entries_applied, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_states_round_trip_and_damage_is_named() {
        let mut conf = ConfState::default();
        conf.voters = vec![1, 2, 3];
        let states = BTreeMap::from([
            (ShardId(0), ApplyState { index: 7, term: 2, conf: conf.clone() }),
            (ShardId(5), ApplyState { index: 0, term: 0, conf: ConfState::default() }),
        ]);
        let bytes = encode_applied(&states);
        assert_eq!(decode_applied(&bytes).unwrap(), states);
        assert!(decode_applied(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_applied(&[9]).is_err());
    }
}
