//! A write-behind table in front of a database: batches land in memory at
//! once and reach the database later, many of them together.
//!
//! Why: a node's apply rounds rewrite the same keys again and again within
//! a fraction of a second (each shard's applied-state record, the inbox
//! marks) and write keys that are deleted soon after (a cross-shard outbox
//! record lives until the target shard acknowledges it, about 100 ms). In
//! memory those writes fold into one; the database, whose cost follows the
//! number of keys written, sees only what is left when the table is written
//! out.
//!
//! Durability is unchanged in kind: the database was never the raft log's
//! durability (the WAL is), and a crash already lost whatever the database
//! still buffered; the node replays its WAL from the applied indexes the
//! database recovers. What must hold is that the database after a crash is
//! the state after some whole number of write-outs, never a mix, so that
//! each applied index arrives together with the writes it covers. sled's
//! atomic batch would give that, but it stops every reader of the database
//! while it applies, and a write-out is tens of thousands of keys. So a
//! write-out first makes the table durable in a redo file, then writes it
//! key by key (readers go on), then persists the database; an open that
//! finds a complete redo record writes it again, which is safe because the
//! table holds final values only.

use crate::redo::RedoFile;
use crate::{Db, KeyRange, KvPairs, KvRead, Order, StorageError, WriteBatch};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::iter::Peekable;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

/// A key's latest write: a value, or `None` for a deletion.
type Table = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Bytes a table entry costs beyond its key and value (map node, vectors).
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// A [`Db`] that keeps recent writes in memory and writes them to `inner`
/// when they reach `flush_bytes` (on its own thread), and on
/// [`Db::persist`]; each write-out ends with `inner` persisted. Writers wait, writing out themselves, only when the
/// table reaches four times `flush_bytes` while a write-out is still
/// running: memory is bounded.
pub struct WriteBehind<D: Db + 'static> {
    shared: Arc<Shared<D>>,
    flusher: Option<JoinHandle<()>>,
}

struct Shared<D> {
    inner: D,
    redo: RedoFile,
    flush_bytes: usize,
    tables: RwLock<Tables>,
    /// Held for the whole of one write-out, so they run one at a time and
    /// in order; holds the redo record's scratch space.
    writing_out: Mutex<Vec<u8>>,
    wake: Mutex<Wake>,
    woken: Condvar,
}

#[derive(Default)]
struct Tables {
    /// Takes new writes.
    active: Table,
    active_bytes: usize,
    /// Keys of `active` created since the last write-out (see
    /// [`crate::KvWrite::create`]): neither the database nor `frozen` holds
    /// them, so their deletion forgets them instead of writing a deletion.
    created: HashSet<Vec<u8>>,
    /// Being written to the database; still read until that is done.
    frozen: Option<Arc<Table>>,
    /// A failed write-out: every later write reports it.
    failed: Option<String>,
}

#[derive(Default)]
struct Wake {
    due: bool,
    stop: bool,
}

impl<D: Db + 'static> std::fmt::Debug for WriteBehind<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind").field("inner", &self.shared.inner).finish_non_exhaustive()
    }
}

impl<D: Db + 'static> WriteBehind<D> {
    /// Puts the table in front of `inner`. `redo_path` is the redo file;
    /// a complete record found there (a write-out a crash cut short) is
    /// written to `inner` first.
    pub fn open(inner: D, redo_path: &Path, flush_bytes: usize) -> Result<Self, StorageError> {
        let redo = RedoFile::open(redo_path)?;
        if let Some(unfinished) = redo.read()? {
            // Or a write-out that finished before a crash (a clean close
            // clears the record): writing final values again changes
            // nothing, and telling the two apart would cost a write per
            // write-out.
            inner.write_key_by_key(&mut unfinished.key_writes())?;
            inner.persist()?;
            tracing::debug!(keys = unfinished.len(), "the last write-out is in the database");
        }
        let shared = Arc::new(Shared {
            inner,
            redo,
            flush_bytes: flush_bytes.max(1),
            tables: RwLock::new(Tables::default()),
            writing_out: Mutex::new(Vec::new()),
            wake: Mutex::new(Wake::default()),
            woken: Condvar::new(),
        });
        let for_thread = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("db-write-behind".into())
            .spawn(move || for_thread.run_flusher())
            .map_err(|e| StorageError::Backend(format!("cannot start the write-behind thread: {e}")))?;
        Ok(WriteBehind { shared, flusher: Some(flusher) })
    }
}

impl<D: Db> Shared<D> {
    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        // The tables are plain maps, valid whatever a panicking holder did.
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) -> std::sync::MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_flusher(&self) {
        loop {
            {
                let mut wake = self.wake();
                while !wake.due && !wake.stop {
                    wake = self.woken.wait(wake).unwrap_or_else(|p| p.into_inner());
                }
                if wake.stop {
                    return;
                }
                wake.due = false;
            }
            if let Err(error) = self.write_out() {
                tracing::error!(%error, "writing buffered writes to the database failed");
            }
        }
    }

    /// Writes everything buffered so far to the database and persists it:
    /// redo record first, then key by key. False if there was nothing.
    fn write_out(&self) -> Result<bool, StorageError> {
        let mut redo_bytes = self.writing_out.lock().unwrap_or_else(|p| p.into_inner());
        let frozen = {
            let mut tables = self.write();
            if let Some(failed) = &tables.failed {
                return Err(StorageError::Backend(failed.clone()));
            }
            if tables.active.is_empty() {
                return Ok(false);
            }
            let frozen = Arc::new(std::mem::take(&mut tables.active));
            tables.active_bytes = 0;
            tables.created.clear();
            tables.frozen = Some(frozen.clone());
            frozen
        };
        let writes = || frozen.iter().map(|(key, value)| (key.as_slice(), value.as_deref()));
        let written = self
            .redo
            .record(&mut redo_bytes, writes())
            .and_then(|()| self.inner.write_key_by_key(&mut writes()))
            .and_then(|()| self.inner.persist());
        let mut tables = self.write();
        match &written {
            Ok(()) => tables.frozen = None,
            // Keep the frozen table: readers still see its writes, and no
            // later write-out may land ahead of it.
            Err(error) => tables.failed = Some(error.to_string()),
        }
        written.map(|()| true)
    }
}

impl<D: Db + 'static> Drop for WriteBehind<D> {
    fn drop(&mut self) {
        self.shared.wake().stop = true;
        self.shared.woken.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        match self.shared.write_out() {
            // Everything is in the database and persisted: the next open
            // has nothing to write again.
            Ok(_) => {
                if let Err(error) = self.shared.redo.clear() {
                    tracing::warn!(%error, "the redo record could not be cleared; the next open writes it again");
                }
            }
            Err(error) => {
                tracing::error!(%error, "buffered writes could not reach the database at close; the WAL still holds them")
            }
        }
    }
}

impl<D: Db + 'static> KvRead for WriteBehind<D> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let tables = self.shared.read();
        if let Some(value) = tables.active.get(key) {
            return Ok(value.clone());
        }
        if let Some(value) = tables.frozen.as_ref().and_then(|frozen| frozen.get(key)) {
            return Ok(value.clone());
        }
        // Still under the lock: a write-out finishing now cannot make the
        // database older than what the tables just said.
        self.shared.inner.get(key)
    }

    fn scan(&self, range: &KeyRange, order: Order, limit: usize) -> Result<KvPairs, StorageError> {
        if limit == 0 || range.end.as_ref().is_some_and(|end| *end <= range.start) {
            return Ok(Vec::new());
        }
        let tables = self.shared.read();
        let mut buffered = Buffered::new(&tables, range, order);
        if buffered.is_empty() {
            return self.shared.inner.scan(range, order, limit);
        }
        merge_scan(&self.shared.inner, &mut buffered, range, order, limit)
    }
}

impl<D: Db + 'static> WriteBehind<D> {
    /// Puts writes into the active table; wakes the flusher once the table
    /// is due, or writes out here if the flusher is far behind.
    fn take(&self, writes: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>, bool)>) -> Result<(), StorageError> {
        let bytes = {
            let mut tables = self.shared.write();
            let Tables { active, active_bytes, created, frozen, failed } = &mut *tables;
            if let Some(failed) = failed {
                return Err(StorageError::Backend(failed.clone()));
            }
            let entry_bytes = |key: &[u8], value: &Option<Vec<u8>>| {
                key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_BYTES
            };
            for (key, value, creates) in writes {
                match active.entry(key) {
                    Entry::Occupied(mut entry) => {
                        *active_bytes -= entry_bytes(entry.key(), entry.get());
                        if value.is_none() && created.remove(entry.key()) {
                            // Created since the last write-out: the
                            // database never saw the key.
                            entry.remove();
                        } else {
                            *active_bytes += entry_bytes(entry.key(), &value);
                            entry.insert(value);
                        }
                    }
                    Entry::Vacant(entry) => {
                        let unseen = frozen.as_ref().is_none_or(|frozen| !frozen.contains_key(entry.key()));
                        if creates && value.is_some() && unseen {
                            created.insert(entry.key().clone());
                        }
                        *active_bytes += entry_bytes(entry.key(), &value);
                        entry.insert(value);
                    }
                }
            }
            *active_bytes
        };
        if bytes >= self.shared.flush_bytes.saturating_mul(4) {
            // The flusher is behind: write out here, waiting for it first.
            return self.shared.write_out().map(|_| ());
        }
        if bytes >= self.shared.flush_bytes {
            let mut wake = self.shared.wake();
            if !wake.due {
                wake.due = true;
                self.shared.woken.notify_one();
            }
        }
        Ok(())
    }
}

impl<D: Db + 'static> Db for WriteBehind<D> {
    fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        self.take(batch.clone().into_writes())
    }

    fn write_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.take(batch.into_writes())
    }

    fn persist(&self) -> Result<(), StorageError> {
        // A write-out ends with the database persisted; with nothing to
        // write out, the database may still hold writes it recovered
        // unsynced.
        if !self.shared.write_out()? {
            self.shared.inner.persist()?;
        }
        Ok(())
    }
}

/// One table's entries within a range, in scan order.
type Entries<'t> = Box<dyn Iterator<Item = (&'t Vec<u8>, &'t Option<Vec<u8>>)> + 't>;

/// The buffered writes in a range, newest first on equal keys, in scan order.
struct Buffered<'t> {
    active: Peekable<Entries<'t>>,
    frozen: Peekable<Entries<'t>>,
    order: Order,
}

impl<'t> Buffered<'t> {
    fn new(tables: &'t Tables, range: &KeyRange, order: Order) -> Self {
        let bounds = |table: &'t Table| -> Entries<'t> {
            let end = match &range.end {
                Some(end) => Bound::Excluded(end.as_slice()),
                None => Bound::Unbounded,
            };
            let iter = table.range::<[u8], _>((Bound::Included(range.start.as_slice()), end));
            match order {
                Order::Ascending => Box::new(iter),
                Order::Descending => Box::new(iter.rev()),
            }
        };
        let empty: &'t Table = &EMPTY;
        Buffered {
            active: bounds(&tables.active).peekable(),
            frozen: bounds(tables.frozen.as_deref().unwrap_or(empty)).peekable(),
            order,
        }
    }

    fn is_empty(&mut self) -> bool {
        self.active.peek().is_none() && self.frozen.peek().is_none()
    }

    /// The next buffered key in scan order, without taking it.
    fn peek_key(&mut self) -> Option<&'t [u8]> {
        let active = self.active.peek().map(|&(k, _)| k.as_slice());
        let frozen = self.frozen.peek().map(|&(k, _)| k.as_slice());
        match (active, frozen) {
            (Some(a), Some(f)) => Some(if comes_before(self.order, f, a) { f } else { a }),
            (a, f) => a.or(f),
        }
    }

    /// Takes the next buffered key; the active table's write wins over the
    /// frozen one's.
    fn next(&mut self) -> Option<(&'t [u8], Option<&'t [u8]>)> {
        let key = self.peek_key()?;
        let from_frozen = self.frozen.next_if(|(k, _)| k.as_slice() == key);
        let from_active = self.active.next_if(|(k, _)| k.as_slice() == key);
        let (_, value) = from_active.or(from_frozen)?;
        Some((key, value.as_deref()))
    }
}

static EMPTY: Table = BTreeMap::new();

fn comes_before(order: Order, a: &[u8], b: &[u8]) -> bool {
    match order {
        Order::Ascending => a < b,
        Order::Descending => a > b,
    }
}

/// Merges the buffered writes of a range with the database's keys,
/// reading the database in pages that double in size whenever buffered
/// deletions hide what a page brought (a run of deleted outbox records
/// costs a few reads, not one per record).
fn merge_scan(
    inner: &dyn Db,
    buffered: &mut Buffered<'_>,
    range: &KeyRange,
    order: Order,
    limit: usize,
) -> Result<KvPairs, StorageError> {
    let mut out: KvPairs = Vec::new();
    let mut rest = range.clone();
    let mut page = limit;
    loop {
        let keys = inner.scan(&rest, order, page)?;
        let exhausted = keys.len() < page;
        let last = keys.last().map(|(k, _)| k.clone());
        for (key, value) in keys {
            while let Some(next) = buffered.peek_key()
                && comes_before(order, next, &key)
            {
                if let Some((k, Some(v))) = buffered.next() {
                    out.push((k.to_vec(), v.to_vec()));
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if buffered.peek_key() == Some(key.as_slice()) {
                if let Some((k, Some(v))) = buffered.next() {
                    out.push((k.to_vec(), v.to_vec()));
                }
            } else {
                out.push((key, value));
            }
            if out.len() == limit {
                return Ok(out);
            }
        }
        match last {
            Some(last) if !exhausted => {
                match order {
                    Order::Ascending => rest.start = [last.as_slice(), &[0]].concat(),
                    Order::Descending => rest.end = Some(last),
                }
                page = page.saturating_mul(2).min(limit.max(1024));
            }
            _ => break,
        }
    }
    while out.len() < limit {
        match buffered.next() {
            Some((k, Some(v))) => out.push((k.to_vec(), v.to_vec())),
            Some((_, None)) => {}
            None => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CountingDb, KvWrite, MemDb, SledDb, Txn};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, u8),
        /// A creation when the key holds nothing, else a put.
        Create(u8, u8),
        Delete(u8),
        WriteOut,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..40, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            2 => (0u8..40, any::<u8>()).prop_map(|(k, v)| Op::Create(k, v)),
            3 => (0u8..40).prop_map(Op::Delete),
            1 => Just(Op::WriteOut),
        ]
    }

    fn in_memory(flush_bytes: usize) -> (WriteBehind<MemDb>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = WriteBehind::open(MemDb::new(), &dir.path().join("redo"), flush_bytes).unwrap();
        (db, dir)
    }

    /// Every read through the table agrees with a plain map that got the
    /// same writes, whatever part of them has reached the database.
    fn check_against_model(db: &WriteBehind<MemDb>, ops: &[Op], lo: u8, hi: u8, limit: usize) {
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            let mut batch = WriteBatch::default();
            match op {
                Op::Put(k, v) => {
                    batch.put(vec![*k], vec![*v]);
                    model.insert(vec![*k], vec![*v]);
                }
                Op::Create(k, v) => {
                    if model.insert(vec![*k], vec![*v]).is_none() {
                        batch.create(vec![*k], vec![*v]);
                    } else {
                        batch.put(vec![*k], vec![*v]);
                    }
                }
                Op::Delete(k) => {
                    batch.delete(vec![*k]);
                    model.remove(&vec![*k]);
                }
                Op::WriteOut => {
                    db.shared.write_out().unwrap();
                }
            }
            // Both ways in: copied from the caller's batch, and taken over.
            if i % 2 == 0 {
                db.write(&batch).unwrap();
            } else {
                db.write_owned(batch).unwrap();
            }
            let range = KeyRange::between(&[lo], &[hi]);
            for order in [Order::Ascending, Order::Descending] {
                let got = db.scan(&range, order, limit).unwrap();
                let in_range = model.range(vec![lo]..vec![hi.max(lo)]).map(|(k, v)| (k.clone(), v.clone()));
                let want: Vec<_> = match order {
                    Order::Ascending => in_range.take(limit).collect(),
                    Order::Descending => in_range.rev().take(limit).collect(),
                };
                assert_eq!(got, want, "{order:?} scan of [{lo}, {hi}) limit {limit}");
            }
            for k in lo..hi {
                assert_eq!(db.get(&[k]).unwrap(), model.get(&vec![k]).cloned(), "get {k}");
            }
        }
    }

    proptest! {
        #[test]
        fn reads_match_a_plain_map_whatever_has_been_written_out(
            ops in proptest::collection::vec(op(), 1..80), lo in 0u8..16, hi in 8u8..44, limit in 0usize..12,
        ) {
            // A huge threshold: only the test's own write-outs move data.
            let (db, _dir) = in_memory(usize::MAX / 8);
            check_against_model(&db, &ops, lo, hi, limit);
        }
    }

    /// A key created and deleted between two write-outs never reaches the
    /// database; one put and deleted arrives as a deletion (the database
    /// may hold it from before); one created and deleted after a write-out
    /// took it arrives as both. Reads agree throughout.
    #[test]
    fn keys_created_and_deleted_between_write_outs_never_reach_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = WriteBehind::open(CountingDb::default(), &dir.path().join("redo"), usize::MAX / 8).unwrap();
        let write = |build: &dyn Fn(&mut Txn<'_>)| {
            let mut txn = Txn::new(&db);
            build(&mut txn);
            db.write_owned(txn.into_batch()).unwrap();
        };
        write(&|txn| {
            txn.create(b"created", b"1".to_vec());
            txn.put(b"put", b"1".to_vec());
            txn.create(b"written-out", b"1".to_vec());
        });
        // Created and deleted within one round: the batch never names it.
        let mut txn = Txn::new(&db);
        txn.create(b"same-round", b"1".to_vec());
        txn.delete(b"same-round");
        assert!(txn.is_empty());
        db.shared.write_out().unwrap();
        assert_eq!(db.shared.inner.key_writes(), 3);
        write(&|txn| {
            txn.create(b"created-2", b"1".to_vec());
            txn.put(b"created-2", b"2".to_vec());
            txn.put(b"put-2", b"1".to_vec());
        });
        assert_eq!(db.get(b"created-2").unwrap(), Some(b"2".to_vec()));
        write(&|txn| {
            txn.delete(b"created-2");
            txn.delete(b"put-2");
            txn.delete(b"written-out");
        });
        for key in [&b"created-2"[..], b"put-2", b"written-out"] {
            assert_eq!(db.get(key).unwrap(), None);
        }
        db.shared.write_out().unwrap();
        // put-2 and written-out arrive as deletions; created-2 not at all.
        assert_eq!(db.shared.inner.key_writes(), 5);
        assert_eq!(db.shared.inner.get(b"written-out").unwrap(), None);
        assert_eq!(db.shared.inner.get(b"created").unwrap(), Some(b"1".to_vec()));
    }

    /// A frozen table (being written out) is read too, under the newer
    /// active one.
    #[test]
    fn a_frozen_table_is_read_under_the_active_one() {
        let (db, _dir) = in_memory(usize::MAX / 8);
        let mut old = Table::new();
        old.insert(b"a".to_vec(), Some(b"old".to_vec()));
        old.insert(b"b".to_vec(), Some(b"frozen".to_vec()));
        old.insert(b"c".to_vec(), None);
        let mut below = WriteBatch::default();
        below.put(b"c".to_vec(), b"database".to_vec());
        below.put(b"d".to_vec(), b"database".to_vec());
        db.shared.inner.write(&below).unwrap();
        db.shared.write().frozen = Some(Arc::new(old));
        let mut newer = WriteBatch::default();
        newer.put(b"a".to_vec(), b"new".to_vec());
        db.write(&newer).unwrap();
        let all = db.scan(&KeyRange::prefix(b""), Order::Ascending, 10).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = all.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        assert_eq!(pairs, vec![(&b"a"[..], &b"new"[..]), (b"b", b"frozen"), (b"d", b"database")]);
        assert_eq!(db.get(b"c").unwrap(), None);
        db.shared.write().frozen = None;
    }

    /// Deletions that cancel writes never reach the database, and what is
    /// left arrives once the table passes its threshold, without a persist.
    #[test]
    fn the_table_is_written_out_on_its_own_once_full_and_cancelled_writes_never_arrive() {
        let (db, _dir) = in_memory(4096);
        let mut batch = WriteBatch::default();
        batch.put(b"short-lived".to_vec(), vec![1; 100]);
        db.write(&batch).unwrap();
        let mut batch = WriteBatch::default();
        batch.delete(b"short-lived".to_vec());
        for i in 0..64u32 {
            batch.put(i.to_be_bytes().to_vec(), vec![7; 100]);
        }
        db.write(&batch).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db.shared.inner.get(&63u32.to_be_bytes()).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "the table was never written out");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(db.shared.inner.get(b"short-lived").unwrap(), None);
        assert_eq!(db.shared.inner.get(&0u32.to_be_bytes()).unwrap(), Some(vec![7; 100]));
    }

    /// Persist writes the table out and makes it durable: a reopened
    /// database holds it. Dropping writes it out too.
    #[test]
    fn persisted_and_dropped_writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let sled = SledDb::open(&dir.path().join("db"), 8 << 20).unwrap();
            let db = WriteBehind::open(sled, &dir.path().join("redo"), 1 << 20).unwrap();
            let mut txn = Txn::new(&db);
            crate::KvWrite::put(&mut txn, b"persisted", b"1".to_vec());
            db.write(&txn.into_batch()).unwrap();
            db.persist().unwrap();
            assert_eq!(db.shared.inner.get(b"persisted").unwrap(), Some(b"1".to_vec()));
            let mut batch = WriteBatch::default();
            batch.put(b"dropped".to_vec(), b"2".to_vec());
            db.write(&batch).unwrap();
        }
        let db = SledDb::open(&dir.path().join("db"), 8 << 20).unwrap();
        assert_eq!(db.get(b"persisted").unwrap(), Some(b"1".to_vec()));
        assert_eq!(db.get(b"dropped").unwrap(), Some(b"2".to_vec()));
    }

    /// A write-out cut short after its redo record (the process killed
    /// with part of the keys in the database) is finished at the next open,
    /// over whatever part arrived; a later write-out does not bring back
    /// the earlier values it replaced.
    #[test]
    fn an_open_finishes_a_write_out_that_a_crash_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let redo_path = dir.path().join("redo");
        let mut table = WriteBatch::default();
        for i in 0..100u32 {
            table.put(i.to_be_bytes().to_vec(), format!("سطر {i}").into_bytes());
        }
        table.delete(b"outbox".to_vec());
        {
            let sled = SledDb::open(&dir.path().join("db"), 8 << 20).unwrap();
            let mut before = WriteBatch::default();
            before.put(b"outbox".to_vec(), b"pending".to_vec());
            before.put(7u32.to_be_bytes().to_vec(), b"old".to_vec());
            sled.write(&before).unwrap();
            RedoFile::open(&redo_path).unwrap().record(&mut Vec::new(), table.key_writes()).unwrap();
            let mut part = WriteBatch::default();
            for (key, value) in table.ops().iter().take(40) {
                part.put(key.clone(), value.clone().unwrap());
            }
            sled.write_key_by_key(&mut part.key_writes()).unwrap();
            sled.persist().unwrap();
        }
        {
            let sled = SledDb::open(&dir.path().join("db"), 8 << 20).unwrap();
            let db = WriteBehind::open(sled, &redo_path, 1 << 20).unwrap();
            for (key, value) in table.ops() {
                assert_eq!(&db.shared.inner.get(key).unwrap(), value, "key {key:?}");
            }
            let mut newer = WriteBatch::default();
            newer.put(7u32.to_be_bytes().to_vec(), b"newer".to_vec());
            db.write(&newer).unwrap();
            db.persist().unwrap();
        }
        let sled = SledDb::open(&dir.path().join("db"), 8 << 20).unwrap();
        let db = WriteBehind::open(sled, &redo_path, 1 << 20).unwrap();
        assert_eq!(db.get(&7u32.to_be_bytes()).unwrap(), Some(b"newer".to_vec()));
        assert_eq!(db.get(&99u32.to_be_bytes()).unwrap(), Some("سطر 99".as_bytes().to_vec()));
    }
}
