//! The leaf of the crate graph: identifiers, named limits and shard placement.
//!
//! Every other Hamgam crate depends on this one and it depends on nothing of
//! ours. It owns the newtypes that travel between layers ([`UserId`],
//! [`ChatId`], [`DeviceId`], [`ShardId`], [`NodeId`], [`ChunkId`]), every size and count
//! limit in [`limits`], and the rule that maps a key onto a shard
//! ([`Placement`]). It must not know about storage, raft, QUIC or the wire
//! format: these are plain values.

pub mod limits;
mod placement;

pub use placement::Placement;

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A user account. Allocated by the shard that owns the username, so that
    /// `Placement::shard_of_user` lands on that same shard.
    UserId(u64)
);
id_type!(
    /// A chat (direct or group). Random or hash-derived, so uniformly spread.
    ChatId(u64)
);
id_type!(
    /// One logged-in device (a session) of a user; unique within the user.
    DeviceId(u64)
);
id_type!(
    /// A raft group. Shard 0 is the cluster shard; data lives in 1..=n.
    ShardId(u32)
);
id_type!(
    /// A node (machine) of the cluster; also its raft peer id.
    NodeId(u64)
);

impl ShardId {
    /// The shard holding cluster membership and replica placement.
    pub const CLUSTER: ShardId = ShardId(0);
}

/// A chunk of stored content, named by the blake3 hash of its plain bytes.
/// Two equal chunks anywhere in the cluster have one name, which is what
/// lets an upload skip what is already stored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The name of these plain bytes.
    pub fn of(plain: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(plain).as_bytes())
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(text: &str) -> Option<ChunkId> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut id = [0u8; 32];
        for (i, pair) in text.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            id[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
        }
        Some(ChunkId(id))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    /// Short, as people read hashes in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId(")?;
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_print_and_parse_as_hex() {
        let id = ChunkId::of("سلام".as_bytes());
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(ChunkId::from_hex(&text), Some(id));
        assert_eq!(ChunkId::from_hex(&text[..63]), None);
        assert_eq!(ChunkId::from_hex(&text.replace(&text[..1], "z")), None);
    }
}
