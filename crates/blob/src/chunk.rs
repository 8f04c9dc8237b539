//! Cutting content into chunks, naming them and compressing them where it pays.

use crate::BlobError;
use bytes::Bytes;
use hamgam_proto::frame::FrameError;
use hamgam_proto::store::{CHUNK_FRAME_HEAD_BYTES, ChunkCodec, ChunkFrame, ReceivedChunk};
use hamgam_types::{ChunkId, limits};
use std::collections::HashMap;
use std::io::Read;

/// FastCDC bounds. The defaults are the limits' values, chosen by
/// measurement (docs/design/store.md); others exist for that measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams { min: limits::CHUNK_MIN_BYTES, avg: limits::CHUNK_AVG_BYTES, max: limits::CHUNK_MAX_BYTES }
    }
}

/// Bytes a stream is read in at a time: large reads, and the unfinished
/// chunk at the end of a block (under the largest chunk) moved once.
const STREAM_BLOCK_BYTES: usize = 4 << 20;

/// The chunks of a stream, in order, each as its plain bytes: the same
/// boundaries [`chunks_of_slice`] finds in the whole. The stream is read in
/// large blocks and each chunk handed out as a slice of its block, not a
/// copy (fastcdc's own stream chunker shifts its buffer after every chunk);
/// only the unfinished chunk at a block's end is moved to the next.
pub fn chunks_of_reader<R: Read>(reader: R, params: ChunkerParams) -> impl Iterator<Item = std::io::Result<Bytes>> {
    StreamChunker { reader, params, block: Bytes::new(), start: 0, eof: false, failed: false }
}

struct StreamChunker<R> {
    reader: R,
    params: ChunkerParams,
    /// The bytes read last; those from `start` on are not yet handed out.
    block: Bytes,
    start: usize,
    eof: bool,
    failed: bool,
}

impl<R: Read> StreamChunker<R> {
    /// Reads until a largest chunk past `start` is in hand, or the stream
    /// ends. A cut never looks further than the largest chunk, so with that
    /// much in hand it falls where it would in the whole.
    fn fill(&mut self) -> std::io::Result<()> {
        let left = self.block.len() - self.start;
        if left >= self.params.max as usize || self.eof {
            return Ok(());
        }
        // Room for two largest chunks at first, so that a small file costs
        // little; a stream that goes on is read a whole block at a time.
        let size = if self.block.is_empty() { 2 * self.params.max as usize } else { STREAM_BLOCK_BYTES };
        let mut next = Vec::with_capacity(size.max(left + self.params.max as usize));
        next.extend_from_slice(&self.block[self.start..]);
        let room = next.capacity() - next.len();
        // Reads until the room is full or the stream ends, retrying interruptions.
        let read = self.reader.by_ref().take(room as u64).read_to_end(&mut next)?;
        self.eof = read < room;
        if self.eof && next.len() < next.capacity() / 2 {
            // The chunks handed out keep their block alive until they are
            // sent: a small file's chunk must not hold a block's room.
            next.shrink_to_fit();
        }
        self.block = Bytes::from(next);
        self.start = 0;
        Ok(())
    }
}

impl<R: Read> Iterator for StreamChunker<R> {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Err(error) = self.fill() {
            self.failed = true;
            return Some(Err(error));
        }
        let length = chunks_of_slice(&self.block[self.start..], self.params).next()?.len();
        let chunk = self.block.slice(self.start..self.start + length);
        self.start += length;
        Some(Ok(chunk))
    }
}

/// The chunk boundaries of bytes already in memory, as slices.
pub fn chunks_of_slice(data: &[u8], params: ChunkerParams) -> impl Iterator<Item = &[u8]> {
    fastcdc::v2020::FastCDC::new(data, params.min as usize, params.avg as usize, params.max as usize)
        .map(move |chunk| &data[chunk.offset..chunk.offset + chunk.length])
}

/// A chunk as it is sent and kept: its name, how its bytes are encoded, its
/// plain length and the encoded bytes. The bytes are shared, not copied,
/// when a chunk is cloned (a node sends each chunk to every holder) and
/// when they are handed to quinn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub id: ChunkId,
    pub codec: ChunkCodec,
    pub plain_len: u32,
    pub bytes: Bytes,
}

/// zstd level: 3 compresses text about 2.8x at about 300 MB/s on one core here.
const ZSTD_LEVEL: i32 = 3;

fn len32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

thread_local! {
    /// One compression context per thread, not one per chunk.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
}

/// Bytes of each of the three samples the compressibility probe tries.
const PROBE_SAMPLE_BYTES: usize = 2048;

thread_local! {
    /// The probe's fast compressor (level 1), one per thread.
    static PROBE: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(1).ok());
}

/// Whether a chunk looks worth compressing: three small samples (start,
/// middle, end) compressed at zstd's fastest level must shrink by a
/// sixteenth. Media (most of a phone's bytes) fails this in a few
/// microseconds, instead of after a full level-3 attempt over the chunk.
fn worth_compressing(plain: &[u8]) -> bool {
    if plain.len() < 8 * PROBE_SAMPLE_BYTES {
        return true; // small: the full attempt is as cheap as a probe
    }
    let middle = plain.len() / 2 - PROBE_SAMPLE_BYTES / 2;
    let samples = [0, middle, plain.len() - PROBE_SAMPLE_BYTES];
    PROBE.with(|cell| {
        let mut probe = cell.borrow_mut();
        let Some(probe) = probe.as_mut() else { return true };
        let mut packed = 0;
        for at in samples {
            match probe.compress(&plain[at..at + PROBE_SAMPLE_BYTES]) {
                Ok(bytes) => packed += bytes.len(),
                Err(_) => return true,
            }
        }
        let sampled = samples.len() * PROBE_SAMPLE_BYTES;
        packed <= sampled - sampled / 16
    })
}

/// The chunk compressed, if that saves at least a sixteenth.
fn compress_named(id: ChunkId, plain: &[u8]) -> Option<StoredChunk> {
    if !worth_compressing(plain) {
        return None;
    }
    let packed = COMPRESSOR.with(|cell| {
        let mut compressor = cell.borrow_mut();
        compressor.as_mut().and_then(|c| c.compress(plain).ok())
    })?;
    (packed.len() <= plain.len() - plain.len() / 16).then(|| StoredChunk {
        id,
        codec: ChunkCodec::Zstd,
        plain_len: len32(plain),
        bytes: packed.into(),
    })
}

/// A received chunk is stored as it came (its hash is checked by the store).
impl From<ReceivedChunk> for StoredChunk {
    fn from(received: ReceivedChunk) -> StoredChunk {
        let ReceivedChunk { id, codec, plain_len, bytes } = received;
        StoredChunk { id, codec, plain_len, bytes: bytes.into() }
    }
}

impl StoredChunk {
    /// Names plain bytes and compresses them if that saves at least a
    /// sixteenth; media, which does not compress, is kept plain (zstd gives
    /// up on it quickly).
    pub fn seal(plain: &[u8]) -> StoredChunk {
        let id = ChunkId::of(plain);
        match compress_named(id, plain) {
            Some(sealed) => sealed,
            None => StoredChunk {
                id,
                codec: ChunkCodec::Plain,
                plain_len: len32(plain),
                bytes: Bytes::copy_from_slice(plain),
            },
        }
    }

    /// [`StoredChunk::seal`] of bytes the caller has named (`id` must be
    /// `ChunkId::of(&plain)`; the node checks) and gives up: no second
    /// hash, and a chunk kept plain is not copied.
    pub fn seal_named(id: ChunkId, plain: Bytes) -> StoredChunk {
        match compress_named(id, &plain) {
            Some(sealed) => sealed,
            None => StoredChunk { id, codec: ChunkCodec::Plain, plain_len: len32(&plain), bytes: plain },
        }
    }

    /// The chunk as its frame's head and its stored bytes (shared, not
    /// copied), for a writer that hands its buffers to the stream.
    pub fn frame(&self) -> Result<([u8; CHUNK_FRAME_HEAD_BYTES], Bytes), FrameError> {
        let frame = ChunkFrame { id: self.id, codec: self.codec, plain_len: self.plain_len, bytes: &self.bytes };
        Ok((frame.head()?, self.bytes.clone()))
    }

    /// The plain bytes, checked against the name. Decompression is bounded
    /// by the declared plain length, which is itself bounded.
    pub fn open(&self) -> Result<Vec<u8>, BlobError> {
        match self.codec {
            ChunkCodec::Plain => {
                self.check_plain(&self.bytes)?;
                Ok(self.bytes.to_vec())
            }
            ChunkCodec::Zstd => self.decompressed(),
        }
    }

    /// [`StoredChunk::open`], taking the chunk: a plain chunk's bytes are
    /// returned as they are, not copied (most of a restore's bytes).
    pub fn into_plain(self) -> Result<Vec<u8>, BlobError> {
        match self.codec {
            ChunkCodec::Plain => {
                self.check_plain(&self.bytes)?;
                // The buffer itself when nothing else shares it.
                Ok(Vec::from(self.bytes))
            }
            ChunkCodec::Zstd => self.decompressed(),
        }
    }

    fn decompressed(&self) -> Result<Vec<u8>, BlobError> {
        let mut plain = Vec::new();
        self.decompress_checked(&mut plain)?;
        Ok(plain)
    }

    /// Checks the bytes against the name without keeping the plain bytes:
    /// a plain chunk is hashed where it lies, a compressed one is
    /// decompressed into this thread's reused buffer. What a node does to
    /// every chunk it receives.
    pub fn check(&self) -> Result<(), BlobError> {
        match self.codec {
            ChunkCodec::Plain => self.check_plain(&self.bytes),
            ChunkCodec::Zstd => DECOMPRESSED.with(|cell| self.decompress_checked(&mut cell.borrow_mut())),
        }
    }

    fn mismatch(&self, reason: String) -> BlobError {
        BlobError::Mismatch { id: self.id, reason }
    }

    /// The declared plain length, if within the chunk limit.
    fn declared_len(&self) -> Result<usize, BlobError> {
        if self.plain_len > limits::CHUNK_MAX_BYTES {
            return Err(self.mismatch(format!("declares {} plain bytes, over the chunk limit", self.plain_len)));
        }
        Ok(self.plain_len as usize)
    }

    /// `plain` has the declared length and hashes to the name.
    fn check_plain(&self, plain: &[u8]) -> Result<(), BlobError> {
        if plain.len() != self.declared_len()? {
            let reason = format!("holds {} plain bytes, not the {} declared", plain.len(), self.plain_len);
            return Err(self.mismatch(reason));
        }
        if ChunkId::of(plain) != self.id {
            return Err(self.mismatch("the bytes hash to another name".into()));
        }
        Ok(())
    }

    /// Decompresses into `buffer` (replacing what it held), bounded by the
    /// declared plain length, and checks the result.
    fn decompress_checked(&self, buffer: &mut Vec<u8>) -> Result<(), BlobError> {
        // Room for one spare byte, so content longer than declared is told
        // apart from content of exactly the declared length. zstd writes
        // into the spare capacity (nothing is zeroed first) and never past
        // it, so a reused buffer bounds the output as a fresh one does.
        buffer.clear();
        buffer.reserve(self.declared_len()? + 1);
        DECOMPRESSOR
            .with(|cell| {
                let mut slot = cell.borrow_mut();
                let decompressor = match &mut *slot {
                    Some(decompressor) => decompressor,
                    empty => empty.insert(zstd::bulk::Decompressor::new()?),
                };
                decompressor.decompress_to_buffer(&self.bytes, buffer)
            })
            .map_err(|error| self.mismatch(format!("does not decompress: {error}")))?;
        self.check_plain(buffer)
    }
}

thread_local! {
    /// Where a thread decompresses chunks it only checks, reused.
    static DECOMPRESSED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A thread's zstd decompression context, made once: making one per
    /// chunk allocated and set up its tables every time.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The chunks of `ids` in order, moved out of `by_id` (an id asked for
/// twice is copied for its earlier mentions only); `Err(id)` for one
/// `by_id` lacks.
pub fn in_order(mut by_id: HashMap<ChunkId, StoredChunk>, ids: &[ChunkId]) -> Vec<Result<StoredChunk, ChunkId>> {
    let last_mention: HashMap<ChunkId, usize> = ids.iter().enumerate().map(|(at, id)| (*id, at)).collect();
    ids.iter()
        .enumerate()
        .map(|(at, id)| {
            let chunk = if last_mention[id] == at { by_id.remove(id) } else { by_id.get(id).cloned() };
            chunk.ok_or(*id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random()).collect()
    }

    #[test]
    fn text_is_compressed_media_is_not_and_both_open_to_their_bytes() {
        let text = "سلام دنیا، این یک پیام است. ".repeat(2000).into_bytes();
        let text = &text[..60_000];
        let sealed = StoredChunk::seal(text);
        assert_eq!(sealed.codec, ChunkCodec::Zstd);
        assert!(sealed.bytes.len() < text.len() / 4);
        assert_eq!(sealed.open().unwrap(), text);

        let media = random_bytes(60_000, 1);
        let sealed = StoredChunk::seal(&media);
        assert_eq!(sealed.codec, ChunkCodec::Plain);
        assert_eq!(sealed.open().unwrap(), media);
    }

    #[test]
    fn a_chunk_whose_bytes_do_not_match_its_name_does_not_open() {
        let mut sealed = StoredChunk::seal(&random_bytes(1000, 2));
        let mut damaged = sealed.bytes.to_vec();
        damaged[10] ^= 1;
        sealed.bytes = damaged.into();
        assert!(matches!(sealed.open(), Err(BlobError::Mismatch { .. })));
        assert!(matches!(sealed.into_plain(), Err(BlobError::Mismatch { .. })));
        let mut lying = StoredChunk::seal(&vec![b'a'; 100_000]);
        lying.plain_len = 10;
        assert!(lying.open().is_err(), "decompression is bounded by the declared length");
        assert!(lying.clone().into_plain().is_err());
        // Refused too when the thread's reused buffer has grown (by a large
        // good chunk) past the lying chunk's declared length.
        StoredChunk::seal(&vec![b'b'; 200_000]).check().unwrap();
        assert!(matches!(lying.check(), Err(BlobError::Mismatch { .. })));
    }

    #[test]
    fn chunks_come_in_the_order_asked_and_a_repeated_id_each_time() {
        let [a, b, c] = [1, 2, 3].map(|seed| StoredChunk::seal(&random_bytes(1000, seed)));
        let by_id: HashMap<ChunkId, StoredChunk> = [a.clone(), b.clone()].into_iter().map(|c| (c.id, c)).collect();
        let ordered = in_order(by_id, &[a.id, b.id, a.id, c.id, b.id]);
        assert_eq!(ordered, vec![Ok(a.clone()), Ok(b.clone()), Ok(a), Err(c.id), Ok(b)]);
    }

    #[test]
    fn an_insertion_changes_only_the_chunks_around_it() {
        let params = ChunkerParams::default();
        let original = random_bytes(4 << 20, 3);
        let mut edited = original.clone();
        edited.insert(2 << 20, 0x55);
        let names =
            |data: &[u8]| chunks_of_slice(data, params).map(ChunkId::of).collect::<std::collections::HashSet<_>>();
        let (before, after) = (names(&original), names(&edited));
        let new = after.difference(&before).count();
        assert!(new <= 2, "{new} chunks changed for one inserted byte");
    }

    /// Hands out a few bytes per read, at uneven lengths, as a pipe may.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            self.1 += 1;
            let take = out.len().min(self.0.len()).min(1 + self.1 * 7919 % 300_000);
            out[..take].copy_from_slice(&self.0[..take]);
            self.0 = &self.0[take..];
            Ok(take)
        }
    }

    #[test]
    fn a_stream_is_cut_where_the_whole_is_cut_however_it_is_read() {
        let params = ChunkerParams::default();
        // Several blocks' worth, so cuts cross the reader's block boundaries.
        let original = random_bytes(3 * STREAM_BLOCK_BYTES + 12_345, 5);
        let whole: Vec<&[u8]> = chunks_of_slice(&original, params).collect();
        let streamed: Vec<Bytes> = chunks_of_reader(original.as_slice(), params).map(|c| c.unwrap()).collect();
        assert_eq!(streamed, whole);
        let trickled: Vec<Bytes> = chunks_of_reader(Trickle(&original, 0), params).map(|c| c.unwrap()).collect();
        assert_eq!(trickled, whole);
        assert!(streamed.iter().all(|c| c.len() <= limits::CHUNK_MAX_BYTES as usize));
        // Small inputs, the empty one included.
        for len in [0, 1, 100, limits::CHUNK_MIN_BYTES as usize + 1] {
            let streamed: Vec<Bytes> = chunks_of_reader(&original[..len], params).map(|c| c.unwrap()).collect();
            assert_eq!(streamed, chunks_of_slice(&original[..len], params).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_small_streams_chunk_does_not_keep_a_blocks_room() {
        let original = random_bytes(1000, 9);
        let mut chunks: Vec<Bytes> =
            chunks_of_reader(original.as_slice(), ChunkerParams::default()).map(|c| c.unwrap()).collect();
        assert_eq!(chunks.len(), 1);
        // The chunk is the last holder of its buffer; what that buffer holds is what it keeps.
        let held = chunks.remove(0).try_into_mut().expect("the chunk alone holds its buffer");
        assert_eq!(&held[..], &original[..]);
        assert!(held.capacity() < 2 * original.len(), "a 1000-byte chunk keeps {} bytes", held.capacity());
    }

    #[test]
    fn a_failing_read_ends_the_stream_with_its_error() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk gone"))
            }
        }
        let mut chunks = chunks_of_reader(Failing, ChunkerParams::default());
        assert!(matches!(chunks.next(), Some(Err(e)) if e.to_string() == "disk gone"));
        assert!(chunks.next().is_none());
    }
}
