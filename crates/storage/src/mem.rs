use crate::{KvPairs, Db, KeyRange, KvRead, Order, StorageError, WriteBatch};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An in-memory database for tests and benchmarks; same semantics as
/// [`crate::SledDb`] except that nothing survives the process.
#[derive(Debug, Default)]
pub struct MemDb {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemDb {
    pub fn new() -> Self {
        MemDb::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A poisoned lock means a writer panicked mid-batch; the map itself is
        // still a valid map, and in-memory data has no durability to protect.
        self.map.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl KvRead for MemDb {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.read().get(key).cloned())
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        let map = self.read();
        let end = match &range.end {
            Some(end) => Bound::Excluded(end.clone()),
            None => Bound::Unbounded,
        };
        if range.end.as_ref().is_some_and(|end| *end <= range.start) {
            return Ok(Vec::new());
        }
        let iter = map.range((Bound::Included(range.start.clone()), end));
        let pairs = match order {
            Order::Ascending => iter.take(limit).map(|(k, v)| (k.clone(), v.clone())).collect(),
            Order::Descending => iter.rev().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        Ok(pairs)
    }
}

impl Db for MemDb {
    fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut map = self.map.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, value) in batch.ops() {
            match value {
                Some(value) => map.insert(key.clone(), value.clone()),
                None => map.remove(key),
            };
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A [`MemDb`] that counts the reads, key writes and persists reaching it,
/// for tests that assert what a layer above asks of its database.
#[derive(Debug, Default)]
pub struct CountingDb {
    inner: MemDb,
    reads: AtomicUsize,
    key_writes: AtomicUsize,
    persists: AtomicUsize,
}

impl CountingDb {
    /// Puts and deletions so far.
    pub fn key_writes(&self) -> usize {
        self.key_writes.load(Ordering::Relaxed)
    }

    /// Gets and scans so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn persists(&self) -> usize {
        self.persists.load(Ordering::Relaxed)
    }
}

impl KvRead for CountingDb {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key)
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.scan(range, order, limit)
    }
}

impl Db for CountingDb {
    fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        self.key_writes.fetch_add(batch.len(), Ordering::Relaxed);
        self.inner.write(batch)
    }

    fn persist(&self) -> Result<(), StorageError> {
        self.persists.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
