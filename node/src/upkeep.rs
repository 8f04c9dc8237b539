//! The chunk store's upkeep tasks on a node: the scrubber, which checks
//! every local copy and re-sends missing ones, and garbage collection,
//! which removes chunks nothing needs any more.
//!
//! Collection, one pass ("mark", then "sweep"; the safety argument is in
//! docs/design/store.md):
//!
//! 1. `mark_ms` is now; every shard gets a `GcBarrier` with the floor
//!    `mark_ms - grace / 2`, after which a command naming chunks checked
//!    before the floor is refused.
//! 2. Every chunk root of every shard is read (files, snapshot trees), and
//!    every chunk each names, through list chunks and trees, joins the live
//!    set. Any failure ends the pass without removing anything: a live set
//!    missing one root would delete what that root needs.
//! 3. This node's pack store drops every chunk that is not live and was not
//!    touched (stored, or reported present) since `mark_ms - grace`.
//!
//! Every node runs its own passes for its own packs; a pass reads the whole
//! namespace, so passes are rare (`storage.gc_interval_secs`, a day by
//! default).

use anyhow::Context;
use hamgam_blob::{ChunkStore, CollectReport, wall_clock_ms};
use hamgam_proto::store::ChunkList;
use hamgam_sync::{ChunkRoot, Command, SyncService};
use hamgam_types::{ChunkId, ShardId};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs `pass` once per `interval` until cancelled; a pass in progress
/// is dropped when the node stops.
async fn every<F, Fut>(interval: Duration, cancel: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = pass() => {}
        }
    }
}

/// Checks every local chunk and its copies on the other holders once per
/// `interval`, reading at most `bytes_per_sec`, until cancelled.
pub(crate) async fn scrub_chunks(
    chunks: Arc<ChunkStore>,
    interval: Duration,
    bytes_per_sec: u64,
    cancel: CancellationToken,
) {
    every(interval, &cancel, || async {
        match chunks.scrub(bytes_per_sec).await {
            Ok(report) if !report.clean() => tracing::warn!(
                checked = report.checked,
                damaged = report.damaged,
                copies_sent = report.copies_sent,
                unverified = report.unverified,
                handed_off = report.handed_off,
                "scrub pass mended chunk copies, moved some or could not check some"
            ),
            Ok(report) => tracing::info!(checked = report.checked, "scrub pass found every chunk copy well"),
            Err(error) => tracing::warn!(%error, "a scrub pass stopped early"),
        }
    })
    .await;
}

/// Runs a collection pass once per `interval` until cancelled.
pub(crate) async fn collect_garbage(
    sync: SyncService,
    chunks: Arc<ChunkStore>,
    interval: Duration,
    grace: Duration,
    cancel: CancellationToken,
) {
    every(interval, &cancel, || async {
        match collect_once(&sync, &chunks, grace).await {
            Ok((live, report)) => tracing::info!(
                live,
                kept = report.kept,
                dropped = report.dropped,
                dropped_bytes = report.dropped_bytes,
                packs_rewritten = report.packs_rewritten,
                freed_bytes = report.freed_bytes,
                "garbage collection pass done"
            ),
            Err(error) => tracing::warn!("garbage collection pass stopped, nothing removed: {error:#}"),
        }
    })
    .await;
}

/// One pass: returns the size of the live set and what the sweep did.
pub(crate) async fn collect_once(
    sync: &SyncService,
    chunks: &Arc<ChunkStore>,
    grace: Duration,
) -> anyhow::Result<(usize, CollectReport)> {
    let grace_ms = grace.as_millis() as u64;
    let mark_ms = wall_clock_ms();
    let floor_ms = mark_ms.saturating_sub(grace_ms / 2);
    // Shard 0 holds the cluster's membership, never chunk roots.
    let shards: Vec<ShardId> = (1..=sync.placement().data_shards()).map(ShardId).collect();
    for &shard in &shards {
        sync.execute(Command::GcBarrier { shard, floor_ms })
            .await
            .with_context(|| format!("raising the collection floor of shard {shard}"))?;
    }
    let mut live = LiveSet::default();
    for &shard in &shards {
        sync.fresh_shard(shard).await.with_context(|| format!("reading shard {shard}"))?;
        let mut from: Option<Vec<u8>> = None;
        loop {
            // A shard hosted elsewhere is read over the network, blocking.
            let (roots, next) = tokio::task::block_in_place(|| sync.chunk_roots(shard, from.as_deref()))
                .with_context(|| format!("reading the chunk roots of shard {shard}"))?;
            for root in roots {
                live.add_root(chunks, &root).await?;
            }
            match next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
    }
    let count = live.ids.len();
    let pack = chunks.local().clone();
    let cutoff_ms = mark_ms.saturating_sub(grace_ms);
    let report = tokio::task::spawn_blocking(move || pack.collect(&live.ids, cutoff_ms)).await??;
    Ok((count, report))
}

/// The chunks some root needs, and the lists already expanded (many
/// snapshots name the same long files).
#[derive(Default)]
struct LiveSet {
    ids: HashSet<ChunkId>,
    expanded: HashSet<Vec<ChunkId>>,
}

impl LiveSet {
    async fn add_root(&mut self, chunks: &ChunkStore, root: &ChunkRoot) -> anyhow::Result<()> {
        match root {
            ChunkRoot::File(content) => self.add_list(chunks, content).await,
            ChunkRoot::Tree(tree) => {
                self.add_list(chunks, tree).await?;
                let tree = chunks.read_tree(tree).await.context("reading a snapshot's tree")?;
                for (_, content) in tree.file_chunk_lists() {
                    self.add_list(chunks, content).await?;
                }
                Ok(())
            }
        }
    }

    /// A list's own chunks and, for an indirect list, the data chunks its
    /// list chunks name.
    async fn add_list(&mut self, chunks: &ChunkStore, list: &ChunkList) -> anyhow::Result<()> {
        match list {
            ChunkList::Inline(refs) => self.ids.extend(refs.iter().map(|r| r.id)),
            ChunkList::Indirect(pieces) => {
                let piece_ids: Vec<ChunkId> = pieces.iter().map(|r| r.id).collect();
                self.ids.extend(piece_ids.iter().copied());
                if self.expanded.insert(piece_ids) {
                    let refs = chunks.expand(list).await.context("reading a chunk list")?;
                    self.ids.extend(refs.iter().map(|r| r.id));
                }
            }
        }
        Ok(())
    }
}
