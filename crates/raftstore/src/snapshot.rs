//! Snapshot files: a shard's state travels as a file, never as one buffer.
//!
//! A raft snapshot message carries only a [`SnapshotRef`] (length, record
//! count and blake3 hash of the file); the state itself is written to a file
//! by the apply thread of the leader's node, read from there by the
//! transport in pieces, written in pieces to a file on the receiving node
//! (checked against the reference before raft ever sees the message), and
//! installed from that file in bounded batches. So neither node holds a
//! shard's state in memory, whatever its size up to
//! [`limits::SNAPSHOT_BYTES_MAX`].
//!
//! File format: records `key length (u32 LE) | key | value length (u32 LE) |
//! value`, keys relative to the shard's state-machine prefix, in key order.
//! Names: `made-{shard}-{index}-{term}.snap` for one this node made,
//! `received-{shard}-{index}-{term}.snap` for one it received; `.part` while
//! being written.

use hamgam_types::{ShardId, limits};
use raft::eraftpb::Message;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const REF_VERSION: u8 = 1;
pub(crate) const REF_BYTES: usize = 1 + 8 + 8 + 32;
/// Bound on one key or value, checked before allocating: far above any
/// record the state machine writes, so only a damaged file reaches it.
const RECORD_PART_BYTES_MAX: usize = 64 << 20;

/// One key and its value, relative to the shard's state-machine prefix.
pub(crate) type Record = (Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a snapshot message, or its reference is damaged: {0}")]
    BadRef(String),
    #[error("a snapshot of {0} bytes is over the limit of {max} bytes", max = limits::SNAPSHOT_BYTES_MAX)]
    TooLarge(u64),
    #[error("snapshot file {path} does not match its reference: {reason}")]
    Mismatch { path: String, reason: String },
    #[error("reading the shard for a snapshot: {0}")]
    Database(#[from] hamgam_storage::StorageError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.display().to_string(), source }
}

/// What a snapshot message carries in place of the shard's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRef {
    pub bytes: u64,
    pub keys: u64,
    pub hash: [u8; 32],
}

impl SnapshotRef {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REF_BYTES);
        out.push(REF_VERSION);
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out.extend_from_slice(&self.keys.to_le_bytes());
        out.extend_from_slice(&self.hash);
        out
    }

    pub fn decode(data: &[u8]) -> Result<SnapshotRef, SnapshotError> {
        if data.len() != REF_BYTES || data[0] != REF_VERSION {
            return Err(SnapshotError::BadRef(format!("{} bytes, version {:?}", data.len(), data.first())));
        }
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or_default());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&data[17..49]);
        Ok(SnapshotRef { bytes: u64_at(1), keys: u64_at(9), hash })
    }

    /// The reference a snapshot message carries, and the point it is of.
    pub fn of_message(message: &Message) -> Result<(SnapshotRef, u64, u64), SnapshotError> {
        let snapshot = message.get_snapshot();
        let meta = snapshot.get_metadata();
        if meta.index == 0 {
            return Err(SnapshotError::BadRef("the message holds no snapshot".into()));
        }
        Ok((SnapshotRef::decode(&snapshot.data)?, meta.index, meta.term))
    }
}

pub(crate) fn made_path(dir: &Path, shard: ShardId, index: u64, term: u64) -> PathBuf {
    dir.join(format!("made-{}-{index}-{term}.snap", shard.0))
}

pub(crate) fn received_path(dir: &Path, shard: ShardId, index: u64, term: u64) -> PathBuf {
    dir.join(format!("received-{}-{index}-{term}.snap", shard.0))
}

/// A name of its own for each file being written, so two transfers of the
/// same snapshot never write into one file.
fn part_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_extension(format!("snap.{n}.part"))
}

/// Removes this shard's finished files of one kind (`made` or `received`)
/// at or below `index`, other than `keep`. A transfer still reading one
/// keeps its open file; files being written (`.part`) are left alone.
pub(crate) fn remove_older(dir: &Path, kind: &str, shard: ShardId, index: u64, keep: &Path) {
    let prefix = format!("{kind}-{}-", shard.0);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(point) = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".snap")) else { continue };
        let older = point.split('-').next().and_then(|i| i.parse::<u64>().ok()).is_some_and(|i| i <= index);
        if older && path != keep {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Creates the directory if need be and a `.part` file of its own for `path`.
fn create_part(path: &Path) -> Result<(PathBuf, BufWriter<File>), SnapshotError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let part = part_path(path);
    let file = File::create(&part).map_err(io_error(&part))?;
    Ok((part, BufWriter::with_capacity(1 << 20, file)))
}

/// Writes `path` durably: syncs the file, renames it into place from its
/// `.part` name, syncs the directory.
fn seal(file: BufWriter<File>, part: &Path, path: &Path) -> Result<(), SnapshotError> {
    let file = file.into_inner().map_err(|e| io_error(part)(e.into_error()))?;
    file.sync_all().map_err(io_error(part))?;
    std::fs::rename(part, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    }
    Ok(())
}

/// Writes the records of a snapshot being made.
pub(crate) struct SnapshotWriter {
    path: PathBuf,
    part: PathBuf,
    file: BufWriter<File>,
    hasher: blake3::Hasher,
    bytes: u64,
    keys: u64,
}

impl SnapshotWriter {
    pub(crate) fn create(path: PathBuf) -> Result<SnapshotWriter, SnapshotError> {
        let (part, file) = create_part(&path)?;
        Ok(SnapshotWriter { path, part, file, hasher: blake3::Hasher::new(), bytes: 0, keys: 0 })
    }

    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), SnapshotError> {
        let mut write = |bytes: &[u8]| -> Result<(), SnapshotError> {
            self.hasher.update(bytes);
            self.bytes += bytes.len() as u64;
            self.file.write_all(bytes).map_err(io_error(&self.part))
        };
        write(&(key.len() as u32).to_le_bytes())?;
        write(key)?;
        write(&(value.len() as u32).to_le_bytes())?;
        write(value)?;
        self.keys += 1;
        if self.bytes > limits::SNAPSHOT_BYTES_MAX {
            return Err(SnapshotError::TooLarge(self.bytes));
        }
        Ok(())
    }

    /// Makes the file durable under its final name and returns its reference.
    pub(crate) fn finish(self) -> Result<SnapshotRef, SnapshotError> {
        let reference = SnapshotRef { bytes: self.bytes, keys: self.keys, hash: *self.hasher.finalize().as_bytes() };
        seal(self.file, &self.part, &self.path)?;
        Ok(reference)
    }
}

/// The records of a snapshot file, checked against its reference as they
/// are read: a record cut short, one too many or too few, or a hash that
/// differs at the end is an error.
pub(crate) struct SnapshotRecords {
    path: PathBuf,
    file: BufReader<File>,
    expected: SnapshotRef,
    hasher: blake3::Hasher,
    keys_read: u64,
    bytes_read: u64,
}

impl SnapshotRecords {
    pub(crate) fn open(path: &Path, expected: SnapshotRef) -> Result<SnapshotRecords, SnapshotError> {
        let file = File::open(path).map_err(io_error(path))?;
        Ok(SnapshotRecords {
            path: path.to_path_buf(),
            file: BufReader::with_capacity(1 << 20, file),
            expected,
            hasher: blake3::Hasher::new(),
            keys_read: 0,
            bytes_read: 0,
        })
    }

    fn mismatch(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Mismatch { path: self.path.display().to_string(), reason: reason.into() }
    }

    fn read_part(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len).map_err(|_| self.mismatch("a record is cut short"))?;
        let len_value = u32::from_le_bytes(len) as usize;
        if len_value > RECORD_PART_BYTES_MAX {
            return Err(self.mismatch(format!("a record part of {len_value} bytes")));
        }
        let mut bytes = vec![0u8; len_value];
        self.file.read_exact(&mut bytes).map_err(|_| self.mismatch("a record is cut short"))?;
        self.hasher.update(&len);
        self.hasher.update(&bytes);
        self.bytes_read += 4 + len_value as u64;
        Ok(bytes)
    }

    /// The next record, or `None` after the last one, once the whole file
    /// has been checked.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, SnapshotError> {
        if self.keys_read == self.expected.keys {
            let mut extra = [0u8; 1];
            let at_end = matches!(self.file.read(&mut extra), Ok(0));
            let whole = at_end && self.bytes_read == self.expected.bytes;
            if !whole || *self.hasher.finalize().as_bytes() != self.expected.hash {
                return Err(self.mismatch("its length or hash differs"));
            }
            return Ok(None);
        }
        let key = self.read_part()?;
        let value = self.read_part()?;
        self.keys_read += 1;
        Ok(Some((key, value)))
    }
}

/// A snapshot this node made, opened for a transport to send: read it in
/// pieces, `len` bytes in all.
#[derive(Debug)]
pub struct OutgoingSnapshot {
    pub(crate) file: File,
    pub len: u64,
}

impl Read for OutgoingSnapshot {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

/// A snapshot arriving from a leader: written as it comes, checked and kept
/// by [`IncomingSnapshot::finish`]. Until then it is only a `.part` file,
/// removed if the transfer is dropped (and by the next start after a crash).
#[derive(Debug)]
pub struct IncomingSnapshot {
    path: PathBuf,
    part: PathBuf,
    /// `None` once finished.
    file: Option<BufWriter<File>>,
    hasher: blake3::Hasher,
    expected: SnapshotRef,
    written: u64,
}

impl IncomingSnapshot {
    pub(crate) fn create(path: PathBuf, expected: SnapshotRef) -> Result<IncomingSnapshot, SnapshotError> {
        if expected.bytes > limits::SNAPSHOT_BYTES_MAX {
            return Err(SnapshotError::TooLarge(expected.bytes));
        }
        let (part, file) = create_part(&path)?;
        Ok(IncomingSnapshot { path, part, file: Some(file), hasher: blake3::Hasher::new(), expected, written: 0 })
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.expected.bytes - self.written
    }

    /// Writes the next piece; refuses bytes beyond the declared length.
    pub fn write(&mut self, piece: &[u8]) -> Result<(), SnapshotError> {
        if piece.len() as u64 > self.remaining() {
            return Err(self.mismatch(format!("more than the {} bytes declared", self.expected.bytes)));
        }
        let Some(file) = self.file.as_mut() else { return Err(self.mismatch("written after it was finished")) };
        self.hasher.update(piece);
        self.written += piece.len() as u64;
        file.write_all(piece).map_err(io_error(&self.part))
    }

    fn mismatch(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Mismatch { path: self.part.display().to_string(), reason: reason.into() }
    }

    /// Checks length and hash, then keeps the file durably under its final
    /// name; after this the snapshot message may be stepped.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        if self.written != self.expected.bytes || *self.hasher.finalize().as_bytes() != self.expected.hash {
            return Err(self.mismatch("its length or hash differs from the reference"));
        }
        let Some(file) = self.file.take() else { return Err(self.mismatch("finished twice")) };
        let sealed = seal(file, &self.part, &self.path);
        if sealed.is_err() {
            let _ = std::fs::remove_file(&self.part);
        }
        sealed
    }
}

impl Drop for IncomingSnapshot {
    /// A transfer dropped before it finished leaves nothing behind.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(dir: &Path, records: &[(&[u8], &[u8])]) -> (PathBuf, SnapshotRef) {
        let path = made_path(dir, ShardId(3), 10, 2);
        let mut writer = SnapshotWriter::create(path.clone()).unwrap();
        for (key, value) in records {
            writer.put(key, value).unwrap();
        }
        (path, writer.finish().unwrap())
    }

    fn read_all(path: &Path, reference: SnapshotRef) -> Result<Vec<Record>, SnapshotError> {
        let mut records = SnapshotRecords::open(path, reference)?;
        let mut out = Vec::new();
        while let Some(record) = records.next_record()? {
            out.push(record);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_through_a_file_and_a_transfer_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"b", b""), ("کلید".as_bytes(), &[7u8; 5000])];
        let (path, reference) = made(dir.path(), &records);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![path.file_name().unwrap().to_owned()], "no part file is left");
        assert_eq!(SnapshotRef::decode(&reference.encode()).unwrap(), reference);
        let expected: Vec<(Vec<u8>, Vec<u8>)> = records.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(read_all(&path, reference).unwrap(), expected);

        // Sent in small pieces, received, checked and installed from the copy.
        let received = received_path(dir.path(), ShardId(3), 10, 2);
        let mut outgoing = OutgoingSnapshot { file: File::open(&path).unwrap(), len: reference.bytes };
        let mut incoming = IncomingSnapshot::create(received.clone(), reference).unwrap();
        let mut piece = [0u8; 333];
        loop {
            let n = outgoing.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            incoming.write(&piece[..n]).unwrap();
        }
        assert_eq!(incoming.remaining(), 0);
        incoming.finish().unwrap();
        assert_eq!(read_all(&received, reference).unwrap(), expected);
    }

    #[test]
    fn a_damaged_transfer_or_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, reference) = made(dir.path(), &[(b"k1", b"v1"), (b"k2", b"v2")]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 1;

        // A flipped bit in transit: the hash differs, nothing is kept.
        let received = received_path(dir.path(), ShardId(3), 10, 2);
        let mut incoming = IncomingSnapshot::create(received.clone(), reference).unwrap();
        incoming.write(&bytes).unwrap();
        assert!(matches!(incoming.finish(), Err(SnapshotError::Mismatch { .. })));
        assert!(!received.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the made file is left");

        // More bytes than declared are refused as they arrive.
        let mut incoming = IncomingSnapshot::create(received.clone(), reference).unwrap();
        assert!(incoming.write(&[bytes.as_slice(), b"x"].concat()).is_err());
        // A transfer dropped half way leaves no file.
        incoming.write(&bytes[..3]).unwrap();
        drop(incoming);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the made file is left");

        // A declared size over the limit is refused before anything is written.
        let huge = SnapshotRef { bytes: limits::SNAPSHOT_BYTES_MAX + 1, ..reference };
        assert!(matches!(IncomingSnapshot::create(received.clone(), huge), Err(SnapshotError::TooLarge(_))));

        // On disk: a flipped bit, a cut tail or a huge record length.
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_all(&path, reference).is_err());
        let original = {
            bytes[5] ^= 1;
            bytes.clone()
        };
        std::fs::write(&path, &original[..original.len() - 1]).unwrap();
        assert!(read_all(&path, reference).is_err());
        let mut huge_record = original.clone();
        huge_record[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &huge_record).unwrap();
        assert!(read_all(&path, reference).is_err());
        std::fs::write(&path, &original).unwrap();
        assert_eq!(read_all(&path, reference).unwrap().len(), 2);
        assert!(SnapshotRef::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn older_files_of_a_shard_go_and_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |name: &str| std::fs::write(dir.path().join(name), b"").unwrap();
        for name in ["received-3-5-1.snap", "received-3-9-2.snap", "received-3-12-2.snap", "received-3-4-1.snap.0.part"]
        {
            touch(name);
        }
        touch("received-30-1-1.snap");
        touch("made-3-1-1.snap");
        let keep = received_path(dir.path(), ShardId(3), 9, 2);
        remove_older(dir.path(), "received", ShardId(3), 9, &keep);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "made-3-1-1.snap",
                "received-3-12-2.snap",
                "received-3-4-1.snap.0.part",
                "received-3-9-2.snap",
                "received-30-1-1.snap"
            ]
        );
    }
}
