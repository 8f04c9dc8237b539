//! The cloud store from the client's side: one typed method per request,
//! and the transfers built on them. An upload asks which chunks the cluster
//! lacks and sends only those, compressed, over parallel streams; a download
//! fetches chunks over parallel streams in order and checks every one
//! against its name.

use crate::{Client, ClientError};
use bytes::Bytes;
use futures_util::StreamExt;
use hamgam_blob::{StoredChunk, list};
use hamgam_proto::frame::{self, FrameError, FrameKind};
use hamgam_proto::store::{
    ChunkList, ChunkRef, FileEntry, FileManifest, FolderPage, SharedFile, SnapshotInfo, SnapshotStats, UsageReport,
};
use hamgam_proto::{ErrorCode, HistoryAnchor, MessagePage, Request, Response};
use hamgam_types::{ChatId, ChunkId, limits};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Chunk streams one transfer keeps open at once.
pub const PARALLEL_STREAMS: usize = 8;
/// Chunks asked for on one download stream, and download streams in
/// flight: sixteen requests of 16 chunks hold half what eight of 64 did and
/// start writing sooner (a 1 GiB restore without the final sync: 4.58 s
/// against 4.91 s, the mean of eight alternating runs).
const DOWNLOAD_CHUNKS_PER_STREAM: usize = 16;
const DOWNLOAD_STREAMS: usize = 16;
/// Plain bytes gathered before asking which chunks are missing.
pub const UPLOAD_BATCH_BYTES: usize = 8 << 20;
/// Upload batches in flight at once. Six of 8 MiB hold as much as three of
/// 16 MiB did, but keep the streams busier while a batch waits for its
/// "which are missing" answer or the node's sync (a 1 GiB backup: 5.43 s
/// against 5.83 s, the mean of eight alternating runs).
pub const UPLOAD_BATCHES_IN_FLIGHT: usize = 6;
/// How many times `upload_file` asks again after its commit found a chunk gone.
pub const UPLOAD_ATTEMPTS: u32 = 3;
/// Bytes one upload stream carries (at most `CHUNKS_PER_STREAM_MAX` chunks).
const STREAM_BYTES: usize = 4 << 20;
/// A chunk stream may take longer than a plain request.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Chunks by name and plain bytes, on their way to an upload.
pub(crate) type PlainChunks = Vec<(ChunkId, Bytes)>;

/// Counters a transfer updates as it goes, for progress bars and reports.
/// Cloning shares them: a blocking reader and the uploader count into the
/// same numbers.
#[derive(Clone, Debug, Default)]
pub struct TransferCounters(std::sync::Arc<Counts>);

impl std::ops::Deref for TransferCounters {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.0
    }
}

/// The numbers behind [`TransferCounters`].
#[derive(Debug, Default)]
pub struct Counts {
    /// Plain bytes of the content (read for an upload, written for a download).
    pub plain_bytes: AtomicU64,
    /// Bytes that crossed the network as chunk payloads.
    pub wire_bytes: AtomicU64,
    /// Plain bytes not sent because the cluster (or this run) already had them.
    pub deduplicated_bytes: AtomicU64,
    /// Chunks sent and chunks skipped.
    pub chunks_sent: AtomicU64,
    pub chunks_skipped: AtomicU64,
    /// Files finished.
    pub files: AtomicU64,
    /// Plain bytes of files a backup did not read again (unchanged since its parent).
    pub unchanged_bytes: AtomicU64,
    /// Plain bytes of the whole transfer, once known (a backup knows after its walk).
    pub total_bytes: AtomicU64,
}

impl TransferCounters {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn protocol(message: impl Into<String>) -> ClientError {
    ClientError::Protocol(message.into())
}

impl Client {
    /// Which of `ids` the cluster lacks (any number; asked in bounded batches).
    pub async fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ClientError> {
        let mut missing = Vec::new();
        for batch in ids.chunks(limits::CHUNK_IDS_PER_REQUEST_MAX) {
            let request = Request::MissingChunks { ids: batch.to_vec() };
            missing.extend(expect!(self.call(&request).await?, Response::MissingChunks { ids } => ids)?);
        }
        Ok(missing)
    }

    /// Sends chunks on one stream (at most `CHUNKS_PER_STREAM_MAX`); returns
    /// once the node has them durably.
    pub async fn put_chunks(&self, chunks: Vec<StoredChunk>) -> Result<(u32, u32), ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await?;
            let request = Request::PutChunks { count: chunks.len() as u32 };
            frame::write_frame(&mut send, FrameKind::Request, &request).await?;
            for chunk in &chunks {
                let (head, bytes) = chunk.frame()?;
                hamgam_transport::write_with_owned_body(&mut send, &head, bytes).await.map_err(FrameError::Io)?;
            }
            let _ = send.finish();
            Ok::<Response, ClientError>(frame::read_frame(&mut recv, FrameKind::Response).await?)
        };
        let response = tokio::time::timeout(TRANSFER_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout)??;
        match response {
            Response::ChunksStored { stored, present } => Ok((stored, present)),
            Response::Error(body) => Err(ClientError::Server(body)),
            other => Err(protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Fetches chunks on one stream (at most `CHUNKS_PER_STREAM_MAX`) in
    /// their stored form; the ids the node did not have are returned apart.
    /// [`StoredChunk::open`] checks each against its name.
    pub async fn get_chunks(&self, ids: &[ChunkId]) -> Result<(Vec<StoredChunk>, Vec<ChunkId>), ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await?;
            frame::write_frame(&mut send, FrameKind::Request, &Request::GetChunks { ids: ids.to_vec() }).await?;
            let _ = send.finish();
            let missing = match frame::read_frame(&mut recv, FrameKind::Response).await? {
                Response::ChunksFollow { missing } => missing,
                Response::Error(body) => return Err(ClientError::Server(body)),
                other => return Err(protocol(format!("unexpected response {other:?}"))),
            };
            let mut chunks = Vec::with_capacity(ids.len() - missing.len());
            for _ in 0..ids.len().saturating_sub(missing.len()) {
                chunks.push(StoredChunk::from(hamgam_proto::store::read_chunk_frame(&mut recv).await?));
            }
            Ok((chunks, missing))
        };
        tokio::time::timeout(TRANSFER_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout)?
    }

    pub async fn put_file(&self, path: &str, manifest: FileManifest) -> Result<FileEntry, ClientError> {
        let request = Request::PutFile { path: path.into(), manifest };
        expect!(self.call(&request).await?, Response::File { entry, .. } => entry)
    }

    pub async fn stat_file(&self, path: &str) -> Result<(FileEntry, ChunkList), ClientError> {
        expect!(self.call(&Request::StatFile { path: path.into() }).await?, Response::File { entry, content } => (entry, content))
    }

    pub async fn list_folder(&self, path: &str, after: Option<String>, limit: u32) -> Result<FolderPage, ClientError> {
        let request = Request::ListFolder { path: path.into(), after, limit };
        expect!(self.call(&request).await?, Response::Folder(page) => page)
    }

    pub async fn move_path(&self, from: &str, to: &str) -> Result<(), ClientError> {
        self.done(Request::MovePath { from: from.into(), to: to.into() }).await
    }

    pub async fn delete_path(&self, path: &str) -> Result<(), ClientError> {
        self.done(Request::DeletePath { path: path.into() }).await
    }

    pub async fn usage(&self) -> Result<UsageReport, ClientError> {
        expect!(self.call(&Request::Usage).await?, Response::Usage(usage) => usage)
    }

    pub async fn commit_snapshot(
        &self,
        label: &str,
        parent: Option<u64>,
        tree: ChunkList,
        stats: SnapshotStats,
    ) -> Result<SnapshotInfo, ClientError> {
        let request = Request::CommitSnapshot { label: label.into(), parent, tree, stats };
        expect!(self.call(&request).await?, Response::Snapshot(info) => info)
    }

    /// Every snapshot of the user, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let request = Request::ListSnapshots { after, limit: limits::SNAPSHOT_PAGE_MAX as u32 };
            let (page, more) =
                expect!(self.call(&request).await?, Response::Snapshots { snapshots, more } => (snapshots, more))?;
            after = page.last().map(|s| s.id);
            all.extend(page);
            if !more || after.is_none() {
                return Ok(all);
            }
        }
    }

    pub async fn forget_snapshots(&self, ids: &[u64]) -> Result<(), ClientError> {
        for batch in ids.chunks(limits::SNAPSHOT_PAGE_MAX) {
            self.done(Request::ForgetSnapshots { ids: batch.to_vec() }).await?;
        }
        Ok(())
    }

    /// Uploads what the cluster lacks of `chunks` (plain bytes by name):
    /// asks first, compresses only the missing ones, and sends them over
    /// parallel streams.
    pub async fn upload_missing(&self, chunks: PlainChunks, counters: &TransferCounters) -> Result<(), ClientError> {
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        let missing: std::collections::HashSet<ChunkId> = self.missing_chunks(&ids).await?.into_iter().collect();
        let mut streams: Vec<PlainChunks> = Vec::new();
        let mut bytes = 0usize;
        for (id, plain) in chunks {
            if !missing.contains(&id) {
                TransferCounters::add(&counters.deduplicated_bytes, plain.len() as u64);
                TransferCounters::add(&counters.chunks_skipped, 1);
                continue;
            }
            let full = streams.last().is_none_or(|s| s.len() >= limits::CHUNKS_PER_STREAM_MAX || bytes >= STREAM_BYTES);
            if full {
                streams.push(Vec::new());
                bytes = 0;
            }
            bytes += plain.len();
            if let Some(stream) = streams.last_mut() {
                stream.push((id, plain));
            }
        }
        let mut uploads = futures_util::stream::iter(streams.into_iter().map(|plains| async move {
            let sealed = tokio::task::spawn_blocking(move || {
                // Named already: sealing does not hash them again.
                plains.into_iter().map(|(id, plain)| StoredChunk::seal_named(id, plain)).collect::<Vec<_>>()
            })
            .await
            .map_err(|error| protocol(format!("compressing chunks: {error}")))?;
            let (wire_bytes, count) = (sealed.iter().map(|c| c.bytes.len() as u64).sum(), sealed.len() as u64);
            self.put_chunks(sealed).await?;
            TransferCounters::add(&counters.wire_bytes, wire_bytes);
            TransferCounters::add(&counters.chunks_sent, count);
            Ok::<(), ClientError>(())
        }))
        .buffer_unordered(PARALLEL_STREAMS);
        while let Some(result) = uploads.next().await {
            result?;
        }
        Ok(())
    }

    /// The data chunks of a list (fetching list chunks if it is indirect).
    pub async fn expand_list(&self, content: &ChunkList) -> Result<Vec<ChunkRef>, ClientError> {
        match content {
            ChunkList::Inline(refs) => Ok(refs.clone()),
            ChunkList::Indirect(pieces) => {
                let plains = self.fetch_plain(pieces).await?;
                let mut refs = Vec::new();
                for plain in plains {
                    refs.extend(list::decode_piece(&plain).map_err(|error| protocol(error.to_string()))?);
                }
                Ok(refs)
            }
        }
    }

    /// The plain bytes of `refs`, in order (all fetched before returning:
    /// for metadata such as lists and trees; content streams instead).
    pub async fn fetch_plain(&self, refs: &[ChunkRef]) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut stream = self.chunk_stream(refs.iter().map(|r| r.id).collect());
        let mut out = Vec::with_capacity(refs.len());
        while let Some(batch) = stream.next().await {
            out.extend(batch?);
        }
        Ok(out)
    }

    /// The plain bytes of `ids` in order, fetched over parallel streams, in
    /// batches as they arrive. A chunk the cluster lacks is an error.
    pub fn chunk_stream(
        &self,
        ids: Vec<ChunkId>,
    ) -> impl futures_util::Stream<Item = Result<Vec<Vec<u8>>, ClientError>> + '_ {
        futures_util::stream::iter(download_batches(&ids).into_iter().map(move |batch| async move {
            let stored = self.stored_in_order(&batch).await?;
            tokio::task::spawn_blocking(move || stored.into_iter().map(open_chunk).collect::<Result<Vec<_>, _>>())
                .await
                .map_err(|error| protocol(format!("opening chunks: {error}")))?
        }))
        .buffered(DOWNLOAD_STREAMS)
    }

    /// [`Client::chunk_stream`] with the chunks as stored, for a caller that
    /// opens them itself, on one thread of its own (a restore's writer).
    pub fn stored_chunk_stream(
        &self,
        ids: Vec<ChunkId>,
    ) -> impl futures_util::Stream<Item = Result<Vec<StoredChunk>, ClientError>> + '_ {
        let fetches =
            download_batches(&ids).into_iter().map(move |batch| async move { self.stored_in_order(&batch).await });
        futures_util::stream::iter(fetches).buffered(DOWNLOAD_STREAMS)
    }

    /// One batch's chunks as stored, in the batch's order.
    async fn stored_in_order(&self, batch: &[ChunkId]) -> Result<Vec<StoredChunk>, ClientError> {
        let (chunks, missing) = self.get_chunks(batch).await?;
        if let Some(id) = missing.first() {
            return Err(protocol(format!("chunk {id} is not stored in the cluster")));
        }
        let by_id: HashMap<ChunkId, StoredChunk> = chunks.into_iter().map(|c| (c.id, c)).collect();
        hamgam_blob::in_order(by_id, batch)
            .into_iter()
            .map(|chunk| chunk.map_err(|id| protocol(format!("chunk {id} was not sent"))))
            .collect()
    }
}

/// A fetched chunk's plain bytes, checked against its name.
pub(crate) fn open_chunk(chunk: StoredChunk) -> Result<Vec<u8>, ClientError> {
    chunk.into_plain().map_err(|error| protocol(error.to_string()))
}

/// `ids` cut into the batches a download asks for, one stream each.
fn download_batches(ids: &[ChunkId]) -> Vec<Vec<ChunkId>> {
    ids.chunks(DOWNLOAD_CHUNKS_PER_STREAM).map(<[ChunkId]>::to_vec).collect()
}

/// Where a blocking reader hands chunks to [`Client::upload_while_cutting`]:
/// gathered into batches of about [`UPLOAD_BATCH_BYTES`].
pub(crate) struct Batches {
    sender: tokio::sync::mpsc::Sender<PlainChunks>,
    pending: PlainChunks,
    pending_bytes: usize,
}

impl Batches {
    pub(crate) fn push(&mut self, id: ChunkId, plain: Bytes) -> Result<(), ClientError> {
        self.pending_bytes += plain.len();
        self.pending.push((id, plain));
        if self.pending_bytes >= UPLOAD_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        self.pending_bytes = 0;
        if self.pending.is_empty() {
            return Ok(());
        }
        self.sender.blocking_send(std::mem::take(&mut self.pending)).map_err(|_| protocol("the upload stopped"))
    }
}

/// A local file as chunks: its plain size, whole-file blake3 and chunk list.
pub(crate) struct CutFile {
    pub size: u64,
    pub hash: [u8; 32],
    pub content: ChunkList,
}

/// Reads a local file and cuts it into chunks, handing each data chunk and
/// (for a long list) each list chunk to `take` by name and plain bytes.
pub(crate) fn cut_file(
    local: &std::path::Path,
    counters: &TransferCounters,
    mut take: impl FnMut(ChunkId, Bytes) -> Result<(), ClientError>,
) -> Result<CutFile, ClientError> {
    let io = |e| ClientError::Io { path: local.display().to_string(), source: e };
    let file = std::fs::File::open(local).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut refs = Vec::new();
    let mut size = 0;
    // The chunker reads in large blocks itself: no buffering in between.
    for plain in hamgam_blob::chunks_of_reader(file, hamgam_blob::ChunkerParams::default()) {
        let plain = plain.map_err(io)?;
        hasher.update(&plain);
        let id = ChunkId::of(&plain);
        refs.push(ChunkRef { id, len: plain.len() as u32 });
        size += plain.len() as u64;
        TransferCounters::add(&counters.plain_bytes, plain.len() as u64);
        take(id, plain)?;
    }
    let (content, list_chunks) = list::build(refs)?;
    for chunk in list_chunks {
        take(chunk.id, chunk.open()?.into())?;
    }
    Ok(CutFile { size, hash: *hasher.finalize().as_bytes(), content })
}

impl Client {
    /// Stores a local file at `remote`, sending only the chunks the cluster
    /// lacks. (Holds the file's chunks in memory: for files up to a few GiB;
    /// folders go through `backup`, which streams.)
    ///
    /// Refused with `CHUNKS_MISSING` (a chunk reported present was
    /// collected as garbage before the file was committed, which takes an
    /// upload longer than the node's grace period), it asks again and sends
    /// what is missing, up to [`UPLOAD_ATTEMPTS`] times.
    pub async fn upload_file(
        &self,
        local: &std::path::Path,
        remote: &str,
        counters: &TransferCounters,
    ) -> Result<FileEntry, ClientError> {
        let mut attempt = 1;
        loop {
            match self.upload_file_once(local, remote, counters).await {
                Err(error) if error.code() == Some(ErrorCode::CHUNKS_MISSING) && attempt < UPLOAD_ATTEMPTS => {
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn upload_file_once(
        &self,
        local: &std::path::Path,
        remote: &str,
        counters: &TransferCounters,
    ) -> Result<FileEntry, ClientError> {
        use std::os::unix::fs::MetadataExt;
        let mtime = std::fs::metadata(local)
            .map_err(|e| ClientError::Io { path: local.display().to_string(), source: e })?
            .mtime();
        let (path, cut_counters) = (local.to_path_buf(), counters.clone());
        let cut = self
            .upload_while_cutting(counters, move |batches| {
                cut_file(&path, &cut_counters, |id, plain| batches.push(id, plain))
            })
            .await?;
        let manifest =
            FileManifest { size: cut.size, hash: cut.hash, mtime_ms: mtime.max(0) as u64 * 1000, content: cut.content };
        self.put_file(remote, manifest).await
    }

    /// Runs `cut` on a blocking thread while the chunks it hands to its
    /// [`Batches`] are uploaded here, up to [`UPLOAD_BATCHES_IN_FLIGHT`]
    /// batches at once, so reading, cutting and sending overlap. Returns
    /// what `cut` returned, once every batch is stored.
    pub(crate) async fn upload_while_cutting<T: Send + 'static>(
        &self,
        counters: &TransferCounters,
        cut: impl FnOnce(&mut Batches) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, ClientError> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<PlainChunks>(2);
        let cutter = tokio::task::spawn_blocking(move || {
            let mut batches = Batches { sender, pending: Vec::new(), pending_bytes: 0 };
            let outcome = cut(&mut batches)?;
            batches.flush()?;
            Ok::<T, ClientError>(outcome)
        });
        let received = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|batch| (batch, receiver))
        });
        let mut uploads = Box::pin(
            received.map(|batch| self.upload_missing(batch, counters)).buffer_unordered(UPLOAD_BATCHES_IN_FLIGHT),
        );
        let mut failed = None;
        while let Some(result) = uploads.next().await {
            if let Err(error) = result {
                failed = Some(error);
                break;
            }
        }
        // Dropping the uploads drops the receiver, which stops the cutter.
        drop(uploads);
        let cut = cutter.await.map_err(|e| protocol(format!("reading the content: {e}")))?;
        match failed {
            Some(error) => Err(error),
            None => cut,
        }
    }

    /// Writes bytes `range` (all if `None`) of the stored file `remote` to
    /// `out`, fetching only the chunks that cover the range, each checked
    /// against its name; a whole file is also checked against its hash.
    pub async fn download_file(
        &self,
        remote: &str,
        range: Option<std::ops::Range<u64>>,
        out: &mut impl std::io::Write,
        counters: &TransferCounters,
    ) -> Result<u64, ClientError> {
        let (entry, content) = self.stat_file(remote).await?;
        self.download_content(remote, (entry.size, entry.hash, &content), range, out, counters).await
    }

    /// As [`Client::download_file`], for a file shared in a chat.
    pub async fn download_shared(
        &self,
        file: &SharedFile,
        range: Option<std::ops::Range<u64>>,
        out: &mut impl std::io::Write,
        counters: &TransferCounters,
    ) -> Result<u64, ClientError> {
        self.download_content(&file.name, (file.size, file.hash, &file.content), range, out, counters).await
    }

    /// Keeps a file shared in a chat in the caller's own store at `remote`:
    /// its chunks are already stored, so nothing but the manifest is sent.
    pub async fn save_shared(&self, file: &SharedFile, remote: &str) -> Result<FileEntry, ClientError> {
        let mtime_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let manifest =
            FileManifest { size: file.size, hash: file.hash, mtime_ms: mtime_ms as u64, content: file.content.clone() };
        self.put_file(remote, manifest).await
    }

    /// Shares the caller's stored file at `remote` into `chat` as a
    /// message; returns its (seq, date). No chunk is sent.
    pub async fn share_file(&self, chat: ChatId, remote: &str, caption: &str) -> Result<(u64, u64), ClientError> {
        let request = Request::ShareFile {
            chat,
            client_msg_id: self.new_client_msg_id(),
            path: remote.to_string(),
            caption: caption.to_string(),
        };
        expect!(self.call(&request).await?, Response::Sent { seq, date_ms } => (seq, date_ms))
    }

    /// A history page with the files shared in its messages.
    pub async fn history_with_files(
        &self,
        chat: ChatId,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> Result<(MessagePage, Vec<(u64, SharedFile)>), ClientError> {
        let request = Request::HistoryWithFiles { chat, anchor, limit };
        expect!(self.call(&request).await?, Response::MessagesWithFiles { page, files } => (page, files))
    }

    /// Bytes `range` of content of `size` bytes and hash `hash` named by
    /// `content`, each chunk checked; a whole file against its hash too.
    async fn download_content(
        &self,
        what: &str,
        (size, hash, content): (u64, [u8; 32], &ChunkList),
        range: Option<std::ops::Range<u64>>,
        out: &mut impl std::io::Write,
        counters: &TransferCounters,
    ) -> Result<u64, ClientError> {
        let refs = self.expand_list(content).await?;
        let whole = range.is_none();
        let range = range.unwrap_or(0..size);
        let range = range.start.min(size)..range.end.min(size);
        // The chunks overlapping the range, with each one's offset in the file.
        let mut offset = 0u64;
        let mut covering = Vec::new();
        for chunk in &refs {
            let end = offset + u64::from(chunk.len);
            if end > range.start && offset < range.end {
                covering.push((offset, chunk.id));
            }
            offset = end;
        }
        let mut stream = Box::pin(self.chunk_stream(covering.iter().map(|(_, id)| *id).collect()));
        let mut hasher = blake3::Hasher::new();
        let mut written = 0u64;
        let mut next = covering.iter();
        let io = |e| ClientError::Io { path: "output".into(), source: e };
        while let Some(batch) = stream.next().await {
            for plain in batch? {
                let Some((start, _)) = next.next() else { break };
                let from = range.start.saturating_sub(*start).min(plain.len() as u64) as usize;
                let to = (range.end - start).min(plain.len() as u64) as usize;
                hasher.update(&plain);
                out.write_all(&plain[from..to]).map_err(io)?;
                written += (to - from) as u64;
                TransferCounters::add(&counters.plain_bytes, (to - from) as u64);
            }
        }
        if whole && (written != size || *hasher.finalize().as_bytes() != hash) {
            return Err(protocol(format!("{what} does not match its recorded hash")));
        }
        Ok(written)
    }
}
