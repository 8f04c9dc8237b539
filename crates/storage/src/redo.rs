//! The redo record of a write-out in progress: the whole table about to be
//! written to the database, made durable first, so that a crash part-way
//! through can be finished at the next open.
//!
//! The table holds each key's final value (or its deletion), so writing it
//! again over a database that already holds any part of it gives the same
//! result: replaying is safe however far the crashed write-out got.
//!
//! Layout: magic, body length (u64 LE), body, crc32 of the body (u32 LE).
//! The body is a sequence of entries: key length (u32 LE), key, 1 and value
//! length (u32 LE) and value for a put, or 0 for a deletion. A record whose
//! checksum fails was never complete, so no write-out had started from it.

use crate::{KeyWrite, StorageError, WriteBatch};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HGREDO01";
const HEADER_BYTES: usize = MAGIC.len() + 8;
const PUT: u8 = 1;
const DELETE: u8 = 0;

/// The one redo file of a [`crate::WriteBehind`]; each record overwrites the last.
#[derive(Debug)]
pub(crate) struct RedoFile {
    file: File,
    path: PathBuf,
}

impl RedoFile {
    /// Opens the file, creating it (and making its name durable) if new.
    pub(crate) fn open(path: &Path) -> Result<RedoFile, StorageError> {
        let io = |source| StorageError::Io { path: path.display().to_string(), source };
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        if !existed {
            // The name must survive a crash before any write-out relies on
            // the record behind it.
            file.sync_all().map_err(io)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(RedoFile { file, path: path.to_path_buf() })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Io { path: self.path.display().to_string(), source }
    }

    /// Makes `writes` the durable record, replacing the previous one.
    /// `bytes` is scratch space, kept by the caller so that a write-out
    /// does not take megabytes of fresh pages each time.
    pub(crate) fn record<'w>(
        &self,
        bytes: &mut Vec<u8>,
        writes: impl Iterator<Item = KeyWrite<'w>>,
    ) -> Result<(), StorageError> {
        bytes.clear();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&[0; 8]);
        for (key, value) in writes {
            put_len(bytes, key.len());
            bytes.extend_from_slice(key);
            match value {
                Some(value) => {
                    bytes.push(PUT);
                    put_len(bytes, value.len());
                    bytes.extend_from_slice(value);
                }
                None => bytes.push(DELETE),
            }
        }
        let body_len = (bytes.len() - HEADER_BYTES) as u64;
        bytes[MAGIC.len()..HEADER_BYTES].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32fast::hash(&bytes[HEADER_BYTES..]);
        bytes.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(bytes, 0).map_err(self.io())?;
        self.file.sync_data().map_err(self.io())
    }

    /// Removes the record: there is no write-out to finish.
    pub(crate) fn clear(&self) -> Result<(), StorageError> {
        self.file.set_len(0).map_err(self.io())?;
        self.file.sync_data().map_err(self.io())
    }

    /// The last complete record, if there is one.
    pub(crate) fn read(&self) -> Result<Option<WriteBatch>, StorageError> {
        let file_len = self.file.metadata().map_err(self.io())?.len();
        if file_len < (HEADER_BYTES + 4) as u64 {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_BYTES];
        self.file.read_exact_at(&mut header, 0).map_err(self.io())?;
        if &header[..MAGIC.len()] != MAGIC {
            return Ok(None);
        }
        let body_len = u64::from_le_bytes(header[MAGIC.len()..].try_into().unwrap_or_default());
        // A torn header can claim any length: check it against the file
        // before allocating.
        if body_len > file_len - (HEADER_BYTES + 4) as u64 {
            return Ok(None);
        }
        let mut rest = vec![0u8; body_len as usize + 4];
        self.file.read_exact_at(&mut rest, HEADER_BYTES as u64).map_err(self.io())?;
        let (body, crc) = rest.split_at(body_len as usize);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Ok(None);
        }
        decode(body).map(Some).ok_or_else(|| {
            StorageError::Backend(format!(
                "{}: the redo record passes its checksum but cannot be read",
                self.path.display()
            ))
        })
    }
}

fn put_len(bytes: &mut Vec<u8>, len: usize) {
    // Keys and values are bounded far below 4 GiB by the layers above.
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
}

fn decode(mut body: &[u8]) -> Option<WriteBatch> {
    fn take<'b>(body: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        if body.len() < n {
            return None;
        }
        let (head, tail) = body.split_at(n);
        *body = tail;
        Some(head)
    }
    fn take_len(body: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize)
    }
    let mut batch = WriteBatch::default();
    while !body.is_empty() {
        let key_len = take_len(&mut body)?;
        let key = take(&mut body, key_len)?.to_vec();
        match *take(&mut body, 1)?.first()? {
            PUT => {
                let value_len = take_len(&mut body)?;
                batch.put(key, take(&mut body, value_len)?.to_vec());
            }
            DELETE => batch.delete(key),
            _ => return None,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_torn_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redo");
        let redo = RedoFile::open(&path).unwrap();
        assert!(redo.read().unwrap().is_none(), "a new file holds no record");
        let mut batch = WriteBatch::default();
        batch.put("سلام".as_bytes().to_vec(), vec![9; 300]);
        batch.delete(b"gone".to_vec());
        batch.put(b"empty".to_vec(), Vec::new());
        redo.record(&mut Vec::new(), batch.key_writes()).unwrap();
        let reopened = RedoFile::open(&path).unwrap();
        assert_eq!(reopened.read().unwrap().unwrap().ops(), batch.ops());

        // A shorter record over a longer one: the length says where it ends.
        let mut short = WriteBatch::default();
        short.delete(b"x".to_vec());
        reopened.record(&mut Vec::new(), short.key_writes()).unwrap();
        assert_eq!(reopened.read().unwrap().unwrap().ops(), short.ops());

        // A record cut off part-way (a crash while writing it) is no record.
        reopened.record(&mut Vec::new(), batch.key_writes()).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 10).unwrap();
        assert!(RedoFile::open(&path).unwrap().read().unwrap().is_none());

        // Nor is one with a byte changed in its body.
        reopened.record(&mut Vec::new(), batch.key_writes()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(RedoFile::open(&path).unwrap().read().unwrap().is_none());
    }
}
