use crate::{Db, KeyRange, KeyWrite, KvPairs, KvRead, KvWrite, Order, StorageError};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

/// Writes to apply atomically, in key order (later writes to a key win).
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Positions in `ops`, ascending, of puts that create their key (see
    /// [`KvWrite::create`]); a database applies them as puts.
    creations: Vec<usize>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// A put of a key that holds no value now (see [`KvWrite::create`]).
    pub fn create(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.creations.push(self.ops.len());
        self.ops.push((key, Some(value)));
    }

    pub fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    /// The writes with, for each, whether it creates its key.
    pub fn into_writes(self) -> impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>, bool)> {
        let mut creations = self.creations.into_iter().peekable();
        self.ops.into_iter().enumerate().map(move |(at, (key, value))| {
            let created = creations.next_if_eq(&at).is_some();
            (key, value, created)
        })
    }

    /// The writes, borrowed, in order.
    pub fn key_writes(&self) -> impl Iterator<Item = KeyWrite<'_>> {
        self.ops.iter().map(|(key, value)| (key.as_slice(), value.as_deref()))
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A key's latest write in a [`Txn`].
#[derive(Debug)]
struct Pending {
    value: Option<Vec<u8>>,
    /// The key's first write here created it: nothing below holds it.
    created: bool,
}

/// A write overlay over a database: reads see the overlay first, then the
/// database; nothing reaches the database until [`Txn::into_batch`] is written.
///
/// One raft apply round runs in one `Txn`, so a command sees the effects of
/// the commands before it and the round lands in one atomic batch together
/// with the applied indexes.
pub struct Txn<'a> {
    db: &'a dyn Db,
    writes: BTreeMap<Vec<u8>, Pending>,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn").field("writes", &self.writes.len()).finish()
    }
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a dyn Db) -> Self {
        Txn { db, writes: BTreeMap::new() }
    }

    /// Number of distinct keys written so far.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch { ops: Vec::with_capacity(self.writes.len()), creations: Vec::new() };
        for (key, Pending { value, created }) in self.writes {
            match value {
                Some(value) if created => batch.create(key, value),
                value => batch.ops.push((key, value)),
            }
        }
        batch
    }
}

impl KvRead for Txn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.writes.get(key) {
            Some(pending) => Ok(pending.value.clone()),
            None => self.db.get(key),
        }
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        let overlay: Vec<(&Vec<u8>, &Pending)> = match &range.end {
            Some(end) if *end <= range.start => return Ok(Vec::new()),
            Some(end) => self.writes.range(range.start.clone()..end.clone()).collect(),
            None => self.writes.range(range.start.clone()..).collect(),
        };
        // Each overlay key can hide at most one database key, so reading
        // `limit + overlay.len()` keys from the database always leaves at
        // least `limit` survivors ahead of anything not read.
        let base = self.db.scan(range, order, limit.saturating_add(overlay.len()))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (key, pending) in overlay {
            match &pending.value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        let pairs = match order {
            Order::Ascending => merged.into_iter().take(limit).collect(),
            Order::Descending => merged.into_iter().rev().take(limit).collect(),
        };
        Ok(pairs)
    }
}

impl Txn<'_> {
    /// A put; a key new to this round counts as created here if `creates`.
    fn put_marked(&mut self, key: &[u8], value: Vec<u8>, creates: bool) {
        match self.writes.entry(key.to_vec()) {
            // Written before in this round: what that write said about what
            // lies below still holds.
            Entry::Occupied(mut entry) => entry.get_mut().value = Some(value),
            Entry::Vacant(entry) => {
                entry.insert(Pending { value: Some(value), created: creates });
            }
        }
    }
}

impl KvWrite for Txn<'_> {
    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.put_marked(key, value, false)
    }

    fn delete(&mut self, key: &[u8]) {
        match self.writes.entry(key.to_vec()) {
            // Created here: below, the key never existed.
            Entry::Occupied(entry) if entry.get().created => {
                entry.remove();
            }
            Entry::Occupied(mut entry) => entry.get_mut().value = None,
            Entry::Vacant(entry) => {
                entry.insert(Pending { value: None, created: false });
            }
        }
    }

    fn create(&mut self, key: &[u8], value: Vec<u8>) {
        self.put_marked(key, value, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemDb, Prefixed, SledDb};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, u8),
        /// A creation when the key holds nothing, else a put.
        Create(u8, u8),
        Delete(u8),
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..32, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..32, any::<u8>()).prop_map(|(k, v)| Op::Create(k, v)),
            (0u8..32).prop_map(Op::Delete),
            Just(Op::Commit),
        ]
    }

    /// Runs `ops` through a Txn over `db` and through a BTreeMap model, and
    /// checks that every scan of the Txn agrees with the model.
    fn check_against_model(db: &dyn Db, ops: &[Op], lo: u8, hi: u8, limit: usize) {
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut txn = Txn::new(db);
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    txn.put(&[*k], vec![*v]);
                    model.insert(vec![*k], vec![*v]);
                }
                Op::Create(k, v) => {
                    if model.insert(vec![*k], vec![*v]).is_none() {
                        txn.create(&[*k], vec![*v]);
                    } else {
                        txn.put(&[*k], vec![*v]);
                    }
                }
                Op::Delete(k) => {
                    txn.delete(&[*k]);
                    model.remove(&vec![*k]);
                }
                Op::Commit => {
                    db.write(&std::mem::replace(&mut txn, Txn::new(db)).into_batch()).unwrap();
                }
            }
            let range = KeyRange::between(&[lo], &[hi]);
            for order in [Order::Ascending, Order::Descending] {
                let got = txn.scan(&range, order, limit).unwrap();
                let want: Vec<_> = match order {
                    _ if lo >= hi => Vec::new(),
                    Order::Ascending => model.range(vec![lo]..vec![hi]).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect(),
                    Order::Descending => {
                        model.range(vec![lo]..vec![hi]).rev().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()
                    }
                };
                assert_eq!(got, want, "{order:?} scan of [{lo}, {hi}) limit {limit}");
            }
        }
    }

    proptest! {
        #[test]
        fn txn_over_memdb_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..60), lo in 0u8..16, hi in 8u8..40, limit in 0usize..12) {
            check_against_model(&MemDb::new(), &ops, lo, hi, limit);
        }
    }

    #[test]
    fn txn_over_sled_matches_a_btreemap() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 8 << 20).unwrap();
        let ops: Vec<Op> = (0..200u32)
            .map(|i| match i % 7 {
                0 | 3 => Op::Delete((i * 13 % 32) as u8),
                6 => Op::Commit,
                _ => Op::Put((i * 7 % 32) as u8, i as u8),
            })
            .collect();
        check_against_model(&db, &ops, 3, 29, 5);
    }

    #[test]
    fn sled_data_survives_reopen_after_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = SledDb::open(dir.path(), 8 << 20).unwrap();
            let mut txn = Txn::new(&db);
            txn.put(b"k", b"v".to_vec());
            db.write(&txn.into_batch()).unwrap();
            db.persist().unwrap();
        }
        let db = SledDb::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(db.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn prefixed_view_cannot_see_or_touch_other_ranges() {
        let db = MemDb::new();
        let mut outside = WriteBatch::default();
        outside.put(b"B-x".to_vec(), b"other".to_vec());
        db.write(&outside).unwrap();
        let mut txn = Txn::new(&db);
        {
            let mut view = Prefixed::new(&mut txn, b"A-");
            view.put(b"x", b"mine".to_vec());
            assert_eq!(view.get(b"x").unwrap(), Some(b"mine".to_vec()));
            let all = view.scan(&KeyRange::prefix(b""), Order::Ascending, 10).unwrap();
            assert_eq!(all, vec![(b"x".to_vec(), b"mine".to_vec())]);
        }
        db.write(&txn.into_batch()).unwrap();
        assert_eq!(db.get(b"A-x").unwrap(), Some(b"mine".to_vec()));
        assert_eq!(db.get(b"B-x").unwrap(), Some(b"other".to_vec()));
    }
}
