use crate::{ChatId, ShardId, UserId};

/// Maps keys onto shards. The number of data shards is fixed when the cluster
/// is made, so a key never moves between shards; growing moves replicas.
///
/// - A user lives in shard `1 + id % n`: user ids are allocated by the shard that
///   owns the username (see `sync`), so a user's record, credentials, devices
///   and updates share one shard with the username index entry.
/// - A chat lives in shard `1 + id % n`. Chat ids are blake3-derived and then
///   placed ([`Placement::chat_id_near`]) on the shard of one of their members
///   (the lower user of a direct chat, a group's creator), so that member's
///   updates are written in the same apply, without a cross-shard hop.
/// - A username lives in shard `1 + blake3(lowercase name) % n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    data_shards: u32,
}

impl Placement {
    /// `data_shards` must be at least 1; shard 0 (the cluster shard) is extra.
    pub fn new(data_shards: u32) -> Self {
        assert!(data_shards >= 1, "a cluster needs at least one data shard");
        Placement { data_shards }
    }

    pub fn data_shards(&self) -> u32 {
        self.data_shards
    }

    /// Every shard of the cluster, the cluster shard first.
    pub fn all_shards(&self) -> impl Iterator<Item = ShardId> {
        (0..=self.data_shards).map(ShardId)
    }

    pub fn shard_of_user(&self, user: UserId) -> ShardId {
        self.shard_of_u64(user.0)
    }

    pub fn shard_of_chat(&self, chat: ChatId) -> ShardId {
        self.shard_of_u64(chat.0)
    }

    /// `username_key` is the normalised (lowercase) username.
    pub fn shard_of_username(&self, username_key: &str) -> ShardId {
        let hash = blake3::hash(username_key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        self.shard_of_u64(u64::from_le_bytes(first))
    }

    /// The user id a shard hands out as its `counter`-th account. It maps back
    /// onto `shard` by construction.
    pub fn user_id_for(&self, shard: ShardId, counter: u64) -> UserId {
        debug_assert!(shard.0 >= 1 && shard.0 <= self.data_shards);
        UserId(counter * u64::from(self.data_shards) + u64::from(shard.0 - 1))
    }

    /// A chat id made from `hash` that lives on the same shard as `user`.
    /// Keeps all but the placement bits of the hash, so ids stay unguessable
    /// and spread evenly wherever users are.
    pub fn chat_id_near(&self, hash: u64, user: UserId) -> ChatId {
        let n = u128::from(self.data_shards);
        let wanted = u128::from(self.shard_of_user(user).0 - 1);
        let base = u128::from(hash) / n * n;
        let id = if base + wanted <= u128::from(u64::MAX) { base + wanted } else { base - n + wanted };
        // Below u64::MAX by construction.
        ChatId(id as u64)
    }

    fn shard_of_u64(&self, value: u64) -> ShardId {
        // The remainder is below `data_shards`, a u32, so the cast is lossless.
        ShardId(1 + (value % u64::from(self.data_shards)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_user_ids_land_on_their_allocating_shard() {
        let placement = Placement::new(64);
        for shard in 1..=64 {
            for counter in [0u64, 1, 2, 1000, u64::MAX / 128] {
                let user = placement.user_id_for(ShardId(shard), counter);
                assert_eq!(placement.shard_of_user(user), ShardId(shard));
            }
        }
    }

    #[test]
    fn chats_placed_near_a_user_share_its_shard() {
        for shards in [1u32, 7, 64] {
            let placement = Placement::new(shards);
            for (hash, user) in [(0u64, 5u64), (u64::MAX, 3), (u64::MAX - 1, 63), (1234567, 0)] {
                let chat = placement.chat_id_near(hash, UserId(user));
                assert_eq!(placement.shard_of_chat(chat), placement.shard_of_user(UserId(user)));
                assert!(hash.abs_diff(chat.0) < 2 * u64::from(shards));
            }
        }
    }

    #[test]
    fn usernames_spread_over_every_shard() {
        let placement = Placement::new(16);
        let mut seen = [0u32; 17];
        for i in 0..4000 {
            seen[placement.shard_of_username(&format!("user{i}")).0 as usize] += 1;
        }
        assert_eq!(seen[0], 0, "nothing lands on the cluster shard");
        assert!(seen[1..].iter().all(|&n| n > 150), "uneven spread: {seen:?}");
    }
}
