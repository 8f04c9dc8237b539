//! What a shard's keys held when its snapshot began, kept for the keys
//! written while the snapshot is read, so the shard's writes need not wait.
//!
//! The apply thread records a key's value just before the first batch that
//! writes it after the snapshot point lands (or `None` if the key did not
//! exist), unless the reader has already passed that key. The reader scans a
//! page, then takes every pre-image up to the page's last key and lets it win
//! over what the scan saw. Either the scan ran before the write, and saw the
//! old value, or after it, and the pre-image (recorded before the write) is
//! there to correct it: the file is the range as of the snapshot point.
//!
//! Knows nothing of raft or of the file format: keys and values only.

use hamgam_storage::{Db, KvPairs, StorageError};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bytes a pre-image costs beyond its key and value (the map's node).
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// The pre-images of one shard's range while its snapshot is read.
pub(crate) struct PreImages {
    prefix: Vec<u8>,
    limit_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The reader has taken its last page through this key (`Passed::All`:
    /// the whole range), so later writes there need no pre-image.
    passed: Passed,
    values: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
}

#[derive(Default)]
enum Passed {
    #[default]
    Nothing,
    Through(Vec<u8>),
    All,
}

impl Passed {
    fn covers(&self, key: &[u8]) -> bool {
        match self {
            Passed::Nothing => false,
            Passed::Through(last) => key <= last.as_slice(),
            Passed::All => true,
        }
    }
}

impl PreImages {
    /// For the keys under `prefix` (a shard's range), holding at most about
    /// `limit_bytes` before [`PreImages::has_room`] says no.
    pub(crate) fn new(prefix: &[u8], limit_bytes: usize) -> PreImages {
        PreImages { prefix: prefix.to_vec(), limit_bytes, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether more writes may go ahead of the reader. When not, the
    /// shard's rounds wait for the snapshot, as they would without
    /// pre-images, so memory stays bounded however slow the reader is.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().bytes < self.limit_bytes
    }

    /// Before a batch writing `keys` is written to `db`: keeps the present
    /// value of each key of this range that the reader has not passed and
    /// that has no pre-image yet.
    pub(crate) fn record<'k>(&self, db: &dyn Db, keys: impl Iterator<Item = &'k [u8]>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        for key in keys.filter(|key| key.starts_with(&self.prefix)) {
            if inner.passed.covers(key) || inner.values.contains_key(key) {
                continue;
            }
            let value = db.get(key)?;
            inner.bytes += key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES;
            inner.values.insert(key.to_vec(), value);
        }
        Ok(())
    }

    /// The reader's side: `page` is what a scan read from where the last
    /// page ended through `last` (`None`: through the end of the range).
    /// Returns the page as of the snapshot point, in key order, and frees
    /// the pre-images it used.
    pub(crate) fn settle(&self, page: KvPairs, last: Option<&[u8]>) -> KvPairs {
        let taken = {
            let mut inner = self.lock();
            let taken = match last {
                Some(last) => {
                    let mut after = last.to_vec();
                    after.push(0);
                    let rest = inner.values.split_off(&after);
                    inner.passed = Passed::Through(last.to_vec());
                    std::mem::replace(&mut inner.values, rest)
                }
                None => {
                    inner.passed = Passed::All;
                    std::mem::take(&mut inner.values)
                }
            };
            let freed: usize = taken
                .iter()
                .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES)
                .sum();
            inner.bytes -= freed.min(inner.bytes);
            taken
        };
        if taken.is_empty() {
            return page;
        }
        let mut settled: BTreeMap<Vec<u8>, Vec<u8>> = page.into_iter().collect();
        for (key, value) in taken {
            match value {
                Some(value) => settled.insert(key, value),
                None => settled.remove(&key),
            };
        }
        settled.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamgam_storage::KvWrite as _;
    use hamgam_storage::{KeyRange, KvRead, MemDb, Order, Txn, WriteBatch};

    fn write(db: &MemDb, pre_images: &PreImages, edits: &[(&str, Option<&str>)]) {
        let mut txn = Txn::new(db);
        for (key, value) in edits {
            match value {
                Some(value) => txn.put(key.as_bytes(), value.as_bytes().to_vec()),
                None => txn.delete(key.as_bytes()),
            }
        }
        let batch: WriteBatch = txn.into_batch();
        pre_images.record(db, batch.ops().iter().map(|(key, _)| key.as_slice())).unwrap();
        db.write(&batch).unwrap();
    }

    fn page(db: &MemDb, from: &str, limit: usize) -> KvPairs {
        let range = KeyRange { start: from.as_bytes().to_vec(), end: Some(b"s~".to_vec()) };
        db.scan(&range, Order::Ascending, limit).unwrap()
    }

    fn text(pairs: &KvPairs) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (String::from_utf8_lossy(k).into(), String::from_utf8_lossy(v).into())).collect()
    }

    /// Writes interleaved with the pages in every way the reader can meet
    /// them: the pages still add up to the range as it was at the start.
    #[test]
    fn pages_read_while_keys_change_are_the_range_as_it_was() {
        let db = MemDb::new();
        let pre_images = PreImages::new(b"s", 1 << 20);
        write(
            &db,
            &PreImages::new(b"none", 0),
            &[("s1", Some("a")), ("s2", Some("b")), ("s3", Some("c")), ("s4", Some("d")), ("t1", Some("other range"))],
        );

        // Before the first page: s1 changed, s2 deleted, s25 created.
        write(&db, &pre_images, &[("s1", Some("A")), ("s2", None), ("s25", Some("new")), ("t1", Some("x"))]);
        let first = page(&db, "s", 2);
        assert_eq!(text(&first), [("s1".into(), "A".into()), ("s25".into(), "new".into())]);
        let last = first.last().unwrap().0.clone();
        let first = pre_images.settle(first, Some(&last));
        assert_eq!(text(&first), [("s1".into(), "a".into()), ("s2".into(), "b".into())]);

        // Behind the reader: no pre-image needed. Ahead: s3 changed twice,
        // s4 deleted, s5 created (the first value seen is the one kept).
        write(&db, &pre_images, &[("s1", Some("again")), ("s3", Some("C"))]);
        write(&db, &pre_images, &[("s3", Some("CC")), ("s4", None), ("s5", Some("new"))]);
        let mut from = last.clone();
        from.push(0);
        let second = page(&db, std::str::from_utf8(&from).unwrap(), 3);
        assert!(second.len() < 3, "the end of the range");
        let second = pre_images.settle(second, None);
        assert_eq!(text(&second), [("s3".into(), "c".into()), ("s4".into(), "d".into())]);

        // Every pre-image was used and freed; later writes keep none.
        write(&db, &pre_images, &[("s9", Some("after"))]);
        assert!(pre_images.lock().values.is_empty());
        assert_eq!(pre_images.lock().bytes, 0);
        assert_eq!(db.get(b"s3").unwrap().unwrap(), b"CC");
    }

    #[test]
    fn room_runs_out_at_the_limit_and_comes_back_as_pages_are_taken() {
        let db = MemDb::new();
        let pre_images = PreImages::new(b"s", 300);
        write(&db, &pre_images, &[("s1", Some("x"))]);
        assert!(pre_images.has_room());
        write(&db, &pre_images, &[("s2", Some("x")), ("s3", Some("x")), ("s4", Some("x")), ("s5", Some("x"))]);
        assert!(!pre_images.has_room(), "five pre-images of about 66 bytes each");
        pre_images.settle(Vec::new(), Some(b"s4"));
        assert!(pre_images.has_room());
        assert_eq!(pre_images.lock().values.len(), 1);
    }
}
