use crate::StorageError;

/// Scan direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// Keys from `start` (inclusive) up to `end` (exclusive; `None` means the end
/// of the key space).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        KeyRange { start: prefix.to_vec(), end: prefix_end(prefix) }
    }

    pub fn between(start: &[u8], end: &[u8]) -> Self {
        KeyRange { start: start.to_vec(), end: Some(end.to_vec()) }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The first key after every key that starts with `prefix`, or `None` when
/// the prefix is all 0xff (no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Key-value pairs returned by a scan, in scan order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Reading: point lookups and bounded scans.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// At most `limit` pairs of `range`, in `order`.
    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError>;
}

/// Writing. Writes are buffered by the implementor (see `Txn`); they cannot
/// fail until the buffer is written out.
pub trait KvWrite: KvRead {
    fn put(&mut self, key: &[u8], value: Vec<u8>);
    fn delete(&mut self, key: &[u8]);

    /// [`KvWrite::put`] of a key that holds no value now, from a caller that
    /// knows it (a key named by a fresh sequence number). A store that
    /// still holds the creation in memory when the key is deleted forgets
    /// both, and the database never sees the key: the cross-shard outbox's
    /// records mostly live and die between two write-outs.
    fn create(&mut self, key: &[u8], value: Vec<u8>) {
        self.put(key, value)
    }
}

impl<T: KvRead + ?Sized> KvRead for &T {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        (**self).scan(range, order, limit)
    }
}

impl<T: KvRead + ?Sized> KvRead for &mut T {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        (**self).scan(range, order, limit)
    }
}

impl<T: KvRead + ?Sized> KvRead for std::sync::Arc<T> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        (**self).scan(range, order, limit)
    }
}

impl<T: KvWrite + ?Sized> KvWrite for &mut T {
    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        (**self).put(key, value)
    }
    fn delete(&mut self, key: &[u8]) {
        (**self).delete(key)
    }
    fn create(&mut self, key: &[u8], value: Vec<u8>) {
        (**self).create(key, value)
    }
}

/// A view that adds `prefix` to every key going in and strips it from every
/// key coming out, so its user cannot reach keys outside its range.
#[derive(Debug)]
pub struct Prefixed<T> {
    inner: T,
    prefix: Vec<u8>,
}

impl<T> Prefixed<T> {
    pub fn new(inner: T, prefix: &[u8]) -> Self {
        Prefixed { inner, prefix: prefix.to_vec() }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }
}

impl<T: KvRead> KvRead for Prefixed<T> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(&self.full_key(key))
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        let full = KeyRange {
            start: self.full_key(&range.start),
            end: match &range.end {
                Some(end) => Some(self.full_key(end)),
                None => prefix_end(&self.prefix),
            },
        };
        let mut pairs = self.inner.scan(&full, order, limit)?;
        for (key, _) in &mut pairs {
            key.drain(..self.prefix.len());
        }
        Ok(pairs)
    }
}

impl<T: KvWrite> KvWrite for Prefixed<T> {
    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        let full = self.full_key(key);
        self.inner.put(&full, value)
    }

    fn delete(&mut self, key: &[u8]) {
        let full = self.full_key(key);
        self.inner.delete(&full)
    }

    fn create(&mut self, key: &[u8], value: Vec<u8>) {
        let full = self.full_key(key);
        self.inner.create(&full, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_carries_over_ff_bytes() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
