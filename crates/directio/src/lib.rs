//! Writing files around the page cache (`O_DIRECT`): a buffer whose bytes
//! start on a block boundary ([`AlignedBuffer`]), opening a file for direct
//! writes ([`open_direct`]) and writing to it ([`write_direct_at`]), each
//! with the way back to ordinary writes when a file system refuses direct
//! I/O. The WAL's segments and large restored files are written this way:
//! their bytes go from the writer's buffer to the disk, with no cache page
//! taken, filled and later written back.
//!
//! This crate knows nothing of what is written. It forbids unsafe code, so
//! the buffer's alignment comes from starting inside a larger `Vec`.

use std::fs::{File, OpenOptions};
use std::path::Path;

/// Alignment of a direct write's buffer, offset and length: the block size
/// of the file systems in use (ext4, xfs and btrfs at 4 KiB).
pub const DIRECT_ALIGN: usize = 4096;

/// Bytes starting on a [`DIRECT_ALIGN`] boundary in memory, with a capacity
/// that is a multiple of it, so that [`AlignedBuffer::padded`] always fits.
#[derive(Debug)]
pub struct AlignedBuffer {
    storage: Vec<u8>,
    /// Where the aligned bytes start in `storage`.
    start: usize,
    len: usize,
    capacity: usize,
}

impl AlignedBuffer {
    /// An empty buffer with room for `capacity` bytes (rounded up to a block).
    pub fn new(capacity: usize) -> AlignedBuffer {
        let mut buffer = AlignedBuffer { storage: Vec::new(), start: 0, len: 0, capacity: 0 };
        buffer.reallocate(capacity);
        buffer
    }

    /// A buffer holding `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuffer {
        let mut buffer = AlignedBuffer::new(len);
        buffer.len = len;
        buffer
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    pub fn filled(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Copies as much of `bytes` as fits without growing; returns how much.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let taken = bytes.len().min(self.capacity - self.len);
        let at = self.start + self.len;
        self.storage[at..at + taken].copy_from_slice(&bytes[..taken]);
        self.len += taken;
        taken
    }

    /// Appends all of `bytes`, growing the buffer if needed.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.capacity {
            self.reallocate((self.len + bytes.len()).max(2 * self.capacity));
        }
        self.fill(bytes);
    }

    /// The bytes held, followed by zeros up to the next block boundary.
    pub fn padded(&mut self) -> &[u8] {
        let end = self.start + self.len.next_multiple_of(DIRECT_ALIGN);
        self.storage[self.start + self.len..end].fill(0);
        &self.storage[self.start..end]
    }

    /// Drops the first `n` bytes held, keeping the rest at the start.
    pub fn discard_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.storage.copy_within(self.start + n..self.start + self.len, self.start);
        self.len -= n;
    }

    /// Gives back memory beyond `capacity` (never below what is held).
    pub fn shrink_to(&mut self, capacity: usize) {
        if self.capacity > capacity.next_multiple_of(DIRECT_ALIGN) {
            self.reallocate(capacity);
        }
    }

    /// New storage for `capacity` bytes (at least what is held), holding
    /// what the old held.
    fn reallocate(&mut self, capacity: usize) {
        let capacity = capacity.max(self.len).next_multiple_of(DIRECT_ALIGN);
        let mut storage = vec![0u8; capacity + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        storage[start..start + self.len].copy_from_slice(self.filled());
        *self = AlignedBuffer { storage, start, len: self.len, capacity };
    }
}

/// How a file system says no to direct I/O, at the open or at a write.
pub fn refuses_direct(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// Opens `path` with `options` for direct writes; a file system that
/// refuses them (at the open) gives an ordinary file. Returns the file and
/// whether it is direct.
pub fn open_direct(options: &OpenOptions, path: &Path) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut direct = options.clone();
    direct.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    match direct.open(path) {
        Ok(file) => Ok((file, true)),
        Err(error) if refuses_direct(&error) => Ok((options.open(path)?, false)),
        Err(error) => Err(error),
    }
}

/// Writes `bytes` at `offset` of a file opened for direct writes. A file
/// system that accepted the open but refuses the write (it wants another
/// alignment) gets the file as an ordinary one from then on.
pub fn write_direct_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match file.write_all_at(bytes, offset) {
        Err(error) if refuses_direct(&error) => {
            let flags = rustix::fs::fcntl_getfl(file)?;
            rustix::fs::fcntl_setfl(file, flags - rustix::fs::OFlags::DIRECT)?;
            file.write_all_at(bytes, offset)
        }
        outcome => outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_stays_aligned_as_it_grows_pads_with_zeros_and_shrinks() {
        let mut buffer = AlignedBuffer::new(5000);
        assert_eq!(buffer.capacity(), 2 * DIRECT_ALIGN);
        assert_eq!(buffer.fill(&[7u8; 9000]), 2 * DIRECT_ALIGN, "fill stops at the capacity");
        assert!(buffer.is_full());
        buffer.clear();
        buffer.extend(&[1u8; 100]);
        buffer.extend(&[2u8; 3 * DIRECT_ALIGN]);
        assert_eq!(buffer.filled().as_ptr() as usize % DIRECT_ALIGN, 0, "grown, still aligned");
        assert_eq!(buffer.len(), 100 + 3 * DIRECT_ALIGN);
        let padded = buffer.padded().to_vec();
        assert_eq!(padded.len(), 4 * DIRECT_ALIGN);
        assert!(padded[..100].iter().all(|&b| b == 1) && padded[100..100 + 3 * DIRECT_ALIGN].iter().all(|&b| b == 2));
        assert!(padded[100 + 3 * DIRECT_ALIGN..].iter().all(|&b| b == 0), "zeros after the bytes held, not the 7s");
        buffer.discard_front(3 * DIRECT_ALIGN);
        assert_eq!(buffer.len(), 100);
        assert!(buffer.filled().iter().all(|&b| b == 2));
        buffer.shrink_to(DIRECT_ALIGN);
        assert_eq!(buffer.capacity(), DIRECT_ALIGN);
        assert_eq!(buffer.filled(), &[2u8; 100][..]);
        assert_eq!(buffer.filled().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(AlignedBuffer::zeroed(3 * DIRECT_ALIGN).filled().iter().all(|&b| b == 0));
    }

    /// A new file opened for direct writes in a temporary folder (kept
    /// while the first value lives), and whether it is direct.
    fn new_direct_file() -> (tempfile::TempDir, std::path::PathBuf, File, bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        let (file, direct) = open_direct(&options, &path).unwrap();
        (dir, path, file, direct)
    }

    /// A write the file system refuses as direct (here: a length that is
    /// not a whole number of blocks, which ext4 and xfs refuse with EINVAL
    /// as a file system without direct I/O refuses every write) is made
    /// again as an ordinary one, and the file stays ordinary after. The
    /// temporary folder must be on such a file system (ext4 here; tmpfs
    /// takes any length).
    #[test]
    fn a_refused_direct_write_is_made_as_an_ordinary_one() {
        let (_dir, path, file, direct) = new_direct_file();
        let direct_flag = |file: &File| rustix::fs::fcntl_getfl(file).unwrap().contains(rustix::fs::OFlags::DIRECT);
        assert_eq!(direct_flag(&file), direct);
        let mut buffer = AlignedBuffer::new(DIRECT_ALIGN);
        buffer.extend(b"an odd length");
        write_direct_at(&file, buffer.filled(), 0).unwrap();
        assert!(!direct_flag(&file), "ordinary from the refusal on");
        write_direct_at(&file, b" and more", buffer.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"an odd length and more");
    }

    #[test]
    fn a_direct_file_takes_aligned_writes_and_reads_back_the_same() {
        let (_dir, path, file, _direct) = new_direct_file();
        let mut buffer = AlignedBuffer::new(DIRECT_ALIGN);
        buffer.extend(b"hamgam");
        write_direct_at(&file, buffer.padded(), DIRECT_ALIGN as u64).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 2 * DIRECT_ALIGN);
        assert_eq!(&bytes[DIRECT_ALIGN..DIRECT_ALIGN + 6], b"hamgam");
        assert!(bytes[..DIRECT_ALIGN].iter().chain(&bytes[DIRECT_ALIGN + 6..]).all(|&b| b == 0));
    }
}
