//! Chunk lists of any length with a small, bounded manifest: up to
//! `MANIFEST_INLINE_CHUNKS_MAX` references inline, otherwise the list is cut
//! into list chunks (stored like any chunk, so equal lists deduplicate) and
//! the manifest names those.

use crate::{BlobError, StoredChunk};
use hamgam_proto::codec;
use hamgam_proto::store::{ChunkList, ChunkRef};
use hamgam_types::limits;

/// The list to put in a manifest, and the list chunks that must be stored
/// before it (none when inline).
pub fn build(refs: Vec<ChunkRef>) -> Result<(ChunkList, Vec<StoredChunk>), BlobError> {
    if refs.len() <= limits::MANIFEST_INLINE_CHUNKS_MAX {
        return Ok((ChunkList::Inline(refs), Vec::new()));
    }
    let pieces = refs.len().div_ceil(limits::LIST_CHUNK_REFS_MAX);
    if pieces > limits::MANIFEST_INLINE_CHUNKS_MAX {
        return Err(BlobError::Malformed {
            what: "chunk list",
            reason: format!("{} chunks is over the limit of one file", refs.len()),
        });
    }
    let mut list_chunks = Vec::with_capacity(pieces);
    for piece in refs.chunks(limits::LIST_CHUNK_REFS_MAX) {
        let plain = codec::encode(&piece.to_vec())
            .map_err(|error| BlobError::Malformed { what: "chunk list", reason: error.to_string() })?;
        list_chunks.push(StoredChunk::seal(&plain));
    }
    let list = list_chunks.iter().map(|chunk| ChunkRef { id: chunk.id, len: chunk.plain_len }).collect();
    Ok((ChunkList::Indirect(list), list_chunks))
}

/// The references held by one list chunk's plain bytes.
pub fn decode_piece(plain: &[u8]) -> Result<Vec<ChunkRef>, BlobError> {
    let refs: Vec<ChunkRef> =
        codec::decode(plain).map_err(|error| BlobError::Malformed { what: "list chunk", reason: error.to_string() })?;
    if refs.len() > limits::LIST_CHUNK_REFS_MAX {
        return Err(BlobError::Malformed { what: "list chunk", reason: format!("{} references", refs.len()) });
    }
    Ok(refs)
}

/// Every data chunk of a list; `fetch` gives a list chunk's plain bytes.
pub fn expand<E>(list: &ChunkList, mut fetch: impl FnMut(&ChunkRef) -> Result<Vec<u8>, E>) -> Result<Vec<ChunkRef>, E>
where
    E: From<BlobError>,
{
    match list {
        ChunkList::Inline(refs) => Ok(refs.clone()),
        ChunkList::Indirect(pieces) => {
            let mut refs = Vec::new();
            for piece in pieces {
                refs.extend(decode_piece(&fetch(piece)?)?);
            }
            Ok(refs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamgam_types::ChunkId;
    use std::collections::HashMap;

    fn refs(count: usize) -> Vec<ChunkRef> {
        (0..count).map(|i| ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: 65_536 }).collect()
    }

    #[test]
    fn short_lists_are_inline_and_long_ones_round_trip_through_list_chunks() {
        let (list, chunks) = build(refs(10)).unwrap();
        assert!(matches!(list, ChunkList::Inline(ref r) if r.len() == 10) && chunks.is_empty());

        let long = refs(limits::LIST_CHUNK_REFS_MAX * 2 + 5);
        let (list, chunks) = build(long.clone()).unwrap();
        assert!(matches!(list, ChunkList::Indirect(ref r) if r.len() == 3));
        assert!(chunks.iter().all(|c| c.plain_len <= limits::CHUNK_MAX_BYTES));
        let store: HashMap<_, _> = chunks.into_iter().map(|c| (c.id, c)).collect();
        let expanded = expand::<BlobError>(&list, |r| store[&r.id].open()).unwrap();
        assert_eq!(expanded, long);
    }
}
