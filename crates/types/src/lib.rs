//! The leaf of the crate graph: identifiers, named limits and shard placement.
//!
//! Every other Hamgam crate depends on this one and it depends on nothing of
//! ours. It owns the newtypes that travel between layers ([`UserId`],
//! [`ChatId`], [`DeviceId`], [`ShardId`], [`NodeId`]), every size and count
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
