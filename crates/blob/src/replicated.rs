//! Chunks across the cluster: each chunk on R nodes (3, or every member in
//! a smaller cluster) chosen by rendezvous hashing over the active members.
//!
//! - **Write**: a chunk is checked against its name once, here, then sent
//!   to all its holders at once; the upload is answered only when a write
//!   quorum (a majority of the holders) has it durably.
//! - **Presence**: a chunk counts as stored only where a quorum of its
//!   holders has it, so an upload cut off half way is completed by the
//!   retry instead of being trusted.
//! - **Read**: this node's own copy first, then the holders in rendezvous
//!   order, then any other member (placement moves when members change).
//!   Every copy from elsewhere is checked against its name; a holder that
//!   lacked the chunk or held a damaged copy is sent the good one (repair).
//! - **Hand-off**: when members join or drain, placement moves. The
//!   scrubber sends each local chunk to the holders that lack it, and a node
//!   that is no longer one of a chunk's holders drops its own copy once
//!   every holder has one (see [`ChunkStore::scrub`]).
//!
//! A single node is the same code with no peers: R = 1, quorum 1.

use crate::{BlobError, PackStore, Presence, PutOutcome, StoredChunk, Tree, list, placement};
use hamgam_proto::store::{ChunkList, ChunkRef};
use hamgam_types::limits;
use hamgam_types::{ChunkId, NodeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type PeerFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// Moves chunks between nodes; the cluster's network implements it.
pub trait ChunkPeers: Send + Sync + 'static {
    /// The members chunks are placed on (active ones), this node included.
    fn members(&self) -> Vec<NodeId>;
    /// Every member that may still hold chunks (not removed).
    fn reachable(&self) -> Vec<NodeId>;
    /// Stores chunks on `node`, durably, or fails.
    fn put(&self, node: NodeId, chunks: Vec<StoredChunk>) -> PeerFuture<()>;
    /// Which of `ids` `node` lacks; `presence` says whether the answer is relied on.
    fn missing(&self, node: NodeId, ids: Vec<ChunkId>, presence: Presence) -> PeerFuture<Vec<ChunkId>>;
    /// The chunks `node` has of `ids` (unchecked: the caller checks).
    fn get(&self, node: NodeId, ids: Vec<ChunkId>) -> PeerFuture<Vec<StoredChunk>>;
}

/// Copies of each chunk in a cluster of at least this many members.
pub const COPIES: usize = 3;

/// The chunk store a node's API uses: its own pack store and, in a
/// cluster, the other members' through [`ChunkPeers`].
pub struct ChunkStore {
    local: Arc<PackStore>,
    node: NodeId,
    peers: Option<Arc<dyn ChunkPeers>>,
    /// Nodes whose last chunk exchange failed, and when: skipped for a
    /// while, so a dead node costs one timeout, not one per request.
    failed: std::sync::Mutex<HashMap<NodeId, Instant>>,
}

/// How long a node whose chunk exchange failed is left out.
const FAILED_NODE_PAUSE: Duration = Duration::from_secs(5);

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore").field("node", &self.node).finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, BlobError> {
    crate::workers::on_chunk_thread(work).await.map_err(|error| BlobError::Unavailable(error.to_string()))
}

impl ChunkStore {
    pub fn new(local: Arc<PackStore>, node: NodeId, peers: Option<Arc<dyn ChunkPeers>>) -> ChunkStore {
        ChunkStore { local, node, peers, failed: std::sync::Mutex::new(HashMap::new()) }
    }

    fn is_down(&self, node: NodeId) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get(&node).is_some_and(|when| when.elapsed() < FAILED_NODE_PAUSE)
    }

    fn mark<T>(&self, node: NodeId, result: &Result<T, String>) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => {
                failed.remove(&node);
            }
            Err(error) => {
                tracing::debug!(%node, %error, "a chunk exchange failed; leaving the node out for a while");
                failed.insert(node, Instant::now());
            }
        }
    }

    pub fn local(&self) -> &Arc<PackStore> {
        &self.local
    }

    /// The holders of each id, and the quorum; `None` for a single node.
    fn holders(&self, ids: impl Iterator<Item = ChunkId>) -> Option<(HashMap<ChunkId, Vec<NodeId>>, usize)> {
        let peers = self.peers.as_ref()?;
        let members = peers.members();
        if members.len() <= 1 {
            return None;
        }
        let copies = COPIES.min(members.len());
        let holders = ids.map(|id| (id, placement::holders(&id, &members, copies))).collect();
        Some((holders, copies / 2 + 1))
    }

    /// Which of `ids` are not stored on a quorum of their holders. The
    /// answer is relied on: the copies found are touched.
    pub async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, BlobError> {
        let Some((holders, quorum)) = self.holders(ids.iter().copied()) else {
            return Ok(self.local.missing(ids, Presence::Relied));
        };
        let mut asks: BTreeMap<NodeId, Vec<ChunkId>> = BTreeMap::new();
        for (id, nodes) in &holders {
            for node in nodes {
                asks.entry(*node).or_default().push(*id);
            }
        }
        let mut have: HashMap<ChunkId, usize> = HashMap::new();
        for (node, asked, answer) in self.ask_all(asks, Presence::Relied).await {
            let lacking: HashSet<ChunkId> = match answer {
                Ok(lacking) => lacking.into_iter().collect(),
                Err(error) => {
                    tracing::debug!(%node, %error, "a chunk holder did not answer; its copies do not count");
                    continue;
                }
            };
            for id in asked.into_iter().filter(|id| !lacking.contains(id)) {
                *have.entry(id).or_default() += 1;
            }
        }
        let mut seen = HashSet::new();
        Ok(ids.iter().filter(|id| have.get(id).copied().unwrap_or(0) < quorum && seen.insert(**id)).copied().collect())
    }

    /// Asks each node which of its ids it lacks (this node directly).
    async fn ask_all(
        &self,
        asks: BTreeMap<NodeId, Vec<ChunkId>>,
        presence: Presence,
    ) -> Vec<(NodeId, Vec<ChunkId>, Result<Vec<ChunkId>, String>)> {
        let mut tasks = tokio::task::JoinSet::new();
        for (node, ids) in asks {
            if node == self.node {
                let lacking = self.local.missing(&ids, presence);
                tasks.spawn(async move { (node, ids, Ok(lacking)) });
            } else if let Some(peers) = self.peers.as_ref().filter(|_| !self.is_down(node)) {
                let ask = peers.missing(node, ids.clone(), presence);
                tasks.spawn(async move { (node, ids, ask.await) });
            }
        }
        let mut out = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(answer) = joined {
                if answer.0 != self.node {
                    self.mark(answer.0, &answer.2);
                }
                out.push(answer);
            }
        }
        out
    }

    /// Checks every chunk against its name and stores it on its holders;
    /// answers once each is durable on a quorum of them.
    pub async fn put(&self, chunks: Vec<StoredChunk>) -> Result<PutOutcome, BlobError> {
        let Some((holders, quorum)) = self.holders(chunks.iter().map(|c| c.id)) else {
            let local = self.local.clone();
            return blocking(move || local.put(&chunks)).await?;
        };
        let chunks = blocking(move || chunks.iter().try_for_each(StoredChunk::check).map(|()| chunks)).await??;
        let mut sends: BTreeMap<NodeId, Vec<StoredChunk>> = BTreeMap::new();
        for chunk in &chunks {
            for node in &holders[&chunk.id] {
                sends.entry(*node).or_default().push(chunk.clone());
            }
        }
        // Every holder is sent its copies at once; the answer comes when each
        // chunk is on a quorum, and slower copies finish in the background.
        let (results, mut answers) = tokio::sync::mpsc::unbounded_channel();
        let mut pending = 0;
        for (node, batch) in sends {
            let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
            let results = results.clone();
            if node == self.node {
                let local = self.local.clone();
                tokio::spawn(async move {
                    // Checked against their names above.
                    let stored = blocking(move || local.put_checked(&batch)).await;
                    let stored = stored.and_then(|r| r).map(|_| ()).map_err(|e| e.to_string());
                    let _ = results.send((node, ids, stored));
                });
            } else if let Some(peers) = self.peers.as_ref().filter(|_| !self.is_down(node)) {
                let send = peers.put(node, batch);
                tokio::spawn(async move {
                    let _ = results.send((node, ids, send.await));
                });
            } else {
                continue;
            }
            pending += 1;
        }
        drop(results);
        let mut copies: HashMap<ChunkId, usize> = HashMap::new();
        let mut failures = Vec::new();
        while pending > 0 && chunks.iter().any(|c| copies.get(&c.id).copied().unwrap_or(0) < quorum) {
            let Some((node, ids, result)) = answers.recv().await else {
                break;
            };
            pending -= 1;
            if node != self.node {
                self.mark(node, &result);
            }
            match result {
                Ok(()) => ids.into_iter().for_each(|id| *copies.entry(id).or_default() += 1),
                Err(error) => failures.push(format!("node {node}: {error}")),
            }
        }
        let short = chunks.iter().filter(|c| copies.get(&c.id).copied().unwrap_or(0) < quorum).count();
        if short > 0 {
            return Err(BlobError::Unavailable(format!(
                "{short} chunks did not reach {quorum} of their holders ({})",
                failures.join("; ")
            )));
        }
        Ok(PutOutcome { stored: chunks.len() as u32, present: 0 })
    }

    /// The chunks of `ids` that any member holds, each checked; the ids
    /// none has are returned apart. Copies found lacking or damaged on a
    /// holder are repaired in the background.
    pub async fn get(&self, ids: &[ChunkId]) -> Result<(Vec<StoredChunk>, Vec<ChunkId>), BlobError> {
        let local = self.local.clone();
        let wanted = ids.to_vec();
        let (mut found, mut lacking): (HashMap<ChunkId, StoredChunk>, Vec<ChunkId>) = blocking(move || {
            let mut found = HashMap::new();
            let mut lacking = Vec::new();
            for id in wanted {
                match local.get(&id) {
                    Ok(Some(chunk)) => {
                        found.insert(id, chunk);
                    }
                    Ok(None) | Err(BlobError::Damaged { .. }) => lacking.push(id),
                    Err(other) => return Err(other),
                }
            }
            Ok((found, lacking))
        })
        .await??;
        lacking.sort_unstable();
        lacking.dedup();
        if let (Some(peers), false) = (&self.peers, lacking.is_empty()) {
            let members = peers.members();
            let reachable = peers.reachable();
            let copies = COPIES.min(members.len().max(1));
            // Holders in rendezvous order, then everyone else.
            let order = |id: &ChunkId| -> Vec<NodeId> {
                let mut order = placement::holders(id, &members, copies);
                order.extend(reachable.iter().filter(|n| !order.contains(n)).copied().collect::<Vec<_>>());
                order.retain(|n| *n != self.node);
                order
            };
            let mut tried: HashMap<ChunkId, Vec<NodeId>> = HashMap::new();
            let mut round = 0;
            while !lacking.is_empty() && round < reachable.len() {
                let mut asks: BTreeMap<NodeId, Vec<ChunkId>> = BTreeMap::new();
                for id in &lacking {
                    if let Some(node) = order(id).get(round) {
                        asks.entry(*node).or_default().push(*id);
                    }
                }
                for (node, ask) in asks {
                    let got = if self.is_down(node) {
                        Vec::new()
                    } else {
                        let answer = peers.get(node, ask.clone()).await;
                        self.mark(node, &answer);
                        answer.unwrap_or_default()
                    };
                    let got =
                        blocking(move || got.into_iter().filter(|c| c.check().is_ok()).collect::<Vec<_>>()).await?;
                    for chunk in got {
                        if ask.contains(&chunk.id) {
                            found.insert(chunk.id, chunk);
                        }
                    }
                    for id in ask {
                        tried.entry(id).or_default().push(node);
                    }
                }
                lacking.retain(|id| !found.contains_key(id));
                round += 1;
            }
            self.repair(&found, &tried, &members, copies);
        }
        let mut chunks = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for chunk in crate::in_order(found, ids) {
            match chunk {
                Ok(chunk) => chunks.push(chunk),
                Err(id) => missing.push(id),
            }
        }
        Ok((chunks, missing))
    }

    /// Sends good copies to the holders (this node included) that did not
    /// have them, in the background.
    fn repair(
        &self,
        found: &HashMap<ChunkId, StoredChunk>,
        tried: &HashMap<ChunkId, Vec<NodeId>>,
        members: &[NodeId],
        copies: usize,
    ) {
        let Some(peers) = &self.peers else { return };
        let mut sends: BTreeMap<NodeId, Vec<StoredChunk>> = BTreeMap::new();
        // Only chunks fetched from elsewhere: this node lacked each of them.
        for (id, asked) in tried {
            let Some(chunk) = found.get(id) else { continue };
            let holders = placement::holders(id, members, copies);
            // The node asked last gave it; the ones asked before did not have it.
            let before = &asked[..asked.len().saturating_sub(1)];
            let lacked: Vec<NodeId> = before.iter().filter(|n| holders.contains(n)).copied().collect();
            let here = holders.contains(&self.node).then_some(self.node);
            for node in lacked.into_iter().chain(here) {
                sends.entry(node).or_default().push(chunk.clone());
            }
        }
        for (node, batch) in sends {
            tracing::info!(%node, chunks = batch.len(), "repairing chunk copies");
            if node == self.node {
                let local = self.local.clone();
                tokio::spawn(async move {
                    // Each was checked against its name when it was fetched.
                    if let Err(error) = blocking(move || local.put_checked(&batch)).await.and_then(|put| put) {
                        tracing::warn!(%error, "repairing a local chunk copy failed");
                    }
                });
            } else {
                let send = peers.put(node, batch);
                tokio::spawn(async move {
                    if let Err(error) = send.await {
                        tracing::warn!(%node, %error, "repairing a chunk copy failed");
                    }
                });
            }
        }
    }
}

/// What one scrub pass found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks read back and checked against their names.
    pub checked: u64,
    /// Local copies found damaged (and fetched again where this node holds the chunk).
    pub damaged: u64,
    /// Copies sent to holders that lacked them.
    pub copies_sent: u64,
    /// Copies that could not be checked (their holder did not answer, or
    /// would not take a copy); a pass with any is not a clean pass.
    pub unverified: u64,
    /// Local copies of chunks this node no longer holds, dropped because
    /// every holder has one.
    pub handed_off: u64,
}

impl ScrubReport {
    /// Every copy was found well and in its place, and nothing had to be mended.
    pub fn clean(&self) -> bool {
        self.damaged == 0 && self.copies_sent == 0 && self.unverified == 0 && self.handed_off == 0
    }
}

/// Chunks checked per step of a scrub pass.
const SCRUB_STEP_CHUNKS: usize = 64;

impl ChunkStore {
    /// The plain bytes of chunks, in order, from wherever the cluster keeps them.
    pub async fn read_plain(&self, refs: &[ChunkRef]) -> Result<Vec<Vec<u8>>, BlobError> {
        let mut plains = Vec::with_capacity(refs.len());
        for batch in refs.chunks(limits::CHUNKS_PER_STREAM_MAX) {
            let ids: Vec<ChunkId> = batch.iter().map(|r| r.id).collect();
            let (chunks, missing) = self.get(&ids).await?;
            if !missing.is_empty() {
                return Err(BlobError::Missing(missing.len()));
            }
            for chunk in chunks {
                plains.push(chunk.into_plain()?);
            }
        }
        Ok(plains)
    }

    /// The data chunks of a list (reading its list chunks if it is indirect).
    pub async fn expand(&self, content: &ChunkList) -> Result<Vec<ChunkRef>, BlobError> {
        if !content.within_bounds() {
            return Err(BlobError::Malformed { what: "chunk list", reason: "over its bound".into() });
        }
        match content {
            ChunkList::Inline(refs) => Ok(refs.clone()),
            ChunkList::Indirect(pieces) => {
                let mut refs = Vec::new();
                for plain in self.read_plain(pieces).await? {
                    refs.extend(list::decode_piece(&plain)?);
                }
                Ok(refs)
            }
        }
    }

    /// A snapshot's tree, read back from its chunks.
    pub async fn read_tree(&self, tree: &ChunkList) -> Result<Tree, BlobError> {
        let refs = self.expand(tree).await?;
        let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        if total > limits::TREE_BYTES_MAX {
            return Err(BlobError::Malformed { what: "tree", reason: format!("{total} bytes is over the limit") });
        }
        Tree::decode(&self.read_plain(&refs).await?.concat())
    }
}

impl ChunkStore {
    /// One pass over this node's chunks: each is read back and checked
    /// against its name (a damaged copy is fetched again from another
    /// holder), and in a cluster each chunk's holders are asked whether
    /// they have it and sent a copy if not, so copies lost with a disk, or
    /// placed on a member that joined later, come back. Reads at most
    /// `bytes_per_sec` so serving clients comes first, each pack front to
    /// back, and drops what it read from the page cache.
    ///
    /// A chunk this node is no longer a holder of (members joined, or this
    /// node is draining) is dropped here once every one of its holders has
    /// it durably, and only while the members are the ones the pass began
    /// with: views of the members differ between nodes only for a moment,
    /// and one change of members moves at most one of a chunk's holders
    /// under rendezvous hashing, so the holders both views share (all but
    /// one) keep their copies. The dropped records' space comes back when
    /// collection rewrites their packs.
    pub async fn scrub(&self, bytes_per_sec: u64) -> Result<ScrubReport, BlobError> {
        let mut report = ScrubReport::default();
        let started = Instant::now();
        let mut read = 0u64;
        let pass_members = self.peers.as_ref().map(|peers| sorted(peers.members()));
        let local = self.local.clone();
        for pack in blocking(move || local.pack_numbers()).await? {
            let local = self.local.clone();
            let ids = blocking(move || local.ids_in_pack(pack)).await?;
            for step in ids.chunks(SCRUB_STEP_CHUNKS) {
                read += self.scrub_step(step.to_vec(), pass_members.as_deref(), &mut report).await?;
                // Throttle: never read faster than the budget.
                let due = Duration::from_secs_f64(read as f64 / bytes_per_sec.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(report)
    }

    /// Checks the chunks of `wanted`, fetches damaged ones again, sends
    /// copies to holders that lack them and drops the copies this node no
    /// longer holds; returns the bytes read.
    async fn scrub_step(
        &self,
        wanted: Vec<ChunkId>,
        pass_members: Option<&[NodeId]>,
        report: &mut ScrubReport,
    ) -> Result<u64, BlobError> {
        let local = self.local.clone();
        let (good, damaged): (Vec<StoredChunk>, Vec<ChunkId>) = blocking(move || {
            let mut good = Vec::new();
            let mut damaged = Vec::new();
            for &id in &wanted {
                match local.get(&id) {
                    Ok(Some(chunk)) if chunk.check().is_ok() => good.push(chunk),
                    Ok(None) => {}
                    Ok(Some(_)) | Err(BlobError::Damaged { .. }) => {
                        local.forget(&id);
                        damaged.push(id);
                    }
                    Err(error) => tracing::warn!(%error, "scrub could not read a chunk"),
                }
            }
            local.leave_page_cache_of(&wanted);
            (good, damaged)
        })
        .await?;
        report.checked += (good.len() + damaged.len()) as u64;
        report.damaged += damaged.len() as u64;
        let read = good.iter().map(|c| c.bytes.len() as u64).sum::<u64>();
        if !damaged.is_empty() {
            tracing::error!(count = damaged.len(), "scrub found damaged chunk copies; fetching them again");
            // `get` fetches from the other holders and repairs this node's copy.
            self.get(&damaged).await?;
        }
        let replicated = self.replicate(good).await;
        report.copies_sent += replicated.sent;
        report.unverified += replicated.unverified;
        let settled = |peers: &Arc<dyn ChunkPeers>| pass_members == Some(sorted(peers.members()).as_slice());
        if !replicated.everywhere_else.is_empty() && self.peers.as_ref().is_some_and(settled) {
            let local = self.local.clone();
            let handed_off = replicated.everywhere_else;
            let count = handed_off.len() as u64;
            blocking(move || handed_off.iter().for_each(|id| local.forget(id))).await?;
            report.handed_off += count;
        }
        Ok(read)
    }

    /// Sends each chunk to its holders that lack it; says what it sent,
    /// what it could not check, and which chunks this node does not hold
    /// that every holder now has.
    async fn replicate(&self, chunks: Vec<StoredChunk>) -> Replicated {
        let mut outcome = Replicated::default();
        let Some((holders, _)) = self.holders(chunks.iter().map(|c| c.id)) else {
            return outcome;
        };
        let Some(peers) = &self.peers else { return outcome };
        let mut asks: BTreeMap<NodeId, Vec<ChunkId>> = BTreeMap::new();
        for (id, nodes) in &holders {
            for node in nodes.iter().filter(|n| **n != self.node) {
                asks.entry(*node).or_default().push(*id);
            }
        }
        let asked: u64 = asks.values().map(|ids| ids.len() as u64).sum();
        let by_id: HashMap<ChunkId, StoredChunk> = chunks.into_iter().map(|c| (c.id, c)).collect();
        let mut checked = 0;
        // Holders known to have each chunk durably: they said so, or took a copy.
        let mut confirmed: HashMap<ChunkId, usize> = HashMap::new();
        for (node, ids, answer) in self.ask_all(asks, Presence::Audit).await {
            let Ok(lacking) = answer else { continue };
            let copies: Vec<StoredChunk> = lacking.iter().filter_map(|id| by_id.get(id).cloned()).collect();
            let count = copies.len() as u64;
            if count > 0 {
                let result = peers.put(node, copies).await;
                self.mark(node, &result);
                match result {
                    Ok(()) => outcome.sent += count,
                    Err(error) => {
                        tracing::warn!(%node, %error, "scrub could not send a chunk copy");
                        continue;
                    }
                }
            }
            checked += ids.len() as u64;
            ids.iter().for_each(|id| *confirmed.entry(*id).or_default() += 1);
        }
        outcome.unverified = asked - checked;
        outcome.everywhere_else = holders
            .iter()
            .filter(|(id, nodes)| !nodes.contains(&self.node) && confirmed.get(*id) == Some(&nodes.len()))
            .map(|(id, _)| *id)
            .collect();
        outcome
    }
}

/// What [`ChunkStore::replicate`] did for one step of a scrub pass.
#[derive(Default)]
struct Replicated {
    sent: u64,
    unverified: u64,
    /// Chunks this node is not a holder of, on every holder now.
    everywhere_else: Vec<ChunkId>,
}

fn sorted(mut members: Vec<NodeId>) -> Vec<NodeId> {
    members.sort_unstable();
    members
}
