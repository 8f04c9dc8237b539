//! A bounded map for the state machine's hot metadata.
//!
//! Bounded by total weight (entries, or member records for chats). When full
//! it is emptied rather than evicting one by one: O(1) bookkeeping, a burst
//! of misses that reload from storage, and a hard memory ceiling.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct BoundedCache<K, V> {
    map: HashMap<K, (V, usize)>,
    weight: usize,
    weight_max: usize,
}

impl<K: Eq + Hash, V> BoundedCache<K, V> {
    pub(crate) fn new(weight_max: usize) -> Self {
        BoundedCache { map: HashMap::new(), weight: 0, weight_max }
    }

    pub(crate) fn clear(&mut self) {
        *self = BoundedCache::new(self.weight_max);
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key).map(|(v, _)| v)
    }

    /// Inserts with a weight (at least 1).
    pub(crate) fn insert(&mut self, key: K, value: V, weight: usize) {
        let weight = weight.max(1);
        if self.weight + weight > self.weight_max {
            self.map.clear();
            self.weight = 0;
        }
        if let Some((_, old)) = self.map.insert(key, (value, weight)) {
            self.weight -= old;
        }
        self.weight += weight;
    }

    /// Takes an entry out.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (value, weight) = self.map.remove(key)?;
        self.weight -= weight;
        Some(value)
    }

    /// The cached value, or `load`'s, cached (weight 1).
    pub(crate) fn get_or_load<E>(&mut self, key: K, load: impl FnOnce() -> Result<V, E>) -> Result<V, E>
    where
        V: Copy,
    {
        if let Some(value) = self.get(&key) {
            return Ok(*value);
        }
        let value = load()?;
        self.insert(key, value, 1);
        Ok(value)
    }

    /// Changes the weight of an entry after its value grew or shrank.
    pub(crate) fn reweigh(&mut self, key: &K, weight: usize) {
        if let Some((_, old)) = self.map.get_mut(key) {
            self.weight = self.weight - *old + weight.max(1);
            *old = weight.max(1);
        }
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_never_holds_more_than_its_weight() {
        let mut cache = BoundedCache::new(10);
        for i in 0..100 {
            cache.insert(i, i, 3);
            assert!(cache.weight <= 10);
        }
        assert_eq!(cache.get(&99), Some(&99));
        cache.reweigh(&99, 5);
        assert_eq!(cache.weight, cache.map.values().map(|(_, w)| w).sum::<usize>());
    }
}
