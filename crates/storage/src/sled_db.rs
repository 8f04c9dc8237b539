use crate::{Db, KeyRange, KeyWrite, KvPairs, KvRead, Order, StorageError, WriteBatch};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The on-disk database: one sled tree per node.
///
/// sled's own `flush` ends in `sync_file_range`, which survives a killed
/// process but not a power cut (no metadata, no device cache flush). So
/// [`Db::persist`] flushes and then fsyncs every file sled keeps, plus the
/// directories; fsync acts on the file, not on the descriptor, so syncing from
/// our own descriptor covers sled's writes.
#[derive(Debug)]
pub struct SledDb {
    db: sled::Db,
    dir: PathBuf,
}

impl SledDb {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledDb, StorageError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from the raft WAL and from `persist` at
            // checkpoints; sled's own periodic flush only costs CPU here
            // (about a third of an insert's cost in measurements).
            .flush_every_ms(None);
        // A database of this process just dropped lets go of its file lock
        // only when sled's I/O threads finish with it: wait a little for
        // that, not for another process.
        let mut attempts = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(SledDb { db, dir: dir.to_path_buf() }),
                // sled says so only in the message.
                Err(sled::Error::Io(e)) if e.to_string().starts_with("could not acquire lock") && attempts < LOCK_RETRIES => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(error) => return Err(backend(error)),
            }
        }
    }
}

/// Tries at opening a database whose file lock is held, 50 ms apart.
const LOCK_RETRIES: u32 = 40;

fn backend(error: sled::Error) -> StorageError {
    StorageError::Backend(error.to_string())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.display().to_string(), source }
}

/// fsyncs every regular file below `dir`, then the directories themselves.
fn sync_tree(dir: &Path) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_error(&path))?;
        if file_type.is_dir() {
            sync_tree(&path)?;
        } else if file_type.is_file() {
            match File::open(&path) {
                Ok(file) => file.sync_all().map_err(io_error(&path))?,
                // sled removes old snapshot files as it goes; a file that is
                // gone has nothing left to sync.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

impl KvRead for SledDb {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        if range.end.as_ref().is_some_and(|end| *end <= range.start) {
            return Ok(Vec::new());
        }
        let iter = match &range.end {
            Some(end) => self.db.range(range.start.as_slice()..end.as_slice()),
            None => self.db.range(range.start.as_slice()..),
        };
        let mut pairs = Vec::new();
        let mut push = |item: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StorageError> {
            let (k, v) = item.map_err(backend)?;
            pairs.push((k.to_vec(), v.to_vec()));
            Ok(pairs.len() < limit)
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        match order {
            Order::Ascending => {
                for item in iter {
                    if !push(item)? {
                        break;
                    }
                }
            }
            Order::Descending => {
                for item in iter.rev() {
                    if !push(item)? {
                        break;
                    }
                }
            }
        }
        Ok(pairs)
    }
}

impl Db for SledDb {
    fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => sled_batch.insert(key.as_slice(), value.as_slice()),
                None => sled_batch.remove(key.as_slice()),
            }
        }
        self.db.apply_batch(sled_batch).map_err(backend)
    }

    fn write_key_by_key(&self, writes: &mut dyn Iterator<Item = KeyWrite<'_>>) -> Result<(), StorageError> {
        for (key, value) in writes {
            match value {
                Some(value) => self.db.insert(key, value).map_err(backend)?,
                None => self.db.remove(key).map_err(backend)?,
            };
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.db.flush().map_err(backend)?;
        sync_tree(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opening a database that this process is still letting go of waits
    /// for it rather than failing.
    #[test]
    fn an_open_waits_for_a_database_being_let_go_of() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledDb::open(dir.path(), 1 << 20).unwrap();
        let mut batch = WriteBatch::default();
        batch.put(b"k".to_vec(), b"v".to_vec());
        first.write(&batch).unwrap();
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let second = SledDb::open(dir.path(), 1 << 20).unwrap();
        letting_go.join().unwrap();
        assert_eq!(second.get(b"k").unwrap(), Some(b"v".to_vec()));
    }
}
