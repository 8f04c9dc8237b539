//! The chunk store's upkeep tasks on a node: the scrubber, which checks
//! every local copy, re-sends missing ones and hands copies over when the
//! members change, and garbage collection, which removes chunks nothing
//! needs any more.
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
use hamgam_cluster::{ClusterView, MemberState};
use hamgam_proto::store::ChunkList;
use hamgam_sync::{ChunkRoot, Command, SyncService};
use hamgam_types::{ChunkId, NodeId, ShardId};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long the scrubber lets a change of members settle before a pass: a
/// join or a drain often comes with a second change (a reactivation, the
/// next node) within seconds, and one pass can serve both.
const MEMBER_CHANGE_SETTLE: Duration = Duration::from_secs(5);

/// After a pass in which some holder did not answer, the next pass comes
/// this soon, then twice as late after each such pass, up to the interval:
/// copies waiting for a member that was down (to be checked there, or
/// handed over to it) move soon after it is back, and a member down for
/// long costs a few passes more, not one a minute.
const RETRY_FIRST: Duration = Duration::from_secs(60);

/// When the next pass is due after `unanswered` passes in a row in which
/// some holder did not answer.
fn next_pass_after(interval: Duration, unanswered: u32) -> Duration {
    match unanswered {
        0 => interval,
        n => RETRY_FIRST.saturating_mul(1 << (n - 1).min(20)).min(interval),
    }
}

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

/// What of shard 0's member list decides where chunks live: who is a
/// member and in what state (not who is up at the moment).
fn chunk_membership(view: &ClusterView) -> Vec<(NodeId, MemberState)> {
    let mut members: Vec<_> = view.members.iter().map(|m| (m.id, m.state)).collect();
    members.sort_by_key(|(id, _)| *id);
    members
}

/// Returns once the member list differs from `seen` (never, if shard 0's
/// view is gone).
async fn members_change(view: &mut watch::Receiver<ClusterView>, seen: &[(NodeId, MemberState)]) {
    loop {
        if chunk_membership(&view.borrow_and_update()) != seen {
            return;
        }
        if view.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Whether `node` is a draining member: its copies must leave, and a
/// restart finds those it had handed over in its packs again.
fn draining(members: &[(NodeId, MemberState)], node: NodeId) -> bool {
    members.contains(&(node, MemberState::Draining))
}

/// Checks every local chunk and its copies on the other holders once per
/// `interval`, reading at most `bytes_per_sec`, until cancelled; and soon
/// after the members change (or this node starts draining), so that chunks
/// reach their new holders and a draining node empties its store in
/// minutes, not at the next interval.
pub(crate) async fn scrub_chunks(
    chunks: Arc<ChunkStore>,
    node: NodeId,
    interval: Duration,
    bytes_per_sec: u64,
    mut view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
) {
    let mut seen = chunk_membership(&view.borrow());
    let mut soon = draining(&seen, node);
    let mut unanswered = 0;
    loop {
        let wait = if soon { MEMBER_CHANGE_SETTLE } else { next_pass_after(interval, unanswered) };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = members_change(&mut view, &seen) => {
                if seen.is_empty() {
                    // Shard 0's record arrived after start: nothing moved.
                    seen = chunk_membership(&view.borrow());
                    soon = draining(&seen, node);
                    continue;
                }
                // Not worded like a pass's report ("scrub pass ..."), which tools read.
                let settle = MEMBER_CHANGE_SETTLE;
                tracing::info!(?settle, "the members changed; the scrubber checks after settling");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(MEMBER_CHANGE_SETTLE) => {}
                }
            }
        }
        // A change during the pass is seen against this list and starts the next one.
        seen = chunk_membership(&view.borrow());
        soon = false;
        tokio::select! {
            () = cancel.cancelled() => return,
            answered = scrub_once(&chunks, bytes_per_sec) => {
                unanswered = if answered { 0 } else { unanswered.saturating_add(1) };
            }
        }
    }
}

/// One pass, logged; whether every holder answered (and the pass ran to its end).
async fn scrub_once(chunks: &ChunkStore, bytes_per_sec: u64) -> bool {
    let report = chunks.scrub(bytes_per_sec).await;
    match &report {
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
    report.is_ok_and(|report| report.unverified == 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_come_sooner_while_holders_do_not_answer_and_back_off_to_the_interval() {
        let interval = Duration::from_secs(6 * 3600);
        assert_eq!(next_pass_after(interval, 0), interval);
        let retries: Vec<u64> = (1..=10).map(|n| next_pass_after(interval, n).as_secs()).collect();
        assert_eq!(retries, [60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600]);
        assert_eq!(next_pass_after(interval, u32::MAX), interval, "no overflow after many passes");
        // An interval shorter than the retry is kept.
        assert_eq!(next_pass_after(Duration::from_secs(1), 3), Duration::from_secs(1));
    }
}
