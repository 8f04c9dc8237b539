//! Wire values of the cloud store ("My Gap"): chunk references, manifests,
//! folder listings, backup snapshots, and the raw chunk frame.
//!
//! A chunk travels in its stored form (zstd-compressed where that paid, plain
//! otherwise), so bytes are compressed once, by the client, and neither the
//! wire nor the node pays for it again.

use crate::frame::{FrameError, FrameKind};
use hamgam_types::{ChunkId, UserId, limits};
use serde::{Deserialize, Serialize};

/// One chunk of a file, in file order: its name and plain length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The ordered chunks of some content. Short lists travel and are stored
/// inline; a long one is itself stored as chunks ("list chunks", each the
/// encoded `Vec<ChunkRef>` of up to [`limits::LIST_CHUNK_REFS_MAX`]
/// references) and only those are named here, so a manifest of any file
/// stays small in the raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkList {
    /// 0
    Inline(Vec<ChunkRef>),
    /// 1: the list chunks, in order.
    Indirect(Vec<ChunkRef>),
}

impl ChunkList {
    /// The references this value holds (data chunks when inline, list chunks otherwise).
    pub fn refs(&self) -> &[ChunkRef] {
        match self {
            ChunkList::Inline(refs) | ChunkList::Indirect(refs) => refs,
        }
    }

    /// Whether the list is within the bounds a node accepts.
    pub fn within_bounds(&self) -> bool {
        match self {
            ChunkList::Inline(refs) => refs.len() <= limits::MANIFEST_INLINE_CHUNKS_MAX,
            ChunkList::Indirect(refs) => refs.len() <= limits::MANIFEST_INLINE_CHUNKS_MAX,
        }
    }
}

/// What a client says about a file it stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Plain length in bytes.
    pub size: u64,
    /// blake3 of the whole plain file.
    pub hash: [u8; 32],
    /// The file's modification time on the client, milliseconds since the epoch.
    pub mtime_ms: u64,
    pub content: ChunkList,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// 0
    File,
    /// 1
    Folder,
}

/// A stored file as shared into a chat: what a member needs to fetch it
/// (its chunks are named in `content`) or to keep it in their own store
/// without sending a byte of it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    /// The file's name (its path's last part), bounded like any name.
    pub name: String,
    pub size: u64,
    /// blake3 of the whole file.
    pub hash: [u8; 32],
    pub content: ChunkList,
}

/// Who may see an album and its items besides its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Visibility {
    /// 0: the owner only.
    Private,
    /// 1: people the owner has a direct chat with.
    Contacts,
    /// 2: anyone signed in.
    Public,
}

/// An album of a gallery, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlbumInfo {
    pub owner: UserId,
    pub album: u64,
    pub title: String,
    pub visibility: Visibility,
    pub items: u64,
    pub created_ms: u64,
}

/// A photo or video in an album.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlbumItem {
    pub item: u64,
    pub file: SharedFile,
    /// A small JPEG (at most 320 pixels a side) made when a JPEG or PNG
    /// photo was added: one chunk, fetched like any other.
    pub thumbnail: Option<ChunkRef>,
    pub added_ms: u64,
    pub likes: u64,
    /// Whether the person listing has liked it.
    pub liked: bool,
}

/// A file or folder of a user's store, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Absolute, `/`-separated, without a trailing `/`.
    pub path: String,
    pub kind: EntryKind,
    /// Plain bytes (0 for a folder).
    pub size: u64,
    /// blake3 of the whole file (zeros for a folder).
    pub hash: [u8; 32],
    /// The client's modification time, milliseconds since the epoch.
    pub mtime_ms: u64,
    /// When the node stored this entry, milliseconds since the epoch.
    pub stored_ms: u64,
}

/// One page of a folder, in name order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderPage {
    pub entries: Vec<FileEntry>,
    /// More entries follow the last one.
    pub more: bool,
}

/// A user's use of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Logical bytes counted against the quota: stored files, and for each
    /// backup snapshot the files it added or changed.
    pub used_bytes: u64,
    pub quota_bytes: u64,
    pub files: u64,
    pub snapshots: u64,
}

/// Totals a client reports with a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub files: u64,
    pub bytes: u64,
}

/// A backup snapshot of one folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Per user, 1, 2, 3...
    pub id: u64,
    /// What was backed up (the folder's path on the client, or a name given).
    pub label: String,
    pub time_ms: u64,
    /// The snapshot this one was made against, if any.
    pub parent: Option<u64>,
    /// The snapshot's tree (see the blob crate's `Tree`), as chunks.
    pub tree: ChunkList,
    pub stats: SnapshotStats,
    /// Logical bytes of files that are new or changed since the parent;
    /// what this snapshot counts against the quota.
    pub added_bytes: u64,
}

/// How a chunk's bytes are stored and sent. Numbers are part of the formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ChunkCodec {
    /// The plain bytes (media, which does not compress).
    Plain = 0,
    /// zstd, one frame.
    Zstd = 1,
}

impl ChunkCodec {
    pub fn from_byte(byte: u8) -> Option<ChunkCodec> {
        match byte {
            0 => Some(ChunkCodec::Plain),
            1 => Some(ChunkCodec::Zstd),
            _ => None,
        }
    }
}

/// A chunk frame's payload:
///
/// ```text
/// +-----------+----------+----------------+------------------------+
/// | id 32 B   | codec u8 | plain len u32  | stored bytes ...       |
/// +-----------+----------+----------------+------------------------+
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkFrame<'a> {
    pub id: ChunkId,
    pub codec: ChunkCodec,
    pub plain_len: u32,
    pub bytes: &'a [u8],
}

const CHUNK_FRAME_HEADER_BYTES: usize = 32 + 1 + 4;
/// The frame header and the chunk header together.
pub const CHUNK_FRAME_HEAD_BYTES: usize = crate::frame::HEADER_BYTES + CHUNK_FRAME_HEADER_BYTES;

impl ChunkFrame<'_> {
    /// What goes on the wire before the chunk's bytes: the frame header and
    /// the chunk's header. The bytes follow as they are: a writer that owns
    /// them hands them to the stream without a copy (see
    /// `quinn::SendStream::write_all_chunks`).
    pub fn head(&self) -> Result<[u8; CHUNK_FRAME_HEAD_BYTES], FrameError> {
        let mut head = [0u8; CHUNK_FRAME_HEAD_BYTES];
        let frame_header =
            crate::frame::raw_frame_header(FrameKind::Chunk, CHUNK_FRAME_HEADER_BYTES + self.bytes.len())?;
        let (frame, chunk) = head.split_at_mut(crate::frame::HEADER_BYTES);
        frame.copy_from_slice(&frame_header);
        chunk[..32].copy_from_slice(&self.id.0);
        chunk[32] = self.codec as u8;
        chunk[33..].copy_from_slice(&self.plain_len.to_le_bytes());
        Ok(head)
    }
}

/// The id, codec and plain length at the start of a chunk frame's payload.
fn parse_chunk_header(header: &[u8]) -> Result<(ChunkId, ChunkCodec, u32), String> {
    let mut id = [0u8; 32];
    id.copy_from_slice(&header[..32]);
    let codec = ChunkCodec::from_byte(header[32]).ok_or_else(|| format!("unknown chunk codec {}", header[32]))?;
    let plain_len = u32::from_le_bytes([header[33], header[34], header[35], header[36]]);
    if plain_len > limits::CHUNK_MAX_BYTES {
        return Err(format!("a chunk of {plain_len} bytes is over the limit of {} bytes", limits::CHUNK_MAX_BYTES));
    }
    Ok((ChunkId(id), codec, plain_len))
}

/// A chunk frame read off a stream, its stored bytes in a buffer of their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedChunk {
    pub id: ChunkId,
    pub codec: ChunkCodec,
    pub plain_len: u32,
    pub bytes: Vec<u8>,
}

/// Reads one chunk frame. The chunk header is read apart from the stored
/// bytes, so they land in their own buffer without a copy to strip it.
/// Bounds are checked, the hash is not (the store checks it, as it must
/// also check what it reads from disk).
pub async fn read_chunk_frame<R>(reader: &mut R) -> Result<ReceivedChunk, FrameError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let length = crate::frame::read_frame_header(reader, FrameKind::Chunk).await? as usize;
    let Some(stored_len) = length.checked_sub(CHUNK_FRAME_HEADER_BYTES) else {
        return Err(FrameError::BadChunk(format!("a chunk frame of {length} bytes is shorter than its header")));
    };
    let mut header = [0u8; CHUNK_FRAME_HEADER_BYTES];
    reader.read_exact(&mut header).await.map_err(crate::frame::truncated)?;
    let (id, codec, plain_len) = parse_chunk_header(&header).map_err(FrameError::BadChunk)?;
    // Bounded by the frame kind's limit, checked with the header. Read into
    // the spare capacity, which is not zeroed first (a reader may fill it
    // uninitialized, as quinn's does); `take` stops at the frame's end.
    let mut bytes = Vec::with_capacity(stored_len);
    let mut body = (&mut *reader).take(stored_len as u64);
    while bytes.len() < stored_len {
        if body.read_buf(&mut bytes).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(ReceivedChunk { id, codec, plain_len, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_chunk_frame_round_trips_and_its_layout_is_pinned() {
        let id = ChunkId([7; 32]);
        let frame = ChunkFrame { id, codec: ChunkCodec::Zstd, plain_len: 300, bytes: b"abc" };
        let mut wire = frame.head().unwrap().to_vec();
        wire.extend_from_slice(frame.bytes);
        let mut expected = vec![6, 40, 0, 0, 0];
        expected.extend_from_slice(&[7; 32]);
        expected.extend_from_slice(&[1, 44, 1, 0, 0]);
        expected.extend_from_slice(b"abc");
        assert_eq!(wire, expected);
        let received = read_chunk_frame(&mut wire.as_slice()).await.unwrap();
        assert_eq!(received, ReceivedChunk { id, codec: ChunkCodec::Zstd, plain_len: 300, bytes: b"abc".to_vec() });
    }

    #[tokio::test]
    async fn short_unknown_and_oversize_chunk_frames_are_refused() {
        let framed = |payload: &[u8]| {
            let mut wire = vec![FrameKind::Chunk as u8];
            wire.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            wire.extend_from_slice(payload);
            wire
        };
        let refusal =
            |wire: Vec<u8>| async move { read_chunk_frame(&mut wire.as_slice()).await.unwrap_err().to_string() };
        assert!(refusal(framed(&[0; 10])).await.contains("shorter than its header"));
        let mut payload = vec![0u8; CHUNK_FRAME_HEADER_BYTES];
        payload[32] = 9;
        assert!(refusal(framed(&payload)).await.contains("codec"));
        payload[32] = 0;
        payload[33..].copy_from_slice(&(limits::CHUNK_MAX_BYTES + 1).to_le_bytes());
        assert!(refusal(framed(&payload)).await.contains("over the limit"));
        let mut cut = framed(&[0u8; CHUNK_FRAME_HEADER_BYTES + 8]);
        cut.truncate(cut.len() - 1);
        assert!(matches!(read_chunk_frame(&mut cut.as_slice()).await, Err(FrameError::Truncated)));
    }
}
