//! The backup tree: what one snapshot holds, entry by entry.
//!
//! Encoded as a sequence of `[u32 length][entry]` records, each entry
//! bounded, so neither side ever decodes one unbounded value; then cut into
//! chunks like any content, so the unchanged stretches of a tree deduplicate
//! against the previous snapshot's.

use crate::{BlobError, ChunkerParams, StoredChunk, chunks_of_slice, list};
use hamgam_proto::codec;
use hamgam_proto::store::{ChunkList, ChunkRef};
use hamgam_types::limits;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeKind {
    /// 0
    File { size: u64, hash: [u8; 32], content: ChunkList },
    /// 1
    Dir,
    /// 2: the link's target, as bytes.
    Symlink { target: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative to the backed-up folder, `/`-separated, as the file system's
    /// bytes (a name need not be UTF-8 to be restored exactly).
    pub path: Vec<u8>,
    /// Unix permission bits.
    pub mode: u32,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub kind: TreeKind,
}

/// Every entry of one snapshot, parents before their children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

fn malformed(reason: impl Into<String>) -> BlobError {
    BlobError::Malformed { what: "backup tree", reason: reason.into() }
}

impl Tree {
    pub fn encode(&self) -> Result<Vec<u8>, BlobError> {
        let mut out = Vec::new();
        for entry in &self.entries {
            let bytes = codec::encode(entry).map_err(|error| malformed(error.to_string()))?;
            if bytes.len() > limits::TREE_ENTRY_BYTES_MAX {
                return Err(malformed(format!("an entry of {} bytes is over the limit", bytes.len())));
            }
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Decodes entries one by one, each bounded before it is read.
    pub fn decode(mut bytes: &[u8]) -> Result<Tree, BlobError> {
        let mut entries = Vec::new();
        while !bytes.is_empty() {
            let (length, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| malformed("cut inside a length"))?;
            let length = u32::from_le_bytes(*length) as usize;
            if length > limits::TREE_ENTRY_BYTES_MAX || length > rest.len() {
                return Err(malformed(format!("an entry length of {length} bytes")));
            }
            let (entry, rest) = rest.split_at(length);
            entries.push(codec::decode(entry).map_err(|error| malformed(error.to_string()))?);
            bytes = rest;
        }
        Ok(Tree { entries })
    }

    /// The tree as chunks: its chunk list, and every chunk to store for it
    /// (tree chunks and, for a long list, list chunks).
    pub fn to_chunks(&self) -> Result<(ChunkList, Vec<StoredChunk>), BlobError> {
        let bytes = self.encode()?;
        let mut chunks: Vec<StoredChunk> =
            chunks_of_slice(&bytes, ChunkerParams::default()).map(StoredChunk::seal).collect();
        let refs = chunks.iter().map(|chunk| ChunkRef { id: chunk.id, len: chunk.plain_len }).collect();
        let (list, list_chunks) = list::build(refs)?;
        chunks.extend(list_chunks);
        Ok((list, chunks))
    }

    /// Every chunk this tree's files name, list chunks included, each once.
    pub fn file_chunk_lists(&self) -> impl Iterator<Item = (&TreeEntry, &ChunkList)> {
        self.entries.iter().filter_map(|entry| match &entry.kind {
            TreeKind::File { content, .. } => Some((entry, content)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamgam_types::ChunkId;

    fn tree(files: usize) -> Tree {
        let mut entries = vec![TreeEntry {
            path: "عکس‌ها".as_bytes().to_vec(),
            mode: 0o755,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 5,
            kind: TreeKind::Dir,
        }];
        for i in 0..files {
            let refs = vec![ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: 1000 }];
            entries.push(TreeEntry {
                path: format!("عکس‌ها/{i}.jpg").into_bytes(),
                mode: 0o644,
                mtime_secs: 1_700_000_000 + i as i64,
                mtime_nanos: 0,
                kind: TreeKind::File { size: 1000, hash: [i as u8; 32], content: ChunkList::Inline(refs) },
            });
        }
        Tree { entries }
    }

    #[test]
    fn a_tree_round_trips_and_a_damaged_one_is_refused() {
        let tree = tree(50);
        let bytes = tree.encode().unwrap();
        assert_eq!(Tree::decode(&bytes).unwrap(), tree);
        assert!(Tree::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut lying = bytes.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Tree::decode(&lying).is_err());
    }

    #[test]
    fn a_large_tree_becomes_chunks_that_rebuild_it() {
        let tree = tree(20_000);
        let (list, chunks) = tree.to_chunks().unwrap();
        assert!(chunks.len() > 1);
        let by_id: std::collections::HashMap<_, _> = chunks.iter().map(|c| (c.id, c)).collect();
        let refs = list::expand::<BlobError>(&list, |r| by_id[&r.id].open()).unwrap();
        let bytes: Vec<u8> = refs.iter().flat_map(|r| by_id[&r.id].open().unwrap()).collect();
        assert_eq!(Tree::decode(&bytes).unwrap(), tree);
    }
}
