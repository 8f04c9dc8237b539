//! One shard's raft log as raft-rs sees it: the entries not yet compacted,
//! the hard state and the configuration. It lives in memory; durability comes
//! from the WAL (entries, hard state) and from the database (the applied
//! index and configuration, written with the state they describe).

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

#[derive(Debug, Default)]
pub struct ShardLog {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry dropped from memory (0, 0 at the start).
    truncated_index: u64,
    truncated_term: u64,
    /// `entries[i].index == truncated_index + 1 + i`.
    entries: Vec<Entry>,
    /// What `entries` cost in memory, about ([`entry_bytes`]).
    bytes: usize,
    /// The latest snapshot made for followers too far behind for `entries`.
    snapshot: Option<Snapshot>,
    /// Raft asked for a snapshot newer than the one held: the store loop
    /// has one made (off this thread) and raft asks again later.
    snapshot_wanted: std::cell::Cell<bool>,
}

impl ShardLog {
    /// A log that starts right after `applied_index` (whose term is
    /// `applied_term`), with the entries recovered from the WAL after it.
    pub fn recover(
        hard_state: HardState,
        conf_state: ConfState,
        applied_index: u64,
        applied_term: u64,
        recovered: Vec<Entry>,
    ) -> ShardLog {
        let mut log = ShardLog {
            hard_state,
            conf_state,
            truncated_index: applied_index,
            truncated_term: applied_term,
            entries: Vec::new(),
            bytes: 0,
            snapshot: None,
            snapshot_wanted: std::cell::Cell::new(false),
        };
        for entry in recovered {
            if entry.index == applied_index && entry.term != applied_term {
                // Cannot happen when the WAL and database agree; keep the
                // database's view, which describes applied state.
                tracing::warn!(index = entry.index, "WAL term differs from applied term");
            }
            if entry.index > applied_index {
                log.entries.push(entry);
            }
        }
        // Keep only a contiguous run starting right after the applied index.
        let contiguous = log
            .entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| e.index == applied_index + 1 + *i as u64)
            .count();
        log.entries.truncate(contiguous);
        log.bytes = log.entries.iter().map(entry_bytes).sum();
        // Applied entries were committed, so the commit index is at least the
        // applied index even if the hard state carrying it was not yet logged
        // when the process stopped (raft-rs documents this case).
        if log.hard_state.commit < applied_index {
            log.hard_state.commit = applied_index;
        }
        // And at most the last entry kept: a replica this node gave up
        // (reset to empty) may find its old hard state in the WAL. The commit
        // index is volatile in raft; lowering it is always safe.
        let last = applied_index + log.entries.len() as u64;
        if log.hard_state.commit > last {
            log.hard_state.commit = last;
        }
        // Likewise the term has reached the applied entry's (a new shard
        // starts at a bootstrap point whose term no vote recorded).
        if log.hard_state.term < applied_term {
            log.hard_state.term = applied_term;
        }
        log
    }

    /// The configuration after a committed change was applied.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    #[cfg(test)]
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    fn last(&self) -> u64 {
        self.truncated_index + self.entries.len() as u64
    }

    /// Appends entries handed out by a Ready, replacing any conflicting suffix.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index > self.truncated_index && first.index <= self.last() + 1,
            "append at {} outside ({}, {}]",
            first.index,
            self.truncated_index,
            self.last() + 1
        );
        let keep = (first.index - self.truncated_index - 1) as usize;
        self.bytes -= self.entries[keep..].iter().map(entry_bytes).sum::<usize>();
        self.entries.truncate(keep);
        self.bytes += entries.iter().map(entry_bytes).sum::<usize>();
        self.entries.extend_from_slice(entries);
    }

    /// About how much memory the entries held cost.
    pub fn bytes_in_memory(&self) -> usize {
        self.bytes
    }

    /// True once per request for a new snapshot.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Holds a freshly made snapshot to serve to followers.
    pub fn set_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = Some(snapshot);
    }

    /// The log now starts after a snapshot installed from the leader.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) {
        let meta = snapshot.get_metadata();
        self.entries.clear();
        self.bytes = 0;
        self.truncated_index = meta.index;
        self.truncated_term = meta.term;
        self.conf_state = meta.get_conf_state().clone();
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
    }

    /// Drops entries up to and including `index` from memory (they are applied).
    pub fn compact(&mut self, index: u64) {
        if index <= self.truncated_index {
            return;
        }
        let index = index.min(self.last());
        let drop = (index - self.truncated_index) as usize;
        self.truncated_term = self.entries[drop - 1].term;
        self.bytes -= self.entries.drain(..drop).map(|e| entry_bytes(&e)).sum::<usize>();
        self.truncated_index = index;
    }

    pub fn first_index_in_memory(&self) -> u64 {
        self.truncated_index + 1
    }

    fn entry_term(&self, index: u64) -> Option<u64> {
        if index == self.truncated_index {
            return Some(self.truncated_term);
        }
        if index < self.truncated_index || index > self.last() {
            return None;
        }
        Some(self.entries[(index - self.truncated_index - 1) as usize].term)
    }
}

impl Storage for ShardLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - self.truncated_index - 1) as usize;
        let to = (high - self.truncated_index - 1) as usize;
        let mut entries = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry_term(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Serve the held snapshot if it covers what the log no longer has
        // and its configuration names the receiver (one made before the
        // receiver was added would be refused there); otherwise ask for a
        // new one and let raft try again on a later beat.
        if let Some(snapshot) = &self.snapshot {
            let meta = snapshot.get_metadata();
            let conf = meta.get_conf_state();
            let names_receiver = conf.voters.contains(&to) || conf.learners.contains(&to);
            if meta.index >= request_index && meta.index >= self.truncated_index && names_receiver {
                return Ok(snapshot.clone());
            }
        }
        self.snapshot_wanted.set(true);
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

/// An entry's payload and a little for its other fields.
fn entry_bytes(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len() + 48
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e
    }

    #[test]
    fn append_overwrites_and_compact_keeps_terms() {
        let mut log = ShardLog::default();
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        log.append(&[entry(3, 2), entry(4, 2)]);
        assert_eq!(log.last_index().unwrap(), 4);
        assert_eq!(log.term(3).unwrap(), 2);
        log.compact(2);
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1, "the term before the first entry is kept");
        assert!(log.term(1).is_err());
        let got = log.entries(3, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn the_memory_count_follows_appends_overwrites_compaction_and_snapshots() {
        let sized = |index: u64, term: u64, bytes: usize| Entry { data: vec![0; bytes].into(), ..entry(index, term) };
        let mut log = ShardLog::default();
        log.append(&[sized(1, 1, 100), sized(2, 1, 200), sized(3, 1, 300)]);
        assert_eq!(log.bytes_in_memory(), 600 + 3 * 48);
        log.append(&[sized(3, 2, 1000)]);
        assert_eq!(log.bytes_in_memory(), 1300 + 3 * 48);
        log.compact(2);
        assert_eq!(log.bytes_in_memory(), 1000 + 48);
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 9;
        log.apply_snapshot(&snapshot);
        assert_eq!(log.bytes_in_memory(), 0);
        let log = ShardLog::recover(HardState::default(), ConfState::default(), 1, 1, vec![sized(2, 1, 10), sized(3, 1, 20)]);
        assert_eq!(log.bytes_in_memory(), 30 + 2 * 48);
    }

    #[test]
    fn recover_starts_after_applied_and_lifts_commit() {
        let mut hs = HardState::default();
        hs.commit = 1;
        let log = ShardLog::recover(hs, ConfState::default(), 2, 1, vec![entry(1, 1), entry(2, 1), entry(3, 1)]);
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.hard_state().commit, 2);
    }
}
