//! Handlers of the cloud store: chunk uploads and downloads on their own
//! streams, and the namespace requests (files, folders, snapshots) that end
//! in a command on the user's shard.
//!
//! Nothing is committed that names a chunk the cluster does not hold on a
//! quorum of its holders: a file's or snapshot's every chunk (list chunks
//! and tree chunks included) is checked before the command is proposed,
//! and the command carries the time the check began, so a garbage
//! collection that started reading the shard since refuses it (see
//! docs/design/store.md). Chunk bytes are checked against their names when
//! they arrive, so a bad upload can never stand in for someone else's
//! content under its name.

use crate::connection::Session;
use crate::handlers::{now_ms, require_auth};
use crate::{ApiError, Shared};
use hamgam_blob::{BlobError, ChunkStore, StoredChunk, Tree, TreeKind};
use hamgam_proto::frame::{self, FrameError, FrameKind};
use hamgam_proto::store::{ChunkList, EntryKind, FileManifest, SharedFile, SnapshotStats, read_chunk_frame};
use hamgam_proto::{ErrorCode, Response};
use hamgam_sync::{Command, Reply};
use hamgam_types::{ChatId, ChunkId, UserId, limits};
use std::collections::HashSet;
use std::sync::Arc;

impl From<BlobError> for ApiError {
    fn from(error: BlobError) -> ApiError {
        match error {
            BlobError::Mismatch { .. } => ApiError::new(ErrorCode::CHUNK_MISMATCH, error.to_string()),
            BlobError::Damaged { .. } => ApiError::new(ErrorCode::DATA_CORRUPT, error.to_string()),
            BlobError::Malformed { .. } => ApiError::new(ErrorCode::INVALID_ARGUMENT, error.to_string()),
            BlobError::Missing(_) => ApiError::new(ErrorCode::CHUNKS_MISSING, error.to_string()),
            BlobError::Unavailable(_) => ApiError::unavailable(format!("{error}; retry")),
            BlobError::Io { .. } => ApiError::internal(error.to_string()),
        }
    }
}

fn check_count(count: usize, max: usize, what: &str) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::new(ErrorCode::INVALID_ARGUMENT, format!("{count} {what} is over the limit of {max}")));
    }
    Ok(())
}

pub(crate) async fn missing_chunks(shared: &Shared, session: &Session, ids: &[ChunkId]) -> Result<Response, ApiError> {
    require_auth(shared, session)?;
    check_count(ids.len(), limits::CHUNK_IDS_PER_REQUEST_MAX, "chunk ids")?;
    Ok(Response::MissingChunks { ids: shared.chunks.missing(ids).await? })
}

/// Reads `count` chunk frames, then stores them durably in one batch.
pub(crate) async fn put_chunks(
    shared: &Shared,
    session: &Session,
    count: u32,
    recv: &mut quinn::RecvStream,
) -> Result<Response, ApiError> {
    require_auth(shared, session)?;
    check_count(count as usize, limits::CHUNKS_PER_STREAM_MAX, "chunks on one stream")?;
    // Bounds the bytes every upload in flight on this node holds at once.
    let _permit = shared.transfer_budget.acquire().await.map_err(|_| ApiError::unavailable("the node is stopping"))?;
    let mut chunks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let chunk = read_chunk_frame(recv).await.map_err(|error| match error {
            FrameError::TooLarge { length, max, .. } => {
                ApiError::new(ErrorCode::FRAME_TOO_LARGE, format!("a chunk frame of {length} bytes is over {max}"))
            }
            other => ApiError::new(ErrorCode::MALFORMED_FRAME, format!("reading chunk frames: {other}")),
        })?;
        chunks.push(StoredChunk::from(chunk));
    }
    let outcome = shared.chunks.put(chunks).await?;
    Ok(Response::ChunksStored { stored: outcome.stored, present: outcome.present })
}

/// Answers with the list of ids not found, then one chunk frame per found id.
pub(crate) async fn get_chunks(
    shared: &Shared,
    session: &Session,
    ids: Vec<ChunkId>,
    send: &mut quinn::SendStream,
) -> Result<(), ApiError> {
    require_auth(shared, session)?;
    check_count(ids.len(), limits::CHUNKS_PER_STREAM_MAX, "chunks on one stream")?;
    let _permit = shared.transfer_budget.acquire().await.map_err(|_| ApiError::unavailable("the node is stopping"))?;
    let (found, missing) = shared.chunks.get(&ids).await?;
    let write_failed = |error: FrameError| ApiError::internal(format!("writing chunks: {error}"));
    frame::write_frame(send, FrameKind::Response, &Response::ChunksFollow { missing }).await.map_err(write_failed)?;
    for chunk in &found {
        let (head, bytes) = chunk.frame().map_err(write_failed)?;
        hamgam_transport::write_with_owned_body(send, &head, bytes)
            .await
            .map_err(|error| ApiError::internal(format!("writing chunks: {error}")))?;
    }
    Ok(())
}

/// Checks every one of `ids` is stored, asking in batches.
async fn check_stored(store: &ChunkStore, ids: &[ChunkId]) -> Result<(), ApiError> {
    let mut missing = 0;
    for batch in ids.chunks(limits::CHUNK_IDS_PER_REQUEST_MAX) {
        missing += store.missing(batch).await?.len();
    }
    if missing > 0 {
        return Err(BlobError::Missing(missing).into());
    }
    Ok(())
}

/// Checks every chunk of a list is stored; returns the data chunks' total length.
async fn check_list(store: &ChunkStore, content: &ChunkList) -> Result<u64, ApiError> {
    let refs = store.expand(content).await?;
    check_stored(store, &refs.iter().map(|r| r.id).collect::<Vec<_>>()).await?;
    Ok(refs.iter().map(|r| u64::from(r.len)).sum())
}

pub(crate) async fn put_file(
    shared: &Shared,
    session: &Session,
    path: String,
    manifest: FileManifest,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    let path = hamgam_sync::normalize_path(&path)?;
    // Taken before the check: the command carries when its chunks were
    // last known stored, which garbage collection's floor is compared with.
    let checked_from = now_ms();
    let length = check_list(&shared.chunks, &manifest.content).await?;
    if length != manifest.size {
        return Err(ApiError::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("the chunks hold {length} bytes but the file is said to have {}", manifest.size),
        ));
    }
    let command = Command::PutFile {
        user: auth.user,
        path: path.clone(),
        manifest,
        quota_bytes: shared.config.user_quota_bytes,
        now_ms: checked_from,
    };
    shared.sync.execute(command).await?;
    stat_file(shared, session, path).await
}

/// Shares the caller's stored file into a chat: the file's chunks are
/// checked (and so kept from collection) and the chat's shard records a
/// message carrying the file's manifest. No chunk moves.
pub(crate) async fn share_file(
    shared: &Shared,
    session: &Session,
    chat: ChatId,
    client_msg_id: u64,
    path: String,
    caption: String,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    if !caption.is_empty() {
        hamgam_sync::text::check_message_text(&caption)?;
    }
    let (file, checked_from) = checked_shared_file(shared, auth.user, &path, &[]).await?;
    let command = Command::SendFile { chat, sender: auth.user, client_msg_id, caption, file, now_ms: checked_from };
    match shared.sync.execute(command).await? {
        Reply::Sent { seq, date_ms } => Ok(Response::Sent { seq, date_ms }),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// `user`'s stored file at `path` as it travels into a chat or an album,
/// its chunks (and `also`, a thumbnail) checked; with the time the check
/// began, which the command carries (as in `put_file`).
pub(crate) async fn checked_shared_file(
    shared: &Shared,
    user: UserId,
    path: &str,
    also: &[ChunkId],
) -> Result<(SharedFile, u64), ApiError> {
    shared.sync.fresh_user(user).await?;
    let (entry, content) = shared.sync.stat_path(user, path)?;
    if entry.kind != EntryKind::File {
        return Err(ApiError::new(ErrorCode::INVALID_ARGUMENT, format!("{} is a folder, not a file", entry.path)));
    }
    let checked_from = now_ms();
    check_list(&shared.chunks, &content).await?;
    check_stored(&shared.chunks, also).await?;
    let name = hamgam_sync::split_path(&entry.path).1.to_string();
    Ok((SharedFile { name, size: entry.size, hash: entry.hash, content }, checked_from))
}

pub(crate) async fn stat_file(shared: &Shared, session: &Session, path: String) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    shared.sync.fresh_user(auth.user).await?;
    let (entry, content) = shared.sync.stat_path(auth.user, &path)?;
    Ok(Response::File { entry, content })
}

pub(crate) async fn commit_snapshot(
    shared: &Shared,
    session: &Session,
    label: String,
    parent: Option<u64>,
    tree: ChunkList,
    stats: SnapshotStats,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    shared.sync.fresh_user(auth.user).await?;
    let parent_tree = match parent {
        Some(id) => Some(shared.sync.snapshot(auth.user, id)?.tree),
        None => None,
    };
    let store = &shared.chunks;
    let checked_from = now_ms(); // as in `put_file`
    let new_tree = store.read_tree(&tree).await?;
    // Every file's chunks, each asked about once, in batches across files.
    let mut ids = HashSet::new();
    for (_, content) in new_tree.file_chunk_lists() {
        ids.extend(store.expand(content).await?.iter().map(|r| r.id));
    }
    check_stored(store, &ids.into_iter().collect::<Vec<_>>()).await?;
    // What the snapshot adds: files whose content its parent did not have.
    let known: HashSet<(u64, [u8; 32])> = match parent_tree {
        Some(parent) => file_contents(&store.read_tree(&parent).await?).collect(),
        None => HashSet::new(),
    };
    let added_bytes = file_contents(&new_tree).filter(|content| !known.contains(content)).map(|(size, _)| size).sum();
    let command = Command::AddSnapshot {
        user: auth.user,
        label,
        parent,
        tree,
        stats,
        added_bytes,
        quota_bytes: shared.config.user_quota_bytes,
        now_ms: checked_from,
    };
    match shared.sync.execute(command).await? {
        Reply::Snapshot { id } => {
            // This node may host a replica that has not applied it yet.
            shared.sync.fresh_user(auth.user).await?;
            Ok(Response::Snapshot(shared.sync.snapshot(auth.user, id)?))
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// (size, hash) of every file of a tree.
fn file_contents(tree: &Tree) -> impl Iterator<Item = (u64, [u8; 32])> + '_ {
    tree.entries.iter().filter_map(|entry| match &entry.kind {
        TreeKind::File { size, hash, .. } => Some((*size, *hash)),
        _ => None,
    })
}

/// The budget of concurrent chunk transfers on a node: each holds at most
/// `CHUNKS_PER_STREAM_MAX` chunks in memory.
pub(crate) fn transfer_budget() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(limits::CHUNK_TRANSFERS_IN_FLIGHT_MAX))
}
