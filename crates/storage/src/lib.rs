//! Key-value storage behind our own narrow interface.
//!
//! Owns the [`Db`] trait (get, bounded scan, atomic batch write, durable
//! [`Db::persist`]), its two adapters ([`SledDb`] on disk, [`MemDb`] in memory),
//! the [`WriteBehind`] table that folds a node's short-lived and rewritten
//! keys in memory before they reach the database (with the redo record that
//! lets a crashed write-out finish), the read/write traits [`KvRead`] and
//! [`KvWrite`] that domain code is written against, the [`Txn`] overlay that
//! lets one apply round read its own writes before they reach the database
//! in one atomic batch, and the [`Prefixed`] view that confines a shard to
//! its own key range.
//!
//! Nothing above this crate names sled. This crate knows nothing of raft,
//! shards or chats: keys and values are bytes.

mod kv;
mod mem;
mod redo;
mod sled_db;
mod txn;
mod write_behind;

pub use kv::{KeyRange, KvPairs, KvRead, KvWrite, Order, Prefixed, prefix_end};
pub use mem::{CountingDb, MemDb};
pub use sled_db::SledDb;
pub use txn::{Txn, WriteBatch};
pub use write_behind::WriteBehind;

/// One key's write, borrowed: its new value, or `None` for a deletion.
pub type KeyWrite<'a> = (&'a [u8], Option<&'a [u8]>);

/// Errors of the storage layer. All are fatal for the operation that met
/// them; none is caused by a client.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database engine reported a failure (disk full, I/O error).
    #[error("database failure: {0}")]
    Backend(String),
    /// A file operation outside the engine failed.
    #[error("storage I/O failed on {path}")]
    Io { path: String, source: std::io::Error },
    /// The data lives on another node that could not be read now (a
    /// shard hosted elsewhere); retrying later may succeed.
    #[error("{0}")]
    Unreachable(String),
}

/// A key-value database shared by the whole node.
pub trait Db: KvRead + Send + Sync + std::fmt::Debug {
    /// Applies every write of the batch atomically and in order: after a crash
    /// either all of it or none of it is visible.
    fn write(&self, batch: &WriteBatch) -> Result<(), StorageError>;

    /// [`Db::write`] for a caller that is done with the batch: a database
    /// that keeps writes in memory takes them over instead of copying them.
    fn write_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write(&batch)
    }

    /// Applies the writes key by key, not atomically: a crash may leave any
    /// part of them. For a caller that keeps its own record to
    /// finish the batch after a crash; in return the database's readers are
    /// not held up for the whole batch (sled stops every reader while it
    /// applies an atomic batch).
    fn write_key_by_key(&self, writes: &mut dyn Iterator<Item = KeyWrite<'_>>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.put(key.to_vec(), value.to_vec()),
                None => batch.delete(key.to_vec()),
            }
        }
        self.write(&batch)
    }

    /// Makes everything written before the call durable against power loss.
    /// Slow (it syncs files); called by checkpoints, never per request.
    fn persist(&self) -> Result<(), StorageError>;
}
