//! Handlers of the cloud store: chunk uploads and downloads on their own
//! streams, and the namespace requests (files, folders, snapshots) that end
//! in a command on the user's shard.
//!
//! Nothing is committed that names a chunk this node does not hold: a file's
//! or snapshot's every chunk (list chunks and tree chunks included) is
//! checked before the command is proposed. Chunk bytes are checked against
//! their names when they arrive, so a bad upload can never stand in for
//! someone else's content under its name.

use crate::connection::Session;
use crate::handlers::{now_ms, require_auth};
use crate::{ApiError, Shared};
use hamgam_blob::{BlobError, PackStore, StoredChunk, Tree, TreeKind, list};
use hamgam_proto::frame::{self, FrameError, FrameKind};
use hamgam_proto::store::{ChunkFrame, ChunkList, ChunkRef, FileManifest, SnapshotStats};
use hamgam_proto::{ErrorCode, Response};
use hamgam_sync::{Command, Reply};
use hamgam_types::{ChunkId, limits};
use std::collections::HashSet;
use std::sync::Arc;

impl From<BlobError> for ApiError {
    fn from(error: BlobError) -> ApiError {
        match error {
            BlobError::Mismatch { .. } => {
                ApiError::new(ErrorCode::CHUNK_MISMATCH, error.to_string())
            }
            BlobError::Damaged { .. } => ApiError::new(ErrorCode::DATA_CORRUPT, error.to_string()),
            BlobError::Malformed { .. } => {
                ApiError::new(ErrorCode::INVALID_ARGUMENT, error.to_string())
            }
            BlobError::Io { .. } => ApiError::internal(error.to_string()),
        }
    }
}

/// Runs blocking chunk-store work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::internal(format!("chunk store task: {error}")))?
}

fn check_count(count: usize, max: usize, what: &str) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("{count} {what} is over the limit of {max}"),
        ));
    }
    Ok(())
}

pub(crate) fn missing_chunks(
    shared: &Shared,
    session: &Session,
    ids: &[ChunkId],
) -> Result<Response, ApiError> {
    require_auth(shared, session)?;
    check_count(ids.len(), limits::CHUNK_IDS_PER_REQUEST_MAX, "chunk ids")?;
    Ok(Response::MissingChunks {
        ids: shared.chunks.missing(ids),
    })
}

/// Reads `count` chunk frames, then stores them durably in one batch.
pub(crate) async fn put_chunks(
    shared: &Shared,
    session: &Session,
    count: u32,
    recv: &mut quinn::RecvStream,
) -> Result<Response, ApiError> {
    require_auth(shared, session)?;
    check_count(
        count as usize,
        limits::CHUNKS_PER_STREAM_MAX,
        "chunks on one stream",
    )?;
    // Bounds the bytes every upload in flight on this node holds at once.
    let _permit = shared
        .transfer_budget
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the node is stopping"))?;
    let mut chunks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let payload = frame::read_frame_payload(recv, FrameKind::Chunk)
            .await
            .map_err(|error| match error {
                FrameError::TooLarge { length, max, .. } => ApiError::new(
                    ErrorCode::FRAME_TOO_LARGE,
                    format!("a chunk frame of {length} bytes is over {max}"),
                ),
                other => ApiError::new(
                    ErrorCode::MALFORMED_FRAME,
                    format!("reading chunk frames: {other}"),
                ),
            })?;
        let frame = ChunkFrame::parse(&payload)
            .map_err(|reason| ApiError::new(ErrorCode::MALFORMED_FRAME, reason))?;
        chunks.push(StoredChunk::from_frame(&frame));
    }
    let store = shared.chunks.clone();
    let outcome = blocking(move || Ok(store.put(&chunks)?)).await?;
    Ok(Response::ChunksStored {
        stored: outcome.stored,
        present: outcome.present,
    })
}

/// Answers with the list of ids not found, then one chunk frame per found id.
pub(crate) async fn get_chunks(
    shared: &Shared,
    session: &Session,
    ids: Vec<ChunkId>,
    send: &mut quinn::SendStream,
) -> Result<(), ApiError> {
    require_auth(shared, session)?;
    check_count(
        ids.len(),
        limits::CHUNKS_PER_STREAM_MAX,
        "chunks on one stream",
    )?;
    let _permit = shared
        .transfer_budget
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the node is stopping"))?;
    let store = shared.chunks.clone();
    let (found, missing) = blocking(move || {
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match store.get(&id)? {
                Some(chunk) => found.push(chunk),
                None => missing.push(id),
            }
        }
        Ok((found, missing))
    })
    .await?;
    let write_failed = |error: FrameError| ApiError::internal(format!("writing chunks: {error}"));
    frame::write_frame(
        send,
        FrameKind::Response,
        &Response::ChunksFollow { missing },
    )
    .await
    .map_err(write_failed)?;
    for chunk in &found {
        chunk.as_frame().write(send).await.map_err(write_failed)?;
    }
    Ok(())
}

/// A chunk's plain bytes from this node's store.
fn read_plain(store: &PackStore, chunk: &ChunkRef) -> Result<Vec<u8>, ApiError> {
    match store.get(&chunk.id)? {
        Some(stored) => Ok(stored.open()?),
        None => Err(chunks_missing(1)),
    }
}

fn chunks_missing(count: usize) -> ApiError {
    ApiError::new(
        ErrorCode::CHUNKS_MISSING,
        format!("{count} chunks named are not stored; upload them first"),
    )
}

/// Checks every chunk of a list is stored; returns the data chunks' total length.
fn check_list(store: &PackStore, content: &ChunkList) -> Result<u64, ApiError> {
    if !content.within_bounds() {
        return Err(ApiError::new(
            ErrorCode::INVALID_ARGUMENT,
            "a chunk list is over its bound",
        ));
    }
    let missing = store.missing(&content.refs().iter().map(|r| r.id).collect::<Vec<_>>());
    if !missing.is_empty() {
        return Err(chunks_missing(missing.len()));
    }
    let refs = list::expand(content, |piece| read_plain(store, piece))?;
    let mut missing = 0;
    for batch in refs.chunks(limits::CHUNK_IDS_PER_REQUEST_MAX) {
        missing += store
            .missing(&batch.iter().map(|r| r.id).collect::<Vec<_>>())
            .len();
    }
    if missing > 0 {
        return Err(chunks_missing(missing));
    }
    Ok(refs.iter().map(|r| u64::from(r.len)).sum())
}

/// A snapshot's tree, every chunk checked present.
fn read_tree(store: &PackStore, tree: &ChunkList) -> Result<Tree, ApiError> {
    check_list(store, tree)?;
    let refs = list::expand(tree, |piece| read_plain(store, piece))?;
    let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
    if total > limits::TREE_BYTES_MAX {
        return Err(ApiError::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("a tree of {total} bytes is over the limit"),
        ));
    }
    let mut bytes = Vec::with_capacity(total as usize);
    for chunk in &refs {
        bytes.extend(read_plain(store, chunk)?);
    }
    Ok(Tree::decode(&bytes)?)
}

pub(crate) async fn put_file(
    shared: &Shared,
    session: &Session,
    path: String,
    manifest: FileManifest,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    let path = hamgam_sync::normalize_path(&path)?;
    let store = shared.chunks.clone();
    let content = manifest.content.clone();
    let length = blocking(move || check_list(&store, &content)).await?;
    if length != manifest.size {
        return Err(ApiError::new(
            ErrorCode::INVALID_ARGUMENT,
            format!(
                "the chunks hold {length} bytes but the file is said to have {}",
                manifest.size
            ),
        ));
    }
    let command = Command::PutFile {
        user: auth.user,
        path: path.clone(),
        manifest,
        quota_bytes: shared.config.user_quota_bytes,
        now_ms: now_ms(),
    };
    shared.sync.execute(command).await?;
    stat_file(shared, session, path).await
}

pub(crate) async fn stat_file(
    shared: &Shared,
    session: &Session,
    path: String,
) -> Result<Response, ApiError> {
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
    let store = shared.chunks.clone();
    let tree_list = tree.clone();
    let added_bytes = blocking(move || {
        let tree = read_tree(&store, &tree_list)?;
        for (_, content) in tree.file_chunk_lists() {
            check_list(&store, content)?;
        }
        // What the snapshot adds: files whose content its parent did not have.
        let known: HashSet<(u64, [u8; 32])> = match parent_tree {
            Some(parent) => read_tree(&store, &parent)?
                .entries
                .iter()
                .filter_map(|entry| match &entry.kind {
                    TreeKind::File { size, hash, .. } => Some((*size, *hash)),
                    _ => None,
                })
                .collect(),
            None => HashSet::new(),
        };
        Ok(tree
            .entries
            .iter()
            .filter_map(|entry| match &entry.kind {
                TreeKind::File { size, hash, .. } if !known.contains(&(*size, *hash)) => {
                    Some(*size)
                }
                _ => None,
            })
            .sum::<u64>())
    })
    .await?;
    let command = Command::AddSnapshot {
        user: auth.user,
        label,
        parent,
        tree,
        stats,
        added_bytes,
        quota_bytes: shared.config.user_quota_bytes,
        now_ms: now_ms(),
    };
    match shared.sync.execute(command).await? {
        Reply::Snapshot { id } => Ok(Response::Snapshot(shared.sync.snapshot(auth.user, id)?)),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// The budget of concurrent chunk transfers on a node: each holds at most
/// `CHUNKS_PER_STREAM_MAX` chunks in memory.
pub(crate) fn transfer_budget() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        limits::CHUNK_TRANSFERS_IN_FLIGHT_MAX,
    ))
}
