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
//! Snapshots are made and installed in order with the rounds, each on a
//! thread of its own while this thread goes on with the other shards. A
//! snapshot of a shard is its state-machine range as of its applied index,
//! read page by page into a file; the shard's own rounds go on meanwhile,
//! each key's value at the snapshot point kept aside before its first
//! write ([`PreImages`]), so the file is still one consistent point (past a
//! bound on what is kept, the rounds wait for the file instead). Installing
//! one replaces that range from a received file in bounded batches while
//! the shard's later rounds wait. An install-in-progress record, durable
//! before the store loop goes on and removed with the last batch, makes an
//! install cut short by a crash redo itself from the file at the next
//! start.

use crate::pre_images::PreImages;
use crate::snapshot::{self, SnapshotRecords, SnapshotRef, SnapshotWriter};
use crate::{ProposeError, StateMachine, StoreError, StoreStats, state_machine_prefix};
use hamgam_storage::{Db, KeyRange, KvWrite, Order, Prefixed, Txn};
use hamgam_types::{ShardId, limits};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Snapshot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// Where each shard's applied-state record lives: a prefix no shard uses,
/// then the shard (u32 big-endian). One record per shard, so a batch
/// rewrites only the records of the shards it applied to (one record for
/// every shard had put kilobytes into every batch of a node with 64 shards).
const APPLIED_PREFIX: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x02];
/// The record of every shard in one value, as databases before per-shard
/// records hold it: read at start when present, removed at the next full write.
const LEGACY_APPLIED_KEY: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x00];
const APPLIED_VERSION: u8 = 1;

fn applied_key(shard: ShardId) -> Vec<u8> {
    let mut key = APPLIED_PREFIX.to_vec();
    key.extend_from_slice(&shard.0.to_be_bytes());
    key
}

/// Encodes applied states; one shard's record is `std::iter::once`.
pub(crate) fn encode_applied<'a>(states: impl ExactSizeIterator<Item = (&'a ShardId, &'a ApplyState)>) -> Vec<u8> {
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
    let corrupt = |reason| StoreError::Corrupt { shard: ShardId(u32::MAX), what: "applied state", reason };
    let mut states = match db.get(LEGACY_APPLIED_KEY)? {
        None => BTreeMap::new(),
        Some(bytes) => decode_applied(&bytes).map_err(corrupt)?,
    };
    let records = db.scan(&KeyRange::prefix(APPLIED_PREFIX), Order::Ascending, limits::DATA_SHARDS_MAX as usize + 1)?;
    for (_, bytes) in records {
        // A per-shard record is newer than the legacy one wherever both exist.
        states.extend(decode_applied(&bytes).map_err(corrupt)?);
    }
    Ok(states)
}

/// Writes every shard's applied-state record (and drops the legacy one).
pub(crate) fn write_applied(txn: &mut Txn<'_>, states: &BTreeMap<ShardId, ApplyState>) {
    write_applied_of(txn, states, states.keys().copied());
    txn.delete(LEGACY_APPLIED_KEY);
}

/// Writes the applied-state records of `shards`.
fn write_applied_of(txn: &mut Txn<'_>, states: &BTreeMap<ShardId, ApplyState>, shards: impl Iterator<Item = ShardId>) {
    for shard in shards {
        if let Some(state) = states.get(&shard) {
            txn.put(&applied_key(shard), encode_applied(std::iter::once((&shard, state))));
        }
    }
}

/// Snapshot installs under way, one record per shard (the applied-state
/// encoding of the shard at the snapshot's point, then the snapshot's
/// reference). Next to the applied-state record.
const INSTALLING_PREFIX: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x01];

fn installing_key(shard: ShardId) -> Vec<u8> {
    [INSTALLING_PREFIX, &shard.0.to_be_bytes()].concat()
}

/// Keys or bytes per batch while a snapshot is made or installed or a
/// replica's data deleted. Small batches keep sled's memory down: a
/// 170 MB snapshot (573,425 keys) installed in batches of 10,000 keys or
/// 8 MiB took the receiving node to 1.3 GB resident and 5.5 s; in batches
/// of 1,000 keys or 1 MiB, to 456 MB (what the leader holding the same
/// data uses) and 3.8 s.
const INSTALL_BATCH_KEYS: usize = 1_000;
const INSTALL_BATCH_BYTES: usize = 1 << 20;

/// A snapshot file that cannot be read, or does not match its reference.
fn bad_snapshot(shard: ShardId) -> impl Fn(snapshot::SnapshotError) -> StoreError {
    move |error| StoreError::Corrupt { shard, what: "snapshot", reason: error.to_string() }
}

/// Puts an install on record, durably: from here on a crash finishes it
/// at the next start, from the file (kept until then).
fn record_install(db: &dyn Db, shard: ShardId, state: &ApplyState, reference: SnapshotRef) -> Result<(), StoreError> {
    let mut marker = Txn::new(db);
    marker.put(&installing_key(shard), encode_installing(shard, state, reference));
    db.write(&marker.into_batch())?;
    db.persist()?;
    Ok(())
}

/// Replaces `shard`'s state-machine range with the records of a snapshot
/// file (checked against its reference as they are read), in bounded
/// batches: the old range deleted, then the records. [`commit_install`]
/// then sets the shard's applied state. Safe to run again from the start
/// after a crash at any point before that. Touches only the shard's range,
/// so it runs beside the apply thread's batches for other shards.
fn fill_from_file(db: &dyn Db, shard: ShardId, mut records: SnapshotRecords) -> Result<u64, StoreError> {
    let corrupt = bad_snapshot(shard);
    let prefix = state_machine_prefix(shard);
    delete_range(db, &KeyRange::prefix(&prefix))?;

    let mut count = 0u64;
    let mut txn = Txn::new(db);
    let (mut keys_in_batch, mut bytes_in_batch) = (0usize, 0usize);
    while let Some((key, value)) = records.next_record().map_err(&corrupt)? {
        keys_in_batch += 1;
        bytes_in_batch += key.len() + value.len();
        Prefixed::new(&mut txn, &prefix).put(&key, value);
        count += 1;
        if keys_in_batch >= INSTALL_BATCH_KEYS || bytes_in_batch >= INSTALL_BATCH_BYTES {
            db.write(&std::mem::replace(&mut txn, Txn::new(db)).into_batch())?;
            (keys_in_batch, bytes_in_batch) = (0, 0);
        }
    }
    db.write(&txn.into_batch())?;
    Ok(count)
}

/// Ends an install that [`fill_from_file`] finished: the shard's applied
/// state set and (if `remove_record`: no later install of the shard is on
/// record in its place) its install record removed in one batch, durable;
/// then the file goes.
fn commit_install(
    db: &dyn Db,
    states: &mut BTreeMap<ShardId, ApplyState>,
    shard: ShardId,
    state: ApplyState,
    path: &Path,
    remove_record: bool,
) -> Result<(), StoreError> {
    let mut txn = Txn::new(db);
    states.insert(shard, state);
    write_applied(&mut txn, states);
    if remove_record {
        txn.delete(&installing_key(shard));
    }
    db.write(&txn.into_batch())?;
    db.persist()?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Reads `shard`'s range into a snapshot file as of the point `pre_images`
/// were begun at, while the shard's rounds may go on writing.
fn write_snapshot(
    db: &dyn Db,
    shard: ShardId,
    path: PathBuf,
    pre_images: &PreImages,
) -> Result<SnapshotRef, snapshot::SnapshotError> {
    let prefix = state_machine_prefix(shard);
    let mut writer = SnapshotWriter::create(path)?;
    let mut range = KeyRange::prefix(&prefix);
    loop {
        let page = db.scan(&range, Order::Ascending, INSTALL_BATCH_KEYS)?;
        // A short page reached the end of the range.
        let last = (page.len() == INSTALL_BATCH_KEYS).then(|| page[page.len() - 1].0.clone());
        for (key, value) in &pre_images.settle(page, last.as_deref()) {
            writer.put(&key[prefix.len()..], value)?;
        }
        let Some(mut next_start) = last else { break };
        next_start.push(0);
        range.start = next_start;
    }
    writer.finish()
}

/// Deletes every key of `range` in bounded batches; returns how many.
fn delete_range(db: &dyn Db, range: &KeyRange) -> Result<usize, StoreError> {
    let mut deleted = 0;
    loop {
        let keys = db.scan(range, Order::Ascending, INSTALL_BATCH_KEYS)?;
        if keys.is_empty() {
            return Ok(deleted);
        }
        let mut txn = Txn::new(db);
        for (key, _) in &keys {
            txn.delete(key);
        }
        db.write(&txn.into_batch())?;
        deleted += keys.len();
    }
}

fn encode_installing(shard: ShardId, state: &ApplyState, reference: SnapshotRef) -> Vec<u8> {
    let mut out = encode_applied(std::iter::once((&shard, state)));
    out.extend_from_slice(&reference.encode());
    out
}

fn decode_installing(bytes: &[u8]) -> Result<(ShardId, ApplyState, SnapshotRef), String> {
    let split = bytes.len().checked_sub(snapshot::REF_BYTES).ok_or("cut short")?;
    let (shard, state) = decode_applied(&bytes[..split])?.into_iter().next().ok_or("no shard")?;
    let reference = SnapshotRef::decode(&bytes[split..]).map_err(|e| e.to_string())?;
    Ok((shard, state, reference))
}

/// Finishes a snapshot install that a crash cut short, from its file (kept
/// until the install is durable), and empties the snapshot directory of
/// everything else: files being received, and snapshots made or received
/// before the restart, which raft will ask for again if it needs them.
pub(crate) fn resume_install(
    db: &dyn Db,
    states: &mut BTreeMap<ShardId, ApplyState>,
    dir: &Path,
) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { shard: ShardId(u32::MAX), what: "install record", reason };
    let records = db.scan(&KeyRange::prefix(INSTALLING_PREFIX), Order::Ascending, usize::MAX)?;
    for (_, bytes) in records {
        let (shard, state, reference) = decode_installing(&bytes).map_err(corrupt)?;
        let path = snapshot::received_path(dir, shard, state.index, state.term);
        tracing::warn!(%shard, index = state.index, "a snapshot install was cut short; finishing it");
        let records = SnapshotRecords::open(&path, reference).map_err(bad_snapshot(shard))?;
        let keys = fill_from_file(db, shard, records)?;
        commit_install(db, states, shard, state, &path, true)?;
        tracing::info!(%shard, keys, "installed the snapshot");
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Committed entries of one shard, each with the proposers waiting for it.
pub(crate) struct ApplyTask {
    pub shard: ShardId,
    pub entries: Vec<(Entry, Vec<Reply>)>,
    /// The configuration after each configuration-change entry, by index:
    /// raft computed it when the store loop applied the change to raft.
    pub confs: Vec<(u64, ConfState)>,
}

pub(crate) type Started = std::sync::mpsc::SyncSender<Result<(), StoreError>>;

pub(crate) enum ApplyInput {
    Round(Vec<ApplyTask>),
    /// Make a snapshot of the shard's applied state for a lagging follower.
    GenerateSnapshot(ShardId),
    /// Replace the shard's state with the leader's snapshot. `started` is
    /// answered once the install is on record durably (a crash from then
    /// on finishes it at the next start); the rest runs on a thread of its
    /// own while other shards go on and this shard's later inputs wait.
    /// The store loop hears of the end through `ApplyProgress::installed`.
    InstallSnapshot { shard: ShardId, snapshot: Snapshot, started: Started },
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
    /// Snapshots made for the store loop to serve (`None`: making one
    /// failed, and raft may ask again).
    pub snapshots: Mutex<Vec<(ShardId, Option<Snapshot>)>>,
    /// Shards whose snapshot install finished (durably).
    pub installed: Mutex<Vec<ShardId>>,
    /// Per shard, the index up to which the WAL held entries this node may
    /// have acknowledged before it stopped. The database may be behind it
    /// (writes not yet written out when the process died): fresh reads
    /// wait until the replay has applied that far.
    replay_to: BTreeMap<ShardId, u64>,
}

impl ApplyProgress {
    pub(crate) fn new(states: &BTreeMap<ShardId, ApplyState>, replay_to: BTreeMap<ShardId, u64>) -> ApplyProgress {
        ApplyProgress {
            replay_to,
            applied: states.iter().map(|(s, a)| (*s, AtomicU64::new(a.index))).collect(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            snapshots: Mutex::new(Vec::new()),
            installed: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn applied(&self, shard: ShardId) -> u64 {
        self.applied.get(&shard).map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Whether `shard` has applied everything its WAL held when the store
    /// opened.
    pub(crate) fn replayed(&self, shard: ShardId) -> bool {
        self.applied(shard) >= self.replay_to.get(&shard).copied().unwrap_or(0)
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
    /// Where snapshot files are made and received.
    pub snapshot_dir: PathBuf,
    /// Shards whose range a thread of their own is reading into a snapshot
    /// file or filling from one.
    pub busy: BTreeMap<ShardId, Busy>,
    /// Bytes of pre-images a snapshot being made may hold before the
    /// shard's rounds wait for it (`limits::SNAPSHOT_PRE_IMAGES_BYTES_MAX`).
    pub pre_images_max: usize,
}

/// A shard whose range a thread of its own is working on, and what of the
/// shard arrived meanwhile and must wait, in order (applied once the thread
/// is done).
pub(crate) struct Busy {
    work: Work,
    thread: std::thread::JoinHandle<Result<Done, StoreError>>,
    waiting: Vec<Waiting>,
}

enum Work {
    /// Filling the range from a received snapshot file at `path`.
    Install { state: ApplyState, path: PathBuf },
    /// Reading the range, as of `state`, into a snapshot file at `path`;
    /// the values of keys written since are kept in `pre_images`.
    Make { state: ApplyState, path: PathBuf, pre_images: Arc<PreImages> },
}

impl Busy {
    /// Whether the shard's next round may be applied now rather than wait:
    /// while its snapshot is made, as long as nothing of the shard waits
    /// ahead of it (a further snapshot to make may) and pre-images have room.
    fn applies_rounds(&self) -> bool {
        match &self.work {
            Work::Make { pre_images, .. } => {
                self.waiting.iter().all(|w| matches!(w, Waiting::Generate)) && pre_images.has_room()
            }
            Work::Install { .. } => false,
        }
    }

    /// Whether the shard's range is being replaced, now or next: its
    /// readers wait.
    fn replacing_range(&self) -> bool {
        matches!(self.work, Work::Install { .. }) || self.install_waits()
    }

    fn install_waits(&self) -> bool {
        self.waiting.iter().any(|w| matches!(w, Waiting::Install(_)))
    }
}

type MadeResult = Result<SnapshotRef, snapshot::SnapshotError>;

enum Done {
    Installed(u64),
    Made(MadeResult),
}

enum Waiting {
    Task(ApplyTask),
    // Boxed: a file reader is large, and rare here.
    Install(Box<PendingInstall>),
    Generate,
}

/// A received snapshot whose install is on record (durably) and waits for
/// the work under way on its shard.
struct PendingInstall {
    state: ApplyState,
    path: PathBuf,
    records: SnapshotRecords,
}

/// How often the apply thread looks for finished work while some runs and
/// no input arrives.
const BUSY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Applier {
    /// Runs until told to stop or until the channel closes.
    pub(crate) fn run(mut self, inputs: std::sync::mpsc::Receiver<ApplyInput>, wake: impl Fn()) {
        loop {
            let first = if self.busy.is_empty() {
                match inputs.recv() {
                    Ok(input) => Some(input),
                    Err(_) => return,
                }
            } else {
                match inputs.recv_timeout(BUSY_POLL) {
                    Ok(input) => Some(input),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut result = self.finish_busy(false);
            let mut stop = false;
            if let (Ok(()), Some(first)) = (&result, first) {
                // Gather consecutive rounds into one batch; anything else
                // waits until they are written, so it sees their state.
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
                result = if rounds.is_empty() { Ok(()) } else { self.apply(rounds) };
                match other {
                    _ if result.is_err() => {}
                    None | Some(ApplyInput::Round(_)) => {}
                    Some(ApplyInput::Stop) => {
                        // Work under way ends first, so the stop is clean.
                        result = self.finish_busy(true);
                        stop = true;
                    }
                    Some(ApplyInput::GenerateSnapshot(shard)) => match self.busy.get_mut(&shard) {
                        Some(busy) => busy.waiting.push(Waiting::Generate),
                        None => result = self.start_make(shard),
                    },
                    Some(ApplyInput::InstallSnapshot { shard, snapshot, started }) => {
                        result = self.start_install(shard, &snapshot, started);
                    }
                    Some(ApplyInput::Release { shard, done }) => {
                        result = self.finish(shard).and_then(|()| self.release(shard, &done));
                    }
                }
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
        }
    }

    /// Starts making a snapshot of `shard` as of its applied index, for the
    /// store loop to send: a thread of its own reads the range page by page
    /// into a file while every shard's rounds go on, this one's keeping
    /// pre-images of what they change.
    fn start_make(&mut self, shard: ShardId) -> Result<(), StoreError> {
        let Some(state) = self.states.get(&shard).cloned() else { return Ok(()) };
        let path = snapshot::made_path(&self.snapshot_dir, shard, state.index, state.term);
        let pre_images = Arc::new(PreImages::new(&state_machine_prefix(shard), self.pre_images_max));
        let (db, to, kept) = (self.db.clone(), path.clone(), pre_images.clone());
        let thread = std::thread::Builder::new()
            .name("snapshot-make".into())
            .spawn(move || Ok(Done::Made(write_snapshot(&*db, shard, to, &kept))))
            .map_err(StoreError::Thread)?;
        self.busy.insert(shard, Busy { work: Work::Make { state, path, pre_images }, thread, waiting: Vec::new() });
        Ok(())
    }

    /// Hands a made snapshot to the store loop (or says it failed: the
    /// follower waits and raft asks again; the node goes on).
    fn made(&mut self, shard: ShardId, state: ApplyState, path: &Path, result: MadeResult) {
        let made = match result {
            Ok(reference) => {
                snapshot::remove_older(&self.snapshot_dir, "made", shard, u64::MAX, path);
                let mut made = Snapshot { data: reference.encode().into(), ..Default::default() };
                let meta = made.mut_metadata();
                meta.index = state.index;
                meta.term = state.term;
                meta.set_conf_state(state.conf);
                tracing::info!(%shard, index = state.index, bytes = reference.bytes, keys = reference.keys, "made a snapshot");
                self.stats.snapshots_made.fetch_add(1, Ordering::Relaxed);
                Some(made)
            }
            Err(error) => {
                tracing::error!(%shard, %error, "could not make a snapshot");
                None
            }
        };
        self.progress.snapshots.lock().unwrap_or_else(|p| p.into_inner()).push((shard, made));
    }

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
        let deleted = delete_range(&*db, &KeyRange::prefix(&state_machine_prefix(shard)))?;
        tracing::info!(%shard, keys = deleted, "this node is no longer a replica of the shard; its data is deleted");
        Ok(())
    }

    /// Starts installing a snapshot the transport received into this
    /// node's snapshot directory (checked there against the message's
    /// reference), on a thread of its own. The install goes on record
    /// durably and the store loop hears so at once, even when work on the
    /// shard is under way and the install must wait for it (the record
    /// then supersedes any earlier install's: a restart installs the newest).
    fn start_install(&mut self, shard: ShardId, snapshot: &Snapshot, started: Started) -> Result<(), StoreError> {
        let recorded = self.record_install(shard, snapshot);
        let _ = started.send(match &recorded {
            Ok(_) => Ok(()),
            Err(error) => Err(StoreError::Corrupt { shard, what: "snapshot", reason: error.to_string() }),
        });
        let pending = recorded?;
        match self.busy.get_mut(&shard) {
            Some(busy) => busy.waiting.push(Waiting::Install(Box::new(pending))),
            None => self.run_install(shard, pending)?,
        }
        Ok(())
    }

    fn record_install(&mut self, shard: ShardId, snapshot: &Snapshot) -> Result<PendingInstall, StoreError> {
        let meta = snapshot.get_metadata();
        let reference = SnapshotRef::decode(&snapshot.data).map_err(bad_snapshot(shard))?;
        let path = snapshot::received_path(&self.snapshot_dir, shard, meta.index, meta.term);
        // Readers of this shard wait while its range is being replaced.
        if let Some(applied) = self.progress.applied.get(&shard) {
            applied.store(0, Ordering::Release);
        }
        let state = ApplyState { index: meta.index, term: meta.term, conf: meta.get_conf_state().clone() };
        // The file must be there before the install goes on record.
        let records = SnapshotRecords::open(&path, reference).map_err(bad_snapshot(shard))?;
        record_install(&*self.db, shard, &state, reference)?;
        Ok(PendingInstall { state, path, records })
    }

    fn run_install(&mut self, shard: ShardId, pending: PendingInstall) -> Result<(), StoreError> {
        let PendingInstall { state, path, records } = pending;
        let db = self.db.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-install".into())
            .spawn(move || fill_from_file(&*db, shard, records).map(Done::Installed))
            .map_err(StoreError::Thread)?;
        self.busy.insert(shard, Busy { work: Work::Install { state, path }, thread, waiting: Vec::new() });
        Ok(())
    }

    /// Ends the work whose thread is done (all of it, waiting, if `all`).
    fn finish_busy(&mut self, all: bool) -> Result<(), StoreError> {
        let done: Vec<ShardId> =
            self.busy.iter().filter(|(_, b)| all || b.thread.is_finished()).map(|(s, _)| *s).collect();
        for shard in done {
            self.finish(shard)?;
        }
        Ok(())
    }

    /// Ends the work on `shard`, if any: waits for its thread, commits an
    /// install (and tells the store loop) or hands over a made snapshot,
    /// then goes through what waited for it: the shard's rounds, a snapshot
    /// to make, another install.
    fn finish(&mut self, shard: ShardId) -> Result<(), StoreError> {
        let Some(busy) = self.busy.remove(&shard) else { return Ok(()) };
        // A later install's record is on disk in place of this one's.
        let install_waits = busy.install_waits();
        let Busy { work, thread, waiting } = busy;
        let done =
            thread.join().map_err(|_| StoreError::Thread(std::io::Error::other("a snapshot thread panicked")))??;
        let installed = match (work, done) {
            (Work::Install { state, path }, Done::Installed(keys)) => {
                let index = state.index;
                let db = self.db.clone();
                commit_install(&*db, &mut self.states, shard, state, &path, !install_waits)?;
                if let Some(applied) = self.progress.applied.get(&shard)
                    && !install_waits
                {
                    applied.store(index, Ordering::Release);
                }
                snapshot::remove_older(&self.snapshot_dir, "received", shard, index, &path);
                self.machine.snapshot_installed(shard);
                self.stats.snapshots_installed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%shard, index, keys, "installed a snapshot from the leader");
                true
            }
            (Work::Make { state, path, .. }, Done::Made(result)) => {
                self.made(shard, state, &path, result);
                false
            }
            _ => return Err(StoreError::Thread(std::io::Error::other("a snapshot thread did other work than asked"))),
        };

        let mut tasks = Vec::new();
        let mut rest = waiting.into_iter();
        let mut follows = None;
        for next in rest.by_ref() {
            match next {
                Waiting::Task(task) => tasks.push(task),
                Waiting::Generate => {
                    follows = Some(None);
                    break;
                }
                Waiting::Install(pending) => {
                    follows = Some(Some(pending));
                    break;
                }
            }
        }
        self.apply_waiting(&mut tasks)?;
        if installed && !matches!(follows, Some(Some(_))) {
            // No other install of the shard follows: it may be read here again.
            self.progress.installed.lock().unwrap_or_else(|p| p.into_inner()).push(shard);
        }
        match follows {
            None => return Ok(()),
            Some(None) => self.start_make(shard)?,
            Some(Some(pending)) => self.run_install(shard, *pending)?,
        }
        if let Some(busy) = self.busy.get_mut(&shard) {
            busy.waiting.extend(rest);
        }
        Ok(())
    }

    fn apply_waiting(&mut self, tasks: &mut Vec<ApplyTask>) -> Result<(), StoreError> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.apply(vec![std::mem::take(tasks)])
    }

    fn apply(&mut self, rounds: Vec<Vec<ApplyTask>>) -> Result<(), StoreError> {
        let db = self.db.clone();
        let mut txn = Txn::new(&*db);
        let mut answers: Vec<(Reply, Result<Vec<u8>, ProposeError>)> = Vec::new();
        let (mut commands, mut entries_applied) = (0u64, 0u64);
        let mut conf_changed = false;
        let mut touched = std::collections::BTreeSet::new();
        for task in rounds.into_iter().flatten() {
            if let Some(busy) = self.busy.get_mut(&task.shard)
                && !busy.applies_rounds()
            {
                busy.waiting.push(Waiting::Task(task));
                continue;
            }
            let shard = task.shard;
            let Some(state) = self.states.get_mut(&shard) else {
                let replies = task.entries.into_iter().flat_map(|(_, replies)| replies);
                answers.extend(replies.map(|r| (r, Err(ProposeError::UnknownShard(shard)))));
                continue;
            };
            for (entry, replies) in task.entries {
                if entry.index <= state.index {
                    // Already in the state (a snapshot installed past it):
                    // applied, its result unknown here.
                    answers.extend(replies.into_iter().map(|r| (r, Err(ProposeError::Dropped))));
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
                        conf_changed = true;
                        answers.extend(replies.into_iter().map(|r| (r, Ok(Vec::new()))));
                    }
                }
                state.index = entry.index;
                state.term = entry.term;
                entries_applied += 1;
                touched.insert(shard);
            }
        }
        write_applied_of(&mut txn, &self.states, touched.into_iter());
        let batch = txn.into_batch();
        for busy in self.busy.values() {
            if let Work::Make { pre_images, .. } = &busy.work {
                pre_images.record(&*db, batch.ops().iter().map(|(key, _)| key.as_slice()))?;
            }
        }
        let keys_written = batch.len() as u64;
        db.write_owned(batch)?;
        if conf_changed {
            // A restart takes the shard's configuration from the database;
            // one older than what the node already acted on could let it
            // elect itself alone. Configuration changes are rare: make each
            // durable at once.
            db.persist()?;
        }
        self.stats.apply_batches.fetch_add(1, Ordering::Relaxed);
        self.stats.keys_written.fetch_add(keys_written, Ordering::Relaxed);
        let replacing = |shard: &ShardId| self.busy.get(shard).is_some_and(Busy::replacing_range);
        for (shard, state) in self.states.iter().filter(|(shard, _)| !replacing(shard)) {
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
    use hamgam_storage::KvRead;

    #[test]
    fn applied_states_round_trip_and_damage_is_named() {
        let mut conf = ConfState::default();
        conf.voters = vec![1, 2, 3];
        let states = BTreeMap::from([
            (ShardId(0), ApplyState { index: 7, term: 2, conf: conf.clone() }),
            (ShardId(5), ApplyState { index: 0, term: 0, conf: ConfState::default() }),
        ]);
        let bytes = encode_applied(states.iter());
        assert_eq!(decode_applied(&bytes).unwrap(), states);
        assert!(decode_applied(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_applied(&[9]).is_err());
    }

    #[test]
    fn applied_records_are_per_shard_and_a_legacy_record_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = hamgam_storage::SledDb::open(dir.path(), 8 << 20).unwrap();
        let state = |index| ApplyState { index, term: 2, conf: ConfState::default() };
        let legacy = BTreeMap::from([(ShardId(0), state(7)), (ShardId(1), state(8)), (ShardId(2), state(9))]);
        let mut txn = Txn::new(&db);
        txn.put(LEGACY_APPLIED_KEY, encode_applied(legacy.iter()));
        db.write(&txn.into_batch()).unwrap();
        assert_eq!(read_applied(&db).unwrap(), legacy, "a database from before per-shard records");

        let mut states = legacy.clone();
        states.insert(ShardId(1), state(20));
        let mut txn = Txn::new(&db);
        write_applied_of(&mut txn, &states, [ShardId(1)].into_iter());
        db.write(&txn.into_batch()).unwrap();
        assert_eq!(read_applied(&db).unwrap(), states, "a shard's own record wins over the legacy one");

        let mut txn = Txn::new(&db);
        write_applied(&mut txn, &states);
        db.write(&txn.into_batch()).unwrap();
        assert_eq!(db.get(LEGACY_APPLIED_KEY).unwrap(), None, "a full write drops the legacy record");
        assert_eq!(read_applied(&db).unwrap(), states);
    }

    #[test]
    fn a_round_rewrites_only_the_applied_records_of_its_own_shards() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(hamgam_storage::SledDb::open(&dir.path().join("db"), 8 << 20).unwrap());
        let start = ApplyState { index: 5, term: 1, conf: ConfState::default() };
        let states: BTreeMap<ShardId, ApplyState> = (0..64).map(|shard| (ShardId(shard), start.clone())).collect();
        let (mut applier, _) = recording_applier(&db, states, dir.path());
        let (ApplyInput::Round(tasks), answer) = round(ShardId(9), 6, b"one shard") else { unreachable!() };
        applier.apply(vec![tasks]).unwrap();
        assert_eq!(answer.blocking_recv().unwrap().unwrap(), 6u64.to_le_bytes());
        let records = db.scan(&KeyRange::prefix(APPLIED_PREFIX), Order::Ascending, 100).unwrap();
        assert_eq!(records.len(), 1, "one record written, not one per shard");
        assert_eq!(records[0].0, applied_key(ShardId(9)));
        assert_eq!(read_applied(&*db).unwrap()[&ShardId(9)].index, 6);
    }

    /// A proposer whose entry the state already holds (a snapshot went
    /// past it) hears `Dropped`, not a closed channel (read as `Stopped`).
    #[test]
    fn an_entry_the_state_already_holds_is_answered_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(hamgam_storage::MemDb::new());
        let start = ApplyState { index: 5, term: 1, conf: ConfState::default() };
        let (mut applier, _) = recording_applier(&db, BTreeMap::from([(ShardId(1), start)]), dir.path());
        let (ApplyInput::Round(tasks), answer) = round(ShardId(1), 5, b"already in") else { unreachable!() };
        applier.apply(vec![tasks]).unwrap();
        assert_eq!(answer.blocking_recv().unwrap(), Err(ProposeError::Dropped));
    }

    /// A round that applies a configuration change is made durable before
    /// it is answered (a restart reads the configuration from the
    /// database); other rounds are not.
    #[test]
    fn a_configuration_change_is_durable_once_applied() {
        let dir = tempfile::tempdir().unwrap();
        let counting = Arc::new(hamgam_storage::CountingDb::default());
        let db: Arc<dyn Db> = counting.clone();
        let start = ApplyState { index: 5, term: 1, conf: ConfState { voters: vec![1], ..Default::default() } };
        let (mut applier, _) = recording_applier(&db, BTreeMap::from([(ShardId(1), start)]), dir.path());
        let (ApplyInput::Round(tasks), _answer) = round(ShardId(1), 6, b"a command") else { unreachable!() };
        applier.apply(vec![tasks]).unwrap();
        assert_eq!(counting.persists(), 0, "an ordinary round waits for a checkpoint");

        let grown = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        let entry = Entry { index: 7, term: 1, entry_type: EntryType::EntryConfChange, ..Default::default() };
        let (reply, answer) = oneshot::channel();
        let task = ApplyTask { shard: ShardId(1), entries: vec![(entry, vec![reply])], confs: vec![(7, grown.clone())] };
        applier.apply(vec![vec![task]]).unwrap();
        answer.blocking_recv().unwrap().unwrap();
        assert_eq!(counting.persists(), 1);
        assert_eq!(read_applied(&*db).unwrap()[&ShardId(1)].conf, grown);
    }

    /// A crash after the install-in-progress record was written and part
    /// of the range replaced: the next start finishes the install from the
    /// file and leaves the snapshot directory empty.
    #[test]
    fn an_install_cut_short_by_a_crash_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = hamgam_storage::MemDb::new();
        let shard = ShardId(1);
        let prefix = state_machine_prefix(shard);
        let old_state = ApplyState { index: 5, term: 1, conf: ConfState::default() };
        let states = BTreeMap::from([(shard, old_state.clone()), (ShardId(2), old_state.clone())]);
        let mut txn = Txn::new(&db);
        write_applied(&mut txn, &states);
        for i in 0..30u32 {
            Prefixed::new(&mut txn, &prefix).put(format!("old-{i}").as_bytes(), vec![1]);
        }
        db.write(&txn.into_batch()).unwrap();

        let conf = ConfState { voters: vec![1, 2, 4], ..Default::default() };
        let new_state = ApplyState { index: 50, term: 3, conf };
        let path = snapshot::received_path(dir.path(), shard, 50, 3);
        let mut writer = SnapshotWriter::create(path.clone()).unwrap();
        for i in 0..25_000u32 {
            writer.put(format!("new-{i:08}").as_bytes(), &i.to_le_bytes()).unwrap();
        }
        let reference = writer.finish().unwrap();
        // The crash: the record is written, a few old keys are gone, a few new ones in.
        let mut txn = Txn::new(&db);
        txn.put(&installing_key(shard), encode_installing(shard, &new_state, reference));
        let mut partial = Prefixed::new(&mut txn, &prefix);
        partial.delete(b"old-0");
        partial.put(b"new-00000000", 0u32.to_le_bytes().to_vec());
        db.write(&txn.into_batch()).unwrap();
        std::fs::write(dir.path().join("received-7-1-1.snap.3.part"), b"half").unwrap();

        let mut recovered = read_applied(&db).unwrap();
        assert_eq!(recovered[&shard], old_state);
        resume_install(&db, &mut recovered, dir.path()).unwrap();
        assert_eq!(recovered[&shard], new_state);
        assert_eq!(read_applied(&db).unwrap(), recovered, "and durably");
        assert_eq!(recovered[&ShardId(2)], old_state, "other shards keep theirs");
        assert!(db.get(&installing_key(shard)).unwrap().is_none());
        let range = db.scan(&KeyRange::prefix(&prefix), Order::Ascending, usize::MAX).unwrap();
        assert_eq!(range.len(), 25_000, "the old keys are gone, every new one is in");
        assert!(range.iter().enumerate().all(|(i, (k, v))| {
            k[prefix.len()..] == *format!("new-{i:08}").as_bytes() && *v == (i as u32).to_le_bytes()
        }));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the snapshot directory is emptied");

        // Without a record, a start changes nothing and only clears the directory.
        std::fs::write(dir.path().join("made-1-50-3.snap"), b"x").unwrap();
        resume_install(&db, &mut recovered, dir.path()).unwrap();
        assert_eq!(recovered[&shard], new_state);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Writes each command under `entry-{index}` and answers with the index.
    /// A command `edit +KEY -KEY ...` also puts 32 bytes of 2 under each
    /// `+` key and deletes each `-` key.
    struct Recorder;

    impl StateMachine for Recorder {
        fn apply(
            &mut self,
            _shard: ShardId,
            index: u64,
            command: &[u8],
            kv: &mut crate::ShardWriter<'_, '_>,
        ) -> Result<Vec<u8>, hamgam_storage::StorageError> {
            kv.put(format!("entry-{index}").as_bytes(), command.to_vec());
            if let Some(edits) = command.strip_prefix(b"edit ") {
                for edit in edits.split(|b| *b == b' ') {
                    match edit.split_first() {
                        Some((b'+', key)) => kv.put(key, vec![2; 32]),
                        Some((b'-', key)) => kv.delete(key),
                        _ => {}
                    }
                }
            }
            Ok(index.to_le_bytes().to_vec())
        }
    }

    /// An apply thread over `db` with the [`Recorder`] machine.
    fn recording_applier(
        db: &Arc<dyn Db>,
        states: BTreeMap<ShardId, ApplyState>,
        dir: &Path,
    ) -> (Applier, Arc<ApplyProgress>) {
        let progress = Arc::new(ApplyProgress::new(&states, BTreeMap::new()));
        let applier = Applier {
            db: db.clone(),
            machine: Box::new(Recorder),
            states,
            progress: progress.clone(),
            stats: Arc::new(StoreStats::default()),
            snapshot_dir: dir.to_path_buf(),
            busy: BTreeMap::new(),
            pre_images_max: 64 << 20,
        };
        (applier, progress)
    }

    type Answer = oneshot::Receiver<Result<Vec<u8>, ProposeError>>;

    fn round(shard: ShardId, index: u64, command: &[u8]) -> (ApplyInput, Answer) {
        let (reply, answer) = oneshot::channel();
        let entry = Entry {
            index,
            term: 3,
            data: crate::store::encode_batch(&[command.to_vec()]).into(),
            ..Default::default()
        };
        (ApplyInput::Round(vec![ApplyTask { shard, entries: vec![(entry, vec![reply])], confs: Vec::new() }]), answer)
    }

    /// A snapshot file of `keys` records `{name}-{i}` at `index`, term 3,
    /// received for `shard` into `dir`, and the message naming it.
    fn received_snapshot(dir: &Path, shard: ShardId, index: u64, name: &str, keys: u32) -> Snapshot {
        let mut writer = SnapshotWriter::create(snapshot::received_path(dir, shard, index, 3)).unwrap();
        for i in 0..keys {
            writer.put(format!("{name}-{i:08}").as_bytes(), &[7u8; 32]).unwrap();
        }
        let reference = writer.finish().unwrap();
        let mut snapshot = Snapshot { data: reference.encode().into(), ..Default::default() };
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = 3;
        snapshot
    }

    /// A second snapshot for a shard whose first is still going in is put
    /// on record at once (the store loop does not wait for the first), in
    /// place of the first's record; it is installed after the first, and
    /// the shard's later round lands on top of it.
    #[test]
    fn a_second_snapshot_goes_on_record_at_once_and_is_installed_after_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(hamgam_storage::MemDb::new());
        let one = ShardId(1);
        let states = BTreeMap::from([(one, ApplyState { index: 5, term: 1, conf: ConfState::default() })]);
        let (applier, progress) = recording_applier(&db, states, dir.path());
        let first = received_snapshot(dir.path(), one, 50, "first", 200_000);
        let second = received_snapshot(dir.path(), one, 80, "second", 10);

        let (inputs, queue) = std::sync::mpsc::sync_channel(16);
        let thread = std::thread::spawn(move || applier.run(queue, || {}));
        let (started, on_record) = std::sync::mpsc::sync_channel(1);
        inputs.send(ApplyInput::InstallSnapshot { shard: one, snapshot: first, started }).unwrap();
        on_record.recv().unwrap().unwrap();
        let (started, on_record) = std::sync::mpsc::sync_channel(1);
        inputs.send(ApplyInput::InstallSnapshot { shard: one, snapshot: second, started }).unwrap();
        on_record.recv().unwrap().unwrap();
        let applied_index = || read_applied(&*db).unwrap().get(&one).map(|state| state.index);
        assert_eq!(applied_index(), None, "on record while the first still goes in (not yet committed at 50)");
        let record = db.get(&installing_key(one)).unwrap().unwrap();
        assert_eq!(decode_installing(&record).unwrap().1.index, 80, "a restart now installs the second");
        assert_eq!(progress.applied(one), 0, "readers of shard 1 wait meanwhile");

        let (own, own_answer) = round(one, 81, b"after the second snapshot");
        inputs.send(own).unwrap();
        assert_eq!(own_answer.blocking_recv().unwrap().unwrap(), 81u64.to_le_bytes());
        let range = KeyRange::prefix(&state_machine_prefix(one));
        let keys = db.scan(&range, Order::Ascending, usize::MAX).unwrap();
        let prefix_len = state_machine_prefix(one).len();
        let names: Vec<String> = keys.iter().map(|(k, _)| String::from_utf8_lossy(&k[prefix_len..]).into()).collect();
        assert_eq!(names.len(), 11, "the second snapshot and the round: {:?}", &names[..names.len().min(3)]);
        assert!(names.iter().all(|n| n.starts_with("second-") || n == "entry-81"));
        assert!(db.get(&installing_key(one)).unwrap().is_none());
        assert_eq!(applied_index(), Some(81));
        assert_eq!(progress.applied(one), 81);
        // The store loop hears right after the waiting round.
        for _ in 0..200 {
            if !progress.installed.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(*progress.installed.lock().unwrap(), vec![one], "the store loop hears once, after the second");
        inputs.send(ApplyInput::Stop).unwrap();
        thread.join().unwrap();
    }

    /// While one shard's snapshot is installed on its own thread, other
    /// shards' rounds are applied and answered; the shard's own round waits
    /// for the install and is applied on top of it.
    #[test]
    fn other_shards_go_on_while_a_snapshot_is_installed_and_its_own_rounds_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(hamgam_storage::MemDb::new());
        let (one, two) = (ShardId(1), ShardId(2));
        let start = ApplyState { index: 5, term: 1, conf: ConfState::default() };
        let states = BTreeMap::from([(one, start.clone()), (two, start)]);
        let (applier, progress) = recording_applier(&db, states, dir.path());
        const KEYS: u32 = 200_000;
        let mut writer = SnapshotWriter::create(snapshot::received_path(dir.path(), one, 50, 3)).unwrap();
        for i in 0..KEYS {
            writer.put(format!("snap-{i:08}").as_bytes(), &[7u8; 32]).unwrap();
        }
        let reference = writer.finish().unwrap();
        let mut snapshot = Snapshot { data: reference.encode().into(), ..Default::default() };
        snapshot.mut_metadata().index = 50;
        snapshot.mut_metadata().term = 3;

        let (inputs, queue) = std::sync::mpsc::sync_channel(16);
        let thread = std::thread::spawn(move || applier.run(queue, || {}));
        let (started, on_record) = std::sync::mpsc::sync_channel(1);
        inputs.send(ApplyInput::InstallSnapshot { shard: one, snapshot, started }).unwrap();
        on_record.recv().unwrap().unwrap();
        assert!(db.get(&installing_key(one)).unwrap().is_some(), "on record before the store loop goes on");
        let (own, own_answer) = round(one, 51, b"after the snapshot");
        inputs.send(own).unwrap();
        let (other, other_answer) = round(two, 6, b"another shard");
        inputs.send(other).unwrap();

        assert_eq!(other_answer.blocking_recv().unwrap().unwrap(), 6u64.to_le_bytes());
        assert!(
            progress.installed.lock().unwrap().is_empty(),
            "shard 2 was answered while shard 1's {KEYS} keys were still going in"
        );
        assert_eq!(progress.applied(one), 0, "readers of shard 1 wait meanwhile");
        assert_eq!(own_answer.blocking_recv().unwrap().unwrap(), 51u64.to_le_bytes());
        // The store loop hears of the end right after the waiting round.
        for _ in 0..200 {
            if !progress.installed.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(*progress.installed.lock().unwrap(), vec![one]);
        assert_eq!(progress.applied(one), 51);
        let range = KeyRange::prefix(&state_machine_prefix(one));
        let keys = db.scan(&range, Order::Ascending, usize::MAX).unwrap();
        assert_eq!(keys.len(), KEYS as usize + 1, "the snapshot, and the round applied on top of it");
        assert!(db.get(&installing_key(one)).unwrap().is_none());
        assert_eq!(read_applied(&*db).unwrap()[&one].index, 51);

        inputs.send(ApplyInput::Stop).unwrap();
        thread.join().unwrap();
    }

    /// Makes a snapshot of 200,000 keys of shard 1 with `pre_images_max`,
    /// while a round of shard 1 changes, deletes and adds keys and a round
    /// of shard 2 comes in. Checks the file is exactly the range as of the
    /// snapshot point and the round's effects are in the database; returns
    /// whether shard 1's round was answered before the snapshot was made.
    fn make_a_snapshot_while_the_shard_writes(pre_images_max: usize) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Db> = Arc::new(hamgam_storage::MemDb::new());
        let (one, two) = (ShardId(1), ShardId(2));
        let start = ApplyState { index: 5, term: 1, conf: ConfState { voters: vec![1], ..Default::default() } };
        let states = BTreeMap::from([(one, start.clone()), (two, start)]);
        const KEYS: u32 = 200_000;
        let mut txn = Txn::new(&*db);
        for i in 0..KEYS {
            Prefixed::new(&mut txn, &state_machine_prefix(one)).put(format!("old-{i:08}").as_bytes(), vec![1; 32]);
        }
        db.write(&txn.into_batch()).unwrap();
        let (mut applier, progress) = recording_applier(&db, states, dir.path());
        applier.pre_images_max = pre_images_max;
        let (inputs, queue) = std::sync::mpsc::sync_channel(16);
        let thread = std::thread::spawn(move || applier.run(queue, || {}));
        inputs.send(ApplyInput::GenerateSnapshot(one)).unwrap();
        let edit = b"edit +old-00000000 -old-00100000 +old-00150000 -old-00199999 +old-00199999x +aaa";
        let (own, own_answer) = round(one, 6, edit);
        inputs.send(own).unwrap();
        let (other, other_answer) = round(two, 6, b"another shard");
        inputs.send(other).unwrap();

        assert_eq!(other_answer.blocking_recv().unwrap().unwrap(), 6u64.to_le_bytes());
        assert_eq!(own_answer.blocking_recv().unwrap().unwrap(), 6u64.to_le_bytes());
        let answered_first = progress.snapshots.lock().unwrap().is_empty();
        let mut made = Vec::new();
        for _ in 0..3000 {
            made = std::mem::take(&mut *progress.snapshots.lock().unwrap());
            if !made.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let [(shard, Some(made))] = made.as_slice() else { panic!("one snapshot made: {made:?}") };
        assert_eq!((*shard, made.get_metadata().index), (one, 5));
        let reference = SnapshotRef::decode(&made.data).unwrap();
        assert_eq!(reference.keys, u64::from(KEYS), "the round at index 6 is not in the snapshot of index 5");
        let mut records = SnapshotRecords::open(&snapshot::made_path(dir.path(), one, 5, 1), reference).unwrap();
        let mut read = 0;
        while let Some((key, value)) = records.next_record().unwrap() {
            assert_eq!(key, format!("old-{read:08}").as_bytes(), "every key as it was, in order");
            assert_eq!(value, vec![1; 32], "every value as it was");
            read += 1;
        }
        assert_eq!(read, KEYS);

        let shard_key = |key: &str| [&state_machine_prefix(one)[..], key.as_bytes()].concat();
        assert_eq!(db.get(&shard_key("old-00000000")).unwrap(), Some(vec![2; 32]));
        assert_eq!(db.get(&shard_key("old-00100000")).unwrap(), None);
        assert_eq!(db.get(&shard_key("old-00199999x")).unwrap(), Some(vec![2; 32]));
        assert_eq!(db.get(&shard_key("aaa")).unwrap(), Some(vec![2; 32]));
        assert_eq!(progress.applied(one), 6);
        inputs.send(ApplyInput::Stop).unwrap();
        thread.join().unwrap();
        answered_first
    }

    /// While one shard's snapshot is being made on its own thread, its own
    /// rounds and other shards' are applied and answered, and the snapshot
    /// is still exactly the state as of its index.
    #[test]
    fn a_shard_writes_on_while_its_snapshot_is_made_and_it_is_one_consistent_point() {
        assert!(
            make_a_snapshot_while_the_shard_writes(64 << 20),
            "shard 1's round was answered while its 200,000 keys were being read"
        );
    }

    /// With no room for pre-images, the shard's rounds wait for the
    /// snapshot instead, and it is the same consistent point.
    #[test]
    fn without_room_for_pre_images_the_shards_rounds_wait_for_its_snapshot() {
        assert!(!make_a_snapshot_while_the_shard_writes(0), "shard 1's round waited for its snapshot");
    }
}
