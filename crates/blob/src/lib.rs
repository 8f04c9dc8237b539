//! The content store underneath "My Gap" and backups.
//!
//! Owns how content becomes chunks and how chunks are kept: content-defined
//! chunking (FastCDC v2020), naming by the blake3 hash of the plain bytes,
//! zstd only where it pays ([`StoredChunk`]), pack files with an index on a
//! node's disk ([`PackStore`], fsynced before anything is acknowledged),
//! long chunk lists stored as chunks themselves ([`list`]), the backup tree
//! format ([`Tree`]), which nodes hold a chunk ([`placement`]), and
//! [`ChunkStore`]: writes to a quorum of a chunk's holders, reads from any,
//! repairs what a holder lacked.
//!
//! Used by both sides: the client cuts, names and compresses; the node
//! checks and keeps. Must not know: users, quotas, raft, QUIC, the protocol's
//! requests (other nodes are reached through the [`ChunkPeers`] trait).
//! Chunks are bytes with names.

mod chunk;
pub mod list;
mod pack;
pub mod placement;
mod replicated;
mod tree;
mod workers;

pub use chunk::{ChunkerParams, StoredChunk, chunks_of_reader, chunks_of_slice, in_order};
pub use pack::{CollectReport, PackStats, PackStore, PutOutcome, wall_clock_ms};
pub use replicated::{COPIES, ChunkPeers, ChunkStore, PeerFuture, ScrubReport};
pub use tree::{Tree, TreeEntry, TreeKind};
pub use workers::{WorkFailed, on_chunk_thread};

/// Why a node is asked which chunks it lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// The answer will be relied on (an upload skips what is present, a
    /// commit names it): every chunk found is touched, which keeps it from
    /// garbage collection for a grace period.
    Relied,
    /// Only looking (the scrubber): nothing is touched, so looking never
    /// keeps garbage alive.
    Audit,
}

use hamgam_types::ChunkId;

/// What can go wrong with chunks. Every variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The bytes do not decompress or do not hash to the chunk's name: a
    /// bad upload, or damage on disk.
    #[error("chunk {id} does not match its name: {reason}")]
    Mismatch { id: ChunkId, reason: String },
    /// A stored record failed its checksum.
    #[error("stored copy of chunk {id} is damaged ({path})")]
    Damaged { id: ChunkId, path: String },
    /// Encoded metadata (a chunk list or a tree) does not decode.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// Chunks named are not stored anywhere that answered.
    #[error("{0} chunks named are not stored; upload them first")]
    Missing(usize),
    /// Not enough of a chunk's holders could be reached; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A file operation failed.
    #[error("chunk store I/O failed on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl BlobError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> BlobError {
        BlobError::Io { path: path.display().to_string(), source }
    }
}
