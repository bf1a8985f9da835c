//! Memory caps of the in-process state keyed by outside data (endpoints, rate-limit keys,
//! endpoint ids): [`MemoryCap`] sets one, [`MapUsage`] reports how full a map is. Every such
//! map (`BoundedMap`, the one map type for it) is capped in entries and bytes and evicts its
//! least recently used entry.
//!
//! Built on `hashlink`'s `LinkedHashMap` (a hash map threaded by a linked list): every
//! operation, eviction included, is O(1), with no sweeps. `hashlink` is already in the build
//! through sqlx, and it is small (one dependency, hashbrown), which matters on a 2-core
//! builder more than `moka`'s or `quick_cache`'s concurrency does: every map here sits behind
//! one short `Mutex`.

use std::{
    borrow::Borrow,
    hash::{Hash, RandomState},
    mem::size_of,
};

use hashlink::LinkedHashMap;

/// What one entry costs beyond its key and value: the list links and the table slot (a
/// pointer and a control byte, at hashbrown's 7/8 load), rounded up.
const ENTRY_OVERHEAD: usize = 4 * size_of::<usize>();

/// How much an in-process map may hold: at most `entries` entries, and at most about `bytes`
/// bytes (keys, values, what they own on the heap, and the map's own per-entry cost).
///
/// Past either, the least recently used entries are forgotten. Forgetting is always safe: an
/// entry is rebuilt from scratch the next time it is needed (a closed breaker, a full rate
/// budget, statistics from zero), never an error.
///
/// ```
/// use apalis_webhooks::bounded::MemoryCap;
///
/// let cap = MemoryCap::new(10_000, 8 << 20); // 10,000 endpoints, 8 MiB
/// assert_eq!((cap.entries(), cap.bytes()), (10_000, 8 << 20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryCap {
    entries: usize,
    bytes: usize,
}

impl MemoryCap {
    /// At most `entries` entries (at least one) and about `bytes` bytes.
    pub const fn new(entries: usize, bytes: usize) -> Self {
        Self {
            entries: if entries == 0 { 1 } else { entries },
            bytes,
        }
    }

    /// The most entries kept.
    pub const fn entries(&self) -> usize {
        self.entries
    }

    /// The most bytes kept (approximately: what the keys and values own, plus a fixed cost
    /// per entry; allocator slack is not counted).
    pub const fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The size of one in-process map, next to its cap: for memory dashboards and tests.
/// Reading it takes the map's lock for a moment; it does not walk the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapUsage {
    /// Which map (`"breakers"`, `"rate_budgets"`…), stable for dashboards.
    pub map: &'static str,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now, counted as [`MemoryCap::bytes`] counts them.
    pub bytes: usize,
    /// The cap.
    pub cap: MemoryCap,
}

impl MapUsage {
    /// Whether the map is within its cap.
    pub fn within_cap(&self) -> bool {
        self.entries <= self.cap.entries && self.bytes <= self.cap.bytes
    }
}

/// Heap bytes a key or value owns beyond its inline size.
pub(crate) trait HeapSize {
    /// Bytes owned on the heap (capacities, not lengths: that is what is allocated).
    fn heap_bytes(&self) -> usize;
}

impl HeapSize for String {
    fn heap_bytes(&self) -> usize {
        self.capacity()
    }
}

/// A map capped by a [`MemoryCap`], forgetting its least recently used entries. Not
/// synchronised: owners keep it behind their own lock.
pub(crate) struct BoundedMap<K, V> {
    /// std's SipHash, not hashlink's default (foldhash): the keys are chosen by outsiders, so
    /// the hasher must resist collision flooding.
    map: LinkedHashMap<K, Slot<V>, RandomState>,
    name: &'static str,
    cap: MemoryCap,
    bytes: usize,
}

/// A value with what it weighed when last stored, so that removing or re-weighing it is exact.
struct Slot<V> {
    value: V,
    /// The whole entry.
    weight: usize,
    /// Of which the value's heap.
    heap: usize,
}

impl<K: Hash + Eq + HeapSize, V: HeapSize> BoundedMap<K, V> {
    /// An empty map called `name` in [`MapUsage`], holding at most `cap`.
    pub(crate) fn new(name: &'static str, cap: MemoryCap) -> Self {
        Self {
            map: LinkedHashMap::with_hasher(RandomState::new()),
            name,
            cap,
            bytes: 0,
        }
    }

    fn slot(key: &K, value: V) -> Slot<V> {
        let heap = value.heap_bytes();
        let weight = (ENTRY_OVERHEAD + size_of::<K>() + size_of::<Slot<V>>())
            .saturating_add(key.heap_bytes())
            .saturating_add(heap);
        Slot { value, weight, heap }
    }

    /// The value under `key`, without making it recently used (for reads by the app).
    pub(crate) fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|slot| &slot.value)
    }

    /// The value under `key`, made the most recently used. A change through the reference is
    /// not re-weighed: only for values whose heap it does not change.
    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.to_back(key).map(|slot| &mut slot.value)
    }

    /// Takes `key` out.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.map.remove(key)?;
        self.bytes = self.bytes.saturating_sub(slot.weight);
        Some(slot.value)
    }

    /// Stores `value` under `key` as the most recently used, then evicts down to the cap (an
    /// entry larger than the whole byte cap is not kept).
    pub(crate) fn insert(&mut self, key: K, value: V) {
        let slot = Self::slot(&key, value);
        self.bytes = self.bytes.saturating_add(slot.weight);
        if let Some(old) = self.map.insert(key, slot) {
            self.bytes = self.bytes.saturating_sub(old.weight);
        }
        self.evict();
    }

    /// Runs `change` on `key`'s value (a new one from `make` if there is none), makes it the
    /// most recently used, re-weighs it and evicts down to the cap.
    pub(crate) fn update<Q, R>(&mut self, key: &Q, make: impl FnOnce() -> V, change: impl FnOnce(&mut V) -> R) -> R
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let out = match self.map.to_back(key) {
            Some(slot) => {
                let out = change(&mut slot.value);
                // Re-weighed in place: the key is unchanged, only what the value owns moved.
                let heap = slot.value.heap_bytes();
                let before = slot.weight;
                slot.weight = before.saturating_sub(slot.heap).saturating_add(heap);
                slot.heap = heap;
                self.bytes = self.bytes.saturating_sub(before).saturating_add(slot.weight);
                out
            }
            None => {
                let mut value = make();
                let out = change(&mut value);
                self.insert(key.to_owned(), value);
                return out;
            }
        };
        self.evict();
        out
    }

    fn evict(&mut self) {
        while self.map.len() > self.cap.entries || self.bytes > self.cap.bytes {
            let Some((_, slot)) = self.map.pop_front() else {
                self.bytes = 0;
                return;
            };
            self.bytes = self.bytes.saturating_sub(slot.weight);
        }
    }

    /// Entries, least recently used first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(key, slot)| (key, &slot.value))
    }

    /// Its size and cap.
    pub(crate) fn usage(&self) -> MapUsage {
        MapUsage {
            map: self.name,
            entries: self.map.len(),
            bytes: self.bytes,
            cap: self.cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HeapSize for Vec<u8> {
        fn heap_bytes(&self) -> usize {
            self.capacity()
        }
    }

    fn map(entries: usize, bytes: usize) -> BoundedMap<String, Vec<u8>> {
        BoundedMap::new("test", MemoryCap::new(entries, bytes))
    }

    fn keys(map: &BoundedMap<String, Vec<u8>>) -> Vec<&str> {
        map.iter().map(|(key, _)| key.as_str()).collect()
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut map = map(3, usize::MAX);
        for key in ["a", "b", "c"] {
            map.insert(key.to_owned(), Vec::new());
        }
        // Updating "a" makes it the most recent; peeking "b" does not.
        map.update("a", Vec::new, |_| ());
        assert!(map.peek("b").is_some());
        map.insert("d".to_owned(), Vec::new());
        assert_eq!(keys(&map), ["c", "a", "d"]);
        map.update("e", Vec::new, |_| ());
        assert_eq!(keys(&map), ["a", "d", "e"]);
        assert_eq!(map.usage().entries, 3);
    }

    #[test]
    fn bytes_are_counted_as_values_grow_and_capped() {
        let mut map = map(1_000, 4_096);
        map.insert("a".to_owned(), Vec::new());
        let empty = map.usage().bytes;
        map.update("a", Vec::new, |v| v.reserve_exact(1_000));
        assert_eq!(map.usage().bytes, empty + map.peek("a").unwrap().capacity());
        // Growing "b" past what is left pushes "a" out, oldest first.
        map.insert("b".to_owned(), Vec::new());
        map.update("b", Vec::new, |v| v.reserve_exact(3_000));
        assert_eq!(keys(&map), ["b"]);
        assert!(map.usage().within_cap());
        // Removing gives the bytes back exactly; a value larger than the cap is not kept.
        map.remove("b");
        assert_eq!(map.usage().bytes, 0);
        map.insert("huge".to_owned(), vec![0; 10_000]);
        assert_eq!((map.usage().entries, map.usage().bytes), (0, 0));
        // A zero cap still keeps one entry.
        assert_eq!(MemoryCap::new(0, 1).entries(), 1);
    }

    #[test]
    fn replacing_a_value_does_not_count_it_twice() {
        let mut map = map(10, usize::MAX);
        map.insert("a".to_owned(), vec![0; 100]);
        let once = map.usage().bytes;
        map.insert("a".to_owned(), vec![0; 100]);
        assert_eq!(map.usage().bytes, once);
        map.update("a", Vec::new, |v| *v = Vec::new());
        assert_eq!(map.usage().bytes, once - 100);
    }
}
