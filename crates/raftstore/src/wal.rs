//! The write-ahead log holding every shard's raft entries and hard state.
//!
//! Why our own: sled's flush is `sync_file_range`, which does not survive a
//! power cut, so the raft log cannot live there (DESIGN.md). The WAL is a
//! directory of segment files `{sequence:016x}.wal`, each a run of records:
//!
//! ```text
//! +--------------+-------------+---------------------------------+
//! | length u32LE | crc32 u32LE | payload (`length` bytes)        |
//! +--------------+-------------+---------------------------------+
//! payload: version u8 = 1, kind u8, body
//!   kind 1 = Round:  shards u32, then per shard: shard u32, hard-state flag u8
//!                    [term u64, vote u64, commit u64], entries u32, then per
//!                    entry: index u64, term u64, type u8, data (u32 len + bytes),
//!                    context (u32 len + bytes)
//!   kind 2 = Header: the hard state of every shard, written first in a segment
//! ```
//!
//! One [`Wal::append_round`] call is one record and one `fdatasync`: all shards'
//! writes of a ready round share it. A round that only moves commit indexes
//! is written without the fdatasync: raft keeps the commit index volatile
//! (what was committed is learned again from the leader, and recovery raises
//! it to the applied index), and only new entries, terms and votes must
//! survive a power loss before a message depends on them (etcd syncs by
//! the same rule). A later synced round makes it durable with the rest.
//!
//! A segment starts with a Header so that older segments can be deleted once
//! every entry they hold is durably applied (see [`Wal::release_through`]);
//! the newest Header plus later Rounds always carry each shard's latest hard
//! state.
//!
//! Segments are made ahead, filled with zeros and synced, on a thread of
//! their own (see [`Spare`]) once the active segment is a few megabytes in,
//! and renamed into place at rotation. Records written over zeros change no
//! file size, so a round's fdatasync writes only the data: on a file that
//! grows, ext4 without a journal also writes the inode, a second synchronous
//! write in every round (docs/benchmarks.md). When no spare is ready a
//! segment is made empty and grows, as on a fresh or idle node.
//!
//! Records and zeros go to the disk around the page cache, in whole 4 KiB
//! blocks (see [`SegmentWriter`]): a round's fdatasync then has no cache
//! pages to write back, only the disk's own cache to flush.
//!
//! Recovery reads the segments in order. A segment ends at its last byte or
//! at a record header of zeros (no record has length 0), after which only
//! zeros may follow. A bad record at the tail of the last segment is a write
//! the crash cut short (it was never acknowledged, since acknowledgements
//! wait for the fsync): the file is truncated there. A bad record anywhere
//! else, or anything but zeros after a segment's end, is corruption and
//! stops the node.

use bytes::Bytes;
use hamgam_directio::{AlignedBuffer, DIRECT_ALIGN, open_direct, write_direct_at};
use hamgam_types::{ShardId, limits};
use raft::eraftpb::{Entry, EntryType, HardState};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const RECORD_VERSION: u8 = 1;
const KIND_ROUND: u8 = 1;
const KIND_HEADER: u8 = 2;
const FRAME_HEADER_BYTES: usize = 8;
/// The segment being made ahead. Not a `.wal` name: replay never reads it.
const SPARE_NAME: &str = "next-segment.prep";
/// How far the active segment gets before the next one is made ahead: an
/// idle node, or a short test, writes no zeros.
const SPARE_AFTER_BYTES: u64 = 4 << 20;
/// Zeros go out in pieces of this size; the maker checks between pieces
/// whether the log closed.
const ZERO_PIECE_BYTES: usize = 1 << 20;
/// The maker syncs every this many pieces and pauses after each piece, so
/// that 64 MiB of zeros reach the disk a little at a time rather than as
/// one burst that the rounds' own fdatasyncs would queue behind.
const ZERO_PIECES_PER_SYNC: u64 = 4;
const ZERO_PIECE_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Errors of the WAL. All are fatal: the node cannot accept writes without it.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O failed on {path:?}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A record before the tail failed its checksum or does not parse.
    #[error("WAL corrupt in {path} at byte {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
}

/// What one shard writes in a round.
#[derive(Debug, Default, Clone)]
pub struct ShardWrite {
    pub hard_state: Option<HardState>,
    /// Contiguous; the first replaces any logged entry at its index and after.
    pub entries: Vec<Entry>,
}

/// Everything recovered for one shard.
#[derive(Debug, Default)]
pub struct RecoveredShard {
    pub hard_state: HardState,
    /// Contiguous entries in index order.
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
struct Segment {
    sequence: u64,
    path: PathBuf,
    /// Highest entry index this segment holds for each shard.
    max_index: BTreeMap<ShardId, u64>,
}

/// An open write-ahead log. Owned by the raft store loop.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    closed: Vec<Segment>,
    active: Segment,
    out: SegmentWriter,
    active_bytes: u64,
    /// Bytes appended since the last call to [`Wal::take_bytes_appended`].
    bytes_appended: u64,
    /// Latest hard state of every shard, for the next segment's header.
    hard_states: BTreeMap<ShardId, HardState>,
    fsyncs: u64,
    /// A record was written after the last fdatasync (a round that only
    /// moved commit indexes).
    unsynced: bool,
    spare: Spare,
    /// The active segment was made ahead (zeros past its records).
    active_made_ahead: bool,
}

/// The next segment, made ahead: `WAL_SEGMENT_BYTES_MAX` zeros, synced, by a
/// thread that [`Spare::start`] spawns and that ends when the file is made
/// or the log is dropped (which stops and joins it).
#[derive(Debug, Default)]
struct Spare {
    made: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    maker: Option<std::thread::JoinHandle<()>>,
}

impl Spare {
    /// Starts making the spare in `dir`, unless it is being made or made.
    fn start(&mut self, dir: &Path) {
        if self.maker.is_some() {
            return;
        }
        let (path, made, stop) = (spare_path(dir), self.made.clone(), self.stop.clone());
        let maker = std::thread::Builder::new().name("wal-spare".into()).spawn(move || match make_spare(&path, &stop) {
            Ok(true) => made.store(true, Ordering::Release),
            Ok(false) => {}
            // The next segment then grows as it is written, as without a spare.
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot make the next WAL segment ahead"),
        });
        match maker {
            Ok(maker) => self.maker = Some(maker),
            Err(error) => tracing::warn!(%error, "cannot start the WAL segment maker"),
        }
    }

    fn is_made(&self) -> bool {
        self.made.load(Ordering::Acquire)
    }

    /// The made spare's path, if one is ready; the next is started later.
    fn take(&mut self, dir: &Path) -> Option<PathBuf> {
        if !self.is_made() {
            // A maker that failed is started again once needed.
            if self.maker.as_ref().is_some_and(|maker| maker.is_finished()) {
                self.maker = None;
            }
            return None;
        }
        if let Some(maker) = self.maker.take() {
            let _ = maker.join();
        }
        self.made.store(false, Ordering::Release);
        Some(spare_path(dir))
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        // A maker left running could still be writing zeros into a file a
        // later log (reopened in this process) renames into place.
        self.stop.store(true, Ordering::Release);
        if let Some(maker) = self.maker.take() {
            let _ = maker.join();
        }
    }
}

/// Writes the spare; `Ok(false)` when stopped before it was whole. The
/// zeros go around the page cache, as the records written over them will.
fn make_spare(path: &Path, stop: &AtomicBool) -> std::io::Result<bool> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    let (file, _) = open_direct(&options, path)?;
    let zeros = AlignedBuffer::zeroed(ZERO_PIECE_BYTES);
    let mut pieces = 0u64;
    while pieces * (ZERO_PIECE_BYTES as u64) < limits::WAL_SEGMENT_BYTES_MAX {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        write_direct_at(&file, zeros.filled(), pieces * ZERO_PIECE_BYTES as u64)?;
        pieces += 1;
        if pieces.is_multiple_of(ZERO_PIECES_PER_SYNC) {
            file.sync_data()?;
        }
        std::thread::sleep(ZERO_PIECE_PAUSE);
    }
    file.sync_all()?;
    Ok(true)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{sequence:016x}.wal"))
}

fn spare_path(dir: &Path) -> PathBuf {
    dir.join(SPARE_NAME)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl Wal {
    /// Opens the log in `dir` (creating it), replays it and returns what each
    /// shard had. The log is then ready for appends.
    pub fn open(dir: &Path) -> Result<(Wal, BTreeMap<ShardId, RecoveredShard>), WalError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        // A spare left by a stopped node may be partly written: made anew.
        let leftover = spare_path(dir);
        match std::fs::remove_file(&leftover) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&leftover)(error)),
            _ => {}
        }
        let mut sequences: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else { continue };
            if let Ok(sequence) = u64::from_str_radix(stem, 16) {
                sequences.push(sequence);
            }
        }
        sequences.sort_unstable();

        let mut recovered: BTreeMap<ShardId, RecoveredShard> = BTreeMap::new();
        let mut segments = Vec::new();
        for (i, &sequence) in sequences.iter().enumerate() {
            let path = segment_path(dir, sequence);
            let is_last = i + 1 == sequences.len();
            let max_index = replay_segment(&path, is_last, &mut recovered)?;
            segments.push(Segment { sequence, path, max_index });
        }

        let hard_states = recovered.iter().map(|(shard, r)| (*shard, r.hard_state.clone())).collect();
        let next_sequence = segments.last().map_or(1, |s| s.sequence + 1);
        // Appends always go to a fresh segment after a restart: the old tail
        // may have been truncated, and a new header records the hard states.
        let (active, out) = create_segment(dir, next_sequence, None)?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            closed: segments,
            active,
            out,
            active_bytes: 0,
            bytes_appended: 0,
            hard_states,
            fsyncs: 0,
            unsynced: false,
            spare: Spare::default(),
            active_made_ahead: false,
        };
        wal.write_header()?;
        Ok((wal, recovered))
    }

    /// Appends one round for all shards and makes it durable with one
    /// fdatasync, unless all it changes is commit indexes (see the module
    /// note).
    pub fn append_round(&mut self, writes: &BTreeMap<ShardId, ShardWrite>) -> Result<(), WalError> {
        if writes.is_empty() {
            return Ok(());
        }
        let must_sync = writes.iter().any(|(shard, write)| {
            let vote_moved = write.hard_state.as_ref().is_some_and(|hs| {
                self.hard_states.get(shard).is_none_or(|last| last.term != hs.term || last.vote != hs.vote)
            });
            !write.entries.is_empty() || vote_moved
        });
        let mut body = Vec::with_capacity(256);
        body.push(RECORD_VERSION);
        body.push(KIND_ROUND);
        put_u32(&mut body, len_u32(writes.len()));
        for (shard, write) in writes {
            put_u32(&mut body, shard.0);
            match &write.hard_state {
                Some(hs) => {
                    body.push(1);
                    put_hard_state(&mut body, hs);
                    self.hard_states.insert(*shard, hs.clone());
                }
                None => body.push(0),
            }
            put_u32(&mut body, len_u32(write.entries.len()));
            for entry in &write.entries {
                put_entry(&mut body, entry);
            }
            if let Some(last) = write.entries.last() {
                let max = self.active.max_index.entry(*shard).or_insert(0);
                *max = (*max).max(last.index);
            }
        }
        self.write_record(&body)?;
        if must_sync {
            self.sync()?;
        } else {
            self.unsynced = true;
        }
        // A segment that grows costs every round a second write: leave it as
        // soon as one made ahead is ready (the first after a start).
        if self.active_bytes >= limits::WAL_SEGMENT_BYTES_MAX || (!self.active_made_ahead && self.spare.is_made()) {
            self.rotate()?;
        }
        Ok(())
    }

    /// Stops tracking `shard`: this node no longer hosts it and its state was
    /// reset to empty (applied index 0), so its logged entries block no
    /// segment's release and its hard state leaves the next header. Entries
    /// still on disk are ignored at recovery, being after no applied state
    /// they continue (see `ShardLog::recover`).
    pub fn forget_shard(&mut self, shard: ShardId) {
        self.hard_states.remove(&shard);
        self.active.max_index.remove(&shard);
        for segment in &mut self.closed {
            segment.max_index.remove(&shard);
        }
    }

    /// Deletes closed segments whose every entry is at or below the durably
    /// applied index of its shard. Call only with indexes whose state is
    /// durable on disk (after a checkpoint). The active segment is closed
    /// first if it holds entries, so it can go in the same release.
    pub fn release_through(&mut self, durable_applied: &BTreeMap<ShardId, u64>) -> Result<usize, WalError> {
        if !self.active.max_index.is_empty() {
            self.rotate()?;
        }
        let mut released = 0;
        let mut kept = Vec::with_capacity(self.closed.len());
        for segment in std::mem::take(&mut self.closed) {
            let covered = segment
                .max_index
                .iter()
                .all(|(shard, max)| durable_applied.get(shard).is_some_and(|applied| applied >= max));
            if covered {
                std::fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
                released += 1;
            } else {
                kept.push(segment);
            }
        }
        self.closed = kept;
        if released > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(released)
    }

    /// Bytes appended since the last call (drives checkpoints).
    pub fn take_bytes_appended(&mut self) -> u64 {
        std::mem::take(&mut self.bytes_appended)
    }

    /// fdatasync calls made since the log was opened.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// Segment files on disk, the active one included.
    pub fn segment_count(&self) -> usize {
        self.closed.len() + 1
    }

    fn sync(&mut self) -> Result<(), WalError> {
        self.out.file.sync_data().map_err(io_err(&self.active.path))?;
        self.fsyncs += 1;
        self.unsynced = false;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), WalError> {
        // Only the last segment may end in a torn record.
        if self.unsynced {
            self.sync()?;
        }
        let spare = self.spare.take(&self.dir);
        self.active_made_ahead = spare.is_some();
        let (segment, out) = create_segment(&self.dir, self.active.sequence + 1, spare)?;
        let old = std::mem::replace(&mut self.active, segment);
        self.out = out;
        self.active_bytes = 0;
        self.closed.push(old);
        self.write_header()
    }

    fn write_header(&mut self) -> Result<(), WalError> {
        let mut body = vec![RECORD_VERSION, KIND_HEADER];
        put_u32(&mut body, len_u32(self.hard_states.len()));
        for (shard, hs) in &self.hard_states {
            put_u32(&mut body, shard.0);
            put_hard_state(&mut body, hs);
        }
        self.write_record(&body)?;
        self.sync()?;
        Ok(())
    }

    fn write_record(&mut self, body: &[u8]) -> Result<(), WalError> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header[..4].copy_from_slice(&len_u32(body.len()).to_le_bytes());
        header[4..].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
        self.out.append(&[&header, body]).map_err(io_err(&self.active.path))?;
        let written = (FRAME_HEADER_BYTES + body.len()) as u64;
        self.active_bytes += written;
        self.bytes_appended += written;
        if self.active_bytes >= SPARE_AFTER_BYTES {
            self.spare.start(&self.dir);
        }
        Ok(())
    }
}

/// Makes segment `sequence`: the spare renamed into place if one is given,
/// else an empty file. Either way the directory is synced before any
/// record is written, so no acknowledged record can sit under a name a
/// crash forgets.
fn create_segment(dir: &Path, sequence: u64, spare: Option<PathBuf>) -> Result<(Segment, SegmentWriter), WalError> {
    let path = segment_path(dir, sequence);
    let mut options = OpenOptions::new();
    options.write(true);
    match spare {
        Some(spare) => {
            if path.exists() {
                let exists = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
                return Err(io_err(&path)(exists));
            }
            std::fs::rename(&spare, &path).map_err(io_err(&path))?;
        }
        None => {
            options.create_new(true);
        }
    }
    let out = SegmentWriter::open(&options, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok((Segment { sequence, path, max_index: BTreeMap::new() }, out))
}

/// The writer's buffer goes back to this size after a round that needed
/// more, so one large round does not keep its memory.
const WRITER_BUFFER_KEPT_BYTES: usize = 256 << 10;

/// Appends records to the active segment around the page cache
/// (`O_DIRECT`). A round's bytes go from this buffer to the disk: no cache
/// pages are taken, filled and later written back by the fdatasync, which
/// then has only the disk's cache to flush. Direct writes cover whole 4 KiB
/// blocks, so the buffer keeps the segment's last, partly filled block and
/// writes it again, with the next record after it, in the next round. The
/// bytes already on disk in that block are written unchanged, so a write
/// the crash cuts short cannot damage an acknowledged record; the zeros
/// after the new record are what replay takes as the segment's end.
///
/// A file system that refuses direct I/O (see `hamgam_directio`) gets
/// ordinary writes at the same offsets, through the page cache.
#[derive(Debug)]
struct SegmentWriter {
    file: File,
    /// The segment's unfinished last block (then, during an append, the
    /// record being written).
    buffer: AlignedBuffer,
    /// File offset of the buffer's first byte (a multiple of 4 KiB).
    offset: u64,
}

impl SegmentWriter {
    fn open(options: &OpenOptions, path: &Path) -> std::io::Result<SegmentWriter> {
        let (file, _) = open_direct(options, path)?;
        Ok(SegmentWriter { file, buffer: AlignedBuffer::new(WRITER_BUFFER_KEPT_BYTES), offset: 0 })
    }

    /// Appends `parts`, one after the other, at the end of the segment.
    fn append(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        for part in parts {
            self.buffer.extend(part);
        }
        write_direct_at(&self.file, self.buffer.padded(), self.offset)?;
        // Keep the unfinished last block for the next append.
        let whole = self.buffer.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        self.buffer.discard_front(whole);
        self.offset += whole as u64;
        self.buffer.shrink_to(WRITER_BUFFER_KEPT_BYTES);
        Ok(())
    }
}

/// Replays one segment into `recovered`; returns the highest index per shard.
fn replay_segment(
    path: &Path,
    is_last: bool,
    recovered: &mut BTreeMap<ShardId, RecoveredShard>,
) -> Result<BTreeMap<ShardId, u64>, WalError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let mut max_index = BTreeMap::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        // A segment made ahead is zeros after its last record.
        let parsed = if rest[..rest.len().min(FRAME_HEADER_BYTES)].iter().all(|b| *b == 0) {
            if rest.iter().all(|b| *b == 0) {
                break;
            }
            Err("bytes other than zeros after the segment's last record".to_string())
        } else {
            parse_record(rest)
        };
        match parsed {
            Ok((body, used)) => {
                apply_record(body, recovered, &mut max_index).map_err(|reason| WalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: offset as u64,
                    reason,
                })?;
                offset += used;
            }
            Err(reason) if is_last => {
                tracing::warn!(path = %path.display(), offset, %reason, "truncating a torn WAL tail");
                let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
                file.set_len(offset as u64).map_err(io_err(path))?;
                file.sync_all().map_err(io_err(path))?;
                break;
            }
            Err(reason) => {
                return Err(WalError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason });
            }
        }
    }
    Ok(max_index)
}

/// Splits one framed record off the front of `bytes`: (body, bytes used).
fn parse_record(bytes: &[u8]) -> Result<(&[u8], usize), String> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err("record header cut short".into());
    }
    let length = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if length > limits::WAL_RECORD_BYTES_MAX {
        return Err(format!("record length {length} over the limit"));
    }
    let end = FRAME_HEADER_BYTES + length as usize;
    if bytes.len() < end {
        return Err("record body cut short".into());
    }
    let body = &bytes[FRAME_HEADER_BYTES..end];
    if crc32fast::hash(body) != crc {
        return Err("record checksum mismatch".into());
    }
    Ok((body, end))
}

fn apply_record(
    body: &[u8],
    recovered: &mut BTreeMap<ShardId, RecoveredShard>,
    max_index: &mut BTreeMap<ShardId, u64>,
) -> Result<(), String> {
    let mut reader = Reader { bytes: body };
    let version = reader.u8()?;
    if version != RECORD_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    match reader.u8()? {
        KIND_HEADER => {
            for _ in 0..reader.u32()? {
                let shard = ShardId(reader.u32()?);
                let hs = reader.hard_state()?;
                recovered.entry(shard).or_default().hard_state = hs;
            }
        }
        KIND_ROUND => {
            for _ in 0..reader.u32()? {
                let shard = ShardId(reader.u32()?);
                let state = recovered.entry(shard).or_default();
                if reader.u8()? == 1 {
                    state.hard_state = reader.hard_state()?;
                }
                let count = reader.u32()?;
                for i in 0..count {
                    let entry = reader.entry()?;
                    if i == 0 {
                        // Raft may overwrite an uncommitted suffix: drop
                        // everything from this index on before appending.
                        state.entries.retain(|e| e.index < entry.index);
                        if let Some(last) = state.entries.last()
                            && last.index + 1 != entry.index
                        {
                            // A gap is fine only at the start of what we
                            // kept (older entries were released).
                            state.entries.clear();
                        }
                    }
                    let max = max_index.entry(shard).or_insert(0);
                    *max = (*max).max(entry.index);
                    state.entries.push(entry);
                }
            }
        }
        other => return Err(format!("unknown record kind {other}")),
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} trailing bytes in record", reader.bytes.len()));
    }
    Ok(())
}

fn len_u32(n: usize) -> u32 {
    // Every count and length written here is bounded far below 4 GiB by
    // `limits` (entries per round, entry bytes); a larger one is a bug.
    u32::try_from(n).unwrap_or_else(|_| panic!("WAL field of {n} does not fit in u32"))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, len_u32(bytes.len()));
    out.extend_from_slice(bytes);
}

fn put_hard_state(out: &mut Vec<u8>, hs: &HardState) {
    put_u64(out, hs.term);
    put_u64(out, hs.vote);
    put_u64(out, hs.commit);
}

fn put_entry(out: &mut Vec<u8>, entry: &Entry) {
    put_u64(out, entry.index);
    put_u64(out, entry.term);
    out.push(match entry.get_entry_type() {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    });
    put_bytes(out, &entry.data);
    put_bytes(out, &entry.context);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.bytes.len() < n {
            return Err("record body shorter than its fields".into());
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<Bytes, String> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }

    fn hard_state(&mut self) -> Result<HardState, String> {
        let (term, vote, commit) = (self.u64()?, self.u64()?, self.u64()?);
        Ok(HardState { term, vote, commit, ..Default::default() })
    }

    fn entry(&mut self) -> Result<Entry, String> {
        let (index, term) = (self.u64()?, self.u64()?);
        let mut entry = Entry { index, term, ..Default::default() };
        entry.set_entry_type(match self.u8()? {
            0 => EntryType::EntryNormal,
            1 => EntryType::EntryConfChange,
            2 => EntryType::EntryConfChangeV2,
            other => return Err(format!("unknown entry type {other}")),
        });
        entry.data = self.bytes()?;
        entry.context = self.bytes()?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = Bytes::copy_from_slice(data);
        e
    }

    fn round(shard: u32, entries: Vec<Entry>, commit: u64) -> BTreeMap<ShardId, ShardWrite> {
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = commit;
        BTreeMap::from([(ShardId(shard), ShardWrite { hard_state: Some(hs), entries })])
    }

    #[test]
    fn replays_entries_hard_state_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, recovered) = Wal::open(dir.path()).unwrap();
            assert!(recovered.is_empty());
            wal.append_round(&round(1, vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")], 1)).unwrap();
            // A new leader overwrites 3 and appends 4.
            wal.append_round(&round(1, vec![entry(3, 2, b"C"), entry(4, 2, b"d")], 2)).unwrap();
            wal.append_round(&round(2, vec![entry(1, 1, b"x")], 1)).unwrap();
        }
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        let one = &recovered[&ShardId(1)];
        let got: Vec<_> = one.entries.iter().map(|e| (e.index, e.term, e.data.to_vec())).collect();
        assert_eq!(got, vec![(1, 1, b"a".to_vec()), (2, 1, b"b".to_vec()), (3, 2, b"C".to_vec()), (4, 2, b"d".to_vec())]);
        assert_eq!(one.hard_state.commit, 2);
        assert_eq!(recovered[&ShardId(2)].entries.len(), 1);
    }

    #[test]
    fn a_round_that_only_moves_commit_indexes_is_written_without_an_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            let opened = wal.fsyncs();
            wal.append_round(&round(1, vec![entry(1, 1, b"a")], 0)).unwrap();
            assert_eq!(wal.fsyncs(), opened + 1, "new entries are synced");
            wal.append_round(&round(1, Vec::new(), 1)).unwrap();
            assert_eq!(wal.fsyncs(), opened + 1, "a commit index alone is not");
            let mut voted = round(1, Vec::new(), 1);
            voted.get_mut(&ShardId(1)).unwrap().hard_state.as_mut().unwrap().vote = 2;
            wal.append_round(&voted).unwrap();
            assert_eq!(wal.fsyncs(), opened + 2, "a vote is synced");
            let mut new_term = round(2, Vec::new(), 0);
            new_term.get_mut(&ShardId(2)).unwrap().hard_state.as_mut().unwrap().term = 3;
            wal.append_round(&new_term).unwrap();
            assert_eq!(wal.fsyncs(), opened + 3, "a term is synced, for a shard first seen too");
            voted.get_mut(&ShardId(1)).unwrap().hard_state.as_mut().unwrap().commit = 2;
            wal.append_round(&voted).unwrap();
            assert_eq!(wal.fsyncs(), opened + 3, "the same vote, a new commit index: not synced");
        }
        // Written all the same: a process that dies keeps it in the page cache.
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        assert_eq!(recovered[&ShardId(1)].hard_state.commit, 2);
        assert_eq!(recovered[&ShardId(1)].hard_state.vote, 2);
    }

    #[test]
    fn records_of_any_size_go_out_in_whole_blocks_and_replay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [1usize, 4000, 4096, 5000, 3 << 20, 7, 70_000];
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            for (i, &size) in sizes.iter().enumerate() {
                let data = vec![i as u8 + 1; size];
                wal.append_round(&round(1, vec![entry(i as u64 + 1, 1, &data)], 0)).unwrap();
                let file_bytes = std::fs::metadata(&wal.active.path).unwrap().len();
                assert_eq!(file_bytes % DIRECT_ALIGN as u64, 0, "whole blocks after a record of {size} bytes");
                assert_eq!(file_bytes, wal.active_bytes.next_multiple_of(DIRECT_ALIGN as u64));
                let kept = WRITER_BUFFER_KEPT_BYTES;
                assert!(wal.out.buffer.capacity() <= kept, "a large round's buffer is let go");
            }
            let bytes = std::fs::read(&wal.active.path).unwrap();
            assert!(bytes[wal.active_bytes as usize..].iter().all(|&b| b == 0), "zeros after the last record");
        }
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        let entries = &recovered[&ShardId(1)].entries;
        assert_eq!(entries.len(), sizes.len());
        for (i, (entry, &size)) in entries.iter().zip(&sizes).enumerate() {
            assert_eq!(entry.index, i as u64 + 1);
            assert!(entry.data.len() == size && entry.data.iter().all(|&b| b == i as u8 + 1), "entry {i} whole");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_and_earlier_rounds_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (path, end);
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            wal.append_round(&round(1, vec![entry(1, 1, b"kept")], 1)).unwrap();
            wal.append_round(&round(1, vec![entry(2, 1, b"torn")], 2)).unwrap();
            path = wal.active.path.clone();
            end = wal.active_bytes;
        }
        // Cut the last record in half, as a crash mid-write would (the
        // file itself ends at a block boundary, past zeros).
        OpenOptions::new().write(true).open(&path).unwrap().set_len(end - 7).unwrap();
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        let entries = &recovered[&ShardId(1)].entries;
        assert_eq!(entries.len(), 1);
        assert_eq!(&entries[0].data[..], b"kept");
    }

    #[test]
    fn corruption_before_the_tail_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            wal.append_round(&round(1, vec![entry(1, 1, b"payload")], 1)).unwrap();
            first = wal.active.path.clone();
        }
        {
            // A second open starts a new segment, so the first is no longer the tail.
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            wal.append_round(&round(1, vec![entry(2, 1, b"more")], 2)).unwrap();
        }
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        assert!(matches!(Wal::open(dir.path()), Err(WalError::Corrupt { .. })));
    }

    /// Writes rounds of 1 MiB entries to shard 1 from index `first` until the
    /// log has moved to a segment made ahead, and returns the next index.
    fn write_until_on_a_segment_made_ahead(wal: &mut Wal, first: u64) -> u64 {
        let mut index = first;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !wal.active_made_ahead {
            assert!(std::time::Instant::now() < deadline, "no segment was made ahead");
            // Past the point where the spare is started, a round is written
            // only once it is made: that round moves the log onto it.
            if wal.active_bytes < 2 * SPARE_AFTER_BYTES || wal.spare.is_made() {
                wal.append_round(&round(1, vec![entry(index, 1, &vec![index as u8; 1 << 20])], index)).unwrap();
                index += 1;
            } else {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        index
    }

    #[test]
    fn a_segment_made_ahead_is_used_and_replays_up_to_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let next;
        let prepared;
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            let growing = wal.active.path.clone();
            next = write_until_on_a_segment_made_ahead(&mut wal, 1);
            assert_ne!(wal.active.path, growing);
            prepared = wal.active.path.clone();
            assert!(!spare_path(dir.path()).exists(), "renamed into place");
            wal.append_round(&round(1, vec![entry(next, 1, b"over zeros")], next)).unwrap();
            // Written over, not grown.
            assert_eq!(std::fs::metadata(&prepared).unwrap().len(), limits::WAL_SEGMENT_BYTES_MAX);
        }
        let check = |recovered: &BTreeMap<ShardId, RecoveredShard>| {
            let one = &recovered[&ShardId(1)];
            assert_eq!(one.entries.len() as u64, next, "every entry, the last one over zeros");
            assert_eq!(&one.entries.last().unwrap().data[..], b"over zeros");
            assert_eq!(one.hard_state.commit, next);
        };
        // Replayed as the last segment, then (after a reopen made a newer one) as a closed one.
        check(&Wal::open(dir.path()).unwrap().1);
        check(&Wal::open(dir.path()).unwrap().1);
        assert_eq!(std::fs::metadata(&prepared).unwrap().len(), limits::WAL_SEGMENT_BYTES_MAX);

        // Anything but zeros after a closed segment's records is corruption.
        let file = OpenOptions::new().write(true).open(&prepared).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"stray", 40 << 20).unwrap();
        assert!(matches!(Wal::open(dir.path()), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn a_torn_record_over_zeros_is_cut_and_a_leftover_spare_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (prepared, at);
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            let next = write_until_on_a_segment_made_ahead(&mut wal, 1);
            wal.append_round(&round(1, vec![entry(next, 1, b"kept")], next)).unwrap();
            at = wal.active_bytes;
            wal.append_round(&round(1, vec![entry(next + 1, 1, b"torn")], next + 1)).unwrap();
            prepared = wal.active.path.clone();
        }
        // The crash kept the torn record's body but not its header.
        let file = OpenOptions::new().write(true).open(&prepared).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0; FRAME_HEADER_BYTES], at).unwrap();
        std::fs::write(spare_path(dir.path()), b"half made").unwrap();
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        assert_eq!(&recovered[&ShardId(1)].entries.last().unwrap().data[..], b"kept");
        assert!(!spare_path(dir.path()).exists(), "a spare left by a stopped node is made anew");
    }

    #[test]
    fn released_segments_are_deleted_and_hard_state_survives() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            wal.append_round(&round(1, vec![entry(1, 1, b"a"), entry(2, 1, b"b")], 2)).unwrap();
            // Only entry 1 is durable: the segment holding entry 2 stays.
            assert_eq!(wal.release_through(&BTreeMap::from([(ShardId(1), 1)])).unwrap(), 0);
            assert_eq!(wal.segment_count(), 2);
            // Entry 2 of shard 1 is durably applied: the closed segment goes.
            assert_eq!(wal.release_through(&BTreeMap::from([(ShardId(1), 2)])).unwrap(), 1);
            assert_eq!(wal.segment_count(), 1);
        }
        let (_wal, recovered) = Wal::open(dir.path()).unwrap();
        let one = &recovered[&ShardId(1)];
        assert!(one.entries.is_empty());
        assert_eq!(one.hard_state.commit, 2, "the new segment's header carries the hard state");
    }
}
