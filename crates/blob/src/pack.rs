//! Chunks on a node's disk: append-only pack files with an index.
//!
//! ```text
//! chunks/pack-00000001.dat   records, appended; fdatasync'd before an upload is answered
//! chunks/pack-00000001.idx   written once the pack is sealed (past PACK_BYTES_MAX)
//! ```
//!
//! A record is `magic "HGC1" | id 32 | codec u8 | plain len u32 | stored len
//! u32 | crc32 u32 | stored bytes`, the crc covering the fields after the
//! magic and the bytes. A sealed pack's index lists its records (with a
//! crc32 of its own), so opening the store reads indexes, not packs; only
//! the one pack still being written (or a pack whose index is missing or
//! damaged) is scanned, and a torn tail left by a crash is cut off.
//!
//! Many chunks per file (not a file per chunk) keeps the file system's
//! per-file cost out of the way and makes one fdatasync cover a whole upload
//! batch. Concurrent batches append under a lock and sync outside it, so
//! their fsyncs overlap. A chunk enters the in-memory index only after its
//! sync, so nothing reports a chunk as present before it is durable. Synced
//! records leave the page cache (the first read of one comes from the disk).
//!
//! Garbage collection ([`PackStore::collect`]) drops from the index every
//! chunk that is neither live nor touched (stored, or reported present)
//! since a cutoff, under the index's write lock, so a chunk is either
//! dropped before an upload or a presence answer sees it (and then counts
//! as missing and is stored again) or it is kept. Packs whose bytes are
//! mostly dropped are rewritten: their kept records are appended to the
//! active pack and synced before the old pack is removed.

use crate::{BlobError, Presence, StoredChunk};
use hamgam_proto::store::ChunkCodec;
use hamgam_types::{ChunkId, limits};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

const RECORD_MAGIC: [u8; 4] = *b"HGC1";
const RECORD_HEADER_BYTES: usize = 4 + 32 + 1 + 4 + 4 + 4;
const INDEX_MAGIC: [u8; 4] = *b"HGI1";
const INDEX_ENTRY_BYTES: usize = 32 + 8 + 4 + 4 + 1;

/// Where one chunk's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    pack: u32,
    /// Of the record's first byte.
    offset: u64,
    stored_len: u32,
    plain_len: u32,
    codec: ChunkCodec,
}

/// An index entry: where the chunk is, and when something last relied on
/// it being here (milliseconds since the Unix epoch).
#[derive(Debug)]
struct Slot {
    location: Location,
    touched_ms: AtomicU64,
}

impl Slot {
    fn new(location: Location, now_ms: u64) -> Slot {
        Slot { location, touched_ms: AtomicU64::new(now_ms) }
    }

    fn touch(&self, now_ms: u64) {
        self.touched_ms.fetch_max(now_ms, Ordering::Relaxed);
    }
}

/// The wall clock in milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct ActivePack {
    number: u32,
    file: Arc<File>,
    len: u64,
    /// Every record of this pack, for its index when it is sealed.
    records: Vec<(ChunkId, Location)>,
}

/// What one upload batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// Chunks written now.
    pub stored: u32,
    /// Chunks that were already here (or twice in the batch).
    pub present: u32,
}

/// Totals of the store, for status and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    pub chunks: u64,
    pub packs: u32,
    /// Bytes the chunks take on disk (after compression).
    pub stored_bytes: u64,
    /// Plain bytes of the chunks.
    pub plain_bytes: u64,
}

/// What one garbage collection did on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectReport {
    /// Chunks kept: live, or touched since the cutoff.
    pub kept: u64,
    /// Chunks dropped from the index.
    pub dropped: u64,
    /// Stored bytes of the dropped chunks.
    pub dropped_bytes: u64,
    /// Packs rewritten or removed, and the disk bytes that freed.
    pub packs_rewritten: u32,
    pub freed_bytes: u64,
}

/// The chunk store of one node.
pub struct PackStore {
    dir: PathBuf,
    index: RwLock<HashMap<ChunkId, Slot>>,
    active: Mutex<ActivePack>,
    /// Read handles by pack number.
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// One collection at a time.
    collecting: Mutex<()>,
}

impl std::fmt::Debug for PackStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn pack_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("pack-{number:08}.dat"))
}

fn index_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("pack-{number:08}.idx"))
}

/// The number of the pack file named `name` (see [`pack_path`]), if it is one.
fn pack_number(name: &std::ffi::OsStr) -> Option<u32> {
    name.to_str()?.strip_prefix("pack-")?.strip_suffix(".dat")?.parse().ok()
}

fn record_crc(id: &ChunkId, codec: ChunkCodec, plain_len: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&id.0);
    hasher.update(&[codec as u8]);
    hasher.update(&plain_len.to_le_bytes());
    hasher.update(&(bytes.len() as u32).to_le_bytes());
    hasher.update(bytes);
    hasher.finalize()
}

fn record_header(chunk: &StoredChunk) -> [u8; RECORD_HEADER_BYTES] {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[..4].copy_from_slice(&RECORD_MAGIC);
    header[4..36].copy_from_slice(&chunk.id.0);
    header[36] = chunk.codec as u8;
    header[37..41].copy_from_slice(&chunk.plain_len.to_le_bytes());
    header[41..45].copy_from_slice(&(chunk.bytes.len() as u32).to_le_bytes());
    header[45..49].copy_from_slice(&record_crc(&chunk.id, chunk.codec, chunk.plain_len, &chunk.bytes).to_le_bytes());
    header
}

/// Slices one `pwritev` takes at most (Linux's IOV_MAX).
const SLICES_PER_WRITE_MAX: usize = 1024;

/// Writes all of `slices` at `offset`, in as few calls as the kernel allows.
fn write_all_vectored_at(file: &File, mut slices: &mut [IoSlice<'_>], mut offset: u64) -> std::io::Result<()> {
    while !slices.is_empty() {
        let batch = slices.len().min(SLICES_PER_WRITE_MAX);
        match rustix::io::pwritev(file, &slices[..batch], offset) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                offset += written as u64;
                IoSlice::advance_slices(&mut slices, written);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Largest page-cache folio: 2 MiB, one huge page. The kernel drops a
/// folio only when all of it lies in the range it is asked to drop, and
/// ext4 caches files in folios of up to this size.
const FOLIO_BYTES_MAX: u64 = 2 << 20;

/// Drops from the page cache the pages of a file's bytes from `start` up to
/// `end` (`None`: to the end of the file), bytes just made durable or just
/// checked by a scrub. Most of a pack is written once and read seldom: a
/// backup's gigabytes kept cached would push out what is read often (the
/// metadata store, media being downloaded), and each new page cached is
/// memory the kernel must find and clear, which costs a large upload as
/// much as its encryption does. The freed pages are reused by the next
/// batch's write; a chunk read soon after (a photo sent to a group) is read
/// from the disk once.
///
/// Both ends are rounded down to [`FOLIO_BYTES_MAX`]: callers go through a
/// pack front to back, so the folio holding one call's end is dropped
/// whole by the next call, where a range cut at a record's edge would leave
/// every folio astride an edge cached (a scrub pass left 390 of 512 MiB).
/// Only advice: an error changes nothing stored.
fn leave_page_cache(file: &File, start: u64, end: Option<u64>) {
    let start = start - start % FOLIO_BYTES_MAX;
    let len = match end {
        Some(end) => match std::num::NonZeroU64::new((end - end % FOLIO_BYTES_MAX).saturating_sub(start)) {
            Some(len) => Some(len),
            None => return,
        },
        None => None,
    };
    let _ = rustix::fs::fadvise(file, start, len, rustix::fs::Advice::DontNeed);
}

/// A record parsed from bytes, or why not.
enum Parsed {
    Record {
        id: ChunkId,
        location_len: usize,
        stored_len: u32,
        plain_len: u32,
        codec: ChunkCodec,
    },
    /// Not enough bytes for a whole record: a torn tail.
    Short,
    /// The bytes are not a good record.
    Bad,
}

/// A record's header fields, before its bytes are checked against the crc.
struct RecordHeader {
    id: ChunkId,
    codec: ChunkCodec,
    plain_len: u32,
    stored_len: u32,
    crc: u32,
}

/// The header at the start of `bytes`; `Short` if they end before it,
/// `Bad` if it is not a header or declares more than the limits allow.
fn parse_header(bytes: &[u8]) -> Result<RecordHeader, Parsed> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(Parsed::Short);
    }
    if bytes[..4] != RECORD_MAGIC {
        return Err(Parsed::Bad);
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[4..36]);
    let codec = ChunkCodec::from_byte(bytes[36]).ok_or(Parsed::Bad)?;
    let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (plain_len, stored_len, crc) = (u32_at(37), u32_at(41), u32_at(45));
    if stored_len > limits::CHUNK_FRAME_BYTES_MAX || plain_len > limits::CHUNK_MAX_BYTES {
        return Err(Parsed::Bad);
    }
    Ok(RecordHeader { id: ChunkId(id), codec, plain_len, stored_len, crc })
}

impl RecordHeader {
    /// Whether `stored` (the bytes that follow the header) are this record's.
    fn matches(&self, stored: &[u8]) -> bool {
        stored.len() == self.stored_len as usize && record_crc(&self.id, self.codec, self.plain_len, stored) == self.crc
    }
}

fn parse_record(bytes: &[u8]) -> Parsed {
    let header = match parse_header(bytes) {
        Ok(header) => header,
        Err(parsed) => return parsed,
    };
    let end = RECORD_HEADER_BYTES + header.stored_len as usize;
    if bytes.len() < end {
        return Parsed::Short;
    }
    if !header.matches(&bytes[RECORD_HEADER_BYTES..end]) {
        return Parsed::Bad;
    }
    let RecordHeader { id, codec, plain_len, stored_len, .. } = header;
    Parsed::Record { id, location_len: end, stored_len, plain_len, codec }
}

/// Reads the record of `id` at `location`: its stored form, or `None` if
/// the record there is not intact. The header and the bytes are read
/// apart, so the bytes land in the chunk's own buffer without a copy.
fn read_record(file: &File, path: &Path, id: &ChunkId, location: &Location) -> Result<Option<StoredChunk>, BlobError> {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    file.read_exact_at(&mut header, location.offset).map_err(|e| BlobError::io(path, e))?;
    let mut bytes = vec![0u8; location.stored_len as usize];
    file.read_exact_at(&mut bytes, location.offset + RECORD_HEADER_BYTES as u64).map_err(|e| BlobError::io(path, e))?;
    Ok(match parse_header(&header) {
        Ok(header) if header.id == *id && header.matches(&bytes) => {
            Some(StoredChunk { id: *id, codec: header.codec, plain_len: header.plain_len, bytes: bytes.into() })
        }
        _ => None,
    })
}

/// Every good record of a pack and the length up to the last of them. A bad
/// record in the middle (damage, not a crash) is skipped by looking for the
/// next record's magic; what follows the last good record is a torn tail.
fn scan_pack(number: u32, bytes: &[u8]) -> (Vec<(ChunkId, Location)>, u64, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    let mut valid_end = 0usize;
    let mut damaged = 0usize;
    while at < bytes.len() {
        match parse_record(&bytes[at..]) {
            Parsed::Record { id, location_len, stored_len, plain_len, codec } => {
                records.push((id, Location { pack: number, offset: at as u64, stored_len, plain_len, codec }));
                at += location_len;
                valid_end = at;
            }
            Parsed::Short | Parsed::Bad => match bytes[at + 1..].windows(4).position(|w| w == RECORD_MAGIC) {
                Some(skip) => {
                    damaged += 1;
                    at += 1 + skip;
                }
                None => break,
            },
        }
    }
    (records, valid_end as u64, damaged)
}

fn encode_index(records: &[(ChunkId, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + records.len() * INDEX_ENTRY_BYTES + 4);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for (id, location) in records {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&location.offset.to_le_bytes());
        out.extend_from_slice(&location.stored_len.to_le_bytes());
        out.extend_from_slice(&location.plain_len.to_le_bytes());
        out.push(location.codec as u8);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_index(number: u32, bytes: &[u8]) -> Option<Vec<(ChunkId, Location)>> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc || body.get(..4)? != INDEX_MAGIC {
        return None;
    }
    let count = u32::from_le_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    let entries = &body[8..];
    if entries.len() != count.checked_mul(INDEX_ENTRY_BYTES)? {
        return None;
    }
    entries
        .chunks_exact(INDEX_ENTRY_BYTES)
        .map(|e| {
            let id = ChunkId(e[..32].try_into().ok()?);
            let offset = u64::from_le_bytes(e[32..40].try_into().ok()?);
            let stored_len = u32::from_le_bytes(e[40..44].try_into().ok()?);
            let plain_len = u32::from_le_bytes(e[44..48].try_into().ok()?);
            let codec = ChunkCodec::from_byte(e[48])?;
            Some((id, Location { pack: number, offset, stored_len, plain_len, codec }))
        })
        .collect()
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| BlobError::io(dir, e))
}

/// Writes a file durably: to a temporary name, fsync, rename, fsync the folder.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary).map_err(|e| BlobError::io(&temporary, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| BlobError::io(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| BlobError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn open_for_append(path: &Path) -> Result<File, BlobError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| BlobError::io(path, e))
}

impl PackStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<PackStore, BlobError> {
        std::fs::create_dir_all(dir).map_err(|e| BlobError::io(dir, e))?;
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)
            .map_err(|e| BlobError::io(dir, e))?
            .filter_map(|entry| pack_number(&entry.ok()?.file_name()))
            .collect();
        numbers.sort_unstable();

        let opened_ms = wall_clock_ms();
        let mut index = HashMap::new();
        let mut active = None;
        for (position, &number) in numbers.iter().enumerate() {
            let is_last = position + 1 == numbers.len();
            let sealed = std::fs::read(index_path(dir, number)).ok().and_then(|bytes| decode_index(number, &bytes));
            let records = match sealed {
                Some(records) => records,
                None => {
                    let path = pack_path(dir, number);
                    let bytes = std::fs::read(&path).map_err(|e| BlobError::io(&path, e))?;
                    let (records, valid_end, damaged) = scan_pack(number, &bytes);
                    if damaged > 0 {
                        tracing::error!(pack = %path.display(), damaged, "damaged records skipped while scanning a pack");
                    }
                    if valid_end < bytes.len() as u64 {
                        tracing::warn!(pack = %path.display(), cut = bytes.len() as u64 - valid_end, "cutting a torn tail");
                        let file = open_for_append(&path)?;
                        file.set_len(valid_end).and_then(|()| file.sync_all()).map_err(|e| BlobError::io(&path, e))?;
                    }
                    if is_last && valid_end < limits::PACK_BYTES_MAX {
                        let file = Arc::new(open_for_append(&path)?);
                        active = Some(ActivePack { number, file, len: valid_end, records: records.clone() });
                    } else {
                        write_durably(&index_path(dir, number), &encode_index(&records))?;
                    }
                    records
                }
            };
            // A later record of the same chunk is a repair of an earlier
            // (damaged) one: it wins. Touch times are not kept on disk:
            // every chunk counts as touched when the store opens, which
            // only delays its collection by one grace period.
            for (id, location) in records {
                index.insert(id, Slot::new(location, opened_ms));
            }
        }
        let active = match active {
            Some(active) => active,
            None => Self::new_pack(dir, numbers.last().map_or(1, |n| n + 1))?,
        };
        Ok(PackStore {
            dir: dir.to_path_buf(),
            index: RwLock::new(index),
            active: Mutex::new(active),
            files: RwLock::new(HashMap::new()),
            collecting: Mutex::new(()),
        })
    }

    /// The chunks with an intact record in the packs of `dir`, read without
    /// changing anything: [`PackStore::open`] cuts a torn tail, which in
    /// the store of a running node may be a record still being written.
    /// Chunks that collection dropped from a pack not yet rewritten still
    /// count. For audits and tests; it reads every pack whole.
    pub fn intact_in(dir: &Path) -> Result<HashSet<ChunkId>, BlobError> {
        let mut intact = HashSet::new();
        for entry in std::fs::read_dir(dir).map_err(|e| BlobError::io(dir, e))? {
            let path = entry.map_err(|e| BlobError::io(dir, e))?.path();
            let Some(number) = path.file_name().and_then(pack_number) else {
                continue;
            };
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Collection may remove a pack between listing and reading.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(BlobError::io(&path, error)),
            };
            intact.extend(scan_pack(number, &bytes).0.into_iter().map(|(id, _)| id));
        }
        Ok(intact)
    }

    fn new_pack(dir: &Path, number: u32) -> Result<ActivePack, BlobError> {
        let path = pack_path(dir, number);
        let file = Arc::new(open_for_append(&path)?);
        sync_dir(dir)?;
        Ok(ActivePack { number, file, len: 0, records: Vec::new() })
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index.read().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    /// The ids not stored here, in the order given, each once. Those found
    /// are touched if the answer is [`Presence::Relied`] on.
    pub fn missing(&self, ids: &[ChunkId], presence: Presence) -> Vec<ChunkId> {
        let now_ms = wall_clock_ms();
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for id in ids {
            match index.get(id) {
                Some(slot) if presence == Presence::Relied => slot.touch(now_ms),
                Some(_) => {}
                None if seen.insert(*id) => missing.push(*id),
                None => {}
            }
        }
        missing
    }

    /// Checks every chunk against its name, appends the new ones and makes
    /// them durable. Blocking: call it off the async runtime. A batch with
    /// one bad chunk stores nothing.
    pub fn put(&self, chunks: &[StoredChunk]) -> Result<PutOutcome, BlobError> {
        for chunk in chunks {
            chunk.check()?;
        }
        self.put_checked(chunks)
    }

    /// [`PackStore::put`] of chunks the caller has just checked against
    /// their names (each check is a decompression and a hash).
    pub(crate) fn put_checked(&self, chunks: &[StoredChunk]) -> Result<PutOutcome, BlobError> {
        let mut outcome = PutOutcome::default();
        let mut fresh: Vec<&StoredChunk> = Vec::new();
        {
            let now_ms = wall_clock_ms();
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            let mut seen = HashSet::new();
            for chunk in chunks {
                if let Some(slot) = index.get(&chunk.id) {
                    slot.touch(now_ms);
                    outcome.present += 1;
                } else if !seen.insert(chunk.id) {
                    outcome.present += 1;
                } else {
                    fresh.push(chunk);
                }
            }
        }
        if fresh.is_empty() {
            return Ok(outcome);
        }
        let written = self.append(&fresh)?;
        outcome.stored = written.len() as u32;
        let now_ms = wall_clock_ms();
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        for (id, location) in written {
            index.entry(id).or_insert_with(|| Slot::new(location, now_ms));
        }
        Ok(outcome)
    }

    /// Appends records to the active pack (sealing it when full) and makes
    /// them durable; returns where each went. The index is not touched.
    /// Each chunk's bytes go to the file from where they lie, between
    /// their headers, in vectored writes: no copy into a buffer first.
    fn append(&self, fresh: &[&StoredChunk]) -> Result<Vec<(ChunkId, Location)>, BlobError> {
        let headers: Vec<[u8; RECORD_HEADER_BYTES]> = fresh.iter().map(|chunk| record_header(chunk)).collect();
        let mut slices = Vec::with_capacity(2 * fresh.len());
        for (header, chunk) in headers.iter().zip(fresh) {
            slices.push(IoSlice::new(header));
            slices.push(IoSlice::new(&chunk.bytes));
        }
        let mut written = Vec::with_capacity(fresh.len());
        let (file, start, end) = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let start = active.len;
            let mut offset = start;
            for chunk in fresh {
                let location = Location {
                    pack: active.number,
                    offset,
                    stored_len: chunk.bytes.len() as u32,
                    plain_len: chunk.plain_len,
                    codec: chunk.codec,
                };
                written.push((chunk.id, location));
                offset += (RECORD_HEADER_BYTES + chunk.bytes.len()) as u64;
            }
            let path = pack_path(&self.dir, active.number);
            write_all_vectored_at(&active.file, &mut slices, active.len).map_err(|e| BlobError::io(&path, e))?;
            active.len = offset;
            active.records.extend(written.iter().copied());
            let file = active.file.clone();
            // A sealed pack gets no next batch to drop its last folio.
            let sealed = active.len >= limits::PACK_BYTES_MAX;
            if sealed {
                self.seal(&mut active)?;
            }
            (file, start, (!sealed).then_some(offset))
        };
        file.sync_data().map_err(|e| BlobError::io(&self.dir, e))?;
        leave_page_cache(&file, start, end);
        Ok(written)
    }

    /// Syncs the full pack, writes its index and starts the next pack.
    fn seal(&self, active: &mut ActivePack) -> Result<(), BlobError> {
        let path = pack_path(&self.dir, active.number);
        active.file.sync_all().map_err(|e| BlobError::io(&path, e))?;
        write_durably(&index_path(&self.dir, active.number), &encode_index(&active.records))?;
        *active = Self::new_pack(&self.dir, active.number + 1)?;
        Ok(())
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>, BlobError> {
        if let Some(file) = self.files.read().unwrap_or_else(|p| p.into_inner()).get(&pack) {
            return Ok(file.clone());
        }
        let path = pack_path(&self.dir, pack);
        let file = Arc::new(File::open(&path).map_err(|e| BlobError::io(&path, e))?);
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(pack, file.clone());
        Ok(file)
    }

    /// A chunk's stored form, its record checked (`Damaged` if the disk
    /// changed it). Blocking.
    pub fn get(&self, id: &ChunkId) -> Result<Option<StoredChunk>, BlobError> {
        // The handle is taken with the location, under the index lock: a
        // collection that rewrites the pack removes it only after moving
        // the index, and an open handle still reads a removed file.
        let (location, file) = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            let Some(slot) = index.get(id) else {
                return Ok(None);
            };
            (slot.location, self.reader(slot.location.pack)?)
        };
        let path = pack_path(&self.dir, location.pack);
        match read_record(&file, &path, id, &location)? {
            Some(chunk) => Ok(Some(chunk)),
            None => {
                // Forget the damaged copy, so the chunk counts as missing and
                // the next upload of it (or a replica's copy) stores it again.
                tracing::error!(chunk = %id, pack = %path.display(), "a stored chunk is damaged");
                self.index.write().unwrap_or_else(|p| p.into_inner()).remove(id);
                Err(BlobError::Damaged { id: *id, path: path.display().to_string() })
            }
        }
    }

    /// Every chunk id stored here, in no particular order (a copy).
    pub fn ids(&self) -> Vec<ChunkId> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// The packs that hold chunks here, oldest first.
    pub fn pack_numbers(&self) -> Vec<u32> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let packs: BTreeSet<u32> = index.values().map(|slot| slot.location.pack).collect();
        packs.into_iter().collect()
    }

    /// The chunks whose copy here lies in `pack`, in the order of their
    /// records: from the pack's index file once it is sealed, from the
    /// records kept for it while it is the active pack. A pass over the
    /// store (the scrubber) goes pack by pack, so it reads each pack front
    /// to back and holds one pack's list at a time, not the whole store's.
    /// Blocking.
    pub fn ids_in_pack(&self, pack: u32) -> Vec<ChunkId> {
        let active = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            (active.number == pack).then(|| active.records.clone())
        };
        let mut records = active
            .or_else(|| std::fs::read(index_path(&self.dir, pack)).ok().and_then(|bytes| decode_index(pack, &bytes)))
            // No readable index file (a sealed pack gets one when it is
            // sealed or next opened): the in-memory index, all of it.
            .unwrap_or_else(|| self.records_in(pack));
        records.sort_unstable_by_key(|(_, location)| location.offset);
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        records
            .into_iter()
            .filter(|(id, location)| index.get(id).is_some_and(|slot| slot.location == *location))
            .map(|(id, _)| id)
            .collect()
    }

    fn records_in(&self, pack: u32) -> Vec<(ChunkId, Location)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.iter().filter(|(_, slot)| slot.location.pack == pack).map(|(id, slot)| (*id, slot.location)).collect()
    }

    /// Drops from the page cache the records of `ids`, just read by a pass
    /// in place order (see [`PackStore::ids_in_pack`]), so that a
    /// scrub leaves the cache to what clients read. Up to one folio per
    /// pack, at the end of what the pass has read, stays cached.
    pub fn leave_page_cache_of(&self, ids: &[ChunkId]) {
        let mut spans: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            for slot in ids.iter().filter_map(|id| index.get(id)) {
                let (start, end) = (slot.location.offset, slot.location.offset + record_bytes(&slot.location));
                let span = spans.entry(slot.location.pack).or_insert((start, end));
                *span = (span.0.min(start), span.1.max(end));
            }
        }
        for (pack, (start, end)) in spans {
            if let Ok(file) = self.reader(pack) {
                leave_page_cache(&file, start, Some(end));
            }
        }
    }

    /// Forgets a copy found bad elsewhere than [`PackStore::get`] (its bytes
    /// do not match its name although its record is intact).
    pub fn forget(&self, id: &ChunkId) {
        self.index.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// How many chunks the index lists (cheap, unlike [`PackStore::stats`]).
    pub fn chunks_held(&self) -> u64 {
        self.index.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    pub fn stats(&self) -> PackStats {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let packs = index.values().map(|s| s.location.pack).collect::<HashSet<_>>().len() as u32;
        PackStats {
            chunks: index.len() as u64,
            packs,
            stored_bytes: index.values().map(|s| u64::from(s.location.stored_len)).sum(),
            plain_bytes: index.values().map(|s| u64::from(s.location.plain_len)).sum(),
        }
    }
}

/// Bytes a record of `location` takes in its pack.
fn record_bytes(location: &Location) -> u64 {
    RECORD_HEADER_BYTES as u64 + u64::from(location.stored_len)
}

/// A pack is rewritten once at least this share of its bytes is garbage:
/// rewriting costs a copy of the rest, so a mostly-live pack waits.
const REWRITE_GARBAGE_NUMERATOR: u64 = 1;
const REWRITE_GARBAGE_DENOMINATOR: u64 = 4;

/// Kept records are copied in batches of about this many bytes.
const REWRITE_BATCH_BYTES: u64 = 16 << 20;

impl PackStore {
    /// Drops every chunk that is not in `live` and was not touched at or
    /// after `cutoff_ms`, then rewrites the packs that are mostly garbage.
    /// Blocking. The caller's `live` must be complete: a chunk it misses
    /// and nobody touched since the cutoff is gone.
    pub fn collect(&self, live: &HashSet<ChunkId>, cutoff_ms: u64) -> Result<CollectReport, BlobError> {
        let _one_at_a_time = self.collecting.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = CollectReport::default();
        let mut live_bytes: HashMap<u32, u64> = HashMap::new();
        {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            index.retain(|id, slot| {
                let keep = live.contains(id) || slot.touched_ms.load(Ordering::Relaxed) >= cutoff_ms;
                if keep {
                    *live_bytes.entry(slot.location.pack).or_default() += record_bytes(&slot.location);
                } else {
                    report.dropped += 1;
                    report.dropped_bytes += u64::from(slot.location.stored_len);
                }
                keep
            });
            report.kept = index.len() as u64;
        }
        for (number, length) in self.packs_to_rewrite(&live_bytes)? {
            self.rewrite(number)?;
            report.packs_rewritten += 1;
            report.freed_bytes += length - live_bytes.get(&number).copied().unwrap_or(0);
        }
        Ok(report)
    }

    /// Packs (with their lengths) whose garbage share calls for a rewrite;
    /// the active pack is sealed first if it is one of them.
    fn packs_to_rewrite(&self, live_bytes: &HashMap<u32, u64>) -> Result<Vec<(u32, u64)>, BlobError> {
        let worth_it = |number: u32, length: u64| {
            let garbage = length.saturating_sub(live_bytes.get(&number).copied().unwrap_or(0));
            garbage > 0 && garbage * REWRITE_GARBAGE_DENOMINATOR >= length * REWRITE_GARBAGE_NUMERATOR
        };
        let mut chosen = Vec::new();
        let active_number = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if worth_it(active.number, active.len) {
                chosen.push((active.number, active.len));
                self.seal(&mut active)?;
            }
            active.number
        };
        for entry in std::fs::read_dir(&self.dir).map_err(|e| BlobError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| BlobError::io(&self.dir, e))?;
            let Some(number) = pack_number(&entry.file_name()) else {
                continue;
            };
            if number >= active_number || chosen.iter().any(|(n, _)| *n == number) {
                continue;
            }
            let length = entry.metadata().map_err(|e| BlobError::io(&entry.path(), e))?.len();
            if worth_it(number, length) {
                chosen.push((number, length));
            }
        }
        chosen.sort_unstable();
        Ok(chosen)
    }

    /// Copies a sealed pack's indexed records to the active pack, moves the
    /// index to the copies once they are durable, then removes the pack.
    fn rewrite(&self, number: u32) -> Result<(), BlobError> {
        let path = pack_path(&self.dir, number);
        let mut kept: Vec<(ChunkId, Location)> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            index.iter().filter(|(_, s)| s.location.pack == number).map(|(id, s)| (*id, s.location)).collect()
        };
        kept.sort_unstable_by_key(|(_, location)| location.offset);
        let file = self.reader(number)?;
        let mut at = 0;
        while at < kept.len() {
            let mut batch = Vec::new();
            let mut bytes_in_batch = 0;
            while at < kept.len() && (batch.is_empty() || bytes_in_batch < REWRITE_BATCH_BYTES) {
                let (id, location) = kept[at];
                at += 1;
                bytes_in_batch += record_bytes(&location);
                match read_record(&file, &path, &id, &location)? {
                    Some(chunk) => batch.push((location, chunk)),
                    None => {
                        // Not copied: the chunk counts as missing here and
                        // the scrubber or the next upload brings it back.
                        tracing::error!(chunk = %id, pack = %path.display(), "a stored chunk is damaged");
                        self.forget_at(&id, &location);
                    }
                }
            }
            let written = self.append(&batch.iter().map(|(_, chunk)| chunk).collect::<Vec<_>>())?;
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            for ((old, _), (id, new)) in batch.iter().zip(written) {
                if let Some(slot) = index.get_mut(&id)
                    && slot.location == *old
                {
                    slot.location = new;
                }
            }
        }
        {
            // Readers take a pack's handle under the index lock, so once no
            // slot names the pack, no new read can start on it.
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            debug_assert!(index.values().all(|s| s.location.pack != number));
            self.files.write().unwrap_or_else(|p| p.into_inner()).remove(&number);
        }
        // The data first: a leftover index without its pack is ignored,
        // while a pack without its index is only scanned again.
        std::fs::remove_file(&path).map_err(|e| BlobError::io(&path, e))?;
        let index_file = index_path(&self.dir, number);
        if let Err(error) = std::fs::remove_file(&index_file)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            return Err(BlobError::io(&index_file, error));
        }
        sync_dir(&self.dir)
    }

    /// Forgets `id` if its index entry is still `location`.
    fn forget_at(&self, id: &ChunkId, location: &Location) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        if index.get(id).is_some_and(|s| s.location == *location) {
            index.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn chunk(seed: u64, len: usize) -> StoredChunk {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let plain: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        StoredChunk::seal(&plain)
    }

    #[test]
    fn chunks_survive_a_reopen_and_duplicates_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<StoredChunk> = (0..20).map(|i| chunk(i, 5000 + i as usize)).collect();
        {
            let store = PackStore::open(dir.path()).unwrap();
            assert_eq!(store.put(&chunks[..10]).unwrap(), PutOutcome { stored: 10, present: 0 });
            assert_eq!(store.put(&chunks).unwrap(), PutOutcome { stored: 10, present: 10 });
            assert_eq!(store.missing(&[chunks[3].id, chunk(99, 10).id], Presence::Relied), vec![chunk(99, 10).id]);
        }
        let store = PackStore::open(dir.path()).unwrap();
        for c in &chunks {
            assert_eq!(store.get(&c.id).unwrap().as_ref(), Some(c));
        }
        assert_eq!(store.stats().chunks, 20);
    }

    #[test]
    fn ids_in_pack_follow_the_records_on_disk_sealed_or_active() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<StoredChunk> = (0..40).map(|i| chunk(i, 3000 + i as usize)).collect();
        let written: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        {
            let store = PackStore::open(dir.path()).unwrap();
            store.put(&chunks[..25]).unwrap();
            store.put(&chunks[25..]).unwrap();
            assert_eq!(store.pack_numbers(), vec![1]);
            assert_eq!(store.ids_in_pack(1), written, "the active pack, from its records in memory");
            assert!(store.ids_in_pack(2).is_empty());
            store.leave_page_cache_of(&written);
            let mut active = store.active.lock().unwrap();
            store.seal(&mut active).unwrap();
        }
        let store = PackStore::open(dir.path()).unwrap();
        assert_eq!(store.ids_in_pack(1), written, "a sealed pack, from its index file");
        std::fs::remove_file(index_path(dir.path(), 1)).unwrap();
        assert_eq!(store.ids_in_pack(1), written, "without its index file, from the index in memory");
        // A chunk forgotten here is no longer listed.
        store.forget(&written[3]);
        assert_eq!(store.ids_in_pack(1).len(), 39);
        for c in &chunks {
            if c.id != written[3] {
                assert_eq!(store.get(&c.id).unwrap().as_ref(), Some(c));
            }
        }
    }

    #[test]
    fn a_batch_longer_than_one_vectored_write_is_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Two slices a chunk: this many take more than one write.
        let chunks: Vec<StoredChunk> = (0..SLICES_PER_WRITE_MAX as u64).map(|i| chunk(i, 100 + i as usize)).collect();
        PackStore::open(dir.path()).unwrap().put(&chunks).unwrap();
        let store = PackStore::open(dir.path()).unwrap();
        for c in &chunks {
            assert_eq!(store.get(&c.id).unwrap().as_ref(), Some(c));
        }
    }

    #[test]
    fn a_mismatched_chunk_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(dir.path()).unwrap();
        let good = chunk(1, 100);
        let mut bad = chunk(2, 100);
        let mut damaged = bad.bytes.to_vec();
        damaged[0] ^= 0xff;
        bad.bytes = damaged.into();
        assert!(matches!(store.put(&[good.clone(), bad]), Err(BlobError::Mismatch { .. })));
        assert!(!store.contains(&good.id));
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_is_found_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<StoredChunk> = (0..3).map(|i| chunk(i, 1000)).collect();
        {
            let store = PackStore::open(dir.path()).unwrap();
            store.put(&chunks).unwrap();
        }
        let path = pack_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let record = RECORD_HEADER_BYTES + 1000;
        bytes[record + RECORD_HEADER_BYTES + 10] ^= 1; // damage the second chunk's bytes
        bytes.extend_from_slice(&RECORD_MAGIC); // and a torn record after the last
        bytes.extend_from_slice(&[7; 20]);
        std::fs::write(&path, &bytes).unwrap();

        // Looking from outside finds the intact records and cuts nothing.
        let intact = PackStore::intact_in(dir.path()).unwrap();
        assert_eq!(intact, HashSet::from([chunks[0].id, chunks[2].id]));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "an audit changes nothing");

        let store = PackStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * record as u64, "the torn tail is cut");
        assert!(store.get(&chunks[0].id).unwrap().is_some());
        assert!(store.get(&chunks[2].id).unwrap().is_some(), "records after damage are still found");
        assert_eq!(
            store.missing(&[chunks[1].id], Presence::Relied),
            vec![chunks[1].id],
            "the damaged one counts as missing"
        );
        // Putting it again repairs it.
        store.put(&chunks[1..2]).unwrap();
        assert_eq!(store.get(&chunks[1].id).unwrap().as_ref(), Some(&chunks[1]));
    }

    #[test]
    fn damage_after_opening_is_reported_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(dir.path()).unwrap();
        let c = chunk(5, 2000);
        store.put(std::slice::from_ref(&c)).unwrap();
        let path = pack_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[RECORD_HEADER_BYTES + 7] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(store.get(&c.id), Err(BlobError::Damaged { .. })));
        assert_eq!(store.missing(&[c.id], Presence::Relied), vec![c.id], "a damaged copy counts as missing");
        store.put(std::slice::from_ref(&c)).unwrap();
        assert_eq!(store.get(&c.id).unwrap().as_ref(), Some(&c), "an upload repairs it");
    }

    #[test]
    fn sealed_packs_are_opened_from_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<StoredChunk> = (0..4).map(|i| chunk(i, 100)).collect();
        let records: Vec<(ChunkId, Location)> = {
            let store = PackStore::open(dir.path()).unwrap();
            store.put(&chunks).unwrap();
            let mut active = store.active.lock().unwrap();
            let records = active.records.clone();
            store.seal(&mut active).unwrap();
            records
        };
        let bytes = std::fs::read(index_path(dir.path(), 1)).unwrap();
        assert_eq!(decode_index(1, &bytes).unwrap(), records);
        let store = PackStore::open(dir.path()).unwrap();
        assert!(chunks.iter().all(|c| store.contains(&c.id)));
        assert_eq!(store.active.lock().unwrap().number, 2);
    }

    #[test]
    fn collection_drops_garbage_keeps_live_and_touched_and_shrinks_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<StoredChunk> = (0..40).map(|i| chunk(i, 20_000)).collect();
        let store = PackStore::open(dir.path()).unwrap();
        store.put(&chunks).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let cutoff = wall_clock_ms();
        let live: HashSet<ChunkId> = chunks[..10].iter().map(|c| c.id).collect();
        assert!(store.missing(&[chunks[10].id], Presence::Relied).is_empty(), "asking about a chunk touches it");
        store.put(&chunks[11..12]).unwrap(); // present: touched too
        let disk_before = disk_bytes(dir.path());

        let report = store.collect(&live, cutoff).unwrap();
        assert_eq!((report.kept, report.dropped), (12, 28));
        assert_eq!(report.packs_rewritten, 1);
        assert!(disk_bytes(dir.path()) < disk_before / 2, "the mostly-garbage pack was rewritten");
        for (i, c) in chunks.iter().enumerate() {
            let expected = if i < 12 { Some(c) } else { None };
            assert_eq!(store.get(&c.id).unwrap().as_ref(), expected, "chunk {i}");
        }
        // A second pass finds nothing more; a reopen finds the same chunks.
        assert_eq!(store.collect(&live, cutoff).unwrap().dropped, 0);
        drop(store);
        let store = PackStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().chunks, 12);
        assert_eq!(store.missing(&chunks.iter().map(|c| c.id).collect::<Vec<_>>(), Presence::Relied).len(), 28);
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    /// Uploads and presence answers racing a collection: whatever a caller
    /// was told is stored (or stored itself) after the cutoff survives, in
    /// every round, and what nobody touched is gone.
    #[test]
    fn collection_racing_uploads_never_loses_a_chunk_relied_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(PackStore::open(dir.path()).unwrap());
        for round in 0..15u64 {
            let garbage: Vec<StoredChunk> = (0..150).map(|i| chunk(round * 1000 + i, 3000 + i as usize)).collect();
            store.put(&garbage).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            let cutoff = wall_clock_ms();
            let collector = {
                let store = store.clone();
                std::thread::spawn(move || store.collect(&HashSet::new(), cutoff).unwrap())
            };
            // Rely on every third chunk: ask, and upload it if it is missing.
            let mut relied_on = Vec::new();
            for c in garbage.iter().step_by(3) {
                if !store.missing(&[c.id], Presence::Relied).is_empty() {
                    store.put(std::slice::from_ref(c)).unwrap();
                }
                relied_on.push(c);
            }
            collector.join().unwrap();
            for c in &relied_on {
                assert_eq!(store.get(&c.id).unwrap().as_ref(), Some(*c), "round {round}: a chunk relied on was lost");
            }
            let untouched = garbage.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, c)| c.id);
            assert_eq!(store.missing(&untouched.collect::<Vec<_>>(), Presence::Relied).len(), 100, "round {round}");
        }
    }
}
