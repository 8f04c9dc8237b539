//! Which nodes hold a chunk: rendezvous (highest random weight) hashing.
//! Every node computes the same answer from the member list alone, and when
//! a node joins or leaves only the chunks it gains or loses move.

use hamgam_types::{ChunkId, NodeId};

fn weight(chunk: &ChunkId, node: NodeId) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("hamgam chunk placement v1");
    hasher.update(&chunk.0);
    hasher.update(&node.0.to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The `copies` nodes (or all, if fewer) that hold `chunk`, best first.
pub fn holders(chunk: &ChunkId, nodes: &[NodeId], copies: usize) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, NodeId)> = nodes.iter().map(|&node| (weight(chunk, node), node)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().take(copies).map(|(_, node)| node).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_spread_and_move_little_when_a_node_joins() {
        let three = [NodeId(1), NodeId(2), NodeId(3)];
        let four = [NodeId(1), NodeId(2), NodeId(3), NodeId(4)];
        let mut counts = [0usize; 5];
        let mut moved = 0;
        for i in 0..4000u32 {
            let id = ChunkId::of(&i.to_le_bytes());
            let before = holders(&id, &three, 2);
            let after = holders(&id, &four, 2);
            assert_eq!(before.len(), 2);
            for node in &after {
                counts[node.0 as usize] += 1;
            }
            moved += after.iter().filter(|n| !before.contains(n)).count();
        }
        // Each of four nodes holds about half the chunks (2,000 copies); the
        // new node's copies are the only ones that moved.
        assert!(counts[1..].iter().all(|&c| (1700..2300).contains(&c)), "{counts:?}");
        assert_eq!(moved, counts[4]);
    }
}
