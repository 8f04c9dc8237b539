//! Chunks between nodes: [`ChunkLinks`] implements the blob crate's
//! `ChunkPeers` over the peer network, and [`serve`] answers other nodes'
//! chunk requests from this node's pack store.
//!
//! Each request is a bidi stream opened by a kind byte (see [`wire`]):
//!
//! ```text
//! CHUNK_PUT      u32 count, then `count` chunk frames  ->  0 | 1 + reason
//! CHUNK_MISSING  codec Vec<ChunkId>                    ->  0 + codec Vec<ChunkId> (lacking)
//! CHUNK_AUDIT    as CHUNK_MISSING, but the chunks found are not touched
//! CHUNK_GET      codec Vec<ChunkId>                    ->  0 + u32 count + chunk frames (found)
//! ```
//!
//! An answer to CHUNK_MISSING is relied on (an upload skips what is present,
//! a commit names it), so the chunks found are touched and kept from garbage
//! collection for a grace period; the scrubber's CHUNK_AUDIT only looks.
//! Chunk frames use the client protocol's layout. Every count is bounded
//! before anything is read; a stored chunk is checked against its name by
//! the pack store, and a fetched one by the caller.

use crate::network::PeerNetwork;
use crate::wire;
use hamgam_blob::{ChunkPeers, PackStore, PeerFuture, Presence, StoredChunk};
use hamgam_proto::codec;
use hamgam_types::{ChunkId, NodeId, limits};
use std::sync::Arc;
use std::time::Duration;

const OK: u8 = 0;
const FAILED: u8 = 1;
/// A chunk exchange with another node may move 16 MiB.
const CHUNK_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
const IDS_BYTES_MAX: usize = limits::CHUNK_IDS_PER_REQUEST_MAX * 33 + 16;

async fn read_frames(recv: &mut quinn::RecvStream, count: usize) -> Result<Vec<StoredChunk>, String> {
    let mut chunks = Vec::with_capacity(count);
    for _ in 0..count {
        let chunk = hamgam_proto::store::read_chunk_frame(recv).await.map_err(|e| e.to_string())?;
        chunks.push(StoredChunk::from(chunk));
    }
    Ok(chunks)
}

async fn read_count(recv: &mut quinn::RecvStream) -> Result<usize, String> {
    let mut count = [0u8; 4];
    recv.read_exact(&mut count).await.map_err(|e| e.to_string())?;
    let count = u32::from_le_bytes(count) as usize;
    if count > limits::CHUNKS_PER_STREAM_MAX {
        return Err(format!("{count} chunks on one stream is over the limit"));
    }
    Ok(count)
}

/// Answers one chunk request of another node (the kind byte already read).
pub(crate) async fn serve(kind: u8, mut send: quinn::SendStream, mut recv: quinn::RecvStream, store: Arc<PackStore>) {
    let answer: Result<Vec<u8>, String> = async {
        match kind {
            wire::CHUNK_PUT => {
                let count = read_count(&mut recv).await?;
                let chunks = read_frames(&mut recv, count).await?;
                hamgam_blob::on_chunk_thread(move || store.put(&chunks))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(vec![OK])
            }
            wire::CHUNK_MISSING | wire::CHUNK_AUDIT => {
                let body = recv.read_to_end(IDS_BYTES_MAX).await.map_err(|e| e.to_string())?;
                let ids: Vec<ChunkId> = codec::decode(&body).map_err(|e| e.to_string())?;
                let presence = if kind == wire::CHUNK_AUDIT { Presence::Audit } else { Presence::Relied };
                let mut out = vec![OK];
                codec::encode_into(&store.missing(&ids, presence), &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
            wire::CHUNK_GET => {
                let body = recv.read_to_end(IDS_BYTES_MAX).await.map_err(|e| e.to_string())?;
                let ids: Vec<ChunkId> = codec::decode(&body).map_err(|e| e.to_string())?;
                if ids.len() > limits::CHUNKS_PER_STREAM_MAX {
                    return Err("too many chunks asked at once".into());
                }
                let found = hamgam_blob::on_chunk_thread(move || {
                    // A damaged copy is left out (and forgotten by the store).
                    ids.iter().filter_map(|id| store.get(id).ok().flatten()).collect::<Vec<_>>()
                })
                .await
                .map_err(|e| e.to_string())?;
                let mut header = vec![OK];
                header.extend_from_slice(&(found.len() as u32).to_le_bytes());
                send.write_all(&header).await.map_err(|e| e.to_string())?;
                for chunk in found {
                    let (head, bytes) = chunk.frame().map_err(|e| e.to_string())?;
                    hamgam_transport::write_with_owned_body(&mut send, &head, bytes).await.map_err(|e| e.to_string())?;
                }
                Ok(Vec::new())
            }
            other => Err(format!("unknown chunk request kind {other}")),
        }
    }
    .await;
    let bytes = match answer {
        Ok(bytes) => bytes,
        Err(reason) => {
            let mut out = vec![FAILED];
            out.extend_from_slice(reason.as_bytes());
            out
        }
    };
    if send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// The blob crate's view of the other nodes.
#[derive(Debug, Clone)]
pub struct ChunkLinks {
    network: Arc<PeerNetwork>,
}

impl ChunkLinks {
    pub fn new(network: Arc<PeerNetwork>) -> ChunkLinks {
        ChunkLinks { network }
    }
}

async fn open(network: &PeerNetwork, node: NodeId, kind: u8) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let connection = network.connection(node).await?;
    let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&[kind]).await.map_err(|e| e.to_string())?;
    Ok((send, recv))
}

async fn status(recv: &mut quinn::RecvStream) -> Result<(), String> {
    let mut first = [0u8; 1];
    recv.read_exact(&mut first).await.map_err(|e| e.to_string())?;
    if first[0] == OK {
        return Ok(());
    }
    let reason = recv.read_to_end(4096).await.unwrap_or_default();
    Err(String::from_utf8_lossy(&reason).into_owned())
}

/// Sends a request of `kind` about `ids` and reads the answer's status;
/// the rest of the answer is left on the returned stream.
async fn ask_about(
    network: &PeerNetwork,
    node: NodeId,
    kind: u8,
    ids: &[ChunkId],
) -> Result<quinn::RecvStream, String> {
    let (mut send, mut recv) = open(network, node, kind).await?;
    send.write_all(&codec::encode(&ids.to_vec()).map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    status(&mut recv).await?;
    Ok(recv)
}

async fn timed<T>(work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CHUNK_EXCHANGE_TIMEOUT, work).await.map_err(|_| "no answer in time".to_string())?
}

impl ChunkPeers for ChunkLinks {
    fn members(&self) -> Vec<NodeId> {
        self.network.chunk_members(false)
    }

    fn reachable(&self) -> Vec<NodeId> {
        self.network.chunk_members(true)
    }

    fn put(&self, node: NodeId, chunks: Vec<StoredChunk>) -> PeerFuture<()> {
        let network = self.network.clone();
        Box::pin(timed(async move {
            for batch in chunks.chunks(limits::CHUNKS_PER_STREAM_MAX) {
                let (mut send, mut recv) = open(&network, node, wire::CHUNK_PUT).await?;
                send.write_all(&(batch.len() as u32).to_le_bytes()).await.map_err(|e| e.to_string())?;
                for chunk in batch {
                    let (head, bytes) = chunk.frame().map_err(|e| e.to_string())?;
                    hamgam_transport::write_with_owned_body(&mut send, &head, bytes).await.map_err(|e| e.to_string())?;
                }
                send.finish().map_err(|e| e.to_string())?;
                status(&mut recv).await?;
            }
            Ok(())
        }))
    }

    fn missing(&self, node: NodeId, ids: Vec<ChunkId>, presence: Presence) -> PeerFuture<Vec<ChunkId>> {
        let network = self.network.clone();
        let kind = match presence {
            Presence::Relied => wire::CHUNK_MISSING,
            Presence::Audit => wire::CHUNK_AUDIT,
        };
        Box::pin(timed(async move {
            let mut lacking = Vec::new();
            for batch in ids.chunks(limits::CHUNK_IDS_PER_REQUEST_MAX) {
                let mut recv = ask_about(&network, node, kind, batch).await?;
                let body = recv.read_to_end(IDS_BYTES_MAX).await.map_err(|e| e.to_string())?;
                let answer: Vec<ChunkId> = codec::decode(&body).map_err(|e| e.to_string())?;
                lacking.extend(answer);
            }
            Ok(lacking)
        }))
    }

    fn get(&self, node: NodeId, ids: Vec<ChunkId>) -> PeerFuture<Vec<StoredChunk>> {
        let network = self.network.clone();
        Box::pin(timed(async move {
            let mut found = Vec::new();
            for batch in ids.chunks(limits::CHUNKS_PER_STREAM_MAX) {
                let mut recv = ask_about(&network, node, wire::CHUNK_GET, batch).await?;
                let count = read_count(&mut recv).await?;
                found.extend(read_frames(&mut recv, count).await?);
            }
            Ok(found)
        }))
    }
}
